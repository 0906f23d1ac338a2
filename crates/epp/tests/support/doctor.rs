//! Shared harness of the `epp doctor` tests (`doctor_e2e`, `doctor_tls`, `doctor_k8s_auth`):
//! run `epp doctor` and read its report, and start a lone `epp proxy` whose metrics port is
//! what doctor checks. Included by those tests with `#[path]` (under `support/`, so no test binary of its own).
#![allow(dead_code)]

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The checkout, where doctor finds the shipped dashboard and alert rules.
pub fn checkout() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// Runs `epp doctor` with `args` and `--timeout 3s` in the checkout: exit code and stdout
/// (stderr appended).
pub fn doctor(args: &[String]) -> (i32, String) {
    doctor_in(&checkout(), args, "3s")
}

/// Runs `epp doctor` with `args` and `--timeout <timeout>` in `dir`: exit code and stdout
/// (stderr appended).
pub fn doctor_in(dir: &Path, args: &[String], timeout: &str) -> (i32, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_epp"))
        .arg("doctor")
        .args(args)
        .args(["--timeout", timeout])
        .current_dir(dir)
        .output()
        .expect("running epp doctor");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.code().unwrap_or(-1), text)
}

/// The line starting with `prefix`, and the line after it (the `fix:`/`hint:` line).
pub fn line_and_next<'a>(out: &'a str, prefix: &str) -> (&'a str, &'a str) {
    let lines: Vec<&str> = out.lines().collect();
    let i = lines
        .iter()
        .position(|l| l.starts_with(prefix))
        .unwrap_or_else(|| panic!("no line starting with {prefix:?} in:\n{out}"));
    (lines[i], lines.get(i + 1).copied().unwrap_or(""))
}

/// Every line starting with `prefix`.
pub fn lines_starting<'a>(out: &'a str, prefix: &str) -> Vec<&'a str> {
    out.lines().filter(|l| l.starts_with(prefix)).collect()
}

/// A free loopback address (bound, read, released).
pub fn free_addr() -> SocketAddr {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
}

/// An `epp proxy` started by [`start_picker`]; killed when dropped.
pub struct Picker {
    child: Child,
    pub metrics: SocketAddr,
    /// Its stdout and stderr.
    pub log: PathBuf,
}

impl Drop for Picker {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Picker {
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

/// Starts `epp proxy` with `extra` flags, logging to `log`. No model server is needed (its one
/// endpoint is an address nobody listens on): only the metrics listener is checked. Outside a
/// cluster (`KUBERNETES_SERVICE_HOST` removed). Returns once the metrics port accepts
/// connections.
pub fn start_picker(log: PathBuf, extra: &[String]) -> Picker {
    let metrics = free_addr();
    let out = std::fs::File::create(&log).unwrap();
    let child = Command::new(env!("CARGO_BIN_EXE_epp"))
        .args([
            "proxy".to_string(),
            format!("--listen={}", free_addr()),
            format!("--metrics-bind-address={metrics}"),
            format!("--health-probe-bind-address={}", free_addr()),
            format!("--endpoint={}", free_addr()),
        ])
        .args(extra)
        .env_remove("KUBERNETES_SERVICE_HOST")
        .stdin(Stdio::null())
        .stdout(out.try_clone().unwrap())
        .stderr(out)
        .spawn()
        .expect("starting epp proxy");
    let p = Picker {
        child,
        metrics,
        log,
    };
    let deadline = Instant::now() + Duration::from_secs(60);
    while TcpStream::connect(metrics).is_err() {
        assert!(
            Instant::now() < deadline,
            "the metrics port never opened:\n{}",
            p.log()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    p
}

//! `epp sim` as a user runs it: bad flags are refused before binding with an error naming the
//! flag; several servers start, answer with their identity, and stop cleanly on SIGTERM.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn epp() -> Command {
    Command::new(env!("CARGO_BIN_EXE_epp"))
}

#[test]
fn bad_flags_are_refused_naming_the_flag() {
    let cases: &[(&[&str], &str)] = &[
        (&["--count", "0"], "--count"),
        (&["--block-size", "0"], "--block-size"),
        (&["--max-num-seqs", "0"], "--max-num-seqs"),
        (&["--num-gpu-blocks", "0"], "--num-gpu-blocks"),
        (&["--jitter", "1.5"], "--jitter"),
        (&["--error-rate", "2"], "--error-rate"),
        (&["--error-status", "200"], "--error-status"),
        (&["--inter-token-ms=-1"], "--inter-token-ms"),
        (&["--lora-modules", "a", "--max-loras", "0"], "--max-loras"),
        (&["--base-port", "65535", "--count", "2"], "--base-port"),
        (
            &[
                "--base-port",
                "0",
                "--tokenizer",
                "/nonexistent/tokenizer.json",
            ],
            "invalid --tokenizer: cannot read /nonexistent/tokenizer.json",
        ),
    ];
    for (args, flag) in cases {
        let out = epp()
            .arg("sim")
            .args(["--host", "127.0.0.1"])
            .args(*args)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {stderr}");
        assert!(stderr.contains(flag), "{args:?}: {stderr}");
    }
}

fn http(addr: &str, request: &str) -> String {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(request.as_bytes()).unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    out
}

#[test]
fn serves_several_servers_and_stops_on_sigterm() {
    let mut child = epp()
        .args(["--log-format", "json", "--log-level", "info", "sim"])
        .args(["--count", "2", "--base-port", "0", "--host", "127.0.0.1"])
        .args(["--inter-token-ms", "0", "--prefill-overhead-ms", "0"])
        .stderr(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let mut addrs = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(20);
    while addrs.len() < 2 {
        let left = deadline.saturating_duration_since(Instant::now());
        let line = match rx.recv_timeout(left) {
            Ok(l) => l,
            Err(_) => {
                let _ = child.kill();
                panic!("servers did not report listening addresses");
            }
        };
        let Ok(v) = serde_json::from_str::<serde_json::Value>(&line) else {
            continue;
        };
        let msg = v["message"]
            .as_str()
            .or_else(|| v["fields"]["message"].as_str());
        if msg.is_some_and(|m| m.starts_with("listening")) {
            let addr = v["addr"]
                .as_str()
                .or_else(|| v["fields"]["addr"].as_str())
                .unwrap()
                .to_string();
            let server = v["server"]
                .as_str()
                .or_else(|| v["fields"]["server"].as_str())
                .unwrap()
                .to_string();
            addrs.push((server, addr));
        }
    }
    for (i, (server, addr)) in addrs.iter().enumerate() {
        assert_eq!(server, &format!("sim-{i}"));
        let body = r#"{"prompt":"hello","max_tokens":2}"#;
        let res = http(
            addr,
            &format!(
                "POST /v1/completions HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            ),
        );
        assert!(res.starts_with("HTTP/1.1 200"), "{res}");
        assert!(res.contains(&format!("x-inference-pod: sim-{i}")), "{res}");
        let port = addr.rsplit(':').next().unwrap();
        assert!(res.contains(&format!("x-inference-port: {port}")), "{res}");
        assert!(res.contains("\"completion_tokens\":2"), "{res}");
    }
    let status = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let deadline = Instant::now() + Duration::from_secs(20);
    let exit = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("epp sim did not exit after SIGTERM");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(exit.success(), "{exit:?}");
    // The reader thread ends at EOF of the exited process's stderr.
    let rest: Vec<String> = rx.iter().collect();
    assert!(
        rest.iter().any(|l| l.contains("stopped")),
        "no 'stopped' log line: {rest:?}"
    );
    // The ports are closed.
    for (_, addr) in &addrs {
        assert!(TcpStream::connect(addr).is_err());
    }
}

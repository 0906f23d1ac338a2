//! End to end (issue 6): a real Prometheus, configured with the shipped static scrape config,
//! scrapes `epp proxy` in front of three `epp sim` servers under load — once without metrics
//! auth and once with `--metrics-auth=token`. Then `up{job="llm-d-gaie-epp"} == 1`, every
//! dashboard query returns data through the Prometheus HTTP API, and so does every alert
//! expression before its threshold comparison.
//!
//! `cargo test -p epp --test monitoring_e2e`. Needs `prometheus` (EPP_PROMETHEUS_BIN or PATH;
//! `scripts/test` installs it). Everything binds 127.0.0.1.

#[path = "monitoring_common.rs"]
mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use common::*;

/// Child processes we started; killed (by pid, each) when dropped.
struct Procs {
    children: Vec<(String, Child)>,
    dir: tempfile::TempDir,
}

impl Drop for Procs {
    fn drop(&mut self) {
        for (_, c) in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Procs {
    fn logs(&self) -> String {
        self.children
            .iter()
            .map(|(name, _)| {
                let log = std::fs::read_to_string(self.dir.path().join(format!("{name}.log")))
                    .unwrap_or_default();
                let tail: Vec<&str> = log.lines().rev().take(30).collect();
                format!(
                    "--- {name} (last lines)\n{}",
                    tail.into_iter().rev().collect::<Vec<_>>().join("\n")
                )
            })
            .collect::<Vec<_>>()
            .join("\n")
    }

    fn spawn(&mut self, name: &str, args: &[String]) {
        let log = std::fs::File::create(self.dir.path().join(format!("{name}.log"))).unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_epp"))
            .args(args)
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("starting epp {name}: {e}"));
        self.children.push((name.to_string(), child));
    }
}

/// `n` consecutive free loopback ports.
fn free_ports(n: u16) -> u16 {
    for _ in 0..100 {
        let base = free_port();
        if base > 65535 - n {
            continue;
        }
        let held: Vec<_> = (0..n)
            .map_while(|i| TcpListener::bind(("127.0.0.1", base + i)).ok())
            .collect();
        if held.len() == n as usize {
            return base;
        }
    }
    panic!("no {n} consecutive free ports");
}

fn wait_http_ok(addr: SocketAddr, path: &str, procs: &Procs) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while !matches!(http_get(addr, path, None), Ok((200, _))) {
        assert!(
            Instant::now() < deadline,
            "{addr}{path} never answered 200\n{}",
            procs.logs()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// The picker stack: 3 sims and `epp proxy` with the given extra flags. Returns the processes,
/// the proxy's address and its metrics address.
fn start_stack(extra: &[String], files: &[(&str, &str)]) -> (Procs, SocketAddr, SocketAddr) {
    let mut procs = Procs {
        children: Vec::new(),
        dir: tempfile::tempdir().unwrap(),
    };
    for (name, content) in files {
        std::fs::write(procs.dir.path().join(name), content).unwrap();
    }
    let sim_base = free_ports(3);
    procs.spawn(
        "sim",
        &[
            "sim",
            "--host",
            "127.0.0.1",
            "--count",
            "3",
            "--base-port",
            &sim_base.to_string(),
            "--inter-token-ms",
            "0",
            "--prefill-overhead-ms",
            "0",
        ]
        .map(String::from),
    );
    for i in 0..3 {
        wait_http_ok(
            format!("127.0.0.1:{}", sim_base + i).parse().unwrap(),
            "/health",
            &procs,
        );
    }
    let proxy: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let metrics: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let health: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let mut args: Vec<String> = [
        "proxy".to_string(),
        format!("--listen={proxy}"),
        format!("--metrics-bind-address={metrics}"),
        format!("--health-probe-bind-address={health}"),
    ]
    .to_vec();
    for i in 0..3 {
        args.push(format!("--endpoint=127.0.0.1:{}", sim_base + i));
    }
    args.extend(
        extra
            .iter()
            .map(|a| a.replace("{dir}", &procs.dir.path().display().to_string())),
    );
    procs.spawn("proxy", &args);
    wait_http_ok(health, "/readyz", &procs);
    (procs, proxy, metrics)
}

/// Requests with shared prompt prefixes, from a few threads, until stopped.
struct Load {
    stop: Arc<AtomicBool>,
    sent: Arc<AtomicU64>,
    threads: Vec<JoinHandle<()>>,
}

impl Drop for Load {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

fn start_load(proxy: SocketAddr) -> Load {
    let stop = Arc::new(AtomicBool::new(false));
    let sent = Arc::new(AtomicU64::new(0));
    let threads = (0..3)
        .map(|t| {
            let (stop, sent) = (stop.clone(), sent.clone());
            std::thread::spawn(move || {
                let mut i = 0u64;
                while !stop.load(Ordering::SeqCst) {
                    // 4 system prompts of ~400 bytes, each followed by a distinct question.
                    let system = format!("{:=<400}", format!("system prompt number {}", i % 4));
                    let body = serde_json::json!({
                        "model": "sim-model",
                        "prompt": format!("{system} question {t}-{i}"),
                        "max_tokens": 2,
                    })
                    .to_string();
                    if post(proxy, "/v1/completions", &body).is_ok() {
                        sent.fetch_add(1, Ordering::Relaxed);
                    }
                    i += 1;
                    std::thread::sleep(Duration::from_millis(20));
                }
            })
        })
        .collect();
    Load {
        stop,
        sent,
        threads,
    }
}

fn post(addr: SocketAddr, path: &str, body: &str) -> std::io::Result<u16> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
    s.set_read_timeout(Some(Duration::from_secs(30)))?;
    write!(
        s,
        "POST {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )?;
    let mut out = String::new();
    s.read_to_string(&mut out)?;
    Ok(out
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0))
}

/// Every shipped query, ready to send (as in monitoring_prometheus.rs).
fn shipped_queries() -> Vec<Query> {
    let dashboard = json(DASHBOARD);
    let mut qs: Vec<Query> = dashboard_queries(&dashboard)
        .into_iter()
        .map(|q| Query {
            expr: expand_dashboard_vars(&q.expr, JOB),
            origin: q.origin,
        })
        .collect();
    for m in dashboard_variable_metrics(&dashboard) {
        qs.push(Query {
            origin: "variable job".into(),
            expr: format!("{m}{{job=\"{JOB}\"}}"),
        });
    }
    for a in alerts() {
        qs.push(Query {
            origin: format!("alert {} (before its threshold)", a.name),
            expr: alert_base_expr(&a.expr),
        });
    }
    qs
}

fn check_everything_has_data(prom: &Prometheus, procs: &Procs, load: &Load) {
    let queries = shipped_queries();
    let deadline = Instant::now() + Duration::from_secs(90);
    let empty = loop {
        let empty: Vec<String> = queries
            .iter()
            .filter(|q| prom.query(&q.expr).is_empty())
            .map(|q| format!("{}: {}", q.origin, q.expr))
            .collect();
        if empty.is_empty() || Instant::now() > deadline {
            break empty;
        }
        std::thread::sleep(Duration::from_millis(500));
    };
    let up: Vec<String> = prom
        .query(&format!("up{{job=\"{JOB}\"}}"))
        .iter()
        .map(|r| r["value"][1].as_str().unwrap_or("").to_string())
        .collect();
    assert_eq!(
        up,
        ["1"],
        "targets: {:?}\n{}\n{}",
        prom.targets(),
        prom.log(),
        procs.logs()
    );
    assert!(
        empty.is_empty(),
        "shipped queries without data after {} requests:\n{}\n\n{}",
        load.sent.load(Ordering::Relaxed),
        empty.join("\n"),
        procs.logs()
    );
    assert!(load.sent.load(Ordering::Relaxed) > 0);
}

#[test]
fn prometheus_scrapes_the_proxy_without_auth() {
    let (procs, proxy, metrics) = start_stack(&["--metrics-auth=none".to_string()], &[]);
    let load = start_load(proxy);
    let cfg = shipped_static_config(SCRAPE_STATIC, &metrics.to_string());
    let prom = start_prometheus(&cfg, &[]);
    check_everything_has_data(&prom, &procs, &load);
}

#[test]
fn prometheus_scrapes_the_proxy_with_a_token() {
    let token = "e2e-metrics-token";
    let (procs, proxy, metrics) = start_stack(
        &[
            "--metrics-auth=token".to_string(),
            "--metrics-token-file={dir}/picker.token".to_string(),
        ],
        &[("picker.token", &format!("{token}\n"))],
    );
    // Without the token the picker refuses.
    let (status, body) = http_get(metrics, "/metrics", None).unwrap();
    assert_eq!(status, 401, "{body}");
    let load = start_load(proxy);
    let cfg = shipped_static_config(SCRAPE_STATIC_TOKEN, &metrics.to_string());
    let file = cfg["scrape_configs"][0]["authorization"]["credentials_file"]
        .as_str()
        .unwrap()
        .to_string();
    let prom = start_prometheus(&cfg, &[(&file, &format!("{token}\n"))]);
    check_everything_has_data(&prom, &procs, &load);
}

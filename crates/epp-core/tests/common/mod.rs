//! Shared helpers for the proxy integration tests: simulators, a picker proxy on loopback, a
//! small HTTP client and an exposition reader.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::{connect::HttpConnector, Client};
use hyper_util::rt::TokioExecutor;

use epp_core::app::RuntimeOptions;
use epp_core::discovery::StaticDiscovery;
use epp_core::proxy::{ProxyHandle, ProxyOptions};
use epp_core::scrape::ScrapeOptions;

pub const LOOPBACK0: &str = "127.0.0.1:0";

pub fn loopback0() -> SocketAddr {
    LOOPBACK0.parse().unwrap()
}

/// Start `n` simulators with fast but non-zero latencies.
pub async fn sims(n: usize, tweak: impl Fn(&mut epp_sim::SimConfig)) -> Vec<epp_sim::SimServer> {
    let mut out = Vec::new();
    for i in 0..n {
        let mut cfg = epp_sim::SimConfig {
            name: format!("sim-{i}"),
            ..Default::default()
        };
        cfg.latency = epp_sim::LatencyModel {
            prefill_overhead_ms: 1.0,
            prefill_per_token_ms: 0.01,
            inter_token_ms: 1.0,
            inter_token_per_seq_ms: 0.0,
            jitter: 0.0,
        };
        tweak(&mut cfg);
        out.push(epp_sim::spawn(cfg, loopback0()).await.expect("sim starts"));
    }
    out
}

pub fn picker_options(endpoints: Vec<String>) -> RuntimeOptions {
    RuntimeOptions {
        discovery: std::sync::Arc::new(StaticDiscovery {
            endpoints,
            file: None,
            poll_interval: Duration::from_millis(50),
            ..Default::default()
        }),
        metrics_addr: Some(loopback0()),
        health_addr: Some(loopback0()),
        scrape: ScrapeOptions {
            interval: Duration::from_millis(50),
            timeout: Duration::from_millis(500),
            probe_interval: Some(Duration::from_millis(200)),
            ..Default::default()
        },
        grace_period: Duration::from_secs(5),
        ..Default::default()
    }
}

pub fn proxy_options(picker: RuntimeOptions) -> ProxyOptions {
    ProxyOptions {
        listen: loopback0(),
        picker,
        ..Default::default()
    }
}

/// A proxy (default options) over `endpoints`, once all of them are healthy.
pub async fn proxy_over(endpoints: Vec<String>) -> ProxyHandle {
    let n = endpoints.len();
    let p = epp_core::proxy::spawn(proxy_options(picker_options(endpoints)))
        .await
        .expect("proxy starts");
    wait_healthy(&p, n).await;
    p
}

/// Wait (bounded) until every endpoint is healthy in the proxy's datastore.
pub async fn wait_healthy(p: &ProxyHandle, n: usize) {
    let ds = p.director.datastore();
    for _ in 0..200 {
        let s = ds.snapshot();
        if s.routable().count() == n {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("endpoints did not become healthy: {:?}", ds.snapshot());
}

pub type HttpClient = Client<HttpConnector, Full<Bytes>>;

pub fn client() -> HttpClient {
    Client::builder(TokioExecutor::new()).build(HttpConnector::new())
}

pub struct Resp {
    pub status: u16,
    pub headers: http::HeaderMap,
    pub body: Bytes,
}

impl Resp {
    pub fn header(&self, n: &str) -> Option<&str> {
        self.headers.get(n).and_then(|v| v.to_str().ok())
    }
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {:?}", String::from_utf8_lossy(&self.body)))
    }
}

pub async fn request(
    c: &HttpClient,
    method: &str,
    url: &str,
    headers: &[(&str, &str)],
    body: impl Into<Bytes>,
) -> Resp {
    let mut b = http::Request::builder().method(method).uri(url);
    for (k, v) in headers {
        b = b.header(*k, *v);
    }
    let req = b.body(Full::new(body.into())).unwrap();
    let resp = tokio::time::timeout(Duration::from_secs(20), c.request(req))
        .await
        .expect("response in time")
        .expect("request succeeds");
    let status = resp.status().as_u16();
    let headers = resp.headers().clone();
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    Resp {
        status,
        headers,
        body,
    }
}

pub async fn post_json(c: &HttpClient, url: &str, body: &serde_json::Value) -> Resp {
    request(
        c,
        "POST",
        url,
        &[("content-type", "application/json")],
        serde_json::to_vec(body).unwrap(),
    )
    .await
}

/// Scrape an exposition into `name{labels}` → value.
pub async fn scrape(c: &HttpClient, addr: SocketAddr) -> BTreeMap<String, f64> {
    let r = request(
        c,
        "GET",
        &format!("http://{addr}/metrics"),
        &[],
        Bytes::new(),
    )
    .await;
    assert_eq!(r.status, 200);
    parse_exposition(std::str::from_utf8(&r.body).unwrap())
}

pub fn parse_exposition(text: &str) -> BTreeMap<String, f64> {
    let samples = epp_core::exposition::parse(text).unwrap();
    let mut out = BTreeMap::new();
    for s in samples {
        let key = if s.labels.is_empty() {
            s.name.clone()
        } else {
            format!(
                "{}{{{}}}",
                s.name,
                s.labels
                    .iter()
                    .map(|(k, v)| format!("{k}=\"{v}\""))
                    .collect::<Vec<_>>()
                    .join(",")
            )
        };
        out.insert(key, s.value);
    }
    out
}

/// Sum of every series of a metric whose labels contain all `matchers`.
pub fn sum(m: &BTreeMap<String, f64>, name: &str, matchers: &[(&str, &str)]) -> f64 {
    m.iter()
        .filter(|(k, _)| {
            (k.as_str() == name || k.starts_with(&format!("{name}{{")))
                && matchers
                    .iter()
                    .all(|(lk, lv)| k.contains(&format!("{lk}=\"{lv}\"")))
        })
        .map(|(_, v)| *v)
        .sum()
}

/// A completion request whose prompt is `prefix` + `suffix`.
pub fn completion(prefix: &str, suffix: &str, max_tokens: u32) -> serde_json::Value {
    serde_json::json!({"model": "sim-model", "prompt": format!("{prefix}{suffix}"), "max_tokens": max_tokens})
}

/// A deterministic text of `len` characters for group `g`.
pub fn text(g: usize, len: usize) -> String {
    let words = [
        "alpha", "bravo", "charlie", "delta", "echo", "foxtrot", "golf", "hotel",
    ];
    let mut s = format!("[group {g}] ");
    let mut i = g;
    while s.len() < len {
        s.push_str(words[i % words.len()]);
        s.push(' ');
        i = i.wrapping_mul(31).wrapping_add(7);
    }
    s.truncate(len);
    s
}

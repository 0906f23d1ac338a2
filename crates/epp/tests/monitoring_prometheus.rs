//! The shipped static scrape configs, dashboard queries and alert rules against a real
//! Prometheus (started on loopback with a temporary TSDB), scraping the picker's real metrics
//! registry (`epp_core::metrics::Metrics`) fed with synthetic traffic and served over HTTP by
//! this test, with and without a bearer token.
//!
//! This does not need the running picker; the end-to-end test through `epp proxy` and `epp sim`
//! reuses the same helpers (support/monitoring.rs) with the real servers.
//!
//! `cargo test -p epp --test monitoring_prometheus`. Needs `prometheus` (EPP_PROMETHEUS_BIN or
//! PATH; `scripts/test` installs Debian's prometheus package). Without it the tests fail.

#[path = "support/monitoring.rs"]
mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use common::*;
use epp_core::datastore::{DatastoreWriter, EndpointSpec, HealthConfig, ModelServerMetrics};
use epp_core::metrics::{Metrics, CONTENT_TYPE};
use epp_core::prefix::{PrefixConfig, PrefixIndex};
use epp_core::request::ApiMethod;
use epp_core::scheduler::{DecisionType, PluginLabels, PluginObserver};

/// The picker's registry, fed continuously, served on `/metrics` of a loopback port.
struct FakePicker {
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
}

impl Drop for FakePicker {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        let _ = TcpStream::connect(self.addr); // unblock accept()
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

fn start_fake_picker(token: Option<&str>) -> FakePicker {
    let ds = DatastoreWriter::new(HealthConfig::default());
    ds.set_discovery_labels("llm-d", "app=vllm");
    let backends = ["10.0.0.1:8000", "10.0.0.2:8000", "10.0.0.3:8000"];
    ds.set_endpoints(backends.iter().map(|a| EndpointSpec::new(*a)).collect());
    // A small index, so the synthetic traffic evicts.
    let prefix = Arc::new(PrefixIndex::new(PrefixConfig {
        block_size: 64,
        max_blocks: 16,
        capacity_per_endpoint: 8,
    }));
    let metrics = Metrics::new(ds.reader(), prefix.clone());
    let stop = Arc::new(AtomicBool::new(false));

    let feeder = {
        let (stop, metrics) = (stop.clone(), metrics.clone());
        std::thread::spawn(move || {
            let mut i: u64 = 0;
            while !stop.load(Ordering::SeqCst) {
                for (b, a) in backends.iter().enumerate() {
                    ds.record_scrape(
                        a,
                        Ok(ModelServerMetrics {
                            waiting_queue: ((i + b as u64) % 4) as f64,
                            running: 1.0 + b as f64,
                            kv_cache_usage: 0.2 * (b + 1) as f64,
                            ..Default::default()
                        }),
                    );
                }
                ds.tick();
                for m in [ApiMethod::ChatCompletions, ApiMethod::Completions] {
                    metrics.record_request(m, 200);
                    metrics.observe_decision_latency(m, 0.0002 + (i % 10) as f64 * 0.0001);
                }
                if i.is_multiple_of(20) {
                    metrics.record_request(ApiMethod::ChatCompletions, 503);
                }
                let d = DecisionType::ALL[(i as usize) % DecisionType::ALL.len()];
                metrics.record_decision(d);
                metrics.record_cache(&backends[(i % 3) as usize].into(), !i.is_multiple_of(3));
                let usage = epp_core::gateway::usage::Usage {
                    prompt_tokens: 256,
                    completion_tokens: 16,
                    cached_tokens: Some(128),
                };
                metrics.record_usage(&backends[(i % 3) as usize].into(), &usage, 192);
                metrics.observe(
                    &PluginLabels::new("Scorer", "scorer", "prefix-cache-scorer"),
                    0.00002,
                );
                metrics.observe(
                    &PluginLabels::new("Picker", "picker", "max-score-picker"),
                    0.000002,
                );
                let prompt = format!("{i:0>256}");
                let hashes = prefix.hash("model", prompt.as_bytes());
                prefix.insert((i % 3) as usize, &hashes);
                i += 1;
                std::thread::sleep(Duration::from_millis(50));
            }
        })
    };

    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let token = token.map(str::to_string);
    let server = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                if stop.load(Ordering::SeqCst) {
                    break;
                }
                let Ok(mut conn) = conn else { continue };
                let _ = conn.set_read_timeout(Some(Duration::from_secs(5)));
                let mut buf = Vec::new();
                let mut chunk = [0u8; 4096];
                while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
                    match conn.read(&mut chunk) {
                        Ok(0) | Err(_) => break,
                        Ok(n) => buf.extend_from_slice(&chunk[..n]),
                    }
                }
                let head = String::from_utf8_lossy(&buf).to_string();
                let authorized = match &token {
                    None => true,
                    Some(t) => head.lines().any(|l| {
                        l.split_once(':').is_some_and(|(k, v)| {
                            k.eq_ignore_ascii_case("authorization")
                                && v.trim() == format!("Bearer {t}")
                        })
                    }),
                };
                let (status, ctype, body) = if !head.starts_with("GET /metrics") {
                    ("404 Not Found", "text/plain", "not found\n".to_string())
                } else if !authorized {
                    (
                        "401 Unauthorized",
                        "text/plain",
                        "unauthorized\n".to_string(),
                    )
                } else {
                    ("200 OK", CONTENT_TYPE, metrics.encode())
                };
                let _ = write!(
                    conn,
                    "HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                    body.len()
                );
            }
        })
    };
    FakePicker {
        addr,
        stop,
        threads: vec![feeder, server],
    }
}

/// How long the tests wait for a query to return data.
const DATA_WAIT: Duration = Duration::from_secs(60);

#[test]
fn static_config_dashboard_and_alerts_work_against_real_prometheus() {
    let picker = start_fake_picker(None);
    let mut cfg = shipped_static_config(SCRAPE_STATIC, &picker.addr.to_string());
    // Load the shipped rules too, to see them evaluate on real data.
    cfg["rule_files"] = vec![serde_yaml::Value::from("epp-alerts.rules.yaml")].into();
    let rules = read(RULES);
    let prom = start_prometheus(&cfg, &[("epp-alerts.rules.yaml", &rules)]);

    let queries = shipped_queries();
    let empty = wait_for_data(&prom, &queries, DATA_WAIT);
    assert_eq!(up_values(&prom), ["1"], "targets: {:?}", prom.targets());
    assert!(
        empty.is_empty(),
        "shipped queries without data:\n{}\n\nprometheus log:\n{}",
        empty.join("\n"),
        prom.log()
    );

    // Every rule evaluated without error (no vector-matching or type errors on real series).
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (_, body) = http_get(prom.addr, "/api/v1/rules", None).unwrap();
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        let rules: Vec<&serde_json::Value> = v["data"]["groups"]
            .as_array()
            .into_iter()
            .flatten()
            .flat_map(|g| g["rules"].as_array().into_iter().flatten())
            .collect();
        assert_eq!(rules.len(), alerts().len(), "{body}");
        let bad: Vec<String> = rules
            .iter()
            .filter(|r| r["health"] != "ok")
            .map(|r| format!("{}: {} {}", r["name"], r["health"], r["lastError"]))
            .collect();
        let unevaluated = rules.iter().any(|r| r["health"] == "unknown");
        if bad.is_empty() {
            break;
        }
        assert!(
            unevaluated && Instant::now() < deadline,
            "rules failing on real data:\n{}",
            bad.join("\n")
        );
        std::thread::sleep(Duration::from_millis(500));
    }
}

#[test]
fn token_static_config_authenticates() {
    let token = "3pp-metrics-t0ken";
    let picker = start_fake_picker(Some(token));
    let cfg = shipped_static_config(SCRAPE_STATIC_TOKEN, &picker.addr.to_string());
    let file = credentials_file(&cfg);
    // A trailing newline, as `echo ... > file` writes it.
    let prom = start_prometheus(&cfg, &[(&file, &format!("{token}\n"))]);
    let q = [Query {
        origin: "up".into(),
        expr: format!("up{{job=\"{JOB}\"}} == 1"),
    }];
    let empty = wait_for_data(&prom, &q, DATA_WAIT);
    assert!(
        empty.is_empty(),
        "not scraped with the token: {:?}\n{}",
        prom.targets(),
        prom.log()
    );
    assert!(!prom
        .query(&format!("epp_build_info{{job=\"{JOB}\"}}"))
        .is_empty());
}

#[test]
fn wrong_token_shows_as_target_down_with_401() {
    let picker = start_fake_picker(Some("the-right-token"));
    let cfg = shipped_static_config(SCRAPE_STATIC_TOKEN, &picker.addr.to_string());
    let file = credentials_file(&cfg);
    let prom = start_prometheus(&cfg, &[(&file, "a-wrong-token\n")]);
    // EPPTargetDown's condition holds.
    let down = [Query {
        origin: "alert EPPTargetDown".into(),
        expr: alerts()
            .into_iter()
            .find(|a| a.name == "EPPTargetDown")
            .unwrap()
            .expr,
    }];
    let empty = wait_for_data(&prom, &down, DATA_WAIT);
    assert!(empty.is_empty(), "{:?}", prom.targets());
    let targets = prom.targets();
    assert_eq!(targets.len(), 1, "{targets:?}");
    let (job, health, err) = &targets[0];
    assert_eq!(job, JOB);
    assert_eq!(health, "down");
    assert!(err.contains("401"), "last error: {err}");
}

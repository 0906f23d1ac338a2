//! Gateway API Inference Extension v1.5.0's own monitoring assets (copied unmodified under
//! `tests/fixtures/gaie-v1.5/`) against our picker: a real Prometheus scrapes `epp proxy` and
//! the three `epp sim` servers behind it under load, then every EPP and vLLM query of GAIE's
//! Grafana dashboard and every alert expression (before its threshold) must return data through
//! the Prometheus HTTP API. `promtool check rules` accepts GAIE's alert file.
//!
//! `cargo test -p epp --test monitoring_gaie`. Needs `prometheus` and `promtool`
//! (EPP_PROMETHEUS_BIN / EPP_PROMTOOL_BIN or PATH). Everything binds 127.0.0.1.

#[path = "support/monitoring.rs"]
mod common;

use std::net::SocketAddr;
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::*;

const DASHBOARD_FIXTURE: &str = "crates/epp/tests/fixtures/gaie-v1.5/inference_gateway.json";
const ALERTS_FIXTURE: &str = "crates/epp/tests/fixtures/gaie-v1.5/alert.yaml";

/// Dashboard queries that cannot have data from an endpoint picker plus vLLM, by the metric
/// prefix they read, with the reason. Each must stay empty (so the list cannot go stale).
const NO_DATA_BY_DESIGN: &[(&str, &str)] = &[(
    "bbr_",
    "Body Based Router panels: BBR is a separate GAIE component in front of the gateway, \
         not the endpoint picker",
)];

/// The picker's config: the default profile, with flow control on and every endpoint taking
/// one request at a time (so bursts queue in the picker and GAIE's Flow Control row has data).
const FLOW_CONTROL_CONFIG: &str = r#"apiVersion: llm-d.ai/v1alpha1
kind: EndpointPickerConfig
featureGates: [flowControl]
plugins:
- type: prefix-cache-scorer
- type: queue-scorer
- type: max-score-picker
- type: round-robin-fairness-policy
- type: concurrency-detector
  parameters:
    maxConcurrency: 1
schedulingProfiles:
- name: default
  plugins:
  - pluginRef: prefix-cache-scorer
    weight: 3
  - pluginRef: queue-scorer
    weight: 2
  - pluginRef: max-score-picker
flowControl:
  defaultPriorityBand:
    fairnessPolicyRef: round-robin-fairness-policy
  saturationDetector:
    pluginRef: concurrency-detector
"#;

/// Every 200 ms, 8 concurrent requests from two tenants: more than the pool's 3 slots, so some
/// wait in the flow-control queue.
fn start_bursts(proxy: SocketAddr, stop: Arc<AtomicBool>) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        let mut round = 0u64;
        while !stop.load(Ordering::SeqCst) {
            let burst: Vec<_> = (0..8)
                .map(|i| {
                    std::thread::spawn(move || {
                        let body = format!(
                            r#"{{"model":"sim-model","prompt":"burst {round}-{i}","max_tokens":2}}"#
                        );
                        let _ = post_with(
                            proxy,
                            "/v1/completions",
                            &body,
                            &[(
                                "x-llm-d-inference-fairness-id",
                                if i % 2 == 0 { "tenant-a" } else { "tenant-b" },
                            )],
                        );
                    })
                })
                .collect();
            for b in burst {
                let _ = b.join();
            }
            round += 1;
            std::thread::sleep(Duration::from_millis(200));
        }
    })
}

/// Grafana's template variables, as Grafana would fill them in for a short range with a 1 s
/// scrape interval.
fn expand_grafana(expr: &str) -> String {
    expr.replace("$__rate_interval", "10s")
        .replace("${__rate_interval}", "10s")
        .replace("$__range", "1m")
        .replace("$__interval", "2s")
}

/// Requests for a model no server serves: each is routed, the server answers 404, and the
/// picker counts a ModelServerError (GAIE's error panel and error-rate alert need errors).
fn start_unknown_model_load(
    proxy: SocketAddr,
    stop: Arc<AtomicBool>,
) -> std::thread::JoinHandle<u64> {
    std::thread::spawn(move || {
        let sent = AtomicU64::new(0);
        while !stop.load(Ordering::SeqCst) {
            let body = r#"{"model":"no-such-model","prompt":"hello","max_tokens":2}"#;
            if let Ok(status) = post(proxy, "/v1/completions", body) {
                assert_eq!(status, 404, "a model no server serves");
                sent.fetch_add(1, Ordering::Relaxed);
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        sent.load(Ordering::Relaxed)
    })
}

#[test]
fn promtool_accepts_gaie_alert_rules() {
    let out = run_ok(Command::new(promtool()).args([
        "check",
        "rules",
        &repo_root().join(ALERTS_FIXTURE).display().to_string(),
    ]));
    assert!(out.contains("SUCCESS: 4 rules found"), "{out}");
}

#[test]
fn gaie_dashboard_and_alerts_have_data_from_our_picker_and_sim() {
    let (procs, proxy, metrics, sims) = start_stack_with_sims(
        &["--metrics-auth=none", "--config-file={dir}/epp.yaml"],
        &[("epp.yaml", FLOW_CONTROL_CONFIG)],
    );
    let load = start_load(proxy, 3, Duration::from_millis(20));
    let stop = Arc::new(AtomicBool::new(false));
    let errors = start_unknown_model_load(proxy, stop.clone());
    let bursts = start_bursts(proxy, stop.clone());

    let cfg: serde_yaml::Value = serde_yaml::from_str(&format!(
        r#"
global:
  scrape_interval: 1s
  evaluation_interval: 1s
scrape_configs:
  - job_name: epp
    static_configs:
      - targets: ["{metrics}"]
  - job_name: vllm
    static_configs:
      - targets: [{}]
"#,
        sims.iter()
            .map(|s| format!("\"{s}\""))
            .collect::<Vec<_>>()
            .join(", ")
    ))
    .unwrap();
    let prom = start_prometheus(&cfg, &[]);

    let dashboard = json(DASHBOARD_FIXTURE);
    let mut must_have_data = Vec::new();
    let mut by_design = Vec::new();
    for q in dashboard_queries(&dashboard) {
        let q = Query {
            expr: expand_grafana(&q.expr),
            origin: q.origin,
        };
        assert!(
            !q.expr.contains('$'),
            "unexpanded variable in {}: {}",
            q.origin,
            q.expr
        );
        match NO_DATA_BY_DESIGN.iter().find(|(p, _)| q.expr.contains(p)) {
            Some((_, why)) => by_design.push((q, *why)),
            None => must_have_data.push(q),
        }
    }
    let epp_or_vllm = |q: &Query| q.expr.contains("inference_") || q.expr.contains("vllm:");
    assert!(
        must_have_data.iter().all(epp_or_vllm),
        "every remaining query reads the EPP or vLLM: {must_have_data:#?}"
    );
    assert_eq!(
        must_have_data
            .iter()
            .filter(|q| q.expr.contains("vllm:"))
            .count(),
        11,
        "GAIE's vLLM row: token throughput (2), e2e, ITL and TTFT latency (3 each)"
    );
    assert_eq!(
        must_have_data
            .iter()
            .filter(|q| q.expr.contains("inference_extension_flow_control_"))
            .count(),
        15,
        "GAIE's Flow Control row: saturation, queue growth, enqueue rate (2), queue size (2), \
         queue bytes (2), outcomes (2), p99 queue wait, dispatch cycle and enqueue latency, \
         dispatch rate (2)"
    );
    assert_eq!(must_have_data.len(), 11 + 20 + 15, "{must_have_data:#?}");
    let rules = yaml(ALERTS_FIXTURE);
    let mut alert_count = 0;
    for group in rules["groups"].as_sequence().expect("groups") {
        for rule in group["rules"].as_sequence().expect("rules") {
            let name = rule["alert"].as_str().expect("alert name");
            let expr = rule["expr"].as_str().expect("expr");
            must_have_data.push(Query {
                origin: format!("alert {name} (before its threshold)"),
                expr: alert_base_expr(expr),
            });
            alert_count += 1;
        }
    }
    assert_eq!(alert_count, 4);

    // Our own dashboard's flow-control row and alert, on the same stack.
    let ours = flow_control_queries("epp");
    assert_eq!(ours.len(), 5, "{ours:#?}");
    must_have_data.extend(ours);
    let empty = wait_for_data(&prom, &must_have_data, Duration::from_secs(120));
    stop.store(true, Ordering::SeqCst);
    let error_requests = errors.join().unwrap();
    bursts.join().unwrap();
    assert!(
        empty.is_empty(),
        "GAIE queries without data after {} requests ({} for an unknown model):\n{}\n\ntargets: {:?}\n{}\n{}",
        load.sent.load(Ordering::Relaxed),
        error_requests,
        empty.join("\n"),
        prom.targets(),
        prom.log(),
        procs.logs()
    );
    // The error-rate alert's ratio is 1 for the unknown model (every request failed) and
    // absent for the served one (no errors).
    let ratio = prom.query(&alert_base_expr(
        rules["groups"][0]["rules"][1]["expr"].as_str().unwrap(),
    ));
    let models: Vec<(&str, f64)> = ratio
        .iter()
        .map(|r| {
            (
                r["metric"]["model_name"].as_str().unwrap_or(""),
                r["value"][1]
                    .as_str()
                    .and_then(|v| v.parse().ok())
                    .unwrap_or(0.0),
            )
        })
        .collect();
    assert_eq!(models.len(), 1, "{ratio:?}");
    assert_eq!(models[0].0, "no-such-model", "{ratio:?}");
    // Counted at routing and at the response's end, so a scrape can fall between the two (and
    // with flow control on, some of these requests wait in the queue first).
    assert!((0.85..=1.15).contains(&models[0].1), "{ratio:?}");
    for (q, why) in &by_design {
        assert!(
            prom.query(&q.expr).is_empty(),
            "{} is allow-listed as having no data ({why}) but has some: {}",
            q.origin,
            q.expr
        );
    }
    drop(load);
}

//! Every metric name read by a shipped query (dashboard targets and variables, alert rules)
//! exists in the picker's real exposition, as rendered by `epp_core::metrics::Metrics`, and that
//! exposition passes `promtool check metrics`.
//!
//! The registry is fed the way the picker feeds it (endpoints discovered and scraped, requests,
//! decisions, cache lookups, plugin timings), so label-carrying families have series.
//! The end-to-end test with a real Prometheus additionally checks that every query returns data.
//!
//! `cargo test -p epp --test monitoring_exposition`

#[path = "support/monitoring.rs"]
mod common;

use std::collections::BTreeSet;
use std::io::Write;
use std::process::{Command, Stdio};
use std::sync::Arc;

use common::*;
use epp_core::datastore::{DatastoreWriter, EndpointSpec, HealthConfig, ModelServerMetrics};
use epp_core::metrics::Metrics;
use epp_core::prefix::{PrefixConfig, PrefixIndex};
use epp_core::request::ApiMethod;
use epp_core::scheduler::{DecisionType, PluginLabels, PluginObserver};

/// A registry in the state of a picker that has routed some traffic to three backends.
fn exposition() -> String {
    let ds = DatastoreWriter::new(HealthConfig::default());
    ds.set_discovery_labels("llm-d", "app=vllm");
    let addrs = ["10.0.0.1:8000", "10.0.0.2:8000", "10.0.0.3:8000"];
    ds.set_endpoints(addrs.iter().map(|a| EndpointSpec::new(*a)).collect());
    for (i, a) in addrs.iter().enumerate() {
        ds.record_scrape(
            a,
            Ok(ModelServerMetrics {
                waiting_queue: i as f64,
                running: 2.0 + i as f64,
                kv_cache_usage: 0.25 * i as f64,
                ..Default::default()
            }),
        );
    }
    ds.tick();
    let prefix = Arc::new(PrefixIndex::new(PrefixConfig::default()));
    let m = Metrics::new(ds.reader(), prefix);
    for method in [ApiMethod::ChatCompletions, ApiMethod::Completions] {
        m.record_request(method, 200);
        m.observe_decision_latency(method, 0.0003);
    }
    m.record_request(ApiMethod::ChatCompletions, 503);
    for d in DecisionType::ALL {
        m.record_decision(d);
    }
    m.record_cache(&addrs[0].into(), true);
    m.record_cache(&addrs[1].into(), false);
    let usage = epp_core::gateway::usage::Usage {
        prompt_tokens: 100,
        completion_tokens: 10,
        cached_tokens: Some(64),
    };
    m.record_usage(&addrs[0].into(), &usage, 96);
    m.observe(
        &PluginLabels::new("Scorer", "scorer", "prefix-cache-scorer"),
        0.00002,
    );
    m.observe(
        &PluginLabels::new("Picker", "picker", "max-score-picker"),
        0.000001,
    );
    // Flow control (featureGates: [flowControl]) has queued and dispatched a request.
    {
        use epp_core::admission::metrics::*;
        let fc = m.flow_control();
        let pool: epp_core::metrics::LabelStr = "pool".into();
        let q = QueueLabels {
            fairness_id: "tenant".into(),
            inference_pool: pool.clone(),
            model_name: "m".into(),
            priority: 0,
            target_model_name: "m".into(),
        };
        fc.queue_size.llmd.get_or_create(&q).set(0);
        fc.pool_saturation
            .llmd
            .get_or_create(&StageLabels {
                inference_pool: pool.clone(),
                stage: "effective",
            })
            .set(0.5);
        fc.requests
            .get_or_create(&OutcomeLabels {
                inference_pool: pool.clone(),
                outcome: "Dispatched",
                priority: 0,
            })
            .inc();
        fc.queue_duration
            .llmd
            .get_or_create(&QueueDurationLabels {
                fairness_id: "tenant".into(),
                inference_pool: pool,
                model_name: "m".into(),
                outcome: "Dispatched",
                priority: 0,
                target_model_name: "m".into(),
            })
            .observe(0.01);
    }
    // Prefill/decode disaggregation: one decision each way, and proxy prefill calls.
    {
        use epp_core::scheduler::disagg_metrics::PrefillOutcome;
        let d = m.disagg();
        for (legacy, decision) in [(false, "prefill-decode"), (true, "decode-only")] {
            d.decision(
                legacy,
                "disagg-profile-handler",
                "disagg-profile-handler",
                "m",
                decision,
            );
        }
        for o in PrefillOutcome::ALL {
            d.prefill(o, 0.05);
        }
    }
    // Active-active: a replica connected to Redis that has seen a snapshot.
    {
        let stats = std::sync::Arc::new(epp_core::replication::metrics::Stats::default());
        stats.up.store(true, std::sync::atomic::Ordering::Relaxed);
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_millis() as u64;
        stats.snapshot_seen(now, 10);
        stats.lag.observe(0.01);
        m.watch_shared_state(stats);
    }
    m.encode()
}

/// Sample names of an exposition, with `_bucket`/`_sum`/`_count` stripped.
fn exposed_names(text: &str) -> BTreeSet<String> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .map(|l| {
            let end = l.find(['{', ' ']).unwrap_or(l.len());
            family_name(&l[..end]).to_string()
        })
        .collect()
}

#[test]
fn every_shipped_metric_name_is_exported() {
    let text = exposition();
    let exposed = exposed_names(&text);
    let dashboard = json(DASHBOARD);
    let mut used = dashboard_variable_metrics(&dashboard);
    let mut origin_of = std::collections::BTreeMap::new();
    for q in dashboard_queries(&dashboard)
        .into_iter()
        .chain(alerts().into_iter().map(|a| Query {
            origin: format!("alert {}", a.name),
            expr: a.expr,
        }))
    {
        for n in metric_names(&parse(&q.expr).unwrap()) {
            origin_of.entry(n.clone()).or_insert(q.origin.clone());
            used.insert(n);
        }
    }
    // `up` is written by Prometheus, not exported by the picker.
    used.remove("up");
    let missing: Vec<String> = used
        .difference(&exposed)
        .map(|n| {
            format!(
                "{n} (used by {})",
                origin_of.get(n).map_or("a variable", |s| s)
            )
        })
        .collect();
    assert!(
        missing.is_empty(),
        "shipped queries read metrics the picker does not export:\n{}\n\nexposition:\n{text}",
        missing.join("\n")
    );
}

#[test]
fn the_seed_metrics_keep_their_labels() {
    let text = exposition();
    let has = |prefix: &str| text.lines().any(|l| l.starts_with(prefix));
    for (name, labels) in [
        ("epp_requests_total", &["method", "status"][..]),
        ("epp_request_duration_seconds_bucket", &["method", "le"][..]),
        ("epp_cache_requests_total", &["backend"][..]),
        ("epp_cache_hits_total", &["backend"][..]),
        ("epp_routing_decisions_total", &["decision_type"][..]),
        ("epp_backend_health", &["backend", "state"][..]),
        ("epp_pods_discovered", &["namespace", "label_selector"][..]),
    ] {
        let line = text
            .lines()
            .find(|l| l.starts_with(&format!("{name}{{")))
            .unwrap_or_else(|| panic!("no {name} series in\n{text}"));
        for l in labels {
            assert!(
                line.contains(&format!("{l}=\"")),
                "{name} lacks label {l}: {line}"
            );
        }
    }
    assert!(
        has("process_cpu_seconds_total"),
        "no process metrics:\n{text}"
    );
}

#[test]
fn promtool_check_metrics_accepts_the_exposition() {
    let text = exposition();
    let mut child = Command::new(promtool())
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("running promtool");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    let report = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    // llm-d-router's own prefixes `llm_d_epp_` and `llm_d_inference_scheduler_` contain `_d_`,
    // which promtool's lint reads as the abbreviated unit "d" (days). Those names are
    // llm-d-router's, letter for letter, so that one finding on them is expected; anything else
    // fails.
    let unexpected: Vec<&str> = report
        .lines()
        .filter(|l| !l.trim().is_empty())
        .filter(|l| {
            !(l.starts_with("llm_d_")
                && l.ends_with("metric names should not contain abbreviated units"))
        })
        .collect();
    assert!(
        unexpected.is_empty() && (out.status.success() || !report.is_empty()),
        "promtool check metrics:\n{report}\n\nexposition:\n{text}"
    );
}

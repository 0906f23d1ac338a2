//! Flow control end to end in `epp proxy` over saturated simulators: requests over the pool's
//! capacity wait in the picker (not 429), higher priorities go first, a queue-wait budget that
//! runs out answers 429 with an OpenAI-shaped body, and a client that hangs up leaves the queue.

mod common;

use std::time::{Duration, Instant};

use common::*;
use epp_core::admission::Objective;
use epp_core::config::EndpointPickerConfig;

/// Two endpoints taking `per_endpoint` requests each (concurrency-detector), round robin
/// between tenants, `ttl` queue-wait budget.
fn config(per_endpoint: u32, ttl: &str) -> EndpointPickerConfig {
    EndpointPickerConfig::from_yaml(&format!(
        r#"apiVersion: llm-d.ai/v1alpha1
kind: EndpointPickerConfig
featureGates: [flowControl]
plugins:
- type: queue-scorer
- type: max-score-picker
- type: round-robin-fairness-policy
- type: concurrency-detector
  parameters:
    maxConcurrency: {per_endpoint}
schedulingProfiles:
- name: default
  plugins:
  - pluginRef: queue-scorer
  - pluginRef: max-score-picker
flowControl:
  defaultRequestTTL: {ttl}
  defaultPriorityBand:
    fairnessPolicyRef: round-robin-fairness-policy
  saturationDetector:
    pluginRef: concurrency-detector
"#
    ))
    .unwrap()
}

async fn proxy(
    sims: &[epp_sim::SimServer],
    cfg: EndpointPickerConfig,
) -> epp_core::proxy::ProxyHandle {
    let eps: Vec<String> = sims.iter().map(|s| s.addr().to_string()).collect();
    let mut opts = picker_options(eps);
    opts.config = cfg;
    opts.objectives = vec![
        Objective::parse("premium=10").unwrap(),
        Objective::parse("batch=-1").unwrap(),
    ];
    let p = epp_core::proxy::spawn(proxy_options(opts)).await.unwrap();
    wait_healthy(&p, sims.len()).await;
    p
}

async fn send(
    url: String,
    objective: &'static str,
    tenant: &'static str,
    tokens: u32,
) -> (u16, Duration, serde_json::Value) {
    let c = client();
    let body = serde_json::to_vec(&completion("hello", " there", tokens)).unwrap();
    let started = Instant::now();
    let r = request(
        &c,
        "POST",
        &url,
        &[
            ("content-type", "application/json"),
            ("x-llm-d-inference-objective", objective),
            ("x-llm-d-inference-fairness-id", tenant),
        ],
        body,
    )
    .await;
    let json = serde_json::from_slice(&r.body).unwrap_or_default();
    (r.status, started.elapsed(), json)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn over_capacity_requests_wait_and_the_higher_priority_goes_first() {
    // Each request decodes 30 tokens at 5 ms: ~150 ms on an endpoint.
    let sims = sims(2, |c| c.latency.inter_token_ms = 5.0).await;
    let p = proxy(&sims, config(1, "30s")).await;
    let url = format!("http://{}/v1/completions", p.proxy_addr);
    // Fill the pool (2 slots) with batch work first, then queue more batch and premium.
    let mut batch = Vec::new();
    for _ in 0..6 {
        batch.push(tokio::spawn(send(url.clone(), "batch", "b", 30)));
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let mut premium = Vec::new();
    for _ in 0..4 {
        premium.push(tokio::spawn(send(url.clone(), "premium", "p", 30)));
    }
    let mut premium_done = Vec::new();
    for h in premium {
        let (status, took, body) = h.await.unwrap();
        assert_eq!(status, 200, "{body}");
        premium_done.push(took);
    }
    let mut batch_done = Vec::new();
    for h in batch {
        let (status, took, body) = h.await.unwrap();
        assert_eq!(status, 200, "queued, not refused: {body}");
        batch_done.push(took);
    }
    // The 4 premium requests run right after the 2 batch ones already running: two rounds
    // (~300 ms + the wait for the first slot); the last batch ones wait behind them all.
    let worst_premium = premium_done.iter().max().unwrap();
    let worst_batch = batch_done.iter().max().unwrap();
    assert!(
        worst_premium < worst_batch,
        "premium {premium_done:?} vs batch {batch_done:?}"
    );
    let m = scrape(&client(), p.metrics_addr.unwrap()).await;
    let dispatched = sum(
        &m,
        "llm_d_epp_flow_control_requests_total",
        &[("outcome", "Dispatched")],
    );
    assert_eq!(dispatched, 10.0, "{m:?}");
    assert_eq!(sum(&m, "llm_d_epp_flow_control_queue_size", &[]), 0.0);
    // Some waited: the queue-duration histogram saw requests above 50 ms.
    let slow = sum(
        &m,
        "inference_extension_flow_control_request_queue_duration_seconds_count",
        &[("priority", "-1")],
    ) - sum(
        &m,
        "inference_extension_flow_control_request_queue_duration_seconds_bucket",
        &[("priority", "-1"), ("le", "0.05")],
    );
    assert!(slow >= 3.0, "{slow}");
    // The request families carry the objective's priority.
    assert_eq!(
        sum(&m, "llm_d_epp_request_total", &[("priority", "10")]),
        4.0
    );
    p.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_spent_queue_budget_answers_429_and_a_hung_up_client_leaves_the_queue() {
    // ~2 s per request: the pool stays full for the whole test.
    let sims = sims(2, |c| c.latency.inter_token_ms = 20.0).await;
    let p = proxy(&sims, config(1, "300ms")).await;
    let url = format!("http://{}/v1/completions", p.proxy_addr);
    let running: Vec<_> = (0..2)
        .map(|_| tokio::spawn(send(url.clone(), "premium", "p", 100)))
        .collect();
    tokio::time::sleep(Duration::from_millis(100)).await;
    let (status, took, body) = send(url.clone(), "premium", "p", 1).await;
    assert_eq!(status, 429, "{body}");
    assert_eq!(body["error"]["type"], "rate_limit_exceeded", "{body}");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("timed out in queue"),
        "{body}"
    );
    assert!(took >= Duration::from_millis(300), "{took:?}");
    // A client that gives up while queued.
    let gone = tokio::spawn(send(url.clone(), "batch", "b", 1));
    tokio::time::sleep(Duration::from_millis(100)).await;
    gone.abort();
    let _ = gone.await;
    let mut cancelled = 0.0;
    for _ in 0..100 {
        let m = scrape(&client(), p.metrics_addr.unwrap()).await;
        cancelled = sum(
            &m,
            "llm_d_epp_flow_control_requests_total",
            &[("outcome", "EvictedContextCancelled")],
        );
        if cancelled > 0.0 {
            assert_eq!(sum(&m, "llm_d_epp_flow_control_queue_size", &[]), 0.0);
            assert_eq!(
                sum(
                    &m,
                    "llm_d_epp_flow_control_requests_total",
                    &[("outcome", "EvictedTTL")]
                ),
                1.0
            );
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(
        cancelled, 1.0,
        "the hung-up request left the queue before its TTL"
    );
    for h in running {
        assert_eq!(h.await.unwrap().0, 200);
    }
    p.stop().await;
}

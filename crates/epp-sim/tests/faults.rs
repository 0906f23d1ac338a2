//! Failure injection over real HTTP: error rate and status, added latency, unhealthy /health,
//! refused connections (programmatic, admin endpoint, time-limited).

mod common;

use std::time::{Duration, Instant};

use common::*;
use epp_sim::{Faults, SimConfig};
use serde_json::json;

#[tokio::test]
async fn error_rate_one_answers_the_chosen_status() {
    let s = start(fast_config()).await;
    let a = s.addr();
    s.faults().set_error_rate(1.0, 429).unwrap();
    for _ in 0..3 {
        let r = post(a, "/v1/completions", &json!({"prompt": "x"})).await;
        assert_eq!(r.status, 429);
        assert_eq!(r.json()["error"]["code"], "injected_fault");
        assert_eq!(r.json()["error"]["type"], "rate_limit_error");
        assert_eq!(r.header("x-inference-pod"), "sim-0");
    }
    // Through the admin endpoint, same state.
    let r = put(a, "/admin/faults", &json!({"error_status": 500})).await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.json()["error_rate"], 1.0);
    assert_eq!(r.json()["error_status"], 500);
    let r = post(
        a,
        "/v1/chat/completions",
        &json!({"messages": [{"role": "user", "content": "x"}]}),
    )
    .await;
    assert_eq!(r.status, 500);
    assert_eq!(s.faults().get().error_status, 500);
    // Probes are not affected by the error rate.
    assert_eq!(get(a, "/health").await.status, 200);
    assert_eq!(get(a, "/metrics").await.status, 200);
    // Invalid settings are refused with a JSON error naming the field.
    let r = put(a, "/admin/faults", &json!({"error_rate": 3})).await;
    assert_eq!(r.status, 400);
    assert_eq!(r.json()["error"]["param"], "error_rate");
    let r = put(a, "/admin/faults", &json!({"bogus": 1})).await;
    assert_eq!(r.status, 400);
    // Back to normal.
    let r = put(a, "/admin/faults", &json!({"error_rate": 0})).await;
    assert_eq!(r.status, 200);
    assert_eq!(
        post(a, "/v1/completions", &json!({"prompt": "x"}))
            .await
            .status,
        200
    );
    // Failed requests never reached the engine.
    assert_eq!(metric(a, "vllm:prefix_cache_queries_total").await, 1.0);
    s.shutdown().await;
}

#[tokio::test]
async fn partial_error_rate_is_seeded_and_roughly_right() {
    let cfg = SimConfig {
        faults: Faults {
            error_rate: 0.5,
            error_status: 503,
            ..Faults::default()
        },
        seed: 42,
        ..fast_config()
    };
    let s = start(cfg).await;
    let mut errors = 0;
    for _ in 0..60 {
        let r = post(
            s.addr(),
            "/v1/completions",
            &json!({"prompt": "x", "max_tokens": 1}),
        )
        .await;
        match r.status {
            503 => errors += 1,
            200 => {}
            other => panic!("unexpected status {other}"),
        }
    }
    assert!((15..=45).contains(&errors), "{errors} of 60");
    s.shutdown().await;
}

#[tokio::test]
async fn health_answers_503_when_unhealthy() {
    let s = start(fast_config()).await;
    let a = s.addr();
    assert_eq!(get(a, "/health").await.status, 200);
    let r = put(a, "/admin/faults", &json!({"unhealthy": true})).await;
    assert_eq!(r.json()["unhealthy"], true);
    let r = get(a, "/health").await;
    assert_eq!(r.status, 503);
    assert_eq!(r.json()["error"]["code"], "unhealthy");
    assert_eq!(r.header("x-inference-pod"), "sim-0");
    // Inference still works: only the probe fails.
    assert_eq!(
        post(a, "/v1/completions", &json!({"prompt": "x"}))
            .await
            .status,
        200
    );
    s.faults().set_unhealthy(false);
    assert_eq!(get(a, "/health").await.status, 200);
    let v = get(a, "/admin/faults").await.json();
    assert_eq!(v["unhealthy"], false);
    s.shutdown().await;
}

#[tokio::test]
async fn added_latency_is_measurable() {
    let s = start(fast_config()).await;
    let a = s.addr();
    let t0 = Instant::now();
    assert_eq!(
        post(a, "/v1/completions", &json!({"prompt": "x"}))
            .await
            .status,
        200
    );
    let base = t0.elapsed();
    s.faults().set_added_latency(Duration::from_millis(150));
    let t0 = Instant::now();
    let r = post(a, "/v1/completions", &json!({"prompt": "x"})).await;
    let slow = t0.elapsed();
    assert_eq!(r.status, 200);
    assert!(slow >= Duration::from_millis(150), "{slow:?}");
    assert!(
        slow > base + Duration::from_millis(100),
        "{base:?} vs {slow:?}"
    );
    // It counts in TTFT: one observation above 0.1 s.
    let m = scrape(a).await;
    let ttft = "vllm:time_to_first_token_seconds";
    assert_eq!(bucket(&m, ttft, "0.1"), 1.0);
    assert_eq!(bucket(&m, ttft, "0.25"), 2.0);
    s.shutdown().await;
}

#[tokio::test]
async fn refused_connections_and_recovery() {
    let s = start(fast_config()).await;
    let a = s.addr();
    assert_eq!(get(a, "/health").await.status, 200);

    // Programmatic: refuse until told otherwise.
    s.faults().set_refuse_connections(true);
    eventually("connections refused", || async {
        try_send(a, "GET", "/health", None).await.is_err()
    })
    .await;
    let e = try_send(a, "GET", "/health", None).await.unwrap_err();
    assert!(
        e.contains("ConnectionRefused") || e.contains("refused"),
        "{e}"
    );
    s.faults().set_refuse_connections(false);
    eventually("accepting again", || async {
        try_send(a, "GET", "/health", None).await.is_ok()
    })
    .await;

    // Admin endpoint, time-limited: refuses, then comes back by itself on the same port.
    let r = put(a, "/admin/faults", &json!({"refuse_connections_ms": 300})).await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert!(r.json()["refuse_remaining_ms"].as_f64().unwrap() > 0.0);
    let refused_at = Instant::now();
    eventually("refusing after admin call", || async {
        try_send(a, "GET", "/health", None).await.is_err()
    })
    .await;
    eventually("accepting after the refusal window", || async {
        try_send(a, "GET", "/health", None).await.is_ok()
    })
    .await;
    assert!(refused_at.elapsed() >= Duration::from_millis(250));
    let r = post(a, "/v1/completions", &json!({"prompt": "x"})).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.header("x-inference-port"), a.port().to_string());
    s.shutdown().await;
}

#[tokio::test]
async fn refusal_lets_the_in_flight_request_finish() {
    let cfg = SimConfig {
        latency: epp_sim::LatencyModel {
            inter_token_ms: 20.0,
            ..epp_sim::LatencyModel::zero()
        },
        ..fast_config()
    };
    let s = start(cfg).await;
    let a = s.addr();
    let t = tokio::spawn(async move {
        post(
            a,
            "/v1/completions",
            &json!({"prompt": "x", "max_tokens": 8}),
        )
        .await
    });
    eventually("request running", || async { s.snapshot().running == 1 }).await;
    s.faults().set_refuse_connections(true);
    let r = t.await.unwrap();
    assert_eq!(r.status, 200);
    assert_eq!(r.json()["usage"]["completion_tokens"], 8);
    assert!(try_send(a, "GET", "/health", None).await.is_err());
    s.faults().clear();
    eventually("accepting again", || async {
        try_send(a, "GET", "/health", None).await.is_ok()
    })
    .await;
    s.shutdown().await;
}

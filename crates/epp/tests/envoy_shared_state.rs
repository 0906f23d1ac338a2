//! Two `epp serve` replicas, each behind a real Envoy, sharing routing state through a real
//! Redis: prefix groups placed through one replica (forced where no scorer would put them) are
//! routed to the same endpoints when their next requests reach the other replica. (Behind one
//! Envoy whose `epp` cluster lists both, which replica gets a stream is Envoy's choice; two
//! Envoys make the crossing certain.)
//!
//! Needs Envoy (EPP_ENVOY_BIN; `scripts/test` installs it) and redis-server.

#[path = "support/envoy.rs"]
mod support;

#[path = "support/redis.rs"]
mod redis_server;

use std::time::{Duration, Instant};

use redis_server::Redis;
use support::*;

const GROUPS: usize = 12;

fn completion(prompt: &str) -> Vec<u8> {
    serde_json::to_vec(&serde_json::json!({
        "model": "sim-model", "prompt": prompt, "max_tokens": 2
    }))
    .unwrap()
}

fn group(g: usize) -> String {
    format!("[group {g}] ").repeat(60)
}

async fn requests_routed(m: std::net::SocketAddr) -> f64 {
    let r = http(m, "GET", "/metrics", &[], b"").await;
    String::from_utf8_lossy(&r.body)
        .lines()
        .filter(|l| l.starts_with("epp_routing_decisions_total{"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

async fn metric(m: std::net::SocketAddr, name: &str) -> f64 {
    let r = http(m, "GET", "/metrics", &[], b"").await;
    String::from_utf8_lossy(&r.body)
        .lines()
        .filter(|l| l.starts_with(name) && l[name.len()..].starts_with([' ', '{']))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_replicas_behind_envoy_share_where_prefixes_went() {
    let redis = Redis::start(&[]);
    let sims = Sims::start().await;
    let url = redis.url();
    let args = |id: &'static str| {
        vec![
            "--ha-mode",
            "active-active",
            "--shared-state",
            Box::leak(url.clone().into_boxed_str()),
            "--shared-state-key-prefix",
            "envoy-test",
            "--replica-id",
            id,
        ]
    };
    let a = start_picker_args(&sims, None, &args("a")).await;
    let b = start_picker_args(&sims, None, &args("b")).await;
    let envoy_a = start_envoy(&a, &sims, Variant::FailClosed).await;
    let envoy_b = start_envoy(&b, &sims, Variant::FailClosed).await;
    envoy_a.wait_pickers_healthy(1).await;
    envoy_b.wait_pickers_healthy(1).await;

    // Place every group where no scorer would put it (the forced-pick hook), through A.
    let mut placed = Vec::new();
    for g in 0..GROUPS {
        let target = sims.addr((g * 2 + 1) % 3);
        let r = http(
            envoy_a.listener,
            "POST",
            "/v1/completions",
            &[
                ("content-type", "application/json"),
                ("test-epp-endpoint-selection", &target.to_string()),
            ],
            &completion(&format!("{} first", group(g))),
        )
        .await;
        assert_eq!(r.status, 200, "{:?}", String::from_utf8_lossy(&r.body));
        assert_eq!(sims.addr(sims.which(&r)), target);
        placed.push(sims.which(&r));
    }
    assert_eq!(requests_routed(a.metrics).await, GROUPS as f64);
    assert_eq!(requests_routed(b.metrics).await, 0.0);
    // B learns A's placements.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let ab = metric(b.metrics, "epp_shared_state_deltas_applied_total").await;
        if ab >= GROUPS as f64 {
            break;
        }
        assert!(Instant::now() < deadline, "deltas not applied: {ab}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Unforced, through B: every group's next request lands where A placed it.
    for (g, want) in placed.iter().enumerate() {
        let r = http(
            envoy_b.listener,
            "POST",
            "/v1/completions",
            &[("content-type", "application/json")],
            &completion(&format!("{} second", group(g))),
        )
        .await;
        assert_eq!(r.status, 200);
        assert_eq!(sims.which(&r), *want, "group {g}");
    }
    assert_eq!(requests_routed(b.metrics).await, GROUPS as f64);
    assert_eq!(metric(a.metrics, "epp_shared_state_up").await, 1.0);
    assert_eq!(metric(b.metrics, "epp_shared_state_replicas").await, 2.0);
}

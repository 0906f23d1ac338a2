//! Active-active replicas sharing routing state through a real Redis on loopback: picks made on
//! one replica steer the others, a replica started later warms from the snapshot, foreign
//! entries are refused and counted, in-flight load crosses replicas, and a Redis outage never
//! fails a request and is caught up after.

mod common;
mod k8s_fake;
mod redis_support;

use std::collections::BTreeMap;
use std::time::Duration;

use common::*;
use epp_core::gateway::headers::SERVED as HEADER_SERVED;
use epp_core::proxy::ProxyHandle;
use epp_core::replication::SharedStateOptions;
use redis_support::RedisServer;

const GROUPS: usize = 10;

fn shared(url: &str, prefix: &str, replica: &str) -> SharedStateOptions {
    SharedStateOptions {
        url: url.to_string(),
        key_prefix: prefix.to_string(),
        replica_id: replica.to_string(),
        snapshot_interval: Duration::from_millis(300),
        load_interval: Duration::from_millis(50),
        warm_start_timeout: Duration::from_secs(3),
        ..Default::default()
    }
}

async fn replica(eps: &[String], s: SharedStateOptions) -> ProxyHandle {
    let mut o = picker_options(eps.to_vec());
    o.shared_state = Some(s);
    let mut po = proxy_options(o);
    // The forced-pick header places groups where no scorer or tie-break would.
    po.test_hooks = true;
    let p = epp_core::proxy::spawn(po).await.expect("replica starts");
    wait_healthy(&p, eps.len()).await;
    p
}

fn metrics(p: &ProxyHandle) -> BTreeMap<String, f64> {
    parse_exposition(&p.director.metrics().encode())
}

fn metric(p: &ProxyHandle, name: &str, labels: &[(&str, &str)]) -> f64 {
    sum(&metrics(p), name, labels)
}

/// Waits (bounded) until `f` holds.
async fn until(what: &str, mut f: impl FnMut() -> bool) {
    for _ in 0..500 {
        if f() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("timed out waiting for {what}");
}

/// Sends one request per group to `p`; returns the endpoint that served each.
async fn route_groups(
    c: &HttpClient,
    p: &ProxyHandle,
    groups: std::ops::Range<usize>,
    tail: &str,
) -> Vec<String> {
    route_groups_to(c, p, groups, tail, &[]).await
}

/// As [`route_groups`], forcing group `g` onto `force[(3g + 1) mod n]` when `force` is given:
/// a placement that differs from what the scorers and the tie-break would choose, so another
/// replica can only follow it by having learned it.
async fn route_groups_to(
    c: &HttpClient,
    p: &ProxyHandle,
    groups: std::ops::Range<usize>,
    tail: &str,
    force: &[String],
) -> Vec<String> {
    let url = format!("http://{}/v1/completions", p.proxy_addr);
    let mut served = Vec::new();
    for g in groups {
        let body = serde_json::to_vec(&completion(&text(g, 700), tail, 2)).unwrap();
        let mut headers = vec![("content-type", "application/json")];
        let pin;
        if !force.is_empty() {
            pin = force[(g * 3 + 1) % force.len()].clone();
            headers.push(("test-epp-endpoint-selection", pin.as_str()));
        }
        let r = request(c, "POST", &url, &headers, body).await;
        assert_eq!(r.status, 200, "{:?}", r.body);
        served.push(r.header(HEADER_SERVED).unwrap().to_string());
    }
    served
}

async fn readyz(c: &HttpClient, p: &ProxyHandle) -> (u16, String) {
    let r = request(
        c,
        "GET",
        &format!("http://{}/readyz", p.health_addr.unwrap()),
        &[],
        "",
    )
    .await;
    (r.status, String::from_utf8_lossy(&r.body).into_owned())
}

/// Waits (bounded) until `/readyz` answers 200; returns its body.
async fn wait_ready(c: &HttpClient, p: &ProxyHandle) -> String {
    for _ in 0..300 {
        let (code, body) = readyz(c, p).await;
        if code == 200 {
            return body;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("not ready: {:?}", readyz(c, p).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn picks_on_one_replica_steer_the_other_and_foreign_entries_are_refused() {
    let redis = RedisServer::start().await;
    let sims = sims(4, |_| {}).await;
    let eps: Vec<String> = sims.iter().map(|s| s.addr().to_string()).collect();
    let a = replica(&eps, shared(&redis.url(), "t1", "a")).await;
    let b = replica(&eps, shared(&redis.url(), "t1", "b")).await;
    let c = client();
    wait_ready(&c, &a).await;
    wait_ready(&c, &b).await;
    let on_a = route_groups_to(&c, &a, 0..GROUPS, " first", &eps).await;
    // Every group's blocks reach B (one insert per pick).
    until("B applies A's picks", || {
        metric(&b, "epp_shared_state_deltas_applied_total", &[]) >= GROUPS as f64
    })
    .await;
    assert_eq!(
        metric(&a, "epp_shared_state_deltas_sent_total", &[]),
        GROUPS as f64
    );
    // A skips its own entries: nothing applied there.
    assert_eq!(
        metric(&a, "epp_shared_state_deltas_applied_total", &[]),
        0.0
    );
    assert_eq!(metric(&b, "epp_shared_state_up", &[]), 1.0);
    // B has never seen these groups, yet sends each where A put it.
    let on_b = route_groups(&c, &b, 0..GROUPS, " second").await;
    assert_eq!(on_a, on_b);
    // The groups were spread, not all on one endpoint.
    // The forced placements took effect...
    for (g, ep) in on_a.iter().enumerate() {
        assert_eq!(*ep, eps[(g * 3 + 1) % eps.len()], "group {g}");
    }
    // ...and a replica that shares nothing does not find them (the check can fail).
    let mut lone_opts = picker_options(eps.clone());
    lone_opts.shared_state = None;
    let lone = epp_core::proxy::spawn(proxy_options(lone_opts))
        .await
        .unwrap();
    wait_healthy(&lone, eps.len()).await;
    let on_lone = route_groups(&c, &lone, 0..GROUPS, " second").await;
    assert_ne!(
        on_a, on_lone,
        "a replica without shared state cannot know A's placements"
    );
    lone.stop().await;

    // Foreign and incompatible entries: refused and counted; valid ones still apply after.
    let mut conn = redis.connect().await.unwrap();
    let key = "t1:deltas";
    for fields in [
        vec![
            ("v", b"1".to_vec()),
            ("r", b"intruder".to_vec()),
            ("b", b"\xc1junk".to_vec()),
        ],
        vec![
            ("v", b"9".to_vec()),
            ("r", b"future".to_vec()),
            ("b", b"x".to_vec()),
        ],
        vec![("hello", b"world".to_vec())],
    ] {
        let mut cmd = redis::cmd("XADD");
        cmd.arg(key).arg("*");
        for (k, v) in fields {
            cmd.arg(k).arg(v);
        }
        let _: String = cmd.query_async(&mut conn).await.unwrap();
    }
    until("B refuses the three entries", || {
        let m = metrics(&b);
        sum(
            &m,
            "epp_shared_state_entries_refused_total",
            &[("reason", "malformed")],
        ) == 2.0
            && sum(
                &m,
                "epp_shared_state_entries_refused_total",
                &[("reason", "incompatible")],
            ) == 1.0
    })
    .await;
    let applied = metric(&b, "epp_shared_state_deltas_applied_total", &[]);
    route_groups(&c, &a, GROUPS..GROUPS + 2, " first").await;
    until("B applies entries after the refused ones", || {
        metric(&b, "epp_shared_state_deltas_applied_total", &[]) >= applied + 2.0
    })
    .await;

    // Load: a long request in flight through A shows in B's in-flight count for its endpoint.
    let url = format!("http://{}/v1/completions", a.proxy_addr);
    let long = completion(&text(99, 300), "", 400);
    let c2 = c.clone();
    let held = tokio::spawn(async move { post_json(&c2, &url, &long).await });
    let ds_b = b.director.datastore().clone();
    until("B sees A's request in flight", || {
        ds_b.snapshot()
            .endpoints
            .iter()
            .any(|e| e.endpoint.inflight() == 0 && e.endpoint.load_inflight() == 1)
    })
    .await;
    let r = held.await.unwrap();
    assert_eq!(r.status, 200);
    until("A's finished request leaves B's count", || {
        ds_b.snapshot()
            .endpoints
            .iter()
            .all(|e| e.endpoint.load_inflight() == 0)
    })
    .await;
    assert_eq!(metric(&b, "epp_shared_state_replicas", &[]), 2.0);
    a.stop().await;
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_started_later_warms_from_the_snapshot() {
    let redis = RedisServer::start().await;
    let sims = sims(4, |_| {}).await;
    let eps: Vec<String> = sims.iter().map(|s| s.addr().to_string()).collect();
    let a = replica(&eps, shared(&redis.url(), "t2", "a")).await;
    let c = client();
    let on_a = route_groups_to(&c, &a, 0..GROUPS, " first", &eps).await;
    let written = metric(&a, "epp_shared_state_snapshots_written_total", &[]);
    until("a snapshot taken after the traffic", || {
        metric(&a, "epp_shared_state_snapshots_written_total", &[]) >= written + 1.0
    })
    .await;
    // Only the snapshot can warm the new replica: the stream is gone.
    let mut conn = redis.connect().await.unwrap();
    let _: i64 = redis::cmd("DEL")
        .arg("t2:deltas")
        .query_async(&mut conn)
        .await
        .unwrap();
    let late = replica(&eps, shared(&redis.url(), "t2", "late")).await;
    until("the late replica is ready", || {
        late.director.datastore().is_synced()
            && metric(&late, "epp_shared_state_snapshots_loaded_total", &[]) == 1.0
    })
    .await;
    wait_ready(&c, &late).await;
    assert!(metric(&late, "epp_shared_state_snapshot_blocks", &[]) >= GROUPS as f64);
    assert!(metric(&late, "epp_shared_state_snapshot_age_seconds", &[]) < 5.0);
    let on_late = route_groups(&c, &late, 0..GROUPS, " second").await;
    assert_eq!(on_a, on_late);
    a.stop().await;
    late.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_outage_fails_no_request_and_is_caught_up() {
    let mut redis = RedisServer::start().await;
    let sims = sims(4, |_| {}).await;
    let eps: Vec<String> = sims.iter().map(|s| s.addr().to_string()).collect();
    let a = replica(&eps, shared(&redis.url(), "t3", "a")).await;
    let b = replica(&eps, shared(&redis.url(), "t3", "b")).await;
    let c = client();
    route_groups(&c, &a, 0..2, " warm").await;
    until("B applies", || {
        metric(&b, "epp_shared_state_deltas_applied_total", &[]) >= 2.0
    })
    .await;

    redis.stop();
    // Requests go on, on local state.
    let on_a = route_groups_to(&c, &a, 10..10 + GROUPS, " first", &eps).await;
    until("A notices Redis is gone", || {
        metric(&a, "epp_shared_state_up", &[]) == 0.0
    })
    .await;
    let (code, body) = readyz(&c, &a).await;
    assert_eq!(code, 200, "{body}");
    assert!(body.contains("shared state unavailable"), "{body}");
    assert_eq!(
        metric(&a, "epp_requests_total", &[("status", "200")]),
        (2 + GROUPS) as f64
    );

    // Back (empty, as after a crash): A's backlog is published and B catches up.
    redis.restart().await;
    until("B applies what A learned during the outage", || {
        metric(&b, "epp_shared_state_deltas_applied_total", &[]) >= (2 + GROUPS) as f64
    })
    .await;
    assert_eq!(metric(&a, "epp_shared_state_up", &[]), 1.0);
    let (_, body) = readyz(&c, &a).await;
    assert!(!body.contains("shared state unavailable"), "{body}");
    let on_b = route_groups(&c, &b, 10..10 + GROUPS, " second").await;
    assert_eq!(on_a, on_b);
    a.stop().await;
    b.stop().await;
}

/// A leader-election replica (`--ha-mode leader-election`) that shares state through Redis.
async fn elected_replica(
    api: &k8s_fake::FakeApi,
    eps: &[String],
    s: SharedStateOptions,
    identity: &str,
) -> ProxyHandle {
    let mut le =
        epp_core::k8s::leader::LeaderElectionConfig::new(api.client(), "llm-d", "epp-pool");
    le.identity = identity.into();
    le.lease_duration = Duration::from_secs(2);
    le.renew_deadline = Duration::from_millis(1500);
    le.retry_period = Duration::from_millis(200);
    let mut o = picker_options(eps.to_vec());
    o.shared_state = Some(s);
    o.leader_election = Some(le);
    let mut po = proxy_options(o);
    po.test_hooks = true;
    let p = epp_core::proxy::spawn(po).await.expect("replica starts");
    wait_healthy(&p, eps.len()).await;
    p
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_leader_election_a_new_leader_starts_warm_from_the_shared_state() {
    let redis = RedisServer::start().await;
    let api = k8s_fake::FakeApi::start();
    let sims = sims(4, |_| {}).await;
    let eps: Vec<String> = sims.iter().map(|s| s.addr().to_string()).collect();
    let c = client();
    let a = elected_replica(&api, &eps, shared(&redis.url(), "le", "a"), "replica-a").await;
    wait_ready(&c, &a).await;
    let b = elected_replica(&api, &eps, shared(&redis.url(), "le", "b"), "replica-b").await;
    // B is the standby: not ready, yet it follows the leader's picks.
    assert_eq!(readyz(&c, &b).await.0, 503);
    let on_a = route_groups_to(&c, &a, 0..GROUPS, " first", &eps).await;
    until("the standby applies the leader's picks", || {
        metric(&b, "epp_shared_state_deltas_applied_total", &[]) >= GROUPS as f64
    })
    .await;
    // The leader goes away; the standby takes the Lease and is ready, its index warm.
    let t0 = std::time::Instant::now();
    a.stop().await;
    wait_ready(&c, &b).await;
    let failover = t0.elapsed();
    assert!(failover < Duration::from_secs(3), "{failover:?}");
    let on_b = route_groups(&c, &b, 0..GROUPS, " second").await;
    assert_eq!(
        on_a, on_b,
        "the new leader sends every group where the old one put it"
    );
    // A cold new leader (no shared state) would not know them.
    let lone = epp_core::proxy::spawn(proxy_options(picker_options(eps.clone())))
        .await
        .unwrap();
    wait_healthy(&lone, eps.len()).await;
    let on_lone = route_groups(&c, &lone, 0..GROUPS, " second").await;
    assert_ne!(on_a, on_lone);
    lone.stop().await;
    b.stop().await;
}

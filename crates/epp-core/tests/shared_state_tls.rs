//! Active-active replicas sharing routing state through a real Redis that speaks TLS only
//! (`rediss://`): with the server's CA given (`--shared-state-ca-file`), picks made on one
//! replica steer the other; a replica that does not trust the server's certificate never
//! shares anything, says so (`epp_shared_state_up` 0), and still serves every request.

mod common;
mod k8s_fake;
mod redis_support;

use std::time::Duration;

use common::*;
use epp_core::gateway::headers::SERVED as HEADER_SERVED;
use epp_core::proxy::ProxyHandle;
use epp_core::replication::SharedStateOptions;
use redis_support::RedisServer;

const GROUPS: usize = 6;

fn shared(url: &str, replica: &str, ca: Option<&std::path::Path>) -> SharedStateOptions {
    SharedStateOptions {
        url: url.to_string(),
        key_prefix: "tls".into(),
        replica_id: replica.to_string(),
        snapshot_interval: Duration::from_millis(300),
        load_interval: Duration::from_millis(50),
        warm_start_timeout: Duration::from_secs(1),
        ca_file: ca.map(|p| p.to_path_buf()),
        ..Default::default()
    }
}

async fn replica(eps: &[String], s: SharedStateOptions) -> ProxyHandle {
    let mut o = picker_options(eps.to_vec());
    o.shared_state = Some(s);
    let mut po = proxy_options(o);
    po.test_hooks = true;
    let p = epp_core::proxy::spawn(po).await.expect("replica starts");
    wait_healthy(&p, eps.len()).await;
    p
}

fn metric(p: &ProxyHandle, name: &str) -> f64 {
    sum(&parse_exposition(&p.director.metrics().encode()), name, &[])
}

async fn until(what: &str, mut f: impl FnMut() -> bool) {
    for _ in 0..500 {
        if f() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("timed out waiting for {what}");
}

/// One request per group to `p`, group `g` forced onto `force[(3g + 1) mod n]` when `force` is
/// given; returns the endpoint that served each.
async fn route(c: &HttpClient, p: &ProxyHandle, tail: &str, force: &[String]) -> Vec<String> {
    let url = format!("http://{}/v1/completions", p.proxy_addr);
    let mut served = Vec::new();
    for g in 0..GROUPS {
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_share_state_over_rediss_and_an_untrusted_server_shares_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let ck = rcgen::generate_simple_self_signed(vec!["127.0.0.1".to_string()]).unwrap();
    let (cert, key) = (dir.path().join("redis.crt"), dir.path().join("redis.key"));
    std::fs::write(&cert, ck.cert.pem()).unwrap();
    std::fs::write(&key, ck.signing_key.serialize_pem()).unwrap();
    let redis = RedisServer::start_tls(&cert, &key).await;
    assert!(redis.url().starts_with("rediss://"));

    let sims = sims(4, |_| {}).await;
    let eps: Vec<String> = sims.iter().map(|s| s.addr().to_string()).collect();
    let a = replica(&eps, shared(&redis.url(), "a", Some(&cert))).await;
    let b = replica(&eps, shared(&redis.url(), "b", Some(&cert))).await;
    until("both replicas reach the TLS Redis", || {
        metric(&a, "epp_shared_state_up") == 1.0 && metric(&b, "epp_shared_state_up") == 1.0
    })
    .await;
    let c = client();
    // Placements no scorer would choose, made on a: b follows them only by having learned them
    // through Redis.
    let on_a = route(&c, &a, " first", &eps).await;
    until("b applied a's picks", || {
        metric(&b, "epp_shared_state_deltas_applied_total") >= GROUPS as f64
    })
    .await;
    let on_b = route(&c, &b, " second", &[]).await;
    assert_eq!(on_a, on_b);
    assert!(metric(&a, "epp_shared_state_sent_bytes_total") > 0.0);

    // A replica that trusts only the system roots: the TLS handshake fails, nothing is shared,
    // the gauge says so, and every request is still served.
    let lone = replica(&eps, shared(&redis.url(), "lone", None)).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(metric(&lone, "epp_shared_state_up"), 0.0);
    assert_eq!(metric(&lone, "epp_shared_state_deltas_applied_total"), 0.0);
    let served = route(&c, &lone, " third", &[]).await;
    assert_eq!(served.len(), GROUPS);
    a.stop().await;
    b.stop().await;
    lone.stop().await;
}

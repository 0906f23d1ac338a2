//! `epp proxy` end to end over real HTTP on loopback, in front of real simulators.

mod common;

use std::collections::HashMap;
use std::io::Write;
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::*;
use epp_core::gateway::headers::SERVED as HEADER_SERVED;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shared_prefixes_stick_while_load_stays_balanced() {
    // Long enough decodes that six concurrent sessions overlap.
    let sims = sims(3, |c| c.latency.inter_token_ms = 2.0).await;
    let eps: Vec<String> = sims.iter().map(|s| s.addr().to_string()).collect();
    let p = epp_core::proxy::spawn(proxy_options(picker_options(eps)))
        .await
        .unwrap();
    wait_healthy(&p, 3).await;
    let url = format!("http://{}/v1/completions", p.proxy_addr);
    let groups = 6;
    let per_group = 8;
    let mut tasks = Vec::new();
    for g in 0..groups {
        let url = url.clone();
        tasks.push(tokio::spawn(async move {
            let c = client();
            let system = text(g, 512);
            let mut served = Vec::new();
            for q in 0..per_group {
                let r = post_json(
                    &c,
                    &url,
                    &completion(&system, &format!(" question {q}?"), 20),
                )
                .await;
                assert_eq!(r.status, 200, "{:?}", r.body);
                served.push(r.header(HEADER_SERVED).unwrap().to_string());
            }
            served
        }));
    }
    let mut per_backend: HashMap<String, usize> = HashMap::new();
    for t in tasks {
        let served = t.await.unwrap();
        let mut counts: HashMap<&str, usize> = HashMap::new();
        for s in &served {
            *counts.entry(s.as_str()).or_default() += 1;
            *per_backend.entry(s.clone()).or_default() += 1;
        }
        let top = counts.values().max().copied().unwrap();
        assert!(
            top * 4 >= per_group * 3,
            "a prefix group wandered: {counts:?}"
        );
    }
    let total = (groups * per_group) as f64;
    assert_eq!(
        per_backend.len(),
        3,
        "every backend serves: {per_backend:?}"
    );
    for (b, n) in &per_backend {
        let share = *n as f64 / total;
        assert!(
            (0.15..=0.55).contains(&share),
            "backend {b} share {share:.2}: {per_backend:?}"
        );
    }
    p.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn seed_counters_move_by_exactly_the_requests_sent() {
    let sims = sims(3, |_| {}).await;
    let eps: Vec<String> = sims.iter().map(|s| s.addr().to_string()).collect();
    let p = epp_core::proxy::spawn(proxy_options(picker_options(eps)))
        .await
        .unwrap();
    wait_healthy(&p, 3).await;
    let c = client();
    let maddr = p.metrics_addr.unwrap();
    let before = scrape(&c, maddr).await;
    let url = format!("http://{}/v1/completions", p.proxy_addr);
    let chat_url = format!("http://{}/v1/chat/completions", p.proxy_addr);
    // 12 completions that share a 2-block prefix, 3 chats, 4 bad requests.
    let shared = text(1, 128);
    for i in 0..12 {
        assert_eq!(
            post_json(&c, &url, &completion(&shared, &format!("tail {i}"), 2))
                .await
                .status,
            200
        );
    }
    for i in 0..3 {
        let body = serde_json::json!({"model":"sim-model","max_tokens":2,"messages":[{"role":"user","content": format!("{} {i}", text(9, 100))}]});
        assert_eq!(post_json(&c, &chat_url, &body).await.status, 200);
    }
    for bad in [
        r#"{"model":"","prompt":"x"}"#,
        "{nope",
        r#"{"model":5,"prompt":"x"}"#,
        r#"{"model":"m"}"#,
    ] {
        let r = request(&c, "POST", &url, &[], Bytes::from(bad)).await;
        assert_eq!(r.status, 400, "{bad}");
    }
    let after = scrape(&c, maddr).await;
    let d = |name: &str, m: &[(&str, &str)]| sum(&after, name, m) - sum(&before, name, m);
    assert_eq!(
        d(
            "epp_requests_total",
            &[("method", "completions"), ("status", "200")]
        ),
        12.0
    );
    assert_eq!(
        d(
            "epp_requests_total",
            &[("method", "chat_completions"), ("status", "200")]
        ),
        3.0
    );
    assert_eq!(
        d(
            "epp_requests_total",
            &[("method", "completions"), ("status", "400")]
        ),
        4.0
    );
    assert_eq!(d("epp_requests_total", &[]), 19.0);
    assert_eq!(
        d(
            "epp_request_duration_seconds_count",
            &[("method", "completions")]
        ),
        16.0
    );
    assert_eq!(
        d(
            "epp_request_duration_seconds_count",
            &[("method", "chat_completions")]
        ),
        3.0
    );
    assert_eq!(d("epp_routing_decisions_total", &[]), 15.0);
    // Every routed prompt had at least one full 64-byte block.
    assert_eq!(d("epp_cache_requests_total", &[]), 15.0);
    // The 11 completions after the first share its first block with an earlier pick, and the
    // default profile keeps them on the backend that holds it.
    let hits = d("epp_cache_hits_total", &[]);
    assert!((11.0..=13.0).contains(&hits), "cache hits {hits}");
    assert_eq!(
        d(
            "epp_routing_decisions_total",
            &[("decision_type", "cache_hit")]
        ),
        hits
    );
    assert_eq!(
        sum(&after, "epp_backend_health", &[("state", "healthy")]),
        3.0
    );
    assert_eq!(
        sum(
            &after,
            "epp_pods_discovered",
            &[("namespace", "local"), ("label_selector", "static")]
        ),
        3.0
    );
    assert_eq!(sum(&after, "epp_backend_inflight_requests", &[]), 0.0);
    // The simulators saw exactly the routed requests.
    let mut sim_total = 0.0;
    for s in &sims {
        let m = parse_exposition(&s.metrics_text());
        sim_total += sum(&m, "vllm:request_success_total", &[]);
    }
    assert_eq!(sim_total, 15.0);
    p.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopped_simulator_gets_no_new_requests_and_nothing_fails() {
    let mut sims = sims(3, |_| {}).await;
    let eps: Vec<String> = sims.iter().map(|s| s.addr().to_string()).collect();
    let opts = picker_options(eps);
    let interval = opts.scrape.interval;
    let p = epp_core::proxy::spawn(proxy_options(opts)).await.unwrap();
    wait_healthy(&p, 3).await;
    let c = client();
    let url = format!("http://{}/v1/completions", p.proxy_addr);
    let victim = sims.remove(1);
    let victim_addr = victim.addr().to_string();
    let mut victim = Some(victim);
    let mut stopped_at: Option<Instant> = None;
    let mut stopper = None;
    let mut late_hits = Vec::new();
    let mut victim_before = 0;
    for i in 0..120 {
        if i == 30 {
            // Stop it for real: it stops accepting, finishes in-flight work, closes the port.
            stopped_at = Some(Instant::now());
            stopper = Some(tokio::spawn(victim.take().unwrap().shutdown()));
        }
        let r = post_json(&c, &url, &completion(&text(i, 80), "", 2)).await;
        assert_eq!(
            r.status,
            200,
            "request {i} failed: {:?}",
            String::from_utf8_lossy(&r.body)
        );
        let served = r.header(HEADER_SERVED).unwrap().to_string();
        match stopped_at {
            None => victim_before += usize::from(served == victim_addr),
            Some(t) if t.elapsed() > interval * 2 && served == victim_addr => late_hits.push(i),
            _ => {}
        }
    }
    stopper.unwrap().await.unwrap();
    assert!(victim_before > 0, "the victim served before it stopped");
    assert!(
        late_hits.is_empty(),
        "requests routed to the stopped simulator: {late_hits:?}"
    );
    let m = scrape(&c, p.metrics_addr.unwrap()).await;
    assert_eq!(
        sum(
            &m,
            "epp_backend_health",
            &[("backend", victim_addr.as_str()), ("state", "unhealthy")]
        ),
        0.0,
        "an unhealthy backend reports 0"
    );
    assert_eq!(
        m.keys()
            .filter(|k| k.starts_with("epp_backend_health{")
                && k.contains(&victim_addr)
                && k.contains("state=\"unhealthy\""))
            .count(),
        1
    );
    p.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hot_reload_of_the_endpoints_file_brings_a_new_endpoint_into_use() {
    let sims = sims(2, |_| {}).await;
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("endpoints.yaml");
    let write = |addrs: &[String]| {
        let mut f = std::fs::File::create(&file).unwrap();
        writeln!(f, "endpoints:").unwrap();
        for a in addrs {
            writeln!(f, "- address: {a}").unwrap();
        }
    };
    let a0 = sims[0].addr().to_string();
    let a1 = sims[1].addr().to_string();
    write(std::slice::from_ref(&a0));
    let mut opts = picker_options(vec![]);
    opts.discovery = std::sync::Arc::new(epp_core::discovery::StaticDiscovery {
        endpoints: vec![],
        file: Some(file.clone()),
        poll_interval: Duration::from_millis(50),
        ..Default::default()
    });
    let p = epp_core::proxy::spawn(proxy_options(opts)).await.unwrap();
    wait_healthy(&p, 1).await;
    let c = client();
    let url = format!("http://{}/v1/completions", p.proxy_addr);
    for i in 0..5 {
        let r = post_json(&c, &url, &completion(&text(i, 70), "", 2)).await;
        assert_eq!(r.header(HEADER_SERVED), Some(a0.as_str()));
    }
    write(&[a0.clone(), a1.clone()]);
    wait_healthy(&p, 2).await;
    let mut on_new = 0;
    for i in 0..20 {
        // Concurrent pairs so the load scorers spread them.
        let (b1, b2) = (
            completion(&text(100 + i, 70), "", 4),
            completion(&text(200 + i, 70), "", 4),
        );
        let (r1, r2) = tokio::join!(post_json(&c, &url, &b1), post_json(&c, &url, &b2));
        for r in [r1, r2] {
            assert_eq!(r.status, 200);
            on_new += usize::from(r.header(HEADER_SERVED) == Some(a1.as_str()));
        }
    }
    assert!(on_new >= 5, "the added endpoint served only {on_new} of 40");
    // Removing it again takes it out of rotation.
    write(std::slice::from_ref(&a0));
    let ds = p.director.datastore().clone();
    for _ in 0..100 {
        if ds.snapshot().endpoints.len() == 1 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(ds.snapshot().endpoints.len(), 1);
    p.stop().await;
}

/// A fake upstream that answers scrapes and probes properly but answers every other request
/// with bytes that are not HTTP.
async fn broken_upstream() -> std::net::SocketAddr {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((mut s, _)) = l.accept().await else {
                return;
            };
            tokio::spawn(async move {
                let mut buf = vec![0u8; 65536];
                let mut n = 0;
                loop {
                    match s.read(&mut buf[n..]).await {
                        Ok(0) | Err(_) => return,
                        Ok(k) => n += k,
                    }
                    if buf[..n].windows(4).any(|w| w == b"\r\n\r\n") {
                        break;
                    }
                }
                let head = String::from_utf8_lossy(&buf[..n]).to_string();
                let resp: &[u8] = if head.starts_with("GET /metrics")
                    || head.starts_with("GET /health")
                {
                    b"HTTP/1.1 200 OK\r\ncontent-length: 29\r\nconnection: close\r\n\r\nvllm:num_requests_waiting 0\n\n"
                } else {
                    b"this is not HTTP\r\n\r\n"
                };
                let _ = s.write_all(resp).await;
                let _ = s.shutdown().await;
            });
        }
    });
    addr
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_and_upstream_failures_get_precise_json_errors() {
    let sims = sims(1, |_| {}).await;
    let slow = epp_sim::spawn(
        epp_sim::SimConfig {
            name: "slow".into(),
            ..Default::default()
        },
        loopback0(),
    )
    .await
    .unwrap();
    slow.faults().set_added_latency(Duration::from_secs(3));
    let broken = broken_upstream().await;
    let c = client();

    // Proxy over one healthy simulator, with a small body limit.
    let mut po = proxy_options(picker_options(vec![sims[0].addr().to_string()]));
    po.max_body_bytes = 4096;
    let p = epp_core::proxy::spawn(po).await.unwrap();
    wait_healthy(&p, 1).await;
    let url = format!("http://{}/v1/completions", p.proxy_addr);
    let expect = |r: &Resp, status: u16, needle: &str| {
        assert_eq!(r.status, status, "{:?}", String::from_utf8_lossy(&r.body));
        assert_eq!(r.header("content-type"), Some("application/json"));
        let j = r.json();
        let msg = j["error"]["message"].as_str().unwrap();
        assert!(msg.contains(needle), "{msg:?} lacks {needle:?}");
        assert_eq!(j["error"]["code"], epp_core::director::error_code(status));
        assert!(r.header("x-request-id").is_some());
    };
    expect(
        &request(&c, "POST", &url, &[], Bytes::from("{not json")).await,
        400,
        "not valid JSON",
    );
    // No `model`, one model served: routed as that model, as vLLM itself would.
    let r = request(&c, "POST", &url, &[], Bytes::from(r#"{"prompt":"hi"}"#)).await;
    assert_eq!(r.status, 200, "{:?}", String::from_utf8_lossy(&r.body));
    let big = format!(r#"{{"model":"sim-model","prompt":"{}"}}"#, "x".repeat(5000));
    expect(
        &request(&c, "POST", &url, &[], Bytes::from(big)).await,
        413,
        "--max-body-bytes",
    );
    let r = request(
        &c,
        "POST",
        &url,
        &[("test-epp-endpoint-selection", "10.255.255.1")],
        serde_json::to_vec(&completion("a", "b", 1)).unwrap(),
    )
    .await;
    // Without --conformance-test-hooks the forced-pick header is ignored.
    assert_eq!(r.status, 200, "{:?}", String::from_utf8_lossy(&r.body));
    assert_eq!(
        r.header(HEADER_SERVED),
        Some(sims[0].addr().to_string().as_str())
    );
    // The request id is propagated when given.
    let r = request(
        &c,
        "POST",
        &url,
        &[("x-request-id", "abc-123")],
        serde_json::to_vec(&completion("a", "b", 1)).unwrap(),
    )
    .await;
    assert_eq!(r.status, 200);
    assert_eq!(r.header("x-request-id"), Some("abc-123"));
    p.stop().await;

    // Upstream timeout → 504.
    let mut po = proxy_options(picker_options(vec![slow.addr().to_string()]));
    po.upstream_timeout = Duration::from_millis(300);
    let p = epp_core::proxy::spawn(po).await.unwrap();
    wait_healthy(&p, 1).await;
    let url = format!("http://{}/v1/completions", p.proxy_addr);
    expect(
        &post_json(&c, &url, &completion("a", "b", 1)).await,
        504,
        "did not answer within",
    );
    p.stop().await;

    // Upstream speaks garbage → 502.
    let p = epp_core::proxy::spawn(proxy_options(picker_options(vec![broken.to_string()])))
        .await
        .unwrap();
    wait_healthy(&p, 1).await;
    let url = format!("http://{}/v1/completions", p.proxy_addr);
    expect(
        &post_json(&c, &url, &completion("a", "b", 1)).await,
        502,
        "failed",
    );
    p.stop().await;

    // Nothing healthy → 503.
    let dead = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    };
    let p = epp_core::proxy::spawn(proxy_options(picker_options(vec![dead.to_string()])))
        .await
        .unwrap();
    let url = format!("http://{}/v1/completions", p.proxy_addr);
    tokio::time::sleep(Duration::from_millis(200)).await;
    expect(
        &post_json(&c, &url, &completion("a", "b", 1)).await,
        503,
        "no healthy endpoint",
    );
    let m = scrape(&c, p.metrics_addr.unwrap()).await;
    assert_eq!(
        sum(
            &m,
            "epp_routing_decisions_total",
            &[("decision_type", "no_endpoint")]
        ),
        1.0
    );
    assert_eq!(sum(&m, "epp_requests_total", &[("status", "503")]), 1.0);
    p.stop().await;
}

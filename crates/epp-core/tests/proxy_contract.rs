//! The proxy under the gateway contract and its hardening: the forced-pick header only with the
//! conformance hooks, the model rewrite reaching the backend and reversed for the client, one
//! request-id format, only the inference API forwarded, `/v1/models` from the pool, local
//! errors never counted against an endpoint, timeouts and the connection cap, and statuses
//! counted as the client got them.

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::*;
use epp_core::gateway::headers::SERVED;
use parking_lot::Mutex;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// A model server that records the bodies it receives and answers naming the model it was
/// asked for (plain JSON, or two SSE events when `stream` is set). With `truncate`, inference
/// responses break off mid-body.
async fn capture_upstream(truncate: bool) -> (std::net::SocketAddr, Arc<Mutex<Vec<Bytes>>>) {
    let seen: Arc<Mutex<Vec<Bytes>>> = Arc::default();
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let s2 = seen.clone();
    tokio::spawn(async move {
        loop {
            let Ok((mut sock, _)) = l.accept().await else {
                return;
            };
            let seen = s2.clone();
            tokio::spawn(async move {
                let mut buf = Vec::new();
                let mut tmp = [0u8; 8192];
                loop {
                    let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") else {
                        match sock.read(&mut tmp).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => buf.extend_from_slice(&tmp[..n]),
                        }
                        continue;
                    };
                    let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
                    let len: usize = head
                        .lines()
                        .find_map(|l| l.strip_prefix("content-length:"))
                        .and_then(|v| v.trim().parse().ok())
                        .unwrap_or(0);
                    while buf.len() < end + 4 + len {
                        match sock.read(&mut tmp).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => buf.extend_from_slice(&tmp[..n]),
                        }
                    }
                    let body = Bytes::copy_from_slice(&buf[end + 4..end + 4 + len]);
                    buf.drain(..end + 4 + len);
                    let resp: Vec<u8> = if head.starts_with("get /metrics") {
                        let m =
                            "# TYPE vllm:num_requests_waiting gauge\nvllm:num_requests_waiting 0\n";
                        format!("HTTP/1.1 200 OK\r\ncontent-length: {}\r\n\r\n{m}", m.len()).into()
                    } else if head.starts_with("get /health") {
                        b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n".to_vec()
                    } else if head.starts_with("get /v1/models") {
                        let m = r#"{"object":"list","data":[{"id":"cap-model","object":"model"}]}"#;
                        format!("HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{m}", m.len()).into()
                    } else {
                        seen.lock().push(body.clone());
                        let v: serde_json::Value =
                            serde_json::from_slice(&body).unwrap_or_default();
                        let model = v["model"].as_str().unwrap_or("").to_string();
                        if truncate {
                            let _ = sock
                                .write_all(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5\r\nhello\r\n")
                                .await;
                            return;
                        }
                        if v["stream"] == true {
                            let ev = format!(
                                "data: {{\"model\":\"{model}\",\"choices\":[{{\"text\":\"a\"}}]}}\n\ndata: {{\"model\": \"{model}\",\"choices\":[]}}\n\ndata: [DONE]\n\n"
                            );
                            format!("HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ncontent-length: {}\r\n\r\n{ev}", ev.len()).into()
                        } else {
                            let j = format!(r#"{{"id":"c1","model":"{model}","choices":[]}}"#);
                            format!("HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{j}", j.len()).into()
                        }
                    };
                    if sock.write_all(&resp).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    (addr, seen)
}

fn health_states(p: &epp_core::proxy::ProxyHandle) -> Vec<&'static str> {
    p.director
        .datastore()
        .snapshot()
        .endpoints
        .iter()
        .map(|e| e.health.as_str())
        .collect()
}

#[tokio::test]
async fn forced_pick_only_with_the_conformance_hooks() {
    let sims = sims(3, |_| {}).await;
    let addrs: Vec<String> = sims.iter().map(|s| s.addr().to_string()).collect();
    let c = client();
    for hooks in [false, true] {
        let mut po = proxy_options(picker_options(addrs.clone()));
        po.test_hooks = hooks;
        let p = epp_core::proxy::spawn(po).await.unwrap();
        wait_healthy(&p, 3).await;
        let url = format!("http://{}/v1/completions", p.proxy_addr);
        let mut served = std::collections::BTreeSet::new();
        for i in 0..9 {
            let body = serde_json::to_vec(&completion(&text(i, 300), "", 1)).unwrap();
            let r = request(
                &c,
                "POST",
                &url,
                &[("test-epp-endpoint-selection", &addrs[2])],
                body,
            )
            .await;
            assert_eq!(r.status, 200);
            served.insert(r.header(SERVED).unwrap().to_string());
        }
        if hooks {
            assert_eq!(served, [addrs[2].clone()].into(), "pinned with the hooks");
        } else {
            assert!(served.len() > 1, "ignored without the hooks: {served:?}");
        }
        p.stop().await;
    }
}

#[tokio::test]
async fn model_rewrite_reaches_the_backend_and_the_client_sees_its_own_model() {
    let (up, seen) = capture_upstream(false).await;
    let p = proxy_over(vec![up.to_string()]).await;
    let c = client();
    let url = format!("http://{}/v1/completions", p.proxy_addr);
    for (header, stream) in [
        ("x-llm-d-model-name-rewrite", false),
        ("x-gateway-model-name-rewrite", true),
    ] {
        let body = serde_json::json!({"model": "base", "prompt": "hello", "stream": stream});
        let r = request(
            &c,
            "POST",
            &url,
            &[(header, "lora-7")],
            serde_json::to_vec(&body).unwrap(),
        )
        .await;
        assert_eq!(r.status, 200);
        let got: serde_json::Value = serde_json::from_slice(seen.lock().last().unwrap()).unwrap();
        assert_eq!(got["model"], "lora-7", "the backend gets the target model");
        assert_eq!(got["prompt"], "hello");
        let text = String::from_utf8_lossy(&r.body).to_string();
        assert!(!text.contains("lora-7"), "{text}");
        if stream {
            assert_eq!(text.matches("\"model\":\"base\"").count(), 1, "{text}");
            assert_eq!(text.matches("\"model\": \"base\"").count(), 1, "{text}");
            assert!(text.ends_with("data: [DONE]\n\n"));
        } else {
            assert_eq!(r.json()["model"], "base");
        }
    }
    // No rewrite: the client's bytes reach the backend untouched.
    let raw = br#"{"prompt" : "x",   "model":"base"}"#;
    let r = request(&c, "POST", &url, &[], Bytes::from_static(raw)).await;
    assert_eq!(r.status, 200);
    assert_eq!(seen.lock().last().unwrap().as_ref(), raw);
    // One request-id format in both modes: a UUIDv4 when the client sent none.
    let id = r.header("x-request-id").unwrap();
    assert!(epp_core::gateway::request_id::is_uuid_v4(id), "{id}");
    p.stop().await;
}

#[tokio::test]
async fn only_the_inference_api_is_forwarded_and_local_errors_cost_no_health() {
    let sims = sims(3, |_| {}).await;
    let addrs: Vec<String> = sims.iter().map(|s| s.addr().to_string()).collect();
    let p = proxy_over(addrs).await;
    let c = client();
    // An asterisk-form request target, as `curl -X OPTIONS --request-target '*'` sends.
    for _ in 0..3 {
        let mut s = TcpStream::connect(p.proxy_addr).await.unwrap();
        s.write_all(b"OPTIONS * HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
            .await
            .unwrap();
        let mut out = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut out)).await;
        let out = String::from_utf8_lossy(&out);
        assert!(out.starts_with("HTTP/1.1 404"), "{out}");
        assert!(out.contains("\"code\":\"not_found\""), "{out}");
    }
    assert_eq!(health_states(&p), ["healthy"; 3]);
    let base = format!("http://{}", p.proxy_addr);
    for (method, path, status) in [
        ("GET", "/admin/faults", 404),
        ("POST", "/admin/faults", 404),
        ("GET", "/metrics", 404),
        ("GET", "/version", 404),
        ("POST", "/reset_prefix_cache", 404),
        ("GET", "/v1/chat/completions", 405),
    ] {
        let r = request(&c, method, &format!("{base}{path}"), &[], Bytes::new()).await;
        assert_eq!(r.status, status, "{method} {path}");
        assert_eq!(
            r.json()["error"]["type"],
            if status == 404 {
                "not_found_error"
            } else {
                "invalid_request_error"
            }
        );
        assert!(
            r.header(SERVED).is_none(),
            "{method} {path} reached a backend"
        );
    }
    // The admin handler of the sims was never reached: no fault is configured on any.
    for s in &sims {
        let f = request(
            &c,
            "GET",
            &format!("http://{}/admin/faults", s.addr()),
            &[],
            Bytes::new(),
        )
        .await;
        assert_eq!(f.status, 200);
    }
    // Legitimate traffic is unaffected, and nothing lost health.
    for i in 0..12 {
        let r = post_json(
            &c,
            &format!("{base}/v1/completions"),
            &completion(&text(i, 64), "", 1),
        )
        .await;
        assert_eq!(r.status, 200, "{:?}", String::from_utf8_lossy(&r.body));
    }
    assert_eq!(health_states(&p), ["healthy"; 3]);
    let m = scrape(&c, p.metrics_addr.unwrap()).await;
    assert_eq!(sum(&m, "epp_requests_total", &[("status", "404")]), 8.0);
    assert_eq!(sum(&m, "epp_requests_total", &[("status", "200")]), 12.0);
    p.stop().await;
}

#[tokio::test]
async fn models_are_the_union_over_the_pool() {
    let mut a = sims(1, |c| {
        c.model = "model-a".into();
        c.lora_modules = vec!["lora-x=/x".into()];
    })
    .await;
    let b = sims(1, |c| c.model = "model-b".into()).await;
    a.extend(b);
    let addrs: Vec<String> = a.iter().map(|s| s.addr().to_string()).collect();
    let p = proxy_over(addrs).await;
    let c = client();
    let r = request(
        &c,
        "GET",
        &format!("http://{}/v1/models", p.proxy_addr),
        &[],
        Bytes::new(),
    )
    .await;
    assert_eq!(r.status, 200);
    let j = r.json();
    assert_eq!(j["object"], "list");
    let ids: Vec<&str> = j["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, ["lora-x", "model-a", "model-b"]);
    let r = request(
        &c,
        "GET",
        &format!("http://{}/v1/models/model-b", p.proxy_addr),
        &[],
        Bytes::new(),
    )
    .await;
    assert_eq!(r.status, 200);
    assert_eq!(r.json()["id"], "model-b");
    let r = request(
        &c,
        "GET",
        &format!("http://{}/v1/models/nope", p.proxy_addr),
        &[],
        Bytes::new(),
    )
    .await;
    assert_eq!(r.status, 404);
    p.stop().await;
}

/// Read until the peer closes (or `limit` passes); returns what came and how long it took.
async fn read_until_closed(s: &mut TcpStream, limit: Duration) -> (String, Duration) {
    let t = Instant::now();
    let mut out = Vec::new();
    let _ = tokio::time::timeout(limit, s.read_to_end(&mut out)).await;
    (String::from_utf8_lossy(&out).into_owned(), t.elapsed())
}

#[tokio::test]
async fn slow_clients_are_cut_off_and_the_connection_count_is_bounded() {
    let sims = sims(1, |_| {}).await;
    let mut po = proxy_options(picker_options(vec![sims[0].addr().to_string()]));
    po.header_read_timeout = Duration::from_millis(300);
    po.body_read_timeout = Duration::from_millis(300);
    po.max_connections = 4;
    let p = epp_core::proxy::spawn(po).await.unwrap();
    wait_healthy(&p, 1).await;

    // Headers that never finish: closed after the header-read timeout.
    let mut s = TcpStream::connect(p.proxy_addr).await.unwrap();
    s.write_all(b"POST /v1/completions HTTP/1.1\r\nhost: x\r\n")
        .await
        .unwrap();
    let (_, took) = read_until_closed(&mut s, Duration::from_secs(5)).await;
    assert!(
        took < Duration::from_secs(3),
        "header-read timeout not applied: {took:?}"
    );

    // A body that trickles: 408 with a JSON error once the body-read timeout passes.
    let mut s = TcpStream::connect(p.proxy_addr).await.unwrap();
    s.write_all(b"POST /v1/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ncontent-length: 100\r\n\r\n{\"model\"").await.unwrap();
    let (out, took) = read_until_closed(&mut s, Duration::from_secs(5)).await;
    assert!(out.starts_with("HTTP/1.1 408"), "{out}");
    assert!(out.contains("--body-read-timeout"), "{out}");
    assert!(took < Duration::from_secs(3), "{took:?}");

    // A client that goes away mid-body: counted as 499, not 400.
    let mut s = TcpStream::connect(p.proxy_addr).await.unwrap();
    s.write_all(b"POST /v1/completions HTTP/1.1\r\nhost: x\r\ncontent-length: 100\r\n\r\n{\"mo")
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(50)).await;
    drop(s);

    // Connection cap: 4 idle connections hold every slot; a fifth is closed at once.
    let mut idle = Vec::new();
    for _ in 0..4 {
        idle.push(TcpStream::connect(p.proxy_addr).await.unwrap());
    }
    tokio::time::sleep(Duration::from_millis(50)).await;
    let mut fifth = TcpStream::connect(p.proxy_addr).await.unwrap();
    let _ = fifth
        .write_all(b"GET /v1/models HTTP/1.1\r\nhost: x\r\n\r\n")
        .await;
    let (out, took) = read_until_closed(&mut fifth, Duration::from_secs(2)).await;
    assert!(
        out.is_empty() && took < Duration::from_millis(250),
        "{out:?} {took:?}"
    );
    // The metrics port keeps answering meanwhile.
    let c = client();
    let m = scrape(&c, p.metrics_addr.unwrap()).await;
    assert_eq!(sum(&m, "epp_requests_total", &[("status", "499")]), 1.0);
    assert_eq!(sum(&m, "epp_requests_total", &[("status", "400")]), 0.0);
    assert_eq!(sum(&m, "epp_requests_total", &[("status", "408")]), 1.0);
    // Idle connections are reaped by the header-read timeout; then service resumes.
    tokio::time::sleep(Duration::from_millis(600)).await;
    drop(idle);
    let r = post_json(
        &c,
        &format!("http://{}/v1/completions", p.proxy_addr),
        &completion("a", "b", 1),
    )
    .await;
    assert_eq!(r.status, 200);
    p.stop().await;
}

#[tokio::test]
async fn a_backend_that_breaks_off_mid_body_is_counted_as_what_the_client_got() {
    let (up, _) = capture_upstream(true).await;
    let p = proxy_over(vec![up.to_string()]).await;
    let c = client();
    let req = http::Request::post(format!("http://{}/v1/completions", p.proxy_addr))
        .body(http_body_util::Full::new(Bytes::from(
            serde_json::to_vec(&completion("a", "b", 1)).unwrap(),
        )))
        .unwrap();
    let resp = c.request(req).await.unwrap();
    assert_eq!(resp.status(), 200);
    use http_body_util::BodyExt;
    assert!(
        resp.into_body().collect().await.is_err(),
        "the client sees a truncated body"
    );
    tokio::time::sleep(Duration::from_millis(50)).await;
    let m = scrape(&c, p.metrics_addr.unwrap()).await;
    assert_eq!(sum(&m, "epp_requests_total", &[("status", "502")]), 1.0);
    assert_eq!(sum(&m, "epp_requests_total", &[("status", "200")]), 0.0);
    p.stop().await;
}

#[tokio::test]
async fn readyz_answers_503_through_the_drain_then_the_probe_port_closes() {
    let sims = sims(1, |c| c.latency.prefill_overhead_ms = 800.0).await;
    let p = proxy_over(vec![sims[0].addr().to_string()]).await;
    let c = client();
    let health = p.health_addr.unwrap();
    let readyz = format!("http://{health}/readyz");
    assert_eq!(
        request(&c, "GET", &readyz, &[], Bytes::new()).await.status,
        200
    );
    let url = format!("http://{}/v1/completions", p.proxy_addr);
    let c2 = c.clone();
    let slow = tokio::spawn(async move { post_json(&c2, &url, &completion("a", "b", 2)).await });
    tokio::time::sleep(Duration::from_millis(200)).await;
    p.shutdown();
    tokio::time::sleep(Duration::from_millis(100)).await;
    let r = request(&c, "GET", &readyz, &[], Bytes::new()).await;
    assert_eq!(r.status, 503);
    assert!(String::from_utf8_lossy(&r.body).contains("shutting down"));
    // The in-flight request still completes.
    assert_eq!(slow.await.unwrap().status, 200);
    p.wait().await;
    assert!(
        TcpStream::connect(health).await.is_err(),
        "probe port closed at the end"
    );
}

#[tokio::test]
async fn a_request_without_model_is_routed_when_the_pool_serves_one_model() {
    let mut pool = sims(1, |c| c.model = "model-a".into()).await;
    let c = client();
    let p = proxy_over(vec![pool[0].addr().to_string()]).await;
    let url = format!("http://{}/v1/completions", p.proxy_addr);
    let r = request(
        &c,
        "POST",
        &url,
        &[],
        Bytes::from(r#"{"prompt":"hi","max_tokens":1}"#),
    )
    .await;
    assert_eq!(r.status, 200, "{:?}", String::from_utf8_lossy(&r.body));
    assert_eq!(r.json()["model"], "model-a");
    p.stop().await;

    // Two models: 400 naming the choices.
    pool.extend(sims(1, |c| c.model = "model-b".into()).await);
    let addrs = pool.iter().map(|s| s.addr().to_string()).collect();
    let p = proxy_over(addrs).await;
    let url = format!("http://{}/v1/completions", p.proxy_addr);
    let r = request(&c, "POST", &url, &[], Bytes::from(r#"{"prompt":"hi"}"#)).await;
    assert_eq!(r.status, 400);
    let msg = r.json()["error"]["message"].as_str().unwrap().to_string();
    assert!(msg.contains("model-a, model-b"), "{msg}");
    assert_eq!(r.json()["error"]["param"], "model");
    p.stop().await;
}

#[tokio::test]
async fn request_bodies_share_one_memory_budget() {
    let sims = sims(1, |_| {}).await;
    let mut opts = picker_options(vec![sims[0].addr().to_string()]);
    opts.max_buffered_body_bytes = 20_000;
    let p = epp_core::proxy::spawn(proxy_options(opts)).await.unwrap();
    wait_healthy(&p, 1).await;
    let c = client();
    let url = format!("http://{}/v1/completions", p.proxy_addr);
    // One slow upload holds 15 kB of the 20 kB budget...
    let mut slow = TcpStream::connect(p.proxy_addr).await.unwrap();
    let head = "POST /v1/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ncontent-length: 30000\r\n\r\n";
    slow.write_all(head.as_bytes()).await.unwrap();
    slow.write_all(&[b' '; 15_000]).await.unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    // ...so a 10 kB request is refused with 503 while it lasts (the body limit is 10 MiB).
    let big = serde_json::to_vec(&completion(&"y".repeat(10_000), "", 1)).unwrap();
    let r = request(&c, "POST", &url, &[], big.clone()).await;
    assert_eq!(r.status, 503, "{:?}", String::from_utf8_lossy(&r.body));
    assert!(r.json()["error"]["message"]
        .as_str()
        .unwrap()
        .contains("--max-buffered-body-bytes"));
    let m = scrape(&c, p.metrics_addr.unwrap()).await;
    assert_eq!(sum(&m, "epp_request_body_buffered_bytes", &[]), 15_000.0);
    assert_eq!(
        sum(&m, "epp_request_body_budget_rejections_total", &[]),
        1.0
    );
    // Once the slow client is gone, its share is released and the request goes through.
    drop(slow);
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(request(&c, "POST", &url, &[], big).await.status, 200);
    let m = scrape(&c, p.metrics_addr.unwrap()).await;
    assert_eq!(sum(&m, "epp_request_body_buffered_bytes", &[]), 0.0);
    p.stop().await;
}

#[tokio::test]
async fn reported_and_predicted_cached_tokens_are_counted_per_backend() {
    let sims = sims(1, |_| {}).await;
    let p = proxy_over(vec![sims[0].addr().to_string()]).await;
    let c = client();
    let url = format!("http://{}/v1/completions", p.proxy_addr);
    let shared = text(3, 2048);
    let (mut prompt, mut completion_t, mut cached) = (0u64, 0u64, 0u64);
    for (i, stream) in [(0, false), (1, false), (2, true)] {
        let mut body = completion(&shared, &format!(" q{i}"), 3);
        if stream {
            body["stream"] = true.into();
            body["stream_options"] = serde_json::json!({"include_usage": true});
        }
        let r = post_json(&c, &url, &body).await;
        assert_eq!(r.status, 200);
        let usage = if stream {
            let text = String::from_utf8_lossy(&r.body).to_string();
            let last = text
                .split("\n\n")
                .filter_map(|e| e.strip_prefix("data: "))
                .filter(|d| *d != "[DONE]")
                .map(|d| serde_json::from_str::<serde_json::Value>(d).unwrap())
                .filter(|v| v["usage"].is_object())
                .last()
                .unwrap();
            last["usage"].clone()
        } else {
            r.json()["usage"].clone()
        };
        prompt += usage["prompt_tokens"].as_u64().unwrap();
        completion_t += usage["completion_tokens"].as_u64().unwrap();
        cached += usage["prompt_tokens_details"]["cached_tokens"]
            .as_u64()
            .unwrap_or(0);
    }
    assert!(cached > 0, "the sim reused the shared prefix");
    tokio::time::sleep(Duration::from_millis(50)).await;
    let m = scrape(&c, p.metrics_addr.unwrap()).await;
    let backend = sims[0].addr().to_string();
    let b = [("backend", backend.as_str())];
    assert_eq!(
        sum(&m, "epp_backend_prompt_tokens_total", &b),
        prompt as f64
    );
    assert_eq!(
        sum(&m, "epp_backend_completion_tokens_total", &b),
        completion_t as f64
    );
    assert_eq!(
        sum(&m, "epp_backend_cached_tokens_total", &b),
        cached as f64
    );
    // The picker predicted the shared 2 KiB prefix (512 tokens, whole 16-token blocks) on the
    // second and third request.
    let predicted = sum(&m, "epp_backend_predicted_cached_tokens_total", &b);
    assert_eq!(predicted, 2.0 * 512.0, "{m:?}");
    p.stop().await;
}

#[tokio::test]
async fn requests_the_http_layer_refuses_are_counted() {
    let sims = sims(1, |_| {}).await;
    let p = proxy_over(vec![sims[0].addr().to_string()]).await;
    // A request head over the 64 KiB limit: 431.
    let mut s = TcpStream::connect(p.proxy_addr).await.unwrap();
    let big = format!(
        "POST /v1/completions HTTP/1.1\r\nhost: x\r\nx-big: {}\r\n\r\n",
        "a".repeat(70_000)
    );
    let _ = s.write_all(big.as_bytes()).await;
    let (out, _) = read_until_closed(&mut s, Duration::from_secs(5)).await;
    assert!(out.starts_with("HTTP/1.1 431"), "{out:?}");
    let body = json_error(&out);
    assert_eq!(body["error"]["code"], "request_header_fields_too_large");
    // Too many headers (each small): 431 too.
    let mut s = TcpStream::connect(p.proxy_addr).await.unwrap();
    let many: String = (0..200).map(|i| format!("x-h{i}: v\r\n")).collect();
    let _ = s
        .write_all(format!("POST /v1/completions HTTP/1.1\r\nhost: x\r\n{many}\r\n").as_bytes())
        .await;
    let (out, _) = read_until_closed(&mut s, Duration::from_secs(5)).await;
    assert!(out.starts_with("HTTP/1.1 431"), "{out:?}");
    assert_eq!(
        json_error(&out)["error"]["code"],
        "request_header_fields_too_large"
    );
    // A malformed header line after a request that was answered, on the same connection:
    // the first answer is the backend's, the refusal is the proxy's JSON 400.
    let mut s = TcpStream::connect(p.proxy_addr).await.unwrap();
    let ok = r#"{"model":"sim-model","prompt":"hi","max_tokens":1}"#;
    let two = format!(
        "POST /v1/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{ok}GET / HTTP/1.1\r\nbad header\r\n\r\n",
        ok.len()
    );
    let _ = s.write_all(two.as_bytes()).await;
    let (out, _) = read_until_closed(&mut s, Duration::from_secs(5)).await;
    assert!(out.starts_with("HTTP/1.1 200"), "{out:?}");
    let second = &out[out.find("HTTP/1.1 400").expect("a 400 after the 200")..];
    let body = json_error(second);
    assert_eq!(body["error"]["type"], "invalid_request_error");
    assert_eq!(body["error"]["code"], "invalid_request");
    // A TLS ClientHello on the plain port: 400.
    let mut s = TcpStream::connect(p.proxy_addr).await.unwrap();
    let _ = s
        .write_all(&[
            0x16, 0x03, 0x01, 0x00, 0xa5, 0x01, 0x00, 0x00, 0xa1, 0x03, 0x03,
        ])
        .await;
    let (out, _) = read_until_closed(&mut s, Duration::from_secs(5)).await;
    assert!(out.is_empty() || out.starts_with("HTTP/1.1 400"), "{out:?}");
    tokio::time::sleep(Duration::from_millis(100)).await;
    let c = client();
    let m = scrape(&c, p.metrics_addr.unwrap()).await;
    let other = |status| {
        sum(
            &m,
            "epp_requests_total",
            &[("method", "other"), ("status", status)],
        )
    };
    assert_eq!(other("431"), 2.0, "{m:?}");
    assert_eq!(other("400"), 2.0, "{m:?}");
    p.stop().await;
}

/// The JSON error body of one raw HTTP/1.1 answer, checked against its headers.
fn json_error(answer: &str) -> serde_json::Value {
    let (head, body) = answer.split_once("\r\n\r\n").expect("a head");
    let head = head.to_ascii_lowercase();
    assert!(head.contains("content-type: application/json"), "{head}");
    let len: usize = head
        .lines()
        .find_map(|l| l.strip_prefix("content-length: "))
        .expect("content-length")
        .trim()
        .parse()
        .unwrap();
    serde_json::from_str(&body[..len]).unwrap_or_else(|e| panic!("{e}: {body:?}"))
}

/// The head limit is the same over HTTP/1.1 and HTTP/2: a 60 KiB header goes through on both;
/// over the limit HTTP/1.1 gets a JSON 431 and HTTP/2 a 431 on that stream, and the HTTP/2
/// connection stays usable.
#[tokio::test]
async fn the_head_limit_agrees_over_http1_and_http2() {
    use http_body_util::{BodyExt, Full};
    let sims = sims(1, |_| {}).await;
    let p = proxy_over(vec![sims[0].addr().to_string()]).await;
    let body = r#"{"model":"sim-model","prompt":"hi","max_tokens":1}"#;
    let req = |big: usize| {
        http::Request::post(format!("http://{}/v1/completions", p.proxy_addr))
            .header("content-type", "application/json")
            .header("x-big", "a".repeat(big))
            .body(Full::new(Bytes::from_static(body.as_bytes())))
            .unwrap()
    };
    let h1: hyper_util::client::legacy::Client<_, Full<Bytes>> =
        hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
            .build_http();
    let h2: hyper_util::client::legacy::Client<_, Full<Bytes>> =
        hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
            .http2_only(true)
            .http2_max_header_list_size(1 << 20)
            .build_http();
    for (name, c) in [("HTTP/1.1", &h1), ("HTTP/2", &h2)] {
        let r = c.request(req(60 * 1024)).await.unwrap();
        assert_eq!(r.status(), 200, "{name}: 60 KiB header");
        let _ = r.into_body().collect().await;
    }
    let r = h2.request(req(70 * 1024)).await.unwrap();
    assert_eq!(r.status(), 431, "HTTP/2: 70 KiB header");
    let r = h2.request(req(10)).await.unwrap();
    assert_eq!(r.status(), 200, "HTTP/2 connection still usable");
    let r = h1.request(req(70 * 1024)).await;
    match r {
        Ok(r) => assert_eq!(r.status(), 431, "HTTP/1.1: 70 KiB header"),
        // The proxy closes after the refusal; the client may see the close first.
        Err(e) => assert!(
            e.is_connect() || format!("{e:?}").contains("closed"),
            "{e:?}"
        ),
    }
    p.stop().await;
}

/// `session-affinity-scorer` through the proxy: each response carries the `x-session-token` of
/// the backend that served it, and requests sending it back stay on that backend.
#[tokio::test]
async fn the_session_token_keeps_a_client_on_its_backend() {
    let sims = sims(3, |_| {}).await;
    let addrs: Vec<String> = sims.iter().map(|s| s.addr().to_string()).collect();
    let mut opts = picker_options(addrs.clone());
    opts.config = epp_core::config::EndpointPickerConfig::from_yaml(
        "apiVersion: llm-d.ai/v1alpha1\nkind: EndpointPickerConfig\nplugins:\n- type: active-request-scorer\n- type: session-affinity-scorer\nschedulingProfiles:\n- name: default\n  plugins:\n  - pluginRef: active-request-scorer\n    weight: 1\n  - pluginRef: session-affinity-scorer\n    weight: 5\n",
    )
    .unwrap();
    let p = epp_core::proxy::spawn(proxy_options(opts)).await.unwrap();
    wait_healthy(&p, 3).await;
    let c = client();
    let url = format!("http://{}/v1/completions", p.proxy_addr);
    let body = serde_json::to_vec(&completion("hello", "there", 2)).unwrap();
    let first = request(
        &c,
        "POST",
        &url,
        &[("content-type", "application/json")],
        body.clone(),
    )
    .await;
    assert_eq!(first.status, 200);
    let served = first.header(SERVED).unwrap().to_string();
    let token = first.header("x-session-token").expect("token").to_string();
    use base64::Engine as _;
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(&token)
        .unwrap();
    assert_eq!(String::from_utf8(decoded).unwrap(), served);
    for _ in 0..6 {
        let r = request(
            &c,
            "POST",
            &url,
            &[
                ("content-type", "application/json"),
                ("x-session-token", &token),
            ],
            body.clone(),
        )
        .await;
        assert_eq!(r.status, 200);
        assert_eq!(r.header(SERVED), Some(served.as_str()));
        assert_eq!(r.header("x-session-token"), Some(token.as_str()));
    }
    // Another backend's token moves the client there.
    let other = addrs.iter().find(|a| **a != served).unwrap();
    let other_token = base64::engine::general_purpose::STANDARD.encode(other.as_bytes());
    let r = request(
        &c,
        "POST",
        &url,
        &[
            ("content-type", "application/json"),
            ("x-session-token", &other_token),
        ],
        body,
    )
    .await;
    assert_eq!(r.header(SERVED), Some(other.as_str()));
}

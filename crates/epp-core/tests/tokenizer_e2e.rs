//! The token producer's real backends against real simulators on loopback: the `vllm` backend
//! (the simulator's render endpoints) and the `local` backend (the same `tokenizer.json` the
//! simulator loads) give exactly the ids the simulator's `/tokenize` answers (the ids its engine
//! and its KV events use); `epp proxy` routes with them; and a failing tokenizer falls back
//! without touching any endpoint's health.

mod common;

use std::time::Duration;

use common::*;
use epp_core::config::EndpointPickerConfig;
use epp_core::datastore::{DatastoreWriter, HealthConfig};
use epp_core::director::Director;
use epp_core::request::{parse_body, ApiMethod};
use epp_core::scheduler::{RequestData, Scheduler};
use serde_json::{json, Value};

fn config(token_producer_params: &str) -> EndpointPickerConfig {
    EndpointPickerConfig::from_yaml(&format!(
        "apiVersion: llm-d.ai/v1alpha1\nkind: EndpointPickerConfig\nplugins:\n- type: token-producer\n  parameters: {token_producer_params}\n- type: queue-scorer\n- type: max-score-picker\nschedulingProfiles:\n- name: default\n  plugins:\n  - pluginRef: queue-scorer\n  - pluginRef: max-score-picker\n"
    ))
    .unwrap_or_else(|e| panic!("{e}"))
}

fn director(token_producer_params: &str) -> Director {
    let cfg = config(token_producer_params);
    Director::build(
        &DatastoreWriter::new(HealthConfig::default()),
        Scheduler::from_config(&cfg).unwrap_or_else(|e| panic!("{e}")),
    )
}

/// What the director's tokenization step gives one request body.
async fn picker_ids(d: &Director, method: ApiMethod, body: &Value) -> Option<Vec<u32>> {
    let parsed = parse_body(method, body.to_string().as_bytes()).unwrap();
    let mut data = RequestData::default();
    d.scheduler()
        .prepare(&parsed, &mut data, d.metrics().tokenizer())
        .await;
    d.scheduler().produce(&parsed, &mut data);
    assert!(data.prompt_tokens.is_some());
    data.token_ids.map(|ids| ids.to_vec())
}

/// The simulator's `/tokenize` answer for the same request.
async fn sim_ids(c: &HttpClient, sim: &epp_sim::SimServer, tokenize: &Value) -> Vec<u32> {
    let r = post_json(c, &format!("http://{}/tokenize", sim.addr()), tokenize).await;
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    serde_json::from_value(r.json()["tokens"].clone()).unwrap()
}

/// Requests (method, inference body) and the `/tokenize` body asking the same.
fn cases() -> Vec<(ApiMethod, Value, Value)> {
    let messages = json!([
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": [{"type": "text", "text": "hello world how are you today"}]}
    ]);
    let done = json!([
        {"role": "user", "content": "hello"},
        {"role": "assistant", "content": "how are"}
    ]);
    vec![
        (
            ApiMethod::Completions,
            json!({"model": "sim-model", "prompt": "the quick brown fox jumps over the lazy dog", "max_tokens": 2}),
            json!({"prompt": "the quick brown fox jumps over the lazy dog"}),
        ),
        (
            ApiMethod::Completions,
            json!({"model": "sim-model", "prompt": ["hello world"], "add_special_tokens": false}),
            json!({"prompt": "hello world", "add_special_tokens": false}),
        ),
        (
            ApiMethod::ChatCompletions,
            json!({"model": "sim-model", "messages": messages, "max_tokens": 2}),
            json!({"messages": messages}),
        ),
        (
            ApiMethod::ChatCompletions,
            json!({"model": "sim-model", "messages": messages, "add_generation_prompt": false}),
            json!({"messages": messages, "add_generation_prompt": false}),
        ),
        (
            ApiMethod::ChatCompletions,
            json!({"model": "sim-model", "messages": done, "continue_final_message": true}),
            json!({"messages": done, "continue_final_message": true}),
        ),
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn picker_and_simulator_agree_on_every_token_id() {
    let dir = tempfile::tempdir().unwrap();
    let path = epp_core::tokenization::testing::train_word_level(
        dir.path(),
        &[
            "the quick brown fox jumps over the lazy dog",
            "user assistant system be brief",
            "hello world how are you today",
        ],
    )
    .unwrap();
    let path_for_sim = path.clone();
    let mut hf = sims(1, move |c| c.tokenizer = Some(path_for_sim.clone())).await;
    let mut bytes = sims(1, |_| {}).await;
    let (hf, bytes) = (hf.remove(0), bytes.remove(0));
    let c = client();

    let local = director(&format!(
        "{{local: {{tokenizerPath: '{}'}}}}",
        path.display()
    ));
    let vllm_hf = director(&format!(
        "{{modelName: sim-model, vllm: {{url: 'http://{}'}}}}",
        hf.addr()
    ));
    let vllm_bytes = director(&format!(
        "{{modelName: sim-model, vllm: {{url: 'http://{}/'}}}}",
        bytes.addr()
    ));
    for (method, body, tokenize) in cases() {
        let want = sim_ids(&c, &hf, &tokenize).await;
        assert!(!want.is_empty());
        assert_eq!(
            picker_ids(&local, method, &body).await,
            Some(want.clone()),
            "local: {body}"
        );
        assert_eq!(
            picker_ids(&vllm_hf, method, &body).await,
            Some(want),
            "vllm: {body}"
        );
        let want = sim_ids(&c, &bytes, &tokenize).await;
        assert_eq!(
            picker_ids(&vllm_bytes, method, &body).await,
            Some(want),
            "vllm, byte tokenizer: {body}"
        );
    }
    // Every answer was tokenized by the backend; nothing fell back.
    use epp_core::scheduler::plugins::producers::token::{BackendKind, Outcome};
    let n = cases().len() as u64;
    assert_eq!(
        local
            .metrics()
            .tokenizer()
            .requests(BackendKind::Local, Outcome::Tokenized),
        n
    );
    assert_eq!(
        vllm_hf
            .metrics()
            .tokenizer()
            .requests(BackendKind::Vllm, Outcome::Tokenized),
        n
    );
    for d in [&local, &vllm_hf, &vllm_bytes] {
        assert_eq!(
            d.metrics()
                .tokenizer()
                .requests(BackendKind::Vllm, Outcome::Fallback)
                + d.metrics()
                    .tokenizer()
                    .requests(BackendKind::Local, Outcome::Fallback),
            0
        );
    }
    hf.shutdown().await;
    bytes.shutdown().await;
}

async fn proxy_with(token_producer_params: &str, eps: Vec<String>) -> epp_core::proxy::ProxyHandle {
    let mut picker = picker_options(eps.clone());
    picker.config = config(token_producer_params);
    let p = epp_core::proxy::spawn(proxy_options(picker)).await.unwrap();
    wait_healthy(&p, eps.len()).await;
    p
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn epp_proxy_routes_with_the_simulators_ids_and_falls_back_without_hurting_health() {
    let sims = sims(2, |_| {}).await;
    let eps: Vec<String> = sims.iter().map(|s| s.addr().to_string()).collect();
    let c = client();
    let chat = json!({"model": "sim-model", "max_tokens": 2, "messages": [{"role": "user", "content": "Where is the prefix cache?"}]});

    // The render endpoint is one of the model servers, as with `vllm serve`.
    let p = proxy_with(
        &format!(
            "{{modelName: sim-model, vllm: {{url: 'http://{}'}}}}",
            eps[0]
        ),
        eps.clone(),
    )
    .await;
    let url = format!("http://{}/v1/chat/completions", p.proxy_addr);
    let r = post_json(&c, &url, &chat).await;
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    let prompt_tokens = r.json()["usage"]["prompt_tokens"].as_u64().unwrap();
    let m = scrape(&c, p.metrics_addr.unwrap()).await;
    let outcome = |m: &std::collections::BTreeMap<String, f64>, o: &str| {
        sum(
            m,
            "epp_tokenizer_requests_total",
            &[("backend", "vllm"), ("outcome", o)],
        )
    };
    assert_eq!(outcome(&m, "tokenized"), 1.0);
    assert_eq!(sum(&m, "epp_tokenizer_fallbacks_total", &[]), 0.0);
    assert_eq!(
        sum(
            &m,
            "epp_tokenizer_duration_seconds_count",
            &[("backend", "vllm")]
        ),
        1.0
    );
    // The ids the proxied request got are the ones now cached: the same request through the
    // director's step is a cache hit with exactly the simulator's ids.
    let ids = picker_ids(&p.director, ApiMethod::ChatCompletions, &chat)
        .await
        .unwrap();
    let m = scrape(&c, p.metrics_addr.unwrap()).await;
    assert_eq!(outcome(&m, "cached"), 1.0);
    assert_eq!(outcome(&m, "tokenized"), 1.0);
    let want = sim_ids(&c, &sims[1], &json!({"messages": chat["messages"]})).await;
    assert_eq!(ids, want);
    assert_eq!(ids.len() as u64, prompt_tokens);
    p.stop().await;

    // A render endpoint that refuses (a model it does not serve) on one of the endpoints: every
    // request is still served, each falls back once, and no endpoint's health suffers.
    let p = proxy_with(
        &format!(
            "{{modelName: not-served, vllm: {{url: 'http://{}', timeout: 2s}}}}",
            eps[0]
        ),
        eps.clone(),
    )
    .await;
    let url = format!("http://{}/v1/chat/completions", p.proxy_addr);
    for _ in 0..4 {
        let r = post_json(&c, &url, &chat).await;
        assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    }
    let m = scrape(&c, p.metrics_addr.unwrap()).await;
    assert_eq!(
        sum(
            &m,
            "epp_tokenizer_fallbacks_total",
            &[("backend", "vllm"), ("reason", "status")]
        ),
        4.0
    );
    assert_eq!(outcome(&m, "fallback"), 4.0);
    assert_eq!(sum(&m, "epp_backend_health", &[("state", "healthy")]), 2.0);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(p.director.datastore().snapshot().routable().count(), 2);
    p.stop().await;
    for s in sims {
        s.shutdown().await;
    }
}

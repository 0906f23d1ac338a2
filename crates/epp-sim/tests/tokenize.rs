//! The tokenize and render endpoints over HTTP: vLLM's request and response shapes, the ids the
//! engine itself uses (byte tokenizer and `--tokenizer tokenizer.json`), and OpenAI-shaped 400s
//! naming the field.

mod common;

use epp_core::tokenization::{testing::train_word_level, HfTokenizer};
use epp_sim::tokenizer::{render_chat, render_chat_with, token_ids, ChatMessage};
use epp_sim::SimConfig;
use serde_json::{json, Value};

fn msg(role: &str, content: &str) -> ChatMessage {
    ChatMessage {
        role: role.into(),
        content: content.into(),
    }
}

fn ids(v: &Value) -> Vec<u32> {
    v.as_array()
        .unwrap_or_else(|| panic!("not a list: {v}"))
        .iter()
        .map(|x| u32::try_from(x.as_u64().unwrap()).unwrap())
        .collect()
}

#[tokio::test]
async fn tokenize_answers_vllm_shapes_with_the_engine_ids() {
    let sim = common::start(common::fast_config()).await;
    let prompt = "The quick brown fox";
    let r = common::post(sim.addr(), "/tokenize", &json!({"prompt": prompt})).await;
    assert_eq!(r.status, 200, "{}", r.body);
    let v = r.json();
    assert_eq!(ids(&v["tokens"]), token_ids(prompt));
    assert_eq!(v["count"], 5);
    assert_eq!(v["max_model_len"], 4096);
    assert_eq!(v["token_strs"], Value::Null);

    let r = common::post(
        sim.addr(),
        "/tokenize",
        &json!({"model": "sim-model", "prompt": "abcdef", "return_token_strs": true}),
    )
    .await;
    assert_eq!(r.json()["token_strs"], json!(["abcd", "ef"]));

    // Chat: the template the engine renders, generation cue on by default.
    let messages = json!([{"role": "system", "content": "Be brief."}, {"role": "user", "content": [{"type": "text", "text": "hi"}]}]);
    let conv = [msg("system", "Be brief."), msg("user", "hi")];
    let r = common::post(sim.addr(), "/tokenize", &json!({"messages": messages})).await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(ids(&r.json()["tokens"]), token_ids(&render_chat(&conv)));
    let r = common::post(
        sim.addr(),
        "/tokenize",
        &json!({"messages": messages, "add_generation_prompt": false}),
    )
    .await;
    assert_eq!(
        ids(&r.json()["tokens"]),
        token_ids(&render_chat_with(&conv, false, false))
    );
    let r = common::post(
        sim.addr(),
        "/tokenize",
        &json!({"messages": messages, "continue_final_message": true}),
    )
    .await;
    assert_eq!(
        ids(&r.json()["tokens"]),
        token_ids(&render_chat_with(&conv, true, true))
    );

    // The same chat as an inference request counts the same tokens.
    let r = common::post(
        sim.addr(),
        "/v1/chat/completions",
        &json!({"messages": messages, "max_tokens": 1}),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(
        r.json()["usage"]["prompt_tokens"],
        json!(token_ids(&render_chat(&conv)).len())
    );
    sim.shutdown().await;
}

#[tokio::test]
async fn render_endpoints_answer_generate_requests() {
    let sim = common::start(common::fast_config()).await;
    let r = common::post(
        sim.addr(),
        "/v1/completions/render",
        &json!({"model": "sim-model", "prompt": "hello world", "max_tokens": 7, "temperature": 0.5, "stream": true, "stream_options": {"include_usage": true}, "cache_salt": "s"}),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.body);
    let v = r.json();
    let list = v.as_array().expect("a list of GenerateRequest");
    assert_eq!(list.len(), 1);
    let g = &list[0];
    assert_eq!(ids(&g["token_ids"]), token_ids("hello world"));
    assert_eq!(g["model"], "sim-model");
    assert_eq!(g["sampling_params"]["max_tokens"], 7);
    assert_eq!(g["sampling_params"]["temperature"], 0.5);
    assert_eq!(g["stream"], true);
    assert_eq!(g["stream_options"], json!({"include_usage": true}));
    assert_eq!(g["cache_salt"], "s");
    assert_eq!(g["priority"], 0);
    assert_eq!(g["features"], Value::Null);
    assert!(g["request_id"].as_str().unwrap().starts_with("cmpl-"));

    let r = common::post(
        sim.addr(),
        "/v1/chat/completions/render",
        &json!({"messages": [{"role": "user", "content": "hi"}]}),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.body);
    let g = r.json();
    assert_eq!(
        ids(&g["token_ids"]),
        token_ids(&render_chat(&[msg("user", "hi")]))
    );
    assert_eq!(
        g["sampling_params"]["max_tokens"], 4,
        "--default-max-tokens"
    );
    assert_eq!(g["stream_options"], Value::Null);
    assert!(g["request_id"].as_str().unwrap().starts_with("chatcmpl-"));
    sim.shutdown().await;
}

#[tokio::test]
async fn bad_tokenize_and_render_requests_get_400s_naming_the_field() {
    let sim = common::start(common::fast_config()).await;
    let cases: Vec<(&str, Value, u16, Option<&str>)> = vec![
        ("/tokenize", json!({}), 400, Some("prompt")),
        ("/tokenize", json!({"prompt": 3}), 400, Some("prompt")),
        ("/tokenize", json!({"prompt": ["a"]}), 400, Some("prompt")),
        (
            "/tokenize",
            json!({"prompt": "a", "messages": []}),
            400,
            Some("messages"),
        ),
        ("/tokenize", json!({"messages": []}), 400, Some("messages")),
        (
            "/tokenize",
            json!({"messages": [{"content": "x"}]}),
            400,
            Some("messages"),
        ),
        (
            "/tokenize",
            json!({"messages": [{"role": "user", "content": "x"}], "add_generation_prompt": true, "continue_final_message": true}),
            400,
            Some("continue_final_message"),
        ),
        (
            "/tokenize",
            json!({"prompt": "a", "add_special_tokens": "yes"}),
            400,
            Some("add_special_tokens"),
        ),
        (
            "/tokenize",
            json!({"prompt": "a", "return_token_strs": 1}),
            400,
            Some("return_token_strs"),
        ),
        (
            "/tokenize",
            json!({"prompt": "a", "model": "x"}),
            404,
            Some("model"),
        ),
        (
            "/tokenize",
            json!({"prompt": "a", "model": 1}),
            400,
            Some("model"),
        ),
        ("/v1/completions/render", json!({}), 400, Some("prompt")),
        (
            "/v1/completions/render",
            json!({"prompt": "a", "max_tokens": 0}),
            400,
            Some("max_tokens"),
        ),
        (
            "/v1/completions/render",
            json!({"prompt": "a", "max_tokens": 100000}),
            400,
            Some("max_tokens"),
        ),
        (
            "/v1/completions/render",
            json!({"prompt": "a", "priority": "high"}),
            400,
            Some("priority"),
        ),
        (
            "/v1/chat/completions/render",
            json!({"messages": "hi"}),
            400,
            Some("messages"),
        ),
        (
            "/v1/chat/completions/render",
            json!({"messages": [{"role": "user", "content": "x"}], "model": "nope"}),
            404,
            Some("model"),
        ),
    ];
    for (path, body, status, param) in cases {
        let r = common::post(sim.addr(), path, &body).await;
        assert_eq!(r.status, status, "{path} {body}: {}", r.body);
        let e = &r.json()["error"];
        assert_eq!(e["param"].as_str(), param, "{path} {body}: {}", r.body);
        assert!(e["message"].as_str().is_some_and(|m| !m.is_empty()));
        assert!(e["type"].is_string() && e["code"].is_string(), "{}", r.body);
    }
    for path in [
        "/tokenize",
        "/v1/completions/render",
        "/v1/chat/completions/render",
    ] {
        let r = common::post_raw(sim.addr(), path, b"{not json").await;
        assert_eq!(r.status, 400, "{path}");
        assert_eq!(r.json()["error"]["code"], "invalid_json");
        let r = common::post_raw(sim.addr(), path, b"[1]").await;
        assert_eq!(r.status, 400, "{path}");
    }
    sim.shutdown().await;
}

const SENTENCES: [&str; 3] = [
    "the quick brown fox jumps over the lazy dog",
    "user assistant system be brief",
    "hello world how are you today",
];

#[tokio::test]
async fn a_tokenizer_json_gives_its_ids_everywhere() {
    let dir = tempfile::tempdir().unwrap();
    let path = train_word_level(dir.path(), &SENTENCES).unwrap();
    let hf = HfTokenizer::from_file(&path).unwrap();
    let sim = common::start(SimConfig {
        tokenizer: Some(path.clone()),
        ..common::fast_config()
    })
    .await;
    let prompt = "hello world the lazy dog";
    let want = hf.encode(prompt, true).unwrap();
    assert_eq!(want.len(), 5);
    let r = common::post(
        sim.addr(),
        "/tokenize",
        &json!({"prompt": prompt, "return_token_strs": true}),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(ids(&r.json()["tokens"]), want);
    assert_eq!(
        r.json()["token_strs"],
        json!(["hello", "world", "the", "lazy", "dog"])
    );
    let conv = [msg("system", "be brief"), msg("user", "how are you")];
    let chat_want = hf.encode(&render_chat(&conv), false).unwrap();
    let messages = json!([{"role": "system", "content": "be brief"}, {"role": "user", "content": "how are you"}]);
    let r = common::post(sim.addr(), "/tokenize", &json!({"messages": messages})).await;
    assert_eq!(ids(&r.json()["tokens"]), chat_want);
    let r = common::post(
        sim.addr(),
        "/v1/chat/completions/render",
        &json!({"messages": messages}),
    )
    .await;
    assert_eq!(ids(&r.json()["token_ids"]), chat_want);
    // The engine counts the same tokens.
    let r = common::post(
        sim.addr(),
        "/v1/completions",
        &json!({"prompt": prompt, "max_tokens": 1}),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.json()["usage"]["prompt_tokens"], 5);
    sim.shutdown().await;

    // A missing or broken file is refused at start-up, naming the flag and the file.
    let missing = dir.path().join("missing.json");
    let e = epp_sim::spawn(
        SimConfig {
            tokenizer: Some(missing.clone()),
            ..common::fast_config()
        },
        "127.0.0.1:0".parse().unwrap(),
    )
    .await
    .unwrap_err()
    .to_string();
    assert!(
        e.starts_with(&format!(
            "invalid --tokenizer: cannot read {}",
            missing.display()
        )),
        "{e}"
    );
    let bad = dir.path().join("bad.json");
    std::fs::write(&bad, "{}").unwrap();
    let e = epp_sim::spawn(
        SimConfig {
            tokenizer: Some(bad.clone()),
            ..common::fast_config()
        },
        "127.0.0.1:0".parse().unwrap(),
    )
    .await
    .unwrap_err()
    .to_string();
    assert!(e.contains("is not a Hugging Face tokenizer.json"), "{e}");
}

//! Precise prefix routing behind a real Envoy: `epp serve` with llm-d's split pipeline
//! (`token-producer` rendering on a simulator, `precise-prefix-cache-producer` subscribed to
//! each simulator's KV events, `prefix-cache-scorer` reading it). Prompts sent to the
//! simulators directly, traffic this picker never routed, are learned from the engines' events,
//! and Envoy then delivers follow-ups of each prompt to the simulator that holds it; the
//! simulators' reported cached tokens match what the picker predicted; a cache reset is
//! followed.
//!
//! Each simulator listens on its own loopback address (127.0.0.1..3) and publishes on the same
//! ports there, as pods do.
//!
//! Needs Envoy (EPP_ENVOY_BIN; `scripts/test` installs it).

#[path = "support/envoy.rs"]
mod support;

use std::net::SocketAddr;

use epp_sim::{KvEventsConfig, SimConfig};
use support::*;

/// A port free on 127.0.0.1, .2 and .3.
fn port_free_on_all() -> u16 {
    for _ in 0..50 {
        let p = free_port("127.0.0.1");
        if (2..=3).all(|i| std::net::TcpListener::bind((format!("127.0.0.{i}"), p)).is_ok()) {
            return p;
        }
    }
    panic!("no port free on 127.0.0.1..3");
}

fn config(render: SocketAddr, socket: u16, replay: u16) -> String {
    format!(
        "apiVersion: llm-d.ai/v1alpha1
kind: EndpointPickerConfig
plugins:
- type: token-producer
  parameters: {{modelName: sim-model, vllm: {{url: 'http://{render}'}}}}
- type: precise-prefix-cache-producer
  parameters:
    tokenProcessorConfig: {{blockSizeTokens: 16}}
    kvEventsConfig: {{podDiscoveryConfig: {{socketPort: {socket}, replaySocketPort: {replay}}}}}
- type: prefix-cache-scorer
  parameters: {{prefixMatchInfoProducerName: precise-prefix-cache-producer}}
- type: queue-scorer
- type: max-score-picker
schedulingProfiles:
- name: default
  plugins:
  - {{pluginRef: prefix-cache-scorer, weight: 3}}
  - {{pluginRef: queue-scorer, weight: 1}}
  - {{pluginRef: max-score-picker}}
"
    )
}

/// The sum of `name`'s samples whose labels include every `(key, value)` of `labels`.
fn metric(text: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    epp_core::exposition::parse(text)
        .unwrap()
        .iter()
        .filter(|s| s.name == name && labels.iter().all(|(k, v)| s.label(k) == Some(*v)))
        .map(|s| s.value)
        .sum()
}

async fn metrics_text(picker: &Picker) -> String {
    let r = try_get(picker.metrics, "/metrics")
        .await
        .expect("picker /metrics");
    String::from_utf8(r.body).unwrap()
}

/// Waits (bounded) until `f` holds on the picker's metrics.
async fn until_metrics(picker: &Picker, what: &str, f: impl Fn(&str) -> bool) {
    let deadline = std::time::Instant::now() + WAIT;
    loop {
        let text = metrics_text(picker).await;
        if f(&text) {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "timed out waiting for {what}; metrics:\n{}",
            text.lines()
                .filter(|l| l.contains("precise") || l.contains("kv_cache"))
                .collect::<Vec<_>>()
                .join("\n")
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}

/// 16 blocks of the simulator's tokenizer (4 bytes a token, 16 tokens a block), unique to `tag`.
fn prompt(tag: &str) -> String {
    let unit = format!("{tag} shares this context. ");
    unit.repeat(1024 / unit.len() + 1)[..1024].to_string()
}

async fn complete(addr: SocketAddr, prompt: &str) -> HttpResp {
    let body = serde_json::to_vec(&serde_json::json!({
        "model": "sim-model", "prompt": prompt, "max_tokens": 1
    }))
    .unwrap();
    let r = http(
        addr,
        "POST",
        "/v1/completions",
        &[("content-type", "application/json")],
        &body,
    )
    .await;
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    r
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn envoy_routes_by_the_engines_own_kv_events() {
    let socket = port_free_on_all();
    let replay = port_free_on_all();
    let mut servers = Vec::new();
    for i in 0..3 {
        let ip = format!("127.0.0.{}", i + 1);
        let cfg = SimConfig {
            name: format!("sim-{i}"),
            kv_events: KvEventsConfig {
                endpoint: Some(format!("tcp://{ip}:{socket}")),
                replay_endpoint: Some(format!("tcp://{ip}:{replay}")),
                ..KvEventsConfig::off()
            },
            ..Default::default()
        };
        let addr: SocketAddr = format!("{ip}:0").parse().unwrap();
        servers.push(epp_sim::spawn(cfg, addr).await.unwrap());
    }
    let sims = Sims { servers };
    let cfg = config(sims.addr(0), socket, replay);
    let picker = start_picker_args(&sims, None, &["--config-text", &cfg]).await;
    until_metrics(&picker, "every subscription live", |t| {
        t.contains("epp_precise_prefix_endpoints_in_fallback")
            && metric(t, "epp_precise_prefix_endpoints_in_fallback", &[]) == 0.0
    })
    .await;
    let envoy = start_envoy(&picker, &sims, Variant::FailClosed).await;

    // Traffic the picker never saw: each prompt straight to "its" simulator, against the
    // order load alone would pick.
    let owners = [2usize, 1, 0, 2];
    let prompts: Vec<String> = (0..owners.len())
        .map(|i| prompt(&format!("p{i}")))
        .collect();
    for (p, &owner) in prompts.iter().zip(&owners) {
        complete(sims.addr(owner), p).await;
    }
    // 16 blocks per prompt, 4 prompts: every block reported by the engines.
    until_metrics(&picker, "the engines' BlockStored events", |t| {
        metric(t, "epp_precise_prefix_index_keys", &[]) == 64.0
    })
    .await;

    // Follow-ups through Envoy (the prompt plus a new question) land where the prefix is.
    let before = metrics_text(&picker).await;
    for (p, &owner) in prompts.iter().zip(&owners) {
        let r = complete(envoy.listener, &format!("{p} and then a new question")).await;
        assert_eq!(sims.which(&r), owner, "prompt owned by sim-{owner}");
        let cached = r.json()["usage"]["prompt_tokens_details"]["cached_tokens"]
            .as_u64()
            .expect("cached_tokens reported");
        assert_eq!(cached, 256, "16 blocks of 16 tokens reused");
    }
    // Predicted and observed cached tokens agree, per backend.
    let after = metrics_text(&picker).await;
    for (i, want) in [(0usize, 256.0), (1, 256.0), (2, 512.0)] {
        // Endpoints given as --endpoint are named by their address.
        let name = sims.addr(i).to_string();
        let l = [("backend", name.as_str())];
        let delta = |family: &str| metric(&after, family, &l) - metric(&before, family, &l);
        assert_eq!(
            delta("epp_backend_predicted_cached_tokens_total"),
            want,
            "{name} predicted"
        );
        assert_eq!(
            delta("epp_backend_cached_tokens_total"),
            want,
            "{name} observed"
        );
    }
    assert_eq!(
        metric(&after, "epp_precise_prefix_fallback_total", &[])
            - metric(&before, "epp_precise_prefix_fallback_total", &[]),
        0.0,
        "no score came from the approximate index"
    );

    // sim-2 resets its cache: its AllBlocksCleared empties its share of the index.
    let r = http(sims.addr(2), "POST", "/reset_prefix_cache", &[], b"").await;
    assert_eq!(r.status, 200);
    until_metrics(&picker, "sim-2's share dropped", |t| {
        metric(
            t,
            "epp_precise_prefix_events_total",
            &[("type", "AllBlocksCleared")],
        ) == 1.0
    })
    .await;
    let left = metric(
        &metrics_text(&picker).await,
        "epp_precise_prefix_index_keys",
        &[],
    );
    // What remains: prompts 1 and 2 (sim-1, sim-0), 16 keys each; the follow-ups added no
    // whole block.
    assert_eq!(left, 32.0, "keys left after the reset");
    let r = complete(envoy.listener, &prompts[0]).await;
    assert_eq!(
        r.json()["usage"]["prompt_tokens_details"]["cached_tokens"].as_u64(),
        Some(0),
        "nobody holds prompt 0 any more (served by sim-{})",
        sims.which(&r)
    );
    drop(envoy);
}

//! llm-d-router's own sample configs (copied under `crates/epp/tests/fixtures/llm-d-router/`) load and route as
//! they say: `decode-filter` keeps decode-capable endpoints, the approximate prefix producer
//! makes repeated prompts stick, `load-aware-scorer` avoids queues, and session affinity holds.

use std::collections::BTreeSet;

use epp_core::config::EndpointPickerConfig;
use epp_core::datastore::{DatastoreWriter, EndpointSpec, HealthConfig, ModelServerMetrics};
use epp_core::director::{Director, RouteRequest, Routed};
use epp_core::gateway::InboundHeaders;
use epp_core::prefix::{BlockPlan, ServerBound};
use epp_core::request::ApiMethod;
use epp_core::scheduler::{DecisionType, Scheduler};

fn load_text(text: &str) -> EndpointPickerConfig {
    EndpointPickerConfig::from_yaml(text).unwrap_or_else(|e| panic!("{e}"))
}

fn fixture(name: &str) -> EndpointPickerConfig {
    // One copy of llm-d-router's configs, shared with the CLI's drop-in test.
    let path = format!(
        "{}/../epp/tests/fixtures/llm-d-router/{name}",
        env!("CARGO_MANIFEST_DIR")
    );
    load_text(&std::fs::read_to_string(&path).unwrap())
}

/// `(name, role label, waiting queue)` per endpoint, at `10.0.0.{i+1}:8000`.
const POOL: [(&str, Option<&str>, f64); 5] = [
    ("decode-0", Some("decode"), 0.0),
    ("prefill-0", Some("prefill"), 0.0),
    ("both-0", Some("both"), 0.0),
    ("plain-0", None, 0.0),
    ("encode-0", Some("encode"), 0.0),
];

fn pool(cfg: &EndpointPickerConfig, waiting: [f64; 5]) -> (DatastoreWriter, Director) {
    let w = DatastoreWriter::new(HealthConfig::default());
    w.set_endpoints(
        POOL.iter()
            .enumerate()
            .map(|(i, (name, role, _))| EndpointSpec {
                name: name.to_string(),
                labels: role
                    .map(|r| [("llm-d.ai/role".to_string(), r.to_string())].into())
                    .unwrap_or_default(),
                namespace: Some("llm".into()),
                ..EndpointSpec::new(format!("10.0.0.{}:8000", i + 1))
            })
            .collect(),
    );
    for (i, q) in waiting.iter().enumerate() {
        w.record_scrape(
            &format!("10.0.0.{}:8000", i + 1),
            Ok(ModelServerMetrics {
                waiting_queue: *q,
                ..Default::default()
            }),
        );
    }
    let d = Director::build(&w, Scheduler::from_config(cfg).unwrap());
    (w, d)
}

fn route(d: &Director, prompt: &str, headers: &InboundHeaders) -> Routed {
    let body = serde_json::to_vec(&serde_json::json!({"model": "m", "prompt": prompt})).unwrap();
    futures_executor::block_on(d.route(RouteRequest {
        method: Some(ApiMethod::Completions),
        body: &body,
        subset: None,
        headers,
    }))
    .unwrap()
}

fn names(r: &Routed) -> Vec<String> {
    r.targets.iter().map(|e| e.name().to_string()).collect()
}

/// A prompt of `blocks` full 64-token (256-byte) blocks, distinct per `seed`.
fn long_prompt(seed: usize, blocks: usize) -> String {
    let unit = format!("seed {seed} lorem ipsum dolor sit amet ");
    unit.repeat(blocks * 256 / unit.len() + 1)[..blocks * 256].to_string()
}

#[test]
fn decode_filter_keeps_decode_both_and_unlabelled_endpoints() {
    for f in [
        "epp-config.yaml",
        "epp-estimate-prefix-cache-config.yaml",
        "sim-epp-config.yaml",
    ] {
        let cfg = fixture(f);
        let (_w, d) = pool(&cfg, [0.0; 5]);
        let mut primaries = BTreeSet::new();
        for i in 0..200 {
            let r = route(&d, &format!("short prompt {i}"), &InboundHeaders::default());
            for n in names(&r) {
                assert!(
                    ["decode-0", "both-0", "plain-0"].contains(&n.as_str()),
                    "{f}: routed to {n}"
                );
            }
            primaries.insert(names(&r)[0].clone());
            r.tracker.finish(200);
        }
        assert_eq!(
            primaries.into_iter().collect::<Vec<_>>(),
            vec!["both-0", "decode-0", "plain-0"],
            "{f}: ties spread over every decode-capable endpoint"
        );
    }
}

#[test]
fn the_implicit_and_explicit_approximate_producers_make_prompts_stick() {
    // epp-config.yaml: a bare prefix-cache-scorer gets llm-d's default producer.
    let plan = Scheduler::from_config(&fixture("epp-config.yaml"))
        .unwrap()
        .prefix_plan();
    assert_eq!(plan.index.block_size, 256, "64-token blocks");
    assert_eq!(plan.index.max_blocks, 2048);
    assert_eq!(plan.index.capacity_per_endpoint, 31_250);
    assert_eq!(plan.bound, ServerBound::Replace);
    assert!(matches!(plan.blocks, BlockPlan::Tokens(_)));
    // sim-epp-config.yaml: maxPrefixTokensToMatch 16384 / 64 = 256 blocks.
    let plan = Scheduler::from_config(&fixture("sim-epp-config.yaml"))
        .unwrap()
        .prefix_plan();
    assert_eq!(plan.index.max_blocks, 256);
    assert_eq!(plan.index.capacity_per_endpoint, 31_250);

    for f in ["epp-config.yaml", "sim-epp-config.yaml"] {
        let (_w, d) = pool(&fixture(f), [0.0; 5]);
        for seed in 0..10 {
            let p = long_prompt(seed, 4);
            let first = route(&d, &p, &InboundHeaders::default());
            assert_eq!(first.decision, DecisionType::LoadBalance, "{f}");
            let home = names(&first)[0].clone();
            first.tracker.finish(200);
            for _ in 0..3 {
                let again = route(
                    &d,
                    &format!("{p} and a different ending"),
                    &InboundHeaders::default(),
                );
                assert_eq!(names(&again)[0], home, "{f}: seed {seed}");
                assert_eq!(again.decision, DecisionType::CacheHit, "{f}");
                again.tracker.finish(200);
            }
        }
        // Shorter than one 64-token block: nothing to match.
        let short = route(&d, &"x".repeat(255), &InboundHeaders::default());
        assert_eq!(short.decision, DecisionType::LoadBalance);
        short.tracker.finish(200);
    }
}

#[test]
fn load_aware_scorer_orders_by_waiting_queue() {
    // decode-0: 0.5·(1 − 100/128), both-0: 0.5, plain-0: 0.5·(1 − 50/128); prefill-0 and
    // encode-0 are idle but filtered out.
    let cfg = fixture("epp-estimate-prefix-cache-config.yaml");
    let (_w, d) = pool(&cfg, [100.0, 0.0, 0.0, 50.0, 0.0]);
    for i in 0..20 {
        let r = route(&d, &format!("prompt {i}"), &InboundHeaders::default());
        assert_eq!(names(&r), vec!["both-0", "plain-0", "decode-0"]);
        r.tracker.finish(200);
    }
}

const SESSION: &str = "apiVersion: llm-d.ai/v1alpha1
kind: EndpointPickerConfig
plugins:
- type: decode-filter
- type: session-affinity-scorer
- type: active-request-scorer
- type: max-score-picker
schedulingProfiles:
- name: default
  plugins:
  - pluginRef: decode-filter
  - pluginRef: session-affinity-scorer
    weight: 2
  - pluginRef: active-request-scorer
    weight: 1
  - pluginRef: max-score-picker
";

#[test]
fn session_affinity_sticks_through_the_response_token() {
    let (_w, d) = pool(&load_text(SESSION), [0.0; 5]);
    assert_eq!(d.scheduler().request_headers(), ["x-session-token"]);
    let first = route(&d, "hello", &InboundHeaders::default());
    let home = names(&first)[0].clone();
    let token = first.tracker.response_headers();
    assert_eq!(token.len(), 1);
    assert_eq!(token[0].0, "x-session-token");
    let mut held = vec![first];
    let with_token = InboundHeaders {
        plugin_headers: token.clone(),
        ..Default::default()
    };
    for _ in 0..5 {
        // The home endpoint is the busiest (active-request scores it 0), yet the session holds.
        let r = route(&d, "hello again", &with_token);
        assert_eq!(names(&r)[0], home);
        assert_eq!(r.tracker.response_headers(), token);
        held.push(r);
    }
    // Without the token the load decides: never the busy home endpoint.
    let r = route(&d, "hello", &InboundHeaders::default());
    assert_ne!(names(&r)[0], home);
    // The token is base64 of namespace/pod.
    assert_eq!(
        epp_core::scheduler::plugins::scorers::session_affinity::base64_decode(&token[0].1)
            .unwrap(),
        format!("llm/{home}").into_bytes()
    );
}

#[test]
fn unsupported_llm_d_plugins_are_refused_by_name() {
    let cfg = load_text(
        "apiVersion: llm-d.ai/v1alpha1\nkind: EndpointPickerConfig\nplugins:\n- type: precise-prefix-cache-producer\n- type: prefix-cache-scorer\n  parameters:\n    prefixMatchInfoProducerName: precise-prefix-cache-producer\nschedulingProfiles:\n- name: default\n  plugins:\n  - pluginRef: prefix-cache-scorer\n",
    );
    // The precise producer loads, and the scorer naming it reads the precise index.
    let s = Scheduler::from_config(&cfg).unwrap();
    assert_eq!(
        s.precise().map(|(n, _)| n),
        Some("precise-prefix-cache-producer")
    );
    assert_eq!(
        s.prefix_primary(),
        epp_core::scheduler::PrefixSource::Precise
    );
    // One precise index per config.
    let cfg = load_text(
        "apiVersion: llm-d.ai/v1alpha1\nkind: EndpointPickerConfig\nplugins:\n- type: precise-prefix-cache-producer\n- type: precise-prefix-cache-producer\n  name: second\nschedulingProfiles:\n- name: default\n  plugins: []\n",
    );
    let e = Scheduler::from_config(&cfg).err().unwrap();
    assert_eq!(e.field, "plugins[1].type");
    // The legacy all-in-one scorer brings its own producer, or reads the configured one.
    let cfg = load_text(
        "apiVersion: llm-d.ai/v1alpha1\nkind: EndpointPickerConfig\nplugins:\n- type: precise-prefix-cache-scorer\n  parameters:\n    tokenProcessorConfig: {blockSize: 64}\nschedulingProfiles:\n- name: default\n  plugins:\n  - pluginRef: precise-prefix-cache-scorer\n",
    );
    let s = Scheduler::from_config(&cfg).unwrap();
    let (name, settings) = s.precise().unwrap();
    assert_eq!(
        (name, settings.tp.block_size()),
        ("precise-prefix-cache-scorer", 64)
    );
    let cfg = load_text(
        "apiVersion: llm-d.ai/v1alpha1\nkind: EndpointPickerConfig\nplugins:\n- type: precise-prefix-cache-producer\n  name: p\n- type: precise-prefix-cache-scorer\n  parameters:\n    tokenProcessorConfig: {blockSize: 64}\nschedulingProfiles:\n- name: default\n  plugins:\n  - pluginRef: precise-prefix-cache-scorer\n",
    );
    let s = Scheduler::from_config(&cfg).unwrap();
    let (name, settings) = s.precise().unwrap();
    assert_eq!((name, settings.tp.block_size()), ("p", 16));
    assert_eq!(
        s.prefix_primary(),
        epp_core::scheduler::PrefixSource::Precise
    );
    let cfg = load_text(
        "apiVersion: llm-d.ai/v1alpha1\nkind: EndpointPickerConfig\nplugins:\n- type: precise-prefix-cache-scorer\n  parameters:\n    indexerConfig: {tokenizersPoolConfig: {modelName: m}}\n",
    );
    let e = Scheduler::from_config(&cfg).err().unwrap();
    assert_eq!(
        e.field,
        "plugins[0].parameters.indexerConfig.tokenizersPoolConfig"
    );
    // A scorer naming a producer that is not configured.
    let cfg = load_text(
        "apiVersion: llm-d.ai/v1alpha1\nkind: EndpointPickerConfig\nplugins:\n- type: prefix-cache-scorer\n  parameters:\n    prefixMatchInfoProducerName: gpu\nschedulingProfiles:\n- name: default\n  plugins:\n  - pluginRef: prefix-cache-scorer\n",
    );
    let e = Scheduler::from_config(&cfg).err().unwrap();
    assert_eq!(e.field, "plugins[0].parameters.prefixMatchInfoProducerName");
    assert_eq!(
        e.message,
        "no plugin named \"gpu\" in `plugins` (expected an approx-prefix-cache-producer or a precise-prefix-cache-producer)"
    );
    // Scorer-side index parameters next to an explicit producer.
    let cfg = load_text(
        "apiVersion: llm-d.ai/v1alpha1\nkind: EndpointPickerConfig\nplugins:\n- type: approx-prefix-cache-producer\n- type: prefix-cache-scorer\n  parameters:\n    blockSizeTokens: 16\nschedulingProfiles:\n- name: default\n  plugins:\n  - pluginRef: approx-prefix-cache-producer\n  - pluginRef: prefix-cache-scorer\n",
    );
    let e = Scheduler::from_config(&cfg).err().unwrap();
    assert_eq!(e.field, "plugins[1].parameters");
    // Two producers with different indexes.
    let cfg = load_text(
        "apiVersion: llm-d.ai/v1alpha1\nkind: EndpointPickerConfig\nplugins:\n- type: approx-prefix-cache-producer\n  name: a\n- type: approx-prefix-cache-producer\n  name: b\n  parameters:\n    blockSizeTokens: 128\nschedulingProfiles:\n- name: default\n  plugins: []\n",
    );
    let e = Scheduler::from_config(&cfg).err().unwrap();
    assert_eq!(e.field, "plugins[1].parameters");
}

#[test]
fn the_charts_payload_agnostic_config_keeps_sessions() {
    // active-request-scorer + session-affinity-scorer, weight 1 each, body not parsed.
    let (_w, d) = pool(&fixture("chart-payload-agnostic.yaml"), [0.0; 5]);
    let first = route(&d, "anything", &InboundHeaders::default());
    let token = first.tracker.response_headers();
    let home = names(&first)[0].clone();
    first.tracker.finish(200);
    let with_token = InboundHeaders {
        plugin_headers: token,
        ..Default::default()
    };
    for i in 0..20 {
        let r = route(&d, &format!("other body {i}"), &with_token);
        assert_eq!(names(&r)[0], home);
        r.tracker.finish(200);
    }
}

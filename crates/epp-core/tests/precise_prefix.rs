//! The precise prefix index against real simulators on loopback: subscriptions follow the
//! datastore's endpoints (added, removed), the simulators' KV events fill the index (including
//! traffic sent straight to a simulator, past the picker), a cache reset and a restarted
//! publisher empty an endpoint's share, an endpoint without a publisher is scored by the
//! approximate index (counted), and speculative entries land a burst together and expire.
//!
//! With `kvEventsConfig.zmqEndpoint`, the same against the central socket the simulators connect
//! to: topics mapped to endpoints, routing to the holder, a restart, a gap, and what is refused.
//!
//! The prompt's token ids are computed here with the simulator's rule (4 bytes of text per token,
//! big-endian), as a tokenizer serving the same model would return them.

use std::sync::Arc;
use std::time::Duration;

use epp_core::config::EndpointPickerConfig;
use epp_core::datastore::{DatastoreWriter, EndpointSpec, HealthConfig, ModelServerMetrics};
use epp_core::director::Director;
use epp_core::precise::{follow, FallbackReason, PrecisePrefix, SlotState};
use epp_core::request::ParsedRequest;
use epp_core::scheduler::{Hints, PrefixMatches, RequestData, SchedCtx, Scheduler, SourceMatch};
use epp_core::telemetry::Shutdown;
use epp_sim::tokenizer::{render_chat, token_ids, ChatMessage};
use epp_sim::{KvEventsConfig, LatencyModel, SimConfig, SimServer};

const MODEL: &str = "sim-model";
const WAIT: Duration = Duration::from_secs(15);

/// A base port with `n` consecutive free ports (for publishers at `base + rank`); every call in
/// this process gets a different range.
fn free_ports(n: u16) -> u16 {
    use std::sync::atomic::{AtomicU16, Ordering};
    static NEXT: AtomicU16 = AtomicU16::new(0);
    let seed = (std::process::id() % 20_000) as u16;
    for _ in 0..200 {
        let k = NEXT.fetch_add(n + 1, Ordering::Relaxed);
        let base = 20_000 + (seed.wrapping_add(k)) % 40_000;
        let ok = (0..n).all(|i| std::net::TcpListener::bind(("127.0.0.1", base + i)).is_ok());
        if ok {
            return base;
        }
    }
    panic!("no {n} consecutive free ports");
}

fn sim_config(i: u16, pub_port: u16, replay_port: u16) -> SimConfig {
    SimConfig {
        name: format!("sim-{i}"),
        model: MODEL.into(),
        block_size: 16,
        num_gpu_blocks: 200,
        max_model_len: 8192,
        default_max_tokens: 1,
        latency: LatencyModel::zero(),
        shutdown_grace: Duration::from_secs(2),
        kv_events: KvEventsConfig {
            endpoint: Some(format!("tcp://127.0.0.1:{pub_port}")),
            replay_endpoint: Some(format!("tcp://127.0.0.1:{replay_port}")),
            ..KvEventsConfig::off()
        },
        ..SimConfig::default()
    }
}

async fn start_sim(i: u16, pub_port: u16, replay_port: u16) -> SimServer {
    epp_sim::spawn(
        sim_config(i, pub_port, replay_port),
        "127.0.0.1:0".parse().unwrap(),
    )
    .await
    .expect("simulator starts")
}

fn precise_config(socket: u16, replay: u16, extra: &str) -> EndpointPickerConfig {
    EndpointPickerConfig::from_yaml(&format!(
        r#"apiVersion: llm-d.ai/v1alpha1
kind: EndpointPickerConfig
plugins:
- type: precise-prefix-cache-producer
  parameters:
    tokenProcessorConfig: {{blockSizeTokens: 16}}
    indexerConfig: {{kvBlockIndexConfig: {{enableMetrics: true}}}}
    kvEventsConfig: {{podDiscoveryConfig: {{socketPort: {socket}, replaySocketPort: {replay}}}}}
{extra}
- type: prefix-cache-scorer
  parameters:
    prefixMatchInfoProducerName: precise-prefix-cache-producer
- type: queue-scorer
- type: max-score-picker
schedulingProfiles:
- name: default
  plugins:
  - pluginRef: prefix-cache-scorer
    weight: 2
  - pluginRef: queue-scorer
  - pluginRef: max-score-picker
"#
    ))
    .unwrap()
}

fn endpoints(sims: &[&SimServer]) -> Vec<EndpointSpec> {
    sims.iter()
        .enumerate()
        .map(|(rank, s)| EndpointSpec {
            name: s.name().to_string(),
            rank: rank as u16,
            ..EndpointSpec::new(s.addr().to_string())
        })
        .collect()
}

fn prompt(c: char, blocks: usize) -> String {
    // `user\n` + content + `\nassistant\n` rendered; content sized for whole 64-byte blocks.
    let content: String = std::iter::repeat_n(c, blocks * 64 - 16).collect();
    render_chat(&[ChatMessage {
        role: "user".into(),
        content,
    }])
}

fn content_of(p: &str) -> String {
    p.strip_prefix("user\n")
        .and_then(|r| r.strip_suffix("\nassistant\n"))
        .unwrap()
        .to_string()
}

async fn chat_direct(sim: &SimServer, prompt: &str) {
    let body = serde_json::json!({
        "model": MODEL,
        "messages": [{"role": "user", "content": content_of(prompt)}],
        "max_tokens": 1,
    });
    let uri = format!("http://{}/v1/chat/completions", sim.addr());
    let status = post(&uri, body.to_string()).await;
    assert_eq!(status, 200);
}

async fn post(uri: &str, body: String) -> u16 {
    use http_body_util::{BodyExt, Full};
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build_http::<Full<bytes::Bytes>>();
    let req = http::Request::post(uri)
        .header("content-type", "application/json")
        .body(Full::new(bytes::Bytes::from(body)))
        .unwrap();
    let res = tokio::time::timeout(WAIT, client.request(req))
        .await
        .expect("answered in time")
        .expect("request sent");
    let status = res.status().as_u16();
    let _ = res.into_body().collect().await;
    status
}

/// Polls `f` until it holds (bounded).
async fn until(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + WAIT;
    while !f() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting: {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn slot_of(w: &DatastoreWriter, name: &str) -> usize {
    w.snapshot()
        .endpoints
        .iter()
        .find(|e| e.endpoint.name() == name)
        .unwrap()
        .slot()
}

/// The precise match of `prompt` per slot (approximate share for endpoints in fallback).
fn precise_match(p: &PrecisePrefix, d: &Director, prompt: &str) -> SourceMatch {
    let keys = p.request_keys(MODEL, &token_ids(prompt), None);
    let snap = d.datastore().snapshot();
    let approx = d
        .prefix_index()
        .lookup(&d.prefix_index().hash(MODEL, prompt.as_bytes()));
    SourceMatch {
        blocks: p.lookup(&snap, keys, &approx).matched,
        block_tokens: p.block_tokens(),
    }
}

/// What the scheduler picks for `prompt` with the precise match in force.
fn pick(d: &Director, p: &PrecisePrefix, prompt: &str) -> String {
    let snap = d.datastore().snapshot();
    let approx = d
        .prefix_index()
        .lookup(&d.prefix_index().hash(MODEL, prompt.as_bytes()));
    let mut m = PrefixMatches::approximate(approx, 64);
    m.primary = d.scheduler().prefix_primary();
    m.precise = Some(precise_match(p, d, prompt));
    let req = ParsedRequest {
        model: MODEL.into(),
        target_model: MODEL.into(),
        prompt: prompt.as_bytes().to_vec(),
        ..Default::default()
    };
    let data = RequestData::default();
    let ctx = SchedCtx {
        snapshot: &snap,
        request: &req,
        prefix: &m,
        data: &data,
    };
    let s = d.scheduler().schedule(&ctx, &Hints::default()).unwrap();
    snap.endpoints[s.ranked[0]].endpoint.name().to_string()
}

fn healthy(w: &DatastoreWriter, sims: &[&SimServer]) {
    for s in sims {
        w.record_scrape(&s.addr().to_string(), Ok(ModelServerMetrics::default()));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_index_follows_the_simulators_events_and_their_endpoints() {
    let (pb, rb) = (free_ports(3), free_ports(3));
    let s0 = start_sim(0, pb, rb).await;
    let s1 = start_sim(1, pb + 1, rb + 1).await;
    let s2 = start_sim(2, pb + 2, rb + 2).await;
    let w = DatastoreWriter::new(HealthConfig::default());
    w.set_endpoints(endpoints(&[&s0, &s1, &s2]));
    healthy(&w, &[&s0, &s1, &s2]);
    let d = Director::build(
        &w,
        Scheduler::from_config(&precise_config(pb, rb, "")).unwrap(),
    );
    let p = d.precise().expect("a precise producer").clone();
    let shutdown = Shutdown::new();
    let task = follow::spawn(p.clone(), w.reader(), shutdown.clone());
    let slots: Vec<usize> = ["sim-0", "sim-1", "sim-2"]
        .iter()
        .map(|n| slot_of(&w, n))
        .collect();
    until("every subscription connected", || {
        slots
            .iter()
            .all(|s| p.liveness.state(*s) == SlotState::Live)
    })
    .await;

    // Traffic straight to sim-1, past the picker: the approximate index cannot know.
    let hot = prompt('h', 6);
    assert_eq!(token_ids(&hot).len(), 6 * 16);
    chat_direct(&s1, &hot).await;
    until("sim-1's blocks indexed", || {
        precise_match(&p, &d, &hot).blocks.matched(slots[1]) == 6
    })
    .await;
    let m = precise_match(&p, &d, &hot);
    assert_eq!(
        (m.blocks.matched(slots[0]), m.blocks.matched(slots[2])),
        (0, 0)
    );
    let approx = d
        .prefix_index()
        .lookup(&d.prefix_index().hash(MODEL, hot.as_bytes()));
    assert!(
        slots.iter().all(|s| approx.matched(*s) == 0),
        "the approximate index knows nothing"
    );
    assert_eq!(pick(&d, &p, &hot), "sim-1");
    // A longer prompt sharing that prefix also goes there.
    let longer = format!("{}{}", &hot[..hot.len() - 11], "x".repeat(200));
    assert_eq!(pick(&d, &p, &longer), "sim-1");

    // sim-1 resets its prefix cache: AllBlocksCleared empties its share.
    assert_eq!(
        post(
            &format!("http://{}/reset_prefix_cache", s1.addr()),
            String::new()
        )
        .await,
        200
    );
    until("sim-1's share cleared", || p.index.is_empty()).await;
    assert_eq!(precise_match(&p, &d, &hot).blocks.matched(slots[1]), 0);

    // sim-2 caches something, then leaves the pool: its subscription and share go.
    chat_direct(&s2, &prompt('z', 3)).await;
    until("sim-2's blocks indexed", || {
        precise_match(&p, &d, &prompt('z', 3))
            .blocks
            .matched(slots[2])
            == 3
    })
    .await;
    w.set_endpoints(endpoints(&[&s0, &s1]));
    until("sim-2 unsubscribed", || {
        p.metrics.active_subscribers.get() == 2
    })
    .await;
    until("sim-2's share dropped", || p.index.is_empty()).await;

    // It comes back: subscribed again, and its new traffic is seen.
    w.set_endpoints(endpoints(&[&s0, &s1, &s2]));
    healthy(&w, &[&s2]);
    let slot2 = slot_of(&w, "sim-2");
    until("sim-2 subscribed again", || {
        p.metrics.active_subscribers.get() == 3 && p.liveness.state(slot2) == SlotState::Live
    })
    .await;
    chat_direct(&s2, &prompt('y', 2)).await;
    until("sim-2's new blocks indexed", || {
        precise_match(&p, &d, &prompt('y', 2)).blocks.matched(slot2) == 2
    })
    .await;
    // Joining its stream mid-way, the subscription asked the replay socket for everything
    // from 0: what sim-2 still caches from before is back in the index.
    assert_eq!(
        precise_match(&p, &d, &prompt('z', 3)).blocks.matched(slot2),
        3
    );
    assert_eq!(p.liveness.state(slot2), SlotState::Live);

    // llm-d's families, under their exact names.
    let text = d.metrics().encode();
    for needle in [
        "llm_d_epp_kv_cache_events_active_subscribers 3",
        "llm_d_epp_kv_cache_events_messages_received_total{pod_identifier=\"sim-1\"}",
        "llm_d_epp_kv_cache_index_admissions_total ",
        "kvcache_index_admissions_total ",
        "llm_d_epp_kv_cache_index_lookup_requests_total ",
        "llm_d_epp_kv_cache_index_lookup_latency_seconds_bucket",
        "llm_d_epp_kv_cache_events_pool_capacity 4",
        "epp_precise_prefix_events_total{type=\"BlockStored\"}",
        "epp_precise_prefix_events_total{type=\"AllBlocksCleared\"} 1",
        "epp_precise_prefix_index_keys 5",
        "epp_precise_prefix_endpoints_in_fallback{reason=\"not_connected\"} 0",
    ] {
        assert!(text.contains(needle), "missing {needle:?} in\n{text}");
    }
    shutdown.trigger();
    let _ = tokio::time::timeout(WAIT, task).await;
    for s in [s0, s1, s2] {
        s.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_publisher_empties_its_share_and_is_followed_afresh() {
    let (pb, rb) = (free_ports(1), free_ports(1));
    let s0 = start_sim(0, pb, rb).await;
    let w = DatastoreWriter::new(HealthConfig::default());
    w.set_endpoints(endpoints(&[&s0]));
    let d = Director::build(
        &w,
        Scheduler::from_config(&precise_config(pb, rb, "")).unwrap(),
    );
    let p = d.precise().unwrap().clone();
    let shutdown = Shutdown::new();
    let task = follow::spawn(p.clone(), w.reader(), shutdown.clone());
    let slot = slot_of(&w, "sim-0");
    until("connected", || p.liveness.state(slot) == SlotState::Live).await;
    for c in ['a', 'b', 'c'] {
        chat_direct(&s0, &prompt(c, 2)).await;
    }
    until("three prompts indexed", || p.index.len() == 6).await;
    // The publisher restarts (same ports, a new process): its sequence starts again from 0.
    let addr = s0.addr();
    s0.shutdown().await;
    until("disconnected", || p.liveness.state(slot) != SlotState::Live).await;
    // The old sockets close asynchronously: retry the bind for a while.
    let mut restarted = None;
    for _ in 0..100 {
        match epp_sim::spawn(sim_config(0, pb, rb), addr).await {
            Ok(s) => {
                restarted = Some(s);
                break;
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
    let s0 = restarted.expect("the simulator restarts on its ports");
    until("reconnected", || p.liveness.state(slot) == SlotState::Live).await;
    // The new process numbers from 0 again; its first messages may go out before the
    // subscription is re-made (then the next one shows the restart).
    let fresh = prompt('n', 2);
    for attempt in 0u8..3 {
        chat_direct(&s0, &prompt(char::from(b'k' + attempt), 1)).await;
        chat_direct(&s0, &fresh).await;
        let seen = until("old share dropped, new one indexed", || {
            precise_match(&p, &d, &fresh).blocks.matched(slot) == 2
                && precise_match(&p, &d, &prompt('a', 2)).blocks.matched(slot) == 0
        });
        if tokio::time::timeout(Duration::from_secs(2), seen)
            .await
            .is_ok()
        {
            break;
        }
    }
    assert_eq!(precise_match(&p, &d, &fresh).blocks.matched(slot), 2);
    assert_eq!(
        precise_match(&p, &d, &prompt('a', 2)).blocks.matched(slot),
        0
    );
    assert!(d
        .metrics()
        .encode()
        .contains("epp_precise_prefix_event_errors_total{reason=\"restart\"} 1"));
    shutdown.trigger();
    let _ = tokio::time::timeout(WAIT, task).await;
    s0.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_endpoint_without_events_is_scored_approximately_and_counted() {
    let (pb, rb) = (free_ports(2), free_ports(2));
    // Only rank 0 publishes; rank 1's publisher port has nobody behind it.
    let s0 = start_sim(0, pb, rb).await;
    let mut quiet_cfg = sim_config(1, pb + 1, rb + 1);
    quiet_cfg.kv_events = KvEventsConfig::off();
    let s1 = epp_sim::spawn(quiet_cfg, "127.0.0.1:0".parse().unwrap())
        .await
        .unwrap();
    let w = DatastoreWriter::new(HealthConfig::default());
    w.set_endpoints(endpoints(&[&s0, &s1]));
    healthy(&w, &[&s0, &s1]);
    let d = Director::build(
        &w,
        Scheduler::from_config(&precise_config(pb, rb, "")).unwrap(),
    );
    let p = d.precise().unwrap().clone();
    let shutdown = Shutdown::new();
    let task = follow::spawn(p.clone(), w.reader(), shutdown.clone());
    let (a, b) = (slot_of(&w, "sim-0"), slot_of(&w, "sim-1"));
    until("sim-0 connected", || p.liveness.state(a) == SlotState::Live).await;
    assert_eq!(
        p.liveness.state(b),
        SlotState::Fallback(FallbackReason::NotConnected)
    );
    // The approximate index learned that sim-1 holds this prompt (a pick it made).
    let text = prompt('q', 4);
    d.prefix_index()
        .insert(b, &d.prefix_index().hash(MODEL, text.as_bytes()));
    let m = precise_match(&p, &d, &text);
    // The approximate index holds the whole prompt (one 256-byte block of its own): sim-1 gets
    // that share of the prompt's 4 precise blocks.
    assert_eq!((m.blocks.matched(a), m.blocks.matched(b)), (0, 4));
    assert_eq!(pick(&d, &p, &text), "sim-1");
    let exposition = d.metrics().encode();
    for needle in [
        "epp_precise_prefix_fallback_total{reason=\"not_connected\"}",
        "epp_precise_prefix_endpoints_in_fallback{reason=\"not_connected\"} 1",
    ] {
        assert!(
            exposition.contains(needle),
            "missing {needle:?} in\n{exposition}"
        );
    }
    shutdown.trigger();
    let _ = tokio::time::timeout(WAIT, task).await;
    s0.shutdown().await;
    s1.shutdown().await;
}

#[tokio::test(start_paused = true)]
async fn speculative_entries_land_a_burst_together_and_expire_unconfirmed() {
    let w = DatastoreWriter::new(HealthConfig::default());
    w.set_endpoints(vec![
        EndpointSpec::new("127.0.0.1:1"),
        EndpointSpec::new("127.0.0.1:2"),
    ]);
    healthy_addrs(&w, &["127.0.0.1:1", "127.0.0.1:2"]);
    let cfg = precise_config(
        1,
        2,
        "    speculativeIndexing: true\n    speculativeTTL: 2s\n    fallback: {eventTimeout: 1h}",
    );
    let d = Director::build(&w, Scheduler::from_config(&cfg).unwrap());
    let p: Arc<PrecisePrefix> = d.precise().unwrap().clone();
    // The follower runs over an empty pool here: only its tick matters (TTL expiry).
    let shutdown = Shutdown::new();
    let empty = DatastoreWriter::new(HealthConfig::default());
    let task = follow::spawn(p.clone(), empty.reader(), shutdown.clone());
    let slots: Vec<usize> = w.snapshot().endpoints.iter().map(|e| e.slot()).collect();
    for s in &slots {
        p.liveness
            .set(*s, SlotState::Live, "test: events assumed flowing");
    }
    let text = prompt('s', 5);
    // The first of a burst is picked somewhere; the rest follow it before any event arrives.
    let first = pick(&d, &p, &text);
    let first_slot = slot_of(&w, &first);
    let keys = p.request_keys(MODEL, &token_ids(&text), None);
    let snap = d.datastore().snapshot();
    let m = p.lookup(&snap, keys, &Default::default());
    p.after_pick(first_slot, &m, tokio::time::Instant::now());
    for _ in 0..5 {
        assert_eq!(pick(&d, &p, &text), first);
    }
    assert_eq!(precise_match(&p, &d, &text).blocks.matched(first_slot), 5);
    // Unconfirmed, the entries expire with the TTL (the follower's tick drops them).
    tokio::time::sleep(Duration::from_millis(1900)).await;
    assert_eq!(precise_match(&p, &d, &text).blocks.matched(first_slot), 5);
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert_eq!(precise_match(&p, &d, &text).blocks.matched(first_slot), 0);
    assert!(p.index.is_empty());
    shutdown.trigger();
    let _ = task.await;
}

fn healthy_addrs(w: &DatastoreWriter, addrs: &[&str]) {
    for a in addrs {
        w.record_scrape(a, Ok(ModelServerMetrics::default()));
    }
}

// ---------------------------------------------------------------------------------------------
// The central socket (kvEventsConfig.zmqEndpoint): the picker binds, the simulators connect.

fn central_sim_config(i: u16, central: u16) -> SimConfig {
    SimConfig {
        kv_events: KvEventsConfig {
            connect: Some(format!("tcp://127.0.0.1:{central}")),
            ..KvEventsConfig::off()
        },
        ..sim_config(i, 0, 0)
    }
}

async fn start_central_sim(i: u16, central: u16) -> SimServer {
    epp_sim::spawn(
        central_sim_config(i, central),
        "127.0.0.1:0".parse().unwrap(),
    )
    .await
    .expect("simulator starts")
}

fn central_config(central: u16, extra: &str) -> EndpointPickerConfig {
    EndpointPickerConfig::from_yaml(&format!(
        r#"apiVersion: llm-d.ai/v1alpha1
kind: EndpointPickerConfig
plugins:
- type: precise-prefix-cache-producer
  parameters:
    tokenProcessorConfig: {{blockSizeTokens: 16}}
    kvEventsConfig: {{zmqEndpoint: "tcp://127.0.0.1:{central}", discoverPods: false}}
{extra}
- type: prefix-cache-scorer
  parameters:
    prefixMatchInfoProducerName: precise-prefix-cache-producer
- type: queue-scorer
- type: max-score-picker
schedulingProfiles:
- name: default
  plugins:
  - pluginRef: prefix-cache-scorer
    weight: 2
  - pluginRef: queue-scorer
  - pluginRef: max-score-picker
"#
    ))
    .unwrap()
}

/// The value of one exposition line (`name{labels} value`), 0 when absent.
fn sample(d: &Director, series: &str) -> f64 {
    let text = d.metrics().encode();
    text.lines()
        .find_map(|l| l.strip_prefix(series).and_then(|r| r.strip_prefix(' ')))
        .map_or(0.0, |v| v.trim().parse().unwrap())
}

/// Blocks of `prompt` the precise index itself holds for `slot` (whatever the slot's state).
fn raw(p: &PrecisePrefix, prompt: &str, slot: usize) -> u32 {
    p.index
        .lookup(&p.request_keys(MODEL, &token_ids(prompt), None))
        .0
        .matched(slot)
}

/// Runs a director with a central socket over `sims`; the follower is started with
/// [`follow::start`], which binds before it returns.
async fn central_director(
    central: u16,
    sims: &[&SimServer],
    extra: &str,
) -> (
    DatastoreWriter,
    Director,
    Arc<PrecisePrefix>,
    Shutdown,
    tokio::task::JoinHandle<()>,
) {
    let w = DatastoreWriter::new(HealthConfig::default());
    w.set_endpoints(
        sims.iter()
            .map(|s| EndpointSpec {
                name: s.name().to_string(),
                ..EndpointSpec::new(s.addr().to_string())
            })
            .collect(),
    );
    healthy(&w, sims);
    let d = Director::build(
        &w,
        Scheduler::from_config(&central_config(central, extra)).unwrap(),
    );
    let p = d.precise().expect("a precise producer").clone();
    let shutdown = Shutdown::new();
    let task = follow::start(p.clone(), w.reader(), shutdown.clone())
        .await
        .expect("the central socket binds");
    (w, d, p, shutdown, task)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn simulators_connected_to_the_central_socket_are_told_apart_by_topic_and_routed_to() {
    let central = free_ports(1);
    // The simulators connect to the picker's socket (retrying until it is bound), as vLLM with
    // a host endpoint does.
    let s0 = start_central_sim(0, central).await;
    let s1 = start_central_sim(1, central).await;
    let s2 = start_central_sim(2, central).await;
    assert_eq!(
        s1.kv_events().unwrap().topic,
        format!("kv@{}@{MODEL}", s1.addr())
    );
    let (w, d, p, shutdown, task) = central_director(central, &[&s0, &s1, &s2], "").await;
    let slots: Vec<usize> = ["sim-0", "sim-1", "sim-2"]
        .iter()
        .map(|n| slot_of(&w, n))
        .collect();
    // Before its first message, each endpoint waits (scored approximately, not_connected).
    until("every endpoint waiting for its first message", || {
        slots
            .iter()
            .all(|s| p.liveness.state(*s) == SlotState::Fallback(FallbackReason::NotConnected))
    })
    .await;
    assert_eq!(p.metrics.active_subscribers.get(), 1);

    // Traffic straight to sim-1 and sim-2, past the picker.
    let hot = prompt('h', 6);
    let other = prompt('o', 3);
    chat_direct(&s1, &hot).await;
    chat_direct(&s2, &other).await;
    until("sim-1's and sim-2's blocks indexed", || {
        precise_match(&p, &d, &hot).blocks.matched(slots[1]) == 6
            && precise_match(&p, &d, &other).blocks.matched(slots[2]) == 3
    })
    .await;
    let m = precise_match(&p, &d, &hot);
    assert_eq!(
        (m.blocks.matched(slots[0]), m.blocks.matched(slots[2])),
        (0, 0)
    );
    assert_eq!(p.liveness.state(slots[1]), SlotState::Live);
    assert_eq!(p.liveness.state(slots[2]), SlotState::Live);
    // Ten picks of each prompt: every one to the server holding it.
    let mut to = std::collections::BTreeMap::<String, usize>::new();
    for _ in 0..10 {
        *to.entry(pick(&d, &p, &hot)).or_default() += 1;
        *to.entry(pick(&d, &p, &other)).or_default() += 1;
    }
    assert_eq!(
        to,
        std::collections::BTreeMap::from([("sim-1".to_string(), 10), ("sim-2".to_string(), 10)])
    );
    assert_eq!(p.metrics.central_topics.get(), 2);
    assert_eq!(
        sample(
            &d,
            "llm_d_epp_kv_cache_events_messages_received_total{pod_identifier=\"local-subscriber\"}"
        ),
        2.0
    );

    // sim-2 leaves the pool: its topic and its share go.
    w.set_endpoints(endpoints(&[&s0, &s1]));
    until("sim-2's share dropped", || {
        p.metrics.central_topics.get() == 1
            && precise_match(&p, &d, &other).blocks.matched(slots[2]) == 0
    })
    .await;
    // Its next message is no one's: refused and counted, not applied.
    chat_direct(&s2, &prompt('r', 2)).await;
    until("sim-2's message refused", || {
        sample(
            &d,
            "epp_precise_prefix_central_refused_total{reason=\"unknown_pod\"}",
        ) == 1.0
    })
    .await;
    assert_eq!(
        precise_match(&p, &d, &prompt('r', 2))
            .blocks
            .matched(slots[2]),
        0
    );
    assert_eq!(p.index.len(), 6);

    shutdown.trigger();
    let _ = tokio::time::timeout(WAIT, task).await;
    for s in [s0, s1, s2] {
        s.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_on_the_central_socket_drops_the_share_and_a_gap_rebuilds() {
    let central = free_ports(1);
    let s0 = start_central_sim(0, central).await;
    let s1 = start_central_sim(1, central).await;
    let (w, d, p, shutdown, task) =
        central_director(central, &[&s0, &s1], "    fallback: {rebuildWindow: 1h}").await;
    let (a, b) = (slot_of(&w, "sim-0"), slot_of(&w, "sim-1"));
    for c in ['a', 'b', 'c'] {
        chat_direct(&s0, &prompt(c, 2)).await;
    }
    chat_direct(&s1, &prompt('s', 2)).await;
    until("both servers' prompts indexed", || p.index.len() == 8).await;
    assert_eq!(p.liveness.state(a), SlotState::Live);

    // sim-0 restarts on the same address (a new process: its sequence starts again from 0).
    let addr = s0.addr();
    s0.shutdown().await;
    let mut restarted = None;
    for _ in 0..100 {
        match epp_sim::spawn(central_sim_config(0, central), addr).await {
            Ok(s) => {
                restarted = Some(s);
                break;
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
    let s0 = restarted.expect("the simulator restarts on its address");
    let fresh = prompt('n', 2);
    chat_direct(&s0, &fresh).await;
    until("old share dropped, new one indexed", || {
        precise_match(&p, &d, &fresh).blocks.matched(a) == 2
            && precise_match(&p, &d, &prompt('a', 2)).blocks.matched(a) == 0
    })
    .await;
    assert_eq!(
        sample(
            &d,
            "epp_precise_prefix_event_errors_total{reason=\"restart\"}"
        ),
        1.0
    );
    // Followed from its start: live again; sim-1's share untouched.
    assert_eq!(p.liveness.state(a), SlotState::Live);
    assert_eq!(precise_match(&p, &d, &prompt('s', 2)).blocks.matched(b), 2);
    assert_eq!(p.liveness.state(b), SlotState::Live);

    // sim-1 loses two messages on the way: a gap, no replay: rebuilding, scored approximately.
    s1.kv_events().unwrap().drop_next_live(2);
    chat_direct(&s1, &prompt('t', 1)).await;
    chat_direct(&s1, &prompt('u', 1)).await;
    chat_direct(&s1, &prompt('v', 1)).await;
    until("sim-1's third prompt indexed", || {
        raw(&p, &prompt('v', 1), b) == 1
    })
    .await;
    assert_eq!(
        p.liveness.state(b),
        SlotState::Fallback(FallbackReason::Rebuilding)
    );
    assert_eq!(
        sample(&d, "epp_precise_prefix_event_errors_total{reason=\"gap\"}"),
        1.0
    );
    assert_eq!(raw(&p, &prompt('t', 1), b), 0);
    // A gap is not a restart: what sim-1 held before is still indexed.
    assert_eq!(raw(&p, &prompt('s', 2), b), 2);
    assert_eq!(
        sample(
            &d,
            "epp_precise_prefix_event_errors_total{reason=\"restart\"}"
        ),
        1.0
    );
    // Scored approximately meanwhile (the approximate index knows nothing of it).
    assert_eq!(precise_match(&p, &d, &prompt('v', 1)).blocks.matched(b), 0);
    assert_eq!(p.liveness.state(a), SlotState::Live);

    shutdown.trigger();
    let _ = tokio::time::timeout(WAIT, task).await;
    s0.shutdown().await;
    s1.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_pods_bad_topics_and_malformed_messages_on_the_central_socket_are_counted() {
    use epp_core::kvevents::{encode_batch, EventBatch, EventForm, KvEvent};
    use zeromq::{Socket, SocketSend, ZmqMessage};
    let central = free_ports(1);
    let s0 = start_central_sim(0, central).await;
    let (w, d, p, shutdown, task) = central_director(central, &[&s0], "").await;
    let a = slot_of(&w, "sim-0");
    chat_direct(&s0, &prompt('k', 2)).await;
    until("sim-0's prompt indexed", || p.index.len() == 2).await;

    // A publisher nobody discovered, connected to the same socket.
    let mut rogue = zeromq::PubSocket::new();
    rogue
        .connect(&format!("tcp://127.0.0.1:{central}"))
        .await
        .unwrap();
    let clear = encode_batch(
        &EventBatch {
            ts: 0.0,
            events: vec![KvEvent::AllBlocksCleared],
            data_parallel_rank: None,
        },
        EventForm::Array,
    );
    let send = |frames: Vec<Vec<u8>>| {
        ZmqMessage::try_from(
            frames
                .into_iter()
                .map(bytes::Bytes::from)
                .collect::<Vec<_>>(),
        )
        .unwrap()
    };
    let unknown = "epp_precise_prefix_central_refused_total{reason=\"unknown_pod\"}";
    // Until the socket's subscription reaches the new publisher, what it sends is dropped: send
    // one message at a time until the first is counted.
    let deadline = tokio::time::Instant::now() + WAIT;
    let mut seq = 0u64;
    while sample(&d, unknown) == 0.0 {
        assert!(tokio::time::Instant::now() < deadline, "nothing refused");
        rogue
            .send(send(vec![
                format!("kv@10.9.9.9:8000@{MODEL}").into_bytes(),
                seq.to_be_bytes().to_vec(),
                clear.clone(),
            ]))
            .await
            .unwrap();
        seq += 1;
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let first = sample(&d, unknown);
    let decode = "epp_precise_prefix_event_errors_total{reason=\"decode\"}";
    let topic = "epp_precise_prefix_central_refused_total{reason=\"topic\"}";
    // One each: an unknown pod (by address and by bare host), a topic without a model,
    // two frames instead of three, an undecodable payload for a known pod.
    for frames in [
        vec![
            format!("kv@10.9.9.9@{MODEL}").into_bytes(),
            0u64.to_be_bytes().to_vec(),
            clear.clone(),
        ],
        vec![
            b"kv@nomodel".to_vec(),
            0u64.to_be_bytes().to_vec(),
            clear.clone(),
        ],
        vec![b"kv@x@y".to_vec(), 0u64.to_be_bytes().to_vec()],
    ] {
        rogue.send(send(frames)).await.unwrap();
    }
    until("each counted", || {
        sample(&d, unknown) == first + 1.0 && sample(&d, topic) == 1.0 && sample(&d, decode) == 1.0
    })
    .await;
    // None of it touched sim-0's share.
    assert_eq!(p.index.len(), 2);
    assert_eq!(p.liveness.state(a), SlotState::Live);
    // A known pod's topic with a payload that is not a batch: counted, its share rebuilding.
    rogue
        .send(send(vec![
            format!("kv@{}@{MODEL}", s0.addr()).into_bytes(),
            1000u64.to_be_bytes().to_vec(),
            b"\xc1".to_vec(),
        ]))
        .await
        .unwrap();
    until("the undecodable payload counted", || {
        sample(&d, decode) == 2.0
    })
    .await;
    assert_eq!(
        p.liveness.state(a),
        SlotState::Fallback(FallbackReason::Rebuilding)
    );
    assert_eq!(p.metrics.central_topics.get(), 1);

    shutdown.trigger();
    let _ = tokio::time::timeout(WAIT, task).await;
    s0.shutdown().await;
}

#[tokio::test]
async fn a_central_socket_that_cannot_be_bound_is_refused_naming_field_and_address() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port();
    let w = DatastoreWriter::new(HealthConfig::default());
    let d = Director::build(
        &w,
        Scheduler::from_config(&central_config(port, "")).unwrap(),
    );
    let p = d.precise().unwrap().clone();
    let e = follow::start(p, w.reader(), Shutdown::new())
        .await
        .expect_err("the port is taken");
    assert!(
        e.starts_with(&format!(
            "plugins[0].parameters.kvEventsConfig.zmqEndpoint: cannot bind tcp://127.0.0.1:{port}: "
        )),
        "{e}"
    );
}

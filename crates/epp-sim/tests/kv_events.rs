//! KV events end to end on loopback: a simulator publishing, the epp-core subscriber following,
//! chat requests over HTTP. Asserts the exact events (hashes chained as the simulator's tokenizer
//! chains them, token ids of its tokenizer), eviction, reset, a lost message filled by replay,
//! and a publisher restart reported as such, in both event encodings.

mod common;

use std::time::Duration;

use epp_core::kvevents::subscriber::{self, SubscriberConfig, Update};
use epp_core::kvevents::{BlockRemoved, BlockStored, EventForm, KvEvent};
use epp_core::telemetry::Shutdown;
use epp_sim::tokenizer::{
    block_hashes, block_hashes_of_ids, chain_seed, render_chat, token_ids, ChatMessage,
};
use epp_sim::{KvEventsConfig, SimConfig, SimServer};
use serde_json::json;
use tokio::sync::mpsc;

const MODEL: &str = "kv-model";
const BLOCK: usize = 4;
const WAIT: Duration = Duration::from_secs(10);

fn config(form: EventForm, endpoint: &str, replay: &str) -> SimConfig {
    SimConfig {
        name: "sim-kv".into(),
        model: MODEL.into(),
        block_size: BLOCK,
        // Each request below holds 4 blocks (3 prompt + 1 output); 8 fit.
        num_gpu_blocks: 8,
        default_max_tokens: 1,
        kv_events: KvEventsConfig {
            endpoint: Some(endpoint.into()),
            replay_endpoint: Some(replay.into()),
            format: form,
            ..KvEventsConfig::off()
        },
        ..common::fast_config()
    }
}

/// A chat whose rendered prompt is exactly 3 blocks (48 bytes): `user\n` + 32 bytes + `\nassistant\n`.
fn content(c: char) -> String {
    c.to_string().repeat(32)
}

async fn chat(sim: &SimServer, c: char) {
    let r = common::post(
        sim.addr(),
        "/v1/chat/completions",
        &json!({"model": MODEL, "messages": [{"role": "user", "content": content(c)}], "max_tokens": 1}),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.body);
}

/// The chain of the prompt `c` renders to, and its tokens.
fn blocks_of(c: char) -> (Vec<u64>, Vec<u32>) {
    let prompt = render_chat(&[ChatMessage {
        role: "user".into(),
        content: content(c),
    }]);
    assert_eq!(prompt.len(), 3 * BLOCK * 4);
    (
        block_hashes(chain_seed(MODEL), &prompt, BLOCK),
        token_ids(&prompt),
    )
}

fn stored(c: char) -> KvEvent {
    let (hashes, tokens) = blocks_of(c);
    assert_eq!(hashes.len(), 3);
    assert_eq!(tokens.len(), 12);
    KvEvent::BlockStored(BlockStored {
        medium: Some("GPU".into()),
        ..BlockStored::new(hashes, None, tokens, BLOCK as u32)
    })
}

/// The next update that is not about the connection.
async fn next(rx: &mut mpsc::Receiver<Update>) -> Update {
    loop {
        let u = tokio::time::timeout(WAIT, rx.recv())
            .await
            .expect("no KV-event update in time")
            .expect("subscriber ended");
        if !matches!(u, Update::Connected | Update::Disconnected { .. }) {
            return u;
        }
    }
}

/// The next batch: `(seq, replayed, events)`.
async fn batch(rx: &mut mpsc::Receiver<Update>) -> (u64, bool, Vec<KvEvent>) {
    match next(rx).await {
        Update::Batch { msg, replayed } => {
            assert_eq!(msg.topic, "kv@sim-kv@kv-model");
            assert_eq!(msg.batch.data_parallel_rank, Some(0));
            (msg.seq, replayed, msg.batch.events)
        }
        other => panic!("expected a batch, got {other:?}"),
    }
}

async fn connected(rx: &mut mpsc::Receiver<Update>) {
    let u = tokio::time::timeout(WAIT, rx.recv())
        .await
        .expect("no connection in time");
    assert_eq!(u, Some(Update::Connected));
}

async fn end_to_end(form: EventForm) {
    let sim = common::start(config(form, "tcp://127.0.0.1:0", "tcp://127.0.0.1:0")).await;
    let kv = sim.kv_events().expect("publishing").clone();
    assert_eq!(kv.topic, "kv@sim-kv@kv-model");
    let shutdown = Shutdown::new();
    let mut cfg = SubscriberConfig::new(kv.endpoint.clone());
    cfg.replay_endpoint = kv.replay_endpoint.clone();
    cfg.topic_filter = "kv@".into();
    let (mut rx, task) = subscriber::spawn(cfg, shutdown.clone());
    connected(&mut rx).await;

    // The PUB socket drops what it sends before the subscription reaches it: reset the (empty)
    // cache until an `AllBlocksCleared` is heard live. Missed ones come back by replay, from 0.
    let mut resets = 0u64;
    loop {
        let r = common::post(sim.addr(), "/reset_prefix_cache", &json!({})).await;
        assert_eq!(r.status, 200, "{}", r.body);
        resets += 1;
        match tokio::time::timeout(Duration::from_secs(1), next(&mut rx)).await {
            Ok(u) => {
                let mut u = u;
                for s in 0..resets {
                    if let Update::Gap {
                        from,
                        to,
                        recovered,
                        error,
                    } = &u
                    {
                        assert_eq!(
                            (*from, *to, *recovered, error.clone()),
                            (0, resets - 2, resets - 1, None)
                        );
                        u = next(&mut rx).await;
                    }
                    let Update::Batch { msg, .. } = &u else {
                        panic!("expected a batch, got {u:?}");
                    };
                    assert_eq!(
                        (msg.seq, &msg.batch.events[..]),
                        (s, &[KvEvent::AllBlocksCleared][..])
                    );
                    if s + 1 < resets {
                        u = next(&mut rx).await;
                    }
                }
                break;
            }
            Err(_) if resets < 5 => continue,
            Err(_) => panic!("the subscription never reached the publisher"),
        }
    }
    let base = resets;

    // A first prompt: its three blocks are stored, chained from no parent.
    chat(&sim, 'a').await;
    assert_eq!(batch(&mut rx).await, (base, false, vec![stored('a')]));

    // The same prompt again: all cached, nothing new. A second prompt: three more blocks.
    chat(&sim, 'a').await;
    chat(&sim, 'b').await;
    assert_eq!(batch(&mut rx).await, (base + 1, false, vec![stored('b')]));

    // A third prompt needs 4 blocks with 2 free: the least recently used blocks go, the tail of
    // the first prompt's chain first.
    chat(&sim, 'c').await;
    let (ha, _) = blocks_of('a');
    assert_eq!(
        batch(&mut rx).await,
        (
            base + 2,
            false,
            vec![
                KvEvent::BlockRemoved(BlockRemoved {
                    block_hashes: vec![ha[2], ha[1]],
                    medium: Some("GPU".into()),
                    group_idx: None,
                }),
                stored('c'),
            ]
        )
    );

    // vLLM's prefix-cache reset: everything cached goes.
    let r = common::post(sim.addr(), "/reset_prefix_cache", &json!({})).await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(
        batch(&mut rx).await,
        (base + 3, false, vec![KvEvent::AllBlocksCleared])
    );

    // A message lost on the way: the next one reveals the gap, the replay socket fills it.
    kv.drop_next_live(1);
    chat(&sim, 'd').await;
    chat(&sim, 'e').await;
    assert_eq!(batch(&mut rx).await, (base + 4, true, vec![stored('d')]));
    assert_eq!(
        next(&mut rx).await,
        Update::Gap {
            from: base + 4,
            to: base + 4,
            recovered: 1,
            error: None
        }
    );
    assert_eq!(batch(&mut rx).await, (base + 5, false, vec![stored('e')]));

    // The publisher restarts on the same endpoints: sequences start again from 0.
    let (endpoint, replay) = (kv.endpoint.clone(), kv.replay_endpoint.clone().unwrap());
    sim.shutdown().await;
    let sim = restart(form, &endpoint, &replay).await;
    // The subscriber's socket notices and reconnects by itself.
    loop {
        let u = tokio::time::timeout(WAIT, rx.recv())
            .await
            .expect("no reconnection in time");
        match u {
            Some(Update::Disconnected { .. }) => continue,
            Some(Update::Connected) => break,
            other => panic!("expected a reconnection, got {other:?}"),
        }
    }
    // The publisher drops what it sends before the re-subscription reaches it, so chat until the
    // subscriber hears something (once, on an idle loopback).
    let mut sent = 0u64;
    let first = loop {
        chat(&sim, ['f', 'g', 'h', 'i', 'j'][sent as usize]).await;
        sent += 1;
        match tokio::time::timeout(Duration::from_secs(2), next(&mut rx)).await {
            Ok(u) => break u,
            Err(_) if sent < 5 => continue,
            Err(_) => panic!("nothing heard from the restarted publisher"),
        }
    };
    let Update::Restarted { previous, seq } = first else {
        panic!("expected a restart, got {first:?}");
    };
    assert_eq!(previous, base + 5);
    // Whatever was missed after the restart comes back from the new process's replay buffer,
    // starting with its sequence 0.
    let (seq0, _, events) = batch(&mut rx).await;
    assert_eq!((seq0, events), (0, vec![stored('f')]));
    if seq > 0 {
        for s in 1..seq {
            assert_eq!(batch(&mut rx).await.0, s);
        }
        assert!(
            matches!(next(&mut rx).await, Update::Gap { from: 0, recovered, error: None, .. } if recovered == seq)
        );
        assert_eq!(batch(&mut rx).await.0, seq);
    }

    shutdown.trigger();
    tokio::time::timeout(WAIT, task)
        .await
        .expect("subscriber stops on shutdown")
        .unwrap();
    sim.shutdown().await;
}

/// Starts a simulator on the given KV-event endpoints, retrying briefly while the previous
/// process's sockets are released.
async fn restart(form: EventForm, endpoint: &str, replay: &str) -> SimServer {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        match epp_sim::spawn(
            config(form, endpoint, replay),
            "127.0.0.1:0".parse().unwrap(),
        )
        .await
        {
            Ok(s) => return s,
            Err(e) if tokio::time::Instant::now() < deadline => {
                let _ = e;
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(e) => panic!("cannot restart the simulator: {e:#}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn array_events_end_to_end() {
    end_to_end(EventForm::Array).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn map_events_end_to_end() {
    end_to_end(EventForm::Map).await;
}

#[tokio::test]
async fn reset_works_without_kv_events() {
    let sim = common::start(common::fast_config()).await;
    let r = common::post(sim.addr(), "/reset_prefix_cache", &json!({})).await;
    assert_eq!(r.status, 200);
    assert!(sim.kv_events().is_none());
    sim.shutdown().await;
}

/// With `--tokenizer`, the blocks the engine stores carry the `tokenizer.json`'s ids (those
/// `/tokenize` answers) and are hashed over them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kv_events_carry_the_ids_tokenize_answers() {
    let dir = tempfile::tempdir().unwrap();
    let path = epp_core::tokenization::testing::train_word_level(
        dir.path(),
        &["user assistant hello world how are you today"],
    )
    .unwrap();
    let sim = common::start(SimConfig {
        tokenizer: Some(path),
        ..config(EventForm::Array, "tcp://127.0.0.1:0", "tcp://127.0.0.1:0")
    })
    .await;
    let kv = sim.kv_events().expect("publishing").clone();
    let shutdown = Shutdown::new();
    let mut cfg = SubscriberConfig::new(kv.endpoint.clone());
    cfg.replay_endpoint = kv.replay_endpoint.clone();
    let (mut rx, task) = subscriber::spawn(cfg, shutdown.clone());
    connected(&mut rx).await;
    // Reset until the subscription is heard, then let replayed batches settle.
    let mut heard = false;
    for _ in 0..5 {
        let r = common::post(sim.addr(), "/reset_prefix_cache", &json!({})).await;
        assert_eq!(r.status, 200, "{}", r.body);
        if tokio::time::timeout(Duration::from_secs(1), next(&mut rx))
            .await
            .is_ok()
        {
            heard = true;
            while tokio::time::timeout(Duration::from_millis(300), next(&mut rx))
                .await
                .is_ok()
            {}
            break;
        }
    }
    assert!(heard, "the subscription never reached the publisher");

    let messages = json!([{"role": "user", "content": "hello world how are you today"}]);
    let r = common::post(sim.addr(), "/tokenize", &json!({"messages": messages})).await;
    assert_eq!(r.status, 200, "{}", r.body);
    let tokens: Vec<u32> = serde_json::from_value(r.json()["tokens"].clone()).unwrap();
    assert_eq!(tokens.len(), 8, "user + 6 words + assistant");
    let r = common::post(
        sim.addr(),
        "/v1/chat/completions",
        &json!({"model": MODEL, "messages": messages, "max_tokens": 1}),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.body);
    let stored = loop {
        let (_, _, events) = batch(&mut rx).await;
        if let Some(KvEvent::BlockStored(b)) = events
            .into_iter()
            .find(|e| matches!(e, KvEvent::BlockStored(_)))
        {
            break b;
        }
    };
    assert_eq!(stored.token_ids, tokens);
    assert_eq!(
        stored.block_hashes,
        block_hashes_of_ids(chain_seed(MODEL), &tokens, BLOCK)
    );
    assert_eq!(stored.parent_block_hash, None);
    shutdown.trigger();
    let _ = tokio::time::timeout(WAIT, task).await;
    sim.shutdown().await;
}

/// The next central message: `(topic, seq, events)`.
async fn central_batch(
    rx: &mut mpsc::Receiver<epp_core::kvevents::central::CentralUpdate>,
) -> (String, u64, Vec<KvEvent>) {
    use epp_core::kvevents::central::CentralUpdate;
    loop {
        let u = tokio::time::timeout(WAIT, rx.recv())
            .await
            .expect("no central update in time")
            .expect("central socket ended");
        if let CentralUpdate::Message { topic, seq, batch } = u {
            return (topic, seq, batch.expect("a batch").events);
        }
    }
}

#[tokio::test]
async fn connected_to_a_central_socket_the_simulator_reconnects_and_its_sequence_goes_on() {
    use epp_core::kvevents::central;
    // A port for the central socket, bound only after the simulator started: it retries.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let ep = format!("tcp://127.0.0.1:{port}");
    let mut cfg = config(EventForm::Array, "tcp://127.0.0.1:0", "tcp://127.0.0.1:0");
    cfg.kv_events.endpoint = None;
    cfg.kv_events.replay_endpoint = None;
    cfg.kv_events.connect = Some(ep.clone());
    let sim = common::start(cfg).await;
    let kv = sim.kv_events().expect("publishing").clone();
    assert_eq!(kv.endpoint, ep);
    assert_eq!(kv.topic, format!("kv@{}@{MODEL}", sim.addr()));
    // Sent before anything listens: it waits in the queue.
    chat(&sim, 'a').await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let stop = Shutdown::new();
    let sock = central::bind(&ep, "kv@").await.unwrap();
    let (mut rx, task) = central::spawn(sock, 16, stop.clone());
    assert_eq!(
        central_batch(&mut rx).await,
        (kv.topic.clone(), 0, vec![stored('a')])
    );
    // The picker goes away and comes back on the same port: the simulator reconnects.
    stop.trigger();
    let _ = task.await;
    drop(rx);
    let mut sock = None;
    for _ in 0..100 {
        match central::bind(&ep, "kv@").await {
            Ok(s) => {
                sock = Some(s);
                break;
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
    let stop = Shutdown::new();
    let (mut rx, task) = central::spawn(sock.expect("rebound"), 16, stop.clone());
    // Until the new connection is made, a batch may go out to nobody; the sequence goes on.
    let mut seen = None;
    for c in ['b', 'c', 'd', 'e'] {
        chat(&sim, c).await;
        if let Ok(got) = tokio::time::timeout(Duration::from_secs(3), central_batch(&mut rx)).await
        {
            seen = Some((c, got));
            break;
        }
    }
    let (c, (topic, seq, events)) = seen.expect("the simulator reconnected");
    assert_eq!(topic, kv.topic);
    assert_eq!(events.last(), Some(&stored(c)));
    let sent = (c as u8 - b'a') as u64;
    assert_eq!(seq, sent, "the sequence goes on across reconnections");
    stop.trigger();
    let _ = task.await;
    sim.shutdown().await;
}

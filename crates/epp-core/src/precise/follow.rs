//! One KV-event subscription per discovered endpoint, following the datastore as the scraper
//! does: an endpoint that appears is subscribed at `tcp://<its host>:<socketPort + rank>` (its
//! replay socket at `replaySocketPort + rank`, as llm-d dials data-parallel ranks), one whose
//! address changes is re-subscribed, one that leaves is unsubscribed and its share of the index
//! dropped. What each subscription reports moves the endpoint's [`Liveness`](super::Liveness):
//!
//! - connected → live; disconnected → `not_connected`;
//! - a batch → applied (at most `concurrency` endpoints at a time), and the endpoint is no longer
//!   waiting for an event;
//! - a gap the replay did not fill, an undecodable message → `rebuilding` for the rebuild window;
//! - a restart (the sequence went back, or jumped after a reconnection) → the share is dropped,
//!   and rebuilt from the replay (live again when it is complete, else after the window).
//!
//! A periodic tick expires speculative entries and applies the time-driven transitions.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::Semaphore;
use tokio::task::JoinHandle;
use tokio::time::Instant;

use super::metrics::{PodLabels, ReasonLabels, SkipLabels, TypeLabels, ZmqErrorLabels};
use super::{FallbackReason, PrecisePrefix, SlotState, MAX_SLOTS};
use crate::datastore::{Datastore, Endpoint};
use crate::kvevents::subscriber::{self, SubscriberConfig, Update};
use crate::kvevents::{parse_topic, KvEvent};
use crate::telemetry::Shutdown;

/// Where one endpoint's events come from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Source {
    pub endpoint: String,
    pub replay: Option<String>,
}

/// The publisher address of `ep` under `subs`: its host with `socketPort + rank`; `None` when
/// the endpoint is not followed (excluded by the selector or namespace, or the port overflows).
pub fn source_for(ep: &Endpoint, subs: &super::Subscriptions) -> Option<Source> {
    if let Some(sel) = &subs.selector {
        if !sel.matches(&ep.spec.labels) {
            return None;
        }
    }
    if let Some(ns) = &subs.namespace {
        if ep.spec.namespace.as_deref() != Some(ns.as_str()) {
            return None;
        }
    }
    let addr = ep.address();
    let host = match addr.rsplit_once(':') {
        Some((h, p)) if p.bytes().all(|b| b.is_ascii_digit()) => h,
        _ => addr,
    };
    let rank = ep.spec.rank;
    let port = subs.socket_port.checked_add(rank)?;
    let replay = match subs.replay_port {
        Some(p) => Some(format!("tcp://{host}:{}", p.checked_add(rank)?)),
        None => None,
    };
    Some(Source {
        endpoint: format!("tcp://{host}:{port}"),
        replay,
    })
}

struct Following {
    source: Source,
    pod: String,
    stop: Shutdown,
    task: JoinHandle<()>,
}

/// Follows every discovered endpoint's events until `shutdown`.
pub fn spawn(engine: Arc<PrecisePrefix>, ds: Datastore, shutdown: Shutdown) -> JoinHandle<()> {
    tokio::spawn(run(engine, ds, shutdown))
}

async fn run(engine: Arc<PrecisePrefix>, ds: Datastore, shutdown: Shutdown) {
    let s = engine.settings.clone();
    let permits = Arc::new(Semaphore::new(s.subscriptions.concurrency.max(1)));
    engine
        .metrics
        .capacity
        .set(s.subscriptions.concurrency as i64);
    let mut following: HashMap<usize, Following> = HashMap::new();
    let mut excluded: HashMap<usize, String> = HashMap::new();
    let mut changes = ds.subscribe();
    let period = s
        .event_timeout
        .min(s.rebuild_window)
        .min(s.speculative.unwrap_or(Duration::MAX))
        .div_f64(4.0)
        .clamp(Duration::from_millis(10), Duration::from_millis(250));
    let mut tick = tokio::time::interval(period);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut beat = tokio::time::interval(s.metrics_logging.unwrap_or(Duration::from_secs(3600)));
    beat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    beat.tick().await;
    let stop = shutdown.wait();
    tokio::pin!(stop);
    tracing::info!(
        producer = %engine.name,
        block_size_tokens = engine.block_tokens(),
        hash = engine.index.token_processor().algorithm().as_str(),
        bound = %s.index_bound,
        socket_port = s.subscriptions.socket_port,
        replay_port = ?s.subscriptions.replay_port,
        topic_filter = %s.subscriptions.topic_filter,
        speculative_ttl = ?s.speculative,
        "precise prefix index following the endpoints' KV events"
    );
    loop {
        reconcile(
            &engine,
            &ds,
            &permits,
            &shutdown,
            &mut following,
            &mut excluded,
        );
        tokio::select! {
            _ = &mut stop => break,
            r = changes.changed() => if r.is_err() { break },
            _ = tick.tick() => {
                let now = Instant::now();
                engine.index.expire(now);
                engine.liveness.check(now, s.event_timeout, s.rebuild_window);
            }
            _ = beat.tick(), if s.metrics_logging.is_some() => {
                let m = &engine.metrics;
                tracing::info!(
                    admissions = m.admissions.get(),
                    evictions = m.evictions.get(),
                    lookups = m.lookup_requests.get(),
                    hits = m.lookup_hits.get(),
                    max_pod_hit_count = m.max_pod_hit_count.get(),
                    keys = engine.index.len(),
                    "metrics beat"
                );
            }
        }
    }
    for (_, f) in following.drain() {
        f.stop.trigger();
        f.task.abort();
    }
    engine.metrics.active_subscribers.set(0);
}

fn reconcile(
    engine: &Arc<PrecisePrefix>,
    ds: &Datastore,
    permits: &Arc<Semaphore>,
    shutdown: &Shutdown,
    following: &mut HashMap<usize, Following>,
    excluded: &mut HashMap<usize, String>,
) {
    let snap = ds.snapshot();
    let mut wanted: HashMap<usize, (Arc<Endpoint>, Option<Source>)> = HashMap::new();
    for e in &snap.endpoints {
        if e.slot() < MAX_SLOTS {
            let src = source_for(&e.endpoint, &engine.settings.subscriptions);
            wanted.insert(e.slot(), (e.endpoint.clone(), src));
        }
    }
    // Gone or moved: stop following, forget the share.
    let stale: Vec<usize> = following
        .iter()
        .filter(|(slot, f)| {
            wanted
                .get(*slot)
                .and_then(|(_, s)| s.as_ref())
                .is_none_or(|s| *s != f.source)
        })
        .map(|(slot, _)| *slot)
        .collect();
    for slot in stale {
        let f = following.remove(&slot).expect("listed");
        f.stop.trigger();
        f.task.abort();
        engine.index.clear_slot(slot);
        engine.metrics.forget_pod(&f.pod);
        engine.liveness.detach(slot);
        tracing::info!(endpoint = %f.pod, source = %f.source.endpoint, "precise prefix: KV-event subscription stopped");
    }
    excluded.retain(|slot, _| {
        let keep = wanted.get(slot).is_some_and(|(_, s)| s.is_none());
        if !keep && !following.contains_key(slot) {
            engine.liveness.detach(*slot);
        }
        keep
    });
    for (slot, (ep, src)) in wanted {
        let pod = ep.id();
        let Some(src) = src else {
            if excluded.insert(slot, pod.clone()).is_none() {
                engine.liveness.attach(
                    slot,
                    ep.name(),
                    SlotState::Fallback(FallbackReason::NotSubscribed),
                    "excluded by podDiscoveryConfig (podLabelSelector or podNamespace)",
                );
            }
            continue;
        };
        if following.contains_key(&slot) {
            continue;
        }
        engine.liveness.attach(
            slot,
            ep.name(),
            SlotState::Fallback(FallbackReason::NotConnected),
            &format!("subscribing to {}", src.endpoint),
        );
        let mut cfg = SubscriberConfig::new(src.endpoint.clone());
        cfg.replay_endpoint = src.replay.clone();
        cfg.topic_filter = engine.settings.subscriptions.topic_filter.clone();
        let stop = Shutdown::new();
        let task = tokio::spawn(follow_one(
            engine.clone(),
            slot,
            pod.clone(),
            cfg,
            permits.clone(),
            stop.clone(),
            shutdown.clone(),
        ));
        tracing::info!(endpoint = %pod, source = %src.endpoint, replay = ?src.replay, "precise prefix: KV-event subscription started");
        following.insert(
            slot,
            Following {
                source: src,
                pod,
                stop,
                task,
            },
        );
    }
    engine
        .metrics
        .active_subscribers
        .set(following.len() as i64);
}

async fn follow_one(
    engine: Arc<PrecisePrefix>,
    slot: usize,
    pod: String,
    cfg: SubscriberConfig,
    permits: Arc<Semaphore>,
    stop: Shutdown,
    shutdown: Shutdown,
) {
    let (mut rx, handle) = subscriber::spawn(cfg, stop.clone());
    let all = shutdown.wait();
    tokio::pin!(all);
    let m = &engine.metrics;
    let labels = PodLabels {
        pod_identifier: pod.clone(),
    };
    let mut queued = 0i64;
    loop {
        let u = tokio::select! {
            _ = &mut all => break,
            u = rx.recv() => match u { Some(u) => u, None => break },
        };
        let now_queued = rx.len() as i64;
        m.queue_depth.inc_by(now_queued - queued);
        queued = now_queued;
        let lv = &engine.liveness;
        match u {
            Update::Connected => {
                if lv.state(slot) == SlotState::Fallback(FallbackReason::NotConnected) {
                    lv.set(slot, SlotState::Live, "subscription connected");
                }
            }
            Update::Disconnected { reason } => {
                let op = if reason.starts_with("connecting") {
                    "connect"
                } else {
                    "recv"
                };
                m.zmq_errors
                    .get_or_create(&ZmqErrorLabels {
                        pod_identifier: pod.clone(),
                        operation: op,
                    })
                    .inc();
                m.reconnections.get_or_create(&labels).inc();
                if lv.state(slot) != SlotState::Fallback(FallbackReason::NotConnected) {
                    lv.set(
                        slot,
                        SlotState::Fallback(FallbackReason::NotConnected),
                        &reason,
                    );
                }
            }
            Update::Batch { msg, .. } => {
                m.messages.get_or_create(&labels).inc();
                let Some((_, model)) = parse_topic(&msg.topic) else {
                    m.event_errors
                        .get_or_create(&ReasonLabels { reason: "topic" })
                        .inc();
                    lv.rebuilding(
                        slot,
                        Instant::now(),
                        &format!(
                            "topic {:?} is not kv@<pod>@<model>: its events cannot be keyed",
                            msg.topic
                        ),
                    );
                    continue;
                };
                let applied = {
                    let Ok(_permit) = permits.acquire().await else {
                        break;
                    };
                    engine.index.apply(slot, model, &msg.batch)
                };
                for ev in &msg.batch.events {
                    m.events.get_or_create(&TypeLabels(ev.tag())).inc();
                }
                m.admissions.inc_by(applied.admitted);
                m.evictions.inc_by(applied.evicted);
                m.dedup_suppressed.inc_by(applied.dedup_suppressed);
                m.dedup_forwarded.inc_by(applied.dedup_forwarded);
                for (kind, reason) in applied.stores_skipped {
                    m.stores_skipped
                        .get_or_create(&SkipLabels {
                            cache_kind: kind,
                            reason,
                        })
                        .inc();
                }
                for (kind, reason) in applied.removals_skipped {
                    m.removals_skipped
                        .get_or_create(&SkipLabels {
                            cache_kind: kind,
                            reason,
                        })
                        .inc();
                }
                lv.event(slot);
                if applied.cleared
                    && msg.batch.events.last() == Some(&KvEvent::AllBlocksCleared)
                    && lv.state(slot) == SlotState::Fallback(FallbackReason::Rebuilding)
                {
                    // After a reset the share is complete from here on.
                    lv.set(slot, SlotState::Live, "the engine reset its cache");
                }
                if lv.state(slot) == SlotState::Fallback(FallbackReason::NotConnected) {
                    lv.set(slot, SlotState::Live, "events arriving");
                }
            }
            Update::Gap {
                from,
                to,
                recovered,
                error,
            } => {
                let missing = to - from + 1;
                if recovered < missing {
                    m.event_errors
                        .get_or_create(&ReasonLabels { reason: "gap" })
                        .inc();
                    if error.is_some() {
                        m.zmq_errors
                            .get_or_create(&ZmqErrorLabels {
                                pod_identifier: pod.clone(),
                                operation: "replay-incomplete",
                            })
                            .inc();
                    }
                    lv.rebuilding(
                        slot,
                        Instant::now(),
                        &format!(
                            "{} of messages {from}..={to} lost ({})",
                            missing - recovered,
                            error.as_deref().unwrap_or("no replay socket")
                        ),
                    );
                } else if from == 0
                    && lv.state(slot) == SlotState::Fallback(FallbackReason::Rebuilding)
                {
                    // Everything from the publisher's first message is in: the share is whole.
                    lv.set(
                        slot,
                        SlotState::Live,
                        &format!("replayed messages {from}..={to}"),
                    );
                }
            }
            Update::Restarted { previous, seq } => {
                m.event_errors
                    .get_or_create(&ReasonLabels { reason: "restart" })
                    .inc();
                engine.index.clear_slot(slot);
                if seq == 0 {
                    lv.set(
                        slot,
                        SlotState::Live,
                        &format!("publisher restarted (sequence {previous} → 0); followed from its start"),
                    );
                } else {
                    lv.rebuilding(
                        slot,
                        Instant::now(),
                        &format!("publisher restarted (sequence {previous} → {seq}); rebuilding from its replay"),
                    );
                }
            }
            Update::Invalid { seq, error } => {
                m.event_errors
                    .get_or_create(&ReasonLabels { reason: "decode" })
                    .inc();
                lv.rebuilding(
                    slot,
                    Instant::now(),
                    &format!("message {seq:?} could not be decoded: {error}"),
                );
            }
        }
    }
    m.queue_depth.dec_by(queued);
    stop.trigger();
    let _ = handle.await;
}

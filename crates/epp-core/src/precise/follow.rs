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
//! With `kvEventsConfig.zmqEndpoint`, one more source: the central socket, bound here, which the
//! engines connect to and publish on (alone with `discoverPods: false`, or beside the
//! per-endpoint subscriptions). Its messages say whose they are only by their topic
//! `kv@<pod>@<model>`; [`map_pod`] finds the endpoint (`address:port` first, else a bare host
//! that exactly one endpoint has, the data-parallel rank of the batch choosing among ranks on one
//! host, else an endpoint's name), and a message that maps to none is refused and counted
//! (`epp_precise_prefix_central_refused_total{reason}`, one log line per topic a minute). Each
//! topic keeps its own sequence: one that goes back is a restart (the endpoint's share dropped),
//! a jump is lost messages (no replay in this mode: scored approximately for the rebuild window).
//! Per-topic state exists only for topics mapped to a discovered endpoint, at most
//! [`MAX_CENTRAL_TOPICS`], and goes with the endpoint.
//!
//! A periodic tick expires speculative entries and applies the time-driven transitions.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, Semaphore};
use tokio::task::JoinHandle;
use tokio::time::Instant;

use super::metrics::{PodLabels, ReasonLabels, SkipLabels, TypeLabels, ZmqErrorLabels};
use super::{FallbackReason, PrecisePrefix, SlotState, MAX_SLOTS};
use crate::datastore::{Datastore, Endpoint, Snapshot};
use crate::kvevents::central::{self, CentralSocket, CentralUpdate};
use crate::kvevents::subscriber::{self, SeqTracker, Step, SubscriberConfig, Update};
use crate::kvevents::{parse_topic, EventBatch, KvEvent};
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

/// The `pod_identifier` of the central socket in llm-d's per-subscriber families.
pub const LOCAL_SUBSCRIBER: &str = "local-subscriber";
/// Topics followed on the central socket at most (several per endpoint are possible: a topic
/// per model, or a pod id spelled two ways).
pub const MAX_CENTRAL_TOPICS: usize = 4 * MAX_SLOTS;
/// Longest topic read from the central socket; longer ones are refused.
const MAX_TOPIC_BYTES: usize = 512;
/// A refused topic is logged at most this often (and at most this many topics are remembered).
const REFUSAL_LOG_EVERY: Duration = Duration::from_secs(60);
const REFUSAL_LOG_TOPICS: usize = 64;

/// Binds the central socket when `zmqEndpoint` is configured; the error names the field and
/// the address.
pub async fn bind_central(engine: &PrecisePrefix) -> Result<Option<CentralSocket>, String> {
    let subs = &engine.settings.subscriptions;
    let Some(c) = &subs.central else {
        return Ok(None);
    };
    central::bind(&c.endpoint, &subs.topic_filter)
        .await
        .map(Some)
        .map_err(|e| format!("{}: {e}", c.field))
}

/// Binds the central socket (if any), then follows the events until `shutdown`. A bind failure
/// is returned before anything runs.
pub async fn start(
    engine: Arc<PrecisePrefix>,
    ds: Datastore,
    shutdown: Shutdown,
) -> Result<JoinHandle<()>, String> {
    let central = bind_central(&engine).await?;
    Ok(tokio::spawn(run(engine, ds, shutdown, central)))
}

/// Follows the events with the central socket [`bind_central`] bound (if any) until `shutdown`.
pub fn spawn_bound(
    engine: Arc<PrecisePrefix>,
    ds: Datastore,
    shutdown: Shutdown,
    central: Option<CentralSocket>,
) -> JoinHandle<()> {
    tokio::spawn(run(engine, ds, shutdown, central))
}

/// Follows every discovered endpoint's events until `shutdown` ([`start`] without waiting: a
/// central socket that cannot be bound is logged and counted in
/// `kv_cache_events_zmq_errors_total{operation="bind"}`, and only the per-endpoint
/// subscriptions run).
pub fn spawn(engine: Arc<PrecisePrefix>, ds: Datastore, shutdown: Shutdown) -> JoinHandle<()> {
    tokio::spawn(async move {
        let central = match bind_central(&engine).await {
            Ok(c) => c,
            Err(error) => {
                engine
                    .metrics
                    .zmq_errors
                    .get_or_create(&ZmqErrorLabels {
                        pod_identifier: LOCAL_SUBSCRIBER.into(),
                        operation: "bind",
                    })
                    .inc();
                tracing::error!(%error, "precise prefix: the central KV-event socket is not bound");
                None
            }
        };
        run(engine, ds, shutdown, central).await
    })
}

/// Per slot: the central socket delivered events for it, so its per-endpoint subscription
/// (if any) failing to connect does not make it `not_connected` (its engine connects out).
struct Claims(Box<[AtomicBool]>);

impl Claims {
    fn new() -> Self {
        Self((0..MAX_SLOTS).map(|_| AtomicBool::new(false)).collect())
    }
    fn get(&self, slot: usize) -> bool {
        self.0.get(slot).is_some_and(|c| c.load(Ordering::Relaxed))
    }
    fn set(&self, slot: usize, v: bool) {
        if let Some(c) = self.0.get(slot) {
            c.store(v, Ordering::Relaxed);
        }
    }
}

/// One topic followed on the central socket.
struct TopicState {
    slot: usize,
    /// The endpoint's address when the topic was mapped (a move unmaps it).
    address: String,
    tracker: SeqTracker,
}

/// The central socket's side of the follower.
struct CentralState {
    endpoint: String,
    stop: Shutdown,
    task: JoinHandle<()>,
    topics: HashMap<String, TopicState>,
    /// Central-only endpoints (`discoverPods: false`): slot → address.
    waiting: HashMap<usize, String>,
    /// When each refused topic was last logged.
    logged: HashMap<String, Instant>,
    /// Updates waiting in its channel at the last count (its part of the queue-depth gauge).
    queued: i64,
}

/// Why a central message was not applied (the `reason` label).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refusal {
    /// The topic is not `kv@<pod>@<model>` (or is too long).
    Topic,
    /// No discovered endpoint is that pod.
    UnknownPod,
    /// Several endpoints could be that pod (one host, and the rank does not choose).
    AmbiguousPod,
    /// The endpoint has no index slot (more than 128 endpoints).
    NoSlot,
    /// [`MAX_CENTRAL_TOPICS`] topics are followed already.
    TooManyTopics,
}

impl Refusal {
    pub fn as_str(&self) -> &'static str {
        match self {
            Refusal::Topic => "topic",
            Refusal::UnknownPod => "unknown_pod",
            Refusal::AmbiguousPod => "ambiguous_pod",
            Refusal::NoSlot => "no_slot",
            Refusal::TooManyTopics => "too_many_topics",
        }
    }
}

fn host_of(address: &str) -> &str {
    match address.rsplit_once(':') {
        Some((h, p))
            if !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()) && !h.ends_with(':') =>
        {
            h
        }
        _ => address,
    }
}

/// The slot of the endpoint a central topic's `pod` names: the endpoint whose `address:port`
/// it is; else, for a pod id without a port, the one endpoint on that host (among several
/// — data-parallel ranks on one host — the one whose rank is the batch's `data_parallel_rank`,
/// 0 when the batch has none); else the endpoint of that name (`namespace/name` or `name`).
pub fn map_pod(pod: &str, rank: Option<i64>, snap: &Snapshot) -> Result<usize, Refusal> {
    let pick = |found: Vec<usize>| -> Result<usize, Refusal> {
        match found.as_slice() {
            [slot] if *slot < MAX_SLOTS => Ok(*slot),
            [_] => Err(Refusal::NoSlot),
            [] => Err(Refusal::UnknownPod),
            _ => Err(Refusal::AmbiguousPod),
        }
    };
    let exact: Vec<usize> = snap
        .endpoints
        .iter()
        .filter(|e| e.endpoint.address() == pod)
        .map(|e| e.slot())
        .collect();
    if !exact.is_empty() {
        return pick(exact);
    }
    let has_port = host_of(pod) != pod;
    if !has_port {
        let bare = pod.trim_start_matches('[').trim_end_matches(']');
        let on_host: Vec<&crate::datastore::EndpointView> = snap
            .endpoints
            .iter()
            .filter(|e| {
                let h = host_of(e.endpoint.address());
                h == pod || h.trim_start_matches('[').trim_end_matches(']') == bare
            })
            .collect();
        match on_host.len() {
            0 => {}
            1 => return pick(vec![on_host[0].slot()]),
            _ => {
                let want = rank.unwrap_or(0);
                let ranked: Vec<usize> = on_host
                    .iter()
                    .filter(|e| i64::from(e.endpoint.spec.rank) == want)
                    .map(|e| e.slot())
                    .collect();
                if ranked.is_empty() {
                    return Err(Refusal::AmbiguousPod);
                }
                return pick(ranked);
            }
        }
    }
    pick(
        snap.endpoints
            .iter()
            .filter(|e| e.endpoint.id() == pod || e.endpoint.name() == pod)
            .map(|e| e.slot())
            .collect(),
    )
}

async fn run(
    engine: Arc<PrecisePrefix>,
    ds: Datastore,
    shutdown: Shutdown,
    central_socket: Option<CentralSocket>,
) {
    let s = engine.settings.clone();
    let claims = Arc::new(Claims::new());
    let (mut central_rx, mut central): (
        Option<mpsc::Receiver<CentralUpdate>>,
        Option<CentralState>,
    ) = match central_socket {
        None => (None, None),
        Some(sock) => {
            tracing::info!(
                producer = %engine.name,
                endpoint = %sock.endpoint,
                bound = %sock.bound,
                topic_filter = %s.subscriptions.topic_filter,
                discover_pods = s.subscriptions.discover_pods,
                "precise prefix: central KV-event socket bound; engines connect to it and publish with topic kv@<address:port>@<model>"
            );
            let endpoint = sock.endpoint.clone();
            let stop = Shutdown::new();
            let (rx, task) = central::spawn(sock, 1024, stop.clone());
            (
                Some(rx),
                Some(CentralState {
                    endpoint,
                    stop,
                    task,
                    topics: HashMap::new(),
                    waiting: HashMap::new(),
                    logged: HashMap::new(),
                    queued: 0,
                }),
            )
        }
    };
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
    let mut dirty = true;
    loop {
        if dirty {
            reconcile(
                &engine,
                &ds,
                &permits,
                &shutdown,
                &claims,
                &mut following,
                &mut excluded,
                central.as_mut(),
            );
            dirty = false;
        }
        let next_central = async {
            match central_rx.as_mut() {
                Some(rx) => rx.recv().await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            _ = &mut stop => break,
            r = changes.changed() => if r.is_err() { break } else { dirty = true },
            u = next_central => match (u, central.as_mut()) {
                (Some(u), Some(c)) => {
                    // The central socket's share of the queue depth (the per-endpoint
                    // subscriptions add theirs).
                    let queued = central_rx.as_ref().map_or(0, |r| r.len()) as i64;
                    engine.metrics.queue_depth.inc_by(queued - c.queued);
                    c.queued = queued;
                    if !on_central(&engine, &ds, &permits, &claims, c, u).await {
                        break;
                    }
                }
                _ => {
                    tracing::error!("precise prefix: the central KV-event socket stopped");
                    central_rx = None;
                }
            },
            _ = tick.tick() => {
                dirty = true;
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
    if let Some(c) = central {
        c.stop.trigger();
        c.task.abort();
        engine.metrics.queue_depth.dec_by(c.queued);
    }
    engine.metrics.active_subscribers.set(0);
}

/// One update of the central socket; `false` when the follower should stop.
async fn on_central(
    engine: &Arc<PrecisePrefix>,
    ds: &Datastore,
    permits: &Arc<Semaphore>,
    claims: &Claims,
    c: &mut CentralState,
    u: CentralUpdate,
) -> bool {
    let m = &engine.metrics;
    let local = PodLabels {
        pod_identifier: LOCAL_SUBSCRIBER.into(),
    };
    let (topic, seq, batch) = match u {
        CentralUpdate::PeerConnected { peer } => {
            tracing::debug!(%peer, endpoint = %c.endpoint, "precise prefix: a publisher connected to the central socket");
            return true;
        }
        CentralUpdate::PeerDisconnected => {
            // Which publisher it was is unknown on a shared socket: a restarted one shows by its
            // sequence going back (marking every topic as reconnected would take the next gap of
            // any of them for a restart and drop a share that is whole).
            tracing::debug!(endpoint = %c.endpoint, "precise prefix: a publisher left the central socket");
            return true;
        }
        CentralUpdate::RecvError { error } => {
            m.zmq_errors
                .get_or_create(&ZmqErrorLabels {
                    pod_identifier: LOCAL_SUBSCRIBER.into(),
                    operation: "recv",
                })
                .inc();
            tracing::debug!(%error, "precise prefix: central socket receive failed");
            return true;
        }
        CentralUpdate::Malformed { error } => {
            m.messages.get_or_create(&local).inc();
            m.event_errors
                .get_or_create(&ReasonLabels { reason: "decode" })
                .inc();
            refusal_log(c, "<unreadable>", "decode", &error.to_string());
            return true;
        }
        CentralUpdate::Message { topic, seq, batch } => (topic, seq, batch),
    };
    m.messages.get_or_create(&local).inc();
    let parsed = (topic.len() <= MAX_TOPIC_BYTES)
        .then(|| parse_topic(&topic))
        .flatten();
    let Some((pod, model)) = parsed else {
        m.event_errors
            .get_or_create(&ReasonLabels { reason: "topic" })
            .inc();
        refuse(
            engine,
            c,
            Refusal::Topic,
            &topic,
            "the topic is not kv@<pod>@<model>",
        );
        return true;
    };
    let slot = match c.topics.get(&topic) {
        Some(t) => t.slot,
        None => {
            if c.topics.len() >= MAX_CENTRAL_TOPICS {
                refuse(
                    engine,
                    c,
                    Refusal::TooManyTopics,
                    &topic,
                    &format!("{MAX_CENTRAL_TOPICS} topics are followed already"),
                );
                return true;
            }
            let rank = batch.as_ref().ok().and_then(|b| b.data_parallel_rank);
            let snap = ds.snapshot();
            match map_pod(pod, rank, &snap) {
                Ok(slot) => {
                    let ep = snap
                        .endpoints
                        .iter()
                        .find(|e| e.slot() == slot)
                        .expect("mapped from this snapshot");
                    tracing::info!(
                        %topic,
                        endpoint = %ep.endpoint.id(),
                        address = %ep.endpoint.address(),
                        "precise prefix: central KV-event topic followed"
                    );
                    c.topics.insert(
                        topic.clone(),
                        TopicState {
                            slot,
                            address: ep.endpoint.address().to_string(),
                            tracker: SeqTracker::default(),
                        },
                    );
                    m.central_topics.set(c.topics.len() as i64);
                    slot
                }
                Err(r) => {
                    let why = match r {
                        Refusal::AmbiguousPod => format!(
                            "several discovered endpoints are on host {pod:?} and none (or several) has the batch's data-parallel rank {}",
                            rank.unwrap_or(0)
                        ),
                        Refusal::NoSlot => "the endpoint has no index slot (more than 128 endpoints)".into(),
                        _ => format!(
                            "no discovered endpoint is {pod:?} (the topic's pod id must be the endpoint's address:port, its host, or its name)"
                        ),
                    };
                    refuse(engine, c, r, &topic, &why);
                    return true;
                }
            }
        }
    };
    let t = c.topics.get_mut(&topic).expect("inserted above");
    let lv = &engine.liveness;
    let (restarted, step) = t.tracker.on_live(seq);
    if let Some(previous) = restarted {
        publisher_restarted(
            engine,
            slot,
            &format!("publisher of {topic}"),
            previous,
            seq,
            "no replay on the central socket",
        );
    }
    match step {
        Step::Duplicate => return true,
        Step::Deliver => {}
        Step::Missing { from, to } => {
            m.event_errors
                .get_or_create(&ReasonLabels { reason: "gap" })
                .inc();
            lv.rebuilding(
                slot,
                Instant::now(),
                &format!(
                    "{} messages of {topic} lost ({from}..={to}); no replay on the central socket",
                    to - from + 1
                ),
            );
        }
    }
    t.tracker.delivered(seq);
    claims.set(slot, true);
    match batch {
        Err(error) => {
            m.event_errors
                .get_or_create(&ReasonLabels { reason: "decode" })
                .inc();
            lv.rebuilding(
                slot,
                Instant::now(),
                &format!("message {seq} of {topic} could not be decoded: {error}"),
            );
            true
        }
        Ok(batch) => apply_batch(engine, slot, model, &batch, permits).await,
    }
}

/// Counts a refused central message, and logs it (once a minute per topic).
fn refuse(engine: &PrecisePrefix, c: &mut CentralState, r: Refusal, topic: &str, why: &str) {
    engine
        .metrics
        .central_refused
        .get_or_create(&ReasonLabels { reason: r.as_str() })
        .inc();
    refusal_log(c, topic, r.as_str(), why);
}

fn refusal_log(c: &mut CentralState, topic: &str, reason: &str, why: &str) {
    let topic: String = topic.chars().take(200).collect();
    let now = Instant::now();
    if c.logged
        .get(&topic)
        .is_some_and(|t| now.saturating_duration_since(*t) < REFUSAL_LOG_EVERY)
    {
        return;
    }
    if c.logged.len() >= REFUSAL_LOG_TOPICS {
        c.logged
            .retain(|_, t| now.saturating_duration_since(*t) < REFUSAL_LOG_EVERY);
        if c.logged.len() >= REFUSAL_LOG_TOPICS {
            return;
        }
    }
    tracing::warn!(
        %topic,
        reason,
        detail = %why,
        endpoint = %c.endpoint,
        "precise prefix: central KV-event message not applied (logged once a minute per topic)"
    );
    c.logged.insert(topic, now);
}

/// Applies one batch to `slot`'s share; `false` when the follower is shutting down.
async fn apply_batch(
    engine: &PrecisePrefix,
    slot: usize,
    model: &str,
    batch: &EventBatch,
    permits: &Semaphore,
) -> bool {
    let m = &engine.metrics;
    let applied = {
        let Ok(_permit) = permits.acquire().await else {
            return false;
        };
        engine.index.apply(slot, model, batch)
    };
    for ev in &batch.events {
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
    let lv = &engine.liveness;
    lv.event(slot);
    if applied.cleared
        && batch.events.last() == Some(&KvEvent::AllBlocksCleared)
        && lv.state(slot) == SlotState::Fallback(FallbackReason::Rebuilding)
    {
        // After a reset the share is complete from here on.
        lv.set(slot, SlotState::Live, "the engine reset its cache");
    }
    if lv.state(slot) == SlotState::Fallback(FallbackReason::NotConnected) {
        lv.set(slot, SlotState::Live, "events arriving");
    }
    true
}

#[allow(clippy::too_many_arguments)]
fn reconcile(
    engine: &Arc<PrecisePrefix>,
    ds: &Datastore,
    permits: &Arc<Semaphore>,
    shutdown: &Shutdown,
    claims: &Arc<Claims>,
    following: &mut HashMap<usize, Following>,
    excluded: &mut HashMap<usize, String>,
    central: Option<&mut CentralState>,
) {
    let snap = ds.snapshot();
    let subs = &engine.settings.subscriptions;
    let mut wanted: HashMap<usize, (Arc<Endpoint>, Option<Source>)> = HashMap::new();
    for e in &snap.endpoints {
        if e.slot() < MAX_SLOTS {
            let src = if subs.discover_pods {
                source_for(&e.endpoint, subs)
            } else {
                None
            };
            wanted.insert(e.slot(), (e.endpoint.clone(), src));
        }
    }
    let has_central = central.is_some();
    if let Some(c) = central {
        // Topics of endpoints that left or moved are forgotten (their share goes below).
        c.topics.retain(|topic, t| {
            let keep = wanted
                .get(&t.slot)
                .is_some_and(|(ep, _)| ep.address() == t.address);
            if !keep {
                tracing::info!(%topic, address = %t.address, "precise prefix: central KV-event topic no longer followed (its endpoint left or moved)");
            }
            keep
        });
        engine.metrics.central_topics.set(c.topics.len() as i64);
        for slot in 0..MAX_SLOTS {
            if claims.get(slot) && !c.topics.values().any(|t| t.slot == slot) {
                claims.set(slot, false);
            }
        }
        if !subs.discover_pods {
            // Central-only: every endpoint waits for its first message on the socket.
            let gone: Vec<usize> = c
                .waiting
                .iter()
                .filter(|(slot, addr)| {
                    wanted
                        .get(*slot)
                        .is_none_or(|(ep, _)| ep.address() != addr.as_str())
                })
                .map(|(slot, _)| *slot)
                .collect();
            for slot in gone {
                c.waiting.remove(&slot);
                engine.index.clear_slot(slot);
                engine.liveness.detach(slot);
            }
            for (slot, (ep, _)) in &wanted {
                if c.waiting.contains_key(slot) {
                    continue;
                }
                c.waiting.insert(*slot, ep.address().to_string());
                engine.liveness.attach(
                    *slot,
                    ep.name(),
                    SlotState::Fallback(FallbackReason::NotConnected),
                    &format!(
                        "no message yet on the central socket {}: its engine publishes there with topic kv@{}@<model>",
                        c.endpoint,
                        ep.address()
                    ),
                );
            }
            engine.metrics.active_subscribers.set(1);
            return;
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
        claims.set(slot, false);
        tracing::info!(endpoint = %f.pod, source = %f.source.endpoint, "precise prefix: KV-event subscription stopped");
    }
    excluded.retain(|slot, _| {
        let keep = wanted.get(slot).is_some_and(|(_, s)| s.is_none());
        if !keep && !following.contains_key(slot) {
            engine.index.clear_slot(*slot);
            engine.liveness.detach(*slot);
        }
        keep
    });
    for (slot, (ep, src)) in wanted {
        let pod = ep.id();
        let Some(src) = src else {
            if excluded.insert(slot, pod.clone()).is_none() && !claims.get(slot) {
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
        if !claims.get(slot) {
            engine.liveness.attach(
                slot,
                ep.name(),
                SlotState::Fallback(FallbackReason::NotConnected),
                &format!("subscribing to {}", src.endpoint),
            );
        }
        let mut cfg = SubscriberConfig::new(src.endpoint.clone());
        cfg.replay_endpoint = src.replay.clone();
        cfg.topic_filter = subs.topic_filter.clone();
        let stop = Shutdown::new();
        let task = tokio::spawn(follow_one(
            engine.clone(),
            slot,
            pod.clone(),
            cfg,
            permits.clone(),
            claims.clone(),
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
        .set(following.len() as i64 + i64::from(has_central));
}

#[allow(clippy::too_many_arguments)]
async fn follow_one(
    engine: Arc<PrecisePrefix>,
    slot: usize,
    pod: String,
    cfg: SubscriberConfig,
    permits: Arc<Semaphore>,
    claims: Arc<Claims>,
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
                // An endpoint the central socket feeds connects out; its own port may well
                // have nobody behind it.
                if !claims.get(slot)
                    && lv.state(slot) != SlotState::Fallback(FallbackReason::NotConnected)
                {
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
                if !apply_batch(&engine, slot, model, &msg.batch, &permits).await {
                    break;
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
                publisher_restarted(
                    &engine,
                    slot,
                    "publisher",
                    previous,
                    seq,
                    "rebuilding from its replay",
                );
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

/// A publisher restarted (its sequence went back): its share of the index is dropped, the
/// restart counted; followed from sequence 0 it is live at once, otherwise it rebuilds
/// (`otherwise` says how).
fn publisher_restarted(
    engine: &PrecisePrefix,
    slot: usize,
    who: &str,
    previous: u64,
    seq: u64,
    otherwise: &str,
) {
    engine
        .metrics
        .event_errors
        .get_or_create(&ReasonLabels { reason: "restart" })
        .inc();
    engine.index.clear_slot(slot);
    if seq == 0 {
        engine.liveness.set(
            slot,
            SlotState::Live,
            &format!("{who} restarted (sequence {previous} → 0); followed from its start"),
        );
    } else {
        engine.liveness.rebuilding(
            slot,
            Instant::now(),
            &format!("{who} restarted (sequence {previous} → {seq}); {otherwise}"),
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::datastore::{DatastoreWriter, EndpointSpec, HealthConfig};

    fn snap(eps: &[(&str, &str, u16)]) -> (DatastoreWriter, Arc<Snapshot>) {
        let w = DatastoreWriter::new(HealthConfig::default());
        w.set_endpoints(
            eps.iter()
                .map(|(name, addr, rank)| EndpointSpec {
                    name: name.to_string(),
                    rank: *rank,
                    namespace: Some("ns".into()),
                    ..EndpointSpec::new(*addr)
                })
                .collect(),
        );
        let s = w.snapshot();
        (w, s)
    }

    fn slot(s: &Snapshot, name: &str) -> usize {
        s.endpoints
            .iter()
            .find(|e| e.endpoint.name() == name)
            .unwrap()
            .slot()
    }

    #[test]
    fn a_topic_s_pod_id_maps_by_address_then_host_then_name() {
        let (_w, s) = snap(&[
            ("a", "10.0.0.1:8000", 0),
            ("b", "10.0.0.2:8000", 0),
            ("b-dp1", "10.0.0.2:8001", 1),
            ("v6", "[fd00::1]:8000", 0),
        ]);
        // address:port, exactly.
        assert_eq!(map_pod("10.0.0.1:8000", None, &s), Ok(slot(&s, "a")));
        assert_eq!(map_pod("10.0.0.2:8001", None, &s), Ok(slot(&s, "b-dp1")));
        // A port no endpoint has is not guessed from the host.
        assert_eq!(map_pod("10.0.0.1:9000", None, &s), Err(Refusal::UnknownPod));
        // A bare host one endpoint has.
        assert_eq!(map_pod("10.0.0.1", None, &s), Ok(slot(&s, "a")));
        assert_eq!(map_pod("fd00::1", None, &s), Ok(slot(&s, "v6")));
        assert_eq!(map_pod("[fd00::1]", None, &s), Ok(slot(&s, "v6")));
        assert_eq!(map_pod("[fd00::1]:8000", None, &s), Ok(slot(&s, "v6")));
        // A host with data-parallel ranks: the batch's rank chooses (0 without one).
        assert_eq!(map_pod("10.0.0.2", None, &s), Ok(slot(&s, "b")));
        assert_eq!(map_pod("10.0.0.2", Some(1), &s), Ok(slot(&s, "b-dp1")));
        assert_eq!(map_pod("10.0.0.2", Some(2), &s), Err(Refusal::AmbiguousPod));
        // An endpoint's name (namespace/name or name).
        assert_eq!(map_pod("ns/b", None, &s), Ok(slot(&s, "b")));
        assert_eq!(map_pod("a", None, &s), Ok(slot(&s, "a")));
        assert_eq!(map_pod("nobody", None, &s), Err(Refusal::UnknownPod));
        assert_eq!(map_pod("", None, &s), Err(Refusal::UnknownPod));
        let labels: Vec<&str> = [
            Refusal::Topic,
            Refusal::UnknownPod,
            Refusal::AmbiguousPod,
            Refusal::NoSlot,
            Refusal::TooManyTopics,
        ]
        .iter()
        .map(|r| r.as_str())
        .collect();
        assert_eq!(
            labels,
            [
                "topic",
                "unknown_pod",
                "ambiguous_pod",
                "no_slot",
                "too_many_topics"
            ]
        );
    }
}

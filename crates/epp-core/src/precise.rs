//! Precise prefix-cache routing: which endpoints hold which prompt blocks, from the engines' own
//! KV events rather than from our past picks (llm-d's `precise-prefix-cache-producer`).
//!
//! - [`keys`]: request keys, recomputed from token ids exactly as llm-d's token processor does;
//! - [`index`]: request key → endpoints and tiers, engine block → request keys per endpoint,
//!   bounded, with speculative entries;
//! - [`follow`]: one KV-event subscription per discovered endpoint (the [`crate::kvevents`]
//!   subscriber) and/or the central socket engines connect to (each message mapped to its
//!   endpoint by its topic), applying what arrives and tracking whether the endpoint's events
//!   flow;
//! - [`metrics`]: llm-d's `kv_cache_index_*` / `kv_cache_events_*` families and epp's own.
//!
//! [`PrecisePrefix`] ties them together for the director: per request, the prompt's token ids
//! become request keys, the index says how many leading blocks each endpoint holds, and an
//! endpoint whose events are not flowing (not connected, silent, or rebuilding after lost events)
//! is scored by the approximate index instead, visibly (a counter per reason, a gauge, one log
//! line per state change). A request without token ids is scored by the approximate index alone.

pub mod follow;
pub mod index;
pub mod keys;
pub mod metrics;

use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use tokio::time::Instant;

pub use index::{IndexConfig, PreciseIndex, MAX_SLOTS};
pub use keys::{HashAlgorithm, TokenProcessor};
pub use metrics::PreciseMetrics;

use crate::datastore::Snapshot;
use crate::prefix::PrefixMatch;

/// Heap bytes per request key held by the index, measured with a counting allocator
/// (`cargo bench -p epp-core --bench precise_memory`, docs/benchmarks.md): the key's map and ring
/// slots, one holder, and its endpoint's engine-block mapping with its place in the eviction
/// order — 118 bytes when the index first fills, 215 once it has been overfilled tenfold (evicted
/// keys' engine mappings linger up to their own bound, and hash tables that churn near their
/// load limit double rather than rehash in place). `costAwareMemoryConfig.size` becomes a key
/// bound with it, and `epp_precise_prefix_index_bytes` reports keys × it.
pub const BYTES_PER_KEY: u64 = 220;

/// Which endpoints are followed, and how.
#[derive(Clone, Debug)]
pub struct Subscriptions {
    /// ZMQ topic prefix subscribed to (`kvEventsConfig.topicFilter`).
    pub topic_filter: String,
    /// Endpoints whose events are applied at the same time at most.
    pub concurrency: usize,
    /// The publisher's port (`socketPort`), plus the endpoint's data-parallel rank.
    pub socket_port: u16,
    /// The replay (ROUTER) port, plus the rank; `None`: no replay.
    pub replay_port: Option<u16>,
    /// Only endpoints whose labels match are followed.
    pub selector: Option<crate::k8s::selector::LabelSelector>,
    /// Only endpoints of this namespace are followed.
    pub namespace: Option<String>,
    /// `discoverPods`: every discovered endpoint's publisher is subscribed to.
    pub discover_pods: bool,
    /// `zmqEndpoint`: the central socket bound for engines to connect to and publish on.
    pub central: Option<CentralEndpoint>,
}

/// The central socket of `kvEventsConfig.zmqEndpoint`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CentralEndpoint {
    /// As configured, e.g. `tcp://*:5557`.
    pub endpoint: String,
    /// The configuration field, for errors (`plugins[1].parameters.kvEventsConfig.zmqEndpoint`).
    pub field: String,
}

/// A validated `precise-prefix-cache-producer` configuration.
#[derive(Clone, Debug)]
pub struct Settings {
    pub tp: TokenProcessor,
    pub index: IndexConfig,
    /// What bounds the index, for the start-up log.
    pub index_bound: String,
    /// `enableMetrics`: the `kv_cache_index_*` families are exported.
    pub index_metrics: bool,
    /// `metricsLoggingInterval`: a log line of the index counters this often.
    pub metrics_logging: Option<Duration>,
    pub subscriptions: Subscriptions,
    /// `speculativeIndexing` on: the TTL of speculative entries.
    pub speculative: Option<Duration>,
    /// Routed traffic with blocks new to an endpoint and no event for this long: not flowing.
    pub event_timeout: Duration,
    /// How long an endpoint that lost events is scored approximately.
    pub rebuild_window: Duration,
}

/// Why a score came from the approximate index.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum FallbackReason {
    /// No subscription: the endpoint is not followed (a selector excludes it, or no slot).
    NotSubscribed = 0,
    /// The subscription is not connected to the endpoint's publisher.
    NotConnected = 1,
    /// Traffic that had to store new blocks was routed there, and no event came.
    NoEvents = 2,
    /// Events were lost (a gap not replayed, a restart, joining mid-stream): the share is being
    /// rebuilt.
    Rebuilding = 3,
    /// The request had no token ids (no `token-producer` with a real tokenizer).
    NoTokenIds = 4,
}

impl FallbackReason {
    pub const ENDPOINT: [FallbackReason; 4] = [
        FallbackReason::NotSubscribed,
        FallbackReason::NotConnected,
        FallbackReason::NoEvents,
        FallbackReason::Rebuilding,
    ];

    pub fn as_str(&self) -> &'static str {
        match self {
            FallbackReason::NotSubscribed => "not_subscribed",
            FallbackReason::NotConnected => "not_connected",
            FallbackReason::NoEvents => "no_events",
            FallbackReason::Rebuilding => "rebuilding",
            FallbackReason::NoTokenIds => "no_token_ids",
        }
    }

    fn from_u8(v: u8) -> Option<Self> {
        Self::ENDPOINT.get(v as usize).copied()
    }
}

/// An endpoint's state: following its events, or why not.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SlotState {
    Live,
    Fallback(FallbackReason),
}

const LIVE: u8 = 0xff;
const ABSENT: u8 = 0xfe;
const NONE_MS: u64 = u64::MAX;

/// Per slot: live or in fallback (and why), when traffic started waiting for an event, when a
/// rebuild began. Written by the followers and the director, read by every lookup.
pub struct Liveness {
    state: Box<[AtomicU8]>,
    /// Milliseconds since `base` of the oldest routed request still waiting for an event.
    waiting_since: Box<[AtomicU64]>,
    /// Milliseconds since `base` when the share began rebuilding.
    rebuilding_since: Box<[AtomicU64]>,
    names: Mutex<Vec<String>>,
    base: Instant,
}

impl std::fmt::Debug for Liveness {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Liveness").finish_non_exhaustive()
    }
}

impl Default for Liveness {
    fn default() -> Self {
        Self {
            state: (0..MAX_SLOTS).map(|_| AtomicU8::new(ABSENT)).collect(),
            waiting_since: (0..MAX_SLOTS).map(|_| AtomicU64::new(NONE_MS)).collect(),
            rebuilding_since: (0..MAX_SLOTS).map(|_| AtomicU64::new(NONE_MS)).collect(),
            names: Mutex::new(vec![String::new(); MAX_SLOTS]),
            base: Instant::now(),
        }
    }
}

impl Liveness {
    fn ms(&self, t: Instant) -> u64 {
        t.saturating_duration_since(self.base).as_millis() as u64
    }

    /// The state of `slot` (an endpoint without a slot here is not subscribed).
    pub fn state(&self, slot: usize) -> SlotState {
        match self.state.get(slot).map(|s| s.load(Ordering::Relaxed)) {
            Some(LIVE) => SlotState::Live,
            Some(v) => SlotState::Fallback(
                FallbackReason::from_u8(v).unwrap_or(FallbackReason::NotSubscribed),
            ),
            None => SlotState::Fallback(FallbackReason::NotSubscribed),
        }
    }

    /// Sets `slot`'s state; logs one line when it changes. `detail` says why.
    pub fn set(&self, slot: usize, to: SlotState, detail: &str) {
        let Some(s) = self.state.get(slot) else {
            return;
        };
        let v = match to {
            SlotState::Live => LIVE,
            SlotState::Fallback(r) => r as u8,
        };
        let prev = s.swap(v, Ordering::Relaxed);
        if prev == v {
            return;
        }
        if to != SlotState::Fallback(FallbackReason::Rebuilding) {
            self.rebuilding_since[slot].store(NONE_MS, Ordering::Relaxed);
        }
        let endpoint = self.names.lock()[slot].clone();
        match to {
            SlotState::Live => tracing::info!(
                endpoint = %endpoint,
                %detail,
                "precise prefix: KV events flowing; endpoint scored by the precise index"
            ),
            SlotState::Fallback(r) => tracing::info!(
                endpoint = %endpoint,
                reason = r.as_str(),
                %detail,
                "precise prefix: endpoint scored by the approximate index"
            ),
        }
    }

    /// `slot` now belongs to `name` (a new subscription or exclusion), in state `to`.
    pub fn attach(&self, slot: usize, name: &str, to: SlotState, detail: &str) {
        if slot >= MAX_SLOTS {
            return;
        }
        self.names.lock()[slot] = name.to_string();
        self.waiting_since[slot].store(NONE_MS, Ordering::Relaxed);
        self.set(slot, to, detail);
    }

    /// `slot`'s endpoint left: nothing to count any more.
    pub fn detach(&self, slot: usize) {
        if let Some(s) = self.state.get(slot) {
            s.store(ABSENT, Ordering::Relaxed);
            self.waiting_since[slot].store(NONE_MS, Ordering::Relaxed);
            self.rebuilding_since[slot].store(NONE_MS, Ordering::Relaxed);
        }
    }

    /// Events were lost on `slot`: scored approximately for the rebuild window from `now`.
    pub fn rebuilding(&self, slot: usize, now: Instant, detail: &str) {
        if slot >= MAX_SLOTS {
            return;
        }
        self.rebuilding_since[slot].store(self.ms(now), Ordering::Relaxed);
        self.set(
            slot,
            SlotState::Fallback(FallbackReason::Rebuilding),
            detail,
        );
    }

    /// A request with blocks new to `slot` was routed there at `now`: an event should follow.
    pub fn expect_event(&self, slot: usize, now: Instant) {
        if let Some(w) = self.waiting_since.get(slot) {
            let _ = w.compare_exchange(NONE_MS, self.ms(now), Ordering::Relaxed, Ordering::Relaxed);
        }
    }

    /// An event arrived from `slot`: nothing is waiting any more; a silent endpoint is live again.
    pub fn event(&self, slot: usize) {
        let Some(w) = self.waiting_since.get(slot) else {
            return;
        };
        w.store(NONE_MS, Ordering::Relaxed);
        if self.state(slot) == SlotState::Fallback(FallbackReason::NoEvents) {
            self.set(slot, SlotState::Live, "an event arrived");
        }
    }

    /// Time-driven transitions: live → `no_events` once traffic waited `timeout` for an event;
    /// `rebuilding` → live after `window`.
    pub fn check(&self, now: Instant, timeout: Duration, window: Duration) {
        let now_ms = self.ms(now);
        for slot in 0..MAX_SLOTS {
            match self.state(slot) {
                SlotState::Live => {
                    let w = self.waiting_since[slot].load(Ordering::Relaxed);
                    if w != NONE_MS && now_ms.saturating_sub(w) >= timeout.as_millis() as u64 {
                        self.set(
                            slot,
                            SlotState::Fallback(FallbackReason::NoEvents),
                            &format!("routed traffic waited {timeout:?} without a KV event"),
                        );
                    }
                }
                SlotState::Fallback(FallbackReason::Rebuilding) => {
                    let since = self.rebuilding_since[slot].load(Ordering::Relaxed);
                    if since != NONE_MS && now_ms.saturating_sub(since) >= window.as_millis() as u64
                    {
                        self.set(slot, SlotState::Live, &format!("rebuilt for {window:?}"));
                    }
                }
                _ => {}
            }
        }
    }

    /// Endpoints in fallback, by reason (indexed by the reason's value).
    pub fn counts(&self) -> [usize; 4] {
        let mut c = [0usize; 4];
        for s in self.state.iter() {
            let v = s.load(Ordering::Relaxed);
            if let Some(r) = FallbackReason::from_u8(v) {
                c[r as usize] += 1;
            }
        }
        c
    }
}

/// The precise producer at run time: its index, the endpoints' state, its metrics. Built by the
/// director from the scheduler's [`Settings`]; [`follow::spawn`] starts the subscriptions.
#[derive(Debug)]
pub struct PrecisePrefix {
    /// The producer's name (what `prefixMatchInfoProducerName` refers to).
    pub name: String,
    pub settings: Arc<Settings>,
    pub index: PreciseIndex,
    pub liveness: Liveness,
    pub metrics: PreciseMetrics,
}

/// One request's precise lookup.
#[derive(Clone, Debug, Default)]
pub struct PreciseMatch {
    /// Per slot, leading blocks held (precise, or the approximate share for fallback endpoints),
    /// in this index's blocks.
    pub matched: PrefixMatch,
    /// The prompt's request keys (for the post-pick step).
    pub keys: Vec<u64>,
}

impl PrecisePrefix {
    pub fn new(name: &str, settings: Arc<Settings>) -> Arc<Self> {
        Arc::new(Self {
            name: name.to_string(),
            index: PreciseIndex::new(settings.tp.clone(), settings.index.clone()),
            liveness: Liveness::default(),
            metrics: PreciseMetrics::default(),
            settings,
        })
    }

    /// Tokens per block of this index.
    pub fn block_tokens(&self) -> u64 {
        u64::from(self.index.token_processor().block_size())
    }

    /// The request keys of a prompt: its token ids keyed by `model`, with the request's
    /// `cache_salt` folded into the first block as llm-d (and vLLM's `extra_keys`) do.
    pub fn request_keys(&self, model: &str, tokens: &[u32], cache_salt: Option<&str>) -> Vec<u64> {
        let tp = self.index.token_processor();
        let blocks = tp.blocks_in(tokens.len());
        let extras = cache_salt.filter(|s| !s.is_empty() && blocks > 0).map(|s| {
            let mut e: Vec<Option<Vec<String>>> = vec![None; blocks];
            e[0] = Some(vec![s.to_string()]);
            e
        });
        tp.block_keys(None, tokens, model, extras.as_deref())
            .unwrap_or_default()
    }

    /// A request without token ids: the approximate index scores it alone (counted).
    pub fn no_token_ids(&self) {
        self.metrics
            .fallback
            .get_or_create(&metrics::ReasonLabels {
                reason: FallbackReason::NoTokenIds.as_str(),
            })
            .inc();
    }

    /// Looks `keys` up; endpoints in fallback get the share of the prompt `approx` believes they
    /// hold, in this index's blocks.
    pub fn lookup(
        &self,
        snapshot: &Snapshot,
        keys: Vec<u64>,
        approx: &PrefixMatch,
    ) -> PreciseMatch {
        let started = std::time::Instant::now();
        let (mut matched, best) = self.index.lookup(&keys);
        let secs = started.elapsed().as_secs_f64();
        let m = &self.metrics;
        m.lookup_latency.observe(secs);
        m.lookup_latency_deprecated.observe(secs);
        m.lookup_requests.inc_by(1);
        m.lookup_hits.inc_by(u64::from(best));
        m.max_pod_hit_count.inc_by(u64::from(best));
        m.lookups
            .get_or_create(&metrics::ResultLabels {
                result: if best > 0 { "hit" } else { "miss" },
            })
            .inc();
        let total = matched.total_blocks;
        for e in &snapshot.endpoints {
            let slot = e.slot();
            let reason = match self.liveness.state(slot) {
                SlotState::Live => continue,
                SlotState::Fallback(r) => r,
            };
            m.fallback
                .get_or_create(&metrics::ReasonLabels {
                    reason: reason.as_str(),
                })
                .inc();
            let share = approx.ratio(slot);
            let blocks = (share * f64::from(total)).floor() as u32;
            if matched.blocks.len() <= slot {
                if blocks == 0 {
                    continue;
                }
                matched.blocks.resize(slot + 1, 0);
            }
            matched.blocks[slot] = blocks.min(total);
        }
        PreciseMatch { matched, keys }
    }

    /// After the pick: with `speculativeIndexing`, `slot` holds the prompt's keys at once (until
    /// the TTL, or for good once its engine confirms); when the prompt had blocks `slot` did not
    /// hold, an event from it is now due.
    pub fn after_pick(&self, slot: usize, m: &PreciseMatch, now: Instant) {
        if m.keys.is_empty() {
            return;
        }
        if m.matched.matched(slot) < m.matched.total_blocks
            && self.liveness.state(slot) == SlotState::Live
        {
            self.liveness.expect_event(slot, now);
        }
        if let Some(ttl) = self.settings.speculative {
            self.index.speculate(slot, &m.keys, ttl, now);
        }
    }

    /// Registers the metrics into the one registry.
    pub fn register(self: &Arc<Self>, r: &mut prometheus_client::registry::Registry) {
        self.metrics.register(
            r,
            self.settings.index_metrics,
            self.settings.subscriptions.central.is_some(),
        );
        r.register_collector(Box::new(metrics::PreciseCollector(self.clone())));
    }
}

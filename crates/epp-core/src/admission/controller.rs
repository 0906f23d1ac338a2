//! The flow controller: priority bands of per-flow queues, and the dispatch cycle that lets
//! queued requests through as the pool frees up.
//!
//! - A request that finds nothing queued and the pool below its usage limit goes straight
//!   through (one atomic load and one saturation reading: no lock, no allocation).
//! - Otherwise it is checked against its band's and the global `maxRequests` / `maxBytes`
//!   (refused with `RejectedCapacity`, or `RejectedNoEndpoints` when the pool is empty), then
//!   queued in its flow (its fairness id) and waits.
//! - A dispatch cycle runs when a request is queued, when a routed request finishes, when the
//!   datastore publishes new endpoint state (a scrape, a discovery change) and, as a fallback,
//!   every [`RECHECK_INTERVAL`] while anything is queued. It dispatches while the pool reads
//!   below the usage limit: from the highest-priority band with queued requests, the flow its
//!   fairness policy picks, that flow's first request by its ordering policy. A lower band never
//!   dispatches while a higher one waits (the cycle stops at the first saturated reading).
//! - A queued request leaves with `EvictedTTL` (429) or, while the pool has no endpoints,
//!   `EvictedNoEndpoints` (503) when its queue-wait budget runs out, and with
//!   `EvictedContextCancelled` the moment its future is dropped (the client went away).
//!
//! Memory is bounded: every queued request counts against its band's `maxRequests` /
//! `maxBytes` (defaults 5000 / 1G) and the optional global limits; flows and bands without
//! queued requests are dropped.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use futures_util::future::BoxFuture;
use parking_lot::Mutex;
use tokio::sync::oneshot;
use tokio::time::Instant;

use crate::datastore::{Datastore, EndpointView, HealthState, Snapshot};
use crate::director::RouteError;
use crate::metrics::LabelStr;
use crate::scheduler::plugins::filters::roles;

use super::metrics::{
    BandLabels, DetectorLabels, EnqueueLabels, FlowControlMetrics, OutcomeLabels, PoolLabels,
    QueueDurationLabels, QueueLabels, StageLabels,
};
use super::settings::{BandSettings, FlowSettings};
use super::{Admission, AdmissionRequest, Admitted, SaturationDetector};

/// How often a queued request re-reads whether the pool has endpoints (when the two TTLs
/// differ), and how often the pump re-checks a non-empty queue without any other signal.
pub const RECHECK_INTERVAL: Duration = Duration::from_millis(250);

/// A request's final state in flow control (llm-d-router's `QueueOutcome`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    Dispatched,
    RejectedCapacity,
    RejectedNoEndpoints,
    EvictedTTL,
    EvictedNoEndpoints,
    EvictedContextCancelled,
    EvictedOther,
}

impl Outcome {
    pub fn as_str(&self) -> &'static str {
        match self {
            Outcome::Dispatched => "Dispatched",
            Outcome::RejectedCapacity => "RejectedCapacity",
            Outcome::RejectedNoEndpoints => "RejectedNoEndpoints",
            Outcome::EvictedTTL => "EvictedTTL",
            Outcome::EvictedNoEndpoints => "EvictedNoEndpoints",
            Outcome::EvictedContextCancelled => "EvictedContextCancelled",
            Outcome::EvictedOther => "EvictedOther",
        }
    }

    /// The refusal a client gets (llm-d-router's `translateFlowControlOutcome`); `None` for
    /// `Dispatched`.
    pub fn refusal(&self) -> Option<RouteError> {
        use crate::gateway::headers::dropped;
        let reason = match self {
            Outcome::Dispatched => return None,
            Outcome::RejectedCapacity => dropped::SATURATED,
            Outcome::RejectedNoEndpoints | Outcome::EvictedNoEndpoints => dropped::NO_ENDPOINTS,
            Outcome::EvictedTTL => dropped::TTL_EXPIRED,
            Outcome::EvictedContextCancelled => dropped::CONTEXT_CANCELLED,
            Outcome::EvictedOther => dropped::EVICTED,
        };
        let (status, msg) = match self {
            Outcome::Dispatched => return None,
            Outcome::RejectedCapacity => (
                429,
                "request rejected by flow control: queue capacity limits reached",
            ),
            Outcome::RejectedNoEndpoints => (
                503,
                "no endpoints available: request rejected by flow control",
            ),
            Outcome::EvictedTTL => (
                429,
                "request timed out in queue: the pool stayed saturated for the request's queue-wait budget (flowControl.defaultRequestTTL)",
            ),
            Outcome::EvictedNoEndpoints => (
                503,
                "request timed out in queue and no endpoints are available (flowControl.noEndpointRequestTTL)",
            ),
            Outcome::EvictedContextCancelled => {
                (503, "client disconnected while queued in flow control")
            }
            Outcome::EvictedOther => (503, "request evicted from the flow control queue"),
        };
        Some(RouteError::new(status, msg).dropped(reason))
    }
}

/// What the enqueue-duration family labels a request that entered the queue (or went straight
/// through), as llm-d-router does before a request is finalized.
const NOT_YET_FINALIZED: &str = "NotYetFinalized";

/// The flows of one band with queued requests, by fairness id.
pub type Flows = BTreeMap<Arc<str>, FlowQueue>;

/// One flow's queued requests, ordered by (ordering key, arrival).
#[derive(Debug, Default)]
pub struct FlowQueue {
    items: BTreeMap<(u64, u64), Item>,
}

impl FlowQueue {
    /// The first request's position, if any.
    pub fn head(&self) -> Option<(u64, u64)> {
        self.items.keys().next().copied()
    }
    pub fn len(&self) -> usize {
        self.items.len()
    }
    pub fn is_empty(&self) -> bool {
        self.items.is_empty()
    }

    /// Queue an item at `key` with nobody waiting on it (policy tests).
    #[cfg(test)]
    pub(crate) fn push_for_test(&mut self, key: (u64, u64)) {
        let (tx, _) = oneshot::channel();
        self.items.insert(
            key,
            Item {
                tx,
                bytes: 0,
                labels: QueueLabels {
                    fairness_id: "".into(),
                    inference_pool: "".into(),
                    model_name: "".into(),
                    priority: 0,
                    target_model_name: "".into(),
                },
            },
        );
    }

    #[cfg(test)]
    pub(crate) fn pop_for_test(&mut self) {
        self.items.pop_first();
    }
}

#[derive(Debug)]
struct Item {
    tx: oneshot::Sender<Transit>,
    bytes: u64,
    labels: QueueLabels,
}

struct Band {
    settings: Arc<BandSettings>,
    flows: Flows,
    len: u64,
    bytes: u64,
    /// The flow that dispatched last (round robin's cursor).
    cursor: Option<Arc<str>>,
    /// Listed in the config (kept when empty, so its capacity series stays).
    configured: bool,
}

#[derive(Default)]
struct State {
    bands: BTreeMap<i64, Band>,
    len: u64,
    bytes: u64,
}

struct Shared {
    settings: FlowSettings,
    datastore: Datastore,
    metrics: Arc<FlowControlMetrics>,
    state: Mutex<State>,
    /// Requests queued, readable without the lock (the fast path).
    queued: AtomicUsize,
    /// Requests let through whose pick is not made yet.
    in_transit: AtomicUsize,
    epoch: Instant,
    seq: AtomicU64,
    /// Priorities of the requests seen lately, and when last: the active priority domain of a
    /// usage-limit policy whose ceilings depend on it (at most [`MAX_SEEN_PRIORITIES`]).
    seen: Mutex<Vec<(i64, Instant)>>,
}

/// How long a priority stays in the active domain after its last request.
pub const ACTIVE_PRIORITY_WINDOW: Duration = Duration::from_secs(60);
/// Distinct priorities remembered for the active domain; the least recent goes first.
pub const MAX_SEEN_PRIORITIES: usize = 64;

/// A let-through request not yet on an endpoint; counted in every saturation reading until
/// dropped (the director drops it once the pick is made).
pub struct Transit {
    shared: Option<Arc<Shared>>,
}

impl std::fmt::Debug for Transit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Transit")
    }
}

impl Transit {
    fn new(shared: &Arc<Shared>) -> Self {
        shared.in_transit.fetch_add(1, Ordering::AcqRel);
        Self {
            shared: Some(shared.clone()),
        }
    }
    /// Release without starting a dispatch cycle (inside one).
    fn release_quiet(mut self) {
        if let Some(s) = self.shared.take() {
            s.in_transit.fetch_sub(1, Ordering::AcqRel);
        }
    }
}

impl Drop for Transit {
    fn drop(&mut self) {
        if let Some(s) = self.shared.take() {
            s.in_transit.fetch_sub(1, Ordering::AcqRel);
            // The pick failed or moved the count to the endpoint: either way, look again.
            s.dispatch_cycle();
        }
    }
}

/// The pool's saturation as the dispatch decision reads it.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct PoolSaturation {
    /// `max(prefill, decode)`; 1.0 for an empty pool.
    pub effective: f64,
    pub decode: Option<f64>,
    pub prefill: Option<f64>,
    /// Endpoints with missing or stale metrics.
    pub stale: usize,
    /// No candidate endpoint at all.
    pub empty: bool,
}

/// The endpoints flow control counts: those that can take requests or are only stale
/// (unhealthy and draining ones are out).
fn candidates(snapshot: &Snapshot) -> impl Iterator<Item = &EndpointView> {
    snapshot
        .endpoints
        .iter()
        .filter(|e| matches!(e.health, HealthState::Healthy | HealthState::Stale))
}

/// Read the pool through `detector`: per stage (decode: unlabelled and decoding roles; prefill:
/// prefilling roles; endpoints doing both count in both), the effective value their max.
pub fn pool_saturation(
    detector: &dyn SaturationDetector,
    snapshot: &Snapshot,
    extra: usize,
) -> PoolSaturation {
    let mut decode: Vec<&EndpointView> = Vec::new();
    let mut prefill: Vec<&EndpointView> = Vec::new();
    for e in candidates(snapshot) {
        match e.endpoint.spec.labels.get(roles::ROLE_LABEL) {
            None => decode.push(e),
            Some(r) => {
                if roles::DECODE_ROLES.contains(&r.as_str()) {
                    decode.push(e);
                }
                if roles::PREFILL_ROLES.contains(&r.as_str()) {
                    prefill.push(e);
                }
            }
        }
    }
    let mut stale = 0;
    let mut read = |eps: &[&EndpointView]| {
        (!eps.is_empty()).then(|| {
            let (s, n) = detector.saturation(eps, extra);
            stale = stale.max(n);
            s
        })
    };
    let d = read(&decode);
    let p = read(&prefill);
    let empty = d.is_none() && p.is_none();
    let effective = match (d, p) {
        (None, None) => 1.0,
        (a, b) => a.unwrap_or(f64::MIN).max(b.unwrap_or(f64::MIN)),
    };
    PoolSaturation {
        effective,
        decode: d,
        prefill: p,
        stale,
        empty,
    }
}

/// Who a request is, for the queue and its metrics.
#[derive(Clone, Debug)]
pub struct FlowRequest {
    pub fairness_id: LabelStr,
    pub priority: i64,
    pub bytes: u64,
    pub model_name: LabelStr,
    pub target_model_name: LabelStr,
}

/// The flow controller (`featureGates: [flowControl]`). Cheap to share (`Arc`).
pub struct FlowController {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for FlowController {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FlowController")
            .field("queued", &self.queued())
            .finish_non_exhaustive()
    }
}

impl FlowController {
    pub fn new(
        settings: FlowSettings,
        datastore: Datastore,
        metrics: Arc<FlowControlMetrics>,
    ) -> Arc<Self> {
        let mut state = State::default();
        for (p, b) in &settings.bands {
            state.bands.insert(
                *p,
                Band {
                    settings: b.clone(),
                    flows: Flows::new(),
                    len: 0,
                    bytes: 0,
                    cursor: None,
                    configured: true,
                },
            );
        }
        Arc::new(Self {
            shared: Arc::new(Shared {
                settings,
                datastore,
                metrics,
                state: Mutex::new(state),
                queued: AtomicUsize::new(0),
                in_transit: AtomicUsize::new(0),
                epoch: Instant::now(),
                seq: AtomicU64::new(0),
                seen: Mutex::new(Vec::new()),
            }),
        })
    }

    pub fn settings(&self) -> &FlowSettings {
        &self.shared.settings
    }

    /// Requests waiting now.
    pub fn queued(&self) -> usize {
        self.shared.queued.load(Ordering::Acquire)
    }

    /// Run dispatch cycles on datastore changes (scrapes, discovery) and every
    /// [`RECHECK_INTERVAL`] while requests wait, until `shutdown`.
    pub fn spawn_pump(
        self: &Arc<Self>,
        shutdown: crate::telemetry::Shutdown,
    ) -> tokio::task::JoinHandle<()> {
        let shared = self.shared.clone();
        tokio::spawn(async move {
            let mut changed = shared.datastore.subscribe();
            let mut tick = tokio::time::interval(RECHECK_INTERVAL);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    _ = shutdown.wait() => return,
                    r = changed.changed() => {
                        if r.is_err() {
                            return;
                        }
                    }
                    _ = tick.tick() => {}
                }
                shared.dispatch_cycle();
            }
        })
    }

    /// Queue `req` if it must wait and wait for its outcome. `Dispatched` comes with the
    /// let-through count to hold until the pick is made.
    pub async fn enqueue_and_wait(&self, req: FlowRequest) -> (Outcome, Option<Transit>) {
        let s = &self.shared;
        let started = Instant::now();
        let pool = LabelStr::from(s.datastore.pool_name().as_str());
        let domain = s.note_priority(req.priority, started);
        if s.queued.load(Ordering::Acquire) == 0 {
            let snap = s.datastore.snapshot();
            let sat = s.measure(&snap, &pool);
            if sat.effective < s.settings.usage_limit.ceiling(req.priority, &domain) {
                let t = Transit::new(s);
                s.record_enqueue(&req, NOT_YET_FINALIZED, started);
                s.record_final(&req, &pool, Outcome::Dispatched, started);
                return (Outcome::Dispatched, Some(t));
            }
        }
        let snap = s.datastore.snapshot();
        let pool_empty = candidates(&snap).next().is_none();
        let (tx, rx) = oneshot::channel();
        let band_settings = s.settings.band_for(req.priority);
        let flow: Arc<str> = Arc::from(req.fairness_id.as_str());
        let labels = QueueLabels {
            fairness_id: req.fairness_id.clone(),
            inference_pool: pool.clone(),
            model_name: req.model_name.clone(),
            priority: req.priority,
            target_model_name: req.target_model_name.clone(),
        };
        let seq = s.seq.fetch_add(1, Ordering::Relaxed);
        let ttl_now = if pool_empty {
            s.settings.no_endpoint_ttl
        } else {
            s.settings.default_ttl
        };
        let enq_nanos =
            u64::try_from(started.duration_since(s.epoch).as_nanos()).unwrap_or(u64::MAX);
        let key = (band_settings.ordering.key(enq_nanos, ttl_now), seq);
        {
            let mut st = s.state.lock();
            let (band_len, band_bytes) = st
                .bands
                .get(&req.priority)
                .map_or((0, 0), |b| (b.len, b.bytes));
            let g = &s.settings;
            let full = band_len + 1 > band_settings.max_requests
                || band_bytes + req.bytes > band_settings.max_bytes
                || (g.max_requests > 0 && st.len + 1 > g.max_requests)
                || (g.max_bytes > 0 && st.bytes + req.bytes > g.max_bytes);
            if full {
                drop(st);
                let o = if pool_empty {
                    Outcome::RejectedNoEndpoints
                } else {
                    Outcome::RejectedCapacity
                };
                s.record_enqueue(&req, o.as_str(), started);
                s.record_final(&req, &pool, o, started);
                tracing::debug!(
                    priority = req.priority,
                    fairness_id = req.fairness_id.as_str(),
                    outcome = o.as_str(),
                    "flow control refused the request at the queue boundary"
                );
                return (o, None);
            }
            let band = st.bands.entry(req.priority).or_insert_with(|| Band {
                settings: band_settings.clone(),
                flows: Flows::new(),
                len: 0,
                bytes: 0,
                cursor: None,
                configured: false,
            });
            band.flows.entry(flow.clone()).or_default().items.insert(
                key,
                Item {
                    tx,
                    bytes: req.bytes,
                    labels: labels.clone(),
                },
            );
            band.len += 1;
            band.bytes += req.bytes;
            st.len += 1;
            st.bytes += req.bytes;
            s.queued.fetch_add(1, Ordering::AcqRel);
            s.record_capacity(&st, req.priority, &pool);
        }
        twin_add(&s.metrics.queue_size, &labels, 1);
        twin_add(&s.metrics.queue_bytes, &labels, req.bytes as i64);
        s.record_enqueue(&req, NOT_YET_FINALIZED, started);
        let mut guard = Queued {
            shared: s.clone(),
            req,
            pool,
            flow,
            key,
            started,
            rx: Some(rx),
        };
        s.dispatch_cycle();
        let outcome = guard.wait(pool_empty).await;
        (outcome.0, outcome.1)
    }
}

/// A queued request's hold on its queue entry: dropping it (the client went away) takes the
/// request out at once and counts `EvictedContextCancelled`.
struct Queued {
    shared: Arc<Shared>,
    req: FlowRequest,
    pool: LabelStr,
    flow: Arc<str>,
    key: (u64, u64),
    started: Instant,
    rx: Option<oneshot::Receiver<Transit>>,
}

impl Queued {
    async fn wait(&mut self, mut empty: bool) -> (Outcome, Option<Transit>) {
        let s = self.shared.clone();
        let (ttl_default, ttl_none) = (s.settings.default_ttl, s.settings.no_endpoint_ttl);
        let split = ttl_default != ttl_none;
        // Each regime change grants a fresh budget; the whole wait stays within the longer one.
        let bound = (!ttl_default.is_zero() && !ttl_none.is_zero())
            .then(|| self.started + ttl_default.max(ttl_none));
        let mut since = self.started;
        loop {
            let budget = if empty { ttl_none } else { ttl_default };
            let mut due = (!budget.is_zero()).then(|| since + budget);
            if let (Some(d), Some(b)) = (due, bound) {
                due = Some(d.min(b));
            }
            let recheck = split.then(|| Instant::now() + RECHECK_INTERVAL);
            let next = match (due, recheck) {
                (Some(a), Some(b)) => Some(a.min(b)),
                (a, b) => a.or(b),
            };
            let Some(rx) = self.rx.as_mut() else {
                return (Outcome::EvictedOther, None);
            };
            let sleep = async move {
                match next {
                    Some(t) => tokio::time::sleep_until(t).await,
                    None => std::future::pending::<()>().await,
                }
            };
            tokio::select! {
                r = rx => {
                    self.rx = None;
                    return match r {
                        Ok(t) => {
                            s.record_final(&self.req, &self.pool, Outcome::Dispatched, self.started);
                            (Outcome::Dispatched, Some(t))
                        }
                        Err(_) => {
                            s.record_final(&self.req, &self.pool, Outcome::EvictedOther, self.started);
                            (Outcome::EvictedOther, None)
                        }
                    };
                }
                _ = sleep => {}
            }
            let now = Instant::now();
            if split {
                let e = candidates(&s.datastore.snapshot()).next().is_none();
                if e != empty {
                    empty = e;
                    since = now;
                    continue;
                }
            }
            if due.is_some_and(|d| now >= d) {
                let o = if empty {
                    Outcome::EvictedNoEndpoints
                } else {
                    Outcome::EvictedTTL
                };
                if s.remove(self.req.priority, &self.flow, self.key, &self.pool) {
                    self.rx = None;
                    s.record_final(&self.req, &self.pool, o, self.started);
                    tracing::debug!(
                        priority = self.req.priority,
                        fairness_id = self.req.fairness_id.as_str(),
                        outcome = o.as_str(),
                        "queued request evicted"
                    );
                    return (o, None);
                }
                // Dispatched as the budget ran out: take the dispatch.
            }
        }
    }
}

impl Drop for Queued {
    fn drop(&mut self) {
        let Some(mut rx) = self.rx.take() else {
            return;
        };
        let s = &self.shared;
        let removed = s.remove(self.req.priority, &self.flow, self.key, &self.pool);
        // Dispatched but never taken: the let-through count goes with the receiver.
        let dispatched = rx.try_recv().ok();
        if removed || dispatched.is_some() {
            s.record_final(
                &self.req,
                &self.pool,
                Outcome::EvictedContextCancelled,
                self.started,
            );
            tracing::debug!(
                priority = self.req.priority,
                fairness_id = self.req.fairness_id.as_str(),
                "client went away while queued"
            );
        }
        drop(dispatched);
    }
}

fn twin_add(
    f: &super::metrics::Twin<
        prometheus_client::metrics::family::Family<
            QueueLabels,
            prometheus_client::metrics::gauge::Gauge,
        >,
    >,
    l: &QueueLabels,
    v: i64,
) {
    f.llmd.get_or_create(l).inc_by(v);
    f.legacy.get_or_create(l).inc_by(v);
}

impl Shared {
    /// Read the pool (counting let-through requests) and publish the readings.
    fn measure(&self, snap: &Snapshot, pool: &LabelStr) -> PoolSaturation {
        let extra = self.in_transit.load(Ordering::Acquire);
        let sat = pool_saturation(self.settings.detector.as_ref(), snap, extra);
        let m = &self.metrics;
        let set = |stage: &'static str, v: Option<f64>| {
            let l = StageLabels {
                inference_pool: pool.clone(),
                stage,
            };
            match v {
                Some(v) => {
                    m.pool_saturation.llmd.get_or_create(&l).set(v);
                    m.pool_saturation.legacy.get_or_create(&l).set(v);
                }
                None => {
                    m.pool_saturation.llmd.remove(&l);
                    m.pool_saturation.legacy.remove(&l);
                }
            }
        };
        set("decode", sat.decode);
        set("prefill", sat.prefill);
        set("effective", Some(sat.effective));
        m.stale_endpoints
            .get_or_create(&DetectorLabels {
                detector: LabelStr::from(self.settings.detector.name()),
            })
            .set(sat.stale as i64);
        sat
    }

    fn record_enqueue(&self, req: &FlowRequest, outcome: &'static str, started: Instant) {
        let l = EnqueueLabels {
            fairness_id: req.fairness_id.clone(),
            outcome,
            priority: req.priority,
        };
        let secs = started.elapsed().as_secs_f64();
        self.metrics
            .enqueue_duration
            .llmd
            .get_or_create(&l)
            .observe(secs);
        self.metrics
            .enqueue_duration
            .legacy
            .get_or_create(&l)
            .observe(secs);
    }

    fn record_final(&self, req: &FlowRequest, pool: &LabelStr, o: Outcome, started: Instant) {
        let l = QueueDurationLabels {
            fairness_id: req.fairness_id.clone(),
            inference_pool: pool.clone(),
            model_name: req.model_name.clone(),
            outcome: o.as_str(),
            priority: req.priority,
            target_model_name: req.target_model_name.clone(),
        };
        let secs = started.elapsed().as_secs_f64();
        self.metrics
            .queue_duration
            .llmd
            .get_or_create(&l)
            .observe(secs);
        self.metrics
            .queue_duration
            .legacy
            .get_or_create(&l)
            .observe(secs);
        self.metrics
            .requests
            .get_or_create(&OutcomeLabels {
                inference_pool: pool.clone(),
                outcome: o.as_str(),
                priority: req.priority,
            })
            .inc();
    }

    /// Band and global occupancy ratios (called with the state locked, after a change).
    fn record_capacity(&self, st: &State, priority: i64, pool: &LabelStr) {
        let m = &self.metrics;
        if let Some(b) = st.bands.get(&priority) {
            let l = BandLabels {
                inference_pool: pool.clone(),
                priority,
            };
            m.capacity_requests
                .get_or_create(&l)
                .set(b.len as f64 / b.settings.max_requests.max(1) as f64);
            m.capacity_bytes
                .get_or_create(&l)
                .set(b.bytes as f64 / b.settings.max_bytes.max(1) as f64);
        }
        let p = PoolLabels {
            inference_pool: pool.clone(),
        };
        if self.settings.max_requests > 0 {
            m.global_capacity_requests
                .get_or_create(&p)
                .set(st.len as f64 / self.settings.max_requests as f64);
        }
        if self.settings.max_bytes > 0 {
            m.global_capacity_bytes
                .get_or_create(&p)
                .set(st.bytes as f64 / self.settings.max_bytes as f64);
        }
    }

    /// Take one item out of its queue (eviction or cancellation). `false`: it is not queued
    /// any more (already dispatched or removed).
    fn remove(&self, priority: i64, flow: &Arc<str>, key: (u64, u64), pool: &LabelStr) -> bool {
        let mut st = self.state.lock();
        let Some(band) = st.bands.get_mut(&priority) else {
            return false;
        };
        let Some(q) = band.flows.get_mut(flow) else {
            return false;
        };
        let Some(item) = q.items.remove(&key) else {
            return false;
        };
        if q.items.is_empty() {
            band.flows.remove(flow);
        }
        self.account_removed(&mut st, priority, &item, pool);
        true
    }

    fn account_removed(&self, st: &mut State, priority: i64, item: &Item, pool: &LabelStr) {
        if let Some(band) = st.bands.get_mut(&priority) {
            band.len -= 1;
            band.bytes -= item.bytes;
        }
        st.len -= 1;
        st.bytes -= item.bytes;
        self.queued.fetch_sub(1, Ordering::AcqRel);
        twin_add(&self.metrics.queue_size, &item.labels, -1);
        twin_add(
            &self.metrics.queue_bytes,
            &item.labels,
            -(item.bytes as i64),
        );
        self.record_capacity(st, priority, pool);
        if st
            .bands
            .get(&priority)
            .is_some_and(|b| b.len == 0 && !b.configured)
        {
            st.bands.remove(&priority);
        }
    }

    /// Records that a request of `priority` arrived at `now`; returns the active priority domain
    /// (highest first) when the usage-limit policy needs one, else nothing.
    fn note_priority(&self, priority: i64, now: Instant) -> Vec<i64> {
        if !self.settings.usage_limit.needs_domain() {
            return Vec::new();
        }
        {
            let mut seen = self.seen.lock();
            match seen.iter_mut().find(|(p, _)| *p == priority) {
                Some(e) => e.1 = now,
                None => {
                    if seen.len() >= MAX_SEEN_PRIORITIES {
                        if let Some(i) = (0..seen.len()).min_by_key(|i| seen[*i].1) {
                            seen.swap_remove(i);
                        }
                    }
                    seen.push((priority, now));
                }
            }
        }
        self.domain(now)
    }

    /// The priorities seen within [`ACTIVE_PRIORITY_WINDOW`], highest first (empty when the
    /// policy needs none).
    fn domain(&self, now: Instant) -> Vec<i64> {
        if !self.settings.usage_limit.needs_domain() {
            return Vec::new();
        }
        let mut d: Vec<i64> = self
            .seen
            .lock()
            .iter()
            .filter(|(_, t)| now.saturating_duration_since(*t) < ACTIVE_PRIORITY_WINDOW)
            .map(|(p, _)| *p)
            .collect();
        d.sort_unstable_by(|a, b| b.cmp(a));
        d
    }

    /// Let queued requests through while the pool reads below the usage limit: highest band
    /// first, the flow its fairness policy picks, that flow's first request.
    fn dispatch_cycle(self: &Arc<Self>) {
        if self.queued.load(Ordering::Acquire) == 0 {
            return;
        }
        let started = std::time::Instant::now();
        let snap = self.datastore.snapshot();
        let pool = LabelStr::from(self.datastore.pool_name().as_str());
        let domain = self.domain(Instant::now());
        let mut st = self.state.lock();
        while st.len > 0 {
            let sat = self.measure(&snap, &pool);
            let Some((&priority, band)) = st.bands.iter_mut().rev().find(|(_, b)| b.len > 0) else {
                break;
            };
            // The highest band with work; when it is gated, so is every band below it (their
            // ceilings are no higher).
            if sat.effective >= self.settings.usage_limit.ceiling(priority, &domain) {
                break;
            }
            let picked = band
                .settings
                .fairness
                .pick(&band.flows, band.cursor.as_deref())
                .and_then(|id| band.flows.get_key_value(id))
                .map(|(k, _)| k.clone());
            let Some(flow) = picked else {
                break;
            };
            let Some(q) = band.flows.get_mut(&flow) else {
                break;
            };
            let Some((_, item)) = q.items.pop_first() else {
                band.flows.remove(&flow);
                continue;
            };
            if q.items.is_empty() {
                band.flows.remove(&flow);
            }
            band.cursor = Some(flow);
            self.account_removed(&mut st, priority, &item, &pool);
            let Item { tx, .. } = item;
            if let Err(t) = tx.send(Transit::new(self)) {
                // The waiter is gone; its drop counts the cancellation.
                t.release_quiet();
            }
        }
        drop(st);
        let secs = started.elapsed().as_secs_f64();
        self.metrics.dispatch_cycle.llmd.observe(secs);
        self.metrics.dispatch_cycle.legacy.observe(secs);
    }
}

impl Admission for FlowController {
    fn admit<'a>(
        &'a self,
        req: &'a AdmissionRequest<'a>,
    ) -> BoxFuture<'a, Result<Admitted, RouteError>> {
        Box::pin(async move {
            let id = req.identity;
            let (o, t) = self
                .enqueue_and_wait(FlowRequest {
                    fairness_id: id.fairness_id.clone(),
                    priority: id.priority,
                    bytes: req.body_bytes as u64,
                    model_name: id.model_name.clone(),
                    target_model_name: id.target_model_name.clone(),
                })
                .await;
            match (o.refusal(), t) {
                (None, Some(t)) => Ok(Admitted::with_transit(t)),
                (None, None) => Ok(Admitted::now()),
                (Some(e), _) => Err(e),
            }
        })
    }

    fn released(&self) {
        self.shared.dispatch_cycle();
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::config::EndpointPickerConfig;
    use crate::datastore::{DatastoreWriter, EndpointSpec, HealthConfig, InFlight};
    use prometheus_client::registry::Registry;

    /// One healthy endpoint, as a snapshot shows it.
    pub(crate) fn one_endpoint() -> EndpointView {
        let w = DatastoreWriter::new(HealthConfig::default());
        w.set_endpoints(vec![EndpointSpec::new("10.0.0.1:8000")]);
        w.record_scrape("10.0.0.1:8000", Ok(Default::default()));
        w.snapshot().endpoints[0].clone()
    }

    pub(crate) struct Pool {
        pub w: DatastoreWriter,
        pub fc: Arc<FlowController>,
        pub registry: Registry,
    }

    impl Pool {
        /// `n` endpoints taking one request each (`concurrency-detector`, maxConcurrency 1),
        /// `flow` the rest of the `flowControl` section, `plugins` extra plugin entries.
        pub(crate) fn new(n: usize, plugins: &str, flow: &str) -> Self {
            let w = DatastoreWriter::new(HealthConfig::default());
            let specs: Vec<_> = (0..n)
                .map(|i| EndpointSpec::new(format!("10.0.0.{}:8000", i + 1)))
                .collect();
            w.set_endpoints(specs.clone());
            for s in &specs {
                w.record_scrape(&s.address, Ok(Default::default()));
            }
            let yaml = format!(
                "apiVersion: llm-d.ai/v1alpha1\nkind: EndpointPickerConfig\nfeatureGates: [flowControl]\nplugins:\n- type: concurrency-detector\n  parameters:\n    maxConcurrency: 1\n{plugins}flowControl:\n  saturationDetector:\n    pluginRef: concurrency-detector\n{flow}"
            );
            let cfg = EndpointPickerConfig::from_yaml(&yaml).unwrap();
            let settings = FlowSettings::from_config(&cfg).unwrap();
            let mut registry = Registry::default();
            let m = Arc::new(FlowControlMetrics::register(&mut registry));
            let fc = FlowController::new(settings, w.reader(), m);
            Self { w, fc, registry }
        }

        pub(crate) fn busy(&self, i: usize) -> InFlight {
            InFlight::new(self.w.snapshot().endpoints[i].endpoint.clone())
        }

        pub(crate) fn text(&self) -> String {
            let mut s = String::new();
            prometheus_client::encoding::text::encode(&mut s, &self.registry).unwrap();
            s
        }

        /// A request of `flow` at `priority`, run as the director would: on dispatch it takes
        /// endpoint 0 (held in the returned guard).
        pub(crate) fn send(
            &self,
            flow: &str,
            priority: i64,
            bytes: u64,
        ) -> tokio::task::JoinHandle<(Outcome, Option<InFlight>)> {
            let fc = self.fc.clone();
            let ds = self.w.reader();
            let req = req(flow, priority, bytes);
            tokio::spawn(async move {
                let (o, t) = fc.enqueue_and_wait(req).await;
                let ep = ds.snapshot().endpoints.first().map(|e| e.endpoint.clone());
                let g = ep.filter(|_| o == Outcome::Dispatched).map(InFlight::new);
                drop(t);
                (o, g)
            })
        }
    }

    pub(crate) fn req(flow: &str, priority: i64, bytes: u64) -> FlowRequest {
        FlowRequest {
            fairness_id: flow.into(),
            priority,
            bytes,
            model_name: "m".into(),
            target_model_name: "m".into(),
        }
    }

    /// Let spawned tasks run until they block.
    pub(crate) async fn settle() {
        for _ in 0..20 {
            tokio::task::yield_now().await;
        }
    }

    fn sample(text: &str, prefix: &str) -> f64 {
        text.lines()
            .filter(|l| l.starts_with(prefix))
            .filter_map(|l| l.rsplit_once(' ')?.1.parse::<f64>().ok())
            .sum()
    }

    #[tokio::test(start_paused = true)]
    async fn priority_holdback_keeps_the_last_capacity_for_higher_priorities() {
        // Four endpoints of one slot: saturation is busy slots / 4. Ceilings by rank between
        // 0.5 (lowest active priority) and 1.0 (highest).
        let p = Pool::new(
            4,
            "- type: priority-holdback-policy\n  parameters:\n    minCeiling: 0.5\n",
            "  usageLimitPolicyPluginRef: priority-holdback-policy\n",
        );
        let _b0 = p.busy(0);
        let _b1 = p.busy(1);
        // Only batch traffic so far: nothing to hold back for, it may fill the pool.
        let (o, t) = p.fc.enqueue_and_wait(req("batch", -1, 10)).await;
        assert_eq!(o, Outcome::Dispatched);
        drop(t);
        // A premium request arrives: dispatched at once (its ceiling is 1.0) ...
        let (o, t) = p.fc.enqueue_and_wait(req("premium", 10, 10)).await;
        assert_eq!(o, Outcome::Dispatched);
        drop(t);
        // ... and from now on batch stops at half the pool, where it is.
        let batch = p.send("batch", -1, 10);
        settle().await;
        assert_eq!(p.fc.queued(), 1, "batch held back at saturation 0.5");
        // Premium still goes through while batch waits: the dispatcher serves its band first.
        let (o, t) = p.fc.enqueue_and_wait(req("premium", 10, 10)).await;
        assert_eq!(o, Outcome::Dispatched);
        drop(t);
        assert_eq!(p.fc.queued(), 1);
        // Capacity frees below batch's ceiling: it goes.
        drop(_b1);
        p.fc.released();
        let (o, _g) = batch.await.unwrap();
        assert_eq!(o, Outcome::Dispatched);
        // A minute without premium traffic: it leaves the active domain, and batch may use the
        // whole pool again.
        let _b1 = p.busy(1);
        tokio::time::advance(ACTIVE_PRIORITY_WINDOW + Duration::from_secs(1)).await;
        let (o, _t) = p.fc.enqueue_and_wait(req("batch", -1, 10)).await;
        assert_eq!(o, Outcome::Dispatched);
    }

    #[tokio::test(start_paused = true)]
    async fn an_idle_pool_lets_requests_straight_through() {
        let p = Pool::new(2, "", "");
        let (o, t) = p.fc.enqueue_and_wait(req("a", 0, 10)).await;
        assert_eq!(o, Outcome::Dispatched);
        assert!(t.is_some());
        assert_eq!(p.fc.queued(), 0);
        let text = p.text();
        assert!(text.contains(r#"llm_d_epp_flow_control_requests_total{inference_pool="epp",outcome="Dispatched",priority="0"} 1"#), "{text}");
        assert!(text.contains("inference_extension_flow_control_pool_saturation{inference_pool=\"epp\",stage=\"effective\"}"), "{text}");
    }

    #[tokio::test(start_paused = true)]
    async fn a_saturated_pool_queues_and_a_completion_dispatches() {
        let p = Pool::new(1, "", "");
        let busy = p.busy(0);
        let h = p.send("a", 0, 100);
        settle().await;
        assert_eq!(p.fc.queued(), 1);
        let text = p.text();
        assert_eq!(
            sample(&text, "llm_d_epp_flow_control_queue_size{"),
            1.0,
            "{text}"
        );
        assert_eq!(
            sample(&text, "inference_extension_flow_control_queue_bytes{"),
            100.0
        );
        drop(busy);
        p.fc.released();
        let (o, g) = h.await.unwrap();
        assert_eq!(o, Outcome::Dispatched);
        assert!(g.is_some());
        assert_eq!(p.fc.queued(), 0);
        let text = p.text();
        assert_eq!(sample(&text, "llm_d_epp_flow_control_queue_size{"), 0.0);
        assert_eq!(sample(&text, "llm_d_epp_flow_control_queue_bytes{"), 0.0);
    }

    #[tokio::test(start_paused = true)]
    async fn the_queue_wait_budget_evicts_with_429() {
        let p = Pool::new(1, "", "  defaultRequestTTL: 2s\n");
        let _busy = p.busy(0);
        let started = Instant::now();
        let (o, _) = p.send("a", 0, 1).await.unwrap();
        assert_eq!(o, Outcome::EvictedTTL);
        let waited = started.elapsed();
        assert!(
            waited >= Duration::from_secs(2) && waited < Duration::from_millis(2100),
            "{waited:?}"
        );
        assert_eq!(o.refusal().unwrap().status, 429);
        assert_eq!(p.fc.queued(), 0);
        assert!(p.text().contains(r#"outcome="EvictedTTL",priority="0"} 1"#));
    }

    #[tokio::test(start_paused = true)]
    async fn an_empty_pool_evicts_with_503_after_its_own_budget() {
        let p = Pool::new(
            1,
            "",
            "  defaultRequestTTL: 30s\n  noEndpointRequestTTL: 3s\n  maxRequests: 1\n",
        );
        p.w.set_endpoints(vec![]);
        let started = Instant::now();
        let h = p.send("a", 0, 1);
        settle().await;
        // The global bound is reached while the pool is empty: 503, not 429.
        let (o, _) = p.fc.enqueue_and_wait(req("b", 0, 1)).await;
        assert_eq!(o, Outcome::RejectedNoEndpoints);
        assert_eq!(o.refusal().unwrap().status, 503);
        let (o, _) = h.await.unwrap();
        assert_eq!(o, Outcome::EvictedNoEndpoints);
        assert_eq!(o.refusal().unwrap().status, 503);
        let waited = started.elapsed();
        assert!(
            waited >= Duration::from_secs(3) && waited < Duration::from_secs(4),
            "{waited:?}"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_pool_that_scales_up_dispatches_its_waiting_room() {
        let p = Pool::new(1, "", "  noEndpointRequestTTL: 0s\n");
        p.w.set_endpoints(vec![]);
        let h = p.send("a", 0, 1);
        settle().await;
        tokio::time::sleep(Duration::from_secs(600)).await;
        assert_eq!(p.fc.queued(), 1, "no budget while empty: still waiting");
        p.w.set_endpoints(vec![EndpointSpec::new("10.0.0.9:8000")]);
        p.w.record_scrape("10.0.0.9:8000", Ok(Default::default()));
        let _pump = p.fc.spawn_pump(crate::telemetry::Shutdown::new());
        // The pump sees the datastore change (or its fallback tick) and dispatches.
        let (o, _) = tokio::time::timeout(Duration::from_secs(1), h)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(o, Outcome::Dispatched);
    }

    #[tokio::test(start_paused = true)]
    async fn a_client_that_goes_away_leaves_the_queue_at_once() {
        let p = Pool::new(1, "", "");
        let busy = p.busy(0);
        let h = p.send("a", 0, 7);
        settle().await;
        assert_eq!(p.fc.queued(), 1);
        h.abort();
        let _ = h.await;
        assert_eq!(p.fc.queued(), 0);
        let text = p.text();
        assert!(
            text.contains(r#"outcome="EvictedContextCancelled",priority="0"} 1"#),
            "{text}"
        );
        assert_eq!(sample(&text, "llm_d_epp_flow_control_queue_bytes{"), 0.0);
        // The freed slot goes to the next request, not to the one that left.
        drop(busy);
        let (o, _) = p.send("b", 0, 1).await.unwrap();
        assert_eq!(o, Outcome::Dispatched);
    }

    #[tokio::test(start_paused = true)]
    async fn band_and_global_bounds_reject_with_429() {
        let p = Pool::new(
            1,
            "",
            "  maxBytes: 1k\n  priorityBands:\n  - priority: 0\n    maxRequests: 2\n",
        );
        let _busy = p.busy(0);
        let a = p.send("a", 0, 10);
        let b = p.send("a", 0, 10);
        settle().await;
        let (o, _) = p.fc.enqueue_and_wait(req("a", 0, 10)).await;
        assert_eq!(o, Outcome::RejectedCapacity);
        assert_eq!(o.refusal().unwrap().status, 429);
        // Another band has room, but the global byte bound (1000) does not.
        let (o, _) = p.fc.enqueue_and_wait(req("a", 5, 990)).await;
        assert_eq!(o, Outcome::RejectedCapacity);
        let c = p.send("a", 5, 980);
        settle().await;
        assert_eq!(p.fc.queued(), 3);
        let text = p.text();
        assert!(text.contains(r#"llm_d_epp_flow_control_capacity_utilization_requests{inference_pool="epp",priority="0"} 1"#), "{text}");
        assert!(text.contains(r#"llm_d_epp_flow_control_global_capacity_utilization_bytes{inference_pool="epp"} 1"#), "{text}");
        a.abort();
        b.abort();
        c.abort();
    }

    #[tokio::test(start_paused = true)]
    async fn higher_bands_always_dispatch_first() {
        let p = Pool::new(1, "", "");
        let mut busy = Some(p.busy(0));
        let prios = [0i64, 5, -1, 5, 3, -7, 0, 10, 3, 1];
        let handles: Vec<_> = prios.iter().map(|&pr| (pr, p.send("t", pr, 1))).collect();
        settle().await;
        assert_eq!(p.fc.queued(), prios.len());
        let mut order = Vec::new();
        let mut pending = handles;
        while !pending.is_empty() {
            busy = None;
            drop(busy.take());
            p.fc.released();
            settle().await;
            let i = pending
                .iter()
                .position(|(_, h)| h.is_finished())
                .expect("one dispatched");
            let (pr, h) = pending.remove(i);
            let (o, g) = h.await.unwrap();
            assert_eq!(o, Outcome::Dispatched);
            assert!(
                pending.iter().all(|(_, h)| !h.is_finished()),
                "one slot freed, one request dispatched"
            );
            order.push(pr);
            busy = g;
        }
        let mut sorted = order.clone();
        sorted.sort_by(|a, b| b.cmp(a));
        assert_eq!(
            order, sorted,
            "dispatch order is by priority, highest first"
        );
        drop(busy);
    }

    #[tokio::test(start_paused = true)]
    async fn round_robin_shares_a_band_between_flows() {
        let p = Pool::new(
            1,
            "- type: round-robin-fairness-policy\n",
            "  defaultPriorityBand:\n    fairnessPolicyRef: round-robin-fairness-policy\n",
        );
        let mut busy = Some(p.busy(0));
        // The heavy tenant queues 10 requests before the light one queues 3.
        let mut pending: Vec<_> = (0..10).map(|_| ("heavy", p.send("heavy", 0, 1))).collect();
        settle().await;
        pending.extend((0..3).map(|_| ("light", p.send("light", 0, 1))));
        settle().await;
        let mut order = Vec::new();
        while !pending.is_empty() {
            drop(busy.take());
            p.fc.released();
            settle().await;
            let i = pending.iter().position(|(_, h)| h.is_finished()).unwrap();
            let (f, h) = pending.remove(i);
            busy = h.await.unwrap().1;
            order.push(f);
        }
        assert_eq!(
            &order[..6],
            ["heavy", "light", "heavy", "light", "heavy", "light"]
        );
    }
}

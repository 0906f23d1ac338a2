//! The one datastore: every known endpoint, its health, its scraped model-server state and the
//! picker's own in-flight count. Background tasks (discovery, scraper, health checks) are the
//! only writers; request paths read an immutable [`Snapshot`] published through `arc-swap`, so a
//! pick never takes a lock.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use parking_lot::Mutex;
use serde::{Deserialize, Serialize};
use tokio::time::Instant;

/// The model-server engine behind an endpoint; decides which metric names are scraped.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Engine {
    #[default]
    Vllm,
    Sglang,
    #[serde(alias = "trtllm", alias = "trt-llm")]
    TrtLlm,
}

impl Engine {
    pub fn parse(s: &str) -> Option<Engine> {
        match s.trim().to_ascii_lowercase().as_str() {
            "vllm" | "" => Some(Engine::Vllm),
            "sglang" => Some(Engine::Sglang),
            "trtllm" | "trt-llm" | "tensorrt-llm" => Some(Engine::TrtLlm),
            _ => None,
        }
    }
    pub fn as_str(&self) -> &'static str {
        match self {
            Engine::Vllm => "vllm",
            Engine::Sglang => "sglang",
            Engine::TrtLlm => "trt-llm",
        }
    }
}

/// What discovery knows about an endpoint.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EndpointSpec {
    /// `host:port` the model server listens on (an `ip:port` for ext_proc mode).
    pub address: String,
    /// Stable identity used as the `backend` metric label: pod name in Kubernetes,
    /// `host:port` otherwise.
    #[serde(default)]
    pub name: String,
    #[serde(default)]
    pub engine: Engine,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// The pod's namespace (Kubernetes discovery); with `name` it forms the endpoint's identity
    /// `namespace/name` (see [`Endpoint::id`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    /// The endpoint's data-parallel rank: its position among the pool's target ports (llm-d's
    /// `RankIndex`). A rank's KV events come from the publisher port plus the rank.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub rank: u16,
}

fn is_zero(n: &u16) -> bool {
    *n == 0
}

impl EndpointSpec {
    pub fn new(address: impl Into<String>) -> Self {
        let address = address.into();
        Self {
            name: address.clone(),
            address,
            engine: Engine::Vllm,
            labels: BTreeMap::new(),
            namespace: None,
            rank: 0,
        }
    }
}

/// Backend states, as exported in `epp_backend_health{state}`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum HealthState {
    Healthy,
    Unhealthy,
    Stale,
    Draining,
}

impl HealthState {
    pub fn as_str(&self) -> &'static str {
        match self {
            HealthState::Healthy => "healthy",
            HealthState::Unhealthy => "unhealthy",
            HealthState::Stale => "stale",
            HealthState::Draining => "draining",
        }
    }
}

/// Model-server state scraped from an endpoint's `/metrics`, engine names already mapped.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ModelServerMetrics {
    pub waiting_queue: f64,
    pub running: f64,
    /// KV-cache usage, 0..1.
    pub kv_cache_usage: f64,
    pub running_loras: Vec<String>,
    pub waiting_loras: Vec<String>,
    pub max_loras: Option<u32>,
    pub block_size: Option<u32>,
    pub num_gpu_blocks: Option<u64>,
    /// The models the server reports serving (the `model_name` label of its metrics; at most
    /// [`MAX_REPORTED_MODELS`]), sorted.
    pub models: Vec<String>,
}

/// Most distinct model names kept per endpoint.
pub const MAX_REPORTED_MODELS: usize = 64;

impl Snapshot {
    /// The models the routable endpoints (else the stale ones) report serving, sorted, distinct.
    pub fn served_models(&self) -> Vec<String> {
        let mut names: Vec<String> = self
            .routable()
            .filter_map(|e| e.metrics.as_ref())
            .flat_map(|m| m.models.iter().cloned())
            .collect();
        if names.is_empty() {
            names = self
                .endpoints
                .iter()
                .filter(|e| e.health == HealthState::Stale)
                .filter_map(|e| e.metrics.as_ref())
                .flat_map(|m| m.models.iter().cloned())
                .collect();
        }
        names.sort();
        names.dedup();
        names
    }
}

/// One endpoint's identity plus its lock-free counters. Shared by snapshots and in-flight guards,
/// so a request to an endpoint removed mid-flight still finishes and releases its count.
#[derive(Debug)]
pub struct Endpoint {
    /// Small stable index (prefix-index bit, per-slot arrays). Reused only after the endpoint
    /// is gone and its prefix-index bits are cleared.
    pub slot: usize,
    pub spec: EndpointSpec,
    /// The name as a metric label value (built once; no allocation per observation).
    label: crate::metrics::LabelStr,
    inflight: AtomicUsize,
    /// Requests other picker replicas have in flight here (shared state), as last reported.
    remote_inflight: AtomicUsize,
    scrape_errors: AtomicU64,
    requests: AtomicU64,
    /// What the picker learned of its speed from the responses it relayed (kept across a
    /// change of the endpoint's labels or name).
    service: Arc<crate::service_model::ServiceModel>,
}

impl Endpoint {
    /// The endpoint's learned service rates.
    pub fn service(&self) -> &crate::service_model::ServiceModel {
        &self.service
    }
    /// Requests this replica has in flight here.
    pub fn inflight(&self) -> usize {
        self.inflight.load(Ordering::Relaxed)
    }
    /// Requests in flight here through every picker replica: this one's plus what the others
    /// last reported through the shared state (0 without it). What load scorers and tie-breaks
    /// read.
    pub fn load_inflight(&self) -> usize {
        self.inflight()
            .saturating_add(self.remote_inflight.load(Ordering::Relaxed))
    }
    /// Sets what the other replicas report in flight here.
    pub fn set_remote_inflight(&self, n: usize) {
        self.remote_inflight.store(n, Ordering::Relaxed);
    }
    pub fn scrape_errors(&self) -> u64 {
        self.scrape_errors.load(Ordering::Relaxed)
    }
    /// Requests routed here since discovery added it.
    pub fn routed_requests(&self) -> u64 {
        self.requests.load(Ordering::Relaxed)
    }
    pub fn name(&self) -> &str {
        &self.spec.name
    }
    /// The endpoint's identity as llm-d spells it: `namespace/name` for a Kubernetes pod, the
    /// name alone otherwise (session tokens and per-endpoint plugin state use it).
    pub fn id(&self) -> String {
        match self.spec.namespace.as_deref().filter(|n| !n.is_empty()) {
            Some(ns) => format!("{ns}/{}", self.spec.name),
            None => self.spec.name.clone(),
        }
    }
    /// The name as a metric label value.
    pub fn label(&self) -> &crate::metrics::LabelStr {
        &self.label
    }
    pub fn address(&self) -> &str {
        &self.spec.address
    }
}

/// RAII in-flight count for one routed request; released on drop (completion, abort, reset).
#[derive(Debug)]
pub struct InFlight {
    endpoint: Arc<Endpoint>,
}

impl InFlight {
    pub fn new(endpoint: Arc<Endpoint>) -> Self {
        endpoint.inflight.fetch_add(1, Ordering::Relaxed);
        endpoint.requests.fetch_add(1, Ordering::Relaxed);
        Self { endpoint }
    }
    pub fn endpoint(&self) -> &Arc<Endpoint> {
        &self.endpoint
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.endpoint.inflight.fetch_sub(1, Ordering::Relaxed);
    }
}

/// An endpoint as a pick sees it.
#[derive(Clone, Debug)]
pub struct EndpointView {
    pub endpoint: Arc<Endpoint>,
    pub health: HealthState,
    pub metrics: Option<Arc<ModelServerMetrics>>,
    /// Age of `metrics` when the snapshot was published.
    pub metrics_age: Option<Duration>,
}

impl EndpointView {
    pub fn slot(&self) -> usize {
        self.endpoint.slot
    }
    pub fn waiting(&self) -> f64 {
        self.metrics
            .as_ref()
            .map(|m| m.waiting_queue)
            .unwrap_or(0.0)
    }
    pub fn kv_usage(&self) -> f64 {
        self.metrics
            .as_ref()
            .map(|m| m.kv_cache_usage)
            .unwrap_or(0.0)
    }
}

/// An immutable view of all endpoints, replaced wholesale on every change.
#[derive(Debug, Default)]
pub struct Snapshot {
    pub endpoints: Vec<EndpointView>,
    pub version: u64,
}

impl Snapshot {
    pub fn routable(&self) -> impl Iterator<Item = &EndpointView> {
        self.endpoints
            .iter()
            .filter(|e| e.health == HealthState::Healthy)
    }
}

/// Health thresholds (documented in the README's "Health" section).
#[derive(Clone, Debug)]
pub struct HealthConfig {
    /// Consecutive failures of one source (scrape, probe, or proxied requests) that make an
    /// endpoint unhealthy. A refused connection counts as this many at once.
    pub failure_threshold: u32,
    /// Consecutive successful scrapes (and probes, when probing is on) that bring it back.
    pub success_threshold: u32,
    /// Scraped data older than this makes an endpoint `stale`.
    pub staleness: Duration,
    /// Whether `/health` probes feed the state (off: only scrapes and passive failures do).
    pub probe_enabled: bool,
    /// Whether endpoints are scraped at all (off: the config's data layer collects no metrics;
    /// endpoints are never `stale` and recover on probes alone).
    pub scrape_enabled: bool,
    /// An endpoint taken out by failing routed requests stays out at least this long, however
    /// well its scrapes and probes go (they do not see what requests see). Each further trip
    /// before it has stayed healthy for [`PASSIVE_COOLDOWN_MAX`] doubles the wait, up to that.
    pub passive_cooldown: Duration,
}

/// The longest an endpoint is kept out after repeated passive trips, and how long it must stay
/// healthy for its wait to start over from [`HealthConfig::passive_cooldown`].
pub const PASSIVE_COOLDOWN_MAX: Duration = Duration::from_secs(60);

impl Default for HealthConfig {
    fn default() -> Self {
        Self {
            failure_threshold: 3,
            success_threshold: 2,
            staleness: Duration::from_secs(2),
            probe_enabled: true,
            scrape_enabled: true,
            passive_cooldown: Duration::from_secs(5),
        }
    }
}

/// Which health source an observation came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Source {
    Scrape,
    Probe,
    Passive,
}

#[derive(Debug, Default)]
struct Tracker {
    metrics: Option<Arc<ModelServerMetrics>>,
    metrics_at: Option<Instant>,
    fail: [u32; 3],
    ok_since_trip: [u32; 3],
    unhealthy: bool,
    draining: bool,
    /// Why it is unhealthy (set when it trips).
    reason: Option<String>,
    /// The state last logged, so each change is logged once.
    logged: Option<HealthState>,
    /// Passive trips in a row (without a long healthy spell between them).
    passive_trips: u32,
    /// No recovery before this (set by a passive trip).
    out_until: Option<Instant>,
    /// When it last recovered.
    recovered_at: Option<Instant>,
}

#[derive(Debug)]
struct Inner {
    by_address: HashMap<String, (Arc<Endpoint>, Tracker)>,
    /// Order of first discovery, so snapshots are stable.
    order: Vec<String>,
    free_slots: Vec<usize>,
    next_slot: usize,
    version: u64,
}

type RemovalHook = Box<dyn Fn(usize) + Send + Sync>;

/// The reading side of the datastore: snapshots, change notifications, "synced". Cheap to
/// clone (an `Arc` inside); hand it to anything that only looks.
#[derive(Clone)]
pub struct Datastore {
    shared: Arc<Shared>,
}

struct Shared {
    snapshot: ArcSwap<Snapshot>,
    inner: Mutex<Inner>,
    health: HealthConfig,
    synced: AtomicBool,
    discovery_labels: Mutex<(String, String)>,
    /// The InferencePool's name (the `name` label of the pool metrics).
    pool_name: Mutex<String>,
    on_slot_freed: Mutex<Vec<RemovalHook>>,
    changed: tokio::sync::watch::Sender<u64>,
}

impl std::fmt::Debug for Datastore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Datastore")
            .field("endpoints", &self.snapshot().endpoints.len())
            .finish()
    }
}

/// The one writer of the endpoint set, as kube-rs's reflector has one: not `Clone`, owned by
/// discovery. It hands out [`Datastore`] readers and [`HealthSink`]s for the sources of health
/// observations (scraping, probing, the director's passive feedback).
pub struct DatastoreWriter {
    store: Datastore,
}

impl std::fmt::Debug for DatastoreWriter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("DatastoreWriter").field(&self.store).finish()
    }
}

/// The writer reads too.
impl std::ops::Deref for DatastoreWriter {
    type Target = Datastore;
    fn deref(&self) -> &Datastore {
        &self.store
    }
}

impl DatastoreWriter {
    /// A new, empty datastore.
    pub fn new(health: HealthConfig) -> Self {
        Self {
            store: Datastore::new(health),
        }
    }

    /// A reader of this datastore.
    pub fn reader(&self) -> Datastore {
        self.store.clone()
    }

    /// A sink for health observations of this datastore's endpoints.
    pub fn health_sink(&self) -> HealthSink {
        HealthSink {
            store: self.store.clone(),
        }
    }

    /// Replace the endpoint set; returns (added, removed). Removed endpoints with requests in
    /// flight drain first.
    pub fn set_endpoints(&self, specs: Vec<EndpointSpec>) -> (usize, usize) {
        self.store.set_endpoints(specs)
    }

    /// Discovery has delivered its first complete list.
    pub fn mark_synced(&self) {
        self.store.mark_synced()
    }

    /// Discovery labels for `epp_pods_discovered{namespace,label_selector}`.
    pub fn set_discovery_labels(&self, namespace: &str, label_selector: &str) {
        self.store.set_discovery_labels(namespace, label_selector)
    }

    /// The pool's name, as the pool metrics label it (default `epp`).
    pub fn set_pool_name(&self, name: &str) {
        *self.store.shared.pool_name.lock() = name.to_string();
    }

    /// Register a hook run when an endpoint's slot is released (the prefix index clears it).
    pub fn on_slot_freed(&self, hook: impl Fn(usize) + Send + Sync + 'static) {
        self.store.on_slot_freed(hook)
    }

    /// As [`HealthSink::record_scrape`] (for discovery that also observes).
    pub fn record_scrape(&self, address: &str, result: Result<ModelServerMetrics, FailureKind>) {
        self.store.record_scrape(address, result)
    }

    /// As [`HealthSink::record`].
    pub fn record(&self, address: &str, source: Source, result: Result<(), FailureKind>) {
        self.store.record(address, source, result)
    }

    /// As [`HealthSink::tick`].
    pub fn tick(&self) {
        self.store.tick()
    }
}

/// Where health observations go: scrapes, probes and the outcomes of routed requests. Cheap to
/// clone; it cannot change which endpoints exist.
#[derive(Clone, Debug)]
pub struct HealthSink {
    store: Datastore,
}

impl HealthSink {
    /// A scrape of `address` succeeded with these metrics, or failed.
    pub fn record_scrape(&self, address: &str, result: Result<ModelServerMetrics, FailureKind>) {
        self.store.record_scrape(address, result)
    }

    /// A `/health` probe or a routed request's outcome.
    pub fn record(&self, address: &str, source: Source, result: Result<(), FailureKind>) {
        self.store.record(address, source, result)
    }

    /// Recompute time-dependent states (staleness) and drop drained endpoints.
    pub fn tick(&self) {
        self.store.tick()
    }

    /// A reader of the same datastore.
    pub fn reader(&self) -> Datastore {
        self.store.clone()
    }
}

impl Datastore {
    fn new(health: HealthConfig) -> Self {
        let (changed, _) = tokio::sync::watch::channel(0);
        Self {
            shared: Arc::new(Shared {
                snapshot: ArcSwap::from_pointee(Snapshot::default()),
                inner: Mutex::new(Inner {
                    by_address: HashMap::new(),
                    order: Vec::new(),
                    free_slots: Vec::new(),
                    next_slot: 0,
                    version: 0,
                }),
                health,
                synced: AtomicBool::new(false),
                discovery_labels: Mutex::new(("local".into(), "static".into())),
                pool_name: Mutex::new(crate::metrics::llmd::DEFAULT_POOL_NAME.into()),
                on_slot_freed: Mutex::new(Vec::new()),
                changed,
            }),
        }
    }

    pub fn health_config(&self) -> &HealthConfig {
        &self.shared.health
    }

    /// The current snapshot: a lock-free read.
    pub fn snapshot(&self) -> Arc<Snapshot> {
        self.shared.snapshot.load_full()
    }

    /// A receiver that sees the snapshot version change (discovery and health transitions).
    pub fn subscribe(&self) -> tokio::sync::watch::Receiver<u64> {
        self.shared.changed.subscribe()
    }

    /// Register a hook run when an endpoint's slot is released (the prefix index clears it).
    fn on_slot_freed(&self, hook: impl Fn(usize) + Send + Sync + 'static) {
        self.shared.on_slot_freed.lock().push(Box::new(hook));
    }

    /// Discovery labels for `epp_pods_discovered{namespace,label_selector}`.
    fn set_discovery_labels(&self, namespace: &str, label_selector: &str) {
        *self.shared.discovery_labels.lock() = (namespace.to_string(), label_selector.to_string());
    }
    pub fn discovery_labels(&self) -> (String, String) {
        self.shared.discovery_labels.lock().clone()
    }

    /// The pool's name for the pool metrics' `name` label.
    pub fn pool_name(&self) -> String {
        self.shared.pool_name.lock().clone()
    }

    /// Discovery has produced its first complete list.
    fn mark_synced(&self) {
        self.shared.synced.store(true, Ordering::Release);
        // Wake `wait_synced` and readiness watchers.
        self.shared.changed.send_modify(|_| {});
    }
    /// Wait until discovery has delivered its first complete list.
    pub async fn wait_synced(&self) {
        let mut rx = self.subscribe();
        while !self.is_synced() {
            if rx.changed().await.is_err() {
                return;
            }
        }
    }

    pub fn is_synced(&self) -> bool {
        self.shared.synced.load(Ordering::Acquire)
    }

    /// Endpoints discovery currently lists (draining ones excluded).
    pub fn discovered_count(&self) -> usize {
        let inner = self.shared.inner.lock();
        inner
            .by_address
            .values()
            .filter(|(_, t)| !t.draining)
            .count()
    }

    /// Replace the discovered set. New endpoints are added; missing ones are removed at once if
    /// idle, or marked `draining` until their in-flight requests finish. Returns (added, removed).
    fn set_endpoints(&self, specs: Vec<EndpointSpec>) -> (usize, usize) {
        let mut added = 0;
        let mut removed = 0;
        {
            let mut inner = self.shared.inner.lock();
            let wanted: HashMap<String, EndpointSpec> = specs
                .iter()
                .map(|s| (s.address.clone(), s.clone()))
                .collect();
            // Removals and spec changes.
            let existing: Vec<String> = inner.order.clone();
            for addr in existing {
                match wanted.get(&addr) {
                    None => {
                        let (_, t) = inner.by_address.get_mut(&addr).expect("order in sync");
                        if !t.draining {
                            t.draining = true;
                            removed += 1;
                        }
                    }
                    Some(spec) => {
                        let (ep, t) = inner.by_address.get_mut(&addr).expect("order in sync");
                        t.draining = false;
                        if ep.spec != *spec {
                            // Same address, new identity or labels: keep slot and counters' owner.
                            let slot = ep.slot;
                            *ep = Arc::new(Endpoint {
                                slot,
                                label: spec.name.as_str().into(),
                                spec: spec.clone(),
                                inflight: AtomicUsize::new(ep.inflight()),
                                remote_inflight: AtomicUsize::new(
                                    ep.remote_inflight.load(Ordering::Relaxed),
                                ),
                                scrape_errors: AtomicU64::new(ep.scrape_errors()),
                                requests: AtomicU64::new(ep.routed_requests()),
                                service: ep.service.clone(),
                            });
                        }
                    }
                }
            }
            for spec in specs {
                let addr = spec.address.clone();
                if inner.by_address.contains_key(&addr) {
                    continue;
                }
                let slot = match inner.free_slots.pop() {
                    Some(s) => s,
                    None => {
                        inner.next_slot += 1;
                        inner.next_slot - 1
                    }
                };
                let ep = Arc::new(Endpoint {
                    slot,
                    label: spec.name.as_str().into(),
                    spec,
                    inflight: AtomicUsize::new(0),
                    remote_inflight: AtomicUsize::new(0),
                    scrape_errors: AtomicU64::new(0),
                    requests: AtomicU64::new(0),
                    service: Arc::default(),
                });
                inner
                    .by_address
                    .insert(addr.clone(), (ep, Tracker::default()));
                inner.order.push(addr);
                added += 1;
            }
        }
        self.reap_and_publish();
        (added, removed)
    }

    /// Record a scrape result for an endpoint (by address).
    fn record_scrape(&self, address: &str, result: Result<ModelServerMetrics, FailureKind>) {
        let mut changed = false;
        {
            let mut inner = self.shared.inner.lock();
            let thresholds = &self.shared.health;
            if let Some((ep, t)) = inner.by_address.get_mut(address) {
                match result {
                    Ok(m) => {
                        let m = Arc::new(m);
                        changed |= t.metrics.as_deref() != Some(&*m);
                        t.metrics = Some(m);
                        let was_stale = t.metrics_at.is_none();
                        t.metrics_at = Some(Instant::now());
                        changed |= was_stale;
                        changed |= observe(t, Source::Scrape, true, thresholds);
                    }
                    Err(kind) => {
                        ep.scrape_errors.fetch_add(1, Ordering::Relaxed);
                        changed |= observe_failure(t, Source::Scrape, kind, thresholds);
                    }
                }
            }
        }
        if changed {
            self.reap_and_publish();
        }
    }

    /// Record a `/health` probe or a proxied request outcome.
    fn record(&self, address: &str, source: Source, result: Result<(), FailureKind>) {
        let changed = {
            let mut inner = self.shared.inner.lock();
            let thresholds = &self.shared.health;
            match inner.by_address.get_mut(address) {
                Some((_, t)) => match result {
                    Ok(()) => observe(t, source, true, thresholds),
                    Err(kind) => observe_failure(t, source, kind, thresholds),
                },
                None => false,
            }
        };
        if changed {
            self.reap_and_publish();
        }
    }

    /// Recompute time-dependent states (staleness) and drop drained endpoints; publishes a new
    /// snapshot when anything changed. Called periodically by the scraper.
    fn tick(&self) {
        self.reap_and_publish();
    }

    fn reap_and_publish(&self) {
        let mut freed = Vec::new();
        let snapshot = {
            let mut inner = self.shared.inner.lock();
            // Drop draining endpoints with nothing in flight.
            let gone: Vec<String> = inner
                .order
                .iter()
                .filter(|a| {
                    let (ep, t) = &inner.by_address[*a];
                    t.draining && ep.inflight() == 0
                })
                .cloned()
                .collect();
            for a in &gone {
                if let Some((ep, _)) = inner.by_address.remove(a) {
                    freed.push(ep.slot);
                }
            }
            if !gone.is_empty() {
                inner.order.retain(|a| !gone.contains(a));
            }
            let now = Instant::now();
            let staleness = self.shared.health.staleness;
            let health_cfg = &self.shared.health;
            let Inner {
                by_address, order, ..
            } = &mut *inner;
            let mut endpoints: Vec<EndpointView> = Vec::with_capacity(order.len());
            for a in order.iter() {
                let Some((ep, t)) = by_address.get_mut(a) else {
                    continue;
                };
                let age = t.metrics_at.map(|at| now.saturating_duration_since(at));
                let health = if t.draining {
                    HealthState::Draining
                } else if t.unhealthy {
                    HealthState::Unhealthy
                } else if health_cfg.scrape_enabled && age.is_none_or(|a| a > staleness) {
                    HealthState::Stale
                } else {
                    HealthState::Healthy
                };
                log_change(ep, t, health, health_cfg);
                endpoints.push(EndpointView {
                    endpoint: ep.clone(),
                    health,
                    metrics: t.metrics.clone(),
                    metrics_age: age,
                });
            }
            let old = self.shared.snapshot.load();
            let changed = !gone.is_empty() || old.endpoints.len() != endpoints.len() || {
                old.endpoints.iter().zip(&endpoints).any(|(a, b)| {
                    !Arc::ptr_eq(&a.endpoint, &b.endpoint)
                        || a.health != b.health
                        || !opt_ptr_eq(&a.metrics, &b.metrics)
                })
            };
            if !changed {
                // Only ages moved; still publish so ages stay truthful, but keep the version.
                Arc::new(Snapshot {
                    endpoints,
                    version: inner.version,
                })
            } else {
                inner.version += 1;
                Arc::new(Snapshot {
                    endpoints,
                    version: inner.version,
                })
            }
        };
        let version = snapshot.version;
        self.shared.snapshot.store(snapshot);
        self.shared.changed.send_if_modified(|v| {
            let m = *v != version;
            *v = version;
            m
        });
        if !freed.is_empty() {
            let hooks = self.shared.on_slot_freed.lock();
            for slot in &freed {
                for h in hooks.iter() {
                    h(*slot);
                }
            }
            let mut inner = self.shared.inner.lock();
            inner.free_slots.extend(freed);
        }
    }
}

fn opt_ptr_eq<T>(a: &Option<Arc<T>>, b: &Option<Arc<T>>) -> bool {
    match (a, b) {
        (Some(a), Some(b)) => Arc::ptr_eq(a, b),
        (None, None) => true,
        _ => false,
    }
}

/// How an observation failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FailureKind {
    /// Nothing listens (connection refused): unambiguous, trips at once.
    Refused,
    /// Timeouts, 5xx, unparsable responses: trip after `failure_threshold` in a row.
    Other,
}

fn idx(s: Source) -> usize {
    match s {
        Source::Scrape => 0,
        Source::Probe => 1,
        Source::Passive => 2,
    }
}

/// Returns whether the unhealthy flag changed.
fn observe(t: &mut Tracker, source: Source, _ok: bool, h: &HealthConfig) -> bool {
    let i = idx(source);
    t.fail[i] = 0;
    if !t.unhealthy {
        return false;
    }
    t.ok_since_trip[i] = t.ok_since_trip[i].saturating_add(1);
    let scrape_ok = !h.scrape_enabled || t.ok_since_trip[0] >= h.success_threshold;
    let probe_ok = !h.probe_enabled || t.ok_since_trip[1] >= h.success_threshold;
    let cooled = t.out_until.is_none_or(|u| Instant::now() >= u);
    if scrape_ok && probe_ok && cooled {
        t.unhealthy = false;
        t.out_until = None;
        t.recovered_at = Some(Instant::now());
        t.fail = [0; 3];
        t.ok_since_trip = [0; 3];
        return true;
    }
    false
}

/// Log a health-state change of `ep` once, with the reason (the first state, `stale` before
/// any scrape, is not a change).
fn log_change(ep: &Endpoint, t: &mut Tracker, health: HealthState, h: &HealthConfig) {
    let prev = t.logged.replace(health);
    if prev == Some(health) || (prev.is_none() && health == HealthState::Stale) {
        return;
    }
    let from = prev.map_or("new", |p| p.as_str());
    let (name, to) = (ep.name(), health.as_str());
    match health {
        HealthState::Unhealthy => {
            let reason = t.reason.as_deref().unwrap_or("failure threshold reached");
            tracing::warn!(endpoint = %name, from, to, reason, "endpoint health changed");
        }
        HealthState::Stale => tracing::warn!(
            endpoint = %name,
            from,
            to,
            reason = %format!("no successful scrape within {:?}", h.staleness),
            "endpoint health changed"
        ),
        HealthState::Healthy => {
            let reason = if prev == Some(HealthState::Unhealthy) {
                "recovered: consecutive successful scrapes and probes"
            } else {
                "fresh metrics scraped"
            };
            tracing::info!(endpoint = %name, from, to, reason, "endpoint health changed");
        }
        HealthState::Draining => tracing::info!(
            endpoint = %name,
            from,
            to,
            reason = "removed by discovery; in-flight requests finish",
            "endpoint health changed"
        ),
    }
}

fn source_name(s: Source) -> &'static str {
    match s {
        Source::Scrape => "metrics scrape",
        Source::Probe => "health probe",
        Source::Passive => "proxied request",
    }
}

fn observe_failure(t: &mut Tracker, source: Source, kind: FailureKind, h: &HealthConfig) -> bool {
    let i = idx(source);
    t.fail[i] = t.fail[i].saturating_add(1);
    t.ok_since_trip[i] = 0;
    let trips = kind == FailureKind::Refused || t.fail[i] >= h.failure_threshold;
    if trips && !t.unhealthy {
        t.reason = Some(match kind {
            FailureKind::Refused => format!("connection refused ({})", source_name(source)),
            FailureKind::Other => {
                format!("{} consecutive {} failures", t.fail[i], source_name(source))
            }
        });
        t.unhealthy = true;
        t.ok_since_trip = [0; 3];
        if source == Source::Passive {
            let now = Instant::now();
            let long_healthy = t
                .recovered_at
                .is_none_or(|r| now.saturating_duration_since(r) >= PASSIVE_COOLDOWN_MAX);
            t.passive_trips = if long_healthy {
                1
            } else {
                t.passive_trips.saturating_add(1)
            };
            let wait = h
                .passive_cooldown
                .saturating_mul(1u32 << (t.passive_trips - 1).min(16))
                .min(PASSIVE_COOLDOWN_MAX.max(h.passive_cooldown));
            t.out_until = Some(now + wait);
            if let Some(r) = t.reason.as_mut() {
                r.push_str(&format!("; kept out for at least {wait:?}"));
            }
        }
        return true;
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ds() -> Datastore {
        Datastore::new(HealthConfig::default())
    }

    #[tokio::test]
    async fn add_scrape_healthy_then_refused_then_recover() {
        let d = ds();
        d.set_endpoints(vec![EndpointSpec::new("a:1"), EndpointSpec::new("b:2")]);
        let s = d.snapshot();
        assert_eq!(s.endpoints.len(), 2);
        assert!(s.endpoints.iter().all(|e| e.health == HealthState::Stale));
        d.record_scrape("a:1", Ok(ModelServerMetrics::default()));
        assert_eq!(d.snapshot().endpoints[0].health, HealthState::Healthy);
        d.record_scrape("a:1", Err(FailureKind::Refused));
        assert_eq!(d.snapshot().endpoints[0].health, HealthState::Unhealthy);
        assert_eq!(d.snapshot().endpoints[0].endpoint.scrape_errors(), 1);
        // Recovery needs 2 scrapes and 2 probes.
        d.record_scrape("a:1", Ok(ModelServerMetrics::default()));
        d.record_scrape("a:1", Ok(ModelServerMetrics::default()));
        assert_eq!(d.snapshot().endpoints[0].health, HealthState::Unhealthy);
        d.record("a:1", Source::Probe, Ok(()));
        d.record("a:1", Source::Probe, Ok(()));
        assert_eq!(d.snapshot().endpoints[0].health, HealthState::Healthy);
    }

    #[tokio::test]
    async fn other_failures_need_threshold() {
        let d = ds();
        d.set_endpoints(vec![EndpointSpec::new("a:1")]);
        d.record_scrape("a:1", Ok(ModelServerMetrics::default()));
        d.record("a:1", Source::Passive, Err(FailureKind::Other));
        d.record("a:1", Source::Passive, Err(FailureKind::Other));
        assert_eq!(d.snapshot().endpoints[0].health, HealthState::Healthy);
        d.record("a:1", Source::Passive, Err(FailureKind::Other));
        assert_eq!(d.snapshot().endpoints[0].health, HealthState::Unhealthy);
    }

    #[tokio::test(start_paused = true)]
    async fn staleness_follows_the_clock() {
        let d = ds();
        d.set_endpoints(vec![EndpointSpec::new("a:1")]);
        d.record_scrape("a:1", Ok(ModelServerMetrics::default()));
        assert_eq!(d.snapshot().endpoints[0].health, HealthState::Healthy);
        tokio::time::advance(Duration::from_millis(2100)).await;
        d.tick();
        assert_eq!(d.snapshot().endpoints[0].health, HealthState::Stale);
    }

    #[tokio::test(start_paused = true)]
    async fn failing_requests_keep_an_endpoint_out_longer_each_time() {
        let d = ds();
        d.set_endpoints(vec![EndpointSpec::new("a:1")]);
        let health = || d.snapshot().endpoints[0].health;
        let good_checks = || {
            for _ in 0..2 {
                d.record_scrape("a:1", Ok(ModelServerMetrics::default()));
                d.record("a:1", Source::Probe, Ok(()));
            }
        };
        good_checks();
        assert_eq!(health(), HealthState::Healthy);
        // A backend answering 500 to every request while its /metrics and /health look fine.
        let mut waits = Vec::new();
        for _ in 0..4 {
            for _ in 0..3 {
                d.record("a:1", Source::Passive, Err(FailureKind::Other));
            }
            assert_eq!(health(), HealthState::Unhealthy);
            let t0 = Instant::now();
            // Scrapes and probes keep succeeding; it stays out until the cooldown has passed.
            while health() != HealthState::Healthy {
                tokio::time::advance(Duration::from_millis(100)).await;
                good_checks();
                assert!(t0.elapsed() < Duration::from_secs(120));
            }
            waits.push(t0.elapsed().as_secs());
        }
        assert_eq!(waits, [5, 10, 20, 40]);
        // Healthy for a long spell: the next trip starts over from the base cooldown.
        tokio::time::advance(PASSIVE_COOLDOWN_MAX).await;
        good_checks();
        for _ in 0..3 {
            d.record("a:1", Source::Passive, Err(FailureKind::Other));
        }
        let t0 = Instant::now();
        while health() != HealthState::Healthy {
            tokio::time::advance(Duration::from_millis(100)).await;
            good_checks();
        }
        assert_eq!(t0.elapsed().as_secs(), 5);
    }

    #[tokio::test]
    async fn removal_drains_in_flight_then_frees_slot() {
        let d = ds();
        let freed = Arc::new(Mutex::new(Vec::new()));
        let f2 = freed.clone();
        d.on_slot_freed(move |s| f2.lock().push(s));
        d.set_endpoints(vec![EndpointSpec::new("a:1"), EndpointSpec::new("b:2")]);
        let a = d.snapshot().endpoints[0].endpoint.clone();
        assert_eq!(a.slot, 0);
        let guard = InFlight::new(a.clone());
        assert_eq!(d.set_endpoints(vec![EndpointSpec::new("b:2")]), (0, 1));
        let s = d.snapshot();
        assert_eq!(s.endpoints[0].health, HealthState::Draining);
        assert_eq!(d.discovered_count(), 1);
        drop(guard);
        d.tick();
        assert_eq!(d.snapshot().endpoints.len(), 1);
        assert_eq!(*freed.lock(), vec![0]);
        // The freed slot is reused.
        d.set_endpoints(vec![EndpointSpec::new("b:2"), EndpointSpec::new("c:3")]);
        let s = d.snapshot();
        let c = s
            .endpoints
            .iter()
            .find(|e| e.endpoint.address() == "c:3")
            .unwrap();
        assert_eq!(c.slot(), 0);
    }
}

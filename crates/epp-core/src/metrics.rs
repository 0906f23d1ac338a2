//! The one metrics registry, shared by every front-end: the seed's seven `epp_*` metrics with
//! exactly their names and labels (see `shared/design/METRICS.md`), scheduler internals,
//! per-backend scraped state, build info, process and runtime metrics. Each module registers
//! the families it records (`director::metrics`, `scheduler::metrics`, the gateway's body
//! budget); this module owns the registry, the typed label sets they share, and the
//! scrape-time collectors.
//!
//! Request-path metrics are lock-free handles updated in place. Per-backend state is not copied
//! into gauges: a collector reads the datastore snapshot at scrape time, so a removed backend's
//! series disappear with it and values are never stale.

use std::fmt::Write as _;
use std::sync::Arc;

pub mod llmd;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{
    DescriptorEncoder, EncodeLabelSet, EncodeLabelValue, EncodeMetric, LabelValueEncoder,
};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

use crate::datastore::{Datastore, HealthState};
use crate::director::metrics::RequestMetrics;
use crate::prefix::PrefixIndex;
use crate::request::ApiMethod;
use crate::scheduler::metrics::PluginMetrics;
use crate::scheduler::{DecisionType, PluginObserver};

/// `Content-Type` of the exposition we serve.
pub const CONTENT_TYPE: &str = prometheus_client::encoding::prometheus_text::CONTENT_TYPE;

/// Buckets of `epp_request_duration_seconds`: 50 µs .. 1 s, so sub-millisecond picks resolve.
pub const DECISION_BUCKETS: [f64; 15] = [
    0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
    2.5,
];
/// Buckets of `epp_plugin_duration_seconds`: 1 µs .. 10 ms.
pub const PLUGIN_BUCKETS: [f64; 11] = [
    0.000001, 0.0000025, 0.000005, 0.00001, 0.000025, 0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.01,
];
/// Buckets of end-to-end request duration and TTFT seen through the proxy.
pub const E2E_BUCKETS: [f64; 16] = [
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0,
];

type L1 = [(&'static str, String); 1];
type L2 = [(&'static str, String); 2];

/// A label value shared by reference count: building a label set from it allocates nothing.
#[derive(Clone, Debug, Hash, PartialEq, Eq, PartialOrd, Ord)]
pub struct LabelStr(Arc<str>);

impl LabelStr {
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl From<&str> for LabelStr {
    fn from(s: &str) -> Self {
        Self(Arc::from(s))
    }
}

impl std::borrow::Borrow<str> for LabelStr {
    fn borrow(&self) -> &str {
        &self.0
    }
}

impl std::ops::Deref for LabelStr {
    type Target = str;
    fn deref(&self) -> &str {
        &self.0
    }
}

impl EncodeLabelValue for LabelStr {
    fn encode(&self, encoder: &mut LabelValueEncoder) -> Result<(), std::fmt::Error> {
        encoder.write_str(&self.0)
    }
}

impl EncodeLabelValue for ApiMethod {
    fn encode(&self, encoder: &mut LabelValueEncoder) -> Result<(), std::fmt::Error> {
        encoder.write_str(self.as_str())
    }
}

impl EncodeLabelValue for DecisionType {
    fn encode(&self, encoder: &mut LabelValueEncoder) -> Result<(), std::fmt::Error> {
        encoder.write_str(self.as_str())
    }
}

/// `method`, `status`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    pub method: ApiMethod,
    pub status: u16,
}

/// `method`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct MethodLabels {
    pub method: ApiMethod,
}

/// `decision_type`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DecisionLabels {
    pub decision_type: DecisionType,
}

/// `backend`: an endpoint's name.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct BackendLabels {
    pub backend: LabelStr,
}

/// `plugin_type`, `plugin_name`: built once per configured plugin. The extension point it runs
/// at (`Filter`, `Scorer`, `Picker`) labels llm-d-router's plugin family only.
#[derive(Clone, Debug, Hash, PartialEq, Eq)]
pub struct PluginLabels {
    pub extension_point: &'static str,
    pub plugin_type: &'static str,
    pub plugin_name: LabelStr,
}

impl PluginLabels {
    pub fn new(
        extension_point: &'static str,
        plugin_type: &'static str,
        plugin_name: &str,
    ) -> Self {
        Self {
            extension_point,
            plugin_type,
            plugin_name: plugin_name.into(),
        }
    }
}

impl EncodeLabelSet for PluginLabels {
    fn encode(
        &self,
        encoder: &mut prometheus_client::encoding::LabelSetEncoder,
    ) -> Result<(), std::fmt::Error> {
        [
            ("plugin_type", self.plugin_type),
            ("plugin_name", self.plugin_name.as_str()),
        ]
        .encode(encoder)
    }
}

pub(crate) fn decision_histogram() -> Histogram {
    Histogram::new(DECISION_BUCKETS)
}
pub(crate) fn plugin_histogram() -> Histogram {
    Histogram::new(PLUGIN_BUCKETS)
}
pub(crate) fn e2e_histogram() -> Histogram {
    Histogram::new(E2E_BUCKETS)
}

/// The one metrics registry, and the handles of the modules that record into it.
pub struct Metrics {
    registry: Registry,
    requests: RequestMetrics,
    plugins: PluginMetrics,
    llmd: llmd::LlmdMetrics,
    tokenizer: crate::scheduler::plugins::TokenizerMetrics,
    flow_control: Arc<crate::admission::metrics::FlowControlMetrics>,
    disagg: crate::scheduler::disagg_metrics::DisaggMetrics,
    /// Where the request-body budget reports itself.
    pub body_budget: crate::gateway::BudgetMeters,
    certificates: Certificates,
    shared_state: SharedState,
}

/// Replication's counters, once `--shared-state` runs.
type SharedState = Arc<parking_lot::RwLock<Option<Arc<crate::replication::Stats>>>>;

/// The TLS ports whose certificate validity is exported.
type Certificates = Arc<parking_lot::RwLock<Vec<Arc<crate::tls::CertStatus>>>>;

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

impl Metrics {
    /// Register every metric: each module registers its own families, and `datastore` and
    /// `prefix` feed the scrape-time collector.
    pub fn new(datastore: Datastore, prefix: Arc<PrefixIndex>) -> Arc<Self> {
        Self::with_precise(datastore, prefix, None)
    }

    /// As [`new`](Self::new), with the precise prefix index's families when one runs.
    pub fn with_precise(
        datastore: Datastore,
        prefix: Arc<PrefixIndex>,
        precise: Option<&Arc<crate::precise::PrecisePrefix>>,
    ) -> Arc<Self> {
        let mut registry = Registry::default();
        if let Some(p) = precise {
            p.register(&mut registry);
        }
        let requests = RequestMetrics::register(&mut registry);
        let plugins = PluginMetrics::register(&mut registry);
        let body_budget = crate::gateway::BudgetMeters::register(&mut registry);
        let llmd = llmd::LlmdMetrics::register(&mut registry);
        let tokenizer = crate::scheduler::plugins::TokenizerMetrics::register(&mut registry);
        let flow_control = Arc::new(crate::admission::metrics::FlowControlMetrics::register(
            &mut registry,
        ));
        let disagg = crate::scheduler::disagg_metrics::DisaggMetrics::register(&mut registry);
        registry.register_collector(Box::new(llmd.collector(datastore.clone(), prefix.clone())));
        registry.register_collector(Box::new(StateCollector { datastore, prefix }));
        registry.register_collector(Box::new(ProcessCollector));
        let certificates = Certificates::default();
        registry.register_collector(Box::new(CertCollector(certificates.clone())));
        let shared_state = SharedState::default();
        registry.register_collector(Box::new(crate::replication::metrics::StatsCollector(
            shared_state.clone(),
        )));
        Arc::new(Self {
            registry,
            requests,
            plugins,
            llmd,
            tokenizer,
            flow_control,
            disagg,
            body_budget,
            certificates,
            shared_state,
        })
    }

    /// The `token-producer`'s tokenizer backends (`epp_tokenizer_*`).
    pub fn tokenizer(&self) -> &crate::scheduler::plugins::TokenizerMetrics {
        &self.tokenizer
    }

    /// Prefill/decode disaggregation: the decision families and the proxy's prefill calls.
    pub fn disagg(&self) -> &crate::scheduler::disagg_metrics::DisaggMetrics {
        &self.disagg
    }

    /// llm-d-router's flow-control families (`llm_d_epp_flow_control_*` and twins).
    pub fn flow_control(&self) -> &Arc<crate::admission::metrics::FlowControlMetrics> {
        &self.flow_control
    }

    /// llm-d-router's families and their legacy twins.
    pub fn llmd(&self) -> &llmd::LlmdMetrics {
        &self.llmd
    }

    /// Export the validity of the certificate a TLS port serves
    /// (`epp_tls_certificate_expiry_seconds{port}`, `epp_tls_certificate_valid{port}`).
    pub fn watch_certificate(&self, status: Arc<crate::tls::CertStatus>) {
        self.certificates.write().push(status);
    }

    /// Export replication's counters (`epp_shared_state_*`).
    pub fn watch_shared_state(&self, stats: Arc<crate::replication::Stats>) {
        *self.shared_state.write() = Some(stats);
    }

    /// The whole exposition, Prometheus text format 0.0.4.
    pub fn encode(&self) -> String {
        let mut out = String::with_capacity(16 * 1024);
        if let Err(e) =
            prometheus_client::encoding::prometheus_text::encode(&mut out, &self.registry)
        {
            tracing::error!(error = %e, "encoding metrics failed");
        }
        out
    }
}

/// The request path records through the lifecycle's own handles.
impl std::ops::Deref for Metrics {
    type Target = RequestMetrics;
    fn deref(&self) -> &RequestMetrics {
        &self.requests
    }
}

impl PluginObserver for Metrics {
    fn observe(&self, labels: &PluginLabels, seconds: f64) {
        self.plugins.observe(labels, seconds);
        self.llmd.observe_plugin(
            &llmd::ExtensionPluginLabels {
                extension_point: labels.extension_point,
                plugin_name: labels.plugin_name.clone(),
                plugin_type: labels.plugin_type,
            },
            seconds,
        );
    }
}

/// Scrape-time view of the datastore and prefix index.
struct StateCollector {
    datastore: Datastore,
    prefix: Arc<PrefixIndex>,
}

impl std::fmt::Debug for StateCollector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("StateCollector")
    }
}

fn gauge_family<'a, T>(
    enc: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    rows: impl IntoIterator<Item = (L1, T)>,
) -> Result<(), std::fmt::Error>
where
    T: prometheus_client::encoding::EncodeGaugeValue + 'a,
    ConstGauge<T>: EncodeMetric,
{
    let mut m = enc.encode_descriptor(
        name,
        help,
        None,
        prometheus_client::metrics::MetricType::Gauge,
    )?;
    for (labels, v) in rows {
        let g = ConstGauge::new(v);
        g.encode(m.encode_family(&labels)?)?;
    }
    Ok(())
}

impl Collector for StateCollector {
    fn encode(&self, mut enc: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let snap = self.datastore.snapshot();
        {
            let mut m = enc.encode_descriptor(
                "epp_backend_health",
                "1 when the backend can be routed to, else 0; `state` names its current state",
                None,
                prometheus_client::metrics::MetricType::Gauge,
            )?;
            for e in &snap.endpoints {
                let v: i64 = (e.health == HealthState::Healthy).into();
                let l: L2 = [
                    ("backend", e.endpoint.name().to_string()),
                    ("state", e.health.as_str().to_string()),
                ];
                ConstGauge::new(v).encode(m.encode_family(&l)?)?;
            }
        }
        {
            let (ns, sel) = self.datastore.discovery_labels();
            let mut m = enc.encode_descriptor(
                "epp_pods_discovered",
                "Endpoints currently known per discovery source",
                None,
                prometheus_client::metrics::MetricType::Gauge,
            )?;
            let l: L2 = [("namespace", ns), ("label_selector", sel)];
            ConstGauge::new(self.datastore.discovered_count() as i64)
                .encode(m.encode_family(&l)?)?;
        }
        let be = |e: &crate::datastore::EndpointView| -> L1 {
            [("backend", e.endpoint.name().to_string())]
        };
        gauge_family(
            &mut enc,
            "epp_backend_queue_size",
            "Waiting requests reported by the model server",
            snap.endpoints
                .iter()
                .filter(|e| e.metrics.is_some())
                .map(|e| (be(e), e.waiting())),
        )?;
        gauge_family(
            &mut enc,
            "epp_backend_running_requests",
            "Running requests reported by the model server",
            snap.endpoints
                .iter()
                .filter_map(|e| e.metrics.as_ref().map(|m| (be(e), m.running))),
        )?;
        gauge_family(
            &mut enc,
            "epp_backend_kv_cache_usage_ratio",
            "KV-cache usage (0..1) reported by the model server",
            snap.endpoints
                .iter()
                .filter(|e| e.metrics.is_some())
                .map(|e| (be(e), e.kv_usage())),
        )?;
        gauge_family(
            &mut enc,
            "epp_backend_inflight_requests",
            "Requests the picker routed to the backend that have not finished",
            snap.endpoints
                .iter()
                .map(|e| (be(e), e.endpoint.inflight() as i64)),
        )?;
        {
            // What the picker learned of each backend's speed (only backends that taught it).
            let priors = crate::service_model::Priors {
                overhead_ms: 0.0,
                prefill_ms_per_token: 0.0,
                queue_ms_per_request: 0.0,
            };
            let learned: Vec<_> = snap
                .endpoints
                .iter()
                .filter(|e| e.endpoint.service().learned())
                .map(|e| (e, e.endpoint.service().rates(&priors)))
                .collect();
            gauge_family(
                &mut enc,
                "epp_backend_prefill_seconds_per_token",
                "Prefill time per uncached prompt token the picker learned from the backend's streamed responses (predicted-ttft-scorer)",
                learned
                    .iter()
                    .filter(|(_, r)| r.prefill_samples > 0)
                    .map(|(e, r)| (be(e), r.prefill_ms_per_token / 1000.0)),
            )?;
            gauge_family(
                &mut enc,
                "epp_backend_queue_seconds_per_request",
                "Extra time to first token per request already in flight that the picker learned for the backend (predicted-ttft-scorer)",
                learned
                    .iter()
                    .filter(|(_, r)| r.queue_samples > 0)
                    .map(|(e, r)| (be(e), r.queue_ms_per_request / 1000.0)),
            )?;
        }
        gauge_family(
            &mut enc,
            "epp_backend_metrics_age_seconds",
            "Seconds since the backend's metrics were last scraped successfully",
            snap.endpoints
                .iter()
                .filter_map(|e| e.metrics_age.map(|a| (be(e), a.as_secs_f64()))),
        )?;
        {
            let mut m = enc.encode_descriptor(
                "epp_backend_scrape_errors",
                "Failed scrapes of the backend's /metrics",
                None,
                prometheus_client::metrics::MetricType::Counter,
            )?;
            for e in &snap.endpoints {
                ConstCounter::new(e.endpoint.scrape_errors()).encode(m.encode_family(&be(e))?)?;
            }
        }
        // The bound in force per backend (what the index really keeps), summed.
        let cap: usize = snap
            .endpoints
            .iter()
            .filter(|e| e.slot() < crate::prefix::MAX_TRACKED_ENDPOINTS)
            .map(|e| self.prefix.capacity_blocks(e.metrics.as_deref()))
            .sum();
        ConstGauge::new(self.prefix.len() as i64).encode(enc.encode_descriptor(
            "epp_prefix_index_blocks",
            "(backend, block) pairs held by the approximate prefix index",
            None,
            prometheus_client::metrics::MetricType::Gauge,
        )?)?;
        ConstGauge::new(cap as i64).encode(enc.encode_descriptor(
            "epp_prefix_index_capacity_blocks",
            "Capacity of the prefix index in force: per backend the smaller of lruCapacityPerServer and the backend's own KV cache (cache_config_info), summed over backends",
            None,
            prometheus_client::metrics::MetricType::Gauge,
        )?)?;
        ConstCounter::new(self.prefix.evictions()).encode(enc.encode_descriptor(
            "epp_prefix_index_evictions",
            "Blocks evicted from the prefix index (LRU)",
            None,
            prometheus_client::metrics::MetricType::Counter,
        )?)?;
        {
            let mut m = enc.encode_descriptor(
                "epp_build_info",
                "Build information; the value is always 1",
                None,
                prometheus_client::metrics::MetricType::Gauge,
            )?;
            let l: L1 = [("version", env!("CARGO_PKG_VERSION").to_string())];
            ConstGauge::new(1i64).encode(m.encode_family(&l)?)?;
        }
        Ok(())
    }
}

/// Process and runtime metrics (Linux `/proc`; absent elsewhere).
#[derive(Debug)]
struct ProcessCollector;

/// Certificate validity per TLS port, computed at scrape time (so expiry shows without a reload).
struct CertCollector(Certificates);

impl std::fmt::Debug for CertCollector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("CertCollector")
    }
}

impl Collector for CertCollector {
    fn encode(&self, mut enc: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let certs = self.0.read();
        if certs.is_empty() {
            return Ok(());
        }
        let port = |c: &crate::tls::CertStatus| -> L1 { [("port", c.port_name().to_string())] };
        gauge_family(
            &mut enc,
            "epp_tls_certificate_expiry_seconds",
            "Seconds until the served TLS certificate's notAfter; negative once it has expired",
            certs
                .iter()
                .filter_map(|c| c.expiry_seconds().map(|s| (port(c), s))),
        )?;
        gauge_family(
            &mut enc,
            "epp_tls_certificate_valid",
            "1 while the served TLS certificate is within its validity period, 0 when expired or not yet valid",
            certs
                .iter()
                .filter_map(|c| c.is_valid().map(|v| (port(c), i64::from(v)))),
        )?;
        Ok(())
    }
}

fn one_gauge(
    enc: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    v: f64,
) -> Result<(), std::fmt::Error> {
    ConstGauge::new(v).encode(enc.encode_descriptor(
        name,
        help,
        None,
        prometheus_client::metrics::MetricType::Gauge,
    )?)
}

impl Collector for ProcessCollector {
    fn encode(&self, mut enc: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        if let Some(p) = crate::procstat::read() {
            ConstCounter::new(p.cpu_seconds).encode(enc.encode_descriptor(
                "process_cpu_seconds",
                "Total user and system CPU time spent in seconds",
                None,
                prometheus_client::metrics::MetricType::Counter,
            )?)?;
            one_gauge(
                &mut enc,
                "process_open_fds",
                "Number of open file descriptors",
                p.open_fds as f64,
            )?;
            if let Some(m) = p.max_fds {
                one_gauge(
                    &mut enc,
                    "process_max_fds",
                    "Maximum number of open file descriptors",
                    m as f64,
                )?;
            }
            one_gauge(
                &mut enc,
                "process_resident_memory_bytes",
                "Resident memory size in bytes",
                p.rss_bytes as f64,
            )?;
            one_gauge(
                &mut enc,
                "process_virtual_memory_bytes",
                "Virtual memory size in bytes",
                p.vsize_bytes as f64,
            )?;
            one_gauge(
                &mut enc,
                "process_start_time_seconds",
                "Start time of the process since unix epoch in seconds",
                p.start_time_seconds,
            )?;
            one_gauge(
                &mut enc,
                "process_threads",
                "Number of OS threads in the process",
                p.threads as f64,
            )?;
        }
        if let Ok(h) = tokio::runtime::Handle::try_current() {
            let m = h.metrics();
            one_gauge(
                &mut enc,
                "epp_runtime_workers",
                "Tokio runtime worker threads (the Go runtime's GOMAXPROCS analogue)",
                m.num_workers() as f64,
            )?;
            one_gauge(
                &mut enc,
                "epp_runtime_alive_tasks",
                "Tokio tasks alive (the go_goroutines analogue)",
                m.num_alive_tasks() as f64,
            )?;
            one_gauge(
                &mut enc,
                "epp_runtime_global_queue_depth",
                "Tasks waiting in the Tokio runtime's global queue",
                m.global_queue_depth() as f64,
            )?;
        }
        Ok(())
    }
}

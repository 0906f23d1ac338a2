//! The precise index's metrics: llm-d-router's `kv_cache_index_*` and `kv_cache_events_*`
//! families under their exact names (`llm_d_epp_…`, with the deprecated `kvcache_…` aliases for
//! the dual-emitted ones), and epp's own `epp_precise_prefix_*` (event errors by reason, index
//! size in keys, entries and bytes, lookups, fallback to the approximate index).
//!
//! As in llm-d, the `kv_cache_index_*` families exist only with
//! `indexerConfig.kvBlockIndexConfig.enableMetrics: true`; the event families whenever the
//! producer runs. `pod_identifier` is the endpoint's identity (`namespace/name`, or its name).

use std::sync::Arc;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric};
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::{ConstGauge, Gauge};
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;

use super::{FallbackReason, PrecisePrefix};

/// Prometheus' default buckets (llm-d's lookup latency uses them).
const DEF_BUCKETS: [f64; 11] = [
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PodLabels {
    pub pod_identifier: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ZmqErrorLabels {
    pub pod_identifier: String,
    pub operation: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SkipLabels {
    pub cache_kind: String,
    pub reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabels {
    pub reason: &'static str,
}

/// An event's type as the `type` label.
#[derive(Clone, Debug, Hash, PartialEq, Eq)]
pub struct TypeLabels(pub &'static str);

impl EncodeLabelSet for TypeLabels {
    fn encode(
        &self,
        encoder: &mut prometheus_client::encoding::LabelSetEncoder,
    ) -> Result<(), std::fmt::Error> {
        [("type", self.0)].encode(encoder)
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabels {
    pub result: &'static str,
}

/// A counter emitted under its current and its deprecated name.
#[derive(Clone, Debug, Default)]
pub struct Dual {
    pub current: Counter,
    pub deprecated: Counter,
}

impl Dual {
    pub fn inc_by(&self, v: u64) {
        if v > 0 {
            self.current.inc_by(v);
            self.deprecated.inc_by(v);
        }
    }
    pub fn get(&self) -> u64 {
        self.current.get()
    }
    fn register(&self, r: &mut Registry, name: &str, old: &str, help: &str) {
        r.register(name, help, self.current.clone());
        r.register(
            old,
            format!("Deprecated: use {name}_total. {help}"),
            self.deprecated.clone(),
        );
    }
}

/// Every handle the precise producer records into.
#[derive(Clone, Debug)]
pub struct PreciseMetrics {
    // llm-d: the index (with enableMetrics).
    pub admissions: Dual,
    pub evictions: Dual,
    pub lookup_requests: Dual,
    pub lookup_hits: Dual,
    pub max_pod_hit_count: Dual,
    pub lookup_latency: Histogram,
    pub lookup_latency_deprecated: Histogram,
    // llm-d: the event pool.
    pub dedup_suppressed: Dual,
    pub dedup_forwarded: Dual,
    pub stores_skipped: Family<SkipLabels, Counter>,
    pub removals_skipped: Family<SkipLabels, Counter>,
    pub active_subscribers: Gauge,
    pub reconnections: Family<PodLabels, Counter>,
    pub messages: Family<PodLabels, Counter>,
    pub zmq_errors: Family<ZmqErrorLabels, Counter>,
    pub queue_depth: Gauge,
    pub capacity: Gauge,
    // epp.
    pub events: Family<TypeLabels, Counter>,
    pub event_errors: Family<ReasonLabels, Counter>,
    pub lookups: Family<ResultLabels, Counter>,
    pub fallback: Family<ReasonLabels, Counter>,
    /// The central socket (`zmqEndpoint`): messages not applied, topics followed.
    pub central_refused: Family<ReasonLabels, Counter>,
    pub central_topics: Gauge,
}

impl Default for PreciseMetrics {
    fn default() -> Self {
        Self {
            admissions: Dual::default(),
            evictions: Dual::default(),
            lookup_requests: Dual::default(),
            lookup_hits: Dual::default(),
            max_pod_hit_count: Dual::default(),
            lookup_latency: Histogram::new(DEF_BUCKETS),
            lookup_latency_deprecated: Histogram::new(DEF_BUCKETS),
            dedup_suppressed: Dual::default(),
            dedup_forwarded: Dual::default(),
            stores_skipped: Family::default(),
            removals_skipped: Family::default(),
            active_subscribers: Gauge::default(),
            reconnections: Family::default(),
            messages: Family::default(),
            zmq_errors: Family::default(),
            queue_depth: Gauge::default(),
            capacity: Gauge::default(),
            events: Family::default(),
            event_errors: Family::default(),
            lookups: Family::default(),
            fallback: Family::default(),
            central_refused: Family::default(),
            central_topics: Gauge::default(),
        }
    }
}

impl PreciseMetrics {
    /// Registers the families (the index's only when `index_metrics`, the central socket's only
    /// when `central`).
    pub fn register(&self, r: &mut Registry, index_metrics: bool, central: bool) {
        if central {
            r.register(
                "epp_precise_prefix_central_refused",
                "Messages on the central KV-event socket (kvEventsConfig.zmqEndpoint) not applied, by reason: topic (not kv@<pod>@<model>), unknown_pod (no discovered endpoint is the topic's pod), ambiguous_pod (several could be), no_slot (the endpoint has no index slot), too_many_topics (the bound on followed topics)",
                self.central_refused.clone(),
            );
            r.register(
                "epp_precise_prefix_central_topics",
                "Topics followed on the central KV-event socket, each mapped to a discovered endpoint with its own sequence",
                self.central_topics.clone(),
            );
        }
        if index_metrics {
            self.admissions.register(
                r,
                "llm_d_epp_kv_cache_index_admissions",
                "kvcache_index_admissions",
                "Total number of KV-block admissions",
            );
            self.evictions.register(
                r,
                "llm_d_epp_kv_cache_index_evictions",
                "kvcache_index_evictions",
                "Total number of KV-block evictions",
            );
            self.lookup_requests.register(
                r,
                "llm_d_epp_kv_cache_index_lookup_requests",
                "kvcache_index_lookup_requests",
                "Total number of lookup calls",
            );
            self.max_pod_hit_count.register(
                r,
                "llm_d_epp_kv_cache_index_max_pod_hit_count",
                "kvcache_index_max_pod_hit_count",
                "Longest contiguous per-pod prefix chain observed per lookup",
            );
            self.lookup_hits.register(
                r,
                "llm_d_epp_kv_cache_index_lookup_hits",
                "kvcache_index_lookup_hits",
                "Contiguous prefix blocks matched by the best pod per lookup",
            );
            r.register(
                "llm_d_epp_kv_cache_index_lookup_latency_seconds",
                "Latency of Lookup calls in seconds",
                self.lookup_latency.clone(),
            );
            r.register(
                "kvcache_index_lookup_latency_seconds",
                "Deprecated: use llm_d_epp_kv_cache_index_lookup_latency_seconds. Latency of Lookup calls in seconds",
                self.lookup_latency_deprecated.clone(),
            );
        }
        self.dedup_suppressed.register(
            r,
            "llm_d_epp_kv_cache_events_dedup_removed_hashes_suppressed",
            "kvcache_kvevents_dedup_removed_hashes_suppressed",
            "Block hashes whose removal was suppressed by the KV-event dedup filter (block hashes, not BlockRemoved events)",
        );
        self.dedup_forwarded.register(
            r,
            "llm_d_epp_kv_cache_events_dedup_removed_hashes_forwarded",
            "kvcache_kvevents_dedup_removed_hashes_forwarded",
            "Block hashes forwarded for eviction after the KV-event dedup filter (block hashes, not BlockRemoved events)",
        );
        r.register(
            "llm_d_epp_kv_cache_events_stores_skipped",
            "Total number of KV-cache store events skipped before prefix indexing",
            self.stores_skipped.clone(),
        );
        r.register(
            "llm_d_epp_kv_cache_events_removals_skipped",
            "Total number of KV-cache removal events skipped for groups excluded from prefix indexing",
            self.removals_skipped.clone(),
        );
        r.register(
            "llm_d_epp_kv_cache_events_active_subscribers",
            "Number of ZMQ subscribers currently managed, including those retrying a failed connection",
            self.active_subscribers.clone(),
        );
        r.register(
            "llm_d_epp_kv_cache_events_subscriber_reconnections",
            "Total number of ZMQ subscriber reconnection attempts",
            self.reconnections.clone(),
        );
        r.register(
            "llm_d_epp_kv_cache_events_messages_received",
            "Total number of messages received from ZMQ subscribers",
            self.messages.clone(),
        );
        r.register(
            "llm_d_epp_kv_cache_events_zmq_errors",
            "Total number of ZMQ subscriber errors",
            self.zmq_errors.clone(),
        );
        r.register(
            "llm_d_epp_kv_cache_events_pool_queue_depth",
            "Total number of messages queued across all worker shards",
            self.queue_depth.clone(),
        );
        r.register(
            "llm_d_epp_kv_cache_events_pool_capacity",
            "Number of worker shards (capacity) in the event processing pool",
            self.capacity.clone(),
        );
        r.register(
            "epp_precise_prefix_events",
            "KV events applied to the precise index, by type",
            self.events.clone(),
        );
        r.register(
            "epp_precise_prefix_event_errors",
            "KV-event stream problems, by reason: decode (a message that could not be read), gap (messages lost and not replayed), restart (a publisher restarted), topic (a topic that is not kv@<pod>@<model>)",
            self.event_errors.clone(),
        );
        r.register(
            "epp_precise_prefix_lookups",
            "Precise lookups of prompts: hit when some endpoint held the first block",
            self.lookups.clone(),
        );
        r.register(
            "epp_precise_prefix_fallback",
            "Scores taken from the approximate index instead of the precise one: per request for no_token_ids, per request and endpoint otherwise (not_subscribed, not_connected, no_events, rebuilding)",
            self.fallback.clone(),
        );
    }

    /// Drops the per-endpoint series of a removed subscription.
    pub fn forget_pod(&self, pod: &str) {
        let l = PodLabels {
            pod_identifier: pod.to_string(),
        };
        self.reconnections.remove(&l);
        self.messages.remove(&l);
        for op in ZMQ_OPERATIONS {
            self.zmq_errors.remove(&ZmqErrorLabels {
                pod_identifier: pod.to_string(),
                operation: op,
            });
        }
    }
}

/// The `operation` values of `kv_cache_events_zmq_errors_total`.
pub const ZMQ_OPERATIONS: [&str; 3] = ["connect", "recv", "replay-incomplete"];

/// Scrape-time gauges of the index and the endpoints' state.
pub struct PreciseCollector(pub Arc<PrecisePrefix>);

impl std::fmt::Debug for PreciseCollector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("PreciseCollector")
    }
}

fn gauge(
    enc: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    v: i64,
) -> Result<(), std::fmt::Error> {
    ConstGauge::new(v).encode(enc.encode_descriptor(name, help, None, MetricType::Gauge)?)
}

impl Collector for PreciseCollector {
    fn encode(&self, mut enc: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let p = &self.0;
        let idx = &p.index;
        gauge(
            &mut enc,
            "epp_precise_prefix_index_keys",
            "Request keys (prompt blocks) the precise index holds",
            idx.len() as i64,
        )?;
        gauge(
            &mut enc,
            "epp_precise_prefix_index_capacity_keys",
            "Request keys the precise index holds at most (inMemoryConfig.size, or costAwareMemoryConfig.size over the measured bytes per key)",
            idx.config().max_keys as i64,
        )?;
        gauge(
            &mut enc,
            "epp_precise_prefix_index_entries",
            "(request key, endpoint, tier) entries held, speculative ones included",
            idx.entries() as i64,
        )?;
        gauge(
            &mut enc,
            "epp_precise_prefix_index_engine_blocks",
            "Engine block mappings held (engine hash to request keys, per endpoint)",
            idx.engine_entries() as i64,
        )?;
        gauge(
            &mut enc,
            "epp_precise_prefix_index_bytes",
            "Estimated heap bytes of the precise index (measured bytes per key × keys)",
            (idx.len() as u64 * super::BYTES_PER_KEY) as i64,
        )?;
        gauge(
            &mut enc,
            "epp_precise_prefix_speculative_pending",
            "Speculative seedings waiting for their TTL or an engine's confirmation",
            idx.speculative_pending() as i64,
        )?;
        ConstCounter::new(idx.capacity_evictions()).encode(enc.encode_descriptor(
            "epp_precise_prefix_index_evictions",
            "Request keys evicted from the precise index to stay within its bound (CLOCK)",
            None,
            MetricType::Counter,
        )?)?;
        let counts = p.liveness.counts();
        let mut m = enc.encode_descriptor(
            "epp_precise_prefix_endpoints_in_fallback",
            "Endpoints scored by the approximate index because their KV events are not flowing, by reason",
            None,
            MetricType::Gauge,
        )?;
        for r in FallbackReason::ENDPOINT {
            let l = [("reason", r.as_str())];
            ConstGauge::new(counts[r as usize] as i64).encode(m.encode_family(&l)?)?;
        }
        Ok(())
    }
}

//! llm-d-router's flow-control families (`llm_d_epp_flow_control_*`) with their legacy twins
//! (`inference_extension_flow_control_*`, which GAIE's dashboard reads): names, labels and
//! buckets from `pkg/epp/metrics/{metrics,llm_d_router_metrics}.go`. Registered in the one
//! registry ([`crate::metrics::Metrics`]); series appear once flow control records them.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;
use std::sync::atomic::AtomicU64;

use crate::metrics::llmd::SCHEDULER_BUCKETS;
use crate::metrics::LabelStr;

/// `request_queue_duration_seconds` buckets.
pub const QUEUE_DURATION_BUCKETS: [f64; 16] = [
    0.0001, 0.0005, 0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
    60.0,
];

fn queue_duration() -> Histogram {
    Histogram::new(QUEUE_DURATION_BUCKETS)
}
fn cycle() -> Histogram {
    Histogram::new(SCHEDULER_BUCKETS)
}

type Hist<L> = Family<L, Histogram, fn() -> Histogram>;
type FGauge<L> = Family<L, Gauge<f64, AtomicU64>>;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct QueueDurationLabels {
    pub fairness_id: LabelStr,
    pub inference_pool: LabelStr,
    pub model_name: LabelStr,
    pub outcome: &'static str,
    pub priority: i64,
    pub target_model_name: LabelStr,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct EnqueueLabels {
    pub fairness_id: LabelStr,
    pub outcome: &'static str,
    pub priority: i64,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct QueueLabels {
    pub fairness_id: LabelStr,
    pub inference_pool: LabelStr,
    pub model_name: LabelStr,
    pub priority: i64,
    pub target_model_name: LabelStr,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StageLabels {
    pub inference_pool: LabelStr,
    pub stage: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DetectorLabels {
    pub detector: LabelStr,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct BandLabels {
    pub inference_pool: LabelStr,
    pub priority: i64,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PoolLabels {
    pub inference_pool: LabelStr,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OutcomeLabels {
    pub inference_pool: LabelStr,
    pub outcome: &'static str,
    pub priority: i64,
}

/// A family and its legacy twin, written together.
#[derive(Debug, Clone)]
pub struct Twin<F> {
    pub llmd: F,
    pub legacy: F,
}

/// Handles for every flow-control family.
#[derive(Debug)]
pub struct FlowControlMetrics {
    pub queue_duration: Twin<Hist<QueueDurationLabels>>,
    pub dispatch_cycle: Twin<Histogram>,
    pub enqueue_duration: Twin<Hist<EnqueueLabels>>,
    pub queue_size: Twin<Family<QueueLabels, Gauge>>,
    pub queue_bytes: Twin<Family<QueueLabels, Gauge>>,
    pub pool_saturation: Twin<FGauge<StageLabels>>,
    pub stale_endpoints: Family<DetectorLabels, Gauge>,
    pub capacity_requests: FGauge<BandLabels>,
    pub capacity_bytes: FGauge<BandLabels>,
    pub global_capacity_requests: FGauge<PoolLabels>,
    pub global_capacity_bytes: FGauge<PoolLabels>,
    pub requests: Family<OutcomeLabels, Counter>,
}

const LLMD: &str = "llm_d_epp_flow_control_";
const LEGACY: &str = "inference_extension_flow_control_";

fn twin<F: Clone + prometheus_client::registry::Metric>(
    r: &mut Registry,
    name: &str,
    help: &str,
    make: impl Fn() -> F,
) -> Twin<F> {
    let llmd = make();
    r.register(format!("{LLMD}{name}"), help, llmd.clone());
    let legacy = make();
    r.register(
        format!("{LEGACY}{name}"),
        format!("[Deprecated: Use {LLMD}{name}] {help}"),
        legacy.clone(),
    );
    Twin { llmd, legacy }
}

impl FlowControlMetrics {
    pub fn register(r: &mut Registry) -> Self {
        let queue_duration = twin(
            r,
            "request_queue_duration_seconds",
            "Distribution of total time requests spend in the Flow Control layer (from enqueue to final outcome)",
            || Hist::<QueueDurationLabels>::new_with_constructor(queue_duration as fn() -> Histogram),
        );
        let dispatch_cycle = twin(
            r,
            "dispatch_cycle_duration_seconds",
            "Distribution of time taken for each internal dispatch cycle in the Flow Control layer",
            cycle,
        );
        let enqueue_duration = twin(
            r,
            "request_enqueue_duration_seconds",
            "Distribution of time taken to enqueue requests into the Flow Control layer",
            || Hist::<EnqueueLabels>::new_with_constructor(cycle as fn() -> Histogram),
        );
        let queue_size = twin(
            r,
            "queue_size",
            "Current number of requests actively held in the Flow Control queue",
            Family::<QueueLabels, Gauge>::default,
        );
        let queue_bytes = twin(
            r,
            "queue_bytes",
            "Current total size in bytes of requests actively held in the Flow Control queue",
            Family::<QueueLabels, Gauge>::default,
        );
        let pool_saturation = twin(
            r,
            "pool_saturation",
            "Pool saturation signal gating Flow Control dispatch. 'decode' (and 'prefill' with role-labelled endpoints) are per-stage signals, 'effective' is their max and gates dispatch. 1.0 is the gating set point; values above 1.0 indicate oversubscription. An empty pool reads as 1.0; with the utilization detector, endpoints with missing or stale metrics score as fully saturated (see llm_d_epp_flow_control_stale_endpoints)",
            FGauge::<StageLabels>::default,
        );
        let stale_endpoints = Family::<DetectorLabels, Gauge>::default();
        r.register(
            format!("{LLMD}stale_endpoints"),
            "Candidate endpoints whose metrics are missing or older than the detector's staleness threshold, as of the latest saturation evaluation (scored as fully saturated)",
            stale_endpoints.clone(),
        );
        let capacity_requests = FGauge::<BandLabels>::default();
        r.register(
            format!("{LLMD}capacity_utilization_requests"),
            "Fraction of a priority band's request-count capacity currently occupied by queued requests (0.0-1.0)",
            capacity_requests.clone(),
        );
        let capacity_bytes = FGauge::<BandLabels>::default();
        r.register(
            format!("{LLMD}capacity_utilization_bytes"),
            "Fraction of a priority band's byte-size capacity currently occupied by queued requests (0.0-1.0)",
            capacity_bytes.clone(),
        );
        let global_capacity_requests = FGauge::<PoolLabels>::default();
        r.register(
            format!("{LLMD}global_capacity_utilization_requests"),
            "Fraction of the global request-count capacity currently occupied across all priority bands (0.0-1.0); only when flowControl.maxRequests is set",
            global_capacity_requests.clone(),
        );
        let global_capacity_bytes = FGauge::<PoolLabels>::default();
        r.register(
            format!("{LLMD}global_capacity_utilization_bytes"),
            "Fraction of the global byte-size capacity currently occupied across all priority bands (0.0-1.0); only when flowControl.maxBytes is set",
            global_capacity_bytes.clone(),
        );
        let requests = Family::<OutcomeLabels, Counter>::default();
        r.register(
            format!("{LLMD}requests"),
            "Total requests processed by the Flow Control layer, once per request after its terminal outcome (Dispatched, RejectedCapacity, RejectedNoEndpoints, EvictedTTL, EvictedNoEndpoints, EvictedContextCancelled)",
            requests.clone(),
        );
        Self {
            queue_duration,
            dispatch_cycle,
            enqueue_duration,
            queue_size,
            queue_bytes,
            pool_saturation,
            stale_endpoints,
            capacity_requests,
            capacity_bytes,
            global_capacity_requests,
            global_capacity_bytes,
            requests,
        }
    }
}

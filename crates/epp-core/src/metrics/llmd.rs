//! llm-d-router's metric families (`llm_d_epp_*`), each with its legacy Gateway API Inference
//! Extension twin (`inference_objective_*`, `inference_pool_*`, `inference_extension_*`) where
//! llm-d-router still emits one, with llm-d-router's names, label names, types and buckets, so
//! its dashboards, GAIE's dashboard and GAIE's alerts read our picker unchanged.
//!
//! The request path records through [`LlmdMetrics`] (called by the director's tracker, never by
//! a front-end); pool state, the prefix index size and build info are written at scrape time
//! by [`LlmdCollector`]. Model and fairness labels come from requests, so both are capped
//! ([`BoundedLabel`]).

use std::collections::HashSet;
use std::sync::{Arc, OnceLock};

use parking_lot::RwLock;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::{ConstGauge, Gauge};
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;

use super::LabelStr;
use crate::datastore::{Datastore, HealthState};
use crate::prefix::PrefixIndex;

/// Distinct values a model label (`model_name`, `target_model_name`) may take.
pub const MAX_MODEL_LABEL_VALUES: usize = 1000;
/// Distinct values the `fairness_id` label may take.
pub const MAX_FAIRNESS_LABEL_VALUES: usize = 1000;
/// What a label value beyond its cap is reported as.
pub const OVERFLOW_LABEL_VALUE: &str = "other";
/// The fairness id of a request without one (llm-d-router's default flow).
pub const DEFAULT_FAIRNESS_ID: &str = "default-flow";
/// The priority of a request without a known `InferenceObjective` (llm-d-router's default); the
/// director sets the objective's priority ([`crate::admission::Objectives`]).
pub const DEFAULT_PRIORITY: i64 = 0;
/// The pool name when discovery names none (llm-d-router's default for pools it synthesizes).
pub const DEFAULT_POOL_NAME: &str = "epp";

/// Caps the distinct values of one request-derived label. A value admitted once is always
/// returned as itself (so paired gauge increments and decrements stay balanced); once `max`
/// values are admitted, every new one is reported as [`OVERFLOW_LABEL_VALUE`]. The empty value
/// passes through and takes no slot.
#[derive(Debug)]
pub struct BoundedLabel {
    seen: RwLock<HashSet<LabelStr>>,
    max: usize,
    overflow: LabelStr,
    empty: LabelStr,
}

impl BoundedLabel {
    pub fn new(max: usize) -> Self {
        Self {
            seen: RwLock::new(HashSet::new()),
            max,
            overflow: OVERFLOW_LABEL_VALUE.into(),
            empty: "".into(),
        }
    }

    /// `v`, or the overflow value once the cap is reached.
    pub fn bound(&self, v: &str) -> LabelStr {
        if v.is_empty() {
            return self.empty.clone();
        }
        {
            let seen = self.seen.read();
            if let Some(s) = seen.get(v) {
                return s.clone();
            }
            if seen.len() >= self.max {
                return self.overflow.clone();
            }
        }
        let mut seen = self.seen.write();
        if let Some(s) = seen.get(v) {
            return s.clone();
        }
        if seen.len() >= self.max {
            return self.overflow.clone();
        }
        let s = LabelStr::from(v);
        seen.insert(s.clone());
        s
    }

    /// Values admitted so far.
    pub fn len(&self) -> usize {
        self.seen.read().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// `generalLatencyBuckets`: 5 ms .. 1 h.
pub const GENERAL_LATENCY_BUCKETS: [f64; 35] = [
    0.005, 0.025, 0.05, 0.1, 0.2, 0.4, 0.6, 0.8, 1.0, 1.25, 1.5, 2.0, 3.0, 4.0, 5.0, 6.0, 8.0,
    10.0, 15.0, 20.0, 30.0, 45.0, 60.0, 120.0, 180.0, 240.0, 300.0, 360.0, 480.0, 600.0, 900.0,
    1200.0, 1800.0, 2700.0, 3600.0,
];
/// Request body sizes: 64 B .. 1 GiB.
pub const REQUEST_SIZE_BUCKETS: [f64; 25] = [
    64.0,
    128.0,
    256.0,
    512.0,
    1024.0,
    2048.0,
    4096.0,
    8192.0,
    16384.0,
    32768.0,
    65536.0,
    131072.0,
    262144.0,
    524288.0,
    1048576.0,
    2097152.0,
    4194304.0,
    8388608.0,
    16777216.0,
    33554432.0,
    67108864.0,
    134217728.0,
    268435456.0,
    536870912.0,
    1073741824.0,
];
/// Response body sizes (llm-d-router's list, `32778` included as it has it).
pub const RESPONSE_SIZE_BUCKETS: [f64; 15] = [
    1.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0, 1024.0, 2048.0, 4096.0, 8192.0, 16384.0,
    32778.0, 65536.0,
];
/// Input and cached token counts.
pub const INPUT_TOKEN_BUCKETS: [f64; 19] = [
    1.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0, 1024.0, 2048.0, 4096.0, 8192.0, 16384.0,
    32778.0, 65536.0, 131072.0, 262144.0, 524288.0, 1048576.0,
];
/// Output token counts.
pub const OUTPUT_TOKEN_BUCKETS: [f64; 12] = [
    1.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0, 1024.0, 2048.0, 4096.0, 8192.0,
];
/// Normalized time per output token.
pub const NTPOT_BUCKETS: [f64; 13] = [
    0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0,
];
/// Time to first token.
pub const TTFT_BUCKETS: [f64; 24] = [
    0.005, 0.025, 0.05, 0.1, 0.2, 0.4, 0.6, 0.8, 1.0, 1.25, 1.5, 2.0, 3.0, 4.0, 5.0, 6.0, 8.0,
    10.0, 15.0, 20.0, 30.0, 45.0, 60.0, 120.0,
];
/// Streaming time per output token.
pub const TPOT_BUCKETS: [f64; 19] = [
    0.0005, 0.00205, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.125, 0.15, 0.2, 0.3, 0.4, 0.5,
    0.6, 0.8, 1.0, 2.0,
];
/// Streaming inter-token latency.
pub const ITL_BUCKETS: [f64; 15] = [
    0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 2.0,
];
/// Scheduler and plugin latency: 100 µs .. 100 ms.
pub const SCHEDULER_BUCKETS: [f64; 10] = [
    0.0001, 0.0002, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1,
];
/// The picker's request processing latency.
pub const REQUEST_PROCESSING_BUCKETS: [f64; 16] = [
    0.0005, 0.001, 0.002, 0.005, 0.01, 0.015, 0.025, 0.04, 0.06, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
    10.0,
];
/// Prefix hit ratio.
pub const PREFIX_HIT_RATIO_BUCKETS: [f64; 11] =
    [0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0];
/// Prefix hit length in bytes.
pub const PREFIX_HIT_BYTES_BUCKETS: [f64; 14] = [
    0.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0, 1024.0, 2048.0, 4096.0, 8192.0, 16384.0, 32768.0,
    65536.0,
];

macro_rules! bucket_ctor {
    ($($f:ident => $b:ident),* $(,)?) => {
        $(fn $f() -> Histogram { Histogram::new($b) })*
    };
}
bucket_ctor!(
    general_latency => GENERAL_LATENCY_BUCKETS,
    request_size => REQUEST_SIZE_BUCKETS,
    response_size => RESPONSE_SIZE_BUCKETS,
    input_token_histogram => INPUT_TOKEN_BUCKETS,
    output_tokens => OUTPUT_TOKEN_BUCKETS,
    ntpot => NTPOT_BUCKETS,
    ttft => TTFT_BUCKETS,
    tpot => TPOT_BUCKETS,
    itl => ITL_BUCKETS,
    scheduler => SCHEDULER_BUCKETS,
    prefix_ratio => PREFIX_HIT_RATIO_BUCKETS,
    prefix_bytes => PREFIX_HIT_BYTES_BUCKETS,
);

type HistFamily<L> = Family<L, Histogram, fn() -> Histogram>;

fn hist_family<L: Clone + std::hash::Hash + Eq>(ctor: fn() -> Histogram) -> HistFamily<L> {
    Family::new_with_constructor(ctor)
}

/// `model_name`, `target_model_name` (the legacy families).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ModelLabels {
    pub model_name: LabelStr,
    pub target_model_name: LabelStr,
}

/// `model_name`, `priority`, `target_model_name` (`inference_objective_request_total`).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ModelPriorityLabels {
    pub model_name: LabelStr,
    pub priority: i64,
    pub target_model_name: LabelStr,
}

/// `error_code`, `model_name`, `target_model_name`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ModelErrorLabels {
    pub error_code: &'static str,
    pub model_name: LabelStr,
    pub target_model_name: LabelStr,
}

/// `model_name` (`inference_objective_running_requests`).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ModelNameLabels {
    pub model_name: LabelStr,
}

/// `fairness_id`, `model_name`, `priority`, `target_model_name` (the `llm_d_epp_request_*`
/// families).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ObjectiveLabels {
    pub fairness_id: LabelStr,
    pub model_name: LabelStr,
    pub priority: i64,
    pub target_model_name: LabelStr,
}

/// [`ObjectiveLabels`] plus `error_code`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ObjectiveErrorLabels {
    pub error_code: &'static str,
    pub fairness_id: LabelStr,
    pub model_name: LabelStr,
    pub priority: i64,
    pub target_model_name: LabelStr,
}

/// [`ObjectiveLabels`] plus `streaming` (`"true"` / `"false"`).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ObjectiveStreamingLabels {
    pub fairness_id: LabelStr,
    pub model_name: LabelStr,
    pub priority: i64,
    pub streaming: &'static str,
    pub target_model_name: LabelStr,
}

/// `endpoint_name`, `namespace`, `port`, `status`, `target_model_name`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SchedulerAttemptLabels {
    pub endpoint_name: LabelStr,
    pub namespace: LabelStr,
    pub port: LabelStr,
    pub status: &'static str,
    pub target_model_name: LabelStr,
}

/// The legacy spelling: `pod_name` for `endpoint_name`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct LegacySchedulerAttemptLabels {
    pub namespace: LabelStr,
    pub pod_name: LabelStr,
    pub port: LabelStr,
    pub status: &'static str,
    pub target_model_name: LabelStr,
}

/// `extension_point`, `plugin_name`, `plugin_type`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ExtensionPluginLabels {
    pub extension_point: &'static str,
    pub plugin_name: LabelStr,
    pub plugin_type: &'static str,
}

/// `plugin_name`, `plugin_type` (the prefix indexer's families).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PrefixPluginLabels {
    pub plugin_name: LabelStr,
    pub plugin_type: &'static str,
}

/// Who a request is, as the request families label it; built once per request.
#[derive(Clone, Debug)]
pub struct RequestIdentity {
    pub model_name: LabelStr,
    pub target_model_name: LabelStr,
    pub fairness_id: LabelStr,
    pub priority: i64,
}

impl RequestIdentity {
    fn objective(&self) -> ObjectiveLabels {
        ObjectiveLabels {
            fairness_id: self.fairness_id.clone(),
            model_name: self.model_name.clone(),
            priority: self.priority,
            target_model_name: self.target_model_name.clone(),
        }
    }
    fn model(&self) -> ModelLabels {
        ModelLabels {
            model_name: self.model_name.clone(),
            target_model_name: self.target_model_name.clone(),
        }
    }
}

/// llm-d-router's canonical error code for an HTTP status the picker answered with.
pub fn error_code_for_status(status: u16) -> &'static str {
    match status {
        400 | 405 | 408 | 413 => "BadRequest",
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "NotFound",
        412 => "PreconditionFailed",
        429 => "ResourceExhausted",
        500 => "Internal",
        503 => "ServiceUnavailable",
        _ => "Unknown",
    }
}

/// The error code of a response the model server answered with a status other than 200.
pub const MODEL_SERVER_ERROR: &str = "ModelServerError";

/// One `llm_d_epp_*` family and its legacy twin, recorded together.
#[derive(Debug)]
struct Twin<L: Clone + std::hash::Hash + Eq, T: Clone + std::hash::Hash + Eq> {
    llmd: HistFamily<L>,
    legacy: HistFamily<T>,
}

impl<L, T> Twin<L, T>
where
    L: Clone + std::hash::Hash + Eq + EncodeLabelSet + std::fmt::Debug + Send + Sync + 'static,
    T: Clone + std::hash::Hash + Eq + EncodeLabelSet + std::fmt::Debug + Send + Sync + 'static,
{
    #[allow(clippy::too_many_arguments)]
    fn register(
        r: &mut Registry,
        name: &str,
        help: &str,
        legacy_name: &str,
        legacy_help: &str,
        ctor: fn() -> Histogram,
    ) -> Self {
        let llmd = hist_family::<L>(ctor);
        r.register(name, help, llmd.clone());
        let legacy = hist_family::<T>(ctor);
        r.register(legacy_name, legacy_help, legacy.clone());
        Self { llmd, legacy }
    }
}

/// Handles for everything the request path records into llm-d-router's families.
#[derive(Debug)]
pub struct LlmdMetrics {
    models: BoundedLabel,
    fairness: BoundedLabel,
    requests: Family<ObjectiveLabels, Counter>,
    requests_legacy: Family<ModelPriorityLabels, Counter>,
    errors: Family<ObjectiveErrorLabels, Counter>,
    errors_legacy: Family<ModelErrorLabels, Counter>,
    duration: Twin<ObjectiveLabels, ModelLabels>,
    request_size: Twin<ObjectiveLabels, ModelLabels>,
    response_size: Twin<ObjectiveLabels, ModelLabels>,
    input_tokens: Twin<ObjectiveLabels, ModelLabels>,
    output_tokens: Twin<ObjectiveLabels, ModelLabels>,
    cached_tokens: Twin<ObjectiveLabels, ModelLabels>,
    ntpot: Twin<ObjectiveLabels, ModelLabels>,
    running: Family<ObjectiveLabels, Gauge>,
    running_legacy: Family<ModelNameLabels, Gauge>,
    ttft: HistFamily<ObjectiveStreamingLabels>,
    tpot: HistFamily<ObjectiveLabels>,
    itl: HistFamily<ObjectiveLabels>,
    processing: Histogram,
    scheduler_e2e: Histogram,
    scheduler_e2e_legacy: Histogram,
    attempts: Family<SchedulerAttemptLabels, Counter>,
    attempts_legacy: Family<LegacySchedulerAttemptLabels, Counter>,
    plugins: Twin<ExtensionPluginLabels, ExtensionPluginLabels>,
    hit_ratio: HistFamily<PrefixPluginLabels>,
    hit_ratio_legacy: Histogram,
    hit_bytes: HistFamily<PrefixPluginLabels>,
    hit_bytes_legacy: Histogram,
    /// The prefix plugin the index belongs to, once the scheduler is built.
    prefix_plugin: Arc<OnceLock<PrefixPluginLabels>>,
}

impl LlmdMetrics {
    /// Register the request-path families in `r`.
    pub fn register(r: &mut Registry) -> Self {
        let requests = Family::<ObjectiveLabels, Counter>::default();
        r.register(
            "llm_d_epp_request",
            "Requests the picker routed, by model, target model, fairness id and priority",
            requests.clone(),
        );
        let requests_legacy = Family::<ModelPriorityLabels, Counter>::default();
        r.register(
            "inference_objective_request",
            "Legacy twin of llm_d_epp_request_total: routed requests by model, target model and priority",
            requests_legacy.clone(),
        );
        let errors = Family::<ObjectiveErrorLabels, Counter>::default();
        r.register(
            "llm_d_epp_request_error",
            "Requests that failed, by error_code: the picker refused them, or the model server answered other than 200 (ModelServerError)",
            errors.clone(),
        );
        let errors_legacy = Family::<ModelErrorLabels, Counter>::default();
        r.register(
            "inference_objective_request_error",
            "Legacy twin of llm_d_epp_request_error_total",
            errors_legacy.clone(),
        );
        let duration = Twin::register(
            r,
            "llm_d_epp_request_duration_seconds",
            "From receiving the request to the end of its response, in seconds",
            "inference_objective_request_duration_seconds",
            "Legacy twin of llm_d_epp_request_duration_seconds",
            general_latency,
        );
        let request_size = Twin::register(
            r,
            "llm_d_epp_request_size_bytes",
            "Request body size in bytes",
            "inference_objective_request_sizes",
            "Legacy twin of llm_d_epp_request_size_bytes",
            request_size,
        );
        let response_size = Twin::register(
            r,
            "llm_d_epp_response_size_bytes",
            "Response body size in bytes, as the model server sent it",
            "inference_objective_response_sizes",
            "Legacy twin of llm_d_epp_response_size_bytes",
            response_size,
        );
        let input_tokens = Twin::register(
            r,
            "llm_d_epp_request_input_tokens",
            "Prompt tokens per request (usage.prompt_tokens of the response)",
            "inference_objective_input_tokens",
            "Legacy twin of llm_d_epp_request_input_tokens",
            input_token_histogram,
        );
        let output_tokens = Twin::register(
            r,
            "llm_d_epp_request_output_tokens",
            "Completion tokens per request (usage.completion_tokens of the response)",
            "inference_objective_output_tokens",
            "Legacy twin of llm_d_epp_request_output_tokens",
            output_tokens,
        );
        let cached_tokens = Twin::register(
            r,
            "llm_d_epp_request_cached_tokens",
            "Prompt tokens the model server reported read from its cache per request (usage.prompt_tokens_details.cached_tokens)",
            "inference_objective_prompt_cached_tokens",
            "Legacy twin of llm_d_epp_request_cached_tokens",
            input_token_histogram,
        );
        let ntpot = Twin::register(
            r,
            "llm_d_epp_request_ntpot_seconds",
            "Request duration divided by its completion tokens, in seconds",
            "inference_objective_normalized_time_per_output_token_seconds",
            "Legacy twin of llm_d_epp_request_ntpot_seconds",
            ntpot,
        );
        let running = Family::<ObjectiveLabels, Gauge>::default();
        r.register(
            "llm_d_epp_request_running",
            "Requests routed whose response has not ended",
            running.clone(),
        );
        let running_legacy = Family::<ModelNameLabels, Gauge>::default();
        r.register(
            "inference_objective_running_requests",
            "Legacy twin of llm_d_epp_request_running, by model only",
            running_legacy.clone(),
        );
        let ttft_f = hist_family::<ObjectiveStreamingLabels>(ttft);
        r.register(
            "llm_d_epp_request_ttft_seconds",
            "From receiving the request to the first response body byte, in seconds (a non-streamed response: its whole duration)",
            ttft_f.clone(),
        );
        let tpot_f = hist_family::<ObjectiveLabels>(tpot);
        r.register(
            "llm_d_epp_request_streaming_tpot_seconds",
            "Streamed requests: (duration - TTFT) / (completion tokens - 1), in seconds",
            tpot_f.clone(),
        );
        let itl_f = hist_family::<ObjectiveLabels>(itl);
        r.register(
            "llm_d_epp_request_streaming_itl_seconds",
            "Streamed requests: time between consecutive response body chunks, in seconds",
            itl_f.clone(),
        );
        let processing = Histogram::new(REQUEST_PROCESSING_BUCKETS);
        r.register(
            "llm_d_epp_request_processing_duration_seconds",
            "The picker's request processing: from receiving the request to its routing decision or refusal, in seconds",
            processing.clone(),
        );
        let scheduler_e2e = Histogram::new(SCHEDULER_BUCKETS);
        r.register(
            "llm_d_epp_scheduler_e2e_duration_seconds",
            "Time the scheduler took per scheduling attempt, in seconds",
            scheduler_e2e.clone(),
        );
        let scheduler_e2e_legacy = Histogram::new(SCHEDULER_BUCKETS);
        r.register(
            "inference_extension_scheduler_e2e_duration_seconds",
            "Legacy twin of llm_d_epp_scheduler_e2e_duration_seconds",
            scheduler_e2e_legacy.clone(),
        );
        let attempts = Family::<SchedulerAttemptLabels, Counter>::default();
        r.register(
            "llm_d_epp_scheduler_attempts",
            "Scheduling attempts by status (success, failure) and, on success, the picked endpoint",
            attempts.clone(),
        );
        let attempts_legacy = Family::<LegacySchedulerAttemptLabels, Counter>::default();
        r.register(
            "inference_extension_scheduler_attempts",
            "Legacy twin of llm_d_epp_scheduler_attempts_total (pod_name for endpoint_name)",
            attempts_legacy.clone(),
        );
        let plugins = Twin::register(
            r,
            "llm_d_epp_plugin_duration_seconds",
            "Time spent in each plugin per call, by extension point, plugin type and plugin name, in seconds",
            "inference_extension_plugin_duration_seconds",
            "Legacy twin of llm_d_epp_plugin_duration_seconds",
            scheduler,
        );
        let hit_ratio = hist_family::<PrefixPluginLabels>(prefix_ratio);
        r.register(
            "llm_d_epp_prefix_indexer_hit_ratio",
            "Per routed request: prompt prefix length the picked endpoint held, over the prompt's prefix length",
            hit_ratio.clone(),
        );
        let hit_ratio_legacy = Histogram::new(PREFIX_HIT_RATIO_BUCKETS);
        r.register(
            "inference_extension_prefix_indexer_hit_ratio",
            "Legacy twin of llm_d_epp_prefix_indexer_hit_ratio",
            hit_ratio_legacy.clone(),
        );
        let hit_bytes = hist_family::<PrefixPluginLabels>(prefix_bytes);
        r.register(
            "llm_d_epp_prefix_indexer_hit_bytes",
            "Per routed request: bytes of prompt prefix the picked endpoint held, per the prefix index",
            hit_bytes.clone(),
        );
        let hit_bytes_legacy = Histogram::new(PREFIX_HIT_BYTES_BUCKETS);
        r.register(
            "inference_extension_prefix_indexer_hit_bytes",
            "Legacy twin of llm_d_epp_prefix_indexer_hit_bytes",
            hit_bytes_legacy.clone(),
        );
        Self {
            models: BoundedLabel::new(MAX_MODEL_LABEL_VALUES),
            fairness: BoundedLabel::new(MAX_FAIRNESS_LABEL_VALUES),
            requests,
            requests_legacy,
            errors,
            errors_legacy,
            duration,
            request_size,
            response_size,
            input_tokens,
            output_tokens,
            cached_tokens,
            ntpot,
            running,
            running_legacy,
            ttft: ttft_f,
            tpot: tpot_f,
            itl: itl_f,
            processing,
            scheduler_e2e,
            scheduler_e2e_legacy,
            attempts,
            attempts_legacy,
            plugins,
            hit_ratio,
            hit_ratio_legacy,
            hit_bytes,
            hit_bytes_legacy,
            prefix_plugin: Arc::default(),
        }
    }

    /// The labels of a request: its model and target model (capped), its fairness id (capped;
    /// `default-flow` without one) and the default priority.
    pub fn identity(
        &self,
        model: &str,
        target: &str,
        fairness_id: Option<&str>,
    ) -> RequestIdentity {
        RequestIdentity {
            model_name: self.models.bound(model),
            target_model_name: self.models.bound(target),
            fairness_id: self
                .fairness
                .bound(fairness_id.unwrap_or(DEFAULT_FAIRNESS_ID)),
            priority: DEFAULT_PRIORITY,
        }
    }

    /// A request refused before it had a model (or without one): the identity of no model.
    pub fn anonymous(&self, fairness_id: Option<&str>) -> RequestIdentity {
        self.identity("", "", fairness_id)
    }

    /// The model label limiter (for tests and diagnostics).
    pub fn model_labels(&self) -> &BoundedLabel {
        &self.models
    }

    /// A routed request: counted, its body size observed, and running until [`finished`].
    ///
    /// [`finished`]: Self::finished
    pub fn routed(&self, id: &RequestIdentity, body_bytes: usize) {
        self.requests.get_or_create(&id.objective()).inc();
        self.requests_legacy
            .get_or_create(&ModelPriorityLabels {
                model_name: id.model_name.clone(),
                priority: id.priority,
                target_model_name: id.target_model_name.clone(),
            })
            .inc();
        let size = body_bytes as f64;
        self.request_size
            .llmd
            .get_or_create(&id.objective())
            .observe(size);
        self.request_size
            .legacy
            .get_or_create(&id.model())
            .observe(size);
        if !id.model_name.is_empty() {
            self.running.get_or_create(&id.objective()).inc();
            self.running_legacy
                .get_or_create(&ModelNameLabels {
                    model_name: id.model_name.clone(),
                })
                .inc();
        }
    }

    /// A routed request's response ended (or was abandoned): no longer running.
    pub fn finished(&self, id: &RequestIdentity) {
        if !id.model_name.is_empty() {
            self.running.get_or_create(&id.objective()).dec();
            self.running_legacy
                .get_or_create(&ModelNameLabels {
                    model_name: id.model_name.clone(),
                })
                .dec();
        }
    }

    pub fn error(&self, id: &RequestIdentity, error_code: &'static str) {
        self.errors
            .get_or_create(&ObjectiveErrorLabels {
                error_code,
                fairness_id: id.fairness_id.clone(),
                model_name: id.model_name.clone(),
                priority: id.priority,
                target_model_name: id.target_model_name.clone(),
            })
            .inc();
        self.errors_legacy
            .get_or_create(&ModelErrorLabels {
                error_code,
                model_name: id.model_name.clone(),
                target_model_name: id.target_model_name.clone(),
            })
            .inc();
    }

    /// The end of a routed request's response.
    pub fn response_complete(&self, id: &RequestIdentity, c: &ResponseSummary) {
        let o = id.objective();
        let m = id.model();
        if let Some(u) = &c.usage {
            if u.prompt_tokens > 0 {
                observe_twin(&self.input_tokens, &o, &m, u.prompt_tokens as f64);
            }
            if u.completion_tokens > 0 {
                observe_twin(&self.output_tokens, &o, &m, u.completion_tokens as f64);
            }
            observe_twin(
                &self.cached_tokens,
                &o,
                &m,
                u.cached_tokens.unwrap_or(0) as f64,
            );
        }
        let completion = c.usage.as_ref().map_or(0, |u| u.completion_tokens);
        if c.seconds > 0.0 {
            if completion > 0 {
                observe_twin(&self.ntpot, &o, &m, c.seconds / completion as f64);
            }
            observe_twin(&self.duration, &o, &m, c.seconds);
        }
        observe_twin(&self.response_size, &o, &m, c.response_bytes as f64);
        if let Some(first) = c.first_byte_seconds.filter(|f| *f > 0.0) {
            self.ttft
                .get_or_create(&ObjectiveStreamingLabels {
                    fairness_id: id.fairness_id.clone(),
                    model_name: id.model_name.clone(),
                    priority: id.priority,
                    streaming: if c.streaming { "true" } else { "false" },
                    target_model_name: id.target_model_name.clone(),
                })
                .observe(first);
            if c.streaming && completion > 1 && c.seconds > first {
                self.tpot
                    .get_or_create(&o)
                    .observe((c.seconds - first) / (completion - 1) as f64);
            }
        }
    }

    /// Streamed requests: seconds between two consecutive response chunks.
    pub fn inter_chunk(&self, id: &RequestIdentity, seconds: f64) {
        self.itl.get_or_create(&id.objective()).observe(seconds);
    }

    /// The picker's processing of one request, routed or refused.
    pub fn observe_processing(&self, seconds: f64) {
        self.processing.observe(seconds);
    }

    /// One scheduling attempt: how long it took, and the endpoint picked (`None`: it failed).
    pub fn scheduled(&self, seconds: f64, target: &LabelStr, picked: Option<(&str, &str, &str)>) {
        self.scheduler_e2e.observe(seconds);
        self.scheduler_e2e_legacy.observe(seconds);
        let (status, (name, ns, port)) = match picked {
            Some(p) => ("success", p),
            None => ("failure", ("", "", "")),
        };
        let (name, ns, port): (LabelStr, LabelStr, LabelStr) =
            (name.into(), ns.into(), port.into());
        self.attempts
            .get_or_create(&SchedulerAttemptLabels {
                endpoint_name: name.clone(),
                namespace: ns.clone(),
                port: port.clone(),
                status,
                target_model_name: target.clone(),
            })
            .inc();
        self.attempts_legacy
            .get_or_create(&LegacySchedulerAttemptLabels {
                namespace: ns,
                pod_name: name,
                port,
                status,
                target_model_name: target.clone(),
            })
            .inc();
    }

    /// Time spent in one plugin call.
    pub fn observe_plugin(&self, labels: &ExtensionPluginLabels, seconds: f64) {
        self.plugins.llmd.get_or_create(labels).observe(seconds);
        self.plugins.legacy.get_or_create(labels).observe(seconds);
    }

    /// Name the prefix plugin the index belongs to (the scheduler's prefix scorer). Without
    /// one, the prefix indexer families stay empty.
    pub fn set_prefix_plugin(&self, plugin_type: &'static str, plugin_name: &str) {
        let _ = self.prefix_plugin.set(PrefixPluginLabels {
            plugin_name: plugin_name.into(),
            plugin_type,
        });
    }

    /// One routed request's prefix match on the picked endpoint, in bytes of prompt.
    pub fn prefix_match(&self, matched_bytes: u64, total_bytes: u64) {
        let Some(l) = self.prefix_plugin.get() else {
            return;
        };
        self.hit_bytes
            .get_or_create(l)
            .observe(matched_bytes as f64);
        self.hit_bytes_legacy.observe(matched_bytes as f64);
        if total_bytes > 0 {
            let ratio = matched_bytes as f64 / total_bytes as f64;
            self.hit_ratio.get_or_create(l).observe(ratio);
            self.hit_ratio_legacy.observe(ratio);
        }
    }

    /// The scrape-time collector of the pool, prefix-size and info families.
    pub fn collector(&self, datastore: Datastore, prefix: Arc<PrefixIndex>) -> LlmdCollector {
        LlmdCollector {
            datastore,
            prefix,
            prefix_plugin: self.prefix_plugin.clone(),
        }
    }
}

fn observe_twin(
    t: &Twin<ObjectiveLabels, ModelLabels>,
    o: &ObjectiveLabels,
    m: &ModelLabels,
    v: f64,
) {
    t.llmd.get_or_create(o).observe(v);
    t.legacy.get_or_create(m).observe(v);
}

/// What the end of a response tells the request families.
#[derive(Debug, Default, Clone)]
pub struct ResponseSummary {
    /// From receiving the request to the end of its response.
    pub seconds: f64,
    /// From receiving the request to the first response body byte, when one came.
    pub first_byte_seconds: Option<f64>,
    pub response_bytes: u64,
    pub streaming: bool,
    pub usage: Option<crate::gateway::usage::Usage>,
}

/// The scrape-time families: pool averages and ready endpoints, per-endpoint queue sizes, the
/// prefix indexer's size, and build info.
pub struct LlmdCollector {
    datastore: Datastore,
    prefix: Arc<PrefixIndex>,
    prefix_plugin: Arc<OnceLock<PrefixPluginLabels>>,
}

impl std::fmt::Debug for LlmdCollector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("LlmdCollector")
    }
}

/// Mean and sample standard deviation, each rounded to two decimals (as llm-d-router reports).
pub fn mean_and_std_dev(values: &[f64]) -> (f64, f64) {
    if values.is_empty() {
        return (0.0, 0.0);
    }
    let n = values.len() as f64;
    let mean = values.iter().sum::<f64>() / n;
    let ss: f64 = values.iter().map(|v| (v - mean) * (v - mean)).sum();
    let sd = (ss / (n - 1.0).max(1.0)).sqrt();
    let r = |x: f64| (x * 100.0).round() / 100.0;
    (r(mean), r(sd))
}

fn gauge<L: EncodeLabelSet>(
    enc: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    rows: &[(L, f64)],
) -> Result<(), std::fmt::Error> {
    let mut m = enc.encode_descriptor(name, help, None, MetricType::Gauge)?;
    for (l, v) in rows {
        ConstGauge::new(*v).encode(m.encode_family(l)?)?;
    }
    Ok(())
}

impl Collector for LlmdCollector {
    fn encode(&self, mut enc: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let snap = self.datastore.snapshot();
        let pool = self.datastore.pool_name();
        let pool_l: [(&str, &str); 1] = [("name", pool.as_str())];
        let ready: Vec<_> = snap
            .endpoints
            .iter()
            .filter(|e| e.health == HealthState::Healthy)
            .filter_map(|e| e.metrics.as_deref())
            .collect();
        for name in ["llm_d_epp_ready_endpoints", "inference_pool_ready_pods"] {
            gauge(
                &mut enc,
                name,
                "Endpoints of the pool that are healthy with fresh model-server metrics",
                &[(pool_l, ready.len() as f64)],
            )?;
        }
        if !ready.is_empty() {
            let kv: Vec<f64> = ready.iter().map(|m| m.kv_cache_usage).collect();
            let queue: Vec<f64> = ready.iter().map(|m| m.waiting_queue).collect();
            let run: Vec<f64> = ready.iter().map(|m| m.running).collect();
            for (values, avg, legacy, sd, what) in [
                (
                    &kv,
                    "llm_d_epp_average_kv_cache_utilization",
                    "inference_pool_average_kv_cache_utilization",
                    "llm_d_epp_std_dev_kv_cache_utilization",
                    "KV-cache utilization (0..1)",
                ),
                (
                    &queue,
                    "llm_d_epp_average_queue_size",
                    "inference_pool_average_queue_size",
                    "llm_d_epp_std_dev_queue_size",
                    "requests waiting in the model servers' queues",
                ),
                (
                    &run,
                    "llm_d_epp_average_running_requests",
                    "inference_pool_average_running_requests",
                    "llm_d_epp_std_dev_running_requests",
                    "requests running on the model servers",
                ),
            ] {
                let (mean, std_dev) = mean_and_std_dev(values);
                let help = format!("Mean over the pool's ready endpoints of the {what}");
                gauge(&mut enc, avg, &help, &[(pool_l, mean)])?;
                gauge(&mut enc, legacy, &help, &[(pool_l, mean)])?;
                gauge(
                    &mut enc,
                    sd,
                    &format!(
                        "Sample standard deviation over the pool's ready endpoints of the {what}"
                    ),
                    &[(pool_l, std_dev)],
                )?;
            }
        }
        for (name, label) in [
            ("llm_d_epp_per_endpoint_queue_size", "model_server_endpoint"),
            ("inference_pool_per_pod_queue_size", "model_server_pod"),
        ] {
            let rows: Vec<([(&str, &str); 2], f64)> = snap
                .endpoints
                .iter()
                .map(|e| {
                    (
                        [("name", pool.as_str()), (label, e.endpoint.name())],
                        e.waiting(),
                    )
                })
                .collect();
            gauge(
                &mut enc,
                name,
                "Requests waiting in each endpoint's model-server queue",
                &rows,
            )?;
        }
        if let Some(p) = self.prefix_plugin.get() {
            let size = self.prefix.len() as f64;
            gauge(
                &mut enc,
                "llm_d_epp_prefix_indexer_size",
                "(endpoint, block) entries held by the prefix index",
                &[(p.clone(), size)],
            )?;
            gauge(
                &mut enc,
                "inference_extension_prefix_indexer_size",
                "Legacy twin of llm_d_epp_prefix_indexer_size",
                &[([("", ""); 0], size)],
            )?;
        }
        let info: [(&str, &str); 2] = [("build_ref", BUILD_REF), ("commit", BUILD_COMMIT)];
        for name in ["llm_d_epp_info", "inference_extension_info"] {
            gauge(
                &mut enc,
                name,
                "Build information; the value is always 1",
                &[(info, 1.0)],
            )?;
        }
        Ok(())
    }
}

/// `commit` of the info families: the git commit the binary was built from, when the build
/// passed it in `EPP_GIT_COMMIT`.
pub const BUILD_COMMIT: &str = match option_env!("EPP_GIT_COMMIT") {
    Some(c) => c,
    None => "unknown",
};
/// `build_ref` of the info families: the release version.
pub const BUILD_REF: &str = concat!("v", env!("CARGO_PKG_VERSION"));

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn model_labels_are_capped_at_1000_then_other() {
        let b = BoundedLabel::new(MAX_MODEL_LABEL_VALUES);
        for i in 0..MAX_MODEL_LABEL_VALUES {
            assert_eq!(b.bound(&format!("m{i}")).as_str(), format!("m{i}"));
        }
        assert_eq!(b.len(), 1000);
        assert_eq!(b.bound("m1000").as_str(), "other");
        assert_eq!(b.bound("another").as_str(), "other");
        // Admitted values stay themselves, and the empty value takes no slot.
        assert_eq!(b.bound("m0").as_str(), "m0");
        assert_eq!(b.bound("m999").as_str(), "m999");
        assert_eq!(b.bound("").as_str(), "");
        assert_eq!(b.len(), 1000);
    }

    #[test]
    fn request_identity_caps_models_and_defaults_fairness() {
        let mut r = Registry::default();
        let m = LlmdMetrics::register(&mut r);
        for i in 0..MAX_MODEL_LABEL_VALUES {
            m.identity(&format!("m{i}"), &format!("m{i}"), None);
        }
        let id = m.identity("new-model", "m3", None);
        assert_eq!(id.model_name.as_str(), "other");
        assert_eq!(id.target_model_name.as_str(), "m3");
        assert_eq!(id.fairness_id.as_str(), "default-flow");
        assert_eq!(id.priority, 0);
        assert_eq!(m.model_labels().len(), 1000);
    }

    #[test]
    fn mean_and_sample_std_dev_rounded() {
        assert_eq!(mean_and_std_dev(&[]), (0.0, 0.0));
        assert_eq!(mean_and_std_dev(&[0.5]), (0.5, 0.0));
        // mean 2, sample variance ((1)+(0)+(1))/2 = 1.
        assert_eq!(mean_and_std_dev(&[1.0, 2.0, 3.0]), (2.0, 1.0));
        // 0.333.. rounds to 0.33; sd of (0,0,1) = sqrt(1/3) = 0.577.. → 0.58.
        assert_eq!(mean_and_std_dev(&[0.0, 0.0, 1.0]), (0.33, 0.58));
    }

    #[test]
    fn error_codes_follow_llm_d() {
        assert_eq!(error_code_for_status(400), "BadRequest");
        assert_eq!(error_code_for_status(429), "ResourceExhausted");
        assert_eq!(error_code_for_status(503), "ServiceUnavailable");
        assert_eq!(error_code_for_status(404), "NotFound");
        assert_eq!(error_code_for_status(502), "Unknown");
    }
}

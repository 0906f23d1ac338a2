//! Scheduler plugins, one file each, grouped by kind: [`producers`] (attach data to a request
//! before anything else runs), [`filters`], [`scorers`], [`pickers`], [`profiles`] (profile
//! handlers) and [`deciders`] (whether a disaggregated stage runs). Each is built from its config `type` + `parameters` (serde structs with
//! `deny_unknown_fields`) through the one [`registry`], reads only the snapshot and the request
//! (plus what producers attached), and scores in [0, 1].

pub mod deciders;
pub mod filters;
pub mod pickers;
pub mod producers;
pub mod profiles;
pub mod registry;
pub mod scorers;

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use super::{PrefixSource, RequestData, SchedCtx};
use crate::config::{ConfigError, PluginSpec};
use crate::datastore::Endpoint;
use crate::prefix::{PrefixConfig, PrefixPlan};
use crate::request::ParsedRequest;

pub use deciders::Decider;
pub use filters::saturation::{SaturationFilter, SaturationParams, TYPE as SATURATION_FILTER};
pub use pickers::max_score::{MaxScorePicker, TYPE as MAX_SCORE_PICKER};
pub use pickers::random::{RandomPicker, TYPE as RANDOM_PICKER};
pub use pickers::round_robin::{RoundRobinPicker, TYPE as ROUND_ROBIN_PICKER};
pub use pickers::weighted_random::{WeightedRandomPicker, TYPE as WEIGHTED_RANDOM_PICKER};
pub use pickers::PickerParams;
pub use producers::approx_prefix::{ApproxPrefixProducer, TYPE as APPROX_PREFIX_CACHE_PRODUCER};
pub use producers::token::{
    TokenProducer, TokenizerMetrics, LEGACY_TYPE as LEGACY_TOKEN_PRODUCER, TYPE as TOKEN_PRODUCER,
};
pub use profiles::single::{SingleProfileHandler, TYPE as SINGLE_PROFILE_HANDLER};
pub use profiles::{DisaggPlan, HandlerPlan, ProfileHandler, StageOrder};
pub use registry::{all_types, REGISTRY};
pub use scorers::active_request::{ActiveRequestScorer, TYPE as ACTIVE_REQUEST_SCORER};
pub use scorers::kv_cache::{KvCacheScorer, TYPE as KV_CACHE_SCORER};
pub use scorers::lora_affinity::{LoraAffinityScorer, TYPE as LORA_AFFINITY_SCORER};
pub use scorers::prefix_cache::{
    PrefixCacheScorer, PrefixParams, BYTES_PER_TOKEN, TYPE as PREFIX_CACHE_SCORER,
};
pub use scorers::queue::{QueueScorer, TYPE as QUEUE_SCORER};

/// Runs before filters and scorers, once per request, and attaches data to it.
pub trait Producer: Send + Sync {
    fn type_name(&self) -> &'static str;
    fn name(&self) -> &str;
    /// The approximate prefix index this producer stands for, if it is a prefix producer (the
    /// director runs that index: hashing, lookup, and learning the pick).
    fn prefix_plan(&self) -> Option<PrefixPlan> {
        None
    }
    /// The part of this producer's work that waits on I/O (a remote tokenizer), awaited by the
    /// director once per request before any producer's [`produce`](Self::produce) runs. `None`
    /// (the default): nothing to wait for. It must not fail the request: whatever goes wrong is
    /// counted and logged, and `produce` falls back.
    fn prepare<'a>(
        &'a self,
        _request: &'a ParsedRequest,
        _data: &'a mut RequestData,
        _metrics: &'a TokenizerMetrics,
    ) -> Option<PrepareFuture<'a>> {
        None
    }
    /// The precise prefix index this producer stands for, if it is one (the director runs it:
    /// the KV-event subscriptions, the lookup, the speculative seeding after the pick).
    fn precise(&self) -> Option<Arc<crate::precise::Settings>> {
        None
    }
    /// Attach this producer's data to one request.
    fn produce(&self, _request: &ParsedRequest, _data: &mut RequestData) {}
}

/// The future of [`Producer::prepare`].
pub type PrepareFuture<'a> = Pin<Box<dyn Future<Output = ()> + Send + 'a>>;

/// What a scorer needs from the approximate prefix index.
#[derive(Clone, Debug, PartialEq)]
pub struct PrefixConsumer {
    /// `prefixMatchInfoProducerName`: the producer whose match info it reads (`None`: the
    /// approximate one, created with llm-d's defaults when none is configured).
    pub producer: Option<String>,
    /// Index parameters given on the scorer itself (the GAIE-era form); they configure the
    /// implicit producer and exclude an explicit one.
    pub legacy: Option<PrefixConfig>,
    /// The field that named `producer` (or the legacy parameters), for errors.
    pub field: String,
    /// Reads the precise producer, whichever is configured (the legacy
    /// `precise-prefix-cache-scorer`).
    pub precise: bool,
}

/// The source a prefix consumer was bound to by the scheduler (approximate until bound).
#[derive(Debug, Default)]
pub struct BoundSource(std::sync::atomic::AtomicBool);

impl BoundSource {
    pub fn set(&self, source: PrefixSource) {
        self.0.store(
            source == PrefixSource::Precise,
            std::sync::atomic::Ordering::Relaxed,
        );
    }
    pub fn get(&self) -> PrefixSource {
        if self.0.load(std::sync::atomic::Ordering::Relaxed) {
            PrefixSource::Precise
        } else {
            PrefixSource::Approximate
        }
    }
}

/// One profile's outcome for a request, as the post-pick hooks see it.
#[derive(Clone, Copy, Debug)]
pub struct ProfileRun<'a> {
    /// The name of the profile that ran.
    pub profile: &'a str,
    /// The candidates that survived the filters (snapshot indices).
    pub cands: &'a [usize],
    /// The primary pick (a snapshot index).
    pub picked: usize,
}

pub trait Filter: Send + Sync {
    fn type_name(&self) -> &'static str;
    fn name(&self) -> &str;
    /// Remove candidates (indices into the snapshot) that must not be picked.
    fn filter(&self, ctx: &SchedCtx<'_>, cands: &mut Vec<usize>);
    /// Whether a filter that removed every candidate means "all saturated" (429) rather than
    /// "none eligible" (503).
    fn empty_means_saturated(&self) -> bool {
        false
    }
}

pub trait Scorer: Send + Sync {
    fn type_name(&self) -> &'static str;
    fn name(&self) -> &str;
    /// Write one score in [0, 1] per candidate into `out` (same order).
    fn score(&self, ctx: &SchedCtx<'_>, cands: &[usize], out: &mut [f64]);
    /// What this scorer reads from a prefix index, if anything.
    fn prefix_consumer(&self) -> Option<PrefixConsumer> {
        None
    }
    /// The scheduler tells a prefix consumer which source its producer name resolved to.
    fn bind_prefix(&self, _source: PrefixSource) {}
    /// A producer that comes with this scorer (the legacy `precise-prefix-cache-scorer`).
    fn embedded_producer(&self) -> Option<Arc<dyn Producer>> {
        None
    }
    /// Request headers (lower-case names) this scorer reads; the front-ends pass them through
    /// [`RequestData::headers`].
    fn request_headers(&self) -> Vec<String> {
        Vec::new()
    }
    /// After the pick, before the request is forwarded: learn from the outcome.
    fn pre_request(&self, _ctx: &SchedCtx<'_>, _run: &ProfileRun<'_>) {}
    /// Response headers to add for a request `profile` routed and `served` answers.
    fn response_headers(
        &self,
        _profile: &str,
        _served: &Endpoint,
        _out: &mut Vec<(String, String)>,
    ) {
    }
}

pub trait Picker: Send + Sync {
    fn type_name(&self) -> &'static str;
    fn name(&self) -> &str;
    /// Order candidate positions (indices into `cands`/`scores`): best first, then fallbacks.
    /// Never empty when `cands` is not.
    fn pick(&self, ctx: &SchedCtx<'_>, cands: &[usize], scores: &[f64]) -> Vec<usize>;
}

pub enum Plugin {
    Producer(Arc<dyn Producer>),
    Filter(Arc<dyn Filter>),
    Scorer(Arc<dyn Scorer>),
    Picker(Arc<dyn Picker>),
    ProfileHandler(Arc<dyn ProfileHandler>),
    /// Asked by a disaggregating profile handler whether a stage runs; not a profile member.
    Decider(Arc<dyn Decider>),
}

/// A plugin's `parameters`, strictly parsed (defaults when absent); errors name the field
/// inside `parameters` (see [`crate::config::plugin_parameters`]).
pub(crate) fn params<T: DeserializeOwned + Default>(
    spec: &PluginSpec,
    field: &str,
) -> Result<T, ConfigError> {
    crate::config::plugin_parameters(spec, field)
}

/// Parameters of plugins that take none (any key is an error).
#[derive(Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct NoParams {}

/// Build a plugin from its spec through the [`registry`]. `field` is the spec's path, for
/// errors; a type this build does not implement is refused, naming it and what is supported.
pub fn build(spec: &PluginSpec, field: &str) -> Result<Plugin, ConfigError> {
    match registry::lookup(&spec.type_) {
        Some(r) => (r.build)(spec, field),
        None => Err(ConfigError::new(
            format!("{field}.type"),
            format!(
                "unknown plugin type {:?}: epp does not support it; supported types: {}",
                spec.type_,
                crate::config::supported_plugin_types().join(", ")
            ),
        )),
    }
}

//! Scheduler plugins, one file each, grouped by kind: [`filters`], [`scorers`], [`pickers`] and
//! [`profiles`] (profile handlers). Each is built from its config `type` + `parameters` (serde
//! structs with `deny_unknown_fields`) through the one [`registry`], reads only the snapshot and
//! the request, and scores in [0, 1].

pub mod filters;
pub mod pickers;
pub mod profiles;
pub mod registry;
pub mod scorers;

use std::sync::Arc;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use super::SchedCtx;
use crate::config::{ConfigError, PluginSpec};
use crate::prefix::PrefixConfig;

pub use filters::saturation::{SaturationFilter, SaturationParams, TYPE as SATURATION_FILTER};
pub use pickers::max_score::{MaxScorePicker, TYPE as MAX_SCORE_PICKER};
pub use pickers::random::{RandomPicker, TYPE as RANDOM_PICKER};
pub use pickers::round_robin::{RoundRobinPicker, TYPE as ROUND_ROBIN_PICKER};
pub use pickers::weighted_random::{WeightedRandomPicker, TYPE as WEIGHTED_RANDOM_PICKER};
pub use pickers::PickerParams;
pub use profiles::single::{SingleProfileHandler, TYPE as SINGLE_PROFILE_HANDLER};
pub use registry::{all_types, REGISTRY};
pub use scorers::active_request::{ActiveRequestScorer, TYPE as ACTIVE_REQUEST_SCORER};
pub use scorers::kv_cache::{KvCacheScorer, TYPE as KV_CACHE_SCORER};
pub use scorers::lora_affinity::{LoraAffinityScorer, TYPE as LORA_AFFINITY_SCORER};
pub use scorers::prefix_cache::{
    PrefixCacheScorer, PrefixParams, BYTES_PER_TOKEN, TYPE as PREFIX_CACHE_SCORER,
};
pub use scorers::queue::{QueueScorer, TYPE as QUEUE_SCORER};

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
    /// The prefix-index configuration this scorer needs, if it is the prefix scorer.
    fn prefix_config(&self) -> Option<PrefixConfig> {
        None
    }
}

pub trait Picker: Send + Sync {
    fn type_name(&self) -> &'static str;
    fn name(&self) -> &str;
    /// Order candidate positions (indices into `cands`/`scores`): best first, then fallbacks.
    /// Never empty when `cands` is not.
    fn pick(&self, ctx: &SchedCtx<'_>, cands: &[usize], scores: &[f64]) -> Vec<usize>;
}

/// Chooses which scheduling profile runs for a request.
pub trait ProfileHandler: Send + Sync {
    fn type_name(&self) -> &'static str;
    fn name(&self) -> &str;
    /// The index into `profiles` (never empty) of the profile to run.
    fn select(&self, profiles: &[super::Profile]) -> usize;
}

pub enum Plugin {
    Filter(Arc<dyn Filter>),
    Scorer(Arc<dyn Scorer>),
    Picker(Arc<dyn Picker>),
    ProfileHandler(Arc<dyn ProfileHandler>),
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

//! Scheduler plugins: filters, scorers and pickers. Each is built from its config
//! `type` + `parameters` (serde structs with `deny_unknown_fields`), reads only the snapshot and
//! the request, and scores in [0, 1].

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use rand::Rng;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use super::SchedCtx;
use crate::config::{ConfigError, PluginSpec};
use crate::prefix::PrefixConfig;

pub const SATURATION_FILTER: &str = "saturation-filter";
pub const PREFIX_CACHE_SCORER: &str = "prefix-cache-scorer";
pub const QUEUE_SCORER: &str = "queue-scorer";
pub const KV_CACHE_SCORER: &str = "kv-cache-utilization-scorer";
pub const ACTIVE_REQUEST_SCORER: &str = "active-request-scorer";
pub const LORA_AFFINITY_SCORER: &str = "lora-affinity-scorer";
pub const MAX_SCORE_PICKER: &str = "max-score-picker";
pub const RANDOM_PICKER: &str = "random-picker";
pub const WEIGHTED_RANDOM_PICKER: &str = "weighted-random-picker";
pub const ROUND_ROBIN_PICKER: &str = "round-robin-picker";
pub const SINGLE_PROFILE_HANDLER: &str = "single-profile-handler";

/// Every plugin type this build knows.
pub const ALL_TYPES: [&str; 11] = [
    SATURATION_FILTER,
    PREFIX_CACHE_SCORER,
    QUEUE_SCORER,
    KV_CACHE_SCORER,
    ACTIVE_REQUEST_SCORER,
    LORA_AFFINITY_SCORER,
    MAX_SCORE_PICKER,
    RANDOM_PICKER,
    WEIGHTED_RANDOM_PICKER,
    ROUND_ROBIN_PICKER,
    SINGLE_PROFILE_HANDLER,
];

pub trait Filter: Send + Sync {
    fn type_name(&self) -> &'static str;
    fn name(&self) -> &str;
    /// Remove candidates (indices into the snapshot) that must not be picked.
    fn filter(&self, ctx: &SchedCtx<'_>, cands: &mut Vec<usize>);
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

pub enum Plugin {
    Filter(Arc<dyn Filter>),
    Scorer(Arc<dyn Scorer>),
    Picker(Arc<dyn Picker>),
    ProfileHandler,
}

fn params<T: DeserializeOwned + Default>(spec: &PluginSpec, field: &str) -> Result<T, ConfigError> {
    match &spec.parameters {
        None | Some(serde_json::Value::Null) => Ok(T::default()),
        Some(v) => serde_json::from_value(v.clone())
            .map_err(|e| ConfigError::new(format!("{field}.parameters"), e.to_string())),
    }
}

/// Build a plugin from its spec. `field` is the spec's path, for errors.
pub fn build(spec: &PluginSpec, field: &str) -> Result<Plugin, ConfigError> {
    let name = spec.name().to_string();
    Ok(match spec.type_.as_str() {
        SATURATION_FILTER => {
            let p: SaturationParams = params(spec, field)?;
            if !p.queue_depth_threshold.is_finite() || p.queue_depth_threshold < 0.0 {
                return Err(ConfigError::new(
                    format!("{field}.parameters.queueDepthThreshold"),
                    "must be >= 0",
                ));
            }
            if !(0.0..=1.0).contains(&p.kv_cache_util_threshold) {
                return Err(ConfigError::new(
                    format!("{field}.parameters.kvCacheUtilThreshold"),
                    "must be between 0 and 1",
                ));
            }
            Plugin::Filter(Arc::new(SaturationFilter { name, p }))
        }
        PREFIX_CACHE_SCORER => {
            let p: PrefixParams = params(spec, field)?;
            let cfg = p.to_config(field)?;
            Plugin::Scorer(Arc::new(PrefixCacheScorer { name, cfg }))
        }
        QUEUE_SCORER => {
            let _: NoParams = params(spec, field)?;
            Plugin::Scorer(Arc::new(QueueScorer { name }))
        }
        KV_CACHE_SCORER => {
            let _: NoParams = params(spec, field)?;
            Plugin::Scorer(Arc::new(KvCacheScorer { name }))
        }
        ACTIVE_REQUEST_SCORER => {
            let _: NoParams = params(spec, field)?;
            Plugin::Scorer(Arc::new(ActiveRequestScorer { name }))
        }
        LORA_AFFINITY_SCORER => {
            let _: NoParams = params(spec, field)?;
            Plugin::Scorer(Arc::new(LoraAffinityScorer { name }))
        }
        MAX_SCORE_PICKER => {
            let p: PickerParams = params(spec, field)?;
            Plugin::Picker(Arc::new(MaxScorePicker { name, p }))
        }
        RANDOM_PICKER => {
            let p: PickerParams = params(spec, field)?;
            Plugin::Picker(Arc::new(RandomPicker { name, p }))
        }
        WEIGHTED_RANDOM_PICKER => {
            let p: PickerParams = params(spec, field)?;
            Plugin::Picker(Arc::new(WeightedRandomPicker { name, p }))
        }
        ROUND_ROBIN_PICKER => {
            let p: PickerParams = params(spec, field)?;
            Plugin::Picker(Arc::new(RoundRobinPicker {
                name,
                p,
                next: AtomicUsize::new(0),
            }))
        }
        SINGLE_PROFILE_HANDLER => Plugin::ProfileHandler,
        other => {
            return Err(ConfigError::new(
                format!("{field}.type"),
                format!(
                    "unknown plugin type {other:?}; known types: {}",
                    ALL_TYPES.join(", ")
                ),
            ))
        }
    })
}

#[derive(Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
struct NoParams {}

// ---------------------------------------------------------------------------------------------
// Filters

#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, rename_all = "camelCase", default)]
pub struct SaturationParams {
    /// Waiting requests above which an endpoint is saturated.
    pub queue_depth_threshold: f64,
    /// KV-cache usage (0..1) above which an endpoint is saturated.
    pub kv_cache_util_threshold: f64,
    /// When every candidate is saturated: `true` sheds the request (429); `false` keeps all
    /// candidates and lets the scorers choose.
    pub shed_when_all_saturated: bool,
}

impl Default for SaturationParams {
    fn default() -> Self {
        Self {
            queue_depth_threshold: 5.0,
            kv_cache_util_threshold: 0.8,
            shed_when_all_saturated: true,
        }
    }
}

pub struct SaturationFilter {
    name: String,
    p: SaturationParams,
}

impl Filter for SaturationFilter {
    fn type_name(&self) -> &'static str {
        SATURATION_FILTER
    }
    fn name(&self) -> &str {
        &self.name
    }
    fn filter(&self, ctx: &SchedCtx<'_>, cands: &mut Vec<usize>) {
        let ok = |i: &usize| {
            let e = ctx.ep(*i);
            e.waiting() <= self.p.queue_depth_threshold
                && e.kv_usage() <= self.p.kv_cache_util_threshold
        };
        if !self.p.shed_when_all_saturated && !cands.iter().any(ok) {
            return;
        }
        cands.retain(ok);
    }
}

// ---------------------------------------------------------------------------------------------
// Scorers

#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct PrefixParams {
    /// Block size in tokens (× 4 bytes of prompt text per token).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub block_size_tokens: Option<u64>,
    /// Block size in bytes of prompt text (older GAIE name); exclusive with `blockSizeTokens`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub block_size: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_prefix_blocks_to_match: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub lru_capacity_per_server: Option<u64>,
}

/// Bytes of prompt text per token in the approximate index.
pub const BYTES_PER_TOKEN: u64 = 4;

impl PrefixParams {
    fn to_config(&self, field: &str) -> Result<PrefixConfig, ConfigError> {
        let d = PrefixConfig::default();
        let block_size = match (self.block_size_tokens, self.block_size) {
            (Some(_), Some(_)) => {
                return Err(ConfigError::new(
                    format!("{field}.parameters.blockSize"),
                    "give either blockSizeTokens or blockSize, not both",
                ))
            }
            (Some(0), _) => {
                return Err(ConfigError::new(
                    format!("{field}.parameters.blockSizeTokens"),
                    "must be at least 1",
                ))
            }
            (_, Some(0)) => {
                return Err(ConfigError::new(
                    format!("{field}.parameters.blockSize"),
                    "must be at least 1",
                ))
            }
            (Some(t), None) => (t * BYTES_PER_TOKEN) as usize,
            (None, Some(b)) => b as usize,
            (None, None) => d.block_size,
        };
        let max_blocks = match self.max_prefix_blocks_to_match {
            Some(0) => {
                return Err(ConfigError::new(
                    format!("{field}.parameters.maxPrefixBlocksToMatch"),
                    "must be at least 1",
                ))
            }
            Some(n) => n as usize,
            None => d.max_blocks,
        };
        let cap = match self.lru_capacity_per_server {
            Some(0) => {
                return Err(ConfigError::new(
                    format!("{field}.parameters.lruCapacityPerServer"),
                    "must be at least 1",
                ))
            }
            Some(n) if n > 100_000_000 => {
                return Err(ConfigError::new(
                    format!("{field}.parameters.lruCapacityPerServer"),
                    "must be at most 100000000",
                ))
            }
            Some(n) => n as usize,
            None => d.capacity_per_endpoint,
        };
        Ok(PrefixConfig {
            block_size,
            max_blocks,
            capacity_per_endpoint: cap,
        })
    }
}

/// Matched leading blocks / prompt blocks, from the approximate prefix index.
pub struct PrefixCacheScorer {
    name: String,
    cfg: PrefixConfig,
}

impl Scorer for PrefixCacheScorer {
    fn type_name(&self) -> &'static str {
        PREFIX_CACHE_SCORER
    }
    fn name(&self) -> &str {
        &self.name
    }
    fn score(&self, ctx: &SchedCtx<'_>, cands: &[usize], out: &mut [f64]) {
        for (o, &i) in out.iter_mut().zip(cands) {
            *o = ctx.prefix.ratio(ctx.ep(i).slot());
        }
    }
    fn prefix_config(&self) -> Option<PrefixConfig> {
        Some(self.cfg)
    }
}

/// Min-max normalisation where lower is better: the least loaded gets 1, the most 0; all equal → 1.
fn min_max_low_is_good(vals: &[f64], out: &mut [f64]) {
    let min = vals.iter().copied().fold(f64::INFINITY, f64::min);
    let max = vals.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    for (o, v) in out.iter_mut().zip(vals) {
        *o = if max > min {
            (max - v) / (max - min)
        } else {
            1.0
        };
    }
}

/// Waiting queue, min-max normalised across candidates.
pub struct QueueScorer {
    name: String,
}

impl Scorer for QueueScorer {
    fn type_name(&self) -> &'static str {
        QUEUE_SCORER
    }
    fn name(&self) -> &str {
        &self.name
    }
    fn score(&self, ctx: &SchedCtx<'_>, cands: &[usize], out: &mut [f64]) {
        let vals: Vec<f64> = cands.iter().map(|&i| ctx.ep(i).waiting()).collect();
        min_max_low_is_good(&vals, out);
    }
}

/// 1 − KV-cache usage.
pub struct KvCacheScorer {
    name: String,
}

impl Scorer for KvCacheScorer {
    fn type_name(&self) -> &'static str {
        KV_CACHE_SCORER
    }
    fn name(&self) -> &str {
        &self.name
    }
    fn score(&self, ctx: &SchedCtx<'_>, cands: &[usize], out: &mut [f64]) {
        for (o, &i) in out.iter_mut().zip(cands) {
            *o = (1.0 - ctx.ep(i).kv_usage()).clamp(0.0, 1.0);
        }
    }
}

/// The picker's own in-flight count per endpoint (fresher than any scrape):
/// `(max - x) / (max + 1)` across candidates. An idle endpoint next to one with `m` requests in
/// flight scores `m / (m + 1)`, so a single request of difference moves the score by at most 0.5
/// and larger imbalances approach 1: affinity holds under light jitter and yields to real
/// hot-spots.
pub struct ActiveRequestScorer {
    name: String,
}

impl Scorer for ActiveRequestScorer {
    fn type_name(&self) -> &'static str {
        ACTIVE_REQUEST_SCORER
    }
    fn name(&self) -> &str {
        &self.name
    }
    fn score(&self, ctx: &SchedCtx<'_>, cands: &[usize], out: &mut [f64]) {
        let vals: Vec<f64> = cands
            .iter()
            .map(|&i| ctx.ep(i).endpoint.inflight() as f64)
            .collect();
        let max = vals.iter().copied().fold(0.0, f64::max);
        for (o, v) in out.iter_mut().zip(&vals) {
            *o = (max - v) / (max + 1.0);
        }
    }
}

/// LoRA affinity: 1.0 adapter active, 0.8 room to load it, 0.6 queued for it, else 0.
/// Requests for a model no endpoint reports as an adapter score 1 everywhere.
pub struct LoraAffinityScorer {
    name: String,
}

impl Scorer for LoraAffinityScorer {
    fn type_name(&self) -> &'static str {
        LORA_AFFINITY_SCORER
    }
    fn name(&self) -> &str {
        &self.name
    }
    fn score(&self, ctx: &SchedCtx<'_>, cands: &[usize], out: &mut [f64]) {
        let model = ctx.request.target_model.as_str();
        for (o, &i) in out.iter_mut().zip(cands) {
            let e = ctx.ep(i);
            *o = match &e.metrics {
                None => 0.8,
                Some(m) => {
                    if model.is_empty() || m.running_loras.iter().any(|l| l == model) {
                        1.0
                    } else if m.waiting_loras.iter().any(|l| l == model) {
                        0.6
                    } else {
                        match m.max_loras {
                            None => 1.0,
                            Some(max) if (m.running_loras.len() as u32) < max => 0.8,
                            Some(_) => 0.0,
                        }
                    }
                }
            };
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Pickers

#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, rename_all = "camelCase", default)]
pub struct PickerParams {
    /// How many endpoints to return (primary + fallbacks).
    pub max_num_of_endpoints: usize,
}

impl Default for PickerParams {
    fn default() -> Self {
        Self {
            max_num_of_endpoints: 3,
        }
    }
}

impl PickerParams {
    fn limit(&self, n: usize) -> usize {
        self.max_num_of_endpoints.clamp(1, n.max(1))
    }
}

/// Highest total score first; ties broken at random.
#[derive(Default)]
pub struct MaxScorePicker {
    name: String,
    p: PickerParams,
}

impl Picker for MaxScorePicker {
    fn type_name(&self) -> &'static str {
        MAX_SCORE_PICKER
    }
    fn name(&self) -> &str {
        if self.name.is_empty() {
            MAX_SCORE_PICKER
        } else {
            &self.name
        }
    }
    fn pick(&self, _ctx: &SchedCtx<'_>, cands: &[usize], scores: &[f64]) -> Vec<usize> {
        let mut rng = rand::rng();
        let mut order: Vec<(usize, f64, u32)> = (0..cands.len())
            .map(|k| (k, scores[k], rng.random::<u32>()))
            .collect();
        order.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.2.cmp(&b.2)));
        order.truncate(self.p.limit(cands.len()));
        order.into_iter().map(|(k, _, _)| k).collect()
    }
}

/// Uniformly random order (a baseline).
pub struct RandomPicker {
    name: String,
    p: PickerParams,
}

impl Picker for RandomPicker {
    fn type_name(&self) -> &'static str {
        RANDOM_PICKER
    }
    fn name(&self) -> &str {
        &self.name
    }
    fn pick(&self, _ctx: &SchedCtx<'_>, cands: &[usize], _scores: &[f64]) -> Vec<usize> {
        let mut rng = rand::rng();
        let mut order: Vec<usize> = (0..cands.len()).collect();
        for i in (1..order.len()).rev() {
            let j = rng.random_range(0..=i);
            order.swap(i, j);
        }
        order.truncate(self.p.limit(cands.len()));
        order
    }
}

/// Random, with probability proportional to score (uniform when all scores are 0).
pub struct WeightedRandomPicker {
    name: String,
    p: PickerParams,
}

impl Picker for WeightedRandomPicker {
    fn type_name(&self) -> &'static str {
        WEIGHTED_RANDOM_PICKER
    }
    fn name(&self) -> &str {
        &self.name
    }
    fn pick(&self, _ctx: &SchedCtx<'_>, cands: &[usize], scores: &[f64]) -> Vec<usize> {
        // Efraimidis–Spirakis: key = u^(1/w); sorting by key gives a weighted order.
        let mut rng = rand::rng();
        let all_zero = scores.iter().all(|s| *s <= 0.0);
        let mut keyed: Vec<(usize, f64)> = (0..cands.len())
            .map(|k| {
                let w = if all_zero { 1.0 } else { scores[k].max(0.0) };
                let u: f64 = rng.random_range(f64::MIN_POSITIVE..1.0);
                let key = if w > 0.0 {
                    u.powf(1.0 / w)
                } else {
                    -1.0 + u * 1e-9
                };
                (k, key)
            })
            .collect();
        keyed.sort_by(|a, b| b.1.total_cmp(&a.1));
        keyed.truncate(self.p.limit(cands.len()));
        keyed.into_iter().map(|(k, _)| k).collect()
    }
}

/// Rotates through candidates (a baseline; ignores scores).
pub struct RoundRobinPicker {
    name: String,
    p: PickerParams,
    next: AtomicUsize,
}

impl Picker for RoundRobinPicker {
    fn type_name(&self) -> &'static str {
        ROUND_ROBIN_PICKER
    }
    fn name(&self) -> &str {
        &self.name
    }
    fn pick(&self, _ctx: &SchedCtx<'_>, cands: &[usize], _scores: &[f64]) -> Vec<usize> {
        let n = cands.len();
        let start = self.next.fetch_add(1, Ordering::Relaxed) % n;
        (0..self.p.limit(n)).map(|k| (start + k) % n).collect()
    }
}

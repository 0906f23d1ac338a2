//! `saturation-filter`: drops endpoints whose waiting queue or KV-cache usage is over a
//! threshold; when every candidate is saturated it either sheds the request (429) or keeps them
//! all and lets the scorers choose.

use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::config::{ConfigError, PluginSpec};
use crate::scheduler::plugins::{params, Filter, Plugin};
use crate::scheduler::SchedCtx;

pub const TYPE: &str = "saturation-filter";

pub fn build(spec: &PluginSpec, field: &str) -> Result<Plugin, ConfigError> {
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
    Ok(Plugin::Filter(Arc::new(SaturationFilter {
        name: spec.name().to_string(),
        p,
    })))
}

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
        TYPE
    }
    fn name(&self) -> &str {
        &self.name
    }
    fn empty_means_saturated(&self) -> bool {
        true
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

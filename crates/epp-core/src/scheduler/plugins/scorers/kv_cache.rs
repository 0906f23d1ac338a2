//! `kv-cache-utilization-scorer`: 1 − KV-cache usage.

use std::sync::Arc;

use crate::config::{ConfigError, PluginSpec};
use crate::scheduler::plugins::{params, NoParams, Plugin, Scorer};
use crate::scheduler::SchedCtx;

pub const TYPE: &str = "kv-cache-utilization-scorer";

pub fn build(spec: &PluginSpec, field: &str) -> Result<Plugin, ConfigError> {
    let _: NoParams = params(spec, field)?;
    Ok(Plugin::Scorer(Arc::new(KvCacheScorer {
        name: spec.name().to_string(),
    })))
}

/// 1 − KV-cache usage.
pub struct KvCacheScorer {
    name: String,
}

impl Scorer for KvCacheScorer {
    fn type_name(&self) -> &'static str {
        TYPE
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

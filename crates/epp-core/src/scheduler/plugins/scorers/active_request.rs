//! `active-request-scorer`: the picker's own in-flight count per endpoint, fresher than any scrape.

use std::sync::Arc;

use crate::config::{ConfigError, PluginSpec};
use crate::scheduler::plugins::{params, NoParams, Plugin, Scorer};
use crate::scheduler::SchedCtx;

pub const TYPE: &str = "active-request-scorer";

pub fn build(spec: &PluginSpec, field: &str) -> Result<Plugin, ConfigError> {
    let _: NoParams = params(spec, field)?;
    Ok(Plugin::Scorer(Arc::new(ActiveRequestScorer {
        name: spec.name().to_string(),
    })))
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
        TYPE
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

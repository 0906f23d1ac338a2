//! `queue-scorer`: the waiting queue, min-max normalised across candidates (least loaded 1, most 0).

use std::sync::Arc;

use crate::config::{ConfigError, PluginSpec};
use crate::scheduler::plugins::{params, NoParams, Plugin, Scorer};
use crate::scheduler::SchedCtx;

pub const TYPE: &str = "queue-scorer";

pub fn build(spec: &PluginSpec, field: &str) -> Result<Plugin, ConfigError> {
    let _: NoParams = params(spec, field)?;
    Ok(Plugin::Scorer(Arc::new(QueueScorer {
        name: spec.name().to_string(),
    })))
}

/// Waiting queue, min-max normalised across candidates.
pub struct QueueScorer {
    name: String,
}

impl Scorer for QueueScorer {
    fn type_name(&self) -> &'static str {
        TYPE
    }
    fn name(&self) -> &str {
        &self.name
    }
    fn score(&self, ctx: &SchedCtx<'_>, cands: &[usize], out: &mut [f64]) {
        let vals: Vec<f64> = cands.iter().map(|&i| ctx.ep(i).waiting()).collect();
        min_max_low_is_good(&vals, out);
    }
}

/// Min-max normalisation where lower is better: the least loaded gets 1, the most 0; all equal → 1.
pub(crate) fn min_max_low_is_good(vals: &[f64], out: &mut [f64]) {
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

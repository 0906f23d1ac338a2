//! `weighted-random-picker`: random, with probability proportional to score.

use std::sync::Arc;

use rand::Rng;

use crate::config::{ConfigError, PluginSpec};
use crate::scheduler::plugins::pickers::PickerParams;
use crate::scheduler::plugins::{params, Picker, Plugin};
use crate::scheduler::SchedCtx;

pub const TYPE: &str = "weighted-random-picker";

pub fn build(spec: &PluginSpec, field: &str) -> Result<Plugin, ConfigError> {
    let p: PickerParams = params(spec, field)?;
    Ok(Plugin::Picker(Arc::new(WeightedRandomPicker {
        name: spec.name().to_string(),
        p,
    })))
}

/// Random, with probability proportional to score (uniform when all scores are 0).
pub struct WeightedRandomPicker {
    name: String,
    p: PickerParams,
}

impl Picker for WeightedRandomPicker {
    fn type_name(&self) -> &'static str {
        TYPE
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

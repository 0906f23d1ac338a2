//! `max-score-picker`: the highest total score first; ties broken at random.

use std::sync::Arc;

use rand::Rng;

use crate::config::{ConfigError, PluginSpec};
use crate::scheduler::plugins::pickers::PickerParams;
use crate::scheduler::plugins::{params, Picker, Plugin};
use crate::scheduler::SchedCtx;

pub const TYPE: &str = "max-score-picker";

pub fn build(spec: &PluginSpec, field: &str) -> Result<Plugin, ConfigError> {
    let p: PickerParams = params(spec, field)?;
    Ok(Plugin::Picker(Arc::new(MaxScorePicker {
        name: spec.name().to_string(),
        p,
    })))
}

/// Highest total score first; ties broken at random.
#[derive(Default)]
pub struct MaxScorePicker {
    name: String,
    p: PickerParams,
}

impl Picker for MaxScorePicker {
    fn type_name(&self) -> &'static str {
        TYPE
    }
    fn name(&self) -> &str {
        if self.name.is_empty() {
            TYPE
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

//! `random-picker`: a uniformly random order (a baseline).

use std::sync::Arc;

use rand::Rng;

use crate::config::{ConfigError, PluginSpec};
use crate::scheduler::plugins::pickers::PickerParams;
use crate::scheduler::plugins::{params, Picker, Plugin};
use crate::scheduler::SchedCtx;

pub const TYPE: &str = "random-picker";

pub fn build(spec: &PluginSpec, field: &str) -> Result<Plugin, ConfigError> {
    let p: PickerParams = params(spec, field)?;
    Ok(Plugin::Picker(Arc::new(RandomPicker {
        name: spec.name().to_string(),
        p,
    })))
}

/// Uniformly random order (a baseline).
pub struct RandomPicker {
    name: String,
    p: PickerParams,
}

impl Picker for RandomPicker {
    fn type_name(&self) -> &'static str {
        TYPE
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

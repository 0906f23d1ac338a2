//! `round-robin-picker`: rotates through the candidates (a baseline; ignores scores).

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use crate::config::{ConfigError, PluginSpec};
use crate::scheduler::plugins::pickers::PickerParams;
use crate::scheduler::plugins::{params, Picker, Plugin};
use crate::scheduler::SchedCtx;

pub const TYPE: &str = "round-robin-picker";

pub fn build(spec: &PluginSpec, field: &str) -> Result<Plugin, ConfigError> {
    let p: PickerParams = params(spec, field)?;
    Ok(Plugin::Picker(Arc::new(RoundRobinPicker {
        name: spec.name().to_string(),
        p,
        next: AtomicUsize::new(0),
    })))
}

/// Rotates through candidates (a baseline; ignores scores).
pub struct RoundRobinPicker {
    name: String,
    p: PickerParams,
    next: AtomicUsize,
}

impl Picker for RoundRobinPicker {
    fn type_name(&self) -> &'static str {
        TYPE
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

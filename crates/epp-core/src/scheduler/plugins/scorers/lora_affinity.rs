//! `lora-affinity-scorer`: prefers endpoints that run, or have room to load, the requested LoRA adapter.

use std::sync::Arc;

use crate::config::{ConfigError, PluginSpec};
use crate::scheduler::plugins::{params, NoParams, Plugin, Scorer};
use crate::scheduler::SchedCtx;

pub const TYPE: &str = "lora-affinity-scorer";

pub fn build(spec: &PluginSpec, field: &str) -> Result<Plugin, ConfigError> {
    let _: NoParams = params(spec, field)?;
    Ok(Plugin::Scorer(Arc::new(LoraAffinityScorer {
        name: spec.name().to_string(),
    })))
}

/// LoRA affinity: 1.0 adapter active, 0.8 room to load it, 0.6 queued for it, else 0.
/// Requests for a model no endpoint reports as an adapter score 1 everywhere.
pub struct LoraAffinityScorer {
    name: String,
}

impl Scorer for LoraAffinityScorer {
    fn type_name(&self) -> &'static str {
        TYPE
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

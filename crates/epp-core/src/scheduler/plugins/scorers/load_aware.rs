//! `load-aware-scorer`: llm-d's waiting-queue score in [0, 0.5]: an empty queue 0.5, `q` waiting
//! `0.5 · (1 − min(q, threshold) / threshold)`, at or past `threshold` 0.

use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::config::{ConfigError, PluginSpec};
use crate::scheduler::plugins::{params, Plugin, Scorer};
use crate::scheduler::SchedCtx;

pub const TYPE: &str = "load-aware-scorer";
/// llm-d's default `threshold`.
pub const DEFAULT_THRESHOLD: i64 = 128;

#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, rename_all = "camelCase", default)]
pub struct LoadAwareParams {
    /// Waiting requests at which the score reaches 0.
    pub threshold: i64,
}

impl Default for LoadAwareParams {
    fn default() -> Self {
        Self {
            threshold: DEFAULT_THRESHOLD,
        }
    }
}

pub fn build(spec: &PluginSpec, field: &str) -> Result<Plugin, ConfigError> {
    let p: LoadAwareParams = params(spec, field)?;
    if p.threshold <= 0 {
        return Err(ConfigError::new(
            format!("{field}.parameters.threshold"),
            format!("must be a positive number of waiting requests (llm-d's default is {DEFAULT_THRESHOLD}), got {}", p.threshold),
        ));
    }
    Ok(Plugin::Scorer(Arc::new(LoadAwareScorer {
        name: spec.name().to_string(),
        threshold: p.threshold as f64,
    })))
}

pub struct LoadAwareScorer {
    name: String,
    threshold: f64,
}

impl Scorer for LoadAwareScorer {
    fn type_name(&self) -> &'static str {
        TYPE
    }
    fn name(&self) -> &str {
        &self.name
    }
    fn score(&self, ctx: &SchedCtx<'_>, cands: &[usize], out: &mut [f64]) {
        for (o, &i) in out.iter_mut().zip(cands) {
            let q = ctx.ep(i).waiting();
            *o = if q <= 0.0 {
                0.5
            } else {
                0.5 * (1.0 - q.min(self.threshold) / self.threshold)
            };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::testing::{ctx_with, scores};
    use super::*;

    fn spec(yaml: Option<&str>) -> PluginSpec {
        PluginSpec::for_test(TYPE, yaml)
    }

    #[test]
    fn half_for_idle_linear_to_zero_at_threshold() {
        let (w, _) = ctx_with(&[(0.0, 0.0), (32.0, 0.0), (128.0, 0.0), (500.0, 0.0)]);
        let s = build(&spec(None), "plugins[0]").unwrap();
        assert_eq!(scores(&w, &s), vec![0.5, 0.375, 0.0, 0.0]);
        let s = build(&spec(Some("threshold: 64")), "plugins[0]").unwrap();
        assert_eq!(scores(&w, &s), vec![0.5, 0.25, 0.0, 0.0]);
    }

    #[test]
    fn threshold_must_be_positive() {
        for bad in ["threshold: 0", "threshold: -3"] {
            let e = build(&spec(Some(bad)), "plugins[4]").err().unwrap();
            assert_eq!(e.field, "plugins[4].parameters.threshold");
        }
        let e = build(&spec(Some("queueThreshold: 3")), "plugins[4]")
            .err()
            .unwrap();
        assert_eq!(e.field, "plugins[4].parameters.queueThreshold");
    }
}

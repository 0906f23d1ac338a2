//! `running-requests-size-scorer`: the requests the model server reports running, min-max
//! normalised across candidates (fewest 1, most 0; all equal 1), as llm-d's.

use std::sync::Arc;

use crate::config::{ConfigError, PluginSpec};
use crate::scheduler::plugins::scorers::queue::min_max_low_is_good;
use crate::scheduler::plugins::{params, NoParams, Plugin, Scorer};
use crate::scheduler::SchedCtx;

pub const TYPE: &str = "running-requests-size-scorer";

pub fn build(spec: &PluginSpec, field: &str) -> Result<Plugin, ConfigError> {
    let _: NoParams = params(spec, field)?;
    Ok(Plugin::Scorer(Arc::new(RunningRequestsSizeScorer {
        name: spec.name().to_string(),
    })))
}

/// Running requests (scraped), min-max normalised; an endpoint without metrics counts 0.
pub struct RunningRequestsSizeScorer {
    name: String,
}

impl Scorer for RunningRequestsSizeScorer {
    fn type_name(&self) -> &'static str {
        TYPE
    }
    fn name(&self) -> &str {
        &self.name
    }
    fn score(&self, ctx: &SchedCtx<'_>, cands: &[usize], out: &mut [f64]) {
        let vals: Vec<f64> = cands
            .iter()
            .map(|&i| ctx.ep(i).metrics.as_ref().map_or(0.0, |m| m.running))
            .collect();
        min_max_low_is_good(&vals, out);
    }
}

#[cfg(test)]
mod tests {
    use super::super::testing::{ctx_with, scores};
    use super::*;

    #[test]
    fn fewest_running_scores_one() {
        let (w, _) = ctx_with(&[(0.0, 2.0), (0.0, 6.0), (0.0, 4.0)]);
        let s = build(
            &PluginSpec {
                name: None,
                type_: TYPE.into(),
                parameters: None,
            },
            "plugins[0]",
        )
        .unwrap();
        assert_eq!(scores(&w, &s), vec![1.0, 0.0, 0.5]);
        let (w, _) = ctx_with(&[(0.0, 3.0), (0.0, 3.0)]);
        assert_eq!(scores(&w, &s), vec![1.0, 1.0]);
    }
}

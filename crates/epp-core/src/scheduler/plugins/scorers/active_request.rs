//! `active-request-scorer`: the picker's own in-flight count per endpoint (fresher than any
//! scrape), scored as llm-d does: an endpoint with at most `idleThreshold` requests in flight
//! scores 1; the others `(max − n) / max · maxBusyScore`, where `max` is the largest count among
//! the candidates.

use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::config::{ConfigError, PluginSpec};
use crate::scheduler::plugins::{params, Plugin, Scorer};
use crate::scheduler::SchedCtx;

pub const TYPE: &str = "active-request-scorer";

#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct ActiveRequestParams {
    /// Deprecated in llm-d and ignored there too: in-flight requests are counted exactly, from
    /// routing to the end of the response, so no timeout expires them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request_timeout: Option<String>,
    /// Requests in flight at or below which an endpoint counts as idle (score 1). Default 0.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub idle_threshold: Option<i64>,
    /// The highest score a busy endpoint can get (0..1). Default 1.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_busy_score: Option<f64>,
    /// An `inflight-load-producer` to read counts from; epp counts in-flight requests itself and
    /// implements no such producer, so naming one is refused.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub in_flight_load_producer_name: Option<String>,
}

pub fn build(spec: &PluginSpec, field: &str) -> Result<Plugin, ConfigError> {
    let p: ActiveRequestParams = params(spec, field)?;
    if let Some(t) = &p.request_timeout {
        tracing::warn!(
            plugin = field,
            request_timeout = %t,
            "active-request-scorer: `requestTimeout` is deprecated and has no effect (in-flight requests are counted until their response ends)"
        );
    }
    let idle_threshold = p.idle_threshold.unwrap_or(0);
    if idle_threshold < 0 {
        return Err(ConfigError::new(
            format!("{field}.parameters.idleThreshold"),
            format!("must be >= 0, got {idle_threshold}"),
        ));
    }
    let max_busy_score = p.max_busy_score.unwrap_or(1.0);
    if !(0.0..=1.0).contains(&max_busy_score) {
        return Err(ConfigError::new(
            format!("{field}.parameters.maxBusyScore"),
            format!("must be between 0 and 1, got {max_busy_score}"),
        ));
    }
    if let Some(n) = &p.in_flight_load_producer_name {
        return Err(ConfigError::new(
            format!("{field}.parameters.inFlightLoadProducerName"),
            format!("epp counts in-flight requests itself and has no inflight-load-producer; remove the reference to {n:?}"),
        ));
    }
    Ok(Plugin::Scorer(Arc::new(ActiveRequestScorer {
        name: spec.name().to_string(),
        idle_threshold: idle_threshold as u64,
        max_busy_score,
    })))
}

pub struct ActiveRequestScorer {
    name: String,
    idle_threshold: u64,
    max_busy_score: f64,
}

impl Scorer for ActiveRequestScorer {
    fn type_name(&self) -> &'static str {
        TYPE
    }
    fn name(&self) -> &str {
        &self.name
    }
    fn score(&self, ctx: &SchedCtx<'_>, cands: &[usize], out: &mut [f64]) {
        let counts: Vec<u64> = cands
            .iter()
            .map(|&i| ctx.ep(i).endpoint.load_inflight() as u64)
            .collect();
        let max = counts.iter().copied().max().unwrap_or(0);
        for (o, &n) in out.iter_mut().zip(&counts) {
            *o = if n <= self.idle_threshold {
                1.0
            } else {
                (max - n) as f64 / max as f64 * self.max_busy_score
            };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::testing::{ctx_with, scores};
    use super::*;
    use crate::datastore::InFlight;

    fn spec(yaml: Option<&str>) -> PluginSpec {
        PluginSpec::for_test(TYPE, yaml)
    }

    #[test]
    fn llm_d_formula() {
        let (w, eps) = ctx_with(&[(0.0, 0.0); 4]);
        let mut guards = Vec::new();
        for (ep, n) in eps.iter().zip([0, 1, 2, 4]) {
            for _ in 0..n {
                guards.push(InFlight::new(ep.clone()));
            }
        }
        let s = build(&spec(None), "plugins[0]").unwrap();
        assert_eq!(scores(&w, &s), vec![1.0, 0.75, 0.5, 0.0]);
        let s = build(
            &spec(Some(
                "{idleThreshold: 1, maxBusyScore: 0.5, requestTimeout: 2m}",
            )),
            "plugins[0]",
        )
        .unwrap();
        assert_eq!(scores(&w, &s), vec![1.0, 1.0, 0.25, 0.0]);
        drop(guards);
        let s = build(&spec(None), "plugins[0]").unwrap();
        assert_eq!(scores(&w, &s), vec![1.0; 4], "all idle");
    }

    #[test]
    fn parameters_are_checked() {
        for (yaml, field) in [
            ("idleThreshold: -1", "plugins[2].parameters.idleThreshold"),
            ("maxBusyScore: 1.5", "plugins[2].parameters.maxBusyScore"),
            (
                "inFlightLoadProducerName: p",
                "plugins[2].parameters.inFlightLoadProducerName",
            ),
            ("timeout: 3", "plugins[2].parameters.timeout"),
        ] {
            let e = build(&spec(Some(yaml)), "plugins[2]").err().unwrap();
            assert_eq!(e.field, field, "{yaml}: {e}");
        }
    }
}

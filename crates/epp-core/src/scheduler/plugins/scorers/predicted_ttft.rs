//! `predicted-ttft-scorer` (an epp plugin; llm-d's analogue is the trained `latency-scorer`,
//! Dynamo's the `overlap_score_weight · prefill_blocks + decode_blocks` cost): for each
//! candidate, the time to first token it would give this request, from what it would have to
//! compute and what it already carries:
//!
//! ```text
//! predicted TTFT = overhead + prefill_ms_per_token · (prompt tokens − tokens its prefix match holds)
//!                           + queue_ms_per_request · requests in flight there
//! ```
//!
//! with each endpoint's own rates, learned online from the streamed responses the picker relays
//! ([`crate::service_model`]); until an endpoint has taught them, the priors below stand in. The
//! cheapest candidate scores 1, the dearest 0, the rest in proportion, so with a lone scorer the
//! max-score picker takes the lowest predicted TTFT: a request goes where its prefix is cached
//! while that endpoint is not busier than the prefill it saves, and spreads once it is.
//!
//! Parameters: `prefillMsPerToken` (0.05: about 20k tokens/s, an 8B model on one modern GPU),
//! `queueMsPerRequest` (10), `overheadMs` (0), `prefixMatchInfoProducerName` (which prefix
//! producer's match it reads, as `prefix-cache-scorer`).

use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::config::{ConfigError, PluginSpec};
use crate::scheduler::plugins::{params, BoundSource, Plugin, PrefixConsumer, Scorer};
use crate::scheduler::{PrefixSource, SchedCtx};
use crate::service_model::Priors;

pub const TYPE: &str = "predicted-ttft-scorer";

#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct PredictedTtftParams {
    #[serde(default = "default_prefill")]
    pub prefill_ms_per_token: f64,
    #[serde(default = "default_queue")]
    pub queue_ms_per_request: f64,
    #[serde(default)]
    pub overhead_ms: f64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prefix_match_info_producer_name: Option<String>,
}

fn default_prefill() -> f64 {
    0.05
}
fn default_queue() -> f64 {
    10.0
}

impl Default for PredictedTtftParams {
    fn default() -> Self {
        Self {
            prefill_ms_per_token: default_prefill(),
            queue_ms_per_request: default_queue(),
            overhead_ms: 0.0,
            prefix_match_info_producer_name: None,
        }
    }
}

pub fn build(spec: &PluginSpec, field: &str) -> Result<Plugin, ConfigError> {
    let p: PredictedTtftParams = params(spec, field)?;
    for (key, v) in [
        ("prefillMsPerToken", p.prefill_ms_per_token),
        ("queueMsPerRequest", p.queue_ms_per_request),
        ("overheadMs", p.overhead_ms),
    ] {
        if !(v.is_finite() && v >= 0.0) {
            return Err(ConfigError::new(
                format!("{field}.parameters.{key}"),
                format!("must be a finite number >= 0, got {v}"),
            ));
        }
    }
    if p.prefill_ms_per_token == 0.0 {
        return Err(ConfigError::new(
            format!("{field}.parameters.prefillMsPerToken"),
            "must be greater than 0 (a prefill that costs nothing makes every cache hit worthless)",
        ));
    }
    let producer_field = if p.prefix_match_info_producer_name.is_some() {
        format!("{field}.parameters.prefixMatchInfoProducerName")
    } else {
        format!("{field}.parameters")
    };
    Ok(Plugin::Scorer(Arc::new(PredictedTtftScorer {
        name: spec.name().to_string(),
        priors: Priors {
            overhead_ms: p.overhead_ms,
            prefill_ms_per_token: p.prefill_ms_per_token,
            queue_ms_per_request: p.queue_ms_per_request,
        },
        consumer: PrefixConsumer {
            producer: p.prefix_match_info_producer_name,
            legacy: None,
            field: producer_field,
            precise: false,
        },
        source: BoundSource::default(),
    })))
}

#[derive(Debug)]
pub struct PredictedTtftScorer {
    name: String,
    priors: Priors,
    consumer: PrefixConsumer,
    source: BoundSource,
}

impl PredictedTtftScorer {
    /// Predicted TTFT (ms) of the request at each candidate.
    pub fn predict(&self, ctx: &SchedCtx<'_>, cands: &[usize]) -> Vec<f64> {
        let m = ctx.prefix.get(self.source.get());
        let prompt = ctx.data.prompt_tokens.unwrap_or(0);
        cands
            .iter()
            .map(|&i| {
                let ep = ctx.ep(i);
                let cached = u64::from(m.blocks.matched(ep.slot())) * m.block_tokens;
                let rates = ep.endpoint.service().rates(&self.priors);
                rates.ttft_ms(
                    prompt.saturating_sub(cached),
                    ep.endpoint.load_inflight() as u64,
                    ep.waiting(),
                )
            })
            .collect()
    }
}

impl Scorer for PredictedTtftScorer {
    fn type_name(&self) -> &'static str {
        TYPE
    }
    fn name(&self) -> &str {
        &self.name
    }
    fn score(&self, ctx: &SchedCtx<'_>, cands: &[usize], out: &mut [f64]) {
        let cost = self.predict(ctx, cands);
        let (lo, hi) = cost
            .iter()
            .fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), &c| {
                (lo.min(c), hi.max(c))
            });
        for (o, c) in out.iter_mut().zip(&cost) {
            *o = if hi > lo && c.is_finite() {
                (hi - c) / (hi - lo)
            } else {
                1.0
            };
        }
    }
    fn prefix_consumer(&self) -> Option<PrefixConsumer> {
        Some(self.consumer.clone())
    }
    fn bind_prefix(&self, source: PrefixSource) {
        self.source.set(source);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::datastore::{DatastoreWriter, EndpointSpec, HealthConfig, InFlight};
    use crate::prefix::{PrefixConfig, PrefixIndex};
    use crate::request::ParsedRequest;
    use crate::scheduler::{PrefixMatches, RequestData};
    use crate::service_model::Observation;

    fn scorer() -> PredictedTtftScorer {
        PredictedTtftScorer {
            name: TYPE.into(),
            priors: Priors {
                overhead_ms: 0.0,
                prefill_ms_per_token: 0.05,
                queue_ms_per_request: 10.0,
            },
            consumer: PrefixConsumer {
                producer: None,
                legacy: None,
                field: String::new(),
                precise: false,
            },
            source: BoundSource::default(),
        }
    }

    /// Two endpoints; the first holds `cached_blocks` 16-token blocks of a 4096-token prompt and
    /// has `busy` requests in flight. The scores of both.
    fn scores(
        cached_blocks: usize,
        busy: usize,
        teach: impl Fn(&crate::datastore::Endpoint),
    ) -> Vec<f64> {
        let ds = DatastoreWriter::new(HealthConfig::default());
        ds.set_endpoints(vec![
            EndpointSpec::new("10.0.0.1:8000"),
            EndpointSpec::new("10.0.0.2:8000"),
        ]);
        let snap = ds.snapshot();
        let _guards: Vec<InFlight> = (0..busy)
            .map(|_| InFlight::new(snap.endpoints[0].endpoint.clone()))
            .collect();
        teach(&snap.endpoints[0].endpoint);
        let index = PrefixIndex::new(PrefixConfig {
            block_size: 64,
            ..Default::default()
        });
        let prompt = vec![b'x'; 4096 * 4];
        let hashes = index.hash("m", &prompt);
        index.insert(
            snap.endpoints[0].slot(),
            &index.hash("m", &prompt[..64 * cached_blocks]),
        );
        let prefix = PrefixMatches::approximate(index.lookup(&hashes), 16);
        let req = ParsedRequest {
            prompt,
            ..Default::default()
        };
        let data = RequestData {
            prompt_tokens: Some(4096),
            ..Default::default()
        };
        let ctx = SchedCtx {
            snapshot: &snap,
            request: &req,
            prefix: &prefix,
            data: &data,
        };
        let mut out = vec![f64::NAN; 2];
        scorer().score(&ctx, &[0, 1], &mut out);
        out
    }

    #[test]
    fn a_cached_prefix_wins_until_the_queue_there_costs_more_than_the_prefill_it_saves() {
        // 3840 of 4096 tokens cached saves 192 ms of prefill at 0.05 ms/token; each request in
        // flight costs 10 ms: the cached endpoint wins with up to 19 ahead, loses with 20.
        assert_eq!(scores(240, 0, |_| {}), vec![1.0, 0.0]);
        assert_eq!(scores(240, 19, |_| {}), vec![1.0, 0.0]);
        assert_eq!(scores(240, 20, |_| {}), vec![0.0, 1.0]);
        // Nothing cached and nothing in flight anywhere: a tie, both 1.
        assert_eq!(scores(0, 0, |_| {}), vec![1.0, 1.0]);
    }

    #[test]
    fn a_learned_slow_endpoint_loses_its_cache_advantage() {
        // The cached endpoint turns out to prefill at 1 ms/token and queue 200 ms per request.
        let slow = |e: &crate::datastore::Endpoint| {
            for _ in 0..50 {
                e.service().observe(&Observation {
                    uncached_tokens: 1000,
                    inflight_at_pick: 0,
                    ttft_ms: 1000.0,
                    e2e_ms: 1100.0,
                    completion_tokens: 2,
                });
                e.service().observe(&Observation {
                    uncached_tokens: 1000,
                    inflight_at_pick: 1,
                    ttft_ms: 1200.0,
                    e2e_ms: 1300.0,
                    completion_tokens: 2,
                });
            }
        };
        // 256 uncached tokens at 1 ms + 1 × 200 ms (456 ms) against 4096 × 0.05 ms (205 ms).
        assert_eq!(scores(240, 1, slow), vec![0.0, 1.0]);
        // Idle too: its 256 uncached tokens at 1 ms (256 ms) cost more than 205 ms elsewhere.
        assert_eq!(scores(240, 0, slow), vec![0.0, 1.0]);
        // With the whole prompt cached it wins again.
        assert_eq!(scores(256, 0, slow), vec![1.0, 0.0]);
    }

    #[test]
    fn bad_parameters_are_refused_naming_the_field() {
        for (k, v) in [
            ("prefillMsPerToken", serde_json::json!(0)),
            ("prefillMsPerToken", serde_json::json!(-1)),
            ("queueMsPerRequest", serde_json::json!(-0.5)),
            ("overheadMs", serde_json::json!(-3)),
        ] {
            let spec = PluginSpec {
                name: None,
                type_: TYPE.into(),
                parameters: Some(serde_json::json!({ k: v })),
            };
            let e = build(&spec, "plugins[2]").err().unwrap();
            assert_eq!(e.field, format!("plugins[2].parameters.{k}"), "{e}");
        }
        let spec = PluginSpec {
            name: None,
            type_: TYPE.into(),
            parameters: Some(serde_json::json!({"bogus": 1})),
        };
        assert_eq!(
            build(&spec, "plugins[2]").err().unwrap().field,
            "plugins[2].parameters.bogus"
        );
    }
}

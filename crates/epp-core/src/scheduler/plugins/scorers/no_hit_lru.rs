//! `no-hit-lru-scorer`: spreads cold requests (no candidate holds any of the prompt's prefix
//! blocks) over the endpoints that least recently took a cold request, so new KV blocks grow
//! evenly. With `n` candidates, those that never took a cold request score
//! `1 − k/(n−1)` in candidate order (k = 0, 1, …); the others `1 − (never + position)/(n−1)`
//! (floored at 0), where `position` is their place in the LRU, oldest first. A request with any
//! prefix hit scores 0.5 everywhere. After a cold pick the chosen endpoint becomes the most
//! recent. Prefix hits come from the `approx-prefix-cache-producer`
//! (`prefixMatchInfoProducerName`; the approximate one when unset).

use std::collections::VecDeque;
use std::sync::Arc;

use parking_lot::Mutex;
use serde::{Deserialize, Serialize};

use crate::config::{ConfigError, PluginSpec};
use crate::scheduler::plugins::{params, BoundSource, Plugin, PrefixConsumer, ProfileRun, Scorer};
use crate::scheduler::PrefixSource;
use crate::scheduler::SchedCtx;

pub const TYPE: &str = "no-hit-lru-scorer";
/// llm-d's default `lruSize`.
pub const DEFAULT_LRU_SIZE: u64 = 1024;
/// Largest `lruSize` accepted.
pub const MAX_LRU_SIZE: u64 = 1_000_000;

#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct NoHitLruParams {
    /// Deprecated in llm-d, where it was never used.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prefix_plugin_type: Option<String>,
    /// Deprecated in llm-d, where it was never used.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prefix_plugin_name: Option<String>,
    /// Endpoints tracked at most (least recently used forgotten first). Default 1024.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lru_size: Option<u64>,
    /// The `approx-prefix-cache-producer` whose match info tells a cold request.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prefix_match_info_producer_name: Option<String>,
}

pub fn build(spec: &PluginSpec, field: &str) -> Result<Plugin, ConfigError> {
    let p: NoHitLruParams = params(spec, field)?;
    if p.prefix_plugin_type.is_some() || p.prefix_plugin_name.is_some() {
        tracing::warn!(
            plugin = field,
            "no-hit-lru-scorer: `prefixPluginType` and `prefixPluginName` are deprecated and have no effect; use `prefixMatchInfoProducerName`"
        );
    }
    let lru_size = p.lru_size.unwrap_or(DEFAULT_LRU_SIZE);
    if lru_size == 0 || lru_size > MAX_LRU_SIZE {
        return Err(ConfigError::new(
            format!("{field}.parameters.lruSize"),
            format!("must be between 1 and {MAX_LRU_SIZE}, got {lru_size}"),
        ));
    }
    let producer_field = if p.prefix_match_info_producer_name.is_some() {
        format!("{field}.parameters.prefixMatchInfoProducerName")
    } else {
        format!("{field}.parameters")
    };
    Ok(Plugin::Scorer(Arc::new(NoHitLruScorer {
        name: spec.name().to_string(),
        lru_size: lru_size as usize,
        consumer: PrefixConsumer {
            producer: p.prefix_match_info_producer_name,
            legacy: None,
            field: producer_field,
            precise: false,
        },
        source: BoundSource::default(),
        lru: Mutex::new(VecDeque::new()),
    })))
}

pub struct NoHitLruScorer {
    name: String,
    lru_size: usize,
    consumer: PrefixConsumer,
    source: BoundSource,
    /// Endpoint ids that took a cold request, oldest first; at most `lru_size`.
    lru: Mutex<VecDeque<String>>,
}

impl NoHitLruScorer {
    fn is_cold(&self, ctx: &SchedCtx<'_>, cands: &[usize]) -> bool {
        let m = &ctx.prefix.get(self.source.get()).blocks;
        !cands.iter().any(|&i| m.matched(ctx.ep(i).slot()) > 0)
    }

    /// The tracked endpoint ids, oldest first.
    pub fn lru_order(&self) -> Vec<String> {
        self.lru.lock().iter().cloned().collect()
    }
}

impl Scorer for NoHitLruScorer {
    fn type_name(&self) -> &'static str {
        TYPE
    }
    fn name(&self) -> &str {
        &self.name
    }
    fn score(&self, ctx: &SchedCtx<'_>, cands: &[usize], out: &mut [f64]) {
        if !self.is_cold(ctx, cands) {
            out.iter_mut().for_each(|o| *o = 0.5);
            return;
        }
        let n = cands.len();
        if n <= 1 {
            out.iter_mut().for_each(|o| *o = 1.0);
            return;
        }
        let ids: Vec<String> = cands.iter().map(|&i| ctx.ep(i).endpoint.id()).collect();
        let lru = self.lru.lock();
        let positions: Vec<Option<usize>> = ids
            .iter()
            .map(|id| lru.iter().position(|k| k == id))
            .collect();
        drop(lru);
        let never = positions.iter().filter(|p| p.is_none()).count();
        let span = (n - 1) as f64;
        let mut k = 0usize;
        for (o, pos) in out.iter_mut().zip(&positions) {
            *o = match pos {
                None => {
                    let s = 1.0 - k as f64 / span;
                    k += 1;
                    s
                }
                Some(p) => (1.0 - (never + p) as f64 / span).max(0.0),
            };
        }
    }
    fn prefix_consumer(&self) -> Option<PrefixConsumer> {
        Some(self.consumer.clone())
    }
    fn bind_prefix(&self, source: PrefixSource) {
        self.source.set(source);
    }
    fn pre_request(&self, ctx: &SchedCtx<'_>, run: &ProfileRun<'_>) {
        if !self.is_cold(ctx, run.cands) {
            return;
        }
        let id = ctx.ep(run.picked).endpoint.id();
        let mut lru = self.lru.lock();
        if let Some(p) = lru.iter().position(|k| *k == id) {
            lru.remove(p);
        }
        lru.push_back(id);
        while lru.len() > self.lru_size {
            lru.pop_front();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::testing::{ctx_with, scores};
    use super::*;

    fn build_with(yaml: &str) -> Result<Plugin, ConfigError> {
        build(
            &PluginSpec {
                name: None,
                type_: TYPE.into(),
                parameters: Some(serde_yaml::from_str(yaml).unwrap()),
            },
            "plugins[3]",
        )
    }

    fn teach(p: &Plugin, w: &super::super::testing::TestWorld, picked: usize) {
        let Plugin::Scorer(s) = p else { panic!() };
        w.with_ctx(|ctx| {
            let cands: Vec<usize> = (0..ctx.snapshot.endpoints.len()).collect();
            s.pre_request(
                ctx,
                &ProfileRun {
                    profile: "default",
                    cands: &cands,
                    picked,
                },
            )
        });
    }

    #[test]
    fn cold_requests_rotate_through_least_recently_used() {
        let (mut w, _) = ctx_with(&[(0.0, 0.0); 4]);
        let p = build_with("{lruSize: 8}").unwrap();
        // Nothing tracked: candidate order, 1, 2/3, 1/3, 0.
        let s = scores(&w, &p);
        assert_eq!(s, vec![1.0, 1.0 - 1.0 / 3.0, 1.0 - 2.0 / 3.0, 0.0]);
        teach(&p, &w, 0);
        teach(&p, &w, 2);
        // Never used: ep-1 (1.0), ep-3 (2/3); used, oldest first: ep-0 rank 2, ep-2 rank 3.
        let s = scores(&w, &p);
        assert_eq!(s, vec![1.0 - 2.0 / 3.0, 1.0, 0.0, 1.0 - 1.0 / 3.0]);
        let Plugin::Scorer(_) = &p else { panic!() };
        // A warm request: neutral 0.5, and it teaches the LRU nothing.
        w.set_prefix(3, 1, 2);
        assert_eq!(scores(&w, &p), vec![0.5; 4]);
        teach(&p, &w, 3);
        w.set_prefix(3, 0, 2);
        let s = scores(&w, &p);
        assert_eq!(s, vec![1.0 - 2.0 / 3.0, 1.0, 0.0, 1.0 - 1.0 / 3.0]);
        // Re-using ep-0 moves it to the back.
        teach(&p, &w, 0);
        let s = scores(&w, &p);
        assert_eq!(s, vec![0.0, 1.0, 1.0 - 2.0 / 3.0, 1.0 - 1.0 / 3.0]);
    }

    #[test]
    fn lru_is_bounded_and_single_candidates_score_one() {
        let (w, _) = ctx_with(&[(0.0, 0.0); 3]);
        let p = build_with("{lruSize: 2}").unwrap();
        for i in 0..3 {
            teach(&p, &w, i);
        }
        let Plugin::Scorer(_) = &p else { panic!() };
        // ep-0 was forgotten: it counts as never used again.
        let s = scores(&w, &p);
        assert_eq!(s, vec![1.0, 0.5, 0.0]);
        let (w1, _) = ctx_with(&[(0.0, 0.0)]);
        assert_eq!(scores(&w1, &p), vec![1.0]);
    }

    #[test]
    fn parameters_are_checked() {
        assert_eq!(
            build_with("lruSize: 0").err().unwrap().field,
            "plugins[3].parameters.lruSize"
        );
        assert_eq!(
            build_with("lruCapacity: 3").err().unwrap().field,
            "plugins[3].parameters.lruCapacity"
        );
        assert!(build_with("{prefixPluginType: prefix-cache-scorer, prefixPluginName: x}").is_ok());
    }
}

//! `max-score-picker`: the highest total score first. Ties go to the endpoint with fewer
//! requests in flight (through this picker, and through the other replicas when they share
//! state), so a burst of new requests whose scores tie (nothing cached yet, scrapes not yet
//! showing the burst) spreads over the pool instead of stacking where chance puts it. Remaining
//! ties go by rendezvous hashing of the prompt's first block with each endpoint's address: the
//! same prompt start ranks endpoints in the same order in every replica (so two replicas that
//! see a new prefix group at once place it on the same endpoint before either has heard of the
//! other's pick), while different prompts spread evenly. A request with no prompt bytes ties at
//! random.

use std::sync::Arc;

use rand::Rng;
use xxhash_rust::xxh64::xxh64;

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

/// Highest total score first; ties by fewer requests in flight, then at random.
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
    fn pick(&self, ctx: &SchedCtx<'_>, cands: &[usize], scores: &[f64]) -> Vec<usize> {
        let mut rng = rand::rng();
        let key = tie_key(&ctx.request.target_model, &ctx.request.prompt);
        let mut order: Vec<(usize, f64, usize, u64)> = (0..cands.len())
            .map(|k| {
                let ep = &ctx.ep(cands[k]).endpoint;
                let tie = match key {
                    Some(key) => xxh64(ep.address().as_bytes(), key),
                    None => rng.random::<u64>(),
                };
                (k, scores[k], ep.load_inflight(), tie)
            })
            .collect();
        order.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.2.cmp(&b.2)).then(a.3.cmp(&b.3)));
        order.truncate(self.p.limit(cands.len()));
        order.into_iter().map(|(k, ..)| k).collect()
    }
}

/// Bytes of prompt the rendezvous tie-break keys on: the first block of the approximate
/// index's default size, so requests of one prefix group share a key.
const TIE_PREFIX_BYTES: usize = 64;

/// The rendezvous key of a request, `None` without prompt bytes.
fn tie_key(model: &str, prompt: &[u8]) -> Option<u64> {
    if prompt.is_empty() {
        return None;
    }
    let head = &prompt[..prompt.len().min(TIE_PREFIX_BYTES)];
    Some(xxh64(head, xxh64(model.as_bytes(), 0x7469_6562_7265_616b)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::datastore::InFlight;
    use crate::scheduler::plugins::scorers::testing::ctx_with;

    #[test]
    fn highest_score_first_and_ties_go_to_fewer_in_flight() {
        let (w, eps) = ctx_with(&[(0.0, 0.0), (0.0, 0.0), (0.0, 0.0)]);
        let p = MaxScorePicker::default();
        // ep-0 two in flight, ep-1 one, ep-2 none: equal scores are ordered 2, 1, 0, every time.
        let _g: Vec<InFlight> = [0, 0, 1]
            .iter()
            .map(|&i| InFlight::new(eps[i].clone()))
            .collect();
        for _ in 0..50 {
            let order = w.with_ctx(|ctx| p.pick(ctx, &[0, 1, 2], &[0.5, 0.5, 0.5]));
            assert_eq!(order, vec![2, 1, 0]);
        }
        // A higher score still wins whatever its load.
        let order = w.with_ctx(|ctx| p.pick(ctx, &[0, 1, 2], &[0.9, 0.5, 0.5]));
        assert_eq!(order, vec![0, 2, 1]);
        // Equal scores and equal loads: each is first sometimes (random).
        let (w, _eps) = ctx_with(&[(0.0, 0.0), (0.0, 0.0)]);
        let mut firsts = [0; 2];
        for _ in 0..200 {
            let order = w.with_ctx(|ctx| p.pick(ctx, &[0, 1], &[1.0, 1.0]));
            firsts[order[0]] += 1;
        }
        assert!(firsts[0] > 20 && firsts[1] > 20, "{firsts:?}");
    }

    #[test]
    fn remaining_ties_follow_the_prompt_start_alike_in_every_replica() {
        let p = MaxScorePicker::default();
        // Two "replicas": separate datastores over the same addresses.
        let (mut a, _) = ctx_with(&[(0.0, 0.0); 4]);
        let (mut b, _) = ctx_with(&[(0.0, 0.0); 4]);
        let mut firsts = [0u32; 4];
        for g in 0..200 {
            let prompt = format!("group {g} system prompt that is long enough to fill a block....")
                .into_bytes();
            a.req.prompt = prompt.clone();
            b.req.prompt = prompt;
            let oa = a.with_ctx(|ctx| p.pick(ctx, &[0, 1, 2, 3], &[0.5; 4]));
            let ob = b.with_ctx(|ctx| p.pick(ctx, &[0, 1, 2, 3], &[0.5; 4]));
            assert_eq!(oa, ob, "group {g}");
            // The same prompt start again: the same order.
            assert_eq!(oa, a.with_ctx(|ctx| p.pick(ctx, &[0, 1, 2, 3], &[0.5; 4])));
            firsts[oa[0]] += 1;
        }
        // Different prompts spread over the pool (200 groups over 4: ~50 each).
        assert!(firsts.iter().all(|&n| n > 25), "{firsts:?}");
    }

    #[test]
    fn other_replicas_in_flight_requests_break_ties_too() {
        let (w, eps) = ctx_with(&[(0.0, 0.0), (0.0, 0.0)]);
        let p = MaxScorePicker::default();
        eps[0].set_remote_inflight(3);
        let _g = InFlight::new(eps[1].clone());
        for _ in 0..20 {
            // ep-0: 3 elsewhere; ep-1: 1 here. Fewer in all goes first.
            assert_eq!(
                w.with_ctx(|ctx| p.pick(ctx, &[0, 1], &[1.0, 1.0])),
                vec![1, 0]
            );
        }
        eps[0].set_remote_inflight(0);
        assert_eq!(
            w.with_ctx(|ctx| p.pick(ctx, &[0, 1], &[1.0, 1.0])),
            vec![0, 1]
        );
    }
}

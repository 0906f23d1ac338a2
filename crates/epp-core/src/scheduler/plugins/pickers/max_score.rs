//! `max-score-picker`: the highest total score first. Ties go to the endpoint with fewer
//! requests in flight through this picker, then at random: a burst of new requests whose scores
//! tie (nothing cached yet, scrapes not yet showing the burst) spreads over the pool instead of
//! stacking where chance puts it.

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
        let mut order: Vec<(usize, f64, usize, u32)> = (0..cands.len())
            .map(|k| {
                let inflight = ctx.ep(cands[k]).endpoint.inflight();
                (k, scores[k], inflight, rng.random::<u32>())
            })
            .collect();
        order.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.2.cmp(&b.2)).then(a.3.cmp(&b.3)));
        order.truncate(self.p.limit(cands.len()));
        order.into_iter().map(|(k, ..)| k).collect()
    }
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
}

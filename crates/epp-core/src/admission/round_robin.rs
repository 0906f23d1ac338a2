//! `round-robin-fairness-policy`: the flows (fairness ids) of a band with queued requests take
//! turns, one dispatch each, in the order of their ids, so no flow can starve another however
//! much more it sends.

use std::ops::Bound;
use std::sync::Arc;

use crate::config::{ConfigError, PluginSpec};
use crate::scheduler::plugins::NoParams;

use super::controller::Flows;
use super::FairnessPolicy;

pub const TYPE: &str = "round-robin-fairness-policy";

pub fn build(spec: &PluginSpec, field: &str) -> Result<Arc<dyn FairnessPolicy>, ConfigError> {
    let _: NoParams = crate::config::plugin_parameters(spec, field)?;
    Ok(Arc::new(RoundRobin {
        name: spec.name().to_string(),
    }))
}

#[derive(Debug)]
pub struct RoundRobin {
    pub name: String,
}

impl FairnessPolicy for RoundRobin {
    fn type_name(&self) -> &'static str {
        TYPE
    }
    fn name(&self) -> &str {
        &self.name
    }
    /// The first flow after the one picked last (wrapping around); flows without queued
    /// requests are not in `flows`.
    fn pick<'a>(&self, flows: &'a Flows, cursor: Option<&str>) -> Option<&'a str> {
        let next = match cursor {
            Some(c) => flows
                .range::<str, _>((Bound::Excluded(c), Bound::Unbounded))
                .next(),
            None => None,
        };
        next.or_else(|| flows.iter().next())
            .map(|(id, _)| id.as_ref())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::admission::global_strict::GlobalStrict;
    use proptest::prelude::*;

    /// Flows with `backlog[i]` queued requests each; arrival sequence numbers interleaved as
    /// given by `arrivals` (flow index per arrival).
    fn flows(arrivals: &[usize], n: usize) -> Flows {
        let mut f = Flows::new();
        for (seq, &i) in arrivals.iter().enumerate() {
            f.entry(Arc::from(format!("tenant-{i}").as_str()))
                .or_default()
                .push_for_test((0, seq as u64));
        }
        assert!(f.len() <= n);
        f
    }

    /// Dispatch `steps` times with `policy`; per-flow dispatch counts.
    fn run(policy: &dyn FairnessPolicy, mut f: Flows, steps: usize) -> Vec<(String, usize)> {
        let mut counts = std::collections::BTreeMap::<String, usize>::new();
        let mut cursor: Option<Arc<str>> = None;
        for _ in 0..steps {
            let Some(id) = policy.pick(&f, cursor.as_deref()).map(Arc::<str>::from) else {
                break;
            };
            *counts.entry(id.to_string()).or_default() += 1;
            let q = f.get_mut(&id).unwrap();
            q.pop_for_test();
            if q.is_empty() {
                f.remove(&id);
            }
            cursor = Some(id);
        }
        counts.into_iter().collect()
    }

    proptest! {
        /// While every flow is backlogged, round robin gives each the same number of
        /// dispatches (within one), whatever the arrival pattern.
        #[test]
        fn round_robin_shares_equally_while_backlogged(
            arrivals in proptest::collection::vec(0usize..5, 1..200),
        ) {
            let n = 5;
            let f = flows(&arrivals, n);
            let min_backlog = f.values().map(|q| q.len()).min().unwrap();
            let flows_n = f.len();
            let counts = run(&RoundRobin { name: TYPE.into() }, f, min_backlog * flows_n);
            let max = counts.iter().map(|c| c.1).max().unwrap();
            let min = counts.iter().map(|c| c.1).min().unwrap();
            prop_assert_eq!(counts.len(), flows_n);
            prop_assert!(max - min <= 1, "{:?}", counts);
        }

        /// Global strict ignores flows: it dispatches in arrival order across the band.
        #[test]
        fn global_strict_is_fcfs_across_flows(
            arrivals in proptest::collection::vec(0usize..5, 1..100),
        ) {
            let mut f = flows(&arrivals, 5);
            let p = GlobalStrict::default();
            let mut last = None;
            while let Some(id) = p.pick(&f, None).map(Arc::<str>::from) {
                let q = f.get_mut(&id).unwrap();
                let (_, seq) = q.head().unwrap();
                prop_assert!(last.is_none_or(|l| l < seq));
                last = Some(seq);
                q.pop_for_test();
                if q.is_empty() {
                    f.remove(&id);
                }
            }
        }
    }
}

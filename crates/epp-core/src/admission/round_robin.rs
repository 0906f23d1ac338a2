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

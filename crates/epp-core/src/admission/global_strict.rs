//! `global-strict-fairness-policy` (llm-d-router's default): ignores flow boundaries and
//! dispatches the single best request of the whole band, by the band's ordering (with FCFS:
//! the oldest request of the band, whatever its fairness id).

use std::sync::Arc;

use crate::config::{ConfigError, PluginSpec};
use crate::scheduler::plugins::NoParams;

use super::controller::Flows;
use super::FairnessPolicy;

pub const TYPE: &str = "global-strict-fairness-policy";

pub fn build(spec: &PluginSpec, field: &str) -> Result<Arc<dyn FairnessPolicy>, ConfigError> {
    let _: NoParams = crate::config::plugin_parameters(spec, field)?;
    Ok(Arc::new(GlobalStrict {
        name: spec.name().to_string(),
    }))
}

#[derive(Debug)]
pub struct GlobalStrict {
    pub name: String,
}

impl Default for GlobalStrict {
    fn default() -> Self {
        Self { name: TYPE.into() }
    }
}

impl FairnessPolicy for GlobalStrict {
    fn type_name(&self) -> &'static str {
        TYPE
    }
    fn name(&self) -> &str {
        &self.name
    }
    fn pick<'a>(&self, flows: &'a Flows, _: Option<&str>) -> Option<&'a str> {
        flows
            .iter()
            .filter_map(|(id, q)| q.head().map(|k| (k, id)))
            .min_by_key(|(k, _)| *k)
            .map(|(_, id)| id.as_ref())
    }
}

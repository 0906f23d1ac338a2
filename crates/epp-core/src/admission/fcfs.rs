//! `fcfs-ordering-policy`: requests of a flow dispatch in arrival order (llm-d-router's default
//! ordering).

use std::sync::Arc;
use std::time::Duration;

use crate::config::{ConfigError, PluginSpec};
use crate::scheduler::plugins::NoParams;

use super::OrderingPolicy;

pub const TYPE: &str = "fcfs-ordering-policy";

pub fn build(spec: &PluginSpec, field: &str) -> Result<Arc<dyn OrderingPolicy>, ConfigError> {
    let _: NoParams = crate::config::plugin_parameters(spec, field)?;
    Ok(Arc::new(Fcfs {
        name: spec.name().to_string(),
    }))
}

/// First come, first served.
#[derive(Debug)]
pub struct Fcfs {
    pub name: String,
}

impl Default for Fcfs {
    fn default() -> Self {
        Self { name: TYPE.into() }
    }
}

impl OrderingPolicy for Fcfs {
    fn type_name(&self) -> &'static str {
        TYPE
    }
    fn name(&self) -> &str {
        &self.name
    }
    /// Every request has the same key: arrival order alone decides.
    fn key(&self, _: u64, _: Duration) -> u64 {
        0
    }
}

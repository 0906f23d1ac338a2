//! `always-disagg-pd-decider`: every request runs the prefill stage. No parameters.

use std::sync::Arc;

use crate::config::{ConfigError, PluginSpec};
use crate::scheduler::plugins::deciders::Decider;
use crate::scheduler::plugins::{params, NoParams, Plugin};
use crate::scheduler::SchedCtx;

pub const TYPE: &str = "always-disagg-pd-decider";

pub fn build(spec: &PluginSpec, field: &str) -> Result<Plugin, ConfigError> {
    let _: NoParams = params(spec, field)?;
    Ok(Plugin::Decider(Arc::new(AlwaysDisaggPd {
        name: spec.name().to_string(),
    })))
}

#[derive(Debug)]
pub struct AlwaysDisaggPd {
    name: String,
}

impl Decider for AlwaysDisaggPd {
    fn type_name(&self) -> &'static str {
        TYPE
    }
    fn name(&self) -> &str {
        &self.name
    }
    fn disaggregate(&self, _ctx: &SchedCtx<'_>, _decode: Option<usize>) -> bool {
        true
    }
}

//! `single-profile-handler`: runs one scheduling profile for every request: the one named
//! `default`, else the first. It takes no parameters; it is also what runs when no handler is
//! configured.

use std::sync::Arc;

use crate::config::{ConfigError, PluginSpec};
use crate::scheduler::plugins::profiles::{HandlerPlan, ProfileHandler};
use crate::scheduler::plugins::{params, NoParams, Plugin};
use crate::scheduler::Profile;

pub const TYPE: &str = "single-profile-handler";

pub fn build(spec: &PluginSpec, field: &str) -> Result<Plugin, ConfigError> {
    let _: NoParams = params(spec, field)?;
    Ok(Plugin::ProfileHandler(Arc::new(SingleProfileHandler {
        name: spec.name().to_string(),
    })))
}

#[derive(Debug, Default)]
pub struct SingleProfileHandler {
    name: String,
}

/// The profile the single handler runs: `default`, else the first.
pub fn default_profile(profiles: &[Profile]) -> usize {
    profiles
        .iter()
        .position(|p| p.name == "default")
        .unwrap_or(0)
}

impl ProfileHandler for SingleProfileHandler {
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
    fn plan(
        &self,
        profiles: &[Profile],
        _plugins: &[(String, Plugin)],
    ) -> Result<HandlerPlan, (String, String)> {
        Ok(HandlerPlan::Single {
            profile: default_profile(profiles),
        })
    }
}

//! `data-parallel-profile-handler` (deprecated in llm-d in favour of the single handler behind
//! a mesh that routes ranks itself): runs the one configured profile; the pick (a rank's
//! `ip:port`) goes out in `x-data-parallel-host-port` and the request itself to the pod's
//! `primaryPort`, where llm-d's routing sidecar hands it to the rank.
//!
//! Parameters: `primaryPort` (default 8000, 1–65535). Exactly one scheduling profile.

use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::config::{ConfigError, PluginSpec};
use crate::scheduler::plugins::profiles::{HandlerPlan, ProfileHandler};
use crate::scheduler::plugins::{params, Plugin};
use crate::scheduler::Profile;

pub const TYPE: &str = "data-parallel-profile-handler";

#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct DataParallelParams {
    #[serde(default = "default_port")]
    pub primary_port: i64,
}

fn default_port() -> i64 {
    8000
}

impl Default for DataParallelParams {
    fn default() -> Self {
        Self {
            primary_port: default_port(),
        }
    }
}

/// A `primaryPort` value checked: 1–65535.
pub(crate) fn port(v: i64, field: &str) -> Result<u16, ConfigError> {
    u16::try_from(v).ok().filter(|p| *p > 0).ok_or_else(|| {
        ConfigError::new(
            format!("{field}.parameters.primaryPort"),
            format!("must be between 1 and 65535, got {v}"),
        )
    })
}

pub fn build(spec: &PluginSpec, field: &str) -> Result<Plugin, ConfigError> {
    let p: DataParallelParams = params(spec, field)?;
    let primary_port = port(p.primary_port, field)?;
    tracing::warn!(
        plugin = %spec.name(),
        "data-parallel-profile-handler is deprecated in llm-d (use single-profile-handler behind a mesh that routes data-parallel ranks)"
    );
    Ok(Plugin::ProfileHandler(Arc::new(DataParallelHandler {
        name: spec.name().to_string(),
        primary_port,
    })))
}

#[derive(Debug)]
pub struct DataParallelHandler {
    name: String,
    primary_port: u16,
}

impl ProfileHandler for DataParallelHandler {
    fn type_name(&self) -> &'static str {
        TYPE
    }
    fn name(&self) -> &str {
        &self.name
    }
    fn plan(
        &self,
        profiles: &[Profile],
        _plugins: &[(String, Plugin)],
    ) -> Result<HandlerPlan, (String, String)> {
        if profiles.len() != 1 {
            return Err((
                String::new(),
                format!(
                    "data-parallel-profile-handler runs exactly one scheduling profile; {} are configured",
                    profiles.len()
                ),
            ));
        }
        Ok(HandlerPlan::DataParallel {
            profile: 0,
            primary_port: self.primary_port,
        })
    }
}

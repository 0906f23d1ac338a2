//! `static-usage-limit-policy` (llm-d-router's default): every priority band dispatches while
//! the pool's saturation is below one fixed ceiling (`threshold`, default 1.0).

use serde::{Deserialize, Serialize};

use crate::config::{ConfigError, PluginSpec};

pub const TYPE: &str = "static-usage-limit-policy";

#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, rename_all = "camelCase", default)]
pub struct StaticParams {
    pub threshold: f64,
}

impl Default for StaticParams {
    fn default() -> Self {
        Self { threshold: 1.0 }
    }
}

/// The saturation ceiling below which requests dispatch.
#[derive(Clone, Debug, PartialEq)]
pub struct StaticUsageLimit {
    pub name: String,
    pub threshold: f64,
}

impl Default for StaticUsageLimit {
    fn default() -> Self {
        Self {
            name: TYPE.into(),
            threshold: 1.0,
        }
    }
}

pub fn build(spec: &PluginSpec, field: &str) -> Result<StaticUsageLimit, ConfigError> {
    let p: StaticParams = crate::config::plugin_parameters(spec, field)?;
    if !p.threshold.is_finite() || p.threshold <= 0.0 {
        return Err(ConfigError::new(
            format!("{field}.parameters.threshold"),
            "must be a positive number (1.0: dispatch until the pool reads saturated)",
        ));
    }
    Ok(StaticUsageLimit {
        name: spec.name().to_string(),
        threshold: p.threshold,
    })
}

//! `pd-profile-handler` (deprecated in llm-d for `disagg-profile-handler`): decode, then
//! prefill when the decider agrees, with an optional data-parallel `primaryPort` for the decode
//! pick. Records `pd_decision_total` rather than `disagg_decision_total`, as llm-d does.
//!
//! Parameters: `decodeProfile` (default `decode`), `prefillProfile` (default `prefill`),
//! `deciderPluginName` (default `prefix-based-pd-decider`, the default name of a decider of
//! that type), `primaryPort` (0: off). `prefixPluginType` and `prefixPluginName` are read and
//! have no effect (as in llm-d, where they were never used). `prefixMatchInfoProducerName` is
//! refused unless empty: the decider reads the configuration's primary prefix source.

use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::config::{ConfigError, PluginSpec};
use crate::scheduler::plugins::profiles::{
    decider_named, profile_named, DisaggPlan, HandlerPlan, ProfileHandler, StageOrder,
};
use crate::scheduler::plugins::{params, Plugin};
use crate::scheduler::Profile;

pub const TYPE: &str = "pd-profile-handler";

#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct PdParams {
    #[serde(default)]
    decode_profile: Option<String>,
    #[serde(default)]
    prefill_profile: Option<String>,
    #[serde(default)]
    prefix_plugin_type: Option<String>,
    #[serde(default)]
    prefix_plugin_name: Option<String>,
    #[serde(default)]
    primary_port: i64,
    #[serde(default)]
    decider_plugin_name: Option<String>,
    #[serde(default)]
    prefix_match_info_producer_name: Option<String>,
}

pub fn build(spec: &PluginSpec, field: &str) -> Result<Plugin, ConfigError> {
    let p: PdParams = params(spec, field)?;
    tracing::warn!(plugin = %spec.name(), "pd-profile-handler is deprecated; use disagg-profile-handler");
    if p.prefix_plugin_type
        .as_deref()
        .is_some_and(|s| !s.is_empty())
        || p.prefix_plugin_name
            .as_deref()
            .is_some_and(|s| !s.is_empty())
    {
        tracing::warn!(plugin = %spec.name(), "pd-profile-handler: prefixPluginType and prefixPluginName have no effect");
    }
    if let Some(n) = p
        .prefix_match_info_producer_name
        .as_deref()
        .filter(|s| !s.is_empty())
    {
        return Err(ConfigError::new(
            format!("{field}.parameters.prefixMatchInfoProducerName"),
            format!("{n:?}: the decider reads the prefix source of the configuration's first prefix-cache-scorer; set prefixMatchInfoProducerName there, or move to disagg-profile-handler"),
        ));
    }
    let primary_port = match p.primary_port {
        0 => None,
        v => Some(super::data_parallel::port(v, field)?),
    };
    Ok(Plugin::ProfileHandler(Arc::new(PdHandler {
        name: spec.name().to_string(),
        decode: p
            .decode_profile
            .filter(|s| !s.is_empty())
            .unwrap_or_else(|| "decode".into()),
        prefill: p
            .prefill_profile
            .filter(|s| !s.is_empty())
            .unwrap_or_else(|| "prefill".into()),
        decider: p
            .decider_plugin_name
            .filter(|s| !s.is_empty())
            .unwrap_or_else(|| super::super::deciders::prefix_based_pd::TYPE.into()),
        primary_port,
    })))
}

#[derive(Debug)]
pub struct PdHandler {
    name: String,
    decode: String,
    prefill: String,
    decider: String,
    primary_port: Option<u16>,
}

impl ProfileHandler for PdHandler {
    fn type_name(&self) -> &'static str {
        TYPE
    }
    fn name(&self) -> &str {
        &self.name
    }
    fn plan(
        &self,
        profiles: &[Profile],
        plugins: &[(String, Plugin)],
    ) -> Result<HandlerPlan, (String, String)> {
        let decode = profile_named(profiles, &self.decode, "decodeProfile")?;
        let prefill = profile_named(profiles, &self.prefill, "prefillProfile")?;
        if prefill == decode {
            return Err((
                "prefillProfile".into(),
                format!(
                    "the prefill and decode profiles must differ (both {:?})",
                    self.decode
                ),
            ));
        }
        let decider = decider_named(plugins, &self.decider, "deciderPluginName")?;
        Ok(HandlerPlan::Disagg(DisaggPlan {
            decode,
            prefill: Some((prefill, Some(decider))),
            order: StageOrder::DecodeFirst,
            primary_port: self.primary_port,
            legacy_pd_metric: true,
        }))
    }
}

//! `disagg-profile-handler`: prefill/decode disaggregation. Every request runs the decode
//! profile; when the prefill decider agrees (it sees the decode pick), the prefill profile runs
//! too. The decode pick is where the request goes; the prefill pick travels beside it: as
//! `x-prefiller-host-port` for llm-d's routing sidecar behind Envoy, or as the prefill call
//! `epp proxy` makes itself. A prefill profile that finds no endpoint leaves the request
//! decode-only.
//!
//! Parameters (llm-d's): `profiles.{decode,prefill}` (default `decode`, `prefill`),
//! `deciders.prefill` (a decider plugin's name; unset: prefill never runs), `stageOrder`
//! (`decode-first`, the default, or `prefill-first`: prefill whenever its profile exists, no
//! decider). The flat spellings of earlier releases (`decodeProfile`, `prefillProfile`,
//! `prefillDeciderPluginName`, `deciderPluginName`) are read too, with a deprecation warning;
//! one config uses one form. Encode disaggregation (`profiles.encode`, `deciders.encode`) is not
//! implemented and is refused by name.

use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::config::{ConfigError, PluginSpec};
use crate::scheduler::plugins::profiles::{
    decider_named, profile_named, DisaggPlan, HandlerPlan, ProfileHandler, StageOrder,
};
use crate::scheduler::plugins::Plugin;
use crate::scheduler::Profile;

pub const TYPE: &str = "disagg-profile-handler";

#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct Nested {
    #[serde(default)]
    stage_order: Option<String>,
    #[serde(default)]
    profiles: NestedProfiles,
    #[serde(default)]
    deciders: NestedDeciders,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
struct NestedProfiles {
    #[serde(default)]
    decode: Option<String>,
    #[serde(default)]
    prefill: Option<String>,
    #[serde(default)]
    encode: Option<String>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
struct NestedDeciders {
    #[serde(default)]
    prefill: Option<String>,
    #[serde(default)]
    encode: Option<String>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct Flat {
    #[serde(default)]
    stage_order: Option<String>,
    #[serde(default)]
    decode_profile: Option<String>,
    #[serde(default)]
    prefill_profile: Option<String>,
    #[serde(default)]
    encode_profile: Option<String>,
    #[serde(default)]
    prefill_decider_plugin_name: Option<String>,
    #[serde(default)]
    encode_decider_plugin_name: Option<String>,
    #[serde(default)]
    decider_plugin_name: Option<String>,
}

/// The handler's parameters, resolved from either form.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DisaggParams {
    pub order: StageOrder,
    pub decode: String,
    pub prefill: String,
    pub prefill_decider: Option<String>,
}

/// Parse a `stageOrder` value as llm-d does (case, `-` and `_` ignored).
pub fn stage_order(s: &str) -> Option<StageOrder> {
    let k: String = s
        .chars()
        .filter(|c| *c != '-' && *c != '_')
        .collect::<String>()
        .to_ascii_lowercase();
    match k.as_str() {
        "" | "decodefirst" | "decode" => Some(StageOrder::DecodeFirst),
        "prefillfirst" | "prefill" => Some(StageOrder::PrefillFirst),
        _ => None,
    }
}

fn nonempty(v: Option<String>) -> Option<String> {
    v.filter(|s| !s.is_empty())
}

pub fn parse(spec: &PluginSpec, field: &str) -> Result<DisaggParams, ConfigError> {
    let at = |k: &str| format!("{field}.parameters.{k}");
    let raw = match &spec.parameters {
        None | Some(serde_json::Value::Null) => serde_json::json!({}),
        Some(v) => v.clone(),
    };
    let (order, decode, prefill, decider, encode_profile, encode_decider) =
        match serde_json::from_value::<Nested>(raw.clone()) {
            Ok(n) => (
                n.stage_order,
                n.profiles.decode,
                n.profiles.prefill,
                n.deciders.prefill,
                n.profiles.encode,
                n.deciders.encode,
            ),
            Err(nested) => match serde_json::from_value::<Flat>(raw) {
                Ok(f) => {
                    tracing::warn!(
                        plugin = %spec.name(),
                        "disagg-profile-handler: the flat parameters are deprecated; use profiles.{{decode,prefill}} and deciders.prefill"
                    );
                    (
                        f.stage_order,
                        f.decode_profile,
                        f.prefill_profile,
                        nonempty(f.prefill_decider_plugin_name)
                            .or(nonempty(f.decider_plugin_name)),
                        f.encode_profile,
                        f.encode_decider_plugin_name,
                    )
                }
                Err(flat) => {
                    return Err(ConfigError::new(
                        format!("{field}.parameters"),
                        format!("neither the nested form ({nested}) nor the deprecated flat form ({flat}) parses; use one form"),
                    ))
                }
            },
        };
    if nonempty(encode_decider).is_some() {
        return Err(ConfigError::new(
            at("deciders.encode"),
            "encode disaggregation is not supported by epp (prefill/decode is)",
        ));
    }
    if nonempty(encode_profile).is_some() {
        return Err(ConfigError::new(
            at("profiles.encode"),
            "encode disaggregation is not supported by epp (prefill/decode is)",
        ));
    }
    let order_text = order.unwrap_or_default();
    let order = stage_order(&order_text).ok_or_else(|| {
        ConfigError::new(
            at("stageOrder"),
            format!("{order_text:?} is not a stage order: use decode-first or prefill-first"),
        )
    })?;
    let prefill_decider = nonempty(decider);
    if order == StageOrder::PrefillFirst && prefill_decider.is_some() {
        return Err(ConfigError::new(
            at("deciders.prefill"),
            "a prefill decider is not supported in prefill-first stage order (prefill always runs)",
        ));
    }
    Ok(DisaggParams {
        order,
        decode: nonempty(decode).unwrap_or_else(|| "decode".into()),
        prefill: nonempty(prefill).unwrap_or_else(|| "prefill".into()),
        prefill_decider,
    })
}

pub fn build(spec: &PluginSpec, field: &str) -> Result<Plugin, ConfigError> {
    let params = parse(spec, field)?;
    Ok(Plugin::ProfileHandler(Arc::new(DisaggHandler {
        name: spec.name().to_string(),
        params,
    })))
}

#[derive(Debug)]
pub struct DisaggHandler {
    name: String,
    params: DisaggParams,
}

impl ProfileHandler for DisaggHandler {
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
        let p = &self.params;
        let decode = profile_named(profiles, &p.decode, "profiles.decode")?;
        let prefill_profile = profiles.iter().position(|x| x.name == p.prefill);
        let prefill = match (p.order, &p.prefill_decider, prefill_profile) {
            (StageOrder::DecodeFirst, Some(d), Some(pi)) => {
                Some((pi, Some(decider_named(plugins, d, "deciders.prefill")?)))
            }
            (StageOrder::DecodeFirst, Some(_), None) => {
                // Named a decider but nothing to run: llm-d skips silently; we refuse.
                return Err(profile_named(profiles, &p.prefill, "profiles.prefill").unwrap_err());
            }
            (StageOrder::DecodeFirst, None, Some(_)) => {
                tracing::info!(
                    plugin = %self.name,
                    "disagg-profile-handler has no deciders.prefill: P/D disaggregation is off, every request is decode-only"
                );
                None
            }
            (StageOrder::DecodeFirst, None, None) => None,
            (StageOrder::PrefillFirst, _, Some(pi)) => Some((pi, None)),
            (StageOrder::PrefillFirst, _, None) => None,
        };
        if prefill.as_ref().is_some_and(|(pi, _)| *pi == decode) {
            return Err((
                "profiles.prefill".into(),
                format!(
                    "the prefill and decode profiles must differ (both {:?})",
                    p.decode
                ),
            ));
        }
        Ok(HandlerPlan::Disagg(DisaggPlan {
            decode,
            prefill,
            order: p.order,
            primary_port: None,
            legacy_pd_metric: false,
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(v: serde_json::Value) -> PluginSpec {
        PluginSpec {
            name: None,
            type_: TYPE.into(),
            parameters: Some(v),
        }
    }

    #[test]
    fn nested_and_flat_forms_read_the_same() {
        let nested = parse(
            &spec(serde_json::json!({"deciders": {"prefill": "d"}, "profiles": {"decode": "dd"}})),
            "plugins[0]",
        )
        .unwrap();
        let flat = parse(
            &spec(serde_json::json!({"deciderPluginName": "d", "decodeProfile": "dd"})),
            "plugins[0]",
        )
        .unwrap();
        assert_eq!(nested, flat);
        assert_eq!(nested.prefill, "prefill");
        assert_eq!(nested.prefill_decider.as_deref(), Some("d"));
        // prefillDeciderPluginName wins over the older alias.
        let f = parse(
            &spec(
                serde_json::json!({"deciderPluginName": "old", "prefillDeciderPluginName": "new"}),
            ),
            "plugins[0]",
        )
        .unwrap();
        assert_eq!(f.prefill_decider.as_deref(), Some("new"));
    }

    #[test]
    fn refusals_name_the_field() {
        let e = parse(
            &spec(serde_json::json!({"deciders": {"encode": "mm"}})),
            "plugins[4]",
        )
        .unwrap_err();
        assert_eq!(e.field, "plugins[4].parameters.deciders.encode");
        let e = parse(
            &spec(serde_json::json!({"stageOrder": "sideways"})),
            "plugins[4]",
        )
        .unwrap_err();
        assert_eq!(e.field, "plugins[4].parameters.stageOrder");
        let e = parse(
            &spec(serde_json::json!({"stageOrder": "Prefill_First", "deciders": {"prefill": "d"}})),
            "plugins[4]",
        )
        .unwrap_err();
        assert_eq!(e.field, "plugins[4].parameters.deciders.prefill");
        // Mixed forms parse as neither.
        let e = parse(
            &spec(serde_json::json!({"deciders": {"prefill": "d"}, "decodeProfile": "x"})),
            "plugins[4]",
        )
        .unwrap_err();
        assert_eq!(e.field, "plugins[4].parameters");
        assert!(e.message.contains("use one form"), "{e}");
    }

    #[test]
    fn stage_orders_parse_as_llm_d_does() {
        for s in ["", "decode", "Decode-First", "decode_first"] {
            assert_eq!(stage_order(s), Some(StageOrder::DecodeFirst), "{s}");
        }
        for s in ["prefill", "PREFILL-FIRST", "prefill_first"] {
            assert_eq!(stage_order(s), Some(StageOrder::PrefillFirst), "{s}");
        }
        assert_eq!(stage_order("first"), None);
    }
}

//! The GAIE `EndpointPickerConfig` (YAML): plugins, scheduling profiles and weights. Parsed
//! strictly (`deny_unknown_fields`), validated at load, and every error names the exact field,
//! e.g. `plugins[1].parameters.blockSizeTokens: must be at least 1`.

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::Value;

/// The config dialect llm-d-router reads.
pub const API_VERSION: &str = "llm-d.ai/v1alpha1";
/// The Gateway API Inference Extension dialect: still loaded, with a deprecation warning.
pub const LEGACY_API_VERSION: &str = "inference.networking.x-k8s.io/v1alpha1";
pub const KIND: &str = "EndpointPickerConfig";

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct EndpointPickerConfig {
    pub api_version: String,
    pub kind: String,
    /// Feature gates, `name` or `name=true|false`. Only gates epp implements are accepted
    /// (see [`FEATURE_GATES`]).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub feature_gates: Vec<String>,
    #[serde(default)]
    pub plugins: Vec<PluginSpec>,
    #[serde(default)]
    pub scheduling_profiles: Vec<ProfileSpec>,
    /// Where endpoint data comes from: sources (e.g. `metrics-data-source`) and the extractors
    /// that read them (e.g. `core-metrics-extractor`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data_layer: Option<DataLayerConfig>,
    /// Which parsers read request bodies.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request_handler: Option<RequestHandlerConfig>,
    /// Flow control (queueing, priority, fairness). Parsed strictly; any setting in it is
    /// refused at validation because epp does not implement flow control yet.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub flow_control: Option<FlowControlConfig>,
    /// Deprecated spelling of `flowControl.saturationDetector`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub saturation_detector: Option<SaturationDetectorRef>,
    /// Deprecated spelling of `requestHandler.parsers: [one]`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parser: Option<PluginRef>,
}

/// A reference to a plugin by name (`pluginRef`).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct PluginRef {
    pub plugin_ref: String,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct SaturationDetectorRef {
    #[serde(default)]
    pub plugin_ref: String,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct DataLayerConfig {
    /// Whether the default metrics source and extractor are added when no source of type
    /// `metrics-data-source` is listed (default true).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub inject_defaults: Option<bool>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub sources: Vec<DataLayerSource>,
    /// Endpoint discovery plugin. epp discovers endpoints from flags; any value is refused.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub discovery: Option<PluginRef>,
    /// Peer discovery between picker replicas; refused (not implemented).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub peer_discovery: Option<PluginRef>,
    /// Cross-replica state sync; refused (not implemented).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cross_replica_syncer_plugin_ref: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cross_replica_sync_interval: Option<String>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct DataLayerSource {
    pub plugin_ref: String,
    #[serde(default)]
    pub extractors: Vec<PluginRef>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct RequestHandlerConfig {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub parsers: Vec<PluginRef>,
}

/// llm-d-router's `flowControl` section, parsed strictly so a typo is still named. epp does not
/// implement flow control yet: validation refuses every setting but `saturationDetector`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct FlowControlConfig {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_bytes: Option<Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_requests: Option<Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[serde(rename = "defaultRequestTTL")]
    pub default_request_ttl: Option<Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[serde(rename = "noEndpointRequestTTL")]
    pub no_endpoint_request_ttl: Option<Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub default_priority_band: Option<Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub default_negative_priority_band: Option<Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub priority_bands: Option<Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub usage_limit_policy_plugin_ref: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub saturation_detector: Option<SaturationDetectorRef>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub enable_eviction: Option<bool>,
}

impl FlowControlConfig {
    /// The first flow-control setting present (other than the saturation detector), by its
    /// YAML key.
    fn first_setting(&self) -> Option<&'static str> {
        [
            ("maxBytes", self.max_bytes.is_some()),
            ("maxRequests", self.max_requests.is_some()),
            ("defaultRequestTTL", self.default_request_ttl.is_some()),
            (
                "noEndpointRequestTTL",
                self.no_endpoint_request_ttl.is_some(),
            ),
            ("defaultPriorityBand", self.default_priority_band.is_some()),
            (
                "defaultNegativePriorityBand",
                self.default_negative_priority_band.is_some(),
            ),
            ("priorityBands", self.priority_bands.is_some()),
            (
                "usageLimitPolicyPluginRef",
                self.usage_limit_policy_plugin_ref.is_some(),
            ),
            ("enableEviction", self.enable_eviction == Some(true)),
        ]
        .into_iter()
        .find(|(_, set)| *set)
        .map(|(k, _)| k)
    }
}

/// Feature gates epp knows. llm-d-router's `dataLayer` gate is always on here (it is on by
/// default there too) and accepted for compatibility; `flowControl` is refused until flow
/// control exists.
pub const FEATURE_GATES: &[&str] = &["dataLayer"];

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct PluginSpec {
    /// Defaults to `type`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    #[serde(rename = "type")]
    pub type_: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parameters: Option<Value>,
}

impl PluginSpec {
    pub fn name(&self) -> &str {
        self.name.as_deref().unwrap_or(&self.type_)
    }

    /// A spec of `type_` with `parameters` parsed from YAML (none when `None`), for the plugins'
    /// unit tests.
    #[cfg(test)]
    pub(crate) fn for_test(type_: &str, parameters: Option<&str>) -> Self {
        Self {
            name: None,
            type_: type_.into(),
            parameters: parameters.map(|y| serde_yaml::from_str(y).unwrap()),
        }
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct ProfileSpec {
    pub name: String,
    #[serde(default)]
    pub plugins: Vec<ProfilePluginRef>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct ProfilePluginRef {
    pub plugin_ref: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub weight: Option<f64>,
}

/// Every plugin type this build implements: scheduling plugins, data-layer plugins and
/// parsers, for "supported types" lists in errors.
pub fn supported_plugin_types() -> Vec<&'static str> {
    crate::scheduler::plugins::all_types()
        .chain(crate::datalayer::TYPES.iter().copied())
        .chain(crate::parsers::TYPES.iter().copied())
        .collect()
}

/// A configuration error that names the field at fault.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
#[error("{field}: {message}")]
pub struct ConfigError {
    pub field: String,
    pub message: String,
}

impl ConfigError {
    pub fn new(field: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            field: field.into(),
            message: message.into(),
        }
    }
}

impl EndpointPickerConfig {
    /// Parse YAML text. Syntax and unknown-field errors carry the YAML path and position.
    pub fn from_yaml(text: &str) -> Result<Self, ConfigError> {
        let de = serde_yaml::Deserializer::from_str(text);
        let cfg: EndpointPickerConfig = serde_path_to_error(de)?;
        cfg.check_header()?;
        cfg.check_profiles()?;
        cfg.check_sections()?;
        Ok(cfg)
    }

    /// What this config spells in a deprecated way, one line each, for a start-up warning.
    pub fn deprecations(&self) -> Vec<String> {
        let mut out = Vec::new();
        if self.api_version == LEGACY_API_VERSION {
            out.push(format!(
                "apiVersion {LEGACY_API_VERSION} is deprecated; use {API_VERSION}"
            ));
        }
        if self.saturation_detector.is_some() {
            out.push(
                "top-level saturationDetector is deprecated; use flowControl.saturationDetector"
                    .into(),
            );
        }
        if self.parser.is_some() {
            out.push("top-level parser is deprecated; use requestHandler.parsers".into());
        }
        out
    }

    /// The parser references in force: `requestHandler.parsers`, else the deprecated
    /// top-level `parser`, else none (the defaults apply).
    pub fn parser_refs(&self) -> Vec<&PluginRef> {
        match &self.request_handler {
            Some(rh) if !rh.parsers.is_empty() => rh.parsers.iter().collect(),
            _ => self.parser.iter().collect(),
        }
    }

    /// The saturation detector named, if any: `flowControl.saturationDetector`, else the
    /// deprecated top-level one.
    pub fn saturation_detector_ref(&self) -> Option<&str> {
        self.flow_control
            .as_ref()
            .and_then(|f| f.saturation_detector.as_ref())
            .or(self.saturation_detector.as_ref())
            .map(|s| s.plugin_ref.as_str())
            .filter(|s| !s.is_empty())
    }

    /// Sections that parse but ask for something epp does not do are refused here, naming the
    /// key.
    fn check_sections(&self) -> Result<(), ConfigError> {
        for (i, g) in self.feature_gates.iter().enumerate() {
            let (name, value) = match g.split_once('=') {
                Some((n, v)) => (n.trim(), Some(v.trim().to_ascii_lowercase())),
                None => (g.trim(), None),
            };
            let field = format!("featureGates[{i}]");
            if let Some(v) = &value {
                if !matches!(v.as_str(), "true" | "false" | "1" | "0" | "t" | "f") {
                    return Err(ConfigError::new(
                        field,
                        format!("{g:?}: the value after `=` must be true or false"),
                    ));
                }
            }
            if !FEATURE_GATES.contains(&name) {
                return Err(ConfigError::new(
                    field,
                    format!(
                        "unknown feature gate {name:?}: epp does not support it; supported gates: {}",
                        FEATURE_GATES.join(", ")
                    ),
                ));
            }
        }
        if let Some(fc) = &self.flow_control {
            if let Some(key) = fc.first_setting() {
                return Err(ConfigError::new(
                    format!("flowControl.{key}"),
                    "epp does not support flow control yet (requests are not queued in the picker); remove the flowControl settings",
                ));
            }
        }
        if let Some(r) = self.saturation_detector_ref() {
            let field = if self
                .flow_control
                .as_ref()
                .is_some_and(|f| f.saturation_detector.is_some())
            {
                "flowControl.saturationDetector.pluginRef"
            } else {
                "saturationDetector.pluginRef"
            };
            return Err(ConfigError::new(
                field,
                format!(
                    "{r:?}: epp does not support saturation detector plugins; put a saturation-filter in the scheduling profile instead (it answers 429 when every endpoint is saturated)"
                ),
            ));
        }
        if let Some(dl) = &self.data_layer {
            if dl.discovery.is_some() {
                return Err(ConfigError::new(
                    "dataLayer.discovery",
                    "epp does not support discovery plugins; endpoints come from --pool-name, --endpoint-selector, --endpoint or --endpoints-file",
                ));
            }
            if dl.peer_discovery.is_some() {
                return Err(ConfigError::new(
                    "dataLayer.peerDiscovery",
                    "epp does not support peer discovery between picker replicas",
                ));
            }
            if dl.cross_replica_syncer_plugin_ref.is_some()
                || dl.cross_replica_sync_interval.is_some()
            {
                let key = if dl.cross_replica_syncer_plugin_ref.is_some() {
                    "crossReplicaSyncerPluginRef"
                } else {
                    "crossReplicaSyncInterval"
                };
                return Err(ConfigError::new(
                    format!("dataLayer.{key}"),
                    "epp does not support cross-replica state sync",
                ));
            }
        }
        Ok(())
    }

    /// Profile names are unique: with two of one name, which one runs would be a guess.
    fn check_profiles(&self) -> Result<(), ConfigError> {
        for (i, p) in self.scheduling_profiles.iter().enumerate() {
            if let Some(first) = self.scheduling_profiles[..i]
                .iter()
                .position(|q| q.name == p.name)
            {
                return Err(ConfigError::new(
                    format!("schedulingProfiles[{i}].name"),
                    format!(
                        "duplicate profile name {:?} (also schedulingProfiles[{first}]); profile names must be unique",
                        p.name
                    ),
                ));
            }
        }
        Ok(())
    }

    pub fn to_yaml(&self) -> String {
        serde_yaml::to_string(self).unwrap_or_default()
    }

    fn check_header(&self) -> Result<(), ConfigError> {
        if self.api_version != API_VERSION && self.api_version != LEGACY_API_VERSION {
            return Err(ConfigError::new(
                "apiVersion",
                format!(
                    "must be {API_VERSION:?} (or the deprecated {LEGACY_API_VERSION:?}), got {:?}",
                    self.api_version
                ),
            ));
        }
        if self.kind != KIND {
            return Err(ConfigError::new(
                "kind",
                format!("must be {KIND:?}, got {:?}", self.kind),
            ));
        }
        Ok(())
    }
}

/// Deserialize with a field path in the error (serde_yaml reports the location; we add the path
/// by walking the error message it gives for unknown fields and type mismatches).
fn serde_path_to_error(
    de: serde_yaml::Deserializer<'_>,
) -> Result<EndpointPickerConfig, ConfigError> {
    EndpointPickerConfig::deserialize(de).map_err(|e| {
        let loc = e
            .location()
            .map(|l| format!(" (line {}, column {})", l.line(), l.column()))
            .unwrap_or_default();
        // serde_yaml prefixes nested errors with their path, e.g. "plugins[0]: unknown field ...".
        let msg = e.to_string();
        let (field, message) = match msg.split_once(": ") {
            Some((path, rest)) if !path.contains(' ') => (path.to_string(), rest.to_string()),
            _ => ("config".to_string(), msg.clone()),
        };
        let message = match message.find(" at line ") {
            Some(i) => message[..i].to_string(),
            None => message,
        };
        ConfigError::new(field, format!("{message}{loc}"))
    })
}

/// A plugin's `parameters` as its typed struct (absent or null: the defaults). Errors name the
/// field inside `parameters`, e.g. `plugins[0].parameters.blockSizeTokens: invalid type: ...`;
/// `field` is the plugin's own path (`plugins[0]`).
pub fn plugin_parameters<T: DeserializeOwned + Default>(
    spec: &PluginSpec,
    field: &str,
) -> Result<T, ConfigError> {
    match &spec.parameters {
        None | Some(Value::Null) => Ok(T::default()),
        Some(v) => ::serde_path_to_error::deserialize(v.clone()).map_err(|e| {
            let path = e.path().to_string();
            let at = match path.as_str() {
                "." => format!("{field}.parameters"),
                p if p.starts_with('[') => format!("{field}.parameters{p}"),
                p => format!("{field}.parameters.{p}"),
            };
            ConfigError::new(at, e.into_inner().to_string())
        }),
    }
}

/// Built-in policies, as config text. `default` is what runs when no config is given.
pub mod presets {
    /// The default profile: prefix affinity balanced by three load signals. With llm-d's
    /// idle-vs-busy active-request scoring, `idleThreshold: 2` at weight 3 is what keeps cache
    /// reuse, balance and hot-spot spreading all high (docs/benchmarks.md, "Default profile
    /// weights").
    pub const DEFAULT: &str = r#"apiVersion: llm-d.ai/v1alpha1
kind: EndpointPickerConfig
plugins:
- type: prefix-cache-scorer
  parameters:
    blockSizeTokens: 16
    maxPrefixBlocksToMatch: 256
    lruCapacityPerServer: 31250
- type: queue-scorer
- type: kv-cache-utilization-scorer
- type: active-request-scorer
  parameters:
    idleThreshold: 2
- type: max-score-picker
schedulingProfiles:
- name: default
  plugins:
  - pluginRef: prefix-cache-scorer
    weight: 3
  - pluginRef: queue-scorer
    weight: 2
  - pluginRef: kv-cache-utilization-scorer
    weight: 2
  - pluginRef: active-request-scorer
    weight: 3
  - pluginRef: max-score-picker
"#;

    pub const RANDOM: &str = r#"apiVersion: llm-d.ai/v1alpha1
kind: EndpointPickerConfig
plugins:
- type: random-picker
schedulingProfiles:
- name: default
  plugins:
  - pluginRef: random-picker
"#;

    pub const ROUND_ROBIN: &str = r#"apiVersion: llm-d.ai/v1alpha1
kind: EndpointPickerConfig
plugins:
- type: round-robin-picker
schedulingProfiles:
- name: default
  plugins:
  - pluginRef: round-robin-picker
"#;

    pub const LEAST_QUEUE: &str = r#"apiVersion: llm-d.ai/v1alpha1
kind: EndpointPickerConfig
plugins:
- type: queue-scorer
- type: active-request-scorer
- type: max-score-picker
schedulingProfiles:
- name: default
  plugins:
  - pluginRef: queue-scorer
    weight: 1
  - pluginRef: active-request-scorer
    weight: 1
  - pluginRef: max-score-picker
"#;

    pub const PREFIX_ONLY: &str = r#"apiVersion: llm-d.ai/v1alpha1
kind: EndpointPickerConfig
plugins:
- type: prefix-cache-scorer
- type: max-score-picker
schedulingProfiles:
- name: default
  plugins:
  - pluginRef: prefix-cache-scorer
    weight: 1
  - pluginRef: max-score-picker
"#;

    /// `(name, yaml)` for every preset, in report order.
    pub const ALL: [(&str, &str); 5] = [
        ("random", RANDOM),
        ("round-robin", ROUND_ROBIN),
        ("least-queue", LEAST_QUEUE),
        ("prefix-only", PREFIX_ONLY),
        ("default", DEFAULT),
    ];

    pub fn by_name(name: &str) -> Option<&'static str> {
        ALL.iter().find(|(n, _)| *n == name).map(|(_, y)| *y)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn presets_parse_and_round_trip() {
        for (name, y) in presets::ALL {
            let c = EndpointPickerConfig::from_yaml(y).unwrap_or_else(|e| panic!("{name}: {e}"));
            let again = EndpointPickerConfig::from_yaml(&c.to_yaml()).unwrap();
            assert_eq!(c, again, "{name}");
        }
    }

    #[test]
    fn errors_name_the_field() {
        let e = EndpointPickerConfig::from_yaml("apiVersion: x\nkind: EndpointPickerConfig\n")
            .unwrap_err();
        assert_eq!(e.field, "apiVersion");
        let e = EndpointPickerConfig::from_yaml(
            "apiVersion: inference.networking.x-k8s.io/v1alpha1\nkind: EndpointPickerConfig\nplugins:\n- type: queue-scorer\n  weight: 2\n",
        )
        .unwrap_err();
        assert_eq!(e.field, "plugins[0]", "{e}");
        assert!(e.message.contains("unknown field `weight`"), "{e}");
        let e = EndpointPickerConfig::from_yaml(
            "apiVersion: inference.networking.x-k8s.io/v1alpha1\nkind: EndpointPickerConfig\nschedulingProfiles:\n- name: a\n  plugins:\n  - pluginRef: q\n    weight: heavy\n",
        )
        .unwrap_err();
        assert_eq!(e.field, "schedulingProfiles[0].plugins[0].weight", "{e}");
    }

    const HEAD: &str =
        "apiVersion: inference.networking.x-k8s.io/v1alpha1\nkind: EndpointPickerConfig\n";

    #[test]
    fn duplicate_profile_names_are_refused() {
        let e = EndpointPickerConfig::from_yaml(&format!(
            "{HEAD}plugins:\n- type: random-picker\n- type: max-score-picker\nschedulingProfiles:\n- name: default\n  plugins:\n  - pluginRef: random-picker\n- name: other\n- name: default\n  plugins:\n  - pluginRef: max-score-picker\n"
        ))
        .unwrap_err();
        assert_eq!(e.field, "schedulingProfiles[2].name");
        assert_eq!(
            e.to_string(),
            "schedulingProfiles[2].name: duplicate profile name \"default\" (also schedulingProfiles[0]); profile names must be unique"
        );
    }

    #[test]
    fn parameter_errors_name_the_parameter() {
        let spec = |params: &str| PluginSpec {
            name: None,
            type_: "prefix-cache-scorer".into(),
            parameters: Some(serde_yaml::from_str(params).unwrap()),
        };
        #[derive(Debug, Default, Deserialize)]
        #[serde(deny_unknown_fields, rename_all = "camelCase")]
        struct P {
            #[allow(dead_code)]
            block_size_tokens: Option<u64>,
        }
        let e =
            plugin_parameters::<P>(&spec("blockSizeTokens: sixteen"), "plugins[0]").unwrap_err();
        assert_eq!(e.field, "plugins[0].parameters.blockSizeTokens");
        assert_eq!(e.message, "invalid type: string \"sixteen\", expected u64");
        // Not a map at all: the parameters themselves are at fault; an unknown key is named.
        let e = plugin_parameters::<P>(&spec("[1, 2]"), "plugins[3]").unwrap_err();
        assert_eq!(e.field, "plugins[3].parameters");
        let e = plugin_parameters::<P>(&spec("bogus: 1"), "plugins[0]").unwrap_err();
        assert_eq!(e.field, "plugins[0].parameters.bogus");
        assert!(e.message.starts_with("unknown field `bogus`"), "{e}");
        let ok: P = plugin_parameters(&spec("blockSizeTokens: 8"), "plugins[0]").unwrap();
        assert_eq!(ok.block_size_tokens, Some(8));
    }
}

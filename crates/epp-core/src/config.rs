//! The GAIE `EndpointPickerConfig` (YAML): plugins, scheduling profiles and weights. Parsed
//! strictly (`deny_unknown_fields`), validated at load, and every error names the exact field,
//! e.g. `plugins[1].parameters.blockSizeTokens: must be at least 1`.

use std::collections::BTreeMap;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::Value;

pub const API_VERSION: &str = "inference.networking.x-k8s.io/v1alpha1";
pub const KIND: &str = "EndpointPickerConfig";

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct EndpointPickerConfig {
    pub api_version: String,
    pub kind: String,
    #[serde(default)]
    pub plugins: Vec<PluginSpec>,
    #[serde(default)]
    pub scheduling_profiles: Vec<ProfileSpec>,
    /// Accepted for compatibility with GAIE configs; no gate changes behaviour yet.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub feature_gates: Vec<String>,
    /// Accepted for compatibility; thresholds live on the `saturation-filter` plugin.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub saturation_detector: Option<BTreeMap<String, Value>>,
}

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
        Ok(cfg)
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
        if self.api_version != API_VERSION {
            return Err(ConfigError::new(
                "apiVersion",
                format!("must be {API_VERSION:?}, got {:?}", self.api_version),
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
    /// The default profile: prefix affinity balanced by three load signals.
    pub const DEFAULT: &str = r#"apiVersion: inference.networking.x-k8s.io/v1alpha1
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

    pub const RANDOM: &str = r#"apiVersion: inference.networking.x-k8s.io/v1alpha1
kind: EndpointPickerConfig
plugins:
- type: random-picker
schedulingProfiles:
- name: default
  plugins:
  - pluginRef: random-picker
"#;

    pub const ROUND_ROBIN: &str = r#"apiVersion: inference.networking.x-k8s.io/v1alpha1
kind: EndpointPickerConfig
plugins:
- type: round-robin-picker
schedulingProfiles:
- name: default
  plugins:
  - pluginRef: round-robin-picker
"#;

    pub const LEAST_QUEUE: &str = r#"apiVersion: inference.networking.x-k8s.io/v1alpha1
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

    pub const PREFIX_ONLY: &str = r#"apiVersion: inference.networking.x-k8s.io/v1alpha1
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

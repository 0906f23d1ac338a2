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
    /// Flow control (queueing, priority, fairness): in force with `featureGates: [flowControl]`;
    /// without the gate only `saturationDetector` is read (the sheddable-request check).
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

/// llm-d-router's `flowControl` section, parsed strictly so a typo is still named. Quantities
/// and durations stay raw here and are read (with the field in every error) when the flow
/// controller is built ([`crate::admission::FlowSettings::from_config`]).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct FlowControlConfig {
    /// Global bound on the bytes of queued requests (a Kubernetes quantity; absent or 0: none).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_bytes: Option<Value>,
    /// Global bound on queued requests (absent or 0: none).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_requests: Option<Value>,
    /// Queue-wait budget while the pool has endpoints (a Go duration; default 60s; 0s: none).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[serde(rename = "defaultRequestTTL")]
    pub default_request_ttl: Option<Value>,
    /// Queue-wait budget while the pool has no endpoints (default: `defaultRequestTTL`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[serde(rename = "noEndpointRequestTTL")]
    pub no_endpoint_request_ttl: Option<Value>,
    /// Template for priorities no band lists.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub default_priority_band: Option<PriorityBandSpec>,
    /// Template for negative priorities no band lists (default: `defaultPriorityBand`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub default_negative_priority_band: Option<PriorityBandSpec>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub priority_bands: Vec<PriorityBandSpec>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub usage_limit_policy_plugin_ref: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub saturation_detector: Option<SaturationDetectorRef>,
    /// In-flight eviction of sheddable requests; refused when true (not implemented).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub enable_eviction: Option<bool>,
}

/// One priority band (`flowControl.priorityBands[]`, `defaultPriorityBand`,
/// `defaultNegativePriorityBand`). For the templates `priority` is ignored, as in llm-d-router.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct PriorityBandSpec {
    #[serde(default)]
    pub priority: i64,
    /// Bytes of queued requests (a Kubernetes quantity; absent or 0: 1G).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_bytes: Option<Value>,
    /// Queued requests (absent or 0: 5000).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_requests: Option<Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fairness_policy_ref: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ordering_policy_ref: Option<String>,
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
            ("priorityBands", !self.priority_bands.is_empty()),
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

/// The feature gate that turns flow control on.
pub const FLOW_CONTROL_GATE: &str = "flowControl";

/// Feature gates epp knows. llm-d-router's `dataLayer` gate is always on here (it is on by
/// default there too) and accepted for compatibility; `flowControl` queues requests in the
/// picker under saturation (see [`crate::admission`]).
pub const FEATURE_GATES: &[&str] = &["dataLayer", FLOW_CONTROL_GATE];

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
        .chain(crate::admission::TYPES.iter().copied())
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

    /// Whether feature gate `name` is on: listed as `name` or `name=true` (the last mention
    /// wins, as llm-d-router reads them).
    pub fn feature_enabled(&self, name: &str) -> bool {
        let mut on = false;
        for g in &self.feature_gates {
            let (n, v) = match g.split_once('=') {
                Some((n, v)) => (n.trim(), Some(v.trim().to_ascii_lowercase())),
                None => (g.trim(), None),
            };
            if n == name {
                on = !matches!(v.as_deref(), Some("false" | "0" | "f"));
            }
        }
        on
    }

    /// Whether requests queue in the picker under saturation (`featureGates: [flowControl]`).
    pub fn flow_control_enabled(&self) -> bool {
        self.feature_enabled(FLOW_CONTROL_GATE)
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
                if !self.feature_enabled(FLOW_CONTROL_GATE) {
                    return Err(ConfigError::new(
                        format!("flowControl.{key}"),
                        "takes effect only with the flow control feature gate; add `featureGates: [flowControl]` or remove the setting",
                    ));
                }
            }
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

/// A Kubernetes resource quantity (`100`, `1k`, `500M`, `1Gi`, `0.5Ki`) as an integer, rounded
/// up as `resource.Quantity.Value()` does. `field` names the key in errors.
pub fn parse_quantity(v: &Value, field: &str) -> Result<u64, ConfigError> {
    let bad = |why: &str| ConfigError::new(field, format!("{v}: {why}"));
    let text = match v {
        Value::Number(n) => n.to_string(),
        Value::String(s) => s.trim().to_string(),
        _ => return Err(bad("must be a quantity such as 100, 1k, 500M or 1Gi")),
    };
    let split = text
        .find(|c: char| !(c.is_ascii_digit() || c == '.' || c == '+' || c == '-'))
        .unwrap_or(text.len());
    let (num, suffix) = text.split_at(split);
    let n: f64 = num
        .parse()
        .map_err(|_| bad("must be a quantity such as 100, 1k, 500M or 1Gi"))?;
    let mult: f64 = match suffix {
        "" => 1.0,
        "m" => 1e-3,
        "k" => 1e3,
        "M" => 1e6,
        "G" => 1e9,
        "T" => 1e12,
        "P" => 1e15,
        "E" => 1e18,
        "Ki" => 1024.0,
        "Mi" => 1024.0 * 1024.0,
        "Gi" => 1024.0 * 1024.0 * 1024.0,
        "Ti" => 1024f64.powi(4),
        "Pi" => 1024f64.powi(5),
        "Ei" => 1024f64.powi(6),
        _ => {
            return Err(bad(
                "unknown quantity suffix (use k, M, G, T, Ki, Mi, Gi, Ti)",
            ))
        }
    };
    let x = n * mult;
    if !x.is_finite() || x < 0.0 {
        return Err(bad("must be non-negative"));
    }
    if x >= u64::MAX as f64 {
        return Err(bad("too large"));
    }
    Ok(x.ceil() as u64)
}

/// A Go duration (`60s`, `1m30s`, `500ms`, `1.5h`, `0s`) as Kubernetes' `metav1.Duration`
/// spells it. `field` names the key in errors.
pub fn parse_go_duration(v: &Value, field: &str) -> Result<std::time::Duration, ConfigError> {
    let bad = || {
        ConfigError::new(
            field,
            format!("{v}: must be a duration such as 60s, 1m30s or 500ms"),
        )
    };
    let s = v.as_str().ok_or_else(bad)?.trim();
    if s == "0" {
        return Ok(std::time::Duration::ZERO);
    }
    if s.is_empty() || s.starts_with('-') {
        return Err(bad());
    }
    let mut rest = s.strip_prefix('+').unwrap_or(s);
    let mut nanos = 0f64;
    while !rest.is_empty() {
        let n_end = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .ok_or_else(bad)?;
        let n: f64 = rest[..n_end].parse().map_err(|_| bad())?;
        rest = &rest[n_end..];
        let u_end = rest
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(rest.len());
        let unit = match &rest[..u_end] {
            "ns" => 1.0,
            "us" | "µs" | "μs" => 1e3,
            "ms" => 1e6,
            "s" => 1e9,
            "m" => 60e9,
            "h" => 3600e9,
            _ => return Err(bad()),
        };
        rest = &rest[u_end..];
        nanos += n * unit;
    }
    if !nanos.is_finite() || nanos > 1e18 {
        return Err(bad());
    }
    Ok(std::time::Duration::from_nanos(nanos.round() as u64))
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

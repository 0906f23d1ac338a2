//! The `flowControl` section resolved: limits, TTLs, priority bands with their policies, the
//! saturation detector and the usage limit, with llm-d-router's defaults
//! (`pkg/epp/flowcontrol/{controller,registry}/config.go`). Plugins are referenced by name from
//! the top-level `plugins` list; `fcfs-ordering-policy`, `global-strict-fairness-policy`,
//! `static-usage-limit-policy` and `utilization-detector` exist under their type names when the
//! list does not declare them.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use crate::config::{parse_go_duration, parse_quantity, ConfigError, EndpointPickerConfig};
use crate::config::{PluginSpec, PriorityBandSpec};

use super::usage_limit::UsageLimit;
use super::{
    concurrency, edf, fcfs, global_strict, round_robin, usage_limit, utilization, FairnessPolicy,
    OrderingPolicy, SaturationDetector,
};

/// Queue-wait budget when none is configured.
pub const DEFAULT_REQUEST_TTL: Duration = Duration::from_secs(60);
/// Queued bytes a band holds when its `maxBytes` is absent or 0.
pub const DEFAULT_BAND_MAX_BYTES: u64 = 1_000_000_000;
/// Queued requests a band holds when its `maxRequests` is absent or 0.
pub const DEFAULT_BAND_MAX_REQUESTS: u64 = 5000;
/// Distinct priority bands the controller keeps (bands come from objectives' priorities).
pub const MAX_BANDS: usize = 1024;

/// One priority band's limits and policies.
pub struct BandSettings {
    pub priority: i64,
    pub max_requests: u64,
    pub max_bytes: u64,
    pub fairness: Arc<dyn FairnessPolicy>,
    pub ordering: Arc<dyn OrderingPolicy>,
}

impl std::fmt::Debug for BandSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BandSettings")
            .field("priority", &self.priority)
            .field("max_requests", &self.max_requests)
            .field("max_bytes", &self.max_bytes)
            .field("fairness", &self.fairness.name())
            .field("ordering", &self.ordering.name())
            .finish()
    }
}

/// Everything the flow controller runs with.
#[derive(Clone)]
pub struct FlowSettings {
    /// Global bound on queued requests (0: none).
    pub max_requests: u64,
    /// Global bound on queued bytes (0: none).
    pub max_bytes: u64,
    /// Queue-wait budget while the pool has endpoints (zero: none).
    pub default_ttl: Duration,
    /// Queue-wait budget while the pool has none (zero: none).
    pub no_endpoint_ttl: Duration,
    /// Bands the config lists, by priority.
    pub bands: BTreeMap<i64, Arc<BandSettings>>,
    /// Template for priorities not listed.
    pub default_band: Arc<BandSettings>,
    /// Template for negative priorities not listed (else `default_band`).
    pub negative_band: Option<Arc<BandSettings>>,
    pub detector: Arc<dyn SaturationDetector>,
    pub usage_limit: UsageLimit,
}

impl std::fmt::Debug for FlowSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FlowSettings")
            .field("max_requests", &self.max_requests)
            .field("max_bytes", &self.max_bytes)
            .field("default_ttl", &self.default_ttl)
            .field("no_endpoint_ttl", &self.no_endpoint_ttl)
            .field("bands", &self.bands)
            .field("default_band", &self.default_band)
            .field("negative_band", &self.negative_band)
            .field("detector", &self.detector.name())
            .field("usage_limit", &self.usage_limit)
            .finish()
    }
}

impl FlowSettings {
    /// The band settings for `priority`: its listed band, else the negative template (for a
    /// negative priority, when configured), else the default template.
    pub fn band_for(&self, priority: i64) -> Arc<BandSettings> {
        if let Some(b) = self.bands.get(&priority) {
            return b.clone();
        }
        let t = match &self.negative_band {
            Some(n) if priority < 0 => n,
            _ => &self.default_band,
        };
        Arc::new(BandSettings {
            priority,
            max_requests: t.max_requests,
            max_bytes: t.max_bytes,
            fairness: t.fairness.clone(),
            ordering: t.ordering.clone(),
        })
    }

    /// Resolve the config's `flowControl` section (absent: all defaults).
    pub fn from_config(cfg: &EndpointPickerConfig) -> Result<Self, ConfigError> {
        let plugins = Plugins::build(&cfg.plugins)?;
        let empty = crate::config::FlowControlConfig::default();
        let fc = cfg.flow_control.as_ref().unwrap_or(&empty);
        let at = |k: &str| format!("flowControl.{k}");
        if fc.enable_eviction == Some(true) {
            return Err(ConfigError::new(
                at("enableEviction"),
                "epp does not evict in-flight requests; remove it or set false",
            ));
        }
        let quantity = |v: &Option<serde_json::Value>, f: String| match v {
            None => Ok(0),
            Some(v) => parse_quantity(v, &f),
        };
        let max_requests = quantity(&fc.max_requests, at("maxRequests"))?;
        let max_bytes = quantity(&fc.max_bytes, at("maxBytes"))?;
        let default_ttl = match &fc.default_request_ttl {
            None => DEFAULT_REQUEST_TTL,
            Some(v) => parse_go_duration(v, &at("defaultRequestTTL"))?,
        };
        let no_endpoint_ttl = match &fc.no_endpoint_request_ttl {
            None => default_ttl,
            Some(v) => parse_go_duration(v, &at("noEndpointRequestTTL"))?,
        };
        let band = |spec: &PriorityBandSpec, f: String| -> Result<Arc<BandSettings>, ConfigError> {
            let max_requests = quantity(&spec.max_requests, format!("{f}.maxRequests"))?;
            let max_bytes = quantity(&spec.max_bytes, format!("{f}.maxBytes"))?;
            let fairness = plugins.fairness(
                spec.fairness_policy_ref.as_deref(),
                &format!("{f}.fairnessPolicyRef"),
            )?;
            let ordering = plugins.ordering(
                spec.ordering_policy_ref.as_deref(),
                &format!("{f}.orderingPolicyRef"),
            )?;
            Ok(Arc::new(BandSettings {
                priority: spec.priority,
                max_requests: if max_requests == 0 {
                    DEFAULT_BAND_MAX_REQUESTS
                } else {
                    max_requests
                },
                max_bytes: if max_bytes == 0 {
                    DEFAULT_BAND_MAX_BYTES
                } else {
                    max_bytes
                },
                fairness,
                ordering,
            }))
        };
        let default_band = band(
            fc.default_priority_band
                .as_ref()
                .unwrap_or(&PriorityBandSpec::default()),
            at("defaultPriorityBand"),
        )?;
        let negative_band = fc
            .default_negative_priority_band
            .as_ref()
            .map(|b| band(b, at("defaultNegativePriorityBand")))
            .transpose()?;
        let mut bands = BTreeMap::new();
        for (i, b) in fc.priority_bands.iter().enumerate() {
            let f = format!("flowControl.priorityBands[{i}]");
            if bands.contains_key(&b.priority) {
                return Err(ConfigError::new(
                    format!("{f}.priority"),
                    format!("duplicate priority level {}", b.priority),
                ));
            }
            bands.insert(b.priority, band(b, f)?);
        }
        if bands.len() > MAX_BANDS {
            return Err(ConfigError::new(
                at("priorityBands"),
                format!("at most {MAX_BANDS} bands"),
            ));
        }
        let detector_field = if fc.saturation_detector.is_some() {
            "flowControl.saturationDetector.pluginRef"
        } else {
            "saturationDetector.pluginRef"
        };
        let detector = plugins.detector(cfg.saturation_detector_ref(), detector_field)?;
        let usage_limit = plugins.usage_limit(
            fc.usage_limit_policy_plugin_ref
                .as_deref()
                .filter(|s| !s.is_empty()),
            &at("usageLimitPolicyPluginRef"),
        )?;
        Ok(Self {
            max_requests,
            max_bytes,
            default_ttl,
            no_endpoint_ttl,
            bands,
            default_band,
            negative_band,
            detector,
            usage_limit,
        })
    }
}

/// The config's flow-control plugins by name.
#[derive(Default)]
struct Plugins {
    fairness: HashMap<String, Arc<dyn FairnessPolicy>>,
    ordering: HashMap<String, Arc<dyn OrderingPolicy>>,
    detectors: HashMap<String, Arc<dyn SaturationDetector>>,
    usage_limits: HashMap<String, UsageLimit>,
    /// Every plugin name of the config with its type (for "is not a ..." errors).
    all: HashMap<String, String>,
}

impl Plugins {
    fn build(specs: &[PluginSpec]) -> Result<Self, ConfigError> {
        let mut p = Plugins::default();
        for (i, spec) in specs.iter().enumerate() {
            let field = format!("plugins[{i}]");
            let name = spec.name().to_string();
            p.all.insert(name.clone(), spec.type_.clone());
            match spec.type_.as_str() {
                global_strict::TYPE => {
                    p.fairness.insert(name, global_strict::build(spec, &field)?);
                }
                round_robin::TYPE => {
                    p.fairness.insert(name, round_robin::build(spec, &field)?);
                }
                fcfs::TYPE => {
                    p.ordering.insert(name, fcfs::build(spec, &field)?);
                }
                edf::TYPE => {
                    p.ordering.insert(name, edf::build(spec, &field)?);
                }
                utilization::TYPE => {
                    p.detectors.insert(name, utilization::build(spec, &field)?);
                }
                concurrency::TYPE => {
                    p.detectors.insert(name, concurrency::build(spec, &field)?);
                }
                usage_limit::TYPE => {
                    p.usage_limits
                        .insert(name, usage_limit::build(spec, &field)?);
                }
                usage_limit::HOLDBACK_TYPE => {
                    p.usage_limits
                        .insert(name, usage_limit::build_holdback(spec, &field)?);
                }
                _ => {}
            }
        }
        Ok(p)
    }

    fn missing(&self, name: &str, field: &str, kind: &str) -> ConfigError {
        match self.all.get(name) {
            Some(t) => {
                ConfigError::new(field, format!("plugin {name:?} (type {t:?}) is not {kind}"))
            }
            None => ConfigError::new(
                field,
                format!("plugin {name:?} not found; declare it under plugins"),
            ),
        }
    }

    fn fairness(
        &self,
        name: Option<&str>,
        field: &str,
    ) -> Result<Arc<dyn FairnessPolicy>, ConfigError> {
        let n = name
            .filter(|n| !n.is_empty())
            .unwrap_or(global_strict::TYPE);
        match self.fairness.get(n) {
            Some(p) => Ok(p.clone()),
            None if n == global_strict::TYPE && !self.all.contains_key(n) => {
                Ok(Arc::new(global_strict::GlobalStrict::default()))
            }
            None => Err(self.missing(n, field, "a fairness policy")),
        }
    }

    fn ordering(
        &self,
        name: Option<&str>,
        field: &str,
    ) -> Result<Arc<dyn OrderingPolicy>, ConfigError> {
        let n = name.filter(|n| !n.is_empty()).unwrap_or(fcfs::TYPE);
        match self.ordering.get(n) {
            Some(p) => Ok(p.clone()),
            None if n == fcfs::TYPE && !self.all.contains_key(n) => {
                Ok(Arc::new(fcfs::Fcfs::default()))
            }
            None => Err(self.missing(n, field, "an ordering policy")),
        }
    }

    fn detector(
        &self,
        name: Option<&str>,
        field: &str,
    ) -> Result<Arc<dyn SaturationDetector>, ConfigError> {
        let n = name.unwrap_or(utilization::TYPE);
        match self.detectors.get(n) {
            Some(p) => Ok(p.clone()),
            None if n == utilization::TYPE && !self.all.contains_key(n) => {
                Ok(Arc::new(utilization::Utilization::default()))
            }
            None => Err(self.missing(n, field, "a saturation detector")),
        }
    }

    fn usage_limit(&self, name: Option<&str>, field: &str) -> Result<UsageLimit, ConfigError> {
        let n = name.unwrap_or(usage_limit::TYPE);
        match self.usage_limits.get(n) {
            Some(p) => Ok(p.clone()),
            None if n == usage_limit::TYPE && !self.all.contains_key(n) => {
                Ok(UsageLimit::default())
            }
            None => Err(self.missing(n, field, "a usage limit policy")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load(flow: &str, gate: bool, plugins: &str) -> Result<FlowSettings, String> {
        let yaml = format!(
            "apiVersion: llm-d.ai/v1alpha1\nkind: EndpointPickerConfig\n{}plugins:\n- type: queue-scorer\n{plugins}{flow}",
            if gate { "featureGates: [flowControl]\n" } else { "" }
        );
        let cfg = EndpointPickerConfig::from_yaml(&yaml).map_err(|e| e.to_string())?;
        FlowSettings::from_config(&cfg).map_err(|e| e.to_string())
    }

    #[test]
    fn llm_d_defaults() {
        let s = load("", true, "").unwrap();
        assert_eq!(s.default_ttl, Duration::from_secs(60));
        assert_eq!(s.no_endpoint_ttl, Duration::from_secs(60));
        assert_eq!((s.max_requests, s.max_bytes), (0, 0));
        let b = s.band_for(7);
        assert_eq!(
            (b.priority, b.max_requests, b.max_bytes),
            (7, 5000, 1_000_000_000)
        );
        assert_eq!(b.fairness.type_name(), global_strict::TYPE);
        assert_eq!(b.ordering.type_name(), fcfs::TYPE);
        assert_eq!(s.detector.type_name(), utilization::TYPE);
        assert_eq!(s.usage_limit, UsageLimit::default());
        // noEndpointRequestTTL follows defaultRequestTTL unless set.
        let s = load("flowControl:\n  defaultRequestTTL: 5s\n", true, "").unwrap();
        assert_eq!(s.no_endpoint_ttl, Duration::from_secs(5));
    }

    #[test]
    fn bands_templates_and_quantities() {
        let s = load(
            "flowControl:\n  maxBytes: 1Gi\n  maxRequests: 1k\n  defaultNegativePriorityBand:\n    maxRequests: 10\n    orderingPolicyRef: edf-ordering-policy\n  priorityBands:\n  - priority: 10\n    maxBytes: 500M\n    fairnessPolicyRef: round-robin-fairness-policy\n",
            true,
            "- type: round-robin-fairness-policy\n- type: edf-ordering-policy\n",
        )
        .unwrap();
        assert_eq!((s.max_requests, s.max_bytes), (1000, 1 << 30));
        let b = s.band_for(10);
        assert_eq!((b.max_requests, b.max_bytes), (5000, 500_000_000));
        assert_eq!(b.fairness.type_name(), round_robin::TYPE);
        let n = s.band_for(-3);
        assert_eq!((n.priority, n.max_requests), (-3, 10));
        assert_eq!(n.ordering.type_name(), edf::TYPE);
        assert_eq!(s.band_for(0).max_requests, 5000, "0 is not negative");
    }

    #[test]
    fn what_is_not_implemented_or_wrong_is_refused_by_name() {
        let e = |flow: &str, gate: bool, plugins: &str| load(flow, gate, plugins).err().unwrap();
        assert!(
            e("flowControl:\n  maxRequests: 10\n", false, "").starts_with(
                "flowControl.maxRequests: takes effect only with the flow control feature gate"
            )
        );
        assert!(e("flowControl:\n  enableEviction: true\n", true, "")
            .starts_with("flowControl.enableEviction:"));
        assert_eq!(
            e("flowControl:\n  defaultPriorityBand:\n    fairnessPolicyRef: nope\n", true, ""),
            "flowControl.defaultPriorityBand.fairnessPolicyRef: plugin \"nope\" not found; declare it under plugins"
        );
        assert_eq!(
            e("flowControl:\n  priorityBands:\n  - priority: 1\n    orderingPolicyRef: queue-scorer\n", true, ""),
            "flowControl.priorityBands[0].orderingPolicyRef: plugin \"queue-scorer\" (type \"queue-scorer\") is not an ordering policy"
        );
        assert!(e(
            "flowControl:\n  priorityBands:\n  - priority: 1\n  - priority: 1\n",
            true,
            ""
        )
        .starts_with("flowControl.priorityBands[1].priority: duplicate priority level 1"));
        assert!(
            e("flowControl:\n  maxBytes: lots\n", true, "").starts_with("flowControl.maxBytes:")
        );
        assert!(e("flowControl:\n  defaultRequestTTL: forever\n", true, "")
            .starts_with("flowControl.defaultRequestTTL:"));
        assert!(e(
            "flowControl:\n  priorityBands:\n  - priority: 1\n    bogus: 2\n",
            true,
            ""
        )
        .contains("unknown field `bogus`"));
        assert!(
            e("flowControl:\n  usageLimitPolicyPluginRef: x\n", true, "").contains("not found")
        );
        // The saturation detector alone is fine without the gate (the legacy check).
        assert!(load(
            "flowControl:\n  saturationDetector:\n    pluginRef: concurrency-detector\n",
            false,
            "- type: concurrency-detector\n"
        )
        .is_ok());
    }

    #[test]
    fn priority_holdback_is_parsed_strictly() {
        let flow = "flowControl:\n  usageLimitPolicyPluginRef: hb\n";
        let with = |params: &str| {
            load(
                flow,
                true,
                &format!("- type: priority-holdback-policy\n  name: hb\n  parameters: {params}\n"),
            )
        };
        let s = with("{minCeiling: 0.6, domain: value}").unwrap();
        assert_eq!(
            s.usage_limit.limit,
            super::super::usage_limit::Limit::Holdback {
                min: 0.6,
                max: 1.0,
                domain: super::super::usage_limit::Domain::Value
            }
        );
        assert_eq!(s.usage_limit.name, "hb");
        for (params, field, says) in [
            ("{}", "plugins[1].parameters.minCeiling", "is required"),
            (
                "{minCeiling: 1.0}",
                "plugins[1].parameters.minCeiling",
                "[0, 1)",
            ),
            (
                "{minCeiling: 0.5, maxCeiling: 0.4}",
                "plugins[1].parameters.minCeiling",
                "below maxCeiling",
            ),
            (
                "{minCeiling: 0.5, maxCeiling: 1.5}",
                "plugins[1].parameters.maxCeiling",
                "(0, 1]",
            ),
            (
                "{minCeiling: 0.5, shape: sigmoid}",
                "plugins[1].parameters.shape",
                "`sigmoid`",
            ),
            (
                "{minCeiling: 0.5, domain: level}",
                "plugins[1].parameters.domain",
                "`level`",
            ),
            ("{minCeiling: 0.5, steps: 3}", "", "unknown field `steps`"),
        ] {
            let e = with(params).unwrap_err();
            assert!(e.contains(field) && e.contains(says), "{params}: {e}");
        }
    }

    #[test]
    fn go_durations_and_quantities() {
        use crate::config::{parse_go_duration, parse_quantity};
        let d = |s: &str| parse_go_duration(&serde_json::json!(s), "f").unwrap();
        assert_eq!(d("1m30s"), Duration::from_secs(90));
        assert_eq!(d("500ms"), Duration::from_millis(500));
        assert_eq!(d("1.5h"), Duration::from_secs(5400));
        assert_eq!(d("0s"), Duration::ZERO);
        assert!(parse_go_duration(&serde_json::json!("-1s"), "f").is_err());
        let q = |v: serde_json::Value| parse_quantity(&v, "f").unwrap();
        assert_eq!(q(serde_json::json!(100)), 100);
        assert_eq!(q(serde_json::json!("1k")), 1000);
        assert_eq!(q(serde_json::json!("2Mi")), 2 << 20);
        assert_eq!(q(serde_json::json!("0.5Ki")), 512);
        assert!(parse_quantity(&serde_json::json!("3X"), "f").is_err());
    }
}

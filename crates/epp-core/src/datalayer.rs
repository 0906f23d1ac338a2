//! The data layer of an `EndpointPickerConfig`: where endpoint data comes from. llm-d-router
//! models it as sources (`metrics-data-source`, `endpoint-notification-source`) feeding
//! extractors (`core-metrics-extractor`); here that wiring resolves to the one scraper's
//! settings ([`MetricsPipeline`]): the URL scheme and path it polls, how it checks TLS, how often,
//! and which series of each engine it reads ([`EngineMappings`]).
//!
//! As in llm-d-router, a config that lists no `metrics-data-source` source gets one (with a
//! `core-metrics-extractor`) unless `dataLayer.injectDefaults` is false; plugins declared under
//! those default names supply their parameters to the injected wiring.

pub mod core_metrics_extractor;
pub mod metrics_source;

use std::sync::Arc;

use crate::config::{plugin_parameters, ConfigError, EndpointPickerConfig, PluginSpec};
pub use core_metrics_extractor::{EngineMapping, EngineMappings, MetricSpec};
pub use metrics_source::{MetricsSource, Scheme};

pub const METRICS_DATA_SOURCE: &str = "metrics-data-source";
pub const CORE_METRICS_EXTRACTOR: &str = "core-metrics-extractor";
pub const ENDPOINT_NOTIFICATION_SOURCE: &str = "endpoint-notification-source";

/// Data-layer plugin types this build implements.
pub const TYPES: &[&str] = &[
    METRICS_DATA_SOURCE,
    CORE_METRICS_EXTRACTOR,
    ENDPOINT_NOTIFICATION_SOURCE,
];

pub fn is_type(t: &str) -> bool {
    TYPES.contains(&t)
}

/// The metrics source and the extractor reading it.
#[derive(Clone, Debug, PartialEq)]
pub struct MetricsPipeline {
    pub source: MetricsSource,
    pub mappings: Arc<EngineMappings>,
    /// Scrape this port of each endpoint instead of its serving port.
    pub port: Option<u16>,
}

impl Default for MetricsPipeline {
    fn default() -> Self {
        Self {
            source: MetricsSource::default(),
            mappings: Arc::new(EngineMappings::default()),
            port: None,
        }
    }
}

/// Command-line settings over the config's metrics source: GAIE's
/// `--model-server-metrics-{port,path,scheme,https-insecure-skip-verify}` and the deprecated
/// `--total-queued-requests-metric` family (series of the default engine: `Some(None)`, an empty
/// spec, stops reading that series, as GAIE's chart does for LoRA on Triton). A flag given wins
/// over the config.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct MetricsFlags {
    pub port: Option<u16>,
    pub path: Option<String>,
    pub scheme: Option<Scheme>,
    pub insecure_skip_verify: Option<bool>,
    pub queued: Option<Option<MetricSpec>>,
    pub running: Option<Option<MetricSpec>>,
    pub kv_usage: Option<Option<MetricSpec>>,
    pub lora: Option<Option<MetricSpec>>,
    pub cache_info: Option<Option<MetricSpec>>,
}

impl MetricsFlags {
    pub fn is_empty(&self) -> bool {
        *self == Self::default()
    }
}

/// The resolved data layer.
#[derive(Clone, Debug, PartialEq)]
pub struct DataLayer {
    /// `None`: metrics collection is disabled (`injectDefaults: false` and no metrics source);
    /// endpoints are then judged by their health probes and by routed traffic only.
    pub metrics: Option<MetricsPipeline>,
}

impl Default for DataLayer {
    fn default() -> Self {
        Self {
            metrics: Some(MetricsPipeline::default()),
        }
    }
}

impl DataLayer {
    /// Resolve and validate the data layer of `cfg`. Errors name the field at fault.
    pub fn from_config(cfg: &EndpointPickerConfig) -> Result<Self, ConfigError> {
        let find = |name: &str| -> Option<(usize, &PluginSpec)> {
            cfg.plugins
                .iter()
                .enumerate()
                .find(|(_, p)| p.name() == name)
        };
        let mut metrics: Option<MetricsPipeline> = None;
        let sources = cfg
            .data_layer
            .as_ref()
            .map(|d| d.sources.as_slice())
            .unwrap_or_default();
        for (si, src) in sources.iter().enumerate() {
            let field = format!("dataLayer.sources[{si}]");
            let Some((pi, spec)) = find(&src.plugin_ref) else {
                return Err(ConfigError::new(
                    format!("{field}.pluginRef"),
                    format!("no plugin named {:?} in `plugins`", src.plugin_ref),
                ));
            };
            let pfield = format!("plugins[{pi}]");
            match spec.type_.as_str() {
                METRICS_DATA_SOURCE => {
                    if metrics.is_some() {
                        return Err(ConfigError::new(
                            format!("{field}.pluginRef"),
                            "only one metrics-data-source may be wired: epp runs one scraper per endpoint",
                        ));
                    }
                    let source = MetricsSource::build(spec, &pfield)?;
                    let mut mappings = None;
                    for (ei, ex) in src.extractors.iter().enumerate() {
                        let efield = format!("{field}.extractors[{ei}].pluginRef");
                        let Some((xi, xspec)) = find(&ex.plugin_ref) else {
                            return Err(ConfigError::new(
                                efield,
                                format!("no plugin named {:?} in `plugins`", ex.plugin_ref),
                            ));
                        };
                        if xspec.type_ != CORE_METRICS_EXTRACTOR {
                            return Err(ConfigError::new(
                                efield,
                                format!(
                                    "{:?} (type {}) cannot read a metrics-data-source; its extractor is a {CORE_METRICS_EXTRACTOR}",
                                    ex.plugin_ref, xspec.type_
                                ),
                            ));
                        }
                        if mappings.is_some() {
                            return Err(ConfigError::new(
                                efield,
                                "only one core-metrics-extractor may read the metrics source",
                            ));
                        }
                        mappings = Some(EngineMappings::build(xspec, &format!("plugins[{xi}]"))?);
                    }
                    let Some(mappings) = mappings else {
                        return Err(ConfigError::new(
                            format!("{field}.extractors"),
                            "a metrics-data-source needs a core-metrics-extractor to read it",
                        ));
                    };
                    metrics = Some(MetricsPipeline {
                        source,
                        mappings: Arc::new(mappings),
                        port: None,
                    });
                }
                ENDPOINT_NOTIFICATION_SOURCE => {
                    let _: crate::scheduler::plugins::NoParams = plugin_parameters(spec, &pfield)?;
                    // Endpoint add/remove events reach the scheduler's per-endpoint state
                    // (prefix index, LRU) directly. The one extractor llm-d wires here is the
                    // precise prefix producer (its KV-event subscription per endpoint), which in
                    // epp follows the datastore itself: naming it is accepted, anything else is
                    // refused.
                    for (ei, ex) in src.extractors.iter().enumerate() {
                        let kind = find(&ex.plugin_ref)
                            .map(|(_, s)| s.type_.clone())
                            .unwrap_or_else(|| "not declared in `plugins`".into());
                        if kind == crate::scheduler::plugins::producers::precise_prefix::TYPE {
                            continue;
                        }
                        return Err(ConfigError::new(
                            format!("{field}.extractors[{ei}].pluginRef"),
                            format!(
                                "{:?} ({kind}): epp's endpoint-notification source takes only a precise-prefix-cache-producer as extractor",
                                ex.plugin_ref
                            ),
                        ));
                    }
                }
                other => {
                    return Err(ConfigError::new(
                        format!("{field}.pluginRef"),
                        format!(
                            "{:?} is a {other}, not a data source ({METRICS_DATA_SOURCE} or {ENDPOINT_NOTIFICATION_SOURCE})",
                            src.plugin_ref
                        ),
                    ));
                }
            }
        }
        let inject = cfg
            .data_layer
            .as_ref()
            .and_then(|d| d.inject_defaults)
            .unwrap_or(true);
        if metrics.is_none() && inject {
            // The default wiring, by the default names: a plugin declared under one of them
            // supplies its parameters.
            let source = match find(METRICS_DATA_SOURCE) {
                Some((i, s)) => MetricsSource::build(s, &format!("plugins[{i}]"))?,
                None => MetricsSource::default(),
            };
            let mappings = match find(CORE_METRICS_EXTRACTOR) {
                Some((i, s)) => EngineMappings::build(s, &format!("plugins[{i}]"))?,
                None => EngineMappings::default(),
            };
            metrics = Some(MetricsPipeline {
                source,
                mappings: Arc::new(mappings),
                port: None,
            });
        }
        // Every declared data-layer plugin is checked, wired or not: a typo in an unused one is
        // still an error, as in llm-d-router (which instantiates every declared plugin).
        for (i, spec) in cfg.plugins.iter().enumerate() {
            let field = format!("plugins[{i}]");
            match spec.type_.as_str() {
                METRICS_DATA_SOURCE => {
                    MetricsSource::build(spec, &field)?;
                }
                CORE_METRICS_EXTRACTOR => {
                    EngineMappings::build(spec, &field)?;
                }
                ENDPOINT_NOTIFICATION_SOURCE => {
                    let _: crate::scheduler::plugins::NoParams = plugin_parameters(spec, &field)?;
                }
                _ => {}
            }
        }
        Ok(Self { metrics })
    }

    /// One line for logs and `epp check-config`.
    pub fn describe(&self) -> String {
        match &self.metrics {
            None => "not collected".into(),
            Some(m) => format!(
                "{}://<endpoint>{}{} (default engine {})",
                m.source.scheme.as_str(),
                m.port.map(|p| format!(":{p}")).unwrap_or_default(),
                m.source.path,
                m.mappings.default_engine
            ),
        }
    }

    /// Apply command-line settings (they win over the config). With metrics collection
    /// disabled by the config, a metrics flag is an error naming it.
    pub fn apply(&mut self, flags: &MetricsFlags) -> Result<(), String> {
        if flags.is_empty() {
            return Ok(());
        }
        let Some(m) = &mut self.metrics else {
            return Err(
                "--model-server-metrics-* / --*-metric flags were given, but the config disables metrics collection (dataLayer.injectDefaults: false with no metrics-data-source)"
                    .into(),
            );
        };
        if let Some(p) = flags.port {
            m.port = Some(p);
        }
        if let Some(p) = &flags.path {
            if !p.starts_with('/') {
                return Err(format!(
                    "--model-server-metrics-path {p:?}: must start with /"
                ));
            }
            m.source.path = p.clone();
        }
        if let Some(s) = flags.scheme {
            m.source.scheme = s;
        }
        if let Some(v) = flags.insecure_skip_verify {
            m.source.insecure_skip_verify = v;
            if !v && m.source.scheme == Scheme::Https && m.source.ca_cert_path.is_none() {
                return Err("--model-server-metrics-https-insecure-skip-verify=false needs a caCertPath on the metrics-data-source plugin: epp verifies model servers against a CA bundle you give it".into());
            }
        }
        Arc::make_mut(&mut m.mappings).override_default(
            flags.queued.clone(),
            flags.running.clone(),
            flags.kv_usage.clone(),
            flags.lora.clone(),
            flags.cache_info.clone(),
        );
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load(yaml: &str) -> Result<DataLayer, ConfigError> {
        let cfg = EndpointPickerConfig::from_yaml(&format!(
            "apiVersion: llm-d.ai/v1alpha1\nkind: EndpointPickerConfig\n{yaml}"
        ))?;
        DataLayer::from_config(&cfg)
    }

    #[test]
    fn defaults_are_injected_and_take_declared_parameters() {
        let d = load("plugins:\n- type: queue-scorer\n").unwrap();
        assert_eq!(d, DataLayer::default());
        let d = load(
            "plugins:\n- type: metrics-data-source\n  parameters:\n    scheme: https\n    path: /m\n    insecureSkipVerify: true\n- type: core-metrics-extractor\n  parameters:\n    defaultEngine: sglang\n",
        )
        .unwrap();
        let m = d.metrics.unwrap();
        assert_eq!(m.source.scheme, Scheme::Https);
        assert_eq!(m.source.path, "/m");
        assert_eq!(m.mappings.default_engine, "sglang");
    }

    #[test]
    fn inject_defaults_false_without_source_disables_metrics() {
        let d = load("dataLayer:\n  injectDefaults: false\n").unwrap();
        assert_eq!(d.metrics, None);
    }

    #[test]
    fn explicit_wiring_is_checked() {
        let d = load(
            "plugins:\n- name: scrape\n  type: metrics-data-source\n  parameters:\n    path: /x\n- name: ex\n  type: core-metrics-extractor\ndataLayer:\n  sources:\n  - pluginRef: scrape\n    extractors:\n    - pluginRef: ex\n",
        )
        .unwrap();
        assert_eq!(d.metrics.unwrap().source.path, "/x");
        let e = load("dataLayer:\n  sources:\n  - pluginRef: nope\n").unwrap_err();
        assert_eq!(e.field, "dataLayer.sources[0].pluginRef");
        let e = load(
            "plugins:\n- type: metrics-data-source\ndataLayer:\n  sources:\n  - pluginRef: metrics-data-source\n",
        )
        .unwrap_err();
        assert_eq!(e.field, "dataLayer.sources[0].extractors");
        let e = load(
            "plugins:\n- type: metrics-data-source\n- type: queue-scorer\ndataLayer:\n  sources:\n  - pluginRef: metrics-data-source\n    extractors:\n    - pluginRef: queue-scorer\n",
        )
        .unwrap_err();
        assert_eq!(e.field, "dataLayer.sources[0].extractors[0].pluginRef");
        assert!(
            e.message.contains("cannot read a metrics-data-source"),
            "{e}"
        );
        let e = load(
            "plugins:\n- type: queue-scorer\ndataLayer:\n  sources:\n  - pluginRef: queue-scorer\n",
        )
        .unwrap_err();
        assert!(e.message.contains("not a data source"), "{e}");
        // An endpoint-notification source alone is fine; the default metrics wiring is added.
        let d = load(
            "plugins:\n- type: endpoint-notification-source\ndataLayer:\n  sources:\n  - pluginRef: endpoint-notification-source\n",
        )
        .unwrap();
        assert!(d.metrics.is_some());
        // An unused declared plugin is still validated.
        let e = load("plugins:\n- name: spare\n  type: metrics-data-source\n  parameters:\n    scheme: ftp\n- type: metrics-data-source\n").unwrap_err();
        assert_eq!(e.field, "plugins[0].parameters.scheme", "{e}");
    }
}

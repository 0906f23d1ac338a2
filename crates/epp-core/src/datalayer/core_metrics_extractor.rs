//! `core-metrics-extractor`: which Prometheus series of each engine the scraper reads. Engines
//! and their default series are llm-d-router's (`vllm`, `sglang`, `trtllm-serve`,
//! `triton-tensorrt-llm`, `triton`); `engineConfigs` adds engines or replaces a built-in one by
//! name. An endpoint's engine is its `engineLabelKey` pod label (`llm-d.ai/engine-type`, with
//! the GAIE key `inference.networking.k8s.io/engine-type` as fallback), else `defaultEngine`.
//!
//! A series spec is `name` or `name{label=value,...}` (values optionally quoted); the sample
//! values of every series matching it are summed (gauges: queue, running) or maxed (usage).

use std::collections::BTreeMap;
use std::fmt;

use serde::Deserialize;

use crate::config::{plugin_parameters, ConfigError, PluginSpec};
use crate::exposition::Sample;

pub const DEFAULT_ENGINE_LABEL_KEY: &str = "llm-d.ai/engine-type";
pub const LEGACY_ENGINE_LABEL_KEY: &str = "inference.networking.k8s.io/engine-type";

/// One series selector: a metric name and label values it must carry.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MetricSpec {
    pub name: String,
    pub labels: Vec<(String, String)>,
}

fn valid_name(s: &str, colon: bool) -> bool {
    let mut chars = s.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_alphabetic() || c == '_' || (colon && c == ':'))
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || (colon && c == ':'))
}

impl MetricSpec {
    /// Parse `name` or `name{k=v,k2="v2"}`; an empty string is no spec. One pair of quotes
    /// around the whole spec is dropped (GAIE's chart renders `--flag="name"`).
    pub fn parse(spec: &str) -> Result<Option<Self>, String> {
        let s = spec.trim();
        let s = s
            .strip_prefix('"')
            .and_then(|x| x.strip_suffix('"'))
            .map(str::trim)
            .unwrap_or(s);
        if s.is_empty() {
            return Ok(None);
        }
        let (name, labels) = match s.find('{') {
            None => (s, ""),
            Some(i) => {
                let Some(inner) = s[i + 1..].strip_suffix('}') else {
                    return Err(format!(
                        "not a valid metric specification: {spec:?} (missing closing brace)"
                    ));
                };
                (s[..i].trim(), inner)
            }
        };
        if !valid_name(name, true) {
            return Err(format!("not a valid metric specification: {spec:?}"));
        }
        let mut out = Vec::new();
        for pair in labels.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let Some((k, v)) = pair.split_once('=') else {
                return Err(format!(
                    "invalid label pair {pair:?} in specification {spec:?}"
                ));
            };
            let (k, v) = (k.trim(), v.trim());
            let v = v
                .strip_prefix('"')
                .and_then(|v| v.strip_suffix('"'))
                .unwrap_or(v);
            if !valid_name(k, false) || v.contains('"') {
                return Err(format!(
                    "invalid label pair {pair:?} in specification {spec:?}"
                ));
            }
            out.push((k.to_string(), v.to_string()));
        }
        Ok(Some(Self {
            name: name.to_string(),
            labels: out,
        }))
    }

    pub fn matches(&self, s: &Sample) -> bool {
        s.name == self.name
            && self
                .labels
                .iter()
                .all(|(k, v)| s.labels.get(k).is_some_and(|x| x == v))
    }
}

impl fmt::Display for MetricSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.name)?;
        if !self.labels.is_empty() {
            let l: Vec<String> = self
                .labels
                .iter()
                .map(|(k, v)| format!("{k}={v}"))
                .collect();
            write!(f, "{{{}}}", l.join(","))?;
        }
        Ok(())
    }
}

/// The series one engine exposes.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct EngineMapping {
    pub queued: Option<MetricSpec>,
    pub running: Option<MetricSpec>,
    pub kv_usage: Option<MetricSpec>,
    /// Read when `kv_usage` has no series (vLLM before v0.10 named it `gpu_cache_usage_perc`).
    pub kv_usage_fallback: Option<MetricSpec>,
    /// vLLM's LoRA info gauge (`running_lora_adapters`, `waiting_lora_adapters`, `max_lora`).
    pub lora: Option<MetricSpec>,
    /// An info gauge whose labels carry the block size and block count.
    pub cache_info: Option<MetricSpec>,
    pub cache_block_size_label: String,
    pub cache_num_blocks_label: String,
    /// Gauges carrying the block size / count as values (engines without an info gauge).
    pub cache_block_size: Option<MetricSpec>,
    pub cache_num_blocks: Option<MetricSpec>,
}

impl EngineMapping {
    /// Every metric family this mapping reads (the scraper parses only these).
    pub fn families(&self) -> Vec<&str> {
        let mut v: Vec<&str> = [
            &self.queued,
            &self.running,
            &self.kv_usage,
            &self.kv_usage_fallback,
            &self.lora,
            &self.cache_info,
            &self.cache_block_size,
            &self.cache_num_blocks,
        ]
        .into_iter()
        .flatten()
        .map(|s| s.name.as_str())
        .collect();
        v.sort_unstable();
        v.dedup();
        v
    }
}

fn spec(s: &str) -> Option<MetricSpec> {
    MetricSpec::parse(s).expect("built-in spec")
}

/// llm-d-router's built-in engines.
pub fn builtin(name: &str) -> Option<EngineMapping> {
    let base = |q: &str, r: &str, kv: &str| EngineMapping {
        queued: spec(q),
        running: spec(r),
        kv_usage: spec(kv),
        cache_block_size_label: "block_size".into(),
        cache_num_blocks_label: "num_gpu_blocks".into(),
        ..Default::default()
    };
    Some(match name {
        "vllm" => EngineMapping {
            kv_usage_fallback: spec("vllm:gpu_cache_usage_perc"),
            lora: spec("vllm:lora_requests_info"),
            cache_info: spec("vllm:cache_config_info"),
            ..base(
                "vllm:num_requests_waiting",
                "vllm:num_requests_running",
                "vllm:kv_cache_usage_perc",
            )
        },
        "sglang" => EngineMapping {
            cache_info: spec("sglang:cache_config_info"),
            cache_block_size_label: "page_size".into(),
            cache_num_blocks_label: "num_pages".into(),
            ..base(
                "sglang:num_queue_reqs",
                "sglang:num_running_reqs",
                "sglang:token_usage",
            )
        },
        "trtllm-serve" => EngineMapping {
            cache_block_size: spec("trtllm_kv_cache_tokens_per_block"),
            cache_num_blocks: spec("trtllm_kv_cache_max_blocks"),
            ..base(
                "trtllm_num_requests_waiting",
                "trtllm_num_requests_running",
                "trtllm_kv_cache_utilization",
            )
        },
        "triton-tensorrt-llm" => EngineMapping {
            cache_block_size: spec(
                "nv_trt_llm_kv_cache_block_metrics{kv_cache_block_type=tokens_per}",
            ),
            cache_num_blocks: spec("nv_trt_llm_kv_cache_block_metrics{kv_cache_block_type=max}"),
            ..base(
                "nv_trt_llm_request_metrics{request_type=waiting}",
                "nv_trt_llm_request_metrics{request_type=scheduled}",
                "nv_trt_llm_kv_cache_block_metrics{kv_cache_block_type=fraction}",
            )
        },
        "triton" => base(
            "nv_inference_pending_request_count",
            "nv_inference_exec_count",
            "",
        ),
        _ => return None,
    })
}

pub const BUILTIN_ENGINES: &[&str] = &[
    "vllm",
    "sglang",
    "trtllm-serve",
    "triton-tensorrt-llm",
    "triton",
];

/// Engine name → series, and how an endpoint's engine is found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EngineMappings {
    pub engine_label_key: String,
    pub default_engine: String,
    pub engines: BTreeMap<String, EngineMapping>,
}

impl Default for EngineMappings {
    fn default() -> Self {
        Self {
            engine_label_key: DEFAULT_ENGINE_LABEL_KEY.into(),
            default_engine: "vllm".into(),
            engines: BUILTIN_ENGINES
                .iter()
                .map(|n| (n.to_string(), builtin(n).expect("built-in")))
                .collect(),
        }
    }
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct Params {
    engine_label_key: Option<String>,
    default_engine: Option<String>,
    #[serde(default)]
    engine_configs: Vec<EngineParams>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct EngineParams {
    #[serde(default)]
    name: String,
    #[serde(default)]
    queued_requests_spec: String,
    #[serde(default)]
    running_requests_spec: String,
    #[serde(default)]
    kv_usage_spec: String,
    #[serde(default)]
    lora_spec: String,
    #[serde(default)]
    cache_info_spec: String,
    cache_block_size_label_name: Option<String>,
    cache_num_blocks_label_name: Option<String>,
    #[serde(default)]
    cache_block_size_spec: String,
    #[serde(default)]
    cache_num_blocks_spec: String,
    #[serde(default)]
    custom_metrics: Vec<serde_json::Value>,
}

impl EngineMappings {
    pub fn build(spec: &PluginSpec, field: &str) -> Result<Self, ConfigError> {
        let p: Params = plugin_parameters(spec, field)?;
        let mut m = Self::default();
        if let Some(k) = p.engine_label_key.filter(|k| !k.is_empty()) {
            m.engine_label_key = k;
        }
        for (i, e) in p.engine_configs.iter().enumerate() {
            let at = |k: &str| format!("{field}.parameters.engineConfigs[{i}].{k}");
            if e.name.is_empty() {
                return Err(ConfigError::new(
                    at("name"),
                    "engine config name cannot be empty",
                ));
            }
            if e.name == "default" {
                return Err(ConfigError::new(at("name"), "\"default\" is reserved"));
            }
            if p.engine_configs[..i].iter().any(|o| o.name == e.name) {
                return Err(ConfigError::new(
                    at("name"),
                    format!("engine {:?} is configured twice", e.name),
                ));
            }
            if !e.custom_metrics.is_empty() {
                return Err(ConfigError::new(
                    at("customMetrics"),
                    "epp does not support custom metrics: no epp plugin reads custom endpoint attributes",
                ));
            }
            let parse =
                |k: &str, v: &str| MetricSpec::parse(v).map_err(|msg| ConfigError::new(at(k), msg));
            let mapping = EngineMapping {
                queued: parse("queuedRequestsSpec", &e.queued_requests_spec)?,
                running: parse("runningRequestsSpec", &e.running_requests_spec)?,
                kv_usage: parse("kvUsageSpec", &e.kv_usage_spec)?,
                kv_usage_fallback: None,
                lora: parse("loraSpec", &e.lora_spec)?,
                cache_info: parse("cacheInfoSpec", &e.cache_info_spec)?,
                cache_block_size_label: e
                    .cache_block_size_label_name
                    .clone()
                    .filter(|s| !s.is_empty())
                    .unwrap_or_else(|| "block_size".into()),
                cache_num_blocks_label: e
                    .cache_num_blocks_label_name
                    .clone()
                    .filter(|s| !s.is_empty())
                    .unwrap_or_else(|| "num_gpu_blocks".into()),
                cache_block_size: parse("cacheBlockSizeSpec", &e.cache_block_size_spec)?,
                cache_num_blocks: parse("cacheNumBlocksSpec", &e.cache_num_blocks_spec)?,
            };
            m.engines.insert(e.name.clone(), mapping);
        }
        if let Some(d) = p.default_engine.filter(|d| !d.is_empty()) {
            if !m.engines.contains_key(&d) {
                return Err(ConfigError::new(
                    format!("{field}.parameters.defaultEngine"),
                    format!(
                        "{d:?} is not a known engine; known: {}",
                        m.engines.keys().cloned().collect::<Vec<_>>().join(", ")
                    ),
                ));
            }
            m.default_engine = d;
        }
        Ok(m)
    }

    /// The engine name of an endpoint with these labels (`static_engine`: what an endpoints
    /// file or flag said, `None` for the default).
    pub fn engine_of<'a>(
        &'a self,
        labels: &'a BTreeMap<String, String>,
        static_engine: Option<&'a str>,
    ) -> &'a str {
        let label = labels.get(&self.engine_label_key).or_else(|| {
            (self.engine_label_key == DEFAULT_ENGINE_LABEL_KEY)
                .then(|| labels.get(LEGACY_ENGINE_LABEL_KEY))
                .flatten()
        });
        match label.map(String::as_str).or(static_engine) {
            Some(v) if !v.is_empty() => v,
            _ => &self.default_engine,
        }
    }

    /// The mapping for an engine name; unknown names read as the default engine.
    pub fn get(&self, engine: &str) -> &EngineMapping {
        let name = match engine {
            "trt-llm" | "trtllm" | "tensorrt-llm" => "trtllm-serve",
            n => n,
        };
        self.engines
            .get(name)
            .or_else(|| self.engines.get(&self.default_engine))
            .expect("the default engine is always mapped")
    }

    /// Whether `engine` names a mapped engine (else it is scraped as the default).
    pub fn knows(&self, engine: &str) -> bool {
        matches!(engine, "trt-llm" | "trtllm" | "tensorrt-llm") || self.engines.contains_key(engine)
    }

    /// Replace series of the default engine (the deprecated `--*-metric` flags); `Some(None)`
    /// stops reading that series.
    pub fn override_default(
        &mut self,
        queued: Option<Option<MetricSpec>>,
        running: Option<Option<MetricSpec>>,
        kv_usage: Option<Option<MetricSpec>>,
        lora: Option<Option<MetricSpec>>,
        cache_info: Option<Option<MetricSpec>>,
    ) {
        let d = self.default_engine.clone();
        let m = self.engines.get_mut(&d).expect("default mapped");
        if let Some(s) = queued {
            m.queued = s;
        }
        if let Some(s) = running {
            m.running = s;
        }
        if let Some(s) = kv_usage {
            m.kv_usage = s;
            m.kv_usage_fallback = None;
        }
        if let Some(s) = lora {
            m.lora = s;
        }
        if let Some(s) = cache_info {
            m.cache_info = s;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn specs_parse_with_and_without_quotes() {
        let s = MetricSpec::parse("nv_trt_llm_request_metrics{request_type=waiting}")
            .unwrap()
            .unwrap();
        assert_eq!(s.name, "nv_trt_llm_request_metrics");
        assert_eq!(s.labels, vec![("request_type".into(), "waiting".into())]);
        let s = MetricSpec::parse(" q{a=\"x y\", b=2} ").unwrap().unwrap();
        assert_eq!(
            s.labels,
            vec![("a".into(), "x y".into()), ("b".into(), "2".into())]
        );
        assert_eq!(s.to_string(), "q{a=x y,b=2}");
        assert_eq!(MetricSpec::parse("").unwrap(), None);
        assert!(MetricSpec::parse("1bad").is_err());
        assert!(MetricSpec::parse("m{a}")
            .unwrap_err()
            .contains("invalid label pair"));
        assert!(MetricSpec::parse("m{a=1")
            .unwrap_err()
            .contains("closing brace"));
    }

    fn build(params: &str) -> Result<EngineMappings, ConfigError> {
        EngineMappings::build(
            &PluginSpec::for_test("core-metrics-extractor", Some(params)),
            "plugins[0]",
        )
    }

    #[test]
    fn engines_resolve_from_labels_then_default() {
        let m = build("defaultEngine: sglang\nengineConfigs:\n- name: mine\n  queuedRequestsSpec: q{tier=gold}\n  runningRequestsSpec: r\n").unwrap();
        let mut labels = BTreeMap::new();
        assert_eq!(m.engine_of(&labels, None), "sglang");
        assert_eq!(m.engine_of(&labels, Some("vllm")), "vllm");
        labels.insert(LEGACY_ENGINE_LABEL_KEY.to_string(), "triton".to_string());
        assert_eq!(m.engine_of(&labels, Some("vllm")), "triton");
        labels.insert(DEFAULT_ENGINE_LABEL_KEY.to_string(), "mine".to_string());
        assert_eq!(m.engine_of(&labels, None), "mine");
        assert_eq!(
            m.get("mine").queued.as_ref().unwrap().to_string(),
            "q{tier=gold}"
        );
        assert_eq!(m.get("mine").kv_usage, None);
        // Unknown engines read as the default one.
        assert_eq!(m.get("nope"), m.get("sglang"));
        assert_eq!(m.get("trt-llm"), m.get("trtllm-serve"));
        assert_eq!(m.get("sglang").cache_block_size_label, "page_size");
    }

    #[test]
    fn bad_parameters_name_the_field() {
        let e = build("defaultEngine: tgi").unwrap_err();
        assert_eq!(e.field, "plugins[0].parameters.defaultEngine");
        let e = build("engineConfigs:\n- name: x\n  kvUsageSpec: 'bad name'\n").unwrap_err();
        assert_eq!(
            e.field,
            "plugins[0].parameters.engineConfigs[0].kvUsageSpec"
        );
        let e = build("engineConfigs:\n- queuedRequestsSpec: q\n").unwrap_err();
        assert_eq!(e.field, "plugins[0].parameters.engineConfigs[0].name");
        let e = build(
            "engineConfigs:\n- name: x\n  customMetrics:\n  - attributeKey: a\n    metricSpec: m\n",
        )
        .unwrap_err();
        assert_eq!(
            e.field,
            "plugins[0].parameters.engineConfigs[0].customMetrics"
        );
        let e = build("engineConfigs:\n- name: x\n  qeuedRequestsSpec: q\n").unwrap_err();
        assert_eq!(
            e.field,
            "plugins[0].parameters.engineConfigs[0].qeuedRequestsSpec"
        );
    }
}

//! `precise-prefix-cache-producer`: llm-d's precise prefix index as a producer. It keys a prompt's
//! token ids (from a `token-producer` with a real tokenizer) into request keys, looks up which
//! endpoints the engines' own KV events say hold them, and after the pick can seed the chosen
//! endpoint speculatively. `prefix-cache-scorer` reads its match info by name
//! (`prefixMatchInfoProducerName`). The director runs the one precise index and the event
//! subscriptions (see [`crate::precise`]); this file parses and validates the parameters, with
//! llm-d's names and defaults, refusing by name what epp does not implement.

use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::config::{ConfigError, PluginSpec};
use crate::precise::keys::{HashAlgorithm, TokenProcessor, MAX_BLOCK_SIZE_TOKENS};
use crate::precise::{CentralEndpoint, IndexConfig, Settings, Subscriptions, BYTES_PER_KEY};
use crate::scheduler::plugins::{params, Plugin, Producer};

pub const TYPE: &str = "precise-prefix-cache-producer";

/// llm-d's defaults.
pub const DEFAULT_SPECULATIVE_TTL: Duration = Duration::from_secs(2);
pub const DEFAULT_TOPIC_FILTER: &str = "kv@";
pub const DEFAULT_CONCURRENCY: u64 = 4;
pub const DEFAULT_SOCKET_PORT: u16 = crate::kvevents::DEFAULT_PORT;
pub const DEFAULT_IN_MEMORY_SIZE: u64 = 100_000_000;
pub const DEFAULT_POD_CACHE_SIZE: u64 = 10;
pub const DEFAULT_COST_AWARE_SIZE: &str = "2GiB";
/// epp's fallback windows.
pub const DEFAULT_EVENT_TIMEOUT: Duration = Duration::from_secs(10);
pub const DEFAULT_REBUILD_WINDOW: Duration = Duration::from_secs(30);

#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct PrecisePrefixParams {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token_processor_config: Option<TokenProcessorParams>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub indexer_config: Option<IndexerParams>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kv_events_config: Option<KvEventsParams>,
    #[serde(default)]
    pub speculative_indexing: bool,
    /// A Go duration; empty or non-positive: 2s.
    #[serde(
        default,
        rename = "speculativeTTL",
        skip_serializing_if = "Option::is_none"
    )]
    pub speculative_ttl: Option<String>,
    /// epp's own: when an endpoint is scored by the approximate index instead.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fallback: Option<FallbackParams>,
}

#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct TokenProcessorParams {
    /// Deprecated in llm-d: used when `blockSizeTokens` is unset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub block_size: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub block_size_tokens: Option<i64>,
    #[serde(default)]
    pub hash_seed: String,
    /// `cbor-fnv` (default) or `xxh64`.
    #[serde(default)]
    pub hash_algorithm: String,
}

#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct IndexerParams {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kv_block_index_config: Option<KvBlockIndexParams>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kv_cache_backend_configs: Option<Vec<BackendParams>>,
    /// llm-d refuses it too: tokenize with a `token-producer`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tokenizers_pool_config: Option<Value>,
}

#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct KvBlockIndexParams {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub in_memory_config: Option<InMemoryParams>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub redis_config: Option<Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cost_aware_memory_config: Option<CostAwareParams>,
    #[serde(default)]
    pub enable_metrics: bool,
    /// Go's `time.Duration` in JSON: nanoseconds (a duration string is accepted too). The index
    /// counters are logged this often (epp keeps them with or without `enableMetrics`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metrics_logging_interval: Option<Value>,
}

#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct InMemoryParams {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub size: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod_cache_size: Option<i64>,
}

#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct CostAwareParams {
    /// Bytes, human-readable (`2GiB`, `500MiB`, `1GB`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub size: Option<String>,
}

#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct BackendParams {
    pub name: String,
    pub weight: f64,
}

#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct KvEventsParams {
    /// A central SUB socket bound here, which engines connect to (llm-d's global socket mode).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub zmq_endpoint: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub topic_filter: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub concurrency: Option<i64>,
    /// `vllm` (default); `sglang` is refused.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub engine_type: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub discover_pods: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod_discovery_config: Option<PodDiscoveryParams>,
}

#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct PodDiscoveryParams {
    /// When set, only endpoints whose labels match are subscribed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod_label_selector: Option<String>,
    /// When set, only endpoints of that namespace are subscribed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod_namespace: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub socket_port: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replay_socket_port: Option<i64>,
}

#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct FallbackParams {
    /// Requests with blocks new to an endpoint were routed there, and no event came for this
    /// long: its events are taken as not flowing.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub event_timeout: Option<String>,
    /// After events were lost (a gap not replayed, joining mid-stream, a restart), how long the
    /// endpoint is scored approximately while its share rebuilds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rebuild_window: Option<String>,
}

fn go_duration(v: &str, at: &str) -> Result<Duration, ConfigError> {
    humantime::parse_duration(v.trim())
        .map_err(|e| ConfigError::new(at, format!("invalid duration {v:?}: {e}")))
}

/// Human-readable bytes as go-humanize reads them: `2GiB`, `500MiB`, `1GB`, `1024`.
pub fn parse_bytes(s: &str) -> Option<u64> {
    let t = s.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: f64 = num.parse().ok()?;
    let mult: f64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1.0,
        "k" | "kb" => 1e3,
        "m" | "mb" => 1e6,
        "g" | "gb" => 1e9,
        "t" | "tb" => 1e12,
        "ki" | "kib" => 1024.0,
        "mi" | "mib" => 1024.0 * 1024.0,
        "gi" | "gib" => 1024.0 * 1024.0 * 1024.0,
        "ti" | "tib" => 1024.0f64.powi(4),
        _ => return None,
    };
    let v = n * mult;
    (v.is_finite() && v >= 0.0).then_some(v as u64)
}

impl PrecisePrefixParams {
    /// Validated settings; errors name `{field}.parameters.<key>`.
    pub fn settings(&self, field: &str) -> Result<Settings, ConfigError> {
        let at = |k: &str| format!("{field}.parameters.{k}");
        // Token processor.
        let tpc = self.token_processor_config.clone().unwrap_or_default();
        let block_size = match (tpc.block_size_tokens, tpc.block_size) {
            (Some(t), _) if t != 0 => t,
            (_, Some(b)) if b != 0 => {
                tracing::warn!(
                    plugin = field,
                    "precise-prefix-cache-producer: tokenProcessorConfig.blockSize is deprecated; use blockSizeTokens"
                );
                b
            }
            _ => i64::from(crate::precise::keys::DEFAULT_BLOCK_SIZE_TOKENS),
        };
        let bs_field = if tpc.block_size_tokens.is_some_and(|t| t != 0) {
            "tokenProcessorConfig.blockSizeTokens"
        } else {
            "tokenProcessorConfig.blockSize"
        };
        if block_size <= 0 {
            return Err(ConfigError::new(
                at(bs_field),
                format!("blockSizeTokens must be greater than 0, got {block_size}"),
            ));
        }
        if block_size > i64::from(MAX_BLOCK_SIZE_TOKENS) {
            return Err(ConfigError::new(
                at(bs_field),
                format!("must be at most {MAX_BLOCK_SIZE_TOKENS}"),
            ));
        }
        let algorithm = HashAlgorithm::parse(&tpc.hash_algorithm).ok_or_else(|| {
            ConfigError::new(
                at("tokenProcessorConfig.hashAlgorithm"),
                format!(
                    "unsupported hashAlgorithm {:?}: accepted values are \"cbor-fnv\" and \"xxh64\"",
                    tpc.hash_algorithm
                ),
            )
        })?;
        let tp = TokenProcessor::new(block_size as u32, &tpc.hash_seed, algorithm);

        // Indexer.
        let ic = self.indexer_config.clone().unwrap_or_default();
        if ic.tokenizers_pool_config.is_some() {
            return Err(ConfigError::new(
                at("indexerConfig.tokenizersPoolConfig"),
                "tokenizersPoolConfig is not supported; configure a token-producer plugin instead",
            ));
        }
        let mut index = IndexConfig::default();
        if let Some(b) = &ic.kv_cache_backend_configs {
            for (i, be) in b.iter().enumerate() {
                if !be.weight.is_finite() || be.weight < 0.0 {
                    return Err(ConfigError::new(
                        at(&format!("indexerConfig.kvCacheBackendConfigs[{i}].weight")),
                        "must be a finite number >= 0",
                    ));
                }
            }
            index.tier_weights = b.iter().map(|b| (b.name.clone(), b.weight)).collect();
        }
        let kb = ic.kv_block_index_config.clone().unwrap_or_default();
        if kb.redis_config.is_some() {
            return Err(ConfigError::new(
                at("indexerConfig.kvBlockIndexConfig.redisConfig"),
                "a Redis-backed index is not supported by epp; the index is in memory (inMemoryConfig or costAwareMemoryConfig)",
            ));
        }
        let mut bound = format!("inMemoryConfig.size {DEFAULT_IN_MEMORY_SIZE} keys");
        if let Some(ca) = &kb.cost_aware_memory_config {
            // As llm-d: the cost-aware index takes precedence when configured.
            let s = ca.size.as_deref().unwrap_or(DEFAULT_COST_AWARE_SIZE);
            let bytes = parse_bytes(s).filter(|b| *b > 0).ok_or_else(|| {
                ConfigError::new(
                    at("indexerConfig.kvBlockIndexConfig.costAwareMemoryConfig.size"),
                    format!("invalid size {s:?}: expected bytes such as 2GiB, 500MiB or 1GB"),
                )
            })?;
            index.max_keys = ((bytes / BYTES_PER_KEY) as usize).max(1);
            bound = format!(
                "costAwareMemoryConfig.size {s} = {} keys at {BYTES_PER_KEY} bytes each",
                index.max_keys
            );
        } else if let Some(im) = &kb.in_memory_config {
            if let Some(n) = im.size {
                if n <= 0 {
                    return Err(ConfigError::new(
                        at("indexerConfig.kvBlockIndexConfig.inMemoryConfig.size"),
                        "must be greater than 0",
                    ));
                }
                index.max_keys = n as usize;
                bound = format!("inMemoryConfig.size {n} keys");
            }
        }
        if let Some(n) = kb.in_memory_config.as_ref().and_then(|m| m.pod_cache_size) {
            if n <= 0 {
                return Err(ConfigError::new(
                    at("indexerConfig.kvBlockIndexConfig.inMemoryConfig.podCacheSize"),
                    "must be greater than 0",
                ));
            }
            index.pod_cache_size = n as usize;
        }
        let metrics_logging = match &kb.metrics_logging_interval {
            None | Some(Value::Null) => None,
            Some(Value::Number(n)) => {
                let ns = n.as_u64().ok_or_else(|| {
                    ConfigError::new(
                        at("indexerConfig.kvBlockIndexConfig.metricsLoggingInterval"),
                        "must be a non-negative number of nanoseconds or a duration",
                    )
                })?;
                Some(Duration::from_nanos(ns))
            }
            Some(Value::String(s)) => Some(go_duration(
                s,
                &at("indexerConfig.kvBlockIndexConfig.metricsLoggingInterval"),
            )?),
            Some(_) => {
                return Err(ConfigError::new(
                    at("indexerConfig.kvBlockIndexConfig.metricsLoggingInterval"),
                    "must be a number of nanoseconds or a duration string",
                ))
            }
        }
        .filter(|d| !d.is_zero());

        // KV events.
        let ke = self.kv_events_config.clone().unwrap_or_default();
        let central = match ke.zmq_endpoint.as_deref().map(str::trim) {
            None | Some("") => None,
            Some(ep) => {
                crate::kvevents::central::validate_endpoint(ep)
                    .map_err(|e| ConfigError::new(at("kvEventsConfig.zmqEndpoint"), e))?;
                Some(CentralEndpoint {
                    endpoint: ep.to_string(),
                    field: at("kvEventsConfig.zmqEndpoint"),
                })
            }
        };
        match ke.engine_type.as_deref() {
            None | Some("") | Some("vllm") => {}
            Some(other) => {
                return Err(ConfigError::new(
                    at("kvEventsConfig.engineType"),
                    format!("engine type {other:?} is not supported by epp; only \"vllm\" KV events are read"),
                ))
            }
        }
        let discover_pods = ke.discover_pods.unwrap_or(true);
        if !discover_pods && central.is_none() {
            return Err(ConfigError::new(
                at("kvEventsConfig.discoverPods"),
                "false without kvEventsConfig.zmqEndpoint leaves nothing to subscribe to; set zmqEndpoint (a central socket the engines connect to) or leave discoverPods true",
            ));
        }
        if !discover_pods && ke.pod_discovery_config.is_some() {
            tracing::warn!(
                plugin = field,
                "precise-prefix-cache-producer: kvEventsConfig.podDiscoveryConfig is not used with discoverPods: false"
            );
        }
        let concurrency = ke.concurrency.unwrap_or(DEFAULT_CONCURRENCY as i64);
        if concurrency <= 0 || concurrency > 1024 {
            return Err(ConfigError::new(
                at("kvEventsConfig.concurrency"),
                "must be between 1 and 1024",
            ));
        }
        let pd = ke.pod_discovery_config.clone().unwrap_or_default();
        let port =
            |v: Option<i64>, key: &str, default: Option<u16>| -> Result<Option<u16>, ConfigError> {
                match v {
                    None => Ok(default),
                    Some(p) if p <= 0 && key == "replaySocketPort" => Ok(None),
                    Some(p) => u16::try_from(p)
                        .ok()
                        .filter(|p| *p > 0)
                        .map(Some)
                        .ok_or_else(|| {
                            ConfigError::new(
                                at(&format!("kvEventsConfig.podDiscoveryConfig.{key}")),
                                format!("port {p} is not in 1..65535"),
                            )
                        }),
                }
            };
        let socket_port = port(pd.socket_port, "socketPort", Some(DEFAULT_SOCKET_PORT))?
            .unwrap_or(DEFAULT_SOCKET_PORT);
        let replay_port = port(pd.replay_socket_port, "replaySocketPort", None)?;
        let selector = match pd.pod_label_selector.as_deref().filter(|s| !s.is_empty()) {
            None => None,
            Some(s) => Some(crate::k8s::selector::LabelSelector::parse(s).map_err(|e| {
                ConfigError::new(
                    at("kvEventsConfig.podDiscoveryConfig.podLabelSelector"),
                    e.to_string(),
                )
            })?),
        };

        // Speculative indexing.
        let ttl = match self.speculative_ttl.as_deref().map(str::trim) {
            None | Some("") => DEFAULT_SPECULATIVE_TTL,
            Some(s) if s.starts_with('-') || s == "0" => DEFAULT_SPECULATIVE_TTL,
            Some(s) => {
                let d = go_duration(s, &at("speculativeTTL"))?;
                if d.is_zero() {
                    DEFAULT_SPECULATIVE_TTL
                } else {
                    d
                }
            }
        };
        let fb = self.fallback.clone().unwrap_or_default();
        let event_timeout = match &fb.event_timeout {
            None => DEFAULT_EVENT_TIMEOUT,
            Some(s) => go_duration(s, &at("fallback.eventTimeout"))?,
        };
        let rebuild_window = match &fb.rebuild_window {
            None => DEFAULT_REBUILD_WINDOW,
            Some(s) => go_duration(s, &at("fallback.rebuildWindow"))?,
        };
        if event_timeout.is_zero() {
            return Err(ConfigError::new(
                at("fallback.eventTimeout"),
                "must be greater than 0",
            ));
        }
        Ok(Settings {
            tp,
            index,
            index_bound: bound,
            index_metrics: kb.enable_metrics,
            metrics_logging,
            subscriptions: Subscriptions {
                topic_filter: ke
                    .topic_filter
                    .clone()
                    .unwrap_or_else(|| DEFAULT_TOPIC_FILTER.into()),
                concurrency: concurrency as usize,
                socket_port,
                replay_port,
                selector,
                namespace: pd.pod_namespace.clone().filter(|n| !n.is_empty()),
                discover_pods,
                central,
            },
            speculative: self.speculative_indexing.then_some(ttl),
            event_timeout,
            rebuild_window,
        })
    }
}

pub fn build(spec: &PluginSpec, field: &str) -> Result<Plugin, ConfigError> {
    let p: PrecisePrefixParams = params(spec, field)?;
    let settings = p.settings(field)?;
    Ok(Plugin::Producer(Arc::new(PrecisePrefixProducer {
        name: spec.name().to_string(),
        settings: Arc::new(settings),
    })))
}

pub struct PrecisePrefixProducer {
    name: String,
    settings: Arc<Settings>,
}

impl PrecisePrefixProducer {
    /// A producer named `name` with `settings` (the legacy scorer form builds one).
    pub fn new(name: &str, settings: Settings) -> Self {
        Self {
            name: name.to_string(),
            settings: Arc::new(settings),
        }
    }
}

impl Producer for PrecisePrefixProducer {
    fn type_name(&self) -> &'static str {
        TYPE
    }
    fn name(&self) -> &str {
        &self.name
    }
    fn precise(&self) -> Option<Arc<Settings>> {
        Some(self.settings.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(yaml: &str) -> Result<Settings, ConfigError> {
        let p: PrecisePrefixParams = params(&PluginSpec::for_test(TYPE, Some(yaml)), "plugins[3]")?;
        p.settings("plugins[3]")
    }

    #[test]
    fn defaults_are_llm_d_s() {
        let s = settings("{}").unwrap();
        assert_eq!(s.tp.block_size(), 16);
        assert_eq!(s.tp.algorithm(), HashAlgorithm::CborFnv);
        assert_eq!(s.index.max_keys, 100_000_000);
        assert_eq!(s.index.pod_cache_size, 10);
        assert_eq!(
            s.index.tier_weights,
            vec![("gpu".to_string(), 1.0), ("cpu".to_string(), 0.8)]
        );
        assert!(!s.index_metrics);
        assert_eq!(s.subscriptions.topic_filter, "kv@");
        assert_eq!(s.subscriptions.concurrency, 4);
        assert_eq!(s.subscriptions.socket_port, 5557);
        assert_eq!(s.subscriptions.replay_port, None);
        assert_eq!(s.speculative, None);
        assert_eq!(s.event_timeout, DEFAULT_EVENT_TIMEOUT);
        assert!(s.subscriptions.discover_pods);
        assert_eq!(s.subscriptions.central, None);
        let s = settings("{speculativeIndexing: true}").unwrap();
        assert_eq!(s.speculative, Some(Duration::from_secs(2)));
        let s = settings("{speculativeIndexing: true, speculativeTTL: 500ms}").unwrap();
        assert_eq!(s.speculative, Some(Duration::from_millis(500)));
    }

    #[test]
    fn the_sample_config_parameters_and_every_key() {
        // llm-d's deploy/config/epp-precise-prefix-cache-config.yaml.
        let s = settings(
            "{tokenProcessorConfig: {blockSize: 64}, indexerConfig: {kvBlockIndexConfig: {enableMetrics: true}}}",
        )
        .unwrap();
        assert_eq!(s.tp.block_size(), 64);
        assert!(s.index_metrics);
        let s = settings(
            r#"
tokenProcessorConfig: {blockSizeTokens: 32, blockSize: 8, hashSeed: "42", hashAlgorithm: xxh64}
indexerConfig:
  kvBlockIndexConfig:
    inMemoryConfig: {size: 5000, podCacheSize: 3}
    enableMetrics: true
    metricsLoggingInterval: 30000000000
  kvCacheBackendConfigs: [{name: gpu, weight: 1}, {name: cpu, weight: 0.5}]
kvEventsConfig:
  topicFilter: "kv@pod"
  concurrency: 2
  engineType: vllm
  discoverPods: true
  podDiscoveryConfig: {podLabelSelector: "app=vllm", podNamespace: ns, socketPort: 6000, replaySocketPort: 6100}
speculativeIndexing: true
speculativeTTL: 1m30s
fallback: {eventTimeout: 3s, rebuildWindow: 1s}
"#,
        )
        .unwrap();
        assert_eq!(s.tp.block_size(), 32);
        assert_eq!(s.tp.algorithm(), HashAlgorithm::Xxh64);
        assert_eq!((s.index.max_keys, s.index.pod_cache_size), (5000, 3));
        assert_eq!(s.metrics_logging, Some(Duration::from_secs(30)));
        assert_eq!(s.index.tier_weights[1], ("cpu".to_string(), 0.5));
        assert_eq!(s.subscriptions.topic_filter, "kv@pod");
        assert_eq!(s.subscriptions.concurrency, 2);
        assert_eq!(
            (s.subscriptions.socket_port, s.subscriptions.replay_port),
            (6000, Some(6100))
        );
        assert!(s.subscriptions.selector.is_some());
        assert_eq!(s.subscriptions.namespace.as_deref(), Some("ns"));
        assert_eq!(s.speculative, Some(Duration::from_secs(90)));
        assert_eq!(
            (s.event_timeout, s.rebuild_window),
            (Duration::from_secs(3), Duration::from_secs(1))
        );
        // The cost-aware bound: bytes over the measured cost of a key.
        let s = settings(
            "{indexerConfig: {kvBlockIndexConfig: {costAwareMemoryConfig: {size: 1GiB}}}}",
        )
        .unwrap();
        assert_eq!(s.index.max_keys as u64, (1u64 << 30) / BYTES_PER_KEY);
        let s =
            settings("{indexerConfig: {kvBlockIndexConfig: {costAwareMemoryConfig: {}}}}").unwrap();
        assert_eq!(s.index.max_keys as u64, (2u64 << 30) / BYTES_PER_KEY);
    }

    #[test]
    fn the_central_socket_is_accepted_alone_or_beside_per_endpoint_subscriptions() {
        // llm-d's sim-epp-kvcache-config.yaml: both modes (discoverPods defaults to true).
        let s = settings("{kvEventsConfig: {zmqEndpoint: 'tcp://0.0.0.0:5557'}}").unwrap();
        assert!(s.subscriptions.discover_pods);
        assert_eq!(
            s.subscriptions.central,
            Some(CentralEndpoint {
                endpoint: "tcp://0.0.0.0:5557".into(),
                field: "plugins[3].parameters.kvEventsConfig.zmqEndpoint".into(),
            })
        );
        // The central socket alone.
        let s = settings(
            "{kvEventsConfig: {zmqEndpoint: 'tcp://*:6000', discoverPods: false, topicFilter: 'kv@10.'}}",
        )
        .unwrap();
        assert!(!s.subscriptions.discover_pods);
        assert_eq!(
            s.subscriptions
                .central
                .as_ref()
                .map(|c| c.endpoint.as_str()),
            Some("tcp://*:6000")
        );
        assert_eq!(s.subscriptions.topic_filter, "kv@10.");
        // An empty zmqEndpoint is unset (Go's omitempty).
        let s = settings("{kvEventsConfig: {zmqEndpoint: ''}}").unwrap();
        assert_eq!(s.subscriptions.central, None);
        // Nothing at all to follow: refused, naming discoverPods and what would fix it.
        let e = settings("{kvEventsConfig: {discoverPods: false}}").unwrap_err();
        assert_eq!(e.field, "plugins[3].parameters.kvEventsConfig.discoverPods");
        assert!(e.to_string().contains("set zmqEndpoint"), "{e}");
        // A bad address is refused at load, naming the field and the address.
        let e = settings("{kvEventsConfig: {zmqEndpoint: 'tcp://*:99999'}}").unwrap_err();
        assert_eq!(e.field, "plugins[3].parameters.kvEventsConfig.zmqEndpoint");
        assert!(e.to_string().contains("tcp://*:99999"), "{e}");
    }

    #[test]
    fn what_is_not_implemented_is_refused_by_name() {
        let cases = [
            (
                "{indexerConfig: {tokenizersPoolConfig: {}}}",
                "indexerConfig.tokenizersPoolConfig",
            ),
            (
                "{indexerConfig: {kvBlockIndexConfig: {redisConfig: {address: x}}}}",
                "indexerConfig.kvBlockIndexConfig.redisConfig",
            ),
            (
                "{kvEventsConfig: {zmqEndpoint: 'ipc:///tmp/kv'}}",
                "kvEventsConfig.zmqEndpoint",
            ),
            (
                "{kvEventsConfig: {zmqEndpoint: 'tcp://0.0.0.0'}}",
                "kvEventsConfig.zmqEndpoint",
            ),
            (
                "{kvEventsConfig: {zmqEndpoint: 'tcp://*:0'}}",
                "kvEventsConfig.zmqEndpoint",
            ),
            (
                "{kvEventsConfig: {zmqEndpoint: 'tcp://a b:5557'}}",
                "kvEventsConfig.zmqEndpoint",
            ),
            (
                "{kvEventsConfig: {discoverPods: false, zmqEndpoint: ''}}",
                "kvEventsConfig.discoverPods",
            ),
            (
                "{kvEventsConfig: {engineType: sglang}}",
                "kvEventsConfig.engineType",
            ),
            (
                "{kvEventsConfig: {discoverPods: false}}",
                "kvEventsConfig.discoverPods",
            ),
            (
                "{kvEventsConfig: {concurrency: 0}}",
                "kvEventsConfig.concurrency",
            ),
            (
                "{kvEventsConfig: {podDiscoveryConfig: {socketPort: 70000}}}",
                "kvEventsConfig.podDiscoveryConfig.socketPort",
            ),
            (
                "{kvEventsConfig: {podDiscoveryConfig: {podLabelSelector: 'a in'}}}",
                "kvEventsConfig.podDiscoveryConfig.podLabelSelector",
            ),
            (
                "{tokenProcessorConfig: {blockSizeTokens: -1}}",
                "tokenProcessorConfig.blockSizeTokens",
            ),
            (
                "{tokenProcessorConfig: {blockSize: -5}}",
                "tokenProcessorConfig.blockSize",
            ),
            (
                "{tokenProcessorConfig: {hashAlgorithm: xxhash}}",
                "tokenProcessorConfig.hashAlgorithm",
            ),
            (
                "{tokenProcessorConfig: {blockSizeTokens: 16, extra: 1}}",
                "tokenProcessorConfig.extra",
            ),
            (
                "{indexerConfig: {kvBlockIndexConfig: {costAwareMemoryConfig: {size: lots}}}}",
                "indexerConfig.kvBlockIndexConfig.costAwareMemoryConfig.size",
            ),
            (
                "{indexerConfig: {kvBlockIndexConfig: {inMemoryConfig: {size: 0}}}}",
                "indexerConfig.kvBlockIndexConfig.inMemoryConfig.size",
            ),
            (
                "{indexerConfig: {kvBlockIndexConfig: {metricsLoggingInterval: soon}}}",
                "indexerConfig.kvBlockIndexConfig.metricsLoggingInterval",
            ),
            ("{speculativeTTL: soon}", "speculativeTTL"),
            ("{fallback: {eventTimeout: 0s}}", "fallback.eventTimeout"),
            (
                "{prefixMatchInfoProducerName: x}",
                "prefixMatchInfoProducerName",
            ),
        ];
        for (yaml, key) in cases {
            let e = settings(yaml)
                .err()
                .unwrap_or_else(|| panic!("{yaml} was accepted"));
            assert_eq!(
                e.field,
                format!("plugins[3].parameters.{key}"),
                "{yaml}: {e}"
            );
        }
        assert_eq!(parse_bytes("2GiB"), Some(2 << 30));
        assert_eq!(parse_bytes("500MiB"), Some(500 << 20));
        assert_eq!(parse_bytes("1GB"), Some(1_000_000_000));
        assert_eq!(parse_bytes("x"), None);
    }
}

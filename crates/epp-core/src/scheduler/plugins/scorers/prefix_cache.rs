//! `prefix-cache-scorer`: the share of a request's leading prompt blocks an endpoint is believed
//! to hold (matched blocks / prompt blocks), optionally blended with the matched length, from the
//! prefix match info of an `approx-prefix-cache-producer` (`prefixMatchInfoProducerName`; the
//! approximate one when unset, as in llm-d). The GAIE-era index parameters (`blockSizeTokens`,
//! `blockSize`, `maxPrefixBlocksToMatch`, `lruCapacityPerServer`) are still accepted here: they
//! configure the implicit producer, and cannot be combined with an explicit one.

use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::config::{ConfigError, PluginSpec};
use crate::prefix::PrefixConfig;
use crate::scheduler::plugins::{params, BoundSource, Plugin, PrefixConsumer, Scorer};
use crate::scheduler::{PrefixSource, SchedCtx};

pub const TYPE: &str = "prefix-cache-scorer";
/// llm-d's default `matchLengthScaleTokens`.
pub const DEFAULT_MATCH_LENGTH_SCALE_TOKENS: u64 = 8192;

pub fn build(spec: &PluginSpec, field: &str) -> Result<Plugin, ConfigError> {
    let p: PrefixParams = params(spec, field)?;
    let legacy = if p.has_index_parameters() {
        if p.prefix_match_info_producer_name.is_some() {
            return Err(ConfigError::new(
                format!("{field}.parameters.prefixMatchInfoProducerName"),
                "give either a producer or the scorer's own index parameters (blockSizeTokens, blockSize, maxPrefixBlocksToMatch, lruCapacityPerServer), not both; set them on the producer",
            ));
        }
        Some(p.to_config(field)?)
    } else {
        None
    };
    let weight = p.match_length_weight.unwrap_or(0.0);
    if !(0.0..=1.0).contains(&weight) {
        return Err(ConfigError::new(
            format!("{field}.parameters.matchLengthWeight"),
            format!("must be between 0.0 and 1.0, got {weight}"),
        ));
    }
    let scale = p
        .match_length_scale_tokens
        .unwrap_or(DEFAULT_MATCH_LENGTH_SCALE_TOKENS);
    if weight > 0.0 && scale == 0 {
        return Err(ConfigError::new(
            format!("{field}.parameters.matchLengthScaleTokens"),
            "must be greater than 0 when matchLengthWeight is greater than 0",
        ));
    }
    let producer_field = if p.prefix_match_info_producer_name.is_some() {
        format!("{field}.parameters.prefixMatchInfoProducerName")
    } else {
        format!("{field}.parameters")
    };
    Ok(Plugin::Scorer(Arc::new(PrefixCacheScorer {
        name: spec.name().to_string(),
        consumer: PrefixConsumer {
            producer: p.prefix_match_info_producer_name.clone(),
            legacy,
            field: producer_field,
            precise: false,
        },
        source: BoundSource::default(),
        match_length_weight: weight,
        match_length_scale_tokens: scale,
    })))
}

#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct PrefixParams {
    /// The `approx-prefix-cache-producer` whose match info is scored.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prefix_match_info_producer_name: Option<String>,
    /// Weight (0..1) of the matched length against the matched ratio; default 0.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub match_length_weight: Option<f64>,
    /// Tokens at which the matched length counts fully; default 8192.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub match_length_scale_tokens: Option<u64>,
    /// Block size in tokens (× 4 bytes of prompt text per token).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub block_size_tokens: Option<u64>,
    /// Block size in bytes of prompt text (older GAIE name); exclusive with `blockSizeTokens`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub block_size: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_prefix_blocks_to_match: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub lru_capacity_per_server: Option<u64>,
}

/// Bytes of prompt text per token in the approximate index.
pub const BYTES_PER_TOKEN: u64 = 4;

impl PrefixParams {
    /// Whether any GAIE-era index parameter is given.
    pub fn has_index_parameters(&self) -> bool {
        self.block_size_tokens.is_some()
            || self.block_size.is_some()
            || self.max_prefix_blocks_to_match.is_some()
            || self.lru_capacity_per_server.is_some()
    }

    pub fn to_config(&self, field: &str) -> Result<PrefixConfig, ConfigError> {
        let d = PrefixConfig::default();
        let block_size = match (self.block_size_tokens, self.block_size) {
            (Some(_), Some(_)) => {
                return Err(ConfigError::new(
                    format!("{field}.parameters.blockSize"),
                    "give either blockSizeTokens or blockSize, not both",
                ))
            }
            (Some(0), _) => {
                return Err(ConfigError::new(
                    format!("{field}.parameters.blockSizeTokens"),
                    "must be at least 1",
                ))
            }
            (_, Some(0)) => {
                return Err(ConfigError::new(
                    format!("{field}.parameters.blockSize"),
                    "must be at least 1",
                ))
            }
            (Some(t), None) => (t * BYTES_PER_TOKEN) as usize,
            (None, Some(b)) => b as usize,
            (None, None) => d.block_size,
        };
        let max_blocks = match self.max_prefix_blocks_to_match {
            Some(0) => {
                return Err(ConfigError::new(
                    format!("{field}.parameters.maxPrefixBlocksToMatch"),
                    "must be at least 1",
                ))
            }
            Some(n) => n as usize,
            None => d.max_blocks,
        };
        let cap = match self.lru_capacity_per_server {
            Some(0) => {
                return Err(ConfigError::new(
                    format!("{field}.parameters.lruCapacityPerServer"),
                    "must be at least 1",
                ))
            }
            Some(n) if n > 100_000_000 => {
                return Err(ConfigError::new(
                    format!("{field}.parameters.lruCapacityPerServer"),
                    "must be at most 100000000",
                ))
            }
            Some(n) => n as usize,
            None => d.capacity_per_endpoint,
        };
        Ok(PrefixConfig {
            block_size,
            max_blocks,
            capacity_per_endpoint: cap,
        })
    }
}

/// `w · min(1, matched tokens / scale)² + (1 − w) · matched blocks / prompt blocks`; 0 for a
/// prompt shorter than one block.
pub struct PrefixCacheScorer {
    name: String,
    consumer: PrefixConsumer,
    source: BoundSource,
    match_length_weight: f64,
    match_length_scale_tokens: u64,
}

impl Scorer for PrefixCacheScorer {
    fn type_name(&self) -> &'static str {
        TYPE
    }
    fn name(&self) -> &str {
        &self.name
    }
    fn score(&self, ctx: &SchedCtx<'_>, cands: &[usize], out: &mut [f64]) {
        let w = self.match_length_weight;
        let m = ctx.prefix.get(self.source.get());
        let block_tokens = m.block_tokens as f64;
        for (o, &i) in out.iter_mut().zip(cands) {
            let slot = ctx.ep(i).slot();
            let ratio = m.blocks.ratio(slot);
            let length = if w > 0.0 && block_tokens > 0.0 {
                let matched = f64::from(m.blocks.matched(slot)) * block_tokens;
                let n = (matched / self.match_length_scale_tokens as f64).min(1.0);
                n * n
            } else {
                0.0
            };
            *o = w * length + (1.0 - w) * ratio;
        }
    }
    fn prefix_consumer(&self) -> Option<PrefixConsumer> {
        Some(self.consumer.clone())
    }
    fn bind_prefix(&self, source: PrefixSource) {
        self.source.set(source);
    }
}

impl PrefixCacheScorer {
    /// A scorer of the precise producer's match with llm-d's defaults (what the legacy
    /// `precise-prefix-cache-scorer` delegates to).
    pub fn of_precise(name: &str) -> Self {
        let s = Self {
            name: name.to_string(),
            consumer: PrefixConsumer {
                producer: None,
                legacy: None,
                field: String::new(),
                precise: true,
            },
            source: BoundSource::default(),
            match_length_weight: 0.0,
            match_length_scale_tokens: DEFAULT_MATCH_LENGTH_SCALE_TOKENS,
        };
        s.source.set(PrefixSource::Precise);
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::datastore::{DatastoreWriter, EndpointSpec, HealthConfig};
    use crate::prefix::PrefixMatch;
    use crate::request::ParsedRequest;
    use crate::scheduler::{PrefixMatches, RequestData};

    fn scorer(yaml: &str) -> Result<Arc<dyn Scorer>, ConfigError> {
        let spec = PluginSpec {
            name: None,
            type_: TYPE.into(),
            parameters: Some(serde_yaml::from_str(yaml).unwrap()),
        };
        match build(&spec, "plugins[1]")? {
            Plugin::Scorer(s) => Ok(s),
            _ => unreachable!(),
        }
    }

    #[test]
    fn ratio_and_length_blend() {
        let w = DatastoreWriter::new(HealthConfig::default());
        w.set_endpoints(
            (1..=3)
                .map(|i| EndpointSpec::new(format!("10.0.0.{i}:8000")))
                .collect(),
        );
        let snap = w.snapshot();
        let slots: Vec<usize> = snap.endpoints.iter().map(|e| e.slot()).collect();
        let mut blocks = vec![0u32; slots.iter().max().unwrap() + 1];
        blocks[slots[0]] = 4; // all 4 blocks
        blocks[slots[1]] = 1;
        let prefix = PrefixMatch {
            blocks,
            total_blocks: 4,
        };
        let data = RequestData::default();
        let prefix = PrefixMatches::approximate(prefix, 64);
        let req = ParsedRequest::default();
        let ctx = SchedCtx {
            snapshot: &snap,
            request: &req,
            prefix: &prefix,
            data: &data,
        };
        let mut out = vec![0.0; 3];
        scorer("{}").unwrap().score(&ctx, &[0, 1, 2], &mut out);
        assert_eq!(out, vec![1.0, 0.25, 0.0]);
        // w = 0.5, scale 512 tokens: 256 matched tokens -> (0.5)^2 = 0.25; 64 -> (0.125)^2.
        scorer("{matchLengthWeight: 0.5, matchLengthScaleTokens: 512}")
            .unwrap()
            .score(&ctx, &[0, 1, 2], &mut out);
        assert_eq!(
            out,
            vec![0.5 * 0.25 + 0.5, 0.5 * 0.015625 + 0.5 * 0.25, 0.0]
        );
        // No blocks at all: 0 everywhere.
        let empty = PrefixMatches::approximate(PrefixMatch::default(), 64);
        let ctx = SchedCtx {
            snapshot: &snap,
            request: &req,
            prefix: &empty,
            data: &data,
        };
        scorer("{}").unwrap().score(&ctx, &[0, 1, 2], &mut out);
        assert_eq!(out, vec![0.0; 3]);
    }

    #[test]
    fn parameters_are_checked() {
        let e = scorer("{matchLengthWeight: 1.5}").err().unwrap();
        assert_eq!(e.field, "plugins[1].parameters.matchLengthWeight");
        let e = scorer("{matchLengthWeight: 0.5, matchLengthScaleTokens: 0}")
            .err()
            .unwrap();
        assert_eq!(e.field, "plugins[1].parameters.matchLengthScaleTokens");
        let e = scorer("{prefixMatchInfoProducerName: p, blockSizeTokens: 16}")
            .err()
            .unwrap();
        assert_eq!(e.field, "plugins[1].parameters.prefixMatchInfoProducerName");
        let s = scorer("{blockSizeTokens: 32}").unwrap();
        let c = s.prefix_consumer().unwrap();
        assert_eq!(c.producer, None);
        assert_eq!(c.legacy.unwrap().block_size, 128);
        let c = scorer("{prefixMatchInfoProducerName: p}")
            .unwrap()
            .prefix_consumer()
            .unwrap();
        assert_eq!(c.producer.as_deref(), Some("p"));
        assert_eq!(c.legacy, None);
        assert_eq!(c.field, "plugins[1].parameters.prefixMatchInfoProducerName");
    }
}

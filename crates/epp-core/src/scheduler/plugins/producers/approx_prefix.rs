//! `approx-prefix-cache-producer`: llm-d's approximate prefix index as a producer. It cuts the
//! prompt's estimated tokens (4 bytes of text each) into blocks, looks up which endpoints
//! probably hold the leading blocks, and after the pick teaches the index the chosen endpoint.
//! `prefix-cache-scorer` and `no-hit-lru-scorer` read its match info by name
//! (`prefixMatchInfoProducerName`); without any producer configured they get this one with its
//! defaults, as in llm-d. The director runs the one index (see [`PrefixPlan`]).

use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::config::{ConfigError, PluginSpec};
use crate::prefix::{
    BlockPlan, PrefixConfig, PrefixPlan, ServerBound, TokenBlocks, MIN_BLOCK_SIZE_TOKENS,
};
use crate::scheduler::plugins::{params, Plugin, Producer, BYTES_PER_TOKEN};

pub const TYPE: &str = "approx-prefix-cache-producer";

/// llm-d's defaults.
pub const DEFAULT_BLOCK_SIZE_TOKENS: u64 = 16;
pub const DEFAULT_MAX_PREFIX_BLOCKS: u64 = 2048;
pub const DEFAULT_MAX_PREFIX_TOKENS: u64 = 131_072;
pub const DEFAULT_LRU_CAPACITY_PER_SERVER: u64 = 31_250;
/// Largest `lruCapacityPerServer` accepted (blocks per endpoint).
pub const MAX_LRU_CAPACITY_PER_SERVER: u64 = 100_000_000;

#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, rename_all = "camelCase", default)]
pub struct ApproxPrefixParams {
    /// Take the block size and per-endpoint capacity from endpoint metrics when reported.
    pub auto_tune: bool,
    pub block_size_tokens: u64,
    /// Deprecated in llm-d: when set and `blockSizeTokens` is left at its default, its value
    /// becomes `blockSizeTokens` (as llm-d maps it).
    pub block_size: u64,
    /// Deprecated in llm-d: the block cap, used only when `maxPrefixTokensToMatch` is 0.
    pub max_prefix_blocks_to_match: u64,
    pub max_prefix_tokens_to_match: u64,
    pub lru_capacity_per_server: u64,
}

impl Default for ApproxPrefixParams {
    fn default() -> Self {
        Self {
            auto_tune: true,
            block_size_tokens: DEFAULT_BLOCK_SIZE_TOKENS,
            block_size: 0,
            max_prefix_blocks_to_match: DEFAULT_MAX_PREFIX_BLOCKS,
            max_prefix_tokens_to_match: DEFAULT_MAX_PREFIX_TOKENS,
            lru_capacity_per_server: DEFAULT_LRU_CAPACITY_PER_SERVER,
        }
    }
}

impl ApproxPrefixParams {
    /// The index plan, validated; errors name `{field}.parameters.x`.
    pub fn plan(&self, field: &str) -> Result<PrefixPlan, ConfigError> {
        let mut block_size_tokens = self.block_size_tokens;
        if self.block_size > 0 {
            tracing::warn!(
                plugin = field,
                block_size = self.block_size,
                "approx-prefix-cache-producer: `blockSize` is deprecated; use `blockSizeTokens`"
            );
            if block_size_tokens == DEFAULT_BLOCK_SIZE_TOKENS {
                block_size_tokens = self.block_size;
            }
        }
        if !self.auto_tune && block_size_tokens == 0 {
            return Err(ConfigError::new(
                format!("{field}.parameters.blockSizeTokens"),
                "must be at least 1 when autoTune is false",
            ));
        }
        if self.lru_capacity_per_server == 0 {
            return Err(ConfigError::new(
                format!("{field}.parameters.lruCapacityPerServer"),
                "must be at least 1",
            ));
        }
        if self.lru_capacity_per_server > MAX_LRU_CAPACITY_PER_SERVER {
            return Err(ConfigError::new(
                format!("{field}.parameters.lruCapacityPerServer"),
                format!("must be at most {MAX_LRU_CAPACITY_PER_SERVER}"),
            ));
        }
        let tokens = TokenBlocks {
            block_size_tokens: usize::try_from(block_size_tokens).unwrap_or(usize::MAX),
            auto_tune: self.auto_tune,
            max_prefix_tokens: usize::try_from(self.max_prefix_tokens_to_match)
                .unwrap_or(usize::MAX),
            max_prefix_blocks: usize::try_from(self.max_prefix_blocks_to_match)
                .unwrap_or(usize::MAX),
        };
        let base_tokens = tokens.block_size_tokens.max(MIN_BLOCK_SIZE_TOKENS);
        Ok(PrefixPlan {
            index: PrefixConfig {
                block_size: base_tokens.saturating_mul(BYTES_PER_TOKEN as usize),
                max_blocks: tokens.max_blocks(base_tokens),
                capacity_per_endpoint: self.lru_capacity_per_server as usize,
            },
            bound: if self.auto_tune {
                ServerBound::Replace
            } else {
                ServerBound::Ignore
            },
            blocks: BlockPlan::Tokens(tokens),
        })
    }
}

/// The plan of a producer with llm-d's defaults (what a prefix scorer gets when no producer is
/// configured).
pub fn default_plan() -> PrefixPlan {
    ApproxPrefixParams::default()
        .plan("plugins")
        .expect("the defaults are valid")
}

pub fn build(spec: &PluginSpec, field: &str) -> Result<Plugin, ConfigError> {
    let p: ApproxPrefixParams = params(spec, field)?;
    let plan = p.plan(field)?;
    Ok(Plugin::Producer(Arc::new(ApproxPrefixProducer {
        name: spec.name().to_string(),
        plan,
    })))
}

pub struct ApproxPrefixProducer {
    name: String,
    plan: PrefixPlan,
}

impl Producer for ApproxPrefixProducer {
    fn type_name(&self) -> &'static str {
        TYPE
    }
    fn name(&self) -> &str {
        &self.name
    }
    fn prefix_plan(&self) -> Option<PrefixPlan> {
        Some(self.plan)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::datastore::{DatastoreWriter, EndpointSpec, HealthConfig, ModelServerMetrics};

    fn plan_of(yaml: &str) -> Result<PrefixPlan, ConfigError> {
        let spec = PluginSpec {
            name: None,
            type_: TYPE.into(),
            parameters: Some(serde_yaml::from_str(yaml).unwrap()),
        };
        match build(&spec, "plugins[2]")? {
            Plugin::Producer(p) => Ok(p.prefix_plan().unwrap()),
            _ => unreachable!(),
        }
    }

    #[test]
    fn defaults_are_llm_d_s() {
        let p = default_plan();
        // 16 configured, raised to 64 tokens = 256 bytes; 131072 / 64 = 2048 blocks.
        assert_eq!(
            p.index,
            PrefixConfig {
                block_size: 256,
                max_blocks: 2048,
                capacity_per_endpoint: 31_250
            }
        );
        assert_eq!(p.bound, ServerBound::Replace);
        assert_eq!(
            p.blocks,
            BlockPlan::Tokens(TokenBlocks {
                block_size_tokens: 16,
                auto_tune: true,
                max_prefix_tokens: 131_072,
                max_prefix_blocks: 2048
            })
        );
    }

    #[test]
    fn parameters_map_and_validate() {
        let p = plan_of("{autoTune: false, blockSizeTokens: 128, maxPrefixTokensToMatch: 16384, lruCapacityPerServer: 500}").unwrap();
        assert_eq!(p.index.block_size, 512);
        assert_eq!(p.index.max_blocks, 128);
        assert_eq!(p.index.capacity_per_endpoint, 500);
        assert_eq!(p.bound, ServerBound::Ignore);
        // Both caps 0: the whole prompt.
        let p = plan_of("{maxPrefixTokensToMatch: 0, maxPrefixBlocksToMatch: 0}").unwrap();
        assert_eq!(p.index.max_blocks, usize::MAX);
        // Token cap 0: the block cap applies.
        let p = plan_of("{maxPrefixTokensToMatch: 0, maxPrefixBlocksToMatch: 7}").unwrap();
        assert_eq!(p.index.max_blocks, 7);
        // Deprecated blockSize maps into blockSizeTokens when that is left at its default.
        let p = plan_of("{blockSize: 100}").unwrap();
        assert_eq!(p.index.block_size, 400);
        let p = plan_of("{blockSize: 100, blockSizeTokens: 80}").unwrap();
        assert_eq!(p.index.block_size, 320);
        let e = plan_of("{autoTune: false, blockSizeTokens: 0}").unwrap_err();
        assert_eq!(e.field, "plugins[2].parameters.blockSizeTokens");
        // With autoTune a zero block size is allowed (metrics or the 64-token floor decide).
        assert_eq!(
            plan_of("{blockSizeTokens: 0}").unwrap().index.block_size,
            256
        );
        let e = plan_of("{lruCapacityPerServer: 0}").unwrap_err();
        assert_eq!(e.field, "plugins[2].parameters.lruCapacityPerServer");
        let e = plan_of("{maxPrefixTokensToMatch: -1}").unwrap_err();
        assert_eq!(e.field, "plugins[2].parameters.maxPrefixTokensToMatch");
        let e = plan_of("{prefixMatchInfoProducerName: x}").unwrap_err();
        assert_eq!(e.field, "plugins[2].parameters.prefixMatchInfoProducerName");
    }

    #[test]
    fn auto_tune_takes_the_first_endpoints_block_size() {
        let w = DatastoreWriter::new(HealthConfig::default());
        w.set_endpoints(vec![EndpointSpec::new("10.0.0.1:8000")]);
        let p = default_plan();
        assert_eq!(p.blocks_for(&w.snapshot()), (256, 2048), "no metrics yet");
        w.record_scrape(
            "10.0.0.1:8000",
            Ok(ModelServerMetrics {
                block_size: Some(128),
                ..Default::default()
            }),
        );
        assert_eq!(p.blocks_for(&w.snapshot()), (512, 1024));
        w.record_scrape(
            "10.0.0.1:8000",
            Ok(ModelServerMetrics {
                block_size: Some(16),
                ..Default::default()
            }),
        );
        assert_eq!(
            p.blocks_for(&w.snapshot()),
            (256, 2048),
            "raised to 64 tokens"
        );
        let fixed = plan_of("{autoTune: false, blockSizeTokens: 96}").unwrap();
        assert_eq!(fixed.blocks_for(&w.snapshot()), (384, 131_072 / 96));
    }
}

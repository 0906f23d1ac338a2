//! `prefix-cache-scorer`: the share of a request's leading prompt blocks an endpoint is believed
//! to hold, from the approximate prefix index (matched blocks / prompt blocks). Its parameters
//! size that index.

use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::config::{ConfigError, PluginSpec};
use crate::prefix::PrefixConfig;
use crate::scheduler::plugins::{params, Plugin, Scorer};
use crate::scheduler::SchedCtx;

pub const TYPE: &str = "prefix-cache-scorer";

pub fn build(spec: &PluginSpec, field: &str) -> Result<Plugin, ConfigError> {
    let p: PrefixParams = params(spec, field)?;
    let cfg = p.to_config(field)?;
    Ok(Plugin::Scorer(Arc::new(PrefixCacheScorer {
        name: spec.name().to_string(),
        cfg,
    })))
}

#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct PrefixParams {
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

/// Matched leading blocks / prompt blocks, from the approximate prefix index.
pub struct PrefixCacheScorer {
    name: String,
    cfg: PrefixConfig,
}

impl Scorer for PrefixCacheScorer {
    fn type_name(&self) -> &'static str {
        TYPE
    }
    fn name(&self) -> &str {
        &self.name
    }
    fn score(&self, ctx: &SchedCtx<'_>, cands: &[usize], out: &mut [f64]) {
        for (o, &i) in out.iter_mut().zip(cands) {
            *o = ctx.prefix.ratio(ctx.ep(i).slot());
        }
    }
    fn prefix_config(&self) -> Option<PrefixConfig> {
        Some(self.cfg)
    }
}

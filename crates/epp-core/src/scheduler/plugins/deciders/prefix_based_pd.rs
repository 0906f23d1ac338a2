//! `prefix-based-pd-decider`: run the prefill stage only when the decode pick would have to
//! compute at least `nonCachedTokens` prompt tokens itself (the prompt's tokens minus those its
//! prefix match says it holds), and the prompt has at least `promptTokens` tokens.
//!
//! Parameters (llm-d's names and defaults): `nonCachedTokens` (default 0: the decider never
//! disaggregates), `promptTokens` (default 0: no prompt-length gate). The prompt's length comes
//! from the `token-producer` (an estimating one runs when none is configured); the match from
//! the prefix source the configuration's first prefix scorer reads.

use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::config::{ConfigError, PluginSpec};
use crate::scheduler::plugins::deciders::Decider;
use crate::scheduler::plugins::{params, Plugin};
use crate::scheduler::SchedCtx;

pub const TYPE: &str = "prefix-based-pd-decider";

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct PrefixBasedParams {
    #[serde(default)]
    pub non_cached_tokens: i64,
    #[serde(default)]
    pub prompt_tokens: i64,
}

pub fn build(spec: &PluginSpec, field: &str) -> Result<Plugin, ConfigError> {
    let p: PrefixBasedParams = params(spec, field)?;
    for (key, v) in [
        ("nonCachedTokens", p.non_cached_tokens),
        ("promptTokens", p.prompt_tokens),
    ] {
        if v < 0 {
            return Err(ConfigError::new(
                format!("{field}.parameters.{key}"),
                format!("must be >= 0, got {v}"),
            ));
        }
    }
    if p.non_cached_tokens == 0 {
        tracing::info!(
            plugin = %spec.name(),
            "prefix-based-pd-decider has nonCachedTokens 0: it never disaggregates"
        );
    }
    Ok(Plugin::Decider(Arc::new(PrefixBasedPd {
        name: spec.name().to_string(),
        non_cached_tokens: p.non_cached_tokens as u64,
        prompt_tokens: p.prompt_tokens as u64,
    })))
}

#[derive(Debug)]
pub struct PrefixBasedPd {
    name: String,
    non_cached_tokens: u64,
    prompt_tokens: u64,
}

impl PrefixBasedPd {
    pub fn new(non_cached_tokens: u64, prompt_tokens: u64) -> Self {
        Self {
            name: TYPE.to_string(),
            non_cached_tokens,
            prompt_tokens,
        }
    }
}

impl Decider for PrefixBasedPd {
    fn type_name(&self) -> &'static str {
        TYPE
    }
    fn name(&self) -> &str {
        &self.name
    }
    fn disaggregate(&self, ctx: &SchedCtx<'_>, decode: Option<usize>) -> bool {
        if self.non_cached_tokens == 0 {
            return false;
        }
        let Some(decode) = decode else {
            return false;
        };
        let input = ctx.data.prompt_tokens.unwrap_or(0);
        if self.prompt_tokens > 0 && input < self.prompt_tokens {
            return false;
        }
        if input < self.non_cached_tokens {
            return false;
        }
        // Whole cached blocks, untiered: a prefix held in a slower tier still spares the
        // decoder its compute.
        let m = ctx.prefix.primary();
        let cached = u64::from(m.blocks.matched(ctx.ep(decode).slot())) * m.block_tokens;
        input.saturating_sub(cached) >= self.non_cached_tokens
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::datastore::{DatastoreWriter, EndpointSpec, HealthConfig};
    use crate::prefix::{PrefixConfig, PrefixIndex};
    use crate::request::ParsedRequest;
    use crate::scheduler::{PrefixMatches, RequestData};

    /// Endpoint 0 holds `cached_blocks` blocks of 4 tokens of the prompt; endpoint 1 none.
    fn decide(d: &PrefixBasedPd, prompt_tokens: u64, cached_blocks: usize) -> [bool; 2] {
        let ds = DatastoreWriter::new(HealthConfig::default());
        ds.set_endpoints(vec![
            EndpointSpec::new("10.0.0.1:8000"),
            EndpointSpec::new("10.0.0.2:8000"),
        ]);
        let snap = ds.snapshot();
        let index = PrefixIndex::new(PrefixConfig {
            block_size: 16,
            ..Default::default()
        });
        let prompt = vec![b'x'; 16 * 8];
        let hashes = index.hash("m", &prompt);
        let cached = index.hash("m", &prompt[..16 * cached_blocks]);
        index.insert(snap.endpoints[0].slot(), &cached);
        let prefix = PrefixMatches::approximate(index.lookup(&hashes), 4);
        let req = ParsedRequest {
            prompt,
            ..Default::default()
        };
        let data = RequestData {
            prompt_tokens: Some(prompt_tokens),
            ..Default::default()
        };
        let ctx = SchedCtx {
            snapshot: &snap,
            request: &req,
            prefix: &prefix,
            data: &data,
        };
        [d.disaggregate(&ctx, Some(0)), d.disaggregate(&ctx, Some(1))]
    }

    #[test]
    fn disaggregates_when_the_uncached_suffix_reaches_the_threshold() {
        // 32 prompt tokens; endpoint 0 holds 5 blocks of 4 = 20 of them: 12 uncached.
        assert_eq!(decide(&PrefixBasedPd::new(12, 0), 32, 5), [true, true]);
        assert_eq!(decide(&PrefixBasedPd::new(13, 0), 32, 5), [false, true]);
        // Everything cached on endpoint 0: only the cold one disaggregates.
        assert_eq!(decide(&PrefixBasedPd::new(1, 0), 32, 8), [false, true]);
    }

    #[test]
    fn zero_threshold_disables_and_short_prompts_never_disaggregate() {
        assert_eq!(decide(&PrefixBasedPd::new(0, 0), 32, 0), [false, false]);
        // promptTokens gates on the whole prompt, whatever is cached.
        assert_eq!(decide(&PrefixBasedPd::new(4, 33), 32, 0), [false, false]);
        assert_eq!(decide(&PrefixBasedPd::new(4, 32), 32, 0), [true, true]);
        // A prompt shorter than nonCachedTokens cannot have that many uncached.
        assert_eq!(decide(&PrefixBasedPd::new(40, 0), 32, 0), [false, false]);
    }

    #[test]
    fn negative_parameters_are_refused_naming_the_field() {
        let spec = PluginSpec {
            name: None,
            type_: TYPE.into(),
            parameters: Some(serde_json::json!({"nonCachedTokens": -1})),
        };
        let e = build(&spec, "plugins[2]").err().unwrap();
        assert_eq!(e.field, "plugins[2].parameters.nonCachedTokens");
        let spec = PluginSpec {
            name: None,
            type_: TYPE.into(),
            parameters: Some(serde_json::json!({"nonCachedTokens": 8, "bogus": 1})),
        };
        let e = build(&spec, "plugins[2]").err().unwrap();
        assert_eq!(e.field, "plugins[2].parameters.bogus");
    }
}

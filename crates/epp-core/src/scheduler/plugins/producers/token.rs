//! `token-producer` (and its deprecated alias `tokenizer`): the prompt's length in tokens, for
//! plugins that weigh it. Only llm-d's tokenizer-free `estimate` backend is implemented: 4 bytes
//! of prompt text per token, rounded up (the same estimate the approximate prefix index cuts its
//! blocks by). The vLLM `/render` and UDS tokenizer backends are refused, naming the parameter.
//! One runs implicitly when none is configured, as in llm-d.

use std::sync::Arc;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::config::{ConfigError, PluginSpec};
use crate::request::ParsedRequest;
use crate::scheduler::plugins::{params, Plugin, Producer, BYTES_PER_TOKEN};
use crate::scheduler::RequestData;

pub const TYPE: &str = "token-producer";
/// llm-d's deprecated name for the same plugin.
pub const LEGACY_TYPE: &str = "tokenizer";

#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct TokenProducerParams {
    /// The model whose tokenizer a real backend would load (not supported).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model_name: Option<String>,
    /// vLLM `/render` backend (not supported).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vllm: Option<Value>,
    /// gRPC-over-UDS tokenizer sidecar (not supported).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uds_tokenizer_config: Option<Value>,
    /// The `estimate` backend (the default).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub estimate: Option<EstimateParams>,
}

#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct EstimateParams {
    /// Image placeholder estimation (not supported: epp estimates text only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<Value>,
    /// Video placeholder estimation (not supported).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub video: Option<Value>,
}

pub fn build(spec: &PluginSpec, field: &str) -> Result<Plugin, ConfigError> {
    let p: TokenProducerParams = params(spec, field)?;
    let refuse = |param: &str, what: &str| {
        Err(ConfigError::new(
            format!("{field}.parameters.{param}"),
            format!(
                "{what} is not supported by epp; only the tokenizer-free `estimate` backend is (leave `{param}` out)"
            ),
        ))
    };
    if p.vllm.is_some() {
        return refuse("vllm", "the vLLM /render tokenizer backend");
    }
    if p.uds_tokenizer_config.is_some() {
        return refuse("udsTokenizerConfig", "the UDS tokenizer sidecar backend");
    }
    if p.model_name.is_some() {
        return refuse("modelName", "a model tokenizer (the vLLM backend)");
    }
    if let Some(e) = &p.estimate {
        if e.image.is_some() {
            return refuse("estimate.image", "multimodal (image) token estimation");
        }
        if e.video.is_some() {
            return refuse("estimate.video", "multimodal (video) token estimation");
        }
    }
    Ok(Plugin::Producer(Arc::new(TokenProducer {
        name: spec.name().to_string(),
        type_name: if spec.type_ == LEGACY_TYPE {
            tracing::warn!(
                plugin = field,
                "plugin type `tokenizer` is deprecated; use `token-producer`"
            );
            LEGACY_TYPE
        } else {
            TYPE
        },
    })))
}

/// Estimates the prompt's tokens: ⌈prompt bytes / 4⌉.
pub struct TokenProducer {
    name: String,
    type_name: &'static str,
}

impl Default for TokenProducer {
    fn default() -> Self {
        Self {
            name: TYPE.to_string(),
            type_name: TYPE,
        }
    }
}

/// The `estimate` backend's token count for a prompt of `bytes` bytes.
pub fn estimate_tokens(bytes: usize) -> u64 {
    (bytes as u64).div_ceil(BYTES_PER_TOKEN)
}

impl Producer for TokenProducer {
    fn type_name(&self) -> &'static str {
        self.type_name
    }
    fn name(&self) -> &str {
        &self.name
    }
    fn produce(&self, request: &ParsedRequest, data: &mut RequestData) {
        if data.prompt_tokens.is_none() {
            data.prompt_tokens = Some(estimate_tokens(request.prompt.len()));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn build_with(type_: &str, yaml: Option<&str>) -> Result<Plugin, ConfigError> {
        build(&PluginSpec::for_test(type_, yaml), "plugins[0]")
    }

    #[test]
    fn estimates_four_bytes_per_token_rounded_up() {
        let Plugin::Producer(p) = build_with(TYPE, Some("estimate: {}")).unwrap() else {
            panic!()
        };
        let mut data = RequestData::default();
        let req = ParsedRequest {
            prompt: b"hello world".to_vec(),
            ..Default::default()
        };
        p.produce(&req, &mut data);
        assert_eq!(data.prompt_tokens, Some(3));
        assert_eq!(estimate_tokens(0), 0);
        assert_eq!(estimate_tokens(8), 2);
        let Plugin::Producer(legacy) = build_with(LEGACY_TYPE, None).unwrap() else {
            panic!()
        };
        assert_eq!(legacy.type_name(), LEGACY_TYPE);
    }

    #[test]
    fn other_backends_are_refused_naming_the_parameter() {
        for (yaml, field) in [
            (
                "{modelName: m, vllm: {url: 'http://x:8000'}}",
                "plugins[0].parameters.vllm",
            ),
            ("{modelName: m}", "plugins[0].parameters.modelName"),
            (
                "{modelName: m, udsTokenizerConfig: {socketFile: /tmp/s}}",
                "plugins[0].parameters.udsTokenizerConfig",
            ),
            (
                "{estimate: {image: {mode: static}}}",
                "plugins[0].parameters.estimate.image",
            ),
            (
                "{estimate: {video: {}}}",
                "plugins[0].parameters.estimate.video",
            ),
            ("{hf: {}}", "plugins[0].parameters.hf"),
        ] {
            let e = build_with(TYPE, Some(yaml)).err().unwrap();
            assert_eq!(e.field, field, "{yaml}: {e}");
        }
        let e = build_with(TYPE, Some("{vllm: {url: 'http://x:8000'}}"))
            .err()
            .unwrap();
        assert_eq!(
            e.message,
            "the vLLM /render tokenizer backend is not supported by epp; only the tokenizer-free `estimate` backend is (leave `vllm` out)"
        );
    }
}

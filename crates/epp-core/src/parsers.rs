//! Request parsers (`requestHandler.parsers`): which requests the picker reads the body of.
//! As in llm-d-router, each parser claims API paths; a request goes to the parser claiming its
//! path, and a parser claiming none (`passthrough-parser`) takes everything else. Listing stops
//! at the first such fallback. A request no listed parser takes is refused with 400.
//!
//! - `openai-parser` reads OpenAI bodies (`/v1/chat/completions`, `/v1/completions`,
//!   `/v1/embeddings`, `/v1/responses`): the model, the prompt for prefix affinity, `stream`.
//! - `passthrough-parser` reads nothing: the request is routed on backend state alone (load,
//!   queue, KV cache, session), the body goes upstream unchanged.
//!
//! With no `requestHandler`, the parsers are `openai-parser` then `passthrough-parser` (llm-d-router
//! also lists `anthropic-parser` and `vllmhttp-parser`, which epp does not implement: their
//! paths are passed through).

use serde::Deserialize;

use crate::config::{plugin_parameters, ConfigError, EndpointPickerConfig};
use crate::request::ApiMethod;

pub const OPENAI_PARSER: &str = "openai-parser";
pub const PASSTHROUGH_PARSER: &str = "passthrough-parser";

/// Parser types this build implements.
pub const TYPES: &[&str] = &[OPENAI_PARSER, PASSTHROUGH_PARSER];

/// llm-d-router parser types epp does not implement (named in the refusal).
const NOT_IMPLEMENTED: &[&str] = &[
    "anthropic-parser",
    "vllmhttp-parser",
    "vllmgrpc-parser",
    "sglanghttp-parser",
    "vertexai-parser",
];

pub fn is_type(t: &str) -> bool {
    TYPES.contains(&t)
}

/// How one request's body is read.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Parse {
    /// Read it as an OpenAI request.
    OpenAi,
    /// Do not read it.
    Passthrough,
    /// No configured parser takes this path.
    Refuse,
}

/// The resolved parser list.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RequestHandling {
    openai: bool,
    passthrough: bool,
}

impl Default for RequestHandling {
    fn default() -> Self {
        Self {
            openai: true,
            passthrough: true,
        }
    }
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct NoParams {}

impl RequestHandling {
    /// Resolve `requestHandler.parsers` (or the deprecated `parser`). A reference names a
    /// plugin in `plugins`, or a parser type directly (as llm-d-router instantiates it with
    /// defaults).
    pub fn from_config(cfg: &EndpointPickerConfig) -> Result<Self, ConfigError> {
        // Declared parser plugins are validated, wired or not.
        for (i, p) in cfg.plugins.iter().enumerate() {
            if is_type(&p.type_) {
                let _: NoParams = plugin_parameters(p, &format!("plugins[{i}]"))?;
            }
        }
        let refs = cfg.parser_refs();
        if refs.is_empty() {
            return Ok(Self::default());
        }
        let from_rh = cfg
            .request_handler
            .as_ref()
            .is_some_and(|r| !r.parsers.is_empty());
        let mut out = Self {
            openai: false,
            passthrough: false,
        };
        for (i, r) in refs.iter().enumerate() {
            let field = if from_rh {
                format!("requestHandler.parsers[{i}].pluginRef")
            } else {
                "parser.pluginRef".to_string()
            };
            let type_ = match cfg.plugins.iter().find(|p| p.name() == r.plugin_ref) {
                Some(p) => p.type_.as_str(),
                None => r.plugin_ref.as_str(),
            };
            match type_ {
                OPENAI_PARSER => out.openai = true,
                PASSTHROUGH_PARSER => {
                    // The fallback: parsers listed after it are never reached (as llm-d-router).
                    out.passthrough = true;
                    if let Some(next) = refs.get(i + 1) {
                        tracing::warn!(parser = %next.plugin_ref,
                            "parsers listed after passthrough-parser are never used");
                    }
                    break;
                }
                t if NOT_IMPLEMENTED.contains(&t) => {
                    return Err(ConfigError::new(
                        field,
                        format!(
                            "parser type {t:?}: epp does not support it; supported parsers: {}",
                            TYPES.join(", ")
                        ),
                    ))
                }
                t => {
                    let what = if cfg.plugins.iter().any(|p| p.name() == r.plugin_ref) {
                        format!("{:?} is a {t}, not a parser", r.plugin_ref)
                    } else {
                        format!(
                            "no plugin named {:?} in `plugins`, and it is not a parser type",
                            r.plugin_ref
                        )
                    };
                    return Err(ConfigError::new(
                        field,
                        format!("{what}; supported parsers: {}", TYPES.join(", ")),
                    ));
                }
            }
        }
        Ok(out)
    }

    /// Whether requests of `method` have their body read, skipped, or refused.
    pub fn parse_for(&self, method: ApiMethod) -> Parse {
        let claimed = matches!(
            method,
            ApiMethod::ChatCompletions
                | ApiMethod::Completions
                | ApiMethod::Embeddings
                | ApiMethod::Responses
        );
        if claimed && self.openai {
            Parse::OpenAi
        } else if self.passthrough {
            Parse::Passthrough
        } else {
            Parse::Refuse
        }
    }

    /// Whether any request has its body read (false: only backend-state scorers apply).
    pub fn reads_bodies(&self) -> bool {
        self.openai
    }

    pub fn describe(&self) -> String {
        let mut v = Vec::new();
        if self.openai {
            v.push(OPENAI_PARSER);
        }
        if self.passthrough {
            v.push(PASSTHROUGH_PARSER);
        }
        v.join(", ")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load(yaml: &str) -> Result<RequestHandling, ConfigError> {
        let cfg = EndpointPickerConfig::from_yaml(&format!(
            "apiVersion: llm-d.ai/v1alpha1\nkind: EndpointPickerConfig\n{yaml}"
        ))?;
        RequestHandling::from_config(&cfg)
    }

    #[test]
    fn defaults_read_openai_and_pass_the_rest() {
        let h = load("").unwrap();
        assert_eq!(h.parse_for(ApiMethod::ChatCompletions), Parse::OpenAi);
        assert_eq!(h.parse_for(ApiMethod::Other), Parse::Passthrough);
    }

    #[test]
    fn explicit_lists_are_used_as_given() {
        let h = load("plugins:\n- type: openai-parser\nrequestHandler:\n  parsers:\n  - pluginRef: openai-parser\n").unwrap();
        assert_eq!(h.parse_for(ApiMethod::Completions), Parse::OpenAi);
        assert_eq!(h.parse_for(ApiMethod::Other), Parse::Refuse);
        let h = load("plugins:\n- type: passthrough-parser\nrequestHandler:\n  parsers:\n  - pluginRef: passthrough-parser\n").unwrap();
        assert_eq!(h.parse_for(ApiMethod::ChatCompletions), Parse::Passthrough);
        assert!(!h.reads_bodies());
        // The fallback ends the list.
        let h = load("requestHandler:\n  parsers:\n  - pluginRef: passthrough-parser\n  - pluginRef: openai-parser\n").unwrap();
        assert_eq!(h.parse_for(ApiMethod::ChatCompletions), Parse::Passthrough);
        // The deprecated spelling.
        let h = load("parser:\n  pluginRef: passthrough-parser\n").unwrap();
        assert_eq!(h.parse_for(ApiMethod::ChatCompletions), Parse::Passthrough);
    }

    #[test]
    fn unsupported_parsers_are_refused_by_name() {
        let e = load("requestHandler:\n  parsers:\n  - pluginRef: anthropic-parser\n").unwrap_err();
        assert_eq!(e.field, "requestHandler.parsers[0].pluginRef");
        assert_eq!(
            e.message,
            "parser type \"anthropic-parser\": epp does not support it; supported parsers: openai-parser, passthrough-parser"
        );
        let e = load("plugins:\n- type: queue-scorer\nrequestHandler:\n  parsers:\n  - pluginRef: queue-scorer\n").unwrap_err();
        assert!(
            e.message
                .starts_with("\"queue-scorer\" is a queue-scorer, not a parser"),
            "{e}"
        );
        let e = load("plugins:\n- type: openai-parser\n  parameters:\n    x: 1\n").unwrap_err();
        assert_eq!(e.field, "plugins[0].parameters.x");
    }
}

//! The `local` backend of the token producer (an epp extension: llm-d-router's token producer
//! has no in-process tokenizer): a Hugging Face `tokenizer.json` read from disk when the config
//! loads (never downloaded), the prompt tokenized in the picker.
//!
//! What is tokenized is what `epp sim --tokenizer` tokenizes for the same request: a completion's
//! `prompt` (one string) with `add_special_tokens` (default true); a chat's messages rendered by
//! the simulator's template, `{role}\n{content}\n` per message (the text parts of array content)
//! then `assistant\n` (`add_generation_prompt`, default true; `continue_final_message` leaves the
//! last message open instead), with `add_special_tokens` default false. Models' own Jinja chat
//! templates are not rendered: for a real model server's exact chat ids use the `vllm` backend.
//!
//! Long prompts are tokenized on tokio's blocking pool so they do not hold up other requests; a
//! panic inside the tokenizer is caught and counted as a failure.

use std::panic::AssertUnwindSafe;
use std::path::Path;
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use super::{Failure, Reason};
use crate::config::ConfigError;
use crate::request::ParsedRequest;
use crate::tokenization::{HfTokenizer, GENERATION_CUE};

/// Prompts up to this many bytes are tokenized in place; longer ones on the blocking pool.
pub const INLINE_BYTES: usize = 8 * 1024;

/// `parameters.local` of a `token-producer`.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct LocalParams {
    /// Path of the `tokenizer.json` (required).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tokenizer_path: Option<String>,
}

/// A loaded `tokenizer.json` and the chat template.
pub struct LocalTokenizer {
    tokenizer: Arc<HfTokenizer>,
}

impl LocalTokenizer {
    /// Load the file now; errors name `field.tokenizerPath` and the file.
    pub fn new(params: &LocalParams, field: &str) -> Result<Self, ConfigError> {
        let at = format!("{field}.tokenizerPath");
        let path = match params.tokenizer_path.as_deref().map(str::trim) {
            Some(p) if !p.is_empty() => p,
            _ => {
                return Err(ConfigError::new(
                    at,
                    "must be set: the path of a Hugging Face tokenizer.json",
                ))
            }
        };
        let tokenizer =
            HfTokenizer::from_file(Path::new(path)).map_err(|e| ConfigError::new(at, e.0))?;
        Ok(Self {
            tokenizer: Arc::new(tokenizer),
        })
    }

    /// The loaded file (for logs and cache keys).
    pub fn path(&self) -> &Path {
        self.tokenizer.path()
    }

    /// Tokenize one request (a chat when `chat`, else a completion of one prompt).
    pub async fn tokenize(
        &self,
        request: &ParsedRequest,
        chat: bool,
        body: &Map<String, Value>,
    ) -> Result<Vec<u32>, Failure> {
        let (text, add_special_tokens) = text_of(request, chat, body)?;
        if text.len() <= INLINE_BYTES {
            return encode(&self.tokenizer, &text, add_special_tokens);
        }
        let tokenizer = self.tokenizer.clone();
        tokio::task::spawn_blocking(move || encode(&tokenizer, &text, add_special_tokens))
            .await
            .unwrap_or_else(|e| {
                Err(Failure {
                    reason: Reason::TokenizerError,
                    detail: format!("the tokenizer task failed: {e}"),
                })
            })
    }
}

fn encode(
    tokenizer: &HfTokenizer,
    text: &str,
    add_special_tokens: bool,
) -> Result<Vec<u32>, Failure> {
    match std::panic::catch_unwind(AssertUnwindSafe(|| {
        tokenizer.encode(text, add_special_tokens)
    })) {
        Ok(Ok(ids)) => Ok(ids),
        Ok(Err(e)) => Err(Failure {
            reason: Reason::TokenizerError,
            detail: e.0,
        }),
        Err(_) => Err(Failure {
            reason: Reason::TokenizerError,
            detail: "the tokenizer panicked".into(),
        }),
    }
}

fn flag(body: &Map<String, Value>, key: &str) -> Option<bool> {
    body.get(key).and_then(Value::as_bool)
}

/// The text the simulator tokenizes for this request, and its `add_special_tokens`.
fn text_of(
    request: &ParsedRequest,
    chat: bool,
    body: &Map<String, Value>,
) -> Result<(String, bool), Failure> {
    if chat {
        // The picker's rendering of the messages is the template's body: `{role}\n{content}\n`.
        let mut text = String::from_utf8(request.prompt.clone()).map_err(|_| Failure {
            reason: Reason::Unsupported,
            detail: "the rendered messages are not UTF-8".into(),
        })?;
        if flag(body, "continue_final_message") == Some(true) {
            if text.ends_with('\n') {
                text.pop();
            }
        } else if flag(body, "add_generation_prompt") != Some(false) {
            text.push_str(GENERATION_CUE);
        }
        return Ok((text, flag(body, "add_special_tokens").unwrap_or(false)));
    }
    let prompt = match body.get("prompt") {
        Some(Value::String(s)) => s,
        Some(Value::Array(items)) => match items.as_slice() {
            [Value::String(s)] => s,
            _ => {
                return Err(Failure {
                    reason: Reason::Unsupported,
                    detail: "`prompt` is not one string".into(),
                })
            }
        },
        _ => {
            return Err(Failure {
                reason: Reason::Unsupported,
                detail: "no `prompt` string".into(),
            })
        }
    };
    Ok((
        prompt.clone(),
        flag(body, "add_special_tokens").unwrap_or(true),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::request::{parse_body, ApiMethod};

    fn text(method: ApiMethod, body: &str) -> (String, bool) {
        let req = parse_body(method, body.as_bytes()).unwrap();
        let obj = req.body.clone().unwrap();
        text_of(
            &req,
            method == ApiMethod::ChatCompletions,
            obj.as_object().unwrap(),
        )
        .unwrap()
    }

    #[test]
    fn renders_what_the_simulator_renders() {
        let chat = ApiMethod::ChatCompletions;
        assert_eq!(
            text(
                chat,
                r#"{"model":"m","messages":[{"role":"system","content":"S"},{"role":"user","content":[{"type":"text","text":"Q"},{"type":"image_url","image_url":{"url":"x"}}]}]}"#
            ),
            ("system\nS\nuser\nQ\nassistant\n".into(), false)
        );
        assert_eq!(
            text(
                chat,
                r#"{"model":"m","add_generation_prompt":false,"add_special_tokens":true,"messages":[{"role":"user","content":"Q"}]}"#
            ),
            ("user\nQ\n".into(), true)
        );
        assert_eq!(
            text(
                chat,
                r#"{"model":"m","continue_final_message":true,"messages":[{"role":"user","content":"Q"},{"role":"assistant","content":"A"}]}"#
            ),
            ("user\nQ\nassistant\nA".into(), false)
        );
        let completion = ApiMethod::Completions;
        assert_eq!(
            text(completion, r#"{"model":"m","prompt":"P"}"#),
            ("P".into(), true)
        );
        assert_eq!(
            text(
                completion,
                r#"{"model":"m","prompt":["P"],"add_special_tokens":false}"#
            ),
            ("P".into(), false)
        );
    }

    #[test]
    fn a_missing_or_bad_file_is_refused_naming_the_field_and_the_file() {
        let e = LocalTokenizer::new(&LocalParams::default(), "plugins[0].parameters.local")
            .err()
            .unwrap();
        assert_eq!(e.field, "plugins[0].parameters.local.tokenizerPath");
        let e = LocalTokenizer::new(
            &LocalParams {
                tokenizer_path: Some("/nonexistent/tokenizer.json".into()),
            },
            "plugins[0].parameters.local",
        )
        .err()
        .unwrap();
        assert_eq!(e.field, "plugins[0].parameters.local.tokenizerPath");
        assert!(
            e.message
                .starts_with("cannot read /nonexistent/tokenizer.json"),
            "{e}"
        );
    }
}

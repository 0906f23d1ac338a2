//! Request parsing shared by both front-ends: which API operation a path is, and what the
//! scheduler needs from an OpenAI-style body (model, prompt text for prefix hashing, stream).
//! Parsing is strict about shape and precise in its errors, so a client learns which field is wrong.

use serde_json::Value;

/// The API operation, from the request path. A fixed set, so it is safe as a metric label.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ApiMethod {
    ChatCompletions,
    Completions,
    Embeddings,
    Responses,
    Models,
    Other,
}

impl ApiMethod {
    pub fn from_path(path: &str) -> Self {
        let p = path.split('?').next().unwrap_or("").trim_end_matches('/');
        if p.ends_with("/chat/completions") {
            ApiMethod::ChatCompletions
        } else if p.ends_with("/completions") {
            ApiMethod::Completions
        } else if p.ends_with("/embeddings") {
            ApiMethod::Embeddings
        } else if p.ends_with("/responses") {
            ApiMethod::Responses
        } else if p.ends_with("/models") || p.contains("/models/") {
            ApiMethod::Models
        } else {
            ApiMethod::Other
        }
    }

    pub fn as_str(&self) -> &'static str {
        match self {
            ApiMethod::ChatCompletions => "chat_completions",
            ApiMethod::Completions => "completions",
            ApiMethod::Embeddings => "embeddings",
            ApiMethod::Responses => "responses",
            ApiMethod::Models => "models",
            ApiMethod::Other => "other",
        }
    }

    pub const ALL: [ApiMethod; 6] = [
        ApiMethod::ChatCompletions,
        ApiMethod::Completions,
        ApiMethod::Embeddings,
        ApiMethod::Responses,
        ApiMethod::Models,
        ApiMethod::Other,
    ];
}

/// What the scheduler needs to know about one request.
#[derive(Clone, Debug, Default)]
pub struct ParsedRequest {
    /// The `model` of the body (empty for body-less requests).
    pub model: String,
    /// The model to route for: the rewrite header if present, else `model`.
    pub target_model: String,
    /// Bytes the prefix index hashes: the prompt text, or the rendered chat messages.
    pub prompt: Vec<u8>,
    /// `"stream": true` in the body.
    pub stream: bool,
    /// The parsed body, kept for front-ends that rewrite it.
    pub body: Option<Value>,
}

/// A request the picker refuses to route, with the HTTP status the client gets.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct BadRequest {
    pub message: String,
    pub param: Option<String>,
}

impl BadRequest {
    fn new(message: impl Into<String>, param: Option<&str>) -> Self {
        Self {
            message: message.into(),
            param: param.map(str::to_string),
        }
    }
}

/// Parse an OpenAI-style body. An empty body is allowed (header-only requests) and yields an
/// empty prompt; a non-empty body must be a JSON object with a string `model`.
pub fn parse_body(method: ApiMethod, body: &[u8]) -> Result<ParsedRequest, BadRequest> {
    parse_body_or(method, body, None)
}

/// As [`parse_body`], with the model to assume when the body names none (as vLLM does when it
/// serves exactly one model). The body is not changed.
pub fn parse_body_or(
    method: ApiMethod,
    body: &[u8],
    default_model: Option<&str>,
) -> Result<ParsedRequest, BadRequest> {
    if body.iter().all(|b| b.is_ascii_whitespace()) {
        return Ok(ParsedRequest::default());
    }
    let value: Value = serde_json::from_slice(body)
        .map_err(|e| BadRequest::new(format!("request body is not valid JSON: {e}"), None))?;
    let obj = value
        .as_object()
        .ok_or_else(|| BadRequest::new("request body must be a JSON object", None))?;
    let model = match obj.get("model") {
        None | Some(Value::Null) if default_model.is_some() => {
            default_model.unwrap_or_default().to_string()
        }
        None | Some(Value::Null) => {
            return Err(BadRequest::new(
                "missing required field `model`",
                Some("model"),
            ))
        }
        Some(Value::String(s)) if s.is_empty() => {
            return Err(BadRequest::new(
                "field `model` must not be empty",
                Some("model"),
            ))
        }
        Some(Value::String(s)) => s.clone(),
        Some(_) => {
            return Err(BadRequest::new(
                "field `model` must be a string",
                Some("model"),
            ))
        }
    };
    let stream = match obj.get("stream") {
        None | Some(Value::Null) => false,
        Some(Value::Bool(b)) => *b,
        Some(_) => {
            return Err(BadRequest::new(
                "field `stream` must be a boolean",
                Some("stream"),
            ))
        }
    };
    let mut prompt = Vec::new();
    match method {
        ApiMethod::ChatCompletions => match obj.get("messages") {
            Some(Value::Array(msgs)) => render_messages(msgs, &mut prompt)?,
            Some(_) => {
                return Err(BadRequest::new(
                    "field `messages` must be an array",
                    Some("messages"),
                ))
            }
            None => {
                return Err(BadRequest::new(
                    "missing required field `messages`",
                    Some("messages"),
                ))
            }
        },
        ApiMethod::Completions => match obj.get("prompt") {
            Some(p) => render_prompt(p, &mut prompt)?,
            None => {
                return Err(BadRequest::new(
                    "missing required field `prompt`",
                    Some("prompt"),
                ))
            }
        },
        _ => {
            // Embeddings/responses/others: hash whatever textual input there is.
            if let Some(p) = obj.get("input").or_else(|| obj.get("prompt")) {
                let _ = render_prompt(p, &mut prompt);
            }
        }
    }
    Ok(ParsedRequest {
        target_model: model.clone(),
        model,
        prompt,
        stream,
        body: Some(value),
    })
}

fn render_prompt(p: &Value, out: &mut Vec<u8>) -> Result<(), BadRequest> {
    match p {
        Value::String(s) => out.extend_from_slice(s.as_bytes()),
        Value::Array(items) => {
            for item in items {
                match item {
                    Value::String(s) => out.extend_from_slice(s.as_bytes()),
                    // Token-id prompts: hash their decimal form so equal prefixes still match.
                    Value::Number(n) => {
                        out.extend_from_slice(n.to_string().as_bytes());
                        out.push(b' ');
                    }
                    Value::Array(_) => render_prompt(item, out)?,
                    _ => {
                        return Err(BadRequest::new(
                            "field `prompt` must be a string, an array of strings, or token ids",
                            Some("prompt"),
                        ))
                    }
                }
            }
        }
        _ => {
            return Err(BadRequest::new(
                "field `prompt` must be a string, an array of strings, or token ids",
                Some("prompt"),
            ))
        }
    }
    Ok(())
}

/// Chat messages rendered as `role\ncontent\n` per message: prefix-preserving, cheap, and
/// independent of JSON key order or whitespace.
fn render_messages(msgs: &[Value], out: &mut Vec<u8>) -> Result<(), BadRequest> {
    for (i, m) in msgs.iter().enumerate() {
        let obj = m.as_object().ok_or_else(|| {
            BadRequest::new(format!("messages[{i}] must be an object"), Some("messages"))
        })?;
        let role = obj.get("role").and_then(Value::as_str).ok_or_else(|| {
            BadRequest::new(
                format!("messages[{i}].role must be a string"),
                Some("messages"),
            )
        })?;
        out.extend_from_slice(role.as_bytes());
        out.push(b'\n');
        match obj.get("content") {
            Some(Value::String(s)) => out.extend_from_slice(s.as_bytes()),
            Some(Value::Array(parts)) => {
                for part in parts {
                    if let Some(t) = part.get("text").and_then(Value::as_str) {
                        out.extend_from_slice(t.as_bytes());
                    }
                }
            }
            None | Some(Value::Null) => {}
            Some(_) => {
                return Err(BadRequest::new(
                    format!("messages[{i}].content must be a string or an array of parts"),
                    Some("messages"),
                ))
            }
        }
        out.push(b'\n');
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn methods_from_paths() {
        assert_eq!(
            ApiMethod::from_path("/v1/chat/completions"),
            ApiMethod::ChatCompletions
        );
        assert_eq!(
            ApiMethod::from_path("/v1/completions?x=1"),
            ApiMethod::Completions
        );
        assert_eq!(ApiMethod::from_path("/v1/models"), ApiMethod::Models);
        assert_eq!(
            ApiMethod::from_path("/v1/embeddings"),
            ApiMethod::Embeddings
        );
        assert_eq!(ApiMethod::from_path("/foo"), ApiMethod::Other);
    }

    #[test]
    fn parses_chat_and_completion() {
        let r = parse_body(
            ApiMethod::ChatCompletions,
            br#"{"model":"m","stream":true,"messages":[{"role":"system","content":"S"},{"role":"user","content":[{"type":"text","text":"Q"}]}]}"#,
        )
        .unwrap();
        assert_eq!(r.model, "m");
        assert!(r.stream);
        assert_eq!(r.prompt, b"system\nS\nuser\nQ\n");
        let r = parse_body(ApiMethod::Completions, br#"{"model":"m","prompt":"hello"}"#).unwrap();
        assert_eq!(r.prompt, b"hello");
        assert!(!r.stream);
    }

    #[test]
    fn precise_errors() {
        let e = parse_body(ApiMethod::Completions, b"{not json").unwrap_err();
        assert!(e.message.contains("not valid JSON"), "{e}");
        let e = parse_body(ApiMethod::Completions, br#"{"prompt":"x"}"#).unwrap_err();
        assert_eq!(e.param.as_deref(), Some("model"));
        let e = parse_body(ApiMethod::Completions, br#"{"model":3,"prompt":"x"}"#).unwrap_err();
        assert_eq!(e.message, "field `model` must be a string");
        let e = parse_body(ApiMethod::ChatCompletions, br#"{"model":"m"}"#).unwrap_err();
        assert_eq!(e.param.as_deref(), Some("messages"));
        let e = parse_body(ApiMethod::Completions, br#"[1,2]"#).unwrap_err();
        assert_eq!(e.message, "request body must be a JSON object");
        let e = parse_body(
            ApiMethod::Completions,
            br#"{"model":"m","prompt":"x","stream":"yes"}"#,
        )
        .unwrap_err();
        assert_eq!(e.param.as_deref(), Some("stream"));
        assert!(parse_body(ApiMethod::Completions, b"")
            .unwrap()
            .model
            .is_empty());
    }
}

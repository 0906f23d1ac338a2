//! The `vllm` backend of the token producer, as llm-d-router's: the request body, with `model`
//! set to `modelName`, is POSTed to vLLM's render API (`/v1/completions/render` answers a list
//! of `GenerateRequest`s, `/v1/chat/completions/render` one), served by `vllm serve`, by a
//! GPU-less `vllm launch render` sidecar, or by `epp sim`, and the answer's `token_ids` are the
//! prompt's tokens. Plain HTTP/1.1 only (llm-d does not do TLS here either), one deadline per
//! request covering connect, send and read, and a bounded response body.

use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use serde::Deserialize;
use serde_json::{Map, Value};

use super::{Failure, Reason};
use crate::config::ConfigError;

/// `vllm.url` when unset (llm-d's default: a render sidecar in the picker's pod).
pub const DEFAULT_URL: &str = "http://localhost:8000";
/// `vllm.timeout` when unset: the deadline of a text-only render.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(5);
/// `vllm.mmTimeout` when unset: the deadline of a render with content parts (images...).
pub const DEFAULT_MM_TIMEOUT: Duration = Duration::from_secs(30);
/// Largest render answer read; a longer one is a failure (`too_large`).
pub const MAX_RESPONSE_BYTES: usize = 16 * 1024 * 1024;
/// How much of a non-2xx answer goes into the log line.
const ERROR_SNIPPET_BYTES: usize = 256;

const COMPLETIONS_RENDER_PATH: &str = "/v1/completions/render";
const CHAT_RENDER_PATH: &str = "/v1/chat/completions/render";

/// `parameters.vllm` of a `token-producer`.
#[derive(Clone, Debug, Default, Deserialize, serde::Serialize, PartialEq)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct VllmParams {
    /// Base URL of the render endpoints (`http://host:port`, no trailing slash needed).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub url: Option<String>,
    /// Deadline of a text-only render (Go-style duration, e.g. `5s`, `500ms`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout: Option<String>,
    /// Deadline of a chat render whose messages carry content parts (multimodal).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mm_timeout: Option<String>,
}

/// The subset of vLLM's `GenerateRequest` read from a render answer.
#[derive(Deserialize)]
struct Rendered {
    token_ids: Vec<u32>,
}

type HttpClient = Client<HttpConnector, Full<Bytes>>;

/// A configured render client.
pub struct VllmRenderer {
    client: HttpClient,
    base: String,
    completions: http::Uri,
    chat: http::Uri,
    model: String,
    timeout: Duration,
    mm_timeout: Duration,
}

fn duration(
    field: &str,
    name: &str,
    v: Option<&str>,
    default: Duration,
) -> Result<Duration, ConfigError> {
    let Some(v) = v else {
        return Ok(default);
    };
    let d = humantime::parse_duration(v).map_err(|e| {
        ConfigError::new(
            format!("{field}.{name}"),
            format!("{v:?} is not a duration (e.g. 5s, 500ms): {e}"),
        )
    })?;
    if d.is_zero() {
        return Err(ConfigError::new(
            format!("{field}.{name}"),
            "must be greater than 0",
        ));
    }
    Ok(d)
}

impl VllmRenderer {
    /// Validate `params` (`field` is `plugins[i].parameters.vllm`, for errors).
    pub fn new(model: &str, params: &VllmParams, field: &str) -> Result<Self, ConfigError> {
        let url = params.url.as_deref().unwrap_or(DEFAULT_URL);
        let base = url.trim_end_matches('/').to_string();
        let at_url = || format!("{field}.url");
        let parsed: http::Uri = base
            .parse()
            .map_err(|e| ConfigError::new(at_url(), format!("{url:?} is not a URL: {e}")))?;
        match parsed.scheme_str() {
            Some("http") => {}
            Some("https") => {
                return Err(ConfigError::new(
                    at_url(),
                    format!("{url:?}: TLS is not supported by the vLLM render backend (as in llm-d); use an http:// URL"),
                ))
            }
            _ => {
                return Err(ConfigError::new(
                    at_url(),
                    format!("{url:?} must be an http://host:port URL"),
                ))
            }
        }
        if parsed.host().is_none_or(str::is_empty) {
            return Err(ConfigError::new(at_url(), format!("{url:?} has no host")));
        }
        if parsed.query().is_some() {
            return Err(ConfigError::new(
                at_url(),
                format!("{url:?} must not have a query"),
            ));
        }
        let uri = |path: &str| -> Result<http::Uri, ConfigError> {
            format!("{base}{path}")
                .parse()
                .map_err(|e| ConfigError::new(at_url(), format!("{url:?}: {e}")))
        };
        let mut conn = HttpConnector::new();
        conn.set_nodelay(true);
        let client = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(90))
            .pool_max_idle_per_host(16)
            .build(conn);
        Ok(Self {
            client,
            completions: uri(COMPLETIONS_RENDER_PATH)?,
            chat: uri(CHAT_RENDER_PATH)?,
            base,
            model: model.to_string(),
            timeout: duration(field, "timeout", params.timeout.as_deref(), DEFAULT_TIMEOUT)?,
            mm_timeout: duration(
                field,
                "mmTimeout",
                params.mm_timeout.as_deref(),
                DEFAULT_MM_TIMEOUT,
            )?,
        })
    }

    /// The base URL (for logs).
    pub fn base(&self) -> &str {
        &self.base
    }

    /// The deadlines: (text-only, with content parts).
    pub fn timeouts(&self) -> (Duration, Duration) {
        (self.timeout, self.mm_timeout)
    }

    /// The deadline of one render: `mmTimeout` when a chat message has array content (parts
    /// may need media fetched and processed), as llm-d decides.
    fn deadline(&self, chat: bool, body: &Map<String, Value>) -> Duration {
        let parts = chat
            && body
                .get("messages")
                .and_then(Value::as_array)
                .is_some_and(|msgs| {
                    msgs.iter().any(|m| {
                        m.get("content")
                            .and_then(Value::as_array)
                            .is_some_and(|p| !p.is_empty())
                    })
                });
        if parts {
            self.mm_timeout
        } else {
            self.timeout
        }
    }

    /// Render one request body (a completion when `chat` is false). The body goes as it came,
    /// with `model` replaced by `modelName` (`vllm launch render` serves the base model name).
    pub async fn render(&self, chat: bool, body: &Map<String, Value>) -> Result<Vec<u32>, Failure> {
        let deadline = self.deadline(chat, body);
        let payload = Stamped {
            model: &self.model,
            body,
        };
        let bytes = serde_json::to_vec(&payload).map_err(|e| Failure {
            reason: Reason::Unsupported,
            detail: format!("cannot encode the request: {e}"),
        })?;
        let uri = if chat { &self.chat } else { &self.completions };
        let req = http::Request::post(uri.clone())
            .header(http::header::CONTENT_TYPE, "application/json")
            .header(http::header::ACCEPT, "application/json")
            .body(Full::new(Bytes::from(bytes)))
            .map_err(|e| Failure {
                reason: Reason::Unreachable,
                detail: format!("cannot build the request: {e}"),
            })?;
        let exchange = async {
            let resp = self.client.request(req).await.map_err(|e| Failure {
                reason: Reason::Unreachable,
                detail: format!("POST {uri}: {}", error_chain(&e)),
            })?;
            let status = resp.status();
            let body = Limited::new(resp.into_body(), MAX_RESPONSE_BYTES)
                .collect()
                .await
                .map_err(|e| {
                    if e.downcast_ref::<http_body_util::LengthLimitError>()
                        .is_some()
                    {
                        Failure {
                            reason: Reason::TooLarge,
                            detail: format!(
                                "POST {uri}: answer larger than {MAX_RESPONSE_BYTES} bytes"
                            ),
                        }
                    } else {
                        Failure {
                            reason: Reason::Unreachable,
                            detail: format!("POST {uri}: reading the answer: {e}"),
                        }
                    }
                })?
                .to_bytes();
            Ok::<_, Failure>((status, body))
        };
        let (status, body) = tokio::time::timeout(deadline, exchange)
            .await
            .map_err(|_| Failure {
                reason: Reason::Timeout,
                detail: format!("POST {uri}: no answer within {deadline:?}"),
            })??;
        if !status.is_success() {
            let end = body.len().min(ERROR_SNIPPET_BYTES);
            return Err(Failure {
                reason: Reason::Status,
                detail: format!(
                    "POST {uri}: status {}: {}",
                    status.as_u16(),
                    String::from_utf8_lossy(&body[..end])
                ),
            });
        }
        let invalid = |e: String| Failure {
            reason: Reason::InvalidResponse,
            detail: format!("POST {uri}: {e}"),
        };
        if chat {
            serde_json::from_slice::<Rendered>(&body)
                .map(|r| r.token_ids)
                .map_err(|e| invalid(format!("not a render answer: {e}")))
        } else {
            let mut list = serde_json::from_slice::<Vec<Rendered>>(&body)
                .map_err(|e| invalid(format!("not a list of render answers: {e}")))?;
            if list.len() != 1 {
                return Err(invalid(format!(
                    "expected the render of 1 prompt, got {}",
                    list.len()
                )));
            }
            Ok(list.swap_remove(0).token_ids)
        }
    }
}

/// A body with `model` replaced, serialized without copying the body.
struct Stamped<'a> {
    model: &'a str,
    body: &'a Map<String, Value>,
}

impl serde::Serialize for Stamped<'_> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        let mut m = s.serialize_map(None)?;
        m.serialize_entry("model", self.model)?;
        for (k, v) in self.body {
            if k != "model" {
                m.serialize_entry(k, v)?;
            }
        }
        m.end()
    }
}

/// An error and its causes, `: `-joined (hyper's top-level message alone says little).
fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut out = e.to_string();
    let mut cur = e.source();
    while let Some(s) = cur {
        out.push_str(": ");
        out.push_str(&s.to_string());
        cur = s.source();
    }
    out
}

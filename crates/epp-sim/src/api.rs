//! The HTTP surface, as vLLM's OpenAI-compatible server exposes it: request parsing and
//! validation, OpenAI-shaped responses (JSON and SSE), the probe endpoints, the admin API, and
//! the mapping of every failure to an OpenAI-style JSON error. Nothing here panics on input.

use std::convert::Infallible;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use axum::body::{Body, Bytes};
use axum::extract::{Request, State};
use axum::http::{header, HeaderValue, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use futures_util::StreamExt;
use serde_json::{json, Map, Value};
use tokio::sync::mpsc;
use tokio::time::Instant;

use crate::config::SimConfig;
use crate::engine::{Engine, Event, Job, ReleaseError, RunPhase, Usage};
use crate::faults::{FaultHandle, FaultsPatch};
use crate::latency::ms_to_duration;
use crate::metrics;
use crate::pd::{self, Phase, Role};
use crate::tokenizer::{self, ChatMessage, Tokenizer};

/// Response header naming the server.
pub const POD_HEADER: &str = "x-inference-pod";
/// Response header carrying the server's port.
pub const PORT_HEADER: &str = "x-inference-port";
/// Response header carrying the engine's data-parallel rank (0 without data parallelism).
pub const DP_RANK_HEADER: &str = "x-data-parallel-rank";

/// Bodies above the limit are drained up to this many bytes before the 413 is sent, so the
/// client reads the answer instead of a connection reset.
const MAX_DRAIN_BYTES: usize = 64 * 1024 * 1024;

/// An OpenAI-style error: `{"error": {"message", "type", "param", "code"}}`.
#[derive(Debug, Clone)]
pub struct ApiError {
    pub status: StatusCode,
    pub message: String,
    pub param: Option<&'static str>,
    pub code: &'static str,
}

impl ApiError {
    fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            message: message.into(),
            param: None,
            code,
        }
    }

    fn bad(code: &'static str, param: &'static str, message: impl Into<String>) -> Self {
        Self {
            param: Some(param),
            ..Self::new(StatusCode::BAD_REQUEST, code, message)
        }
    }

    fn kind(&self) -> &'static str {
        match self.status.as_u16() {
            404 => "not_found_error",
            429 => "rate_limit_error",
            500..=599 => "server_error",
            _ => "invalid_request_error",
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = json!({
            "error": {
                "message": self.message,
                "type": self.kind(),
                "param": self.param,
                "code": self.code,
            }
        });
        (self.status, axum::Json(body)).into_response()
    }
}

/// Shared state of one server's handlers.
pub(crate) struct App {
    pub cfg: SimConfig,
    pub engine: Arc<Engine>,
    pub faults: FaultHandle,
    pub lora_names: Vec<String>,
    pub created: u64,
    pub next_id: AtomicU64,
    pub tokenizer: Tokenizer,
    /// `remote_host` and `remote_port` of this server's prefill answers.
    pub transfer_host: String,
    pub port: u16,
}

type AppState = Arc<App>;

/// Build the router. `app.port` is the bound port, sent in `x-inference-port`.
pub(crate) fn router(app: AppState) -> Router {
    let pod = HeaderValue::from_str(&app.cfg.name).unwrap_or(HeaderValue::from_static("sim"));
    let port = HeaderValue::from(app.port);
    let rank = HeaderValue::from(app.cfg.data_parallel_rank);
    Router::new()
        .route("/v1/completions", post(completions))
        .route("/v1/chat/completions", post(chat_completions))
        .route("/v1/completions/render", post(completions_render))
        .route("/v1/chat/completions/render", post(chat_completions_render))
        .route("/tokenize", post(tokenize))
        .route("/v1/models", get(models))
        .route("/version", get(version))
        .route("/health", get(health))
        .route("/metrics", get(metrics_handler))
        .route("/reset_prefix_cache", post(reset_prefix_cache))
        .route(pd::RELEASE_PATH, post(kv_transfer_release))
        .route(
            "/admin/faults",
            get(get_faults).put(put_faults).post(put_faults),
        )
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .with_state(app)
        .layer(axum::middleware::map_response(move |mut res: Response| {
            let pod = pod.clone();
            let port = port.clone();
            let rank = rank.clone();
            async move {
                res.headers_mut().insert(POD_HEADER, pod);
                res.headers_mut().insert(PORT_HEADER, port);
                res.headers_mut().insert(DP_RANK_HEADER, rank);
                res
            }
        }))
}

fn now_unix() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

async fn not_found(method: Method, uri: Uri) -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        "not_found",
        format!("no route for {method} {}", uri.path()),
    )
}

async fn method_not_allowed(method: Method, uri: Uri) -> ApiError {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
        format!("method {method} is not allowed on {}", uri.path()),
    )
}

async fn version() -> Response {
    axum::Json(json!({
        "version": env!("CARGO_PKG_VERSION"),
        "server": "epp-sim",
    }))
    .into_response()
}

async fn health(State(app): State<AppState>) -> Response {
    if app.faults.get().unhealthy {
        ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "unhealthy",
            "the server is marked unhealthy (fault injection)",
        )
        .into_response()
    } else {
        StatusCode::OK.into_response()
    }
}

async fn metrics_handler(State(app): State<AppState>) -> Response {
    (
        [(header::CONTENT_TYPE, metrics::CONTENT_TYPE)],
        app.engine.render_metrics(),
    )
        .into_response()
}

async fn models(State(app): State<AppState>) -> Response {
    let cfg = &app.cfg;
    let mut data = vec![json!({
        "id": cfg.model,
        "object": "model",
        "created": app.created,
        "owned_by": "vllm",
        "root": cfg.model,
        "parent": null,
        "max_model_len": cfg.max_model_len,
        "permission": [],
    })];
    for m in &cfg.lora_modules {
        let (name, path) = m.split_once('=').unwrap_or((m, m));
        data.push(json!({
            "id": name,
            "object": "model",
            "created": app.created,
            "owned_by": "vllm",
            "root": path,
            "parent": cfg.model,
            "max_model_len": cfg.max_model_len,
            "permission": [],
        }));
    }
    axum::Json(json!({"object": "list", "data": data})).into_response()
}

async fn get_faults(State(app): State<AppState>) -> Response {
    axum::Json(app.faults.view()).into_response()
}

/// vLLM's `POST /reset_prefix_cache`: drop every cached block (reported as `AllBlocksCleared`
/// on the KV-event stream). 409 while running requests hold blocks, as vLLM refuses then too.
async fn reset_prefix_cache(State(app): State<AppState>) -> Response {
    match app.engine.reset_prefix_cache() {
        Ok(()) => {
            tracing::info!(server = %app.cfg.name, "prefix cache reset");
            StatusCode::OK.into_response()
        }
        Err(in_use) => ApiError::new(
            StatusCode::CONFLICT,
            "cache_in_use",
            format!("cannot reset the prefix cache: {in_use} blocks are held by running requests or for P/D transfer"),
        )
        .into_response(),
    }
}

/// The sim-only P/D read-and-release (see [`crate::pd`]): `{"request_id", "engine_id"?}` →
/// `{"request_id", "released_blocks"}`; 404 when nothing is held under that id, 409 when
/// `engine_id` is another engine's.
async fn kv_transfer_release(State(app): State<AppState>, req: Request) -> Response {
    release_inner(&app, req)
        .await
        .unwrap_or_else(IntoResponse::into_response)
}

async fn release_inner(app: &App, req: Request) -> Result<Response, ApiError> {
    let body = read_body(req.into_body(), app.cfg.max_body_bytes).await?;
    let obj = parse_object(&body)?;
    let request_id = match opt(&obj, "request_id") {
        Some(Value::String(s)) => s.clone(),
        None => {
            return Err(ApiError::bad(
                "missing_field",
                "request_id",
                "missing required field `request_id`",
            ))
        }
        Some(v) => {
            return Err(ApiError::bad(
                "invalid_type",
                "request_id",
                format!("`request_id` must be a string, got {}", type_name(v)),
            ))
        }
    };
    let engine_id = match opt(&obj, "engine_id") {
        None => None,
        Some(Value::String(s)) => Some(s.as_str()),
        Some(v) => {
            return Err(ApiError::bad(
                "invalid_type",
                "engine_id",
                format!("`engine_id` must be a string, got {}", type_name(v)),
            ))
        }
    };
    match app.engine.release_hold(&request_id, engine_id) {
        Ok(blocks) => {
            tracing::debug!(server = %app.cfg.name, request_id, blocks, "KV blocks read and released");
            Ok(
                axum::Json(json!({"request_id": request_id, "released_blocks": blocks}))
                    .into_response(),
            )
        }
        Err(e @ ReleaseError::UnknownRequest(_)) => Err(ApiError {
            param: Some("request_id"),
            ..ApiError::new(StatusCode::NOT_FOUND, "unknown_request", e.to_string())
        }),
        Err(e @ ReleaseError::EngineMismatch { .. }) => Err(ApiError {
            param: Some("engine_id"),
            ..ApiError::new(StatusCode::CONFLICT, "engine_mismatch", e.to_string())
        }),
    }
}

async fn put_faults(State(app): State<AppState>, req: Request) -> Response {
    let body = match read_body(req.into_body(), app.cfg.max_body_bytes).await {
        Ok(b) => b,
        Err(e) => return e.into_response(),
    };
    let patch: FaultsPatch = match serde_json::from_slice(&body) {
        Ok(p) => p,
        Err(e) => {
            return ApiError::new(
                StatusCode::BAD_REQUEST,
                "invalid_faults",
                format!("invalid faults JSON: {e}"),
            )
            .into_response()
        }
    };
    match app.faults.apply(&patch) {
        Ok(view) => {
            tracing::info!(server = %app.cfg.name, faults = ?view, "faults changed");
            axum::Json(view).into_response()
        }
        Err(e) => ApiError {
            param: Some(e.field),
            ..ApiError::new(StatusCode::BAD_REQUEST, "invalid_faults", e.to_string())
        }
        .into_response(),
    }
}

/// Read the whole body, refusing more than `limit` bytes with 413.
async fn read_body(body: Body, limit: usize) -> Result<Bytes, ApiError> {
    let mut stream = body.into_data_stream();
    let mut buf: Vec<u8> = Vec::new();
    let mut total = 0usize;
    let mut too_large = false;
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(|e| {
            ApiError::new(
                StatusCode::BAD_REQUEST,
                "body_read_error",
                format!("could not read the request body: {e}"),
            )
        })?;
        total += chunk.len();
        if total > limit {
            too_large = true;
            buf = Vec::new();
            if total > MAX_DRAIN_BYTES {
                break;
            }
            continue;
        }
        buf.extend_from_slice(&chunk);
    }
    if too_large {
        return Err(ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "payload_too_large",
            format!("request body exceeds the limit of {limit} bytes"),
        ));
    }
    Ok(Bytes::from(buf))
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    Completion,
    Chat,
}

async fn completions(State(app): State<AppState>, req: Request) -> Response {
    inference(app, Kind::Completion, req)
        .await
        .unwrap_or_else(IntoResponse::into_response)
}

async fn chat_completions(State(app): State<AppState>, req: Request) -> Response {
    inference(app, Kind::Chat, req)
        .await
        .unwrap_or_else(IntoResponse::into_response)
}

/// A validated inference request.
struct Parsed {
    model: String,
    lora: Option<String>,
    prompt: String,
    /// vLLM's `add_special_tokens` (completions: on by default; chat: off, the template adds them).
    add_special_tokens: bool,
    max_tokens: Option<u64>,
    stream: bool,
    include_usage: bool,
    /// The P/D phase `kv_transfer_params` asks for.
    phase: Phase,
    /// What a render answer echoes back.
    echo: Echo,
}

/// Request fields the render endpoints copy into their answer (vLLM's `GenerateRequest`).
#[derive(Default)]
struct Echo {
    stream_options: Option<Value>,
    cache_salt: Option<String>,
    priority: i64,
    /// Sampling fields as given (the simulator does not sample).
    sampling: Map<String, Value>,
    kv_transfer_params: Option<Value>,
}

/// Sampling fields a render answer's `sampling_params` repeats when the request sets them.
const SAMPLING_FIELDS: [&str; 10] = [
    "temperature",
    "top_p",
    "top_k",
    "min_p",
    "seed",
    "stop",
    "presence_penalty",
    "frequency_penalty",
    "repetition_penalty",
    "ignore_eos",
];

fn type_name(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "boolean",
        Value::Number(_) => "number",
        Value::String(_) => "string",
        Value::Array(_) => "array",
        Value::Object(_) => "object",
    }
}

/// A field that may be absent or null.
fn opt<'a>(obj: &'a Map<String, Value>, key: &str) -> Option<&'a Value> {
    obj.get(key).filter(|v| !v.is_null())
}

fn opt_bool(obj: &Map<String, Value>, key: &'static str) -> Result<Option<bool>, ApiError> {
    match opt(obj, key) {
        None => Ok(None),
        Some(Value::Bool(b)) => Ok(Some(*b)),
        Some(v) => Err(ApiError::bad(
            "invalid_type",
            key,
            format!("`{key}` must be a boolean, got {}", type_name(v)),
        )),
    }
}

fn opt_u64(obj: &Map<String, Value>, key: &'static str) -> Result<Option<u64>, ApiError> {
    match opt(obj, key) {
        None => Ok(None),
        Some(v) => v.as_u64().map(Some).ok_or_else(|| {
            ApiError::bad(
                "invalid_type",
                key,
                format!(
                    "`{key}` must be a non-negative integer, got {}",
                    match v {
                        Value::Number(n) => n.to_string(),
                        other => type_name(other).to_string(),
                    }
                ),
            )
        }),
    }
}

/// The body as a JSON object, or the 400 that says why it is not one.
fn parse_object(body: &[u8]) -> Result<Map<String, Value>, ApiError> {
    let value: Value = serde_json::from_slice(body).map_err(|e| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid_json",
            format!("the request body is not valid JSON: {e}"),
        )
    })?;
    match value {
        Value::Object(obj) => Ok(obj),
        other => Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid_json",
            format!(
                "the request body must be a JSON object, got {}",
                type_name(&other)
            ),
        )),
    }
}

fn parse_model(obj: &Map<String, Value>) -> Result<String, ApiError> {
    match opt(obj, "model") {
        None => Ok(String::new()),
        Some(Value::String(s)) => Ok(s.clone()),
        Some(v) => Err(ApiError::bad(
            "invalid_type",
            "model",
            format!("`model` must be a string, got {}", type_name(v)),
        )),
    }
}

/// A chat request's rendered prompt, with vLLM's `add_generation_prompt` (default on) and
/// `continue_final_message` (default off; both on is refused, as vLLM does).
fn render_chat_request(obj: &Map<String, Value>) -> Result<String, ApiError> {
    let messages = parse_messages(obj)?;
    let add_generation_prompt = opt_bool(obj, "add_generation_prompt")?;
    let continue_final_message = opt_bool(obj, "continue_final_message")?.unwrap_or(false);
    if continue_final_message && add_generation_prompt == Some(true) {
        return Err(ApiError::bad(
            "invalid_value",
            "continue_final_message",
            "Cannot set both `continue_final_message` and `add_generation_prompt` to True.",
        ));
    }
    Ok(tokenizer::render_chat_with(
        &messages,
        add_generation_prompt.unwrap_or(true),
        continue_final_message,
    ))
}

fn parse_request(body: &[u8], kind: Kind) -> Result<Parsed, ApiError> {
    let obj = parse_object(body)?;
    let model = parse_model(&obj)?;
    let stream = opt_bool(&obj, "stream")?.unwrap_or(false);
    let include_usage = match opt(&obj, "stream_options") {
        None => false,
        Some(Value::Object(o)) => opt_bool(o, "include_usage")?.unwrap_or(false),
        Some(v) => {
            return Err(ApiError::bad(
                "invalid_type",
                "stream_options",
                format!("`stream_options` must be an object, got {}", type_name(v)),
            ))
        }
    };
    if let Some(n) = opt_u64(&obj, "n")? {
        if n != 1 {
            return Err(ApiError::bad(
                "unsupported",
                "n",
                "the simulator supports only n = 1",
            ));
        }
    }
    let max_tokens = match kind {
        Kind::Completion => opt_u64(&obj, "max_tokens")?,
        Kind::Chat => match opt_u64(&obj, "max_completion_tokens")? {
            Some(v) => Some(v),
            None => opt_u64(&obj, "max_tokens")?,
        },
    };
    let prompt = match kind {
        Kind::Completion => parse_prompt(&obj)?,
        Kind::Chat => render_chat_request(&obj)?,
    };
    let add_special_tokens =
        opt_bool(&obj, "add_special_tokens")?.unwrap_or(kind == Kind::Completion);
    let cache_salt = match opt(&obj, "cache_salt") {
        None => None,
        Some(Value::String(s)) => Some(s.clone()),
        Some(v) => {
            return Err(ApiError::bad(
                "invalid_type",
                "cache_salt",
                format!("`cache_salt` must be a string, got {}", type_name(v)),
            ))
        }
    };
    let priority = match opt(&obj, "priority") {
        None => 0,
        Some(v) => v.as_i64().ok_or_else(|| {
            ApiError::bad(
                "invalid_type",
                "priority",
                format!("`priority` must be an integer, got {v}"),
            )
        })?,
    };
    let sampling = SAMPLING_FIELDS
        .iter()
        .filter_map(|k| opt(&obj, k).map(|v| (k.to_string(), v.clone())))
        .collect();
    let phase = pd::parse_params(obj.get("kv_transfer_params"))
        .map_err(|e| ApiError::bad("invalid_kv_transfer_params", e.field, e.message))?;
    Ok(Parsed {
        model,
        lora: None,
        prompt,
        add_special_tokens,
        max_tokens,
        stream,
        include_usage,
        phase,
        echo: Echo {
            stream_options: if stream {
                opt(&obj, "stream_options").cloned()
            } else {
                None
            },
            cache_salt,
            priority,
            sampling,
            kv_transfer_params: opt(&obj, "kv_transfer_params").cloned(),
        },
    })
}

fn parse_prompt(obj: &Map<String, Value>) -> Result<String, ApiError> {
    let text = match obj.get("prompt") {
        None | Some(Value::Null) => {
            return Err(ApiError::bad(
                "missing_field",
                "prompt",
                "missing required field `prompt`",
            ))
        }
        Some(Value::String(s)) => s.clone(),
        Some(Value::Array(items)) => match items.as_slice() {
            [Value::String(s)] => s.clone(),
            [] => {
                return Err(ApiError::bad(
                    "invalid_value",
                    "prompt",
                    "`prompt` must not be an empty list",
                ))
            }
            [Value::String(_), ..] => return Err(ApiError::bad(
                "unsupported",
                "prompt",
                "batched prompts (a list of several strings) are not supported by the simulator",
            )),
            [Value::Number(_), ..] | [Value::Array(_), ..] => {
                return Err(ApiError::bad(
                    "unsupported",
                    "prompt",
                    "token-id prompts are not supported by the simulator; send text",
                ))
            }
            [other, ..] => {
                return Err(ApiError::bad(
                    "invalid_type",
                    "prompt",
                    format!(
                        "`prompt` list items must be strings, got {}",
                        type_name(other)
                    ),
                ))
            }
        },
        Some(v) => {
            return Err(ApiError::bad(
                "invalid_type",
                "prompt",
                format!("`prompt` must be a string, got {}", type_name(v)),
            ))
        }
    };
    if text.is_empty() {
        return Err(ApiError::bad(
            "invalid_value",
            "prompt",
            "`prompt` must not be empty",
        ));
    }
    Ok(text)
}

fn parse_messages(obj: &Map<String, Value>) -> Result<Vec<ChatMessage>, ApiError> {
    let items = match obj.get("messages") {
        None | Some(Value::Null) => {
            return Err(ApiError::bad(
                "missing_field",
                "messages",
                "missing required field `messages`",
            ))
        }
        Some(Value::Array(items)) => items,
        Some(v) => {
            return Err(ApiError::bad(
                "invalid_type",
                "messages",
                format!("`messages` must be an array, got {}", type_name(v)),
            ))
        }
    };
    if items.is_empty() {
        return Err(ApiError::bad(
            "invalid_value",
            "messages",
            "`messages` must contain at least one message",
        ));
    }
    let mut out = Vec::with_capacity(items.len());
    for (i, item) in items.iter().enumerate() {
        let Value::Object(m) = item else {
            return Err(ApiError::bad(
                "invalid_type",
                "messages",
                format!("messages[{i}] must be an object, got {}", type_name(item)),
            ));
        };
        let role = match m.get("role") {
            Some(Value::String(r)) if !r.is_empty() => r.clone(),
            Some(Value::String(_)) => {
                return Err(ApiError::bad(
                    "invalid_value",
                    "messages",
                    format!("messages[{i}].role must not be empty"),
                ))
            }
            None | Some(Value::Null) => {
                return Err(ApiError::bad(
                    "missing_field",
                    "messages",
                    format!("messages[{i}] is missing `role`"),
                ))
            }
            Some(v) => {
                return Err(ApiError::bad(
                    "invalid_type",
                    "messages",
                    format!("messages[{i}].role must be a string, got {}", type_name(v)),
                ))
            }
        };
        let content = match m.get("content") {
            None | Some(Value::Null) => String::new(),
            Some(Value::String(s)) => s.clone(),
            Some(Value::Array(parts)) => {
                let mut text = String::new();
                for (j, part) in parts.iter().enumerate() {
                    let Value::Object(p) = part else {
                        return Err(ApiError::bad(
                            "invalid_type",
                            "messages",
                            format!(
                                "messages[{i}].content[{j}] must be an object, got {}",
                                type_name(part)
                            ),
                        ));
                    };
                    // Text parts contribute their text; other parts (images...) nothing.
                    match p.get("text") {
                        None | Some(Value::Null) => {}
                        Some(Value::String(t)) => text.push_str(t),
                        Some(v) => {
                            return Err(ApiError::bad(
                                "invalid_type",
                                "messages",
                                format!(
                                    "messages[{i}].content[{j}].text must be a string, got {}",
                                    type_name(v)
                                ),
                            ))
                        }
                    }
                }
                text
            }
            Some(v) => {
                return Err(ApiError::bad(
                    "invalid_type",
                    "messages",
                    format!(
                        "messages[{i}].content must be a string or an array of parts, got {}",
                        type_name(v)
                    ),
                ))
            }
        };
        out.push(ChatMessage { role, content });
    }
    Ok(out)
}

/// Resolve `model` (empty: the served model; an adapter name: that adapter), or 404.
fn resolve_model(app: &App, model: &mut String) -> Result<Option<String>, ApiError> {
    if model.is_empty() {
        *model = app.cfg.model.clone();
    }
    if *model == app.cfg.model {
        return Ok(None);
    }
    if app.lora_names.contains(model) {
        return Ok(Some(model.clone()));
    }
    Err(ApiError {
        param: Some("model"),
        ..ApiError::new(
            StatusCode::NOT_FOUND,
            "model_not_found",
            format!("The model `{model}` does not exist."),
        )
    })
}

impl App {
    /// The server's token ids of `text`.
    fn tokenize(&self, text: &str, add_special_tokens: bool) -> Result<Vec<u32>, ApiError> {
        self.tokenizer
            .encode(text, add_special_tokens)
            .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "tokenizer_error", e.0))
    }
}

/// A request that passed every check: its token ids and output length are known.
struct Prepared {
    p: Parsed,
    ids: Vec<u32>,
    max_tokens: usize,
}

/// Parse, resolve the model, tokenize and check the length: everything before the engine, shared
/// by inference and the render endpoints so both see the same ids and the same refusals.
fn prepare(app: &App, kind: Kind, body: &[u8]) -> Result<Prepared, ApiError> {
    let mut p = parse_request(body, kind)?;
    p.lora = resolve_model(app, &mut p.model)?;
    let ids = app.tokenize(&p.prompt, p.add_special_tokens)?;
    let prompt_tokens = ids.len();
    let max_tokens = match p.max_tokens {
        None => app.cfg.default_max_tokens,
        Some(0) => {
            return Err(ApiError::bad(
                "invalid_value",
                if kind == Kind::Chat {
                    "max_completion_tokens"
                } else {
                    "max_tokens"
                },
                "max_tokens must be at least 1",
            ))
        }
        Some(v) => usize::try_from(v).unwrap_or(usize::MAX),
    };
    let total = prompt_tokens.saturating_add(max_tokens);
    if total > app.cfg.max_model_len {
        return Err(ApiError::bad(
            "context_length_exceeded",
            "max_tokens",
            format!(
                "This model's maximum context length is {} tokens. However, you requested {} tokens ({} in the prompt, {} for the completion).",
                app.cfg.max_model_len, total, prompt_tokens, max_tokens
            ),
        ));
    }
    if let Err(e) = app.engine.check_fits(prompt_tokens, max_tokens) {
        return Err(ApiError::bad(
            "kv_cache_too_small",
            "max_tokens",
            e.to_string(),
        ));
    }
    Ok(Prepared { p, ids, max_tokens })
}

async fn inference(app: AppState, kind: Kind, req: Request) -> Result<Response, ApiError> {
    let arrived = Instant::now();
    let body = read_body(req.into_body(), app.cfg.max_body_bytes).await?;

    let faults = app.faults.get();
    if faults.added_latency_ms > 0.0 {
        tokio::time::sleep(ms_to_duration(faults.added_latency_ms)).await;
    }
    if faults.error_rate > 0.0 && app.engine.random() < faults.error_rate {
        let status =
            StatusCode::from_u16(faults.error_status).unwrap_or(StatusCode::SERVICE_UNAVAILABLE);
        return Err(ApiError::new(
            status,
            "injected_fault",
            format!(
                "injected failure (error rate {}) from {}",
                faults.error_rate, app.cfg.name
            ),
        ));
    }

    let Prepared {
        mut p,
        mut ids,
        mut max_tokens,
    } = prepare(&app, kind, &body)?;
    let id = next_request_id(&app, kind);
    let mut transfer = None;
    let phase = match std::mem::take(&mut p.phase) {
        Phase::Whole => RunPhase::Whole,
        Phase::Prefill => {
            if app.cfg.role == Role::Decode {
                return Err(wrong_role(&app, "kv_transfer_params.do_remote_decode"));
            }
            if p.stream {
                return Err(ApiError::bad(
                    "invalid_value",
                    "stream",
                    "a P/D prefill request (`kv_transfer_params.do_remote_decode: true`) cannot be streamed; send `stream: false`",
                ));
            }
            let ticket = app.engine.reserve_hold().map_err(|e| {
                ApiError::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "kv_transfer_full",
                    format!("{}: {e}; retry later", app.cfg.name),
                )
            })?;
            // A prefill computes the prompt and emits one token, whatever it asked for.
            max_tokens = 1;
            transfer = Some(TransferAnswer {
                engine_id: app.engine.engine_id().to_string(),
                host: app.transfer_host.clone(),
                port: app.port,
            });
            RunPhase::Prefill {
                request_id: id.clone(),
                ticket,
            }
        }
        Phase::Decode(remote) => {
            if app.cfg.role == Role::Prefill {
                return Err(wrong_role(&app, "kv_transfer_params.do_remote_prefill"));
            }
            RunPhase::Decode(remote)
        }
    };
    let prompt_tokens = ids.len();
    let hashes =
        tokenizer::block_hashes_of_ids(tokenizer::chain_seed(&p.model), &ids, app.cfg.block_size);
    let token_ids = if app.cfg.kv_events.is_on() {
        ids.truncate(hashes.len() * app.cfg.block_size);
        ids
    } else {
        Vec::new()
    };
    let job = Job {
        hashes,
        token_ids,
        prompt_tokens,
        max_tokens,
        lora: p.lora.clone(),
        arrived,
    };
    let (tx, rx) = mpsc::channel(64);
    tokio::spawn(app.engine.clone().run_phase(job, phase, tx));

    let meta = Meta {
        id,
        created: now_unix(),
        model: p.model,
        kind,
        max_tokens,
        transfer,
    };
    if p.stream {
        Ok(stream_response(meta, rx, p.include_usage))
    } else {
        collect_response(meta, rx).await
    }
}

fn wrong_role(app: &App, param: &'static str) -> ApiError {
    ApiError::bad(
        "wrong_role",
        param,
        format!(
            "{} has the P/D role `{}` and does not serve this phase (`{param}: true`)",
            app.cfg.name, app.cfg.role
        ),
    )
}

fn next_request_id(app: &App, kind: Kind) -> String {
    let n = app.next_id.fetch_add(1, Ordering::Relaxed);
    match kind {
        Kind::Completion => format!("cmpl-{}-{n}", app.cfg.name),
        Kind::Chat => format!("chatcmpl-{}-{n}", app.cfg.name),
    }
}

async fn completions_render(State(app): State<AppState>, req: Request) -> Response {
    render(app, Kind::Completion, req)
        .await
        .unwrap_or_else(IntoResponse::into_response)
}

async fn chat_completions_render(State(app): State<AppState>, req: Request) -> Response {
    render(app, Kind::Chat, req)
        .await
        .unwrap_or_else(IntoResponse::into_response)
}

/// vLLM's render endpoints (`vllm launch render`): the request as the engine would receive it,
/// tokens in (vLLM's `GenerateRequest`), without running it. `POST /v1/completions/render`
/// answers a list (one entry per prompt; the simulator takes one), the chat one an object.
/// Same parsing, model check, tokenizer and length checks as inference; no fault injection.
async fn render(app: AppState, kind: Kind, req: Request) -> Result<Response, ApiError> {
    let body = read_body(req.into_body(), app.cfg.max_body_bytes).await?;
    let Prepared { p, ids, max_tokens } = prepare(&app, kind, &body)?;
    let mut sampling = p.echo.sampling;
    sampling.insert("n".into(), json!(1));
    sampling.insert("max_tokens".into(), json!(max_tokens));
    let generate = json!({
        "request_id": next_request_id(&app, kind),
        "token_ids": ids,
        "features": null,
        "sampling_params": sampling,
        "model": p.model,
        "stream": p.stream,
        "stream_options": p.echo.stream_options,
        "cache_salt": p.echo.cache_salt,
        "priority": p.echo.priority,
        "kv_transfer_params": p.echo.kv_transfer_params,
    });
    Ok(match kind {
        Kind::Completion => axum::Json(json!([generate])),
        Kind::Chat => axum::Json(generate),
    }
    .into_response())
}

/// vLLM's `POST /tokenize`: `prompt` (a string; `add_special_tokens` default true) or `messages`
/// (rendered with the chat template; `add_generation_prompt` default true,
/// `continue_final_message`, `add_special_tokens` default false), optional `model` and
/// `return_token_strs`. Answers `{"count", "max_model_len", "tokens", "token_strs"}` with the ids
/// the engine uses for the same prompt (those its KV events carry).
async fn tokenize(State(app): State<AppState>, req: Request) -> Response {
    tokenize_inner(&app, req)
        .await
        .unwrap_or_else(IntoResponse::into_response)
}

async fn tokenize_inner(app: &App, req: Request) -> Result<Response, ApiError> {
    let body = read_body(req.into_body(), app.cfg.max_body_bytes).await?;
    let obj = parse_object(&body)?;
    let mut model = parse_model(&obj)?;
    resolve_model(app, &mut model)?;
    let return_token_strs = opt_bool(&obj, "return_token_strs")?.unwrap_or(false);
    let (text, default_special) = match (opt(&obj, "prompt"), opt(&obj, "messages")) {
        (Some(_), Some(_)) => {
            return Err(ApiError::bad(
                "invalid_value",
                "messages",
                "give either `prompt` or `messages`, not both",
            ))
        }
        (None, Some(_)) => (render_chat_request(&obj)?, false),
        (Some(Value::String(s)), None) => (s.clone(), true),
        (Some(v), None) => {
            return Err(ApiError::bad(
                "invalid_type",
                "prompt",
                format!("`prompt` must be a string, got {}", type_name(v)),
            ))
        }
        (None, None) => {
            return Err(ApiError::bad(
                "missing_field",
                "prompt",
                "missing required field `prompt` (or `messages` for a conversation)",
            ))
        }
    };
    let add_special_tokens = opt_bool(&obj, "add_special_tokens")?.unwrap_or(default_special);
    let ids = app.tokenize(&text, add_special_tokens)?;
    let token_strs = return_token_strs.then(|| app.tokenizer.token_strs(&text, &ids));
    Ok(axum::Json(json!({
        "count": ids.len(),
        "max_model_len": app.cfg.max_model_len,
        "tokens": ids,
        "token_strs": token_strs,
    }))
    .into_response())
}

struct Meta {
    id: String,
    created: u64,
    model: String,
    kind: Kind,
    max_tokens: usize,
    /// Set for a P/D prefill: where its held blocks are.
    transfer: Option<TransferAnswer>,
}

struct TransferAnswer {
    engine_id: String,
    host: String,
    port: u16,
}

fn usage_json(u: &Usage) -> Value {
    json!({
        "prompt_tokens": u.prompt_tokens,
        "completion_tokens": u.completion_tokens,
        "total_tokens": u.prompt_tokens + u.completion_tokens,
        "prompt_tokens_details": {"cached_tokens": u.cached_tokens},
    })
}

async fn collect_response(meta: Meta, mut rx: mpsc::Receiver<Event>) -> Result<Response, ApiError> {
    let mut text = String::new();
    let mut usage = None;
    let mut held = None;
    while let Some(ev) = rx.recv().await {
        match ev {
            Event::Token(i) => text.push_str(tokenizer::output_token(i)),
            Event::Held(ids) => held = Some(ids),
            Event::Done(u) => {
                usage = Some(u);
                break;
            }
        }
    }
    let Some(usage) = usage else {
        return Err(ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "engine_error",
            "the request ended before completion",
        ));
    };
    let choice = match meta.kind {
        Kind::Completion => json!({
            "index": 0,
            "text": text,
            "logprobs": null,
            "finish_reason": "length",
            "stop_reason": null,
        }),
        Kind::Chat => json!({
            "index": 0,
            "message": {"role": "assistant", "content": text},
            "logprobs": null,
            "finish_reason": "length",
            "stop_reason": null,
        }),
    };
    let object = match meta.kind {
        Kind::Completion => "text_completion",
        Kind::Chat => "chat.completion",
    };
    let mut body = json!({
        "id": meta.id,
        "object": object,
        "created": meta.created,
        "model": meta.model,
        "choices": [choice],
        "usage": usage_json(&usage),
    });
    if let Some(t) = &meta.transfer {
        let ids = held.unwrap_or_default();
        body["kv_transfer_params"] =
            pd::prefill_answer(&t.engine_id, &meta.id, &ids, &t.host, t.port);
    }
    Ok(axum::Json(body).into_response())
}

fn sse(v: &Value) -> String {
    format!("data: {v}\n\n")
}

impl Meta {
    fn chunk(&self, choices: Value) -> Value {
        let object = match self.kind {
            Kind::Completion => "text_completion",
            Kind::Chat => "chat.completion.chunk",
        };
        json!({
            "id": self.id,
            "object": object,
            "created": self.created,
            "model": self.model,
            "choices": choices,
        })
    }

    /// SSE text for output token `i`.
    fn token_event(&self, i: usize) -> String {
        let text = tokenizer::output_token(i);
        let finish = if i + 1 == self.max_tokens {
            json!("length")
        } else {
            Value::Null
        };
        match self.kind {
            Kind::Completion => sse(&self.chunk(json!([{
                "index": 0,
                "text": text,
                "logprobs": null,
                "finish_reason": finish,
                "stop_reason": null,
            }]))),
            Kind::Chat => {
                let mut out = String::new();
                if i == 0 {
                    out.push_str(&sse(&self.chunk(json!([{
                        "index": 0,
                        "delta": {"role": "assistant", "content": ""},
                        "logprobs": null,
                        "finish_reason": null,
                    }]))));
                }
                out.push_str(&sse(&self.chunk(json!([{
                    "index": 0,
                    "delta": {"content": text},
                    "logprobs": null,
                    "finish_reason": finish,
                }]))));
                out
            }
        }
    }
}

fn stream_response(meta: Meta, rx: mpsc::Receiver<Event>, include_usage: bool) -> Response {
    let stream = futures_util::stream::unfold(Some((meta, rx)), move |state| async move {
        let (meta, mut rx) = state?;
        match rx.recv().await? {
            Event::Token(i) => {
                let text = meta.token_event(i);
                Some((text, Some((meta, rx))))
            }
            // Prefills are never streamed.
            Event::Held(_) => Some((String::new(), Some((meta, rx)))),
            Event::Done(u) => {
                let mut text = String::new();
                if include_usage {
                    let mut chunk = meta.chunk(json!([]));
                    chunk["usage"] = usage_json(&u);
                    text.push_str(&sse(&chunk));
                }
                text.push_str("data: [DONE]\n\n");
                Some((text, None))
            }
        }
    });
    Response::builder()
        .status(StatusCode::OK)
        .header(header::CONTENT_TYPE, "text/event-stream")
        .header(header::CACHE_CONTROL, "no-cache")
        .body(Body::from_stream(
            stream.map(|s| Ok::<_, Infallible>(Bytes::from(s))),
        ))
        .unwrap_or_else(|_| StatusCode::INTERNAL_SERVER_ERROR.into_response())
}

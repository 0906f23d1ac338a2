//! Prefill/decode (P/D) disaggregation, as vLLM's NIXL connector serves it and llm-d's routing
//! sidecar drives it, plus the settings of data-parallel ranks.
//!
//! The protocol rides on `kv_transfer_params` in the request body:
//! - **prefill** (`do_remote_decode: true`): the server computes the prompt, emits one token, and
//!   keeps the prompt's full KV blocks pinned for a decoder to read; its non-streamed answer
//!   carries `kv_transfer_params` naming them (`remote_engine_id`, `remote_request_id`,
//!   `remote_block_ids`, `remote_host`, `remote_port`, `tp_size`);
//! - **decode** (`do_remote_prefill: true` with those fields): the server takes the prompt blocks
//!   it lacks from the prefill server instead of computing them, and reports them in
//!   `cached_tokens`. Where vLLM reads the blocks over NIXL, the simulator calls the prefill
//!   server's sim-only [`RELEASE_PATH`] (the read and the release in one call) and pays
//!   [`KvTransferConfig::ms_per_block`] per block; when the call fails, or the params lack a field,
//!   it recomputes the prompt locally, as vLLM does, and counts a [`Fallback`].
//!
//! This module owns the parsing of `kv_transfer_params`, the role and transfer settings, and the
//! decoder's HTTP client; the engine owns the held blocks (they live in its cache).

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use serde_json::{json, Map, Value};

/// The prefill server's sim-only admin path a decoder calls to read and release held blocks:
/// `POST {"request_id": "<remote_request_id>", "engine_id": "<remote_engine_id>"}`.
pub const RELEASE_PATH: &str = "/kv_transfer/release";

/// How long a decoder waits for the prefill server's release answer before recomputing.
pub const RELEASE_TIMEOUT: Duration = Duration::from_secs(2);

/// Largest release answer read; a longer one counts as unreachable.
const MAX_RELEASE_ANSWER_BYTES: usize = 16 * 1024;

/// Most data-parallel ranks one server may have (vLLM deployments use a handful to a few dozen).
pub const MAX_DATA_PARALLEL_SIZE: usize = 256;

/// llm-d's `llm-d.ai/role` of a server: which P/D phases it accepts. Every role serves plain
/// requests (no `kv_transfer_params`, or neither flag set).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Role {
    /// Accepts prefill requests (`do_remote_decode`); refuses decode requests.
    Prefill,
    /// Accepts decode requests (`do_remote_prefill`); refuses prefill requests.
    Decode,
    /// Accepts both phases (vLLM's `kv_both`).
    #[default]
    Both,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Prefill => "prefill",
            Role::Decode => "decode",
            Role::Both => "both",
        }
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Role {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "prefill" => Ok(Role::Prefill),
            "decode" => Ok(Role::Decode),
            "both" => Ok(Role::Both),
            other => Err(format!("expected prefill, decode or both, got {other:?}")),
        }
    }
}

/// Settings of the KV transfer between a prefill and a decode server.
#[derive(Debug, Clone, PartialEq)]
pub struct KvTransferConfig {
    /// Cost of reading one KV block from the prefill server, in ms (`--kv-transfer-ms-per-block`).
    /// Default 0.08: a Llama-3-8B-sized model keeps 2 (K, V) × 32 layers × 8 KV heads × 128 dims
    /// × 2 bytes = 128 KiB of KV per token, so a 16-token block is 2 MiB; NIXL over a 200 Gb/s
    /// RDMA link moves about 25 GB/s, so one block takes about 0.08 ms, a tenth of computing it
    /// with the default `--prefill-per-token-ms` (16 × 0.05 ms).
    pub ms_per_block: f64,
    /// How long a prefill server keeps blocks no decoder has read (`--kv-transfer-timeout-secs`;
    /// vLLM's `VLLM_NIXL_ABORT_REQUEST_TIMEOUT`, 480 s).
    pub timeout: Duration,
    /// Most prefills holding blocks at once (`--kv-transfer-max-held`); further prefills get 503.
    pub max_held: usize,
    /// Host a prefill answer names in `remote_host` (`--kv-transfer-host`); `None`: the listen
    /// address, or `127.0.0.1` when listening on all interfaces.
    pub host: Option<String>,
}

impl Default for KvTransferConfig {
    fn default() -> Self {
        Self {
            ms_per_block: 0.08,
            timeout: Duration::from_secs(480),
            max_held: 1024,
            host: None,
        }
    }
}

/// Where a decode request's prompt blocks wait (from a prefill answer's `kv_transfer_params`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RemotePrefill {
    pub engine_id: String,
    pub request_id: String,
    /// How many blocks the prefill server holds (`remote_block_ids.len()`).
    pub blocks: usize,
    pub host: String,
    pub port: u16,
}

/// The P/D phase a request asks for.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum Phase {
    /// No P/D: compute and decode here.
    #[default]
    Whole,
    /// Compute the prompt, emit one token, hold the blocks for a decoder.
    Prefill,
    /// Read the prompt blocks from a prefill server; `Err(field)` when a field is missing, so
    /// the prompt is recomputed locally.
    Decode(Result<RemotePrefill, &'static str>),
}

/// A `kv_transfer_params` that cannot be read: 400 naming `field`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParamError {
    pub field: &'static str,
    pub message: String,
}

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

fn wrong(field: &'static str, expected: &str, got: &Value) -> ParamError {
    ParamError {
        field,
        message: format!("`{field}` must be {expected}, got {}", type_name(got)),
    }
}

fn flag(p: &Map<String, Value>, key: &str, field: &'static str) -> Result<bool, ParamError> {
    match p.get(key) {
        None | Some(Value::Null) => Ok(false),
        Some(Value::Bool(b)) => Ok(*b),
        Some(v) => Err(wrong(field, "a boolean", v)),
    }
}

fn string(
    p: &Map<String, Value>,
    key: &str,
    field: &'static str,
) -> Result<Option<String>, ParamError> {
    match p.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.clone())),
        Some(v) => Err(wrong(field, "a string", v)),
    }
}

/// The phase `kv_transfer_params` (absent or null: [`Phase::Whole`]) asks for.
pub fn parse_params(params: Option<&Value>) -> Result<Phase, ParamError> {
    const TOP: &str = "kv_transfer_params";
    let p = match params {
        None | Some(Value::Null) => return Ok(Phase::Whole),
        Some(Value::Object(p)) => p,
        Some(v) => return Err(wrong(TOP, "an object", v)),
    };
    let remote_decode = flag(p, "do_remote_decode", "kv_transfer_params.do_remote_decode")?;
    let remote_prefill = flag(
        p,
        "do_remote_prefill",
        "kv_transfer_params.do_remote_prefill",
    )?;
    match (remote_decode, remote_prefill) {
        (true, true) => Err(ParamError {
            field: TOP,
            message:
                "`kv_transfer_params` cannot set both `do_remote_decode` and `do_remote_prefill`"
                    .into(),
        }),
        (true, false) => Ok(Phase::Prefill),
        (false, false) => Ok(Phase::Whole),
        (false, true) => {
            let engine_id = string(p, "remote_engine_id", "kv_transfer_params.remote_engine_id")?;
            let request_id = string(
                p,
                "remote_request_id",
                "kv_transfer_params.remote_request_id",
            )?;
            let host = string(p, "remote_host", "kv_transfer_params.remote_host")?;
            const IDS: &str = "kv_transfer_params.remote_block_ids";
            let blocks = match p.get("remote_block_ids") {
                None | Some(Value::Null) => None,
                Some(Value::Array(ids)) => {
                    if let Some(bad) = ids.iter().find(|v| v.as_u64().is_none()) {
                        return Err(ParamError {
                            field: IDS,
                            message: format!(
                                "`{IDS}` must be an array of non-negative integers, got an item of type {}",
                                type_name(bad)
                            ),
                        });
                    }
                    Some(ids.len())
                }
                Some(v) => return Err(wrong(IDS, "an array of non-negative integers", v)),
            };
            const PORT: &str = "kv_transfer_params.remote_port";
            let port = match p.get("remote_port") {
                None | Some(Value::Null) => None,
                Some(v) => Some(v.as_u64().and_then(|n| u16::try_from(n).ok()).ok_or_else(
                    || ParamError {
                        field: PORT,
                        message: format!("`{PORT}` must be an integer in 0..=65535, got {v}"),
                    },
                )?),
            };
            if let Some(v) = p.get("tp_size").filter(|v| !v.is_null()) {
                if v.as_u64().is_none() {
                    return Err(ParamError {
                        field: "kv_transfer_params.tp_size",
                        message: format!(
                            "`kv_transfer_params.tp_size` must be a non-negative integer, got {v}"
                        ),
                    });
                }
            }
            let remote = (|| {
                Ok(RemotePrefill {
                    engine_id: engine_id.ok_or("kv_transfer_params.remote_engine_id")?,
                    request_id: request_id.ok_or("kv_transfer_params.remote_request_id")?,
                    blocks: blocks.ok_or("kv_transfer_params.remote_block_ids")?,
                    host: host.ok_or("kv_transfer_params.remote_host")?,
                    port: port.ok_or("kv_transfer_params.remote_port")?,
                })
            })();
            Ok(Phase::Decode(remote))
        }
    }
}

/// What a prefill answer carries in `kv_transfer_params` (vLLM's NIXL connector's shape).
pub fn prefill_answer(
    engine_id: &str,
    request_id: &str,
    block_ids: &[u32],
    host: &str,
    port: u16,
) -> Value {
    json!({
        "do_remote_prefill": true,
        "do_remote_decode": false,
        "remote_block_ids": block_ids,
        "remote_engine_id": engine_id,
        "remote_request_id": request_id,
        "remote_host": host,
        "remote_port": port,
        "tp_size": 1,
    })
}

/// Why a decode recomputed its prompt instead of reading it (the `reason` metric label).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fallback {
    /// `kv_transfer_params` lacked a field.
    IncompleteParams,
    /// The prefill server did not answer (refused, timed out, not HTTP, 5xx...).
    Unreachable,
    /// The prefill server holds no blocks under that request id (never, released or expired).
    UnknownRequest,
    /// The prefill server's engine id is not `remote_engine_id` (e.g. another DP rank's port).
    EngineMismatch,
}

impl Fallback {
    pub const ALL: [Fallback; 4] = [
        Fallback::IncompleteParams,
        Fallback::Unreachable,
        Fallback::UnknownRequest,
        Fallback::EngineMismatch,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Fallback::IncompleteParams => "incomplete_params",
            Fallback::Unreachable => "unreachable",
            Fallback::UnknownRequest => "unknown_request",
            Fallback::EngineMismatch => "engine_mismatch",
        }
    }

    pub(crate) fn index(self) -> usize {
        self as usize
    }
}

/// The decoder's HTTP client for [`RELEASE_PATH`] (connections pooled per prefill server).
#[derive(Clone)]
pub(crate) struct Releaser {
    client: Client<HttpConnector, Full<Bytes>>,
}

impl Releaser {
    pub fn new() -> Self {
        let mut connector = HttpConnector::new();
        connector.set_connect_timeout(Some(RELEASE_TIMEOUT));
        connector.set_nodelay(true);
        Self {
            // Idle connections are closed after 30 s (the timer reaps them), at most 8 per host.
            client: Client::builder(TokioExecutor::new())
                .pool_timer(TokioTimer::new())
                .pool_idle_timeout(Duration::from_secs(30))
                .pool_max_idle_per_host(8)
                .build(connector),
        }
    }

    /// Read and release `remote`'s blocks: the number of blocks the prefill server held.
    pub async fn release(&self, remote: &RemotePrefill) -> Result<usize, Fallback> {
        match tokio::time::timeout(RELEASE_TIMEOUT, self.call(remote)).await {
            Ok(r) => r,
            Err(_) => Err(Fallback::Unreachable),
        }
    }

    async fn call(&self, remote: &RemotePrefill) -> Result<usize, Fallback> {
        let host = if remote.host.contains(':') && !remote.host.starts_with('[') {
            format!("[{}]", remote.host)
        } else {
            remote.host.clone()
        };
        let body = json!({"request_id": remote.request_id, "engine_id": remote.engine_id});
        let req = http::Request::post(format!("http://{host}:{}{RELEASE_PATH}", remote.port))
            .header(http::header::CONTENT_TYPE, "application/json")
            .body(Full::new(Bytes::from(body.to_string())))
            .map_err(|_| Fallback::Unreachable)?;
        let res = self
            .client
            .request(req)
            .await
            .map_err(|_| Fallback::Unreachable)?;
        let status = res.status();
        let answer = Limited::new(res.into_body(), MAX_RELEASE_ANSWER_BYTES)
            .collect()
            .await
            .map_err(|_| Fallback::Unreachable)?
            .to_bytes();
        match status.as_u16() {
            200 => serde_json::from_slice::<Value>(&answer)
                .ok()
                .and_then(|v| v.get("released_blocks")?.as_u64())
                .map(|n| usize::try_from(n).unwrap_or(usize::MAX))
                .ok_or(Fallback::Unreachable),
            404 => Err(Fallback::UnknownRequest),
            409 => Err(Fallback::EngineMismatch),
            _ => Err(Fallback::Unreachable),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decode(extra: Value) -> Value {
        let mut v = json!({
            "do_remote_prefill": true,
            "do_remote_decode": false,
            "remote_engine_id": "sim-0",
            "remote_request_id": "cmpl-sim-0-1",
            "remote_block_ids": [1, 2, 3],
            "remote_host": "127.0.0.1",
            "remote_port": 8000,
            "tp_size": 1,
        });
        for (k, x) in extra.as_object().unwrap() {
            v[k] = x.clone();
        }
        v
    }

    #[test]
    fn phases() {
        assert_eq!(parse_params(None), Ok(Phase::Whole));
        assert_eq!(parse_params(Some(&Value::Null)), Ok(Phase::Whole));
        assert_eq!(parse_params(Some(&json!({}))), Ok(Phase::Whole));
        let prefill = json!({"do_remote_decode": true, "do_remote_prefill": false,
            "remote_engine_id": null, "remote_block_ids": null, "remote_host": null, "remote_port": null});
        assert_eq!(parse_params(Some(&prefill)), Ok(Phase::Prefill));
        assert_eq!(
            parse_params(Some(&decode(json!({})))),
            Ok(Phase::Decode(Ok(RemotePrefill {
                engine_id: "sim-0".into(),
                request_id: "cmpl-sim-0-1".into(),
                blocks: 3,
                host: "127.0.0.1".into(),
                port: 8000,
            })))
        );
    }

    #[test]
    fn a_missing_field_recomputes() {
        assert_eq!(
            parse_params(Some(&decode(json!({"remote_host": null})))),
            Ok(Phase::Decode(Err("kv_transfer_params.remote_host")))
        );
        let mut v = decode(json!({}));
        v.as_object_mut().unwrap().remove("remote_request_id");
        assert_eq!(
            parse_params(Some(&v)),
            Ok(Phase::Decode(Err("kv_transfer_params.remote_request_id")))
        );
    }

    #[test]
    fn wrong_types_name_the_field() {
        for (extra, field) in [
            (
                json!({"remote_block_ids": "1,2"}),
                "kv_transfer_params.remote_block_ids",
            ),
            (
                json!({"remote_block_ids": [1, -2]}),
                "kv_transfer_params.remote_block_ids",
            ),
            (
                json!({"remote_port": "80"}),
                "kv_transfer_params.remote_port",
            ),
            (
                json!({"remote_port": 70000}),
                "kv_transfer_params.remote_port",
            ),
            (json!({"remote_host": 1}), "kv_transfer_params.remote_host"),
            (
                json!({"remote_engine_id": []}),
                "kv_transfer_params.remote_engine_id",
            ),
            (
                json!({"remote_request_id": 5}),
                "kv_transfer_params.remote_request_id",
            ),
            (json!({"tp_size": "one"}), "kv_transfer_params.tp_size"),
            (
                json!({"do_remote_prefill": "yes"}),
                "kv_transfer_params.do_remote_prefill",
            ),
            (json!({"do_remote_decode": true}), "kv_transfer_params"),
        ] {
            let e = parse_params(Some(&decode(extra.clone()))).unwrap_err();
            assert_eq!(e.field, field, "{extra}");
            assert!(e.message.contains(field), "{}", e.message);
        }
        assert_eq!(
            parse_params(Some(&json!([1]))).unwrap_err().field,
            "kv_transfer_params"
        );
    }

    #[test]
    fn roles_parse() {
        assert_eq!("prefill".parse(), Ok(Role::Prefill));
        assert_eq!("decode".parse(), Ok(Role::Decode));
        assert_eq!("both".parse(), Ok(Role::Both));
        assert!("mixed".parse::<Role>().unwrap_err().contains("mixed"));
        assert_eq!(Role::default(), Role::Both);
    }

    #[test]
    fn prefill_answer_shape() {
        assert_eq!(
            prefill_answer("e", "r", &[4, 5], "h", 9),
            json!({"do_remote_prefill": true, "do_remote_decode": false, "remote_block_ids": [4, 5],
                "remote_engine_id": "e", "remote_request_id": "r", "remote_host": "h",
                "remote_port": 9, "tp_size": 1})
        );
    }
}

//! `epp proxy`: the picker as a standalone OpenAI-compatible HTTP proxy. Each request is
//! classified ([`read`]: only the inference API is forwarded), its body read within bounds,
//! routed by the shared director under the shared gateway contract, and forwarded
//! ([`forward`], with fallback when connecting fails) to the picked endpoint; responses, SSE
//! included, stream back frame by frame ([`relay`]). `GET /v1/models` is answered from the
//! pool ([`models`]). Connections are bounded in number and in how long they may take to send
//! headers and bodies, so slow or idle clients cannot exhaust the process.

pub mod disagg;
pub mod forward;
pub mod models;
pub mod read;
pub mod refusal;
pub mod relay;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::Response;
use bytes::Bytes;
use http_body_util::Full;
use hyper_util::client::legacy::{connect::HttpConnector, Client};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};

use crate::app::{serve_within_grace, FrontEndHandle, Runtime, RuntimeOptions, StartError};
use crate::director::{Director, RouteError, RouteRequest};
use crate::gateway::headers::REQUEST_ID;
use crate::gateway::{BodyLimit, GatewayPolicy, InboundHeaders};
use crate::request::ApiMethod;
use crate::telemetry::Shutdown;
use read::{ReadError, Route};

/// Proxy front-end settings.
#[derive(Clone, Debug)]
pub struct ProxyOptions {
    pub listen: SocketAddr,
    /// Request bodies above this get 413.
    pub max_body_bytes: usize,
    /// Deadline for the upstream's response headers (504 past it).
    pub upstream_timeout: Duration,
    /// Endpoints tried at most per request when connecting fails.
    pub max_attempts: usize,
    /// Honour the forced-pick header (`test-epp-endpoint-selection`). Test only.
    pub test_hooks: bool,
    /// A connection must send a complete request head within this (HTTP/1.1: also the longest
    /// a kept-alive connection may sit idle between requests).
    pub header_read_timeout: Duration,
    /// A request body must arrive completely within this (408 past it).
    pub body_read_timeout: Duration,
    /// Open client connections at most; connections over it are closed at once.
    pub max_connections: usize,
    /// The longest the prefill call of a disaggregated request may take (headers and body);
    /// past it the decode runs alone.
    pub prefill_timeout: Duration,
    pub picker: RuntimeOptions,
}

impl Default for ProxyOptions {
    fn default() -> Self {
        Self {
            listen: ([0, 0, 0, 0], 8000).into(),
            max_body_bytes: 10 * 1024 * 1024,
            upstream_timeout: Duration::from_secs(300),
            max_attempts: 3,
            test_hooks: false,
            header_read_timeout: Duration::from_secs(10),
            body_read_timeout: Duration::from_secs(30),
            max_connections: 4096,
            prefill_timeout: Duration::from_secs(30),
            picker: RuntimeOptions::default(),
        }
    }
}

/// Largest request head (HTTP/1.1) and header list (HTTP/2), the same for both.
pub const MAX_HEADER_BYTES: usize = 64 * 1024;
/// Concurrent streams per HTTP/2 connection.
pub const MAX_H2_STREAMS: u32 = 256;

pub(crate) type UpstreamClient = Client<HttpConnector, Full<Bytes>>;

pub(crate) struct ProxyState {
    director: Director,
    client: UpstreamClient,
    opts: ProxyOptions,
}

/// The proxy's own listen address (read through [`ProxyHandle`], e.g. `handle.proxy_addr`).
#[derive(Clone, Copy, Debug)]
pub struct ProxyAddrs {
    pub proxy_addr: SocketAddr,
}

/// A running proxy (used by `epp proxy`, `epp demo`, `epp bench` and tests).
pub type ProxyHandle = FrontEndHandle<ProxyAddrs>;

/// Validate, start the picker runtime, bind the proxy listener and serve in the background.
pub async fn spawn(opts: ProxyOptions) -> Result<ProxyHandle, StartError> {
    spawn_with_shutdown(opts, Shutdown::new()).await
}

impl ProxyOptions {
    fn validate(&self) -> Result<(), StartError> {
        if self.max_body_bytes == 0 {
            return Err(StartError::invalid(
                "--max-body-bytes must be greater than 0",
            ));
        }
        if self.max_attempts == 0 {
            return Err(StartError::invalid("--max-attempts must be at least 1"));
        }
        for (flag, d) in [
            ("--upstream-timeout", self.upstream_timeout),
            ("--header-read-timeout", self.header_read_timeout),
            ("--body-read-timeout", self.body_read_timeout),
            ("--prefill-timeout", self.prefill_timeout),
        ] {
            if d.is_zero() {
                return Err(StartError::invalid(format!(
                    "{flag} must be greater than 0"
                )));
            }
        }
        if self.max_connections == 0 {
            return Err(StartError::invalid("--max-connections must be at least 1"));
        }
        Ok(())
    }
}

/// As [`spawn`], stopping when `shutdown` fires.
pub async fn spawn_with_shutdown(
    opts: ProxyOptions,
    shutdown: Shutdown,
) -> Result<ProxyHandle, StartError> {
    opts.validate()?;
    let validated = opts.picker.validate()?;
    let picker = Runtime::start(opts.picker.clone(), validated, shutdown.clone()).await?;
    let listener = crate::serving::bind(opts.listen, "--listen").await?;
    let proxy_addr = listener.local_addr()?;
    tracing::info!(
        listen = %proxy_addr,
        max_body_bytes = opts.max_body_bytes,
        upstream_timeout = ?opts.upstream_timeout,
        max_attempts = opts.max_attempts,
        header_read_timeout = ?opts.header_read_timeout,
        body_read_timeout = ?opts.body_read_timeout,
        max_connections = opts.max_connections,
        prefill_timeout = ?opts.prefill_timeout,
        test_hooks = opts.test_hooks,
        "proxy listening"
    );
    let mut conn = HttpConnector::new();
    conn.set_nodelay(true);
    conn.set_connect_timeout(Some(Duration::from_secs(5)));
    let client = Client::builder(TokioExecutor::new())
        .pool_idle_timeout(Duration::from_secs(60))
        .build(conn);
    let state = Arc::new(ProxyState {
        director: picker.director.clone(),
        client,
        opts: opts.clone(),
    });
    let app = axum::Router::new().fallback(handle).with_state(state);
    let grace = opts.picker.grace_period;
    let addrs = ProxyAddrs { proxy_addr };
    let run = move |picker: Runtime| async move {
        let server = accept_loop(
            listener,
            app,
            opts,
            picker.director.clone(),
            shutdown.clone(),
        );
        serve_within_grace(server, &shutdown, grace, "requests").await;
        picker.join().await;
        tracing::info!("proxy stopped");
    };
    Ok(FrontEndHandle::spawn(addrs, picker, run))
}

/// Accept connections until `shutdown`, each bounded by the limits in `opts`; then wait for the
/// open ones to finish their requests (the caller bounds that by the grace period).
async fn accept_loop(
    listener: tokio::net::TcpListener,
    app: axum::Router,
    opts: ProxyOptions,
    director: Director,
    shutdown: Shutdown,
) {
    let mut builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(opts.header_read_timeout)
        .max_buf_size(MAX_HEADER_BYTES);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_header_list_size(MAX_HEADER_BYTES as u32)
        .max_concurrent_streams(MAX_H2_STREAMS)
        .keep_alive_interval(Duration::from_secs(30))
        .keep_alive_timeout(Duration::from_secs(20));
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    let permits = Arc::new(tokio::sync::Semaphore::new(opts.max_connections));
    let mut warned_at: Option<Instant> = None;
    let mut warn = |what: &str, detail: String| {
        // At most one line per 10 s, so a flood cannot flood the log too.
        if warned_at.is_none_or(|t| t.elapsed() >= Duration::from_secs(10)) {
            warned_at = Some(Instant::now());
            tracing::warn!(detail = %detail, "{what}");
        }
    };
    loop {
        let accepted = tokio::select! {
            _ = shutdown.wait() => break,
            a = listener.accept() => a,
        };
        let (tcp, _peer) = match accepted {
            Ok(x) => x,
            Err(e) => {
                // EMFILE and friends: back off briefly instead of spinning.
                warn("proxy cannot accept connections", e.to_string());
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let Ok(permit) = permits.clone().try_acquire_owned() else {
            warn(
                "proxy connection limit reached; closing new connections",
                format!("--max-connections {}", opts.max_connections),
            );
            drop(tcp);
            continue;
        };
        // Small SSE chunks must not wait for the client's delayed ACK (Nagle).
        let _ = tcp.set_nodelay(true);
        // hyper's own refusals of unparsable heads get JSON bodies on the way out.
        let calls = refusal::Calls::default();
        let svc = refusal::counted(
            hyper_util::service::TowerToHyperService::new(app.clone()),
            calls.clone(),
        );
        let conn = builder
            .serve_connection_with_upgrades(TokioIo::new(refusal::RefusalIo::new(tcp, calls)), svc)
            .into_owned();
        let conn = graceful.watch(conn);
        let director = director.clone();
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                // Requests the HTTP layer refused before the proxy saw them still count.
                if let Some(status) = refused_status(e.as_ref()) {
                    director.record_answered(ApiMethod::Other, status);
                }
                tracing::debug!(error = %e, "client connection ended with an error");
            }
            drop(permit);
        });
    }
    drop(listener);
    graceful.shutdown().await;
}

/// The status the HTTP layer answered a request it could not parse with (431 for a head over
/// [`MAX_HEADER_BYTES`], 400 otherwise); `None` for connection errors that are no refusal (the
/// client went away, or a kept-alive connection sat idle past `--header-read-timeout`, which
/// is no request at all).
fn refused_status(e: &(dyn std::error::Error + 'static)) -> Option<u16> {
    let h = e.downcast_ref::<hyper::Error>()?;
    if h.is_parse_too_large() {
        Some(431)
    } else if h.is_parse() || h.is_parse_status() {
        Some(400)
    } else {
        None
    }
}

/// Whether an error (anywhere in its source chain) is the peer closing or resetting the
/// connection: a client gone mid-body, or an upstream that hung up before answering.
pub(crate) fn connection_dropped(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut cur = Some(e);
    while let Some(err) = cur {
        if let Some(h) = err.downcast_ref::<hyper::Error>() {
            if h.is_incomplete_message() || h.is_canceled() || h.is_closed() {
                return true;
            }
        }
        if let Some(io) = err.downcast_ref::<std::io::Error>() {
            if matches!(
                io.kind(),
                std::io::ErrorKind::ConnectionReset
                    | std::io::ErrorKind::BrokenPipe
                    | std::io::ErrorKind::ConnectionAborted
                    | std::io::ErrorKind::UnexpectedEof
            ) {
                return true;
            }
        }
        cur = err.source();
    }
    false
}

pub(crate) fn error_response(err: &RouteError, request_id: &str) -> Response {
    let mut r = json_response(err.json_body(), request_id);
    *r.status_mut() = StatusCode::from_u16(err.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    if let Some(reason) = err.dropped_reason {
        r.headers_mut().insert(
            crate::gateway::headers::REQUEST_DROPPED_REASON,
            HeaderValue::from_static(reason),
        );
    }
    r
}

/// A JSON body with its content type and the request id.
fn json_response(body: Vec<u8>, request_id: &str) -> Response {
    let mut r = Response::new(Body::from(body));
    let h = r.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    if let Ok(v) = HeaderValue::from_str(request_id) {
        h.insert(REQUEST_ID, v);
    }
    r
}

async fn handle(State(st): State<Arc<ProxyState>>, req: Request) -> Response {
    let (parts, body) = req.into_parts();
    let inbound = InboundHeaders::read(
        &parts.headers,
        GatewayPolicy {
            test_hooks: st.opts.test_hooks,
        },
    )
    .with_plugin_headers(&parts.headers, st.director.scheduler().request_headers());
    let (request_id, _) = inbound.request_id_or_new();
    let method = match read::route(&parts.method, parts.uri.path()) {
        Route::Inference(m) => m,
        Route::ListModels => return list_models(&st, &request_id, None).await,
        Route::GetModel(id) => return list_models(&st, &request_id, Some(id)).await,
        Route::Refuse(err) => {
            st.director
                .record_answered(ApiMethod::from_path(parts.uri.path()), err.status);
            return error_response(&err, &request_id);
        }
    };
    let declared = parts
        .headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    let limit = BodyLimit::new(st.opts.max_body_bytes);
    let budget = st.director.body_budget();
    let (bytes, _reservation) =
        match read::body(body, declared, limit, budget, st.opts.body_read_timeout).await {
            Ok(b) => b,
            Err(ReadError::ClientGone) => {
                st.director
                    .record_answered(method, crate::director::STATUS_CLIENT_CLOSED);
                let err = RouteError::new(499, "the client closed the connection mid-body");
                return error_response(&err, &request_id);
            }
            Err(ReadError::Refuse(err)) => {
                st.director.record_answered(method, err.status);
                return error_response(&err, &request_id);
            }
        };
    let mut routed = match st
        .director
        .route(RouteRequest {
            method: Some(method),
            body: &bytes,
            subset: None,
            headers: &inbound,
        })
        .await
    {
        Ok(r) => r,
        Err(e) => return error_response(&e, &request_id),
    };
    if let Some(prefill) = routed.prefill.clone() {
        let body = routed
            .body
            .take()
            .map(Bytes::from)
            .unwrap_or_else(|| bytes.clone());
        let decode = disagg::run_prefill(
            &st,
            &parts,
            method,
            body,
            &prefill,
            &mut routed.tracker,
            &request_id,
        )
        .await;
        routed.body = Some(decode.to_vec());
    }
    forward::forward(&st, &parts, bytes, routed, &request_id).await
}

async fn list_models(st: &ProxyState, request_id: &str, id: Option<String>) -> Response {
    let snapshot = st.director.datastore().snapshot();
    let result = models::pool_models(&st.client, &snapshot).await;
    let (status, resp) = match (result, id) {
        (Err(e), _) => (e.status, error_response(&e, request_id)),
        (Ok(all), None) => (200, json_response(models::list_body(all), request_id)),
        (Ok(mut all), Some(id)) => match all.remove(&id) {
            Some(m) => (
                200,
                json_response(serde_json::to_vec(&m).unwrap_or_default(), request_id),
            ),
            None => {
                let e = RouteError::new(404, format!("the pool serves no model {id:?}"));
                (404, error_response(&e, request_id))
            }
        },
    };
    st.director.record_answered(ApiMethod::Models, status);
    resp
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::admission::controller::Outcome;

    #[test]
    fn refusals_carry_llm_ds_dropped_reason_header() {
        let cases = [
            (
                RouteError::from(crate::scheduler::ScheduleError::Saturated),
                Some("rejected-saturated"),
            ),
            (
                RouteError::from(crate::scheduler::ScheduleError::NoEndpoints),
                Some("rejected-no-endpoints"),
            ),
            (
                Outcome::EvictedTTL.refusal().unwrap(),
                Some("rejected-ttl-expired"),
            ),
            (
                Outcome::RejectedCapacity.refusal().unwrap(),
                Some("rejected-saturated"),
            ),
            (
                Outcome::EvictedContextCancelled.refusal().unwrap(),
                Some("rejected-context-cancelled"),
            ),
            (
                Outcome::EvictedNoEndpoints.refusal().unwrap(),
                Some("rejected-no-endpoints"),
            ),
            // A malformed request is not dropped: it is refused.
            (RouteError::new(400, "bad"), None),
        ];
        for (err, want) in cases {
            let r = error_response(&err, "id");
            assert_eq!(
                r.headers()
                    .get("x-llm-d-request-dropped-reason")
                    .map(|v| v.to_str().unwrap()),
                want,
                "{err:?}"
            );
        }
    }
}

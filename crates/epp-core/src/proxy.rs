//! `epp proxy`: the picker as a standalone OpenAI-compatible HTTP proxy. Each request is read
//! (bounded), routed by the shared director, and forwarded to the picked endpoint; responses,
//! SSE included, stream back frame by frame without buffering. A connection that fails before
//! any byte was sent is retried on the next-ranked endpoint.

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{header, HeaderMap, HeaderName, HeaderValue, StatusCode};
use axum::response::Response;
use bytes::Bytes;
use http_body::{Body as HttpBody, Frame, SizeHint};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::{connect::HttpConnector, Client};
use hyper_util::rt::TokioExecutor;
use rand::Rng;

use crate::app::{serve_within_grace, FrontEndHandle, Picker, PickerOptions};
use crate::datastore::{FailureKind, Source};
use crate::director::{error_body, Director, RequestTracker, RouteRequest};
use crate::request::ApiMethod;
use crate::scrape::failure_kind;
use crate::telemetry::Shutdown;

pub const HEADER_SERVED: &str = "x-gateway-destination-endpoint-served";
pub const HEADER_REQUEST_ID: &str = "x-request-id";
pub const HEADER_FORCE: &str = "test-epp-endpoint-selection";
pub const HEADER_MODEL_REWRITE: &str = "x-gateway-model-name-rewrite";

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
    pub picker: PickerOptions,
}

impl Default for ProxyOptions {
    fn default() -> Self {
        Self {
            listen: ([0, 0, 0, 0], 8000).into(),
            max_body_bytes: 10 * 1024 * 1024,
            upstream_timeout: Duration::from_secs(300),
            max_attempts: 3,
            picker: PickerOptions::default(),
        }
    }
}

type UpstreamClient = Client<HttpConnector, Full<Bytes>>;

struct ProxyState {
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
pub async fn spawn(opts: ProxyOptions) -> anyhow::Result<ProxyHandle> {
    spawn_with_shutdown(opts, Shutdown::new()).await
}

/// As [`spawn`], stopping when `shutdown` fires.
pub async fn spawn_with_shutdown(
    opts: ProxyOptions,
    shutdown: Shutdown,
) -> anyhow::Result<ProxyHandle> {
    if opts.max_body_bytes == 0 {
        anyhow::bail!("--max-body-bytes must be greater than 0");
    }
    if opts.max_attempts == 0 {
        anyhow::bail!("--max-attempts must be at least 1");
    }
    let validated = opts.picker.validate()?;
    let picker = Picker::start(opts.picker.clone(), validated, shutdown.clone()).await?;
    let listener = crate::serving::bind(opts.listen, "--listen").await?;
    let proxy_addr = listener.local_addr()?;
    tracing::info!(
        listen = %proxy_addr,
        max_body_bytes = opts.max_body_bytes,
        upstream_timeout = ?opts.upstream_timeout,
        max_attempts = opts.max_attempts,
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
    let run = move |picker: Picker| async move {
        // Small SSE chunks must not wait for the client's delayed ACK (Nagle).
        use axum::serve::ListenerExt;
        let listener = listener.tap_io(|tcp| {
            let _ = tcp.set_nodelay(true);
        });
        let server = axum::serve(listener, app).with_graceful_shutdown(shutdown.wait());
        let server = async move {
            if let Err(e) = server.await {
                tracing::error!(error = %e, "proxy server failed");
            }
        };
        serve_within_grace(server, &shutdown, grace, "requests").await;
        picker.join().await;
        tracing::info!("proxy stopped");
    };
    Ok(FrontEndHandle::spawn(addrs, picker, run))
}

fn new_request_id() -> String {
    let v: u128 = rand::rng().random();
    format!("{v:032x}")
}

fn error_response(status: u16, body: Vec<u8>, request_id: &str) -> Response {
    let mut r = Response::new(Body::from(body));
    *r.status_mut() = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let h = r.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    if let Ok(v) = HeaderValue::from_str(request_id) {
        h.insert(HEADER_REQUEST_ID, v);
    }
    r
}

fn is_hop_by_hop(name: &HeaderName) -> bool {
    matches!(
        name.as_str(),
        "connection"
            | "keep-alive"
            | "proxy-connection"
            | "te"
            | "trailer"
            | "transfer-encoding"
            | "upgrade"
            | "host"
            | "content-length"
    )
}

fn copy_headers(from: &HeaderMap, to: &mut HeaderMap) {
    for (k, v) in from {
        if !is_hop_by_hop(k) {
            to.append(k.clone(), v.clone());
        }
    }
}

async fn handle(State(st): State<Arc<ProxyState>>, req: Request) -> Response {
    let (parts, body) = req.into_parts();
    let method = ApiMethod::from_path(parts.uri.path());
    let request_id = parts
        .headers
        .get(HEADER_REQUEST_ID)
        .and_then(|v| v.to_str().ok())
        .filter(|v| !v.is_empty())
        .map(str::to_string)
        .unwrap_or_else(new_request_id);
    let max = st.opts.max_body_bytes;
    let too_large = || {
        st.director.record_rejected(method, 413);
        error_response(
            413,
            error_body(
                413,
                &format!(
                    "request body exceeds the proxy's limit of {max} bytes (--max-body-bytes)"
                ),
                None,
            ),
            &request_id,
        )
    };
    if let Some(len) = parts
        .headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok())
    {
        if len > max as u64 {
            return too_large();
        }
    }
    let bytes = match http_body_util::Limited::new(body, max).collect().await {
        Ok(c) => c.to_bytes(),
        Err(e) => {
            if e.downcast_ref::<http_body_util::LengthLimitError>()
                .is_some()
            {
                return too_large();
            }
            st.director.record_rejected(method, 400);
            return error_response(
                400,
                error_body(400, &format!("failed to read request body: {e}"), None),
                &request_id,
            );
        }
    };
    let header_str = |n: &str| parts.headers.get(n).and_then(|v| v.to_str().ok());
    let routed = match st.director.route(RouteRequest {
        method: Some(method),
        body: &bytes,
        subset: None,
        forced: header_str(HEADER_FORCE),
        model_rewrite: header_str(HEADER_MODEL_REWRITE),
    }) {
        Ok(r) => r,
        Err(e) => return error_response(e.status, e.json_body(), &request_id),
    };
    let mut tracker = routed.tracker;
    let ds = st.director.datastore().clone();
    let path_and_query = parts
        .uri
        .path_and_query()
        .map(|p| p.as_str().to_string())
        .unwrap_or_else(|| "/".into());
    let mut last_err = String::new();
    for (attempt, ep) in routed.targets.iter().take(st.opts.max_attempts).enumerate() {
        if attempt > 0 {
            tracker.retarget(ep.clone());
        }
        let addr = ep.address().to_string();
        let uri = match format!("http://{addr}{path_and_query}").parse::<http::Uri>() {
            Ok(u) => u,
            Err(e) => {
                last_err = format!("{addr}: bad upstream URI: {e}");
                continue;
            }
        };
        let mut up = http::Request::builder()
            .method(parts.method.clone())
            .uri(uri)
            .body(Full::new(bytes.clone()))
            .expect("valid request parts");
        copy_headers(&parts.headers, up.headers_mut());
        if let Ok(v) = HeaderValue::from_str(&request_id) {
            up.headers_mut().insert(HEADER_REQUEST_ID, v);
        }
        if !bytes.is_empty() {
            up.headers_mut()
                .insert(header::CONTENT_LENGTH, HeaderValue::from(bytes.len()));
        }
        match tokio::time::timeout(st.opts.upstream_timeout, st.client.request(up)).await {
            Err(_) => {
                ds.record(&addr, Source::Passive, Err(FailureKind::Other));
                tracker.finish(504);
                return error_response(
                    504,
                    error_body(
                        504,
                        &format!(
                            "upstream {addr} did not answer within {:?} (--upstream-timeout)",
                            st.opts.upstream_timeout
                        ),
                        None,
                    ),
                    &request_id,
                );
            }
            Ok(Err(e)) => {
                let kind = failure_kind(&e);
                ds.record(&addr, Source::Passive, Err(kind));
                if e.is_connect() {
                    tracing::debug!(endpoint = %addr, error = %e, "connect failed; trying the next endpoint");
                    last_err = format!("{addr}: {e}");
                    continue;
                }
                tracker.finish(502);
                return error_response(
                    502,
                    error_body(502, &format!("upstream {addr} failed: {e}"), None),
                    &request_id,
                );
            }
            Ok(Ok(resp)) => {
                let status = resp.status().as_u16();
                ds.record(
                    &addr,
                    Source::Passive,
                    if status >= 500 {
                        Err(FailureKind::Other)
                    } else {
                        Ok(())
                    },
                );
                let (rparts, rbody) = resp.into_parts();
                let mut out = Response::new(Body::empty());
                *out.status_mut() = rparts.status;
                copy_headers(&rparts.headers, out.headers_mut());
                if let Some(cl) = rparts.headers.get(header::CONTENT_LENGTH) {
                    out.headers_mut().insert(header::CONTENT_LENGTH, cl.clone());
                }
                if let Ok(v) = HeaderValue::from_str(&addr) {
                    out.headers_mut().insert(HEADER_SERVED, v);
                }
                if let Ok(v) = HeaderValue::from_str(&request_id) {
                    out.headers_mut().insert(HEADER_REQUEST_ID, v);
                }
                *out.body_mut() = Body::new(TrackedBody::new(rbody, tracker, status));
                return out;
            }
        }
    }
    tracker.finish(502);
    error_response(
        502,
        error_body(
            502,
            &format!("could not connect to any picked endpoint; last error: {last_err}"),
            None,
        ),
        &request_id,
    )
}

/// Streams the upstream body through and completes the request's tracker when it ends
/// (or counts an abort if the client goes away first).
struct TrackedBody {
    inner: hyper::body::Incoming,
    tracker: Option<RequestTracker>,
    status: u16,
}

impl TrackedBody {
    fn new(inner: hyper::body::Incoming, tracker: RequestTracker, status: u16) -> Self {
        let mut tb = Self {
            inner,
            tracker: Some(tracker),
            status,
        };
        if tb.inner.is_end_stream() {
            if let Some(mut t) = tb.tracker.take() {
                t.first_byte();
                t.finish(status);
            }
        }
        tb
    }

    fn finish(&mut self) {
        if let Some(t) = self.tracker.take() {
            t.finish(self.status);
        }
    }
}

impl HttpBody for TrackedBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let this = &mut *self;
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                if frame.is_data() {
                    if let Some(t) = this.tracker.as_mut() {
                        t.first_byte();
                    }
                }
                if this.inner.is_end_stream() {
                    this.finish();
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(None) => {
                this.finish();
                Poll::Ready(None)
            }
            Poll::Ready(Some(Err(e))) => {
                this.finish();
                Poll::Ready(Some(Err(e)))
            }
            Poll::Pending => Poll::Pending,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

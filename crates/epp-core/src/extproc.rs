//! The Envoy ext_proc front-end (`epp serve`): the Gateway API Inference Extension
//! endpoint-picker protocol over `envoy.service.ext_proc.v3.ExternalProcessor/Process`.
//!
//! One gRPC stream carries one HTTP request. This module only translates that stream to and from
//! the [`Director`]: it buffers the request body (FULL_DUPLEX_STREAMED) until end_of_stream, asks
//! the director for a pick, answers with the routing headers and metadata, re-sends the body in
//! bounded pieces, then follows the response so the in-flight count, status metrics and served
//! endpoint are settled when the response ends (or the stream goes away). Protocol violations end
//! only the offending stream, with a gRPC status that says what was wrong.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;

use envoy_types::pb::envoy::config::core::v3::{
    HeaderMap, HeaderValue, HeaderValueOption, Metadata,
};
use envoy_types::pb::envoy::r#type::v3::HttpStatus;
use envoy_types::pb::envoy::service::ext_proc::v3::external_processor_server::{
    ExternalProcessor, ExternalProcessorServer,
};
use envoy_types::pb::envoy::service::ext_proc::v3::{
    body_mutation, processing_request, processing_response, BodyMutation, BodyResponse,
    CommonResponse, HeaderMutation, HeadersResponse, HttpBody, HttpHeaders, ImmediateResponse,
    ProcessingRequest, ProcessingResponse, StreamedBodyResponse, TrailersResponse,
};
use envoy_types::pb::google::protobuf::{value::Kind, ListValue, Struct, Value};
use tokio_stream::Stream;
use tonic::{Request, Response, Status, Streaming};

use crate::app::{serve_within_grace, FrontEndHandle, Picker, PickerOptions};
use crate::datastore::Datastore;
use crate::director::{Director, RequestTracker, RouteError, RouteRequest};
use crate::request::ApiMethod;
use crate::serving;
use crate::telemetry::Shutdown;
use crate::tls::{TlsPort, TlsSettings, TlsSetup};

/// The gRPC service name, also a gRPC health service name.
pub const SERVICE_NAME: &str = "envoy.service.ext_proc.v3.ExternalProcessor";
/// Default port of the ext_proc gRPC server.
pub const DEFAULT_GRPC_PORT: u16 = 9002;
/// Default port of the gRPC health server.
pub const DEFAULT_GRPC_HEALTH_PORT: u16 = 9003;

/// Dynamic-metadata namespace of the pick and of the gateway's "served by" report.
pub const LB_NAMESPACE: &str = "envoy.lb";
/// Request header and `envoy.lb` key carrying the pick.
pub const DESTINATION: &str = "x-gateway-destination-endpoint";
/// `envoy.lb` key the gateway uses to report the endpoint that actually served the request.
pub const SERVED: &str = "x-gateway-destination-endpoint-served";
/// Filter-metadata namespace of the gateway's subset hint.
pub const SUBSET_NAMESPACE: &str = "envoy.lb.subset_hint";
/// Key (a list of `ip:port`) inside [`SUBSET_NAMESPACE`].
pub const SUBSET: &str = "x-gateway-destination-endpoint-subset";
pub const OBJECTIVE_HEADER: &str = "x-gateway-inference-objective";
pub const FAIRNESS_HEADER: &str = "x-gateway-inference-fairness-id";
pub const MODEL_REWRITE_HEADER: &str = "x-gateway-model-name-rewrite";
pub const REQUEST_ID_HEADER: &str = "x-request-id";
/// Conformance hook: forces the pick (comma list of IPs or `ip:port`).
pub const TEST_SELECTION_HEADER: &str = "test-epp-endpoint-selection";
/// Conformance hook: response header echoing the endpoint the gateway reports as served.
pub const TEST_SERVED_HEADER: &str = "x-conformance-test-served-endpoint";
/// Conformance hook: response header carrying the endpoint the picker selected.
pub const TEST_SELECTED_HEADER: &str = "x-conformance-test-selected-endpoint";
/// Debug marker set on every response-headers answer (as the reference picker does).
pub const RESPONSE_MARKER_HEADER: &str = "x-went-into-resp-headers";
/// The attributes namespace Envoy uses for `request_attributes` / `response_attributes`.
pub const EXT_PROC_ATTRIBUTES: &str = "envoy.filters.http.ext_proc";
/// The Envoy attribute (requested via `response_attributes`) naming the upstream that served.
pub const UPSTREAM_ADDRESS_ATTRIBUTE: &str = "upstream.address";
/// Largest body piece sent back in one `streamed_response` (the reference's value).
pub const BODY_PIECE_BYTES: usize = 62_000;

/// Request headers the picker owns: never echoed back (compared case-insensitively).
const SYSTEM_OWNED: [&str; 7] = [
    OBJECTIVE_HEADER,
    MODEL_REWRITE_HEADER,
    FAIRNESS_HEADER,
    SUBSET,
    DESTINATION,
    SERVED,
    "content-length",
];

/// Headers Envoy's default mutation rules refuse to set (they would only show up as
/// `rejected_header_mutations`), so echoing them is pointless.
fn envoy_refuses(key: &str) -> bool {
    matches!(key, ":authority" | ":method" | ":scheme" | "host") || key.starts_with("x-envoy-")
}

fn system_owned(key: &str) -> bool {
    SYSTEM_OWNED.iter().any(|s| key.eq_ignore_ascii_case(s))
}

/// Behaviour switches of the ext_proc front-end.
#[derive(Clone, Debug)]
pub struct ExtProcConfig {
    /// Honour `test-epp-endpoint-selection` and add the `x-conformance-test-*` response headers.
    /// Test only: any client could steer its own requests.
    pub test_hooks: bool,
    /// Fallback endpoints appended to the `envoy.lb` metadata value (comma list). The request
    /// header always carries the primary only, since an ORIGINAL_DST cluster needs one address.
    pub fallbacks: usize,
    /// Largest request body buffered for a pick; larger ones get 413.
    pub max_body_bytes: usize,
}

impl Default for ExtProcConfig {
    fn default() -> Self {
        Self {
            test_hooks: false,
            fallbacks: 0,
            max_body_bytes: 64 * 1024 * 1024,
        }
    }
}

/// The `ExternalProcessor` implementation. Cheap to clone.
#[derive(Clone, Debug)]
pub struct ExtProcService {
    director: Director,
    cfg: Arc<ExtProcConfig>,
}

impl ExtProcService {
    pub fn new(director: Director, cfg: ExtProcConfig) -> Self {
        Self {
            director,
            cfg: Arc::new(cfg),
        }
    }

    /// The tonic service, ready to add to a server. Message-size limits are lifted: one
    /// `ProcessingRequest` carries whatever chunk Envoy buffered.
    pub fn into_server(self) -> ExternalProcessorServer<Self> {
        ExternalProcessorServer::new(self)
            .max_decoding_message_size(usize::MAX)
            .max_encoding_message_size(usize::MAX)
    }
}

#[tonic::async_trait]
impl ExternalProcessor for ExtProcService {
    type ProcessStream = ProcessStream;

    async fn process(
        &self,
        request: Request<Streaming<ProcessingRequest>>,
    ) -> Result<Response<Self::ProcessStream>, Status> {
        let exchange = Exchange::new(self.director.clone(), self.cfg.clone());
        Ok(Response::new(answers(request.into_inner(), exchange)))
    }
}

/// The answers of one stream, produced as tonic polls for them (no extra task or channel
/// between the inbound messages and the outbound answers).
pub type ProcessStream =
    std::pin::Pin<Box<dyn Stream<Item = Result<ProcessingResponse, Status>> + Send + 'static>>;

struct Pump {
    inbound: Streaming<ProcessingRequest>,
    exchange: Exchange,
    pending: std::collections::VecDeque<ProcessingResponse>,
    over: bool,
}

/// Read a message, answer it, until the exchange ends, the gateway goes away, or a protocol
/// violation ends the stream with an error status. When tonic drops the stream (the gateway
/// reset it, the client went away) the exchange is dropped with it, which releases the
/// in-flight count (counted as 499 unless the response completed).
fn answers(inbound: Streaming<ProcessingRequest>, exchange: Exchange) -> ProcessStream {
    let pump = Pump {
        inbound,
        exchange,
        pending: std::collections::VecDeque::new(),
        over: false,
    };
    Box::pin(futures_util::stream::unfold(pump, |mut p| async move {
        loop {
            if let Some(r) = p.pending.pop_front() {
                return Some((Ok(r), p));
            }
            if p.over {
                return None;
            }
            let msg = match p.inbound.message().await {
                Ok(Some(m)) => m,
                Ok(None) => return None,
                Err(status) => {
                    tracing::debug!(code = ?status.code(), "ext_proc stream ended by the gateway");
                    return None;
                }
            };
            match p.exchange.handle(msg) {
                Ok(out) => {
                    p.pending.extend(out);
                    p.over = p.exchange.finished();
                }
                Err(status) => {
                    tracing::warn!(error = %status.message(), "ext_proc protocol violation, ending the stream");
                    p.over = true;
                    return Some((Err(status), p));
                }
            }
        }
    }))
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    /// Nothing seen yet.
    Start,
    /// Request headers seen; buffering the body.
    RequestBody,
    /// Request answered; waiting for the response.
    Upstream,
    /// Response headers answered; following the body.
    ResponseBody,
    /// Response complete or an immediate response sent: the stream is over.
    Done,
}

/// What the response phase needs from the request phase.
struct RoutedState {
    tracker: RequestTracker,
    incoming_model: String,
    target_model: String,
    stream_requested: bool,
    selected: String,
}

/// The state of one HTTP request's ext_proc conversation. Pure: `handle` maps one inbound
/// message to the responses to send, so the protocol is testable without I/O.
pub struct Exchange {
    director: Director,
    cfg: Arc<ExtProcConfig>,
    phase: Phase,
    method: Option<ApiMethod>,
    headers: Vec<(String, Vec<u8>)>,
    body: Vec<u8>,
    subset: Option<Vec<String>>,
    routed: Option<RoutedState>,
    status: u16,
    streaming: bool,
    response_buf: Vec<u8>,
}

impl std::fmt::Debug for Exchange {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Exchange")
            .field("phase", &self.phase)
            .finish_non_exhaustive()
    }
}

type Out = Result<Vec<ProcessingResponse>, Status>;

impl Exchange {
    pub fn new(director: Director, cfg: Arc<ExtProcConfig>) -> Self {
        Self {
            director,
            cfg,
            phase: Phase::Start,
            method: None,
            headers: Vec::new(),
            body: Vec::new(),
            subset: None,
            routed: None,
            status: 0,
            streaming: false,
            response_buf: Vec::new(),
        }
    }

    /// The conversation is over; the server ends the stream.
    pub fn finished(&self) -> bool {
        self.phase == Phase::Done
    }

    pub fn handle(&mut self, msg: ProcessingRequest) -> Out {
        use processing_request::Request as R;
        let Some(req) = msg.request else {
            // Flow-control-only or empty messages carry nothing to answer.
            return Ok(Vec::new());
        };
        match req {
            R::RequestHeaders(h) => {
                self.update_subset(msg.metadata_context.as_ref());
                self.on_request_headers(h)
            }
            R::RequestBody(b) => {
                self.update_subset(msg.metadata_context.as_ref());
                self.on_request_body(b)
            }
            R::RequestTrailers(_) => self.on_request_trailers(),
            R::ResponseHeaders(h) => {
                self.on_response_headers(h, msg.metadata_context.as_ref(), &msg.attributes)
            }
            R::ResponseBody(b) => self.on_response_body(b),
            R::ResponseTrailers(_) => self.on_response_trailers(),
        }
    }

    fn violation(&mut self, code: tonic::Code, what: &str) -> Out {
        self.phase = Phase::Done;
        Err(Status::new(
            code,
            format!("ext_proc protocol violation: {what}"),
        ))
    }

    /// "The EPP uses the latest message's metadata": a message that carries metadata replaces
    /// the hint (absent namespace = no hint); a message without metadata keeps the last one.
    fn update_subset(&mut self, md: Option<&Metadata>) {
        let Some(md) = md else { return };
        self.subset = md.filter_metadata.get(SUBSET_NAMESPACE).and_then(|s| {
            match s.fields.get(SUBSET)?.kind.as_ref()? {
                Kind::ListValue(l) => Some(
                    l.values
                        .iter()
                        .filter_map(|v| match &v.kind {
                            Some(Kind::StringValue(s)) => Some(s.clone()),
                            _ => None,
                        })
                        .collect(),
                ),
                Kind::StringValue(s) => Some(
                    s.split(',')
                        .map(str::trim)
                        .filter(|s| !s.is_empty())
                        .map(str::to_string)
                        .collect(),
                ),
                _ => None,
            }
        });
    }

    fn on_request_headers(&mut self, h: HttpHeaders) -> Out {
        match self.phase {
            Phase::Start => {}
            Phase::Done => {
                return self.violation(
                    tonic::Code::FailedPrecondition,
                    "message after the exchange ended",
                )
            }
            _ => {
                return self.violation(
                    tonic::Code::FailedPrecondition,
                    "request_headers sent twice",
                )
            }
        }
        self.headers = header_pairs(h.headers.as_ref());
        self.method = self
            .header(":path")
            .map(|p| ApiMethod::from_path(&String::from_utf8_lossy(p)));
        if h.end_of_stream {
            self.route(false, false)
        } else {
            self.phase = Phase::RequestBody;
            Ok(Vec::new())
        }
    }

    fn on_request_body(&mut self, b: HttpBody) -> Out {
        match self.phase {
            Phase::RequestBody => {}
            Phase::Start => {
                return self.violation(
                    tonic::Code::InvalidArgument,
                    "request_body before request_headers",
                )
            }
            _ => {
                return self.violation(
                    tonic::Code::FailedPrecondition,
                    "request_body after the request's end_of_stream",
                )
            }
        }
        if self.body.len() + b.body.len() > self.cfg.max_body_bytes {
            let method = self.method.unwrap_or(ApiMethod::Other);
            self.director.record_rejected(method, 413);
            let err = RouteError::new(
                413,
                format!(
                    "request body exceeds the picker's limit of {} bytes (--max-body-bytes)",
                    self.cfg.max_body_bytes
                ),
            );
            self.phase = Phase::Done;
            return Ok(vec![immediate(&err)]);
        }
        if self.body.is_empty() {
            self.body = b.body;
        } else {
            self.body.extend_from_slice(&b.body);
        }
        if b.end_of_stream {
            self.route(true, false)
        } else {
            Ok(Vec::new())
        }
    }

    fn on_request_trailers(&mut self) -> Out {
        match self.phase {
            // Trailers end a body whose chunks never carried end_of_stream.
            Phase::RequestBody => self.route(true, true),
            Phase::Start => self.violation(
                tonic::Code::InvalidArgument,
                "request_trailers before request_headers",
            ),
            _ => self.violation(
                tonic::Code::FailedPrecondition,
                "request_trailers after the request's end_of_stream",
            ),
        }
    }

    /// Pick an endpoint and answer the request phase. `with_body`: the request had a body phase
    /// (headers-only requests get the short answer); `trailers`: the body ended with trailers.
    fn route(&mut self, with_body: bool, trailers: bool) -> Out {
        let forced = if self.cfg.test_hooks {
            self.header(TEST_SELECTION_HEADER)
                .map(|v| String::from_utf8_lossy(v).into_owned())
                .filter(|v| !v.trim().is_empty())
        } else {
            None
        };
        let rewrite = self
            .header(MODEL_REWRITE_HEADER)
            .map(|v| String::from_utf8_lossy(v).into_owned());
        let body = std::mem::take(&mut self.body);
        let result = self.director.route(RouteRequest {
            method: self.method,
            body: &body,
            subset: self.subset.as_deref(),
            forced: forced.as_deref(),
            model_rewrite: rewrite.as_deref(),
        });
        let routed = match result {
            Ok(r) => r,
            Err(e) => {
                self.phase = Phase::Done;
                return Ok(vec![immediate(&e)]);
            }
        };
        let primary = routed.targets[0].address().to_string();
        let metadata_value = if self.cfg.fallbacks == 0 {
            primary.clone()
        } else {
            routed
                .targets
                .iter()
                .take(1 + self.cfg.fallbacks)
                .map(|e| e.address())
                .collect::<Vec<_>>()
                .join(",")
        };
        let parsed = routed.parsed;
        // Re-serialise only when the model changes; otherwise the bytes go back untouched.
        let out_body = match &parsed.body {
            Some(serde_json::Value::Object(obj))
                if !body.is_empty() && parsed.model != parsed.target_model =>
            {
                let mut obj = obj.clone();
                obj.insert(
                    "model".into(),
                    serde_json::Value::String(parsed.target_model.clone()),
                );
                serde_json::to_vec(&obj).unwrap_or(body)
            }
            _ => body,
        };

        let mut set = vec![header_option(DESTINATION, primary.as_bytes())];
        let generated_id = if self.header(REQUEST_ID_HEADER).is_none() {
            Some(new_request_id())
        } else {
            None
        };
        if with_body {
            if !out_body.is_empty() {
                set.push(header_option(
                    "Content-Length",
                    out_body.len().to_string().as_bytes(),
                ));
            }
            for (k, v) in &self.headers {
                if !system_owned(k) && !envoy_refuses(k) {
                    set.push(header_option(k, v));
                }
            }
        }
        if let Some(id) = &generated_id {
            set.push(header_option(REQUEST_ID_HEADER, id.as_bytes()));
        }
        let mut out = Vec::with_capacity(2 + out_body.len() / BODY_PIECE_BYTES);
        out.push(routed_headers_response(set, &metadata_value));
        if with_body {
            push_body_pieces(&mut out, out_body, !trailers, Direction::Request);
            if trailers {
                out.push(trailers_response(Direction::Request));
            }
        }
        self.routed = Some(RoutedState {
            tracker: routed.tracker,
            incoming_model: parsed.model,
            target_model: parsed.target_model,
            stream_requested: parsed.stream,
            selected: primary,
        });
        self.phase = Phase::Upstream;
        Ok(out)
    }

    fn on_response_headers(
        &mut self,
        h: HttpHeaders,
        md: Option<&Metadata>,
        attributes: &HashMap<String, Struct>,
    ) -> Out {
        match self.phase {
            // Start: a stream that begins at the response (no request phase) must work.
            // RequestBody: a local reply (e.g. a timeout) can arrive before the body ended.
            Phase::Start | Phase::RequestBody | Phase::Upstream => {}
            _ => {
                return self.violation(
                    tonic::Code::FailedPrecondition,
                    "response_headers sent twice or after the response ended",
                )
            }
        }
        self.body = Vec::new();
        let pairs = header_pairs(h.headers.as_ref());
        let find = |name: &str| {
            pairs
                .iter()
                .find(|(k, _)| k.eq_ignore_ascii_case(name))
                .map(|(_, v)| v.as_slice())
        };
        self.status = find(":status")
            .or_else(|| find("status"))
            .and_then(|v| std::str::from_utf8(v).ok())
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(200);
        let event_stream = find("content-type").is_some_and(|v| {
            String::from_utf8_lossy(v)
                .to_ascii_lowercase()
                .contains("text/event-stream")
        });
        self.streaming = event_stream || self.routed.as_ref().is_some_and(|r| r.stream_requested);

        let served = served_endpoint(md, attributes);
        if let (Some(addr), Some(r)) = (&served, self.routed.as_mut()) {
            if r.tracker.endpoint().is_none_or(|e| e.address() != addr) {
                if let Some(ep) = self.director.endpoint_by_address(addr) {
                    tracing::debug!(picked = %r.selected, served = %addr, "gateway served elsewhere");
                    r.tracker.retarget(ep);
                }
            }
        }

        let mut set = vec![header_option(RESPONSE_MARKER_HEADER, b"true")];
        for (k, v) in &pairs {
            if !k.starts_with(':')
                && !system_owned(k)
                && !k.eq_ignore_ascii_case(RESPONSE_MARKER_HEADER)
            {
                set.push(header_option(k, v));
            }
        }
        if self.cfg.test_hooks {
            if let Some(s) = &served {
                set.push(header_option(TEST_SERVED_HEADER, s.as_bytes()));
            }
            if let Some(r) = &self.routed {
                set.push(header_option(TEST_SELECTED_HEADER, r.selected.as_bytes()));
            }
        }
        let out = vec![ProcessingResponse {
            response: Some(processing_response::Response::ResponseHeaders(
                HeadersResponse {
                    response: Some(CommonResponse {
                        header_mutation: Some(HeaderMutation {
                            set_headers: set,
                            remove_headers: Vec::new(),
                        }),
                        ..Default::default()
                    }),
                },
            )),
            ..Default::default()
        }];
        if h.end_of_stream {
            self.finish();
        } else {
            self.phase = Phase::ResponseBody;
        }
        Ok(out)
    }

    fn on_response_body(&mut self, b: HttpBody) -> Out {
        if self.phase != Phase::ResponseBody {
            return self.violation(
                tonic::Code::FailedPrecondition,
                if self.phase == Phase::Done {
                    "response_body after the response's end_of_stream"
                } else {
                    "response_body before response_headers"
                },
            );
        }
        let mut out = Vec::new();
        if self.streaming {
            // Echo at once, byte for byte (bar the model-name swap back), never delayed.
            let chunk = self.restore_model(b.body);
            out.push(body_response(chunk, b.end_of_stream, Direction::Response));
        } else {
            self.response_buf.extend_from_slice(&b.body);
            if b.end_of_stream {
                let whole = std::mem::take(&mut self.response_buf);
                let whole = self.restore_model(whole);
                push_body_pieces(&mut out, whole, true, Direction::Response);
            }
        }
        if b.end_of_stream {
            self.finish();
        }
        Ok(out)
    }

    fn on_response_trailers(&mut self) -> Out {
        if self.phase != Phase::ResponseBody {
            return self.violation(
                tonic::Code::FailedPrecondition,
                "response_trailers outside the response body phase",
            );
        }
        let mut out = Vec::new();
        if !self.streaming && !self.response_buf.is_empty() {
            let whole = std::mem::take(&mut self.response_buf);
            let whole = self.restore_model(whole);
            push_body_pieces(&mut out, whole, false, Direction::Response);
        }
        out.push(trailers_response(Direction::Response));
        self.finish();
        Ok(out)
    }

    /// The response ended: settle the request with the status the client got.
    fn finish(&mut self) {
        self.phase = Phase::Done;
        if let Some(r) = self.routed.take() {
            r.tracker.finish(self.status);
        }
    }

    /// Put the client's model name back where the server echoes the target model.
    fn restore_model(&self, body: Vec<u8>) -> Vec<u8> {
        match &self.routed {
            Some(r)
                if !r.incoming_model.is_empty()
                    && !r.target_model.is_empty()
                    && r.incoming_model != r.target_model =>
            {
                replace_model(body, &r.target_model, &r.incoming_model)
            }
            _ => body,
        }
    }

    fn header(&self, name: &str) -> Option<&[u8]> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_slice())
    }
}

/// Which half of the HTTP exchange an answer belongs to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Direction {
    Request,
    Response,
}

/// The served endpoint the gateway reports: `envoy.lb` metadata (the protocol), else the
/// `upstream.address` attribute (what the shipped Envoy config asks for).
fn served_endpoint(md: Option<&Metadata>, attributes: &HashMap<String, Struct>) -> Option<String> {
    let from_md = md
        .and_then(|m| m.filter_metadata.get(LB_NAMESPACE))
        .and_then(|s| s.fields.get(SERVED))
        .and_then(|v| match &v.kind {
            Some(Kind::StringValue(s)) if !s.is_empty() => Some(s.clone()),
            _ => None,
        });
    from_md.or_else(|| {
        attributes
            .get(EXT_PROC_ATTRIBUTES)
            .and_then(|s| s.fields.get(UPSTREAM_ADDRESS_ATTRIBUTE))
            .and_then(|v| match &v.kind {
                Some(Kind::StringValue(s)) if !s.is_empty() => Some(s.clone()),
                _ => None,
            })
    })
}

/// Inbound headers as (name, value) pairs; Envoy sends `raw_value` (older ones `value`).
fn header_pairs(map: Option<&HeaderMap>) -> Vec<(String, Vec<u8>)> {
    map.map(|m| {
        m.headers
            .iter()
            .map(|h| {
                let v = if h.raw_value.is_empty() {
                    h.value.as_bytes().to_vec()
                } else {
                    h.raw_value.clone()
                };
                (h.key.clone(), v)
            })
            .collect()
    })
    .unwrap_or_default()
}

/// A `set` header mutation (raw value bytes).
pub fn header_option(key: &str, value: &[u8]) -> HeaderValueOption {
    HeaderValueOption {
        header: Some(HeaderValue {
            key: key.to_string(),
            value: String::new(),
            raw_value: value.to_vec(),
        }),
        ..Default::default()
    }
}

fn string_value(s: &str) -> Value {
    Value {
        kind: Some(Kind::StringValue(s.to_string())),
    }
}

/// `{"envoy.lb": {"x-gateway-destination-endpoint": value}}`.
pub fn destination_metadata(value: &str) -> Struct {
    let inner = Struct {
        fields: HashMap::from([(DESTINATION.to_string(), string_value(value))]),
    };
    Struct {
        fields: HashMap::from([(
            LB_NAMESPACE.to_string(),
            Value {
                kind: Some(Kind::StructValue(inner)),
            },
        )]),
    }
}

/// `filter_metadata` carrying a subset hint (for clients and tests).
pub fn subset_metadata(endpoints: &[&str]) -> Metadata {
    let list = Value {
        kind: Some(Kind::ListValue(ListValue {
            values: endpoints.iter().map(|e| string_value(e)).collect(),
        })),
    };
    Metadata {
        filter_metadata: HashMap::from([(
            SUBSET_NAMESPACE.to_string(),
            Struct {
                fields: HashMap::from([(SUBSET.to_string(), list)]),
            },
        )]),
        ..Default::default()
    }
}

fn immediate(err: &RouteError) -> ProcessingResponse {
    ProcessingResponse {
        response: Some(processing_response::Response::ImmediateResponse(
            ImmediateResponse {
                status: Some(HttpStatus {
                    code: i32::from(err.status),
                }),
                headers: Some(HeaderMutation {
                    set_headers: vec![header_option("content-type", b"application/json")],
                    remove_headers: Vec::new(),
                }),
                body: err.json_body(),
                grpc_status: None,
                details: format!("epp: {}", err.message),
            },
        )),
        ..Default::default()
    }
}

/// The request-headers answer that carries a pick: `set` (the destination header first), the
/// `envoy.lb` metadata with `metadata_value`, and `clear_route_cache` so Envoy re-routes on it.
pub fn routed_headers_response(
    set: Vec<HeaderValueOption>,
    metadata_value: &str,
) -> ProcessingResponse {
    ProcessingResponse {
        response: Some(processing_response::Response::RequestHeaders(
            HeadersResponse {
                response: Some(CommonResponse {
                    header_mutation: Some(HeaderMutation {
                        set_headers: set,
                        remove_headers: Vec::new(),
                    }),
                    clear_route_cache: true,
                    ..Default::default()
                }),
            },
        )),
        dynamic_metadata: Some(destination_metadata(metadata_value)),
        ..Default::default()
    }
}

/// A `streamed_response` body answer carrying `chunk`.
pub fn body_response(chunk: Vec<u8>, end_of_stream: bool, dir: Direction) -> ProcessingResponse {
    let br = BodyResponse {
        response: Some(CommonResponse {
            body_mutation: Some(BodyMutation {
                mutation: Some(body_mutation::Mutation::StreamedResponse(
                    StreamedBodyResponse {
                        body: chunk,
                        end_of_stream,
                        ..Default::default()
                    },
                )),
            }),
            ..Default::default()
        }),
    };
    ProcessingResponse {
        response: Some(match dir {
            Direction::Request => processing_response::Response::RequestBody(br),
            Direction::Response => processing_response::Response::ResponseBody(br),
        }),
        ..Default::default()
    }
}

/// An empty trailers answer.
pub fn trailers_response(dir: Direction) -> ProcessingResponse {
    let t = TrailersResponse::default();
    ProcessingResponse {
        response: Some(match dir {
            Direction::Request => processing_response::Response::RequestTrailers(t),
            Direction::Response => processing_response::Response::ResponseTrailers(t),
        }),
        ..Default::default()
    }
}

/// Split a body into pieces of at most [`BODY_PIECE_BYTES`]; end_of_stream (if `eos`) only on
/// the last. An empty body still gives one piece.
fn push_body_pieces(out: &mut Vec<ProcessingResponse>, body: Vec<u8>, eos: bool, dir: Direction) {
    if body.len() <= BODY_PIECE_BYTES {
        out.push(body_response(body, eos, dir));
        return;
    }
    let n = body.len().div_ceil(BODY_PIECE_BYTES);
    for (i, piece) in body.chunks(BODY_PIECE_BYTES).enumerate() {
        out.push(body_response(piece.to_vec(), eos && i + 1 == n, dir));
    }
}

/// Number of pieces a body of `len` bytes is re-sent in.
pub fn piece_count(len: usize) -> usize {
    len.div_ceil(BODY_PIECE_BYTES).max(1)
}

/// Replace `"model":"from"` (and `"model": "from"`) by the same with `to`.
fn replace_model(body: Vec<u8>, from: &str, to: &str) -> Vec<u8> {
    let mut out = body;
    for sep in [":", ": "] {
        let needle = format!("\"model\"{sep}\"{from}\"");
        if !contains(&out, needle.as_bytes()) {
            continue;
        }
        let repl = format!("\"model\"{sep}\"{to}\"");
        let mut next = Vec::with_capacity(out.len());
        let mut rest: &[u8] = &out;
        while let Some(i) = find(rest, needle.as_bytes()) {
            next.extend_from_slice(&rest[..i]);
            next.extend_from_slice(repl.as_bytes());
            rest = &rest[i + needle.len()..];
        }
        next.extend_from_slice(rest);
        out = next;
    }
    out
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    if needle.is_empty() || hay.len() < needle.len() {
        return None;
    }
    hay.windows(needle.len()).position(|w| w == needle)
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    find(hay, needle).is_some()
}

/// A random UUID (version 4) for requests that arrive without `x-request-id`.
fn new_request_id() -> String {
    let mut b: [u8; 16] = rand::random();
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    let h: String = b.iter().map(|x| format!("{x:02x}")).collect();
    format!(
        "{}-{}-{}-{}-{}",
        &h[0..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..32]
    )
}

/// Whether the picker can take traffic (the same rule as the HTTP `/readyz` probe).
pub fn is_ready(ds: &Datastore) -> bool {
    crate::app::readiness(ds).is_ok()
}

/// Keep the gRPC health services in step with readiness: `liveness` is always SERVING;
/// `readiness` and the ext_proc service follow [`is_ready`]. Runs until `stop` resolves.
pub async fn run_health(
    reporter: tonic_health::server::HealthReporter,
    ready: ReadyProbe,
    mut changes: tokio::sync::watch::Receiver<u64>,
    stop: impl std::future::Future<Output = ()>,
) {
    use tonic_health::ServingStatus;
    reporter
        .set_service_status("liveness", ServingStatus::Serving)
        .await;
    reporter
        .set_service_status("", ServingStatus::Serving)
        .await;
    let mut last = None;
    tokio::pin!(stop);
    loop {
        let ready = ready();
        if last != Some(ready) {
            let st = if ready {
                ServingStatus::Serving
            } else {
                ServingStatus::NotServing
            };
            reporter.set_service_status("readiness", st).await;
            reporter.set_service_status(SERVICE_NAME, st).await;
            last = Some(ready);
        }
        // Sync and leadership change without a notification, so also poll once a second.
        tokio::select! {
            _ = &mut stop => break,
            _ = changes.changed() => {}
            _ = tokio::time::sleep(std::time::Duration::from_secs(1)) => {}
        }
    }
    for s in ["liveness", "readiness", SERVICE_NAME, ""] {
        reporter
            .set_service_status(s, ServingStatus::NotServing)
            .await;
    }
}

/// Serve the ext_proc service on `listener` until `stop` resolves (in-flight streams are
/// given until they end; callers bound that with their grace period).
pub async fn serve(
    service: ExtProcService,
    listener: tokio::net::TcpListener,
    stop: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<(), tonic::transport::Error> {
    let incoming = tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true));
    tonic::transport::Server::builder()
        .http2_keepalive_interval(Some(std::time::Duration::from_secs(30)))
        .add_service(service.into_server())
        .serve_with_incoming_shutdown(incoming, stop)
        .await
}

/// As [`serve`], terminating TLS first (`--secure-serving`) with the accept loop and
/// certificate reloading the metrics port uses too ([`crate::tls`]); until `shutdown`.
pub async fn serve_tls(
    service: ExtProcService,
    listener: tokio::net::TcpListener,
    tls: TlsSetup,
    shutdown: Shutdown,
) -> Result<(), tonic::transport::Error> {
    let incoming = tls
        .serve_listener(listener, shutdown.clone())
        .into_incoming();
    tonic::transport::Server::builder()
        .http2_keepalive_interval(Some(std::time::Duration::from_secs(30)))
        .add_service(service.into_server())
        .serve_with_incoming_shutdown(incoming, shutdown.wait())
        .await
}

/// Serve gRPC health (`grpc.health.v1.Health`) on `listener`, following readiness of `ds`.
pub async fn serve_health(
    ds: Datastore,
    listener: tokio::net::TcpListener,
    shutdown: Shutdown,
) -> Result<(), tonic::transport::Error> {
    let changes = ds.subscribe();
    let ready: ReadyProbe = Arc::new(move || is_ready(&ds));
    serve_health_with(ready, changes, listener, shutdown).await
}

/// Readiness as the gRPC health server sees it.
pub type ReadyProbe = Arc<dyn Fn() -> bool + Send + Sync>;

/// As [`serve_health`], with any readiness rule (e.g. the runtime's, which includes
/// leadership); `changes` wakes the reporter early when the endpoint set changes.
pub async fn serve_health_with(
    ready: ReadyProbe,
    changes: tokio::sync::watch::Receiver<u64>,
    listener: tokio::net::TcpListener,
    shutdown: Shutdown,
) -> Result<(), tonic::transport::Error> {
    let (reporter, health) = tonic_health::server::health_reporter();
    let reporting = tokio::spawn(run_health(reporter, ready, changes, shutdown.wait()));
    let stop = shutdown.wait();
    let incoming = tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true));
    let served = tonic::transport::Server::builder()
        .add_service(health)
        .serve_with_incoming_shutdown(incoming, stop)
        .await;
    // The reporter stops on the same signal; wait so its readiness probe is released.
    let _ = reporting.await;
    served
}

/// Everything `epp serve` needs: the shared picker runtime plus the two gRPC listeners.
#[derive(Clone, Debug)]
pub struct ServeOptions {
    pub grpc_addr: SocketAddr,
    pub grpc_health_addr: SocketAddr,
    pub extproc: ExtProcConfig,
    /// TLS on the ext_proc port (`--secure-serving`; files, or neither for self-signed);
    /// `None` = plaintext h2c.
    pub tls: Option<TlsSettings>,
    pub picker: PickerOptions,
}

/// `epp serve`'s own listen addresses (read through [`ServeHandle`], e.g. `handle.grpc_addr`).
#[derive(Clone, Copy, Debug)]
pub struct ServeAddrs {
    pub grpc_addr: SocketAddr,
    pub grpc_health_addr: SocketAddr,
}

/// A running `epp serve` (used by the CLI and tests).
pub type ServeHandle = FrontEndHandle<ServeAddrs>;

/// Validate, start the picker runtime, bind both gRPC listeners and serve in the background
/// until `shutdown` fires.
pub async fn spawn_with_shutdown(
    opts: ServeOptions,
    shutdown: Shutdown,
) -> anyhow::Result<ServeHandle> {
    if opts.extproc.max_body_bytes == 0 {
        anyhow::bail!("--max-body-bytes must be greater than 0");
    }
    // Certificate errors (naming --cert-path/--key-path and the file) before binding anything.
    let tls = opts
        .tls
        .as_ref()
        .map(|t| t.setup(TlsPort::GRPC))
        .transpose()?;
    let validated = opts.picker.validate()?;
    let picker = Picker::start(opts.picker.clone(), validated, shutdown.clone()).await?;
    let grpc = serving::bind(opts.grpc_addr, "--grpc-port").await?;
    let grpc_addr = grpc.local_addr()?;
    let health = serving::bind(opts.grpc_health_addr, "--grpc-health-port").await?;
    let grpc_health_addr = health.local_addr()?;
    tracing::info!(
        grpc = %grpc_addr,
        grpc_health = %grpc_health_addr,
        tls = tls.as_ref().map_or("off", |t| t.describe()),
        test_hooks = opts.extproc.test_hooks,
        fallbacks = opts.extproc.fallbacks,
        max_body_bytes = opts.extproc.max_body_bytes,
        "ext_proc server listening"
    );
    let service = ExtProcService::new(picker.director.clone(), opts.extproc.clone());
    let grace = opts.picker.grace_period;
    // gRPC readiness is the runtime's (datastore synced, endpoints known, leader if HA).
    let changes = picker.datastore.subscribe();
    let picker = Arc::new(picker);
    let ready: ReadyProbe = {
        let p = picker.clone();
        Arc::new(move || p.is_ready().is_ok())
    };
    let addrs = ServeAddrs {
        grpc_addr,
        grpc_health_addr,
    };
    let run = move |picker: Arc<Picker>| async move {
        let health_task = tokio::spawn(serve_health_with(ready, changes, health, shutdown.clone()));
        let server: std::pin::Pin<
            Box<dyn std::future::Future<Output = Result<(), tonic::transport::Error>> + Send>,
        > = match tls {
            Some(tls) => Box::pin(serve_tls(service, grpc, tls, shutdown.clone())),
            None => Box::pin(serve(service, grpc, shutdown.wait())),
        };
        let server = async move {
            if let Err(e) = server.await {
                tracing::error!(error = %e, "ext_proc server failed");
            }
        };
        serve_within_grace(server, &shutdown, grace, "streams").await;
        let _ = tokio::time::timeout(grace, health_task).await;
        match Arc::try_unwrap(picker) {
            Ok(p) => p.join().await,
            Err(_) => {
                tracing::warn!("gRPC health server still running; not waiting for background tasks")
            }
        }
        tracing::info!("ext_proc server stopped");
    };
    Ok(FrontEndHandle::spawn(addrs, picker, run))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pieces() {
        for (len, n) in [
            (0, 1),
            (61_000, 1),
            (62_000, 1),
            (62_001, 2),
            (63_000, 2),
            (125_000, 3),
        ] {
            let mut out = Vec::new();
            push_body_pieces(&mut out, vec![b'x'; len], true, Direction::Request);
            assert_eq!(out.len(), n, "len {len}");
            assert_eq!(piece_count(len), n);
            let eos: Vec<bool> = out
                .iter()
                .map(|r| match &r.response {
                    Some(processing_response::Response::RequestBody(b)) => {
                        match &b
                            .response
                            .as_ref()
                            .unwrap()
                            .body_mutation
                            .as_ref()
                            .unwrap()
                            .mutation
                        {
                            Some(body_mutation::Mutation::StreamedResponse(s)) => s.end_of_stream,
                            _ => panic!(),
                        }
                    }
                    _ => panic!(),
                })
                .collect();
            assert!(eos[..n - 1].iter().all(|e| !e) && eos[n - 1]);
        }
    }

    #[test]
    fn model_swap_back() {
        let b = br#"{"id":"x","model":"t","x":{"model": "t"},"m":"t"}"#.to_vec();
        assert_eq!(
            replace_model(b, "t", "in"),
            br#"{"id":"x","model":"in","x":{"model": "in"},"m":"t"}"#.to_vec()
        );
        assert_eq!(
            replace_model(b"data: [DONE]".to_vec(), "t", "in"),
            b"data: [DONE]"
        );
    }

    #[test]
    fn request_ids_are_uuid_v4() {
        let id = new_request_id();
        assert_eq!(id.len(), 36);
        assert_eq!(&id[14..15], "4");
        assert_ne!(id, new_request_id());
    }

    #[test]
    fn system_headers() {
        assert!(system_owned("Content-Length"));
        assert!(system_owned("X-Gateway-Destination-Endpoint"));
        assert!(!system_owned("x-request-id"));
        assert!(envoy_refuses(":authority") && envoy_refuses("x-envoy-expected-rq-timeout-ms"));
        assert!(!envoy_refuses(":path"));
    }
}

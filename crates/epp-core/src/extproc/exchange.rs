//! One HTTP request's ext_proc conversation as a pure state machine: `handle` maps one inbound
//! message to the answers to send, so the protocol is testable (and fuzzable) without I/O. The
//! gateway headers are read through [`crate::gateway`] and the request lifecycle (pick, body
//! mutation, passive health, completion) is the director's; this only follows the phases.

use std::collections::HashMap;
use std::sync::Arc;

use envoy_types::pb::envoy::config::core::v3::Metadata;
use envoy_types::pb::envoy::service::ext_proc::v3::{
    processing_request, processing_response, CommonResponse, HeaderMutation, HeadersResponse,
    HttpBody, HttpHeaders, ProcessingRequest, ProcessingResponse,
};
use envoy_types::pb::google::protobuf::{value::Kind, Struct};
use tonic::Status;

use super::wire::{
    body_response, header_option, header_overwrite, header_pairs, immediate, push_body_pieces,
    routed_headers_response, served_endpoint, trailers_response, Direction, BODY_PIECE_BYTES,
};
use super::ExtProcConfig;
use crate::director::{Director, RequestTracker, RouteRequest};
use crate::gateway::headers::{
    self, system_owned, DESTINATION, RESPONSE_MARKER, SUBSET, SUBSET_NAMESPACE, TEST_SELECTED,
    TEST_SERVED,
};
use crate::gateway::{BodyLimit, GatewayPolicy, HeaderLookup, InboundHeaders, Reservation};
use crate::request::ApiMethod;

/// Headers Envoy's default mutation rules refuse to set (they would only show up as
/// `rejected_header_mutations`), so echoing them is pointless.
fn envoy_refuses(key: &str) -> bool {
    matches!(key, ":authority" | ":method" | ":scheme" | "host") || key.starts_with("x-envoy-")
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
    /// What the buffered request body holds against the shared budget.
    reservation: Option<Reservation>,
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
            reservation: None,
        }
    }

    /// The request has started but not yet been answered (headers or body still arriving).
    pub fn request_open(&self) -> bool {
        matches!(self.phase, Phase::Start | Phase::RequestBody)
    }

    /// The conversation is over; the server ends the stream.
    pub fn finished(&self) -> bool {
        self.phase == Phase::Done
    }

    pub async fn handle(&mut self, msg: ProcessingRequest) -> Out {
        use processing_request::Request as R;
        let Some(req) = msg.request else {
            return self.violation(
                tonic::Code::InvalidArgument,
                "a ProcessingRequest with no request or response part (empty or unknown message)",
            );
        };
        match req {
            R::RequestHeaders(h) => {
                self.update_subset(msg.metadata_context.as_ref());
                self.on_request_headers(h).await
            }
            R::RequestBody(b) => {
                self.update_subset(msg.metadata_context.as_ref());
                self.on_request_body(b).await
            }
            R::RequestTrailers(_) => self.on_request_trailers().await,
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
        if self.cfg.ignore_subset {
            return;
        }
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

    async fn on_request_headers(&mut self, h: HttpHeaders) -> Out {
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
        self.method = self.header(":path").map(ApiMethod::from_path);
        if h.end_of_stream {
            self.route(false, false).await
        } else {
            self.phase = Phase::RequestBody;
            Ok(Vec::new())
        }
    }

    async fn on_request_body(&mut self, b: HttpBody) -> Out {
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
        let limit = BodyLimit::new(self.cfg.max_body_bytes);
        if limit.exceeded_by(self.body.len() + b.body.len()) {
            let method = self.method.unwrap_or(ApiMethod::Other);
            self.director.record_answered(method, 413);
            self.phase = Phase::Done;
            self.reservation = None;
            return Ok(vec![immediate(&limit.error())]);
        }
        let budget = self.director.body_budget();
        let reservation = self.reservation.get_or_insert_with(|| budget.reservation());
        if !reservation.grow(b.body.len()) {
            let method = self.method.unwrap_or(ApiMethod::Other);
            self.director.record_answered(method, 503);
            self.phase = Phase::Done;
            self.reservation = None;
            self.body = Vec::new();
            return Ok(vec![immediate(&budget.error())]);
        }
        if self.body.is_empty() {
            self.body = b.body;
        } else {
            self.body.extend_from_slice(&b.body);
        }
        if b.end_of_stream {
            self.route(true, false).await
        } else {
            Ok(Vec::new())
        }
    }

    async fn on_request_trailers(&mut self) -> Out {
        match self.phase {
            // Trailers end a body whose chunks never carried end_of_stream.
            Phase::RequestBody => self.route(true, true).await,
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
    async fn route(&mut self, with_body: bool, trailers: bool) -> Out {
        let inbound = InboundHeaders::read(
            self.headers.as_slice(),
            GatewayPolicy {
                test_hooks: self.cfg.test_hooks,
            },
        )
        .with_plugin_headers(
            self.headers.as_slice(),
            self.director.scheduler().request_headers(),
        );
        let body = std::mem::take(&mut self.body);
        self.reservation = None;
        let result = self
            .director
            .route(RouteRequest {
                method: self.method,
                body: &body,
                subset: self.subset.as_deref(),
                headers: &inbound,
            })
            .await;
        let mut routed = match result {
            Ok(r) => r,
            Err(e) => {
                self.phase = Phase::Done;
                return Ok(vec![immediate(&e)]);
            }
        };
        // Where the gateway sends it: the pick, or the pod's primary port (data-parallel).
        let primary = routed.destination(0);
        let metadata_value = if self.cfg.fallbacks == 0 {
            primary.clone()
        } else {
            (0..routed.targets.len().min(1 + self.cfg.fallbacks))
                .map(|i| routed.destination(i))
                .collect::<Vec<_>>()
                .join(",")
        };
        // The routing sidecar's headers: ours are set, a client's never pass.
        let upstream = routed.upstream_headers();
        let remove: Vec<String> = headers::DISAGG_HEADERS
            .iter()
            .filter(|h| !upstream.iter().any(|(k, _)| k == *h))
            .map(|h| h.to_string())
            .collect();
        let stream_requested = routed.parsed.stream;
        // The director re-serialises only when the model changes; otherwise the bytes go back
        // untouched.
        let out_body = routed.body.take().unwrap_or(body);

        let mut set = vec![header_overwrite(DESTINATION, primary.as_bytes())];
        for (k, v) in &upstream {
            set.push(header_overwrite(k, v.as_bytes()));
        }
        let (request_id, generated) = inbound.request_id_or_new();
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
        if generated {
            set.push(header_option(headers::REQUEST_ID, request_id.as_bytes()));
        }
        let mut out = Vec::with_capacity(2 + out_body.len() / BODY_PIECE_BYTES);
        let scores: Vec<(String, f64)> = if self.cfg.emit_endpoint_scores {
            routed
                .scores
                .iter()
                .take(1 + self.cfg.fallbacks)
                .enumerate()
                .map(|(i, s)| (routed.destination(i), *s))
                .collect()
        } else {
            Vec::new()
        };
        out.push(routed_headers_response(
            set,
            remove,
            &metadata_value,
            &scores,
        ));
        if with_body {
            push_body_pieces(&mut out, out_body, !trailers, Direction::Request);
            if trailers {
                out.push(trailers_response(Direction::Request));
            }
        }
        self.routed = Some(RoutedState {
            tracker: routed.tracker,
            stream_requested,
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
            Phase::Start => {
                return self.violation(
                    tonic::Code::InvalidArgument,
                    "response_headers before request_headers",
                )
            }
            // RequestBody: a local reply (e.g. a timeout) can arrive before the body ended.
            Phase::RequestBody | Phase::Upstream => {}
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
            // Served where we sent it (with the data-parallel handler that is the pod's
            // primary port, not the rank we picked): nothing moved.
            if *addr != r.selected && r.tracker.endpoint().is_none_or(|e| e.address() != addr) {
                if let Some(ep) = self.director.endpoint_by_address(addr) {
                    tracing::debug!(picked = %r.selected, served = %addr, "gateway served elsewhere");
                    r.tracker.retarget(ep);
                }
            }
        }

        // What the upstream answered feeds its passive health (5xx against it), in this mode
        // as in the proxy.
        if let Some(r) = &self.routed {
            r.tracker.upstream_status(self.status);
        }

        let mut set = vec![header_option(RESPONSE_MARKER, b"true")];
        for (k, v) in &pairs {
            if !k.starts_with(':') && !system_owned(k) && !k.eq_ignore_ascii_case(RESPONSE_MARKER) {
                set.push(header_option(k, v));
            }
        }
        if self.cfg.test_hooks {
            if let Some(s) = &served {
                set.push(header_option(TEST_SERVED, s.as_bytes()));
            }
            if let Some(r) = &self.routed {
                set.push(header_option(TEST_SELECTED, r.selected.as_bytes()));
            }
        }
        // What the scheduler's plugins answer with (e.g. the session token).
        if let Some(r) = &self.routed {
            for (k, v) in r.tracker.response_headers() {
                set.push(header_option(&k, v.as_bytes()));
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
    fn restore_model(&mut self, body: Vec<u8>) -> Vec<u8> {
        match &mut self.routed {
            Some(r) => r.tracker.response_chunk(body),
            None => body,
        }
    }

    fn header(&self, name: &str) -> Option<&str> {
        self.headers.as_slice().lookup(name)
    }
}

#[cfg(test)]
mod tests {
    use super::envoy_refuses;

    #[test]
    fn envoy_refused_headers() {
        assert!(envoy_refuses(":authority") && envoy_refuses("x-envoy-expected-rq-timeout-ms"));
        assert!(!envoy_refuses(":path"));
    }
}

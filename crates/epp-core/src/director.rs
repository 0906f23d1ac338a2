//! The request lifecycle both front-ends call: parse → admission → schedule → body mutation →
//! track the in-flight request (passive health, response usage and model restore) → complete
//! (prefix index, counters, metrics). The ext_proc service and the
//! HTTP proxy only translate their wire formats to and from this module, so routing behaviour and
//! metrics cannot drift between the two modes.

use std::sync::Arc;
use std::time::Instant;

use serde_json::json;

pub mod metrics;

use crate::admission::{Admission, AdmissionRequest, AdmitAll, Objectives};
use crate::datastore::{
    Datastore, DatastoreWriter, Endpoint, FailureKind, HealthSink, InFlight, Source,
};
use crate::gateway::rewrite::{self, ModelRestorer};
use crate::gateway::usage::UsageTail;
use crate::gateway::{BodyBudget, InboundHeaders};
use crate::metrics::llmd::{error_code_for_status, RequestIdentity, ResponseSummary};
use crate::metrics::Metrics;
use crate::parsers::Parse;
use crate::precise::PrecisePrefix;
use crate::prefix::{PrefixIndex, PromptHashes};
use crate::request::{parse_body, parse_body_or, ApiMethod, BadRequest, ParsedRequest};
use crate::scheduler::{
    DecisionType, Hints, PrefixMatches, RequestData, SchedCtx, ScheduleError, Scheduler,
    SourceMatch,
};

/// Status a request gets when the client goes away before its response completed
/// (nginx's "client closed request").
pub const STATUS_CLIENT_CLOSED: u16 = 499;

/// One request as a front-end hands it over.
#[derive(Debug, Clone, Copy)]
pub struct RouteRequest<'a> {
    pub method: Option<ApiMethod>,
    pub body: &'a [u8],
    /// Gateway subset hint: only these addresses may be picked.
    pub subset: Option<&'a [String]>,
    /// The gateway headers, read under the front-end's [`GatewayPolicy`]
    /// (forced pick, model rewrite, objective, fairness id).
    ///
    /// [`GatewayPolicy`]: crate::gateway::GatewayPolicy
    pub headers: &'a InboundHeaders,
}

static NO_HEADERS: InboundHeaders = InboundHeaders {
    request_id: None,
    forced: None,
    model_rewrite: None,
    objective: None,
    fairness_id: None,
    plugin_headers: Vec::new(),
};

impl Default for RouteRequest<'_> {
    fn default() -> Self {
        Self {
            method: None,
            body: &[],
            subset: None,
            headers: &NO_HEADERS,
        }
    }
}

/// A refusal, with the HTTP status the client gets and a message it can act on.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct RouteError {
    pub status: u16,
    pub message: String,
    pub param: Option<String>,
    /// llm-d-router's `x-llm-d-request-dropped-reason` for a request the picker dropped before
    /// any model server saw it (`rejected-saturated`, `rejected-no-endpoints`,
    /// `rejected-ttl-expired`, `rejected-context-cancelled`, `evicted`); both front-ends send it
    /// as a response header.
    pub dropped_reason: Option<&'static str>,
}

impl RouteError {
    pub fn new(status: u16, message: impl Into<String>) -> Self {
        Self {
            status,
            message: message.into(),
            param: None,
            dropped_reason: None,
        }
    }

    /// The same refusal, naming why the request was dropped.
    pub fn dropped(mut self, reason: &'static str) -> Self {
        self.dropped_reason = Some(reason);
        self
    }

    /// OpenAI-style error type for the status.
    pub fn error_type(&self) -> &'static str {
        error_type(self.status)
    }

    /// The JSON body both front-ends send.
    pub fn json_body(&self) -> Vec<u8> {
        error_body(self.status, &self.message, self.param.as_deref())
    }
}

pub fn error_type(status: u16) -> &'static str {
    match status {
        400 => "invalid_request_error",
        404 => "not_found_error",
        405 => "invalid_request_error",
        408 => "invalid_request_error",
        413 => "request_too_large",
        414 | 431 => "invalid_request_error",
        429 => "rate_limit_exceeded",
        502 => "bad_gateway",
        503 => "service_unavailable",
        504 => "gateway_timeout",
        _ => "internal_error",
    }
}

/// The OpenAI-style `code` string for a status the picker itself answers with.
pub fn error_code(status: u16) -> &'static str {
    match status {
        400 => "invalid_request",
        404 => "not_found",
        405 => "method_not_allowed",
        408 => "request_timeout",
        413 => "request_too_large",
        414 => "uri_too_long",
        431 => "request_header_fields_too_large",
        429 => "rate_limited",
        499 => "client_closed_request",
        502 => "upstream_failed",
        503 => "no_endpoint_available",
        504 => "upstream_timeout",
        _ => "internal_error",
    }
}

/// `{"error": {"message", "type", "param", "code"}}` (`code` a string, as OpenAI's).
pub fn error_body(status: u16, message: &str, param: Option<&str>) -> Vec<u8> {
    serde_json::to_vec(&json!({
        "error": {
            "message": message,
            "type": error_type(status),
            "param": param,
            "code": error_code(status),
        }
    }))
    .unwrap_or_default()
}

impl From<BadRequest> for RouteError {
    fn from(e: BadRequest) -> Self {
        Self {
            status: 400,
            message: e.message,
            param: e.param,
            dropped_reason: None,
        }
    }
}

impl From<ScheduleError> for RouteError {
    fn from(e: ScheduleError) -> Self {
        use crate::gateway::headers::dropped;
        let (status, reason) = match e {
            ScheduleError::Saturated => (429, Some(dropped::SATURATED)),
            ScheduleError::NoForcedMatch(_) => (503, None),
            _ => (503, Some(dropped::NO_ENDPOINTS)),
        };
        let mut r = Self::new(status, e.to_string());
        r.dropped_reason = reason;
        r
    }
}

/// A routing decision plus the tracker that completes it.
#[derive(Debug)]
pub struct Routed {
    pub parsed: ParsedRequest,
    /// Primary first, then fallbacks.
    pub targets: Vec<Arc<Endpoint>>,
    pub decision: DecisionType,
    /// The scheduler's weighted score of each target (same order).
    pub scores: Vec<f64>,
    pub tracker: RequestTracker,
    /// The body to forward when it differs from the client's (the model rewrite); `None`: the
    /// client's bytes go out untouched.
    pub body: Option<Vec<u8>>,
    /// The prefill pick of a disaggregated request (`None`: decode-only). Behind Envoy it goes
    /// out as `x-prefiller-host-port`; `epp proxy` calls it itself before the decode.
    pub prefill: Option<Arc<Endpoint>>,
    /// The data-parallel handler's primary port: the gateway sends the request to this port
    /// of the picked pod, with the picked rank in `x-data-parallel-host-port`.
    pub data_parallel_port: Option<u16>,
}

impl Routed {
    /// Request headers the picker sets for the upstream (the disaggregation and data-parallel
    /// headers llm-d's routing sidecar reads). The names in
    /// [`DISAGG_HEADERS`](crate::gateway::headers::DISAGG_HEADERS) not set here must be
    /// removed from what the client sent.
    pub fn upstream_headers(&self) -> Vec<(&'static str, String)> {
        use crate::gateway::headers::{DATA_PARALLEL_HOST_PORT, PREFILLER_HOST_PORT};
        let mut out = Vec::new();
        if let Some(p) = &self.prefill {
            out.push((PREFILLER_HOST_PORT, p.address().to_string()));
        }
        if self.data_parallel_port.is_some() {
            out.push((
                DATA_PARALLEL_HOST_PORT,
                self.targets[0].address().to_string(),
            ));
        }
        out
    }

    /// Where the gateway sends the request for target `i`: its address, or with the
    /// data-parallel handler the pod's primary port.
    pub fn destination(&self, i: usize) -> String {
        let addr = self.targets[i].address();
        match self.data_parallel_port {
            Some(port) => match addr.rsplit_once(':') {
                Some((host, _)) => format!("{host}:{port}"),
                None => format!("{addr}:{port}"),
            },
            None => addr.to_string(),
        }
    }
}

/// Tracks one routed request until its response ends. Dropping it without [`finish`] counts
/// the request as aborted by the client (status 499).
///
/// The front-end reports what the upstream did ([`upstream_status`], [`upstream_failed`]);
/// those reports, and only those, feed the endpoint's passive health. Local errors (a request
/// that cannot be forwarded, a client that goes away) never count against an endpoint.
///
/// [`finish`]: RequestTracker::finish
/// [`upstream_status`]: RequestTracker::upstream_status
/// [`upstream_failed`]: RequestTracker::upstream_failed
#[derive(Debug)]
pub struct RequestTracker {
    director: Director,
    method: ApiMethod,
    started: Instant,
    guard: Option<InFlight>,
    hashes: PromptHashes,
    restorer: Option<ModelRestorer>,
    /// The end of the response, for its `usage`.
    usage: UsageTail,
    /// Prompt tokens the picker believed the serving endpoint had cached when it picked it.
    predicted_cached_tokens: u64,
    /// Bytes per prefix block this request was hashed with.
    block_bytes: usize,
    /// The scheduling profile that picked (`None`: a forced pick).
    profile: Option<usize>,
    first_byte_seen: bool,
    /// The labels of llm-d-router's request families.
    identity: RequestIdentity,
    /// `"stream": true` in the request.
    stream: bool,
    /// Response body bytes the upstream sent.
    response_bytes: u64,
    /// When the first and the latest non-empty response chunk arrived.
    first_chunk: Option<Instant>,
    last_chunk: Option<Instant>,
    done: bool,
    /// The prefill pick's in-flight count: held until the decode's first response byte (the
    /// prefill is over by then) or the end of the request.
    prefill_guard: Option<InFlight>,
    /// What the endpoint's service model learns from this request when it ends: the requests
    /// this picker had in flight there at the pick, and the prompt tokens it was predicted to
    /// compute (`None` after a retarget: the numbers were another endpoint's).
    learning: Option<(u64, u64)>,
}

impl RequestTracker {
    /// The endpoint currently serving the request.
    pub fn endpoint(&self) -> Option<&Arc<Endpoint>> {
        self.guard.as_ref().map(|g| g.endpoint())
    }

    /// The request moved to another endpoint (proxy fallback, or the gateway reports it served
    /// elsewhere): move the in-flight count and teach the prefix index.
    pub fn retarget(&mut self, ep: Arc<Endpoint>) {
        if self.endpoint().is_some_and(|cur| Arc::ptr_eq(cur, &ep)) {
            return;
        }
        let prefix = &self.director.inner.prefix;
        self.predicted_cached_tokens = predicted_tokens(
            self.block_bytes,
            prefix.lookup(&self.hashes).matched(ep.slot),
        );
        prefix.insert(ep.slot, &self.hashes);
        self.guard = Some(InFlight::new(ep));
        self.learning = None;
    }

    /// The serving endpoint answered with `status`: a 5xx counts against its passive health,
    /// anything else for it.
    pub fn upstream_status(&self, status: u16) {
        let result = if status >= 500 {
            Err(FailureKind::Other)
        } else {
            Ok(())
        };
        self.record_passive(result);
    }

    /// The serving endpoint could not be reached or failed mid-exchange (`kind` says how).
    pub fn upstream_failed(&self, kind: FailureKind) {
        self.record_passive(Err(kind));
    }

    /// What the prefill pick did with the prefill call `epp proxy` made for it (`Ok`: it
    /// answered, with a status below 500), for its passive health; its in-flight count ends.
    pub fn prefill_answered(&mut self, result: Result<(), FailureKind>) {
        if let Some(g) = self.prefill_guard.take() {
            self.director
                .inner
                .health
                .record(g.endpoint().address(), Source::Passive, result);
        }
    }

    fn record_passive(&self, result: Result<(), FailureKind>) {
        if let Some(ep) = self.endpoint() {
            self.director
                .inner
                .health
                .record(ep.address(), Source::Passive, result);
        }
    }

    /// A response body (or one streamed chunk of it) on its way to the client: read for its
    /// `usage`, and the model name the client asked for put back where the server names the
    /// rewritten one.
    pub fn response_chunk(&mut self, chunk: Vec<u8>) -> Vec<u8> {
        self.chunk_seen(chunk.len());
        self.usage.feed(&chunk);
        match &self.restorer {
            Some(r) => r.apply(chunk),
            None => chunk,
        }
    }

    /// A response chunk passed on unchanged (no rewrite): only read for its `usage`.
    pub fn observe_response(&mut self, chunk: &[u8]) {
        self.chunk_seen(chunk.len());
        self.usage.feed(chunk);
    }

    /// A response chunk of `len` bytes as the upstream sent it: its size, its arrival time
    /// (first byte, and for a streamed request the gap since the previous chunk).
    fn chunk_seen(&mut self, len: usize) {
        self.response_bytes += len as u64;
        if len == 0 {
            return;
        }
        let now = Instant::now();
        self.first_chunk.get_or_insert(now);
        if self.stream {
            if let Some(prev) = self.last_chunk {
                self.director
                    .inner
                    .metrics
                    .llmd()
                    .inter_chunk(&self.identity, now.duration_since(prev).as_secs_f64());
            }
            self.last_chunk = Some(now);
        }
    }

    /// Headers the scheduler's plugins add to the response (e.g. the session token of
    /// `session-affinity-scorer`), for the endpoint serving the request now.
    pub fn response_headers(&self) -> Vec<(String, String)> {
        match self.endpoint() {
            Some(ep) => self
                .director
                .inner
                .scheduler
                .response_headers(self.profile, ep),
            None => Vec::new(),
        }
    }

    /// Whether response bodies are rewritten (a model rewrite happened).
    pub fn rewrites_responses(&self) -> bool {
        self.restorer.is_some()
    }

    /// First response byte (TTFT).
    pub fn first_byte(&mut self) {
        self.prefill_guard = None;
        if !self.first_byte_seen {
            self.first_byte_seen = true;
            self.director
                .inner
                .metrics
                .observe_ttft(self.method, self.started.elapsed().as_secs_f64());
        }
    }

    /// The response ended with this status (what the client finally got).
    pub fn finish(mut self, status: u16) {
        if !self.done {
            let llmd = self.director.inner.metrics.llmd();
            if status != 200 {
                llmd.error(&self.identity, crate::metrics::llmd::MODEL_SERVER_ERROR);
            }
            llmd.response_complete(
                &self.identity,
                &ResponseSummary {
                    seconds: self.started.elapsed().as_secs_f64(),
                    first_byte_seconds: self
                        .first_chunk
                        .map(|t| t.duration_since(self.started).as_secs_f64()),
                    response_bytes: self.response_bytes,
                    streaming: self.stream,
                    usage: self.usage.usage(),
                },
            );
        }
        self.complete(status);
    }

    fn complete(&mut self, status: u16) {
        if self.done {
            return;
        }
        self.done = true;
        let m = &self.director.inner.metrics;
        if let (Some(u), Some(ep)) = (self.usage.usage(), self.endpoint()) {
            m.record_usage(
                ep.label(),
                &u,
                self.predicted_cached_tokens.min(u.prompt_tokens),
            );
        }
        self.teach_service_model(status);
        m.record_request(self.method, status);
        m.observe_e2e(self.method, self.started.elapsed().as_secs_f64());
        m.llmd().finished(&self.identity);
        self.guard = None;
        self.prefill_guard = None;
        self.director.inner.admission.released();
    }
}

impl RequestTracker {
    /// A streamed response that ended well teaches its endpoint's service model (its first
    /// chunk is the first token; a non-streamed one has no TTFT of its own).
    fn teach_service_model(&self, status: u16) {
        let (Some((inflight, predicted_uncached)), Some(first), Some(ep)) =
            (self.learning, self.first_chunk, self.endpoint())
        else {
            return;
        };
        if status != 200 || !self.stream {
            return;
        }
        let usage = self.usage.usage();
        let uncached = match &usage {
            Some(u) => match u.cached_tokens {
                Some(c) => u.prompt_tokens.saturating_sub(c),
                None => predicted_uncached,
            },
            None => predicted_uncached,
        };
        ep.service().observe(&crate::service_model::Observation {
            uncached_tokens: uncached,
            inflight_at_pick: inflight,
            ttft_ms: first.duration_since(self.started).as_secs_f64() * 1000.0,
            e2e_ms: self.started.elapsed().as_secs_f64() * 1000.0,
            completion_tokens: usage.map_or(0, |u| u.completion_tokens),
        });
    }
}

/// Matched prefix blocks as prompt tokens (the index's 4 bytes of prompt text per token).
fn predicted_tokens(block_bytes: usize, matched_blocks: u32) -> u64 {
    u64::from(matched_blocks) * block_bytes as u64 / crate::scheduler::plugins::BYTES_PER_TOKEN
}

impl Drop for RequestTracker {
    fn drop(&mut self) {
        self.complete(STATUS_CLIENT_CLOSED);
    }
}

#[derive(Clone)]
struct Inner {
    admission: Arc<dyn Admission>,
    /// `InferenceObjective` name → priority.
    objectives: Arc<Objectives>,
    body_budget: BodyBudget,
    datastore: Datastore,
    /// Passive health: what the upstreams did with routed requests.
    health: HealthSink,
    scheduler: Arc<Scheduler>,
    prefix: Arc<PrefixIndex>,
    /// The precise prefix index, when a precise producer is configured.
    precise: Option<Arc<PrecisePrefix>>,
    metrics: Arc<Metrics>,
    /// Where picks go for the other replicas (shared state), when replicas share it.
    outbox: Option<crate::replication::Outbox>,
}

/// The director. Cheap to clone.
#[derive(Clone)]
pub struct Director {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Director {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Director").finish_non_exhaustive()
    }
}

impl Director {
    /// The one way to build the core: the prefix index sized by the scheduler's prefix
    /// configuration and forgetting endpoints the datastore frees, the metrics registry over
    /// both, and the scheduler reporting plugin latencies into it. The runtime, the benchmarks
    /// and every test that needs a picker build it here, so they all measure the product.
    pub fn build(datastore: &DatastoreWriter, scheduler: Scheduler) -> Self {
        Self::build_with_budget(
            datastore,
            scheduler,
            crate::gateway::DEFAULT_MAX_BUFFERED_BODY_BYTES,
        )
    }

    /// As [`build`](Self::build), with the request-body budget both front-ends share
    /// (`--max-buffered-body-bytes`).
    pub fn build_with_budget(
        writer: &DatastoreWriter,
        scheduler: Scheduler,
        max_buffered_body_bytes: usize,
    ) -> Self {
        let datastore = writer.reader();
        let prefix = Arc::new(PrefixIndex::for_plan(&scheduler.prefix_plan()));
        {
            let p = prefix.clone();
            writer.on_slot_freed(move |slot| p.remove_slot(slot));
        }
        let precise = scheduler
            .precise()
            .map(|(name, settings)| PrecisePrefix::new(name, settings.clone()));
        if let Some(p) = &precise {
            let p = p.clone();
            writer.on_slot_freed(move |slot| p.index.clear_slot(slot));
        }
        let metrics = Metrics::with_precise(datastore.clone(), prefix.clone(), precise.as_ref());
        if let Some((plugin_type, name)) = scheduler.prefix_plugin() {
            metrics.llmd().set_prefix_plugin(plugin_type, name);
        }
        let scheduler = Arc::new(scheduler.with_observer(metrics.clone()));
        let body_budget =
            BodyBudget::with_meters(max_buffered_body_bytes, Some(metrics.body_budget.clone()));
        Self {
            inner: Arc::new(Inner {
                admission: Arc::new(AdmitAll),
                objectives: Objectives::new(&[]),
                health: writer.health_sink(),
                datastore,
                scheduler,
                prefix,
                precise,
                metrics,
                body_budget,
                outbox: None,
            }),
        }
    }

    /// The same core with `admission` deciding which requests go on to scheduling.
    pub fn with_admission(&self, admission: Arc<dyn Admission>) -> Self {
        self.rebuilt(|i| i.admission = admission)
    }

    /// The same core reading request priorities from `objectives`.
    pub fn with_objectives(&self, objectives: Arc<Objectives>) -> Self {
        self.rebuilt(|i| i.objectives = objectives)
    }

    /// The same core handing every pick to `outbox` for the other replicas.
    pub fn with_replication(&self, outbox: crate::replication::Outbox) -> Self {
        self.rebuilt(|i| i.outbox = Some(outbox))
    }

    /// A copy of this core with one part replaced.
    fn rebuilt(&self, change: impl FnOnce(&mut Inner)) -> Self {
        let mut inner = (*self.inner).clone();
        change(&mut inner);
        Self {
            inner: Arc::new(inner),
        }
    }

    /// The objective table requests' priorities come from.
    pub fn objectives(&self) -> &Arc<Objectives> {
        &self.inner.objectives
    }

    /// The request-body budget both front-ends reserve against while they buffer bodies.
    pub fn body_budget(&self) -> &BodyBudget {
        &self.inner.body_budget
    }

    pub fn datastore(&self) -> &Datastore {
        &self.inner.datastore
    }
    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.inner.metrics
    }
    pub fn prefix_index(&self) -> &Arc<PrefixIndex> {
        &self.inner.prefix
    }
    pub fn scheduler(&self) -> &Arc<Scheduler> {
        &self.inner.scheduler
    }
    /// The precise prefix index, when a precise producer is configured; its KV-event
    /// subscriptions run once [`precise::follow::spawn`](crate::precise::follow::spawn) starts
    /// them (the runtime does).
    pub fn precise(&self) -> Option<&Arc<PrecisePrefix>> {
        self.inner.precise.as_ref()
    }

    /// Every source's match for one request: the approximate index's (always), and the precise
    /// index's when one runs and the request has token ids (endpoints whose events are not
    /// flowing get the approximate share there too).
    fn prefix_matches(
        &self,
        snapshot: &crate::datastore::Snapshot,
        parsed: &ParsedRequest,
        data: &RequestData,
        approx: crate::prefix::PrefixMatch,
    ) -> PrefixMatches {
        let inner = &self.inner;
        let mut out = PrefixMatches::approximate(approx, data.prefix_block_tokens);
        out.primary = inner.scheduler.prefix_primary();
        let Some(p) = &inner.precise else {
            return out;
        };
        let Some(tokens) = data.token_ids.as_deref() else {
            p.no_token_ids();
            return out;
        };
        let salt = parsed
            .body
            .as_ref()
            .and_then(|b| b.get("cache_salt"))
            .and_then(|v| v.as_str());
        let keys = p.request_keys(&parsed.target_model, tokens, salt);
        let m = p.lookup(snapshot, keys, &out.approximate.blocks);
        out.precise = Some(SourceMatch {
            blocks: m.matched.clone(),
            block_tokens: p.block_tokens(),
        });
        out.precise_lookup = Some(m);
        out
    }

    /// Record a request refused before routing (e.g. body too large), so counters stay complete.
    pub fn record_answered(&self, method: ApiMethod, status: u16) {
        self.inner.metrics.record_request(method, status);
        if status >= 400 && status != STATUS_CLIENT_CLOSED {
            let llmd = self.inner.metrics.llmd();
            llmd.error(&llmd.anonymous(None), error_code_for_status(status));
        }
    }

    /// Find a known endpoint by address (for "served by" reports).
    pub fn endpoint_by_address(&self, address: &str) -> Option<Arc<Endpoint>> {
        self.inner
            .datastore
            .snapshot()
            .endpoints
            .iter()
            .find(|e| e.endpoint.address() == address)
            .map(|e| e.endpoint.clone())
    }

    /// Parse, schedule and start tracking one request. Errors are already counted.
    pub async fn route(&self, req: RouteRequest<'_>) -> Result<Routed, RouteError> {
        let started = Instant::now();
        let method = req.method.unwrap_or(ApiMethod::Other);
        let m = &self.inner.metrics;
        let mut identity = None;
        let result = self.route_inner(&req, method, started, &mut identity).await;
        let elapsed = started.elapsed().as_secs_f64();
        m.observe_decision_latency(method, elapsed);
        m.llmd().observe_processing(elapsed);
        match &result {
            Ok(r) => {
                tracing::debug!(
                    endpoint = r.targets[0].address(),
                    decision = r.decision.as_str(),
                    model = %r.parsed.target_model,
                    "routed"
                );
            }
            Err(e) => {
                m.record_request(method, e.status);
                let llmd = m.llmd();
                let id =
                    identity.unwrap_or_else(|| llmd.anonymous(req.headers.fairness_id.as_deref()));
                llmd.error(&id, error_code_for_status(e.status));
                tracing::debug!(status = e.status, error = %e.message, "request refused");
            }
        }
        result
    }

    async fn route_inner(
        &self,
        req: &RouteRequest<'_>,
        method: ApiMethod,
        started: Instant,
        identity: &mut Option<RequestIdentity>,
    ) -> Result<Routed, RouteError> {
        let inner = &self.inner;
        let snapshot = inner.datastore.snapshot();
        let parse = inner.scheduler.parsers().parse_for(method);
        let mut parsed = match parse {
            Parse::Refuse => {
                return Err(RouteError::new(
                    400,
                    format!(
                        "no configured request parser takes {} requests (requestHandler.parsers: {}); list passthrough-parser last to route them without reading the body",
                        method.as_str(),
                        inner.scheduler.parsers().describe()
                    ),
                ))
            }
            // The body is not read: routed on backend state alone, forwarded unchanged.
            Parse::Passthrough => ParsedRequest::default(),
            Parse::OpenAi => match parse_body(method, req.body) {
            Err(e) if e.param.as_deref() == Some("model") && e.message.starts_with("missing") => {
                // As vLLM: with one model served, a request may leave `model` out.
                match snapshot.served_models().as_slice() {
                    [only] => parse_body_or(method, req.body, Some(only))?,
                    [] => return Err(e.into()),
                    many => {
                        let mut e = RouteError::from(e);
                        e.message = format!(
                            "{}; the pool serves several models: {}",
                            e.message,
                            many.join(", ")
                        );
                        return Err(e);
                    }
                }
            }
            r => r?,
            },
        };
        if let Some(t) = req.headers.model_rewrite.as_deref() {
            if parse == Parse::OpenAi {
                parsed.target_model = t.to_string();
            }
        }
        let llmd = inner.metrics.llmd();
        let id = identity.insert(llmd.identity(
            &parsed.model,
            &parsed.target_model,
            req.headers.fairness_id.as_deref(),
        ));
        id.priority = inner.objectives.priority(req.headers.objective.as_deref());
        // May wait (flow control); the admission is held until the pick is made.
        let admitted = inner
            .admission
            .admit(&AdmissionRequest {
                method,
                request: &parsed,
                headers: req.headers,
                snapshot: &snapshot,
                body_bytes: req.body.len(),
                identity: id,
            })
            .await?;
        // The pool may have changed while the request waited.
        let snapshot = inner.datastore.snapshot();
        let (block_bytes, max_blocks) = inner.scheduler.prefix_plan().blocks_for(&snapshot);
        let hashes = inner.prefix.hash_with(
            &parsed.target_model,
            &parsed.prompt,
            block_bytes,
            max_blocks,
        );
        let matches = inner.prefix.lookup(&hashes);
        let mut data = RequestData {
            headers: req.headers.plugin_headers.clone(),
            prompt_tokens: None,
            token_ids: None,
            prefix_block_tokens: (block_bytes as u64) / crate::scheduler::plugins::BYTES_PER_TOKEN,
        };
        inner
            .scheduler
            .prepare(&parsed, &mut data, inner.metrics.tokenizer())
            .await;
        inner.scheduler.produce(&parsed, &mut data);
        let prefixes = self.prefix_matches(&snapshot, &parsed, &data, matches);
        let ctx = SchedCtx {
            snapshot: &snapshot,
            request: &parsed,
            prefix: &prefixes,
            data: &data,
        };
        let hints = Hints {
            subset: req.subset,
            forced: req.headers.forced.as_deref(),
        };
        let sched_started = Instant::now();
        let scheduled = inner.scheduler.schedule(&ctx, &hints);
        let sched_seconds = sched_started.elapsed().as_secs_f64();
        let schedule = match scheduled {
            Ok(s) => s,
            Err(e) => {
                llmd.scheduled(sched_seconds, &id.target_model_name, None);
                inner.metrics.record_decision(DecisionType::NoEndpoint);
                return Err(e.into());
            }
        };
        // The profile's plugins learn the pick before the request goes out.
        inner.scheduler.pre_request(&ctx, &schedule);
        let profile = schedule.profile;
        let data_parallel_port = schedule.data_parallel_port;
        let prefill = match &schedule.disagg {
            Some(d) => {
                let h = inner.scheduler.handler();
                inner.metrics.disagg().decision(
                    d.legacy_pd_metric,
                    h.name(),
                    h.type_name(),
                    &id.target_model_name,
                    d.decision_type(),
                );
                d.prefill.as_ref().and_then(|p| p.ranked.first()).copied()
            }
            None => None,
        };
        let (ranked, decision, scores) = (schedule.ranked, schedule.decision, schedule.scores);
        let targets: Vec<Arc<Endpoint>> = ranked
            .iter()
            .map(|&i| snapshot.endpoints[i].endpoint.clone())
            .collect();
        let primary = targets[0].clone();
        {
            let (namespace, _) = inner.datastore.discovery_labels();
            let port = primary.address().rsplit_once(':').map_or("", |(_, p)| p);
            llmd.scheduled(
                sched_seconds,
                &id.target_model_name,
                Some((primary.name(), &namespace, port)),
            );
            // Bytes of prompt: the approximate index's 4 per token, the precise one's tokens ×4.
            let m = prefixes.primary();
            let block = m.block_tokens * crate::scheduler::plugins::BYTES_PER_TOKEN;
            llmd.prefix_match(
                u64::from(m.blocks.matched(primary.slot)) * block,
                u64::from(m.blocks.total_blocks) * block,
            );
        }
        inner.metrics.record_decision(decision);
        if prefixes.primary().blocks.total_blocks > 0 {
            inner
                .metrics
                .record_cache(primary.label(), prefixes.matched(primary.slot) > 0);
        }
        // Teach the index after the pick; only the touched shards are locked. Bound what we
        // remember by the server's real cache size when it reports one.
        let server_blocks = snapshot.endpoints[ranked[0]]
            .metrics
            .as_deref()
            .and_then(|m| inner.prefix.server_capacity_blocks(m));
        inner
            .prefix
            .insert_capped(primary.slot, &hashes, server_blocks);
        if let (Some(p), Some(m)) = (&inner.precise, &prefixes.precise_lookup) {
            p.after_pick(primary.slot, m, tokio::time::Instant::now());
        }
        // A prefill pod computes the prompt too: it holds the prefix afterwards.
        let prefill = prefill.map(|i| {
            let v = &snapshot.endpoints[i];
            let blocks = v
                .metrics
                .as_deref()
                .and_then(|m| inner.prefix.server_capacity_blocks(m));
            (v.endpoint.clone(), blocks)
        });
        if let Some((pf, blocks)) = &prefill {
            let blocks = *blocks;
            inner.prefix.insert_capped(pf.slot, &hashes, blocks);
            if let (Some(p), Some(m)) = (&inner.precise, &prefixes.precise_lookup) {
                p.after_pick(pf.slot, m, tokio::time::Instant::now());
            }
        }
        if let Some(o) = &inner.outbox {
            let keys = prefixes
                .precise_lookup
                .as_ref()
                .map_or(&[][..], |m| m.keys.as_slice());
            o.picked(&primary, &hashes.hashes, keys);
        }
        let body = rewrite::request_body(&parsed);
        let predicted_cached_tokens = {
            let m = prefixes.primary();
            u64::from(m.blocks.matched(primary.slot)) * m.block_tokens
        };
        if let Some(m) = snapshot.endpoints[ranked[0]].metrics.as_deref() {
            primary.service().saw_load(m.running, m.waiting_queue);
        }
        let learning = Some((
            primary.inflight() as u64,
            data.prompt_tokens
                .unwrap_or(0)
                .saturating_sub(predicted_cached_tokens),
        ));
        llmd.routed(id, req.body.len());
        let tracker = RequestTracker {
            identity: id.clone(),
            stream: parsed.stream,
            response_bytes: 0,
            first_chunk: None,
            last_chunk: None,
            director: self.clone(),
            method,
            started,
            guard: Some(InFlight::new(primary)),
            hashes,
            restorer: ModelRestorer::new(&parsed.model, &parsed.target_model),
            usage: UsageTail::default(),
            predicted_cached_tokens,
            block_bytes,
            profile,
            first_byte_seen: false,
            done: false,
            prefill_guard: prefill.as_ref().map(|(p, _)| InFlight::new(p.clone())),
            learning,
        };
        drop(admitted);
        Ok(Routed {
            parsed,
            targets,
            decision,
            scores,
            tracker,
            body,
            prefill: prefill.map(|(p, _)| p),
            data_parallel_port,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{presets, EndpointPickerConfig};
    use crate::datastore::{EndpointSpec, HealthConfig, ModelServerMetrics};

    struct RefuseTenant;
    impl Admission for RefuseTenant {
        fn admit<'a>(
            &'a self,
            req: &'a AdmissionRequest<'a>,
        ) -> futures_util::future::BoxFuture<'a, Result<crate::admission::Admitted, RouteError>>
        {
            let r = match req.headers.fairness_id.as_deref() {
                Some("blocked") => Err(RouteError::new(429, "tenant over its share")),
                _ => Ok(crate::admission::Admitted::now()),
            };
            Box::pin(std::future::ready(r))
        }
    }

    #[tokio::test]
    async fn admission_runs_between_parse_and_schedule() {
        let w = DatastoreWriter::new(HealthConfig::default());
        w.set_endpoints(vec![EndpointSpec::new("10.0.0.1:8000")]);
        w.record_scrape("10.0.0.1:8000", Ok(ModelServerMetrics::default()));
        let cfg = EndpointPickerConfig::from_yaml(presets::DEFAULT).unwrap();
        let d = Director::build(&w, Scheduler::from_config(&cfg).unwrap())
            .with_admission(Arc::new(RefuseTenant));
        let body = br#"{"model":"m","prompt":"hello"}"#;
        let blocked = InboundHeaders {
            fairness_id: Some("blocked".into()),
            ..Default::default()
        };
        let route = |h: &InboundHeaders| {
            futures_executor::block_on(d.route(RouteRequest {
                method: Some(ApiMethod::Completions),
                body,
                subset: None,
                headers: h,
            }))
        };
        let e = route(&blocked).unwrap_err();
        assert_eq!(
            (e.status, e.message.as_str()),
            (429, "tenant over its share")
        );
        assert_eq!(
            w.snapshot().endpoints[0].endpoint.inflight(),
            0,
            "nothing was routed"
        );
        let ok = route(&InboundHeaders::default()).unwrap();
        assert_eq!(ok.targets[0].address(), "10.0.0.1:8000");
        ok.tracker.finish(200);
        let text = d.metrics().encode();
        assert!(
            text.contains(r#"epp_requests_total{method="completions",status="429"} 1"#),
            "{text}"
        );
        // Refused before scheduling: no routing decision was recorded for it.
        assert!(
            text.contains(r#"epp_routing_decisions_total{decision_type="load_balance"} 1"#),
            "{text}"
        );
    }

    /// Every sample of an exposition, `name{labels}` → value.
    fn samples(text: &str) -> std::collections::HashMap<String, f64> {
        text.lines()
            .filter(|l| !l.starts_with('#') && !l.is_empty())
            .filter_map(|l| {
                let (k, v) = l.rsplit_once(' ')?;
                Some((k.to_string(), v.parse().ok()?))
            })
            .collect()
    }

    /// Predicted and observed cached tokens count the same responses: a response that does not
    /// report `prompt_tokens_details` moves neither, one that reports 0 moves the prediction.
    #[tokio::test]
    async fn predicted_and_observed_cached_tokens_count_the_same_responses() {
        let w = DatastoreWriter::new(HealthConfig::default());
        w.set_endpoints(vec![EndpointSpec::new("10.0.0.1:8000")]);
        w.record_scrape("10.0.0.1:8000", Ok(ModelServerMetrics::default()));
        let cfg = EndpointPickerConfig::from_yaml(presets::DEFAULT).unwrap();
        let d = Director::build(&w, Scheduler::from_config(&cfg).unwrap());
        // 2 KiB of prompt: 8 blocks of 256 bytes (64 tokens) with the default producer.
        let body = serde_json::to_vec(&json!({"model": "m", "prompt": "p".repeat(2048)})).unwrap();
        let run = |usage: &str| {
            let mut r = futures_executor::block_on(d.route(RouteRequest {
                method: Some(ApiMethod::Completions),
                body: &body,
                ..Default::default()
            }))
            .unwrap();
            r.tracker
                .observe_response(format!(r#"{{"choices":[],"usage":{usage}}}"#).as_bytes());
            r.tracker.finish(200);
        };
        let get = |k: &str| {
            samples(&d.metrics().encode())
                .get(k)
                .copied()
                .unwrap_or(0.0)
        };
        let predicted = r#"epp_backend_predicted_cached_tokens_total{backend="10.0.0.1:8000"}"#;
        let observed = r#"epp_backend_cached_tokens_total{backend="10.0.0.1:8000"}"#;
        let prompt = r#"epp_backend_prompt_tokens_total{backend="10.0.0.1:8000"}"#;
        run(
            r#"{"prompt_tokens":512,"completion_tokens":1,"prompt_tokens_details":{"cached_tokens":0}}"#,
        );
        assert_eq!(
            (get(predicted), get(observed)),
            (0.0, 0.0),
            "first: nothing predicted"
        );
        run(r#"{"prompt_tokens":512,"completion_tokens":1}"#);
        assert_eq!(get(prompt), 1024.0);
        assert_eq!(
            (get(predicted), get(observed)),
            (0.0, 0.0),
            "not reported: neither moves"
        );
        run(
            r#"{"prompt_tokens":512,"completion_tokens":1,"prompt_tokens_details":{"cached_tokens":0}}"#,
        );
        assert_eq!(
            (get(predicted), get(observed)),
            (512.0, 0.0),
            "predicted, reported none"
        );
        run(
            r#"{"prompt_tokens":512,"completion_tokens":1,"prompt_tokens_details":{"cached_tokens":448}}"#,
        );
        assert_eq!((get(predicted), get(observed)), (1024.0, 448.0));
    }

    #[tokio::test]
    async fn llm_d_request_families_and_legacy_twins_move_by_exact_amounts() {
        let w = DatastoreWriter::new(HealthConfig::default());
        w.set_endpoints(vec![EndpointSpec::new("10.0.0.1:8000")]);
        w.record_scrape(
            "10.0.0.1:8000",
            Ok(ModelServerMetrics {
                waiting_queue: 3.0,
                running: 1.0,
                kv_cache_usage: 0.25,
                models: vec!["m".into()],
                ..Default::default()
            }),
        );
        w.set_pool_name("pool-a");
        let cfg = EndpointPickerConfig::from_yaml(presets::DEFAULT).unwrap();
        let d = Director::build(&w, Scheduler::from_config(&cfg).unwrap());
        let body = br#"{"model":"m","prompt":"hello"}"#;
        let tenant = InboundHeaders {
            fairness_id: Some("tenant-a".into()),
            ..Default::default()
        };
        let route = |h: &InboundHeaders, body: &[u8]| {
            futures_executor::block_on(d.route(RouteRequest {
                method: Some(ApiMethod::Completions),
                body,
                subset: None,
                headers: h,
            }))
        };
        let mut ok = route(&tenant, body).unwrap();
        let running = samples(&d.metrics().encode());
        let l = r#"fairness_id="tenant-a",model_name="m",priority="0",target_model_name="m""#;
        assert_eq!(running[&format!("llm_d_epp_request_running{{{l}}}")], 1.0);
        assert_eq!(
            running[r#"inference_objective_running_requests{model_name="m"}"#],
            1.0
        );
        let resp = br#"{"choices":[],"usage":{"prompt_tokens":12,"completion_tokens":3,"prompt_tokens_details":{"cached_tokens":4}}}"#;
        ok.tracker.observe_response(resp);
        ok.tracker.finish(200);
        // Refused: no model in a pool that serves one is fine, but a broken body is not.
        assert_eq!(
            route(&InboundHeaders::default(), b"{").unwrap_err().status,
            400
        );
        // The model server answered 500.
        let failed = route(&InboundHeaders::default(), body).unwrap();
        failed.tracker.finish(500);
        // The client went away: no error, no end-of-response observations.
        drop(route(&InboundHeaders::default(), body).unwrap());

        let s = samples(&d.metrics().encode());
        let dflt =
            r#"fairness_id="default-flow",model_name="m",priority="0",target_model_name="m""#;
        let get = |k: &str| {
            *s.get(k).unwrap_or_else(|| {
                let family = k.split('{').next().unwrap_or(k);
                let near: Vec<&String> = s.keys().filter(|n| n.starts_with(family)).collect();
                panic!("no sample {k}; the family has {near:?}")
            })
        };
        assert_eq!(get(&format!("llm_d_epp_request_total{{{l}}}")), 1.0);
        assert_eq!(get(&format!("llm_d_epp_request_total{{{dflt}}}")), 2.0);
        assert_eq!(
            get(
                r#"inference_objective_request_total{model_name="m",priority="0",target_model_name="m"}"#
            ),
            3.0
        );
        assert_eq!(get(&format!("llm_d_epp_request_running{{{l}}}")), 0.0);
        assert_eq!(get(&format!("llm_d_epp_request_running{{{dflt}}}")), 0.0);
        assert_eq!(
            get(r#"inference_objective_running_requests{model_name="m"}"#),
            0.0
        );
        assert_eq!(
            get(
                r#"llm_d_epp_request_error_total{error_code="BadRequest",fairness_id="default-flow",model_name="",priority="0",target_model_name=""}"#
            ),
            1.0
        );
        assert_eq!(
            get(&format!(
                "llm_d_epp_request_error_total{{error_code=\"ModelServerError\",{dflt}}}"
            )),
            1.0
        );
        assert_eq!(
            get(
                r#"inference_objective_request_error_total{error_code="ModelServerError",model_name="m",target_model_name="m"}"#
            ),
            1.0
        );
        assert!(!s.keys().any(|k| k.contains("error_code=\"Unknown\"")));
        // Usage of the one response that had it.
        let ml = r#"model_name="m",target_model_name="m""#;
        assert_eq!(
            get(&format!("llm_d_epp_request_input_tokens_sum{{{l}}}")),
            12.0
        );
        assert_eq!(
            get(&format!("llm_d_epp_request_output_tokens_sum{{{l}}}")),
            3.0
        );
        assert_eq!(
            get(&format!("llm_d_epp_request_cached_tokens_sum{{{l}}}")),
            4.0
        );
        assert_eq!(
            get(&format!("inference_objective_input_tokens_sum{{{ml}}}")),
            12.0
        );
        assert_eq!(
            get(&format!("inference_objective_output_tokens_count{{{ml}}}")),
            1.0
        );
        assert_eq!(
            get(&format!(
                "inference_objective_output_tokens_bucket{{{ml},le=\"1\"}}"
            )),
            0.0
        );
        assert_eq!(
            get(&format!(
                "inference_objective_output_tokens_bucket{{{ml},le=\"8\"}}"
            )),
            1.0
        );
        assert_eq!(
            get(&format!("llm_d_epp_response_size_bytes_sum{{{l}}}")),
            resp.len() as f64
        );
        // Both completed responses (200 and 500) end the request's duration; the abort does not.
        assert_eq!(
            get(&format!(
                "inference_objective_request_duration_seconds_count{{{ml}}}"
            )),
            2.0
        );
        assert_eq!(
            get(&format!("llm_d_epp_request_ntpot_seconds_count{{{l}}}")),
            1.0
        );
        assert_eq!(
            get(
                r#"llm_d_epp_request_ttft_seconds_count{fairness_id="tenant-a",model_name="m",priority="0",streaming="false",target_model_name="m"}"#
            ),
            1.0
        );
        assert_eq!(
            get(&format!("inference_objective_request_sizes_sum{{{ml}}}")),
            3.0 * body.len() as f64
        );
        // Scheduling: three successful attempts on the one endpoint.
        assert_eq!(
            get(
                r#"llm_d_epp_scheduler_attempts_total{endpoint_name="10.0.0.1:8000",namespace="local",port="8000",status="success",target_model_name="m"}"#
            ),
            3.0
        );
        assert_eq!(
            get(
                r#"inference_extension_scheduler_attempts_total{namespace="local",pod_name="10.0.0.1:8000",port="8000",status="success",target_model_name="m"}"#
            ),
            3.0
        );
        assert_eq!(get("llm_d_epp_scheduler_e2e_duration_seconds_count"), 3.0);
        assert_eq!(
            get("inference_extension_scheduler_e2e_duration_seconds_count"),
            3.0
        );
        assert_eq!(
            get("llm_d_epp_request_processing_duration_seconds_count"),
            4.0
        );
        // The pool, at scrape time.
        assert_eq!(get(r#"llm_d_epp_ready_endpoints{name="pool-a"}"#), 1.0);
        assert_eq!(get(r#"inference_pool_ready_pods{name="pool-a"}"#), 1.0);
        assert_eq!(
            get(r#"inference_pool_average_kv_cache_utilization{name="pool-a"}"#),
            0.25
        );
        assert_eq!(get(r#"llm_d_epp_average_queue_size{name="pool-a"}"#), 3.0);
        assert_eq!(get(r#"llm_d_epp_std_dev_queue_size{name="pool-a"}"#), 0.0);
        assert_eq!(
            get(
                r#"inference_pool_per_pod_queue_size{name="pool-a",model_server_pod="10.0.0.1:8000"}"#
            ),
            3.0
        );
        assert_eq!(
            get(
                r#"llm_d_epp_per_endpoint_queue_size{name="pool-a",model_server_endpoint="10.0.0.1:8000"}"#
            ),
            3.0
        );
        // Plugin latency, by extension point, in both spellings.
        let picks = s
            .iter()
            .filter(|(k, _)| {
                k.starts_with("llm_d_epp_plugin_duration_seconds_count{extension_point=\"Picker\"")
            })
            .map(|(_, v)| *v)
            .sum::<f64>();
        assert_eq!(picks, 3.0);
        assert!(s.keys().any(|k| k.starts_with(
            "inference_extension_plugin_duration_seconds_count{extension_point=\"Scorer\""
        )));
        // The prefix index: three lookups of a prompt shorter than a block.
        assert!(s
            .keys()
            .any(|k| k.starts_with("llm_d_epp_prefix_indexer_size{")));
        assert_eq!(
            get("inference_extension_prefix_indexer_hit_bytes_count"),
            3.0
        );
        assert_eq!(get("inference_extension_prefix_indexer_hit_bytes_sum"), 0.0);
        assert!(s.contains_key(&format!(
            "inference_extension_info{{build_ref=\"v{}\",commit=\"{}\"}}",
            env!("CARGO_PKG_VERSION"),
            crate::metrics::llmd::BUILD_COMMIT
        )));
    }
}

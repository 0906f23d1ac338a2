//! Admission: the director's step between parsing a request and scheduling it, where a request
//! may wait or be refused before any endpoint is chosen. The director awaits the configured
//! [`Admission`] for every request, in both front-ends.
//!
//! Two implementations, as in llm-d-router:
//! - [`LegacyAdmission`] (the default, flow control off): a sheddable request (negative
//!   priority) is refused with 429 while the saturation detector reads the pool as saturated;
//!   everything else passes.
//! - [`FlowController`] (`featureGates: [flowControl]`): a request that finds the pool saturated
//!   (or others already waiting) waits in its priority band's queue; bands dispatch strictly by
//!   priority, flows (fairness ids) inside a band share per the band's fairness policy, requests
//!   inside a flow per its ordering policy. Outcomes, defaults and metric names are
//!   llm-d-router's.
//!
//! One file per plugin: [`global_strict`], [`round_robin`] (fairness), [`fcfs`], [`edf`]
//! (ordering), [`utilization`], [`concurrency`] (saturation detectors), [`usage_limit`]; the
//! priority of a request comes from its `InferenceObjective` ([`objectives`]).

use std::sync::Arc;

use futures_util::future::BoxFuture;

use crate::datastore::Snapshot;
use crate::director::RouteError;
use crate::gateway::InboundHeaders;
use crate::metrics::llmd::RequestIdentity;
use crate::request::{ApiMethod, ParsedRequest};

pub mod concurrency;
pub mod controller;
pub mod edf;
pub mod fcfs;
pub mod global_strict;
pub mod metrics;
pub mod objectives;
pub mod round_robin;
pub mod settings;
pub mod usage_limit;
pub mod utilization;

pub use controller::{FlowController, Outcome};
pub use objectives::{Objective, Objectives};
pub use settings::{BandSettings, FlowSettings};

/// What admission sees of one request.
#[derive(Debug)]
pub struct AdmissionRequest<'a> {
    pub method: ApiMethod,
    pub request: &'a ParsedRequest,
    /// Objective and fairness id among them.
    pub headers: &'a InboundHeaders,
    /// The pool as the scheduler will see it.
    pub snapshot: &'a Snapshot,
    /// Bytes of the request body.
    pub body_bytes: usize,
    /// The request's metric labels (model, target model, fairness id, priority).
    pub identity: &'a RequestIdentity,
}

impl AdmissionRequest<'_> {
    /// The request's priority (from its `InferenceObjective`; 0 without one).
    pub fn priority(&self) -> i64 {
        self.identity.priority
    }
}

/// A request let through. Holding it keeps the request counted as dispatched-but-not-yet-picked
/// (so the next dispatch decision sees it); the director drops it once the pick is made.
#[derive(Debug, Default)]
pub struct Admitted {
    _transit: Option<controller::Transit>,
}

impl Admitted {
    /// Admitted with nothing to release.
    pub fn now() -> Self {
        Self { _transit: None }
    }
    pub(crate) fn with_transit(t: controller::Transit) -> Self {
        Self { _transit: Some(t) }
    }
}

/// Decides whether, and when, a request goes on to scheduling. Runs on the request path of both
/// front-ends; a request that waits holds its stream (ext_proc) or HTTP request (proxy), and
/// leaves the queue at once when its future is dropped (the client went away).
pub trait Admission: Send + Sync {
    /// `Ok` admits; an error is the refusal the client gets (429 or 503 with a JSON body).
    fn admit<'a>(
        &'a self,
        req: &'a AdmissionRequest<'a>,
    ) -> BoxFuture<'a, Result<Admitted, RouteError>>;

    /// A routed request finished: capacity may have freed.
    fn released(&self) {}
}

/// Admits every request.
#[derive(Clone, Copy, Debug, Default)]
pub struct AdmitAll;

impl Admission for AdmitAll {
    fn admit<'a>(
        &'a self,
        _: &'a AdmissionRequest<'a>,
    ) -> BoxFuture<'a, Result<Admitted, RouteError>> {
        Box::pin(std::future::ready(Ok(Admitted::now())))
    }
}

/// Whether a priority is sheddable (strictly below zero), as llm-d-router's `IsSheddable`.
pub fn is_sheddable(priority: i64) -> bool {
    priority < 0
}

/// llm-d-router's admission with flow control off: sheddable requests are refused (429) while
/// the pool is saturated; the rest pass untouched.
pub struct LegacyAdmission {
    detector: Arc<dyn SaturationDetector>,
}

impl LegacyAdmission {
    pub fn new(detector: Arc<dyn SaturationDetector>) -> Self {
        Self { detector }
    }
}

impl Admission for LegacyAdmission {
    fn admit<'a>(
        &'a self,
        req: &'a AdmissionRequest<'a>,
    ) -> BoxFuture<'a, Result<Admitted, RouteError>> {
        let r = if is_sheddable(req.priority())
            && controller::pool_saturation(self.detector.as_ref(), req.snapshot, 0).effective >= 1.0
        {
            tracing::debug!(
                priority = req.priority(),
                "request rejected: system saturated and request is sheddable"
            );
            Err(
                RouteError::new(429, "system saturated, sheddable request dropped")
                    .dropped(crate::gateway::headers::dropped::SATURATED),
            )
        } else {
            Ok(Admitted::now())
        };
        Box::pin(std::future::ready(r))
    }
}

/// Reads the pool's saturation: 1.0 is the set point (dispatch stops at or above the usage
/// limit), above 1.0 the magnitude of oversubscription.
pub trait SaturationDetector: Send + Sync {
    fn type_name(&self) -> &'static str;
    fn name(&self) -> &str;
    /// Saturation of `endpoints` (never empty), counting `extra` requests already let through
    /// but not yet on an endpoint. Returns the saturation and how many endpoints had missing or
    /// stale metrics (scored as fully saturated).
    fn saturation(
        &self,
        endpoints: &[&crate::datastore::EndpointView],
        extra: usize,
    ) -> (f64, usize);
}

/// Chooses which flow (fairness id) of a priority band dispatches next.
pub trait FairnessPolicy: Send + Sync {
    fn type_name(&self) -> &'static str;
    fn name(&self) -> &str;
    /// The flow to dispatch from, among `flows` (never empty; each flow has queued requests),
    /// given the flow picked last in this band (`cursor`).
    fn pick<'a>(&self, flows: &'a controller::Flows, cursor: Option<&str>) -> Option<&'a str>;
}

/// Orders the requests of one flow: a request with a smaller key dispatches first (ties by
/// arrival).
pub trait OrderingPolicy: Send + Sync {
    fn type_name(&self) -> &'static str;
    fn name(&self) -> &str;
    /// The key of a request that entered the queue `enqueued_nanos` after the controller's epoch
    /// with queue-wait budget `ttl` (zero: none).
    fn key(&self, enqueued_nanos: u64, ttl: std::time::Duration) -> u64;
}

/// Every flow-control plugin type this build implements.
pub const TYPES: &[&str] = &[
    global_strict::TYPE,
    round_robin::TYPE,
    fcfs::TYPE,
    edf::TYPE,
    utilization::TYPE,
    concurrency::TYPE,
    usage_limit::TYPE,
    usage_limit::HOLDBACK_TYPE,
];

pub fn is_type(t: &str) -> bool {
    TYPES.contains(&t)
}

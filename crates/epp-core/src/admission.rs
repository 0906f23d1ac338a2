//! Admission: the director's step between parsing a request and scheduling it, where a request
//! may be refused before any endpoint is chosen (flow control: priority bands, fairness,
//! saturation). The director asks the configured [`Admission`] for every request, in both
//! front-ends; the default admits everything.

use crate::datastore::Snapshot;
use crate::director::RouteError;
use crate::gateway::InboundHeaders;
use crate::request::{ApiMethod, ParsedRequest};

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
}

/// Decides whether a request goes on to scheduling. Synchronous and cheap: it runs on the
/// request path of both front-ends.
pub trait Admission: Send + Sync {
    /// `Ok` admits; an error is the refusal the client gets (429 or 503 with a JSON body).
    fn admit(&self, req: &AdmissionRequest<'_>) -> Result<(), RouteError>;
}

/// Admits every request (the default, as llm-d's flow control is off by default).
#[derive(Clone, Copy, Debug, Default)]
pub struct AdmitAll;

impl Admission for AdmitAll {
    fn admit(&self, _: &AdmissionRequest<'_>) -> Result<(), RouteError> {
        Ok(())
    }
}

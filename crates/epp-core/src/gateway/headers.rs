//! Every header name and metadata key of the gateway protocol, in one place: what the gateway
//! sends the picker, what the picker answers, and what the conformance hooks add. Both
//! front-ends read and write only these.

/// Request header and `envoy.lb` metadata key carrying the pick.
pub const DESTINATION: &str = "x-gateway-destination-endpoint";
/// `envoy.lb` metadata key (with `--emit-endpoint-scores`): a struct of destination address →
/// the scheduler's score for it.
pub const DESTINATION_SCORES: &str = "x-gateway-destination-endpoint-scores";
/// The endpoint that actually served: an `envoy.lb` key the gateway reports, and the response
/// header `epp proxy` sets.
pub const SERVED: &str = "x-gateway-destination-endpoint-served";
/// Key (a list of `ip:port`) of the gateway's subset hint inside [`SUBSET_NAMESPACE`].
pub const SUBSET: &str = "x-gateway-destination-endpoint-subset";
/// Dynamic-metadata namespace of the pick and of the gateway's "served by" report.
pub const LB_NAMESPACE: &str = "envoy.lb";
/// Filter-metadata namespace of the gateway's subset hint.
pub const SUBSET_NAMESPACE: &str = "envoy.lb.subset_hint";

/// The `InferenceObjective` a request names: llm-d's spelling first, then the legacy one.
pub const OBJECTIVE: [&str; 2] = [
    "x-llm-d-inference-objective",
    "x-gateway-inference-objective",
];
/// The fairness id (tenant) of a request: llm-d's spelling first, then the legacy one.
pub const FAIRNESS_ID: [&str; 2] = [
    "x-llm-d-inference-fairness-id",
    "x-gateway-inference-fairness-id",
];
/// The model to route and forward as: llm-d's spelling first, then the legacy one.
pub const MODEL_REWRITE: [&str; 2] = ["x-llm-d-model-name-rewrite", "x-gateway-model-name-rewrite"];

/// Request id: propagated when the client sends one, generated otherwise.
pub const REQUEST_ID: &str = "x-request-id";

/// Conformance hook: forces the pick (comma list of IPs or `ip:port`). Honoured only with the
/// conformance hooks on.
pub const TEST_SELECTION: &str = "test-epp-endpoint-selection";
/// Conformance hook: response header echoing the endpoint the gateway reports as served.
pub const TEST_SERVED: &str = "x-conformance-test-served-endpoint";
/// Conformance hook: response header carrying the endpoint the picker selected.
pub const TEST_SELECTED: &str = "x-conformance-test-selected-endpoint";
/// Debug marker set on every ext_proc response-headers answer (as the reference picker does).
pub const RESPONSE_MARKER: &str = "x-went-into-resp-headers";

/// Request header (llm-d's routing sidecar reads it): `ip:port` of the prefill pick of a
/// disaggregated request; absent when the request is decode-only.
pub const PREFILLER_HOST_PORT: &str = "x-prefiller-host-port";
/// Request header: `ip:port` of the picked data-parallel rank (the data-parallel handler).
pub const DATA_PARALLEL_HOST_PORT: &str = "x-data-parallel-host-port";
/// Request header llm-d sets for encode disaggregation (epp does not; it is never passed on).
pub const ENCODER_HOSTS_PORTS: &str = "x-encoder-hosts-ports";
/// The routing sidecar's headers: the picker sets or removes them, never passes a client's on.
pub const DISAGG_HEADERS: [&str; 3] = [
    PREFILLER_HOST_PORT,
    DATA_PARALLEL_HOST_PORT,
    ENCODER_HOSTS_PORTS,
];

/// Response header of a request the picker dropped before any model server saw it, naming why
/// (llm-d-router's values, in [`dropped`]).
pub const REQUEST_DROPPED_REASON: &str = "x-llm-d-request-dropped-reason";

/// The values of [`REQUEST_DROPPED_REASON`].
pub mod dropped {
    /// Every candidate saturated, the queue full, or a sheddable request shed.
    pub const SATURATED: &str = "rejected-saturated";
    /// No endpoint could take it.
    pub const NO_ENDPOINTS: &str = "rejected-no-endpoints";
    /// It waited out its queue-wait budget in flow control.
    pub const TTL_EXPIRED: &str = "rejected-ttl-expired";
    /// The client went away while it was queued.
    pub const CONTEXT_CANCELLED: &str = "rejected-context-cancelled";
    /// Taken out of the flow-control queue.
    pub const EVICTED: &str = "evicted";
}

/// Request headers the picker owns: never passed on from the client (compared
/// case-insensitively).
pub const SYSTEM_OWNED: [&str; 13] = [
    OBJECTIVE[0],
    OBJECTIVE[1],
    FAIRNESS_ID[0],
    FAIRNESS_ID[1],
    MODEL_REWRITE[0],
    MODEL_REWRITE[1],
    SUBSET,
    DESTINATION,
    SERVED,
    "content-length",
    PREFILLER_HOST_PORT,
    DATA_PARALLEL_HOST_PORT,
    ENCODER_HOSTS_PORTS,
];

/// Whether `key` is a header the picker owns (see [`SYSTEM_OWNED`]).
pub fn system_owned(key: &str) -> bool {
    SYSTEM_OWNED.iter().any(|s| key.eq_ignore_ascii_case(s))
}

/// Read access to one request's headers, whichever front-end they came from. Names are
/// compared case-insensitively; a value that is not valid UTF-8 reads as absent.
pub trait HeaderLookup {
    fn lookup(&self, name: &str) -> Option<&str>;
}

impl HeaderLookup for http::HeaderMap {
    fn lookup(&self, name: &str) -> Option<&str> {
        self.get(name).and_then(|v| v.to_str().ok())
    }
}

/// ext_proc headers: `(name, raw value)` pairs as Envoy sends them.
impl HeaderLookup for [(String, Vec<u8>)] {
    fn lookup(&self, name: &str) -> Option<&str> {
        self.iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .and_then(|(_, v)| std::str::from_utf8(v).ok())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn owned_headers() {
        assert!(system_owned("Content-Length"));
        assert!(system_owned("X-Gateway-Destination-Endpoint"));
        assert!(system_owned("x-llm-d-model-name-rewrite"));
        assert!(!system_owned("x-request-id"));
    }
}

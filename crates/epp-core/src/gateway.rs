//! The gateway contract both front-ends share: every header the picker reads or writes, the one
//! request-id format, the model-rewrite body mutation and its reversal on responses, the body
//! limit and its error, and the one place that turns inbound headers into what the director
//! routes on. `epp serve` (ext_proc) and `epp proxy` (HTTP) only differ in where the headers come
//! from, so the policy — e.g. that the forced-pick header is honoured only with the conformance
//! hooks on — cannot drift between them.

pub mod headers;
pub mod request_id;
pub mod rewrite;
pub mod usage;

pub use headers::HeaderLookup;
pub use request_id::new_request_id;

/// How the gateway headers are honoured (the same for both front-ends).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct GatewayPolicy {
    /// Honour `test-epp-endpoint-selection` and add the `x-conformance-test-*` response headers.
    /// Test only: with it on, any client can steer its own requests to any endpoint.
    pub test_hooks: bool,
}

/// What the picker takes from one request's headers.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct InboundHeaders {
    /// The client's `x-request-id`, if it sent a non-empty one.
    pub request_id: Option<String>,
    /// The forced pick (`test-epp-endpoint-selection`), only under [`GatewayPolicy::test_hooks`].
    pub forced: Option<String>,
    /// The model to route and forward as (`x-llm-d-model-name-rewrite`, or the legacy
    /// `x-gateway-model-name-rewrite`).
    pub model_rewrite: Option<String>,
    /// The `InferenceObjective` named by the request (`x-llm-d-inference-objective`, or the
    /// legacy `x-gateway-inference-objective`).
    pub objective: Option<String>,
    /// The fairness id (`x-llm-d-inference-fairness-id`, or the legacy
    /// `x-gateway-inference-fairness-id`).
    pub fairness_id: Option<String>,
    /// The request headers scheduler plugins read (e.g. a session header), lower-case names:
    /// see [`InboundHeaders::with_plugin_headers`].
    pub plugin_headers: Vec<(String, String)>,
}

impl InboundHeaders {
    /// Read the gateway headers of one request under `policy`.
    pub fn read(h: &(impl HeaderLookup + ?Sized), policy: GatewayPolicy) -> Self {
        let get = |names: &[&str]| {
            names
                .iter()
                .find_map(|n| h.lookup(n))
                .map(str::trim)
                .filter(|v| !v.is_empty())
                .map(str::to_string)
        };
        Self {
            request_id: get(&[headers::REQUEST_ID]),
            forced: if policy.test_hooks {
                get(&[headers::TEST_SELECTION])
            } else {
                None
            },
            model_rewrite: get(&headers::MODEL_REWRITE),
            objective: get(&headers::OBJECTIVE),
            fairness_id: get(&headers::FAIRNESS_ID),
            plugin_headers: Vec::new(),
        }
    }

    /// Also take the headers named in `names` (lower-case; what the scheduler's plugins read,
    /// [`crate::scheduler::Scheduler::request_headers`]) that the request carries.
    pub fn with_plugin_headers(
        mut self,
        h: &(impl HeaderLookup + ?Sized),
        names: &[String],
    ) -> Self {
        self.plugin_headers = names
            .iter()
            .filter_map(|n| h.lookup(n).map(|v| (n.clone(), v.to_string())))
            .collect();
        self
    }

    /// The request id to use: the client's, or a new one (`true` when generated here).
    pub fn request_id_or_new(&self) -> (String, bool) {
        match &self.request_id {
            Some(id) => (id.clone(), false),
            None => (new_request_id(), true),
        }
    }
}

/// The largest request body the picker buffers, and the one error both front-ends give past it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BodyLimit {
    pub max_bytes: usize,
}

impl BodyLimit {
    pub const fn new(max_bytes: usize) -> Self {
        Self { max_bytes }
    }

    /// Whether `len` bytes are over the limit.
    pub fn exceeded_by(&self, len: usize) -> bool {
        len > self.max_bytes
    }

    /// The 413 the client gets.
    pub fn error(&self) -> crate::director::RouteError {
        crate::director::RouteError::new(
            413,
            format!(
                "request body exceeds the picker's limit of {} bytes (--max-body-bytes)",
                self.max_bytes
            ),
        )
    }
}

/// The bytes of request bodies all requests together may hold in memory while they wait to be
/// routed (both front-ends buffer bodies: the pick needs the whole prompt). Each request
/// reserves what it buffers; over the budget it is refused with 503 instead of growing memory.
#[derive(Clone, Debug)]
pub struct BodyBudget {
    inner: std::sync::Arc<BudgetInner>,
}

#[derive(Debug)]
struct BudgetInner {
    max_bytes: usize,
    used: std::sync::atomic::AtomicUsize,
    meters: Option<BudgetMeters>,
}

/// Where a [`BodyBudget`] reports itself: bytes held (gauge) and refusals (counter).
#[derive(Clone, Debug)]
pub struct BudgetMeters {
    pub buffered_bytes: prometheus_client::metrics::gauge::Gauge,
    pub rejections: prometheus_client::metrics::counter::Counter,
}

impl BudgetMeters {
    /// Register the budget's families in `registry`.
    pub fn register(registry: &mut prometheus_client::registry::Registry) -> Self {
        let m = Self {
            buffered_bytes: Default::default(),
            rejections: Default::default(),
        };
        registry.register(
            "epp_request_body_buffered_bytes",
            "Bytes of request bodies held in memory right now, waiting to be routed (both front-ends)",
            m.buffered_bytes.clone(),
        );
        registry.register(
            "epp_request_body_budget_rejections",
            "Requests refused with 503 because --max-buffered-body-bytes was spent",
            m.rejections.clone(),
        );
        m
    }
}

/// Default of `--max-buffered-body-bytes`.
pub const DEFAULT_MAX_BUFFERED_BODY_BYTES: usize = 512 * 1024 * 1024;

impl BodyBudget {
    pub fn new(max_bytes: usize) -> Self {
        Self::with_meters(max_bytes, None)
    }

    pub fn with_meters(max_bytes: usize, meters: Option<BudgetMeters>) -> Self {
        Self {
            inner: std::sync::Arc::new(BudgetInner {
                max_bytes,
                used: std::sync::atomic::AtomicUsize::new(0),
                meters,
            }),
        }
    }

    /// Bytes reserved right now.
    pub fn used(&self) -> usize {
        self.inner.used.load(std::sync::atomic::Ordering::Relaxed)
    }

    pub fn max_bytes(&self) -> usize {
        self.inner.max_bytes
    }

    /// An empty reservation to grow as a body arrives.
    pub fn reservation(&self) -> Reservation {
        Reservation {
            budget: self.clone(),
            bytes: 0,
        }
    }

    /// The 503 a request gets when the budget is spent (counted as a refusal).
    pub fn error(&self) -> crate::director::RouteError {
        if let Some(m) = &self.inner.meters {
            m.rejections.inc();
        }
        crate::director::RouteError::new(
            503,
            format!(
                "the picker is already buffering its limit of {} bytes of request bodies                  (--max-buffered-body-bytes); retry shortly",
                self.inner.max_bytes
            ),
        )
    }
}

/// Bytes one request holds against a [`BodyBudget`]; released when dropped.
#[derive(Debug)]
pub struct Reservation {
    budget: BodyBudget,
    bytes: usize,
}

impl Reservation {
    /// Reserve `n` more bytes; `false` (nothing reserved) when that would exceed the budget.
    pub fn grow(&mut self, n: usize) -> bool {
        use std::sync::atomic::Ordering;
        let b = &self.budget.inner;
        let mut cur = b.used.load(Ordering::Relaxed);
        loop {
            let Some(next) = cur.checked_add(n).filter(|v| *v <= b.max_bytes) else {
                return false;
            };
            match b
                .used
                .compare_exchange_weak(cur, next, Ordering::AcqRel, Ordering::Relaxed)
            {
                Ok(_) => {
                    self.bytes += n;
                    if let Some(m) = &b.meters {
                        m.buffered_bytes.inc_by(n as i64);
                    }
                    return true;
                }
                Err(actual) => cur = actual,
            }
        }
    }

    /// Bytes this reservation holds.
    pub fn bytes(&self) -> usize {
        self.bytes
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        let b = &self.budget.inner;
        b.used
            .fetch_sub(self.bytes, std::sync::atomic::Ordering::AcqRel);
        if let Some(m) = &b.meters {
            m.buffered_bytes.dec_by(self.bytes as i64);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pairs(v: &[(&str, &str)]) -> Vec<(String, Vec<u8>)> {
        v.iter()
            .map(|(k, v)| (k.to_string(), v.as_bytes().to_vec()))
            .collect()
    }

    #[test]
    fn forced_pick_only_with_test_hooks() {
        let h = pairs(&[("Test-EPP-Endpoint-Selection", "10.0.0.1")]);
        assert_eq!(
            InboundHeaders::read(h.as_slice(), GatewayPolicy::default()).forced,
            None
        );
        assert_eq!(
            InboundHeaders::read(h.as_slice(), GatewayPolicy { test_hooks: true })
                .forced
                .as_deref(),
            Some("10.0.0.1")
        );
    }

    #[test]
    fn llm_d_names_win_over_legacy_ones() {
        let h = pairs(&[
            ("x-gateway-model-name-rewrite", "legacy"),
            ("x-llm-d-model-name-rewrite", "new"),
            ("x-gateway-inference-objective", "obj"),
            ("x-llm-d-inference-fairness-id", " tenant-a "),
            ("x-request-id", ""),
        ]);
        let r = InboundHeaders::read(h.as_slice(), GatewayPolicy::default());
        assert_eq!(r.model_rewrite.as_deref(), Some("new"));
        assert_eq!(r.objective.as_deref(), Some("obj"));
        assert_eq!(r.fairness_id.as_deref(), Some("tenant-a"));
        assert_eq!(r.request_id, None);
        let (id, generated) = r.request_id_or_new();
        assert!(generated && request_id::is_uuid_v4(&id), "{id}");
    }

    #[test]
    fn http_header_maps_read_the_same() {
        let mut m = http::HeaderMap::new();
        m.insert("x-gateway-model-name-rewrite", "t".parse().unwrap());
        m.insert("x-request-id", "abc".parse().unwrap());
        let r = InboundHeaders::read(&m, GatewayPolicy::default());
        assert_eq!(r.model_rewrite.as_deref(), Some("t"));
        assert_eq!(r.request_id_or_new(), ("abc".to_string(), false));
    }

    #[test]
    fn body_budget_is_shared_and_released() {
        let b = BodyBudget::new(100);
        let mut r1 = b.reservation();
        let mut r2 = b.reservation();
        assert!(r1.grow(60));
        assert!(!r2.grow(41), "over the shared budget");
        assert!(r2.grow(40));
        assert_eq!(b.used(), 100);
        drop(r1);
        assert_eq!(b.used(), 40);
        assert!(r2.grow(60));
        drop(r2);
        assert_eq!(b.used(), 0);
        assert_eq!(b.error().status, 503);
    }

    #[test]
    fn body_limit() {
        let l = BodyLimit::new(10);
        assert!(!l.exceeded_by(10) && l.exceeded_by(11));
        let e = l.error();
        assert_eq!(e.status, 413);
        assert!(e.message.contains("10 bytes"), "{}", e.message);
    }
}

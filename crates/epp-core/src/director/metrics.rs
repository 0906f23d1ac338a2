//! The metrics of the request lifecycle, registered by the module that records them: requests
//! by operation and status, the picker's decision latency, routing decisions, prefix-cache hits,
//! end-to-end and time-to-first-token latency, and the tokens each backend reported.

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

use crate::metrics::{
    decision_histogram, e2e_histogram, BackendLabels, DecisionLabels, LabelStr, MethodLabels,
    RequestLabels,
};
use crate::request::ApiMethod;
use crate::scheduler::DecisionType;

/// Handles for everything the request path records.
#[derive(Debug)]
pub struct RequestMetrics {
    requests: Family<RequestLabels, Counter>,
    duration: Family<MethodLabels, Histogram, fn() -> Histogram>,
    cache_requests: Family<BackendLabels, Counter>,
    cache_hits: Family<BackendLabels, Counter>,
    decisions: Family<DecisionLabels, Counter>,
    e2e: Family<MethodLabels, Histogram, fn() -> Histogram>,
    ttft: Family<MethodLabels, Histogram, fn() -> Histogram>,
    prompt_tokens: Family<BackendLabels, Counter>,
    completion_tokens: Family<BackendLabels, Counter>,
    cached_tokens: Family<BackendLabels, Counter>,
    predicted_cached_tokens: Family<BackendLabels, Counter>,
}

impl RequestMetrics {
    /// Register the families in `registry`.
    pub fn register(registry: &mut Registry) -> Self {
        let requests = Family::<RequestLabels, Counter>::default();
        registry.register(
            "epp_requests",
            "Requests the picker handled, by API operation and the HTTP status the client finally got",
            requests.clone(),
        );
        let duration = Family::<MethodLabels, Histogram, fn() -> Histogram>::new_with_constructor(
            decision_histogram as fn() -> Histogram,
        );
        registry.register(
            "epp_request_duration_seconds",
            "The picker's own latency per request: from having the request to handing back the routing decision",
            duration.clone(),
        );
        let cache_requests = Family::<BackendLabels, Counter>::default();
        registry.register(
            "epp_cache_requests",
            "Routed requests whose prompt had at least one full prefix block, by picked backend",
            cache_requests.clone(),
        );
        let cache_hits = Family::<BackendLabels, Counter>::default();
        registry.register(
            "epp_cache_hits",
            "Of epp_cache_requests_total, those whose picked backend held at least the prompt's first prefix block",
            cache_hits.clone(),
        );
        let decisions = Family::<DecisionLabels, Counter>::default();
        registry.register(
            "epp_routing_decisions",
            "Routing decisions by reason: cache_hit, load_balance, health_check, no_endpoint",
            decisions.clone(),
        );
        let e2e = Family::<MethodLabels, Histogram, fn() -> Histogram>::new_with_constructor(
            e2e_histogram as fn() -> Histogram,
        );
        registry.register(
            "epp_request_e2e_duration_seconds",
            "Proxy mode: from receiving the request to the end of the response",
            e2e.clone(),
        );
        let ttft = Family::<MethodLabels, Histogram, fn() -> Histogram>::new_with_constructor(
            e2e_histogram as fn() -> Histogram,
        );
        registry.register(
            "epp_request_ttft_seconds",
            "Proxy mode: from receiving the request to the first response body byte",
            ttft.clone(),
        );
        let prompt_tokens = Family::<BackendLabels, Counter>::default();
        registry.register(
            "epp_backend_prompt_tokens",
            "Prompt tokens the backend reported computing for (usage.prompt_tokens of responses)",
            prompt_tokens.clone(),
        );
        let completion_tokens = Family::<BackendLabels, Counter>::default();
        registry.register(
            "epp_backend_completion_tokens",
            "Completion tokens the backend reported (usage.completion_tokens)",
            completion_tokens.clone(),
        );
        let cached_tokens = Family::<BackendLabels, Counter>::default();
        registry.register(
            "epp_backend_cached_tokens",
            "Prompt tokens the backend reported found in its cache (usage.prompt_tokens_details.cached_tokens): observed reuse",
            cached_tokens.clone(),
        );
        let predicted_cached_tokens = Family::<BackendLabels, Counter>::default();
        registry.register(
            "epp_backend_predicted_cached_tokens",
            "Prompt tokens the picker believed the backend had cached when it picked it, counted for the same responses as epp_backend_cached_tokens (those that reported cached tokens): predicted reuse",
            predicted_cached_tokens.clone(),
        );
        // Seed the fixed label sets so rates exist (as 0) before the first event.
        for m in ApiMethod::ALL {
            let _ = duration.get_or_create(&MethodLabels { method: m });
        }
        for d in DecisionType::ALL {
            let _ = decisions.get_or_create(&DecisionLabels { decision_type: d });
        }
        Self {
            requests,
            duration,
            cache_requests,
            cache_hits,
            decisions,
            e2e,
            ttft,
            prompt_tokens,
            completion_tokens,
            cached_tokens,
            predicted_cached_tokens,
        }
    }

    /// One response's `usage`, with the cached tokens the picker predicted for it.
    pub fn record_usage(
        &self,
        backend: &LabelStr,
        u: &crate::gateway::usage::Usage,
        predicted: u64,
    ) {
        let l = BackendLabels {
            backend: backend.clone(),
        };
        self.prompt_tokens.get_or_create(&l).inc_by(u.prompt_tokens);
        self.completion_tokens
            .get_or_create(&l)
            .inc_by(u.completion_tokens);
        // Predicted and observed count the same responses: those whose server reported its
        // cached tokens. A server that never reports them leaves both at 0.
        if let Some(cached) = u.cached_tokens {
            self.cached_tokens.get_or_create(&l).inc_by(cached);
            self.predicted_cached_tokens
                .get_or_create(&l)
                .inc_by(predicted);
        }
    }

    pub fn record_request(&self, method: ApiMethod, status: u16) {
        self.requests
            .get_or_create(&RequestLabels { method, status })
            .inc();
    }

    pub fn observe_decision_latency(&self, method: ApiMethod, seconds: f64) {
        self.duration
            .get_or_create(&MethodLabels { method })
            .observe(seconds);
    }

    pub fn record_decision(&self, d: DecisionType) {
        self.decisions
            .get_or_create(&DecisionLabels { decision_type: d })
            .inc();
    }

    /// A routed request with at least one full prefix block; `hit` if the picked backend held
    /// its first block.
    pub fn record_cache(&self, backend: &LabelStr, hit: bool) {
        let l = BackendLabels {
            backend: backend.clone(),
        };
        self.cache_requests.get_or_create(&l).inc();
        let hits = self.cache_hits.get_or_create(&l);
        if hit {
            hits.inc();
        }
    }

    pub fn observe_e2e(&self, method: ApiMethod, seconds: f64) {
        self.e2e
            .get_or_create(&MethodLabels { method })
            .observe(seconds);
    }

    pub fn observe_ttft(&self, method: ApiMethod, seconds: f64) {
        self.ttft
            .get_or_create(&MethodLabels { method })
            .observe(seconds);
    }
}

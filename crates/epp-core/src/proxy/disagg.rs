//! Prefill/decode disaggregation in proxy mode: what llm-d's routing sidecar does beside the
//! decode pod, done by the proxy itself, so P/D runs with no Envoy, no Kubernetes and no
//! sidecar. For a request the profile handler disaggregated, the proxy first sends the prefill
//! pick a copy of the request that asks it to compute the prompt and keep its KV blocks for a
//! remote decoder (vLLM's NIXL connector protocol: `kv_transfer_params.do_remote_decode`, one
//! output token, not streamed); the `kv_transfer_params` it answers with go into the decode
//! request, which the decode pick serves as the client asked (streamed or not), reading the
//! prompt's KV blocks instead of computing them.
//!
//! A prefill that fails, is unreachable, answers without `kv_transfer_params`, or takes longer
//! than `--prefill-timeout` costs the request nothing but time: the decode runs alone with the
//! client's body and computes the prompt itself. Each outcome is counted in
//! `epp_pd_prefill_requests_total{outcome}`; the prefill pod's own failures count against its
//! passive health. A client that goes away during the prefill call cancels it (the call is
//! dropped with the request).

use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{header, HeaderValue};
use http_body_util::{BodyExt, Full, Limited};
use serde_json::{Map, Value};

use super::forward::copy_request_headers;
use super::ProxyState;
use crate::datastore::{Endpoint, FailureKind};
use crate::director::RequestTracker;
use crate::gateway::headers::REQUEST_ID;
use crate::request::ApiMethod;
use crate::scheduler::disagg_metrics::PrefillOutcome;
use crate::scrape::failure_kind;

/// The largest prefill response read (its `kv_transfer_params` list the prompt's block ids).
pub const MAX_PREFILL_RESPONSE_BYTES: usize = 4 * 1024 * 1024;

/// The body fields that limit output tokens, per API (forced to 1 for the prefill).
fn token_limit_fields(method: ApiMethod) -> &'static [&'static str] {
    match method {
        ApiMethod::Responses => &["max_output_tokens"],
        _ => &["max_tokens", "max_completion_tokens", "min_tokens"],
    }
}

/// The prefill request's body: the client's with vLLM's remote-decode parameters, one output
/// token, not streamed. `None` when the body is not a JSON object (nothing to disaggregate).
pub fn prefill_body(client: &[u8], method: ApiMethod) -> Option<(Map<String, Value>, Vec<u8>)> {
    let Ok(Value::Object(original)) = serde_json::from_slice::<Value>(client) else {
        return None;
    };
    let mut p = original.clone();
    p.insert(
        "kv_transfer_params".into(),
        serde_json::json!({
            "do_remote_decode": true,
            "do_remote_prefill": false,
            "remote_engine_id": null,
            "remote_block_ids": null,
            "remote_host": null,
            "remote_port": null,
        }),
    );
    p.insert("stream".into(), Value::Bool(false));
    p.remove("stream_options");
    for f in token_limit_fields(method) {
        p.insert((*f).into(), Value::from(1));
    }
    let bytes = serde_json::to_vec(&p).ok()?;
    Some((original, bytes))
}

/// The decode request's body: the client's, plus the prefill's `kv_transfer_params`.
pub fn decode_body(mut original: Map<String, Value>, params: Value) -> Option<Vec<u8>> {
    original.insert("kv_transfer_params".into(), params);
    serde_json::to_vec(&original).ok()
}

/// The `kv_transfer_params` object of a prefill response, if it has one.
pub fn transfer_params(response: &[u8]) -> Option<Value> {
    let Ok(Value::Object(mut m)) = serde_json::from_slice::<Value>(response) else {
        return None;
    };
    match m.remove("kv_transfer_params") {
        Some(v @ Value::Object(_)) => Some(v),
        _ => None,
    }
}

/// Run the prefill stage for `body` (what would go to the decoder) on `prefill`; the body the
/// decode request carries: with the prefill's `kv_transfer_params`, or `body` itself when the
/// prefill did not work out.
pub(crate) async fn run_prefill(
    st: &ProxyState,
    parts: &http::request::Parts,
    method: ApiMethod,
    body: Bytes,
    prefill: &Endpoint,
    tracker: &mut RequestTracker,
    request_id: &str,
) -> Bytes {
    let Some((original, pbody)) = prefill_body(&body, method) else {
        tracker.prefill_answered(Ok(()));
        return body;
    };
    let started = Instant::now();
    let (outcome, params) = call(st, parts, pbody, prefill, tracker, request_id).await;
    st.director
        .metrics()
        .disagg()
        .prefill(outcome, started.elapsed().as_secs_f64());
    match params.and_then(|p| decode_body(original, p)) {
        Some(b) => Bytes::from(b),
        None => {
            tracing::debug!(
                prefill = prefill.address(),
                outcome = outcome.as_str(),
                "prefill did not complete; the decode runs alone"
            );
            body
        }
    }
}

async fn call(
    st: &ProxyState,
    parts: &http::request::Parts,
    pbody: Vec<u8>,
    prefill: &Endpoint,
    tracker: &mut RequestTracker,
    request_id: &str,
) -> (PrefillOutcome, Option<Value>) {
    let path = parts
        .uri
        .path_and_query()
        .map(|p| p.as_str())
        .unwrap_or("/");
    let Ok(uri) = format!("http://{}{path}", prefill.address()).parse::<http::Uri>() else {
        tracker.prefill_answered(Ok(()));
        return (PrefillOutcome::Unreachable, None);
    };
    let len = pbody.len();
    let mut req = http::Request::new(Full::new(Bytes::from(pbody)));
    *req.method_mut() = http::Method::POST;
    *req.uri_mut() = uri;
    copy_request_headers(&parts.headers, req.headers_mut());
    let h = req.headers_mut();
    h.insert(header::CONTENT_LENGTH, HeaderValue::from(len));
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    if let Ok(v) = HeaderValue::from_str(request_id) {
        h.insert(REQUEST_ID, v);
    }
    let timeout: Duration = st.opts.prefill_timeout;
    let exchange = async {
        let resp = st.client.request(req).await?;
        let status = resp.status().as_u16();
        let body = Limited::new(resp.into_body(), MAX_PREFILL_RESPONSE_BYTES)
            .collect()
            .await
            .map(|c| c.to_bytes());
        Ok::<_, hyper_util::client::legacy::Error>((status, body))
    };
    match tokio::time::timeout(timeout, exchange).await {
        Err(_) => {
            tracker.prefill_answered(Err(FailureKind::Other));
            (PrefillOutcome::Timeout, None)
        }
        Ok(Err(e)) => {
            tracker.prefill_answered(Err(failure_kind(&e)));
            (PrefillOutcome::Unreachable, None)
        }
        Ok(Ok((status, body))) => {
            tracker.prefill_answered(if status >= 500 {
                Err(FailureKind::Other)
            } else {
                Ok(())
            });
            if !(200..300).contains(&status) {
                return (PrefillOutcome::Status, None);
            }
            match body.ok().as_deref().and_then(transfer_params) {
                Some(p) => (PrefillOutcome::Transferred, Some(p)),
                None => (PrefillOutcome::InvalidResponse, None),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_prefill_body_asks_for_a_remote_decode_of_one_unstreamed_token() {
        let client = br#"{"model":"m","messages":[{"role":"user","content":"hi"}],"stream":true,"stream_options":{"include_usage":true},"max_tokens":50}"#;
        let (original, p) = prefill_body(client, ApiMethod::ChatCompletions).unwrap();
        let p: Value = serde_json::from_slice(&p).unwrap();
        assert_eq!(p["stream"], false);
        assert!(p.get("stream_options").is_none());
        assert_eq!(p["max_tokens"], 1);
        assert_eq!(p["max_completion_tokens"], 1);
        assert_eq!(p["min_tokens"], 1);
        assert_eq!(
            p["kv_transfer_params"],
            serde_json::json!({"do_remote_decode": true, "do_remote_prefill": false,
                "remote_engine_id": null, "remote_block_ids": null, "remote_host": null, "remote_port": null})
        );
        assert_eq!(p["messages"][0]["content"], "hi");
        // The decode keeps the client's own stream, options and limits.
        let params = serde_json::json!({"do_remote_prefill": true, "remote_block_ids": [1, 2]});
        let d: Value =
            serde_json::from_slice(&decode_body(original, params.clone()).unwrap()).unwrap();
        assert_eq!(d["stream"], true);
        assert_eq!(d["stream_options"]["include_usage"], true);
        assert_eq!(d["max_tokens"], 50);
        assert_eq!(d["kv_transfer_params"], params);
        // The Responses API limits max_output_tokens only.
        let (_, p) = prefill_body(br#"{"model":"m","input":"x"}"#, ApiMethod::Responses).unwrap();
        let p: Value = serde_json::from_slice(&p).unwrap();
        assert_eq!(p["max_output_tokens"], 1);
        assert!(p.get("max_tokens").is_none());
        // Not a JSON object: nothing to disaggregate.
        assert!(prefill_body(b"[1,2]", ApiMethod::Completions).is_none());
        assert!(prefill_body(b"not json", ApiMethod::Completions).is_none());
    }

    #[test]
    fn transfer_params_are_read_only_from_an_object() {
        assert_eq!(
            transfer_params(br#"{"id":"x","kv_transfer_params":{"remote_block_ids":[3]}}"#),
            Some(serde_json::json!({"remote_block_ids": [3]}))
        );
        assert_eq!(transfer_params(br#"{"kv_transfer_params":null}"#), None);
        assert_eq!(transfer_params(br#"{"kv_transfer_params":[1]}"#), None);
        assert_eq!(transfer_params(br#"{"choices":[]}"#), None);
        assert_eq!(transfer_params(b"\xff\x00"), None);
    }
}

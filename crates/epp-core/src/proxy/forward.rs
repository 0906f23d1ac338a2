//! Forwarding a routed request: to the primary pick, and when connecting fails before any byte
//! was sent, to the next-ranked endpoint (at most `--max-attempts`). What each endpoint did is
//! reported to the request's tracker, which feeds passive health; errors of our own (a URI that
//! cannot be built) are answered without blaming anyone.

use axum::body::Body;
use axum::response::Response;
use bytes::Bytes;
use http::{header, HeaderMap, HeaderName, HeaderValue};
use http_body_util::Full;

use super::relay::TrackedBody;
use super::{error_response, ProxyState};
use crate::director::{RouteError, Routed};
use crate::gateway::headers::{DISAGG_HEADERS, REQUEST_ID, SERVED};
use crate::scrape::failure_kind;

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

/// A client's request headers for an upstream request: hop-by-hop ones dropped, and the
/// routing sidecar's headers (the proxy orchestrates disaggregation itself; a client's must
/// not steer a sidecar downstream).
pub(crate) fn copy_request_headers(from: &HeaderMap, to: &mut HeaderMap) {
    for (k, v) in from {
        if !is_hop_by_hop(k) && !DISAGG_HEADERS.contains(&k.as_str()) {
            to.append(k.clone(), v.clone());
        }
    }
}

/// The endpoint closed or reset the connection before answering anything (a server shutting
/// down closes its kept-alive connections under the request being sent). Nothing reached the
/// client yet, so the request goes to the next-ranked endpoint, as after a refused connect.
fn closed_without_answer(e: &hyper_util::client::legacy::Error) -> bool {
    super::connection_dropped(e)
}

/// Send `routed` upstream and relay the answer. `client_body` is what the client sent; the
/// director's rewritten body goes instead when it made one.
pub(crate) async fn forward(
    st: &ProxyState,
    parts: &http::request::Parts,
    client_body: Bytes,
    routed: Routed,
    request_id: &str,
) -> Response {
    let body = routed.body.map(Bytes::from).unwrap_or(client_body);
    let mut tracker = routed.tracker;
    let path_and_query = parts
        .uri
        .path_and_query()
        .map(|p| p.as_str())
        .unwrap_or("/");
    let mut last_err = String::new();
    for (attempt, ep) in routed.targets.iter().take(st.opts.max_attempts).enumerate() {
        if attempt > 0 {
            tracker.retarget(ep.clone());
        }
        let addr = ep.address();
        let uri = match format!("http://{addr}{path_and_query}").parse::<http::Uri>() {
            Ok(u) => u,
            Err(e) => {
                // Ours, not the endpoint's: the request cannot be expressed upstream.
                tracker.finish(500);
                let err = RouteError::new(500, format!("cannot build the upstream URI: {e}"));
                return error_response(&err, request_id);
            }
        };
        let mut up = http::Request::new(Full::new(body.clone()));
        *up.method_mut() = parts.method.clone();
        *up.uri_mut() = uri;
        copy_request_headers(&parts.headers, up.headers_mut());
        if let Ok(v) = HeaderValue::from_str(request_id) {
            up.headers_mut().insert(REQUEST_ID, v);
        }
        if !body.is_empty() {
            up.headers_mut()
                .insert(header::CONTENT_LENGTH, HeaderValue::from(body.len()));
        }
        match tokio::time::timeout(st.opts.upstream_timeout, st.client.request(up)).await {
            Err(_) => {
                tracker.upstream_failed(crate::datastore::FailureKind::Other);
                tracker.finish(504);
                let err = RouteError::new(
                    504,
                    format!(
                        "upstream {addr} did not answer within {:?} (--upstream-timeout)",
                        st.opts.upstream_timeout
                    ),
                );
                return error_response(&err, request_id);
            }
            Ok(Err(e)) => {
                tracker.upstream_failed(failure_kind(&e));
                if e.is_connect() || closed_without_answer(&e) {
                    tracing::debug!(endpoint = %addr, error = %e, "no answer from the endpoint; trying the next one");
                    last_err = format!("{addr}: {e}");
                    continue;
                }
                tracker.finish(502);
                let err = RouteError::new(502, format!("upstream {addr} failed: {e}"));
                return error_response(&err, request_id);
            }
            Ok(Ok(resp)) => {
                let status = resp.status().as_u16();
                tracker.upstream_status(status);
                let (rparts, rbody) = resp.into_parts();
                let mut out = Response::new(Body::empty());
                *out.status_mut() = rparts.status;
                copy_headers(&rparts.headers, out.headers_mut());
                // A restored model name can change the length: then the body goes chunked.
                if !tracker.rewrites_responses() {
                    if let Some(cl) = rparts.headers.get(header::CONTENT_LENGTH) {
                        out.headers_mut().insert(header::CONTENT_LENGTH, cl.clone());
                    }
                }
                if let Ok(v) = HeaderValue::from_str(addr) {
                    out.headers_mut().insert(SERVED, v);
                }
                if let Ok(v) = HeaderValue::from_str(request_id) {
                    out.headers_mut().insert(REQUEST_ID, v);
                }
                // What the scheduler's plugins answer with (e.g. the session token).
                for (k, v) in tracker.response_headers() {
                    if let (Ok(k), Ok(v)) = (HeaderName::try_from(k), HeaderValue::try_from(v)) {
                        out.headers_mut().insert(k, v);
                    }
                }
                *out.body_mut() = Body::new(TrackedBody::new(rbody, tracker, status));
                return out;
            }
        }
    }
    tracker.finish(502);
    let err = RouteError::new(
        502,
        format!("no picked endpoint answered; last error: {last_err}"),
    );
    error_response(&err, request_id)
}

//! Reading one client request: which route its path and method are (only the inference API is
//! forwarded; everything else is answered here), and its body, bounded in size and in time.
//! Every refusal is a local error: it never counts against an endpoint.

use std::time::Duration;

use axum::body::Body;
use bytes::Bytes;
use http::Method;
use http_body_util::BodyExt;

use crate::director::RouteError;
use crate::gateway::{BodyBudget, BodyLimit, Reservation};
use crate::request::ApiMethod;

/// The paths forwarded to model servers (POST only): the OpenAI inference API and the vLLM
/// endpoints that sit next to it. Anything else a model server exposes (`/metrics`,
/// `/reset_prefix_cache`, `/sleep`, adapter loading, …) is not reachable through the proxy.
pub const FORWARDED_PATHS: [&str; 6] = [
    "/v1/chat/completions",
    "/v1/completions",
    "/v1/embeddings",
    "/v1/responses",
    "/v1/rerank",
    "/v1/score",
];

/// What the proxy does with a request line.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Route {
    /// Route and forward.
    Inference(ApiMethod),
    /// `GET /v1/models`: answered from what the pool serves.
    ListModels,
    /// `GET /v1/models/{id}`.
    GetModel(String),
    /// Refused here with this error.
    Refuse(RouteError),
}

/// Classify a request by method and path (the query string is ignored).
pub fn route(method: &Method, path: &str) -> Route {
    let path = path.split('?').next().unwrap_or("");
    if FORWARDED_PATHS.contains(&path) {
        if method == Method::POST {
            return Route::Inference(ApiMethod::from_path(path));
        }
        return Route::Refuse(method_not_allowed(method, path, "POST"));
    }
    if path == "/v1/models" {
        if method == Method::GET {
            return Route::ListModels;
        }
        return Route::Refuse(method_not_allowed(method, path, "GET"));
    }
    if let Some(id) = path.strip_prefix("/v1/models/").filter(|id| !id.is_empty()) {
        if method == Method::GET {
            let id = percent_encoding::percent_decode_str(id)
                .decode_utf8_lossy()
                .into_owned();
            return Route::GetModel(id);
        }
        return Route::Refuse(method_not_allowed(method, path, "GET"));
    }
    let shown: String = path.chars().take(200).collect();
    Route::Refuse(RouteError::new(
        404,
        format!(
            "no such path {shown:?}: the proxy serves {} (POST) and /v1/models (GET)",
            FORWARDED_PATHS.join(", ")
        ),
    ))
}

fn method_not_allowed(method: &Method, path: &str, allowed: &str) -> RouteError {
    RouteError::new(
        405,
        format!("{path} accepts {allowed}, not {}", method.as_str()),
    )
}

/// Why a body could not be read.
#[derive(Debug)]
pub enum ReadError {
    /// The client went away mid-body (counted as 499; nobody is there to answer).
    ClientGone,
    /// An error to send back.
    Refuse(RouteError),
}

/// Read the whole body: at most `limit` bytes (a declared `Content-Length` over it is refused
/// before reading), all of it within `timeout`, each chunk reserved against the shared
/// `budget` as it arrives. The reservation is handed back with the body: hold it while the
/// body is in memory.
pub async fn body(
    body: Body,
    declared_len: Option<u64>,
    limit: BodyLimit,
    budget: &BodyBudget,
    timeout: Duration,
) -> Result<(Bytes, Reservation), ReadError> {
    if let Some(len) = declared_len {
        if len > limit.max_bytes as u64 {
            return Err(ReadError::Refuse(limit.error()));
        }
    }
    let mut reservation = budget.reservation();
    let read = async {
        let mut body = body;
        let mut buf = bytes::BytesMut::new();
        while let Some(frame) = body.frame().await {
            let frame = frame.map_err(|e| {
                if is_client_gone(&e) {
                    ReadError::ClientGone
                } else {
                    ReadError::Refuse(RouteError::new(
                        400,
                        format!("failed to read the request body: {e}"),
                    ))
                }
            })?;
            let Ok(data) = frame.into_data() else {
                continue;
            };
            if limit.exceeded_by(buf.len() + data.len()) {
                return Err(ReadError::Refuse(limit.error()));
            }
            if !reservation.grow(data.len()) {
                return Err(ReadError::Refuse(budget.error()));
            }
            buf.extend_from_slice(&data);
        }
        Ok(buf.freeze())
    };
    match tokio::time::timeout(timeout, read).await {
        Err(_) => Err(ReadError::Refuse(RouteError::new(
            408,
            format!("the request body did not arrive within {timeout:?} (--body-read-timeout)"),
        ))),
        Ok(Ok(b)) => Ok((b, reservation)),
        Ok(Err(e)) => Err(e),
    }
}

/// An incomplete body (the connection closed or reset before the declared end).
fn is_client_gone(e: &axum::Error) -> bool {
    super::connection_dropped(e)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_inference_api_is_forwarded() {
        assert_eq!(
            route(&Method::POST, "/v1/chat/completions?x=1"),
            Route::Inference(ApiMethod::ChatCompletions)
        );
        assert_eq!(
            route(&Method::POST, "/v1/rerank"),
            Route::Inference(ApiMethod::Other)
        );
        assert_eq!(route(&Method::GET, "/v1/models"), Route::ListModels);
        assert_eq!(
            route(&Method::GET, "/v1/models/a%2Fb"),
            Route::GetModel("a/b".into())
        );
        for (m, p, status) in [
            (Method::GET, "/metrics", 404),
            (Method::POST, "/admin/faults", 404),
            (Method::POST, "/reset_prefix_cache", 404),
            (Method::OPTIONS, "*", 404),
            (Method::GET, "/v1/chat/completions", 405),
            (Method::POST, "/v1/models", 405),
            (Method::POST, "/v1/chat/completions/", 404),
        ] {
            match route(&m, p) {
                Route::Refuse(e) => assert_eq!(e.status, status, "{m} {p}"),
                other => panic!("{m} {p}: {other:?}"),
            }
        }
    }
}

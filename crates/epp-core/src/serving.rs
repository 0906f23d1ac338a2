//! The picker's side servers, shared by both modes: `/metrics` (with authentication) and the
//! plain `/healthz` + `/readyz` probes. Denials say how to fix them.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use axum::extract::State;
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;

use crate::director::error_body;
use crate::metrics::{Metrics, CONTENT_TYPE};

/// How `/metrics` is protected.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum MetricsAuthMode {
    /// No authentication (local use, or a network policy protects the port).
    None,
    /// A static bearer token read from `--metrics-token-file`.
    Token,
    /// Kubernetes TokenReview + SubjectAccessReview (as controller-runtime does).
    Kubernetes,
}

/// A resolved authenticator.
#[derive(Clone)]
pub enum MetricsAuth {
    None,
    Token {
        token: Arc<str>,
        file: PathBuf,
    },
    /// Delegates to an external authorizer (Kubernetes TokenReview/SAR).
    Delegated(Arc<dyn Authorizer>),
}

impl std::fmt::Debug for MetricsAuth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            MetricsAuth::None => f.write_str("none"),
            MetricsAuth::Token { file, .. } => write!(f, "token (from {})", file.display()),
            MetricsAuth::Delegated(_) => f.write_str("kubernetes"),
        }
    }
}

/// An authorization decision that explains itself.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum AuthDecision {
    Allow,
    /// 401/403/500 with a message naming the fix.
    Deny {
        status: u16,
        message: String,
    },
}

/// Boxed future returned by [`Authorizer::authorize`].
pub type AuthFuture<'a> =
    std::pin::Pin<Box<dyn std::future::Future<Output = AuthDecision> + Send + 'a>>;

/// External authorizers (Kubernetes). `token` is the bearer token, if any.
pub trait Authorizer: Send + Sync {
    fn authorize<'a>(&'a self, token: Option<&'a str>, path: &'a str) -> AuthFuture<'a>;
}

impl MetricsAuth {
    /// Read the token file (trimmed); empty or unreadable files are configuration errors.
    pub fn token_from_file(path: PathBuf) -> Result<Self, String> {
        let raw = std::fs::read_to_string(&path)
            .map_err(|e| format!("--metrics-token-file {}: cannot read: {e}", path.display()))?;
        let token = raw.trim();
        if token.is_empty() {
            return Err(format!(
                "--metrics-token-file {}: file is empty",
                path.display()
            ));
        }
        Ok(MetricsAuth::Token {
            token: Arc::from(token),
            file: path,
        })
    }
}

fn bearer(headers: &HeaderMap) -> Option<&str> {
    let v = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, rest) = v.split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then(|| rest.trim())
}

fn ct_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

fn json_error(status: u16, message: &str) -> Response {
    let code = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let mut r = (code, error_body(status, message, None)).into_response();
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("application/json"),
    );
    if status == 401 {
        r.headers_mut().insert(
            header::WWW_AUTHENTICATE,
            header::HeaderValue::from_static("Bearer realm=\"epp-metrics\""),
        );
    }
    r
}

#[derive(Clone)]
struct MetricsState {
    metrics: Arc<Metrics>,
    auth: MetricsAuth,
}

async fn metrics_handler(State(st): State<MetricsState>, headers: HeaderMap) -> Response {
    match &st.auth {
        MetricsAuth::None => {}
        MetricsAuth::Token { token, file } => match bearer(&headers) {
            None => {
                return json_error(
                    401,
                    &format!(
                        "missing bearer token: this picker runs with --metrics-auth=token; send `Authorization: Bearer <token>` with the token in {} (Prometheus: authorization.credentials_file)",
                        file.display()
                    ),
                )
            }
            Some(t) if !ct_eq(t.as_bytes(), token.as_bytes()) => {
                return json_error(
                    401,
                    &format!(
                        "invalid bearer token: it does not match the token in {} on the picker",
                        file.display()
                    ),
                )
            }
            Some(_) => {}
        },
        MetricsAuth::Delegated(a) => {
            if let AuthDecision::Deny { status, message } = a.authorize(bearer(&headers), "/metrics").await {
                return json_error(status, &message);
            }
        }
    }
    let body = st.metrics.encode();
    ([(header::CONTENT_TYPE, CONTENT_TYPE)], body).into_response()
}

/// Router for the metrics port.
pub fn metrics_router(metrics: Arc<Metrics>, auth: MetricsAuth) -> Router {
    Router::new()
        .route("/metrics", get(metrics_handler))
        .with_state(MetricsState { metrics, auth })
}

/// Readiness check: `Ok` when ready, else the reason.
pub type ReadyFn = Arc<dyn Fn() -> Result<(), String> + Send + Sync>;

/// Router for the health-probe port: `/healthz` (alive) and `/readyz`.
pub fn health_router(ready: ReadyFn) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .route(
            "/readyz",
            get(move || {
                let ready = ready.clone();
                async move {
                    match ready() {
                        Ok(()) => (StatusCode::OK, "ok".to_string()),
                        Err(why) => (StatusCode::SERVICE_UNAVAILABLE, why),
                    }
                }
            }),
        )
}

/// Bind a listener with an error that names the flag.
pub async fn bind(
    addr: SocketAddr,
    flag: &'static str,
) -> Result<tokio::net::TcpListener, crate::app::StartError> {
    tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|source| crate::app::StartError::Bind { flag, addr, source })
}

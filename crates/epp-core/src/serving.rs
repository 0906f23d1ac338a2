//! The picker's side servers, shared by both modes: `/metrics` (with authentication) and the
//! plain `/healthz` + `/readyz` probes. Denials say what the client needs and nothing about the
//! server's files; the operator's detail goes to the log.
//!
//! The static token (`--metrics-auth=token`) is re-read from its file at most every
//! [`TOKEN_RECHECK`] (on the next request), so a rotated token takes effect within seconds
//! without a restart; a file that becomes unreadable or empty keeps the last good token, with one
//! warning until the file is good again.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use parking_lot::Mutex;

use axum::extract::State;
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;

use crate::metrics::{Metrics, CONTENT_TYPE};

/// How often the metrics token file is re-read at most (checked on requests).
pub const TOKEN_RECHECK: Duration = Duration::from_secs(1);

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
    /// A static token from a file, re-read on change.
    Token(Arc<TokenFile>),
    /// Delegates to an external authorizer (Kubernetes TokenReview/SAR).
    Delegated(Arc<dyn Authorizer>),
}

impl std::fmt::Debug for MetricsAuth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            MetricsAuth::None => f.write_str("none"),
            MetricsAuth::Token(t) => write!(f, "token (from {})", t.path().display()),
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
        TokenFile::open(path, TOKEN_RECHECK).map(|t| MetricsAuth::Token(Arc::new(t)))
    }
}

/// The static bearer token and the file it comes from. [`TokenFile::current`] re-reads the file
/// when `recheck` has passed since the last look, keeping the last good token when the file is
/// unreadable or empty.
#[derive(Debug)]
pub struct TokenFile {
    path: PathBuf,
    recheck: Duration,
    token: ArcSwap<String>,
    /// When the file was last looked at, and whether its current trouble was already logged.
    state: Mutex<(Instant, bool)>,
}

fn read_token(path: &Path) -> Result<String, String> {
    let raw = std::fs::read_to_string(path).map_err(|e| format!("cannot read: {e}"))?;
    let token = raw.trim();
    if token.is_empty() {
        return Err("file is empty".into());
    }
    Ok(token.to_string())
}

impl TokenFile {
    /// Read the token now; errors name `--metrics-token-file` and the path.
    pub fn open(path: PathBuf, recheck: Duration) -> Result<Self, String> {
        let token = read_token(&path)
            .map_err(|e| format!("--metrics-token-file {}: {e}", path.display()))?;
        Ok(Self {
            path,
            recheck,
            token: ArcSwap::from_pointee(token),
            state: Mutex::new((Instant::now(), false)),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The token in force, re-read from the file first when `recheck` has passed. Requests
    /// that arrive while another one re-reads use the token as it was.
    pub fn current(&self) -> Arc<String> {
        if let Some(mut st) = self.state.try_lock() {
            if st.0.elapsed() >= self.recheck {
                st.0 = Instant::now();
                match read_token(&self.path) {
                    Ok(t) => {
                        if *self.token.load_full() != t {
                            self.token.store(Arc::new(t));
                            tracing::info!(file = %self.path.display(), "metrics token reloaded");
                        }
                        st.1 = false;
                    }
                    Err(e) => {
                        if !st.1 {
                            tracing::warn!(file = %self.path.display(), error = %e,
                                "--metrics-token-file: keeping the last good token");
                            st.1 = true;
                        }
                    }
                }
            }
        }
        self.token.load_full()
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

/// An OpenAI-shaped error body: `type` and `code` from the status, `code` a string.
fn json_error(status: u16, message: &str) -> Response {
    let code = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let (kind, short) = match status {
        401 => ("authentication_error", "unauthorized"),
        403 => ("permission_error", "forbidden"),
        _ => ("internal_error", "internal_error"),
    };
    let body = serde_json::json!({
        "error": {"message": message, "type": kind, "param": null, "code": short}
    })
    .to_string();
    let mut r = (code, body).into_response();
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
        MetricsAuth::Token(file) => {
            let token = file.current();
            let ok = bearer(&headers).is_some_and(|t| ct_eq(t.as_bytes(), token.as_bytes()));
            if !ok {
                return json_error(401, "missing or invalid bearer token");
            }
        }
        MetricsAuth::Delegated(a) => {
            if let AuthDecision::Deny { status, message } =
                a.authorize(bearer(&headers), "/metrics").await
            {
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

/// Warnings that do not change readiness but belong in `/readyz`'s detail (e.g. an expired
/// metrics certificate), one sentence each.
pub type WarningsFn = Arc<dyn Fn() -> Vec<String> + Send + Sync>;

/// Router for the health-probe port: `/healthz` (alive) and `/readyz`.
pub fn health_router(ready: ReadyFn) -> Router {
    health_router_with_warnings(ready, Arc::new(Vec::new))
}

/// As [`health_router`]; `/readyz` adds one `warning: ...` line per current warning, with the
/// status readiness alone decides.
pub fn health_router_with_warnings(ready: ReadyFn, warnings: WarningsFn) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .route(
            "/readyz",
            get(move || {
                let (ready, warnings) = (ready.clone(), warnings.clone());
                async move {
                    let (code, mut body) = match ready() {
                        Ok(()) => (StatusCode::OK, "ok".to_string()),
                        Err(why) => (StatusCode::SERVICE_UNAVAILABLE, why),
                    };
                    for w in warnings() {
                        body.push_str("\nwarning: ");
                        body.push_str(&w);
                    }
                    (code, body)
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

#[cfg(test)]
mod tests {
    use super::*;
    use axum::body::Body;
    use http_body_util::BodyExt;
    use tower::ServiceExt;

    fn router(auth: MetricsAuth) -> Router {
        let ds = crate::datastore::DatastoreWriter::new(Default::default()).reader();
        let prefix = Arc::new(crate::prefix::PrefixIndex::new(Default::default()));
        metrics_router(Metrics::new(ds, prefix), auth)
    }

    async fn get(r: &Router, token: Option<&str>) -> (u16, String) {
        let mut req = axum::http::Request::get("/metrics");
        if let Some(t) = token {
            req = req.header("authorization", format!("Bearer {t}"));
        }
        let resp = r
            .clone()
            .oneshot(req.body(Body::empty()).unwrap())
            .await
            .unwrap();
        let status = resp.status().as_u16();
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        (status, String::from_utf8_lossy(&body).into_owned())
    }

    fn denied() -> serde_json::Value {
        serde_json::json!({"error": {
            "message": "missing or invalid bearer token",
            "type": "authentication_error",
            "param": null,
            "code": "unauthorized",
        }})
    }

    fn json(body: &str) -> serde_json::Value {
        serde_json::from_str(body).unwrap_or_else(|e| panic!("{e}: {body}"))
    }

    #[tokio::test]
    async fn a_rotated_token_takes_effect_without_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("token");
        std::fs::write(&path, "first\n").unwrap();
        let file = Arc::new(TokenFile::open(path.clone(), Duration::ZERO).unwrap());
        let r = router(MetricsAuth::Token(file.clone()));
        assert_eq!(get(&r, Some("first")).await.0, 200);
        std::fs::write(&path, "second\n").unwrap();
        let (code, body) = get(&r, Some("first")).await;
        assert_eq!((code, json(&body)), (401, denied()));
        let (code, body) = get(&r, Some("second")).await;
        assert_eq!(code, 200);
        assert!(body.contains("epp_requests_total") || body.contains("epp_build_info"));
        // Unreadable or empty: the last good token stays in force.
        std::fs::write(&path, "  \n").unwrap();
        assert_eq!(get(&r, Some("second")).await.0, 200);
        std::fs::remove_file(&path).unwrap();
        assert_eq!(get(&r, Some("second")).await.0, 200);
        assert_eq!(file.current().as_str(), "second");
        // Good again: the new content wins.
        std::fs::write(&path, "third").unwrap();
        assert_eq!(get(&r, Some("second")).await.0, 401);
        assert_eq!(get(&r, Some("third")).await.0, 200);
    }

    #[tokio::test]
    async fn the_token_is_re_read_at_most_every_recheck_interval() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("token");
        std::fs::write(&path, "old").unwrap();
        let file = TokenFile::open(path.clone(), Duration::from_secs(3600)).unwrap();
        std::fs::write(&path, "new").unwrap();
        assert_eq!(file.current().as_str(), "old");
        assert_eq!(TOKEN_RECHECK, Duration::from_secs(1));
    }

    #[tokio::test]
    async fn denials_name_no_server_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("secret-token-file");
        std::fs::write(&path, "t").unwrap();
        let r = router(MetricsAuth::token_from_file(path.clone()).unwrap());
        for token in [None, Some("wrong")] {
            let (code, body) = get(&r, token).await;
            assert_eq!((code, json(&body)), (401, denied()));
            assert!(!body.contains("secret-token-file"));
        }
        assert_eq!(get(&r, Some("t")).await.0, 200);
        let e = MetricsAuth::token_from_file(dir.path().join("none")).unwrap_err();
        assert!(e.starts_with("--metrics-token-file "), "{e}");
    }
}

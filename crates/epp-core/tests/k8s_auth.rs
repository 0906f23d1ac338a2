//! `--metrics-auth=kubernetes` against the in-test API server: the 401/401/403/200/500 matrix
//! over real HTTP (denials never carry metrics and always name the fix), and controller-runtime's
//! cache lifetimes checked with a paused tokio clock.

mod k8s_fake;

use std::sync::Arc;
use std::time::Duration;

use epp_core::app::{Runtime, RuntimeOptions};
use epp_core::discovery::StaticDiscovery;
use epp_core::k8s::auth::KubeAuthorizer;
use epp_core::k8s::KubeClient;
use epp_core::serving::{AuthDecision, MetricsAuth};
use epp_core::telemetry::Shutdown;
use k8s_fake::FakeApi;

const PROM: &str = "system:serviceaccount:llm-d-monitoring:prometheus";
const NOBODY: &str = "system:serviceaccount:default:nobody";

async fn get(addr: std::net::SocketAddr, token: Option<&str>) -> (u16, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    let auth = token
        .map(|t| format!("authorization: Bearer {t}\r\n"))
        .unwrap_or_default();
    s.write_all(
        format!("GET /metrics HTTP/1.1\r\nhost: t\r\n{auth}connection: close\r\n\r\n").as_bytes(),
    )
    .await
    .unwrap();
    let mut buf = Vec::new();
    s.read_to_end(&mut buf).await.unwrap();
    let text = String::from_utf8_lossy(&buf).to_string();
    (
        text[9..12].parse().unwrap(),
        text.split_once("\r\n\r\n").unwrap().1.to_string(),
    )
}

async fn picker(auth: MetricsAuth) -> Runtime {
    let opts = RuntimeOptions {
        discovery: std::sync::Arc::new(StaticDiscovery {
            endpoints: vec!["127.0.0.1:9".into()],
            poll_interval: Duration::from_secs(1),
            ..Default::default()
        }),
        metrics_addr: Some("127.0.0.1:0".parse().unwrap()),
        health_addr: None,
        metrics_auth: auth,
        ..Default::default()
    };
    let v = opts.validate().unwrap();
    Runtime::start(opts, v, Shutdown::new()).await.unwrap()
}

fn assert_no_metrics(body: &str) {
    assert!(
        !body.contains("epp_") && !body.contains("# HELP") && !body.contains("process_"),
        "a denial leaked metrics: {body}"
    );
}

#[tokio::test]
async fn auth_matrix_401_401_403_200_500_with_fixes_named() {
    let api = FakeApi::start();
    api.add_token("prom-token", PROM, &["system:serviceaccounts"]);
    api.add_token("nobody-token", NOBODY, &["system:serviceaccounts"]);
    api.allow(PROM, "/metrics");
    let p = picker(MetricsAuth::Delegated(Arc::new(KubeAuthorizer::new(
        api.client(),
    ))))
    .await;
    let m = p.metrics_addr.unwrap();

    let (code, body) = get(m, None).await;
    assert_eq!(code, 401, "{body}");
    assert_no_metrics(&body);
    assert!(body.contains("missing bearer token"), "{body}");
    assert!(body.contains("--metrics-auth=none"), "{body}");

    let (code, body) = get(m, Some("forged")).await;
    assert_eq!(code, 401, "{body}");
    assert_no_metrics(&body);
    assert!(body.contains("invalid bearer token"), "{body}");
    assert!(body.contains("token lookup failed"), "{body}");

    let (code, body) = get(m, Some("nobody-token")).await;
    assert_eq!(code, 403, "{body}");
    assert_no_metrics(&body);
    assert!(body.contains(NOBODY), "403 names the user: {body}");
    assert!(body.contains("ClusterRole metrics-reader"), "{body}");
    assert!(body.contains("deploy/kubernetes/rbac.yaml"), "{body}");
    assert!(
        body.contains("--clusterrole=metrics-reader --serviceaccount=default:nobody"),
        "{body}"
    );

    let (code, body) = get(m, Some("prom-token")).await;
    assert_eq!(code, 200, "{body}");
    assert!(body.contains("epp_pods_discovered"), "{body}");

    // The review requests the API saw are the documented shapes.
    let reqs = api.requests();
    assert!(reqs
        .iter()
        .any(|r| r == "POST /apis/authentication.k8s.io/v1/tokenreviews?"
            || r == "POST /apis/authentication.k8s.io/v1/tokenreviews"));
    assert!(reqs
        .iter()
        .any(|r| r.starts_with("POST /apis/authorization.k8s.io/v1/subjectaccessreviews")));

    // The picker's own ServiceAccount may not create TokenReviews: 500 naming that and the fix.
    api.forbid_token_reviews(true);
    let (code, body) = get(m, Some("another-token")).await;
    assert_eq!(code, 500, "{body}");
    assert_no_metrics(&body);
    assert!(
        body.contains("its own ServiceAccount may not create tokenreviews"),
        "{body}"
    );
    assert!(
        body.contains("kubectl apply -f deploy/kubernetes/rbac.yaml"),
        "{body}"
    );
    assert!(body.contains("system:auth-delegator"), "{body}");
    p.shutdown.trigger();
    p.join().await;

    // API server down: 500 that says the problem is on the server side.
    let closed = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    };
    let down = KubeClient::for_url(&format!("http://{closed}")).unwrap();
    let p = picker(MetricsAuth::Delegated(Arc::new(KubeAuthorizer::new(down)))).await;
    let (code, body) = get(p.metrics_addr.unwrap(), Some("prom-token")).await;
    assert_eq!(code, 500, "{body}");
    assert_no_metrics(&body);
    assert!(body.contains("server-side problem"), "{body}");
    // No token is still a 401 even when the API is down (no call needed).
    let (code, _) = get(p.metrics_addr.unwrap(), None).await;
    assert_eq!(code, 401);
    p.shutdown.trigger();
    p.join().await;
}

fn status(d: &AuthDecision) -> u16 {
    match d {
        AuthDecision::Allow => 200,
        AuthDecision::Deny { status, .. } => *status,
    }
}

#[tokio::test(start_paused = true)]
async fn cache_lifetimes_match_controller_runtime() {
    let api = FakeApi::start();
    api.add_token("prom-token", PROM, &[]);
    api.allow(PROM, "/metrics");
    let a = KubeAuthorizer::new(api.client());
    let calls = || (api.token_reviews(), api.access_reviews());
    let advance = |s: u64| tokio::time::advance(Duration::from_secs(s));

    // Allowed: authentication cached 1 min, authorization 5 min.
    assert_eq!(status(&a.decide(Some("prom-token"), "/metrics").await), 200);
    assert_eq!(calls(), (1, 1));
    advance(59).await;
    assert_eq!(status(&a.decide(Some("prom-token"), "/metrics").await), 200);
    assert_eq!(calls(), (1, 1), "both answers cached within a minute");
    advance(2).await; // t = 61 s
    assert_eq!(status(&a.decide(Some("prom-token"), "/metrics").await), 200);
    assert_eq!(
        calls(),
        (2, 1),
        "authn expired after 1 min, authz still cached"
    );

    // Permission revoked: the cached allow holds until 5 min, then 403.
    api.disallow(PROM, "/metrics");
    advance(237).await; // t = 298 s
    assert_eq!(status(&a.decide(Some("prom-token"), "/metrics").await), 200);
    assert_eq!(calls().1, 1);
    advance(3).await; // t = 301 s
    let d = a.decide(Some("prom-token"), "/metrics").await;
    assert_eq!(status(&d), 403, "{d:?}");
    assert_eq!(calls().1, 2);

    // Permission granted again: the cached deny holds for 30 s.
    api.allow(PROM, "/metrics");
    advance(29).await;
    assert_eq!(status(&a.decide(Some("prom-token"), "/metrics").await), 403);
    assert_eq!(calls().1, 2, "deny cached for 30 s");
    advance(2).await;
    assert_eq!(status(&a.decide(Some("prom-token"), "/metrics").await), 200);
    assert_eq!(calls().1, 3);

    // Authentication failures are cached too (1 min).
    let before = calls().0;
    assert_eq!(status(&a.decide(Some("late-token"), "/metrics").await), 401);
    api.add_token("late-token", PROM, &[]);
    advance(30).await;
    assert_eq!(status(&a.decide(Some("late-token"), "/metrics").await), 401);
    assert_eq!(calls().0, before + 1, "failed authentication cached");
    advance(31).await;
    assert_eq!(status(&a.decide(Some("late-token"), "/metrics").await), 200);
    assert_eq!(calls().0, before + 2);

    // API errors are never cached: the next request retries.
    api.forbid_token_reviews(true);
    assert_eq!(
        status(&a.decide(Some("fresh-token"), "/metrics").await),
        500
    );
    api.forbid_token_reviews(false);
    api.add_token("fresh-token", PROM, &[]);
    assert_eq!(
        status(&a.decide(Some("fresh-token"), "/metrics").await),
        200
    );
    assert_eq!(a.api_calls().token_reviews, api.token_reviews());
}

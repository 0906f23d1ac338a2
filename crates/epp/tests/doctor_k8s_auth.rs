//! `epp doctor` against a picker with `--metrics-auth=kubernetes`, whose Kubernetes API is a
//! tiny fake answering TokenReviews and SubjectAccessReviews (no cluster runs here):
//!
//! - a token the API authenticates but whose user may not `get /metrics` → the picker answers
//!   403; doctor names the user and the ClusterRoleBinding that fixes it;
//! - the picker's own ServiceAccount may not create TokenReviews (the seed's RBAC gap) → the
//!   picker answers 500; doctor points at deploy/kubernetes/rbac.yaml;
//! - a token the API does not authenticate → 401.
//!
//! `cargo test -p epp --test doctor_k8s_auth`. Everything binds 127.0.0.1.

#[path = "support/doctor.rs"]
mod support;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::Path;
use std::time::Duration;

use serde_json::{json, Value};
use support::*;

const FORBIDDEN_USER: &str = "system:serviceaccount:llm-d-monitoring:prometheus";

/// Answers one API request; closes the connection after it.
fn serve_one(mut s: TcpStream) -> std::io::Result<()> {
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    let mut r = BufReader::new(s.try_clone()?);
    let mut request_line = String::new();
    r.read_line(&mut request_line)?;
    let mut len = 0usize;
    loop {
        let mut h = String::new();
        r.read_line(&mut h)?;
        if h.trim().is_empty() {
            break;
        }
        if let Some((k, v)) = h.split_once(':') {
            if k.eq_ignore_ascii_case("content-length") {
                len = v.trim().parse().unwrap_or(0);
            }
        }
    }
    let mut body = vec![0; len];
    r.read_exact(&mut body)?;
    let req: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
    let path = request_line.split_whitespace().nth(1).unwrap_or("");
    let token = req["spec"]["token"].as_str().unwrap_or("");
    let (status, resp) = if path.starts_with("/apis/authentication.k8s.io/v1/tokenreviews") {
        match token {
            // The picker's ServiceAccount may not create TokenReviews.
            "picker-lacks-rbac" => (
                403,
                json!({
                    "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                    "message": "tokenreviews.authentication.k8s.io is forbidden: User \"system:serviceaccount:llm-d:llm-d-gaie-epp\" cannot create resource \"tokenreviews\" in API group \"authentication.k8s.io\" at the cluster scope",
                    "reason": "Forbidden", "code": 403
                }),
            ),
            "forbidden-token" => (
                201,
                json!({
                    "apiVersion": "authentication.k8s.io/v1", "kind": "TokenReview", "metadata": {},
                    "spec": req["spec"],
                    "status": {"authenticated": true, "user": {
                        "username": FORBIDDEN_USER, "uid": "u-1",
                        "groups": ["system:serviceaccounts", "system:authenticated"]}}
                }),
            ),
            _ => (
                201,
                json!({
                    "apiVersion": "authentication.k8s.io/v1", "kind": "TokenReview", "metadata": {},
                    "spec": req["spec"],
                    "status": {"authenticated": false, "error": "invalid bearer token"}
                }),
            ),
        }
    } else if path.starts_with("/apis/authorization.k8s.io/v1/subjectaccessreviews") {
        (
            201,
            json!({
                "apiVersion": "authorization.k8s.io/v1", "kind": "SubjectAccessReview",
                "metadata": {}, "spec": req["spec"],
                "status": {"allowed": false, "reason": "no RBAC policy matched"}
            }),
        )
    } else {
        (
            404,
            json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                   "reason": "NotFound", "code": 404, "message": format!("{path} not found")}),
        )
    };
    let body = resp.to_string();
    write!(
        s,
        "HTTP/1.1 {status} X\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )?;
    s.flush()
}

/// The fake API server, on its own thread for the life of the test process.
fn start_fake_api() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    std::thread::spawn(move || {
        for s in l.incoming().flatten() {
            std::thread::spawn(move || {
                let _ = serve_one(s);
            });
        }
    });
    addr
}

/// `epp proxy` with `--metrics-auth=kubernetes`, its kubeconfig pointing at `api`.
fn start_k8s_picker(dir: &Path, api: SocketAddr) -> Picker {
    let kubeconfig = dir.join("kubeconfig");
    std::fs::write(
        &kubeconfig,
        format!(
            "apiVersion: v1\nkind: Config\n\
             clusters: [{{name: fake, cluster: {{server: \"http://{api}\"}}}}]\n\
             users: [{{name: picker, user: {{token: picker-sa-token}}}}]\n\
             contexts: [{{name: fake, context: {{cluster: fake, user: picker, namespace: llm-d}}}}]\n\
             current-context: fake\n"
        ),
    )
    .unwrap();
    start_picker(
        dir.join("picker.log"),
        &[
            "--metrics-auth=kubernetes".into(),
            format!("--kubeconfig={}", kubeconfig.display()),
        ],
    )
}

/// `epp doctor` with a 5 s timeout (each check waits on the fake API).
fn doctor_k8s(args: &[String]) -> (i32, String) {
    doctor_in(&checkout(), args, "5s")
}

#[test]
fn kubernetes_auth_outcomes_are_explained() {
    let dir = tempfile::tempdir().unwrap();
    let api = start_fake_api();
    let p = start_k8s_picker(dir.path(), api);
    let url = format!("--metrics-url=http://{}/metrics", p.metrics);
    let log = || p.log();

    // 403: authenticated, not authorized
    let (code, out) = doctor_k8s(&[url.clone(), "--token=forbidden-token".into()]);
    assert_eq!(code, 1, "{out}\n{}", log());
    let (line, fix) = line_and_next(&out, "✗ picker auth:");
    assert!(
        line.starts_with("✗ picker auth: 403 Forbidden with the token from --token; the picker says: forbidden: user \"system:serviceaccount:llm-d-monitoring:prometheus\""),
        "{line}\n{}", log()
    );
    assert!(
        fix.contains("may not `get` the non-resource URL /metrics")
            && fix.contains("ClusterRole metrics-reader")
            && fix.contains("deploy/kubernetes/rbac.yaml"),
        "{fix}"
    );
    assert!(
        out.contains("kubectl create clusterrolebinding metrics-reader-llm-d-monitoring-prometheus --clusterrole=metrics-reader --serviceaccount=llm-d-monitoring:prometheus"),
        "{out}"
    );

    // 500: the picker may not create TokenReviews
    let (code, out) = doctor_k8s(&[url.clone(), "--token=picker-lacks-rbac".into()]);
    assert_eq!(code, 1, "{out}");
    let (line, fix) = line_and_next(&out, "✗ picker auth:");
    assert!(
        line.starts_with("✗ picker auth: 500 Internal Server Error with the token from --token; the picker says: the picker cannot check your token"),
        "{line}"
    );
    assert!(
        fix.contains("tokenreviews and subjectaccessreviews")
            && fix.contains("kubectl apply -f deploy/kubernetes/rbac.yaml"),
        "{fix}"
    );

    // 401: the API does not authenticate the token
    let (code, out) = doctor_k8s(&[url, "--token=some-garbage".into()]);
    assert_eq!(code, 1, "{out}");
    let (line, fix) = line_and_next(&out, "✗ picker auth:");
    assert!(
        line.starts_with("✗ picker auth: 401 Unauthorized with the token from --token; the picker says: invalid bearer token: the Kubernetes API did not authenticate it"),
        "{line}"
    );
    assert!(
        fix.contains("--metrics-auth=kubernetes") && fix.contains("create token"),
        "{fix}"
    );
}

//! A small in-process Kubernetes API server for tests (no real cluster can run here).
//!
//! It speaks the real REST and watch JSON for the resources the picker uses: list with
//! `resourceVersion`, `?watch=true` streaming newline-delimited `{"type", "object"}` events
//! (ADDED / MODIFIED / DELETED, BOOKMARK when `allowWatchBookmarks` is asked for), label and
//! field selectors with the API server's transition rules (an object that stops matching a
//! watch's selector is DELETED for that watch), optimistic concurrency on Leases (409 on a stale
//! resourceVersion), and TokenReview / SubjectAccessReview creation. It runs on its own thread
//! and runtime, so tests may pause their own clock. The real `kube::Client` is pointed at it.
#![allow(dead_code)]

use std::collections::{BTreeMap, HashMap, HashSet};
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::http::{Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use parking_lot::Mutex;
use serde_json::{json, Value};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Res {
    Pods,
    Pools,
    Leases,
    /// `InferenceObjective`, `llm-d.ai/v1alpha2`.
    Objectives,
    /// `InferenceObjective`, the deprecated `inference.networking.x-k8s.io/v1alpha2`.
    LegacyObjectives,
}

impl Res {
    fn kind(self) -> &'static str {
        match self {
            Res::Pods => "Pod",
            Res::Pools => "InferencePool",
            Res::Leases => "Lease",
            Res::Objectives | Res::LegacyObjectives => "InferenceObjective",
        }
    }
    fn api_version(self) -> &'static str {
        match self {
            Res::Pods => "v1",
            Res::Pools => "inference.networking.k8s.io/v1",
            Res::Leases => "coordination.k8s.io/v1",
            Res::Objectives => "llm-d.ai/v1alpha2",
            Res::LegacyObjectives => "inference.networking.x-k8s.io/v1alpha2",
        }
    }
}

struct Change {
    rv: u64,
    res: Res,
    ns: String,
    old: Option<Value>,
    new: Option<Value>,
}

#[derive(Default)]
struct Inner {
    rv: u64,
    objects: BTreeMap<(Res, String, String), Value>,
    history: Vec<Change>,
    tokens: HashMap<String, (String, Vec<String>)>,
    allowed: HashSet<(String, String)>,
    forbid_token_reviews: bool,
    token_reviews: u64,
    access_reviews: u64,
    /// Bumped to end every open watch (simulates dropped connections).
    watch_epoch: u64,
    requests: Vec<String>,
}

struct Shared {
    inner: Mutex<Inner>,
    changed: tokio::sync::watch::Sender<u64>,
}

/// The running fake API server.
pub struct FakeApi {
    pub addr: SocketAddr,
    shared: Arc<Shared>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Drop for FakeApi {
    fn drop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn status(code: u16, reason: &str, message: &str) -> Response {
    let body = json!({
        "kind": "Status", "apiVersion": "v1", "metadata": {},
        "status": "Failure", "message": message, "reason": reason, "code": code
    });
    (
        StatusCode::from_u16(code).unwrap(),
        [("content-type", "application/json")],
        body.to_string(),
    )
        .into_response()
}

fn ok_json(code: u16, v: Value) -> Response {
    (
        StatusCode::from_u16(code).unwrap(),
        [("content-type", "application/json")],
        v.to_string(),
    )
        .into_response()
}

/// `k=v,k!=v,k` selectors (what kube and kubectl send for equality selectors).
fn label_match(sel: &str, labels: &Value) -> bool {
    // Requirements are comma-separated; commas inside `in (...)` sets do not separate.
    let mut parts = Vec::new();
    let (mut depth, mut start) = (0, 0);
    for (i, c) in sel.char_indices() {
        match c {
            '(' => depth += 1,
            ')' => depth -= 1,
            ',' if depth == 0 => {
                parts.push(&sel[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    parts.push(&sel[start..]);
    for part in parts.into_iter().map(str::trim).filter(|p| !p.is_empty()) {
        let get = |k: &str| labels.get(k).and_then(Value::as_str).map(str::to_string);
        let set = |rest: &str| -> Vec<String> {
            rest.trim()
                .trim_start_matches('(')
                .trim_end_matches(')')
                .split(',')
                .map(|v| v.trim().to_string())
                .collect()
        };
        let ok = if let Some((k, rest)) = part.split_once(" notin ") {
            get(k.trim()).is_none_or(|v| !set(rest).contains(&v))
        } else if let Some((k, rest)) = part.split_once(" in ") {
            get(k.trim()).is_some_and(|v| set(rest).contains(&v))
        } else if let Some((k, v)) = part.split_once("!=") {
            get(k.trim()).as_deref() != Some(v.trim())
        } else if let Some((k, v)) = part.split_once("==").or_else(|| part.split_once('=')) {
            get(k.trim()).as_deref() == Some(v.trim())
        } else if let Some(k) = part.strip_prefix('!') {
            get(k.trim()).is_none()
        } else {
            get(part).is_some()
        };
        if !ok {
            return false;
        }
    }
    true
}

fn field_match(sel: &str, obj: &Value) -> bool {
    for part in sel.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let Some((k, v)) = part.split_once('=') else {
            return false;
        };
        let path: Vec<&str> = k.split('.').collect();
        let mut cur = obj;
        for p in &path {
            cur = cur.get(*p).unwrap_or(&Value::Null);
        }
        if cur.as_str() != Some(v) {
            return false;
        }
    }
    true
}

struct Filter {
    labels: Option<String>,
    fields: Option<String>,
}

impl Filter {
    fn matches(&self, obj: &Value) -> bool {
        let empty = json!({});
        let labels = obj
            .pointer("/metadata/labels")
            .filter(|l| l.is_object())
            .unwrap_or(&empty);
        self.labels
            .as_deref()
            .is_none_or(|s| label_match(s, labels))
            && self.fields.as_deref().is_none_or(|s| field_match(s, obj))
    }
}

impl Shared {
    fn commit(&self, res: Res, ns: &str, name: &str, new: Option<Value>) -> Option<Value> {
        let mut g = self.inner.lock();
        g.rv += 1;
        let rv = g.rv;
        let key = (res, ns.to_string(), name.to_string());
        let old = g.objects.get(&key).cloned();
        let new = new.map(|mut v| {
            let uid = old
                .as_ref()
                .and_then(|o| o.pointer("/metadata/uid").cloned())
                .unwrap_or_else(|| json!(format!("uid-{name}-{rv}")));
            v["apiVersion"] = json!(res.api_version());
            v["kind"] = json!(res.kind());
            v["metadata"]["name"] = json!(name);
            v["metadata"]["namespace"] = json!(ns);
            v["metadata"]["uid"] = uid;
            v["metadata"]["resourceVersion"] = json!(rv.to_string());
            v
        });
        match &new {
            Some(v) => {
                g.objects.insert(key, v.clone());
            }
            None => {
                g.objects.remove(&key);
            }
        }
        g.history.push(Change {
            rv,
            res,
            ns: ns.to_string(),
            old: old.clone(),
            new: new.clone(),
        });
        drop(g);
        self.changed.send_replace(rv);
        new
    }
}

impl FakeApi {
    /// Start on 127.0.0.1 with a random port.
    pub fn start() -> Self {
        let (changed, _) = tokio::sync::watch::channel(0);
        let shared = Arc::new(Shared {
            inner: Mutex::new(Inner::default()),
            changed,
        });
        let (addr_tx, addr_rx) = std::sync::mpsc::channel();
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let sh = shared.clone();
        let thread = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async move {
                let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
                addr_tx.send(l.local_addr().unwrap()).unwrap();
                let app = axum::Router::new().fallback(move |m: Method, u: Uri, b: Bytes| {
                    let sh = sh.clone();
                    async move { handle(sh, m, u, b).await }
                });
                // A hard stop: open watch connections must not keep the test waiting.
                tokio::select! {
                    _ = axum::serve(l, app) => {}
                    _ = stop_rx => {}
                }
            });
            rt.shutdown_timeout(Duration::from_millis(100));
        });
        let addr = addr_rx.recv().unwrap();
        Self {
            addr,
            shared,
            stop: Some(stop_tx),
            thread: Some(thread),
        }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// A kube client (wrapped as the picker uses it) pointed at this server.
    pub fn client(&self) -> epp_core::k8s::KubeClient {
        epp_core::k8s::KubeClient::for_url(&self.url()).unwrap()
    }

    /// Create or replace an object (server fills apiVersion, kind, uid, resourceVersion).
    pub fn apply(&self, res: Res, ns: &str, obj: Value) -> Value {
        let name = obj
            .pointer("/metadata/name")
            .and_then(Value::as_str)
            .expect("metadata.name")
            .to_string();
        self.shared.commit(res, ns, &name, Some(obj)).unwrap()
    }

    /// Change an existing object in place.
    pub fn modify(&self, res: Res, ns: &str, name: &str, f: impl FnOnce(&mut Value)) {
        let mut v = self
            .get(res, ns, name)
            .unwrap_or_else(|| panic!("{name} not found"));
        f(&mut v);
        self.shared.commit(res, ns, name, Some(v));
    }

    pub fn delete(&self, res: Res, ns: &str, name: &str) {
        self.shared.commit(res, ns, name, None);
    }

    pub fn get(&self, res: Res, ns: &str, name: &str) -> Option<Value> {
        self.shared
            .inner
            .lock()
            .objects
            .get(&(res, ns.to_string(), name.to_string()))
            .cloned()
    }

    /// End every open watch (as a dropped connection or an API server restart would).
    pub fn drop_watches(&self) {
        let mut g = self.shared.inner.lock();
        g.watch_epoch += 1;
        let rv = g.rv;
        drop(g);
        self.shared.changed.send_replace(rv);
    }

    pub fn add_token(&self, token: &str, user: &str, groups: &[&str]) {
        self.shared.inner.lock().tokens.insert(
            token.into(),
            (user.into(), groups.iter().map(|g| g.to_string()).collect()),
        );
    }
    pub fn remove_token(&self, token: &str) {
        self.shared.inner.lock().tokens.remove(token);
    }
    /// Let `subject` (a user or a group) `get` the non-resource URL `path`.
    pub fn allow(&self, subject: &str, path: &str) {
        self.shared
            .inner
            .lock()
            .allowed
            .insert((subject.into(), path.into()));
    }
    pub fn disallow(&self, subject: &str, path: &str) {
        self.shared
            .inner
            .lock()
            .allowed
            .remove(&(subject.into(), path.into()));
    }
    /// Answer TokenReviews with 403 Forbidden, as when the picker's ServiceAccount lacks RBAC.
    pub fn forbid_token_reviews(&self, on: bool) {
        self.shared.inner.lock().forbid_token_reviews = on;
    }
    pub fn token_reviews(&self) -> u64 {
        self.shared.inner.lock().token_reviews
    }
    pub fn access_reviews(&self) -> u64 {
        self.shared.inner.lock().access_reviews
    }
    /// Request lines seen (`METHOD path?query`).
    pub fn requests(&self) -> Vec<String> {
        self.shared.inner.lock().requests.clone()
    }
}

/// A pod object as the API returns it.
pub fn pod(name: &str, ip: &str, ready: bool, labels: &[(&str, &str)]) -> Value {
    let labels: BTreeMap<_, _> = labels.iter().map(|(k, v)| (*k, *v)).collect();
    json!({
        "metadata": {"name": name, "labels": labels},
        "spec": {"containers": [{"name": "vllm", "image": "vllm/vllm-openai"}]},
        "status": {
            "phase": "Running",
            "podIP": ip,
            "conditions": [{"type": "Ready", "status": if ready { "True" } else { "False" }}]
        }
    })
}

/// An InferencePool v1 object.
pub fn objective(name: &str, pool: &str, priority: Option<i64>) -> Value {
    let mut spec = json!({"poolRef": {"group": "inference.networking.k8s.io", "name": pool}});
    if let Some(p) = priority {
        spec["priority"] = json!(p);
    }
    json!({"metadata": {"name": name}, "spec": spec})
}

pub fn pool(name: &str, labels: &[(&str, &str)], ports: &[u16]) -> Value {
    let labels: BTreeMap<_, _> = labels.iter().map(|(k, v)| (*k, *v)).collect();
    json!({
        "metadata": {"name": name},
        "spec": {
            "selector": {"matchLabels": labels},
            "targetPorts": ports.iter().map(|p| json!({"number": p})).collect::<Vec<_>>(),
            "endpointPickerRef": {"name": "llm-d-gaie-epp", "port": {"number": 9002}}
        }
    })
}

fn parse_query(uri: &Uri) -> HashMap<String, String> {
    let mut q = HashMap::new();
    for kv in uri
        .query()
        .unwrap_or("")
        .split('&')
        .filter(|s| !s.is_empty())
    {
        let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
        let v = percent_decode(v);
        q.insert(k.to_string(), v);
    }
    q
}

fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' && i + 2 < b.len() {
            if let Ok(x) =
                u8::from_str_radix(std::str::from_utf8(&b[i + 1..i + 3]).unwrap_or("zz"), 16)
            {
                out.push(x);
                i += 3;
                continue;
            }
        }
        out.push(if b[i] == b'+' { b' ' } else { b[i] });
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

async fn handle(sh: Arc<Shared>, method: Method, uri: Uri, body: Bytes) -> Response {
    sh.inner.lock().requests.push(format!(
        "{method} {}",
        uri.path_and_query().map(|p| p.as_str()).unwrap_or("")
    ));
    let q = parse_query(&uri);
    let segs: Vec<&str> = uri.path().trim_matches('/').split('/').collect();
    // Cluster-scoped reviews.
    match (method.clone(), segs.as_slice()) {
        (Method::POST, ["apis", "authentication.k8s.io", "v1", "tokenreviews"]) => {
            return token_review(&sh, &body);
        }
        (Method::POST, ["apis", "authorization.k8s.io", "v1", "subjectaccessreviews"]) => {
            return access_review(&sh, &body);
        }
        _ => {}
    }
    let (res, rest) = match segs.as_slice() {
        ["api", "v1", "namespaces", ns, "pods", rest @ ..] => ((Res::Pods, *ns), rest),
        ["apis", "inference.networking.k8s.io", "v1", "namespaces", ns, "inferencepools", rest @ ..] => {
            ((Res::Pools, *ns), rest)
        }
        ["apis", "coordination.k8s.io", "v1", "namespaces", ns, "leases", rest @ ..] => {
            ((Res::Leases, *ns), rest)
        }
        ["apis", "llm-d.ai", "v1alpha2", "namespaces", ns, "inferenceobjectives", rest @ ..] => {
            ((Res::Objectives, *ns), rest)
        }
        ["apis", "inference.networking.x-k8s.io", "v1alpha2", "namespaces", ns, "inferenceobjectives", rest @ ..] => {
            ((Res::LegacyObjectives, *ns), rest)
        }
        _ => {
            return status(
                404,
                "NotFound",
                &format!(
                    "the server could not find the requested resource ({})",
                    uri.path()
                ),
            )
        }
    };
    let (res, ns) = (res.0, res.1.to_string());
    match (method, rest) {
        (Method::GET, []) => {
            let filter = Filter {
                labels: q.get("labelSelector").cloned().filter(|s| !s.is_empty()),
                fields: q.get("fieldSelector").cloned().filter(|s| !s.is_empty()),
            };
            if matches!(q.get("watch").map(String::as_str), Some("true" | "1")) {
                let from: u64 = q
                    .get("resourceVersion")
                    .and_then(|s| s.parse().ok())
                    .unwrap_or_else(|| sh.inner.lock().rv);
                let bookmarks = q.get("allowWatchBookmarks").map(String::as_str) == Some("true");
                return watch(sh, res, ns, filter, from, bookmarks);
            }
            let g = sh.inner.lock();
            let items: Vec<Value> = g
                .objects
                .iter()
                .filter(|((r, n, _), v)| *r == res && *n == ns && filter.matches(v))
                .map(|(_, v)| v.clone())
                .collect();
            ok_json(
                200,
                json!({
                    "apiVersion": res.api_version(),
                    "kind": format!("{}List", res.kind()),
                    "metadata": {"resourceVersion": g.rv.to_string()},
                    "items": items
                }),
            )
        }
        (Method::GET, [name]) => {
            let g = sh.inner.lock();
            match g.objects.get(&(res, ns.clone(), name.to_string())) {
                Some(v) => ok_json(200, v.clone()),
                None => status(
                    404,
                    "NotFound",
                    &format!("{} \"{name}\" not found", res.kind().to_lowercase()),
                ),
            }
        }
        (Method::POST, []) => {
            let Ok(obj) = serde_json::from_slice::<Value>(&body) else {
                return status(400, "BadRequest", "invalid JSON");
            };
            let name = obj
                .pointer("/metadata/name")
                .and_then(Value::as_str)
                .unwrap_or("")
                .to_string();
            if sh
                .inner
                .lock()
                .objects
                .contains_key(&(res, ns.clone(), name.clone()))
            {
                return status(
                    409,
                    "AlreadyExists",
                    &format!("{} \"{name}\" already exists", res.kind().to_lowercase()),
                );
            }
            let v = sh.commit(res, &ns, &name, Some(obj)).unwrap();
            ok_json(201, v)
        }
        (Method::PUT, [name]) => {
            let Ok(obj) = serde_json::from_slice::<Value>(&body) else {
                return status(400, "BadRequest", "invalid JSON");
            };
            let current = sh
                .inner
                .lock()
                .objects
                .get(&(res, ns.clone(), name.to_string()))
                .cloned();
            let Some(current) = current else {
                return status(
                    404,
                    "NotFound",
                    &format!("{} \"{name}\" not found", res.kind().to_lowercase()),
                );
            };
            let sent_rv = obj
                .pointer("/metadata/resourceVersion")
                .and_then(Value::as_str);
            if let Some(rv) = sent_rv {
                if Some(rv)
                    != current
                        .pointer("/metadata/resourceVersion")
                        .and_then(Value::as_str)
                {
                    return status(409, "Conflict", &format!("Operation cannot be fulfilled on {} \"{name}\": the object has been modified; please apply your changes to the latest version and try again", res.kind().to_lowercase()));
                }
            }
            let v = sh.commit(res, &ns, name, Some(obj)).unwrap();
            ok_json(200, v)
        }
        (Method::DELETE, [name]) => {
            let current = sh
                .inner
                .lock()
                .objects
                .get(&(res, ns.clone(), name.to_string()))
                .cloned();
            match current {
                Some(v) => {
                    sh.commit(res, &ns, name, None);
                    ok_json(200, v)
                }
                None => status(404, "NotFound", "not found"),
            }
        }
        _ => status(405, "MethodNotAllowed", "method not allowed"),
    }
}

fn watch(
    sh: Arc<Shared>,
    res: Res,
    ns: String,
    filter: Filter,
    from: u64,
    bookmarks: bool,
) -> Response {
    let (tx, rx) = tokio::sync::mpsc::channel::<Bytes>(256);
    let mut changed = sh.changed.subscribe();
    let epoch = sh.inner.lock().watch_epoch;
    tokio::spawn(async move {
        let mut cursor = from;
        if bookmarks {
            let line = json!({"type": "BOOKMARK", "object": {
                "kind": res.kind(), "apiVersion": res.api_version(),
                "metadata": {"resourceVersion": cursor.to_string()}
            }});
            if tx.send(Bytes::from(format!("{line}\n"))).await.is_err() {
                return;
            }
        }
        loop {
            let lines: Vec<String> = {
                let g = sh.inner.lock();
                if g.watch_epoch != epoch {
                    return;
                }
                let mut out = Vec::new();
                for c in g
                    .history
                    .iter()
                    .filter(|c| c.rv > cursor && c.res == res && c.ns == ns)
                {
                    let was = c.old.as_ref().is_some_and(|o| filter.matches(o));
                    let is = c.new.as_ref().is_some_and(|n| filter.matches(n));
                    let ev = match (was, is) {
                        (false, true) => Some(("ADDED", c.new.clone().unwrap())),
                        (true, true) => Some(("MODIFIED", c.new.clone().unwrap())),
                        (true, false) => {
                            // Deleted, or left the selector: the watch sees it disappear.
                            let mut o = c.old.clone().unwrap();
                            o["metadata"]["resourceVersion"] = json!(c.rv.to_string());
                            Some(("DELETED", o))
                        }
                        (false, false) => None,
                    };
                    if let Some((t, o)) = ev {
                        out.push(json!({"type": t, "object": o}).to_string());
                    }
                }
                cursor = g.rv;
                out
            };
            for l in lines {
                if tx.send(Bytes::from(format!("{l}\n"))).await.is_err() {
                    return;
                }
            }
            if changed.changed().await.is_err() {
                return;
            }
        }
    });
    let stream = futures_util::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|b| (Ok::<_, Infallible>(b), rx))
    });
    Response::builder()
        .status(200)
        .header("content-type", "application/json")
        .body(Body::from_stream(stream))
        .unwrap()
}

fn token_review(sh: &Shared, body: &[u8]) -> Response {
    let mut g = sh.inner.lock();
    g.token_reviews += 1;
    if g.forbid_token_reviews {
        return status(
            403,
            "Forbidden",
            "tokenreviews.authentication.k8s.io is forbidden: User \"system:serviceaccount:llm-d:llm-d-gaie-epp\" cannot create resource \"tokenreviews\" in API group \"authentication.k8s.io\" at the cluster scope",
        );
    }
    let Ok(mut review) = serde_json::from_slice::<Value>(body) else {
        return status(400, "BadRequest", "invalid JSON");
    };
    let token = review
        .pointer("/spec/token")
        .and_then(Value::as_str)
        .unwrap_or("");
    let st = match g.tokens.get(token) {
        Some((user, groups)) => json!({
            "authenticated": true,
            "user": {"username": user, "uid": format!("uid-{user}"), "groups": groups},
            "audiences": ["https://kubernetes.default.svc"]
        }),
        None => {
            json!({"authenticated": false, "error": "invalid bearer token, token lookup failed", "user": {}})
        }
    };
    review["apiVersion"] = json!("authentication.k8s.io/v1");
    review["kind"] = json!("TokenReview");
    review["status"] = st;
    ok_json(201, review)
}

fn access_review(sh: &Shared, body: &[u8]) -> Response {
    let mut g = sh.inner.lock();
    g.access_reviews += 1;
    let Ok(mut review) = serde_json::from_slice::<Value>(body) else {
        return status(400, "BadRequest", "invalid JSON");
    };
    let user = review
        .pointer("/spec/user")
        .and_then(Value::as_str)
        .unwrap_or("")
        .to_string();
    let groups: Vec<String> = review
        .pointer("/spec/groups")
        .and_then(Value::as_array)
        .map(|a| {
            a.iter()
                .filter_map(|v| v.as_str().map(String::from))
                .collect()
        })
        .unwrap_or_default();
    let path = review
        .pointer("/spec/nonResourceAttributes/path")
        .and_then(Value::as_str)
        .unwrap_or("")
        .to_string();
    let verb = review
        .pointer("/spec/nonResourceAttributes/verb")
        .and_then(Value::as_str)
        .unwrap_or("");
    let allowed = verb == "get"
        && std::iter::once(&user)
            .chain(groups.iter())
            .any(|s| g.allowed.contains(&(s.clone(), path.clone())));
    review["apiVersion"] = json!("authorization.k8s.io/v1");
    review["kind"] = json!("SubjectAccessReview");
    review["status"] = if allowed {
        json!({"allowed": true, "reason": "RBAC: allowed by ClusterRoleBinding \"metrics-reader\" of ClusterRole \"metrics-reader\""})
    } else {
        json!({"allowed": false})
    };
    ok_json(201, review)
}

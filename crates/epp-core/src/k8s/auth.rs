//! `--metrics-auth=kubernetes`: who may read `/metrics`, decided by the Kubernetes API the way
//! controller-runtime's metrics filter does, and explained when the answer is no.
//!
//! 1. No bearer token → 401.
//! 2. TokenReview: not authenticated → 401. The outcome (either way) is cached for 1 minute.
//! 3. SubjectAccessReview with `nonResourceAttributes {path, verb: get}`: not allowed → 403.
//!    Allowed is cached for 5 minutes, denied for 30 seconds.
//! 4. Any API failure → 500, never cached. The one everybody hits — the picker's own
//!    ServiceAccount may not create TokenReviews — is recognised and its fix named.
//!
//! Caches use tokio time, so their lifetimes are testable with a paused clock.

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use k8s_openapi::api::authentication::v1::{TokenReview, TokenReviewSpec};
use k8s_openapi::api::authorization::v1::{
    NonResourceAttributes, SubjectAccessReview, SubjectAccessReviewSpec,
};
use kube::api::PostParams;
use kube::Api;
use parking_lot::Mutex;
use tokio::time::Instant;

use super::KubeClient;
use crate::serving::{AuthDecision, AuthFuture, Authorizer};

/// The ClusterRole (shipped in `deploy/kubernetes/rbac.yaml`) that grants `get` on `/metrics`.
pub const METRICS_READER_ROLE: &str = "metrics-reader";
/// The manifest that gives the picker's ServiceAccount what it needs.
pub const RBAC_MANIFEST: &str = "deploy/kubernetes/rbac.yaml";

/// How long decisions are remembered (controller-runtime's values by default).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CacheTtl {
    /// TokenReview outcomes, authenticated or not.
    pub authn: Duration,
    /// SubjectAccessReview "allowed".
    pub allow: Duration,
    /// SubjectAccessReview "denied".
    pub deny: Duration,
}

impl Default for CacheTtl {
    fn default() -> Self {
        Self {
            authn: Duration::from_secs(60),
            allow: Duration::from_secs(300),
            deny: Duration::from_secs(30),
        }
    }
}

/// Largest number of remembered tokens / subjects; beyond it expired entries are dropped, and
/// if that is not enough the cache starts over (a flood of random tokens cannot grow memory).
const MAX_ENTRIES: usize = 4096;

#[derive(Clone, Debug, PartialEq, Eq)]
enum Authn {
    User {
        name: String,
        uid: Option<String>,
        groups: Vec<String>,
        extra: BTreeMap<String, Vec<String>>,
    },
    Rejected(String),
}

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct AuthzKey {
    user: String,
    groups: Vec<String>,
    path: String,
}

struct Cache<K, V> {
    map: HashMap<K, (Instant, V)>,
}

impl<K: std::hash::Hash + Eq, V: Clone> Cache<K, V> {
    fn new() -> Self {
        Self {
            map: HashMap::new(),
        }
    }
    fn get(&mut self, k: &K) -> Option<V> {
        let now = Instant::now();
        match self.map.get(k) {
            Some((exp, v)) if *exp > now => Some(v.clone()),
            Some(_) => {
                self.map.remove(k);
                None
            }
            None => None,
        }
    }
    fn put(&mut self, k: K, v: V, ttl: Duration) {
        let now = Instant::now();
        if self.map.len() >= MAX_ENTRIES {
            self.map.retain(|_, (exp, _)| *exp > now);
            if self.map.len() >= MAX_ENTRIES {
                self.map.clear();
            }
        }
        self.map.insert(k, (now + ttl, v));
    }
}

/// Counters of API calls made (tests and debugging: they show what the caches saved).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct ApiCalls {
    pub token_reviews: u64,
    pub access_reviews: u64,
}

/// The Kubernetes-delegated authorizer for `/metrics`.
pub struct KubeAuthorizer {
    client: KubeClient,
    ttl: CacheTtl,
    authn: Mutex<Cache<String, Authn>>,
    authz: Mutex<Cache<AuthzKey, (bool, String)>>,
    calls: Mutex<ApiCalls>,
}

impl std::fmt::Debug for KubeAuthorizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KubeAuthorizer")
            .field("ttl", &self.ttl)
            .finish_non_exhaustive()
    }
}

fn deny(status: u16, message: String) -> AuthDecision {
    AuthDecision::Deny { status, message }
}

/// `kubectl` arguments naming a subject for a ClusterRoleBinding.
fn subject_args(user: &str) -> String {
    match user
        .strip_prefix("system:serviceaccount:")
        .and_then(|r| r.split_once(':'))
    {
        Some((ns, name)) => format!("--serviceaccount={ns}:{name}"),
        None => format!("--user={user}"),
    }
}

/// A 500 that names the missing permission when the API refused the picker itself.
fn api_failure(what: &str, resource: &str, e: &kube::Error) -> AuthDecision {
    if let kube::Error::Api(s) = e {
        if s.code == 403 {
            return deny(
                500,
                format!(
                    "the picker cannot check your token: its own ServiceAccount may not create {resource} \
                     (the Kubernetes API answered 403: {msg}). This is a problem of the picker's deployment, not of your token. \
                     Fix: kubectl apply -f {RBAC_MANIFEST} (it grants create on tokenreviews and subjectaccessreviews \
                     to the picker's ServiceAccount), or bind the ClusterRole system:auth-delegator to it.",
                    msg = s.message
                ),
            );
        }
    }
    deny(
        500,
        format!(
            "the picker could not complete the {what} with the Kubernetes API ({e}); this is a server-side problem, \
             not a problem of your token: check the picker's logs and its connection to the API server, then retry"
        ),
    )
}

impl KubeAuthorizer {
    pub fn new(client: KubeClient) -> Self {
        Self::with_ttl(client, CacheTtl::default())
    }

    pub fn with_ttl(client: KubeClient, ttl: CacheTtl) -> Self {
        Self {
            client,
            ttl,
            authn: Mutex::new(Cache::new()),
            authz: Mutex::new(Cache::new()),
            calls: Mutex::new(ApiCalls::default()),
        }
    }

    /// API calls made so far.
    pub fn api_calls(&self) -> ApiCalls {
        *self.calls.lock()
    }

    async fn token_review(&self, token: &str) -> Result<Authn, AuthDecision> {
        let client = self.client.get().await.map_err(|e| {
            deny(
                500,
                format!("the picker has no Kubernetes API client to check your token: {e}"),
            )
        })?;
        self.calls.lock().token_reviews += 1;
        let review = TokenReview {
            spec: TokenReviewSpec {
                token: Some(token.to_string()),
                ..Default::default()
            },
            ..Default::default()
        };
        let api: Api<TokenReview> = Api::all(client);
        let out = api
            .create(&PostParams::default(), &review)
            .await
            .map_err(|e| {
                tracing::warn!(error = %e, "TokenReview failed");
                api_failure("TokenReview", "tokenreviews.authentication.k8s.io", &e)
            })?;
        let status = out.status.unwrap_or_default();
        if status.authenticated != Some(true) {
            let why = status
                .error
                .filter(|e| !e.is_empty())
                .unwrap_or_else(|| "the token is not valid".into());
            return Ok(Authn::Rejected(why));
        }
        let user = status.user.unwrap_or_default();
        let mut groups = user.groups.unwrap_or_default();
        groups.sort();
        Ok(Authn::User {
            name: user.username.unwrap_or_default(),
            uid: user.uid,
            groups,
            extra: user.extra.unwrap_or_default(),
        })
    }

    async fn access_review(
        &self,
        user: &str,
        uid: Option<String>,
        groups: &[String],
        extra: &BTreeMap<String, Vec<String>>,
        path: &str,
    ) -> Result<(bool, String), AuthDecision> {
        let client = self
            .client
            .get()
            .await
            .map_err(|e| deny(500, format!("the picker has no Kubernetes API client: {e}")))?;
        self.calls.lock().access_reviews += 1;
        let review = SubjectAccessReview {
            spec: SubjectAccessReviewSpec {
                user: Some(user.to_string()),
                uid,
                groups: Some(groups.to_vec()),
                extra: (!extra.is_empty()).then(|| extra.clone()),
                non_resource_attributes: Some(NonResourceAttributes {
                    path: Some(path.to_string()),
                    verb: Some("get".into()),
                }),
                ..Default::default()
            },
            ..Default::default()
        };
        let api: Api<SubjectAccessReview> = Api::all(client);
        let out = api
            .create(&PostParams::default(), &review)
            .await
            .map_err(|e| {
                tracing::warn!(error = %e, "SubjectAccessReview failed");
                api_failure(
                    "SubjectAccessReview",
                    "subjectaccessreviews.authorization.k8s.io",
                    &e,
                )
            })?;
        let status = out.status.unwrap_or_default();
        let reason = status
            .evaluation_error
            .filter(|s| !s.is_empty())
            .or(status.reason.filter(|s| !s.is_empty()))
            .unwrap_or_default();
        Ok((status.allowed, reason))
    }

    /// The decision for `token` reading `path`.
    pub async fn decide(&self, token: Option<&str>, path: &str) -> AuthDecision {
        let Some(token) = token.map(str::trim).filter(|t| !t.is_empty()) else {
            return deny(
                401,
                format!(
                    "missing bearer token: {path} on this picker is protected with --metrics-auth=kubernetes. \
                     Send `Authorization: Bearer <token>` with a Kubernetes ServiceAccount token whose subject may \
                     `get` the non-resource URL {path} (ClusterRole {METRICS_READER_ROLE} in {RBAC_MANIFEST}); \
                     a ServiceMonitor takes it from a ServiceAccount-token Secret (spec.endpoints[].authorization). \
                     For local use without Kubernetes, start the picker with --metrics-auth=none."
                ),
            );
        };
        let cached = self.authn.lock().get(&token.to_string());
        let authn = match cached {
            Some(a) => a,
            None => match self.token_review(token).await {
                Ok(a) => {
                    if let Authn::Rejected(why) = &a {
                        tracing::info!(reason = %why, "metrics request rejected: token not authenticated");
                    }
                    self.authn
                        .lock()
                        .put(token.to_string(), a.clone(), self.ttl.authn);
                    a
                }
                Err(d) => return d,
            },
        };
        let (user, uid, groups, extra) = match authn {
            Authn::Rejected(why) => {
                return deny(
                    401,
                    format!(
                        "invalid bearer token: the Kubernetes API did not authenticate it ({why}). \
                         Use a current ServiceAccount token from this cluster (kubectl create token <serviceaccount> -n <namespace>, \
                         or a kubernetes.io/service-account-token Secret)."
                    ),
                )
            }
            Authn::User {
                name,
                uid,
                groups,
                extra,
            } => (name, uid, groups, extra),
        };
        let key = AuthzKey {
            user: user.clone(),
            groups: groups.clone(),
            path: path.to_string(),
        };
        let cached = self.authz.lock().get(&key);
        let (allowed, reason) = match cached {
            Some(d) => d,
            None => match self.access_review(&user, uid, &groups, &extra, path).await {
                Ok(d) => {
                    let ttl = if d.0 { self.ttl.allow } else { self.ttl.deny };
                    if !d.0 {
                        tracing::info!(user = %user, path, reason = %d.1,
                            "metrics request forbidden: subject may not get {path}");
                    }
                    self.authz.lock().put(key, d.clone(), ttl);
                    d
                }
                Err(d) => return d,
            },
        };
        if allowed {
            return AuthDecision::Allow;
        }
        let why = if reason.is_empty() {
            String::new()
        } else {
            format!(" (Kubernetes said: {reason})")
        };
        deny(
            403,
            format!(
                "forbidden: user \"{user}\" is authenticated but may not get {path}{why}. \
                 Fix: bind the ClusterRole {METRICS_READER_ROLE} (defined in {RBAC_MANIFEST}) to it: \
                 kubectl create clusterrolebinding {METRICS_READER_ROLE}-{binding} --clusterrole={METRICS_READER_ROLE} {subject}",
                binding = binding_suffix(&user),
                subject = subject_args(&user),
            ),
        )
    }
}

/// A binding name derived from the user (lower-case, DNS-label characters only).
fn binding_suffix(user: &str) -> String {
    let s: String = user
        .strip_prefix("system:serviceaccount:")
        .unwrap_or(user)
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_ascii_lowercase()
            } else {
                '-'
            }
        })
        .collect();
    let s = s.trim_matches('-');
    if s.is_empty() {
        "user".into()
    } else {
        s.chars().take(40).collect()
    }
}

impl Authorizer for KubeAuthorizer {
    fn authorize<'a>(&'a self, token: Option<&'a str>, path: &'a str) -> AuthFuture<'a> {
        Box::pin(self.decide(token, path))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subjects_and_bindings() {
        assert_eq!(
            subject_args("system:serviceaccount:llm-d-monitoring:prometheus"),
            "--serviceaccount=llm-d-monitoring:prometheus"
        );
        assert_eq!(subject_args("jane@example.com"), "--user=jane@example.com");
        assert_eq!(
            binding_suffix("system:serviceaccount:llm-d-monitoring:prometheus"),
            "llm-d-monitoring-prometheus"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn cache_expires_on_the_tokio_clock() {
        let mut c: Cache<String, u32> = Cache::new();
        c.put("a".into(), 1, Duration::from_secs(30));
        tokio::time::advance(Duration::from_secs(29)).await;
        assert_eq!(c.get(&"a".to_string()), Some(1));
        tokio::time::advance(Duration::from_secs(2)).await;
        assert_eq!(c.get(&"a".to_string()), None);
        for i in 0..(MAX_ENTRIES + 10) {
            c.put(i.to_string(), 0, Duration::from_secs(1));
        }
        assert!(c.map.len() <= MAX_ENTRIES);
    }
}

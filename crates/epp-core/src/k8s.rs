//! Running natively in Kubernetes: the one place that talks to the Kubernetes API.
//!
//! - [`discovery`] watches pods (selected by an InferencePool or by `--endpoint-selector`) and
//!   writes the datastore;
//! - [`auth`] protects `/metrics` with TokenReview + SubjectAccessReview, as controller-runtime
//!   does, and explains every denial;
//! - [`leader`] elects one ready replica through a `coordination.k8s.io/v1` Lease;
//! - [`objectives`] watches `InferenceObjective`s (request priorities).
//!
//! All three share a [`KubeClient`]: a lazily built `kube::Client`, so flags can be turned into
//! options synchronously and the kubeconfig / in-cluster configuration is read once, on first use.

pub mod auth;
pub mod discovery;
pub mod leader;
pub mod objectives;
pub mod pool;
pub mod selector;

/// The Kubernetes API types this crate builds on, re-exported so tools and tests share them.
pub use k8s_openapi;

use std::path::PathBuf;
use std::sync::Arc;

/// Errors reaching or configuring the Kubernetes API.
#[derive(Debug, thiserror::Error)]
pub enum KubeError {
    #[error("no Kubernetes client configuration: {0} (in a cluster the ServiceAccount is used; outside one, set KUBECONFIG or --kubeconfig)")]
    Config(String),
    #[error("Kubernetes API: {0}")]
    Api(#[from] kube::Error),
}

enum Source {
    Infer { kubeconfig: Option<PathBuf> },
    Ready,
}

struct Inner {
    source: Source,
    cell: tokio::sync::OnceCell<kube::Client>,
}

/// A `kube::Client` built on first use (and retried on the next use if building it failed).
/// Cheap to clone.
#[derive(Clone)]
pub struct KubeClient {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for KubeClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.inner.source {
            Source::Infer {
                kubeconfig: Some(p),
            } => {
                write!(f, "KubeClient(kubeconfig {})", p.display())
            }
            Source::Infer { kubeconfig: None } => f.write_str("KubeClient(inferred)"),
            Source::Ready => f.write_str("KubeClient(given)"),
        }
    }
}

impl KubeClient {
    /// In-cluster configuration when running in a pod, else `KUBECONFIG` / `~/.kube/config`;
    /// an explicit kubeconfig file wins over both.
    pub fn infer(kubeconfig: Option<PathBuf>) -> Self {
        Self {
            inner: Arc::new(Inner {
                source: Source::Infer { kubeconfig },
                cell: tokio::sync::OnceCell::new(),
            }),
        }
    }

    /// Wrap an existing client (tests point one at an in-process API server).
    pub fn from_client(client: kube::Client) -> Self {
        Self {
            inner: Arc::new(Inner {
                source: Source::Ready,
                cell: tokio::sync::OnceCell::new_with(Some(client)),
            }),
        }
    }

    /// A client for `url` with no credentials and no client-side timeouts (tests).
    pub fn for_url(url: &str) -> Result<Self, KubeError> {
        let uri: http::Uri = url
            .parse()
            .map_err(|e| KubeError::Config(format!("{url}: {e}")))?;
        let mut cfg = kube::Config::new(uri);
        cfg.default_namespace = "default".into();
        cfg.connect_timeout = None;
        cfg.read_timeout = None;
        cfg.write_timeout = None;
        let client = kube::Client::try_from(cfg)?;
        Ok(Self::from_client(client))
    }

    /// The client, building it on first use.
    pub async fn get(&self) -> Result<kube::Client, KubeError> {
        let c = self
            .inner
            .cell
            .get_or_try_init(|| async {
                let Source::Infer { kubeconfig } = &self.inner.source else {
                    return Err(KubeError::Config("client missing".into()));
                };
                let cfg = match kubeconfig {
                    Some(path) => {
                        let kc = kube::config::Kubeconfig::read_from(path).map_err(|e| {
                            KubeError::Config(format!("--kubeconfig {}: {e}", path.display()))
                        })?;
                        kube::Config::from_custom_kubeconfig(kc, &Default::default())
                            .await
                            .map_err(|e| {
                                KubeError::Config(format!("--kubeconfig {}: {e}", path.display()))
                            })?
                    }
                    None => kube::Config::infer()
                        .await
                        .map_err(|e| KubeError::Config(e.to_string()))?,
                };
                Ok(kube::Client::try_from(cfg)?)
            })
            .await?;
        Ok(c.clone())
    }
}

/// Whether this process runs inside a Kubernetes pod (the API server's address is injected).
pub fn in_cluster() -> bool {
    std::env::var_os("KUBERNETES_SERVICE_HOST").is_some_and(|v| !v.is_empty())
}

/// The namespace this pod runs in: `POD_NAMESPACE`, then the ServiceAccount's namespace file.
pub fn own_namespace() -> Option<String> {
    // `NAMESPACE` is what the llm-d-router and GAIE charts set from the downward API.
    for var in ["POD_NAMESPACE", "NAMESPACE"] {
        if let Ok(ns) = std::env::var(var) {
            if !ns.trim().is_empty() {
                return Some(ns.trim().to_string());
            }
        }
    }
    std::fs::read_to_string("/var/run/secrets/kubernetes.io/serviceaccount/namespace")
        .ok()
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
}

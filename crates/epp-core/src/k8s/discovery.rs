//! Kubernetes discovery: pods selected by an InferencePool (or by `--endpoint-selector`) become
//! datastore endpoints, one per pod and target port. Watch-based (kube-runtime watcher +
//! reflector), so additions, readiness flips, relabels and deletions arrive as events, not polls.
//!
//! An endpoint counts only when the pod's labels match, `PodReady=True`, it has no
//! `deletionTimestamp` and it has a pod IP. `epp_pods_discovered{namespace,label_selector}` reads
//! the datastore, which this task rewrites after every event, so the gauge is never stale.
//! Readiness waits for the first complete list (`DatastoreWriter::mark_synced`).

use std::collections::BTreeMap;
use std::pin::Pin;
use std::sync::Arc;

use futures_util::{Stream, StreamExt};
use k8s_openapi::api::core::v1::Pod;
use kube::runtime::reflector::{self, Store};
use kube::runtime::watcher::{self, Event};
use kube::runtime::WatchStreamExt;
use kube::Api;

use super::pool::{ports_from, InferencePool};
use super::selector::LabelSelector;
use super::KubeClient;
use crate::datastore::{DatastoreWriter, EndpointSpec, Engine};
use crate::telemetry::Shutdown;

/// Pod label naming the model-server engine (`vllm` when absent).
pub const ENGINE_LABEL: &str = "inference.networking.k8s.io/engine-type";

/// Where the pods come from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PodSource {
    /// `--pool-name` / `--pool-namespace`: selector and ports come from the InferencePool and
    /// follow its changes.
    Pool { namespace: String, name: String },
    /// `--endpoint-selector` + `--endpoint-target-ports`, without the CRD.
    Selector {
        namespace: String,
        selector: LabelSelector,
        ports: Vec<u16>,
    },
}

impl PodSource {
    pub fn namespace(&self) -> &str {
        match self {
            PodSource::Pool { namespace, .. } | PodSource::Selector { namespace, .. } => namespace,
        }
    }
}

/// Kubernetes discovery, ready to run.
#[derive(Clone, Debug)]
pub struct KubeDiscovery {
    pub client: KubeClient,
    pub source: PodSource,
}

/// Whether `PodReady` is `True`.
pub fn pod_ready(pod: &Pod) -> bool {
    pod.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|cs| cs.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}

/// `ip:port`, bracketing IPv6 addresses.
fn address(ip: &str, port: u16) -> String {
    if ip.contains(':') {
        format!("[{ip}]:{port}")
    } else {
        format!("{ip}:{port}")
    }
}

/// The endpoints a set of pods yields for `selector` and `ports` (sorted by name, so the result
/// does not depend on the order the API listed them in).
pub fn endpoints_from_pods<'a>(
    pods: impl IntoIterator<Item = &'a Pod>,
    selector: &LabelSelector,
    ports: &[u16],
) -> Vec<EndpointSpec> {
    let empty = BTreeMap::new();
    let mut out = Vec::new();
    for pod in pods {
        let labels = pod.metadata.labels.as_ref().unwrap_or(&empty);
        if selector.is_empty() || !selector.matches(labels) {
            continue;
        }
        if pod.metadata.deletion_timestamp.is_some() || !pod_ready(pod) {
            continue;
        }
        let Some(ip) = pod
            .status
            .as_ref()
            .and_then(|s| s.pod_ip.as_deref())
            .filter(|ip| !ip.is_empty())
        else {
            continue;
        };
        let pod_name = pod.metadata.name.clone().unwrap_or_default();
        let engine = match labels.get(ENGINE_LABEL) {
            None => Engine::Vllm,
            Some(v) => Engine::parse(v).unwrap_or_else(|| {
                tracing::warn!(pod = %pod_name, label = ENGINE_LABEL, value = %v,
                    "unknown engine type (expected vllm, sglang or trt-llm); scraping it as vllm");
                Engine::Vllm
            }),
        };
        for (rank, &port) in ports.iter().enumerate() {
            let name = if ports.len() > 1 {
                format!("{pod_name}-{port}")
            } else {
                pod_name.clone()
            };
            out.push(EndpointSpec {
                address: address(ip, port),
                name,
                engine,
                labels: labels.clone(),
                namespace: pod.metadata.namespace.clone().filter(|n| !n.is_empty()),
                rank: rank as u16,
            });
        }
    }
    out.sort_by(|a, b| a.name.cmp(&b.name).then(a.address.cmp(&b.address)));
    out
}

type PodStream = Pin<Box<dyn Stream<Item = Result<Event<Pod>, watcher::Error>> + Send>>;

/// One pod watch (for one selector): a reflector store plus its event stream.
struct PodWatch {
    selector: LabelSelector,
    store: Store<Pod>,
    stream: PodStream,
    /// The first complete list has arrived.
    listed: bool,
}

impl PodWatch {
    fn start(api: Api<Pod>, selector: LabelSelector) -> Self {
        let (store, writer) = reflector::store();
        let cfg = watcher::Config::default().labels(&selector.to_string());
        let stream = reflector::reflector(writer, watcher::watcher(api, cfg))
            .default_backoff()
            .boxed();
        Self {
            selector,
            store,
            stream,
            listed: false,
        }
    }
}

/// Hint for a failed pod watch.
fn pod_watch_hint(namespace: &str) -> String {
    format!(
        "the picker's ServiceAccount needs get/list/watch on pods in namespace {namespace} \
         (kubectl apply -f deploy/kubernetes/rbac.yaml)"
    )
}

impl crate::discovery::EndpointDiscovery for KubeDiscovery {
    fn validate(&self) -> Result<Vec<EndpointSpec>, String> {
        Ok(Vec::new())
    }

    fn run(
        &self,
        writer: DatastoreWriter,
        _initial: Vec<EndpointSpec>,
        shutdown: Shutdown,
    ) -> futures_util::future::BoxFuture<'static, ()> {
        Box::pin(self.clone().follow(writer, shutdown))
    }

    fn as_any(&self) -> &dyn std::any::Any {
        self
    }
}

impl KubeDiscovery {
    /// Watch until shutdown, writing every change to `ds`.
    pub async fn follow(self, ds: DatastoreWriter, shutdown: Shutdown) {
        let stop = shutdown.wait();
        tokio::pin!(stop);
        let client = loop {
            match self.client.get().await {
                Ok(c) => break c,
                Err(e) => {
                    tracing::error!(error = %e, "Kubernetes discovery cannot start; retrying in 5s");
                    tokio::select! {
                        _ = &mut stop => return,
                        _ = tokio::time::sleep(std::time::Duration::from_secs(5)) => {}
                    }
                }
            }
        };
        match self.source.clone() {
            PodSource::Selector {
                namespace,
                selector,
                ports,
            } => {
                ds.set_discovery_labels(&namespace, &selector.to_string());
                tracing::info!(namespace = %namespace, selector = %selector, ports = ?ports,
                    "discovering pods by label selector");
                let api: Api<Pod> = Api::namespaced(client, &namespace);
                let mut w = PodWatch::start(api, selector);
                loop {
                    tokio::select! {
                        _ = &mut stop => return,
                        ev = w.stream.next() => {
                            let Some(ev) = ev else { return };
                            on_pod_event(&ds, &mut w, ev, &ports, &namespace);
                        }
                    }
                }
            }
            PodSource::Pool { namespace, name } => {
                run_pool(client, namespace, name, ds, &mut stop).await;
            }
        }
    }
}

/// Apply one pod watch event; returns whether endpoints were rewritten.
fn on_pod_event(
    ds: &DatastoreWriter,
    w: &mut PodWatch,
    ev: Result<Event<Pod>, watcher::Error>,
    ports: &[u16],
    namespace: &str,
) -> bool {
    match ev {
        Err(e) => {
            tracing::warn!(error = %e, hint = %pod_watch_hint(namespace),
                "pod watch failed; retrying with backoff");
            false
        }
        Ok(Event::Init) | Ok(Event::InitApply(_)) => false,
        Ok(ev) => {
            if matches!(ev, Event::InitDone) && !w.listed {
                w.listed = true;
                tracing::info!(namespace = %namespace, selector = %w.selector,
                    pods = w.store.state().len(), "initial pod list received");
            }
            if !w.listed {
                return false;
            }
            publish(ds, &w.store, &w.selector, ports, namespace);
            true
        }
    }
}

/// Rewrite the endpoints (and the labels of `epp_pods_discovered`, in the same step, so the
/// gauge never pairs one selector with another selector's count).
fn publish(
    ds: &DatastoreWriter,
    store: &Store<Pod>,
    selector: &LabelSelector,
    ports: &[u16],
    namespace: &str,
) {
    let pods = store.state();
    let specs = endpoints_from_pods(pods.iter().map(Arc::as_ref), selector, ports);
    let n = specs.len();
    ds.set_discovery_labels(namespace, &selector.to_string());
    let (added, removed) = ds.set_endpoints(specs);
    if added + removed > 0 {
        tracing::info!(
            added,
            removed,
            endpoints = n,
            "discovered endpoints changed"
        );
    }
    ds.mark_synced();
}

type PoolStream = Pin<Box<dyn Stream<Item = Result<Event<InferencePool>, watcher::Error>> + Send>>;

/// The pool's effective (selector, ports), or why it cannot be used.
fn pool_target(pool: &InferencePool) -> Result<(LabelSelector, Vec<u16>), String> {
    let sel = LabelSelector::from_map(pool.spec.selector.match_labels.clone());
    if sel.is_empty() {
        return Err("spec.selector.matchLabels is empty (it would select every pod)".into());
    }
    let ports = ports_from(pool.spec.target_ports.iter().map(|p| p.number))
        .map_err(|e| format!("spec.targetPorts: {e}"))?;
    Ok((sel, ports))
}

async fn run_pool(
    client: kube::Client,
    namespace: String,
    name: String,
    ds: DatastoreWriter,
    stop: &mut Pin<&mut impl std::future::Future<Output = ()>>,
) {
    ds.set_discovery_labels(&namespace, "");
    ds.set_pool_name(&name);
    tracing::info!(namespace = %namespace, pool = %name, "discovering pods through InferencePool");
    let pools: Api<InferencePool> = Api::namespaced(client.clone(), &namespace);
    let pods: Api<Pod> = Api::namespaced(client, &namespace);
    let mut pool_stream: PoolStream = watcher::watcher(
        pools,
        watcher::Config::default().fields(&format!("metadata.name={name}")),
    )
    .default_backoff()
    .boxed();
    // The pool as of the last complete view (buffered during re-lists).
    let mut current: Option<InferencePool> = None;
    let mut relist: Option<Option<InferencePool>> = None;
    let mut target: Option<(LabelSelector, Vec<u16>)> = None;
    let mut watch: Option<PodWatch> = None;
    loop {
        let pod_ev = async {
            match watch.as_mut() {
                Some(w) => w.stream.next().await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            _ = &mut *stop => return,
            ev = pod_ev => {
                let Some(ev) = ev else { return };
                let (w, (_, ports)) = (watch.as_mut().expect("polled"), target.as_ref().expect("watch implies target"));
                on_pod_event(&ds, w, ev, ports, &namespace);
            }
            ev = pool_stream.next() => {
                let Some(ev) = ev else { return };
                let changed = match ev {
                    Err(e) => {
                        let hint = if matches!(&e, watcher::Error::InitialListFailed(kube::Error::Api(s)) if s.code == 404) {
                            "the InferencePool CRD (inference.networking.k8s.io/v1) is not installed; install the Gateway API Inference Extension CRDs, or use --endpoint-selector instead of --pool-name".to_string()
                        } else {
                            format!("the picker's ServiceAccount needs get/list/watch on inferencepools.inference.networking.k8s.io in namespace {namespace} (kubectl apply -f deploy/kubernetes/rbac.yaml)")
                        };
                        tracing::warn!(error = %e, hint = %hint, "InferencePool watch failed; retrying with backoff");
                        false
                    }
                    Ok(Event::Init) => { relist = Some(None); false }
                    Ok(Event::InitApply(p)) => {
                        if p.metadata.name.as_deref() == Some(name.as_str()) {
                            relist = Some(Some(p));
                        }
                        false
                    }
                    Ok(Event::InitDone) => {
                        current = relist.take().flatten();
                        if current.is_none() {
                            tracing::warn!(namespace = %namespace, pool = %name,
                                "InferencePool not found; waiting for it to be created (kubectl get inferencepools -n {namespace})");
                        }
                        true
                    }
                    Ok(Event::Apply(p)) => {
                        if p.metadata.name.as_deref() != Some(name.as_str()) { continue; }
                        current = Some(p);
                        true
                    }
                    Ok(Event::Delete(p)) => {
                        if p.metadata.name.as_deref() != Some(name.as_str()) { continue; }
                        tracing::warn!(namespace = %namespace, pool = %name, "InferencePool deleted; no endpoints until it is re-created");
                        current = None;
                        true
                    }
                };
                if !changed { continue; }
                let new_target = match current.as_ref().map(pool_target) {
                    None => None,
                    Some(Ok(t)) => Some(t),
                    Some(Err(why)) => {
                        tracing::error!(namespace = %namespace, pool = %name, problem = %why,
                            "InferencePool cannot be used; no endpoints until it is fixed");
                        None
                    }
                };
                if new_target == target { continue; }
                let selector_changed = new_target.as_ref().map(|t| &t.0) != target.as_ref().map(|t| &t.0);
                target = new_target;
                match &target {
                    None => {
                        watch = None;
                        ds.set_discovery_labels(&namespace, "");
                        ds.set_endpoints(Vec::new());
                    }
                    Some((sel, ports)) => {
                        tracing::info!(namespace = %namespace, pool = %name, selector = %sel, ports = ?ports, "InferencePool selects pods");
                        if selector_changed || watch.is_none() {
                            // A fresh watch for the new selector; the current endpoints stay
                            // until its first list arrives.
                            watch = Some(PodWatch::start(pods.clone(), sel.clone()));
                        } else if let Some(w) = watch.as_ref().filter(|w| w.listed) {
                            publish(&ds, &w.store, sel, ports, &namespace);
                        }
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(name: &str, ip: &str, ready: bool, labels: &[(&str, &str)]) -> Pod {
        serde_json::from_value(serde_json::json!({
            "metadata": {"name": name, "labels": labels.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect::<BTreeMap<_,_>>()},
            "status": {"podIP": ip, "conditions": [{"type": "Ready", "status": if ready {"True"} else {"False"}}]}
        }))
        .unwrap()
    }

    #[test]
    fn filters_and_names() {
        let sel = LabelSelector::parse("app=vllm").unwrap();
        let mut terminating = pod("d", "10.0.0.4", true, &[("app", "vllm")]);
        terminating.metadata.deletion_timestamp = Some(
            k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(Default::default()),
        );
        let pods = vec![
            pod(
                "b",
                "10.0.0.2",
                true,
                &[("app", "vllm"), (ENGINE_LABEL, "sglang")],
            ),
            pod("a", "10.0.0.1", true, &[("app", "vllm")]),
            pod("c", "10.0.0.3", false, &[("app", "vllm")]),
            terminating,
            pod("e", "", true, &[("app", "vllm")]),
            pod("f", "10.0.0.6", true, &[("app", "other")]),
            pod("g", "fd00::7", true, &[("app", "vllm")]),
        ];
        let one = endpoints_from_pods(&pods, &sel, &[8000]);
        let got: Vec<_> = one
            .iter()
            .map(|e| (e.name.as_str(), e.address.as_str(), e.engine))
            .collect();
        assert_eq!(
            got,
            vec![
                ("a", "10.0.0.1:8000", Engine::Vllm),
                ("b", "10.0.0.2:8000", Engine::Sglang),
                ("g", "[fd00::7]:8000", Engine::Vllm),
            ]
        );
        let two = endpoints_from_pods(&pods[1..2], &sel, &[8000, 8001]);
        let got: Vec<_> = two
            .iter()
            .map(|e| (e.name.as_str(), e.address.as_str()))
            .collect();
        assert_eq!(
            got,
            vec![("a-8000", "10.0.0.1:8000"), ("a-8001", "10.0.0.1:8001")]
        );
        // An empty selector never selects everything.
        assert!(endpoints_from_pods(&pods, &LabelSelector::default(), &[1]).is_empty());
    }
}

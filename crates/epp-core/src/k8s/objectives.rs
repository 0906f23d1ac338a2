//! Watches `InferenceObjective` resources (`llm-d.ai/v1alpha2`, and the deprecated
//! `inference.networking.x-k8s.io/v1alpha2`) in the pool's namespace and keeps the picker's
//! objective table ([`crate::admission::Objectives`]) in step: an objective whose
//! `spec.poolRef` names this pool (group `inference.networking.k8s.io` by default) gives the
//! requests naming it (`x-llm-d-inference-objective`) its `spec.priority`; one that stops
//! naming the pool, or is deleted, is forgotten. A group whose CRD is not installed is retried
//! with backoff and logged once.

use std::collections::BTreeMap;
use std::sync::Arc;

use futures_util::StreamExt;
use kube::api::{Api, ApiResource, DynamicObject, GroupVersionKind};
use kube::runtime::watcher::{self, Event};
use kube::runtime::WatchStreamExt;
use parking_lot::Mutex;
use serde_json::Value;

use crate::admission::{Objective, Objectives};

pub const GROUP: &str = "llm-d.ai";
/// The deprecated group; still watched, with a deprecation warning per objective found.
pub const LEGACY_GROUP: &str = "inference.networking.x-k8s.io";
pub const VERSION: &str = "v1alpha2";
pub const KIND: &str = "InferenceObjective";
pub const PLURAL: &str = "inferenceobjectives";
/// The group a `poolRef` without one means.
pub const DEFAULT_POOL_GROUP: &str = "inference.networking.k8s.io";

/// Objective name → priority, of one group.
type Table = BTreeMap<String, Option<i64>>;

/// Which objectives to watch.
#[derive(Clone, Debug)]
pub struct ObjectiveWatch {
    pub client: super::KubeClient,
    pub namespace: String,
    pub pool_name: String,
    pub pool_group: String,
}

/// The priority an objective object gives this pool: `None` when it does not name the pool
/// (or is being deleted), `Some(None)` when it names it without a priority.
pub fn objective_for_pool(obj: &Value, pool_name: &str, pool_group: &str) -> Option<Objective> {
    let name = obj.pointer("/metadata/name")?.as_str()?;
    if obj
        .pointer("/metadata/deletionTimestamp")
        .is_some_and(|v| !v.is_null())
    {
        return None;
    }
    let pool = obj.pointer("/spec/poolRef")?;
    let group = pool
        .get("group")
        .and_then(Value::as_str)
        .unwrap_or(DEFAULT_POOL_GROUP);
    if pool.get("name").and_then(Value::as_str) != Some(pool_name) || group != pool_group {
        return None;
    }
    let priority = obj
        .pointer("/spec/priority")
        .and_then(Value::as_i64)
        .and_then(|p| i32::try_from(p).ok())
        .map(i64::from);
    Some(Objective {
        name: name.to_string(),
        priority,
    })
}

/// Watch both groups until the task is dropped.
pub fn spawn(
    w: ObjectiveWatch,
    objectives: Arc<Objectives>,
    shutdown: crate::telemetry::Shutdown,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let client = match w.client.get().await {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(error = %e, "InferenceObjective watch not started");
                return;
            }
        };
        // One table per group, merged on every change.
        let tables: Arc<Mutex<[Table; 2]>> = Arc::default();
        let mut tasks = Vec::new();
        for (i, group) in [GROUP, LEGACY_GROUP].into_iter().enumerate() {
            let ar = ApiResource::from_gvk_with_plural(
                &GroupVersionKind::gvk(group, VERSION, KIND),
                PLURAL,
            );
            let api: Api<DynamicObject> = Api::namespaced_with(client.clone(), &w.namespace, &ar);
            let (tables, objectives, w) = (tables.clone(), objectives.clone(), w.clone());
            tasks.push(tokio::spawn(async move {
                let mut stream =
                    watcher::watcher(api, watcher::Config::default()).default_backoff().boxed();
                let mut warned = false;
                let mut init: Option<BTreeMap<String, Option<i64>>> = None;
                while let Some(ev) = stream.next().await {
                    let obj_of = |o: &DynamicObject| {
                        serde_json::to_value(o)
                            .ok()
                            .and_then(|v| objective_for_pool(&v, &w.pool_name, &w.pool_group))
                    };
                    let name_of = |o: &DynamicObject| o.metadata.name.clone().unwrap_or_default();
                    let changed = {
                        let mut t = tables.lock();
                        match ev {
                            Err(e) => {
                                if !warned {
                                    warned = true;
                                    tracing::warn!(group, error = %e, "InferenceObjective watch failed (is the CRD installed and may the picker list it?); retrying with backoff");
                                }
                                false
                            }
                            Ok(Event::Init) => {
                                init = Some(BTreeMap::new());
                                false
                            }
                            Ok(Event::InitApply(o)) => {
                                if let (Some(m), Some(ob)) = (init.as_mut(), obj_of(&o)) {
                                    m.insert(ob.name, ob.priority);
                                }
                                false
                            }
                            Ok(Event::InitDone) => {
                                t[i] = init.take().unwrap_or_default();
                                true
                            }
                            Ok(Event::Apply(o)) => {
                                match obj_of(&o) {
                                    Some(ob) => {
                                        if group == LEGACY_GROUP {
                                            tracing::warn!(objective = %ob.name, "DEPRECATION: apiVersion inference.networking.x-k8s.io/v1alpha2 InferenceObjective is deprecated; use llm-d.ai/v1alpha2");
                                        }
                                        tracing::info!(objective = %ob.name, priority = ?ob.priority, "InferenceObjective added or updated");
                                        t[i].insert(ob.name, ob.priority);
                                    }
                                    None => {
                                        t[i].remove(&name_of(&o));
                                    }
                                }
                                true
                            }
                            Ok(Event::Delete(o)) => {
                                t[i].remove(&name_of(&o));
                                true
                            }
                        }
                    };
                    if changed {
                        let t = tables.lock();
                        let mut all: BTreeMap<String, Option<i64>> = t[1].clone();
                        all.extend(t[0].iter().map(|(k, v)| (k.clone(), *v)));
                        drop(t);
                        objectives.replace_watched(
                            all.into_iter()
                                .map(|(name, priority)| Objective { name, priority })
                                .collect(),
                        );
                    }
                }
            }));
        }
        shutdown.wait().await;
        for t in tasks {
            t.abort();
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn only_objectives_of_this_pool_count() {
        let o = |pool: Value, prio: Value| json!({"metadata": {"name": "premium"}, "spec": {"poolRef": pool, "priority": prio}});
        let mine = objective_for_pool(&o(json!({"name": "p"}), json!(5)), "p", DEFAULT_POOL_GROUP);
        assert_eq!(mine.unwrap().priority, Some(5));
        assert!(
            objective_for_pool(&o(json!({"name": "q"}), json!(5)), "p", DEFAULT_POOL_GROUP)
                .is_none()
        );
        assert!(objective_for_pool(
            &o(json!({"name": "p", "group": "x"}), json!(5)),
            "p",
            DEFAULT_POOL_GROUP
        )
        .is_none());
        let unset = objective_for_pool(
            &o(json!({"name": "p"}), Value::Null),
            "p",
            DEFAULT_POOL_GROUP,
        );
        assert_eq!(unset.unwrap().priority, None);
    }
}

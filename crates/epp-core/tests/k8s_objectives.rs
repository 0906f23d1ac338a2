//! `InferenceObjective` watching against the in-test API server: objectives of the pool (in
//! `llm-d.ai/v1alpha2` and the deprecated `inference.networking.x-k8s.io/v1alpha2`) give their
//! priorities within a second, changes and deletions follow, other pools' objectives are ignored.

mod k8s_fake;

use std::sync::Arc;
use std::time::Duration;

use epp_core::admission::{Objective, Objectives};
use epp_core::k8s::objectives::{spawn, ObjectiveWatch, DEFAULT_POOL_GROUP};
use epp_core::telemetry::Shutdown;
use k8s_fake::{objective, FakeApi, Res};

const NS: &str = "llm-d";

async fn eventually(o: &Objectives, name: &str, want: i64) {
    for _ in 0..100 {
        if o.priority(Some(name)) == want {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("{name}: wanted priority {want}, table {:?}", o.list());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_pools_objectives_set_request_priorities() {
    let api = FakeApi::start();
    api.apply(
        Res::Objectives,
        NS,
        objective("premium", "pool-a", Some(10)),
    );
    api.apply(
        Res::Objectives,
        NS,
        objective("other-pool", "pool-b", Some(99)),
    );
    api.apply(
        Res::LegacyObjectives,
        NS,
        objective("batch", "pool-a", Some(-1)),
    );
    let objectives: Arc<Objectives> = Objectives::new(&[Objective::parse("static=3").unwrap()]);
    let stop = Shutdown::new();
    let task = spawn(
        ObjectiveWatch {
            client: api.client(),
            namespace: NS.into(),
            pool_name: "pool-a".into(),
            pool_group: DEFAULT_POOL_GROUP.into(),
        },
        objectives.clone(),
        stop.clone(),
    );
    eventually(&objectives, "premium", 10).await;
    eventually(&objectives, "batch", -1).await;
    assert_eq!(
        objectives.priority(Some("other-pool")),
        0,
        "another pool's objective"
    );
    assert_eq!(
        objectives.priority(Some("static")),
        3,
        "the flag's objectives stay"
    );
    // Changes and deletions follow.
    api.modify(Res::Objectives, NS, "premium", |o| {
        o["spec"]["priority"] = 20.into()
    });
    eventually(&objectives, "premium", 20).await;
    api.delete(Res::LegacyObjectives, NS, "batch");
    for _ in 0..100 {
        if !objectives.contains("batch") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(!objectives.contains("batch"), "{:?}", objectives.list());
    // Moving an objective to another pool forgets it here.
    api.modify(Res::Objectives, NS, "premium", |o| {
        o["spec"]["poolRef"]["name"] = "pool-b".into()
    });
    eventually(&objectives, "premium", 0).await;
    stop.trigger();
    tokio::time::timeout(Duration::from_secs(5), task)
        .await
        .unwrap()
        .unwrap();
}

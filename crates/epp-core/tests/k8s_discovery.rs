//! Kubernetes discovery against the in-test API server: pod and InferencePool changes reach the
//! datastore within a second, readiness waits for the first list, and `epp_pods_discovered`
//! tells the truth. Pod IPs are loopback addresses: the picker's scraper may connect to them.

mod k8s_fake;

use std::time::Duration;

use epp_core::app::{Runtime, RuntimeOptions};
use epp_core::datastore::{Datastore, DatastoreWriter, Engine, HealthConfig, HealthState};
use epp_core::k8s::discovery::{KubeDiscovery, PodSource, ENGINE_LABEL};
use epp_core::k8s::selector::LabelSelector;
use epp_core::telemetry::Shutdown;
use k8s_fake::{pod, pool, FakeApi, Res};
use serde_json::json;

const NS: &str = "llm-d";

/// Names and addresses of endpoints discovery currently lists (draining ones excluded).
fn listed(ds: &Datastore) -> Vec<(String, String)> {
    let mut v: Vec<_> = ds
        .snapshot()
        .endpoints
        .iter()
        .filter(|e| e.health != HealthState::Draining)
        .map(|e| {
            (
                e.endpoint.name().to_string(),
                e.endpoint.address().to_string(),
            )
        })
        .collect();
    v.sort();
    v
}

fn names(ds: &Datastore) -> Vec<String> {
    listed(ds).into_iter().map(|(n, _)| n).collect()
}

/// Wait (event-driven, at most 1 s) until the listed endpoint names equal `want`.
async fn expect_names(ds: &Datastore, want: &[&str]) {
    let mut rx = ds.subscribe();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(1);
    loop {
        if names(ds) == want {
            return;
        }
        if tokio::time::timeout_at(deadline, rx.changed())
            .await
            .is_err()
        {
            panic!(
                "within 1s the datastore should list {want:?}, it lists {:?}",
                names(ds)
            );
        }
    }
}

async fn wait_synced(ds: &Datastore) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while !ds.is_synced() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "discovery never synced"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

fn start(api: &FakeApi, source: PodSource) -> (Datastore, Shutdown) {
    let writer = DatastoreWriter::new(HealthConfig::default());
    let ds = writer.reader();
    let sd = Shutdown::new();
    let d = KubeDiscovery {
        client: api.client(),
        source,
    };
    tokio::spawn(d.follow(writer, sd.clone()));
    (ds, sd)
}

fn set_ready(api: &FakeApi, name: &str, ready: bool) {
    api.modify(Res::Pods, NS, name, |p| {
        p["status"]["conditions"] =
            json!([{"type": "Ready", "status": if ready { "True" } else { "False" }}]);
    });
}

#[tokio::test]
async fn selector_discovery_follows_every_kind_of_pod_change() {
    let api = FakeApi::start();
    api.apply(
        Res::Pods,
        NS,
        pod("vllm-a", "127.0.0.11", true, &[("app", "vllm")]),
    );
    api.apply(
        Res::Pods,
        NS,
        pod("vllm-b", "127.0.0.12", false, &[("app", "vllm")]),
    );
    api.apply(
        Res::Pods,
        NS,
        pod("other", "127.0.0.13", true, &[("app", "web")]),
    );
    api.apply(
        Res::Pods,
        "elsewhere",
        pod("vllm-x", "127.0.0.14", true, &[("app", "vllm")]),
    );
    let (ds, sd) = start(
        &api,
        PodSource::Selector {
            namespace: NS.into(),
            selector: LabelSelector::parse("app=vllm").unwrap(),
            ports: vec![8000],
        },
    );
    assert!(!ds.is_synced(), "not synced before the first list");
    wait_synced(&ds).await;
    assert_eq!(
        listed(&ds),
        vec![("vllm-a".to_string(), "127.0.0.11:8000".to_string())]
    );
    assert_eq!(
        ds.discovery_labels(),
        (NS.to_string(), "app=vllm".to_string())
    );

    // Added (ready, with an engine label).
    api.apply(
        Res::Pods,
        NS,
        pod(
            "vllm-c",
            "127.0.0.15",
            true,
            &[("app", "vllm"), (ENGINE_LABEL, "sglang")],
        ),
    );
    expect_names(&ds, &["vllm-a", "vllm-c"]).await;
    let c = ds
        .snapshot()
        .endpoints
        .iter()
        .find(|e| e.endpoint.name() == "vllm-c")
        .unwrap()
        .endpoint
        .clone();
    assert_eq!(c.spec.engine, Engine::Sglang);
    assert_eq!(c.spec.labels["app"], "vllm");

    // Made ready / unready.
    set_ready(&api, "vllm-b", true);
    expect_names(&ds, &["vllm-a", "vllm-b", "vllm-c"]).await;
    set_ready(&api, "vllm-a", false);
    expect_names(&ds, &["vllm-b", "vllm-c"]).await;
    assert_eq!(ds.discovered_count(), 2);

    // Relabelled out of, then back into, the selector.
    api.modify(Res::Pods, NS, "vllm-c", |p| {
        p["metadata"]["labels"]["app"] = json!("retired")
    });
    expect_names(&ds, &["vllm-b"]).await;
    api.modify(Res::Pods, NS, "other", |p| {
        p["metadata"]["labels"]["app"] = json!("vllm")
    });
    expect_names(&ds, &["other", "vllm-b"]).await;

    // Terminating (deletionTimestamp set), then deleted.
    api.modify(Res::Pods, NS, "vllm-b", |p| {
        p["metadata"]["deletionTimestamp"] = json!("2026-01-01T00:00:00Z")
    });
    expect_names(&ds, &["other"]).await;
    api.delete(Res::Pods, NS, "vllm-b");
    api.delete(Res::Pods, NS, "other");
    expect_names(&ds, &[]).await;
    assert_eq!(ds.discovered_count(), 0);

    // A pod without an IP yet does not count; it does once the IP is assigned.
    api.apply(Res::Pods, NS, pod("vllm-d", "", true, &[("app", "vllm")]));
    api.apply(
        Res::Pods,
        NS,
        pod("vllm-e", "127.0.0.16", true, &[("app", "vllm")]),
    );
    expect_names(&ds, &["vllm-e"]).await;
    api.modify(Res::Pods, NS, "vllm-d", |p| {
        p["status"]["podIP"] = json!("127.0.0.17")
    });
    expect_names(&ds, &["vllm-d", "vllm-e"]).await;

    // Watches that drop (API server restart) are resumed; changes keep arriving.
    api.drop_watches();
    tokio::time::sleep(Duration::from_millis(100)).await;
    api.delete(Res::Pods, NS, "vllm-e");
    expect_names(&ds, &["vllm-d"]).await;

    // It really used the watch protocol with the selector.
    let reqs = api.requests();
    assert!(
        reqs.iter()
            .any(|r| r.contains("/api/v1/namespaces/llm-d/pods?")
                && r.contains("watch=true")
                && r.contains("labelSelector=app%3Dvllm")),
        "{reqs:#?}"
    );
    sd.trigger();
}

#[tokio::test]
async fn inference_pool_selector_and_ports_are_honoured_and_followed() {
    let api = FakeApi::start();
    api.apply(
        Res::Pods,
        NS,
        pod(
            "vllm-a",
            "127.0.0.21",
            true,
            &[("app", "vllm"), ("pool", "p1")],
        ),
    );
    api.apply(
        Res::Pods,
        NS,
        pod(
            "vllm-b",
            "127.0.0.22",
            true,
            &[("app", "vllm"), ("pool", "p1")],
        ),
    );
    api.apply(
        Res::Pods,
        NS,
        pod("sgl-a", "127.0.0.23", true, &[("app", "sglang")]),
    );
    let (ds, sd) = start(
        &api,
        PodSource::Pool {
            namespace: NS.into(),
            name: "qwen".into(),
        },
    );
    // No pool yet: not synced, nothing listed.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        !ds.is_synced(),
        "readiness must wait for the pool and its pods"
    );
    assert!(names(&ds).is_empty());

    api.apply(
        Res::Pools,
        NS,
        pool("qwen", &[("app", "vllm"), ("pool", "p1")], &[8000, 8001]),
    );
    expect_names(
        &ds,
        &["vllm-a-8000", "vllm-a-8001", "vllm-b-8000", "vllm-b-8001"],
    )
    .await;
    assert!(ds.is_synced());
    assert_eq!(
        listed(&ds)[1],
        ("vllm-a-8001".to_string(), "127.0.0.21:8001".to_string())
    );
    assert_eq!(
        ds.discovery_labels(),
        (NS.to_string(), "app=vllm,pool=p1".to_string())
    );
    assert_eq!(ds.discovered_count(), 4);

    // A different pool in the namespace is ignored.
    api.apply(
        Res::Pools,
        NS,
        pool("other", &[("app", "sglang")], &[30000]),
    );

    // Fewer ports: one endpoint per pod, named after the pod.
    api.modify(Res::Pools, NS, "qwen", |p| {
        p["spec"]["targetPorts"] = json!([{"number": 8000}])
    });
    expect_names(&ds, &["vllm-a", "vllm-b"]).await;

    // A new selector: the pod watch follows it.
    api.modify(Res::Pools, NS, "qwen", |p| {
        p["spec"]["selector"]["matchLabels"] = json!({"app": "sglang"})
    });
    expect_names(&ds, &["sgl-a"]).await;
    assert_eq!(
        ds.discovery_labels(),
        (NS.to_string(), "app=sglang".to_string())
    );
    api.apply(
        Res::Pods,
        NS,
        pod("sgl-b", "127.0.0.24", true, &[("app", "sglang")]),
    );
    expect_names(&ds, &["sgl-a", "sgl-b"]).await;

    // An unusable pool (no ports) and a deleted pool give no endpoints.
    api.modify(Res::Pools, NS, "qwen", |p| {
        p["spec"]["targetPorts"] = json!([])
    });
    expect_names(&ds, &[]).await;
    api.modify(Res::Pools, NS, "qwen", |p| {
        p["spec"]["targetPorts"] = json!([{"number": 8000}])
    });
    expect_names(&ds, &["sgl-a", "sgl-b"]).await;
    api.delete(Res::Pools, NS, "qwen");
    expect_names(&ds, &[]).await;
    sd.trigger();
}

/// The gauge line for `epp_pods_discovered`, parsed from an exposition.
fn pods_discovered(expo: &str) -> Vec<String> {
    expo.lines()
        .filter(|l| l.starts_with("epp_pods_discovered{"))
        .map(str::to_string)
        .collect()
}

async fn http_get(addr: std::net::SocketAddr, path: &str) -> (u16, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(format!("GET {path} HTTP/1.1\r\nhost: t\r\nconnection: close\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut buf = Vec::new();
    s.read_to_end(&mut buf).await.unwrap();
    let text = String::from_utf8_lossy(&buf).to_string();
    let code = text[9..12].parse().unwrap();
    let body = text
        .split_once("\r\n\r\n")
        .map(|x| x.1)
        .unwrap_or("")
        .to_string();
    (code, body)
}

#[tokio::test]
async fn picker_with_pool_discovery_gates_readiness_and_exports_the_gauge() {
    let api = FakeApi::start();
    api.apply(
        Res::Pods,
        NS,
        pod("vllm-a", "127.0.0.31", true, &[("app", "vllm")]),
    );
    let opts = RuntimeOptions {
        discovery: std::sync::Arc::new(KubeDiscovery {
            client: api.client(),
            source: PodSource::Pool {
                namespace: NS.into(),
                name: "qwen".into(),
            },
        }),
        metrics_addr: Some("127.0.0.1:0".parse().unwrap()),
        health_addr: Some("127.0.0.1:0".parse().unwrap()),
        ..Default::default()
    };
    let validated = opts.validate().unwrap();
    let picker = Runtime::start(opts, validated, Shutdown::new())
        .await
        .unwrap();
    let (m, h) = (picker.metrics_addr.unwrap(), picker.health_addr.unwrap());

    let (code, why) = http_get(h, "/readyz").await;
    assert_eq!(code, 503, "{why}");
    assert!(why.contains("not synced"), "{why}");

    api.apply(
        Res::Pools,
        NS,
        pool("qwen", &[("app", "vllm")], &[8000, 8001]),
    );
    expect_names(&picker.datastore, &["vllm-a-8000", "vllm-a-8001"]).await;
    let (code, _) = http_get(h, "/readyz").await;
    assert_eq!(code, 200);
    let (_, expo) = http_get(m, "/metrics").await;
    assert_eq!(
        pods_discovered(&expo),
        vec![r#"epp_pods_discovered{namespace="llm-d",label_selector="app=vllm"} 2"#]
    );

    api.apply(
        Res::Pods,
        NS,
        pod("vllm-b", "127.0.0.32", true, &[("app", "vllm")]),
    );
    expect_names(
        &picker.datastore,
        &["vllm-a-8000", "vllm-a-8001", "vllm-b-8000", "vllm-b-8001"],
    )
    .await;
    let (_, expo) = http_get(m, "/metrics").await;
    assert_eq!(
        pods_discovered(&expo),
        vec![r#"epp_pods_discovered{namespace="llm-d",label_selector="app=vllm"} 4"#]
    );

    set_ready(&api, "vllm-a", false);
    set_ready(&api, "vllm-b", false);
    expect_names(&picker.datastore, &[]).await;
    let (_, expo) = http_get(m, "/metrics").await;
    assert_eq!(
        pods_discovered(&expo),
        vec![r#"epp_pods_discovered{namespace="llm-d",label_selector="app=vllm"} 0"#]
    );
    let (code, why) = http_get(h, "/readyz").await;
    assert_eq!(code, 503);
    assert!(why.contains("no endpoints"), "{why}");
    picker.shutdown.trigger();
    picker.join().await;
}

#[tokio::test]
async fn kubeconfig_file_is_honoured_and_a_bad_one_is_named() {
    let api = FakeApi::start();
    api.apply(
        Res::Pods,
        NS,
        pod("vllm-k", "127.0.0.41", true, &[("app", "vllm")]),
    );
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("kubeconfig");
    std::fs::write(
        &path,
        format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: fake\n  cluster: {{server: {}}}\n\
             users:\n- name: u\n  user: {{token: test-token}}\n\
             contexts:\n- name: c\n  context: {{cluster: fake, user: u, namespace: {NS}}}\n\
             current-context: c\n",
            api.url()
        ),
    )
    .unwrap();
    let ds = DatastoreWriter::new(HealthConfig::default());
    let sd = Shutdown::new();
    let d = KubeDiscovery {
        client: epp_core::k8s::KubeClient::infer(Some(path)),
        source: PodSource::Selector {
            namespace: NS.into(),
            selector: LabelSelector::parse("app=vllm").unwrap(),
            ports: vec![8000],
        },
    };
    let ds = {
        let writer = ds;
        let reader = writer.reader();
        tokio::spawn(d.follow(writer, sd.clone()));
        reader
    };
    wait_synced(&ds).await;
    expect_names(&ds, &["vllm-k"]).await;
    sd.trigger();

    let missing = epp_core::k8s::KubeClient::infer(Some(dir.path().join("nope")));
    let e = missing.get().await.err().unwrap().to_string();
    assert!(e.contains("--kubeconfig"), "{e}");
}

/// `--endpoint-selector` with set-based and existence requirements: the watch sends the
/// selector to the API server as given, and only matching pods become endpoints.
#[tokio::test]
async fn set_based_selectors_select_as_the_api_server_does() {
    let api = FakeApi::start();
    for (name, ip, labels) in [
        (
            "prod-a",
            "127.0.0.21",
            vec![("app", "vllm"), ("env", "prod")],
        ),
        (
            "stage-b",
            "127.0.0.22",
            vec![("app", "vllm"), ("env", "staging")],
        ),
        ("dev-c", "127.0.0.23", vec![("app", "vllm"), ("env", "dev")]),
        (
            "old-d",
            "127.0.0.24",
            vec![("app", "vllm"), ("env", "prod"), ("deprecated", "true")],
        ),
        ("web-e", "127.0.0.25", vec![("app", "web"), ("env", "prod")]),
    ] {
        api.apply(Res::Pods, NS, pod(name, ip, true, &labels));
    }
    let selector = LabelSelector::parse("app=vllm,env in (prod,staging),!deprecated").unwrap();
    let (ds, _sd) = start(
        &api,
        PodSource::Selector {
            namespace: NS.into(),
            selector,
            ports: vec![8000],
        },
    );
    wait_synced(&ds).await;
    expect_names(&ds, &["prod-a", "stage-b"]).await;
    assert_eq!(
        ds.discovery_labels(),
        (
            NS.to_string(),
            "app=vllm,!deprecated,env in (prod,staging)".to_string()
        )
    );
    // The API server was asked with that selector.
    assert!(
        api.requests()
            .iter()
            .any(|r| r.contains("labelSelector=") && r.contains("deprecated")),
        "{:?}",
        api.requests()
    );
    // A pod relabelled into the set joins; one marked deprecated leaves.
    api.modify(Res::Pods, NS, "dev-c", |p| {
        p["metadata"]["labels"]["env"] = json!("staging")
    });
    expect_names(&ds, &["dev-c", "prod-a", "stage-b"]).await;
    api.modify(Res::Pods, NS, "prod-a", |p| {
        p["metadata"]["labels"]["deprecated"] = json!("yes")
    });
    expect_names(&ds, &["dev-c", "stage-b"]).await;
}

//! The config's data layer drives the real scraper: a `metrics-data-source` over HTTPS (a
//! self-signed model server, `insecureSkipVerify`), on another path and port, read with a
//! custom engine's series chosen by the endpoint's `llm-d.ai/engine-type` label; and a config
//! that disables metrics collection leaves endpoints routable without any scrape.
//!
//! `cargo test -p epp-core --test scrape_datalayer`. Everything binds 127.0.0.1.

use std::time::{Duration, Instant};

use epp_core::config::EndpointPickerConfig;
use epp_core::datalayer::{DataLayer, MetricsFlags};
use epp_core::datastore::{DatastoreWriter, EndpointSpec, HealthConfig, HealthState};
use epp_core::scrape::{client_for, ScrapeOptions};
use epp_core::telemetry::Shutdown;
use epp_core::tls::{TlsPort, TlsSettings};

const EXPOSITION: &str = "# TYPE my_queue gauge\n\
my_queue{tier=\"gold\"} 7\n\
my_queue{tier=\"free\"} 100\n\
# TYPE my_running gauge\n\
my_running 3\n\
# TYPE my_kv gauge\n\
my_kv 0.25\n";

fn config(yaml: &str) -> DataLayer {
    let cfg = EndpointPickerConfig::from_yaml(&format!(
        "apiVersion: llm-d.ai/v1alpha1\nkind: EndpointPickerConfig\n{yaml}"
    ))
    .unwrap();
    DataLayer::from_config(&cfg).unwrap()
}

/// An HTTPS server with a self-signed certificate answering `GET path` with `body`.
async fn https_metrics(path: &'static str, body: &'static str, shutdown: Shutdown) -> u16 {
    let setup = TlsSettings::default().setup(TlsPort::METRICS).unwrap();
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = l.local_addr().unwrap().port();
    let listener = setup.serve_listener(l, shutdown.clone());
    let app = axum::Router::new().route(path, axum::routing::get(move || async move { body }));
    tokio::spawn(async move {
        let _ = axum::serve(listener, app)
            .with_graceful_shutdown(shutdown.wait())
            .await;
    });
    port
}

/// The scraper over `ds` with `data`'s metrics pipeline, every 50 ms, no probes.
fn spawn_scraper(ds: &DatastoreWriter, data: &DataLayer, shutdown: &Shutdown) {
    let client = client_for(data.metrics.as_ref().map(|m| &m.source)).unwrap();
    tokio::spawn(epp_core::scrape::run(
        ds.health_sink(),
        ScrapeOptions {
            interval: Duration::from_millis(50),
            probe_interval: None,
            ..Default::default()
        },
        data.metrics.clone(),
        client,
        shutdown.clone(),
    ));
}

async fn wait_for(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn https_source_custom_engine_and_metrics_port_are_scraped_as_configured() {
    let shutdown = Shutdown::new();
    let port = https_metrics("/stats", EXPOSITION, shutdown.clone()).await;
    let mut data = config(
        "plugins:\n\
         - name: scrape\n  type: metrics-data-source\n  parameters:\n    scheme: https\n    path: /stats\n    insecureSkipVerify: true\n    interval: 50ms\n\
         - name: extract\n  type: core-metrics-extractor\n  parameters:\n    engineConfigs:\n    - name: mine\n      queuedRequestsSpec: my_queue{tier=gold}\n      runningRequestsSpec: my_running\n      kvUsageSpec: my_kv\n\
         dataLayer:\n  sources:\n  - pluginRef: scrape\n    extractors:\n    - pluginRef: extract\n",
    );
    // The endpoint serves on a port nothing listens on; its metrics are on `port`.
    data.apply(&MetricsFlags {
        port: Some(port),
        ..Default::default()
    })
    .unwrap();
    let ds = DatastoreWriter::new(HealthConfig {
        probe_enabled: false,
        ..Default::default()
    });
    let mut spec = EndpointSpec::new("127.0.0.1:1");
    spec.labels
        .insert("llm-d.ai/engine-type".into(), "mine".into());
    // A second endpoint without the label reads as the default engine (vLLM): its queue is 0.
    let plain = EndpointSpec::new("127.0.0.1:2");
    ds.set_endpoints(vec![spec, plain]);
    ds.mark_synced();
    let reader = ds.reader();
    spawn_scraper(&ds, &data, &shutdown);
    wait_for("the custom engine's series", || {
        reader.snapshot().endpoints.iter().any(|e| {
            e.endpoint.address() == "127.0.0.1:1"
                && e.health == HealthState::Healthy
                && e.metrics.as_ref().is_some_and(|m| m.waiting_queue == 7.0)
        })
    })
    .await;
    let snap = reader.snapshot();
    let mine = snap
        .endpoints
        .iter()
        .find(|e| e.endpoint.address() == "127.0.0.1:1")
        .unwrap();
    let m = mine.metrics.as_ref().unwrap();
    // Only the `tier=gold` series counts; running and KV come from the custom names.
    assert_eq!(
        (m.waiting_queue, m.running, m.kv_cache_usage),
        (7.0, 3.0, 0.25)
    );
    wait_for("the default engine's read", || {
        reader
            .snapshot()
            .endpoints
            .iter()
            .any(|e| e.endpoint.address() == "127.0.0.1:2" && e.metrics.is_some())
    })
    .await;
    let snap = reader.snapshot();
    let plain = snap
        .endpoints
        .iter()
        .find(|e| e.endpoint.address() == "127.0.0.1:2")
        .unwrap();
    let m = plain.metrics.as_ref().unwrap();
    assert_eq!((m.waiting_queue, m.running), (0.0, 0.0));
    shutdown.trigger();
}

#[tokio::test]
async fn an_http_source_against_a_tls_model_server_fails_its_scrapes() {
    let shutdown = Shutdown::new();
    let port = https_metrics("/metrics", EXPOSITION, shutdown.clone()).await;
    // The default source speaks http: a TLS server does not answer it, so scrapes fail.
    let data = config("");
    let ds = DatastoreWriter::new(HealthConfig {
        probe_enabled: false,
        failure_threshold: 1,
        ..Default::default()
    });
    ds.set_endpoints(vec![EndpointSpec::new(format!("127.0.0.1:{port}"))]);
    ds.mark_synced();
    let reader = ds.reader();
    spawn_scraper(&ds, &data, &shutdown);
    wait_for("the failed scrapes to mark it unhealthy", || {
        reader
            .snapshot()
            .endpoints
            .iter()
            .all(|e| e.health == HealthState::Unhealthy)
    })
    .await;
    shutdown.trigger();
}

#[tokio::test]
async fn a_config_without_metrics_collection_routes_on_probes_alone() {
    let data = config("dataLayer:\n  injectDefaults: false\n");
    assert!(data.metrics.is_none());
    // Nothing to scrape: endpoints are never stale, so they are routable at once.
    let ds = DatastoreWriter::new(HealthConfig {
        probe_enabled: false,
        scrape_enabled: false,
        ..Default::default()
    });
    ds.set_endpoints(vec![EndpointSpec::new("127.0.0.1:1")]);
    ds.mark_synced();
    ds.tick();
    let snap = ds.reader().snapshot();
    assert_eq!(snap.endpoints[0].health, HealthState::Healthy);
    assert!(snap.endpoints[0].metrics.is_none());
    // A metrics flag on top of a config that collects none is refused.
    let mut d = data.clone();
    let e = d
        .apply(&MetricsFlags {
            path: Some("/m".into()),
            ..Default::default()
        })
        .unwrap_err();
    assert!(e.contains("disables metrics collection"), "{e}");
}

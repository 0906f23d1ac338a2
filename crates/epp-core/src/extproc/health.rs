//! gRPC health for `epp serve`: `liveness` always serving; `readiness` and the ext_proc service
//! name following the runtime's readiness (discovery synced, endpoints known, leader if HA).

use std::sync::Arc;

use super::SERVICE_NAME;
use crate::datastore::Datastore;
use crate::telemetry::Shutdown;

/// Whether the picker can take traffic (the same rule as the HTTP `/readyz` probe).
pub fn is_ready(ds: &Datastore) -> bool {
    crate::app::readiness(ds).is_ok()
}

/// The health service GAIE's and llm-d-router's charts probe for liveness and readiness of a
/// single replica: serving once discovery has synced (an empty pool is not a reason to restart
/// the picker), not while draining.
pub const GAIE_SERVICE: &str = "inference-extension";

/// Keep the gRPC health services in step with readiness: `liveness` is always SERVING;
/// `readiness` and the ext_proc service follow `ready`, and [`GAIE_SERVICE`] follows it too.
/// Runs until `stop` resolves.
pub async fn run_health(
    reporter: tonic_health::server::HealthReporter,
    ready: ReadyProbe,
    changes: tokio::sync::watch::Receiver<u64>,
    stop: impl std::future::Future<Output = ()>,
) {
    run_health_with(reporter, ready.clone(), ready, changes, stop).await
}

/// As [`run_health`], with [`GAIE_SERVICE`] following `synced` (discovery synced, leader if
/// HA, not draining) instead of full readiness.
pub async fn run_health_with(
    reporter: tonic_health::server::HealthReporter,
    ready: ReadyProbe,
    synced: ReadyProbe,
    mut changes: tokio::sync::watch::Receiver<u64>,
    stop: impl std::future::Future<Output = ()>,
) {
    use tonic_health::ServingStatus;
    reporter
        .set_service_status("liveness", ServingStatus::Serving)
        .await;
    reporter
        .set_service_status("", ServingStatus::Serving)
        .await;
    let status = |ok: bool| {
        if ok {
            ServingStatus::Serving
        } else {
            ServingStatus::NotServing
        }
    };
    let mut last = None;
    let mut last_synced = None;
    tokio::pin!(stop);
    loop {
        let ready = ready();
        if last != Some(ready) {
            reporter
                .set_service_status("readiness", status(ready))
                .await;
            reporter
                .set_service_status(SERVICE_NAME, status(ready))
                .await;
            last = Some(ready);
        }
        let synced = synced();
        if last_synced != Some(synced) {
            reporter
                .set_service_status(GAIE_SERVICE, status(synced))
                .await;
            last_synced = Some(synced);
        }
        // Sync and leadership change without a notification, so also poll once a second.
        tokio::select! {
            _ = &mut stop => break,
            _ = changes.changed() => {}
            _ = tokio::time::sleep(std::time::Duration::from_secs(1)) => {}
        }
    }
    for s in ["liveness", "readiness", SERVICE_NAME, GAIE_SERVICE, ""] {
        reporter
            .set_service_status(s, ServingStatus::NotServing)
            .await;
    }
}

/// Serve gRPC health (`grpc.health.v1.Health`) on `listener`, following readiness of `ds`.
pub async fn serve_health(
    ds: Datastore,
    listener: tokio::net::TcpListener,
    shutdown: Shutdown,
) -> Result<(), tonic::transport::Error> {
    let changes = ds.subscribe();
    let ready: ReadyProbe = Arc::new(move || is_ready(&ds));
    serve_health_with(ready, changes, listener, shutdown).await
}

/// Readiness as the gRPC health server sees it.
pub type ReadyProbe = Arc<dyn Fn() -> bool + Send + Sync>;

/// As [`serve_health`], with any readiness rule (e.g. the runtime's, which includes
/// leadership); `changes` wakes the reporter early when the endpoint set changes.
pub async fn serve_health_with(
    ready: ReadyProbe,
    changes: tokio::sync::watch::Receiver<u64>,
    listener: tokio::net::TcpListener,
    shutdown: Shutdown,
) -> Result<(), tonic::transport::Error> {
    serve_health_probes(ready.clone(), ready, changes, listener, shutdown).await
}

/// As [`serve_health_with`], with [`GAIE_SERVICE`] following `synced`.
pub async fn serve_health_probes(
    ready: ReadyProbe,
    synced: ReadyProbe,
    changes: tokio::sync::watch::Receiver<u64>,
    listener: tokio::net::TcpListener,
    shutdown: Shutdown,
) -> Result<(), tonic::transport::Error> {
    let (reporter, health) = tonic_health::server::health_reporter();
    let reporting = tokio::spawn(run_health_with(
        reporter,
        ready,
        synced,
        changes,
        shutdown.wait(),
    ));
    let stop = shutdown.wait();
    let incoming = tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true));
    let served = tonic::transport::Server::builder()
        .add_service(health)
        .serve_with_incoming_shutdown(incoming, stop)
        .await;
    // The reporter stops on the same signal; wait so its readiness probe is released.
    let _ = reporting.await;
    served
}

//! The ext_proc gRPC server: the tonic service that runs one [`Exchange`] per stream, answering
//! as tonic polls (no task or channel hop between a message and its answers), plain or TLS
//! listeners, and `epp serve`'s start-up (validate, bind, serve, drain within the grace period).

use std::net::SocketAddr;
use std::sync::Arc;

use envoy_types::pb::envoy::service::ext_proc::v3::external_processor_server::{
    ExternalProcessor, ExternalProcessorServer,
};
use envoy_types::pb::envoy::service::ext_proc::v3::{ProcessingRequest, ProcessingResponse};
use tokio_stream::Stream;
use tonic::{Request, Response, Status, Streaming};

use super::exchange::Exchange;
use super::health::{serve_health_probes, ReadyProbe};
use super::ExtProcConfig;
use crate::app::{serve_within_grace, FrontEndHandle, Runtime, RuntimeOptions, StartError};
use crate::director::Director;
use crate::serving;
use crate::telemetry::Shutdown;
use crate::tls::{TlsPort, TlsSettings, TlsSetup};

/// The `ExternalProcessor` implementation. Cheap to clone.
#[derive(Clone, Debug)]
pub struct ExtProcService {
    director: Director,
    cfg: Arc<ExtProcConfig>,
    streams: Arc<tokio::sync::Semaphore>,
    /// `grpc.health.v1.Health` served beside ext_proc on the same port (gateways such as the
    /// llm-d-router chart's Envoy health-check the ext_proc cluster there).
    health: Option<HealthServer<tonic_health::server::HealthService>>,
}

type HealthServer<T> = tonic_health::pb::health_server::HealthServer<T>;

impl ExtProcService {
    pub fn new(director: Director, cfg: ExtProcConfig) -> Self {
        Self {
            director,
            streams: Arc::new(tokio::sync::Semaphore::new(cfg.max_streams.max(1))),
            cfg: Arc::new(cfg),
            health: None,
        }
    }

    /// Also serve this gRPC health service on the ext_proc port.
    pub fn with_health(
        mut self,
        health: HealthServer<tonic_health::server::HealthService>,
    ) -> Self {
        self.health = Some(health);
        self
    }

    /// The tonic service, ready to add to a server. One `ProcessingRequest` carries whatever
    /// chunk Envoy buffered, so the receive limit defaults to the body limit plus 1 MiB
    /// (`--grpc-max-recv-msg-size` sets it).
    pub fn into_server(self) -> ExternalProcessorServer<Self> {
        let recv = self
            .cfg
            .max_recv_msg_bytes
            .unwrap_or_else(|| self.cfg.max_body_bytes.saturating_add(1 << 20));
        let send = self.cfg.max_send_msg_bytes.unwrap_or(usize::MAX);
        ExternalProcessorServer::new(self)
            .max_decoding_message_size(recv)
            .max_encoding_message_size(send)
    }
}

#[tonic::async_trait]
impl ExternalProcessor for ExtProcService {
    type ProcessStream = ProcessStream;

    async fn process(
        &self,
        request: Request<Streaming<ProcessingRequest>>,
    ) -> Result<Response<Self::ProcessStream>, Status> {
        let Ok(permit) = self.streams.clone().try_acquire_owned() else {
            return Err(Status::resource_exhausted(format!(
                "the picker already serves its limit of {} concurrent ext_proc streams \
                 (--max-concurrent-streams)",
                self.cfg.max_streams
            )));
        };
        let exchange = Exchange::new(self.director.clone(), self.cfg.clone());
        Ok(Response::new(answers(
            request.into_inner(),
            exchange,
            permit,
            self.cfg.stream_idle_timeout,
        )))
    }
}

/// The answers of one stream, produced as tonic polls for them (no extra task or channel
/// between the inbound messages and the outbound answers).
pub type ProcessStream =
    std::pin::Pin<Box<dyn Stream<Item = Result<ProcessingResponse, Status>> + Send + 'static>>;

struct Pump {
    inbound: Streaming<ProcessingRequest>,
    exchange: Exchange,
    pending: std::collections::VecDeque<ProcessingResponse>,
    over: bool,
    /// Held for the stream's life: one of `--max-concurrent-streams`.
    _permit: tokio::sync::OwnedSemaphorePermit,
    idle_timeout: std::time::Duration,
}

/// Read a message, answer it, until the exchange ends, the gateway goes away, or a protocol
/// violation ends the stream with an error status. When tonic drops the stream (the gateway
/// reset it, the client went away) the exchange is dropped with it, which releases the
/// in-flight count (counted as 499 unless the response completed).
fn answers(
    inbound: Streaming<ProcessingRequest>,
    exchange: Exchange,
    permit: tokio::sync::OwnedSemaphorePermit,
    idle_timeout: std::time::Duration,
) -> ProcessStream {
    let pump = Pump {
        inbound,
        exchange,
        pending: std::collections::VecDeque::new(),
        over: false,
        _permit: permit,
        idle_timeout,
    };
    Box::pin(futures_util::stream::unfold(pump, |mut p| async move {
        loop {
            if let Some(r) = p.pending.pop_front() {
                return Some((Ok(r), p));
            }
            if p.over {
                return None;
            }
            // While the request is still arriving, a gateway that stops sending is cut off; once
            // it was answered, the wait for the model's response is bounded by the gateway.
            let next = if p.exchange.request_open() {
                match tokio::time::timeout(p.idle_timeout, p.inbound.message()).await {
                    Ok(r) => r,
                    Err(_) => {
                        tracing::debug!(timeout = ?p.idle_timeout, "ext_proc request stalled, ending the stream");
                        p.over = true;
                        return Some((
                            Err(Status::deadline_exceeded(format!(
                                "no ext_proc message for {:?} while the request was incomplete \
                                 (--stream-idle-timeout)",
                                p.idle_timeout
                            ))),
                            p,
                        ));
                    }
                }
            } else {
                p.inbound.message().await
            };
            let msg = match next {
                Ok(Some(m)) => m,
                Ok(None) => return None,
                Err(status) if is_decode_error(&status) => {
                    tracing::warn!(error = %status.message(), "undecodable ext_proc message, ending the stream");
                    p.over = true;
                    return Some((
                        Err(Status::invalid_argument(format!(
                            "ext_proc protocol violation: undecodable message: {}",
                            status.message()
                        ))),
                        p,
                    ));
                }
                Err(status) => {
                    tracing::debug!(code = ?status.code(), "ext_proc stream ended by the gateway");
                    return None;
                }
            };
            match p.exchange.handle(msg).await {
                Ok(out) => {
                    p.pending.extend(out);
                    p.over = p.exchange.finished();
                }
                Err(status) => {
                    tracing::warn!(error = %status.message(), "ext_proc protocol violation, ending the stream");
                    p.over = true;
                    return Some((Err(status), p));
                }
            }
        }
    }))
}

/// Serve the ext_proc service on `listener` until `stop` resolves (in-flight streams are
/// given until they end; callers bound that with their grace period).
pub async fn serve(
    service: ExtProcService,
    listener: tokio::net::TcpListener,
    stop: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<(), tonic::transport::Error> {
    let incoming = tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true));
    let health = service.health.clone();
    tonic::transport::Server::builder()
        .http2_keepalive_interval(Some(std::time::Duration::from_secs(30)))
        .add_service(service.into_server())
        .add_optional_service(health)
        .serve_with_incoming_shutdown(incoming, stop)
        .await
}

/// As [`serve`], terminating TLS first (`--secure-serving`) with the accept loop and
/// certificate reloading the metrics port uses too ([`crate::tls`]); until `shutdown`.
pub async fn serve_tls(
    service: ExtProcService,
    listener: tokio::net::TcpListener,
    tls: TlsSetup,
    shutdown: Shutdown,
) -> Result<(), tonic::transport::Error> {
    let incoming = tls
        .serve_listener(listener, shutdown.clone())
        .into_incoming();
    let health = service.health.clone();
    tonic::transport::Server::builder()
        .http2_keepalive_interval(Some(std::time::Duration::from_secs(30)))
        .add_service(service.into_server())
        .add_optional_service(health)
        .serve_with_incoming_shutdown(incoming, shutdown.wait())
        .await
}

/// Everything `epp serve` needs: the shared picker runtime plus the two gRPC listeners.
#[derive(Clone, Debug)]
pub struct ServeOptions {
    pub grpc_addr: SocketAddr,
    pub grpc_health_addr: SocketAddr,
    pub extproc: ExtProcConfig,
    /// TLS on the ext_proc port (`--secure-serving`; files, or neither for self-signed);
    /// `None` = plaintext h2c.
    pub tls: Option<TlsSettings>,
    pub picker: RuntimeOptions,
}

/// `epp serve`'s own listen addresses (read through [`ServeHandle`], e.g. `handle.grpc_addr`).
#[derive(Clone, Copy, Debug)]
pub struct ServeAddrs {
    pub grpc_addr: SocketAddr,
    pub grpc_health_addr: SocketAddr,
}

/// A running `epp serve` (used by the CLI and tests).
pub type ServeHandle = FrontEndHandle<ServeAddrs>;

/// Validate, start the picker runtime, bind both gRPC listeners and serve in the background
/// until `shutdown` fires.
pub async fn spawn_with_shutdown(
    opts: ServeOptions,
    shutdown: Shutdown,
) -> Result<ServeHandle, StartError> {
    if opts.extproc.stream_idle_timeout.is_zero() {
        return Err(StartError::invalid(
            "--stream-idle-timeout must be greater than 0",
        ));
    }
    if opts.extproc.max_body_bytes == 0 {
        return Err(StartError::invalid(
            "--max-body-bytes must be greater than 0",
        ));
    }
    // Certificate errors (naming --cert-path/--key-path and the file) before binding anything.
    let tls = opts
        .tls
        .as_ref()
        .map(|t| t.setup(TlsPort::GRPC))
        .transpose()?;
    let validated = opts.picker.validate()?;
    let picker = Runtime::start(opts.picker.clone(), validated, shutdown.clone()).await?;
    if let Some(t) = &tls {
        picker.metrics.watch_certificate(t.status());
    }
    let grpc = serving::bind(opts.grpc_addr, "--grpc-port").await?;
    let grpc_addr = grpc.local_addr()?;
    let health = serving::bind(opts.grpc_health_addr, "--grpc-health-port").await?;
    let grpc_health_addr = health.local_addr()?;
    tracing::info!(
        grpc = %grpc_addr,
        grpc_health = %grpc_health_addr,
        tls = tls.as_ref().map_or("off", |t| t.describe()),
        test_hooks = opts.extproc.test_hooks,
        fallbacks = opts.extproc.fallbacks,
        max_body_bytes = opts.extproc.max_body_bytes,
        max_concurrent_streams = opts.extproc.max_streams,
        stream_idle_timeout = ?opts.extproc.stream_idle_timeout,
        "ext_proc server listening"
    );
    let mut service = ExtProcService::new(picker.director.clone(), opts.extproc.clone());
    let grace = opts.picker.grace_period;
    // gRPC readiness is the runtime's (datastore synced, endpoints known, leader if HA).
    let changes = picker.datastore.subscribe();
    let picker = Arc::new(picker);
    let ready: ReadyProbe = {
        let p = picker.clone();
        Arc::new(move || p.is_ready().is_ok())
    };
    let synced: ReadyProbe = {
        let p = picker.clone();
        Arc::new(move || p.is_synced())
    };
    let addrs = ServeAddrs {
        grpc_addr,
        grpc_health_addr,
    };
    // The same health services on the ext_proc port, following the same readiness.
    let reporter = tonic_health::server::HealthReporter::new();
    let main_port_health = HealthServer::new(
        tonic_health::server::HealthService::from_health_reporter(reporter.clone()),
    );
    let main_health_task = tokio::spawn(super::health::run_health_with(
        reporter,
        ready.clone(),
        synced.clone(),
        changes.clone(),
        shutdown.wait(),
    ));
    service = service.with_health(main_port_health);
    let run = move |picker: Arc<Runtime>| async move {
        let health_task = tokio::spawn(serve_health_probes(
            ready,
            synced,
            changes,
            health,
            shutdown.clone(),
        ));
        let server: std::pin::Pin<
            Box<dyn std::future::Future<Output = Result<(), tonic::transport::Error>> + Send>,
        > = match tls {
            Some(tls) => Box::pin(serve_tls(service, grpc, tls, shutdown.clone())),
            None => Box::pin(serve(service, grpc, shutdown.wait())),
        };
        let server = async move {
            if let Err(e) = server.await {
                tracing::error!(error = %e, "ext_proc server failed");
            }
        };
        serve_within_grace(server, &shutdown, grace, "streams").await;
        let _ = tokio::time::timeout(grace, health_task).await;
        let _ = tokio::time::timeout(grace, main_health_task).await;
        match Arc::try_unwrap(picker) {
            Ok(p) => p.join().await,
            Err(p) => {
                p.stop_probes();
                tracing::warn!("gRPC health server still running; not waiting for background tasks")
            }
        }
        tracing::info!("ext_proc server stopped");
    };
    Ok(FrontEndHandle::spawn(addrs, picker, run))
}

/// tonic reports bytes that are not a `ProcessingRequest` as an INTERNAL status from its
/// decoder; that is the gateway's error, not ours.
fn is_decode_error(status: &Status) -> bool {
    status.code() == tonic::Code::Internal && status.message().contains("decode")
}

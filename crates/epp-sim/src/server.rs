//! Listening and connection management for one simulated server: the accept loop, connection
//! refusal (closing and re-binding the listener), and graceful shutdown with a grace period.
//!
//! Serving is done with hyper directly rather than `axum::serve` because refusal needs to close
//! the listener and ask open connections to finish, and shutdown needs a bounded wait.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinSet;
use tower::ServiceExt as _;

use crate::api::{self, App};
use crate::config::{ConfigError, SimConfig};
use crate::engine::{Engine, EngineSnapshot};
use crate::faults::FaultHandle;
use crate::kv_events::{self, KvEventsHandle};
use crate::tokenizer::Tokenizer;

/// A running simulated server. Dropping it stops accepting (without waiting);
/// [`SimServer::shutdown`] also waits for in-flight requests.
pub struct SimServer {
    addr: SocketAddr,
    name: String,
    rank: usize,
    faults: FaultHandle,
    engine: Arc<Engine>,
    kv_events: Option<KvEventsHandle>,
    shutdown: watch::Sender<bool>,
    task: Option<tokio::task::JoinHandle<()>>,
    /// What [`SimServer::restart`] starts again.
    cfg: SimConfig,
    tokenizer: Tokenizer,
}

impl std::fmt::Debug for SimServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SimServer")
            .field("name", &self.name)
            .field("addr", &self.addr)
            .finish()
    }
}

/// Validate `cfg`, load its tokenizer, bind `listen` (port 0 = ephemeral) and start serving.
/// An invalid setting or tokenizer file is a [`ConfigError`] naming the flag.
pub async fn spawn(cfg: SimConfig, listen: SocketAddr) -> anyhow::Result<SimServer> {
    cfg.validate()?;
    let tokenizer = load_tokenizer(&cfg)?;
    spawn_with(cfg, listen, tokenizer).await
}

/// The tokenizer `cfg` names, or a [`ConfigError`] naming `--tokenizer` and the file.
pub(crate) fn load_tokenizer(cfg: &SimConfig) -> Result<Tokenizer, ConfigError> {
    Tokenizer::load(cfg.tokenizer.as_deref()).map_err(|e| ConfigError {
        flag: "--tokenizer",
        message: e.to_string(),
    })
}

/// [`spawn`] with the tokenizer already loaded (shared by the servers of [`crate::spawn_many`]).
pub(crate) async fn spawn_with(
    cfg: SimConfig,
    listen: SocketAddr,
    tokenizer: Tokenizer,
) -> anyhow::Result<SimServer> {
    cfg.validate()?;
    let listener = TcpListener::bind(listen)
        .await
        .with_context(|| format!("{}: cannot listen on {listen}", cfg.name))?;
    let addr = listener.local_addr()?;
    let (shutdown, shutdown_rx) = watch::channel(false);
    // Connected to a central socket, the topic names this server as the picker knows it.
    let pod_id = match &cfg.kv_transfer.host {
        Some(h) => format!("{h}:{}", addr.port()),
        None => {
            let ip = match addr.ip() {
                IpAddr::V4(ip) if ip.is_unspecified() => IpAddr::V4(Ipv4Addr::LOCALHOST),
                IpAddr::V6(ip) if ip.is_unspecified() => IpAddr::V6(Ipv6Addr::LOCALHOST),
                ip => ip,
            };
            SocketAddr::new(ip, addr.port()).to_string()
        }
    };
    let (sink, kv_events) = match kv_events::start(
        &cfg.kv_events,
        epp_core::kvevents::topic_for(&cfg.name, &cfg.model),
        epp_core::kvevents::topic_for(&pod_id, &cfg.model),
        i64::try_from(cfg.data_parallel_rank).unwrap_or(i64::MAX),
        shutdown_rx.clone(),
    )
    .await
    .with_context(|| format!("{}: KV events", cfg.name))?
    {
        Some((sink, handle)) => (Some(sink), Some(handle)),
        None => (None, None),
    };
    let engine = Engine::with_kv_events(&cfg, sink);
    let faults = FaultHandle::new(cfg.faults.clone());
    let name = cfg.name.clone();
    let rank = cfg.data_parallel_rank;
    let grace = cfg.shutdown_grace;
    let transfer_host = cfg
        .kv_transfer
        .host
        .clone()
        .unwrap_or_else(|| match addr.ip() {
            IpAddr::V4(ip) if ip.is_unspecified() => Ipv4Addr::LOCALHOST.to_string(),
            IpAddr::V6(ip) if ip.is_unspecified() => Ipv6Addr::LOCALHOST.to_string(),
            ip => ip.to_string(),
        });
    let app = Arc::new(App {
        transfer_host,
        port: addr.port(),
        lora_names: cfg.lora_names(),
        engine: engine.clone(),
        faults: faults.clone(),
        created: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0),
        next_id: AtomicU64::new(0),
        tokenizer: tokenizer.clone(),
        cfg: cfg.clone(),
    });
    let router = api::router(app);
    let task = tokio::spawn(accept_loop(
        listener,
        addr,
        router,
        faults.clone(),
        shutdown_rx,
        grace,
        name.clone(),
    ));
    Ok(SimServer {
        addr,
        name,
        rank,
        faults,
        engine,
        kv_events,
        shutdown,
        task: Some(task),
        cfg,
        tokenizer,
    })
}

impl SimServer {
    /// The bound address (with the real port when 0 was asked for).
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The server's name (`x-inference-pod`).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The engine's data-parallel rank (`x-data-parallel-rank`; 0 without data parallelism).
    pub fn data_parallel_rank(&self) -> usize {
        self.rank
    }

    /// The `remote_engine_id` of this engine's P/D prefill answers.
    pub fn engine_id(&self) -> &str {
        self.engine.engine_id()
    }

    /// Failure injection; the same state the admin endpoint changes.
    pub fn faults(&self) -> FaultHandle {
        self.faults.clone()
    }

    /// The KV-event publisher, when `--kv-events-endpoint` is set.
    pub fn kv_events(&self) -> Option<&KvEventsHandle> {
        self.kv_events.as_ref()
    }

    /// Current engine state (queue, running, cache).
    pub fn snapshot(&self) -> EngineSnapshot {
        self.engine.snapshot()
    }

    /// The `/metrics` text, without going through HTTP.
    pub fn metrics_text(&self) -> String {
        self.engine.render_metrics()
    }

    /// The server restarted, as a vLLM process would be: [`SimServer::shutdown`], then a fresh
    /// engine with the same configuration on the same address and KV-event sockets (an empty
    /// cache, counters from zero, KV-event sequence numbers from 0). The old sockets close
    /// asynchronously, so binding is retried for up to 5 s.
    pub async fn restart(self) -> anyhow::Result<SimServer> {
        let (cfg, addr, tokenizer) = (self.cfg.clone(), self.addr, self.tokenizer.clone());
        self.shutdown().await;
        let mut last = None;
        for _ in 0..100 {
            match spawn_with(cfg.clone(), addr, tokenizer.clone()).await {
                Ok(s) => return Ok(s),
                Err(e) => last = Some(e),
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Err(last
            .unwrap_or_else(|| anyhow::anyhow!("no attempt made"))
            .context(format!("{}: cannot restart on {addr}", cfg.name)))
    }

    /// Stop accepting, let in-flight requests finish (up to the grace period), then return.
    pub async fn shutdown(mut self) {
        let _ = self.shutdown.send(true);
        if let Some(task) = self.task.take() {
            let _ = task.await;
        }
    }
}

impl Drop for SimServer {
    fn drop(&mut self) {
        let _ = self.shutdown.send(true);
    }
}

async fn accept_loop(
    listener: TcpListener,
    addr: SocketAddr,
    router: axum::Router,
    faults: FaultHandle,
    mut shutdown: watch::Receiver<bool>,
    grace: Duration,
    name: String,
) {
    let mut listener = Some(listener);
    let mut fault_changes = faults.subscribe();
    // Bumped to ask every open connection to finish its request and close.
    let (close_tx, _) = watch::channel(0u64);
    let mut conns = JoinSet::new();
    loop {
        if *shutdown.borrow() {
            break;
        }
        let (refusing, until) = faults.refusing();
        if refusing && listener.is_some() {
            listener = None;
            close_tx.send_modify(|v| *v += 1);
            tracing::info!(server = %name, %addr, "refusing connections (listener closed)");
        } else if !refusing && listener.is_none() {
            match TcpListener::bind(addr).await {
                Ok(l) => {
                    tracing::info!(server = %name, %addr, "accepting connections again");
                    listener = Some(l);
                }
                Err(e) => {
                    tracing::warn!(server = %name, %addr, error = %e, "cannot re-bind; retrying");
                    tokio::select! {
                        _ = shutdown.changed() => {}
                        _ = tokio::time::sleep(Duration::from_millis(100)) => {}
                    }
                    continue;
                }
            }
        }
        let refusal_end = until;
        tokio::select! {
            _ = shutdown.changed() => {}
            _ = fault_changes.changed() => {}
            _ = async { tokio::time::sleep_until(refusal_end.expect("guarded")).await }, if refusal_end.is_some() => {}
            res = async { listener.as_ref().expect("guarded").accept().await }, if listener.is_some() => {
                match res {
                    Ok((stream, _peer)) => {
                        let _ = stream.set_nodelay(true);
                        let router = router.clone();
                        let close_rx = close_tx.subscribe();
                        conns.spawn(serve_connection(stream, router, close_rx));
                    }
                    Err(e) => {
                        // E.g. EMFILE: back off instead of spinning.
                        tracing::warn!(server = %name, error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    }
                }
            }
            Some(_) = conns.join_next(), if !conns.is_empty() => {}
        }
    }
    drop(listener);
    close_tx.send_modify(|v| *v += 1);
    let in_flight = conns.len();
    if in_flight > 0 {
        tracing::info!(server = %name, connections = in_flight, grace_s = grace.as_secs_f64(), "waiting for open connections");
    }
    let drained =
        tokio::time::timeout(grace, async { while conns.join_next().await.is_some() {} }).await;
    if drained.is_err() {
        tracing::warn!(server = %name, remaining = conns.len(), "grace period over; closing remaining connections");
        conns.shutdown().await;
    }
    tracing::info!(server = %name, %addr, "stopped");
}

async fn serve_connection(
    stream: tokio::net::TcpStream,
    router: axum::Router,
    mut close: watch::Receiver<u64>,
) {
    let service = hyper::service::service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
        router.clone().oneshot(req.map(axum::body::Body::new))
    });
    let builder = auto::Builder::new(TokioExecutor::new());
    let conn = builder.serve_connection_with_upgrades(TokioIo::new(stream), service);
    tokio::pin!(conn);
    let mut closing = false;
    loop {
        tokio::select! {
            res = conn.as_mut() => {
                if let Err(e) = res {
                    tracing::debug!(error = %e, "connection ended with an error");
                }
                break;
            }
            changed = close.changed(), if !closing => {
                closing = true;
                if changed.is_ok() {
                    conn.as_mut().graceful_shutdown();
                }
            }
        }
    }
}

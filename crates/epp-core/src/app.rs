//! The picker runtime both modes share: one datastore, one prefix index, one scheduler, one
//! metrics registry and one director, plus the background tasks (discovery, scraping) and the
//! side servers (metrics, probes). `epp proxy` and `epp serve` start this, then add their own
//! front-end listener.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use crate::config::{presets, EndpointPickerConfig};
use crate::datastore::{Datastore, DatastoreWriter, EndpointSpec, HealthConfig};
use crate::director::Director;
use crate::discovery::{EndpointDiscovery, StaticDiscovery};
use crate::metrics::Metrics;
use crate::scheduler::Scheduler;
use crate::scrape::ScrapeOptions;
use crate::serving::{self, MetricsAuth, ReadyFn};
use crate::telemetry::Shutdown;

/// Why the picker could not start. Every message names the flag, field or file at fault, and
/// all of them surface before any port is bound, except a port that cannot be bound.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// A flag, configuration field or file is invalid.
    #[error("{0}")]
    Invalid(String),
    /// A listener could not be bound.
    #[error("{flag} {addr}: cannot listen: {source}")]
    Bind {
        flag: &'static str,
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    /// A certificate or key could not be used.
    #[error("{0}")]
    Tls(#[from] crate::tls::TlsError),
    /// The Kubernetes API could not be used (leader election).
    #[error("{0}")]
    Kubernetes(#[from] crate::k8s::KubeError),
    /// Another I/O failure while starting.
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

impl StartError {
    pub fn invalid(msg: impl Into<String>) -> Self {
        Self::Invalid(msg.into())
    }
}

/// Where endpoints come from (a static list or file, Kubernetes pods or an InferencePool).
pub type Discovery = Arc<dyn EndpointDiscovery>;

/// Everything the shared runtime needs. Build it, call [`RuntimeOptions::validate`] (before
/// binding anything), then [`Runtime::start`].
#[derive(Clone, Debug)]
pub struct RuntimeOptions {
    pub discovery: Discovery,
    pub config: EndpointPickerConfig,
    pub metrics_addr: Option<SocketAddr>,
    pub health_addr: Option<SocketAddr>,
    pub metrics_auth: MetricsAuth,
    pub scrape: ScrapeOptions,
    pub health: HealthConfig,
    /// How long in-flight work may take to finish after a shutdown signal.
    pub grace_period: Duration,
    /// Bytes of request bodies all requests together may buffer (503 past it).
    pub max_buffered_body_bytes: usize,
    /// HTTPS on the metrics port (probes stay plain).
    pub metrics_tls: Option<crate::tls::MetricsTls>,
    /// Only the holder of a Kubernetes Lease reports ready.
    pub leader_election: Option<crate::k8s::leader::LeaderElectionConfig>,
    /// Routing state shared with the other replicas through Redis (active-active, or a warm
    /// standby with leader election).
    pub shared_state: Option<crate::replication::SharedStateOptions>,
    /// `InferenceObjective`s given at start-up (`--inference-objective name=priority`).
    pub objectives: Vec<crate::admission::Objective>,
    /// Watch the pool's `InferenceObjective` resources (Kubernetes InferencePool mode).
    pub objective_watch: Option<crate::k8s::objectives::ObjectiveWatch>,
}

impl Default for RuntimeOptions {
    fn default() -> Self {
        Self {
            discovery: Arc::new(StaticDiscovery {
                poll_interval: Duration::from_secs(1),
                ..Default::default()
            }),
            config: EndpointPickerConfig::from_yaml(presets::DEFAULT).expect("preset parses"),
            metrics_addr: Some(([0, 0, 0, 0], 9090).into()),
            health_addr: Some(([0, 0, 0, 0], 8080).into()),
            metrics_auth: MetricsAuth::None,
            scrape: ScrapeOptions::default(),
            health: HealthConfig::default(),
            grace_period: crate::telemetry::DEFAULT_GRACE_PERIOD,
            max_buffered_body_bytes: crate::gateway::DEFAULT_MAX_BUFFERED_BODY_BYTES,
            metrics_tls: None,
            leader_election: None,
            shared_state: None,
            objectives: Vec::new(),
            objective_watch: None,
        }
    }
}

/// Validated pieces, ready to start.
pub struct Validated {
    scheduler: Scheduler,
    /// The `flowControl` section resolved (its detector also serves the legacy admission).
    flow: crate::admission::FlowSettings,
    initial: Vec<EndpointSpec>,
    /// The config's data layer with the flags applied.
    data: crate::datalayer::DataLayer,
    /// The scraper's client (its certificate files read now).
    scrape_client: crate::scrape::HttpClient,
    /// Metrics TLS with its certificate already loaded (file errors surface before binding).
    tls: Option<crate::tls::TlsSetup>,
    /// The shared-state client (URL and files checked; not connected yet).
    shared_state: Option<redis::Client>,
}

impl RuntimeOptions {
    /// Check everything that can be wrong before any port is bound.
    pub fn validate(&self) -> Result<Validated, StartError> {
        let scheduler = Scheduler::from_config(&self.config)
            .map_err(|e| StartError::invalid(format!("invalid EndpointPickerConfig: {e}")))?;
        let mut data = crate::datalayer::DataLayer::from_config(&self.config)
            .map_err(|e| StartError::invalid(format!("invalid EndpointPickerConfig: {e}")))?;
        let flow = crate::admission::FlowSettings::from_config(&self.config)
            .map_err(|e| StartError::invalid(format!("invalid EndpointPickerConfig: {e}")))?;
        data.apply(&self.scrape.overrides)
            .map_err(StartError::Invalid)?;
        let scrape_client = crate::scrape::client_for(data.metrics.as_ref().map(|m| &m.source))
            .map_err(|e| StartError::invalid(format!("metrics-data-source: {e}")))?;
        let initial = self.discovery.validate().map_err(StartError::Invalid)?;
        let tls = self
            .metrics_tls
            .as_ref()
            .map(|t| t.setup(crate::tls::TlsPort::METRICS))
            .transpose()?;
        if let Some(le) = &self.leader_election {
            le.validate().map_err(StartError::Invalid)?;
        }
        let shared_state = self
            .shared_state
            .as_ref()
            .map(|s| s.client())
            .transpose()
            .map_err(StartError::Invalid)?;
        if self.max_buffered_body_bytes == 0 {
            return Err(StartError::invalid(
                "--max-buffered-body-bytes must be greater than 0",
            ));
        }
        if self.scrape.interval.is_zero() {
            return Err(StartError::invalid(
                "--scrape-interval must be greater than 0",
            ));
        }
        Ok(Validated {
            scheduler,
            flow,
            initial,
            data,
            scrape_client,
            tls,
            shared_state,
        })
    }
}

/// A running picker runtime.
pub struct Runtime {
    pub director: Director,
    pub datastore: Datastore,
    pub metrics: Arc<Metrics>,
    pub metrics_addr: Option<SocketAddr>,
    pub health_addr: Option<SocketAddr>,
    pub shutdown: Shutdown,
    pub grace_period: Duration,
    tasks: Vec<tokio::task::JoinHandle<()>>,
    /// Stops the probe server, which outlives the drain.
    probes_stop: Shutdown,
    /// Extra readiness condition (e.g. leader election).
    extra_ready: Option<ReadyFn>,
}

impl std::fmt::Debug for Runtime {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Runtime")
            .field("metrics_addr", &self.metrics_addr)
            .field("health_addr", &self.health_addr)
            .finish_non_exhaustive()
    }
}

/// Readiness: discovery synced and at least one endpoint known.
pub fn readiness(ds: &Datastore) -> Result<(), String> {
    if !ds.is_synced() {
        return Err("discovery has not synced yet".into());
    }
    if ds.discovered_count() == 0 {
        return Err("no endpoints discovered".into());
    }
    Ok(())
}

impl Runtime {
    /// Build the shared state, bind the side servers and start background tasks.
    pub async fn start(
        opts: RuntimeOptions,
        validated: Validated,
        shutdown: Shutdown,
    ) -> Result<Self, StartError> {
        Self::start_with(opts, validated, shutdown, None).await
    }

    /// As [`start`](Self::start), with an extra readiness condition.
    pub async fn start_with(
        opts: RuntimeOptions,
        validated: Validated,
        shutdown: Shutdown,
        extra_ready: Option<ReadyFn>,
    ) -> Result<Self, StartError> {
        let Validated {
            scheduler,
            flow,
            initial,
            data,
            scrape_client,
            tls,
            shared_state,
        } = validated;
        let mut tasks = Vec::new();
        // Leader election first: readiness depends on it.
        let mut extra_ready = extra_ready;
        if let Some(le) = opts.leader_election.clone() {
            let (status, task) = crate::k8s::leader::start(le, shutdown.clone()).await?;
            tasks.push(task);
            let lead = status.ready_fn();
            extra_ready = Some(match extra_ready {
                None => lead,
                Some(x) => Arc::new(move || {
                    x()?;
                    lead()
                }),
            });
        }
        let mut health_cfg = opts.health.clone();
        health_cfg.scrape_enabled = data.metrics.is_some();
        if data.metrics.is_none() {
            tracing::info!("no metrics data source configured; model servers are not scraped (health from probes and routed traffic only)");
        }
        for d in opts.config.deprecations() {
            tracing::warn!("DEPRECATION: {d}");
        }
        let datastore_writer = DatastoreWriter::new(health_cfg);
        let datastore = datastore_writer.reader();
        let mut director =
            Director::build_with_budget(&datastore_writer, scheduler, opts.max_buffered_body_bytes);
        let metrics = director.metrics().clone();
        let mut replication = None;
        if let (Some(o), Some(client)) = (opts.shared_state.clone(), shared_state) {
            let plan = director.scheduler().prefix_plan();
            let block_bytes = plan.blocks_for(&crate::datastore::Snapshot::default()).0;
            let target = crate::replication::Target {
                datastore: datastore.clone(),
                prefix: director.prefix_index().clone(),
                precise: director.precise().cloned(),
                block_bytes: u32::try_from(block_bytes).unwrap_or(u32::MAX),
            };
            let (r, t) =
                crate::replication::Replication::start(o, client, target, shutdown.clone());
            tasks.extend(t);
            metrics.watch_shared_state(r.stats.clone());
            director = director.with_replication(r.outbox.clone());
            let ready = r.clone();
            extra_ready = Some(match extra_ready {
                None => Arc::new(move || ready.ready()),
                Some(x) => Arc::new(move || {
                    x()?;
                    ready.ready()
                }),
            });
            replication = Some(r);
        }
        let flow_control = opts.config.flow_control_enabled().then(|| {
            crate::admission::FlowController::new(
                flow.clone(),
                datastore.clone(),
                metrics.flow_control().clone(),
            )
        });
        let admission: Arc<dyn crate::admission::Admission> = match &flow_control {
            Some(fc) => {
                tasks.push(fc.spawn_pump(shutdown.clone()));
                tracing::info!(settings = ?fc.settings(), "flow control on");
                fc.clone()
            }
            None => Arc::new(crate::admission::LegacyAdmission::new(
                flow.detector.clone(),
            )),
        };
        let director = director
            .with_admission(admission)
            .with_objectives(crate::admission::Objectives::new(&opts.objectives));
        if let Some(w) = opts.objective_watch.clone() {
            tasks.push(crate::k8s::objectives::spawn(
                w,
                director.objectives().clone(),
                shutdown.clone(),
            ));
        }
        // The metrics certificate's validity: exported, and named in /readyz when wrong.
        let cert_status = tls.as_ref().map(|t| t.status());
        if let Some(s) = &cert_status {
            metrics.watch_certificate(s.clone());
        }

        // The central KV-event socket first (kvEventsConfig.zmqEndpoint): a port in use or an
        // address not of this host stops the start-up, naming the field and the address, before
        // any other port is bound.
        let central = match director.precise() {
            Some(p) => crate::precise::follow::bind_central(p)
                .await
                .map_err(StartError::Invalid)?,
            None => None,
        };

        // Bind side servers (after validation).
        let mut metrics_addr = None;
        if let Some(addr) = opts.metrics_addr {
            let l = serving::bind(addr, "--metrics-bind-address").await?;
            metrics_addr = Some(l.local_addr()?);
            let router = serving::metrics_router(metrics.clone(), opts.metrics_auth.clone());
            let sd = shutdown.clone();
            match tls {
                None => tasks.push(tokio::spawn(async move {
                    let _ = axum::serve(l, router)
                        .with_graceful_shutdown(sd.wait())
                        .await;
                })),
                Some(setup) => {
                    tracing::info!(certificate = setup.describe(), "metrics served over HTTPS");
                    let l = setup.serve_listener(l, shutdown.clone());
                    tasks.push(tokio::spawn(async move {
                        let _ = axum::serve(l, router)
                            .with_graceful_shutdown(sd.wait())
                            .await;
                    }));
                }
            }
        }
        let mut health_addr = None;
        let probes_stop = Shutdown::new();
        if let Some(addr) = opts.health_addr {
            let l = serving::bind(addr, "--health-probe-bind-address").await?;
            health_addr = Some(l.local_addr()?);
            let ds = datastore.clone();
            let extra = extra_ready.clone();
            let draining = shutdown.clone();
            let ready: ReadyFn = Arc::new(move || {
                if draining.is_triggered() {
                    return Err("shutting down: finishing in-flight requests".into());
                }
                readiness(&ds)?;
                if let Some(x) = &extra {
                    x()?;
                }
                Ok(())
            });
            let shared = replication.clone();
            let warnings: serving::WarningsFn = Arc::new(move || {
                cert_status
                    .iter()
                    .filter_map(|s| s.problem())
                    .chain(shared.as_ref().and_then(|r| r.warning()))
                    .collect()
            });
            let router = serving::health_router_with_warnings(ready, warnings);
            // The probe port stays up through the drain (answering 503 on /readyz), so
            // orchestrators see "not ready" rather than a refused connection; it stops when
            // the front-end has finished (`join`).
            let sd = probes_stop.clone();
            tasks.push(tokio::spawn(async move {
                let _ = axum::serve(l, router)
                    .with_graceful_shutdown(sd.wait())
                    .await;
            }));
        }

        // Discovery (the one writer of the endpoint set) and scraping (health observations).
        let health = datastore_writer.health_sink();
        tasks.push(tokio::spawn(opts.discovery.run(
            datastore_writer,
            initial,
            shutdown.clone(),
        )));
        let metrics_source = data.metrics.as_ref().map(|m| {
            format!(
                "{}://<endpoint>{}{} every {:?}",
                m.source.scheme.as_str(),
                m.port.map(|p| format!(":{p}")).unwrap_or_default(),
                m.source.path,
                m.source.interval.unwrap_or(opts.scrape.interval)
            )
        });
        if let Some(p) = director.precise() {
            // The precise prefix index follows every discovered endpoint's KV events, and the
            // central socket's.
            tasks.push(crate::precise::follow::spawn_bound(
                p.clone(),
                datastore.clone(),
                shutdown.clone(),
                central,
            ));
        }
        tasks.push(tokio::spawn(crate::scrape::run(
            health,
            opts.scrape.clone(),
            data.metrics.clone(),
            scrape_client,
            shutdown.clone(),
        )));

        tracing::info!(
            scheduler = %director.scheduler().describe(),
            metrics_addr = ?metrics_addr,
            health_addr = ?health_addr,
            metrics_auth = ?opts.metrics_auth,
            metrics_tls = opts.metrics_tls.is_some(),
            leader_election = opts.leader_election.is_some(),
            shared_state = opts.shared_state.as_ref().map(|s| s.describe()).as_deref().unwrap_or("none"),
            scrape_interval = ?opts.scrape.interval,
            metrics_source = metrics_source.as_deref().unwrap_or("none"),
            probe_interval = ?opts.scrape.probe_interval,
            staleness = ?opts.health.staleness,
            grace_period = ?opts.grace_period,
            max_buffered_body_bytes = opts.max_buffered_body_bytes,
            "picker runtime started"
        );
        Ok(Self {
            director,
            datastore,
            metrics,
            metrics_addr,
            health_addr,
            shutdown,
            grace_period: opts.grace_period,
            tasks,
            probes_stop,
            extra_ready,
        })
    }

    /// Readiness including any extra condition.
    pub fn is_ready(&self) -> Result<(), String> {
        readiness(&self.datastore)?;
        if let Some(x) = &self.extra_ready {
            x()?;
        }
        Ok(())
    }

    /// Whether discovery has synced (and this replica leads, with leader election) and no
    /// drain has begun: the "live and usable" rule GAIE's `inference-extension` health service
    /// reports, which an empty pool does not fail.
    pub fn is_synced(&self) -> bool {
        self.datastore.is_synced()
            && !self.shutdown.is_triggered()
            && self.extra_ready.as_ref().is_none_or(|x| x().is_ok())
    }

    /// Wait for background tasks after shutdown was triggered (bounded by the grace period).
    /// Stop the probe server (normally done by [`join`](Self::join)).
    pub fn stop_probes(&self) {
        self.probes_stop.trigger();
    }

    pub async fn join(self) {
        self.shutdown.trigger();
        self.probes_stop.trigger();
        let all = futures_util::future::join_all(self.tasks);
        let _ = tokio::time::timeout(self.grace_period, all).await;
    }
}

/// A running front-end, `epp proxy`'s [`ProxyHandle`](crate::proxy::ProxyHandle) or `epp serve`'s
/// [`ServeHandle`](crate::extproc::ServeHandle): the shared runtime's director and side-server
/// addresses, the front-end's own listen addresses `A` (their fields read through the handle,
/// by `Deref`), and the shutdown that stops it all.
pub struct FrontEndHandle<A> {
    /// The front-end's own listen addresses.
    pub addrs: A,
    pub metrics_addr: Option<SocketAddr>,
    pub health_addr: Option<SocketAddr>,
    pub director: Director,
    shutdown: Shutdown,
    done: tokio::task::JoinHandle<()>,
}

impl<A> FrontEndHandle<A> {
    /// Serve in the background: `run` gets `picker` (a [`Runtime`], or one shared through an
    /// `Arc`) and, once the picker's shutdown fires, stops the front-end and then the runtime.
    pub(crate) fn spawn<P, F>(addrs: A, picker: P, run: impl FnOnce(P) -> F) -> Self
    where
        P: std::borrow::Borrow<Runtime>,
        F: std::future::Future<Output = ()> + Send + 'static,
    {
        let p = picker.borrow();
        let (director, metrics_addr, health_addr) =
            (p.director.clone(), p.metrics_addr, p.health_addr);
        let shutdown = p.shutdown.clone();
        Self {
            addrs,
            metrics_addr,
            health_addr,
            director,
            shutdown,
            done: tokio::spawn(run(picker)),
        }
    }

    /// Stop accepting; in-flight requests (streams) get the grace period to finish.
    pub fn shutdown(&self) {
        self.shutdown.trigger();
    }

    /// Wait until the front-end and its runtime have stopped.
    pub async fn wait(self) {
        let _ = self.done.await;
    }

    /// Trigger shutdown and wait.
    pub async fn stop(self) {
        self.shutdown();
        self.wait().await;
    }
}

impl<A> std::ops::Deref for FrontEndHandle<A> {
    type Target = A;
    fn deref(&self) -> &A {
        &self.addrs
    }
}

impl<A: std::fmt::Debug> std::fmt::Debug for FrontEndHandle<A> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FrontEndHandle")
            .field("addrs", &self.addrs)
            .field("metrics_addr", &self.metrics_addr)
            .field("health_addr", &self.health_addr)
            .finish_non_exhaustive()
    }
}

/// Drive a front-end's `server`, which stops accepting when `shutdown` fires, until it finishes
/// or until `grace` has passed since the shutdown; then its unfinished `work` is dropped.
pub(crate) async fn serve_within_grace(
    server: impl std::future::Future<Output = ()>,
    shutdown: &Shutdown,
    grace: Duration,
    work: &str,
) {
    tokio::select! {
        _ = server => {}
        _ = async { shutdown.wait().await; tokio::time::sleep(grace).await } => {
            tracing::warn!(?grace, "grace period over; dropping unfinished {work}");
        }
    }
}

//! Flags shared by `epp serve` and `epp proxy`: discovery, scheduling config, the side servers,
//! scraping and health. One definition, so the two modes cannot drift.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use epp_core::app::RuntimeOptions;
use epp_core::config::{presets, EndpointPickerConfig};
use epp_core::datalayer::{MetricSpec, MetricsFlags, Scheme};
use epp_core::datastore::HealthConfig;
use epp_core::discovery::StaticDiscovery;
use epp_core::k8s::auth::KubeAuthorizer;
use epp_core::k8s::discovery::{KubeDiscovery, PodSource};
use epp_core::k8s::leader::LeaderElectionConfig;
use epp_core::k8s::pool::ports_from;
use epp_core::k8s::selector::LabelSelector;
use epp_core::k8s::KubeClient;
use epp_core::scrape::ScrapeOptions;
use epp_core::serving::{MetricsAuth, MetricsAuthMode};
use epp_core::tls::MetricsTls;

/// Parse a duration like `100ms`, `2s`, `1m30s`.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s)
        .map_err(|e| format!("{s:?} is not a duration (e.g. 100ms, 2s, 1m): {e}"))
}

/// `--metrics-auth`: how `/metrics` is protected.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum MetricsAuthArg {
    /// No authentication (local use, or a network policy protects the port).
    None,
    /// A static bearer token read from `--metrics-token-file`.
    Token,
    /// Kubernetes TokenReview + SubjectAccessReview (as controller-runtime does).
    Kubernetes,
}

impl From<MetricsAuthArg> for MetricsAuthMode {
    fn from(a: MetricsAuthArg) -> Self {
        match a {
            MetricsAuthArg::None => MetricsAuthMode::None,
            MetricsAuthArg::Token => MetricsAuthMode::Token,
            MetricsAuthArg::Kubernetes => MetricsAuthMode::Kubernetes,
        }
    }
}

/// `--log-format`: how log lines are written.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormatArg {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

impl From<LogFormatArg> for epp_core::telemetry::LogFormat {
    fn from(a: LogFormatArg) -> Self {
        match a {
            LogFormatArg::Text => Self::Text,
            LogFormatArg::Json => Self::Json,
        }
    }
}

/// As [`parse_duration`], refusing zero (for deadlines: a zero deadline fails every request).
pub fn parse_positive_duration(s: &str) -> Result<Duration, String> {
    let d = parse_duration(s)?;
    if d.is_zero() {
        return Err(format!("{s:?}: must be greater than 0"));
    }
    Ok(d)
}

#[derive(clap::Args, Debug, Clone)]
pub struct RuntimeArgs {
    /// A model-server endpoint `host:port` (repeatable). For `serve`, use `ip:port`.
    #[arg(long = "endpoint", value_name = "HOST:PORT")]
    pub endpoints: Vec<String>,

    /// YAML file listing endpoints; edits are picked up without a restart.
    #[arg(long, value_name = "FILE")]
    pub endpoints_file: Option<PathBuf>,

    /// How often the endpoints file is checked for changes.
    #[arg(long, value_name = "DURATION", default_value = "1s", value_parser = parse_duration)]
    pub endpoints_file_poll_interval: Duration,

    /// EndpointPickerConfig YAML file (plugins, profiles, weights). Default: the built-in profile.
    #[arg(long, value_name = "FILE", conflicts_with = "config_text")]
    pub config_file: Option<PathBuf>,

    /// EndpointPickerConfig as inline YAML text.
    #[arg(long, value_name = "YAML")]
    pub config_text: Option<String>,

    /// Address of the Prometheus `/metrics` server.
    #[arg(long, value_name = "ADDR", default_value = "0.0.0.0:9090")]
    pub metrics_bind_address: SocketAddr,

    /// Address of the `/healthz` and `/readyz` probe server.
    #[arg(long, value_name = "ADDR", default_value = "0.0.0.0:8080")]
    pub health_probe_bind_address: SocketAddr,

    /// How `/metrics` is protected. Default: `kubernetes` inside a cluster (KUBERNETES_SERVICE_HOST
    /// set), `none` elsewhere; the active mode is logged at start-up.
    #[arg(long, value_enum, value_name = "MODE")]
    pub metrics_auth: Option<MetricsAuthArg>,

    /// File holding the bearer token for `--metrics-auth=token`. Re-read every second: a rotated
    /// token takes effect without a restart (an unreadable or empty file keeps the last good one).
    #[arg(long, value_name = "FILE")]
    pub metrics_token_file: Option<PathBuf>,

    /// How often each endpoint's `/metrics` is scraped (llm-d-router: `--refresh-metrics-interval`).
    #[arg(long, visible_alias = "refresh-metrics-interval", value_name = "DURATION", default_value = "100ms", value_parser = parse_duration)]
    pub scrape_interval: Duration,

    /// Deadline of one scrape or health probe.
    #[arg(long, value_name = "DURATION", default_value = "1s", value_parser = parse_duration)]
    pub scrape_timeout: Duration,

    /// How often each endpoint's `/health` is probed (`0s` disables probing).
    #[arg(long, value_name = "DURATION", default_value = "1s", value_parser = parse_duration)]
    pub health_check_interval: Duration,

    /// Scraped data older than this marks an endpoint `stale`.
    #[arg(long, value_name = "DURATION", default_value = "2s", value_parser = parse_duration)]
    pub metrics_staleness_threshold: Duration,

    /// Consecutive failures (per source) before an endpoint is `unhealthy`.
    #[arg(long, value_name = "N", default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..))]
    pub health_failure_threshold: u32,

    /// Consecutive successful checks before an unhealthy endpoint is `healthy` again.
    #[arg(long, value_name = "N", default_value_t = 2, value_parser = clap::value_parser!(u32).range(1..))]
    pub health_success_threshold: u32,

    /// An endpoint taken out by failing routed requests (5xx, refused, timed out) stays out at
    /// least this long even while its scrapes and probes succeed; each further trip soon after
    /// doubles the wait, up to 60 s.
    #[arg(long, value_name = "DURATION", default_value = "5s", value_parser = parse_duration)]
    pub health_passive_cooldown: Duration,

    /// Bytes of request bodies all requests together may hold in memory while they are read
    /// and routed (each front-end buffers bodies: the pick needs the whole prompt); requests
    /// over it get 503.
    #[arg(long, value_name = "BYTES", default_value_t = 512 * 1024 * 1024, value_parser = clap::value_parser!(u64).range(1..))]
    pub max_buffered_body_bytes: u64,

    /// Time in-flight requests get to finish after SIGTERM (llm-d-router: `--drain-timeout`).
    #[arg(long, visible_alias = "drain-timeout", value_name = "DURATION", default_value = "30s", value_parser = parse_duration)]
    pub shutdown_grace_period: Duration,

    /// An InferenceObjective outside Kubernetes: requests whose `x-llm-d-inference-objective`
    /// header names it get its priority (higher dispatches first under flow control; negative
    /// is sheddable). Repeatable. Unknown objectives get priority 0. In Kubernetes the
    /// `InferenceObjective` resources of the pool are watched as well (they win on a name clash).
    #[arg(long, value_name = "NAME=PRIORITY", value_parser = parse_objective)]
    pub inference_objective: Vec<epp_core::admission::Objective>,

    #[command(flatten)]
    pub kube: KubeArgs,

    #[command(flatten)]
    pub shared: SharedStateArgs,
}

/// How several picker replicas run together.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum HaMode {
    /// Only the holder of a Kubernetes Lease is ready and routes (same as
    /// `--ha-enable-leader-election`); with `--shared-state` the standbys stay warm.
    LeaderElection,
    /// Every replica is ready and routes; they share what they learn through `--shared-state`.
    ActiveActive,
}

/// Replicas sharing routing state through Redis (see docs/high-availability.md).
#[derive(clap::Args, Debug, Clone, Default)]
pub struct SharedStateArgs {
    /// How several replicas run: `leader-election` (one routes) or `active-active` (all route,
    /// sharing state through `--shared-state`). Default: a single picker.
    #[arg(long, value_name = "MODE", value_enum)]
    pub ha_mode: Option<HaMode>,

    /// Redis (or Valkey) that replicas share routing state through: `redis://host:port[/db]`, or
    /// `rediss://host:port[/db]` for TLS. A password may be in the URL
    /// (`redis://:PASSWORD@host:port`), but prefer `--shared-state-password-file`.
    #[arg(long, value_name = "URL")]
    pub shared_state: Option<String>,

    /// File holding the Redis password (trailing newline ignored); overrides one in the URL.
    /// `EPP_SHARED_STATE_PASSWORD` works too.
    #[arg(long, value_name = "FILE", requires = "shared_state")]
    pub shared_state_password_file: Option<PathBuf>,

    /// PEM CA bundle a `rediss://` server's certificate must chain to. Default: the system's roots.
    #[arg(long, value_name = "FILE", requires = "shared_state")]
    pub shared_state_ca_file: Option<PathBuf>,

    /// Prefix of every Redis key, so several pools can share one Redis. Default:
    /// `epp:<pool-namespace>/<pool-name>`, or `epp:default` without `--pool-name`.
    #[arg(long, value_name = "PREFIX", requires = "shared_state")]
    pub shared_state_key_prefix: Option<String>,

    /// This replica's id in the shared state. Default: POD_NAME (or the host name) and the
    /// process id.
    #[arg(long, value_name = "ID", requires = "shared_state")]
    pub replica_id: Option<String>,

    /// How often one replica writes the index snapshot new replicas start from.
    #[arg(long, value_name = "DURATION", default_value = "10s", value_parser = parse_positive_duration)]
    pub shared_state_snapshot_interval: Duration,

    /// How often replicas exchange their in-flight counts (a report expires after ten of these).
    #[arg(long, value_name = "DURATION", default_value = "200ms", value_parser = parse_positive_duration)]
    pub shared_state_load_interval: Duration,

    /// Entries the delta stream keeps at most (trimmed approximately, `XADD MAXLEN ~`).
    #[arg(long, value_name = "N", default_value_t = 100_000, value_parser = clap::value_parser!(u64).range(1..))]
    pub shared_state_stream_max_len: u64,

    /// Longest a starting replica waits to load the snapshot and the stream before it reports
    /// ready anyway (on local state).
    #[arg(long, value_name = "DURATION", default_value = "5s", value_parser = parse_positive_duration)]
    pub shared_state_warm_start_timeout: Duration,
}

impl SharedStateArgs {
    /// The shared-state options, after checking the flags fit together.
    pub fn to_options(
        &self,
        leader_election: bool,
        pool: Option<(&str, &str)>,
    ) -> anyhow::Result<Option<epp_core::replication::SharedStateOptions>> {
        match (self.ha_mode, leader_election) {
            (Some(HaMode::ActiveActive), true) => anyhow::bail!(
                "--ha-mode active-active and --ha-enable-leader-election contradict each other; pick one"
            ),
            (Some(HaMode::ActiveActive), false) if self.shared_state.is_none() => anyhow::bail!(
                "--ha-mode active-active needs --shared-state redis://host:port: replicas that share nothing each route on what they alone have learned"
            ),
            (None, false) if self.shared_state.is_some() => anyhow::bail!(
                "--shared-state needs --ha-mode active-active (every replica routes) or leader-election (standbys stay warm)"
            ),
            _ => {}
        }
        let Some(url) = &self.shared_state else {
            return Ok(None);
        };
        let password = match &self.shared_state_password_file {
            Some(f) => Some(
                std::fs::read_to_string(f)
                    .map_err(|e| {
                        anyhow::anyhow!("--shared-state-password-file {}: {e}", f.display())
                    })?
                    .trim_end_matches(['\r', '\n'])
                    .to_string(),
            ),
            None => std::env::var("EPP_SHARED_STATE_PASSWORD")
                .ok()
                .filter(|p| !p.is_empty()),
        };
        let defaults = epp_core::replication::SharedStateOptions::default();
        let o = epp_core::replication::SharedStateOptions {
            url: url.clone(),
            password,
            ca_file: self.shared_state_ca_file.clone(),
            key_prefix: self
                .shared_state_key_prefix
                .clone()
                .unwrap_or_else(|| match pool {
                    Some((ns, name)) => format!("epp:{ns}/{name}"),
                    None => "epp:default".into(),
                }),
            replica_id: self.replica_id.clone().unwrap_or(defaults.replica_id),
            stream_max_len: self.shared_state_stream_max_len as usize,
            snapshot_interval: self.shared_state_snapshot_interval,
            load_interval: self.shared_state_load_interval,
            warm_start_timeout: self.shared_state_warm_start_timeout,
        };
        // URL, files and bounds checked now, so a bad one is named before any port is bound.
        o.client().map_err(|e| anyhow::anyhow!(e))?;
        Ok(Some(o))
    }
}

fn parse_objective(s: &str) -> Result<epp_core::admission::Objective, String> {
    epp_core::admission::Objective::parse(s)
}

/// Kubernetes flags: discovery, metrics TLS and leader election (see docs/kubernetes.md).
#[derive(clap::Args, Debug, Clone, Default)]
pub struct KubeArgs {
    /// InferencePool (inference.networking.k8s.io/v1) whose selector and targetPorts define the
    /// endpoints; discovered by watching the Kubernetes API.
    #[arg(long, value_name = "NAME", conflicts_with_all = ["endpoints", "endpoints_file", "endpoint_selector"])]
    pub pool_name: Option<String>,

    /// Namespace of the InferencePool, or of the pods for `--endpoint-selector`. Default: the
    /// picker's own namespace (POD_NAMESPACE or the ServiceAccount's), else `default`.
    #[arg(long, value_name = "NAMESPACE")]
    pub pool_namespace: Option<String>,

    /// Without the InferencePool CRD: select model-server pods by a Kubernetes label selector:
    /// `app=vllm,env in (prod,staging),tier!=frontend,gpu,!deprecated`.
    #[arg(long, value_name = "SELECTOR", conflicts_with_all = ["endpoints", "endpoints_file"], requires = "endpoint_target_ports")]
    pub endpoint_selector: Option<String>,

    /// Model-server ports on each pod selected by `--endpoint-selector` (1 to 8, comma-separated);
    /// each port is its own endpoint.
    #[arg(
        long,
        value_name = "PORT[,PORT]",
        value_delimiter = ',',
        requires = "endpoint_selector"
    )]
    pub endpoint_target_ports: Vec<u16>,

    /// Kubeconfig file for running outside a cluster. Default: in-cluster ServiceAccount, then
    /// KUBECONFIG, then ~/.kube/config.
    #[arg(long, value_name = "FILE")]
    pub kubeconfig: Option<PathBuf>,

    /// Serve `/metrics` over HTTPS (self-signed unless `--metrics-cert-file`/`--metrics-key-file`).
    #[arg(long)]
    pub metrics_tls: bool,

    /// PEM certificate (chain) for the metrics port; implies `--metrics-tls`. Re-read when it changes.
    #[arg(long, value_name = "FILE", requires = "metrics_key_file")]
    pub metrics_cert_file: Option<PathBuf>,

    /// PEM private key for `--metrics-cert-file`.
    #[arg(long, value_name = "FILE", requires = "metrics_cert_file")]
    pub metrics_key_file: Option<PathBuf>,

    /// Run several replicas; only the holder of a coordination.k8s.io Lease reports ready.
    #[arg(long, value_name = "BOOL", num_args = 0..=1, require_equals = true, default_missing_value = "true", default_value = "false", action = clap::ArgAction::Set, value_parser = super::goflags::go_bool)]
    pub ha_enable_leader_election: bool,

    /// Name of the leader-election Lease. Default: `epp-<pool-name>`, or `epp-leader`.
    #[arg(long, value_name = "NAME")]
    pub ha_lease_name: Option<String>,

    /// Namespace of the leader-election Lease. Default: the `--pool-namespace` value.
    #[arg(long, value_name = "NAMESPACE")]
    pub ha_lease_namespace: Option<String>,

    /// How long a lease stays valid without renewal (a standby waits this long after a crash).
    #[arg(long, value_name = "DURATION", default_value = "15s", value_parser = parse_duration)]
    pub ha_lease_duration: Duration,

    /// The leader steps down if it could not renew for this long.
    #[arg(long, value_name = "DURATION", default_value = "10s", value_parser = parse_duration)]
    pub ha_renew_deadline: Duration,

    /// How often candidates try to acquire and the leader renews.
    #[arg(long, value_name = "DURATION", default_value = "2s", value_parser = parse_duration)]
    pub ha_retry_period: Duration,
}

impl KubeArgs {
    fn namespace(&self) -> String {
        self.pool_namespace
            .clone()
            .or_else(epp_core::k8s::own_namespace)
            .unwrap_or_else(|| "default".into())
    }

    fn uses_kubernetes(&self, auth: &MetricsAuthMode) -> bool {
        self.pool_name.is_some()
            || self.endpoint_selector.is_some()
            || self.ha_enable_leader_election
            || *auth == MetricsAuthMode::Kubernetes
    }
}

/// The `--metrics-auth` mode in force: the flag, else `kubernetes` in a cluster, else `none`.
pub fn resolve_metrics_auth(flag: Option<MetricsAuthMode>) -> (MetricsAuthMode, &'static str) {
    match flag {
        Some(m) => (m, "set by --metrics-auth or --metrics-endpoint-auth"),
        None if epp_core::k8s::in_cluster() => (
            MetricsAuthMode::Kubernetes,
            "default inside a Kubernetes cluster (KUBERNETES_SERVICE_HOST is set)",
        ),
        None => (
            MetricsAuthMode::None,
            "default outside a Kubernetes cluster",
        ),
    }
}

impl RuntimeArgs {
    /// Turn flags into options, reading and validating every file they name.
    pub fn to_options(&self) -> anyhow::Result<RuntimeOptions> {
        let config = match (&self.config_file, &self.config_text) {
            (Some(f), _) => {
                let text = std::fs::read_to_string(f).map_err(|e| {
                    anyhow::anyhow!("--config-file {}: cannot read: {e}", f.display())
                })?;
                EndpointPickerConfig::from_yaml(&text)
                    .map_err(|e| anyhow::anyhow!("--config-file {}: {e}", f.display()))?
            }
            (None, Some(t)) => EndpointPickerConfig::from_yaml(t)
                .map_err(|e| anyhow::anyhow!("--config-text: {e}"))?,
            (None, None) => EndpointPickerConfig::from_yaml(presets::DEFAULT)
                .map_err(|e| anyhow::anyhow!("built-in default config: {e}"))?,
        };
        let (auth_mode, why) = resolve_metrics_auth(self.metrics_auth.map(Into::into));
        tracing::info!(mode = ?auth_mode, reason = why, "metrics endpoint protection");
        let mut k = self.kube.clone();
        if self.shared.ha_mode == Some(HaMode::LeaderElection) {
            k.ha_enable_leader_election = true;
        }
        let k = &k;
        let kube = k
            .uses_kubernetes(&auth_mode)
            .then(|| KubeClient::infer(k.kubeconfig.clone()));
        if let (Some(_), Some(path)) = (&kube, &k.kubeconfig) {
            if let Err(e) = std::fs::metadata(path) {
                anyhow::bail!("--kubeconfig {}: cannot read: {e}", path.display());
            }
        }
        let metrics_auth = match auth_mode {
            MetricsAuthMode::None => MetricsAuth::None,
            MetricsAuthMode::Token => {
                let Some(f) = &self.metrics_token_file else {
                    anyhow::bail!("--metrics-auth=token needs --metrics-token-file FILE");
                };
                MetricsAuth::token_from_file(f.clone()).map_err(|e| anyhow::anyhow!(e))?
            }
            MetricsAuthMode::Kubernetes => MetricsAuth::Delegated(Arc::new(KubeAuthorizer::new(
                kube.clone().expect("kubernetes auth implies a client"),
            ))),
        };
        let namespace = k.namespace();
        let discovery: epp_core::app::Discovery = if let Some(pool) = &k.pool_name {
            std::sync::Arc::new(KubeDiscovery {
                client: kube.clone().expect("pool implies a client"),
                source: PodSource::Pool {
                    namespace: namespace.clone(),
                    name: pool.clone(),
                },
            })
        } else if let Some(sel) = &k.endpoint_selector {
            let selector = LabelSelector::parse(sel)
                .map_err(|e| anyhow::anyhow!("--endpoint-selector {sel:?}: {e}"))?;
            let ports = ports_from(k.endpoint_target_ports.iter().map(|p| i32::from(*p)))
                .map_err(|e| anyhow::anyhow!("--endpoint-target-ports: {e}"))?;
            std::sync::Arc::new(KubeDiscovery {
                client: kube.clone().expect("selector implies a client"),
                source: PodSource::Selector {
                    namespace: namespace.clone(),
                    selector,
                    ports,
                },
            })
        } else {
            std::sync::Arc::new(StaticDiscovery {
                endpoints: self.endpoints.clone(),
                file: self.endpoints_file.clone(),
                poll_interval: self.endpoints_file_poll_interval,
                ..Default::default()
            })
        };
        let metrics_tls = (k.metrics_tls || k.metrics_cert_file.is_some()).then(|| MetricsTls {
            cert_file: k.metrics_cert_file.clone(),
            key_file: k.metrics_key_file.clone(),
            ..Default::default()
        });
        let shared_state = self.shared.to_options(
            k.ha_enable_leader_election,
            k.pool_name.as_deref().map(|p| (namespace.as_str(), p)),
        )?;
        let leader_election = k.ha_enable_leader_election.then(|| {
            let mut le = LeaderElectionConfig::new(
                kube.clone().expect("leader election implies a client"),
                k.ha_lease_namespace
                    .clone()
                    .unwrap_or_else(|| namespace.clone()),
                k.ha_lease_name
                    .clone()
                    .unwrap_or_else(|| match &k.pool_name {
                        Some(p) => format!("epp-{p}"),
                        None => "epp-leader".into(),
                    }),
            );
            le.lease_duration = k.ha_lease_duration;
            le.renew_deadline = k.ha_renew_deadline;
            le.retry_period = k.ha_retry_period;
            le
        });
        Ok(RuntimeOptions {
            discovery,
            config,
            metrics_addr: Some(self.metrics_bind_address),
            health_addr: Some(self.health_probe_bind_address),
            metrics_auth,
            scrape: ScrapeOptions {
                interval: self.scrape_interval,
                timeout: self.scrape_timeout,
                probe_interval: (!self.health_check_interval.is_zero())
                    .then_some(self.health_check_interval),
                ..Default::default()
            },
            health: HealthConfig {
                failure_threshold: self.health_failure_threshold,
                success_threshold: self.health_success_threshold,
                staleness: self.metrics_staleness_threshold,
                probe_enabled: !self.health_check_interval.is_zero(),
                passive_cooldown: self.health_passive_cooldown,
                ..Default::default()
            },
            grace_period: self.shutdown_grace_period,
            max_buffered_body_bytes: self.max_buffered_body_bytes as usize,
            metrics_tls,
            leader_election,
            shared_state,
            objectives: self.inference_objective.clone(),
            objective_watch: k.pool_name.as_ref().map(|pool| {
                epp_core::k8s::objectives::ObjectiveWatch {
                    client: kube.clone().expect("pool implies a client"),
                    namespace: namespace.clone(),
                    pool_name: pool.clone(),
                    pool_group: epp_core::k8s::objectives::DEFAULT_POOL_GROUP.into(),
                }
            }),
        })
    }
}

#[cfg(test)]
mod kube_flag_tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser, Debug)]
    struct T {
        #[command(flatten)]
        p: RuntimeArgs,
    }

    fn opts(args: &[&str]) -> anyhow::Result<RuntimeOptions> {
        let t = T::try_parse_from(std::iter::once("epp").chain(args.iter().copied()))
            .map_err(|e| anyhow::anyhow!(e.to_string()))?;
        t.p.to_options()
    }

    #[test]
    fn shared_state_flags_fit_together_or_are_refused_by_name() {
        let err = |args: &[&str]| opts(args).unwrap_err().to_string();
        assert!(err(&["--ha-mode", "active-active"]).contains("needs --shared-state"));
        assert!(err(&["--shared-state", "redis://127.0.0.1:6379"]).contains("needs --ha-mode"));
        let e = err(&["--ha-mode", "active-active", "--shared-state", "http://x:1"]);
        assert!(
            e.contains("--shared-state") && e.contains("rediss://"),
            "{e}"
        );
        let e = err(&[
            "--ha-mode",
            "active-active",
            "--shared-state",
            "redis://127.0.0.1:6379",
            "--shared-state-ca-file",
            "/nonexistent/ca.pem",
        ]);
        assert!(e.contains("--shared-state-ca-file"), "{e}");
        let e = err(&[
            "--ha-mode",
            "active-active",
            "--shared-state",
            "redis://127.0.0.1:6379",
            "--shared-state-password-file",
            "/nonexistent/pw",
        ]);
        assert!(
            e.contains("--shared-state-password-file /nonexistent/pw"),
            "{e}"
        );
        let dir = std::env::temp_dir().join(format!("epp-pw-{}", std::process::id()));
        std::fs::write(&dir, "s3cret\n").unwrap();
        let o = opts(&[
            "--ha-mode",
            "active-active",
            "--shared-state",
            "redis://127.0.0.1:6379/2",
            "--shared-state-password-file",
            dir.to_str().unwrap(),
            "--replica-id",
            "r1",
            "--shared-state-snapshot-interval",
            "3s",
        ])
        .unwrap();
        std::fs::remove_file(&dir).unwrap();
        let s = o.shared_state.unwrap();
        assert_eq!(s.password.as_deref(), Some("s3cret"));
        assert_eq!(s.replica_id, "r1");
        assert_eq!(s.key_prefix, "epp:default");
        assert_eq!(s.snapshot_interval, Duration::from_secs(3));
        assert!(o.leader_election.is_none());
        assert_eq!(s.describe(), "redis://127.0.0.1:6379/2");
    }

    fn err(args: &[&str]) -> String {
        format!("{:#}", opts(args).unwrap_err())
    }

    #[tokio::test]
    async fn pool_and_selector_flags_select_kubernetes_discovery() {
        let o = opts(&[
            "--pool-name",
            "qwen",
            "--pool-namespace",
            "llm-d",
            "--metrics-auth",
            "none",
        ])
        .unwrap();
        let Some(k) = o.discovery.as_any().downcast_ref::<KubeDiscovery>() else {
            panic!("{:?}", o.discovery)
        };
        assert_eq!(
            k.source,
            PodSource::Pool {
                namespace: "llm-d".into(),
                name: "qwen".into()
            }
        );
        assert!(o.metrics_tls.is_none() && o.leader_election.is_none());
        assert!(matches!(o.metrics_auth, MetricsAuth::None));

        let o = opts(&[
            "--endpoint-selector",
            "role=decode,app=vllm",
            "--endpoint-target-ports",
            "8000,8001",
            "--pool-namespace",
            "ns",
        ])
        .unwrap();
        let Some(k) = o.discovery.as_any().downcast_ref::<KubeDiscovery>() else {
            panic!()
        };
        let PodSource::Selector {
            namespace,
            selector,
            ports,
        } = &k.source
        else {
            panic!()
        };
        assert_eq!(
            (namespace.as_str(), selector.to_string().as_str()),
            ("ns", "app=vllm,role=decode")
        );
        assert_eq!(ports, &vec![8000, 8001]);

        // Static discovery stays the default.
        let o = opts(&["--endpoint", "127.0.0.1:8000"]).unwrap();
        assert!(o
            .discovery
            .as_any()
            .downcast_ref::<StaticDiscovery>()
            .is_some());
    }

    #[tokio::test]
    async fn bad_kubernetes_flags_are_rejected_naming_the_flag() {
        assert!(err(&["--endpoint-selector", "app"]).contains("--endpoint-selector"));
        assert!(err(&["--endpoint-selector", "app=v"]).contains("--endpoint-target-ports"));
        assert!(err(&["--endpoint-target-ports", "1"]).contains("--endpoint-selector"));
        assert!(err(&[
            "--endpoint-selector",
            "app=v",
            "--endpoint-target-ports",
            "0"
        ])
        .contains("--endpoint-target-ports"));
        assert!(err(&[
            "--endpoint-selector",
            "app=v",
            "--endpoint-target-ports",
            "1,1"
        ])
        .contains("listed twice"));
        assert!(err(&[
            "--endpoint-selector",
            "a=v",
            "--endpoint-target-ports",
            "1,2,3,4,5,6,7,8,9"
        ])
        .contains("at most 8"));
        assert!(err(&["--pool-name", "p", "--endpoint", "a:1"]).contains("cannot be used with"));
        assert!(err(&[
            "--pool-name",
            "p",
            "--endpoint-selector",
            "a=b",
            "--endpoint-target-ports",
            "1"
        ])
        .contains("cannot be used with"));
        assert!(err(&["--metrics-cert-file", "c.pem"]).contains("--metrics-key-file"));
        assert!(err(&["--metrics-key-file", "k.pem"]).contains("--metrics-cert-file"));
        assert!(err(&[
            "--pool-name",
            "p",
            "--kubeconfig",
            "/nonexistent/kubeconfig"
        ])
        .contains("--kubeconfig /nonexistent/kubeconfig: cannot read"));
    }

    #[tokio::test]
    async fn tls_leader_and_auth_flags_reach_the_options() {
        let o = opts(&["--endpoint", "127.0.0.1:1", "--metrics-tls"]).unwrap();
        assert_eq!(o.metrics_tls, Some(MetricsTls::default()));
        let o = opts(&[
            "--endpoint",
            "127.0.0.1:1",
            "--metrics-cert-file",
            "/c.pem",
            "--metrics-key-file",
            "/k.pem",
        ])
        .unwrap();
        let t = o.metrics_tls.unwrap();
        assert_eq!(t.cert_file.as_deref(), Some(std::path::Path::new("/c.pem")));
        assert_eq!(t.key_file.as_deref(), Some(std::path::Path::new("/k.pem")));

        let o = opts(&[
            "--pool-name",
            "qwen",
            "--pool-namespace",
            "llm-d",
            "--ha-enable-leader-election",
        ])
        .unwrap();
        let le = o.leader_election.unwrap();
        assert_eq!(
            (le.lease_namespace.as_str(), le.lease_name.as_str()),
            ("llm-d", "epp-qwen")
        );
        assert_eq!(
            (le.lease_duration, le.renew_deadline, le.retry_period),
            (
                Duration::from_secs(15),
                Duration::from_secs(10),
                Duration::from_secs(2)
            )
        );
        let o = opts(&[
            "--endpoint",
            "127.0.0.1:1",
            "--ha-enable-leader-election",
            "--ha-lease-name",
            "x",
            "--ha-lease-namespace",
            "y",
            "--ha-lease-duration",
            "20s",
            "--ha-renew-deadline",
            "12s",
            "--ha-retry-period",
            "3s",
        ])
        .unwrap();
        let le = o.leader_election.unwrap();
        assert_eq!(
            (le.lease_namespace.as_str(), le.lease_name.as_str()),
            ("y", "x")
        );
        assert_eq!(le.lease_duration, Duration::from_secs(20));
        assert_eq!(le.renew_deadline, Duration::from_secs(12));
        assert_eq!(le.retry_period, Duration::from_secs(3));

        let o = opts(&["--endpoint", "127.0.0.1:1", "--metrics-auth", "kubernetes"]).unwrap();
        assert_eq!(format!("{:?}", o.metrics_auth), "kubernetes");
        assert_eq!(
            resolve_metrics_auth(Some(MetricsAuthMode::Token)).0,
            MetricsAuthMode::Token
        );
        let want = if epp_core::k8s::in_cluster() {
            MetricsAuthMode::Kubernetes
        } else {
            MetricsAuthMode::None
        };
        assert_eq!(resolve_metrics_auth(None).0, want);
    }
}

/// llm-d-router / GAIE flags of `epp serve` that map onto the shared runtime (the chart
/// renders them; see the README's compatibility table). Booleans take `--flag=true|false`.
#[derive(clap::Args, Debug, Clone, Default)]
pub struct LlmdArgs {
    /// Port of the metrics server: `--metrics-bind-address` with this port.
    #[arg(long, value_name = "PORT")]
    pub metrics_port: Option<u16>,

    /// API group of the InferencePool named by `--pool-name`. Only `inference.networking.k8s.io`
    /// (InferencePool v1) is supported.
    #[arg(long, value_name = "GROUP")]
    pub pool_group: Option<String>,

    /// Authenticate and authorize `/metrics` callers with Kubernetes (TokenReview +
    /// SubjectAccessReview). `false` is `--metrics-auth=none`, `true` is
    /// `--metrics-auth=kubernetes`.
    #[arg(long, value_name = "BOOL", num_args = 0..=1, require_equals = true, default_missing_value = "true", value_parser = super::goflags::go_bool)]
    pub metrics_endpoint_auth: Option<bool>,

    /// Accepted for llm-d-router compatibility; has no effect: epp computes its pool gauges
    /// when `/metrics` is scraped, not on a timer.
    #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
    pub refresh_prometheus_metrics_interval: Option<Duration>,

    /// Scrape this port of each model server instead of its serving port.
    #[arg(long, value_name = "PORT")]
    pub model_server_metrics_port: Option<u16>,

    /// Path of the model servers' metrics (overrides the metrics-data-source `path`).
    #[arg(long, value_name = "PATH")]
    pub model_server_metrics_path: Option<String>,

    /// Scheme of the model servers' metrics, `http` or `https` (overrides the
    /// metrics-data-source `scheme`).
    #[arg(long, value_name = "SCHEME", value_parser = ["http", "https"])]
    pub model_server_metrics_scheme: Option<String>,

    /// With `https`: do not verify the model servers' certificates (the default).
    #[arg(long, value_name = "BOOL", num_args = 0..=1, require_equals = true, default_missing_value = "true", value_parser = super::goflags::go_bool)]
    pub model_server_metrics_https_insecure_skip_verify: Option<bool>,

    /// Deprecated: the default engine's queued-requests series, `name` or `name{label=value}`
    /// (prefer `engineConfigs` of the core-metrics-extractor).
    #[arg(long, value_name = "SPEC")]
    pub total_queued_requests_metric: Option<String>,

    /// Deprecated: the default engine's running-requests series.
    #[arg(long, value_name = "SPEC")]
    pub total_running_requests_metric: Option<String>,

    /// Deprecated: the default engine's KV-cache usage series (0..1).
    #[arg(long, value_name = "SPEC")]
    pub kv_cache_usage_percentage_metric: Option<String>,

    /// Deprecated: the default engine's LoRA info series (vLLM label format).
    #[arg(long, value_name = "SPEC")]
    pub lora_info_metric: Option<String>,

    /// Deprecated: the default engine's cache info series (`block_size`, `num_gpu_blocks`).
    #[arg(long, value_name = "SPEC")]
    pub cache_info_metric: Option<String>,

    /// OpenTelemetry tracing. epp does not emit traces: `false` is accepted, `true` refused.
    #[arg(long, value_name = "BOOL", num_args = 0..=1, require_equals = true, default_missing_value = "true", value_parser = super::goflags::go_bool)]
    pub tracing: Option<bool>,

    /// Accepted for llm-d-router compatibility; has no effect (a Rust binary has no Go pprof
    /// handlers).
    #[arg(long, value_name = "BOOL", num_args = 0..=1, require_equals = true, default_missing_value = "true", value_parser = super::goflags::go_bool)]
    pub enable_pprof: Option<bool>,

    /// Accepted for llm-d-router compatibility; has no effect: every plugin epp implements is
    /// available without it.
    #[arg(long, value_name = "BOOL", num_args = 0..=1, require_equals = true, default_missing_value = "true", value_parser = super::goflags::go_bool)]
    pub allow_experimental_plugins: Option<bool>,
}

impl LlmdArgs {
    /// The runtime options of `picker` with these flags applied.
    pub fn apply(&self, picker: &RuntimeArgs) -> anyhow::Result<RuntimeOptions> {
        let mut picker = picker.clone();
        if let Some(p) = self.metrics_port {
            picker.metrics_bind_address.set_port(p);
        }
        if let Some(g) = &self.pool_group {
            match g.as_str() {
                "inference.networking.k8s.io" => {}
                "inference.networking.x-k8s.io" => anyhow::bail!(
                    "--pool-group {g}: the v1alpha2 InferencePool is not supported; epp watches inference.networking.k8s.io/v1"
                ),
                other => anyhow::bail!(
                    "--pool-group {other}: unknown InferencePool group; epp watches inference.networking.k8s.io (v1)"
                ),
            }
        }
        if let Some(auth) = self.metrics_endpoint_auth {
            let want = if auth {
                MetricsAuthArg::Kubernetes
            } else {
                MetricsAuthArg::None
            };
            match picker.metrics_auth {
                Some(m) if m != want => anyhow::bail!(
                    "--metrics-endpoint-auth={auth} contradicts --metrics-auth {m:?}; give one"
                ),
                _ => picker.metrics_auth = Some(want),
            }
        }
        if self.tracing == Some(true) {
            anyhow::bail!(
                "--tracing=true: epp does not emit OpenTelemetry traces; set --tracing=false (its request lifecycle is in the logs and metrics)"
            );
        }
        for (flag, given) in [
            ("--enable-pprof", self.enable_pprof.is_some()),
            (
                "--allow-experimental-plugins",
                self.allow_experimental_plugins.is_some(),
            ),
            (
                "--refresh-prometheus-metrics-interval",
                self.refresh_prometheus_metrics_interval.is_some(),
            ),
        ] {
            if given {
                tracing::info!(
                    flag,
                    "accepted for llm-d-router compatibility; it has no effect in epp"
                );
            }
        }
        let spec = |flag: &str, v: &Option<String>| -> anyhow::Result<Option<Option<MetricSpec>>> {
            match v {
                None => Ok(None),
                Some(s) => {
                    tracing::warn!(flag, "DEPRECATION: use engineConfigs of the core-metrics-extractor plugin instead");
                    MetricSpec::parse(s)
                        .map(Some)
                        .map_err(|e| anyhow::anyhow!("{flag}: {e}"))
                }
            }
        };
        let overrides = MetricsFlags {
            port: self.model_server_metrics_port,
            // GAIE's chart renders `--model-server-metrics-path="/prometheus/metrics"`.
            path: self
                .model_server_metrics_path
                .as_deref()
                .map(|p| p.trim().trim_matches('"').to_string()),
            scheme: self.model_server_metrics_scheme.as_deref().map(|s| {
                if s == "https" {
                    Scheme::Https
                } else {
                    Scheme::Http
                }
            }),
            insecure_skip_verify: self.model_server_metrics_https_insecure_skip_verify,
            queued: spec(
                "--total-queued-requests-metric",
                &self.total_queued_requests_metric,
            )?,
            running: spec(
                "--total-running-requests-metric",
                &self.total_running_requests_metric,
            )?,
            kv_usage: spec(
                "--kv-cache-usage-percentage-metric",
                &self.kv_cache_usage_percentage_metric,
            )?,
            lora: spec("--lora-info-metric", &self.lora_info_metric)?,
            cache_info: spec("--cache-info-metric", &self.cache_info_metric)?,
        };
        let mut opts = picker.to_options()?;
        opts.scrape.overrides = overrides;
        Ok(opts)
    }
}

//! Flags shared by `epp serve` and `epp proxy`: discovery, scheduling config, the side servers,
//! scraping and health. One definition, so the two modes cannot drift.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use epp_core::app::{Discovery, PickerOptions};
use epp_core::config::{presets, EndpointPickerConfig};
use epp_core::datastore::HealthConfig;
use epp_core::discovery::StaticDiscovery;
use epp_core::scrape::ScrapeOptions;
use epp_core::serving::{MetricsAuth, MetricsAuthMode};

/// Parse a duration like `100ms`, `2s`, `1m30s`.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s)
        .map_err(|e| format!("{s:?} is not a duration (e.g. 100ms, 2s, 1m): {e}"))
}

#[derive(clap::Args, Debug, Clone)]
pub struct PickerArgs {
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

    /// How `/metrics` is protected.
    #[arg(long, value_enum, value_name = "MODE", default_value = "none")]
    pub metrics_auth: MetricsAuthMode,

    /// File holding the bearer token for `--metrics-auth=token`.
    #[arg(long, value_name = "FILE")]
    pub metrics_token_file: Option<PathBuf>,

    /// How often each endpoint's `/metrics` is scraped.
    #[arg(long, value_name = "DURATION", default_value = "100ms", value_parser = parse_duration)]
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

    /// Time in-flight requests get to finish after SIGTERM.
    #[arg(long, value_name = "DURATION", default_value = "30s", value_parser = parse_duration)]
    pub shutdown_grace_period: Duration,
}

impl PickerArgs {
    /// Turn flags into options, reading and validating every file they name.
    pub fn to_options(&self) -> anyhow::Result<PickerOptions> {
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
        let metrics_auth = match self.metrics_auth {
            MetricsAuthMode::None => MetricsAuth::None,
            MetricsAuthMode::Token => {
                let Some(f) = &self.metrics_token_file else {
                    anyhow::bail!("--metrics-auth=token needs --metrics-token-file FILE");
                };
                MetricsAuth::token_from_file(f.clone()).map_err(|e| anyhow::anyhow!(e))?
            }
            MetricsAuthMode::Kubernetes => {
                anyhow::bail!("--metrics-auth=kubernetes is not available in this build yet")
            }
        };
        Ok(PickerOptions {
            discovery: Discovery::Static(StaticDiscovery {
                endpoints: self.endpoints.clone(),
                file: self.endpoints_file.clone(),
                poll_interval: self.endpoints_file_poll_interval,
            }),
            config,
            metrics_addr: Some(self.metrics_bind_address),
            health_addr: Some(self.health_probe_bind_address),
            metrics_auth,
            scrape: ScrapeOptions {
                interval: self.scrape_interval,
                timeout: self.scrape_timeout,
                probe_interval: (!self.health_check_interval.is_zero())
                    .then_some(self.health_check_interval),
            },
            health: HealthConfig {
                failure_threshold: self.health_failure_threshold,
                success_threshold: self.health_success_threshold,
                staleness: self.metrics_staleness_threshold,
                probe_enabled: !self.health_check_interval.is_zero(),
            },
            grace_period: self.shutdown_grace_period,
        })
    }
}

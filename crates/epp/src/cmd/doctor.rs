//! `epp doctor`: the flags of the troubleshooter in the `epp-doctor` crate. Exits 1 when any
//! check failed, 2 on bad flags.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use epp_doctor::assets;

use super::common::parse_duration;

#[derive(clap::Args, Debug)]
#[command(
    after_help = "Marks: ✓ passed, ✗ failed (a `fix:` line follows), ! warning such as \
\"no traffic yet\" (a `hint:` line follows; does not fail the run), - skipped.\n\
Exit status: 0 when no check failed, 1 when one did, 2 on bad flags or unreadable files.\n\
See docs/monitoring.md, section \"epp doctor\"."
)]
#[command(group(clap::ArgGroup::new("target").required(true).multiple(true).args(["metrics_url", "prometheus_url", "shared_state"])))]
pub struct Args {
    /// The picker's metrics URL, e.g. `http://127.0.0.1:9090/metrics` (`/metrics` is added when
    /// the URL has no path).
    #[arg(long, value_name = "URL")]
    pub metrics_url: Option<String>,

    /// Bearer token for the metrics URL (visible in `ps`; prefer --token-file).
    #[arg(long, value_name = "TOKEN", conflicts_with = "token_file")]
    pub token: Option<String>,

    /// File holding the bearer token for the metrics URL (e.g. the picker's
    /// --metrics-token-file, or a ServiceAccount token).
    #[arg(long, value_name = "FILE")]
    pub token_file: Option<PathBuf>,

    /// PEM file with the CA certificate(s) that sign the picker's certificate (https:// metrics
    /// URLs). Without it the system's CAs are used.
    #[arg(long, value_name = "FILE", conflicts_with = "insecure_skip_verify")]
    pub ca_file: Option<PathBuf>,

    /// Do not verify the picker's TLS certificate (e.g. a self-signed one).
    #[arg(long)]
    pub insecure_skip_verify: bool,

    /// Prometheus base URL, e.g. `http://127.0.0.1:9091`: also check the scrape target and
    /// every dashboard query and alert expression there.
    #[arg(long, value_name = "URL")]
    pub prometheus_url: Option<String>,

    /// The Prometheus `job` label the picker is scraped under (the dashboard's `$job`).
    #[arg(long, value_name = "NAME", default_value = assets::DEFAULT_JOB)]
    pub job: String,

    /// Grafana dashboard JSON whose metrics and queries to check. Default:
    /// deploy/monitoring/grafana/epp-dashboard.json, or its built-in copy when that file does
    /// not exist.
    #[arg(long, value_name = "FILE")]
    pub dashboard: Option<PathBuf>,

    /// Prometheus rules file (or PrometheusRule) whose metrics and alert expressions to check.
    /// Default: deploy/monitoring/rules/epp-alerts.rules.yaml, or its built-in copy.
    #[arg(long, value_name = "FILE")]
    pub rules: Option<PathBuf>,

    /// The shared-state Redis of active-active replicas (`redis://host:port`, `rediss://`):
    /// check that it answers, takes the password, and holds a delta stream, a recent index
    /// snapshot and live replicas.
    #[arg(long, value_name = "URL")]
    pub shared_state: Option<String>,

    /// File holding the shared-state Redis password (or `EPP_SHARED_STATE_PASSWORD`).
    #[arg(long, value_name = "FILE", requires = "shared_state")]
    pub shared_state_password_file: Option<PathBuf>,

    /// The replicas' key prefix (their `--shared-state-key-prefix`).
    #[arg(
        long,
        value_name = "PREFIX",
        default_value = "epp:default",
        requires = "shared_state"
    )]
    pub shared_state_key_prefix: String,

    /// Deadline of each step (DNS, connect, TLS, response).
    #[arg(long, value_name = "DURATION", default_value = "5s", value_parser = parse_duration)]
    pub timeout: Duration,
}

pub async fn run(args: Args) -> anyhow::Result<ExitCode> {
    let password = match &args.shared_state_password_file {
        Some(f) => match std::fs::read_to_string(f) {
            Ok(p) => Some(p.trim_end_matches(['\r', '\n']).to_string()),
            Err(e) => {
                eprintln!(
                    "epp doctor: --shared-state-password-file {}: {e}",
                    f.display()
                );
                return Ok(ExitCode::from(2));
            }
        },
        None => std::env::var("EPP_SHARED_STATE_PASSWORD")
            .ok()
            .filter(|p| !p.is_empty()),
    };
    let shared_state =
        args.shared_state
            .clone()
            .map(|url| epp_doctor::shared_state::SharedStateCheck {
                url,
                password,
                key_prefix: args.shared_state_key_prefix.clone(),
                snapshot_max_age: Duration::from_secs(30),
            });
    let opts = epp_doctor::DoctorOptions {
        shared_state,
        metrics_url: args.metrics_url,
        token: args.token,
        token_file: args.token_file,
        ca_file: args.ca_file,
        insecure_skip_verify: args.insecure_skip_verify,
        prometheus_url: args.prometheus_url,
        job: args.job,
        dashboard: args.dashboard,
        rules: args.rules,
        timeout: args.timeout,
    };
    Ok(match epp_doctor::run(&opts).await {
        Ok(epp_doctor::Outcome::Passed) => ExitCode::SUCCESS,
        Ok(epp_doctor::Outcome::Failed) => ExitCode::from(1),
        Err(e) => {
            eprintln!("epp doctor: {e}");
            ExitCode::from(2)
        }
    })
}

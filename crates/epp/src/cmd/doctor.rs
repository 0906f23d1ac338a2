//! `epp doctor`: checks a running picker's `/metrics` (and, given its URL, the Prometheus that
//! scrapes it) and prints a checklist: ✓ passed, ✗ failed with a `fix:`, ! warning (e.g. no
//! traffic yet) with a `hint:`, - skipped. Exits 1 when any check failed, 2 on bad flags.

use epp::assets;
mod client;
mod picker_metrics;
mod prom;
mod report;
mod transport;

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use self::client::{Client, Endpoint, Trust};
use self::picker_metrics::TokenSource;
use self::report::Report;
use super::common::parse_duration;

#[derive(clap::Args, Debug)]
#[command(
    after_help = "Marks: ✓ passed, ✗ failed (a `fix:` line follows), ! warning such as \
\"no traffic yet\" (a `hint:` line follows; does not fail the run), - skipped.\n\
Exit status: 0 when no check failed, 1 when one did, 2 on bad flags or unreadable files.\n\
See docs/monitoring.md, section \"epp doctor\"."
)]
#[command(group(clap::ArgGroup::new("target").required(true).multiple(true).args(["metrics_url", "prometheus_url"])))]
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

    /// Deadline of each step (DNS, connect, TLS, response).
    #[arg(long, value_name = "DURATION", default_value = "5s", value_parser = parse_duration)]
    pub timeout: Duration,
}

fn usage_error(msg: &str) -> anyhow::Result<ExitCode> {
    eprintln!("epp doctor: {msg}");
    Ok(ExitCode::from(2))
}

pub async fn run(args: Args) -> anyhow::Result<ExitCode> {
    let assets = match assets::load(args.dashboard.as_deref(), args.rules.as_deref(), &args.job) {
        Ok(a) => a,
        Err(e) => return usage_error(&e),
    };
    let metrics_ep = match args.metrics_url.as_deref().map(Endpoint::parse).transpose() {
        Ok(ep) => ep.map(|mut ep| {
            if ep.path == "/" {
                ep.path = "/metrics".into();
                ep.url = format!("{}/metrics", ep.url.trim_end_matches('/'));
            }
            ep
        }),
        Err(e) => return usage_error(&format!("--metrics-url: {e}")),
    };
    let prom_ep = match args
        .prometheus_url
        .as_deref()
        .map(Endpoint::parse)
        .transpose()
    {
        Ok(ep) => ep,
        Err(e) => return usage_error(&format!("--prometheus-url: {e}")),
    };
    let (token, source) = match (&args.token, &args.token_file) {
        (Some(t), _) => (Some(t.trim().to_string()), TokenSource::Flag),
        (None, Some(f)) => match std::fs::read_to_string(f) {
            Ok(t) if !t.trim().is_empty() => (
                Some(t.trim().to_string()),
                TokenSource::File(f.display().to_string()),
            ),
            Ok(_) => return usage_error(&format!("--token-file {}: file is empty", f.display())),
            Err(e) => {
                return usage_error(&format!("--token-file {}: cannot read: {e}", f.display()))
            }
        },
        (None, None) => (None, TokenSource::None),
    };
    let trust = match (&args.ca_file, args.insecure_skip_verify) {
        (Some(f), _) => Trust::CaFile(f.clone()),
        (None, true) => Trust::Insecure,
        (None, false) => Trust::System,
    };
    let metrics_client = match Client::new(trust, args.timeout) {
        Ok(c) => c,
        Err(e) => return usage_error(&e),
    };
    let prom_client = match Client::new(Trust::System, args.timeout) {
        Ok(c) => c,
        Err(e) => return usage_error(&e),
    };

    let mut r = Report::default();
    r.note(&format!(
        "epp doctor {}\n  dashboard: {} ({} queries)\n  rules:     {} ({} alerts)",
        env!("CARGO_PKG_VERSION"),
        assets.dashboard_source,
        assets.dashboard.len(),
        assets.rules_source,
        assets.alerts.len()
    ));
    let expo = match &metrics_ep {
        Some(ep) => {
            picker_metrics::check(
                &mut r,
                &metrics_client,
                ep,
                token.as_deref(),
                &source,
                &assets,
            )
            .await
        }
        None => None,
    };
    if let Some(ep) = &prom_ep {
        prom::check(
            &mut r,
            &prom_client,
            ep,
            &args.job,
            &assets,
            expo.as_ref(),
            metrics_ep.as_ref(),
        )
        .await;
    }
    r.summary();
    Ok(if r.failed > 0 {
        ExitCode::from(1)
    } else {
        ExitCode::SUCCESS
    })
}

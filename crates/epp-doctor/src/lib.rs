//! `epp doctor`: checks a running picker's `/metrics` (and, given its URL, the Prometheus that
//! scrapes it) and prints a checklist: ✓ passed, ✗ failed with a `fix:`, ! warning (e.g. no
//! traffic yet) with a `hint:`, - skipped. Its own crate: an HTTP(S) client of its own
//! ([`client`], [`transport`] for readable transport errors), the PromQL reading of the shipped
//! dashboard and rules ([`assets`], which the monitoring tests share), the picker checks
//! ([`picker_metrics`]) and the Prometheus checks ([`prom`]). The `epp` binary only maps flags.
#![forbid(unsafe_code)]

pub mod assets;
pub mod client;
pub mod picker_metrics;
pub mod prom;
pub mod report;
pub mod shared_state;
pub mod transport;

use std::path::PathBuf;
use std::time::Duration;

use client::{Client, Endpoint, Trust};
use picker_metrics::TokenSource;
use report::Report;

/// What to check, as the flags say.
#[derive(Clone, Debug)]
pub struct DoctorOptions {
    pub metrics_url: Option<String>,
    pub token: Option<String>,
    pub token_file: Option<PathBuf>,
    pub ca_file: Option<PathBuf>,
    pub insecure_skip_verify: bool,
    pub prometheus_url: Option<String>,
    pub job: String,
    pub dashboard: Option<PathBuf>,
    pub rules: Option<PathBuf>,
    pub timeout: Duration,
    /// The shared-state Redis to check (`--shared-state`).
    pub shared_state: Option<shared_state::SharedStateCheck>,
}

/// How a run ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// No check failed (warnings allowed).
    Passed,
    /// At least one check failed.
    Failed,
}

/// A problem with the options themselves (a flag or file), before anything was checked.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct UsageError(pub String);

/// Run every check the options ask for, printing the checklist to stdout.
pub async fn run(opts: &DoctorOptions) -> Result<Outcome, UsageError> {
    let assets = assets::load(opts.dashboard.as_deref(), opts.rules.as_deref(), &opts.job)
        .map_err(UsageError)?;
    let metrics_ep = opts
        .metrics_url
        .as_deref()
        .map(Endpoint::parse)
        .transpose()
        .map_err(|e| UsageError(format!("--metrics-url: {e}")))?
        .map(|mut ep| {
            if ep.path == "/" {
                ep.path = "/metrics".into();
                ep.url = format!("{}/metrics", ep.url.trim_end_matches('/'));
            }
            ep
        });
    let prom_ep = opts
        .prometheus_url
        .as_deref()
        .map(Endpoint::parse)
        .transpose()
        .map_err(|e| UsageError(format!("--prometheus-url: {e}")))?;
    let (token, source) = match (&opts.token, &opts.token_file) {
        (Some(t), _) => (Some(t.trim().to_string()), TokenSource::Flag),
        (None, Some(f)) => match std::fs::read_to_string(f) {
            Ok(t) if !t.trim().is_empty() => (
                Some(t.trim().to_string()),
                TokenSource::File(f.display().to_string()),
            ),
            Ok(_) => {
                return Err(UsageError(format!(
                    "--token-file {}: file is empty",
                    f.display()
                )))
            }
            Err(e) => {
                return Err(UsageError(format!(
                    "--token-file {}: cannot read: {e}",
                    f.display()
                )))
            }
        },
        (None, None) => (None, TokenSource::None),
    };
    let trust = match (&opts.ca_file, opts.insecure_skip_verify) {
        (Some(f), _) => Trust::CaFile(f.clone()),
        (None, true) => Trust::Insecure,
        (None, false) => Trust::System,
    };
    let metrics_client = Client::new(trust, opts.timeout).map_err(UsageError)?;
    let prom_client = Client::new(Trust::System, opts.timeout).map_err(UsageError)?;

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
            &opts.job,
            &assets,
            expo.as_ref(),
            metrics_ep.as_ref(),
        )
        .await;
    }
    if let Some(s) = &opts.shared_state {
        shared_state::check(&mut r, s, opts.timeout).await;
    }
    r.summary();
    Ok(if r.failed > 0 {
        Outcome::Failed
    } else {
        Outcome::Passed
    })
}

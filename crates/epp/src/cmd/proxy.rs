//! `epp proxy`: the picker as a standalone OpenAI-compatible HTTP proxy.

use std::net::SocketAddr;
use std::process::ExitCode;

use epp_core::proxy::{spawn_with_shutdown, ProxyOptions};
use epp_core::telemetry::Shutdown;

use super::common::{parse_duration, parse_positive_duration, RuntimeArgs};

#[derive(clap::Args, Debug)]
pub struct Args {
    /// Address the OpenAI-compatible proxy listens on.
    #[arg(long, value_name = "ADDR", default_value = "0.0.0.0:8000")]
    pub listen: SocketAddr,

    /// Largest accepted request body, in bytes (larger: 413).
    #[arg(long, value_name = "BYTES", default_value_t = 10 * 1024 * 1024, value_parser = clap::value_parser!(u64).range(1..))]
    pub max_body_bytes: u64,

    /// Deadline for an upstream's response headers (past it: 504). Must be greater than 0.
    #[arg(long, value_name = "DURATION", default_value = "300s", value_parser = parse_positive_duration)]
    pub upstream_timeout: std::time::Duration,

    /// Endpoints tried per request when connecting fails (primary + fallbacks).
    #[arg(long, value_name = "N", default_value_t = 3, value_parser = clap::value_parser!(u64).range(1..=16))]
    pub max_attempts: u64,

    /// A client must send a complete request head within this; for HTTP/1.1 it is also the
    /// longest a kept-alive connection may sit idle between requests.
    #[arg(long, value_name = "DURATION", default_value = "10s", value_parser = parse_duration)]
    pub header_read_timeout: std::time::Duration,

    /// A request body must arrive completely within this (past it: 408).
    #[arg(long, value_name = "DURATION", default_value = "30s", value_parser = parse_duration)]
    pub body_read_timeout: std::time::Duration,

    /// Open client connections at most; new connections over it are closed at once (the
    /// metrics and probe ports keep answering).
    #[arg(long, value_name = "N", default_value_t = 4096, value_parser = clap::value_parser!(u64).range(1..))]
    pub max_connections: u64,

    /// With a disaggregating profile handler: the longest the prefill call may take (headers
    /// and body). Past it, or when the prefill fails, the decode pod computes the prompt itself.
    #[arg(long, value_name = "DURATION", default_value = "30s", value_parser = parse_positive_duration)]
    pub prefill_timeout: std::time::Duration,

    /// Gateway API Inference Extension conformance hooks: honour the `test-epp-endpoint-selection`
    /// request header, which pins a request to the named endpoint. Test only: with it, any
    /// client could steer its own requests.
    #[arg(long)]
    pub conformance_test_hooks: bool,

    #[command(flatten)]
    pub picker: RuntimeArgs,
}

pub async fn run(args: Args) -> anyhow::Result<ExitCode> {
    let picker = args.picker.to_options()?;
    let opts = ProxyOptions {
        listen: args.listen,
        max_body_bytes: args.max_body_bytes as usize,
        upstream_timeout: args.upstream_timeout,
        max_attempts: args.max_attempts as usize,
        test_hooks: args.conformance_test_hooks,
        header_read_timeout: args.header_read_timeout,
        body_read_timeout: args.body_read_timeout,
        max_connections: args.max_connections as usize,
        prefill_timeout: args.prefill_timeout,
        picker,
    };
    tracing::info!(version = env!("CARGO_PKG_VERSION"), "epp proxy starting");
    let shutdown = Shutdown::on_signal();
    let handle = spawn_with_shutdown(opts, shutdown).await?;
    handle.wait().await;
    Ok(ExitCode::SUCCESS)
}

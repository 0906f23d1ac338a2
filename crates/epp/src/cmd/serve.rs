//! `epp serve`: the picker as an Envoy ext_proc server (the Gateway API Inference Extension
//! endpoint-picker protocol). Only flag translation lives here; the front-end is
//! `epp_core::extproc` on top of the shared runtime in `epp_core::app`.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::process::ExitCode;

use epp_core::extproc::{
    spawn_with_shutdown, ExtProcConfig, ServeOptions, DEFAULT_GRPC_HEALTH_PORT, DEFAULT_GRPC_PORT,
};
use epp_core::telemetry::Shutdown;
use epp_core::tls::TlsSettings;

use super::common::RuntimeArgs;

#[derive(clap::Args, Debug)]
pub struct Args {
    /// Port of the ext_proc gRPC server (`envoy.service.ext_proc.v3.ExternalProcessor`).
    #[arg(long, value_name = "PORT", default_value_t = DEFAULT_GRPC_PORT)]
    pub grpc_port: u16,

    /// Port of the gRPC health server (services `liveness`, `readiness` and the ext_proc one).
    #[arg(long, value_name = "PORT", default_value_t = DEFAULT_GRPC_HEALTH_PORT)]
    pub grpc_health_port: u16,

    /// Address both gRPC servers listen on.
    #[arg(long, value_name = "IP", default_value = "0.0.0.0")]
    pub grpc_host: IpAddr,

    /// Largest request body buffered for a pick, in bytes (larger: 413).
    #[arg(long, value_name = "BYTES", default_value_t = 64 * 1024 * 1024, value_parser = clap::value_parser!(u64).range(1..))]
    pub max_body_bytes: u64,

    /// Concurrent ext_proc streams (requests in flight through the gateway) at most; more are
    /// refused with RESOURCE_EXHAUSTED.
    #[arg(long, value_name = "N", default_value_t = 10_000, value_parser = clap::value_parser!(u64).range(1..))]
    pub max_concurrent_streams: u64,

    /// A stream whose request is still incomplete (headers or body arriving) is ended with
    /// DEADLINE_EXCEEDED after this long without a message.
    #[arg(long, value_name = "DURATION", default_value = "30s", value_parser = super::common::parse_duration)]
    pub stream_idle_timeout: std::time::Duration,

    /// Fallback endpoints appended (comma list) to the `envoy.lb` metadata after the pick, for
    /// gateways that retry on them. The destination header always carries the pick alone.
    #[arg(long, value_name = "N", default_value_t = 0, value_parser = clap::value_parser!(u64).range(0..=16))]
    pub destination_fallbacks: u64,

    /// Gateway API Inference Extension conformance hooks: honour the `test-epp-endpoint-selection`
    /// request header and report `x-conformance-test-served-endpoint` /
    /// `x-conformance-test-selected-endpoint` on responses. Test only: any client could steer
    /// its own requests.
    #[arg(long)]
    pub conformance_test_hooks: bool,

    /// Serve the ext_proc port over TLS (ALPN h2). Without --cert-path/--key-path a self-signed
    /// certificate is generated at start-up (the gateway must then skip verification). Off by
    /// default: the picker normally sits next to the gateway; see docs/envoy.md.
    #[arg(long)]
    pub secure_serving: bool,

    /// PEM certificate chain for --secure-serving. Re-read every 10 s: a changed pair is served to
    /// new connections without a restart (a broken one is refused, the old one kept).
    #[arg(long, value_name = "FILE", requires = "key_path")]
    pub cert_path: Option<PathBuf>,

    /// PEM private key for --secure-serving.
    #[arg(long, value_name = "FILE", requires = "cert_path")]
    pub key_path: Option<PathBuf>,

    #[command(flatten)]
    pub picker: RuntimeArgs,
}

impl Args {
    pub fn to_options(&self) -> anyhow::Result<ServeOptions> {
        if !self.secure_serving && (self.cert_path.is_some() || self.key_path.is_some()) {
            anyhow::bail!("--cert-path/--key-path need --secure-serving");
        }
        // Envoy's ORIGINAL_DST cluster connects to the picked address as given: no DNS.
        for e in &self.picker.endpoints {
            if e.parse::<SocketAddr>().is_err() {
                anyhow::bail!(
                    "--endpoint {e}: epp serve needs ip:port (Envoy's ORIGINAL_DST cluster connects to the picked address as given and does not resolve host names)"
                );
            }
        }
        // Neither file: self-signed. Both: loaded now, re-read every 10 s.
        let tls = self.secure_serving.then(|| TlsSettings {
            cert_file: self.cert_path.clone(),
            key_file: self.key_path.clone(),
            ..Default::default()
        });
        Ok(ServeOptions {
            tls,
            grpc_addr: SocketAddr::new(self.grpc_host, self.grpc_port),
            grpc_health_addr: SocketAddr::new(self.grpc_host, self.grpc_health_port),
            extproc: ExtProcConfig {
                test_hooks: self.conformance_test_hooks,
                fallbacks: self.destination_fallbacks as usize,
                max_body_bytes: self.max_body_bytes as usize,
                max_streams: self.max_concurrent_streams as usize,
                stream_idle_timeout: self.stream_idle_timeout,
            },
            picker: self.picker.to_options()?,
        })
    }
}

pub async fn run(args: Args) -> anyhow::Result<ExitCode> {
    let opts = args.to_options()?;
    tracing::info!(version = env!("CARGO_PKG_VERSION"), "epp serve starting");
    let shutdown = Shutdown::on_signal();
    let handle = spawn_with_shutdown(opts, shutdown).await?;
    handle.wait().await;
    Ok(ExitCode::SUCCESS)
}

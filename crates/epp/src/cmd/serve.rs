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
use super::goflags::go_bool;

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

    /// Serve the ext_proc port over TLS (ALPN h2). Without --cert-path a self-signed certificate
    /// is generated at start-up (the gateway must then skip verification, as Envoy-based
    /// gateways do for the EPP). Default: true inside a Kubernetes cluster (what llm-d-router
    /// does and the gateways there expect), false elsewhere; see docs/envoy.md.
    #[arg(long, value_name = "BOOL", num_args = 0..=1, require_equals = true, default_missing_value = "true", value_parser = go_bool)]
    pub secure_serving: Option<bool>,

    /// Certificate for --secure-serving: a directory holding `tls.crt` and `tls.key` (as
    /// llm-d-router and GAIE read it), or a PEM certificate file with --key-path.
    #[arg(long, value_name = "DIR|FILE")]
    pub cert_path: Option<PathBuf>,

    /// PEM private key, when --cert-path names the certificate file itself.
    #[arg(long, value_name = "FILE", requires = "cert_path")]
    pub key_path: Option<PathBuf>,

    /// Re-read the certificate every 10 s and serve a changed pair to new connections (a broken
    /// one is refused, the old one kept). Off: loaded once at start-up.
    #[arg(long, value_name = "BOOL", num_args = 0..=1, require_equals = true, default_missing_value = "true", default_value = "true", action = clap::ArgAction::Set, value_parser = go_bool)]
    pub enable_cert_reload: bool,

    /// Add each destination's scheduler score to the `envoy.lb` dynamic metadata
    /// (`x-gateway-destination-endpoint-scores`: address → score).
    #[arg(long, value_name = "BOOL", num_args = 0..=1, require_equals = true, default_missing_value = "true", default_value = "false", action = clap::ArgAction::Set, value_parser = go_bool)]
    pub emit_endpoint_scores: bool,

    /// Ignore the gateway's `x-gateway-destination-endpoint-subset` hint (pick from the whole
    /// pool).
    #[arg(long, value_name = "BOOL", num_args = 0..=1, require_equals = true, default_missing_value = "true", default_value = "false", action = clap::ArgAction::Set, value_parser = go_bool)]
    pub disable_endpoint_subset_filter: bool,

    /// Largest gRPC message accepted from the gateway (e.g. `10MiB`, `25MB`). Default: the body
    /// limit plus 1 MiB.
    #[arg(long, value_name = "SIZE", value_parser = super::goflags::byte_size)]
    pub grpc_max_recv_msg_size: Option<usize>,

    /// Largest gRPC message sent to the gateway (e.g. `10MiB`). Default: unlimited (bodies go
    /// back in 64 KiB pieces).
    #[arg(long, value_name = "SIZE", value_parser = super::goflags::byte_size)]
    pub grpc_max_send_msg_size: Option<usize>,

    /// Serve the gRPC health service on the ext_proc port too (it is always served on
    /// --grpc-health-port). llm-d-router's flag; on by default here.
    #[arg(long, value_name = "BOOL", num_args = 0..=1, require_equals = true, default_missing_value = "true", default_value = "true", action = clap::ArgAction::Set, value_parser = go_bool)]
    pub health_checking: bool,

    #[command(flatten)]
    pub llmd: super::common::LlmdArgs,

    #[command(flatten)]
    pub picker: RuntimeArgs,
}

impl Args {
    pub fn to_options(&self) -> anyhow::Result<ServeOptions> {
        let (secure, why) = match self.secure_serving {
            Some(v) => (v, "set by --secure-serving"),
            None if epp_core::k8s::in_cluster() => (
                true,
                "default inside a Kubernetes cluster (KUBERNETES_SERVICE_HOST is set)",
            ),
            None => (false, "default outside a Kubernetes cluster"),
        };
        tracing::info!(secure_serving = secure, reason = why, "ext_proc transport");
        if !secure && (self.cert_path.is_some() || self.key_path.is_some()) {
            anyhow::bail!("--cert-path/--key-path need --secure-serving=true");
        }
        if !self.health_checking {
            anyhow::bail!("--health-checking=false: epp always serves the gRPC health service (the gateway and the kubelet probe it); remove the flag");
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
        let (cert_file, key_file) = match (&self.cert_path, &self.key_path) {
            (Some(c), None) => {
                if !c.is_dir() {
                    anyhow::bail!(
                        "--cert-path {}: not a directory holding tls.crt and tls.key (for a certificate file, give --key-path too)",
                        c.display()
                    );
                }
                (Some(c.join("tls.crt")), Some(c.join("tls.key")))
            }
            (c, k) => (c.clone(), k.clone()),
        };
        let tls = secure.then(|| {
            let mut t = TlsSettings {
                cert_file,
                key_file,
                ..Default::default()
            };
            if !self.enable_cert_reload {
                t.reload_interval = std::time::Duration::ZERO;
            }
            t
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
                emit_endpoint_scores: self.emit_endpoint_scores,
                ignore_subset: self.disable_endpoint_subset_filter,
                max_recv_msg_bytes: self.grpc_max_recv_msg_size,
                max_send_msg_bytes: self.grpc_max_send_msg_size,
            },
            picker: {
                let mut p = self.llmd.apply(&self.picker)?;
                if let Some(sd) = p
                    .discovery
                    .as_any()
                    .downcast_ref::<epp_core::discovery::StaticDiscovery>()
                {
                    p.discovery = std::sync::Arc::new(epp_core::discovery::StaticDiscovery {
                        require_ip: true,
                        ..sd.clone()
                    });
                }
                p
            },
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

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;
    use epp_core::datalayer::{MetricSpec, Scheme};

    #[derive(Parser, Debug)]
    struct T {
        #[command(flatten)]
        a: Args,
    }

    fn parse(args: &[&str]) -> Result<Args, String> {
        let argv = std::iter::once("epp").chain(args.iter().copied());
        T::try_parse_from(argv)
            .map(|t| t.a)
            .map_err(|e| e.to_string())
    }

    fn opts(args: &[&str]) -> Result<ServeOptions, String> {
        parse(args)?.to_options().map_err(|e| format!("{e:#}"))
    }

    const EP: [&str; 2] = ["--endpoint", "127.0.0.1:8000"];

    fn with<'a>(extra: &[&'a str]) -> Vec<&'a str> {
        EP.iter().copied().chain(extra.iter().copied()).collect()
    }

    #[tokio::test]
    async fn go_booleans_and_llm_d_flags_reach_the_options() {
        let o = opts(&with(&[
            "--secure-serving=false",
            "--emit-endpoint-scores=true",
            "--disable-endpoint-subset-filter",
            "--grpc-max-recv-msg-size=10MiB",
            "--metrics-port=19090",
            "--metrics-endpoint-auth=false",
            "--tracing=false",
            "--pool-group=inference.networking.k8s.io",
            "--drain-timeout=45s",
            "--refresh-metrics-interval=50ms",
        ]))
        .unwrap();
        assert!(o.tls.is_none());
        assert!(o.extproc.emit_endpoint_scores && o.extproc.ignore_subset);
        assert_eq!(o.extproc.max_recv_msg_bytes, Some(10 << 20));
        assert_eq!(o.picker.metrics_addr.unwrap().port(), 19090);
        assert_eq!(format!("{:?}", o.picker.metrics_auth), "none");
        assert_eq!(o.picker.grace_period, std::time::Duration::from_secs(45));
        assert_eq!(
            o.picker.scrape.interval,
            std::time::Duration::from_millis(50)
        );
        // Booleans need `=`: `--secure-serving false` leaves a stray argument.
        assert!(parse(&with(&["--secure-serving", "false"])).is_err());
        assert!(parse(&with(&["--emit-endpoint-scores=yes"]))
            .unwrap_err()
            .contains("is not a boolean"));
    }

    #[tokio::test]
    async fn secure_serving_reads_a_certificate_directory() {
        let dir = tempfile::tempdir().unwrap();
        let o = opts(&with(&[
            "--secure-serving=true",
            "--cert-path",
            dir.path().to_str().unwrap(),
            "--enable-cert-reload=false",
        ]))
        .unwrap();
        let t = o.tls.unwrap();
        assert_eq!(t.cert_file, Some(dir.path().join("tls.crt")));
        assert_eq!(t.key_file, Some(dir.path().join("tls.key")));
        assert!(t.reload_interval.is_zero());
        let f = dir.path().join("c.pem");
        std::fs::write(&f, "x").unwrap();
        let e = opts(&with(&[
            "--secure-serving",
            "--cert-path",
            f.to_str().unwrap(),
        ]))
        .unwrap_err();
        assert!(
            e.contains("not a directory holding tls.crt and tls.key"),
            "{e}"
        );
        let e = opts(&with(&["--secure-serving=false", "--cert-path", "/x"])).unwrap_err();
        assert!(e.contains("need --secure-serving=true"), "{e}");
        // Outside a cluster the default is plaintext (tests never run inside one).
        if !epp_core::k8s::in_cluster() {
            assert!(opts(&EP).unwrap().tls.is_none());
        }
    }

    #[tokio::test]
    async fn what_epp_cannot_do_is_refused_by_name() {
        for (args, want) in [
            (
                vec!["--tracing=true"],
                "--tracing=true: epp does not emit OpenTelemetry traces",
            ),
            (vec!["--health-checking=false"], "--health-checking=false"),
            (
                vec!["--pool-group=inference.networking.x-k8s.io"],
                "the v1alpha2 InferencePool is not supported",
            ),
            (
                vec!["--pool-group=example.com"],
                "unknown InferencePool group",
            ),
            (
                vec!["--metrics-endpoint-auth=true", "--metrics-auth=none"],
                "contradicts --metrics-auth",
            ),
            (
                vec!["--total-queued-requests-metric=bad name"],
                "--total-queued-requests-metric: not a valid metric specification",
            ),
        ] {
            let e = opts(&with(&args)).unwrap_err();
            assert!(e.contains(want), "{args:?}: {e}");
        }
        assert!(parse(&with(&["--grpc-max-recv-msg-size=lots"]))
            .unwrap_err()
            .contains("unknown size unit"));
    }

    #[tokio::test]
    async fn endpoints_file_entries_must_be_ip_port() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("eps.yaml");
        std::fs::write(
            &f,
            "endpoints:\n- address: 127.0.0.1:8000\n- address: vllm-1:8000\n",
        )
        .unwrap();
        let o = opts(&["--endpoints-file", f.to_str().unwrap()]).unwrap();
        let e = o.picker.validate().err().unwrap().to_string();
        assert!(
            e.contains("endpoints[1].address: \"vllm-1:8000\" is not ip:port"),
            "{e}"
        );
        std::fs::write(&f, "endpoints:\n- address: 127.0.0.1:8000\n").unwrap();
        let o = opts(&["--endpoints-file", f.to_str().unwrap()]).unwrap();
        assert!(o.picker.validate().is_ok());
    }

    #[tokio::test]
    async fn model_server_metrics_flags_become_scrape_overrides() {
        let o = opts(&with(&[
            "--model-server-metrics-port=9400",
            "--model-server-metrics-path=/stats",
            "--model-server-metrics-scheme=https",
            "--model-server-metrics-https-insecure-skip-verify=true",
            "--total-queued-requests-metric=q{tier=gold}",
            "--kv-cache-usage-percentage-metric=kv",
        ]))
        .unwrap();
        let f = &o.picker.scrape.overrides;
        assert_eq!(f.port, Some(9400));
        assert_eq!(f.path.as_deref(), Some("/stats"));
        assert_eq!(f.scheme, Some(Scheme::Https));
        assert_eq!(f.insecure_skip_verify, Some(true));
        assert_eq!(
            f.queued,
            Some(Some(MetricSpec {
                name: "q".into(),
                labels: vec![("tier".into(), "gold".into())]
            }))
        );
        assert_eq!(f.kv_usage.clone().flatten().unwrap().name, "kv");
        assert_eq!(f.running, None);
        // GAIE's chart: quoted values, and an empty spec that turns a series off.
        let o = opts(&with(&[
            "--total-queued-requests-metric=\"sglang:num_queue_reqs\"",
            "--lora-info-metric",
            "",
            "--model-server-metrics-path=\"/prometheus/metrics\"",
        ]))
        .unwrap();
        let f = &o.picker.scrape.overrides;
        assert_eq!(
            f.queued.clone().flatten().unwrap().name,
            "sglang:num_queue_reqs"
        );
        assert_eq!(f.lora, Some(None));
        assert_eq!(f.path.as_deref(), Some("/prometheus/metrics"));
    }
}

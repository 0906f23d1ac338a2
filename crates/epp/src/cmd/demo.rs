//! `epp demo`: the one-command tour. It is a preset comparison from `epp bench`: four simulated
//! vLLM servers whose caches together hold the workload's reusable prefixes but singly do not,
//! the picker in proxy mode in-process, a shared-prefix chat workload for a bounded time, then
//! round-robin and the default profile side by side. Nothing here is computed differently from
//! `epp bench`; only the defaults differ.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use epp_bench::compare::{self, CompareConfig, CompareEvent, Policy};
use epp_bench::workload::{SharedPrefix, WorkloadSpec};

use super::bench::{exit_code, print_report, stop_on_signal, SimArgs};

#[derive(clap::Args, Debug)]
pub struct Args {
    /// Seconds of load per policy (two policies run one after the other).
    #[arg(long, value_name = "SECONDS", default_value_t = 25.0)]
    pub duration: f64,

    /// Open-loop request rate (Poisson arrivals), requests per second.
    #[arg(long, default_value_t = 30.0)]
    pub rate: f64,

    /// Seed of the workload and the arrivals.
    #[arg(long, default_value_t = 42)]
    pub seed: u64,

    #[command(flatten)]
    pub sims: SimArgs,

    /// After the comparison, keep the default-profile picker and its simulators serving until
    /// Ctrl-C, so /metrics and the proxy can be explored.
    #[arg(long)]
    pub keep_running: bool,

    /// Also write the JSON report and SVG chart into this directory.
    #[arg(long, value_name = "DIR")]
    pub out: Option<PathBuf>,

    /// Do not draw progress bars (they are only drawn on a terminal anyway).
    #[arg(long)]
    pub no_progress: bool,
}

pub async fn run(args: Args) -> anyhow::Result<ExitCode> {
    if !(args.duration.is_finite() && args.duration > 0.0) {
        anyhow::bail!("--duration must be a positive number of seconds");
    }
    if !(args.rate.is_finite() && args.rate > 0.0) {
        anyhow::bail!("--rate must be a positive number of requests per second");
    }
    let policies = ["round-robin", "default"]
        .into_iter()
        .map(|n| Policy::preset(n).ok_or_else(|| anyhow::anyhow!("missing preset {n}")))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let cfg = CompareConfig {
        replicas: 1,
        shared_state: None,
        restart_backend_after: None,
        workload: WorkloadSpec::SharedPrefix(SharedPrefix::default()),
        seed: args.seed,
        mode: epp_bench::driver::LoadMode::OpenLoop { rate: args.rate },
        max_requests: None,
        duration: Some(Duration::from_secs_f64(args.duration)),
        sims: args.sims.setup()?,
        policies,
        progress: !args.no_progress,
        request_timeout: Duration::from_secs(60),
        keep_last: args.keep_running,
    };
    println!(
        "epp demo: {} simulated vLLM servers, the picker in proxy mode, a shared-prefix chat \
         workload at {} req/s for {} s per policy: round-robin, then the default profile.",
        cfg.sims.backends, args.rate, args.duration
    );
    let observer: compare::Observer = std::sync::Arc::new(|e: &CompareEvent| match e {
        CompareEvent::Sized(s) => println!(
            "caches: {} blocks per server; the workload's reusable prefixes need {} blocks \
             (all servers together hold them, no single one does)",
            s.kv_blocks_per_backend, s.reused_blocks
        ),
        CompareEvent::PolicyStarted {
            policy,
            proxy_url,
            metrics_url,
            backends,
        } => {
            let list: Vec<String> = backends.iter().map(|(n, a)| format!("{n}={a}")).collect();
            println!(
                "\n[{policy}] proxy {proxy_url}  backends {}",
                list.join(" ")
            );
            println!("[{policy}] watch the picker live: curl -s {metrics_url} | grep ^epp_");
        }
        CompareEvent::PolicyFinished { policy } => println!("[{policy}] done"),
    });
    let stop = stop_on_signal();
    let outcome = compare::compare(&cfg, Some(observer), stop.clone()).await?;
    println!();
    let stem = format!("demo-seed{}", args.seed);
    print_report(
        &outcome.report,
        args.out.as_deref().map(|dir| (dir, stem.as_str())),
    )?;
    if let Some(live) = outcome.live {
        println!(
            "\nstill serving (--keep-running), policy {}:\n  proxy    {}/v1/chat/completions\n  metrics  {}\n  \
             backends {}\nCtrl-C to stop.",
            live.policy,
            live.proxy_url,
            live.metrics_url,
            live.sims
                .iter()
                .map(|s| format!("http://{}", s.addr()))
                .collect::<Vec<_>>()
                .join(" ")
        );
        let mut stop = stop;
        while !*stop.borrow() {
            if stop.changed().await.is_err() {
                break;
            }
        }
        live.shutdown().await;
        return Ok(ExitCode::SUCCESS);
    }
    Ok(exit_code(&outcome.report))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(argv: &[&str]) -> Args {
        crate::cmd::bench::parse_flags("demo", argv).unwrap()
    }

    #[test]
    fn defaults_fit_in_a_minute() {
        let a = parse(&[]);
        // Two policies back to back stay within the 60 s the README promises.
        assert!(2.0 * a.duration <= 60.0);
        assert_eq!((a.duration, a.rate, a.seed), (25.0, 30.0, 42));
        assert!(!a.keep_running && a.out.is_none() && !a.no_progress);
        assert_eq!(a.sims.setup().unwrap().backends, 4);
        let a = parse(&["--keep-running", "--duration", "5", "--out", "d"]);
        assert!(a.keep_running);
        assert_eq!(a.duration, 5.0);
        assert_eq!(a.out, Some(PathBuf::from("d")));
    }

    #[tokio::test]
    async fn invalid_duration_and_rate_are_rejected_before_starting() {
        let a = parse(&["--duration", "0"]);
        let e = run(a).await.unwrap_err().to_string();
        assert_eq!(e, "--duration must be a positive number of seconds");
        let a = parse(&["--rate", "0"]);
        let e = run(a).await.unwrap_err().to_string();
        assert_eq!(e, "--rate must be a positive number of requests per second");
    }
}

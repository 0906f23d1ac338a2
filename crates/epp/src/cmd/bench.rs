//! `epp bench`: measure routing quality. Runs one seeded workload against every chosen policy,
//! each with fresh simulators and a fresh in-process picker, and prints a side-by-side table, a
//! JSON file and an SVG chart; or, with `--url`, load-tests an existing OpenAI-compatible server.
//! This module only maps flags onto `epp_bench` types; `epp demo` reuses the same pieces.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context as _;
use epp_bench::compare::{self, CompareConfig, CompareEvent, Policy, SimSetup, UrlRun};
use epp_bench::driver::LoadMode;
use epp_bench::report::{self, BenchReport};
use epp_bench::workload::{
    Api, HotSpot, LongPrompt, MultiTurn, NoSharing, SharedPrefix, Workload, WorkloadSpec,
};
use tokio::sync::watch;

/// Which workload generator to use.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum WorkloadKind {
    /// Groups of prompts sharing a system prompt (inference-perf's shared_prefix).
    SharedPrefix,
    /// Chat sessions whose every turn extends the previous one.
    MultiTurn,
    /// Unique prompts: nothing to reuse.
    NoSharing,
    /// One prefix group carries most of the traffic.
    HotSpot,
    /// Long prompts, short outputs (P/D disaggregation); --shared-prefix-fraction of each
    /// prompt is its group's system prompt.
    LongPrompt,
}

/// Request format.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum ApiKind {
    Chat,
    Completions,
}

/// Workload flags, shared with `epp demo`. Lengths are in tokens (1 token = 4 characters).
#[derive(clap::Args, Debug, Clone)]
pub struct WorkloadArgs {
    /// Workload generator.
    #[arg(long, value_enum, default_value_t = WorkloadKind::SharedPrefix)]
    pub workload: WorkloadKind,
    /// OpenAI API used by single-turn workloads (multi-turn is always chat).
    #[arg(long, value_enum, default_value_t = ApiKind::Chat)]
    pub api: ApiKind,
    /// Seed of the workload and of the arrival process: same seed, same requests.
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
    /// shared-prefix, hot-spot, long-prompt: number of prefix groups [default: 16 | 8 | 4].
    #[arg(long)]
    pub num_groups: Option<u32>,
    /// shared-prefix: prompts per group [default: 64].
    #[arg(long)]
    pub num_prompts_per_group: Option<u32>,
    /// Shared system prompt length [default: 1024; multi-turn 256].
    #[arg(long)]
    pub system_prompt_len: Option<u32>,
    /// shared-prefix, hot-spot: question length [default: 64].
    #[arg(long)]
    pub question_len: Option<u32>,
    /// Output tokens per request (max_tokens) [default: 16; multi-turn, long-prompt 32].
    #[arg(long)]
    pub output_len: Option<u32>,
    /// multi-turn: concurrent conversations [default: 16].
    #[arg(long)]
    pub num_sessions: Option<u32>,
    /// multi-turn: turns per conversation [default: 8].
    #[arg(long)]
    pub turns_per_session: Option<u32>,
    /// multi-turn: length of each user message [default: 96].
    #[arg(long)]
    pub user_len: Option<u32>,
    /// no-sharing, long-prompt: prompt length [default: 512 | 8192].
    #[arg(long)]
    pub prompt_len: Option<u32>,
    /// long-prompt: share of each prompt, 0..1, that is its group's system prompt (cached once
    /// the group has been seen) [default: 0].
    #[arg(long, value_name = "FRACTION")]
    pub shared_prefix_fraction: Option<f64>,
    /// hot-spot: share of requests in the hot group, 0..1 [default: 0.8].
    #[arg(long)]
    pub hot_fraction: Option<f64>,
}

impl WorkloadArgs {
    /// The workload spec these flags describe; flags that do not apply to it are an error.
    pub fn spec(&self) -> anyhow::Result<WorkloadSpec> {
        let api = match self.api {
            ApiKind::Chat => Api::Chat,
            ApiKind::Completions => Api::Completions,
        };
        let unused = |name: &str, set: bool| -> anyhow::Result<()> {
            if set {
                anyhow::bail!("--{name} does not apply to --workload {}", self.kind_name());
            }
            Ok(())
        };
        let spec = match self.workload {
            WorkloadKind::SharedPrefix => {
                unused(
                    "shared-prefix-fraction",
                    self.shared_prefix_fraction.is_some(),
                )?;
                unused("num-sessions", self.num_sessions.is_some())?;
                unused("turns-per-session", self.turns_per_session.is_some())?;
                unused("user-len", self.user_len.is_some())?;
                unused("prompt-len", self.prompt_len.is_some())?;
                unused("hot-fraction", self.hot_fraction.is_some())?;
                let d = SharedPrefix::default();
                WorkloadSpec::SharedPrefix(SharedPrefix {
                    num_groups: self.num_groups.unwrap_or(d.num_groups),
                    num_prompts_per_group: self
                        .num_prompts_per_group
                        .unwrap_or(d.num_prompts_per_group),
                    system_prompt_len: self.system_prompt_len.unwrap_or(d.system_prompt_len),
                    question_len: self.question_len.unwrap_or(d.question_len),
                    output_len: self.output_len.unwrap_or(d.output_len),
                    api,
                })
            }
            WorkloadKind::MultiTurn => {
                unused(
                    "shared-prefix-fraction",
                    self.shared_prefix_fraction.is_some(),
                )?;
                unused("num-groups", self.num_groups.is_some())?;
                unused(
                    "num-prompts-per-group",
                    self.num_prompts_per_group.is_some(),
                )?;
                unused("question-len", self.question_len.is_some())?;
                unused("prompt-len", self.prompt_len.is_some())?;
                unused("hot-fraction", self.hot_fraction.is_some())?;
                unused("api", self.api != ApiKind::Chat)?;
                let d = MultiTurn::default();
                WorkloadSpec::MultiTurn(MultiTurn {
                    num_sessions: self.num_sessions.unwrap_or(d.num_sessions),
                    turns_per_session: self.turns_per_session.unwrap_or(d.turns_per_session),
                    system_prompt_len: self.system_prompt_len.unwrap_or(d.system_prompt_len),
                    user_len: self.user_len.unwrap_or(d.user_len),
                    output_len: self.output_len.unwrap_or(d.output_len),
                })
            }
            WorkloadKind::NoSharing => {
                unused(
                    "shared-prefix-fraction",
                    self.shared_prefix_fraction.is_some(),
                )?;
                unused("num-groups", self.num_groups.is_some())?;
                unused(
                    "num-prompts-per-group",
                    self.num_prompts_per_group.is_some(),
                )?;
                unused("system-prompt-len", self.system_prompt_len.is_some())?;
                unused("question-len", self.question_len.is_some())?;
                unused("num-sessions", self.num_sessions.is_some())?;
                unused("turns-per-session", self.turns_per_session.is_some())?;
                unused("user-len", self.user_len.is_some())?;
                unused("hot-fraction", self.hot_fraction.is_some())?;
                let d = NoSharing::default();
                WorkloadSpec::NoSharing(NoSharing {
                    prompt_len: self.prompt_len.unwrap_or(d.prompt_len),
                    output_len: self.output_len.unwrap_or(d.output_len),
                    api,
                })
            }
            WorkloadKind::HotSpot => {
                unused(
                    "shared-prefix-fraction",
                    self.shared_prefix_fraction.is_some(),
                )?;
                unused(
                    "num-prompts-per-group",
                    self.num_prompts_per_group.is_some(),
                )?;
                unused("num-sessions", self.num_sessions.is_some())?;
                unused("turns-per-session", self.turns_per_session.is_some())?;
                unused("user-len", self.user_len.is_some())?;
                unused("prompt-len", self.prompt_len.is_some())?;
                let d = HotSpot::default();
                WorkloadSpec::HotSpot(HotSpot {
                    num_groups: self.num_groups.unwrap_or(d.num_groups),
                    hot_fraction: self.hot_fraction.unwrap_or(d.hot_fraction),
                    system_prompt_len: self.system_prompt_len.unwrap_or(d.system_prompt_len),
                    question_len: self.question_len.unwrap_or(d.question_len),
                    output_len: self.output_len.unwrap_or(d.output_len),
                    api,
                })
            }
            WorkloadKind::LongPrompt => {
                unused(
                    "num-prompts-per-group",
                    self.num_prompts_per_group.is_some(),
                )?;
                unused("system-prompt-len", self.system_prompt_len.is_some())?;
                unused("question-len", self.question_len.is_some())?;
                unused("num-sessions", self.num_sessions.is_some())?;
                unused("turns-per-session", self.turns_per_session.is_some())?;
                unused("user-len", self.user_len.is_some())?;
                unused("hot-fraction", self.hot_fraction.is_some())?;
                let d = LongPrompt::default();
                let shared_fraction = self.shared_prefix_fraction.unwrap_or(d.shared_fraction);
                if !(0.0..1.0).contains(&shared_fraction) {
                    anyhow::bail!("--shared-prefix-fraction must be at least 0 and below 1");
                }
                WorkloadSpec::LongPrompt(LongPrompt {
                    prompt_len: self.prompt_len.unwrap_or(d.prompt_len),
                    output_len: self.output_len.unwrap_or(d.output_len),
                    shared_fraction,
                    num_groups: self.num_groups.unwrap_or(d.num_groups),
                    api,
                })
            }
        };
        // Validate now, so a bad parameter is reported before anything starts.
        Workload::new(spec.clone(), self.seed)?;
        Ok(spec)
    }

    fn kind_name(&self) -> &'static str {
        match self.workload {
            WorkloadKind::SharedPrefix => "shared-prefix",
            WorkloadKind::MultiTurn => "multi-turn",
            WorkloadKind::NoSharing => "no-sharing",
            WorkloadKind::HotSpot => "hot-spot",
            WorkloadKind::LongPrompt => "long-prompt",
        }
    }
}

/// Load-shape flags, shared with `epp demo`.
#[derive(clap::Args, Debug, Clone)]
pub struct LoadArgs {
    /// Open loop: Poisson arrivals at this many requests per second.
    #[arg(long, conflicts_with = "concurrency")]
    pub rate: Option<f64>,
    /// Closed loop: this many concurrent workers, each sending when its last request finished.
    #[arg(long)]
    pub concurrency: Option<usize>,
    /// Stop issuing after this many requests (per policy).
    #[arg(long)]
    pub requests: Option<u64>,
    /// Stop issuing after this many seconds (per policy); in-flight requests may still finish.
    #[arg(long, value_name = "SECONDS")]
    pub duration: Option<f64>,
    /// Per-request timeout, in seconds.
    #[arg(long, value_name = "SECONDS", default_value_t = 60.0)]
    pub request_timeout: f64,
    /// Do not draw progress bars (they are only drawn on a terminal anyway).
    #[arg(long)]
    pub no_progress: bool,
}

impl LoadArgs {
    /// The load mode, with `default_rate` when neither --rate nor --concurrency is given.
    pub fn mode(&self, default_rate: f64) -> anyhow::Result<LoadMode> {
        match (self.rate, self.concurrency) {
            (Some(r), _) if !(r.is_finite() && r > 0.0) => {
                anyhow::bail!("--rate must be a positive number of requests per second")
            }
            (Some(r), _) => Ok(LoadMode::OpenLoop { rate: r }),
            (None, Some(0)) => anyhow::bail!("--concurrency must be at least 1"),
            (None, Some(c)) => Ok(LoadMode::ClosedLoop { concurrency: c }),
            (None, None) => Ok(LoadMode::OpenLoop { rate: default_rate }),
        }
    }

    /// `(requests, duration)`, with `default_requests` when neither bound is given.
    pub fn bounds(
        &self,
        default_requests: Option<u64>,
        default_duration: Option<f64>,
    ) -> anyhow::Result<(Option<u64>, Option<Duration>)> {
        let dur = |s: f64| -> anyhow::Result<Duration> {
            if !(s.is_finite() && s > 0.0) {
                anyhow::bail!("--duration must be a positive number of seconds");
            }
            Ok(Duration::from_secs_f64(s))
        };
        if self.requests == Some(0) {
            anyhow::bail!("--requests must be at least 1");
        }
        match (self.requests, self.duration) {
            (None, None) => Ok((default_requests, default_duration.map(dur).transpose()?)),
            (r, d) => Ok((r, d.map(dur).transpose()?)),
        }
    }

    pub fn timeout(&self) -> anyhow::Result<Duration> {
        if !(self.request_timeout.is_finite() && self.request_timeout > 0.0) {
            anyhow::bail!("--request-timeout must be a positive number of seconds");
        }
        Ok(Duration::from_secs_f64(self.request_timeout))
    }
}

/// Simulated-backend flags, shared with `epp demo`.
#[derive(clap::Args, Debug, Clone)]
pub struct SimArgs {
    /// Number of simulated backends started for each policy.
    #[arg(long, default_value_t = 4)]
    pub backends: usize,
    /// Running-sequence limit of each simulated backend.
    #[arg(long, default_value_t = 16)]
    pub max_num_seqs: usize,
    /// KV-cache blocks per backend. Default: sized from the workload so that all backends
    /// together hold --cache-factor times its reusable working set and one alone does not.
    #[arg(long)]
    pub kv_blocks: Option<u64>,
    /// With the default sizing: how many times the workload's reusable working set the
    /// backends' caches hold together (plus room for the running requests' own blocks). Below
    /// 1, caches must evict even under perfect routing. Ignored with --kv-blocks.
    #[arg(long, value_name = "FACTOR", default_value_t = 1.5)]
    pub cache_factor: f64,
    /// Simulated prefill cost per uncached prompt token, in ms.
    #[arg(long, default_value_t = 0.1)]
    pub prefill_per_token_ms: f64,
    /// Simulated fixed prefill cost per request, in ms.
    #[arg(long, default_value_t = 2.0)]
    pub prefill_overhead_ms: f64,
    /// Simulated time between output tokens, in ms.
    #[arg(long, default_value_t = 5.0)]
    pub inter_token_ms: f64,
    /// Simulated prefill/decode interference (`epp sim --prefill-interference-tokens`): while
    /// a simulator's requests compute P uncached prompt tokens, each inter-token gap of its other
    /// sequences grows by min(TOKENS, P) × --prefill-per-token-ms. 0: off.
    #[arg(long, value_name = "TOKENS", default_value_t = 0)]
    pub prefill_interference_tokens: usize,
}

impl SimArgs {
    pub fn setup(&self) -> anyhow::Result<SimSetup> {
        if self.backends == 0 {
            anyhow::bail!("--backends must be at least 1");
        }
        if self.max_num_seqs == 0 {
            anyhow::bail!("--max-num-seqs must be at least 1");
        }
        if self.kv_blocks == Some(0) {
            anyhow::bail!("--kv-blocks must be at least 1");
        }
        if !(self.cache_factor.is_finite() && self.cache_factor > 0.0 && self.cache_factor <= 100.0)
        {
            anyhow::bail!("--cache-factor must be a number above 0 and at most 100");
        }
        for (flag, v) in [
            ("--prefill-per-token-ms", self.prefill_per_token_ms),
            ("--prefill-overhead-ms", self.prefill_overhead_ms),
            ("--inter-token-ms", self.inter_token_ms),
        ] {
            if !(v.is_finite() && v >= 0.0) {
                anyhow::bail!("{flag} must be a non-negative number of milliseconds");
            }
        }
        let latency = epp_sim::LatencyModel {
            prefill_per_token_ms: self.prefill_per_token_ms,
            prefill_overhead_ms: self.prefill_overhead_ms,
            inter_token_ms: self.inter_token_ms,
            ..compare::bench_latency()
        };
        Ok(SimSetup {
            backends: self.backends,
            max_num_seqs: self.max_num_seqs,
            kv_blocks: self.kv_blocks,
            cache_factor: self.cache_factor,
            latency,
            prefill_interference_tokens: self.prefill_interference_tokens,
            ..SimSetup::default()
        })
    }
}

#[derive(clap::Args, Debug)]
pub struct Args {
    #[command(flatten)]
    pub workload: WorkloadArgs,

    #[command(flatten)]
    pub load: LoadArgs,

    #[command(flatten)]
    pub sims: SimArgs,

    /// Built-in policies to compare, comma-separated (random, round-robin, least-queue,
    /// prefix-only, default; precise, the default profile scored from the simulators' own KV
    /// events; and the prefill/decode ones, which need --prefill-backends: pd disaggregates when
    /// the decode pick would compute at least 1024 uncached prompt tokens
    /// (prefix-based-pd-decider), pd-always disaggregates every request).
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "random,round-robin,least-queue,prefix-only,default"
    )]
    pub policies: Vec<String>,

    /// An extra policy from an EndpointPickerConfig file (repeatable); named `file:<stem>`.
    #[arg(long, value_name = "FILE")]
    pub policy_config: Vec<PathBuf>,

    /// For policies that disaggregate prefill and decode (pd, pd-always, or a --policy-config
    /// with a disagg-profile-handler): K of the --backends simulators run --role prefill, the
    /// rest --role decode, labelled llm-d.ai/role for the picker. Other policies still run over
    /// --backends role-both simulators. Must be below --backends.
    #[arg(long, value_name = "K", conflicts_with = "url")]
    pub prefill_backends: Option<usize>,

    /// Picker replicas per policy, in front of the same simulators; requests are split
    /// round-robin between them. The report's picker metrics are the first replica's.
    #[arg(long, value_name = "N", default_value_t = 1, value_parser = clap::value_parser!(u64).range(1..=16))]
    pub replicas: u64,

    /// Redis the replicas share routing state through (`redis://127.0.0.1:6379`); without it,
    /// replicas share nothing. Each run uses its own key prefix.
    #[arg(long, value_name = "URL")]
    pub shared_state: Option<String>,

    /// This many seconds into each policy's run, restart the first simulator on the same ports:
    /// its cache empties and its KV-event sequence starts again, while the picker still
    /// remembers what it held. Requests it was serving fail and are counted.
    #[arg(long, value_name = "SECONDS", conflicts_with = "url")]
    pub restart_backend_after: Option<f64>,

    /// Directory for the JSON report and the SVG chart (created if missing).
    #[arg(long, value_name = "DIR", default_value = "bench-results")]
    pub out: PathBuf,

    /// Run the flow-control workload instead of the policy comparison: premium, standard and
    /// sheddable batch traffic at twice the pool's capacity, then two standard tenants (one
    /// with 10x the clients), through `epp proxy` with `featureGates: [flowControl]` over 2
    /// fresh simulators of 4 slots each (docs/benchmarks.md, "Flow control"). Writes
    /// flow-control.json to --out.
    #[arg(long, conflicts_with_all = ["url", "policies", "policy_config"])]
    pub flow_control: bool,

    /// Seconds each phase of --flow-control lasts (the unloaded baseline: half of it).
    #[arg(long, value_name = "SECONDS", default_value_t = 20, requires = "flow_control", value_parser = clap::value_parser!(u64).range(2..=3600))]
    pub flow_phase_seconds: u64,

    /// With --flow-control: hold lower priorities back with `priority-holdback-policy` at this
    /// `minCeiling` (batch dispatches while the pool is below it, standard below halfway to 1.0,
    /// premium until full) instead of the static usage limit.
    #[arg(long, value_name = "MIN_CEILING", requires = "flow_control")]
    pub flow_holdback: Option<f64>,

    /// Load-test this OpenAI-compatible base URL instead (no simulators, no in-process picker).
    #[arg(long, value_name = "URL", conflicts_with_all = ["policies", "policy_config"])]
    pub url: Option<String>,

    /// With --url: the model to request (default: the first one `GET /v1/models` lists).
    #[arg(long, requires = "url")]
    pub model: Option<String>,

    /// With --url: a picker's /metrics URL, to report its own hit rate and decision latency.
    #[arg(long, value_name = "URL", requires = "url")]
    pub metrics_url: Option<String>,

    /// With --url: every backend's own /metrics URL (repeat, or comma-separated). The
    /// per-backend counts and the balance then come from each server's finished-request counter
    /// (`vllm:request_success_total`), so a backend that got nothing counts as idle instead of
    /// being missing.
    #[arg(long, value_name = "URL", requires = "url", value_delimiter = ',')]
    pub backend_metrics: Vec<String>,
}

/// Ctrl-C (SIGINT) or SIGTERM turns the returned flag true; a second Ctrl-C exits at once.
pub fn stop_on_signal() -> watch::Receiver<bool> {
    let (tx, rx) = watch::channel(false);
    tokio::spawn(async move {
        if wait_for_signal().await {
            eprintln!("\nstopping: finishing with partial results (Ctrl-C again to quit now)");
            let _ = tx.send(true);
            if tokio::signal::ctrl_c().await.is_ok() {
                std::process::exit(130);
            }
        }
        // Keep the sender alive so receivers never see a closed channel as a stop.
        std::future::pending::<()>().await;
    });
    rx
}

async fn wait_for_signal() -> bool {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        let Ok(mut term) = signal(SignalKind::terminate()) else {
            return tokio::signal::ctrl_c().await.is_ok();
        };
        tokio::select! {
            r = tokio::signal::ctrl_c() => r.is_ok(),
            _ = term.recv() => true,
        }
    }
    #[cfg(not(unix))]
    {
        tokio::signal::ctrl_c().await.is_ok()
    }
}

/// Writes `<dir>/<stem>.json` and `<dir>/<stem>.svg`; returns their paths.
pub fn write_outputs(
    report: &BenchReport,
    dir: &Path,
    stem: &str,
) -> anyhow::Result<(PathBuf, PathBuf)> {
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let json = dir.join(format!("{stem}.json"));
    let svg = dir.join(format!("{stem}.svg"));
    report::write_json(report, &json)?;
    report::write_svg(report, &svg)?;
    Ok((json, svg))
}

/// Prints the side-by-side table and the targets to stdout; with `out` (a directory and a file
/// stem), also writes the JSON report and the SVG chart there (see [`write_outputs`]) and says
/// so. Shared by `epp bench` and `epp demo`.
pub fn print_report(report: &BenchReport, out: Option<(&Path, &str)>) -> anyhow::Result<()> {
    print!("{}", report::render_table(report));
    print!("{}", report::render_targets(&report.targets));
    if let Some((dir, stem)) = out {
        let (json, svg) = write_outputs(report, dir, stem)?;
        println!("wrote {} and {}", json.display(), svg.display());
    }
    Ok(())
}

/// 130 when Ctrl-C cut the run short (the report holds partial results), else success.
pub fn exit_code(report: &BenchReport) -> ExitCode {
    if report.interrupted {
        ExitCode::from(130)
    } else {
        ExitCode::SUCCESS
    }
}

/// Prints what the comparison is doing, to stderr.
pub fn print_events() -> compare::Observer {
    std::sync::Arc::new(|e: &CompareEvent| match e {
        CompareEvent::Sized(s) => eprintln!(
            "cache sizing: reusable working set {} blocks; {} blocks per backend",
            s.reused_blocks, s.kv_blocks_per_backend
        ),
        CompareEvent::PolicyStarted {
            policy,
            proxy_url,
            metrics_url,
            ..
        } => eprintln!("policy {policy}: proxy {proxy_url}, picker metrics {metrics_url}"),
        CompareEvent::PolicyFinished { .. } => {}
    })
}

pub async fn run(args: Args) -> anyhow::Result<ExitCode> {
    if args.flow_control {
        let b = epp_bench::flow::FlowBench {
            phase: Duration::from_secs(args.flow_phase_seconds),
            seed: args.workload.seed,
            holdback_min_ceiling: args.flow_holdback,
            ..Default::default()
        };
        let r = epp_bench::flow::run(&b).await?;
        print!("{}", epp_bench::flow::render(&b, &r));
        std::fs::create_dir_all(&args.out)
            .with_context(|| format!("--out {}", args.out.display()))?;
        let path = args.out.join("flow-control.json");
        std::fs::write(&path, serde_json::to_vec_pretty(&r)?)
            .with_context(|| format!("writing {}", path.display()))?;
        println!("wrote {}", path.display());
        return Ok(ExitCode::SUCCESS);
    }
    let spec = args.workload.spec()?;
    let mode = args.load.mode(40.0)?;
    let timeout = args.load.timeout()?;
    let stop = stop_on_signal();
    let report = if let Some(url) = &args.url {
        let (max_requests, duration) = args.load.bounds(Some(500), None)?;
        let run = UrlRun {
            base_url: url.clone(),
            model: args.model.clone(),
            metrics_url: args.metrics_url.clone(),
            workload: spec,
            seed: args.workload.seed,
            mode,
            max_requests,
            duration,
            request_timeout: timeout,
            progress: !args.load.no_progress,
            label: "target".into(),
            backend_metrics: args.backend_metrics.clone(),
        };
        compare::bench_url(&run, stop).await?
    } else {
        let mut policies = Vec::new();
        for name in &args.policies {
            let p = Policy::preset(name.trim()).with_context(|| {
                format!(
                    "unknown policy `{name}`; built-in policies are {}, {}, {}",
                    compare::PRESET_NAMES.join(", "),
                    compare::KV_EVENTS_PRESET_NAMES.join(", "),
                    compare::PD_PRESET_NAMES.join(", ")
                )
            })?;
            policies.push(p);
        }
        for path in &args.policy_config {
            policies.push(Policy::from_file(path)?);
        }
        if policies.is_empty() {
            anyhow::bail!("no policy to compare: give --policies and/or --policy-config");
        }
        let (max_requests, duration) = args.load.bounds(Some(800), None)?;
        let mut sims = args.sims.setup()?;
        if args.prefill_backends == Some(0) {
            anyhow::bail!("--prefill-backends must be at least 1");
        }
        sims.prefill_backends = args.prefill_backends.unwrap_or(0);
        compare::check_roles(&sims, &policies)?;
        let restart_backend_after = match args.restart_backend_after {
            None => None,
            Some(s) if s.is_finite() && s > 0.0 && s <= 86_400.0 => {
                Some(Duration::from_secs_f64(s))
            }
            Some(_) => {
                anyhow::bail!("--restart-backend-after must be above 0 and at most 86400 seconds")
            }
        };
        let cfg = CompareConfig {
            replicas: args.replicas as usize,
            shared_state: args.shared_state.clone(),
            restart_backend_after,
            workload: spec,
            seed: args.workload.seed,
            mode,
            max_requests,
            duration,
            sims,
            policies,
            progress: !args.load.no_progress,
            request_timeout: timeout,
            keep_last: false,
        };
        compare::compare(&cfg, Some(print_events()), stop)
            .await?
            .report
    };
    let stem = format!("bench-{}-seed{}", report.workload.name(), report.seed);
    print_report(&report, Some((&args.out, &stem)))?;
    Ok(exit_code(&report))
}

/// Parses a subcommand's flags alone, for the tests of `epp bench` and `epp demo`.
#[cfg(test)]
pub fn parse_flags<A: clap::Args>(command: &str, argv: &[&str]) -> Result<A, clap::Error> {
    use clap::Parser;

    #[derive(Parser, Debug)]
    struct Cli<A: clap::Args> {
        #[command(flatten)]
        args: A,
    }

    Cli::<A>::try_parse_from(std::iter::once(command).chain(argv.iter().copied())).map(|c| c.args)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(argv: &[&str]) -> Result<Args, clap::Error> {
        parse_flags("bench", argv)
    }

    #[test]
    fn defaults_compare_every_preset_on_shared_prefix() {
        let a = parse(&[]).unwrap();
        assert_eq!(
            a.policies,
            [
                "random",
                "round-robin",
                "least-queue",
                "prefix-only",
                "default"
            ]
        );
        assert_eq!(
            a.workload.spec().unwrap(),
            WorkloadSpec::SharedPrefix(SharedPrefix::default())
        );
        assert_eq!(
            a.load.mode(40.0).unwrap(),
            LoadMode::OpenLoop { rate: 40.0 }
        );
        assert_eq!(a.load.bounds(Some(800), None).unwrap(), (Some(800), None));
        let s = a.sims.setup().unwrap();
        assert_eq!((s.backends, s.max_num_seqs, s.kv_blocks), (4, 16, None));
        assert_eq!(s.latency.prefill_per_token_ms, 0.1);
        assert_eq!(a.out, PathBuf::from("bench-results"));
    }

    #[test]
    fn workload_flags_map_to_the_spec() {
        let a = parse(&[
            "--workload",
            "hot-spot",
            "--num-groups",
            "5",
            "--hot-fraction",
            "0.5",
            "--system-prompt-len",
            "100",
            "--question-len",
            "7",
            "--output-len",
            "3",
            "--api",
            "completions",
            "--seed",
            "9",
        ])
        .unwrap();
        assert_eq!(a.workload.seed, 9);
        assert_eq!(
            a.workload.spec().unwrap(),
            WorkloadSpec::HotSpot(HotSpot {
                num_groups: 5,
                hot_fraction: 0.5,
                system_prompt_len: 100,
                question_len: 7,
                output_len: 3,
                api: Api::Completions,
            })
        );
        let a = parse(&[
            "--workload",
            "multi-turn",
            "--num-sessions",
            "3",
            "--turns-per-session",
            "2",
            "--user-len",
            "10",
        ])
        .unwrap();
        assert_eq!(
            a.workload.spec().unwrap(),
            WorkloadSpec::MultiTurn(MultiTurn {
                num_sessions: 3,
                turns_per_session: 2,
                user_len: 10,
                ..MultiTurn::default()
            })
        );
        let a = parse(&["--workload", "no-sharing", "--prompt-len", "33"]).unwrap();
        assert_eq!(
            a.workload.spec().unwrap(),
            WorkloadSpec::NoSharing(NoSharing {
                prompt_len: 33,
                ..NoSharing::default()
            })
        );
    }

    #[test]
    fn misplaced_or_invalid_flags_are_named() {
        let a = parse(&["--workload", "no-sharing", "--num-groups", "3"]).unwrap();
        assert_eq!(
            a.workload.spec().unwrap_err().to_string(),
            "--num-groups does not apply to --workload no-sharing"
        );
        let a = parse(&["--hot-fraction", "0.5"]).unwrap();
        assert!(a.workload.spec().is_err());
        let a = parse(&["--workload", "hot-spot", "--hot-fraction", "2"]).unwrap();
        assert_eq!(
            a.workload.spec().unwrap_err().to_string(),
            "workload parameter `hot_fraction` must be between 0 and 1"
        );
        let a = parse(&["--rate", "0"]).unwrap();
        assert!(a.load.mode(1.0).is_err());
        let a = parse(&["--concurrency", "0"]).unwrap();
        assert!(a.load.mode(1.0).is_err());
        assert!(parse(&["--rate", "5", "--concurrency", "2"]).is_err());
        let a = parse(&["--duration=-1"]).unwrap();
        assert!(a.load.bounds(None, None).is_err());
        let a = parse(&["--backends", "0"]).unwrap();
        assert!(a.sims.setup().is_err());
        // --model and --metrics-url only make sense with --url.
        assert!(parse(&["--model", "m"]).is_err());
        assert!(parse(&["--url", "http://x", "--policies", "default"]).is_err());
    }

    #[test]
    fn long_prompt_and_pd_flags() {
        let a = parse(&[
            "--workload",
            "long-prompt",
            "--prompt-len",
            "4000",
            "--output-len",
            "8",
            "--shared-prefix-fraction",
            "0.9",
            "--num-groups",
            "2",
            "--prefill-backends",
            "1",
            "--prefill-interference-tokens",
            "2048",
            "--policies",
            "default,pd,pd-always",
        ])
        .unwrap();
        assert_eq!(
            a.workload.spec().unwrap(),
            WorkloadSpec::LongPrompt(LongPrompt {
                prompt_len: 4000,
                output_len: 8,
                shared_fraction: 0.9,
                num_groups: 2,
                api: Api::Chat,
            })
        );
        assert_eq!(a.prefill_backends, Some(1));
        assert_eq!(a.sims.setup().unwrap().prefill_interference_tokens, 2048);
        assert_eq!(
            parse(&["--workload", "long-prompt"])
                .unwrap()
                .workload
                .spec()
                .unwrap(),
            WorkloadSpec::LongPrompt(LongPrompt::default())
        );
        for (argv, err) in [
            (
                &["--shared-prefix-fraction", "0.5"][..],
                "--shared-prefix-fraction does not apply to --workload shared-prefix",
            ),
            (
                &["--workload", "long-prompt", "--shared-prefix-fraction", "1"][..],
                "--shared-prefix-fraction must be at least 0 and below 1",
            ),
            (
                &["--workload", "long-prompt", "--question-len", "3"][..],
                "--question-len does not apply to --workload long-prompt",
            ),
        ] {
            let a = parse(argv).unwrap();
            assert_eq!(a.workload.spec().unwrap_err().to_string(), err);
        }
        assert!(parse(&["--url", "http://x", "--prefill-backends", "1"]).is_err());
    }

    #[tokio::test]
    async fn pd_roles_are_refused_naming_the_flag() {
        let run_err = |argv: &[&str]| {
            let a = parse(argv).unwrap();
            async move { run(a).await.unwrap_err().to_string() }
        };
        let e = run_err(&["--policies", "pd"]).await;
        assert!(
            e.contains("policy pd disaggregates") && e.contains("--prefill-backends"),
            "{e}"
        );
        let e = run_err(&["--policies", "default", "--prefill-backends", "1"]).await;
        assert!(
            e.starts_with("--prefill-backends applies only to policies"),
            "{e}"
        );
        let e = run_err(&["--policies", "pd", "--prefill-backends", "4"]).await;
        assert!(
            e.starts_with("--prefill-backends 4 leaves no decode simulator"),
            "{e}"
        );
        let e = run_err(&["--policies", "pd", "--prefill-backends", "0"]).await;
        assert_eq!(e, "--prefill-backends must be at least 1");
        let e = run_err(&["--policies", "pdx"]).await;
        assert!(e.contains("pd, pd-always"), "{e}");
    }

    #[test]
    fn load_shape_flags() {
        let a = parse(&[
            "--concurrency",
            "8",
            "--duration",
            "2.5",
            "--requests",
            "10",
        ])
        .unwrap();
        assert_eq!(
            a.load.mode(40.0).unwrap(),
            LoadMode::ClosedLoop { concurrency: 8 }
        );
        assert_eq!(
            a.load.bounds(Some(800), None).unwrap(),
            (Some(10), Some(Duration::from_millis(2500)))
        );
        let a = parse(&[
            "--policies",
            "default,round-robin",
            "--policy-config",
            "x.yaml",
        ])
        .unwrap();
        assert_eq!(a.policies, ["default", "round-robin"]);
        assert_eq!(a.policy_config, [PathBuf::from("x.yaml")]);
    }
}

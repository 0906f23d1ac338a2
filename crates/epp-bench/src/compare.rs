//! Policy comparison: for each routing policy, start fresh simulated backends and a fresh picker
//! (proxy mode, in-process), drive the same seeded workload through it, and collect a
//! [`PolicyRun`]. `epp bench` runs every preset; `epp demo` runs round-robin against the default
//! profile. Everything is torn down between policies so no policy inherits a warm cache.
//!
//! Cache sizing follows the benchmark's premise: the backends' caches *together* hold the reusable
//! working set but no single backend does, so where a request lands decides whether it hits.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use crate::driver::{run_load, LoadConfig, LoadMode};
use crate::ideal::{block_hashes, prompt_tokens, IdealTracker, BLOCK_TOKENS};
use crate::picker_metrics;
use crate::report::{BenchReport, PolicyRun, SetupInfo};
use crate::stats::{set_backend_counts, summarize, Backend};
use crate::workload::{Workload, WorkloadSpec};

/// A routing policy: a name for reports and the `EndpointPickerConfig` YAML that implements it.
#[derive(Clone, Debug, PartialEq)]
pub struct Policy {
    pub name: String,
    pub config_yaml: String,
}

/// Names of the built-in policies, in report order.
pub const PRESET_NAMES: [&str; 5] = [
    "random",
    "round-robin",
    "least-queue",
    "prefix-only",
    "default",
];

/// Names of the built-in prefill/decode policies: they run over `--prefill-backends` prefill
/// simulators and the rest decode ones (see [`SimSetup::prefill_backends`]).
pub const PD_PRESET_NAMES: [&str; 2] = ["pd", "pd-always"];

/// Names of the built-in policies that route from the simulators' own KV events: each run's
/// simulators publish them (simulator `i` on the run's base port + `i`) and the policy's
/// `precise-prefix-cache-producer` subscribes to every one (see [`Policy::reads_kv_events`]).
pub const KV_EVENTS_PRESET_NAMES: [&str; 1] = ["precise"];

/// The `precise` policy: the default profile (epp's `default` preset) with its prefix scorer
/// fed by `precise-prefix-cache-producer` (token ids from the first simulator's render
/// endpoint, picks indexed speculatively until the engine's event confirms them) instead of the
/// approximate index. The ports and the render URL are placeholders the comparison replaces
/// with its simulators' (see [`bind_to_sims`]).
fn precise_yaml() -> String {
    use epp_core::config::{EndpointPickerConfig, PluginSpec};
    use serde_json::json;
    let mut c = EndpointPickerConfig::from_yaml(epp_core::config::presets::DEFAULT)
        .expect("the default preset parses");
    for p in &mut c.plugins {
        if p.type_ == "prefix-cache-scorer" {
            p.parameters =
                Some(json!({"prefixMatchInfoProducerName": "precise-prefix-cache-producer"}));
        }
    }
    let plugin = |t: &str, params| PluginSpec {
        name: None,
        type_: t.to_owned(),
        parameters: Some(params),
    };
    c.plugins.splice(
        0..0,
        [
            plugin(
                "token-producer",
                json!({"modelName": "sim-model", "vllm": {"url": "http://127.0.0.1:8000"}}),
            ),
            plugin(
                "precise-prefix-cache-producer",
                json!({
                    "tokenProcessorConfig": {"blockSizeTokens": 16},
                    "speculativeIndexing": true,
                    "kvEventsConfig": {"podDiscoveryConfig": {"socketPort": 5557, "replaySocketPort": 5558}},
                }),
            ),
        ],
    );
    c.to_yaml()
}

/// Uncached prompt tokens on the decode pick from which the `pd` policy disaggregates: 1,024
/// tokens cost about 100 ms to compute at the benchmarks' 0.1 ms per token, against 64 blocks
/// × 0.08 ms = 5 ms to read them, and a long prefill slows the decode pick's other sequences.
pub const PD_NON_CACHED_TOKENS: u32 = 1024;

/// The `pd` and `pd-always` policies: the default profile's scorers in a `prefill` profile
/// (over `prefill-filter`) and a `decode` profile (over `decode-filter`), with the
/// disagg-profile-handler deciding per request through `decider`. The prefix scorer matches up
/// to 1,024 blocks (16,384 tokens), enough for the long-prompt workload.
fn pd_yaml(decider: &str, decider_params: &str) -> String {
    let profile = |name: &str, filter: &str| {
        format!(
            "- name: {name}
  plugins:
  - pluginRef: {filter}
  - pluginRef: prefix-cache-scorer
    weight: 3
  - pluginRef: queue-scorer
    weight: 2
  - pluginRef: kv-cache-utilization-scorer
    weight: 2
  - pluginRef: active-request-scorer
    weight: 3
  - pluginRef: max-score-picker
"
        )
    };
    format!(
        "apiVersion: llm-d.ai/v1alpha1
kind: EndpointPickerConfig
plugins:
- type: prefix-cache-scorer
  parameters:
    blockSizeTokens: 16
    maxPrefixBlocksToMatch: 1024
    lruCapacityPerServer: 31250
- type: queue-scorer
- type: kv-cache-utilization-scorer
- type: active-request-scorer
  parameters:
    idleThreshold: 2
- type: max-score-picker
- type: prefill-filter
- type: decode-filter
- type: {decider}{decider_params}
- type: disagg-profile-handler
  parameters:
    deciders:
      prefill: {decider}
schedulingProfiles:
{}{}",
        profile("prefill", "prefill-filter"),
        profile("decode", "decode-filter"),
    )
}

impl Policy {
    /// A built-in policy: one of [`PRESET_NAMES`] (epp's presets) or [`PD_PRESET_NAMES`]
    /// (`pd`: prefix-based-pd-decider with `nonCachedTokens` [`PD_NON_CACHED_TOKENS`];
    /// `pd-always`: always-disagg-pd-decider).
    pub fn preset(name: &str) -> Option<Policy> {
        let yaml = match name {
            "pd" => pd_yaml(
                "prefix-based-pd-decider",
                &format!("\n  parameters:\n    nonCachedTokens: {PD_NON_CACHED_TOKENS}"),
            ),
            "pd-always" => pd_yaml("always-disagg-pd-decider", ""),
            "precise" => precise_yaml(),
            _ => epp_core::config::presets::by_name(name)?.to_owned(),
        };
        Some(Policy {
            name: name.to_owned(),
            config_yaml: yaml,
        })
    }

    /// Whether the policy splits requests into prefill and decode stages (its config has a
    /// `disagg-profile-handler` or `pd-profile-handler`): such a policy runs over prefill and
    /// decode simulators.
    pub fn disaggregates(&self) -> bool {
        epp_core::config::EndpointPickerConfig::from_yaml(&self.config_yaml).is_ok_and(|c| {
            c.plugins
                .iter()
                .any(|p| p.type_ == "disagg-profile-handler" || p.type_ == "pd-profile-handler")
        })
    }

    /// Whether the policy routes from KV events (its config has a
    /// `precise-prefix-cache-producer`): its simulators then publish them, and the comparison
    /// points the producer at them ([`bind_to_sims`]).
    pub fn reads_kv_events(&self) -> bool {
        epp_core::config::EndpointPickerConfig::from_yaml(&self.config_yaml).is_ok_and(|c| {
            c.plugins
                .iter()
                .any(|p| p.type_ == "precise-prefix-cache-producer")
        })
    }

    /// A policy from an `EndpointPickerConfig` file, named after the file.
    pub fn from_file(path: &Path) -> anyhow::Result<Policy> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read policy config {}", path.display()))?;
        epp_core::config::EndpointPickerConfig::from_yaml(&text)
            .map_err(|e| anyhow::anyhow!("invalid policy config {}: {e}", path.display()))?;
        let stem = path
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_else(|| "custom".into());
        Ok(Policy {
            name: format!("file:{stem}"),
            config_yaml: text,
        })
    }
}

/// How the simulated backends are built.
#[derive(Clone, Debug)]
pub struct SimSetup {
    pub backends: usize,
    pub model: String,
    pub max_num_seqs: usize,
    pub latency: epp_sim::LatencyModel,
    /// KV capacity per backend; `None` sizes it from the workload (see [`size_caches`]).
    pub kv_blocks: Option<u64>,
    /// Together the caches hold `cache_factor` x the reusable working set (plus room for the
    /// running requests' private blocks). Below 1 the caches must evict even under perfect
    /// routing; at the number of backends or more, one backend holds it all.
    pub cache_factor: f64,
    /// For policies that disaggregate ([`Policy::disaggregates`]): this many of the `backends`
    /// simulators run `--role prefill` (named `prefill-<i>`) and the rest `--role decode`
    /// (`decode-<i>`), labelled `llm-d.ai/role` in the endpoints the picker sees. Other
    /// policies run over `backends` role-`both` simulators (`sim-<i>`). 0: no P/D policy may run.
    pub prefill_backends: usize,
    /// Every simulator's `--prefill-interference-tokens` (0: off).
    pub prefill_interference_tokens: usize,
}

impl Default for SimSetup {
    fn default() -> Self {
        Self {
            backends: 4,
            model: "sim-model".into(),
            max_num_seqs: 16,
            latency: bench_latency(),
            kv_blocks: None,
            cache_factor: 1.5,
            prefill_backends: 0,
            prefill_interference_tokens: 0,
        }
    }
}

/// Simulator latencies used by benchmarks: prefill dominates TTFT (0.1 ms per uncached token,
/// so a 1,000-token miss costs 100 ms), decoding is quick (5 ms per token), so cache hits show up
/// in TTFT while a run of hundreds of requests still takes seconds.
pub fn bench_latency() -> epp_sim::LatencyModel {
    epp_sim::LatencyModel {
        prefill_overhead_ms: 2.0,
        prefill_per_token_ms: 0.1,
        inter_token_ms: 5.0,
        inter_token_per_seq_ms: 0.1,
        jitter: 0.0,
    }
}

/// Cache sizing derived from a workload (all counts in blocks of 16 tokens).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Sizing {
    /// Requests the sizing looked at.
    pub requests: u64,
    /// Distinct full blocks over those requests.
    pub distinct_blocks: u64,
    /// Distinct blocks that occur in at least two requests: the reusable working set.
    pub reused_blocks: u64,
    /// Largest number of blocks one request needs beyond reusable ones (its own prompt tail and
    /// its output).
    pub max_private_blocks: u64,
    /// Largest number of blocks one request needs in total.
    pub max_request_blocks: u64,
    /// Chosen capacity per backend.
    pub kv_blocks_per_backend: u64,
}

/// Sizes per-backend caches so that together they hold `factor` x the reusable working set but a
/// single one does not: `ceil(factor * reused / backends) + max_num_seqs * max_private`, and at
/// least twice the largest request.
pub fn size_caches(
    workload: &Workload,
    requests: u64,
    backends: usize,
    max_num_seqs: usize,
    factor: f64,
) -> Sizing {
    let mut counts: HashMap<u64, u32> = HashMap::new();
    let mut per_request: Vec<(Vec<u64>, u64)> = Vec::with_capacity(requests as usize);
    for r in workload.take(requests) {
        let hashes: Vec<u64> = block_hashes(&r.prompt_text).collect();
        for h in &hashes {
            *counts.entry(*h).or_insert(0) += 1;
        }
        let total_blocks =
            (prompt_tokens(&r.prompt_text) + u64::from(r.max_tokens)).div_ceil(BLOCK_TOKENS as u64);
        per_request.push((hashes, total_blocks));
    }
    let reused = counts.values().filter(|c| **c >= 2).count() as u64;
    let mut max_private = 0;
    let mut max_total = 0;
    for (hashes, total) in &per_request {
        let shared = hashes.iter().filter(|h| counts[h] >= 2).count() as u64;
        max_private = max_private.max(total.saturating_sub(shared));
        max_total = max_total.max(*total);
    }
    let spread = (factor * reused as f64 / backends.max(1) as f64).ceil() as u64;
    let cap = (spread + max_num_seqs as u64 * max_private)
        .max(2 * max_total)
        .max(1);
    Sizing {
        requests,
        distinct_blocks: counts.len() as u64,
        reused_blocks: reused,
        max_private_blocks: max_private,
        max_request_blocks: max_total,
        kv_blocks_per_backend: cap,
    }
}

/// Parameters of a comparison.
#[derive(Clone, Debug)]
pub struct CompareConfig {
    pub workload: WorkloadSpec,
    pub seed: u64,
    pub mode: LoadMode,
    pub max_requests: Option<u64>,
    pub duration: Option<Duration>,
    pub sims: SimSetup,
    pub policies: Vec<Policy>,
    pub progress: bool,
    pub request_timeout: Duration,
    /// Keep the last policy's picker and simulators running and return them.
    pub keep_last: bool,
    /// Picker replicas in front of the same simulators, requests split round-robin between
    /// them (1: a single picker).
    pub replicas: usize,
    /// Redis URL the replicas share routing state through (`None`: they share nothing).
    pub shared_state: Option<String>,
    /// This long into each policy's run, the first simulator restarts (see
    /// [`epp_sim::SimServer::restart`]): its cache is empty and its KV-event sequence starts
    /// again, while the picker still remembers what it held.
    pub restart_backend_after: Option<Duration>,
}

/// Progress notifications, so a front-end can print where things are while they run.
#[derive(Clone, Debug)]
pub enum CompareEvent {
    Sized(Sizing),
    PolicyStarted {
        policy: String,
        proxy_url: String,
        metrics_url: String,
        backends: Vec<(String, SocketAddr)>,
    },
    PolicyFinished {
        policy: String,
    },
}

/// Receives [`CompareEvent`]s.
pub type Observer = Arc<dyn Fn(&CompareEvent) + Send + Sync>;

/// A picker and its simulators left running after the comparison (`--keep-running`).
pub struct LiveStack {
    pub policy: String,
    pub proxy_url: String,
    pub metrics_url: String,
    pub sims: Vec<epp_sim::SimServer>,
    picker: PickerHandle,
}

impl LiveStack {
    pub async fn shutdown(self) {
        self.picker.shutdown().await;
        for s in self.sims {
            s.shutdown().await;
        }
    }
}

/// The comparison's results, plus what `keep_last` kept running.
pub struct CompareOutcome {
    pub report: BenchReport,
    pub live: Option<LiveStack>,
}

/// How many requests a run is expected to issue (for cache sizing).
fn expected_requests(cfg: &CompareConfig, w: &Workload) -> u64 {
    let by_time = cfg.duration.map(|d| match cfg.mode {
        LoadMode::OpenLoop { rate } => (rate * d.as_secs_f64()).ceil() as u64,
        // Unknown speed: assume one pass over the data set, or a couple of thousand requests.
        LoadMode::ClosedLoop { .. } => w.pass_len().unwrap_or(2000),
    });
    match (cfg.max_requests, by_time) {
        (Some(n), Some(t)) => n.min(t),
        (Some(n), None) => n,
        (None, Some(t)) => t,
        (None, None) => 1000,
    }
    .clamp(1, 20_000)
}

/// Runs every policy in `cfg.policies` in turn. A stop signal ends the current policy's run
/// (reported as partial) and skips the rest.
pub async fn compare(
    cfg: &CompareConfig,
    observer: Option<Observer>,
    stop: watch::Receiver<bool>,
) -> anyhow::Result<CompareOutcome> {
    anyhow::ensure!(!cfg.policies.is_empty(), "no policy to compare");
    anyhow::ensure!(cfg.sims.backends >= 1, "at least one backend is needed");
    check_roles(&cfg.sims, &cfg.policies)?;
    let workload = Arc::new(Workload::new(cfg.workload.clone(), cfg.seed)?);
    let sizing = size_caches(
        &workload,
        expected_requests(cfg, &workload),
        cfg.sims.backends,
        cfg.sims.max_num_seqs,
        cfg.sims.cache_factor,
    );
    let kv_blocks = cfg.sims.kv_blocks.unwrap_or(sizing.kv_blocks_per_backend);
    let notify = |e: CompareEvent| {
        if let Some(o) = &observer {
            o(&e);
        }
    };
    notify(CompareEvent::Sized(sizing.clone()));

    let mut runs = Vec::new();
    let mut live = None;
    let mut interrupted = false;
    for (i, policy) in cfg.policies.iter().enumerate() {
        if *stop.borrow() {
            interrupted = true;
            break;
        }
        let last = i + 1 == cfg.policies.len();
        let pd = policy.disaggregates();
        // Publishers at base + i, replay sockets at base + n + i.
        let n = cfg.sims.backends;
        let kv_base = if policy.reads_kv_events() {
            Some(free_port_run(2 * n)?)
        } else {
            None
        };
        let mut sims = start_sims(&cfg.sims, kv_blocks, pd, kv_base).await?;
        let config_yaml = match kv_base {
            Some(base) => match bind_to_sims(
                &policy.config_yaml,
                base,
                base + n as u16,
                &format!("http://{}", sims[0].addr()),
            ) {
                Ok(y) => y,
                Err(e) => {
                    for s in sims {
                        s.shutdown().await;
                    }
                    return Err(e.context(format!("policy {}", policy.name)));
                }
            },
            None => policy.config_yaml.clone(),
        };
        // start_sims puts the prefill servers first.
        let role = |i: usize| {
            let r = if i < cfg.sims.prefill_backends {
                epp_sim::Role::Prefill
            } else {
                epp_sim::Role::Decode
            };
            pd.then(|| r.as_str())
        };
        let endpoints: Vec<BenchEndpoint> = sims
            .iter()
            .enumerate()
            .map(|(i, s)| BenchEndpoint {
                addr: s.addr(),
                role: role(i),
                // The rank offsets the publisher port the producer dials (socketPort + rank).
                rank: if kv_base.is_some() { i as u16 } else { 0 },
            })
            .collect();
        let shared = cfg.shared_state.as_ref().map(|url| {
            // A fresh key prefix per run, so runs never read each other's state.
            let prefix = format!(
                "epp-bench:{}:{}:{}",
                policy.name,
                std::process::id(),
                epp_core::replication::now_ms()
            );
            (url.clone(), prefix)
        });
        let picker = match start_picker(&endpoints, &config_yaml, cfg.replicas.max(1), shared).await
        {
            Ok(p) => p,
            Err(e) => {
                for s in sims {
                    s.shutdown().await;
                }
                return Err(e.context(format!(
                    "cannot start the picker for policy {}",
                    policy.name
                )));
            }
        };
        let proxy_url = format!("http://{}", picker.proxy_addr);
        let metrics_url = format!("http://{}/metrics", picker.metrics_addr);
        notify(CompareEvent::PolicyStarted {
            policy: policy.name.clone(),
            proxy_url: proxy_url.clone(),
            metrics_url: metrics_url.clone(),
            backends: sims
                .iter()
                .map(|s| (s.name().to_owned(), s.addr()))
                .collect(),
        });
        let run = run_policy(cfg, &workload, policy, &mut sims, &picker, stop.clone()).await;
        notify(CompareEvent::PolicyFinished {
            policy: policy.name.clone(),
        });
        let keep = cfg.keep_last && last && run.is_ok();
        if keep {
            live = Some(LiveStack {
                policy: policy.name.clone(),
                proxy_url,
                metrics_url,
                sims,
                picker,
            });
        } else {
            picker.shutdown().await;
            for s in sims {
                s.shutdown().await;
            }
        }
        let run = run?;
        let stopped = run.stats.interrupted;
        runs.push(run);
        if stopped {
            interrupted = true;
            break;
        }
    }
    let mut report = BenchReport {
        workload: cfg.workload.clone(),
        seed: cfg.seed,
        mode: cfg.mode,
        max_requests: cfg.max_requests,
        duration_s: cfg.duration.map(|d| d.as_secs_f64()),
        setup: Some(SetupInfo {
            backends: cfg.sims.backends,
            kv_blocks_per_backend: kv_blocks,
            working_set_blocks: sizing.reused_blocks,
            max_num_seqs: cfg.sims.max_num_seqs,
            latency: serde_json::to_value(cfg.sims.latency).unwrap_or_default(),
            replicas: cfg.replicas.max(1),
            restart_backend_after_s: cfg.restart_backend_after.map(|d| d.as_secs_f64()),
        }),
        runs,
        interrupted,
        targets: Vec::new(),
    };
    report.targets = crate::report::check_targets(&report);
    Ok(CompareOutcome { report, live })
}

/// P/D policies need prefill simulators and at least one decode one; `prefill_backends` without
/// a P/D policy would do nothing. Errors name the flags.
pub fn check_roles(setup: &SimSetup, policies: &[Policy]) -> anyhow::Result<()> {
    let pd: Vec<&str> = policies
        .iter()
        .filter(|p| p.disaggregates())
        .map(|p| p.name.as_str())
        .collect();
    if setup.prefill_backends > 0 && setup.prefill_backends >= setup.backends {
        anyhow::bail!(
            "--prefill-backends {} leaves no decode simulator: it must be below --backends {}",
            setup.prefill_backends,
            setup.backends
        );
    }
    match (pd.is_empty(), setup.prefill_backends) {
        (false, 0) => anyhow::bail!(
            "policy {} disaggregates prefill and decode: give --prefill-backends (how many of \
             the --backends simulators prefill)",
            pd.join(", ")
        ),
        (true, k) if k > 0 => anyhow::bail!(
            "--prefill-backends applies only to policies that disaggregate prefill and decode \
             ({}, or a --policy-config with a disagg-profile-handler); none is in --policies",
            PD_PRESET_NAMES.join(", ")
        ),
        _ => Ok(()),
    }
}

/// The simulators of one run; with `kv_base`, simulator `i` publishes KV events on
/// `127.0.0.1:kv_base + i` and answers replay requests on `kv_base + backends + i`.
async fn start_sims(
    setup: &SimSetup,
    kv_blocks: u64,
    pd: bool,
    kv_base: Option<u16>,
) -> anyhow::Result<Vec<epp_sim::SimServer>> {
    let n = setup.backends as u16;
    let kv_events = |first: u16| match kv_base {
        Some(b) => epp_sim::KvEventsConfig {
            endpoint: Some(format!("tcp://127.0.0.1:{}", b + first)),
            replay_endpoint: Some(format!("tcp://127.0.0.1:{}", b + n + first)),
            ..epp_sim::KvEventsConfig::off()
        },
        None => epp_sim::KvEventsConfig::off(),
    };
    let base = epp_sim::SimConfig {
        model: setup.model.clone(),
        max_num_seqs: setup.max_num_seqs,
        num_gpu_blocks: kv_blocks as usize,
        latency: setup.latency,
        prefill_interference_tokens: setup.prefill_interference_tokens,
        shutdown_grace: Duration::from_secs(2),
        kv_events: kv_events(0),
        ..epp_sim::SimConfig::default()
    };
    let host = [127, 0, 0, 1].into();
    if !pd {
        return epp_sim::spawn_many(&base, "sim", host, 0, setup.backends).await;
    }
    let k = setup.prefill_backends;
    let prefill = epp_sim::SimConfig {
        role: epp_sim::Role::Prefill,
        ..base.clone()
    };
    let mut sims = epp_sim::spawn_many(&prefill, "prefill", host, 0, k).await?;
    let decode = epp_sim::SimConfig {
        role: epp_sim::Role::Decode,
        // Seeds after the prefill servers', as one pool of `backends` would have them.
        seed: base.seed.wrapping_add(k as u64),
        kv_events: kv_events(k as u16),
        ..base
    };
    match epp_sim::spawn_many(&decode, "decode", host, 0, setup.backends - k).await {
        Ok(d) => sims.extend(d),
        Err(e) => {
            for s in sims {
                s.shutdown().await;
            }
            return Err(e);
        }
    }
    Ok(sims)
}

/// A base port with `n` consecutive free loopback ports after it (checked by binding each, so a
/// port taken meanwhile is still possible but unlikely); bounded search.
fn free_port_run(n: usize) -> anyhow::Result<u16> {
    for _ in 0..50 {
        let base = std::net::TcpListener::bind(("127.0.0.1", 0))?
            .local_addr()?
            .port();
        if usize::from(base) + n > usize::from(u16::MAX) {
            continue;
        }
        let free =
            (0..n as u16).all(|i| std::net::TcpListener::bind(("127.0.0.1", base + i)).is_ok());
        if free {
            return Ok(base);
        }
    }
    anyhow::bail!("found no {n} consecutive free loopback ports for the simulators' KV events")
}

/// `config_yaml` pointed at a run's simulators: every `precise-prefix-cache-producer` dials
/// their publishers (`podDiscoveryConfig.socketPort` / `replaySocketPort`, each endpoint at its
/// rank's offset) and every `token-producer` with the `vllm` backend renders on `render_url`
/// (the simulators share one tokenizer). A producer given a central `zmqEndpoint` is refused:
/// the simulators publish on their own sockets.
pub fn bind_to_sims(
    config_yaml: &str,
    socket_port: u16,
    replay_port: u16,
    render_url: &str,
) -> anyhow::Result<String> {
    use serde_json::{json, Map, Value};
    let mut config = epp_core::config::EndpointPickerConfig::from_yaml(config_yaml)
        .map_err(|e| anyhow::anyhow!("invalid EndpointPickerConfig: {e}"))?;
    /// `m[key]` as a map, created when missing or null.
    fn child<'a>(
        m: &'a mut Map<String, Value>,
        key: &str,
    ) -> anyhow::Result<&'a mut Map<String, Value>> {
        let c = m.entry(key.to_owned()).or_insert_with(|| json!({}));
        if c.is_null() {
            *c = json!({});
        }
        c.as_object_mut()
            .ok_or_else(|| anyhow::anyhow!("{key} must be a map"))
    }
    for p in &mut config.plugins {
        if !matches!(
            p.type_.as_str(),
            "precise-prefix-cache-producer" | "token-producer"
        ) {
            continue;
        }
        let name = p.name().to_owned();
        let params = p.parameters.get_or_insert_with(|| json!({}));
        if params.is_null() {
            *params = json!({});
        }
        let Some(params) = params.as_object_mut() else {
            anyhow::bail!("plugin {name}: parameters must be a map");
        };
        match p.type_.as_str() {
            "precise-prefix-cache-producer" => {
                let kv = child(params, "kvEventsConfig")?;
                if kv
                    .get("zmqEndpoint")
                    .is_some_and(|v| v.as_str() != Some(""))
                {
                    anyhow::bail!(
                        "plugin {name}: kvEventsConfig.zmqEndpoint: the benchmark's simulators \
                         publish on their own sockets; leave it out"
                    );
                }
                let disc = child(kv, "podDiscoveryConfig")?;
                disc.insert("socketPort".into(), json!(socket_port));
                disc.insert("replaySocketPort".into(), json!(replay_port));
            }
            // `vllm`, or `modelName` alone (which selects it): render on the simulators.
            "token-producer"
                if params.contains_key("vllm")
                    || (params.contains_key("modelName")
                        && !params.contains_key("local")
                        && !params.contains_key("estimate")) =>
            {
                child(params, "vllm")?.insert("url".into(), json!(render_url));
            }
            _ => {}
        }
    }
    Ok(config.to_yaml())
}

/// What the simulators themselves counted over a run (read from their metrics in-process).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct SimTotals {
    /// Prompt tokens the simulators computed (`vllm:prompt_tokens_by_source_total`,
    /// `source="local_compute"`), on every role: the prefill work the pool did.
    pub computed_prompt_tokens: u64,
    /// Prompt tokens read from a prefill server (`source="external_kv_transfer"`).
    pub transferred_prompt_tokens: u64,
    /// P/D prefills the prefill servers ran (`epp_sim:kv_transfer_prefills_total`).
    pub kv_transfer_prefills: u64,
    /// Simulators restarted during the run (`--restart-backend-after`); their counts from
    /// before the restart are included above.
    #[serde(default)]
    pub restarts: u64,
}

/// Sums the counters of [`SimTotals`] over `sims`.
pub fn sim_totals(sims: &[epp_sim::SimServer]) -> SimTotals {
    let mut t = SimTotals::default();
    for s in sims {
        let Ok(samples) = epp_core::exposition::parse(&s.metrics_text()) else {
            continue;
        };
        for m in samples {
            let v = m.value.max(0.0) as u64;
            match (m.name.as_str(), m.label("source")) {
                ("vllm:prompt_tokens_by_source_total", Some("local_compute")) => {
                    t.computed_prompt_tokens += v
                }
                ("vllm:prompt_tokens_by_source_total", Some("external_kv_transfer")) => {
                    t.transferred_prompt_tokens += v
                }
                ("epp_sim:kv_transfer_prefills_total", _) => t.kv_transfer_prefills += v,
                _ => {}
            }
        }
    }
    t
}

async fn run_policy(
    cfg: &CompareConfig,
    workload: &Arc<Workload>,
    policy: &Policy,
    sims: &mut Vec<epp_sim::SimServer>,
    picker: &PickerHandle,
    stop: watch::Receiver<bool>,
) -> anyhow::Result<PolicyRun> {
    let http = crate::http::client();
    let metrics_url = &format!("http://{}/metrics", picker.metrics_addr);
    let kv_events = policy.reads_kv_events();
    for r in &picker.replicas {
        if let Some(m) = r.metrics_addr {
            let url = format!("http://{m}/metrics");
            wait_until_picker_sees(&http, &url, sims.len()).await;
            if kv_events {
                wait_until_events_flow(&http, &url).await;
            }
        }
    }
    let before = picker_metrics::scrape(&http, metrics_url)
        .await
        .unwrap_or_default();
    let mut load = LoadConfig::new(
        format!("http://{}", picker.proxy_addr),
        cfg.sims.model.clone(),
    );
    load.extra_base_urls = picker.replicas[1..]
        .iter()
        .map(|r| format!("http://{}", r.proxy_addr))
        .collect();
    load.mode = cfg.mode;
    load.max_requests = cfg.max_requests;
    load.duration = cfg.duration;
    load.seed = cfg.seed;
    load.request_timeout = cfg.request_timeout;
    load.progress = cfg.progress;
    load.label = policy.name.clone();
    // The first simulator restarts mid-run, if asked (not once the load is over); what it
    // counted before stays counted.
    let mut retired = SimTotals::default();
    let (done_tx, mut done) = watch::channel(false);
    let restart = async {
        let Some(after) = cfg.restart_backend_after else {
            return Ok(false);
        };
        let mut stop = stop.clone();
        tokio::select! {
            _ = tokio::time::sleep(after) => {}
            _ = stop.wait_for(|s| *s) => return Ok(false),
            _ = done.wait_for(|d| *d) => return Ok(false),
        }
        let old = sims.remove(0);
        retired = sim_totals(std::slice::from_ref(&old));
        let name = old.name().to_owned();
        let s = old.restart().await?;
        tracing::info!(backend = %name, "restarted mid-run");
        sims.insert(0, s);
        anyhow::Ok(true)
    };
    let load_run = async {
        let o = run_load(&load, workload.clone(), stop.clone()).await;
        let _ = done_tx.send(true);
        o
    };
    let (outcome, restarted) = tokio::join!(load_run, restart);
    let outcome = outcome?;
    let restarted = restarted?;
    let after = picker_metrics::scrape(&http, metrics_url).await;
    let mut totals = sim_totals(sims);
    totals.computed_prompt_tokens += retired.computed_prompt_tokens;
    totals.transferred_prompt_tokens += retired.transferred_prompt_tokens;
    totals.kv_transfer_prefills += retired.kv_transfer_prefills;
    totals.restarts = u64::from(restarted);
    let known: Vec<Backend> = sims
        .iter()
        .map(|s| Backend {
            name: s.name().to_owned(),
            aliases: vec![s.addr().to_string()],
        })
        .collect();
    let stats = summarize(&outcome, &known);
    let mut ideal = IdealTracker::new();
    for r in workload.take(outcome.issued) {
        ideal.observe(&r.prompt_text);
    }
    let (picker, note) = match after {
        Ok(snap) if snap.seen => (Some(snap.since(&before)), None),
        Ok(_) => (
            None,
            Some("the picker's /metrics has no epp_* series".to_owned()),
        ),
        Err(e) => (None, Some(format!("picker metrics unavailable: {e}"))),
    };
    Ok(PolicyRun {
        policy: policy.name.clone(),
        ideal: ideal.bound(),
        stats,
        picker,
        note,
        sims: Some(totals),
    })
}

/// Parameters of a load test against an existing OpenAI-compatible URL (no simulators, no
/// in-process picker).
#[derive(Clone, Debug)]
pub struct UrlRun {
    pub base_url: String,
    /// `None`: the first model listed by `GET /v1/models`.
    pub model: Option<String>,
    /// A picker's `/metrics` URL to read its own hit rate and decision latency from.
    pub metrics_url: Option<String>,
    pub workload: WorkloadSpec,
    pub seed: u64,
    pub mode: LoadMode,
    pub max_requests: Option<u64>,
    pub duration: Option<Duration>,
    pub request_timeout: Duration,
    pub progress: bool,
    /// Column name in the report.
    pub label: String,
    /// The backends' own `/metrics` URLs: when given, the per-backend counts and the balance
    /// come from their finished-request counters, so a backend that got nothing counts too.
    pub backend_metrics: Vec<String>,
}

/// The requests a model server finished, from its `/metrics`: vLLM's
/// `vllm:request_success_total` over every finish reason but `abort` (a client that went away).
pub async fn finished_requests(http: &crate::http::HttpClient, url: &str) -> anyhow::Result<u64> {
    let text = crate::http::get_text(http, url, Duration::from_secs(5))
        .await
        .with_context(|| format!("--backend-metrics {url}: cannot scrape it"))?;
    finished_requests_in(&text).with_context(|| format!("--backend-metrics {url}"))
}

/// [`finished_requests`] of one exposition.
pub fn finished_requests_in(text: &str) -> anyhow::Result<u64> {
    let samples = epp_core::exposition::parse(text)
        .map_err(|e| anyhow::anyhow!("not a Prometheus text exposition: {e}"))?;
    let mut seen = false;
    let mut n = 0.0;
    for s in &samples {
        if s.name == "vllm:request_success_total" || s.name == "vllm:request_success" {
            seen = true;
            if s.label("finished_reason") != Some("abort") {
                n += s.value;
            }
        }
    }
    anyhow::ensure!(
        seen,
        "no vllm:request_success_total series (is this a vLLM server's /metrics?)"
    );
    Ok(n.max(0.0) as u64)
}

/// A readable name for a backend's metrics URL: its `host:port`.
fn backend_name(url: &str) -> String {
    let rest = url.split_once("://").map_or(url, |(_, r)| r);
    rest.split('/').next().unwrap_or(rest).to_string()
}

/// Load-tests `run.base_url` with the workload and reports it as a single-column comparison.
pub async fn bench_url(run: &UrlRun, stop: watch::Receiver<bool>) -> anyhow::Result<BenchReport> {
    let workload = Arc::new(Workload::new(run.workload.clone(), run.seed)?);
    let http = crate::http::client();
    let base = crate::http::normalize_base_url(&run.base_url)?;
    let model = match &run.model {
        Some(m) => m.clone(),
        None => crate::http::list_models(&http, &base)
            .await
            .context("cannot ask the server for its models (give --model to skip this)")?
            .into_iter()
            .next()
            .context("the server lists no model; give --model")?,
    };
    let before = match &run.metrics_url {
        Some(u) => Some(
            picker_metrics::scrape(&http, u)
                .await
                .with_context(|| format!("cannot scrape {u}"))?,
        ),
        None => None,
    };
    let mut backends_before = Vec::with_capacity(run.backend_metrics.len());
    for u in &run.backend_metrics {
        backends_before.push(finished_requests(&http, u).await?);
    }
    let mut load = LoadConfig::new(base, model);
    load.mode = run.mode;
    load.max_requests = run.max_requests;
    load.duration = run.duration;
    load.seed = run.seed;
    load.request_timeout = run.request_timeout;
    load.progress = run.progress;
    load.label = run.label.clone();
    let outcome = run_load(&load, workload.clone(), stop).await?;
    let mut note = None;
    let picker = match (&run.metrics_url, before) {
        (Some(u), Some(before)) => match picker_metrics::scrape(&http, u).await {
            Ok(after) if after.seen => Some(after.since(&before)),
            Ok(_) => {
                note = Some(format!("{u} has no epp_* series"));
                None
            }
            Err(e) => {
                note = Some(e.to_string());
                None
            }
        },
        _ => None,
    };
    let mut stats = summarize(&outcome, &[]);
    if !run.backend_metrics.is_empty() {
        let mut counts = Vec::with_capacity(run.backend_metrics.len());
        for (u, before) in run.backend_metrics.iter().zip(&backends_before) {
            let after = finished_requests(&http, u).await?;
            // A counter that went back: the server restarted during the run.
            anyhow::ensure!(
                after >= *before,
                "--backend-metrics {u}: the finished-request counter went back ({before} to {after}): the server restarted during the run"
            );
            counts.push((backend_name(u), after - before));
        }
        let total: u64 = counts.iter().map(|(_, n)| n).sum();
        if total != stats.succeeded {
            let msg = format!(
                "the backends finished {total} requests, the load {} succeeded: other traffic reached them, or the list is not every backend",
                stats.succeeded
            );
            note = Some(match note {
                Some(n) => format!("{n}; {msg}"),
                None => msg,
            });
        }
        set_backend_counts(&mut stats, &counts);
    }
    let mut ideal = IdealTracker::new();
    for r in workload.take(outcome.issued) {
        ideal.observe(&r.prompt_text);
    }
    Ok(BenchReport {
        workload: run.workload.clone(),
        seed: run.seed,
        mode: run.mode,
        max_requests: run.max_requests,
        duration_s: run.duration.map(|d| d.as_secs_f64()),
        setup: None,
        interrupted: outcome.interrupted,
        runs: vec![PolicyRun {
            policy: run.label.clone(),
            ideal: ideal.bound(),
            stats,
            picker,
            note,
            sims: None,
        }],
        targets: Vec::new(),
    })
}

/// Waits (bounded) until the picker reports every backend healthy, so that no policy starts
/// with backends it has not scraped yet.
async fn wait_until_picker_sees(http: &crate::http::HttpClient, metrics_url: &str, n: usize) {
    for _ in 0..100 {
        if let Ok(text) = crate::http::get_text(http, metrics_url, Duration::from_secs(2)).await {
            let healthy = text
                .lines()
                .filter(|l| l.starts_with("epp_backend_health{") && l.contains("state=\"healthy\""))
                .filter(|l| l.rsplit(' ').next().and_then(|v| v.parse::<f64>().ok()) == Some(1.0))
                .count();
            if healthy >= n {
                return;
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tracing::warn!(
        metrics_url,
        "the picker did not report every backend healthy within 5 s; starting anyway"
    );
}

/// Waits (bounded) until the picker's precise producer has every endpoint's KV events flowing
/// (`epp_precise_prefix_endpoints_in_fallback` all zero), so that no run starts scored by the
/// approximate index while the subscriptions connect.
async fn wait_until_events_flow(http: &crate::http::HttpClient, metrics_url: &str) {
    for _ in 0..100 {
        if let Ok(text) = crate::http::get_text(http, metrics_url, Duration::from_secs(2)).await {
            if let Ok(samples) = epp_core::exposition::parse(&text) {
                let gauges: Vec<f64> = samples
                    .iter()
                    .filter(|s| s.name == "epp_precise_prefix_endpoints_in_fallback")
                    .map(|s| s.value)
                    .collect();
                if !gauges.is_empty() && gauges.iter().all(|v| *v == 0.0) {
                    return;
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tracing::warn!(
        metrics_url,
        "the picker's KV-event subscriptions were not all live within 5 s; starting anyway"
    );
}

/// One simulator as the picker is told of it.
struct BenchEndpoint {
    addr: SocketAddr,
    /// `llm-d.ai/role`, for P/D policies.
    role: Option<&'static str>,
    /// Data-parallel rank: the producer dials `socketPort + rank`.
    rank: u16,
}

/// A running in-process picker (proxy mode).
struct PickerHandle {
    /// The first replica's addresses (its `/metrics` is the one reported).
    proxy_addr: SocketAddr,
    metrics_addr: SocketAddr,
    replicas: Vec<epp_core::proxy::ProxyHandle>,
    /// Holds the endpoints file of labelled (P/D) endpoints while the picker runs.
    _endpoints_dir: Option<tempfile::TempDir>,
}

impl PickerHandle {
    async fn shutdown(self) {
        for r in self.replicas {
            r.stop().await;
        }
    }
}

/// Starts `replicas` pickers in proxy mode on loopback ports, in front of `endpoints` (each with
/// its `llm-d.ai/role` label, if any: labelled endpoints are given through an endpoints file),
/// with the policy `config_yaml`; with `shared` (Redis URL, key prefix) they share routing state.
async fn start_picker(
    endpoints: &[BenchEndpoint],
    config_yaml: &str,
    replicas: usize,
    shared: Option<(String, String)>,
) -> anyhow::Result<PickerHandle> {
    use epp_core::app::RuntimeOptions;
    use epp_core::discovery::StaticDiscovery;
    let config = epp_core::config::EndpointPickerConfig::from_yaml(config_yaml)
        .map_err(|e| anyhow::anyhow!("invalid EndpointPickerConfig: {e}"))?;
    let plain = endpoints.iter().all(|e| e.role.is_none() && e.rank == 0);
    let (static_endpoints, file, dir) = if !plain {
        let dir =
            tempfile::tempdir().context("cannot create a directory for the endpoints file")?;
        let path = dir.path().join("endpoints.yaml");
        let mut text = String::from("endpoints:\n");
        for e in endpoints {
            text += &format!("- address: {}\n", e.addr);
            if let Some(role) = e.role {
                text += &format!("  labels: {{llm-d.ai/role: {role}}}\n");
            }
            if e.rank > 0 {
                text += &format!("  rank: {}\n", e.rank);
            }
        }
        std::fs::write(&path, text).with_context(|| format!("cannot write {}", path.display()))?;
        (Vec::new(), Some(path), Some(dir))
    } else {
        let list = endpoints.iter().map(|e| e.addr.to_string()).collect();
        (list, None, None)
    };
    let loopback = |port| SocketAddr::from(([127, 0, 0, 1], port));
    let mut started: Vec<epp_core::proxy::ProxyHandle> = Vec::new();
    for i in 0..replicas {
        let shared_state =
            shared
                .as_ref()
                .map(|(url, prefix)| epp_core::replication::SharedStateOptions {
                    url: url.clone(),
                    key_prefix: prefix.clone(),
                    replica_id: format!("bench-{i}"),
                    snapshot_interval: Duration::from_secs(2),
                    ..Default::default()
                });
        let picker = RuntimeOptions {
            discovery: std::sync::Arc::new(StaticDiscovery {
                endpoints: static_endpoints.clone(),
                file: file.clone(),
                poll_interval: Duration::from_secs(1),
                ..Default::default()
            }),
            config: config.clone(),
            metrics_addr: Some(loopback(0)),
            health_addr: None,
            grace_period: Duration::from_secs(2),
            shared_state,
            ..RuntimeOptions::default()
        };
        let opts = epp_core::proxy::ProxyOptions {
            listen: loopback(0),
            picker,
            ..epp_core::proxy::ProxyOptions::default()
        };
        match epp_core::proxy::spawn(opts).await {
            Ok(p) if p.metrics_addr.is_some() => started.push(p),
            r => {
                for p in started {
                    p.stop().await;
                }
                match r {
                    Ok(p) => {
                        p.stop().await;
                        anyhow::bail!("the picker started without a metrics server");
                    }
                    Err(e) => return Err(e.into()),
                }
            }
        }
    }
    let first = &started[0];
    Ok(PickerHandle {
        proxy_addr: first.proxy_addr,
        metrics_addr: first.metrics_addr.expect("checked above"),
        replicas: started,
        _endpoints_dir: dir,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::workload::{HotSpot, SharedPrefix};

    #[test]
    fn sizing_splits_the_reusable_working_set() {
        // Completions, 4 groups x 8 prompts, system 64 tokens (4 blocks), question 16 (1 block),
        // output 16: every request needs (80 + 16) / 16 = 6 blocks, 4 of them reusable.
        let w = Workload::new(
            WorkloadSpec::SharedPrefix(SharedPrefix {
                num_groups: 4,
                num_prompts_per_group: 8,
                system_prompt_len: 64,
                question_len: 16,
                output_len: 16,
                api: crate::workload::Api::Completions,
            }),
            1,
        )
        .unwrap();
        let s = size_caches(&w, 32, 4, 2, 1.5);
        assert_eq!(s.distinct_blocks, 16 + 32);
        assert_eq!(s.reused_blocks, 16);
        assert_eq!(s.max_private_blocks, 2);
        assert_eq!(s.max_request_blocks, 6);
        // ceil(1.5 * 16 / 4) = 6, + 2 seqs * 2 private = 10, >= 2 * 6.
        assert_eq!(s.kv_blocks_per_backend, 12);
    }

    #[test]
    fn default_bench_workload_is_sized_as_the_premise_says() {
        let w = Workload::new(WorkloadSpec::SharedPrefix(SharedPrefix::default()), 1).unwrap();
        let s = size_caches(&w, 800, 4, 16, 1.5);
        // One backend cannot hold the reusable working set, four can.
        assert!(s.kv_blocks_per_backend < s.reused_blocks, "{s:?}");
        assert!(4 * s.kv_blocks_per_backend >= s.reused_blocks, "{s:?}");
        let h = Workload::new(WorkloadSpec::HotSpot(HotSpot::default()), 1).unwrap();
        let s = size_caches(&h, 800, 4, 16, 1.5);
        assert!(
            s.kv_blocks_per_backend < s.reused_blocks + 16 * s.max_private_blocks,
            "{s:?}"
        );
    }

    #[test]
    fn presets_exist_for_every_name() {
        for n in PRESET_NAMES
            .into_iter()
            .chain(PD_PRESET_NAMES)
            .chain(KV_EVENTS_PRESET_NAMES)
        {
            let p = Policy::preset(n).unwrap();
            assert_eq!(p.name, n);
            epp_core::config::EndpointPickerConfig::from_yaml(&p.config_yaml)
                .unwrap_or_else(|e| panic!("{n}: {e}"));
            assert_eq!(p.disaggregates(), PD_PRESET_NAMES.contains(&n), "{n}");
            assert_eq!(
                p.reads_kv_events(),
                KV_EVENTS_PRESET_NAMES.contains(&n),
                "{n}"
            );
        }
        assert!(Policy::preset("pd")
            .unwrap()
            .config_yaml
            .contains("nonCachedTokens: 1024"));
        assert!(Policy::preset("nope").is_none());
    }

    #[test]
    fn precise_policies_are_pointed_at_the_runs_simulators() {
        let p = Policy::preset("precise").unwrap();
        let y = bind_to_sims(&p.config_yaml, 40100, 40104, "http://127.0.0.1:9").unwrap();
        let c = epp_core::config::EndpointPickerConfig::from_yaml(&y).unwrap();
        let params = |t: &str| {
            c.plugins
                .iter()
                .find(|p| p.type_ == t)
                .and_then(|p| p.parameters.clone())
                .unwrap()
        };
        let disc = &params("precise-prefix-cache-producer")["kvEventsConfig"]["podDiscoveryConfig"];
        assert_eq!(disc["socketPort"], 40100);
        assert_eq!(disc["replaySocketPort"], 40104);
        assert_eq!(
            params("token-producer")["vllm"]["url"],
            "http://127.0.0.1:9"
        );
        // Everything else is kept.
        assert_eq!(
            params("precise-prefix-cache-producer")["speculativeIndexing"],
            true
        );
        // `modelName` alone selects the vllm backend: it renders on the simulators too.
        let edited = |f: &dyn Fn(&mut serde_json::Map<String, serde_json::Value>, &str)| {
            let mut c = epp_core::config::EndpointPickerConfig::from_yaml(&p.config_yaml).unwrap();
            for plugin in &mut c.plugins {
                let t = plugin.type_.clone();
                if let Some(m) = plugin.parameters.as_mut().and_then(|v| v.as_object_mut()) {
                    f(m, &t);
                }
            }
            c.to_yaml()
        };
        let alone = edited(&|m, t| {
            if t == "token-producer" {
                m.remove("vllm");
            }
        });
        assert!(!alone.contains("8000"), "{alone}");
        let y = bind_to_sims(&alone, 1, 2, "http://127.0.0.1:9").unwrap();
        assert!(y.contains("http://127.0.0.1:9"), "{y}");
        // A central socket cannot be what the simulators publish to.
        let central = edited(&|m, t| {
            if t == "precise-prefix-cache-producer" {
                m["kvEventsConfig"]["zmqEndpoint"] = serde_json::json!("tcp://*:5557");
            }
        });
        let e = bind_to_sims(&central, 1, 2, "http://x:1")
            .unwrap_err()
            .to_string();
        assert!(e.contains("kvEventsConfig.zmqEndpoint"), "{e}");
        // Other policies pass through unchanged in meaning.
        let d = Policy::preset("default").unwrap();
        let y = bind_to_sims(&d.config_yaml, 1, 2, "http://x:1").unwrap();
        assert_eq!(
            epp_core::config::EndpointPickerConfig::from_yaml(&y).unwrap(),
            epp_core::config::EndpointPickerConfig::from_yaml(&d.config_yaml).unwrap()
        );
    }

    #[test]
    fn free_port_runs_are_free() {
        let base = free_port_run(8).unwrap();
        for i in 0..8 {
            std::net::TcpListener::bind(("127.0.0.1", base + i)).unwrap();
        }
    }

    #[test]
    fn roles_are_checked_against_the_policies() {
        let pd = vec![
            Policy::preset("default").unwrap(),
            Policy::preset("pd").unwrap(),
        ];
        let plain = vec![Policy::preset("default").unwrap()];
        let setup = |k| SimSetup {
            prefill_backends: k,
            ..SimSetup::default()
        };
        check_roles(&setup(1), &pd).unwrap();
        check_roles(&setup(0), &plain).unwrap();
        let e = check_roles(&setup(0), &pd).unwrap_err().to_string();
        assert!(
            e.contains("policy pd disaggregates") && e.contains("--prefill-backends"),
            "{e}"
        );
        let e = check_roles(&setup(4), &pd).unwrap_err().to_string();
        assert!(
            e.starts_with("--prefill-backends 4 leaves no decode simulator"),
            "{e}"
        );
        let e = check_roles(&setup(1), &plain).unwrap_err().to_string();
        assert!(
            e.starts_with("--prefill-backends applies only to policies"),
            "{e}"
        );
    }
}

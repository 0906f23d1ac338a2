//! The Envoy front-end benchmark (ignored by default; numbers go to docs/benchmarks.md):
//! the same Envoy config with the picker (Envoy → `epp serve` → simulator) and without it
//! (Envoy's own round-robin over the same simulators), at a fixed open-loop rate, plus the
//! closed-loop throughput with the picker pinned to one core and the added latency of 64 KiB and
//! 1 MiB prompts. Simulators run with zero latency so the difference is the picker's cost.
//!
//! ```sh
//! cargo test --release -p epp --test envoy_bench -- --ignored --nocapture
//! ```
//! Knobs (env): `EPP_BENCH_RATE` (default 500), `EPP_BENCH_SECS` (default 10).

#[path = "envoy_support.rs"]
mod support;

use std::sync::Arc;
use std::time::Duration;

use epp_bench::driver::{run_load, LoadConfig, LoadMode, RunOutcome};
use epp_bench::stats::Percentiles;
use epp_bench::workload::{Api, NoSharing, Workload, WorkloadSpec};
use epp_sim::LatencyModel;
use support::*;

fn env_f64(name: &str, default: f64) -> f64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

async fn run(
    envoy: &Envoy,
    mode: LoadMode,
    secs: f64,
    prompt_tokens: u32,
    seed: u64,
) -> RunOutcome {
    let mut cfg = LoadConfig::new(format!("http://{}", envoy.listener), "sim-model");
    cfg.mode = mode;
    cfg.max_requests = None;
    cfg.duration = Some(Duration::from_secs_f64(secs));
    cfg.seed = seed;
    cfg.request_timeout = Duration::from_secs(30);
    cfg.drain_timeout = Duration::from_secs(10);
    let workload = Arc::new(
        Workload::new(
            WorkloadSpec::NoSharing(NoSharing {
                prompt_len: prompt_tokens,
                output_len: 1,
                api: Api::Completions,
            }),
            seed,
        )
        .unwrap(),
    );
    let (_tx, rx) = tokio::sync::watch::channel(false);
    run_load(&cfg, workload, rx).await.unwrap()
}

struct Row {
    ok: u64,
    failed: u64,
    rps: f64,
    e2e: Percentiles,
}

fn row(o: &RunOutcome) -> Row {
    let ok: Vec<f64> = o
        .records
        .iter()
        .filter(|r| r.ok())
        .map(|r| r.e2e_s)
        .collect();
    let failed = o.records.iter().filter(|r| !r.ok()).count() as u64;
    Row {
        ok: ok.len() as u64,
        failed,
        rps: ok.len() as f64 / o.elapsed_s.max(1e-9),
        e2e: Percentiles::from_values(ok),
    }
}

fn ms(s: f64) -> String {
    format!("{:.3}", s * 1000.0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "benchmark: run with --ignored --nocapture (release build recommended)"]
async fn envoy_front_end_benchmark() {
    let rate = env_f64("EPP_BENCH_RATE", 500.0);
    let secs = env_f64("EPP_BENCH_SECS", 10.0);
    let sims = Sims::start_with(LatencyModel::zero()).await;
    let picker = start_picker(&sims).await;
    let with = start_envoy(&picker, &sims, Variant::FailClosed).await;
    let direct = start_envoy(&picker, &sims, Variant::Direct).await;

    // Warm both paths (connections, ORIGINAL_DST hosts).
    run(&with, LoadMode::ClosedLoop { concurrency: 4 }, 1.0, 128, 1).await;
    run(
        &direct,
        LoadMode::ClosedLoop { concurrency: 4 },
        1.0,
        128,
        1,
    )
    .await;

    println!(
        "\n| scenario | path | ok | failed | achieved rps | p50 ms | p90 ms | p99 ms | max ms |"
    );
    println!("|---|---|---|---|---|---|---|---|---|");
    let print = |scenario: &str, path: &str, r: &Row| {
        println!(
            "| {scenario} | {path} | {} | {} | {:.0} | {} | {} | {} | {} |",
            r.ok,
            r.failed,
            r.rps,
            ms(r.e2e.p50),
            ms(r.e2e.p90),
            ms(r.e2e.p99),
            ms(r.e2e.max)
        );
    };
    let mut added = Vec::new();
    // Fixed rate, 128-token prompts; alternate the order so drift hits both paths.
    let scenario = format!("{rate:.0} rps open loop, 128-token prompt");
    let d = row(&run(&direct, LoadMode::OpenLoop { rate }, secs, 128, 2).await);
    let p = row(&run(&with, LoadMode::OpenLoop { rate }, secs, 128, 2).await);
    print(&scenario, "Envoy → sim (round-robin)", &d);
    print(&scenario, "Envoy → epp → sim", &p);
    added.push((scenario, p.e2e.p50 - d.e2e.p50, p.e2e.p99 - d.e2e.p99));

    for (label, tokens, r) in [
        ("64 KiB prompt", 16_384u32, 20.0),
        ("1 MiB prompt", 262_144, 5.0),
    ] {
        let scenario = format!("{r:.0} rps open loop, {label}");
        let d = row(&run(
            &direct,
            LoadMode::OpenLoop { rate: r },
            secs.min(5.0),
            tokens,
            3,
        )
        .await);
        let p = row(&run(
            &with,
            LoadMode::OpenLoop { rate: r },
            secs.min(5.0),
            tokens,
            3,
        )
        .await);
        print(&scenario, "Envoy → sim (round-robin)", &d);
        print(&scenario, "Envoy → epp → sim", &p);
        added.push((scenario, p.e2e.p50 - d.e2e.p50, p.e2e.p99 - d.e2e.p99));
    }

    // Throughput: closed loop, enough concurrency to saturate; the picker pinned to one core.
    drop(with);
    let pinned = start_picker_with(&sims, Some(1)).await;
    let with1 = start_envoy(&pinned, &sims, Variant::FailClosed).await;
    run(&with1, LoadMode::ClosedLoop { concurrency: 4 }, 1.0, 128, 1).await;
    let scenario = "closed loop, 64 concurrent, 128-token prompt";
    let d = row(&run(
        &direct,
        LoadMode::ClosedLoop { concurrency: 64 },
        secs,
        128,
        4,
    )
    .await);
    let p = row(&run(
        &with1,
        LoadMode::ClosedLoop { concurrency: 64 },
        secs,
        128,
        4,
    )
    .await);
    print(scenario, "Envoy → sim (round-robin)", &d);
    print(scenario, "Envoy → epp (1 core) → sim", &p);

    println!("\n| scenario | added p50 ms | added p99 ms |");
    println!("|---|---|---|");
    for (s, p50, p99) in added {
        println!("| {s} | {} | {} |", ms(p50), ms(p99));
    }
}

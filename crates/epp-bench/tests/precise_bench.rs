//! The `precise` policy through the real in-process pickers and simulators publishing KV events:
//! its scores come from the engines' events (nothing from the approximate index), two replicas
//! that each see half the traffic still send every group where the engines hold it, and a
//! simulator restarted mid-run is counted, with no request lost. Counts only, no timing.

use std::time::Duration;

use epp_bench::compare::{compare, CompareConfig, Policy, SimSetup};
use epp_bench::driver::LoadMode;
use epp_bench::report::render_table;
use epp_bench::workload::{Api, SharedPrefix, WorkloadSpec};

fn config(policies: &[&str], requests: u64, concurrency: usize) -> CompareConfig {
    CompareConfig {
        replicas: 1,
        shared_state: None,
        restart_backend_after: None,
        workload: WorkloadSpec::SharedPrefix(SharedPrefix {
            num_groups: 4,
            num_prompts_per_group: 8,
            system_prompt_len: 256,
            question_len: 16,
            // 8 tokens at 10 ms: the engine's events of a request reach both replicas long
            // before the next request (they are published at prefill), even on a busy machine.
            output_len: 8,
            api: Api::Chat,
        }),
        seed: 11,
        mode: LoadMode::ClosedLoop { concurrency },
        max_requests: Some(requests),
        duration: None,
        sims: SimSetup {
            backends: 4,
            max_num_seqs: 8,
            latency: epp_sim::LatencyModel {
                prefill_overhead_ms: 1.0,
                prefill_per_token_ms: 0.01,
                inter_token_ms: 10.0,
                inter_token_per_seq_ms: 0.0,
                jitter: 0.0,
            },
            ..SimSetup::default()
        },
        policies: policies
            .iter()
            .map(|p| Policy::preset(p).unwrap())
            .collect(),
        progress: false,
        request_timeout: Duration::from_secs(30),
        keep_last: false,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_precise_replicas_route_from_the_engines_events() {
    // One request at a time, alternating between the replicas: each replica places groups it
    // has never routed, and only the engines' events tell it where they went.
    let mut cfg = config(&["precise"], 32, 1);
    cfg.replicas = 2;
    let (_tx, stop) = tokio::sync::watch::channel(false);
    let report = compare(&cfg, None, stop).await.unwrap().report;
    let table = render_table(&report);
    let run = &report.runs[0];
    let s = &run.stats;
    assert_eq!((s.issued, s.succeeded, s.failed), (32, 32, 0), "{table}");
    let p = run.picker.as_ref().expect("picker metrics");
    assert_eq!(p.precise_fallbacks, Some(0.0), "{table}");
    assert_eq!(report.setup.as_ref().unwrap().replicas, 2);
    // Every group is computed once, on one server: the ideal bound (one group's prefix computed
    // twice would cost about 3%).
    assert!(
        s.cached_token_ratio >= 0.98 * run.ideal.ratio,
        "cached {} vs ideal {}\n{table}",
        s.cached_token_ratio,
        run.ideal.ratio
    );
    assert!(table.contains("precise scores from approximate"), "{table}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backend_restarted_mid_run_is_counted_and_loses_no_request() {
    let mut cfg = config(&["precise", "prefix-only"], 96, 2);
    cfg.restart_backend_after = Some(Duration::from_millis(150));
    let (_tx, stop) = tokio::sync::watch::channel(false);
    let report = compare(&cfg, None, stop).await.unwrap().report;
    let table = render_table(&report);
    assert_eq!(
        report.setup.as_ref().unwrap().restart_backend_after_s,
        Some(0.15)
    );
    for run in &report.runs {
        let s = &run.stats;
        assert_eq!(
            (s.issued, s.succeeded, s.failed),
            (96, 96, 0),
            "{}\n{table}",
            run.policy
        );
        assert_eq!(run.sims.as_ref().unwrap().restarts, 1, "{}", run.policy);
    }
    // The approximate policy has no precise producer.
    assert_eq!(
        report.runs[1].picker.as_ref().unwrap().precise_fallbacks,
        None
    );
}

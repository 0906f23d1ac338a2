//! A short P/D comparison through the real in-process picker and simulators: the aggregated
//! `default` policy runs over role-both simulators and never prefills remotely; `pd-always` runs
//! over one prefill and two decode simulators and sends every request through the prefill one;
//! `pd` does so only for prompts its decode pick would mostly compute. Counts only, no timing.

use std::time::Duration;

use epp_bench::compare::{compare, CompareConfig, Policy, SimSetup};
use epp_bench::driver::LoadMode;
use epp_bench::report::render_table;
use epp_bench::workload::{Api, LongPrompt, WorkloadSpec};

fn config(workload: LongPrompt, policies: &[&str], requests: u64) -> CompareConfig {
    CompareConfig {
        replicas: 1,
        shared_state: None,
        restart_backend_after: None,
        workload: WorkloadSpec::LongPrompt(workload),
        seed: 3,
        mode: LoadMode::ClosedLoop { concurrency: 1 },
        max_requests: Some(requests),
        duration: None,
        sims: SimSetup {
            backends: 3,
            max_num_seqs: 4,
            latency: epp_sim::LatencyModel {
                prefill_overhead_ms: 0.0,
                prefill_per_token_ms: 0.001,
                inter_token_ms: 1.0,
                inter_token_per_seq_ms: 0.0,
                jitter: 0.0,
            },
            prefill_backends: 1,
            prefill_interference_tokens: 512,
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
async fn pd_policies_prefill_on_the_prefill_simulator_and_default_does_not() {
    // 2,048-token prompts, nothing shared: every one is uncached wherever it lands.
    let unique = LongPrompt {
        prompt_len: 2048,
        output_len: 4,
        shared_fraction: 0.0,
        num_groups: 1,
        api: Api::Chat,
    };
    let (_tx, stop) = tokio::sync::watch::channel(false);
    let report = compare(&config(unique, &["default", "pd"], 6), None, stop)
        .await
        .unwrap()
        .report;
    let table = render_table(&report);
    let [agg, pd] = &report.runs[..] else {
        panic!("{table}")
    };
    for run in [agg, pd] {
        let s = &run.stats;
        assert_eq!(
            (s.succeeded, s.failed),
            (6, 0),
            "{}: {:?}",
            run.policy,
            s.errors
        );
        // Streamed: 3 gaps between 4 tokens per request.
        assert_eq!(s.itl.count, 18, "{}", run.policy);
    }
    let (a, p) = (agg.sims.as_ref().unwrap(), pd.sims.as_ref().unwrap());
    assert_eq!(a.kv_transfer_prefills, 0, "{table}");
    assert_eq!(a.transferred_prompt_tokens, 0, "{table}");
    assert_eq!(agg.stats.cached_tokens, 0, "{table}");
    // Every prompt went through the prefill simulator and its full blocks were read by a decode
    // one, which reports them cached.
    assert_eq!(p.kv_transfer_prefills, 6, "{table}");
    assert_eq!(
        p.transferred_prompt_tokens, pd.stats.cached_tokens,
        "{table}"
    );
    assert!(
        pd.stats.cached_tokens * 10 >= pd.stats.prompt_tokens * 9,
        "{table}"
    );
    // Only decode simulators answered the client; the aggregated run used role-both ones.
    let served = |run: &epp_bench::report::PolicyRun| -> Vec<String> {
        let mut v: Vec<String> = run
            .stats
            .backends
            .iter()
            .filter(|b| b.requests > 0)
            .map(|b| b.name.clone())
            .collect();
        v.sort();
        v
    };
    assert!(
        served(pd).iter().all(|b| b.starts_with("decode-")),
        "{table}"
    );
    assert!(served(agg).iter().all(|b| b.starts_with("sim-")), "{table}");
    assert!(table.contains("P/D prefills (prefill sims)"), "{table}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_prefix_based_decider_skips_the_prefill_hop_for_mostly_cached_prompts() {
    // One group, 90% of each 2,048-token prompt shared: after the first request, the decode
    // pick holds the prefix and computes ~200 tokens, below `pd`'s 1,024.
    let cached = LongPrompt {
        prompt_len: 2048,
        output_len: 2,
        shared_fraction: 0.9,
        num_groups: 1,
        api: Api::Completions,
    };
    let (_tx, stop) = tokio::sync::watch::channel(false);
    let report = compare(&config(cached, &["pd", "pd-always"], 8), None, stop)
        .await
        .unwrap()
        .report;
    let table = render_table(&report);
    let [pd, always] = &report.runs[..] else {
        panic!("{table}")
    };
    for run in [pd, always] {
        assert_eq!(
            run.stats.succeeded, 8,
            "{}: {:?}",
            run.policy, run.stats.errors
        );
    }
    let prefills = |r: &epp_bench::report::PolicyRun| r.sims.as_ref().unwrap().kv_transfer_prefills;
    assert_eq!(prefills(always), 8, "{table}");
    // The first request of the group is uncached everywhere; later ones stay on the decode
    // pick (one more prefill at most, should the second decode simulator be picked cold).
    assert!((1..=2).contains(&prefills(pd)), "{table}");
    assert!(pd.stats.cached_token_ratio > 0.75, "{table}");
}

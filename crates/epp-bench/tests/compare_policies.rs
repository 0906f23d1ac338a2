//! A short policy comparison through the real in-process picker and simulators: the default
//! profile must beat round-robin on the real cached-token ratio, and every output (table, JSON,
//! SVG) must carry every policy with its measured values. Orderings only, no timing thresholds.

use std::time::Duration;

use epp_bench::compare::{compare, CompareConfig, Policy, SimSetup};
use epp_bench::driver::LoadMode;
use epp_bench::report::{render_svg, render_table, write_json, BenchReport};
use epp_bench::workload::{Api, SharedPrefix, WorkloadSpec};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn default_profile_beats_round_robin_on_cached_tokens() {
    let cfg = CompareConfig {
        replicas: 1,
        shared_state: None,
        restart_backend_after: None,
        workload: WorkloadSpec::SharedPrefix(SharedPrefix {
            num_groups: 8,
            num_prompts_per_group: 16,
            system_prompt_len: 256,
            question_len: 16,
            output_len: 4,
            api: Api::Chat,
        }),
        seed: 7,
        mode: LoadMode::ClosedLoop { concurrency: 8 },
        max_requests: Some(128),
        duration: None,
        sims: SimSetup {
            backends: 4,
            max_num_seqs: 8,
            latency: epp_sim::LatencyModel {
                prefill_overhead_ms: 1.0,
                prefill_per_token_ms: 0.02,
                inter_token_ms: 1.0,
                inter_token_per_seq_ms: 0.0,
                jitter: 0.0,
            },
            ..SimSetup::default()
        },
        policies: vec![
            Policy::preset("round-robin").unwrap(),
            Policy::preset("default").unwrap(),
        ],
        progress: false,
        request_timeout: Duration::from_secs(30),
        keep_last: false,
    };
    let (_tx, stop) = tokio::sync::watch::channel(false);
    let out = compare(&cfg, None, stop).await.unwrap();
    assert!(out.live.is_none());
    let report = out.report;
    assert!(!report.interrupted);
    let names: Vec<&str> = report.runs.iter().map(|r| r.policy.as_str()).collect();
    assert_eq!(names, ["round-robin", "default"]);
    let setup = report.setup.as_ref().unwrap();
    assert_eq!(setup.backends, 4);
    assert!(
        setup.kv_blocks_per_backend < setup.working_set_blocks,
        "{setup:?}"
    );

    for run in &report.runs {
        let s = &run.stats;
        assert_eq!(
            (s.issued, s.succeeded, s.failed),
            (128, 128, 0),
            "{}: {:?}",
            run.policy,
            s.errors
        );
        assert_eq!(s.backends.len(), 4, "{}", run.policy);
        assert_eq!(s.backends.iter().map(|b| b.requests).sum::<u64>(), 128);
        // Every prompt has whole blocks, so the picker counted every request.
        let p = run.picker.as_ref().expect("picker metrics scraped");
        assert_eq!(p.cache_requests, 128.0, "{}", run.policy);
        assert_eq!(p.decision_count, 128.0, "{}", run.policy);
        assert!(
            s.cached_token_ratio <= run.ideal.ratio + 1e-9,
            "{}",
            run.policy
        );
    }
    let rr = &report.runs[0];
    let def = &report.runs[1];
    // Round-robin spreads requests exactly evenly.
    assert!(
        rr.stats.backends.iter().all(|b| b.requests == 32),
        "{:?}",
        rr.stats.backends
    );
    assert!(
        def.stats.cached_token_ratio > rr.stats.cached_token_ratio,
        "default {} vs round-robin {}",
        def.stats.cached_token_ratio,
        rr.stats.cached_token_ratio
    );
    assert!(
        def.picker.as_ref().unwrap().cache_hit_rate > rr.picker.as_ref().unwrap().cache_hit_rate
    );

    // The table has one column per policy, with the measured ratios.
    let table = render_table(&report);
    let header = table.lines().nth(1).unwrap();
    assert!(
        header.contains("round-robin") && header.contains("default"),
        "{table}"
    );
    let row = table
        .lines()
        .find(|l| l.starts_with("cached-token ratio"))
        .unwrap();
    let cells: Vec<&str> = row.split_whitespace().skip(2).collect();
    assert_eq!(
        cells,
        [
            format!("{:.1}%", rr.stats.cached_token_ratio * 100.0),
            format!("{:.1}%", def.stats.cached_token_ratio * 100.0)
        ]
    );

    // The JSON carries every policy and reads back identically.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bench.json");
    write_json(&report, &path).unwrap();
    let text = std::fs::read_to_string(&path).unwrap();
    let back: BenchReport = serde_json::from_str(&text).unwrap();
    for (b, r) in back.runs.iter().zip(&report.runs) {
        assert_eq!(b.policy, r.policy);
        assert_eq!(b.stats.cached_tokens, r.stats.cached_tokens);
        assert_eq!(b.stats.backends, r.stats.backends);
        assert!((b.stats.cached_token_ratio - r.stats.cached_token_ratio).abs() < 1e-12);
    }
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    let policies: Vec<&str> = v["runs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["policy"].as_str().unwrap())
        .collect();
    assert_eq!(policies, ["round-robin", "default"]);

    let svg = render_svg(&report).unwrap();
    assert_eq!(svg.lines().filter(|l| l.trim() == "default").count(), 3);
}

//! `epp bench --url` against a target that sends everything to one of three servers: with the
//! servers' own metrics URLs, the report lists all three (two idle) and the balance says so,
//! where counting only the servers seen in responses would read an even 1.0.

use std::time::Duration;

use epp_bench::compare::{bench_url, finished_requests_in, UrlRun};
use epp_bench::driver::LoadMode;
use epp_bench::workload::{Api, SharedPrefix, WorkloadSpec};
use epp_sim::{LatencyModel, SimConfig};

fn sim(name: &str) -> SimConfig {
    SimConfig {
        name: name.into(),
        model: "m".into(),
        max_num_seqs: 8,
        num_gpu_blocks: 4096,
        latency: LatencyModel::zero(),
        ..SimConfig::default()
    }
}

fn run(base: String, backend_metrics: Vec<String>) -> UrlRun {
    UrlRun {
        base_url: base,
        model: Some("m".into()),
        metrics_url: None,
        workload: WorkloadSpec::SharedPrefix(SharedPrefix {
            num_groups: 2,
            num_prompts_per_group: 4,
            system_prompt_len: 64,
            question_len: 16,
            output_len: 2,
            api: Api::Completions,
        }),
        seed: 3,
        mode: LoadMode::ClosedLoop { concurrency: 2 },
        max_requests: Some(12),
        duration: None,
        request_timeout: Duration::from_secs(20),
        progress: false,
        label: "target".into(),
        backend_metrics,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_backends_count_in_the_balance() {
    let mut sims = Vec::new();
    for n in ["a", "b", "c"] {
        sims.push(
            epp_sim::spawn(sim(n), "127.0.0.1:0".parse().unwrap())
                .await
                .unwrap(),
        );
    }
    let metrics: Vec<String> = sims
        .iter()
        .map(|s| format!("http://{}/metrics", s.addr()))
        .collect();
    let (_tx, stop) = tokio::sync::watch::channel(false);
    // The "router" is sim a itself: every request lands there.
    let target = format!("http://{}/v1", sims[0].addr());
    let report = bench_url(&run(target.clone(), metrics.clone()), stop.clone())
        .await
        .unwrap();
    let r = &report.runs[0];
    assert_eq!(r.stats.succeeded, 12);
    let counts: Vec<(String, u64)> = r
        .stats
        .backends
        .iter()
        .map(|b| (b.name.clone(), b.requests))
        .collect();
    let names: Vec<String> = sims.iter().map(|s| s.addr().to_string()).collect();
    let mut want: Vec<(String, u64)> = vec![
        (names[0].clone(), 12),
        (names[1].clone(), 0),
        (names[2].clone(), 0),
    ];
    want.sort();
    let mut got = counts.clone();
    got.sort();
    assert_eq!(got, want);
    // max / mean = 12 / 4.
    assert!(
        (r.stats.balance_max_over_mean - 3.0).abs() < 1e-9,
        "{}",
        r.stats.balance_max_over_mean
    );
    assert!(r.note.is_none(), "{:?}", r.note);

    // A second run counts only what happened during it (the counters are read before and after).
    let report = bench_url(&run(target.clone(), metrics.clone()), stop.clone())
        .await
        .unwrap();
    assert_eq!(
        report.runs[0]
            .stats
            .backends
            .iter()
            .map(|b| b.requests)
            .sum::<u64>(),
        12
    );

    // A list missing the busy server: the counts disagree with the load, and the report says so.
    let report = bench_url(&run(target.clone(), metrics[1..].to_vec()), stop.clone())
        .await
        .unwrap();
    let note = report.runs[0].note.clone().unwrap_or_default();
    assert!(
        note.contains("the backends finished 0 requests, the load 12 succeeded"),
        "{note}"
    );

    // A URL that is not a model server's metrics is refused by name before any load.
    let bad = format!("http://{}/health", sims[1].addr());
    let err = bench_url(&run(target, vec![bad.clone()]), stop)
        .await
        .unwrap_err();
    let msg = format!("{err:#}");
    assert!(msg.contains(&format!("--backend-metrics {bad}")), "{msg}");
}

#[test]
fn finished_requests_skip_aborts_and_need_the_family() {
    let text = "# TYPE vllm:request_success_total counter\n\
        vllm:request_success_total{finished_reason=\"abort\",model_name=\"m\"} 4\n\
        vllm:request_success_total{finished_reason=\"length\",model_name=\"m\"} 7\n\
        vllm:request_success_total{finished_reason=\"stop\",model_name=\"m\"} 2\n";
    assert_eq!(finished_requests_in(text).unwrap(), 9);
    let err = finished_requests_in("# TYPE x counter\nx 1\n").unwrap_err();
    assert!(
        err.to_string().contains("vllm:request_success_total"),
        "{err}"
    );
}

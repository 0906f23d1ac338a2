//! The load driver against a real simulated vLLM server on loopback: token accounting, cache
//! reuse, backend attribution, error counting and bounds, checked by value.

use std::sync::Arc;
use std::time::Duration;

use epp_bench::driver::{run_load, LoadConfig, LoadMode};
use epp_bench::ideal::ideal_bound;
use epp_bench::stats::{summarize, Backend};
use epp_bench::workload::{Api, NoSharing, SharedPrefix, Workload, WorkloadSpec};
use epp_sim::{LatencyModel, SimConfig};

fn fast_sim(name: &str) -> SimConfig {
    SimConfig {
        name: name.into(),
        model: "m".into(),
        max_num_seqs: 8,
        num_gpu_blocks: 4096,
        latency: LatencyModel::zero(),
        ..SimConfig::default()
    }
}

fn no_stop() -> tokio::sync::watch::Receiver<bool> {
    let (tx, rx) = tokio::sync::watch::channel(false);
    std::mem::forget(tx);
    rx
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn closed_loop_against_one_sim_reports_exact_tokens_and_reuse() {
    let sim = epp_sim::spawn(fast_sim("sim-a"), "127.0.0.1:0".parse().unwrap())
        .await
        .unwrap();
    // One pass of 2 groups x 5 prompts, completions: system 64 tokens (4 blocks) + question 16.
    let spec = WorkloadSpec::SharedPrefix(SharedPrefix {
        num_groups: 2,
        num_prompts_per_group: 5,
        system_prompt_len: 64,
        question_len: 16,
        output_len: 3,
        api: Api::Completions,
    });
    let w = Arc::new(Workload::new(spec, 11).unwrap());
    let expected_prompt_tokens: u64 = w.take(10).map(|r| r.prompt_text.len() as u64 / 4).sum();
    let mut cfg = LoadConfig::new(format!("http://{}/v1", sim.addr()), "m");
    // Concurrency 1: requests run in workload order, so the cache sees exactly the ideal order.
    cfg.mode = LoadMode::ClosedLoop { concurrency: 1 };
    cfg.max_requests = Some(10);
    let out = run_load(&cfg, w.clone(), no_stop()).await.unwrap();
    assert_eq!(out.issued, 10);
    assert!(!out.interrupted);
    let known = [Backend {
        name: "sim-a".into(),
        aliases: vec![],
    }];
    let s = summarize(&out, &known);
    assert_eq!((s.succeeded, s.failed), (10, 0), "{:?}", s.errors);
    assert_eq!(s.prompt_tokens, 800);
    assert_eq!(s.prompt_tokens, expected_prompt_tokens);
    assert_eq!(s.output_tokens, 30);
    // A cache big enough for everything reaches the ideal bound exactly.
    let ideal = ideal_bound(
        w.take(10)
            .map(|r| r.prompt_text)
            .collect::<Vec<_>>()
            .iter()
            .map(String::as_str),
    );
    assert_eq!(s.cached_tokens, ideal.shared_tokens);
    assert_eq!(s.cached_tokens, 8 * 64);
    assert_eq!(s.request_hit_rate, 0.8);
    assert_eq!(s.backends.len(), 1);
    assert_eq!(s.backends[0].requests, 10);
    assert_eq!(s.balance_max_over_mean, 1.0);
    assert_eq!(s.ttft.count, 10);
    assert!(out
        .records
        .iter()
        .all(|r| r.pod.as_deref() == Some("sim-a")));
    sim.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn open_loop_chat_counts_errors_by_status() {
    let mut cfg_sim = fast_sim("sim-b");
    cfg_sim.faults.error_rate = 1.0;
    cfg_sim.faults.error_status = 503;
    let sim = epp_sim::spawn(cfg_sim, "127.0.0.1:0".parse().unwrap())
        .await
        .unwrap();
    let w = Arc::new(
        Workload::new(
            WorkloadSpec::NoSharing(NoSharing {
                prompt_len: 40,
                output_len: 2,
                api: Api::Chat,
            }),
            1,
        )
        .unwrap(),
    );
    let mut cfg = LoadConfig::new(format!("http://{}", sim.addr()), "m");
    cfg.mode = LoadMode::OpenLoop { rate: 200.0 };
    cfg.max_requests = Some(12);
    let out = run_load(&cfg, w, no_stop()).await.unwrap();
    let s = summarize(&out, &[]);
    assert_eq!(out.issued, 12);
    assert_eq!(s.succeeded, 0);
    assert_eq!(s.errors.get("http_503"), Some(&12));
    sim.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stop_signal_returns_partial_results_and_connect_errors_are_counted() {
    // Nothing listens on this port (bound then dropped).
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let w = Arc::new(Workload::new(WorkloadSpec::NoSharing(NoSharing::default()), 1).unwrap());
    let mut cfg = LoadConfig::new(format!("http://127.0.0.1:{port}"), "m");
    cfg.mode = LoadMode::ClosedLoop { concurrency: 2 };
    cfg.max_requests = Some(6);
    let out = run_load(&cfg, w.clone(), no_stop()).await.unwrap();
    let s = summarize(&out, &[]);
    assert_eq!(s.errors.get("connect"), Some(&6));

    // A duration-bounded run against a slow server, stopped early.
    let mut slow = fast_sim("sim-c");
    slow.latency.inter_token_ms = 50.0;
    let sim = epp_sim::spawn(slow, "127.0.0.1:0".parse().unwrap())
        .await
        .unwrap();
    let (tx, rx) = tokio::sync::watch::channel(false);
    let mut cfg = LoadConfig::new(format!("http://{}", sim.addr()), "m");
    cfg.mode = LoadMode::ClosedLoop { concurrency: 2 };
    cfg.max_requests = None;
    cfg.duration = Some(Duration::from_secs(600));
    let run = tokio::spawn(async move { run_load(&cfg, w, rx).await });
    // Stop once the driver has certainly recorded a completion: with 2 closed-loop workers, a
    // third finished request was issued after some worker recorded its first one (the server
    // counts a success before the client has read it, so ">= 1" alone would race).
    let served = || {
        sim.metrics_text()
            .lines()
            .filter(|l| l.starts_with("vllm:request_success_total"))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum::<f64>()
    };
    for _ in 0..800 {
        if served() >= 3.0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(served() >= 3.0);
    tx.send(true).unwrap();
    let out = tokio::time::timeout(Duration::from_secs(10), run)
        .await
        .expect("stop must end the run promptly")
        .unwrap()
        .unwrap();
    assert!(out.interrupted);
    assert!(out.issued >= 2);
    // 16 output tokens x 50 ms = 0.8 s per request: some finished, the in-flight ones were cut.
    let s = summarize(&out, &[]);
    assert!(s.succeeded >= 1, "{s:?}");
    assert!(s.succeeded < out.issued);
    sim.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chat_token_accounting_matches_the_simulator() {
    let sim = epp_sim::spawn(fast_sim("sim-d"), "127.0.0.1:0".parse().unwrap())
        .await
        .unwrap();
    for spec in [
        WorkloadSpec::SharedPrefix(SharedPrefix {
            num_groups: 2,
            num_prompts_per_group: 4,
            system_prompt_len: 100,
            question_len: 10,
            output_len: 2,
            api: Api::Chat,
        }),
        WorkloadSpec::MultiTurn(epp_bench::workload::MultiTurn {
            num_sessions: 2,
            turns_per_session: 3,
            system_prompt_len: 20,
            user_len: 30,
            output_len: 2,
        }),
    ] {
        // A new seed per workload keeps the two workloads from sharing cached blocks.
        let seed = if matches!(spec, WorkloadSpec::MultiTurn(_)) {
            5
        } else {
            6
        };
        let w = Arc::new(Workload::new(spec, seed).unwrap());
        let mut cfg = LoadConfig::new(format!("http://{}", sim.addr()), "m");
        cfg.mode = LoadMode::ClosedLoop { concurrency: 1 };
        cfg.max_requests = Some(w.pass_len().unwrap());
        let out = run_load(&cfg, w.clone(), no_stop()).await.unwrap();
        let s = summarize(&out, &[]);
        let reqs: Vec<_> = w.take(out.issued).collect();
        let ideal = ideal_bound(reqs.iter().map(|r| r.prompt_text.as_str()));
        assert_eq!(s.succeeded, out.issued);
        assert_eq!(s.prompt_tokens, ideal.prompt_tokens);
        assert_eq!(s.cached_tokens, ideal.shared_tokens);
        assert!(ideal.shared_tokens > 0);
    }
    sim.shutdown().await;
}

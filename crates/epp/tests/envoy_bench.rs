//! The Envoy front-end benchmark (ignored by default; numbers go to docs/benchmarks.md):
//! the same Envoy config with the picker (Envoy → `epp serve` → simulator) and without it
//! (Envoy's own round-robin over the same simulators), at a fixed open-loop rate, plus the
//! closed-loop throughput with the picker pinned to one core and the added latency of 64 KiB and
//! 1 MiB prompts. Simulators run with zero latency so the difference is the picker's cost.
//!
//! ```sh
//! cargo test --release -p epp --test envoy_bench -- --ignored --nocapture
//! ```
//! The same run also measures the protocol floor: a do-nothing ext_proc processor (its own
//! process, the same tonic stack, the same messages: it routes round-robin without parsing,
//! echoes every body) behind the same Envoy config. What Envoy's ext_proc filter plus a gRPC
//! hop cost on this machine shows there; the picker's own cost is what it adds above it.
//!
//! Knobs (env): `EPP_BENCH_RATE` (default 500), `EPP_BENCH_SECS` (default 10; the fixed-rate
//! comparison spends that long on each path, in `EPP_BENCH_ROUNDS` rounds, default 5),
//! `EPP_BENCH_QUICK` (set: only the fixed-rate comparison), `EPP_BENCH_PICKER_ARGS` (extra
//! `epp serve` flags, whitespace-separated, e.g. `--scrape-interval 1s`).

#[path = "support/envoy.rs"]
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

/// The floor processor: the fewest ext_proc answers Envoy's FULL_DUPLEX_STREAMED config allows
/// (destination header + Content-Length + `envoy.lb` metadata at request end_of_stream, every
/// body echoed, empty header/trailer answers), and no parsing, scheduling or metrics.
mod floor {
    use std::collections::VecDeque;
    use std::pin::Pin;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;

    use envoy_types::pb::envoy::service::ext_proc::v3::external_processor_server::{
        ExternalProcessor, ExternalProcessorServer,
    };
    use envoy_types::pb::envoy::service::ext_proc::v3::{
        processing_request, processing_response, HeadersResponse, ProcessingRequest,
        ProcessingResponse,
    };
    use epp_core::extproc::{
        body_response, header_option, routed_headers_response, trailers_response, Direction,
    };
    use epp_core::gateway::headers::DESTINATION;
    use futures_util::Stream;
    use tonic::{Request, Response, Status, Streaming};

    pub struct Floor {
        pub targets: Vec<String>,
        pub next: Arc<AtomicUsize>,
    }

    fn routed(target: &str, len: Option<usize>) -> ProcessingResponse {
        let mut set = vec![header_option(DESTINATION, target.as_bytes())];
        if let Some(n) = len {
            set.push(header_option("content-length", n.to_string().as_bytes()));
        }
        routed_headers_response(set, Vec::new(), target, &[])
    }

    type Out = Pin<Box<dyn Stream<Item = Result<ProcessingResponse, Status>> + Send>>;

    #[tonic::async_trait]
    impl ExternalProcessor for Floor {
        type ProcessStream = Out;

        async fn process(
            &self,
            request: Request<Streaming<ProcessingRequest>>,
        ) -> Result<Response<Out>, Status> {
            let i = self.next.fetch_add(1, Ordering::Relaxed);
            let target = self.targets[i % self.targets.len()].clone();
            let state = (request.into_inner(), VecDeque::new(), Vec::new());
            let s = futures_util::stream::unfold(state, move |(mut inb, mut pending, mut body)| {
                let target = target.clone();
                async move {
                    use processing_request::Request as R;
                    loop {
                        if let Some(r) = pending.pop_front() {
                            return Some((Ok(r), (inb, pending, body)));
                        }
                        let msg = inb.message().await.ok().flatten()?;
                        match msg.request? {
                            R::RequestHeaders(h) if h.end_of_stream => {
                                pending.push_back(routed(&target, None))
                            }
                            R::RequestHeaders(_) => {}
                            R::RequestBody(b) => {
                                body.extend_from_slice(&b.body);
                                if b.end_of_stream {
                                    let whole = std::mem::take(&mut body);
                                    pending.push_back(routed(&target, Some(whole.len())));
                                    pending.push_back(body_response(
                                        whole,
                                        true,
                                        Direction::Request,
                                    ));
                                }
                            }
                            R::ResponseHeaders(_) => pending.push_back(ProcessingResponse {
                                response: Some(processing_response::Response::ResponseHeaders(
                                    HeadersResponse::default(),
                                )),
                                ..Default::default()
                            }),
                            R::ResponseBody(b) => pending.push_back(body_response(
                                b.body,
                                b.end_of_stream,
                                Direction::Response,
                            )),
                            R::RequestTrailers(_) => {
                                pending.push_back(trailers_response(Direction::Request))
                            }
                            R::ResponseTrailers(_) => {
                                pending.push_back(trailers_response(Direction::Response))
                            }
                        }
                    }
                }
            });
            Ok(Response::new(Box::pin(s)))
        }
    }

    pub fn server(targets: Vec<String>) -> ExternalProcessorServer<Floor> {
        ExternalProcessorServer::new(Floor {
            targets,
            next: Arc::new(AtomicUsize::new(0)),
        })
    }
}

/// The floor processor's process: this test binary re-run with `EPP_FLOOR_ARGS` set
/// (`grpc_port,health_port,target,target,...`); it serves until killed.
#[tokio::test(flavor = "multi_thread")]
#[ignore = "child process of envoy_front_end_benchmark"]
async fn floor_processor_child() {
    let Ok(args) = std::env::var("EPP_FLOOR_ARGS") else {
        return;
    };
    let mut parts = args.split(',');
    let grpc: u16 = parts.next().unwrap().parse().unwrap();
    let health: u16 = parts.next().unwrap().parse().unwrap();
    let targets: Vec<String> = parts.map(str::to_string).collect();
    let shutdown = epp_core::telemetry::Shutdown::new();
    let (_tx, changes) = tokio::sync::watch::channel(0u64);
    let hl = tokio::net::TcpListener::bind(("127.0.0.1", health))
        .await
        .unwrap();
    tokio::spawn(epp_core::extproc::serve_health_with(
        Arc::new(|| true),
        changes,
        hl,
        shutdown.clone(),
    ));
    let gl = tokio::net::TcpListener::bind(("127.0.0.1", grpc))
        .await
        .unwrap();
    let incoming = tonic::transport::server::TcpIncoming::from(gl).with_nodelay(Some(true));
    tonic::transport::Server::builder()
        .add_service(floor::server(targets))
        .serve_with_incoming(incoming)
        .await
        .unwrap();
}

async fn start_floor(sims: &Sims) -> Picker {
    let grpc = free_port("127.0.0.1");
    let grpc_health = free_port("127.0.0.1");
    let targets: Vec<String> = (0..3).map(|i| sims.addr(i).to_string()).collect();
    let child = std::process::Command::new(std::env::current_exe().unwrap())
        .args([
            "--ignored",
            "--exact",
            "floor_processor_child",
            "--nocapture",
        ])
        .env(
            "EPP_FLOOR_ARGS",
            format!("{grpc},{grpc_health},{}", targets.join(",")),
        )
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while std::net::TcpStream::connect(("127.0.0.1", grpc)).is_err() {
        assert!(
            std::time::Instant::now() < deadline,
            "floor processor never listened"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Picker {
        proc: Some(Proc(child)),
        grpc,
        grpc_health,
        metrics: "127.0.0.1:9".parse().unwrap(),
    }
}

struct Row {
    ok: u64,
    failed: u64,
    rps: f64,
    e2e: Percentiles,
}

fn row(o: &RunOutcome) -> Row {
    pool(std::slice::from_ref(o))
}

/// One row from several runs of the same path: their samples pooled.
fn pool(runs: &[RunOutcome]) -> Row {
    let records = runs.iter().flat_map(|o| o.records.iter());
    let ok: Vec<f64> = records
        .clone()
        .filter(|r| r.ok())
        .map(|r| r.e2e_s)
        .collect();
    let failed = records.filter(|r| !r.ok()).count() as u64;
    let elapsed: f64 = runs.iter().map(|o| o.elapsed_s).sum();
    Row {
        ok: ok.len() as u64,
        failed,
        rps: ok.len() as f64 / elapsed.max(1e-9),
        e2e: Percentiles::from_values(ok),
    }
}

fn ms(s: f64) -> String {
    format!("{:.3}", s * 1000.0)
}

/// Picker-only throughput: `workers` concurrent ext_proc exchanges, as Envoy sends them
/// (request headers, body with end_of_stream → two answers; response headers, body → two
/// answers), over one HTTP/2 connection straight to the picker's gRPC port; no Envoy.
/// Returns (completed exchanges, seconds).
async fn grpc_exchanges(port: u16, workers: usize, secs: f64) -> (u64, f64) {
    use envoy_types::pb::envoy::config::core::v3::{HeaderMap, HeaderValue};
    use envoy_types::pb::envoy::service::ext_proc::v3::external_processor_client::ExternalProcessorClient;
    use envoy_types::pb::envoy::service::ext_proc::v3::{
        processing_request::Request as R, HttpBody, HttpHeaders, ProcessingRequest,
    };
    fn headers(pairs: &[(&str, &str)]) -> Option<HeaderMap> {
        Some(HeaderMap {
            headers: pairs
                .iter()
                .map(|(k, v)| HeaderValue {
                    key: k.to_string(),
                    raw_value: v.as_bytes().to_vec(),
                    ..Default::default()
                })
                .collect(),
        })
    }
    fn msg(r: R) -> ProcessingRequest {
        ProcessingRequest {
            request: Some(r),
            ..Default::default()
        }
    }
    let channel = tonic::transport::Endpoint::from_shared(format!("http://127.0.0.1:{port}"))
        .unwrap()
        .tcp_nodelay(true)
        .connect()
        .await
        .unwrap();
    let start = std::time::Instant::now();
    let deadline = start + Duration::from_secs_f64(secs);
    let mut tasks = Vec::new();
    for w in 0..workers {
        let mut client = ExternalProcessorClient::new(channel.clone());
        tasks.push(tokio::spawn(async move {
            let mut done = 0u64;
            while std::time::Instant::now() < deadline {
                let prompt = format!("worker {w} request {done} ").repeat(24);
                let body = serde_json::to_vec(
                    &serde_json::json!({"model": "sim-model", "prompt": prompt, "max_tokens": 1}),
                )
                .unwrap();
                let (tx, rx) = tokio::sync::mpsc::channel(4);
                let inbound = futures_util::stream::unfold(rx, |mut rx| async move {
                    rx.recv().await.map(|m| (m, rx))
                });
                let mut answers = client.process(inbound).await.unwrap().into_inner();
                let req = [(":method", "POST"), (":path", "/v1/completions")];
                let resp = [(":status", "200"), ("content-type", "application/json")];
                let phases = [
                    [
                        R::RequestHeaders(HttpHeaders {
                            headers: headers(&req),
                            ..Default::default()
                        }),
                        R::RequestBody(HttpBody {
                            body,
                            end_of_stream: true,
                            ..Default::default()
                        }),
                    ],
                    [
                        R::ResponseHeaders(HttpHeaders {
                            headers: headers(&resp),
                            ..Default::default()
                        }),
                        R::ResponseBody(HttpBody {
                            body: br#"{"choices":[{"text":"x"}]}"#.to_vec(),
                            end_of_stream: true,
                            ..Default::default()
                        }),
                    ],
                ];
                // Each phase: two messages in, two answers out (headers, then body).
                for phase in phases {
                    for m in phase {
                        tx.send(msg(m)).await.unwrap();
                    }
                    for _ in 0..2 {
                        answers.message().await.unwrap().unwrap();
                    }
                }
                drop(tx);
                assert!(answers.message().await.unwrap().is_none());
                done += 1;
            }
            done
        }));
    }
    let mut total = 0;
    for t in tasks {
        total += t.await.unwrap();
    }
    (total, start.elapsed().as_secs_f64())
}

type PathRef<'a> = (&'a str, &'a Envoy, Option<&'a Proc>);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "benchmark: run with --ignored --nocapture (release build recommended)"]
async fn envoy_front_end_benchmark() {
    let rate = env_f64("EPP_BENCH_RATE", 500.0);
    let secs = env_f64("EPP_BENCH_SECS", 10.0);
    let quick = std::env::var_os("EPP_BENCH_QUICK").is_some();
    let sims = Sims::start_with(LatencyModel::zero()).await;
    let extra = std::env::var("EPP_BENCH_PICKER_ARGS").unwrap_or_default();
    let extra: Vec<&str> = extra.split_whitespace().collect();
    let picker = start_picker_args(&sims, None, &extra).await;
    let with = start_envoy(&picker, &sims, Variant::FailClosed).await;
    let direct = start_envoy(&picker, &sims, Variant::Direct).await;
    let floor_proc = start_floor(&sims).await;
    let floor = start_envoy(&floor_proc, &sims, Variant::FailClosed).await;
    let paths: [PathRef; 3] = [
        ("Envoy → sim (round-robin)", &direct, None),
        (
            "Envoy → floor processor → sim",
            &floor,
            floor_proc.proc.as_ref(),
        ),
        ("Envoy → epp → sim", &with, picker.proc.as_ref()),
    ];
    let closed = |concurrency| LoadMode::ClosedLoop { concurrency };

    // Warm every path (connections, ORIGINAL_DST hosts).
    for (_, envoy, _) in paths {
        run(envoy, closed(4), 1.0, 128, 1).await;
    }

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
    let mut note_added = |scenario: &str, rows: &[Row]| {
        let (d, f, p) = (&rows[0], &rows[1], &rows[2]);
        for (who, r, base) in [
            ("floor processor", f, d),
            ("epp", p, d),
            ("epp above the floor", p, f),
        ] {
            added.push((
                format!("{scenario}: {who}"),
                r.e2e.p50 - base.e2e.p50,
                r.e2e.p99 - base.e2e.p99,
            ));
        }
    };

    // Fixed rate, 128-token prompts. The three paths take turns in short rounds (the order
    // rotating) and each path's samples are pooled, so drift on this shared machine hits all
    // three alike.
    let scenario = format!("{rate:.0} rps open loop, 128-token prompt");
    let rounds = env_f64("EPP_BENCH_ROUNDS", 5.0).max(1.0) as usize;
    let mut pooled: Vec<Vec<RunOutcome>> = vec![Vec::new(), Vec::new(), Vec::new()];
    let mut cpu = [(0.0f64, 0.0f64); 3]; // (Envoy, processor) CPU seconds per path
    for round in 0..rounds {
        for k in 0..3 {
            let idx = (round + k) % 3;
            let (_, envoy, proc) = paths[idx];
            let before = (
                envoy.proc.cpu_seconds(),
                proc.map_or(0.0, Proc::cpu_seconds),
            );
            let mode = LoadMode::OpenLoop { rate };
            let o = run(envoy, mode, secs / rounds as f64, 128, 2 + round as u64).await;
            cpu[idx].0 += envoy.proc.cpu_seconds() - before.0;
            cpu[idx].1 += proc.map_or(0.0, Proc::cpu_seconds) - before.1;
            pooled[idx].push(o);
        }
    }
    let rows: Vec<Row> = pooled.iter().map(|runs| pool(runs)).collect();
    for (k, r) in rows.iter().enumerate() {
        print(&scenario, paths[k].0, r);
    }
    note_added(&scenario, &rows);
    let per = |cpu: f64, r: &Row| format!("{:.0}", cpu * 1e6 / (r.ok + r.failed).max(1) as f64);
    let cpu_rows = [
        ("Envoy, direct", per(cpu[0].0, &rows[0])),
        ("Envoy, with the floor processor", per(cpu[1].0, &rows[1])),
        ("floor processor", per(cpu[1].1, &rows[1])),
        ("Envoy, with the picker", per(cpu[2].0, &rows[2])),
        (
            "epp serve (incl. scraping 3 simulators every 100 ms)",
            per(cpu[2].1, &rows[2]),
        ),
    ];

    // Large bodies: the whole prompt is buffered, parsed and re-sent before Envoy forwards it.
    let large: &[(&str, u32, f64)] = if quick {
        &[]
    } else {
        &[
            ("64 KiB prompt", 16_384, 20.0),
            ("1 MiB prompt", 262_144, 5.0),
        ]
    };
    for &(label, tokens, r) in large {
        let scenario = format!("{r:.0} rps open loop, {label}");
        let mut rows = Vec::new();
        for (name, envoy, _) in paths {
            let mode = LoadMode::OpenLoop { rate: r };
            let row = row(&run(envoy, mode, secs.min(5.0), tokens, 3).await);
            print(&scenario, name, &row);
            rows.push(row);
        }
        note_added(&scenario, &rows);
    }
    drop((with, floor, floor_proc));
    if quick {
        print_summary(rate, cpu_rows, added, &[]);
        return;
    }

    // Throughput with the picker pinned to one core: through Envoy (closed loop, 64 workers;
    // Envoy runs one worker thread, so it may be the limit), and straight at the picker's gRPC
    // port (no Envoy: the picker's own ceiling).
    let pinned = start_picker_with(&sims, Some(1)).await;
    let pinned_proc = pinned.proc.as_ref().unwrap();
    let with1 = start_envoy(&pinned, &sims, Variant::FailClosed).await;
    run(&with1, closed(4), 1.0, 128, 1).await;
    let scenario = "closed loop, 64 concurrent, 128-token prompt";
    let d = row(&run(&direct, closed(64), secs, 128, 4).await);
    let (cpu0, envoy0) = (pinned_proc.cpu_seconds(), with1.proc.cpu_seconds());
    let o = run(&with1, closed(64), secs, 128, 4).await;
    let busy = |proc: &Proc, from: f64| (proc.cpu_seconds() - from) / o.elapsed_s.max(1e-9) * 100.0;
    let (picker_busy, envoy_busy) = (busy(pinned_proc, cpu0), busy(&with1.proc, envoy0));
    print(scenario, "Envoy → sim (round-robin)", &d);
    print(scenario, "Envoy → epp (1 core) → sim", &row(&o));
    let cpu0 = pinned_proc.cpu_seconds();
    let (n, elapsed) = grpc_exchanges(pinned.grpc, 32, secs).await;
    let alone_busy = (pinned_proc.cpu_seconds() - cpu0) / elapsed * 100.0;
    let throughput = [
        format!(
            "through Envoy: {:.0} req/s; epp serve used {picker_busy:.0}% of its core, Envoy {envoy_busy:.0}% of its one worker",
            row(&o).rps
        ),
        format!(
            "straight at the picker (gRPC, 32 concurrent exchanges, no Envoy): {:.0} exchanges/s; epp serve used {alone_busy:.0}% of its core",
            n as f64 / elapsed
        ),
    ];
    print_summary(rate, cpu_rows, added, &throughput);
}

fn print_summary(
    rate: f64,
    cpu_rows: [(&str, String); 5],
    added: Vec<(String, f64, f64)>,
    throughput: &[String],
) {
    println!("\n| process ({rate:.0} rps run) | CPU µs per request |");
    println!("|---|---|");
    for (who, us) in cpu_rows {
        println!("| {who} | {us} |");
    }

    println!("\n| scenario | added p50 ms | added p99 ms |");
    println!("|---|---|---|");
    for (s, p50, p99) in added {
        println!("| {s} | {} | {} |", ms(p50), ms(p99));
    }
    for t in throughput {
        println!("\nthroughput, picker pinned to one core: {t}");
    }
}

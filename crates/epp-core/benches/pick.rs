//! The pick hot path: 64 endpoints, an 8 KiB prompt, a warm prefix index, prefix hashing
//! included. `schedule` is hash + index lookup + filters/scorers/picker; `route` is the whole
//! director call both front-ends make (JSON parse, schedule, metrics, index update).
//!
//!     cargo bench -p epp-core --bench pick

use criterion::{criterion_group, criterion_main, Criterion};
use epp_core::config::{presets, EndpointPickerConfig};
use epp_core::datastore::{DatastoreWriter, EndpointSpec, HealthConfig, ModelServerMetrics};
use epp_core::director::{Director, RouteRequest};
use epp_core::request::{parse_body, ApiMethod};
use epp_core::scheduler::{SchedCtx, Scheduler};

const ENDPOINTS: usize = 64;

fn prompt(group: usize) -> String {
    // 8 KiB: a 6 KiB shared system prompt per group + a 2 KiB question.
    let mut s = String::with_capacity(8192);
    let mut i = group;
    while s.len() < 6144 {
        s.push_str(["alpha ", "bravo ", "charlie ", "delta "][i % 4]);
        i = i.wrapping_mul(7).wrapping_add(3);
    }
    s.truncate(6144);
    while s.len() < 8192 {
        s.push_str("question ");
    }
    s.truncate(8192);
    s
}

fn setup() -> (Director, Vec<Vec<u8>>) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let _g = rt.enter();
    let ds = DatastoreWriter::new(HealthConfig::default());
    ds.set_endpoints(
        (0..ENDPOINTS)
            .map(|i| EndpointSpec::new(format!("10.0.{}.{}:8000", i / 250, i % 250)))
            .collect(),
    );
    for (i, e) in ds.snapshot().endpoints.iter().enumerate() {
        ds.record_scrape(
            e.endpoint.address(),
            Ok(ModelServerMetrics {
                waiting_queue: (i % 7) as f64,
                running: 4.0,
                kv_cache_usage: (i % 10) as f64 / 10.0,
                ..Default::default()
            }),
        );
    }
    let cfg = EndpointPickerConfig::from_yaml(presets::DEFAULT).unwrap();
    let director = Director::build(&ds, Scheduler::from_config(&cfg).unwrap());
    let bodies: Vec<Vec<u8>> = (0..256)
        .map(|g| {
            serde_json::to_vec(
                &serde_json::json!({"model": "m", "prompt": prompt(g), "max_tokens": 16}),
            )
            .unwrap()
        })
        .collect();
    // Warm the index: every group routed a few times.
    for _ in 0..3 {
        for b in &bodies {
            let r = futures_executor::block_on(director.route(RouteRequest {
                method: Some(ApiMethod::Completions),
                body: b,
                ..Default::default()
            }))
            .unwrap();
            r.tracker.finish(200);
        }
    }
    std::mem::forget(rt);
    (director, bodies)
}

fn bench(c: &mut Criterion) {
    let (director, bodies) = setup();
    let parsed: Vec<_> = bodies
        .iter()
        .map(|b| parse_body(ApiMethod::Completions, b).unwrap())
        .collect();
    let mut i = 0usize;
    c.bench_function("pick/schedule_64_endpoints_8KiB_prompt", |b| {
        b.iter(|| {
            i = (i + 1) % parsed.len();
            let req = &parsed[i];
            let snap = director.datastore().snapshot();
            let hashes = director.prefix_index().hash(&req.target_model, &req.prompt);
            let m = epp_core::scheduler::PrefixMatches::approximate(
                director.prefix_index().lookup(&hashes),
                16,
            );
            let ctx = SchedCtx {
                snapshot: &snap,
                request: req,
                prefix: &m,
                data: &epp_core::scheduler::NO_DATA,
            };
            let s = director
                .scheduler()
                .schedule(&ctx, &Default::default())
                .unwrap();
            std::hint::black_box(s.ranked[0])
        })
    });
    let mut j = 0usize;
    c.bench_function("pick/route_64_endpoints_8KiB_body", |b| {
        b.iter(|| {
            j = (j + 1) % bodies.len();
            let r = futures_executor::block_on(director.route(RouteRequest {
                method: Some(ApiMethod::Completions),
                body: &bodies[j],
                ..Default::default()
            }))
            .unwrap();
            r.tracker.finish(200);
        })
    });
    // A 1 MiB prompt (the Envoy benchmark's large-body case): parse, hash 16,384 blocks,
    // schedule, index update.
    let big: Vec<Vec<u8>> = (0..4)
        .map(|g| {
            let mut p = String::with_capacity(1 << 20);
            while p.len() < (1 << 20) {
                p.push_str(&prompt(g * 1000 + p.len() / 8192));
            }
            p.truncate(1 << 20);
            serde_json::to_vec(&serde_json::json!({"model": "m", "prompt": p, "max_tokens": 16}))
                .unwrap()
        })
        .collect();
    let mut k = 0usize;
    let mut g = c.benchmark_group("pick_large");
    g.sample_size(20);
    g.bench_function("route_64_endpoints_1MiB_body", |b| {
        b.iter(|| {
            k = (k + 1) % big.len();
            let r = futures_executor::block_on(director.route(RouteRequest {
                method: Some(ApiMethod::Completions),
                body: &big[k],
                ..Default::default()
            }))
            .unwrap();
            r.tracker.finish(200);
        })
    });
    g.bench_function("parse_1MiB_body", |b| {
        b.iter(|| parse_body(ApiMethod::Completions, &big[0]).unwrap())
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);

//! Scrape cost: reading a model server's `/metrics` into the picker's view of it.
//!
//!     cargo bench -p epp-core --bench scrape_parse
//!
//! The exposition is shaped like a real vLLM v1 server's (the same families, bucket layouts and
//! label sets: one model, the HTTP instrumentator, Python process metrics), about 60 KiB. `full`
//! parses every family (how the picker read it before); `picker` is what the scraper does now:
//! select the handful of families it reads, then parse those.

use criterion::{criterion_group, criterion_main, Criterion};
use epp_core::datastore::Engine;
use epp_core::exposition;
use epp_core::scrape::parse_metrics;

const MODEL: &str = "meta-llama/Llama-3.1-8B-Instruct";

fn histogram(out: &mut String, name: &str, label_sets: &[String], bounds: &[f64]) {
    out.push_str(&format!(
        "# HELP {name} Histogram of {name}.\n# TYPE {name} histogram\n"
    ));
    for labels in label_sets {
        let mut n = 0u64;
        for (i, b) in bounds.iter().enumerate() {
            n += (i as u64 * 7) % 13;
            out.push_str(&format!("{name}_bucket{{{labels},le=\"{b:?}\"}} {n}.0\n"));
        }
        out.push_str(&format!("{name}_bucket{{{labels},le=\"+Inf\"}} {n}.0\n"));
        out.push_str(&format!("{name}_count{{{labels}}} {n}.0\n"));
        out.push_str(&format!("{name}_sum{{{labels}}} {}.25\n", n * 3));
    }
}

fn family(out: &mut String, name: &str, kind: &str, series: &[(&str, f64)]) {
    out.push_str(&format!(
        "# HELP {name} Metric {name}.\n# TYPE {name} {kind}\n"
    ));
    for (labels, v) in series {
        if labels.is_empty() {
            out.push_str(&format!("{name} {v:?}\n"));
        } else {
            out.push_str(&format!("{name}{{{labels}}} {v:?}\n"));
        }
    }
}

/// A vLLM-v1-shaped exposition.
pub fn vllm_exposition() -> String {
    let m = format!("engine=\"0\",model_name=\"{MODEL}\"");
    let mut o = String::new();
    for f in [
        "python_gc_objects_collected_total",
        "python_gc_objects_uncollectable_total",
        "python_gc_collections_total",
    ] {
        family(
            &mut o,
            f,
            "counter",
            &[
                ("generation=\"0\"", 1234.0),
                ("generation=\"1\"", 123.0),
                ("generation=\"2\"", 12.0),
            ],
        );
    }
    family(&mut o, "python_info", "gauge", &[("implementation=\"CPython\",major=\"3\",minor=\"12\",patchlevel=\"9\",version=\"3.12.9\"", 1.0)]);
    for p in [
        "process_virtual_memory_bytes",
        "process_resident_memory_bytes",
        "process_start_time_seconds",
        "process_open_fds",
        "process_max_fds",
    ] {
        family(&mut o, p, "gauge", &[("", 12345678.0)]);
    }
    let gauges = [
        "vllm:num_requests_running",
        "vllm:num_requests_waiting",
        "vllm:kv_cache_usage_perc",
    ];
    for g in gauges {
        family(&mut o, g, "gauge", &[(&m, 3.0)]);
    }
    family(
        &mut o,
        "vllm:lora_requests_info",
        "gauge",
        &[(
            "max_lora=\"4\",running_lora_adapters=\"\",waiting_lora_adapters=\"\"",
            1.7e9,
        )],
    );
    family(&mut o, "vllm:cache_config_info", "gauge", &[("block_size=\"16\",cache_dtype=\"auto\",calculate_kv_scales=\"False\",cpu_offload_gb=\"0\",enable_prefix_caching=\"True\",engine=\"0\",gpu_memory_utilization=\"0.9\",is_attention_free=\"False\",num_cpu_blocks=\"None\",num_gpu_blocks=\"31250\",num_gpu_blocks_override=\"None\",prefix_caching_hash_algo=\"builtin\",sliding_window=\"None\",swap_space=\"4\",swap_space_bytes=\"4294967296\"", 1.0)]);
    for c in [
        "vllm:num_preemptions",
        "vllm:prompt_tokens",
        "vllm:generation_tokens",
        "vllm:prefix_cache_queries",
        "vllm:prefix_cache_hits",
    ] {
        family(&mut o, &format!("{c}_total"), "counter", &[(&m, 98765.0)]);
    }
    let reasons: Vec<String> = ["stop", "length", "abort", "error"]
        .iter()
        .map(|r| format!("{m},finished_reason=\"{r}\""))
        .collect();
    let series: Vec<(&str, f64)> = reasons.iter().map(|r| (r.as_str(), 42.0)).collect();
    family(&mut o, "vllm:request_success_total", "counter", &series);
    let tokens = [
        1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0, 200.0, 500.0, 1000.0, 2000.0, 5000.0, 10000.0,
        20000.0, 50000.0, 100000.0, 131072.0,
    ];
    let seconds = [
        0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
        20.0, 40.0, 80.0, 160.0, 640.0, 2560.0,
    ];
    for h in [
        "vllm:iteration_tokens_total",
        "vllm:request_prompt_tokens",
        "vllm:request_generation_tokens",
        "vllm:request_max_num_generation_tokens",
        "vllm:request_params_max_tokens",
    ] {
        histogram(&mut o, h, std::slice::from_ref(&m), &tokens);
    }
    histogram(
        &mut o,
        "vllm:request_params_n",
        std::slice::from_ref(&m),
        &[1.0, 2.0, 5.0, 10.0, 20.0],
    );
    for h in [
        "vllm:time_to_first_token_seconds",
        "vllm:time_per_output_token_seconds",
        "vllm:inter_token_latency_seconds",
        "vllm:e2e_request_latency_seconds",
        "vllm:request_queue_time_seconds",
        "vllm:request_inference_time_seconds",
        "vllm:request_prefill_time_seconds",
        "vllm:request_decode_time_seconds",
    ] {
        histogram(&mut o, h, std::slice::from_ref(&m), &seconds);
    }
    // The FastAPI instrumentator: per handler, method and status.
    let handlers = [
        "/v1/completions",
        "/v1/chat/completions",
        "/v1/models",
        "/health",
        "/metrics",
        "/version",
    ];
    let mut reqs = Vec::new();
    for h in handlers {
        for s in ["2xx", "4xx", "5xx"] {
            reqs.push(format!("handler=\"{h}\",method=\"POST\",status=\"{s}\""));
        }
    }
    let series: Vec<(&str, f64)> = reqs.iter().map(|r| (r.as_str(), 7.0)).collect();
    family(&mut o, "http_requests_total", "counter", &series);
    let per_handler: Vec<String> = handlers
        .iter()
        .map(|h| format!("handler=\"{h}\""))
        .collect();
    histogram(
        &mut o,
        "http_request_duration_highr_seconds",
        &per_handler,
        &[
            0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1.0, 1.5, 2.0, 2.5, 3.0, 3.5, 4.0, 4.5,
            5.0, 7.5, 10.0, 30.0, 60.0,
        ],
    );
    let with_method: Vec<String> = per_handler
        .iter()
        .map(|l| format!("{l},method=\"POST\""))
        .collect();
    histogram(
        &mut o,
        "http_request_duration_seconds",
        &with_method,
        &[0.1, 0.5, 1.0],
    );
    o
}

fn bench(c: &mut Criterion) {
    let text = vllm_exposition();
    eprintln!(
        "exposition: {} bytes, {} lines",
        text.len(),
        text.lines().count()
    );
    // Both readings agree on everything the picker uses.
    let m = parse_metrics(Engine::Vllm, &text).unwrap();
    assert_eq!(
        (m.waiting_queue, m.running, m.kv_cache_usage),
        (3.0, 3.0, 1.0)
    );
    assert_eq!(m.num_gpu_blocks, Some(31_250));
    assert_eq!(m.max_loras, Some(4));
    let all = exposition::parse(&text).unwrap();
    assert!(all.len() > 500, "{} samples", all.len());

    let mut g = c.benchmark_group("scrape_parse");
    g.bench_function("full", |b| {
        b.iter(|| exposition::parse(&text).unwrap().len())
    });
    g.bench_function("picker", |b| {
        b.iter(|| parse_metrics(Engine::Vllm, &text).unwrap())
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);

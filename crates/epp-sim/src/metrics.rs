//! vLLM-named Prometheus metrics of one simulated server, rendered as text exposition 0.0.4.
//!
//! Gauges are read from the engine's state at scrape time (so they are exactly the state);
//! counters and histograms are updated as requests progress. The text is written by hand: the
//! set is small and fixed, and this keeps label sets (e.g. the LoRA adapter lists) free-form.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use parking_lot::Mutex;

/// `Content-Type` of the exposition.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Buckets of `vllm:time_to_first_token_seconds` (vLLM's).
pub const TTFT_BUCKETS: &[f64] = &[
    0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
    20.0, 40.0, 80.0, 160.0, 640.0, 2560.0,
];

/// Buckets of `vllm:e2e_request_latency_seconds` (vLLM's, plus sub-300 ms ones for a fast sim).
pub const E2E_BUCKETS: &[f64] = &[
    0.01, 0.025, 0.05, 0.1, 0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0,
    50.0, 60.0, 120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0,
];

/// Buckets of `vllm:inter_token_latency_seconds` (vLLM's).
pub const ITL_BUCKETS: &[f64] = &[
    0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
    40.0, 80.0,
];

/// Sources of prompt tokens, in the order of [`Counters::prompt_by_source`] (vLLM's `source`
/// label of `vllm:prompt_tokens_by_source_total`).
pub const PROMPT_SOURCES: [&str; 3] = ["local_compute", "local_cache_hit", "external_kv_transfer"];

/// A fixed-bucket histogram.
#[derive(Debug, Clone)]
pub struct Histogram {
    bounds: &'static [f64],
    /// Non-cumulative counts; one extra slot for +Inf.
    counts: Vec<u64>,
    sum: f64,
    count: u64,
}

impl Histogram {
    pub fn new(bounds: &'static [f64]) -> Self {
        Self {
            bounds,
            counts: vec![0; bounds.len() + 1],
            sum: 0.0,
            count: 0,
        }
    }

    pub fn observe(&mut self, v: f64) {
        let i = self
            .bounds
            .iter()
            .position(|b| v <= *b)
            .unwrap_or(self.bounds.len());
        self.counts[i] += 1;
        self.sum += v;
        self.count += 1;
    }

    pub fn count(&self) -> u64 {
        self.count
    }

    pub fn sum(&self) -> f64 {
        self.sum
    }
}

/// Counters and histograms updated by the engine.
#[derive(Debug)]
pub struct Counters {
    pub prompt_tokens: AtomicU64,
    pub generation_tokens: AtomicU64,
    pub success_length: AtomicU64,
    pub aborted: AtomicU64,
    pub ttft: Mutex<Histogram>,
    /// Time between two consecutive tokens of one request.
    pub itl: Mutex<Histogram>,
    pub e2e: Mutex<Histogram>,
    /// Prompt tokens computed here, found in the local prefix cache, and read from a P/D
    /// prefill server ([`PROMPT_SOURCES`]).
    pub prompt_by_source: [AtomicU64; 3],
    pub pd: PdCounters,
}

/// P/D counters (the simulator's own `epp_sim:kv_transfer_*` metrics).
#[derive(Debug, Default)]
pub struct PdCounters {
    /// Prefills that finished and hold their blocks for a decoder.
    pub prefills: AtomicU64,
    /// Prefills refused with 503 because `max_held` prefills held blocks.
    pub hold_refused: AtomicU64,
    /// Holds released by a decoder's read.
    pub released_read: AtomicU64,
    /// Holds released because no decoder read them in time.
    pub released_expired: AtomicU64,
    /// Blocks decodes read from prefill servers instead of computing them.
    pub transferred_blocks: AtomicU64,
    /// Decodes that recomputed their prompt, by [`crate::pd::Fallback`] index.
    pub fallbacks: [AtomicU64; 4],
}

impl Default for Counters {
    fn default() -> Self {
        Self {
            prompt_tokens: AtomicU64::new(0),
            generation_tokens: AtomicU64::new(0),
            success_length: AtomicU64::new(0),
            aborted: AtomicU64::new(0),
            ttft: Mutex::new(Histogram::new(TTFT_BUCKETS)),
            itl: Mutex::new(Histogram::new(ITL_BUCKETS)),
            e2e: Mutex::new(Histogram::new(E2E_BUCKETS)),
            prompt_by_source: Default::default(),
            pd: PdCounters::default(),
        }
    }
}

impl Counters {
    pub fn observe_ttft(&self, d: Duration) {
        self.ttft.lock().observe(d.as_secs_f64());
    }
    pub fn observe_itl(&self, d: Duration) {
        self.itl.lock().observe(d.as_secs_f64());
    }
    pub fn observe_e2e(&self, d: Duration) {
        self.e2e.lock().observe(d.as_secs_f64());
    }
}

/// Gauge values read from the engine at scrape time.
#[derive(Debug, Clone, Default)]
pub struct GaugeSnapshot {
    /// The `engine` label: the engine's data-parallel rank (0 without data parallelism).
    pub engine: usize,
    /// P/D prefills holding blocks for a decoder, and those blocks.
    pub held_requests: usize,
    pub held_blocks: usize,
    pub running: usize,
    pub waiting: usize,
    pub kv_usage: f64,
    pub block_size: usize,
    pub num_gpu_blocks: usize,
    pub hit_tokens: u64,
    pub query_tokens: u64,
    pub running_loras: Vec<String>,
    pub waiting_loras: Vec<String>,
    pub max_loras: usize,
}

/// Escape a label value for the text format.
fn esc(v: &str) -> String {
    let mut s = String::with_capacity(v.len());
    for c in v.chars() {
        match c {
            '\\' => s.push_str("\\\\"),
            '"' => s.push_str("\\\""),
            '\n' => s.push_str("\\n"),
            c => s.push(c),
        }
    }
    s
}

fn header(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} {kind}");
}

fn histogram(out: &mut String, name: &str, help: &str, labels: &str, h: &Histogram) {
    header(out, name, "histogram", help);
    let mut cum = 0u64;
    for (i, b) in h.bounds.iter().enumerate() {
        cum += h.counts[i];
        let _ = writeln!(out, "{name}_bucket{{{labels},le=\"{b:?}\"}} {cum}");
    }
    let _ = writeln!(out, "{name}_bucket{{{labels},le=\"+Inf\"}} {}", h.count);
    let _ = writeln!(out, "{name}_sum{{{labels}}} {:?}", h.sum);
    let _ = writeln!(out, "{name}_count{{{labels}}} {}", h.count);
}

/// Render the whole exposition.
pub fn render(model: &str, g: &GaugeSnapshot, c: &Counters, now_unix: f64) -> String {
    let m = format!("engine=\"{}\",model_name=\"{}\"", g.engine, esc(model));
    let mut out = String::with_capacity(8 * 1024);

    header(
        &mut out,
        "vllm:num_requests_running",
        "gauge",
        "Number of requests in model execution batches.",
    );
    let _ = writeln!(out, "vllm:num_requests_running{{{m}}} {}", g.running);
    header(
        &mut out,
        "vllm:num_requests_waiting",
        "gauge",
        "Number of requests waiting to be processed.",
    );
    let _ = writeln!(out, "vllm:num_requests_waiting{{{m}}} {}", g.waiting);
    for (name, help) in [
        (
            "vllm:kv_cache_usage_perc",
            "KV-cache usage. 1 means 100 percent usage (blocks held by running requests / total).",
        ),
        (
            "vllm:gpu_cache_usage_perc",
            "GPU KV-cache usage (legacy alias of vllm:kv_cache_usage_perc).",
        ),
    ] {
        header(&mut out, name, "gauge", help);
        let _ = writeln!(out, "{name}{{{m}}} {:?}", g.kv_usage);
    }
    header(
        &mut out,
        "vllm:cache_config_info",
        "gauge",
        "Information of the LLMEngine CacheConfig.",
    );
    let _ = writeln!(
        out,
        "vllm:cache_config_info{{block_size=\"{}\",enable_prefix_caching=\"True\",num_gpu_blocks=\"{}\",{m}}} 1",
        g.block_size, g.num_gpu_blocks
    );
    header(
        &mut out,
        "vllm:lora_requests_info",
        "gauge",
        "Running stats on LoRA requests (value: Unix time of the sample).",
    );
    let _ = writeln!(
        out,
        "vllm:lora_requests_info{{max_lora=\"{}\",{m},running_lora_adapters=\"{}\",waiting_lora_adapters=\"{}\"}} {:?}",
        g.max_loras,
        esc(&g.running_loras.join(",")),
        esc(&g.waiting_loras.join(",")),
        now_unix
    );
    header(
        &mut out,
        "vllm:prefix_cache_queries_total",
        "counter",
        "Prefix cache queries, in terms of number of queried tokens.",
    );
    let _ = writeln!(
        out,
        "vllm:prefix_cache_queries_total{{{m}}} {}",
        g.query_tokens
    );
    header(
        &mut out,
        "vllm:prefix_cache_hits_total",
        "counter",
        "Prefix cache hits, in terms of number of cached tokens.",
    );
    let _ = writeln!(out, "vllm:prefix_cache_hits_total{{{m}}} {}", g.hit_tokens);
    header(
        &mut out,
        "vllm:prompt_tokens_total",
        "counter",
        "Number of prefill tokens processed.",
    );
    let _ = writeln!(
        out,
        "vllm:prompt_tokens_total{{{m}}} {}",
        c.prompt_tokens.load(Ordering::Relaxed)
    );
    header(
        &mut out,
        "vllm:generation_tokens_total",
        "counter",
        "Number of generation tokens processed.",
    );
    let _ = writeln!(
        out,
        "vllm:generation_tokens_total{{{m}}} {}",
        c.generation_tokens.load(Ordering::Relaxed)
    );
    header(
        &mut out,
        "vllm:request_success_total",
        "counter",
        "Count of finished requests by finish reason.",
    );
    for (reason, v) in [
        ("abort", c.aborted.load(Ordering::Relaxed)),
        ("length", c.success_length.load(Ordering::Relaxed)),
        ("stop", 0),
    ] {
        let _ = writeln!(
            out,
            "vllm:request_success_total{{finished_reason=\"{reason}\",{m}}} {v}"
        );
    }
    header(
        &mut out,
        "vllm:prompt_tokens_by_source_total",
        "counter",
        "Number of prompt tokens by source: computed locally, local prefix-cache hits, read by KV transfer.",
    );
    for (source, v) in PROMPT_SOURCES.iter().zip(&c.prompt_by_source) {
        let _ = writeln!(
            out,
            "vllm:prompt_tokens_by_source_total{{{m},source=\"{source}\"}} {}",
            v.load(Ordering::Relaxed)
        );
    }
    render_pd(&mut out, &m, g, &c.pd);
    let ttft = c.ttft.lock().clone();
    histogram(
        &mut out,
        "vllm:time_to_first_token_seconds",
        "Histogram of time to first token in seconds.",
        &m,
        &ttft,
    );
    let itl = c.itl.lock().clone();
    histogram(
        &mut out,
        "vllm:inter_token_latency_seconds",
        "Histogram of inter-token latency in seconds.",
        &m,
        &itl,
    );
    let e2e = c.e2e.lock().clone();
    histogram(
        &mut out,
        "vllm:e2e_request_latency_seconds",
        "Histogram of end to end request latency in seconds.",
        &m,
        &e2e,
    );
    out
}

/// The simulator's own P/D metrics (vLLM has no equivalent), under `epp_sim:`.
fn render_pd(out: &mut String, m: &str, g: &GaugeSnapshot, pd: &PdCounters) {
    let load = |a: &AtomicU64| a.load(Ordering::Relaxed);
    for (name, kind, help, v) in [
        (
            "epp_sim:kv_transfer_held_requests",
            "gauge",
            "P/D prefills holding KV blocks until a decoder reads them.",
            g.held_requests as u64,
        ),
        (
            "epp_sim:kv_transfer_held_blocks",
            "gauge",
            "KV blocks held (not evictable) for decoders to read.",
            g.held_blocks as u64,
        ),
        (
            "epp_sim:kv_transfer_prefills_total",
            "counter",
            "P/D prefills served (answered with kv_transfer_params, blocks held).",
            load(&pd.prefills),
        ),
        (
            "epp_sim:kv_transfer_hold_refused_total",
            "counter",
            "P/D prefills refused with 503 because --kv-transfer-max-held prefills held blocks.",
            load(&pd.hold_refused),
        ),
        (
            "epp_sim:kv_transfer_blocks_total",
            "counter",
            "KV blocks decodes read from prefill servers instead of computing them.",
            load(&pd.transferred_blocks),
        ),
    ] {
        header(out, name, kind, help);
        let _ = writeln!(out, "{name}{{{m}}} {v}");
    }
    header(
        out,
        "epp_sim:kv_transfer_released_total",
        "counter",
        "Held prefills released, because a decoder read them or because they expired.",
    );
    for (reason, v) in [
        ("read", load(&pd.released_read)),
        ("expired", load(&pd.released_expired)),
    ] {
        let _ = writeln!(
            out,
            "epp_sim:kv_transfer_released_total{{{m},reason=\"{reason}\"}} {v}"
        );
    }
    header(
        out,
        "epp_sim:kv_transfer_fallbacks_total",
        "counter",
        "P/D decodes that recomputed the prompt instead of reading it, by reason.",
    );
    for f in crate::pd::Fallback::ALL {
        let _ = writeln!(
            out,
            "epp_sim:kv_transfer_fallbacks_total{{{m},reason=\"{}\"}} {}",
            f.as_str(),
            load(&pd.fallbacks[f.index()])
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_buckets_are_cumulative() {
        let mut h = Histogram::new(&[0.1, 1.0]);
        h.observe(0.05);
        h.observe(0.1);
        h.observe(0.5);
        h.observe(3.0);
        let mut out = String::new();
        histogram(&mut out, "x", "help", "a=\"b\"", &h);
        assert!(out.contains("x_bucket{a=\"b\",le=\"0.1\"} 2\n"));
        assert!(out.contains("x_bucket{a=\"b\",le=\"1.0\"} 3\n"));
        assert!(out.contains("x_bucket{a=\"b\",le=\"+Inf\"} 4\n"));
        assert!(out.contains("x_count{a=\"b\"} 4\n"));
        assert!(out.contains("x_sum{a=\"b\"} 3.65\n"));
    }

    #[test]
    fn renders_gauges_and_escapes_labels() {
        let g = GaugeSnapshot {
            engine: 0,
            held_requests: 1,
            held_blocks: 3,
            running: 2,
            waiting: 3,
            kv_usage: 0.25,
            block_size: 16,
            num_gpu_blocks: 100,
            hit_tokens: 32,
            query_tokens: 64,
            running_loras: vec!["a".into(), "b".into()],
            waiting_loras: vec![],
            max_loras: 2,
        };
        let c = Counters::default();
        let text = render("m\"x", &g, &c, 1700000000.5);
        assert!(text.contains("vllm:num_requests_running{engine=\"0\",model_name=\"m\\\"x\"} 2\n"));
        assert!(text.contains("vllm:num_requests_waiting{engine=\"0\",model_name=\"m\\\"x\"} 3\n"));
        assert!(
            text.contains("vllm:kv_cache_usage_perc{engine=\"0\",model_name=\"m\\\"x\"} 0.25\n")
        );
        assert!(
            text.contains("vllm:gpu_cache_usage_perc{engine=\"0\",model_name=\"m\\\"x\"} 0.25\n")
        );
        assert!(text
            .contains("running_lora_adapters=\"a,b\",waiting_lora_adapters=\"\"} 1700000000.5\n"));
        assert!(
            text.contains("vllm:prefix_cache_hits_total{engine=\"0\",model_name=\"m\\\"x\"} 32\n")
        );
        assert!(text.contains("# TYPE vllm:inter_token_latency_seconds histogram\n"));
        assert!(text
            .contains("epp_sim:kv_transfer_held_blocks{engine=\"0\",model_name=\"m\\\"x\"} 3\n"));
        assert!(text.contains(
            "epp_sim:kv_transfer_fallbacks_total{engine=\"0\",model_name=\"m\\\"x\",reason=\"unreachable\"} 0\n"
        ));
        assert!(text.contains(
            "vllm:prompt_tokens_by_source_total{engine=\"0\",model_name=\"m\\\"x\",source=\"external_kv_transfer\"} 0\n"
        ));
        assert!(text.contains(
            "vllm:inter_token_latency_seconds_bucket{engine=\"0\",model_name=\"m\\\"x\",le=\"0.075\"} 0\n"
        ));
    }
}

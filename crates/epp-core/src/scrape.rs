//! Background model-server scraping and health probing. One task per endpoint polls its
//! `/metrics` (engine names mapped per PROTOCOLS.md §2) and, optionally, `/health`; results go to
//! the datastore, which owns the health state machine. Tasks follow the discovered set.

use std::collections::HashMap;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper_util::client::legacy::{connect::HttpConnector, Client};
use hyper_util::rt::TokioExecutor;
use tokio::task::JoinHandle;

use crate::datastore::{Engine, FailureKind, HealthSink, ModelServerMetrics, Source};
use crate::telemetry::Shutdown;

/// Scraper settings.
#[derive(Clone, Debug)]
pub struct ScrapeOptions {
    /// How often each endpoint's `/metrics` is read.
    pub interval: Duration,
    /// Per-scrape deadline.
    pub timeout: Duration,
    /// How often `/health` is probed (`None`: no probes).
    pub probe_interval: Option<Duration>,
}

impl Default for ScrapeOptions {
    fn default() -> Self {
        Self {
            interval: Duration::from_millis(100),
            timeout: Duration::from_secs(1),
            probe_interval: Some(Duration::from_secs(1)),
        }
    }
}

/// Body size cap for a scrape (a vLLM exposition is ~10-50 KiB).
const MAX_SCRAPE_BYTES: usize = 4 * 1024 * 1024;

pub type HttpClient = Client<HttpConnector, Empty<Bytes>>;

pub fn http_client() -> HttpClient {
    let mut conn = HttpConnector::new();
    conn.set_nodelay(true);
    conn.set_connect_timeout(Some(Duration::from_secs(2)));
    Client::builder(TokioExecutor::new())
        .pool_idle_timeout(Duration::from_secs(30))
        .build(conn)
}

/// Classify a client error: refused connections are unambiguous.
pub fn failure_kind(err: &(dyn std::error::Error + 'static)) -> FailureKind {
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(err);
    while let Some(e) = cur {
        if let Some(io) = e.downcast_ref::<std::io::Error>() {
            if io.kind() == std::io::ErrorKind::ConnectionRefused {
                return FailureKind::Refused;
            }
        }
        cur = e.source();
    }
    FailureKind::Other
}

/// GET a URL with a deadline; returns (status, body).
async fn get(
    client: &HttpClient,
    url: &str,
    timeout: Duration,
) -> Result<(u16, Bytes), (FailureKind, String)> {
    let uri: http::Uri = url
        .parse()
        .map_err(|e| (FailureKind::Other, format!("bad url {url}: {e}")))?;
    let fut = async {
        let resp = client
            .get(uri)
            .await
            .map_err(|e| (failure_kind(&e), e.to_string()))?;
        let status = resp.status().as_u16();
        let body = http_body_util::Limited::new(resp.into_body(), MAX_SCRAPE_BYTES)
            .collect()
            .await
            .map_err(|e| (FailureKind::Other, e.to_string()))?
            .to_bytes();
        Ok((status, body))
    };
    match tokio::time::timeout(timeout, fut).await {
        Ok(r) => r,
        Err(_) => Err((FailureKind::Other, format!("timed out after {timeout:?}"))),
    }
}

/// Parse an exposition and map the engine's names. Missing series read as 0.
pub fn parse_metrics(engine: Engine, text: &str) -> Result<ModelServerMetrics, String> {
    let (waiting, running, kv, kv_legacy, lora, cache) = match engine {
        Engine::Vllm => (
            "vllm:num_requests_waiting",
            "vllm:num_requests_running",
            "vllm:kv_cache_usage_perc",
            Some("vllm:gpu_cache_usage_perc"),
            Some("vllm:lora_requests_info"),
            Some("vllm:cache_config_info"),
        ),
        Engine::Sglang => (
            "sglang:num_queue_reqs",
            "sglang:num_running_reqs",
            "sglang:token_usage",
            None,
            None,
            Some("sglang:cache_config_info"),
        ),
        Engine::TrtLlm => (
            "trtllm_num_requests_waiting",
            "trtllm_num_requests_running",
            "trtllm_kv_cache_utilization",
            None,
            None,
            None,
        ),
    };
    // Only the families read below are parsed: a real vLLM exposition is mostly histogram
    // buckets the picker never reads (docs/benchmarks.md, "Scrape cost").
    let families: Vec<&str> = [
        Some(waiting),
        Some(running),
        Some(kv),
        kv_legacy,
        lora,
        cache,
    ]
    .into_iter()
    .flatten()
    .collect();
    let samples = crate::exposition::parse_families(text, &families)?;
    let value = |s: &crate::exposition::Sample| -> f64 { s.value };
    let sum = |name: &str| -> Option<f64> {
        let mut found = false;
        let mut total = 0.0;
        for s in samples.iter().filter(|s| s.name == name) {
            found = true;
            total += value(s);
        }
        found.then_some(total)
    };
    let max = |name: &str| -> Option<f64> {
        samples
            .iter()
            .filter(|s| s.name == name)
            .map(value)
            .reduce(f64::max)
    };
    let mut m = ModelServerMetrics {
        waiting_queue: sum(waiting).unwrap_or(0.0),
        running: sum(running).unwrap_or(0.0),
        kv_cache_usage: max(kv)
            .or_else(|| kv_legacy.and_then(max))
            .unwrap_or(0.0)
            .clamp(0.0, 1.0),
        ..Default::default()
    };
    let mut models: Vec<String> = samples
        .iter()
        .filter(|s| s.name == waiting || s.name == running)
        .filter_map(|s| s.labels.get("model_name"))
        .filter(|v| !v.is_empty())
        .cloned()
        .collect();
    models.sort();
    models.dedup();
    models.truncate(crate::datastore::MAX_REPORTED_MODELS);
    m.models = models;
    if let Some(name) = lora {
        // The series with the newest timestamp value is current.
        if let Some(s) = samples
            .iter()
            .filter(|s| s.name == name)
            .max_by(|a, b| value(a).total_cmp(&value(b)))
        {
            let list = |k: &str| -> Vec<String> {
                s.labels
                    .get(k)
                    .map(|v| {
                        v.split(',')
                            .map(str::trim)
                            .filter(|x| !x.is_empty())
                            .map(str::to_string)
                            .collect()
                    })
                    .unwrap_or_default()
            };
            m.running_loras = list("running_lora_adapters");
            m.waiting_loras = list("waiting_lora_adapters");
            m.max_loras = s.labels.get("max_lora").and_then(|v| v.parse().ok());
        }
    }
    if let Some(name) = cache {
        if let Some(s) = samples.iter().find(|s| s.name == name) {
            m.block_size = s.labels.get("block_size").and_then(|v| v.parse().ok());
            m.num_gpu_blocks = s.labels.get("num_gpu_blocks").and_then(|v| v.parse().ok());
        }
    }
    Ok(m)
}

async fn scrape_once(
    client: &HttpClient,
    ds: &HealthSink,
    address: &str,
    engine: Engine,
    timeout: Duration,
) {
    let url = format!("http://{address}/metrics");
    let result = match get(client, &url, timeout).await {
        Ok((200, body)) => match std::str::from_utf8(&body) {
            Ok(text) => parse_metrics(engine, text).map_err(|e| (FailureKind::Other, e)),
            Err(_) => Err((FailureKind::Other, "exposition is not UTF-8".to_string())),
        },
        Ok((status, _)) => Err((FailureKind::Other, format!("HTTP {status}"))),
        Err(e) => Err(e),
    };
    match result {
        Ok(m) => ds.record_scrape(address, Ok(m)),
        Err((kind, msg)) => {
            tracing::debug!(endpoint = address, error = %msg, "scrape failed");
            ds.record_scrape(address, Err(kind));
        }
    }
}

async fn probe_once(client: &HttpClient, ds: &HealthSink, address: &str, timeout: Duration) {
    let url = format!("http://{address}/health");
    let r = match get(client, &url, timeout).await {
        Ok((s, _)) if (200..300).contains(&s) => Ok(()),
        Ok(_) => Err(FailureKind::Other),
        Err((k, _)) => Err(k),
    };
    ds.record(address, Source::Probe, r);
}

/// Run scrapers for every discovered endpoint until shutdown.
pub async fn run(ds: HealthSink, opts: ScrapeOptions, shutdown: Shutdown) {
    let client = http_client();
    let mut tasks: HashMap<String, JoinHandle<()>> = HashMap::new();
    let reader = ds.reader();
    let mut changes = reader.subscribe();
    let mut tick = tokio::time::interval(
        Duration::from_millis(250).min(opts.interval.max(Duration::from_millis(10))),
    );
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let stop = shutdown.wait();
    tokio::pin!(stop);
    loop {
        // Reconcile tasks with the current snapshot.
        let snap = reader.snapshot();
        let live: HashMap<String, Engine> = snap
            .endpoints
            .iter()
            .map(|e| (e.endpoint.address().to_string(), e.endpoint.spec.engine))
            .collect();
        tasks.retain(|addr, h| {
            let keep = live.contains_key(addr);
            if !keep {
                h.abort();
            }
            keep
        });
        for (addr, engine) in live {
            if tasks.contains_key(&addr) {
                continue;
            }
            let (ds2, client2, opts2) = (ds.clone(), client.clone(), opts.clone());
            let a2 = addr.clone();
            let h = tokio::spawn(async move {
                let mut iv = tokio::time::interval(opts2.interval);
                iv.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                let mut next_probe = tokio::time::Instant::now();
                loop {
                    iv.tick().await;
                    scrape_once(&client2, &ds2, &a2, engine, opts2.timeout).await;
                    if let Some(pi) = opts2.probe_interval {
                        if tokio::time::Instant::now() >= next_probe {
                            probe_once(&client2, &ds2, &a2, opts2.timeout).await;
                            next_probe = tokio::time::Instant::now() + pi;
                        }
                    }
                }
            });
            tasks.insert(addr, h);
        }
        tokio::select! {
            _ = &mut stop => break,
            r = changes.changed() => { if r.is_err() { break; } }
            _ = tick.tick() => ds.tick(),
        }
    }
    for (_, h) in tasks {
        h.abort();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn maps_vllm_names_including_legacy_kv_and_lora() {
        let text = r#"# TYPE vllm:num_requests_waiting gauge
vllm:num_requests_waiting{model_name="m"} 3
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{model_name="m"} 2
# TYPE vllm:gpu_cache_usage_perc gauge
vllm:gpu_cache_usage_perc{model_name="m"} 0.25
# TYPE vllm:lora_requests_info gauge
vllm:lora_requests_info{max_lora="2",running_lora_adapters="a,b",waiting_lora_adapters=""} 1.7e9
vllm:lora_requests_info{max_lora="2",running_lora_adapters="a",waiting_lora_adapters="c"} 1.6e9
# TYPE vllm:cache_config_info gauge
vllm:cache_config_info{block_size="16",num_gpu_blocks="1000"} 1
"#;
        let m = parse_metrics(Engine::Vllm, text).unwrap();
        assert_eq!(m.waiting_queue, 3.0);
        assert_eq!(m.running, 2.0);
        assert_eq!(m.kv_cache_usage, 0.25);
        assert_eq!(m.running_loras, vec!["a", "b"]);
        assert_eq!(m.models, vec!["m"]);
        assert!(m.waiting_loras.is_empty());
        assert_eq!(m.max_loras, Some(2));
        assert_eq!(m.block_size, Some(16));
        assert_eq!(m.num_gpu_blocks, Some(1000));
        // The current name wins over the legacy one.
        let m = parse_metrics(
            Engine::Vllm,
            "# TYPE vllm:kv_cache_usage_perc gauge\nvllm:kv_cache_usage_perc 0.5\n# TYPE vllm:gpu_cache_usage_perc gauge\nvllm:gpu_cache_usage_perc 0.1\n",
        )
        .unwrap();
        assert_eq!(m.kv_cache_usage, 0.5);
    }

    #[test]
    fn maps_sglang_and_trtllm() {
        let m = parse_metrics(
            Engine::Sglang,
            "# TYPE sglang:num_queue_reqs gauge\nsglang:num_queue_reqs 4\n# TYPE sglang:num_running_reqs gauge\nsglang:num_running_reqs 1\n# TYPE sglang:token_usage gauge\nsglang:token_usage 0.75\n",
        )
        .unwrap();
        assert_eq!(
            (m.waiting_queue, m.running, m.kv_cache_usage),
            (4.0, 1.0, 0.75)
        );
        let m = parse_metrics(
            Engine::TrtLlm,
            "# TYPE trtllm_num_requests_waiting gauge\ntrtllm_num_requests_waiting 7\n# TYPE trtllm_num_requests_running gauge\ntrtllm_num_requests_running 5\n# TYPE trtllm_kv_cache_utilization gauge\ntrtllm_kv_cache_utilization 0.5\n",
        )
        .unwrap();
        assert_eq!(
            (m.waiting_queue, m.running, m.kv_cache_usage),
            (7.0, 5.0, 0.5)
        );
    }
}

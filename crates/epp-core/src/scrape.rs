//! Background model-server scraping and health probing. One task per endpoint polls its
//! `/metrics` (engine names mapped per PROTOCOLS.md §2) and, optionally, `/health`; results go to
//! the datastore, which owns the health state machine. Tasks follow the discovered set.

use std::collections::HashMap;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::{connect::HttpConnector, Client};
use hyper_util::rt::TokioExecutor;
use tokio::task::JoinHandle;

use crate::datalayer::{EngineMapping, EngineMappings, MetricSpec, MetricsPipeline};
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
    /// Flag-level settings over the config's metrics source (the GAIE
    /// `--model-server-metrics-*` and deprecated `--*-metric` flags).
    pub overrides: crate::datalayer::MetricsFlags,
}

impl Default for ScrapeOptions {
    fn default() -> Self {
        Self {
            interval: Duration::from_millis(100),
            timeout: Duration::from_secs(1),
            probe_interval: Some(Duration::from_secs(1)),
            overrides: Default::default(),
        }
    }
}

/// Body size cap for a scrape (a vLLM exposition is ~10-50 KiB).
const MAX_SCRAPE_BYTES: usize = 4 * 1024 * 1024;

pub type HttpClient = Client<HttpsConnector<HttpConnector>, Empty<Bytes>>;

/// A client for `http://` and `https://` URLs; HTTPS trusts `tls` (see
/// [`crate::tls::client::client_config`]), or accepts any certificate when `tls` is `None`.
pub fn http_client(tls: Option<rustls::ClientConfig>) -> Result<HttpClient, String> {
    let mut conn = HttpConnector::new();
    conn.set_nodelay(true);
    conn.set_connect_timeout(Some(Duration::from_secs(2)));
    conn.enforce_http(false);
    let tls = match tls {
        Some(t) => t,
        None => crate::tls::client::client_config(None, None)?,
    };
    let https = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(tls)
        .https_or_http()
        .enable_http1()
        .wrap_connector(conn);
    Ok(Client::builder(TokioExecutor::new())
        .pool_idle_timeout(Duration::from_secs(30))
        .build(https))
}

/// The scraper's client for a metrics source: its CA (or none: no verification when
/// `insecureSkipVerify`) and client certificate.
pub fn client_for(source: Option<&crate::datalayer::MetricsSource>) -> Result<HttpClient, String> {
    let Some(s) = source else {
        return http_client(None);
    };
    let ca = if s.insecure_skip_verify {
        None
    } else {
        s.ca_cert_path.as_deref()
    };
    let cfg = crate::tls::client::client_config(
        ca,
        s.client_cert
            .as_ref()
            .map(|(c, k)| (c.as_path(), k.as_path())),
    )?;
    http_client(Some(cfg))
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

/// Parse an exposition with a built-in engine's series (see [`parse_with`]).
pub fn parse_metrics(engine: Engine, text: &str) -> Result<ModelServerMetrics, String> {
    let mappings = EngineMappings::default();
    parse_with(mappings.get(engine.as_str()), text)
}

/// Parse an exposition and read the series `mapping` names. Missing series read as 0.
pub fn parse_with(mapping: &EngineMapping, text: &str) -> Result<ModelServerMetrics, String> {
    // Only the families read below are parsed: a real vLLM exposition is mostly histogram
    // buckets the picker never reads (docs/benchmarks.md, "Scrape cost").
    let families = mapping.families();
    let samples = crate::exposition::parse_families(text, &families)?;
    let matching = |spec: &Option<MetricSpec>| -> Vec<&crate::exposition::Sample> {
        match spec {
            Some(spec) => samples.iter().filter(|s| spec.matches(s)).collect(),
            None => Vec::new(),
        }
    };
    let sum = |spec: &Option<MetricSpec>| -> Option<f64> {
        let m = matching(spec);
        (!m.is_empty()).then(|| m.iter().map(|s| s.value).sum())
    };
    let max = |spec: &Option<MetricSpec>| -> Option<f64> {
        matching(spec).iter().map(|s| s.value).reduce(f64::max)
    };
    let mut m = ModelServerMetrics {
        waiting_queue: sum(&mapping.queued).unwrap_or(0.0),
        running: sum(&mapping.running).unwrap_or(0.0),
        kv_cache_usage: max(&mapping.kv_usage)
            .or_else(|| max(&mapping.kv_usage_fallback))
            .unwrap_or(0.0)
            .clamp(0.0, 1.0),
        ..Default::default()
    };
    let mut models: Vec<String> = matching(&mapping.queued)
        .into_iter()
        .chain(matching(&mapping.running))
        .filter_map(|s| s.labels.get("model_name"))
        .filter(|v| !v.is_empty())
        .cloned()
        .collect();
    models.sort();
    models.dedup();
    models.truncate(crate::datastore::MAX_REPORTED_MODELS);
    m.models = models;
    // The LoRA info series with the newest timestamp value is current.
    if let Some(s) = matching(&mapping.lora)
        .into_iter()
        .max_by(|a, b| a.value.total_cmp(&b.value))
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
    if let Some(s) = matching(&mapping.cache_info).into_iter().next() {
        m.block_size = s
            .labels
            .get(&mapping.cache_block_size_label)
            .and_then(|v| v.parse().ok());
        m.num_gpu_blocks = s
            .labels
            .get(&mapping.cache_num_blocks_label)
            .and_then(|v| v.parse().ok());
    }
    if let Some(v) = max(&mapping.cache_block_size) {
        m.block_size = (v.is_finite() && v >= 1.0).then_some(v as u32);
    }
    if let Some(v) = max(&mapping.cache_num_blocks) {
        m.num_gpu_blocks = (v.is_finite() && v >= 0.0).then_some(v as u64);
    }
    Ok(m)
}

async fn scrape_once(
    client: &HttpClient,
    ds: &HealthSink,
    address: &str,
    url: &str,
    mapping: &EngineMapping,
    timeout: Duration,
) {
    let result = match get(client, url, timeout).await {
        Ok((200, body)) => match std::str::from_utf8(&body) {
            Ok(text) => parse_with(mapping, text).map_err(|e| (FailureKind::Other, e)),
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

async fn probe_once(
    client: &HttpClient,
    ds: &HealthSink,
    address: &str,
    url: &str,
    timeout: Duration,
) {
    let r = match get(client, url, timeout).await {
        Ok((s, _)) if (200..300).contains(&s) => Ok(()),
        Ok(_) => Err(FailureKind::Other),
        Err((k, _)) => Err(k),
    };
    ds.record(address, Source::Probe, r);
}

/// `address` with its port replaced by `port`.
fn with_port(address: &str, port: u16) -> String {
    match address.rsplit_once(':') {
        Some((host, p)) if p.bytes().all(|b| b.is_ascii_digit()) => format!("{host}:{port}"),
        _ => format!("{address}:{port}"),
    }
}

/// Run scrapers for every discovered endpoint until shutdown. `client` comes from
/// [`client_for`] (built before start-up so a bad certificate file fails the start).
/// `metrics`: what is scraped and how it is read (the resolved data layer); `None`: no
/// scraping, only probes.
pub async fn run(
    ds: HealthSink,
    opts: ScrapeOptions,
    metrics: Option<MetricsPipeline>,
    client: HttpClient,
    shutdown: Shutdown,
) {
    let mut tasks: HashMap<String, JoinHandle<()>> = HashMap::new();
    let reader = ds.reader();
    let mut changes = reader.subscribe();
    let base = metrics
        .as_ref()
        .and_then(|m| m.source.interval)
        .unwrap_or(opts.interval);
    let mut tick =
        tokio::time::interval(Duration::from_millis(250).min(base.max(Duration::from_millis(10))));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let stop = shutdown.wait();
    tokio::pin!(stop);
    let scheme = metrics
        .as_ref()
        .map(|m| m.source.scheme.as_str())
        .unwrap_or("http");
    loop {
        // Reconcile tasks with the current snapshot.
        let snap = reader.snapshot();
        let live: HashMap<String, crate::datastore::EndpointSpec> = snap
            .endpoints
            .iter()
            .map(|e| (e.endpoint.address().to_string(), e.endpoint.spec.clone()))
            .collect();
        tasks.retain(|addr, h| {
            let keep = live.contains_key(addr);
            if !keep {
                h.abort();
            }
            keep
        });
        for (addr, spec) in live {
            if tasks.contains_key(&addr) {
                continue;
            }
            let scrape = metrics.as_ref().map(|m| {
                let static_engine = (spec.engine != Engine::Vllm).then(|| spec.engine.as_str());
                let engine = m.mappings.engine_of(&spec.labels, static_engine);
                if !m.mappings.knows(engine) {
                    tracing::warn!(endpoint = %spec.name, engine,
                        default = %m.mappings.default_engine,
                        "unknown engine type; reading its metrics as the default engine's");
                }
                let target = match m.port {
                    Some(p) => with_port(&addr, p),
                    None => addr.clone(),
                };
                (m.source.url(&target), m.mappings.get(engine).clone())
            });
            let health_url = format!("{scheme}://{addr}/health");
            let (ds2, client2, opts2) = (ds.clone(), client.clone(), opts.clone());
            let a2 = addr.clone();
            let h = tokio::spawn(async move {
                let mut iv = tokio::time::interval(base);
                iv.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                let mut next_probe = tokio::time::Instant::now();
                loop {
                    iv.tick().await;
                    if let Some((url, mapping)) = &scrape {
                        scrape_once(&client2, &ds2, &a2, url, mapping, opts2.timeout).await;
                    }
                    if let Some(pi) = opts2.probe_interval {
                        if tokio::time::Instant::now() >= next_probe {
                            probe_once(&client2, &ds2, &a2, &health_url, opts2.timeout).await;
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

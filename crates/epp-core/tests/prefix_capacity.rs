//! The prefix index's capacity as the exposition reports it is the bound actually in force:
//! per backend the smaller of `lruCapacityPerServer` and the backend's own KV cache (its
//! scraped `cache_config_info`), so the churn alert compares evictions with what is held.

use std::sync::Arc;

use epp_core::config::EndpointPickerConfig;
use epp_core::datastore::{DatastoreWriter, EndpointSpec, HealthConfig, ModelServerMetrics};
use epp_core::metrics::Metrics;
use epp_core::prefix::PrefixIndex;
use epp_core::scheduler::Scheduler;

const PODS: [&str; 3] = ["10.0.0.1:8000", "10.0.0.2:8000", "10.0.0.3:8000"];

fn config(lru: u64) -> EndpointPickerConfig {
    EndpointPickerConfig::from_yaml(&format!(
        "apiVersion: inference.networking.x-k8s.io/v1alpha1
kind: EndpointPickerConfig
plugins:
- type: prefix-cache-scorer
  parameters:
    blockSizeTokens: 16
    lruCapacityPerServer: {lru}
- type: max-score-picker
schedulingProfiles:
- name: default
  plugins:
  - pluginRef: prefix-cache-scorer
  - pluginRef: max-score-picker
"
    ))
    .unwrap()
}

fn gauge(exposition: &str, name: &str) -> f64 {
    exposition
        .lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or_else(|| panic!("{name} missing from:\n{exposition}"))
}

/// Three backends with the simulator's default cache (8,192 blocks of 16 tokens), fed far more
/// unique 8 KB prompts than they can hold, the way the director teaches the index.
fn run(lru: u64, num_gpu_blocks: Option<u64>) -> (Arc<PrefixIndex>, String) {
    let scheduler = Scheduler::from_config(&config(lru)).unwrap();
    let ds = DatastoreWriter::new(HealthConfig::default());
    let prefix = Arc::new(PrefixIndex::new(scheduler.prefix_config()));
    let metrics = Metrics::new(ds.reader(), prefix.clone());
    ds.set_endpoints(PODS.iter().map(|p| EndpointSpec::new(*p)).collect());
    for p in PODS {
        ds.record_scrape(
            p,
            Ok(ModelServerMetrics {
                block_size: Some(16),
                num_gpu_blocks,
                ..Default::default()
            }),
        );
    }
    let snap = ds.snapshot();
    assert_eq!(snap.endpoints.len(), 3);
    for i in 0..600u32 {
        let e = &snap.endpoints[i as usize % 3];
        let mut prompt = format!("request {i}: ").into_bytes();
        prompt.resize(8192, b'a' + (i % 26) as u8);
        let h = prefix.hash("m", &prompt);
        let server = e
            .metrics
            .as_deref()
            .and_then(|m| prefix.server_capacity_blocks(m));
        prefix.insert_capped(e.slot(), &h, server);
    }
    (prefix, metrics.encode())
}

#[test]
fn capacity_metric_reports_the_server_bound_in_force() {
    let (prefix, text) = run(31_250, Some(8192));
    // 128 blocks per 8 KB prompt, 200 prompts per backend: every backend is full at 8,192.
    assert_eq!(prefix.len(), 3 * 8192);
    for slot in 0..3 {
        assert_eq!(prefix.slot_len(slot), 8192);
    }
    assert_eq!(gauge(&text, "epp_prefix_index_capacity_blocks"), 24_576.0);
    assert_eq!(gauge(&text, "epp_prefix_index_blocks"), 24_576.0);
    assert_eq!(
        gauge(&text, "epp_prefix_index_evictions_total"),
        (600 * 128 - 3 * 8192) as f64
    );
}

#[test]
fn capacity_metric_reports_the_configured_bound_when_smaller_or_server_silent() {
    let (prefix, text) = run(5000, Some(8192));
    assert_eq!(prefix.len(), 15_000);
    assert_eq!(gauge(&text, "epp_prefix_index_capacity_blocks"), 15_000.0);
    // No cache_config_info: lruCapacityPerServer alone is in force.
    let (prefix, text) = run(20_000, None);
    assert_eq!(prefix.len(), 3 * 20_000);
    assert_eq!(gauge(&text, "epp_prefix_index_capacity_blocks"), 60_000.0);
}

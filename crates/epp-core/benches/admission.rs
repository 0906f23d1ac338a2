//! Flow control when nothing queues: what `featureGates: [flowControl]` adds to a request that
//! finds the pool below its usage limit (the saturation reading over 64 endpoints, the
//! let-through count, the outcome metrics). Both detectors; the legacy admission (flow control
//! off) for comparison.
//!
//!     cargo bench -p epp-core --bench admission

use std::sync::Arc;

use criterion::{criterion_group, criterion_main, Criterion};
use epp_core::admission::controller::FlowRequest;
use epp_core::admission::metrics::FlowControlMetrics;
use epp_core::admission::{FlowController, FlowSettings, Outcome};
use epp_core::config::EndpointPickerConfig;
use epp_core::datastore::{DatastoreWriter, EndpointSpec, HealthConfig, ModelServerMetrics};

const ENDPOINTS: usize = 64;

fn controller(detector: &str) -> (DatastoreWriter, Arc<FlowController>) {
    let ds = DatastoreWriter::new(HealthConfig::default());
    let specs: Vec<_> = (0..ENDPOINTS)
        .map(|i| EndpointSpec::new(format!("10.0.{}.{}:8000", i / 250, i % 250 + 1)))
        .collect();
    ds.set_endpoints(specs.clone());
    for s in &specs {
        ds.record_scrape(
            &s.address,
            Ok(ModelServerMetrics {
                waiting_queue: 1.0,
                kv_cache_usage: 0.3,
                ..Default::default()
            }),
        );
    }
    ds.tick();
    let yaml = format!(
        "apiVersion: llm-d.ai/v1alpha1\nkind: EndpointPickerConfig\nfeatureGates: [flowControl]\nplugins:\n- type: {detector}\n  parameters: {{metricsStalenessThreshold: 1h}}\nflowControl:\n  saturationDetector:\n    pluginRef: {detector}\n"
    )
    .replace(
        "concurrency-detector\n  parameters: {metricsStalenessThreshold: 1h}",
        "concurrency-detector\n  parameters: {maxConcurrency: 8}",
    );
    let cfg = EndpointPickerConfig::from_yaml(&yaml).unwrap();
    let settings = FlowSettings::from_config(&cfg).unwrap();
    let mut r = prometheus_client::registry::Registry::default();
    let m = Arc::new(FlowControlMetrics::register(&mut r));
    let fc = FlowController::new(settings, ds.reader(), m);
    (ds, fc)
}

fn bench(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let req = FlowRequest {
        fairness_id: "tenant-a".into(),
        priority: 0,
        bytes: 8192,
        model_name: "m".into(),
        target_model_name: "m".into(),
    };
    for detector in ["utilization-detector", "concurrency-detector"] {
        let (_ds, fc) = controller(detector);
        c.bench_function(&format!("admit_idle_{detector}"), |b| {
            b.iter(|| {
                let (o, t) = rt.block_on(fc.enqueue_and_wait(req.clone()));
                assert_eq!(o, Outcome::Dispatched);
                drop(t);
            })
        });
    }
}

criterion_group!(benches, bench);
criterion_main!(benches);

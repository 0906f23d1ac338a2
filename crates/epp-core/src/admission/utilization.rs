//! `utilization-detector` (llm-d-router's default saturation detector): each endpoint scores
//! `max(waiting / queueDepthThreshold, kvCacheUsage / kvCacheUtilThreshold)` (a roofline of its
//! compute and memory), the pool the mean of its endpoints. An endpoint whose metrics are
//! missing or older than `metricsStalenessThreshold` scores 1.0 (fail closed), so a pool the
//! picker cannot observe stops dispatching instead of admitting blind.
//!
//! epp adds one thing: requests already let through but not yet on an endpoint count as waiting
//! (spread over the pool), so one burst cannot all pass on the same reading.

use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::config::{ConfigError, PluginSpec};
use crate::datastore::{EndpointView, HealthState};

use super::SaturationDetector;

pub const TYPE: &str = "utilization-detector";

pub const DEFAULT_QUEUE_DEPTH_THRESHOLD: u64 = 5;
pub const DEFAULT_KV_CACHE_UTIL_THRESHOLD: f64 = 0.8;
pub const DEFAULT_METRICS_STALENESS_THRESHOLD: Duration = Duration::from_millis(200);

#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct Params {
    queue_depth_threshold: Option<i64>,
    kv_cache_util_threshold: Option<f64>,
    metrics_staleness_threshold: Option<Value>,
    headroom: Option<f64>,
}

pub fn build(spec: &PluginSpec, field: &str) -> Result<Arc<dyn SaturationDetector>, ConfigError> {
    let p: Params = crate::config::plugin_parameters(spec, field)?;
    let at = |k: &str| format!("{field}.parameters.{k}");
    let q = p
        .queue_depth_threshold
        .unwrap_or(DEFAULT_QUEUE_DEPTH_THRESHOLD as i64);
    if q <= 0 {
        return Err(ConfigError::new(
            at("queueDepthThreshold"),
            format!("must be strictly positive, got {q}"),
        ));
    }
    let kv = p
        .kv_cache_util_threshold
        .unwrap_or(DEFAULT_KV_CACHE_UTIL_THRESHOLD);
    if !(kv > 0.0 && kv <= 1.0) {
        return Err(ConfigError::new(
            at("kvCacheUtilThreshold"),
            format!("must be in (0.0, 1.0], got {kv}"),
        ));
    }
    let stale = match &p.metrics_staleness_threshold {
        None => DEFAULT_METRICS_STALENESS_THRESHOLD,
        Some(v) => crate::config::parse_go_duration(v, &at("metricsStalenessThreshold"))?,
    };
    if stale.is_zero() {
        return Err(ConfigError::new(
            at("metricsStalenessThreshold"),
            "must be strictly positive",
        ));
    }
    check_headroom(p.headroom, &at("headroom"))?;
    Ok(Arc::new(Utilization {
        name: spec.name().to_string(),
        queue_depth_threshold: q as f64,
        kv_cache_util_threshold: kv,
        metrics_staleness_threshold: stale,
    }))
}

/// `headroom` only loosens the detector's per-endpoint filter in llm-d-router's scheduling
/// profiles, a role epp's detectors do not play (epp's `saturation-filter` does that): a value
/// other than 0 would be accepted and ignored, so it is refused.
pub(super) fn check_headroom(h: Option<f64>, field: &str) -> Result<(), ConfigError> {
    match h {
        None => Ok(()),
        Some(h) if h < 0.0 || !h.is_finite() => Err(ConfigError::new(
            field,
            format!("must be a non-negative value, got {h}"),
        )),
        Some(0.0) => Ok(()),
        Some(_) => Err(ConfigError::new(
            field,
            "only loosens the detector used as a scheduling filter, which epp does not offer (use saturation-filter in the profile); remove it or set 0",
        )),
    }
}

#[derive(Debug)]
pub struct Utilization {
    pub name: String,
    pub queue_depth_threshold: f64,
    pub kv_cache_util_threshold: f64,
    pub metrics_staleness_threshold: Duration,
}

impl Default for Utilization {
    fn default() -> Self {
        Self {
            name: TYPE.into(),
            queue_depth_threshold: DEFAULT_QUEUE_DEPTH_THRESHOLD as f64,
            kv_cache_util_threshold: DEFAULT_KV_CACHE_UTIL_THRESHOLD,
            metrics_staleness_threshold: DEFAULT_METRICS_STALENESS_THRESHOLD,
        }
    }
}

impl SaturationDetector for Utilization {
    fn type_name(&self) -> &'static str {
        TYPE
    }
    fn name(&self) -> &str {
        &self.name
    }
    fn saturation(&self, endpoints: &[&EndpointView], extra: usize) -> (f64, usize) {
        if endpoints.is_empty() {
            return (1.0, 0);
        }
        let mut total = 0.0;
        let mut stale = 0;
        for e in endpoints {
            let fresh = e.health != HealthState::Stale
                && e.metrics_age
                    .is_some_and(|a| a <= self.metrics_staleness_threshold);
            match (&e.metrics, fresh) {
                (Some(m), true) => {
                    let q = m.waiting_queue / self.queue_depth_threshold;
                    let kv = m.kv_cache_usage / self.kv_cache_util_threshold;
                    total += q.max(kv);
                }
                _ => {
                    total += 1.0;
                    stale += 1;
                }
            }
        }
        let n = endpoints.len() as f64;
        let pending = extra as f64 / (n * self.queue_depth_threshold);
        (total / n + pending, stale)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::datastore::ModelServerMetrics;

    pub(crate) fn view(waiting: f64, kv: f64, age_ms: Option<u64>) -> EndpointView {
        let mut v = super::super::controller::tests::one_endpoint();
        v.health = HealthState::Healthy;
        v.metrics = Some(Arc::new(ModelServerMetrics {
            waiting_queue: waiting,
            kv_cache_usage: kv,
            ..Default::default()
        }));
        v.metrics_age = age_ms.map(Duration::from_millis);
        v
    }

    #[test]
    fn roofline_mean_and_stale_endpoints_count_as_saturated() {
        let d = Utilization::default();
        let a = view(5.0, 0.0, Some(10)); // queue at threshold: 1.0
        let b = view(0.0, 0.4, Some(10)); // kv at half the threshold: 0.5
        let (s, stale) = d.saturation(&[&a, &b], 0);
        assert!((s - 0.75).abs() < 1e-9, "{s}");
        assert_eq!(stale, 0);
        let old = view(0.0, 0.0, Some(500));
        let (s, stale) = d.saturation(&[&old], 0);
        assert_eq!((s, stale), (1.0, 1));
        let none = view(0.0, 0.0, None);
        assert_eq!(d.saturation(&[&none], 0), (1.0, 1));
        assert_eq!(d.saturation(&[], 0), (1.0, 0));
        // Two let-through requests over one endpoint with threshold 5: +0.4.
        let idle = view(0.0, 0.0, Some(1));
        let (s, _) = d.saturation(&[&idle], 2);
        assert!((s - 0.4).abs() < 1e-9, "{s}");
    }

    #[test]
    fn parameters_are_checked_with_llm_d_defaults() {
        let b = |y: &str| {
            build(&PluginSpec::for_test(TYPE, Some(y)), "plugins[0]")
                .err()
                .unwrap()
                .to_string()
        };
        assert_eq!(
            b("queueDepthThreshold: 0"),
            "plugins[0].parameters.queueDepthThreshold: must be strictly positive, got 0"
        );
        assert!(b("kvCacheUtilThreshold: 1.5")
            .starts_with("plugins[0].parameters.kvCacheUtilThreshold"));
        assert!(b("metricsStalenessThreshold: soon")
            .starts_with("plugins[0].parameters.metricsStalenessThreshold"));
        assert!(b("headroom: 0.2").contains("scheduling filter"));
        assert!(b("bogus: 1").contains("unknown field"));
        assert!(build(&PluginSpec::for_test(TYPE, Some("queueDepthThreshold: 999999999\nkvCacheUtilThreshold: 1.0\nmetricsStalenessThreshold: 1s\nheadroom: 0")), "plugins[0]").is_ok());
    }
}

//! The scheduler's own metric: time spent in each plugin per request, labelled by the plugin
//! labels the scheduler builds once per configured plugin.

use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

use super::PluginObserver;
use crate::metrics::{plugin_histogram, PluginLabels};

/// `epp_plugin_duration_seconds`.
#[derive(Debug)]
pub struct PluginMetrics {
    plugin_duration: Family<PluginLabels, Histogram, fn() -> Histogram>,
}

impl PluginMetrics {
    /// Register the family in `registry`.
    pub fn register(registry: &mut Registry) -> Self {
        let plugin_duration =
            Family::<PluginLabels, Histogram, fn() -> Histogram>::new_with_constructor(
                plugin_histogram as fn() -> Histogram,
            );
        registry.register(
            "epp_plugin_duration_seconds",
            "Time spent in each scheduler plugin per request",
            plugin_duration.clone(),
        );
        Self { plugin_duration }
    }
}

impl PluginObserver for PluginMetrics {
    fn observe(&self, labels: &PluginLabels, seconds: f64) {
        self.plugin_duration.get_or_create(labels).observe(seconds);
    }
}

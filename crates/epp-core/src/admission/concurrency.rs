//! `concurrency-detector`: saturation from the requests the picker itself has in flight per
//! endpoint (its own counts, the freshest load signal there is), against `maxConcurrency` per
//! endpoint: `(in-flight + let-through) / (endpoints × maxConcurrency)`. No scrape involved, so
//! it reacts within the request that frees a slot.
//!
//! llm-d-router's `tokens` and `hybrid` modes weigh in-flight tokens; epp counts requests only,
//! so those modes are refused rather than approximated.

use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::config::{ConfigError, PluginSpec};
use crate::datastore::EndpointView;

use super::SaturationDetector;

pub const TYPE: &str = "concurrency-detector";

pub const DEFAULT_MAX_CONCURRENCY: i64 = 100;
pub const DEFAULT_MAX_TOKEN_CONCURRENCY: i64 = 1_000_000;

#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct Params {
    max_concurrency: Option<i64>,
    headroom: Option<f64>,
    concurrency_mode: Option<String>,
    max_token_concurrency: Option<i64>,
    in_flight_load_producer_name: Option<String>,
}

pub fn build(spec: &PluginSpec, field: &str) -> Result<Arc<dyn SaturationDetector>, ConfigError> {
    let p: Params = crate::config::plugin_parameters(spec, field)?;
    let at = |k: &str| format!("{field}.parameters.{k}");
    let max = p.max_concurrency.unwrap_or(DEFAULT_MAX_CONCURRENCY);
    if max <= 0 {
        return Err(ConfigError::new(
            at("maxConcurrency"),
            format!("must be strictly positive, got {max}"),
        ));
    }
    if let Some(t) = p.max_token_concurrency {
        if t <= 0 {
            return Err(ConfigError::new(
                at("maxTokenConcurrency"),
                format!("must be strictly positive, got {t}"),
            ));
        }
    }
    match p.concurrency_mode.as_deref() {
        None | Some("requests") => {}
        Some(m @ ("tokens" | "hybrid")) => {
            return Err(ConfigError::new(
                at("concurrencyMode"),
                format!("{m:?}: epp counts in-flight requests, not tokens; use \"requests\""),
            ))
        }
        Some(m) => {
            return Err(ConfigError::new(
                at("concurrencyMode"),
                format!("unsupported concurrencyMode: {m:?} (requests, tokens, hybrid)"),
            ))
        }
    }
    if p.in_flight_load_producer_name
        .as_deref()
        .is_some_and(|n| !n.is_empty())
    {
        return Err(ConfigError::new(
            at("inFlightLoadProducerName"),
            "epp counts in-flight requests itself (no in-flight load producer plugin); remove it",
        ));
    }
    super::utilization::check_headroom(p.headroom, &at("headroom"))?;
    Ok(Arc::new(Concurrency {
        name: spec.name().to_string(),
        max_concurrency: max as u64,
    }))
}

#[derive(Debug)]
pub struct Concurrency {
    pub name: String,
    pub max_concurrency: u64,
}

impl SaturationDetector for Concurrency {
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
        let inflight: usize = endpoints.iter().map(|e| e.endpoint.inflight()).sum();
        let capacity = endpoints.len() as f64 * self.max_concurrency as f64;
        ((inflight + extra) as f64 / capacity, 0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn in_flight_over_capacity() {
        let d = Concurrency {
            name: TYPE.into(),
            max_concurrency: 4,
        };
        let a = super::super::controller::tests::one_endpoint();
        assert_eq!(d.saturation(&[&a], 0), (0.0, 0));
        assert_eq!(d.saturation(&[&a], 2), (0.5, 0));
        let _g = crate::datastore::InFlight::new(a.endpoint.clone());
        assert_eq!(d.saturation(&[&a], 3), (1.0, 0));
        assert_eq!(d.saturation(&[], 0), (1.0, 0));
    }

    #[test]
    fn token_modes_and_producers_are_refused() {
        let b = |y: &str| {
            build(&PluginSpec::for_test(TYPE, Some(y)), "plugins[2]")
                .err()
                .map(|e| e.to_string())
        };
        assert!(b("concurrencyMode: tokens").unwrap().contains("not tokens"));
        assert!(b("maxConcurrency: 0")
            .unwrap()
            .contains("strictly positive"));
        assert!(b("inFlightLoadProducerName: x")
            .unwrap()
            .contains("remove it"));
        assert_eq!(
            b("maxConcurrency: 8\nconcurrencyMode: requests\nheadroom: 0"),
            None
        );
    }
}

//! Usage-limit policies: the saturation ceiling below which each priority band dispatches.
//!
//! - `static-usage-limit-policy` (llm-d-router's default): one ceiling for every band
//!   (`threshold`, default 1.0).
//! - `priority-holdback-policy`: lower priorities get lower ceilings, so that as the pool fills,
//!   the last of its capacity is kept for higher-priority traffic. Ceilings run linearly from
//!   `maxCeiling` (the highest active priority, default 1.0) down to `minCeiling` (the lowest,
//!   required), spaced by rank (`domain: rank`, the default) or in proportion to the priority
//!   values (`domain: value`). With one active priority there is nothing to hold back for: it
//!   gets `maxCeiling`.
//!
//! The dispatcher visits bands from the highest priority down and stops at the first whose
//! ceiling the pool's saturation has reached, as llm-d-router's does.

use serde::{Deserialize, Serialize};

use crate::config::{ConfigError, PluginSpec};

pub const TYPE: &str = "static-usage-limit-policy";
pub const HOLDBACK_TYPE: &str = "priority-holdback-policy";

#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, rename_all = "camelCase", default)]
pub struct StaticParams {
    pub threshold: f64,
}

impl Default for StaticParams {
    fn default() -> Self {
        Self { threshold: 1.0 }
    }
}

#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct HoldbackParams {
    pub shape: Option<String>,
    pub domain: Option<String>,
    pub min_ceiling: Option<f64>,
    pub max_ceiling: Option<f64>,
}

/// How priorities map to positions between the two ceilings.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Domain {
    /// Equal steps by rank, whatever the values.
    Rank,
    /// In proportion to the priority values.
    Value,
}

/// The policy: the ceiling of each band.
#[derive(Clone, Debug, PartialEq)]
pub enum Limit {
    Static { threshold: f64 },
    Holdback { min: f64, max: f64, domain: Domain },
}

#[derive(Clone, Debug, PartialEq)]
pub struct UsageLimit {
    pub name: String,
    pub limit: Limit,
}

impl Default for UsageLimit {
    fn default() -> Self {
        Self {
            name: TYPE.into(),
            limit: Limit::Static { threshold: 1.0 },
        }
    }
}

impl UsageLimit {
    /// Whether the ceilings depend on which priorities are active.
    pub fn needs_domain(&self) -> bool {
        matches!(self.limit, Limit::Holdback { .. })
    }

    /// The ceiling of `priority` among the active priorities `domain` (highest first, distinct;
    /// `priority` is counted as active whether it is listed or not).
    pub fn ceiling(&self, priority: i64, domain: &[i64]) -> f64 {
        let (min, max, how) = match self.limit {
            Limit::Static { threshold } => return threshold,
            Limit::Holdback { min, max, domain } => (min, max, domain),
        };
        let hi = domain.first().map_or(priority, |p| (*p).max(priority));
        let lo = domain.last().map_or(priority, |p| (*p).min(priority));
        if hi == lo {
            return max;
        }
        match how {
            Domain::Rank => {
                let above = domain.iter().filter(|p| **p > priority).count();
                let n = domain.len() + usize::from(!domain.contains(&priority));
                max - above as f64 * (max - min) / (n - 1) as f64
            }
            Domain::Value => min + (priority - lo) as f64 / (hi - lo) as f64 * (max - min),
        }
    }
}

pub fn build(spec: &PluginSpec, field: &str) -> Result<UsageLimit, ConfigError> {
    let p: StaticParams = crate::config::plugin_parameters(spec, field)?;
    if !p.threshold.is_finite() || p.threshold <= 0.0 {
        return Err(ConfigError::new(
            format!("{field}.parameters.threshold"),
            "must be a positive number (1.0: dispatch until the pool reads saturated)",
        ));
    }
    Ok(UsageLimit {
        name: spec.name().to_string(),
        limit: Limit::Static {
            threshold: p.threshold,
        },
    })
}

pub fn build_holdback(spec: &PluginSpec, field: &str) -> Result<UsageLimit, ConfigError> {
    let p: HoldbackParams = crate::config::plugin_parameters(spec, field)?;
    let at = |k: &str| format!("{field}.parameters.{k}");
    match p.shape.as_deref() {
        None | Some("linear") => {}
        Some(s) => {
            return Err(ConfigError::new(
                at("shape"),
                format!("`{s}` is not a shape this build implements (only `linear`)"),
            ))
        }
    }
    let domain = match p.domain.as_deref() {
        None | Some("rank") => Domain::Rank,
        Some("value") => Domain::Value,
        Some(d) => {
            return Err(ConfigError::new(
                at("domain"),
                format!("`{d}` is not a domain (`rank` or `value`)"),
            ))
        }
    };
    let Some(min) = p.min_ceiling else {
        return Err(ConfigError::new(
            at("minCeiling"),
            "is required: the ceiling of the lowest priority, in [0, 1)",
        ));
    };
    let max = p.max_ceiling.unwrap_or(1.0);
    if !(min.is_finite() && (0.0..1.0).contains(&min)) {
        return Err(ConfigError::new(at("minCeiling"), "must be in [0, 1)"));
    }
    if !(max.is_finite() && max > 0.0 && max <= 1.0) {
        return Err(ConfigError::new(at("maxCeiling"), "must be in (0, 1]"));
    }
    if min >= max {
        return Err(ConfigError::new(
            at("minCeiling"),
            format!("must be below maxCeiling ({max})"),
        ));
    }
    Ok(UsageLimit {
        name: spec.name().to_string(),
        limit: Limit::Holdback { min, max, domain },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn holdback(min: f64, max: f64, domain: Domain) -> UsageLimit {
        UsageLimit {
            name: HOLDBACK_TYPE.into(),
            limit: Limit::Holdback { min, max, domain },
        }
    }

    #[test]
    fn ceilings_by_rank_and_by_value_as_llm_d_computes_them() {
        let r = holdback(0.5, 1.0, Domain::Rank);
        let dom = [10, 0, -1];
        // c_i = max - i (max - min) / (N - 1)
        assert_eq!(r.ceiling(10, &dom), 1.0);
        assert_eq!(r.ceiling(0, &dom), 0.75);
        assert_eq!(r.ceiling(-1, &dom), 0.5);
        // c = min + (p - pMin) / (pMax - pMin) (max - min)
        let v = holdback(0.5, 1.0, Domain::Value);
        assert_eq!(v.ceiling(10, &dom), 1.0);
        assert!((v.ceiling(0, &dom) - (0.5 + 1.0 / 11.0 * 0.5)).abs() < 1e-12);
        assert_eq!(v.ceiling(-1, &dom), 0.5);
        // One active priority: nothing to hold back for.
        assert_eq!(r.ceiling(0, &[0]), 1.0);
        assert_eq!(r.ceiling(0, &[]), 1.0);
        assert_eq!(v.ceiling(3, &[3]), 1.0);
        // A priority not (yet) in the domain is placed where it belongs.
        assert_eq!(r.ceiling(5, &[10, 0]), 0.75);
        assert_eq!(r.ceiling(-5, &[10, 0]), 0.5);
        // Monotonically non-increasing from the highest priority down.
        let dom = [7, 3, 2, 0, -4];
        for d in [Domain::Rank, Domain::Value] {
            let p = holdback(0.2, 0.9, d);
            let c: Vec<f64> = dom.iter().map(|x| p.ceiling(*x, &dom)).collect();
            assert!(c.windows(2).all(|w| w[0] >= w[1]), "{c:?}");
            assert!((c[0] - 0.9).abs() < 1e-12, "{c:?}");
            assert!((c[4] - 0.2).abs() < 1e-12, "{c:?}");
        }
        // The static policy: one ceiling for all.
        let s = UsageLimit {
            name: TYPE.into(),
            limit: Limit::Static { threshold: 0.8 },
        };
        assert_eq!(
            (s.ceiling(10, &[10, -1]), s.ceiling(-1, &[10, -1])),
            (0.8, 0.8)
        );
    }
}

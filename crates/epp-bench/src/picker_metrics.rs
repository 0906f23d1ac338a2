//! Reads the picker's own view of a run from its Prometheus `/metrics`: its prefix-cache hit rate
//! (`epp_cache_hits_total / epp_cache_requests_total`), its routing decisions, and its decision
//! latency from the `epp_request_duration_seconds` histogram. Counters are compared before and
//! after a run, so a long-lived picker can be measured too.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::http::{get_text, HttpClient, HttpError};

/// Raw counter values at one scrape (summed over label sets).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct PickerSnapshot {
    pub cache_hits: f64,
    pub cache_requests: f64,
    /// `epp_routing_decisions_total` by `decision_type`.
    pub decisions: BTreeMap<String, f64>,
    /// Cumulative `(le, count)` of `epp_request_duration_seconds`, summed over methods.
    pub duration_buckets: Vec<(f64, f64)>,
    pub duration_sum: f64,
    pub duration_count: f64,
    /// `epp_precise_prefix_fallback_total`, summed over reasons: scores the precise producer
    /// took from the approximate index (`None`: the picker has no precise producer).
    pub precise_fallbacks: Option<f64>,
    /// Whether any `epp_` metric was present at all.
    pub seen: bool,
}

/// The picker's view of one run (deltas between two snapshots).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct PickerStats {
    pub cache_hits: f64,
    pub cache_requests: f64,
    /// `cache_hits / cache_requests`.
    pub cache_hit_rate: f64,
    pub decisions: BTreeMap<String, f64>,
    pub decision_count: f64,
    pub decision_mean_s: f64,
    /// Quantiles interpolated inside histogram buckets.
    pub decision_p50_s: f64,
    pub decision_p99_s: f64,
    /// Scores the precise producer took from the approximate index over the run (per request
    /// without token ids, per request and endpoint otherwise); `None` without a precise producer.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub precise_fallbacks: Option<f64>,
}

/// Parses a Prometheus text exposition (with the workspace's one exposition reader).
pub fn parse(text: &str) -> PickerSnapshot {
    let Ok(samples) = epp_core::exposition::parse(text) else {
        return PickerSnapshot::default();
    };
    let mut snap = PickerSnapshot::default();
    let mut buckets: BTreeMap<u64, (f64, f64)> = BTreeMap::new();
    for s in &samples {
        if s.name.starts_with("epp_") {
            snap.seen = true;
        }
        let v = s.value;
        match s.name.as_str() {
            "epp_cache_hits_total" | "epp_cache_hits" => snap.cache_hits += v,
            "epp_cache_requests_total" | "epp_cache_requests" => snap.cache_requests += v,
            "epp_routing_decisions_total" | "epp_routing_decisions" => {
                let kind = s.label("decision_type").unwrap_or("").to_owned();
                *snap.decisions.entry(kind).or_insert(0.0) += v;
            }
            "epp_precise_prefix_fallback_total" | "epp_precise_prefix_fallback" => {
                *snap.precise_fallbacks.get_or_insert(0.0) += v
            }
            // Always exported with a precise producer, before anything fell back.
            "epp_precise_prefix_endpoints_in_fallback" => {
                snap.precise_fallbacks.get_or_insert(0.0);
            }
            "epp_request_duration_seconds_sum" => snap.duration_sum += v,
            "epp_request_duration_seconds_count" => snap.duration_count += v,
            "epp_request_duration_seconds_bucket" => {
                let le = match s.label("le") {
                    Some("+Inf") => f64::INFINITY,
                    Some(x) => match x.parse::<f64>() {
                        Ok(le) => le,
                        Err(_) => continue,
                    },
                    None => continue,
                };
                let e = buckets.entry(le.to_bits()).or_insert((le, 0.0));
                e.1 += v;
            }
            _ => {}
        }
    }
    let mut v: Vec<(f64, f64)> = buckets.into_values().collect();
    v.sort_by(|a, b| a.0.total_cmp(&b.0));
    snap.duration_buckets = v;
    snap
}

/// Scrapes and parses `url` (a picker's `/metrics`).
pub async fn scrape(client: &HttpClient, url: &str) -> Result<PickerSnapshot, HttpError> {
    let text = get_text(client, url, Duration::from_secs(5)).await?;
    Ok(parse(&text))
}

impl PickerSnapshot {
    /// What happened between `before` and `self`.
    pub fn since(&self, before: &PickerSnapshot) -> PickerStats {
        let hits = self.cache_hits - before.cache_hits;
        let reqs = self.cache_requests - before.cache_requests;
        let decisions = self
            .decisions
            .iter()
            .map(|(k, v)| {
                (
                    k.clone(),
                    v - before.decisions.get(k).copied().unwrap_or(0.0),
                )
            })
            .collect();
        let buckets: Vec<(f64, f64)> = self
            .duration_buckets
            .iter()
            .map(|&(le, c)| {
                let prev = before
                    .duration_buckets
                    .iter()
                    .find(|(l, _)| *l == le)
                    .map_or(0.0, |(_, c)| *c);
                (le, c - prev)
            })
            .collect();
        let count = self.duration_count - before.duration_count;
        let sum = self.duration_sum - before.duration_sum;
        PickerStats {
            cache_hits: hits,
            cache_requests: reqs,
            cache_hit_rate: if reqs > 0.0 { hits / reqs } else { 0.0 },
            decisions,
            decision_count: count,
            decision_mean_s: if count > 0.0 { sum / count } else { 0.0 },
            decision_p50_s: bucket_quantile(&buckets, 0.50),
            decision_p99_s: bucket_quantile(&buckets, 0.99),
            precise_fallbacks: self
                .precise_fallbacks
                .map(|a| a - before.precise_fallbacks.unwrap_or(0.0)),
        }
    }
}

/// `histogram_quantile` on cumulative `(le, count)` buckets: linear interpolation inside the
/// bucket holding the rank; the `+Inf` bucket answers its lower bound.
pub fn bucket_quantile(buckets: &[(f64, f64)], q: f64) -> f64 {
    let Some(&(_, total)) = buckets.last() else {
        return 0.0;
    };
    if total <= 0.0 {
        return 0.0;
    }
    let rank = q * total;
    let mut prev_le = 0.0;
    let mut prev_count = 0.0;
    for &(le, count) in buckets {
        if count >= rank {
            if le.is_infinite() {
                return prev_le;
            }
            let in_bucket = count - prev_count;
            if in_bucket <= 0.0 {
                return le;
            }
            return prev_le + (le - prev_le) * (rank - prev_count) / in_bucket;
        }
        prev_le = le;
        prev_count = count;
    }
    prev_le
}

#[cfg(test)]
mod tests {
    use super::*;

    // As the picker serves it (Prometheus text 0.0.4); a trailing OpenMetrics `# EOF` is cut.
    const TEXT: &str = "\
# HELP epp_cache_hits_total Hits.
# TYPE epp_cache_hits_total counter
epp_cache_hits_total{backend=\"a\"} 3
epp_cache_hits_total{backend=\"b\"} 5
# TYPE epp_cache_requests_total counter
epp_cache_requests_total{backend=\"a\"} 4
epp_cache_requests_total{backend=\"b\"} 6
# TYPE epp_routing_decisions_total counter
epp_routing_decisions_total{decision_type=\"cache_hit\"} 8
epp_routing_decisions_total{decision_type=\"load_balance\"} 2
# TYPE epp_request_duration_seconds histogram
epp_request_duration_seconds_bucket{method=\"chat_completions\",le=\"0.0001\"} 5
epp_request_duration_seconds_bucket{method=\"chat_completions\",le=\"0.001\"} 9
epp_request_duration_seconds_bucket{method=\"chat_completions\",le=\"+Inf\"} 10
epp_request_duration_seconds_sum{method=\"chat_completions\"} 0.004
epp_request_duration_seconds_count{method=\"chat_completions\"} 10
epp_request_duration_seconds_bucket{method=\"completions\",le=\"0.0001\"} 0
epp_request_duration_seconds_bucket{method=\"completions\",le=\"0.001\"} 0
epp_request_duration_seconds_bucket{method=\"completions\",le=\"+Inf\"} 0
epp_request_duration_seconds_sum{method=\"completions\"} 0
epp_request_duration_seconds_count{method=\"completions\"} 0
# EOF
";

    #[test]
    fn parses_seed_metrics_and_sums_labels() {
        let s = parse(TEXT);
        assert!(s.seen);
        assert_eq!((s.cache_hits, s.cache_requests), (8.0, 10.0));
        assert_eq!(s.decisions.get("cache_hit"), Some(&8.0));
        assert_eq!(
            s.duration_buckets,
            vec![(0.0001, 5.0), (0.001, 9.0), (f64::INFINITY, 10.0)]
        );
        assert_eq!((s.duration_sum, s.duration_count), (0.004, 10.0));
    }

    #[test]
    fn delta_and_quantiles() {
        let after = parse(TEXT);
        let st = after.since(&PickerSnapshot::default());
        assert_eq!(st.cache_hit_rate, 0.8);
        assert!((st.decision_mean_s - 0.0004).abs() < 1e-12);
        // rank 5 of 10 falls at the top of the first bucket.
        assert!((st.decision_p50_s - 0.0001).abs() < 1e-12);
        // rank 9.9 falls in +Inf: answer its lower bound.
        assert_eq!(st.decision_p99_s, 0.001);
        let none = after.since(&after);
        assert_eq!(
            (
                none.cache_requests,
                none.cache_hit_rate,
                none.decision_count
            ),
            (0.0, 0.0, 0.0)
        );
        assert!(!parse("foo 1\n").seen);
    }

    #[test]
    fn quantile_interpolates_inside_a_bucket() {
        let b = [(1.0, 0.0), (2.0, 10.0), (f64::INFINITY, 10.0)];
        assert!((bucket_quantile(&b, 0.5) - 1.5).abs() < 1e-12);
        assert_eq!(bucket_quantile(&[], 0.5), 0.0);
    }
}

//! Turns a load run's per-request records into the numbers a routing policy is judged by: real
//! cache reuse, latency percentiles, throughput, balance across backends, and errors.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::driver::{error_counts, RequestRecord, RunOutcome};

/// Latency distribution in seconds (nearest-rank percentiles; zeros when empty).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Percentiles {
    pub count: u64,
    pub mean: f64,
    pub p50: f64,
    pub p90: f64,
    pub p95: f64,
    pub p99: f64,
    pub max: f64,
}

impl Percentiles {
    pub fn from_values(mut v: Vec<f64>) -> Self {
        v.retain(|x| x.is_finite());
        if v.is_empty() {
            return Self::default();
        }
        v.sort_by(f64::total_cmp);
        let n = v.len();
        let at = |q: f64| {
            // Nearest rank: the smallest value with at least q of the sample at or below it.
            let rank = (q * n as f64).ceil().max(1.0) as usize;
            v[rank.min(n) - 1]
        };
        Self {
            count: n as u64,
            mean: v.iter().sum::<f64>() / n as f64,
            p50: at(0.50),
            p90: at(0.90),
            p95: at(0.95),
            p99: at(0.99),
            max: v[n - 1],
        }
    }
}

/// A backend the run is expected to spread over; `aliases` are other spellings seen in response
/// headers (e.g. `127.0.0.1:8001` for simulator `sim-0`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Backend {
    pub name: String,
    pub aliases: Vec<String>,
}

/// One backend's share of the successful requests.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct BackendShare {
    pub name: String,
    pub requests: u64,
    pub share: f64,
}

/// Summary of one run.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct RunStats {
    pub issued: u64,
    pub succeeded: u64,
    pub failed: u64,
    /// Failures by kind (`http_503`, `connect`, `timeout`, ...).
    pub errors: BTreeMap<String, u64>,
    pub prompt_tokens: u64,
    pub cached_tokens: u64,
    pub output_tokens: u64,
    /// `sum(cached_tokens) / sum(prompt_tokens)` over successful requests.
    pub cached_token_ratio: f64,
    /// Share of successful requests with `cached_tokens > 0`.
    pub request_hit_rate: f64,
    pub ttft: Percentiles,
    /// Inter-token latency: every gap between two content chunks of the successful streamed
    /// responses, pooled.
    #[serde(default)]
    pub itl: Percentiles,
    /// Time per output token after the first, per successful request:
    /// `(e2e − TTFT) / (output tokens − 1)` (requests with at least two output tokens).
    #[serde(default)]
    pub tpot: Percentiles,
    pub e2e: Percentiles,
    pub elapsed_s: f64,
    /// Successful requests per second of wall time.
    pub rps: f64,
    pub output_tokens_per_s: f64,
    /// Per-backend request counts (every expected backend listed, even with zero).
    pub backends: Vec<BackendShare>,
    /// Largest backend share over the mean share (1.0 = perfectly even).
    pub balance_max_over_mean: f64,
    pub interrupted: bool,
}

/// The backend name a record was served by, resolved through `known` aliases.
fn backend_of(r: &RequestRecord, known: &[Backend]) -> Option<String> {
    let raw = [r.pod.as_deref(), r.served.as_deref()];
    for b in known {
        for v in raw.iter().flatten() {
            if *v == b.name || b.aliases.iter().any(|a| a == v) {
                return Some(b.name.clone());
            }
        }
    }
    r.pod.clone().or_else(|| r.served.clone())
}

/// Replaces the per-backend counts of `stats` (taken from response headers) with counts the
/// servers reported themselves, idle ones included, and recomputes the balance over all of them.
pub fn set_backend_counts(stats: &mut RunStats, counts: &[(String, u64)]) {
    let routed: u64 = counts.iter().map(|(_, n)| n).sum();
    stats.backends = counts
        .iter()
        .map(|(name, n)| BackendShare {
            name: name.clone(),
            requests: *n,
            share: ratio(*n, routed),
        })
        .collect();
    stats.balance_max_over_mean = if routed == 0 || counts.is_empty() {
        0.0
    } else {
        let mean = routed as f64 / counts.len() as f64;
        counts.iter().map(|(_, n)| *n).max().unwrap_or(0) as f64 / mean
    };
}

/// Summarises `outcome`. `known` lists the backends the load should spread over; with an empty
/// list the backends seen in responses are used.
pub fn summarize(outcome: &RunOutcome, known: &[Backend]) -> RunStats {
    let ok: Vec<&RequestRecord> = outcome.records.iter().filter(|r| r.ok()).collect();
    let with_usage: Vec<&&RequestRecord> = ok.iter().filter(|r| r.usage).collect();
    let prompt_tokens: u64 = with_usage.iter().map(|r| r.prompt_tokens).sum();
    let cached_tokens: u64 = with_usage.iter().map(|r| r.cached_tokens).sum();
    let output_tokens: u64 = ok.iter().map(|r| r.output_tokens).sum();
    let hits = with_usage.iter().filter(|r| r.cached_tokens > 0).count();

    let mut counts: BTreeMap<String, u64> = known.iter().map(|b| (b.name.clone(), 0)).collect();
    for r in &ok {
        if let Some(b) = backend_of(r, known) {
            *counts.entry(b).or_insert(0) += 1;
        }
    }
    let routed: u64 = counts.values().sum();
    let backends: Vec<BackendShare> = counts
        .into_iter()
        .map(|(name, requests)| BackendShare {
            name,
            requests,
            share: ratio(requests, routed),
        })
        .collect();
    let balance = if routed == 0 || backends.is_empty() {
        0.0
    } else {
        let mean = routed as f64 / backends.len() as f64;
        backends.iter().map(|b| b.requests).max().unwrap_or(0) as f64 / mean
    };
    let elapsed = outcome.elapsed_s.max(1e-9);
    let errors = error_counts(&outcome.records);
    RunStats {
        issued: outcome.issued,
        succeeded: ok.len() as u64,
        failed: errors.values().sum(),
        errors,
        prompt_tokens,
        cached_tokens,
        output_tokens,
        cached_token_ratio: ratio(cached_tokens, prompt_tokens),
        request_hit_rate: ratio(hits as u64, with_usage.len() as u64),
        ttft: Percentiles::from_values(ok.iter().filter_map(|r| r.ttft_s).collect()),
        itl: Percentiles::from_values(ok.iter().flat_map(|r| r.itl_s.iter().copied()).collect()),
        tpot: Percentiles::from_values(
            ok.iter()
                .filter(|r| r.output_tokens >= 2)
                .filter_map(|r| {
                    let ttft = r.ttft_s?;
                    Some((r.e2e_s - ttft) / (r.output_tokens - 1) as f64)
                })
                .collect(),
        ),
        e2e: Percentiles::from_values(ok.iter().map(|r| r.e2e_s).collect()),
        elapsed_s: outcome.elapsed_s,
        rps: ok.len() as f64 / elapsed,
        output_tokens_per_s: output_tokens as f64 / elapsed,
        backends,
        balance_max_over_mean: balance,
        interrupted: outcome.interrupted,
    }
}

fn ratio(a: u64, b: u64) -> f64 {
    if b == 0 {
        0.0
    } else {
        a as f64 / b as f64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(pod: &str, prompt: u64, cached: u64, ttft: f64) -> RequestRecord {
        RequestRecord {
            pod: Some(pod.into()),
            prompt_tokens: prompt,
            cached_tokens: cached,
            output_tokens: 4,
            usage: true,
            ttft_s: Some(ttft),
            e2e_s: ttft + 1.0,
            status: Some(200),
            ..RequestRecord::default()
        }
    }

    #[test]
    fn nearest_rank_percentiles() {
        let p = Percentiles::from_values((1..=100).map(f64::from).collect());
        assert_eq!(
            (p.p50, p.p90, p.p95, p.p99, p.max),
            (50.0, 90.0, 95.0, 99.0, 100.0)
        );
        assert_eq!(p.mean, 50.5);
        let one = Percentiles::from_values(vec![3.0]);
        assert_eq!((one.p50, one.p99), (3.0, 3.0));
        assert_eq!(Percentiles::from_values(vec![]).count, 0);
    }

    #[test]
    fn summary_counts_cache_balance_and_errors() {
        let mut records = vec![
            rec("a", 100, 0, 0.1),
            rec("a", 100, 80, 0.2),
            rec("b", 200, 160, 0.3),
            rec("127.0.0.1:3", 100, 0, 0.4),
        ];
        records[0].itl_s = vec![0.01, 0.03];
        records[2].itl_s = vec![0.02];
        records.push(RequestRecord {
            status: Some(503),
            error: Some("http_503".into()),
            pod: Some("b".into()),
            // A failed request's gaps are not counted.
            itl_s: vec![9.0],
            ..RequestRecord::default()
        });
        records.push(RequestRecord {
            error: Some("connect".into()),
            ..RequestRecord::default()
        });
        let outcome = RunOutcome {
            records,
            issued: 6,
            elapsed_s: 2.0,
            interrupted: false,
        };
        let known = vec![
            Backend {
                name: "a".into(),
                aliases: vec![],
            },
            Backend {
                name: "b".into(),
                aliases: vec![],
            },
            Backend {
                name: "c".into(),
                aliases: vec!["127.0.0.1:3".into()],
            },
            Backend {
                name: "d".into(),
                aliases: vec![],
            },
        ];
        let s = summarize(&outcome, &known);
        assert_eq!((s.issued, s.succeeded, s.failed), (6, 4, 2));
        assert_eq!(s.errors.get("http_503"), Some(&1));
        assert_eq!(s.errors.get("connect"), Some(&1));
        assert_eq!((s.itl.count, s.itl.p50, s.itl.max), (3, 0.02, 0.03));
        // Four successful requests of 4 tokens, 1 s from first token to last: 1/3 s per token.
        assert_eq!(s.tpot.count, 4);
        assert!((s.tpot.p50 - 1.0 / 3.0).abs() < 1e-12, "{:?}", s.tpot);
        assert_eq!(
            (s.prompt_tokens, s.cached_tokens, s.output_tokens),
            (500, 240, 16)
        );
        assert!((s.cached_token_ratio - 0.48).abs() < 1e-12);
        assert_eq!(s.request_hit_rate, 0.5);
        assert_eq!(s.rps, 2.0);
        assert_eq!(s.output_tokens_per_s, 8.0);
        let counts: Vec<_> = s
            .backends
            .iter()
            .map(|b| (b.name.as_str(), b.requests))
            .collect();
        assert_eq!(counts, vec![("a", 2), ("b", 1), ("c", 1), ("d", 0)]);
        // mean = 4 / 4 backends = 1, max = 2
        assert_eq!(s.balance_max_over_mean, 2.0);
        assert_eq!(s.ttft.p50, 0.2);
    }
}

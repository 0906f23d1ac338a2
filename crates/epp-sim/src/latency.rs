//! The latency model: how long prefill and each decode step take.
//!
//! - Prefill (after the request leaves the queue):
//!   `prefill_overhead_ms + uncached_prompt_tokens × prefill_per_token_ms`.
//!   TTFT as a client sees it = added fault latency + queueing + prefill.
//! - Decode: the first token is emitted when prefill ends; each later token comes one
//!   inter-token latency after the previous one:
//!   `inter_token_ms + inter_token_per_seq_ms × (running_sequences − 1)`, so a busy server
//!   decodes more slowly, as a batched GPU does.
//! - Jitter: each duration is multiplied by `1 + jitter × u`, `u` uniform in [-1, 1), drawn from a
//!   seeded RNG, so runs are reproducible. `jitter = 0` makes every duration exact.
//!
//! All parameters are milliseconds and may be fractional. Prefill/decode interference (running
//! prefills lengthening other sequences' gaps) is opt-in and applied by the engine; see
//! [`crate::SimConfig::prefill_interference_tokens`].

use std::time::Duration;

use rand::Rng;

/// Parameters of the latency model (see the module documentation).
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LatencyModel {
    /// Fixed cost of a prefill step, in ms.
    pub prefill_overhead_ms: f64,
    /// Cost per uncached prompt token, in ms.
    pub prefill_per_token_ms: f64,
    /// Time between two output tokens with one running sequence, in ms.
    pub inter_token_ms: f64,
    /// Extra inter-token time per additional running sequence, in ms.
    pub inter_token_per_seq_ms: f64,
    /// Relative jitter in [0, 1).
    pub jitter: f64,
}

impl Default for LatencyModel {
    fn default() -> Self {
        Self {
            prefill_overhead_ms: 5.0,
            prefill_per_token_ms: 0.05,
            inter_token_ms: 10.0,
            inter_token_per_seq_ms: 0.2,
            jitter: 0.0,
        }
    }
}

impl LatencyModel {
    /// Every parameter at zero: as fast as the machine allows.
    pub fn zero() -> Self {
        Self {
            prefill_overhead_ms: 0.0,
            prefill_per_token_ms: 0.0,
            inter_token_ms: 0.0,
            inter_token_per_seq_ms: 0.0,
            jitter: 0.0,
        }
    }

    /// Prefill time for `uncached_tokens` tokens that are not in the prefix cache.
    pub fn prefill<R: Rng + ?Sized>(&self, uncached_tokens: usize, rng: &mut R) -> Duration {
        self.jittered(self.prefill_ms(uncached_tokens), rng)
    }

    /// Time from one output token to the next while `running` sequences share the engine.
    pub fn inter_token<R: Rng + ?Sized>(&self, running: usize, rng: &mut R) -> Duration {
        self.jittered(self.inter_token_ms_for(running), rng)
    }

    /// Expected end-to-end service time without queueing or jitter: prefill, then
    /// `output_tokens - 1` inter-token gaps.
    pub fn expected_service(
        &self,
        uncached_tokens: usize,
        output_tokens: usize,
        running: usize,
    ) -> Duration {
        let ms = self.prefill_ms(uncached_tokens)
            + self.inter_token_ms_for(running) * output_tokens.saturating_sub(1) as f64;
        ms_to_duration(ms)
    }

    /// `ms` (a cost outside the model, such as a KV transfer) with the model's jitter. Zero
    /// draws nothing from `rng`, so runs without that cost keep their random sequence.
    pub fn jittered_ms<R: Rng + ?Sized>(&self, ms: f64, rng: &mut R) -> Duration {
        if ms > 0.0 {
            self.jittered(ms, rng)
        } else {
            Duration::ZERO
        }
    }

    fn prefill_ms(&self, uncached_tokens: usize) -> f64 {
        self.prefill_overhead_ms + uncached_tokens as f64 * self.prefill_per_token_ms
    }

    fn inter_token_ms_for(&self, running: usize) -> f64 {
        self.inter_token_ms + running.saturating_sub(1) as f64 * self.inter_token_per_seq_ms
    }

    fn jittered<R: Rng + ?Sized>(&self, ms: f64, rng: &mut R) -> Duration {
        let ms = if self.jitter > 0.0 {
            let u: f64 = rng.random_range(-1.0..1.0);
            ms * (1.0 + self.jitter * u)
        } else {
            ms
        };
        ms_to_duration(ms)
    }
}

/// Milliseconds (fractional, clamped at 0) to a `Duration`.
pub fn ms_to_duration(ms: f64) -> Duration {
    if ms.is_finite() && ms > 0.0 {
        // Whole nanoseconds, rounded, so `0.25` ms is exactly 250 µs.
        Duration::from_nanos((ms * 1e6).round().min(u64::MAX as f64) as u64)
    } else {
        Duration::ZERO
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::rngs::SmallRng;
    use rand::SeedableRng;

    fn model() -> LatencyModel {
        LatencyModel {
            prefill_overhead_ms: 2.0,
            prefill_per_token_ms: 0.5,
            inter_token_ms: 3.0,
            inter_token_per_seq_ms: 0.25,
            jitter: 0.0,
        }
    }

    #[test]
    fn prefill_is_overhead_plus_uncached_tokens() {
        let mut rng = SmallRng::seed_from_u64(1);
        let m = model();
        assert_eq!(m.prefill(0, &mut rng), Duration::from_millis(2));
        assert_eq!(m.prefill(10, &mut rng), Duration::from_millis(7));
        assert_eq!(m.prefill(1, &mut rng), Duration::from_micros(2500));
    }

    #[test]
    fn inter_token_grows_with_running_sequences() {
        let mut rng = SmallRng::seed_from_u64(1);
        let m = model();
        assert_eq!(m.inter_token(0, &mut rng), Duration::from_millis(3));
        assert_eq!(m.inter_token(1, &mut rng), Duration::from_millis(3));
        assert_eq!(m.inter_token(5, &mut rng), Duration::from_millis(4));
    }

    #[test]
    fn expected_service_time() {
        // 2 + 10×0.5 = 7 ms prefill, then 3 gaps of 3 ms.
        assert_eq!(
            model().expected_service(10, 4, 1),
            Duration::from_millis(16)
        );
        assert_eq!(model().expected_service(0, 1, 1), Duration::from_millis(2));
    }

    #[test]
    fn jitter_is_bounded_and_reproducible() {
        let m = LatencyModel {
            jitter: 0.2,
            ..model()
        };
        let draw = |seed| {
            let mut rng = SmallRng::seed_from_u64(seed);
            (0..50).map(|_| m.prefill(10, &mut rng)).collect::<Vec<_>>()
        };
        let a = draw(7);
        assert_eq!(a, draw(7));
        assert_ne!(a, draw(8));
        for d in &a {
            let ms = d.as_secs_f64() * 1000.0;
            assert!((5.6..=8.4).contains(&ms), "{ms}");
        }
        assert!(a.iter().any(|d| *d != Duration::from_millis(7)));
    }

    #[test]
    fn jittered_ms_is_exact_without_jitter_and_draws_nothing_for_zero() {
        let m = model();
        let mut rng = SmallRng::seed_from_u64(3);
        assert_eq!(m.jittered_ms(0.32, &mut rng), Duration::from_micros(320));
        let j = LatencyModel { jitter: 0.5, ..m };
        let mut a = SmallRng::seed_from_u64(3);
        let mut b = SmallRng::seed_from_u64(3);
        assert_eq!(j.jittered_ms(0.0, &mut a), Duration::ZERO);
        assert_eq!(j.prefill(10, &mut a), j.prefill(10, &mut b));
    }

    #[test]
    fn negative_or_nan_is_zero() {
        assert_eq!(ms_to_duration(-1.0), Duration::ZERO);
        assert_eq!(ms_to_duration(f64::NAN), Duration::ZERO);
        assert_eq!(ms_to_duration(0.25), Duration::from_micros(250));
    }
}

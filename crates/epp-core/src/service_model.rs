//! What the picker learns about each endpoint's speed from the responses it relays: how long a
//! request waits for its first token as a function of the prompt tokens the endpoint had to
//! compute and the requests already in flight there. The `predicted-ttft-scorer` predicts each
//! candidate's time to first token from it.
//!
//! The model, per endpoint:
//!
//! ```text
//! TTFT ≈ overhead + prefill_ms_per_token · uncached_tokens + queue_ms_per_request · in_flight_at_pick
//! ```
//!
//! fitted online in two stages, each an exponentially weighted mean (weight [`ALPHA`] of the new
//! sample), so one odd response moves it little and a slower or faster server shows within tens
//! of requests:
//!
//! - `prefill_ms_per_token` and `overhead` from requests that found the endpoint idle (nothing
//!   else in flight from this picker when it was picked): their TTFT is prefill alone. The rate
//!   comes from samples with at least [`MIN_PREFILL_SAMPLE_TOKENS`] uncached tokens (shorter
//!   ones mostly measure the fixed cost), the overhead from every idle sample;
//! - `queue_ms_per_request` from the rest: what their TTFT had beyond the idle prediction,
//!   divided by the requests ahead of them.
//!
//! Before an endpoint has samples of a kind, the configured priors stand in. Every value is
//! clamped to a sane range, and only streamed responses (whose first chunk is the first token)
//! teach the TTFT; the time per output token (`tpot_ms`) is learned from them too.

use parking_lot::Mutex;

/// Weight of a new sample in each running mean.
pub const ALPHA: f64 = 0.1;
/// Uncached tokens a sample needs to teach the per-token prefill rate.
pub const MIN_PREFILL_SAMPLE_TOKENS: u64 = 64;
/// Largest per-token prefill time accepted, ms (a sample above it is clamped).
const MAX_MS_PER_TOKEN: f64 = 100.0;
/// Largest queueing delay per request ahead accepted, ms.
const MAX_QUEUE_MS: f64 = 600_000.0;

/// One relayed response, as the model learns from it.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Observation {
    /// Prompt tokens the endpoint computed (prompt minus what it reported cached, or the
    /// picker's estimate when it reports nothing).
    pub uncached_tokens: u64,
    /// Requests this picker had in flight at the endpoint when it picked it (this one not
    /// counted).
    pub inflight_at_pick: u64,
    /// From the pick to the first response byte, ms.
    pub ttft_ms: f64,
    /// From the pick to the end of the response, ms.
    pub e2e_ms: f64,
    pub completion_tokens: u64,
}

/// The fitted values (see the module documentation).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Rates {
    pub overhead_ms: f64,
    pub prefill_ms_per_token: f64,
    pub queue_ms_per_request: f64,
    pub tpot_ms: f64,
    /// Mean response duration, ms (0 until learned).
    pub e2e_ms: f64,
    /// Requests the endpoint runs at once when full (0: not seen full yet).
    pub capacity: u64,
    /// Samples each value was fitted from (0: the prior).
    pub prefill_samples: u64,
    pub queue_samples: u64,
}

/// Priors: what an endpoint is assumed to do before it has taught anything.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Priors {
    pub overhead_ms: f64,
    pub prefill_ms_per_token: f64,
    pub queue_ms_per_request: f64,
}

#[derive(Debug, Default, Clone, Copy)]
struct Fit {
    overhead_ms: f64,
    overhead_n: u64,
    prefill_ms_per_token: f64,
    prefill_n: u64,
    queue_ms_per_request: f64,
    queue_n: u64,
    tpot_ms: f64,
    tpot_n: u64,
    e2e_ms: f64,
    e2e_n: u64,
    /// The most requests seen running while others waited: the endpoint's batch capacity
    /// (vLLM's `max_num_seqs`, or less when KV blocks run out first); 0 until seen.
    capacity: u64,
}

/// One endpoint's learned rates; cheap to update (a short critical section per response).
#[derive(Debug, Default)]
pub struct ServiceModel {
    fit: Mutex<Fit>,
}

fn ewma(cur: f64, n: u64, sample: f64) -> f64 {
    if n == 0 {
        sample
    } else {
        cur + ALPHA * (sample - cur)
    }
}

impl ServiceModel {
    /// Learn from one streamed response.
    pub fn observe(&self, o: &Observation) {
        if !(o.ttft_ms.is_finite() && o.ttft_ms >= 0.0) {
            return;
        }
        let mut f = self.fit.lock();
        if o.inflight_at_pick == 0 {
            if o.uncached_tokens >= MIN_PREFILL_SAMPLE_TOKENS {
                let overhead = if f.overhead_n > 0 { f.overhead_ms } else { 0.0 };
                let rate = ((o.ttft_ms - overhead).max(0.0) / o.uncached_tokens as f64)
                    .min(MAX_MS_PER_TOKEN);
                f.prefill_ms_per_token = ewma(f.prefill_ms_per_token, f.prefill_n, rate);
                f.prefill_n += 1;
            }
            let per_token = if f.prefill_n > 0 {
                f.prefill_ms_per_token
            } else {
                0.0
            };
            let overhead = (o.ttft_ms - per_token * o.uncached_tokens as f64).max(0.0);
            f.overhead_ms = ewma(f.overhead_ms, f.overhead_n, overhead);
            f.overhead_n += 1;
        } else if f.prefill_n > 0 {
            // The wait beyond what the same request would take on an idle endpoint.
            let idle = f.overhead_ms + f.prefill_ms_per_token * o.uncached_tokens as f64;
            let per_request =
                ((o.ttft_ms - idle).max(0.0) / o.inflight_at_pick as f64).min(MAX_QUEUE_MS);
            f.queue_ms_per_request = ewma(f.queue_ms_per_request, f.queue_n, per_request);
            f.queue_n += 1;
        }
        if o.e2e_ms.is_finite() && o.e2e_ms >= o.ttft_ms {
            f.e2e_ms = ewma(f.e2e_ms, f.e2e_n, o.e2e_ms);
            f.e2e_n += 1;
        }
        if o.completion_tokens >= 2 && o.e2e_ms >= o.ttft_ms {
            let tpot = (o.e2e_ms - o.ttft_ms) / (o.completion_tokens - 1) as f64;
            f.tpot_ms = ewma(f.tpot_ms, f.tpot_n, tpot);
            f.tpot_n += 1;
        }
    }

    /// What the endpoint's last scrape said: `running` requests in its batch while `waiting`
    /// wait for a place. Running requests seen while others wait are its capacity.
    pub fn saw_load(&self, running: f64, waiting: f64) {
        if waiting >= 1.0 && running >= 1.0 && running.is_finite() {
            let r = running as u64;
            let mut f = self.fit.lock();
            if r > f.capacity {
                f.capacity = r;
            }
        }
    }

    /// The fitted rates, priors where nothing was learned yet.
    pub fn rates(&self, priors: &Priors) -> Rates {
        let f = *self.fit.lock();
        Rates {
            e2e_ms: f.e2e_ms,
            capacity: f.capacity,
            overhead_ms: if f.overhead_n > 0 {
                f.overhead_ms
            } else {
                priors.overhead_ms
            },
            prefill_ms_per_token: if f.prefill_n > 0 {
                f.prefill_ms_per_token
            } else {
                priors.prefill_ms_per_token
            },
            queue_ms_per_request: if f.queue_n > 0 {
                f.queue_ms_per_request
            } else {
                priors.queue_ms_per_request
            },
            tpot_ms: f.tpot_ms,
            prefill_samples: f.prefill_n,
            queue_samples: f.queue_n,
        }
    }

    /// Whether anything was learned (for metrics: endpoints without samples are not exported).
    pub fn learned(&self) -> bool {
        let f = self.fit.lock();
        f.prefill_n > 0 || f.queue_n > 0
    }
}

impl Rates {
    /// Predicted time to first token, ms, for a request with `uncached_tokens` to compute at an
    /// endpoint with `inflight` requests already in flight (of which, by its last scrape,
    /// `waiting` wait for a place in its batch).
    ///
    /// Every request ahead costs `queue_ms_per_request` (they share the engine's steps). At
    /// capacity the request also waits in the queue: its place there is behind the picker's own
    /// requests beyond capacity or behind the scraped queue, whichever is longer, and places free
    /// at one per `e2e / capacity` ms.
    pub fn ttft_ms(&self, uncached_tokens: u64, inflight: u64, waiting: f64) -> f64 {
        let mut t = self.overhead_ms
            + self.prefill_ms_per_token * uncached_tokens as f64
            + self.queue_ms_per_request * inflight as f64;
        if self.capacity > 0 && self.e2e_ms > 0.0 {
            // This request's place in the queue: behind the picker's own requests beyond
            // capacity, or behind the scraped queue, whichever is longer.
            let by_inflight = (inflight + 1).saturating_sub(self.capacity) as f64;
            let by_scrape = if waiting.is_finite() && waiting >= 1.0 {
                waiting + 1.0
            } else {
                0.0
            };
            let position = by_inflight.max(by_scrape).min(1e6);
            t += position * self.e2e_ms / self.capacity as f64;
        }
        t
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const PRIORS: Priors = Priors {
        overhead_ms: 0.0,
        prefill_ms_per_token: 0.05,
        queue_ms_per_request: 10.0,
    };

    fn obs(uncached: u64, inflight: u64, ttft: f64) -> Observation {
        Observation {
            uncached_tokens: uncached,
            inflight_at_pick: inflight,
            ttft_ms: ttft,
            e2e_ms: ttft + 90.0,
            completion_tokens: 10,
        }
    }

    #[test]
    fn priors_stand_in_until_samples_arrive() {
        let m = ServiceModel::default();
        let r = m.rates(&PRIORS);
        assert_eq!(r.prefill_ms_per_token, 0.05);
        assert_eq!(r.queue_ms_per_request, 10.0);
        assert_eq!(r.prefill_samples, 0);
        assert!(!m.learned());
        // Busy samples teach nothing before the idle rate is known.
        m.observe(&obs(1000, 3, 500.0));
        assert_eq!(m.rates(&PRIORS).queue_samples, 0);
    }

    #[test]
    fn a_server_with_a_fixed_cost_and_a_per_token_rate_is_recovered() {
        // The truth: 5 ms + 0.2 ms per token, and 30 ms per request ahead.
        let m = ServiceModel::default();
        for i in 0..300u64 {
            let u = 100 + (i * 37) % 900;
            m.observe(&obs(u, 0, 5.0 + 0.2 * u as f64));
            // A short one now and then: it teaches the overhead.
            m.observe(&obs(8, 0, 5.0 + 0.2 * 8.0));
        }
        for i in 0..300u64 {
            let (u, k) = (100 + (i * 53) % 900, 1 + i % 4);
            m.observe(&obs(u, k, 5.0 + 0.2 * u as f64 + 30.0 * k as f64));
        }
        let r = m.rates(&PRIORS);
        assert!((r.prefill_ms_per_token - 0.2).abs() < 0.02, "{r:?}");
        assert!((r.overhead_ms - 5.0).abs() < 2.0, "{r:?}");
        assert!((r.queue_ms_per_request - 30.0).abs() < 3.0, "{r:?}");
        assert!((r.tpot_ms - 10.0).abs() < 1e-9, "{r:?}");
        assert!((r.ttft_ms(500, 2, 0.0) - (5.0 + 100.0 + 60.0)).abs() < 15.0);
        // Never seen full: no place to wait for.
        assert_eq!(r.capacity, 0);
        assert_eq!(r.ttft_ms(500, 40, 0.0), r.ttft_ms(500, 40, 5.0));
    }

    #[test]
    fn at_capacity_a_request_waits_for_places_to_free() {
        let m = ServiceModel::default();
        // Responses take 200 ms; 8 run at once when full (seen with a queue behind them).
        for _ in 0..20 {
            m.observe(&Observation {
                uncached_tokens: 100,
                inflight_at_pick: 0,
                ttft_ms: 10.0,
                e2e_ms: 200.0,
                completion_tokens: 20,
            });
        }
        m.saw_load(3.0, 0.0);
        assert_eq!(m.rates(&PRIORS).capacity, 0, "no queue: not full");
        m.saw_load(8.0, 2.0);
        let r = m.rates(&PRIORS);
        assert_eq!(r.capacity, 8);
        let base = r.ttft_ms(100, 7, 0.0);
        // 8 in flight, none waiting: the next one waits for one place (200 / 8 = 25 ms).
        assert!((r.ttft_ms(100, 8, 0.0) - base - 10.0 - 25.0).abs() < 1e-6);
        // 3 queued ahead by the scrape: four places' worth.
        assert!((r.ttft_ms(100, 8, 3.0) - base - 10.0 - 100.0).abs() < 1e-6);
    }

    #[test]
    fn absurd_samples_are_clamped_or_ignored() {
        let m = ServiceModel::default();
        m.observe(&obs(100, 0, f64::NAN));
        m.observe(&obs(100, 0, -1.0));
        assert!(!m.learned());
        m.observe(&obs(64, 0, 1e12));
        assert!(m.rates(&PRIORS).prefill_ms_per_token <= MAX_MS_PER_TOKEN);
        m.observe(&obs(64, 1, 1e15));
        assert!(m.rates(&PRIORS).queue_ms_per_request <= MAX_QUEUE_MS);
    }
}

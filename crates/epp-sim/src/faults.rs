//! Failure injection: the knobs that make a simulated server misbehave, shared between the
//! programmatic [`FaultHandle`], the `PUT /admin/faults` endpoint and the accept loop.
//!
//! - `error_rate` / `error_status`: that fraction of inference requests (`/v1/completions`,
//!   `/v1/chat/completions`) is answered with `error_status` and an OpenAI-style JSON error,
//!   decided by the server's seeded RNG.
//! - `added_latency_ms`: every inference request waits this long before it is processed (counts
//!   in TTFT).
//! - `unhealthy`: `GET /health` answers 503.
//! - `refuse_connections`: the listening socket is closed (clients get "connection refused") and
//!   open connections are closed once their in-flight request is answered. While refusing, the
//!   admin endpoint is unreachable too, so refusal can also be time-limited
//!   (`refuse_connections_ms`), after which the same port is bound again; or it is lifted through
//!   the [`FaultHandle`].

use std::sync::Arc;
use std::time::Duration;

use parking_lot::RwLock;
use serde::{Deserialize, Serialize};
use tokio::sync::watch;
use tokio::time::Instant;

use crate::latency::ms_to_duration;

/// The fault settings (also the JSON of `GET /admin/faults`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Faults {
    /// Fraction in [0, 1] of inference requests answered with `error_status`.
    pub error_rate: f64,
    /// HTTP status of injected errors (400..=599; typically 429, 500 or 503).
    pub error_status: u16,
    /// Latency added before each inference request is processed, in ms.
    pub added_latency_ms: f64,
    /// `/health` answers 503 when true.
    pub unhealthy: bool,
    /// Close the listener and refuse new connections when true.
    pub refuse_connections: bool,
}

impl Default for Faults {
    fn default() -> Self {
        Self {
            error_rate: 0.0,
            error_status: 503,
            added_latency_ms: 0.0,
            unhealthy: false,
            refuse_connections: false,
        }
    }
}

/// A partial update, the body of `PUT /admin/faults`. Absent fields keep their value.
/// `refuse_connections_ms` refuses connections for that long, then accepts again.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FaultsPatch {
    pub error_rate: Option<f64>,
    pub error_status: Option<u16>,
    pub added_latency_ms: Option<f64>,
    pub unhealthy: Option<bool>,
    pub refuse_connections: Option<bool>,
    pub refuse_connections_ms: Option<f64>,
}

/// An invalid fault setting.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("invalid fault setting `{field}`: {message}")]
pub struct FaultError {
    pub field: &'static str,
    pub message: String,
}

impl Faults {
    /// Check every field; the error names the field.
    pub fn validate(&self) -> Result<(), FaultError> {
        if !(0.0..=1.0).contains(&self.error_rate) {
            return Err(FaultError {
                field: "error_rate",
                message: format!("must be between 0 and 1, got {}", self.error_rate),
            });
        }
        if !(400..=599).contains(&self.error_status) {
            return Err(FaultError {
                field: "error_status",
                message: format!(
                    "must be an HTTP error status (400..=599), got {}",
                    self.error_status
                ),
            });
        }
        if !self.added_latency_ms.is_finite() || self.added_latency_ms < 0.0 {
            return Err(FaultError {
                field: "added_latency_ms",
                message: format!(
                    "must be a non-negative number, got {}",
                    self.added_latency_ms
                ),
            });
        }
        Ok(())
    }
}

#[derive(Debug)]
struct State {
    faults: Faults,
    /// Time-limited refusal ends at this instant.
    refuse_until: Option<Instant>,
}

/// Shared, cloneable access to a server's faults. Changing them takes effect immediately.
#[derive(Debug, Clone)]
pub struct FaultHandle {
    state: Arc<RwLock<State>>,
    changed: Arc<watch::Sender<u64>>,
}

/// What `GET /admin/faults` shows: the settings plus the remaining time-limited refusal.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FaultsView {
    #[serde(flatten)]
    pub faults: Faults,
    /// Milliseconds left of a time-limited refusal, if one is running.
    pub refuse_remaining_ms: Option<f64>,
}

impl FaultHandle {
    pub(crate) fn new(initial: Faults) -> Self {
        let (tx, _) = watch::channel(0);
        Self {
            state: Arc::new(RwLock::new(State {
                faults: initial,
                refuse_until: None,
            })),
            changed: Arc::new(tx),
        }
    }

    /// The current settings.
    pub fn get(&self) -> Faults {
        self.state.read().faults.clone()
    }

    /// The settings plus the remaining time-limited refusal.
    pub fn view(&self) -> FaultsView {
        let s = self.state.read();
        let now = Instant::now();
        FaultsView {
            faults: s.faults.clone(),
            refuse_remaining_ms: s
                .refuse_until
                .filter(|u| *u > now)
                .map(|u| (u - now).as_secs_f64() * 1000.0),
        }
    }

    /// Replace all settings (cancels a time-limited refusal).
    pub fn set(&self, faults: Faults) -> Result<(), FaultError> {
        faults.validate()?;
        {
            let mut s = self.state.write();
            s.faults = faults;
            s.refuse_until = None;
        }
        self.notify();
        Ok(())
    }

    /// Apply a partial update atomically; nothing changes if any field is invalid.
    pub fn apply(&self, patch: &FaultsPatch) -> Result<FaultsView, FaultError> {
        {
            let mut s = self.state.write();
            let mut f = s.faults.clone();
            if let Some(v) = patch.error_rate {
                f.error_rate = v;
            }
            if let Some(v) = patch.error_status {
                f.error_status = v;
            }
            if let Some(v) = patch.added_latency_ms {
                f.added_latency_ms = v;
            }
            if let Some(v) = patch.unhealthy {
                f.unhealthy = v;
            }
            if let Some(v) = patch.refuse_connections {
                f.refuse_connections = v;
            }
            f.validate()?;
            let until = match patch.refuse_connections_ms {
                Some(ms) if !ms.is_finite() || ms < 0.0 => {
                    return Err(FaultError {
                        field: "refuse_connections_ms",
                        message: format!("must be a non-negative number, got {ms}"),
                    })
                }
                Some(ms) => Some(Instant::now() + ms_to_duration(ms)),
                None if patch.refuse_connections == Some(false) => None,
                None => s.refuse_until,
            };
            s.faults = f;
            s.refuse_until = until;
        }
        self.notify();
        Ok(self.view())
    }

    /// Answer that fraction of inference requests with `status`.
    pub fn set_error_rate(&self, rate: f64, status: u16) -> Result<(), FaultError> {
        self.apply(&FaultsPatch {
            error_rate: Some(rate),
            error_status: Some(status),
            ..Default::default()
        })
        .map(|_| ())
    }

    /// Delay every inference request by `d` before processing it.
    pub fn set_added_latency(&self, d: Duration) {
        self.state.write().faults.added_latency_ms = d.as_secs_f64() * 1000.0;
        self.notify();
    }

    /// Make `/health` answer 503 (true) or 200 (false).
    pub fn set_unhealthy(&self, unhealthy: bool) {
        self.state.write().faults.unhealthy = unhealthy;
        self.notify();
    }

    /// Refuse (true) or accept (false) connections until told otherwise.
    pub fn set_refuse_connections(&self, refuse: bool) {
        {
            let mut s = self.state.write();
            s.faults.refuse_connections = refuse;
            s.refuse_until = None;
        }
        self.notify();
    }

    /// Refuse connections for `d`, then accept again.
    pub fn refuse_connections_for(&self, d: Duration) {
        self.state.write().refuse_until = Some(Instant::now() + d);
        self.notify();
    }

    /// Back to no faults at all.
    pub fn clear(&self) {
        let _ = self.set(Faults::default());
    }

    /// Whether connections are refused right now, and until when if time-limited.
    pub(crate) fn refusing(&self) -> (bool, Option<Instant>) {
        let s = self.state.read();
        if s.faults.refuse_connections {
            return (true, None);
        }
        match s.refuse_until {
            Some(u) if u > Instant::now() => (true, Some(u)),
            _ => (false, None),
        }
    }

    pub(crate) fn subscribe(&self) -> watch::Receiver<u64> {
        self.changed.subscribe()
    }

    fn notify(&self) {
        self.changed.send_modify(|v| *v = v.wrapping_add(1));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn patch_is_atomic_and_validated() {
        let h = FaultHandle::new(Faults::default());
        let err = h
            .apply(&FaultsPatch {
                added_latency_ms: Some(5.0),
                error_rate: Some(1.5),
                ..Default::default()
            })
            .unwrap_err();
        assert_eq!(err.field, "error_rate");
        assert_eq!(h.get(), Faults::default());
        let v = h
            .apply(&FaultsPatch {
                error_rate: Some(1.0),
                error_status: Some(429),
                ..Default::default()
            })
            .unwrap();
        assert_eq!(v.faults.error_status, 429);
        assert_eq!(v.faults.error_rate, 1.0);
        assert!(h
            .apply(&FaultsPatch {
                error_status: Some(200),
                ..Default::default()
            })
            .is_err());
    }

    #[tokio::test]
    async fn time_limited_refusal_expires() {
        let h = FaultHandle::new(Faults::default());
        assert_eq!(h.refusing(), (false, None));
        h.refuse_connections_for(Duration::from_millis(30));
        let (r, until) = h.refusing();
        assert!(r);
        assert!(until.is_some());
        tokio::time::sleep_until(until.unwrap()).await;
        assert_eq!(h.refusing(), (false, None));
        h.set_refuse_connections(true);
        assert_eq!(h.refusing(), (true, None));
        h.clear();
        assert_eq!(h.refusing(), (false, None));
    }
}

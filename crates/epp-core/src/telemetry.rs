//! Process-wide plumbing shared by every server we ship: log set-up
//! (`--log-level` / `RUST_LOG`, text or JSON) and the graceful-shutdown signal.

use std::future::Future;
use std::time::Duration;

use tracing_subscriber::EnvFilter;

/// How log lines are written.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

/// Install the global tracing subscriber.
///
/// Precedence: an explicit `--log-level` wins, then `RUST_LOG`, then `info`.
/// A directive that does not parse is an error naming the flag, not a silent default.
pub fn init_logging(level: Option<&str>, format: LogFormat) -> Result<(), String> {
    let filter = match level {
        Some(l) => EnvFilter::try_new(l).map_err(|e| format!("invalid --log-level {l:?}: {e}"))?,
        None => match std::env::var("RUST_LOG") {
            Ok(v) if !v.trim().is_empty() => {
                EnvFilter::try_new(&v).map_err(|e| format!("invalid RUST_LOG {v:?}: {e}"))?
            }
            _ => EnvFilter::new("info"),
        },
    };
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let res = match format {
        LogFormat::Text => builder.with_target(false).try_init(),
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
    };
    // A second init (tests) is not an error worth failing on.
    let _ = res;
    Ok(())
}

/// Resolves when the process receives SIGTERM or SIGINT (Ctrl-C).
pub async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => tracing::info!("received SIGINT, shutting down"),
        _ = term => tracing::info!("received SIGTERM, shutting down"),
    }
}

/// A cloneable shutdown trigger: the process signal or a programmatic trigger (tests, demo).
#[derive(Clone, Debug)]
pub struct Shutdown {
    tx: tokio::sync::watch::Sender<bool>,
}

impl Default for Shutdown {
    fn default() -> Self {
        Self::new()
    }
}

impl Shutdown {
    pub fn new() -> Self {
        let (tx, _rx) = tokio::sync::watch::channel(false);
        Self { tx }
    }

    /// A trigger that also fires on SIGTERM/SIGINT.
    pub fn on_signal() -> Self {
        let s = Self::new();
        let s2 = s.clone();
        tokio::spawn(async move {
            shutdown_signal().await;
            s2.trigger();
        });
        s
    }

    /// Fires the trigger. Kept even when nothing waits yet (`send` would drop it when there
    /// are no receivers), so a task that starts waiting later still sees it.
    pub fn trigger(&self) {
        self.tx.send_replace(true);
    }

    pub fn is_triggered(&self) -> bool {
        *self.tx.borrow()
    }

    /// Resolves once the trigger fires (immediately if it already has).
    pub fn wait(&self) -> impl Future<Output = ()> + Send + 'static {
        let mut rx = self.tx.subscribe();
        async move {
            let _ = rx.wait_for(|v| *v).await;
        }
    }
}

/// Default grace period for in-flight work after a shutdown signal.
pub const DEFAULT_GRACE_PERIOD: Duration = Duration::from_secs(30);

#[cfg(test)]
mod shutdown_tests {
    use super::Shutdown;

    #[tokio::test]
    async fn a_trigger_before_anyone_waits_is_not_lost() {
        let s = Shutdown::new();
        s.trigger();
        assert!(s.is_triggered());
        tokio::time::timeout(std::time::Duration::from_secs(1), s.wait())
            .await
            .expect("resolves at once");
    }
}

//! `--ha-enable-leader-election`: replicas compete for one `coordination.k8s.io/v1` Lease and
//! only the holder reports ready, so the gateway sends traffic to a single picker whose prefix
//! index and in-flight counts are complete. The others keep discovering and scraping (warm
//! standbys) and take over when the leader stops renewing.
//!
//! The algorithm follows client-go's leader election, which controller-runtime uses: a lease is
//! considered expired when its record has not changed for `lease_duration` *as observed locally*
//! (no trust in clock agreement between replicas); the leader renews every `retry_period` and
//! steps down if it could not renew for `renew_deadline`; writes use the lease's
//! resourceVersion, so two candidates can never both win. On shutdown the leader releases the
//! lease so a standby takes over within one retry period instead of a whole lease duration.

use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use kube::api::PostParams;
use kube::Api;
use tokio::time::Instant;

use super::{KubeClient, KubeError};
use crate::serving::ReadyFn;
use crate::telemetry::Shutdown;

/// Leader-election settings (controller-runtime's durations by default).
#[derive(Clone, Debug)]
pub struct LeaderElectionConfig {
    pub client: KubeClient,
    pub lease_name: String,
    pub lease_namespace: String,
    /// This replica's identity, written as `holderIdentity`. Unique per process.
    pub identity: String,
    pub lease_duration: Duration,
    pub renew_deadline: Duration,
    pub retry_period: Duration,
}

impl LeaderElectionConfig {
    pub const DEFAULT_LEASE_DURATION: Duration = Duration::from_secs(15);
    pub const DEFAULT_RENEW_DEADLINE: Duration = Duration::from_secs(10);
    pub const DEFAULT_RETRY_PERIOD: Duration = Duration::from_secs(2);

    pub fn new(
        client: KubeClient,
        lease_namespace: impl Into<String>,
        lease_name: impl Into<String>,
    ) -> Self {
        Self {
            client,
            lease_name: lease_name.into(),
            lease_namespace: lease_namespace.into(),
            identity: default_identity(),
            lease_duration: Self::DEFAULT_LEASE_DURATION,
            renew_deadline: Self::DEFAULT_RENEW_DEADLINE,
            retry_period: Self::DEFAULT_RETRY_PERIOD,
        }
    }

    /// Reject orderings that cannot work (as client-go does).
    pub fn validate(&self) -> Result<(), String> {
        if self.lease_name.is_empty() || self.lease_namespace.is_empty() {
            return Err("leader election needs a lease name and namespace".into());
        }
        if self.retry_period.is_zero() {
            return Err("--ha-retry-period must be greater than 0".into());
        }
        if self.renew_deadline <= self.retry_period {
            return Err(format!(
                "--ha-renew-deadline ({:?}) must be longer than --ha-retry-period ({:?})",
                self.renew_deadline, self.retry_period
            ));
        }
        if self.lease_duration <= self.renew_deadline {
            return Err(format!(
                "--ha-lease-duration ({:?}) must be longer than --ha-renew-deadline ({:?})",
                self.lease_duration, self.renew_deadline
            ));
        }
        Ok(())
    }
}

/// `POD_NAME` (or the host name) plus a random suffix: two processes never share an identity.
pub fn default_identity() -> String {
    let host = std::env::var("POD_NAME")
        .ok()
        .filter(|s| !s.is_empty())
        .or_else(|| std::env::var("HOSTNAME").ok().filter(|s| !s.is_empty()))
        .unwrap_or_else(|| "epp".into());
    format!("{host}_{:08x}", rand::random::<u32>())
}

/// Whether this replica currently holds the lease. Cheap to clone.
#[derive(Clone, Debug)]
pub struct LeaderStatus {
    rx: tokio::sync::watch::Receiver<bool>,
}

impl LeaderStatus {
    pub fn is_leader(&self) -> bool {
        *self.rx.borrow()
    }

    /// Resolves when leadership equals `want`.
    pub async fn wait_for(&mut self, want: bool) {
        let _ = self.rx.wait_for(|v| *v == want).await;
    }

    /// A readiness condition: ready only while leading.
    pub fn ready_fn(&self) -> ReadyFn {
        let me = self.clone();
        Arc::new(move || {
            if me.is_leader() {
                Ok(())
            } else {
                Err("not the leader: another replica holds the leader-election lease (--ha-enable-leader-election); this replica is a warm standby".into())
            }
        })
    }
}

struct Elector {
    cfg: LeaderElectionConfig,
    api: Api<Lease>,
    observed: Option<LeaseSpec>,
    observed_at: Instant,
}

fn now() -> MicroTime {
    MicroTime(k8s_openapi::jiff::Timestamp::now())
}

fn secs(d: Duration) -> i32 {
    i32::try_from(d.as_secs().max(1)).unwrap_or(i32::MAX)
}

impl Elector {
    fn observe(&mut self, spec: &LeaseSpec) {
        if self.observed.as_ref() != Some(spec) {
            self.observed = Some(spec.clone());
            self.observed_at = Instant::now();
        }
    }

    /// One attempt to take or keep the lease. `Ok(true)` when we hold it afterwards.
    async fn try_acquire_or_renew(&mut self) -> Result<bool, kube::Error> {
        let me = self.cfg.identity.clone();
        let existing = self.api.get_opt(&self.cfg.lease_name).await?;
        let Some(mut lease) = existing else {
            let lease = Lease {
                metadata: ObjectMeta {
                    name: Some(self.cfg.lease_name.clone()),
                    namespace: Some(self.cfg.lease_namespace.clone()),
                    ..Default::default()
                },
                spec: Some(LeaseSpec {
                    holder_identity: Some(me),
                    lease_duration_seconds: Some(secs(self.cfg.lease_duration)),
                    acquire_time: Some(now()),
                    renew_time: Some(now()),
                    lease_transitions: Some(0),
                    ..Default::default()
                }),
            };
            return match self.api.create(&PostParams::default(), &lease).await {
                Ok(created) => {
                    self.observe(&created.spec.unwrap_or_default());
                    Ok(true)
                }
                Err(kube::Error::Api(s)) if s.code == 409 => Ok(false),
                Err(e) => Err(e),
            };
        };
        let spec = lease.spec.clone().unwrap_or_default();
        self.observe(&spec);
        let holder = spec.holder_identity.clone().unwrap_or_default();
        let held_by_me = holder == me;
        let their_duration = spec
            .lease_duration_seconds
            .map(|s| Duration::from_secs(s.max(0) as u64))
            .unwrap_or(self.cfg.lease_duration);
        if !holder.is_empty() && !held_by_me && self.observed_at + their_duration > Instant::now() {
            return Ok(false);
        }
        let mut next = LeaseSpec {
            holder_identity: Some(me),
            lease_duration_seconds: Some(secs(self.cfg.lease_duration)),
            renew_time: Some(now()),
            ..spec.clone()
        };
        if !held_by_me {
            next.acquire_time = Some(now());
            next.lease_transitions = Some(spec.lease_transitions.unwrap_or(0) + 1);
        }
        lease.spec = Some(next);
        match self
            .api
            .replace(&self.cfg.lease_name, &PostParams::default(), &lease)
            .await
        {
            Ok(updated) => {
                self.observe(&updated.spec.unwrap_or_default());
                Ok(true)
            }
            Err(kube::Error::Api(s)) if s.code == 409 => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// Give the lease up (on shutdown) so a standby need not wait for it to expire.
    async fn release(&mut self) {
        let Ok(Some(mut lease)) = self.api.get_opt(&self.cfg.lease_name).await else {
            return;
        };
        let spec = lease.spec.clone().unwrap_or_default();
        if spec.holder_identity.as_deref() != Some(self.cfg.identity.as_str()) {
            return;
        }
        lease.spec = Some(LeaseSpec {
            holder_identity: None,
            lease_duration_seconds: Some(1),
            renew_time: Some(now()),
            acquire_time: Some(now()),
            ..spec
        });
        match self
            .api
            .replace(&self.cfg.lease_name, &PostParams::default(), &lease)
            .await
        {
            Ok(_) => tracing::info!(lease = %self.cfg.lease_name, "leader-election lease released"),
            Err(e) => {
                tracing::warn!(error = %e, "could not release the leader-election lease; a standby takes over when it expires")
            }
        }
    }
}

/// Start competing for the lease; leadership is reported through the returned status until
/// `shutdown`, when a held lease is released.
pub async fn start(
    cfg: LeaderElectionConfig,
    shutdown: Shutdown,
) -> Result<(LeaderStatus, tokio::task::JoinHandle<()>), KubeError> {
    cfg.validate().map_err(KubeError::Config)?;
    let (tx, rx) = tokio::sync::watch::channel(false);
    let client = cfg.client.clone();
    let task = tokio::spawn(async move {
        let stop = shutdown.wait();
        tokio::pin!(stop);
        let client = loop {
            match client.get().await {
                Ok(c) => break c,
                Err(e) => {
                    tracing::error!(error = %e, "leader election cannot start; retrying");
                    tokio::select! {
                        _ = &mut stop => return,
                        _ = tokio::time::sleep(cfg.retry_period) => {}
                    }
                }
            }
        };
        let api = Api::namespaced(client, &cfg.lease_namespace);
        let mut el = Elector {
            cfg,
            api,
            observed: None,
            observed_at: Instant::now(),
        };
        tracing::info!(lease = %el.cfg.lease_name, namespace = %el.cfg.lease_namespace,
            identity = %el.cfg.identity, "leader election: candidate");
        let mut last_renew = Instant::now();
        let mut warned = false;
        loop {
            let leading = *tx.borrow();
            let outcome = tokio::select! {
                _ = &mut stop => break,
                r = tokio::time::timeout(el.cfg.renew_deadline, el.try_acquire_or_renew()) => match r {
                    Ok(r) => r.map_err(|e| e.to_string()),
                    Err(_) => Err("the Kubernetes API did not answer within the renew deadline".to_string()),
                },
            };
            match outcome {
                Ok(true) => {
                    last_renew = Instant::now();
                    warned = false;
                    if !leading {
                        tracing::info!(identity = %el.cfg.identity, lease = %el.cfg.lease_name,
                            "leader election: became leader; reporting ready");
                        let _ = tx.send(true);
                    }
                }
                Ok(false) => {
                    if leading {
                        tracing::warn!(identity = %el.cfg.identity,
                            "leader election: lost the lease to another replica; now a standby");
                        let _ = tx.send(false);
                    }
                }
                Err(e) => {
                    if !warned {
                        tracing::warn!(error = %e, lease = %el.cfg.lease_name,
                            hint = "the picker's ServiceAccount needs get/create/update on leases.coordination.k8s.io (deploy/kubernetes/rbac.yaml)",
                            "leader election: cannot read or write the lease");
                        warned = true;
                    }
                    if leading && last_renew.elapsed() >= el.cfg.renew_deadline {
                        tracing::warn!(identity = %el.cfg.identity,
                            "leader election: could not renew within the renew deadline; stepping down");
                        let _ = tx.send(false);
                    }
                }
            }
            tokio::select! {
                _ = &mut stop => break,
                _ = tokio::time::sleep(el.cfg.retry_period) => {}
            }
        }
        if *tx.borrow() {
            let _ = tx.send(false);
            el.release().await;
        }
    });
    Ok((LeaderStatus { rx }, task))
}

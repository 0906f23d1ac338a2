//! Shared routing state across active-active picker replicas, through Redis (or Valkey).
//!
//! Each replica picks on its own local state, in microseconds; what it learns is exchanged
//! asynchronously, so Redis never sits on the request path:
//!
//! - **Deltas** ([`stream`]): every pick's prefix-index insert (endpoint address and block
//!   hashes, plus the precise index's speculative keys) goes into a bounded queue; a task
//!   publishes whatever has queued as one entry of a Redis Stream (`XADD … MAXLEN ~`), and
//!   another reads the stream with a blocking `XREAD`, skips its own entries and applies the
//!   others' to the local index.
//! - **Load** ([`load`]): every replica writes its requests in flight per endpoint under a key
//!   that expires by itself, so a dead replica's load vanishes; the others add it to what the
//!   load scorers and the tie-break see.
//! - **Snapshot** ([`snapshot`]): one replica at a time (a short `SET NX` lease) writes a
//!   compact copy of the index and the stream id it covers; a replica that starts loads it and
//!   reads the stream from there, and is ready only once warm (or once Redis has failed to
//!   answer within the warm-start bound).
//!
//! Redis down or slow: picks go on with local state, the outgoing backlog is bounded (the
//! oldest inserts are dropped and counted), `epp_shared_state_up` drops to 0, `/readyz` says
//! so, one log line is written per change, and the reader catches up from its last id when
//! Redis returns. Everything read is checked ([`wire`]) and refused entries are counted.

pub mod load;
pub mod metrics;
pub mod snapshot;
pub mod stream;
pub mod wire;

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use tokio::sync::mpsc;

use crate::datastore::{Datastore, Endpoint};
use crate::precise::PrecisePrefix;
use crate::prefix::PrefixIndex;
use crate::telemetry::Shutdown;

pub use metrics::{Dropped, Stats};

/// Inserts queued for publishing at most; past it picks go on and the insert is dropped.
pub const OUTBOX_CAPACITY: usize = 8192;
/// Batches kept while Redis is unreachable at most (then the oldest are dropped).
pub const BACKLOG_BATCHES: usize = 256;

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// How a replica reaches the shared state and how it uses it (`--shared-state*` flags).
#[derive(Clone, Debug)]
pub struct SharedStateOptions {
    /// `redis://host:port[/db]` or `rediss://host:port[/db]` (TLS).
    pub url: String,
    /// Overrides a password in the URL (`--shared-state-password-file`,
    /// `EPP_SHARED_STATE_PASSWORD`).
    pub password: Option<String>,
    /// PEM bundle of the CAs a `rediss://` server's certificate must chain to (default: the
    /// system's roots).
    pub ca_file: Option<PathBuf>,
    /// Prefix of every key, so several pools can share one Redis (default `epp:<pool>`).
    pub key_prefix: String,
    /// This replica's id in the stream and the load keys (default: host name and process id).
    pub replica_id: String,
    /// Stream entries kept at most (`XADD MAXLEN ~`).
    pub stream_max_len: usize,
    /// How often a snapshot of the index is written (by one replica at a time).
    pub snapshot_interval: Duration,
    /// How often in-flight counts are exchanged; a replica's report expires after 10 of them.
    pub load_interval: Duration,
    /// Longest a starting replica waits to be warm before it reports ready anyway.
    pub warm_start_timeout: Duration,
}

impl Default for SharedStateOptions {
    fn default() -> Self {
        Self {
            url: String::new(),
            password: None,
            ca_file: None,
            key_prefix: "epp:default".into(),
            replica_id: default_replica_id(),
            stream_max_len: 100_000,
            snapshot_interval: Duration::from_secs(10),
            load_interval: Duration::from_millis(200),
            warm_start_timeout: Duration::from_secs(5),
        }
    }
}

/// `POD_NAME` (Kubernetes' downward API), else the host name, with the process id.
pub fn default_replica_id() -> String {
    let host = std::env::var("POD_NAME")
        .ok()
        .filter(|s| !s.is_empty())
        .or_else(|| std::env::var("HOSTNAME").ok().filter(|s| !s.is_empty()))
        .or_else(|| {
            std::fs::read_to_string("/etc/hostname")
                .ok()
                .map(|s| s.trim().to_string())
        })
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "epp".into());
    format!("{host}-{}", std::process::id())
}

impl SharedStateOptions {
    /// Checks the URL and files, and builds the client (no connection is made).
    pub fn client(&self) -> Result<redis::Client, String> {
        let url = self.url.trim();
        let tls = if url.starts_with("rediss://") {
            true
        } else if url.starts_with("redis://") {
            false
        } else {
            return Err(format!(
                "--shared-state {url:?}: expected redis://host:port[/db] or rediss://host:port[/db]"
            ));
        };
        let info = redis::IntoConnectionInfo::into_connection_info(url)
            .map_err(|e| format!("--shared-state {url:?}: {e}"))?;
        let info = match &self.password {
            Some(p) => {
                let r = info.redis_settings().clone().set_password(p);
                info.set_redis_settings(r)
            }
            None => info,
        };
        if self.key_prefix.is_empty() || self.key_prefix.len() > 200 {
            return Err("--shared-state-key-prefix must be 1 to 200 characters".into());
        }
        if self.replica_id.is_empty() || self.replica_id.len() > wire::MAX_REPLICA_ID_LEN {
            return Err(format!(
                "--replica-id must be 1 to {} characters",
                wire::MAX_REPLICA_ID_LEN
            ));
        }
        if self.stream_max_len == 0 {
            return Err("--shared-state-stream-max-len must be greater than 0".into());
        }
        if self.snapshot_interval.is_zero() || self.load_interval.is_zero() {
            return Err(
                "--shared-state-snapshot-interval and the load interval must be greater than 0"
                    .into(),
            );
        }
        match (&self.ca_file, tls) {
            (Some(f), false) => Err(format!(
                "--shared-state-ca-file {} is set but --shared-state is not rediss://",
                f.display()
            )),
            (Some(f), true) => {
                let pem = std::fs::read(f)
                    .map_err(|e| format!("--shared-state-ca-file {}: {e}", f.display()))?;
                redis::Client::build_with_tls(
                    info,
                    redis::TlsCertificates {
                        client_tls: None,
                        root_cert: Some(pem),
                    },
                )
                .map_err(|e| format!("--shared-state-ca-file {}: {e}", f.display()))
            }
            (None, _) => redis::Client::open(info).map_err(|e| format!("--shared-state: {e}")),
        }
    }

    /// The URL with any password masked, for logs.
    pub fn describe(&self) -> String {
        match self.url.split_once('@') {
            Some((scheme_auth, rest)) => {
                let scheme = scheme_auth.split("://").next().unwrap_or("redis");
                format!("{scheme}://***@{rest}")
            }
            None => self.url.clone(),
        }
    }

    pub(crate) fn key(&self, what: &str) -> String {
        format!("{}:{what}", self.key_prefix)
    }
}

/// What the director hands every pick to: a bounded, never-blocking queue.
#[derive(Debug, Clone)]
pub struct Outbox {
    tx: mpsc::Sender<wire::Insert>,
    stats: Arc<Stats>,
    /// Whether precise speculative keys are worth sending (a precise producer with
    /// `speculativeIndexing`).
    pub speculative: bool,
}

impl Outbox {
    /// Queues one pick for the other replicas. Never waits: a full queue drops the insert.
    pub fn picked(&self, endpoint: &Endpoint, hashes: &[u64], speculative: &[u64]) {
        if hashes.is_empty() && speculative.is_empty() {
            return;
        }
        let n = hashes.len().min(wire::MAX_HASHES_PER_INSERT);
        let s = speculative.len().min(wire::MAX_HASHES_PER_INSERT);
        let insert = wire::Insert {
            endpoint: endpoint.address().to_string(),
            hashes: hashes[..n].to_vec(),
            speculative: if self.speculative {
                speculative[..s].to_vec()
            } else {
                Vec::new()
            },
        };
        if self.tx.try_send(insert).is_err() {
            self.stats.dropped(Dropped::QueueFull, 1);
        }
    }
}

/// Where received state goes: the local indexes, resolved through the datastore.
#[derive(Clone)]
pub struct Target {
    pub datastore: Datastore,
    pub prefix: Arc<PrefixIndex>,
    pub precise: Option<Arc<PrecisePrefix>>,
    /// The approximate index's block size in bytes: entries with another one are refused.
    pub block_bytes: u32,
}

impl Target {
    /// Applies inserts to the local index; returns how many were applied.
    pub fn apply(&self, inserts: &[wire::Insert], stats: &Stats) -> usize {
        let snap = self.datastore.snapshot();
        let now = tokio::time::Instant::now();
        let mut applied = 0;
        for i in inserts {
            let Some(ep) = snap
                .endpoints
                .iter()
                .find(|e| e.endpoint.address() == i.endpoint)
            else {
                stats.dropped(Dropped::UnknownEndpoint, 1);
                continue;
            };
            let slot = ep.slot();
            if !i.hashes.is_empty() {
                self.prefix.insert(
                    slot,
                    &crate::prefix::PromptHashes {
                        hashes: i.hashes.clone(),
                    },
                );
            }
            if let (Some(p), false) = (&self.precise, i.speculative.is_empty()) {
                if let Some(ttl) = p.settings.speculative {
                    p.index.speculate(slot, &i.speculative, ttl, now);
                }
            }
            applied += 1;
        }
        stats.applied.fetch_add(applied as u64, Ordering::Relaxed);
        applied
    }
}

/// The connection state other parts read (readiness, warnings), with the change logged once.
#[derive(Debug, Default)]
pub struct Link {
    warm: AtomicBool,
    /// Why Redis is not usable, while it is not.
    problem: Mutex<Option<String>>,
}

impl Link {
    /// Records a command's outcome; logs the change of state once.
    pub fn observe<T>(&self, stats: &Stats, what: &str, r: &redis::RedisResult<T>) {
        match r {
            Ok(_) => {
                if !stats.up.swap(true, Ordering::Relaxed) {
                    let was = self.problem.lock().take();
                    if was.is_some() {
                        tracing::info!("shared state: Redis is reachable again; exchanging routing state with the other replicas");
                    } else {
                        tracing::info!("shared state: connected to Redis");
                    }
                }
            }
            Err(e) => {
                let msg = format!("{what}: {e}");
                let mut p = self.problem.lock();
                if stats.up.swap(false, Ordering::Relaxed) || p.is_none() {
                    tracing::warn!(error = %msg, "shared state: Redis is unreachable; routing on this replica's local state until it returns");
                }
                *p = Some(msg);
            }
        }
    }

    /// Why the shared state is not in use right now, if it is not.
    pub fn problem(&self) -> Option<String> {
        self.problem.lock().clone()
    }

    pub fn is_warm(&self) -> bool {
        self.warm.load(Ordering::Acquire)
    }

    pub(crate) fn set_warm(&self) {
        self.warm.store(true, Ordering::Release);
    }
}

/// A running replication: its handles for the director, readiness and metrics.
#[derive(Clone)]
pub struct Replication {
    pub opts: Arc<SharedStateOptions>,
    pub stats: Arc<Stats>,
    pub link: Arc<Link>,
    pub outbox: Outbox,
}

impl std::fmt::Debug for Replication {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Replication")
            .field("url", &self.opts.describe())
            .field("replica", &self.opts.replica_id)
            .finish()
    }
}

impl Replication {
    /// Starts the tasks (publishing, reading, load exchange, snapshots). Nothing here waits
    /// for Redis: connections are made in the background and retried.
    pub fn start(
        opts: SharedStateOptions,
        client: redis::Client,
        target: Target,
        shutdown: Shutdown,
    ) -> (Self, Vec<tokio::task::JoinHandle<()>>) {
        let opts = Arc::new(opts);
        let stats = Arc::new(Stats::default());
        let link = Arc::new(Link::default());
        let (tx, rx) = mpsc::channel(OUTBOX_CAPACITY);
        let outbox = Outbox {
            tx,
            stats: stats.clone(),
            speculative: target
                .precise
                .as_ref()
                .is_some_and(|p| p.settings.speculative.is_some()),
        };
        let r = Self {
            opts: opts.clone(),
            stats: stats.clone(),
            link: link.clone(),
            outbox,
        };
        let conn = |timeout: Duration| {
            let cfg = redis::aio::ConnectionManagerConfig::new()
                .set_connection_timeout(Some(Duration::from_secs(1)))
                .set_response_timeout(Some(timeout))
                .set_number_of_retries(2)
                .set_max_delay(Duration::from_millis(500));
            client.get_connection_manager_lazy(cfg)
        };
        let mut tasks = Vec::new();
        match (
            conn(Duration::from_secs(2)),
            conn(stream::READ_BLOCK + Duration::from_secs(2)),
        ) {
            (Ok(cmds), Ok(reader)) => {
                let shared = stream::Shared::default();
                tasks.push(tokio::spawn(stream::publish(
                    r.clone(),
                    cmds.clone(),
                    rx,
                    target.block_bytes,
                    shutdown.clone(),
                )));
                tasks.push(tokio::spawn(stream::read(
                    r.clone(),
                    reader,
                    cmds.clone(),
                    target.clone(),
                    shared.clone(),
                    shutdown.clone(),
                )));
                tasks.push(tokio::spawn(load::run(
                    r.clone(),
                    cmds.clone(),
                    target.datastore.clone(),
                    shutdown.clone(),
                )));
                tasks.push(tokio::spawn(snapshot::run(
                    r.clone(),
                    cmds,
                    target,
                    shared,
                    shutdown,
                )));
            }
            (Err(e), _) | (_, Err(e)) => {
                // Only a client-side configuration error gets here; keep routing locally.
                link.observe::<()>(&stats, "connecting", &Err(e));
                link.set_warm();
            }
        }
        tracing::info!(
            shared_state = %opts.describe(),
            replica = %opts.replica_id,
            key_prefix = %opts.key_prefix,
            stream_max_len = opts.stream_max_len,
            snapshot_interval = ?opts.snapshot_interval,
            "active-active: sharing routing state with the other replicas"
        );
        (r, tasks)
    }

    /// Readiness: warm (snapshot and stream applied, or the warm-start bound passed).
    pub fn ready(&self) -> Result<(), String> {
        if self.link.is_warm() {
            Ok(())
        } else {
            Err("shared state: warm start in progress (loading the index snapshot and the stream since it)".into())
        }
    }

    /// What `/readyz` says while Redis is away (the replica stays ready).
    pub fn warning(&self) -> Option<String> {
        self.link
            .problem()
            .map(|p| format!("shared state unavailable, routing on local state only: {p}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::datastore::{DatastoreWriter, EndpointSpec, HealthConfig};
    use crate::prefix::{PrefixConfig, PromptHashes};

    fn world() -> (DatastoreWriter, Target) {
        let w = DatastoreWriter::new(HealthConfig::default());
        w.set_endpoints(vec![
            EndpointSpec::new("10.0.0.1:8000"),
            EndpointSpec::new("10.0.0.2:8000"),
        ]);
        let t = Target {
            datastore: w.reader(),
            prefix: Arc::new(PrefixIndex::new(PrefixConfig::default())),
            precise: None,
            block_bytes: 64,
        };
        (w, t)
    }

    #[test]
    fn inserts_land_on_the_endpoint_with_that_address_and_unknown_ones_are_counted() {
        let (w, t) = world();
        let stats = Stats::default();
        let inserts = vec![
            wire::Insert {
                endpoint: "10.0.0.2:8000".into(),
                hashes: vec![11, 12, 13],
                speculative: vec![],
            },
            wire::Insert {
                endpoint: "10.9.9.9:8000".into(),
                hashes: vec![1],
                speculative: vec![],
            },
        ];
        assert_eq!(t.apply(&inserts, &stats), 1);
        assert_eq!(stats.applied.load(Ordering::Relaxed), 1);
        assert_eq!(stats.dropped_count(Dropped::UnknownEndpoint), 1);
        let slot = |addr: &str| {
            w.snapshot()
                .endpoints
                .iter()
                .find(|e| e.endpoint.address() == addr)
                .unwrap()
                .slot()
        };
        let m = t.prefix.lookup(&PromptHashes {
            hashes: vec![11, 12, 13, 14],
        });
        assert_eq!(m.matched(slot("10.0.0.2:8000")), 3);
        assert_eq!(m.matched(slot("10.0.0.1:8000")), 0);
    }

    #[test]
    fn a_snapshot_round_trips_through_export_and_apply() {
        let (w, t) = world();
        let s1 = w.snapshot().endpoints[0].slot();
        t.prefix.insert(s1, &PromptHashes { hashes: vec![5, 6] });
        let snap = snapshot::export(&t, "a", "7-0".into());
        assert_eq!(snap.stream_id, "7-0");
        assert_eq!(snap.endpoints.len(), 1);
        let bytes = wire::encode_snapshot(&snap);
        let back = wire::decode_snapshot(&bytes, 64).unwrap();
        // Another replica's index (same endpoints, fresh index) gets the same blocks.
        let (_w2, t2) = world();
        let (opts, client) = (
            SharedStateOptions {
                url: "redis://127.0.0.1:1".into(),
                ..Default::default()
            },
            redis::Client::open("redis://127.0.0.1:1").unwrap(),
        );
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let sd = Shutdown::new();
            let (r, tasks) = Replication::start(opts, client, t2.clone(), sd.clone());
            assert_eq!(snapshot::apply(&t2, &back, &r), 2);
            sd.trigger();
            for task in tasks {
                let _ = task.await;
            }
        });
        let m = t2.prefix.lookup(&PromptHashes { hashes: vec![5, 6] });
        assert_eq!(m.matched(_w2.snapshot().endpoints[0].slot()), 2);
    }

    #[test]
    fn options_are_checked_before_anything_connects() {
        let bad = |f: fn(&mut SharedStateOptions)| {
            let mut o = SharedStateOptions {
                url: "redis://127.0.0.1:6379".into(),
                ..Default::default()
            };
            f(&mut o);
            o.client().unwrap_err()
        };
        assert!(bad(|o| o.url = "tcp://x:1".into()).contains("expected redis://"));
        assert!(bad(|o| o.key_prefix.clear()).contains("--shared-state-key-prefix"));
        assert!(bad(|o| o.replica_id.clear()).contains("--replica-id"));
        assert!(bad(|o| o.stream_max_len = 0).contains("--shared-state-stream-max-len"));
        assert!(bad(|o| o.ca_file = Some("/x.pem".into())).contains("is not rediss://"));
        let o = SharedStateOptions {
            url: "redis://:hunter2@10.0.0.5:6379/1".into(),
            ..Default::default()
        };
        assert!(o.client().is_ok());
        assert_eq!(o.describe(), "redis://***@10.0.0.5:6379/1");
    }
}

//! `epp_shared_state_*`: how replication through Redis is doing, read at scrape time from the
//! replication task's counters. Exported only when `--shared-state` is set.

use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::metrics::MetricType;

/// Buckets of `epp_shared_state_lag_seconds`: 1 ms .. 30 s.
pub const LAG_BUCKETS: [f64; 14] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];

/// Why an insert was not sent or not applied.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Dropped {
    /// The outgoing queue was full (Redis slower than the picks).
    QueueFull,
    /// Redis was unreachable for longer than the outgoing backlog covers.
    RedisUnavailable,
    /// A received insert names an endpoint this replica has not discovered.
    UnknownEndpoint,
}

impl Dropped {
    pub const ALL: [Dropped; 3] = [
        Dropped::QueueFull,
        Dropped::RedisUnavailable,
        Dropped::UnknownEndpoint,
    ];
    pub fn as_str(self) -> &'static str {
        match self {
            Dropped::QueueFull => "queue_full",
            Dropped::RedisUnavailable => "redis_unavailable",
            Dropped::UnknownEndpoint => "unknown_endpoint",
        }
    }
}

/// Counters of one replica's replication; lock-free, updated by its tasks.
#[derive(Debug)]
pub struct Stats {
    pub up: AtomicBool,
    pub sent: AtomicU64,
    pub applied: AtomicU64,
    dropped: [AtomicU64; 3],
    /// `[malformed, incompatible]`.
    refused: [AtomicU64; 2],
    pub commands: AtomicU64,
    pub bytes_sent: AtomicU64,
    pub bytes_received: AtomicU64,
    pub snapshots_written: AtomicU64,
    pub snapshots_loaded: AtomicU64,
    /// When the snapshot in Redis was taken (Unix ms), -1 when there is none (or unknown).
    pub snapshot_taken_ms: AtomicI64,
    /// Replicas seen alive (this one included) at the last load exchange.
    pub replicas: AtomicU64,
    /// Blocks in the last snapshot written or loaded.
    pub snapshot_blocks: AtomicU64,
    pub lag: Histogram,
}

impl Default for Stats {
    fn default() -> Self {
        Self {
            up: AtomicBool::new(false),
            sent: AtomicU64::new(0),
            applied: AtomicU64::new(0),
            dropped: Default::default(),
            refused: Default::default(),
            commands: AtomicU64::new(0),
            bytes_sent: AtomicU64::new(0),
            bytes_received: AtomicU64::new(0),
            snapshots_written: AtomicU64::new(0),
            snapshots_loaded: AtomicU64::new(0),
            snapshot_taken_ms: AtomicI64::new(-1),
            replicas: AtomicU64::new(0),
            snapshot_blocks: AtomicU64::new(0),
            lag: Histogram::new(LAG_BUCKETS),
        }
    }
}

impl Stats {
    pub fn dropped(&self, why: Dropped, n: u64) {
        self.dropped[why as usize].fetch_add(n, Ordering::Relaxed);
    }
    pub fn dropped_count(&self, why: Dropped) -> u64 {
        self.dropped[why as usize].load(Ordering::Relaxed)
    }
    /// `reason`: `malformed` or `incompatible` ([`super::wire::Refusal::reason`]).
    pub fn refused(&self, reason: &str) {
        let i = usize::from(reason != "malformed");
        self.refused[i].fetch_add(1, Ordering::Relaxed);
    }
    pub fn refused_count(&self, reason: &str) -> u64 {
        self.refused[usize::from(reason != "malformed")].load(Ordering::Relaxed)
    }
    /// The snapshot in Redis as last written or loaded.
    pub fn snapshot_seen(&self, taken_ms: u64, blocks: usize) {
        self.snapshot_taken_ms.store(
            i64::try_from(taken_ms).unwrap_or(i64::MAX),
            Ordering::Relaxed,
        );
        self.snapshot_blocks.store(blocks as u64, Ordering::Relaxed);
    }
    pub fn command(&self, n: u64) {
        self.commands.fetch_add(n, Ordering::Relaxed);
    }
}

/// Encodes [`Stats`] into the one registry.
#[derive(Debug)]
pub struct StatsCollector(pub std::sync::Arc<parking_lot::RwLock<Option<std::sync::Arc<Stats>>>>);

fn counter(
    enc: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    v: u64,
) -> Result<(), std::fmt::Error> {
    ConstCounter::new(v).encode(enc.encode_descriptor(name, help, None, MetricType::Counter)?)
}

fn gauge(
    enc: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    v: f64,
) -> Result<(), std::fmt::Error> {
    ConstGauge::new(v).encode(enc.encode_descriptor(name, help, None, MetricType::Gauge)?)
}

impl Collector for StatsCollector {
    fn encode(&self, mut enc: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let Some(s) = self.0.read().clone() else {
            return Ok(());
        };
        let r = Ordering::Relaxed;
        gauge(
            &mut enc,
            "epp_shared_state_up",
            "1 while the shared-state Redis answers, 0 while this replica routes on local state alone",
            f64::from(u8::from(s.up.load(r))),
        )?;
        counter(
            &mut enc,
            "epp_shared_state_deltas_sent",
            "Prefix-index inserts this replica published to the shared-state stream",
            s.sent.load(r),
        )?;
        counter(
            &mut enc,
            "epp_shared_state_deltas_applied",
            "Other replicas' prefix-index inserts applied to the local index",
            s.applied.load(r),
        )?;
        {
            let mut fam = enc.encode_descriptor(
                "epp_shared_state_deltas_dropped",
                "Prefix-index inserts not sent or not applied, by reason",
                None,
                MetricType::Counter,
            )?;
            for d in Dropped::ALL {
                let labels = [("reason", d.as_str())];
                ConstCounter::new(s.dropped_count(d)).encode(fam.encode_family(&labels)?)?;
            }
        }
        {
            let mut fam = enc.encode_descriptor(
                "epp_shared_state_entries_refused",
                "Stream entries, snapshots or load reports read from Redis and refused, by reason",
                None,
                MetricType::Counter,
            )?;
            for reason in ["malformed", "incompatible"] {
                let labels = [("reason", reason)];
                ConstCounter::new(s.refused_count(reason)).encode(fam.encode_family(&labels)?)?;
            }
        }
        s.lag.encode(enc.encode_descriptor(
            "epp_shared_state_lag_seconds",
            "Time from another replica publishing an insert to this replica applying it",
            None,
            MetricType::Histogram,
        )?)?;
        let taken = s.snapshot_taken_ms.load(r);
        if taken >= 0 {
            let age = (super::now_ms() as i64 - taken).max(0) as f64 / 1000.0;
            gauge(
                &mut enc,
                "epp_shared_state_snapshot_age_seconds",
                "Age of the index snapshot in Redis, as last seen",
                age,
            )?;
        }
        gauge(
            &mut enc,
            "epp_shared_state_snapshot_blocks",
            "Blocks in the last index snapshot this replica wrote or loaded",
            s.snapshot_blocks.load(r) as f64,
        )?;
        counter(
            &mut enc,
            "epp_shared_state_snapshots_written",
            "Index snapshots this replica wrote to Redis",
            s.snapshots_written.load(r),
        )?;
        counter(
            &mut enc,
            "epp_shared_state_snapshots_loaded",
            "Index snapshots this replica loaded from Redis (warm starts)",
            s.snapshots_loaded.load(r),
        )?;
        gauge(
            &mut enc,
            "epp_shared_state_replicas",
            "Picker replicas seen alive through the shared state (this one included)",
            s.replicas.load(r) as f64,
        )?;
        counter(
            &mut enc,
            "epp_shared_state_redis_commands",
            "Redis commands sent (a pipeline counts each command)",
            s.commands.load(r),
        )?;
        counter(
            &mut enc,
            "epp_shared_state_sent_bytes",
            "Payload bytes written to Redis (stream entries, snapshots, load reports)",
            s.bytes_sent.load(r),
        )?;
        counter(
            &mut enc,
            "epp_shared_state_received_bytes",
            "Payload bytes read from Redis (stream entries, snapshots, load reports)",
            s.bytes_received.load(r),
        )?;
        Ok(())
    }
}

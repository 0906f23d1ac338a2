//! The delta stream: picks published as Redis Stream entries, the others' entries applied.

use std::collections::VecDeque;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use redis::aio::ConnectionManager;
use redis::streams::StreamReadReply;
use tokio::sync::mpsc;

use super::metrics::Dropped;
use super::wire::{self, Batch, Insert};
use super::{Replication, Target};
use crate::telemetry::Shutdown;

/// How long one `XREAD` blocks waiting for new entries.
pub const READ_BLOCK: Duration = Duration::from_millis(1000);
/// Entries read per `XREAD` at most.
pub const READ_COUNT: usize = 512;
/// Pause after a failed command before the next try (doubling up to [`MAX_BACKOFF`]).
const MIN_BACKOFF: Duration = Duration::from_millis(100);
const MAX_BACKOFF: Duration = Duration::from_secs(2);

/// State the reader shares with the snapshot writer.
#[derive(Clone, Debug, Default)]
pub struct Shared {
    /// The last stream id read (own entries included): a snapshot covers the stream up to it.
    pub last_id: Arc<Mutex<Option<String>>>,
    /// Whether the snapshot in Redis was loaded (or found absent): only then may this replica
    /// overwrite it, so a replica that missed the warm start never replaces a full snapshot
    /// with its own empty index.
    pub loaded: Arc<std::sync::atomic::AtomicBool>,
}

/// Publishes queued inserts: everything queued so far goes out as one entry (no timer: the
/// round trip itself batches under load). While Redis is away at most
/// [`super::BACKLOG_BATCHES`] batches wait; older ones are dropped and counted.
pub async fn publish(
    r: Replication,
    mut conn: ConnectionManager,
    mut rx: mpsc::Receiver<Insert>,
    block_bytes: u32,
    shutdown: Shutdown,
) {
    let key = r.opts.key("deltas");
    let mut backlog: VecDeque<(Vec<u8>, usize)> = VecDeque::new();
    let mut backoff = MIN_BACKOFF;
    loop {
        let first = if backlog.is_empty() {
            tokio::select! {
                i = rx.recv() => match i { Some(i) => Some(i), None => return },
                _ = shutdown.wait() => return,
            }
        } else {
            tokio::select! {
                i = rx.recv() => i,
                _ = tokio::time::sleep(backoff) => None,
                _ = shutdown.wait() => return,
            }
        };
        if let Some(first) = first {
            let mut inserts = vec![first];
            while inserts.len() < wire::MAX_INSERTS_PER_BATCH {
                match rx.try_recv() {
                    Ok(i) => inserts.push(i),
                    Err(_) => break,
                }
            }
            let n = inserts.len();
            let batch = Batch {
                block_bytes,
                sent_ms: super::now_ms(),
                inserts,
            };
            backlog.push_back((wire::encode_batch(&batch), n));
            while backlog.len() > super::BACKLOG_BATCHES {
                if let Some((_, lost)) = backlog.pop_front() {
                    r.stats.dropped(Dropped::RedisUnavailable, lost as u64);
                }
            }
        }
        if backlog.is_empty() {
            continue;
        }
        let mut pipe = redis::pipe();
        for (bytes, _) in &backlog {
            pipe.cmd("XADD")
                .arg(&key)
                .arg("MAXLEN")
                .arg("~")
                .arg(r.opts.stream_max_len)
                .arg("*")
                .arg("v")
                .arg(wire::FORMAT_VERSION)
                .arg("r")
                .arg(&r.opts.replica_id)
                .arg("b")
                .arg(bytes.as_slice())
                .ignore();
        }
        r.stats.command(backlog.len() as u64);
        let res: redis::RedisResult<()> = pipe.query_async(&mut conn).await;
        r.link.observe(&r.stats, "publishing deltas", &res);
        match res {
            Ok(()) => {
                backoff = MIN_BACKOFF;
                for (bytes, n) in backlog.drain(..) {
                    r.stats.sent.fetch_add(n as u64, Ordering::Relaxed);
                    r.stats
                        .bytes_sent
                        .fetch_add(bytes.len() as u64, Ordering::Relaxed);
                }
            }
            Err(_) => backoff = (backoff * 2).min(MAX_BACKOFF),
        }
    }
}

/// Warm start (snapshot, then the stream since it), then follows the stream for good.
pub async fn read(
    r: Replication,
    mut reader: ConnectionManager,
    mut cmds: ConnectionManager,
    target: Target,
    shared: Shared,
    shutdown: Shutdown,
) {
    let started = tokio::time::Instant::now();
    // Ready anyway once the warm-start bound has passed (Redis away, a huge stream).
    {
        let (link, timeout, sd) = (r.link.clone(), r.opts.warm_start_timeout, shutdown.clone());
        tokio::spawn(async move {
            tokio::select! {
                _ = tokio::time::sleep(timeout) => {
                    if !link.is_warm() {
                        tracing::warn!(?timeout, "shared state: not warm within the warm-start bound; ready on local state, still catching up");
                        link.set_warm();
                    }
                }
                _ = sd.wait() => {}
            }
        });
    }
    // Inserts name endpoints by address: apply nothing before discovery knows them.
    while !(target.datastore.is_synced() && target.datastore.discovered_count() > 0) {
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_millis(20)) => {}
            _ = shutdown.wait() => return,
        }
    }
    let mut backoff = MIN_BACKOFF;
    let mut last = loop {
        match super::snapshot::load(&r, &mut cmds, &target).await {
            Ok(id) => {
                shared.loaded.store(true, Ordering::Release);
                break id.unwrap_or_else(|| "0-0".to_string());
            }
            Err(_) => {
                tokio::select! {
                    _ = tokio::time::sleep(backoff) => {}
                    _ = shutdown.wait() => return,
                }
                backoff = (backoff * 2).min(MAX_BACKOFF);
            }
        }
    };
    let key = r.opts.key("deltas");
    let mut replayed = 0usize;
    backoff = MIN_BACKOFF;
    loop {
        let mut q = redis::cmd("XREAD");
        q.arg("COUNT").arg(READ_COUNT);
        // Catching up (warm start) does not wait for new entries: an empty or short stream
        // makes the replica warm at once.
        if r.link.is_warm() {
            q.arg("BLOCK").arg(READ_BLOCK.as_millis() as u64);
        }
        q.arg("STREAMS").arg(&key).arg(&last);
        r.stats.command(1);
        let res: redis::RedisResult<Option<StreamReadReply>> = tokio::select! {
            res = q.query_async(&mut reader) => res,
            _ = shutdown.wait() => return,
        };
        r.link.observe(&r.stats, "reading deltas", &res);
        let reply = match res {
            Ok(reply) => {
                backoff = MIN_BACKOFF;
                reply
            }
            Err(_) => {
                tokio::select! {
                    _ = tokio::time::sleep(backoff) => {}
                    _ = shutdown.wait() => return,
                }
                backoff = (backoff * 2).min(MAX_BACKOFF);
                continue;
            }
        };
        let mut entries = 0usize;
        for k in reply.map(|r| r.keys).unwrap_or_default() {
            for e in k.ids {
                entries += 1;
                apply_entry(&r, &target, &e);
                last = e.id;
            }
        }
        *shared.last_id.lock() = Some(last.clone());
        replayed += entries;
        if !r.link.is_warm() && entries < READ_COUNT {
            tracing::info!(
                stream_entries = replayed,
                elapsed = ?started.elapsed(),
                "shared state: warm (index snapshot and the stream since it applied)"
            );
            r.link.set_warm();
        }
    }
}

fn field<'a>(e: &'a redis::streams::StreamId, name: &str) -> Option<&'a [u8]> {
    match e.map.get(name)? {
        redis::Value::BulkString(b) => Some(b),
        redis::Value::SimpleString(s) => Some(s.as_bytes()),
        _ => None,
    }
}

fn apply_entry(r: &Replication, target: &Target, e: &redis::streams::StreamId) {
    let (v, rep, b) = (field(e, "v"), field(e, "r"), field(e, "b"));
    r.stats
        .bytes_received
        .fetch_add(b.map_or(0, <[u8]>::len) as u64, Ordering::Relaxed);
    // Our own entries: already in the local index.
    if rep == Some(r.opts.replica_id.as_bytes()) {
        return;
    }
    let raw = wire::RawEntry {
        version: v,
        replica: rep,
        batch: b,
    };
    match wire::decode_entry(&raw, target.block_bytes) {
        Ok(entry) => {
            let lag_ms = super::now_ms().saturating_sub(entry.batch.sent_ms);
            r.stats.lag.observe(lag_ms as f64 / 1000.0);
            target.apply(&entry.batch.inserts, &r.stats);
        }
        Err(why) => {
            r.stats.refused(why.reason());
            tracing::debug!(id = %e.id, error = %why, "shared state: stream entry refused");
        }
    }
}

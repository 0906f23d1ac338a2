//! The index snapshot: a compact copy of the approximate index under `<prefix>:snapshot`, with
//! the stream id it covers, so a replica that starts (or a new leader) is warm at once. One
//! replica at a time writes it (a `SET NX PX` lease of one interval); its age is kept under
//! `<prefix>:snapshot:taken` for every replica's metric.

use std::sync::atomic::Ordering;
use std::time::Duration;

use redis::aio::ConnectionManager;

use super::stream::Shared;
use super::wire::{self, EndpointBlocks, Snapshot};
use super::{Replication, Target};
use crate::telemetry::Shutdown;

/// Loads the snapshot into the local index; returns the stream id it covers (`None`: there is
/// none, or it was refused, so the whole stream is read).
pub async fn load(
    r: &Replication,
    conn: &mut ConnectionManager,
    target: &Target,
) -> redis::RedisResult<Option<String>> {
    r.stats.command(1);
    let res: redis::RedisResult<Option<Vec<u8>>> = redis::cmd("GET")
        .arg(r.opts.key("snapshot"))
        .query_async(conn)
        .await;
    r.link.observe(&r.stats, "loading the index snapshot", &res);
    let Some(bytes) = res? else {
        tracing::info!("shared state: no index snapshot yet; reading the whole stream");
        return Ok(None);
    };
    r.stats
        .bytes_received
        .fetch_add(bytes.len() as u64, Ordering::Relaxed);
    let snap = match wire::decode_snapshot(&bytes, target.block_bytes) {
        Ok(s) => s,
        Err(why) => {
            r.stats.refused(why.reason());
            tracing::warn!(error = %why, "shared state: index snapshot refused; reading the whole stream");
            return Ok(None);
        }
    };
    let blocks = apply(target, &snap, r);
    r.stats.snapshots_loaded.fetch_add(1, Ordering::Relaxed);
    r.stats.snapshot_seen(snap.taken_ms, blocks);
    tracing::info!(
        blocks,
        endpoints = snap.endpoints.len(),
        age_ms = super::now_ms().saturating_sub(snap.taken_ms),
        written_by = %snap.replica,
        "shared state: index snapshot loaded"
    );
    Ok(Some(snap.stream_id))
}

/// Puts a snapshot's blocks into the local index; returns the blocks applied.
pub fn apply(target: &Target, snap: &Snapshot, r: &Replication) -> usize {
    let ds = target.datastore.snapshot();
    let mut blocks = 0;
    for e in &snap.endpoints {
        let Some(ep) = ds
            .endpoints
            .iter()
            .find(|v| v.endpoint.address() == e.endpoint)
        else {
            r.stats.dropped(super::Dropped::UnknownEndpoint, 1);
            continue;
        };
        target.prefix.insert(
            ep.slot(),
            &crate::prefix::PromptHashes {
                hashes: e.hashes.clone(),
            },
        );
        blocks += e.hashes.len();
    }
    blocks
}

/// The local index as a snapshot covering the stream up to `stream_id`.
pub fn export(target: &Target, replica: &str, stream_id: String) -> Snapshot {
    let ds = target.datastore.snapshot();
    let mut budget = wire::MAX_SNAPSHOT_BLOCKS;
    let mut endpoints = Vec::new();
    for e in ds.endpoints.iter().take(wire::MAX_ENDPOINTS) {
        if budget == 0 {
            break;
        }
        let mut hashes = target.prefix.export_slot(e.slot());
        if hashes.is_empty() {
            continue;
        }
        hashes.truncate(budget);
        budget -= hashes.len();
        endpoints.push(EndpointBlocks {
            endpoint: e.endpoint.address().to_string(),
            hashes,
        });
    }
    Snapshot {
        version: wire::FORMAT_VERSION,
        block_bytes: target.block_bytes,
        taken_ms: super::now_ms(),
        stream_id,
        replica: replica.to_string(),
        endpoints,
    }
}

/// Every interval: reads the snapshot's age, and when this replica holds the lease, writes a
/// new snapshot.
pub async fn run(
    r: Replication,
    mut conn: ConnectionManager,
    target: Target,
    shared: Shared,
    shutdown: Shutdown,
) {
    let interval = r.opts.snapshot_interval;
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await;
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = shutdown.wait() => return,
        }
        r.stats.command(1);
        let res: redis::RedisResult<Option<i64>> = redis::cmd("GET")
            .arg(r.opts.key("snapshot:taken"))
            .query_async(&mut conn)
            .await;
        r.link.observe(&r.stats, "reading the snapshot age", &res);
        if let Ok(Some(t)) = res {
            r.stats.snapshot_taken_ms.store(t, Ordering::Relaxed);
        }
        if !shared.loaded.load(Ordering::Acquire) {
            continue;
        }
        let Some(stream_id) = shared.last_id.lock().clone() else {
            continue;
        };
        r.stats.command(1);
        let lease: redis::RedisResult<Option<String>> = redis::cmd("SET")
            .arg(r.opts.key("snapshot:lock"))
            .arg(&r.opts.replica_id)
            .arg("NX")
            .arg("PX")
            .arg(
                interval
                    .saturating_sub(Duration::from_millis(50))
                    .as_millis()
                    .max(1) as u64,
            )
            .query_async(&mut conn)
            .await;
        if !matches!(lease, Ok(Some(_))) {
            continue;
        }
        let snap = export(&target, &r.opts.replica_id, stream_id);
        let blocks: usize = snap.endpoints.iter().map(|e| e.hashes.len()).sum();
        let bytes = wire::encode_snapshot(&snap);
        let mut pipe = redis::pipe();
        pipe.cmd("SET")
            .arg(r.opts.key("snapshot"))
            .arg(bytes.as_slice())
            .ignore()
            .cmd("SET")
            .arg(r.opts.key("snapshot:taken"))
            .arg(snap.taken_ms)
            .ignore();
        r.stats.command(2);
        let res: redis::RedisResult<()> = pipe.query_async(&mut conn).await;
        r.link.observe(&r.stats, "writing the index snapshot", &res);
        if res.is_ok() {
            r.stats.snapshots_written.fetch_add(1, Ordering::Relaxed);
            r.stats
                .bytes_sent
                .fetch_add(bytes.len() as u64, Ordering::Relaxed);
            r.stats.snapshot_seen(snap.taken_ms, blocks);
            tracing::debug!(
                blocks,
                bytes = bytes.len(),
                "shared state: index snapshot written"
            );
        }
    }
}

//! Requests in flight per endpoint, exchanged between replicas: each replica writes its own
//! counts under `<prefix>:load:<replica>` with a short expiry and registers in the
//! `<prefix>:replicas` sorted set (score: last report, Unix ms); it reads the others' reports
//! and adds them to each endpoint's remote in-flight count. A replica that dies stops
//! refreshing, and its load vanishes when its key expires.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::time::Duration;

use redis::aio::ConnectionManager;

use super::wire::{self, Load};
use super::Replication;
use crate::datastore::Datastore;
use crate::telemetry::Shutdown;

/// Replicas read at most (others are ignored until some leave).
pub const MAX_REPLICAS: usize = 64;

/// How long a report lives: ten exchange intervals, at least a second.
pub fn report_ttl(interval: Duration) -> Duration {
    (interval * 10).max(Duration::from_secs(1))
}

pub async fn run(r: Replication, mut conn: ConnectionManager, ds: Datastore, shutdown: Shutdown) {
    let ttl = report_ttl(r.opts.load_interval);
    let own_key = r.opts.key(&format!("load:{}", r.opts.replica_id));
    let set_key = r.opts.key("replicas");
    let mut tick = tokio::time::interval(r.opts.load_interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last_ok = tokio::time::Instant::now();
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = shutdown.wait() => break,
        }
        let snap = ds.snapshot();
        let report = Load {
            version: wire::FORMAT_VERSION,
            sent_ms: super::now_ms(),
            endpoints: snap
                .endpoints
                .iter()
                .take(wire::MAX_ENDPOINTS)
                .map(|e| {
                    (
                        e.endpoint.address().to_string(),
                        e.endpoint.inflight() as u32,
                    )
                })
                .collect(),
        };
        let bytes = wire::encode_load(&report);
        let now = report.sent_ms;
        let oldest = now.saturating_sub(ttl.as_millis() as u64);
        let mut pipe = redis::pipe();
        pipe.cmd("SET")
            .arg(&own_key)
            .arg(bytes.as_slice())
            .arg("PX")
            .arg(ttl.as_millis() as u64)
            .ignore()
            .cmd("ZADD")
            .arg(&set_key)
            .arg(now)
            .arg(&r.opts.replica_id)
            .ignore()
            .cmd("PEXPIRE")
            .arg(&set_key)
            .arg(ttl.as_millis() as u64 * 6)
            .ignore()
            .cmd("ZREMRANGEBYSCORE")
            .arg(&set_key)
            .arg("-inf")
            .arg(format!("({oldest}"))
            .ignore()
            .cmd("ZRANGEBYSCORE")
            .arg(&set_key)
            .arg(oldest)
            .arg("+inf")
            .arg("LIMIT")
            .arg(0)
            .arg(MAX_REPLICAS);
        r.stats.command(5);
        r.stats
            .bytes_sent
            .fetch_add(bytes.len() as u64, Ordering::Relaxed);
        let res: redis::RedisResult<(Vec<String>,)> = pipe.query_async(&mut conn).await;
        r.link.observe(&r.stats, "exchanging load", &res);
        let replicas = match res {
            Ok((replicas,)) => replicas,
            Err(_) => {
                // Reports older than their lifetime say nothing any more.
                if last_ok.elapsed() > ttl {
                    set_remote(&ds, &HashMap::new());
                    r.stats.replicas.store(1, Ordering::Relaxed);
                }
                continue;
            }
        };
        let others: Vec<String> = replicas
            .into_iter()
            .filter(|id| *id != r.opts.replica_id)
            .collect();
        let mut remote: HashMap<String, u64> = HashMap::new();
        let mut alive = 1u64;
        if !others.is_empty() {
            let keys: Vec<String> = others
                .iter()
                .map(|id| r.opts.key(&format!("load:{id}")))
                .collect();
            r.stats.command(1);
            let res: redis::RedisResult<Vec<Option<Vec<u8>>>> =
                redis::cmd("MGET").arg(&keys).query_async(&mut conn).await;
            r.link.observe(&r.stats, "reading load", &res);
            let Ok(reports) = res else { continue };
            for bytes in reports.into_iter().flatten() {
                r.stats
                    .bytes_received
                    .fetch_add(bytes.len() as u64, Ordering::Relaxed);
                match wire::decode_load(&bytes) {
                    Ok(l) => {
                        alive += 1;
                        for (addr, n) in l.endpoints {
                            *remote.entry(addr).or_default() += u64::from(n);
                        }
                    }
                    Err(why) => r.stats.refused(why.reason()),
                }
            }
        }
        last_ok = tokio::time::Instant::now();
        set_remote(&ds, &remote);
        r.stats.replicas.store(alive, Ordering::Relaxed);
    }
    // Leaving: our load goes at once rather than when the key expires.
    let mut pipe = redis::pipe();
    pipe.cmd("DEL")
        .arg(&own_key)
        .ignore()
        .cmd("ZREM")
        .arg(&set_key)
        .arg(&r.opts.replica_id)
        .ignore();
    let _ = tokio::time::timeout(
        Duration::from_millis(500),
        pipe.query_async::<()>(&mut conn),
    )
    .await;
}

fn set_remote(ds: &Datastore, remote: &HashMap<String, u64>) {
    for e in &ds.snapshot().endpoints {
        let n = remote.get(e.endpoint.address()).copied().unwrap_or(0);
        e.endpoint
            .set_remote_inflight(usize::try_from(n).unwrap_or(usize::MAX));
    }
}

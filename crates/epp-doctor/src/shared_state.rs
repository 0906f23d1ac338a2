//! The shared-state checks (`--shared-state`): the Redis that active-active replicas share
//! routing state through answers, accepts our credentials, and holds live state: the delta
//! stream, a recent index snapshot, and the replicas that report their load.

use std::time::{Duration, Instant};

use epp_core::replication::{now_ms, SharedStateOptions};

use crate::report::Report;

/// What to check.
#[derive(Clone, Debug)]
pub struct SharedStateCheck {
    pub url: String,
    pub password: Option<String>,
    pub key_prefix: String,
    /// A snapshot older than this is a warning (three default snapshot intervals).
    pub snapshot_max_age: Duration,
}

fn fix_for(e: &redis::RedisError) -> &'static str {
    let s = e.to_string();
    if s.contains("NOAUTH") || s.contains("WRONGPASS") || s.contains("AUTH") {
        "give the replicas' password: --shared-state-password-file FILE (or EPP_SHARED_STATE_PASSWORD)"
    } else if e.is_timeout() {
        "Redis did not answer in time: is it overloaded, or is a firewall dropping packets?"
    } else {
        "is Redis running at that address, and reachable from here (Service, NetworkPolicy, TLS: rediss:// for a TLS port)?"
    }
}

pub async fn check(r: &mut Report, c: &SharedStateCheck, timeout: Duration) {
    r.section(&format!("shared state ({})", mask(&c.url)));
    let opts = SharedStateOptions {
        url: c.url.clone(),
        password: c.password.clone(),
        key_prefix: c.key_prefix.clone(),
        ..Default::default()
    };
    let client = match opts.client() {
        Ok(cl) => cl,
        Err(e) => {
            r.fail(
                "URL",
                e,
                "use redis://host:port[/db] or rediss://host:port[/db]",
            );
            return;
        }
    };
    let started = Instant::now();
    let conn = tokio::time::timeout(timeout, client.get_multiplexed_async_connection()).await;
    let mut conn = match conn {
        Err(_) => {
            r.fail(
                "connect",
                format!("no connection within {timeout:?}"),
                "is Redis running at that address, and reachable from here?",
            );
            return;
        }
        Ok(Err(e)) => {
            r.fail("connect", e.to_string(), fix_for(&e));
            return;
        }
        Ok(Ok(conn)) => conn,
    };
    let ping: redis::RedisResult<String> =
        tokio::time::timeout(timeout, redis::cmd("PING").query_async(&mut conn))
            .await
            .unwrap_or_else(|_| {
                Err(redis::RedisError::from(std::io::Error::from(
                    std::io::ErrorKind::TimedOut,
                )))
            });
    match ping {
        Ok(_) => r.pass(
            "connect",
            format!("answers PING ({} ms)", started.elapsed().as_millis()),
        ),
        Err(e) => {
            r.fail("connect", e.to_string(), fix_for(&e));
            return;
        }
    }
    let info: redis::RedisResult<String> = redis::cmd("INFO")
        .arg("server")
        .query_async(&mut conn)
        .await;
    if let Ok(info) = info {
        let version = info
            .lines()
            .find_map(|l| {
                l.strip_prefix("redis_version:")
                    .or_else(|| l.strip_prefix("valkey_version:"))
            })
            .unwrap_or("unknown");
        let major: u32 = version
            .split('.')
            .next()
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        if major >= 5 {
            r.pass("server", format!("version {version} (Streams supported)"));
        } else {
            r.fail(
                "server",
                format!("version {version}"),
                "shared state needs Redis Streams: Redis or Valkey 5 or newer",
            );
        }
    }
    let key = |w: &str| format!("{}:{w}", c.key_prefix);
    let xlen: redis::RedisResult<u64> = redis::cmd("XLEN")
        .arg(key("deltas"))
        .query_async(&mut conn)
        .await;
    match xlen {
        Ok(0) => r.warn(
            "delta stream",
            format!("{} is empty", key("deltas")),
            "no replica has routed with this key prefix yet; check --shared-state-key-prefix (default epp:<namespace>/<pool>)",
        ),
        Ok(n) => r.pass("delta stream", format!("{} holds {n} entries", key("deltas"))),
        Err(e) => r.fail("delta stream", e.to_string(), "the key exists but is not a stream: another program uses this key prefix; pick another with --shared-state-key-prefix"),
    }
    let taken: redis::RedisResult<Option<i64>> = redis::cmd("GET")
        .arg(key("snapshot:taken"))
        .query_async(&mut conn)
        .await;
    match taken {
        Ok(Some(t)) => {
            let age = Duration::from_millis(now_ms().saturating_sub(t.max(0) as u64));
            if age <= c.snapshot_max_age {
                r.pass(
                    "index snapshot",
                    format!("taken {:.1} s ago", age.as_secs_f64()),
                );
            } else {
                r.warn(
                    "index snapshot",
                    format!("taken {:.0} s ago", age.as_secs_f64()),
                    "no replica has written one lately: are the replicas running and warm (epp_shared_state_up, /readyz)?",
                );
            }
        }
        Ok(None) => r.warn(
            "index snapshot",
            "none yet",
            "replicas write one every --shared-state-snapshot-interval once they have routed",
        ),
        Err(e) => r.fail(
            "index snapshot",
            e.to_string(),
            "another program uses this key prefix",
        ),
    }
    let now = now_ms();
    let alive: redis::RedisResult<Vec<String>> = redis::cmd("ZRANGEBYSCORE")
        .arg(key("replicas"))
        .arg(now.saturating_sub(10_000))
        .arg("+inf")
        .arg("LIMIT")
        .arg(0)
        .arg(64)
        .query_async(&mut conn)
        .await;
    match alive {
        Ok(v) if v.is_empty() => r.warn(
            "replicas",
            "none reported load in the last 10 s",
            "start the pickers with --ha-mode active-active --shared-state URL and the same key prefix",
        ),
        Ok(v) => r.pass("replicas", format!("{} alive: {}", v.len(), v.join(", "))),
        Err(e) => r.fail("replicas", e.to_string(), "another program uses this key prefix"),
    }
}

fn mask(url: &str) -> String {
    SharedStateOptions {
        url: url.to_string(),
        ..Default::default()
    }
    .describe()
}

//! `epp doctor --shared-state` against a real `redis-server` on loopback: a live shared state
//! passes; an empty one warns; a password-protected one without the password fails with the
//! fix; an unreachable one fails with the fix; a bad URL is named.
//!
//! Needs `redis-server` and `redis-cli` (EPP_REDIS_SERVER_BIN or PATH; `scripts/test` installs
//! Debian's redis-server, which brings redis-cli).

#[path = "support/doctor.rs"]
mod support;

#[path = "support/redis.rs"]
mod redis_server;

use std::process::{Command, Stdio};
use std::time::{SystemTime, UNIX_EPOCH};

use redis_server::Redis;

use support::*;

fn cli(port: u16, args: &[&str]) {
    let st = Command::new("redis-cli")
        .args(["-p", &port.to_string()])
        .args(args)
        .stdout(Stdio::null())
        .status()
        .expect("redis-cli runs");
    assert!(st.success(), "redis-cli {args:?}");
}

fn s(v: &[&str]) -> Vec<String> {
    v.iter().map(|x| x.to_string()).collect()
}

#[test]
fn live_shared_state_passes_and_an_empty_one_warns() {
    let r = Redis::start(&[]);
    let url = r.url();
    // Empty: reachable, but nothing has routed with this prefix.
    let (code, out) = doctor(&s(&["--shared-state", &url]));
    assert_eq!(code, 0, "{out}");
    assert!(
        line_and_next(&out, "✓ connect").0.contains("answers PING"),
        "{out}"
    );
    assert!(
        line_and_next(&out, "✓ server")
            .0
            .contains("Streams supported"),
        "{out}"
    );
    let (l, hint) = line_and_next(&out, "! delta stream");
    assert!(l.contains("epp:default:deltas is empty"), "{out}");
    assert!(hint.contains("--shared-state-key-prefix"), "{hint}");
    assert!(out.contains("! index snapshot: none yet"), "{out}");
    assert!(out.contains("! replicas: none reported load"), "{out}");

    // Live: what running replicas leave behind.
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis()
        .to_string();
    cli(
        r.port,
        &["XADD", "p:deltas", "*", "v", "1", "r", "a", "b", "x"],
    );
    cli(r.port, &["SET", "p:snapshot:taken", &now]);
    cli(r.port, &["ZADD", "p:replicas", &now, "replica-a"]);
    cli(r.port, &["ZADD", "p:replicas", &now, "replica-b"]);
    let (code, out) = doctor(&s(&[
        "--shared-state",
        &url,
        "--shared-state-key-prefix",
        "p",
    ]));
    assert_eq!(code, 0, "{out}");
    assert!(
        out.contains("✓ delta stream: p:deltas holds 1 entries"),
        "{out}"
    );
    assert!(out.contains("✓ index snapshot: taken"), "{out}");
    assert!(
        out.contains("✓ replicas: 2 alive: replica-a, replica-b"),
        "{out}"
    );
    assert!(!out.contains('✗'), "{out}");
}

#[test]
fn a_missing_password_an_unreachable_server_and_a_bad_url_fail_with_the_fix() {
    let r = Redis::start(&["--requirepass", "s3cret"]);
    let url = r.url();
    let (code, out) = doctor(&s(&["--shared-state", &url]));
    assert_eq!(code, 1, "{out}");
    let (_, fix) = line_and_next(&out, "✗ connect");
    assert!(fix.contains("--shared-state-password-file"), "{out}");
    // With the password (from the environment): passes the connection check.
    let out = Command::new(env!("CARGO_BIN_EXE_epp"))
        .args(["doctor", "--shared-state", &url, "--timeout", "3s"])
        .env("EPP_SHARED_STATE_PASSWORD", "s3cret")
        .current_dir(checkout())
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("✓ connect: answers PING"), "{text}");

    let dead = format!("redis://127.0.0.1:{}", free_addr().port());
    let (code, out) = doctor(&s(&["--shared-state", &dead]));
    assert_eq!(code, 1, "{out}");
    let (_, fix) = line_and_next(&out, "✗ connect");
    assert!(fix.contains("is Redis running"), "{out}");

    let (code, out) = doctor(&s(&["--shared-state", "http://127.0.0.1:1"]));
    assert_eq!(code, 1, "{out}");
    assert!(
        line_and_next(&out, "✗ URL").0.contains("rediss://"),
        "{out}"
    );
}

//! An endpoint entering and leaving fallback to the approximate index is logged once per state
//! change, with the endpoint and the reason. Its own test binary: it installs the process-wide
//! log subscriber.

use std::time::Duration;

use epp_core::precise::{FallbackReason, Liveness, SlotState};
mod log_capture;
use log_capture::LogCapture;

#[tokio::test(start_paused = true)]
async fn fallback_changes_are_logged_once_with_the_reason() {
    let logs = LogCapture::install();
    let l = Liveness::default();
    let t0 = tokio::time::Instant::now();
    l.attach(
        3,
        "vllm-3",
        SlotState::Fallback(FallbackReason::NotConnected),
        "subscribing to tcp://10.0.0.3:5557",
    );
    // Connected, then the same state again and again: one line.
    for _ in 0..5 {
        l.set(3, SlotState::Live, "subscription connected");
    }
    // Traffic waits for an event; the timeout passes (checked many times): one line.
    l.expect_event(3, t0);
    for ms in [100u64, 200, 11_000, 12_000, 13_000] {
        l.check(
            t0 + Duration::from_millis(ms),
            Duration::from_secs(10),
            Duration::from_secs(30),
        );
    }
    assert_eq!(l.state(3), SlotState::Fallback(FallbackReason::NoEvents));
    assert_eq!(l.counts()[FallbackReason::NoEvents as usize], 1);
    // An event ends it.
    l.event(3);
    l.event(3);
    assert_eq!(l.state(3), SlotState::Live);
    // Lost messages: rebuilding, until the window has passed.
    l.rebuilding(3, t0 + Duration::from_secs(20), "3 of messages 7..=9 lost");
    l.check(
        t0 + Duration::from_secs(49),
        Duration::from_secs(10),
        Duration::from_secs(30),
    );
    assert_eq!(l.state(3), SlotState::Fallback(FallbackReason::Rebuilding));
    l.check(
        t0 + Duration::from_secs(50),
        Duration::from_secs(10),
        Duration::from_secs(30),
    );
    assert_eq!(l.state(3), SlotState::Live);
    let out = logs.text();
    let lines: Vec<&str> = out
        .lines()
        .filter(|l| l.contains("precise prefix:"))
        .collect();
    assert_eq!(lines.len(), 6, "{out}");
    let fallback: Vec<&&str> = lines
        .iter()
        .filter(|l| l.contains("scored by the approximate index"))
        .collect();
    assert_eq!(fallback.len(), 3, "{out}");
    for (line, reason) in fallback
        .iter()
        .zip(["not_connected", "no_events", "rebuilding"])
    {
        assert!(line.contains("endpoint=vllm-3"), "{line}");
        assert!(
            line.contains(&format!("reason=\"{reason}\""))
                || line.contains(&format!("reason={reason}")),
            "{line}"
        );
    }
    assert!(
        fallback[1].contains("without a KV event"),
        "{}",
        fallback[1]
    );
    assert!(
        fallback[2].contains("messages 7..=9 lost"),
        "{}",
        fallback[2]
    );
}

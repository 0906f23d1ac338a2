//! End to end: a real Prometheus, configured with the shipped static scrape config,
//! scrapes `epp proxy` in front of three `epp sim` servers under load — once without metrics
//! auth and once with `--metrics-auth=token`. Then `up{job="llm-d-gaie-epp"} == 1`, every
//! dashboard query returns data through the Prometheus HTTP API, and so does every alert
//! expression before its threshold comparison.
//!
//! `cargo test -p epp --test monitoring_e2e`. Needs `prometheus` (EPP_PROMETHEUS_BIN or PATH;
//! `scripts/test` installs it). Everything binds 127.0.0.1.

#[path = "support/monitoring.rs"]
mod common;

use std::sync::atomic::Ordering;
use std::time::Duration;

use common::*;

/// Load: 3 senders, each pausing this long between requests.
const LOAD_PAUSE: Duration = Duration::from_millis(20);

fn check_everything_has_data(prom: &Prometheus, procs: &Procs, load: &Load) {
    let empty = wait_for_data(prom, &shipped_queries(), Duration::from_secs(90));
    let up = up_values(prom);
    assert_eq!(
        up,
        ["1"],
        "targets: {:?}\n{}\n{}",
        prom.targets(),
        prom.log(),
        procs.logs()
    );
    assert!(
        empty.is_empty(),
        "shipped queries without data after {} requests:\n{}\n\n{}",
        load.sent.load(Ordering::Relaxed),
        empty.join("\n"),
        procs.logs()
    );
    assert!(load.sent.load(Ordering::Relaxed) > 0);
}

#[test]
fn prometheus_scrapes_the_proxy_without_auth() {
    let (procs, proxy, metrics) = start_stack(&["--metrics-auth=none"], &[]);
    let load = start_load(proxy, 3, LOAD_PAUSE);
    let cfg = shipped_static_config(SCRAPE_STATIC, &metrics.to_string());
    let prom = start_prometheus(&cfg, &[]);
    check_everything_has_data(&prom, &procs, &load);
}

#[test]
fn prometheus_scrapes_the_proxy_with_a_token() {
    let token = "e2e-metrics-token";
    let (procs, proxy, metrics) = start_stack(
        &[
            "--metrics-auth=token",
            "--metrics-token-file={dir}/picker.token",
        ],
        &[("picker.token", &format!("{token}\n"))],
    );
    // Without the token the picker refuses.
    let (status, body) = http_get(metrics, "/metrics", None).unwrap();
    assert_eq!(status, 401, "{body}");
    let load = start_load(proxy, 3, LOAD_PAUSE);
    let cfg = shipped_static_config(SCRAPE_STATIC_TOKEN, &metrics.to_string());
    let file = credentials_file(&cfg);
    let prom = start_prometheus(&cfg, &[(&file, &format!("{token}\n"))]);
    check_everything_has_data(&prom, &procs, &load);
}

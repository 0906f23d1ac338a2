//! Health-state changes are logged once each, with the endpoint and the reason. Its own test
//! binary: it installs the process-wide log subscriber.

use epp_core::datastore::{
    DatastoreWriter, EndpointSpec, FailureKind, HealthConfig, ModelServerMetrics, Source,
};
mod log_capture;
use log_capture::LogCapture;

#[test]
fn health_changes_are_logged_once_with_the_reason() {
    let logs = LogCapture::install();
    let d = DatastoreWriter::new(HealthConfig {
        passive_cooldown: std::time::Duration::ZERO,
        ..Default::default()
    });
    d.set_endpoints(vec![EndpointSpec::new("a:1")]);
    d.record_scrape("a:1", Ok(ModelServerMetrics::default()));
    // Six passive failures: one change (at the third), not six lines.
    for _ in 0..6 {
        d.record("a:1", Source::Passive, Err(FailureKind::Other));
    }
    for _ in 0..2 {
        d.record_scrape("a:1", Ok(ModelServerMetrics::default()));
        d.record("a:1", Source::Probe, Ok(()));
    }
    d.tick();
    let out = logs.text();
    let lines: Vec<&str> = out
        .lines()
        .filter(|l| l.contains("endpoint health changed"))
        .collect();
    assert_eq!(lines.len(), 3, "{out}");
    assert!(
        lines[0].contains(r#"from="stale" to="healthy""#),
        "{}",
        lines[0]
    );
    assert!(lines[1].contains("WARN"), "{}", lines[1]);
    assert!(
        lines[1].contains(r#"from="healthy" to="unhealthy""#),
        "{}",
        lines[1]
    );
    assert!(
        lines[1].contains("3 consecutive proxied request failures; kept out for at least 0ns"),
        "{}",
        lines[1]
    );
    assert!(lines[1].contains("endpoint=a:1"), "{}", lines[1]);
    assert!(lines[2].contains("recovered"), "{}", lines[2]);
}

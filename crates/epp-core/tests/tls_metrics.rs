//! HTTPS on the metrics port: served with the given certificate, a replaced certificate is
//! picked up without a restart, a self-signed one is made when none is given, and the probe
//! port stays plain HTTP. An expired certificate is still served, but exported as such and
//! named in `/readyz`'s detail without making the picker unready.

mod tls_support;

use std::net::SocketAddr;
use std::time::Duration;

use epp_core::app::{Runtime, RuntimeOptions};
use epp_core::discovery::StaticDiscovery;
use epp_core::telemetry::Shutdown;
use epp_core::tls::MetricsTls;
use tls_support::write_pair;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// GET /metrics over HTTPS; returns (served leaf certificate DER, status, body).
async fn https_get(addr: SocketAddr) -> (Vec<u8>, u16, String) {
    let (mut tls, leaf) = tls_support::connect(addr, &[]).await.unwrap();
    tls.write_all(b"GET /metrics HTTP/1.1\r\nhost: localhost\r\nconnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut buf = Vec::new();
    let _ = tls.read_to_end(&mut buf).await;
    let text = String::from_utf8_lossy(&buf).to_string();
    let code = text[9..12].parse().unwrap();
    (
        leaf,
        code,
        text.split_once("\r\n\r\n").unwrap().1.to_string(),
    )
}

async fn plain_get(addr: SocketAddr, path: &str) -> Option<u16> {
    let mut s = tokio::net::TcpStream::connect(addr).await.ok()?;
    s.write_all(format!("GET {path} HTTP/1.1\r\nhost: t\r\nconnection: close\r\n\r\n").as_bytes())
        .await
        .ok()?;
    let mut buf = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(2), s.read_to_end(&mut buf)).await;
    let text = String::from_utf8_lossy(&buf).to_string();
    text.starts_with("HTTP/1.1 ")
        .then(|| text[9..12].parse().ok())
        .flatten()
}

async fn start(tls: MetricsTls) -> Runtime {
    let opts = RuntimeOptions {
        discovery: std::sync::Arc::new(StaticDiscovery {
            endpoints: vec!["127.0.0.1:9".into()],
            poll_interval: Duration::from_secs(1),
            ..Default::default()
        }),
        metrics_addr: Some("127.0.0.1:0".parse().unwrap()),
        health_addr: Some("127.0.0.1:0".parse().unwrap()),
        metrics_tls: Some(tls),
        ..Default::default()
    };
    let v = opts.validate().unwrap();
    Runtime::start(opts, v, Shutdown::new()).await.unwrap()
}

#[tokio::test]
async fn https_with_files_and_a_replaced_certificate_is_picked_up() {
    let dir = tempfile::tempdir().unwrap();
    let first = write_pair(dir.path(), "first.example");
    let p = start(MetricsTls {
        cert_file: Some(dir.path().join("tls.crt")),
        key_file: Some(dir.path().join("tls.key")),
        reload_interval: Duration::from_millis(50),
    })
    .await;
    let m = p.metrics_addr.unwrap();
    let (leaf, code, body) = https_get(m).await;
    assert_eq!(leaf, first);
    assert_eq!(code, 200);
    assert!(body.contains("epp_pods_discovered"));

    // Plain HTTP to the HTTPS port gets no metrics; the probes stay plain HTTP.
    assert_ne!(plain_get(m, "/metrics").await, Some(200));
    assert_eq!(
        plain_get(p.health_addr.unwrap(), "/healthz").await,
        Some(200)
    );

    // Rotate: the new certificate is served without a restart.
    let second = write_pair(dir.path(), "second.example");
    assert_ne!(first, second);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        let (leaf, code, _) = https_get(m).await;
        assert_eq!(code, 200);
        if leaf == second {
            break;
        }
        assert_eq!(
            leaf, first,
            "only the old or the new certificate is ever served"
        );
        assert!(
            tokio::time::Instant::now() < deadline,
            "new certificate not picked up"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // A broken replacement is rejected; the current certificate stays.
    std::fs::write(dir.path().join("tls.crt"), "garbage").unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    let (leaf, code, _) = https_get(m).await;
    assert_eq!((leaf, code), (second, 200));
    p.shutdown.trigger();
    p.join().await;
}

#[tokio::test]
async fn self_signed_when_no_certificate_is_given() {
    let p = start(MetricsTls::default()).await;
    let (leaf, code, body) = https_get(p.metrics_addr.unwrap()).await;
    assert!(!leaf.is_empty());
    assert_eq!(code, 200);
    assert!(body.contains("epp_"));
    p.shutdown.trigger();
    p.join().await;
}

#[tokio::test]
async fn unreadable_certificate_files_fail_validation_before_binding() {
    let opts = RuntimeOptions {
        metrics_tls: Some(MetricsTls {
            cert_file: Some("/nonexistent/tls.crt".into()),
            key_file: Some("/nonexistent/tls.key".into()),
            ..Default::default()
        }),
        discovery: std::sync::Arc::new(StaticDiscovery {
            endpoints: vec!["127.0.0.1:9".into()],
            ..Default::default()
        }),
        ..Default::default()
    };
    let e = opts.validate().err().unwrap().to_string();
    assert!(
        e.contains("--metrics-cert-file /nonexistent/tls.crt"),
        "{e}"
    );
}

/// GET over plain HTTP: (status, body).
async fn plain_get_body(addr: SocketAddr, path: &str) -> (u16, String) {
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(format!("GET {path} HTTP/1.1\r\nhost: t\r\nconnection: close\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut buf = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut buf)).await;
    let text = String::from_utf8_lossy(&buf).to_string();
    let code = text[9..12].parse().unwrap();
    (code, text.split_once("\r\n\r\n").unwrap().1.to_string())
}

#[tokio::test]
async fn an_expired_certificate_is_exported_and_named_in_readyz() {
    let dir = tempfile::tempdir().unwrap();
    let mut params = rcgen::CertificateParams::new(vec!["localhost".to_string()]).unwrap();
    params.not_before = rcgen::date_time_ymd(2020, 1, 1);
    params.not_after = rcgen::date_time_ymd(2021, 1, 1);
    let key = rcgen::KeyPair::generate().unwrap();
    let cert = params.self_signed(&key).unwrap();
    std::fs::write(dir.path().join("tls.crt"), cert.pem()).unwrap();
    std::fs::write(dir.path().join("tls.key"), key.serialize_pem()).unwrap();
    let p = start(MetricsTls {
        cert_file: Some(dir.path().join("tls.crt")),
        key_file: Some(dir.path().join("tls.key")),
        reload_interval: Duration::from_millis(50),
    })
    .await;
    let (leaf, code, body) = https_get(p.metrics_addr.unwrap()).await;
    assert_eq!((leaf, code), (cert.der().to_vec(), 200));
    assert!(
        body.contains("epp_tls_certificate_valid{port=\"metrics\"} 0\n"),
        "{body}"
    );
    let expiry: i64 = body
        .lines()
        .find_map(|l| l.strip_prefix("epp_tls_certificate_expiry_seconds{port=\"metrics\"} "))
        .expect("expiry gauge")
        .parse()
        .unwrap();
    // notAfter 2021-01-01T00:00:00Z = 1609459200; the gauge is notAfter - now.
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    assert!((expiry - (1_609_459_200 - now)).abs() <= 5, "{expiry}");

    // Ready (once discovery has synced), with the problem in the detail.
    let health = p.health_addr.unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let (code, body) = loop {
        let r = plain_get_body(health, "/readyz").await;
        if r.0 == 200 || tokio::time::Instant::now() > deadline {
            break r;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(code, 200, "{body}");
    assert!(
        body.starts_with(
            "ok\nwarning: metrics TLS: certificate expired at Jan  1 00:00:00 2021 +00:00 ("
        ),
        "{body}"
    );

    // A valid replacement clears both.
    write_pair(dir.path(), "fresh.example");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        let (_, body) = plain_get_body(health, "/readyz").await;
        if body == "ok" {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "{body}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (_, _, body) = https_get(p.metrics_addr.unwrap()).await;
    assert!(
        body.contains("epp_tls_certificate_valid{port=\"metrics\"} 1\n"),
        "{body}"
    );
    p.shutdown.trigger();
    p.join().await;
}

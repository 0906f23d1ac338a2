//! `epp doctor` against a picker serving `/metrics` over HTTPS (`--metrics-tls`): the
//! http/https mismatch, an unknown issuer (self-signed), the wrong CA, a certificate for another
//! name, an expired certificate, `--insecure-skip-verify`, and a verified handshake.
//!
//! `cargo test -p epp --test doctor_tls`. Everything binds 127.0.0.1; no Prometheus needed.

#[path = "support/doctor.rs"]
mod support;

use std::path::{Path, PathBuf};

use support::*;

/// Starts a picker with `--metrics-tls` (and the given cert/key files), logging to
/// `<dir>/<name>.log`.
fn start_tls_picker(dir: &Path, name: &str, cert_key: Option<(&Path, &Path)>) -> Picker {
    let mut flags = vec!["--metrics-auth=none".to_string(), "--metrics-tls".into()];
    if let Some((cert, key)) = cert_key {
        flags.push(format!("--metrics-cert-file={}", cert.display()));
        flags.push(format!("--metrics-key-file={}", key.display()));
    }
    start_picker(dir.join(format!("{name}.log")), &flags)
}

/// A self-signed certificate for `names`, valid from `from` to `until` (years); writes
/// `<stem>.crt` and `<stem>.key`.
fn cert(dir: &Path, stem: &str, names: &[&str], from: i32, until: i32) -> (PathBuf, PathBuf) {
    let mut params =
        rcgen::CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>())
            .unwrap();
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, format!("doctor test {stem}"));
    params.not_before = rcgen::date_time_ymd(from, 1, 1);
    params.not_after = rcgen::date_time_ymd(until, 1, 1);
    let key = rcgen::KeyPair::generate().unwrap();
    let c = params.self_signed(&key).unwrap();
    let (crt, k) = (
        dir.join(format!("{stem}.crt")),
        dir.join(format!("{stem}.key")),
    );
    std::fs::write(&crt, c.pem()).unwrap();
    std::fs::write(&k, key.serialize_pem()).unwrap();
    (crt, k)
}

#[test]
fn self_signed_picker() {
    let dir = tempfile::tempdir().unwrap();
    let p = start_tls_picker(dir.path(), "self-signed", None);
    let m = p.metrics;

    // http:// against the HTTPS port
    let (code, out) = doctor(&[format!("--metrics-url=http://{m}/metrics")]);
    assert_eq!(code, 1, "{out}");
    let (line, fix) = line_and_next(&out, "✗ picker TLS:");
    assert!(
        line.contains("the server speaks HTTPS but the URL says http://"),
        "{line}"
    );
    assert!(fix.contains(&format!("use https://{m}/metrics")), "{fix}");

    // https:// without a CA: unknown issuer, and the fix names --ca-file
    let (code, out) = doctor(&[format!("--metrics-url=https://{m}/metrics")]);
    assert_eq!(code, 1, "{out}");
    let (line, fix) = line_and_next(&out, "✗ picker TLS:");
    assert!(
        line.contains("not signed by a trusted CA") && line.contains("UnknownIssuer"),
        "{line}"
    );
    assert!(
        fix.contains("--ca-file") && fix.contains("--insecure-skip-verify"),
        "{fix}"
    );

    // --insecure-skip-verify: a warning, and the rest of the checks pass
    let (code, out) = doctor(&[
        format!("--metrics-url=https://{m}/metrics"),
        "--insecure-skip-verify".into(),
    ]);
    assert_eq!(code, 0, "{out}");
    assert!(
        out.contains("! picker TLS: TLS 1.3 handshake done; certificate NOT verified (--insecure-skip-verify)"),
        "{out}"
    );
    assert!(out.contains("✓ picker exposition: parses:"), "{out}");
    assert!(!out.contains("✗"), "{out}");
}

#[test]
fn certificates_are_checked() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (good, good_key) = cert(d, "good", &["localhost", "127.0.0.1"], 2020, 2200);
    let (other, _) = cert(d, "other", &["localhost", "127.0.0.1"], 2020, 2200);
    let (ip_only, ip_only_key) = cert(d, "ip-only", &["127.0.0.1"], 2020, 2200);
    let (expired, expired_key) = cert(d, "expired", &["127.0.0.1"], 2020, 2021);

    let p = start_tls_picker(d, "good", Some((&good, &good_key)));
    let url = format!("--metrics-url=https://{}/metrics", p.metrics);
    // Verified against the right CA
    let (code, out) = doctor(&[url.clone(), format!("--ca-file={}", good.display())]);
    assert_eq!(code, 0, "{out}");
    assert!(
        out.contains(&format!(
            "✓ picker TLS: TLS 1.3; certificate verified against --ca-file {}\n",
            good.display()
        )),
        "{out}"
    );
    // The wrong CA
    let (code, out) = doctor(&[url.clone(), format!("--ca-file={}", other.display())]);
    assert_eq!(code, 1, "{out}");
    let (_, fix) = line_and_next(
        &out,
        "✗ picker TLS: the certificate is not signed by a trusted CA",
    );
    assert!(
        fix.contains(&format!(
            "the certificate is not signed by a CA in --ca-file {}",
            other.display()
        )),
        "{fix}"
    );
    drop(p);

    // A certificate that does not name the host in the URL
    let p = start_tls_picker(d, "ip-only", Some((&ip_only, &ip_only_key)));
    let (code, out) = doctor(&[
        format!(
            "--metrics-url=https://localhost:{}/metrics",
            p.metrics.port()
        ),
        format!("--ca-file={}", ip_only.display()),
    ]);
    assert_eq!(code, 1, "{out}");
    let (line, fix) = line_and_next(&out, "✗ picker TLS:");
    assert!(
        line.contains("the certificate does not name \"localhost\""),
        "{line}"
    );
    assert!(fix.contains("subjectAltNames"), "{fix}");
    drop(p);

    // An expired certificate
    let p = start_tls_picker(d, "expired", Some((&expired, &expired_key)));
    let (code, out) = doctor(&[
        format!("--metrics-url=https://{}/metrics", p.metrics),
        format!("--ca-file={}", expired.display()),
    ]);
    assert_eq!(code, 1, "{out}");
    let (line, fix) = line_and_next(&out, "✗ picker TLS:");
    assert!(
        line.contains("the server's certificate has expired"),
        "{line}"
    );
    assert!(fix.contains("renew the certificate"), "{fix}");

    // A CA file that is not PEM: a usage error
    let junk = d.join("junk.pem");
    std::fs::write(&junk, "not a certificate").unwrap();
    let (code, out) = doctor(&[url, format!("--ca-file={}", junk.display())]);
    assert_eq!(code, 2, "{out}");
    assert!(out.contains("holds no PEM certificate"), "{out}");
}

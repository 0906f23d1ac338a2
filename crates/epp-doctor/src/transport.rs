//! Turning a request's progress and failure into checklist lines: DNS, TCP connect, TLS and
//! HTTP, each with what went wrong and how to fix it.

use super::client::{
    rustls_error, Client, ConnectError, Endpoint, Failure, Progress, Response, Trust,
};
use super::report::Report;

/// Who we talked to: changes the wording of fixes.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Peer {
    Picker,
    Prometheus,
}

impl Peer {
    fn name(self) -> &'static str {
        match self {
            Peer::Picker => "picker",
            Peer::Prometheus => "Prometheus",
        }
    }
}

fn connect_fix(peer: Peer, ep: &Endpoint) -> String {
    match peer {
        Peer::Picker => format!(
            "check that the picker runs and serves /metrics on port {port}: its --metrics-bind-address \
             (default 0.0.0.0:9090) sets the port; 8080 is the probe port. In Kubernetes, check \
             `kubectl -n llm-d get endpoints llm-d-gaie-epp`, or port-forward and retry:\n\
             kubectl -n llm-d port-forward svc/llm-d-gaie-epp 9090:9090 & epp doctor --metrics-url http://127.0.0.1:9090/metrics",
            port = ep.port
        ),
        Peer::Prometheus => format!(
            "check that Prometheus runs and listens on port {port} (--web.listen-address, default 9090); \
             in Kubernetes port-forward its Service, e.g. \
             `kubectl -n llm-d-monitoring port-forward svc/kube-prometheus-stack-prometheus 9091:9090` \
             and use --prometheus-url http://127.0.0.1:9091",
            port = ep.port
        ),
    }
}

/// Reports the transport steps of a request. Returns the response when there is one.
pub async fn report_transport<'a>(
    r: &mut Report,
    peer: Peer,
    client: &Client,
    ep: &Endpoint,
    progress: &Progress,
    result: &'a Result<Response, Failure>,
    token_sent: bool,
) -> Option<&'a Response> {
    let p = peer.name();
    // DNS
    match result {
        Err(Failure::Dns(e)) => {
            r.fail(
                &format!("{p} DNS"),
                format!("cannot resolve {:?}: {e}", ep.host),
                "check the host name in the URL. In-cluster names (e.g. llm-d-gaie-epp.llm-d.svc) \
                 resolve only inside the cluster: run doctor in a pod, or use kubectl port-forward \
                 and a 127.0.0.1 URL",
            );
            return None;
        }
        _ => {
            let addrs: Vec<String> = progress
                .resolved
                .iter()
                .map(|a| a.ip().to_string())
                .collect();
            r.pass(
                &format!("{p} DNS"),
                format!("{} resolves to {}", ep.host, addrs.join(", ")),
            );
        }
    }
    // TCP
    match result {
        Err(Failure::Connect(errors)) => {
            let detail: Vec<String> = errors
                .iter()
                .map(|(a, e)| match e {
                    ConnectError::Timeout => format!(
                        "{a}: no answer within {:?} (packets dropped: firewall, NetworkPolicy or a wrong address)",
                        client.timeout
                    ),
                    ConnectError::Io(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => {
                        format!("{a}: connection refused (nothing listens on that port)")
                    }
                    ConnectError::Io(e) => format!("{a}: {e}"),
                })
                .collect();
            let mut fix = connect_fix(peer, ep);
            if errors
                .iter()
                .all(|(_, e)| matches!(e, ConnectError::Timeout))
            {
                fix.push_str(
                    "\nfor timeouts: check NetworkPolicies and firewalls between here and the port; \
                     raise --timeout if the network is slow",
                );
            }
            r.fail(&format!("{p} connect"), detail.join("; "), fix);
            return None;
        }
        _ => {
            if let Some(a) = progress.connected {
                r.pass(
                    &format!("{p} connect"),
                    format!("{a} accepts TCP connections"),
                );
            }
        }
    }
    // TLS
    if ep.https {
        match result {
            Err(Failure::Tls(e)) => {
                let (detail, fix) = explain_tls_error(e, client, ep);
                r.fail(&format!("{p} TLS"), detail, fix);
                return None;
            }
            _ => {
                let v = progress.tls.clone().unwrap_or_else(|| "TLS".into());
                match &client.trust {
                    Trust::Insecure => r.warn(
                        &format!("{p} TLS"),
                        format!(
                            "{v} handshake done; certificate NOT verified (--insecure-skip-verify)"
                        ),
                        "pass --ca-file with the CA that signed the certificate to verify it",
                    ),
                    Trust::CaFile(f) => r.pass(
                        &format!("{p} TLS"),
                        format!(
                            "{v}; certificate verified against --ca-file {}",
                            f.display()
                        ),
                    ),
                    Trust::System => r.pass(
                        &format!("{p} TLS"),
                        format!("{v}; certificate verified against the system's CAs"),
                    ),
                }
            }
        }
    } else {
        // http://: is the port actually HTTPS?
        let mismatch = match result {
            Ok(resp) => resp.status == 400 && resp.text().to_ascii_lowercase().contains("https"),
            Err(Failure::Http(_)) => speaks_tls(client, ep).await,
            Err(_) => false,
        };
        if mismatch {
            r.fail(
                &format!("{p} TLS"),
                "the server speaks HTTPS but the URL says http:// (a TLS handshake succeeds on that port)",
                format!(
                    "use https://{}{} (the picker serves HTTPS with --metrics-tls); add --ca-file with \
                     the CA of its certificate, or --insecure-skip-verify for a self-signed one",
                    ep.authority, ep.path
                ),
            );
            return None;
        }
        if token_sent && !ep.is_loopback() {
            r.warn(
                &format!("{p} TLS"),
                "plain HTTP: the bearer token crosses the network unencrypted",
                "serve /metrics over HTTPS (the picker's --metrics-tls) and use an https:// URL",
            );
        } else {
            r.pass(&format!("{p} TLS"), "not used (http://)");
        }
    }
    // HTTP
    match result {
        Ok(resp) => Some(resp),
        Err(Failure::Timeout) => {
            r.fail(
                &format!("{p} HTTP"),
                format!("connected, but no response within {:?}", client.timeout),
                format!(
                    "the {p} is overloaded or stuck, or the port belongs to something that does not speak HTTP; \
                     raise --timeout or check the {p}'s logs"
                ),
            );
            None
        }
        Err(Failure::Http(e)) => {
            r.fail(
                &format!("{p} HTTP"),
                format!("no valid HTTP response: {e}"),
                format!("check that {} is the {p}'s HTTP port", ep.host_port()),
            );
            None
        }
        Err(_) => None,
    }
}

/// Whether a TLS handshake (without verification) succeeds on the endpoint's port.
async fn speaks_tls(client: &Client, ep: &Endpoint) -> bool {
    let Ok(probe) = Client::new(Trust::Insecure, client.timeout) else {
        return false;
    };
    let mut tls_ep = ep.clone();
    tls_ep.https = true;
    let (progress, _) = probe.get(&tls_ep, None, None).await;
    progress.tls.is_some()
}

fn explain_tls_error(e: &std::io::Error, client: &Client, ep: &Endpoint) -> (String, String) {
    use rustls::CertificateError as C;
    let ca_hint = match &client.trust {
        Trust::CaFile(f) => format!(
            "the certificate is not signed by a CA in --ca-file {}: pass the CA that issued the picker's \
             certificate (e.g. ca.crt of its cert-manager Secret)",
            f.display()
        ),
        _ => "pass --ca-file with the CA that issued the certificate. A picker started with --metrics-tls and \
              no --metrics-cert-file uses a self-signed certificate: give it one with --metrics-cert-file/--metrics-key-file, \
              or check with --insecure-skip-verify (Prometheus: tls_config.insecure_skip_verify)"
            .to_string(),
    };
    let Some(re) = rustls_error(e) else {
        return (
            format!("TLS handshake failed: {e}"),
            "check that the port serves HTTPS (if it serves plain HTTP, use http://)".into(),
        );
    };
    match re {
        rustls::Error::InvalidMessage(_) | rustls::Error::InappropriateMessage { .. } => (
            format!("the server does not speak TLS ({re}); it probably serves plain HTTP"),
            format!("use http://{}{}", ep.authority, ep.path),
        ),
        rustls::Error::InvalidCertificate(c) => match c {
            C::Expired | C::ExpiredContext { .. } => (
                format!("the server's certificate has expired: {re}"),
                "renew the certificate (the picker re-reads --metrics-cert-file/--metrics-key-file when they change; \
                 with cert-manager check the Certificate's status)"
                    .into(),
            ),
            C::NotValidYet | C::NotValidYetContext { .. } => (
                format!("the server's certificate is not valid yet: {re}"),
                "check the clocks of this machine and of the issuer".into(),
            ),
            C::NotValidForName | C::NotValidForNameContext { .. } => (
                format!("the certificate does not name {:?}: {re}", ep.host),
                "connect with a host name the certificate lists (e.g. the Service DNS name llm-d-gaie-epp.llm-d.svc), \
                 or reissue the certificate with this name among its subjectAltNames"
                    .into(),
            ),
            C::UnknownIssuer => (
                format!("the certificate is not signed by a trusted CA: {re}"),
                ca_hint,
            ),
            C::BadSignature => (
                format!(
                    "the certificate is not signed by a trusted CA: its signature does not verify \
                     against the CA of the same name ({re})"
                ),
                ca_hint,
            ),
            _ => (format!("the certificate was rejected: {re}"), ca_hint),
        },
        rustls::Error::AlertReceived(a) => (
            format!("the server aborted the handshake with alert {a:?}"),
            "the server may require a client certificate or a TLS version/cipher this client lacks; check its TLS settings".into(),
        ),
        _ => (
            format!("TLS handshake failed: {re}"),
            "check that the port serves HTTPS (if it serves plain HTTP, use http://)".into(),
        ),
    }
}

/// The first 300 characters of a body, on one line.
pub fn snippet(text: &str) -> String {
    let one_line: String = text.split_whitespace().collect::<Vec<_>>().join(" ");
    if one_line.chars().count() > 300 {
        format!("{}...", one_line.chars().take(300).collect::<String>())
    } else {
        one_line
    }
}

//! A small HTTP(S) GET client that remembers how far it got (name resolved, TCP connected, TLS
//! established), so that a failure can be explained at the step where it happened.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::TokioIo;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;

/// A parsed `http(s)://host[:port]/path` URL.
#[derive(Clone, Debug)]
pub struct Endpoint {
    pub url: String,
    pub https: bool,
    /// Host without IPv6 brackets.
    pub host: String,
    pub port: u16,
    /// `host[:port]` as written (for the Host header).
    pub authority: String,
    /// Path and query, at least `/`.
    pub path: String,
}

impl Endpoint {
    pub fn parse(url: &str) -> Result<Self, String> {
        let uri: http::Uri = url
            .parse()
            .map_err(|e| format!("{url:?} is not a URL: {e}"))?;
        let https = match uri.scheme_str() {
            Some("http") => false,
            Some("https") => true,
            Some(other) => return Err(format!("{url:?}: scheme {other:?} is not http or https")),
            None => {
                return Err(format!(
                    "{url:?} has no scheme (write http://... or https://...)"
                ))
            }
        };
        let authority = uri
            .authority()
            .ok_or_else(|| format!("{url:?} has no host"))?;
        let host = authority
            .host()
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_string();
        let port = authority.port_u16().unwrap_or(if https { 443 } else { 80 });
        let path = uri
            .path_and_query()
            .map(|p| p.as_str().to_string())
            .filter(|p| !p.is_empty())
            .unwrap_or_else(|| "/".to_string());
        Ok(Self {
            url: url.to_string(),
            https,
            host,
            port,
            authority: authority.as_str().to_string(),
            path,
        })
    }

    /// `host:port`.
    pub fn host_port(&self) -> String {
        if self.host.contains(':') {
            format!("[{}]:{}", self.host, self.port)
        } else {
            format!("{}:{}", self.host, self.port)
        }
    }

    pub fn is_loopback(&self) -> bool {
        self.host == "localhost"
            || self
                .host
                .parse::<std::net::IpAddr>()
                .is_ok_and(|ip| ip.is_loopback())
    }
}

/// How far a request got.
#[derive(Clone, Debug, Default)]
pub struct Progress {
    pub resolved: Vec<SocketAddr>,
    pub connected: Option<SocketAddr>,
    /// TLS version once the handshake completed.
    pub tls: Option<String>,
}

/// Where and why a request failed.
#[derive(Debug)]
pub enum Failure {
    Dns(String),
    /// Every resolved address failed; one entry per address.
    Connect(Vec<(SocketAddr, ConnectError)>),
    Tls(std::io::Error),
    Http(hyper::Error),
    /// No response (or body) within the timeout after connecting.
    Timeout,
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Failure::Dns(e) => write!(f, "cannot resolve the host: {e}"),
            Failure::Connect(errors) => {
                let parts: Vec<String> = errors
                    .iter()
                    .map(|(a, e)| match e {
                        ConnectError::Timeout => format!("{a}: connect timed out"),
                        ConnectError::Io(e) => format!("{a}: {e}"),
                    })
                    .collect();
                write!(f, "cannot connect: {}", parts.join("; "))
            }
            Failure::Tls(e) => write!(f, "TLS handshake failed: {e}"),
            Failure::Http(e) => write!(f, "no valid HTTP response: {e}"),
            Failure::Timeout => f.write_str("no response in time"),
        }
    }
}

#[derive(Debug)]
pub enum ConnectError {
    Timeout,
    Io(std::io::Error),
}

pub struct Response {
    pub status: u16,
    pub headers: http::HeaderMap,
    pub body: Bytes,
}

impl Response {
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    pub fn content_type(&self) -> Option<String> {
        self.headers
            .get(http::header::CONTENT_TYPE)
            .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
    }
}

/// How server certificates are checked.
#[derive(Clone, Debug)]
pub enum Trust {
    /// The system's CA certificates.
    System,
    /// Only the CAs in this PEM file.
    CaFile(PathBuf),
    /// No verification at all.
    Insecure,
}

trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

#[derive(Clone)]
pub struct Client {
    tls: Arc<rustls::ClientConfig>,
    pub trust: Trust,
    pub timeout: Duration,
}

use epp_core::tls::client::{provider, NoVerify};

/// Reads the CA certificates of a PEM file.
pub fn read_ca_file(path: &Path) -> Result<Vec<CertificateDer<'static>>, String> {
    let certs: Vec<_> = CertificateDer::pem_file_iter(path)
        .map_err(|e| format!("--ca-file {}: cannot read: {e}", path.display()))?
        .collect::<Result<_, _>>()
        .map_err(|e| {
            format!(
                "--ca-file {}: not a PEM certificate file: {e}",
                path.display()
            )
        })?;
    if certs.is_empty() {
        return Err(format!(
            "--ca-file {}: holds no PEM certificate (-----BEGIN CERTIFICATE-----)",
            path.display()
        ));
    }
    Ok(certs)
}

impl Client {
    pub fn new(trust: Trust, timeout: Duration) -> Result<Self, String> {
        let builder = rustls::ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(|e| format!("TLS setup: {e}"))?;
        let config = match &trust {
            Trust::Insecure => builder
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(NoVerify(provider())))
                .with_no_client_auth(),
            Trust::CaFile(path) => {
                let mut roots = rustls::RootCertStore::empty();
                for c in read_ca_file(path)? {
                    roots
                        .add(c)
                        .map_err(|e| format!("--ca-file {}: {e}", path.display()))?;
                }
                builder.with_root_certificates(roots).with_no_client_auth()
            }
            Trust::System => {
                let mut roots = rustls::RootCertStore::empty();
                let native = rustls_native_certs::load_native_certs();
                roots.add_parsable_certificates(native.certs);
                builder.with_root_certificates(roots).with_no_client_auth()
            }
        };
        Ok(Self {
            tls: Arc::new(config),
            trust,
            timeout,
        })
    }

    /// `GET path` on `ep` (the endpoint's own path when `path` is `None`).
    pub async fn get(
        &self,
        ep: &Endpoint,
        path: Option<&str>,
        bearer: Option<&str>,
    ) -> (Progress, Result<Response, Failure>) {
        let mut progress = Progress::default();
        let result = self.get_inner(ep, path, bearer, &mut progress).await;
        (progress, result)
    }

    async fn get_inner(
        &self,
        ep: &Endpoint,
        path: Option<&str>,
        bearer: Option<&str>,
        progress: &mut Progress,
    ) -> Result<Response, Failure> {
        let t = self.timeout;
        let addrs: Vec<SocketAddr> =
            match tokio::time::timeout(t, tokio::net::lookup_host((ep.host.as_str(), ep.port)))
                .await
            {
                Err(_) => return Err(Failure::Dns(format!("no answer within {t:?}"))),
                Ok(Err(e)) => return Err(Failure::Dns(e.to_string())),
                Ok(Ok(a)) => a.collect(),
            };
        if addrs.is_empty() {
            return Err(Failure::Dns("the name has no address".into()));
        }
        progress.resolved = addrs.clone();
        let mut errors = Vec::new();
        let mut tcp = None;
        for a in &addrs {
            match tokio::time::timeout(t, TcpStream::connect(a)).await {
                Ok(Ok(s)) => {
                    tcp = Some(s);
                    progress.connected = Some(*a);
                    break;
                }
                Ok(Err(e)) => errors.push((*a, ConnectError::Io(e))),
                Err(_) => errors.push((*a, ConnectError::Timeout)),
            }
        }
        let Some(tcp) = tcp else {
            return Err(Failure::Connect(errors));
        };
        let _ = tcp.set_nodelay(true);
        let io: Box<dyn Io> = if ep.https {
            let name = ServerName::try_from(ep.host.clone()).map_err(|e| {
                Failure::Tls(std::io::Error::new(
                    std::io::ErrorKind::InvalidInput,
                    format!("{:?} is not a valid TLS server name: {e}", ep.host),
                ))
            })?;
            let connector = tokio_rustls::TlsConnector::from(self.tls.clone());
            let stream = match tokio::time::timeout(t, connector.connect(name, tcp)).await {
                Err(_) => {
                    return Err(Failure::Tls(std::io::Error::new(
                        std::io::ErrorKind::TimedOut,
                        format!("no TLS handshake within {t:?}"),
                    )))
                }
                Ok(Err(e)) => return Err(Failure::Tls(e)),
                Ok(Ok(s)) => s,
            };
            progress.tls = Some(
                stream
                    .get_ref()
                    .1
                    .protocol_version()
                    .map(|v| format!("{v:?}").replace("TLSv1_", "TLS 1."))
                    .unwrap_or_else(|| "TLS".into()),
            );
            Box::new(stream)
        } else {
            Box::new(tcp)
        };
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(io))
            .await
            .map_err(Failure::Http)?;
        let conn = tokio::spawn(conn);
        let mut req = http::Request::get(path.unwrap_or(&ep.path))
            .header(http::header::HOST, &ep.authority)
            .header(
                http::header::USER_AGENT,
                concat!("epp-doctor/", env!("CARGO_PKG_VERSION")),
            )
            .header(
                http::header::ACCEPT,
                "text/plain;version=0.0.4;q=0.9,application/json;q=0.8,*/*;q=0.1",
            );
        if let Some(tok) = bearer {
            req = req.header(http::header::AUTHORIZATION, format!("Bearer {tok}"));
        }
        let req = req
            .body(Empty::<Bytes>::new())
            .map_err(|e| Failure::Tls(std::io::Error::new(std::io::ErrorKind::InvalidInput, e)))?;
        let result = async {
            let resp = sender.send_request(req).await.map_err(Failure::Http)?;
            let (parts, body) = resp.into_parts();
            let body = body.collect().await.map_err(Failure::Http)?.to_bytes();
            Ok(Response {
                status: parts.status.as_u16(),
                headers: parts.headers,
                body,
            })
        };
        let out = match tokio::time::timeout(t, result).await {
            Err(_) => Err(Failure::Timeout),
            Ok(r) => r,
        };
        conn.abort();
        out
    }
}

/// The rustls error inside an I/O error from a TLS handshake, if any.
pub fn rustls_error(e: &std::io::Error) -> Option<&rustls::Error> {
    e.get_ref().and_then(|i| i.downcast_ref::<rustls::Error>())
}

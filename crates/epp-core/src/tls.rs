//! TLS for the picker's ports, one implementation for both: HTTPS on the metrics port
//! (`--metrics-tls`: a bearer token should not cross the network in clear text) and TLS on the
//! ext_proc gRPC port (`epp serve --secure-serving`). What differs between the two is a
//! [`TlsPort`]: the flags named in errors, the ALPN list and the log prefix.
//!
//! The certificate comes from PEM files (`--metrics-cert-file`/`--metrics-key-file`, or
//! `--cert-path`/`--key-path`), checked every [`TlsSettings::reload_interval`] (10 s) and swapped
//! for new connections when their contents change and parse (e.g. a cert-manager Secret
//! rotation; a broken or half-written pair is refused and the old certificate kept), or, when
//! none is given, is a self-signed one made at start-up. Probe ports are never TLS.
//!
//! The served certificate's validity period is checked at load and on every reload: an expired
//! or not-yet-valid certificate is still served (refusing it would only turn a warning into an
//! outage of the metrics port) but logged as a warning, exported as
//! `epp_tls_certificate_expiry_seconds{port}` / `epp_tls_certificate_valid{port}` and named in
//! `/readyz`'s detail, through the port's shared [`CertStatus`].
//!
//! Handshakes run in their own tasks (bounded to 10 s), so one slow client cannot hold up the
//! others; finished connections come out of one accept loop as a [`TlsListener`], which is an
//! `axum::serve::Listener` (metrics) and, through [`TlsListener::into_incoming`], a tonic
//! incoming stream of [`TlsConn`] (gRPC). tonic itself then needs no TLS feature.

pub mod client;

use std::io;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use arc_swap::{ArcSwap, ArcSwapOption};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::server::TlsStream;
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::{Stream, StreamExt};

use crate::telemetry::Shutdown;

/// How long a TLS handshake may take before the connection is dropped.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// What makes one TLS port different from another: the flags its errors name, the application
/// protocols it offers, and the prefix of its log lines.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TlsPort {
    /// Log prefix, e.g. `metrics TLS`.
    pub label: &'static str,
    /// The `port` label of the certificate metrics, e.g. `metrics`.
    pub name: &'static str,
    /// The flag that names the certificate file.
    pub cert_flag: &'static str,
    /// The flag that names the key file.
    pub key_flag: &'static str,
    /// ALPN protocols, most preferred first.
    pub alpn: &'static [&'static [u8]],
}

impl TlsPort {
    /// The metrics port (`--metrics-tls`): HTTP/2 or HTTP/1.1.
    pub const METRICS: TlsPort = TlsPort {
        label: "metrics TLS",
        name: "metrics",
        cert_flag: "--metrics-cert-file",
        key_flag: "--metrics-key-file",
        alpn: &[b"h2", b"http/1.1"],
    };
    /// The ext_proc gRPC port (`epp serve --secure-serving`): gRPC is HTTP/2 only.
    pub const GRPC: TlsPort = TlsPort {
        label: "gRPC TLS",
        name: "grpc",
        cert_flag: "--cert-path",
        key_flag: "--key-path",
        alpn: &[b"h2"],
    };
}

/// TLS settings for one port.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TlsSettings {
    /// PEM certificate chain; with `key_file`. Neither: a self-signed certificate.
    pub cert_file: Option<PathBuf>,
    /// PEM private key (PKCS#8, PKCS#1 or SEC1).
    pub key_file: Option<PathBuf>,
    /// How often the files are checked for new contents (zero: never; loaded once).
    pub reload_interval: Duration,
}

/// The metrics port's settings (`--metrics-tls`, `--metrics-cert-file`, `--metrics-key-file`).
pub type MetricsTls = TlsSettings;

impl Default for TlsSettings {
    fn default() -> Self {
        Self {
            cert_file: None,
            key_file: None,
            reload_interval: Duration::from_secs(10),
        }
    }
}

/// Why TLS could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("{cert_flag} and {key_flag} must be given together (or neither, for a self-signed certificate)")]
    HalfPair {
        cert_flag: &'static str,
        key_flag: &'static str,
    },
    // `error`, not `source`: the message already says it, so `{:#}` must not repeat it.
    #[error("{flag} {path}: cannot read: {error}")]
    Read {
        flag: &'static str,
        path: PathBuf,
        error: std::io::Error,
    },
    #[error("{flag} {path}: {message}")]
    Parse {
        flag: &'static str,
        path: PathBuf,
        message: String,
    },
    #[error("the certificate and the key do not belong together: {0}")]
    Mismatch(String),
    #[error("cannot create a self-signed certificate: {0}")]
    SelfSigned(String),
    #[error("TLS configuration: {0}")]
    Config(String),
}

use client::provider;

fn read(flag: &'static str, path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|error| TlsError::Read {
        flag,
        path: path.to_path_buf(),
        error,
    })
}

/// Build a certified key from PEM bytes; errors name `port`'s flag and the file.
pub fn certified_key_from_pem(
    port: &TlsPort,
    cert_pem: &[u8],
    key_pem: &[u8],
    cert_path: &Path,
    key_path: &Path,
) -> Result<CertifiedKey, TlsError> {
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(cert_pem)
        .collect::<Result<_, _>>()
        .map_err(|e| TlsError::Parse {
            flag: port.cert_flag,
            path: cert_path.to_path_buf(),
            message: format!("not a PEM certificate chain: {e}"),
        })?;
    if chain.is_empty() {
        return Err(TlsError::Parse {
            flag: port.cert_flag,
            path: cert_path.to_path_buf(),
            message: "no CERTIFICATE block found".into(),
        });
    }
    let key = PrivateKeyDer::from_pem_slice(key_pem).map_err(|e| TlsError::Parse {
        flag: port.key_flag,
        path: key_path.to_path_buf(),
        message: format!("no usable PEM private key: {e}"),
    })?;
    let signing = provider()
        .key_provider
        .load_private_key(key)
        .map_err(|e| TlsError::Parse {
            flag: port.key_flag,
            path: key_path.to_path_buf(),
            message: format!("unsupported private key: {e}"),
        })?;
    let ck = CertifiedKey::new(chain, signing);
    ck.keys_match()
        .map_err(|e| TlsError::Mismatch(e.to_string()))?;
    Ok(ck)
}

/// A self-signed certificate for `localhost`, the host name and the given names.
pub fn self_signed(extra_names: &[String]) -> Result<CertifiedKey, TlsError> {
    let mut names = vec!["localhost".to_string(), "127.0.0.1".to_string()];
    if let Ok(h) = std::env::var("HOSTNAME") {
        if !h.is_empty() {
            names.push(h);
        }
    }
    names.extend(extra_names.iter().cloned());
    names.dedup();
    let ck = rcgen::generate_simple_self_signed(names)
        .map_err(|e| TlsError::SelfSigned(e.to_string()))?;
    let key = PrivateKeyDer::Pkcs8(ck.signing_key.serialize_der().into());
    let signing = provider()
        .key_provider
        .load_private_key(key)
        .map_err(|e| TlsError::SelfSigned(e.to_string()))?;
    Ok(CertifiedKey::new(vec![ck.cert.der().clone()], signing))
}

/// The validity period of a certificate, in seconds since the Unix epoch.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Validity {
    pub not_before: i64,
    pub not_after: i64,
}

fn unix_now() -> i64 {
    match SystemTime::now().duration_since(UNIX_EPOCH) {
        Ok(d) => i64::try_from(d.as_secs()).unwrap_or(i64::MAX),
        Err(e) => -i64::try_from(e.duration().as_secs()).unwrap_or(i64::MAX),
    }
}

fn utc(t: i64) -> String {
    x509_parser::time::ASN1Time::from_timestamp(t)
        .map(|a| a.to_string())
        .unwrap_or_else(|_| format!("{t} s after the Unix epoch"))
}

impl Validity {
    /// The validity of a DER certificate, or `None` when it does not parse as X.509.
    pub fn of_der(der: &[u8]) -> Option<Self> {
        let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
        let v = cert.validity();
        Some(Self {
            not_before: v.not_before.timestamp(),
            not_after: v.not_after.timestamp(),
        })
    }

    /// Seconds from `now` until notAfter; negative once expired.
    pub fn expiry_seconds_at(&self, now: i64) -> i64 {
        self.not_after.saturating_sub(now)
    }

    /// What is wrong at `now` (`None` while valid), for logs and `/readyz`.
    pub fn problem_at(&self, now: i64) -> Option<String> {
        if now > self.not_after {
            Some(format!(
                "certificate expired at {} ({} s ago)",
                utc(self.not_after),
                now.saturating_sub(self.not_after)
            ))
        } else if now < self.not_before {
            Some(format!(
                "certificate is not valid before {} ({} s from now)",
                utc(self.not_before),
                self.not_before.saturating_sub(now)
            ))
        } else {
            None
        }
    }
}

/// The validity of the certificate one port serves, shared with the metrics collector and the
/// readiness detail; updated on every (re)load.
#[derive(Debug)]
pub struct CertStatus {
    port: TlsPort,
    validity: ArcSwapOption<Validity>,
}

impl CertStatus {
    fn new(port: TlsPort) -> Arc<Self> {
        Arc::new(Self {
            port,
            validity: ArcSwapOption::empty(),
        })
    }

    /// The `port` label (`metrics`, `grpc`).
    pub fn port_name(&self) -> &'static str {
        self.port.name
    }

    /// Validity of the certificate now served (`None` if it could not be read as X.509).
    pub fn validity(&self) -> Option<Validity> {
        self.validity.load().as_deref().copied()
    }

    /// Seconds until the served certificate's notAfter (negative once expired).
    pub fn expiry_seconds(&self) -> Option<i64> {
        self.validity().map(|v| v.expiry_seconds_at(unix_now()))
    }

    /// Whether the served certificate is within its validity period now.
    pub fn is_valid(&self) -> Option<bool> {
        self.validity().map(|v| v.problem_at(unix_now()).is_none())
    }

    /// A sentence naming the port's problem, e.g. for `/readyz`; `None` while valid.
    pub fn problem(&self) -> Option<String> {
        let p = self.validity()?.problem_at(unix_now())?;
        Some(format!("{}: {p}", self.port.label))
    }

    /// Record the leaf certificate just loaded; warn when it is not valid now.
    fn observe(&self, leaf_der: &[u8], source: &str) {
        let v = Validity::of_der(leaf_der);
        self.validity.store(v.map(Arc::new));
        let label = self.port.label;
        match v.and_then(|v| v.problem_at(unix_now())) {
            Some(p) => tracing::warn!(
                certificate = source,
                "{label}: {p}; serving it anyway, replace it"
            ),
            None if v.is_none() => tracing::warn!(
                certificate = source,
                "{label}: cannot read the certificate's validity period"
            ),
            None => {}
        }
    }
}

/// The certificate currently served; swapped atomically on reload.
#[derive(Debug)]
pub struct CertStore {
    current: ArcSwap<CertifiedKey>,
}

impl ResolvesServerCert for CertStore {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current.load_full())
    }
}

impl CertStore {
    pub fn new(key: CertifiedKey) -> Arc<Self> {
        Arc::new(Self {
            current: ArcSwap::from_pointee(key),
        })
    }
    pub fn set(&self, key: CertifiedKey) {
        self.current.store(Arc::new(key));
    }
    /// DER of the leaf certificate now served.
    pub fn leaf_der(&self) -> Vec<u8> {
        self.current
            .load()
            .cert
            .first()
            .map(|c| c.to_vec())
            .unwrap_or_default()
    }
}

/// A ready TLS acceptor plus what keeps it current.
pub struct TlsSetup {
    pub store: Arc<CertStore>,
    pub acceptor: tokio_rustls::TlsAcceptor,
    status: Arc<CertStatus>,
    port: TlsPort,
    files: Option<(PathBuf, PathBuf)>,
    reload_interval: Duration,
    /// Contents last loaded, to notice changes.
    last: Option<(Vec<u8>, Vec<u8>)>,
}

impl std::fmt::Debug for TlsSetup {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsSetup")
            .field("port", &self.port.label)
            .field("files", &self.files)
            .finish_non_exhaustive()
    }
}

impl TlsSettings {
    /// Load (or generate) the certificate and build the acceptor for `port`; errors name
    /// `port`'s flags and the file.
    pub fn setup(&self, port: TlsPort) -> Result<TlsSetup, TlsError> {
        let (key, files, last) = match (&self.cert_file, &self.key_file) {
            (Some(c), Some(k)) => {
                let (cb, kb) = (read(port.cert_flag, c)?, read(port.key_flag, k)?);
                let key = certified_key_from_pem(&port, &cb, &kb, c, k)?;
                (key, Some((c.clone(), k.clone())), Some((cb, kb)))
            }
            (None, None) => (self_signed(&[])?, None, None),
            _ => {
                return Err(TlsError::HalfPair {
                    cert_flag: port.cert_flag,
                    key_flag: port.key_flag,
                })
            }
        };
        let store = CertStore::new(key);
        let status = CertStatus::new(port);
        status.observe(&store.leaf_der(), &describe_files(files.as_ref()));
        let mut cfg = rustls::ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(|e| TlsError::Config(e.to_string()))?
            .with_no_client_auth()
            .with_cert_resolver(store.clone());
        cfg.alpn_protocols = port.alpn.iter().map(|p| p.to_vec()).collect();
        Ok(TlsSetup {
            store,
            acceptor: tokio_rustls::TlsAcceptor::from(Arc::new(cfg)),
            status,
            port,
            files,
            reload_interval: self.reload_interval,
            last,
        })
    }
}

fn describe_files(files: Option<&(PathBuf, PathBuf)>) -> String {
    files
        .map(|(c, _)| c.display().to_string())
        .unwrap_or_else(|| "self-signed".into())
}

impl TlsSetup {
    /// The served certificate's validity, kept current across reloads.
    pub fn status(&self) -> Arc<CertStatus> {
        self.status.clone()
    }

    /// Whether the certificate comes from files (else it is self-signed).
    pub fn from_files(&self) -> bool {
        self.files.is_some()
    }

    /// The port this set-up serves.
    pub fn port(&self) -> &TlsPort {
        &self.port
    }

    /// For the start-up log line: where the certificate comes from.
    pub fn describe(&self) -> &'static str {
        if self.from_files() {
            "from files (reloaded on change)"
        } else {
            "self-signed"
        }
    }

    /// Re-read the files once; swap the certificate when they changed and parse.
    /// Returns whether a new certificate is now served.
    pub fn reload_once(&mut self) -> bool {
        let label = self.port.label;
        let Some((c, k)) = self.files.clone() else {
            return false;
        };
        let (Ok(cb), Ok(kb)) = (std::fs::read(&c), std::fs::read(&k)) else {
            tracing::warn!(cert = %c.display(), key = %k.display(),
                "{label}: cannot read the certificate files; keeping the current certificate");
            return false;
        };
        if self.last.as_ref() == Some(&(cb.clone(), kb.clone())) {
            return false;
        }
        match certified_key_from_pem(&self.port, &cb, &kb, &c, &k) {
            Ok(key) => {
                self.store.set(key);
                self.last = Some((cb, kb));
                tracing::info!(cert = %c.display(), "{label}: certificate reloaded");
                self.status
                    .observe(&self.store.leaf_der(), &c.display().to_string());
                true
            }
            Err(e) => {
                // A rotation writes two files; a half-written pair fails here and is
                // retried on the next tick.
                tracing::warn!(error = %e, "{label}: new certificate files rejected; keeping the current certificate");
                false
            }
        }
    }

    /// Accept TLS connections on `listener` until `shutdown` (or until the returned listener
    /// is dropped), reloading the certificate files. This is the one accept loop of both
    /// ports: handshakes in their own tasks, bounded to 10 s, failures logged at debug and
    /// never stopping the loop; TCP_NODELAY on every connection.
    pub fn serve_listener(mut self, listener: TcpListener, shutdown: Shutdown) -> TlsListener {
        let local = listener.local_addr().ok();
        let (tx, rx) = tokio::sync::mpsc::channel(64);
        let acceptor = self.acceptor.clone();
        let label = self.port.label;
        let sd = shutdown.clone();
        tokio::spawn(async move {
            let stop = sd.wait();
            tokio::pin!(stop);
            loop {
                let (tcp, peer) = tokio::select! {
                    _ = &mut stop => return,
                    _ = tx.closed() => return,
                    r = listener.accept() => match r {
                        Ok(x) => x,
                        Err(e) => {
                            tracing::warn!(error = %e, "{label}: accepting a connection failed");
                            tokio::time::sleep(Duration::from_millis(50)).await;
                            continue;
                        }
                    },
                };
                let _ = tcp.set_nodelay(true);
                let acceptor = acceptor.clone();
                let tx = tx.clone();
                tokio::spawn(async move {
                    match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                        Ok(Ok(tls)) => {
                            let _ = tx.send((tls, peer)).await;
                        }
                        Ok(Err(e)) => {
                            tracing::debug!(peer = %peer, error = %e, "{label}: handshake failed (plain text sent to the TLS port?)")
                        }
                        Err(_) => tracing::debug!(peer = %peer, "{label}: handshake timed out"),
                    }
                });
            }
        });
        // A zero interval: loaded once, never re-read.
        if self.files.is_some() && !self.reload_interval.is_zero() {
            let every = self.reload_interval.max(Duration::from_millis(10));
            tokio::spawn(async move {
                let stop = shutdown.wait();
                tokio::pin!(stop);
                let mut iv = tokio::time::interval(every);
                iv.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                loop {
                    tokio::select! {
                        _ = &mut stop => return,
                        _ = iv.tick() => { self.reload_once(); }
                    }
                }
            });
        }
        TlsListener { rx, local }
    }
}

/// Finished TLS connections: an `axum::serve::Listener`, or a tonic incoming stream through
/// [`TlsListener::into_incoming`].
pub struct TlsListener {
    rx: tokio::sync::mpsc::Receiver<(TlsStream<TcpStream>, SocketAddr)>,
    local: Option<SocketAddr>,
}

impl TlsListener {
    /// The same connections for tonic (`Server::serve_with_incoming_shutdown`). The stream
    /// ends when the accept loop does (shutdown).
    pub fn into_incoming(self) -> impl Stream<Item = Result<TlsConn, io::Error>> + Send {
        let local = self.local;
        ReceiverStream::new(self.rx).map(move |(stream, peer)| {
            Ok(TlsConn {
                stream,
                info: tonic::transport::server::TcpConnectInfo {
                    local_addr: local,
                    remote_addr: Some(peer),
                },
            })
        })
    }
}

impl axum::serve::Listener for TlsListener {
    type Io = TlsStream<TcpStream>;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        match self.rx.recv().await {
            Some(c) => c,
            // The accept task ended (shutdown): the server's graceful shutdown finishes it.
            None => std::future::pending().await,
        }
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        self.local
            .ok_or_else(|| std::io::Error::other("TLS listener has no local address"))
    }
}

/// One TLS-terminated connection, as tonic's server wants it. A newtype only because tonic's
/// `Connected` is implemented for rustls streams only with tonic's own TLS feature, which this
/// crate does not use; it reports the same `TcpConnectInfo` as a plaintext connection, so
/// `Request::remote_addr` works either way.
#[derive(Debug)]
pub struct TlsConn {
    stream: TlsStream<TcpStream>,
    info: tonic::transport::server::TcpConnectInfo,
}

impl tonic::transport::server::Connected for TlsConn {
    type ConnectInfo = tonic::transport::server::TcpConnectInfo;
    fn connect_info(&self) -> Self::ConnectInfo {
        self.info.clone()
    }
}

impl AsyncRead for TlsConn {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for TlsConn {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn half_pair_and_garbage_are_errors_naming_the_flag() {
        let t = MetricsTls {
            cert_file: Some("/nonexistent.crt".into()),
            ..Default::default()
        };
        let e = t.setup(TlsPort::METRICS).unwrap_err();
        assert!(matches!(e, TlsError::HalfPair { .. }));
        assert_eq!(
            e.to_string(),
            "--metrics-cert-file and --metrics-key-file must be given together (or neither, for a self-signed certificate)"
        );
        let e = t.setup(TlsPort::GRPC).unwrap_err().to_string();
        assert!(e.starts_with("--cert-path and --key-path must"), "{e}");
        let dir = tempfile::tempdir().unwrap();
        let c = dir.path().join("tls.crt");
        let k = dir.path().join("tls.key");
        std::fs::write(&c, "not pem").unwrap();
        std::fs::write(&k, "not pem").unwrap();
        let t = MetricsTls {
            cert_file: Some(c.clone()),
            key_file: Some(k.clone()),
            ..Default::default()
        };
        let e = t.setup(TlsPort::METRICS).unwrap_err().to_string();
        assert!(e.contains("--metrics-cert-file"), "{e}");
        let e = t.setup(TlsPort::GRPC).unwrap_err().to_string();
        assert!(
            e.starts_with(&format!("--cert-path {}", c.display())),
            "{e}"
        );
        // A valid pair loads; a key of another pair is a mismatch.
        let a = rcgen::generate_simple_self_signed(vec!["a".to_string()]).unwrap();
        let b = rcgen::generate_simple_self_signed(vec!["b".to_string()]).unwrap();
        std::fs::write(&c, a.cert.pem()).unwrap();
        std::fs::write(&k, "not pem").unwrap();
        let e = t.setup(TlsPort::GRPC).unwrap_err().to_string();
        assert!(e.starts_with(&format!("--key-path {}", k.display())), "{e}");
        std::fs::write(&k, a.signing_key.serialize_pem()).unwrap();
        assert!(t.setup(TlsPort::METRICS).is_ok());
        std::fs::write(&k, b.signing_key.serialize_pem()).unwrap();
        assert!(matches!(
            t.setup(TlsPort::METRICS),
            Err(TlsError::Mismatch(_))
        ));
        let e = TlsSettings {
            cert_file: Some("/nonexistent/c.pem".into()),
            key_file: Some("/nonexistent/k.pem".into()),
            ..Default::default()
        }
        .setup(TlsPort::GRPC)
        .unwrap_err()
        .to_string();
        assert!(
            e.starts_with("--cert-path /nonexistent/c.pem: cannot read"),
            "{e}"
        );
    }

    #[test]
    fn self_signed_when_no_files() {
        let s = MetricsTls::default().setup(TlsPort::METRICS).unwrap();
        assert!(!s.from_files());
        assert!(!s.store.leaf_der().is_empty());
    }

    #[test]
    fn alpn_follows_the_port() {
        let alpn = |p| {
            let s = TlsSettings::default().setup(p).unwrap();
            s.acceptor.config().alpn_protocols.clone()
        };
        assert_eq!(
            alpn(TlsPort::METRICS),
            vec![b"h2".to_vec(), b"http/1.1".to_vec()]
        );
        assert_eq!(alpn(TlsPort::GRPC), vec![b"h2".to_vec()]);
    }

    /// A self-signed pair valid from `from` to `until` (years), as PEM.
    fn pair_valid(from: i32, until: i32) -> (String, String) {
        let mut p = rcgen::CertificateParams::new(vec!["localhost".to_string()]).unwrap();
        p.not_before = rcgen::date_time_ymd(from, 1, 1);
        p.not_after = rcgen::date_time_ymd(until, 1, 1);
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = p.self_signed(&key).unwrap();
        (cert.pem(), key.serialize_pem())
    }

    // 2000-01-01 and 2001-01-01 UTC.
    const Y2000: i64 = 946_684_800;
    const Y2001: i64 = 978_307_200;

    #[test]
    fn validity_is_read_and_judged() {
        let (c, _) = pair_valid(2000, 2001);
        let der = CertificateDer::from_pem_slice(c.as_bytes()).unwrap();
        let v = Validity::of_der(&der).unwrap();
        assert_eq!(
            v,
            Validity {
                not_before: Y2000,
                not_after: Y2001
            }
        );
        assert_eq!(v.problem_at(Y2000 + 10), None);
        assert_eq!(v.expiry_seconds_at(Y2001 + 60), -60);
        assert_eq!(
            v.problem_at(Y2001 + 60).unwrap(),
            "certificate expired at Jan  1 00:00:00 2001 +00:00 (60 s ago)"
        );
        assert_eq!(
            v.problem_at(Y2000 - 5).unwrap(),
            "certificate is not valid before Jan  1 00:00:00 2000 +00:00 (5 s from now)"
        );
        assert_eq!(Validity::of_der(b"not der"), None);
    }

    #[test]
    fn expired_and_future_certificates_are_reported_and_still_served() {
        let dir = tempfile::tempdir().unwrap();
        let (c, k) = (dir.path().join("tls.crt"), dir.path().join("tls.key"));
        let (cp, kp) = pair_valid(2000, 2001);
        std::fs::write(&c, cp).unwrap();
        std::fs::write(&k, kp).unwrap();
        let mut s = TlsSettings {
            cert_file: Some(c.clone()),
            key_file: Some(k.clone()),
            ..Default::default()
        }
        .setup(TlsPort::METRICS)
        .expect("an expired certificate still loads");
        let st = s.status();
        assert_eq!(st.port_name(), "metrics");
        assert_eq!(st.is_valid(), Some(false));
        let left = st.expiry_seconds().unwrap();
        assert!(left < -(Y2001 - Y2000), "{left}");
        let p = st.problem().unwrap();
        assert!(
            p.starts_with("metrics TLS: certificate expired at Jan  1 00:00:00 2001 +00:00 ("),
            "{p}"
        );
        // A reload to a not-yet-valid certificate updates the status.
        let (cp, kp) = pair_valid(4000, 4001);
        std::fs::write(&c, cp).unwrap();
        std::fs::write(&k, kp).unwrap();
        assert!(s.reload_once());
        assert_eq!(st.is_valid(), Some(false));
        assert!(st.expiry_seconds().unwrap() > 0);
        assert!(st.problem().unwrap().starts_with(
            "metrics TLS: certificate is not valid before Jan  1 00:00:00 4000 +00:00"
        ));
        // And a good one clears it.
        let (cp, kp) = pair_valid(2000, 4000);
        std::fs::write(&c, cp).unwrap();
        std::fs::write(&k, kp).unwrap();
        assert!(s.reload_once());
        assert_eq!((st.is_valid(), st.problem()), (Some(true), None));
        // Self-signed certificates made at start-up are valid.
        let s = TlsSettings::default().setup(TlsPort::GRPC).unwrap();
        assert_eq!(s.status().is_valid(), Some(true));
        assert_eq!(s.status().port_name(), "grpc");
    }

    #[test]
    fn reload_swaps_only_a_valid_changed_pair() {
        let dir = tempfile::tempdir().unwrap();
        let (c, k) = (dir.path().join("tls.crt"), dir.path().join("tls.key"));
        let write = |name: &str| {
            let ck = rcgen::generate_simple_self_signed(vec![name.to_string()]).unwrap();
            std::fs::write(&k, ck.signing_key.serialize_pem()).unwrap();
            std::fs::write(&c, ck.cert.pem()).unwrap();
            ck.cert.der().to_vec()
        };
        let a = write("a");
        let mut s = TlsSettings {
            cert_file: Some(c.clone()),
            key_file: Some(k.clone()),
            ..Default::default()
        }
        .setup(TlsPort::GRPC)
        .unwrap();
        assert_eq!(s.store.leaf_der(), a);
        assert!(!s.reload_once(), "unchanged files are not reloaded");
        let b = write("b");
        assert!(s.reload_once());
        assert_eq!(s.store.leaf_der(), b);
        std::fs::write(&c, "garbage").unwrap();
        assert!(!s.reload_once());
        assert_eq!(s.store.leaf_der(), b);
        std::fs::remove_file(&k).unwrap();
        assert!(!s.reload_once());
        assert_eq!(s.store.leaf_der(), b);
    }
}

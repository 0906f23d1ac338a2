//! HTTPS for the metrics port (`--metrics-tls`): a bearer token should not cross the network in
//! clear text. The certificate comes from `--metrics-cert-file` / `--metrics-key-file` (re-read
//! when their contents change, e.g. a cert-manager Secret rotation) or, when none is given, is a
//! self-signed one made at start-up. Probes are never on this listener and stay plain HTTP.
//!
//! Handshakes run in their own tasks, so one slow client cannot hold up the others; finished
//! connections are handed to axum through [`TlsListener`], an `axum::serve::Listener`.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::server::TlsStream;

use crate::telemetry::Shutdown;

/// TLS settings for the metrics port.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MetricsTls {
    /// PEM certificate chain; with `key_file`. Neither: a self-signed certificate.
    pub cert_file: Option<PathBuf>,
    /// PEM private key (PKCS#8, PKCS#1 or SEC1).
    pub key_file: Option<PathBuf>,
    /// How often the files are checked for new contents.
    pub reload_interval: Duration,
}

impl Default for MetricsTls {
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
    #[error("--metrics-cert-file and --metrics-key-file must be given together (or neither, for a self-signed certificate)")]
    HalfPair,
    #[error("{flag} {path}: cannot read: {source}")]
    Read {
        flag: &'static str,
        path: PathBuf,
        source: std::io::Error,
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

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn read(flag: &'static str, path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Read {
        flag,
        path: path.to_path_buf(),
        source,
    })
}

/// Build a certified key from PEM bytes.
pub fn certified_key_from_pem(
    cert_pem: &[u8],
    key_pem: &[u8],
    cert_path: &Path,
    key_path: &Path,
) -> Result<CertifiedKey, TlsError> {
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(cert_pem)
        .collect::<Result<_, _>>()
        .map_err(|e| TlsError::Parse {
            flag: "--metrics-cert-file",
            path: cert_path.to_path_buf(),
            message: format!("not a PEM certificate chain: {e}"),
        })?;
    if chain.is_empty() {
        return Err(TlsError::Parse {
            flag: "--metrics-cert-file",
            path: cert_path.to_path_buf(),
            message: "no CERTIFICATE block found".into(),
        });
    }
    let key = PrivateKeyDer::from_pem_slice(key_pem).map_err(|e| TlsError::Parse {
        flag: "--metrics-key-file",
        path: key_path.to_path_buf(),
        message: format!("no usable PEM private key: {e}"),
    })?;
    let signing = provider()
        .key_provider
        .load_private_key(key)
        .map_err(|e| TlsError::Parse {
            flag: "--metrics-key-file",
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
    files: Option<(PathBuf, PathBuf)>,
    reload_interval: Duration,
    /// Contents last loaded, to notice changes.
    last: Option<(Vec<u8>, Vec<u8>)>,
}

impl std::fmt::Debug for TlsSetup {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsSetup")
            .field("files", &self.files)
            .finish_non_exhaustive()
    }
}

impl MetricsTls {
    /// Load (or generate) the certificate and build the acceptor; errors name the flag.
    pub fn setup(&self) -> Result<TlsSetup, TlsError> {
        let (key, files, last) = match (&self.cert_file, &self.key_file) {
            (Some(c), Some(k)) => {
                let (cb, kb) = (
                    read("--metrics-cert-file", c)?,
                    read("--metrics-key-file", k)?,
                );
                let key = certified_key_from_pem(&cb, &kb, c, k)?;
                (key, Some((c.clone(), k.clone())), Some((cb, kb)))
            }
            (None, None) => (self_signed(&[])?, None, None),
            _ => return Err(TlsError::HalfPair),
        };
        let store = CertStore::new(key);
        let mut cfg = rustls::ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(|e| TlsError::Config(e.to_string()))?
            .with_no_client_auth()
            .with_cert_resolver(store.clone());
        cfg.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        Ok(TlsSetup {
            store,
            acceptor: tokio_rustls::TlsAcceptor::from(Arc::new(cfg)),
            files,
            reload_interval: self.reload_interval,
            last,
        })
    }
}

impl TlsSetup {
    /// Whether the certificate comes from files (else it is self-signed).
    pub fn from_files(&self) -> bool {
        self.files.is_some()
    }

    /// Re-read the files once; swap the certificate when they changed and parse.
    /// Returns whether a new certificate is now served.
    pub fn reload_once(&mut self) -> bool {
        let Some((c, k)) = self.files.clone() else {
            return false;
        };
        let (Ok(cb), Ok(kb)) = (std::fs::read(&c), std::fs::read(&k)) else {
            tracing::warn!(cert = %c.display(), key = %k.display(),
                "metrics TLS: cannot read the certificate files; keeping the current certificate");
            return false;
        };
        if self.last.as_ref() == Some(&(cb.clone(), kb.clone())) {
            return false;
        }
        match certified_key_from_pem(&cb, &kb, &c, &k) {
            Ok(key) => {
                self.store.set(key);
                self.last = Some((cb, kb));
                tracing::info!(cert = %c.display(), "metrics TLS: certificate reloaded");
                true
            }
            Err(e) => {
                // A rotation writes two files; a half-written pair fails here and is
                // retried on the next tick.
                tracing::warn!(error = %e, "metrics TLS: new certificate files rejected; keeping the current certificate");
                false
            }
        }
    }

    /// Accept TLS connections on `listener` until `shutdown`, reloading the certificate files.
    pub fn serve_listener(mut self, listener: TcpListener, shutdown: Shutdown) -> TlsListener {
        let local = listener.local_addr().ok();
        let (tx, rx) = tokio::sync::mpsc::channel(64);
        let acceptor = self.acceptor.clone();
        let sd = shutdown.clone();
        tokio::spawn(async move {
            let stop = sd.wait();
            tokio::pin!(stop);
            loop {
                let (tcp, peer) = tokio::select! {
                    _ = &mut stop => return,
                    r = listener.accept() => match r {
                        Ok(x) => x,
                        Err(e) => {
                            tracing::debug!(error = %e, "metrics TLS: accept failed");
                            tokio::time::sleep(Duration::from_millis(50)).await;
                            continue;
                        }
                    },
                };
                let acceptor = acceptor.clone();
                let tx = tx.clone();
                tokio::spawn(async move {
                    match tokio::time::timeout(Duration::from_secs(10), acceptor.accept(tcp)).await
                    {
                        Ok(Ok(tls)) => {
                            let _ = tx.send((tls, peer)).await;
                        }
                        Ok(Err(e)) => {
                            tracing::debug!(peer = %peer, error = %e, "metrics TLS: handshake failed (plain HTTP sent to the HTTPS port?)")
                        }
                        Err(_) => tracing::debug!(peer = %peer, "metrics TLS: handshake timed out"),
                    }
                });
            }
        });
        if self.files.is_some() {
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

/// Finished TLS connections, for `axum::serve`.
pub struct TlsListener {
    rx: tokio::sync::mpsc::Receiver<(TlsStream<TcpStream>, SocketAddr)>,
    local: Option<SocketAddr>,
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn half_pair_and_garbage_are_errors_naming_the_flag() {
        let t = MetricsTls {
            cert_file: Some("/nonexistent.crt".into()),
            ..Default::default()
        };
        assert!(matches!(t.setup(), Err(TlsError::HalfPair)));
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
        let e = t.setup().unwrap_err().to_string();
        assert!(e.contains("--metrics-cert-file"), "{e}");
        // A valid pair loads; a key of another pair is a mismatch.
        let a = rcgen::generate_simple_self_signed(vec!["a".to_string()]).unwrap();
        let b = rcgen::generate_simple_self_signed(vec!["b".to_string()]).unwrap();
        std::fs::write(&c, a.cert.pem()).unwrap();
        std::fs::write(&k, a.signing_key.serialize_pem()).unwrap();
        assert!(t.setup().is_ok());
        std::fs::write(&k, b.signing_key.serialize_pem()).unwrap();
        assert!(matches!(t.setup(), Err(TlsError::Mismatch(_))));
    }

    #[test]
    fn self_signed_when_no_files() {
        let s = MetricsTls::default().setup().unwrap();
        assert!(!s.from_files());
        assert!(!s.store.leaf_der().is_empty());
    }
}

//! TLS towards the terminals. Terminal tokens, signatures and patients'
//! identities cross the hospital LAN; plain HTTP is allowed only on
//! loopback (checked in [`super::config`]).
//!
//! Hospitals rarely have a PKI for an intranet service, so
//! `ehc-agent gateway tls init` makes one: a hospital CA (its key stays on
//! the gateway, 0600) and a server certificate for the gateway's names and
//! addresses, signed by it. Terminals trust the CA through the agent's
//! existing `[platform] ca_file`. rcgen makes the certificates, rustls (the
//! agent's own TLS stack, with ring) serves them.
//!
//! Handshakes run on their own tasks and finished connections are handed to
//! the HTTP server through a channel, so one slow or hostile client cannot
//! stall the accept loop.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use rustls_pki_types::pem::PemObject as _;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_rustls::server::TlsStream;
use tokio_rustls::TlsAcceptor;

/// Longest a TLS handshake may take.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("{path}: {error}")]
    File { path: PathBuf, error: String },
    #[error("certificate generation: {0}")]
    Generate(String),
    #[error("TLS configuration: {0}")]
    Config(String),
}

/// What `tls init` wrote.
#[derive(Debug, Clone)]
pub struct TlsFiles {
    pub ca_cert: PathBuf,
    pub ca_key: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
}

fn write(path: &Path, data: &str, mode: u32) -> Result<(), TlsError> {
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    let err = |e: std::io::Error| TlsError::File {
        path: path.to_owned(),
        error: e.to_string(),
    };
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)
        .map_err(err)?;
    f.write_all(data.as_bytes()).map_err(err)
}

/// Make a hospital CA and a server certificate for `names` (DNS names or IP
/// addresses) in `dir`. Refuses to overwrite existing files.
pub fn init(dir: &Path, names: &[String]) -> Result<TlsFiles, TlsError> {
    use rcgen::{
        BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer,
        KeyPair, KeyUsagePurpose,
    };
    let gen = |e: rcgen::Error| TlsError::Generate(e.to_string());
    std::fs::create_dir_all(dir).map_err(|e| TlsError::File {
        path: dir.to_owned(),
        error: e.to_string(),
    })?;
    let now = time::OffsetDateTime::now_utc();
    let ca_key = KeyPair::generate().map_err(gen)?;
    let mut ca = CertificateParams::new(Vec::<String>::new()).map_err(gen)?;
    ca.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    ca.distinguished_name
        .push(DnType::CommonName, "ehc-agent gateway hospital CA");
    ca.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    ca.not_before = now - time::Duration::days(1);
    ca.not_after = now + time::Duration::days(3650);
    let ca_cert = ca.self_signed(&ca_key).map_err(gen)?;
    let issuer = Issuer::new(ca, &ca_key);

    let key = KeyPair::generate().map_err(gen)?;
    let mut server = CertificateParams::new(names.to_vec()).map_err(gen)?;
    server.distinguished_name.push(
        DnType::CommonName,
        names.first().cloned().unwrap_or_default(),
    );
    server.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    server.key_usages = vec![
        KeyUsagePurpose::DigitalSignature,
        KeyUsagePurpose::KeyEncipherment,
    ];
    server.not_before = now - time::Duration::days(1);
    server.not_after = now + time::Duration::days(825);
    let cert = server.signed_by(&key, &issuer).map_err(gen)?;

    let files = TlsFiles {
        ca_cert: dir.join("ca.pem"),
        ca_key: dir.join("ca.key"),
        cert: dir.join("server.pem"),
        key: dir.join("server.key"),
    };
    write(&files.ca_key, &ca_key.serialize_pem(), 0o600)?;
    write(&files.ca_cert, &ca_cert.pem(), 0o644)?;
    write(&files.key, &key.serialize_pem(), 0o600)?;
    write(&files.cert, &cert.pem(), 0o644)?;
    Ok(files)
}

/// A rustls acceptor for a certificate chain and key in PEM files.
pub fn acceptor(cert: &Path, key: &Path) -> Result<TlsAcceptor, TlsError> {
    let file_err = |path: &Path, e: String| TlsError::File {
        path: path.to_owned(),
        error: e,
    };
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
        .map_err(|e| file_err(cert, e.to_string()))?
        .collect::<Result<_, _>>()
        .map_err(|e| file_err(cert, e.to_string()))?;
    if certs.is_empty() {
        return Err(file_err(cert, "no certificate in the file".into()));
    }
    let key_der = PrivateKeyDer::from_pem_file(key).map_err(|e| file_err(key, e.to_string()))?;
    let provider = Arc::new(tokio_rustls::rustls::crypto::ring::default_provider());
    let cfg = tokio_rustls::rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError::Config(e.to_string()))?
        .with_no_client_auth()
        .with_single_cert(certs, key_der)
        .map_err(|e| TlsError::Config(e.to_string()))?;
    Ok(TlsAcceptor::from(Arc::new(cfg)))
}

/// Handshakes a [`TlsListener`] finished, by kind: a resumed one skipped
/// the certificate exchange (the client held a session from before).
#[derive(Debug, Default)]
pub struct HandshakeCounts {
    pub full: std::sync::atomic::AtomicU64,
    pub resumed: std::sync::atomic::AtomicU64,
}

/// A listener that yields TLS connections whose handshake has finished,
/// over any listener of TCP streams (a plain `TcpListener`, or the
/// simulator's fault-injecting one).
pub struct TlsListener {
    addr: SocketAddr,
    rx: mpsc::Receiver<(TlsStream<TcpStream>, SocketAddr)>,
    counts: Arc<HandshakeCounts>,
}

impl TlsListener {
    pub fn new<L>(mut listener: L, acceptor: TlsAcceptor) -> std::io::Result<Self>
    where
        L: axum::serve::Listener<Io = TcpStream, Addr = SocketAddr>,
    {
        let addr = listener.local_addr()?;
        let (tx, rx) = mpsc::channel(64);
        let counts = Arc::new(HandshakeCounts::default());
        let c = counts.clone();
        tokio::spawn(async move {
            loop {
                // axum's `Listener::accept` retries errors itself (with a
                // pause), so EMFILE cannot spin this loop.
                let (tcp, peer) = listener.accept().await;
                if tx.is_closed() {
                    return;
                }
                let (acceptor, tx, counts) = (acceptor.clone(), tx.clone(), c.clone());
                tokio::spawn(async move {
                    match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                        Ok(Ok(tls)) => {
                            let resumed = tls.get_ref().1.handshake_kind()
                                == Some(tokio_rustls::rustls::HandshakeKind::Resumed);
                            let n = if resumed {
                                &counts.resumed
                            } else {
                                &counts.full
                            };
                            n.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                            let _ = tx.send((tls, peer)).await;
                        }
                        Ok(Err(e)) => {
                            tracing::debug!(peer = %peer, error = %e, "TLS handshake failed")
                        }
                        Err(_) => tracing::debug!(peer = %peer, "TLS handshake timed out"),
                    }
                });
            }
        });
        Ok(TlsListener { addr, rx, counts })
    }

    /// Handshakes finished so far, full and resumed.
    pub fn counts(&self) -> Arc<HandshakeCounts> {
        self.counts.clone()
    }
}

impl axum::serve::Listener for TlsListener {
    type Io = TlsStream<TcpStream>;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        match self.rx.recv().await {
            Some(x) => x,
            // The accept task never ends while the listener lives.
            None => std::future::pending().await,
        }
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        Ok(self.addr)
    }
}

/// A terminal's address, for both listeners (axum's own `SocketAddr`
/// connect info knows only plain TCP).
#[derive(Debug, Clone, Copy)]
pub struct Peer(pub SocketAddr);

// One impl per listener type: a generic one would overlap axum's own.
macro_rules! peer_of {
    ($($l:ty),*) => {$(
        impl axum::extract::connect_info::Connected<axum::serve::IncomingStream<'_, $l>> for Peer {
            fn connect_info(stream: axum::serve::IncomingStream<'_, $l>) -> Self {
                Peer(*stream.remote_addr())
            }
        }
    )*};
}
peer_of!(
    TlsListener,
    TcpListener,
    super::accept::Preconnecting<TcpListener>
);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn init_makes_a_ca_and_a_server_certificate_that_load() {
        let d = tempfile::tempdir().unwrap();
        let f = init(
            d.path(),
            &["127.0.0.1".into(), "gateway.hospital.lan".into()],
        )
        .unwrap();
        let mode = |p: &Path| {
            std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(p).unwrap().permissions())
                & 0o777
        };
        assert_eq!(mode(&f.ca_key), 0o600);
        assert_eq!(mode(&f.key), 0o600);
        assert!(acceptor(&f.cert, &f.key).is_ok());
        assert!(
            init(d.path(), &["x".into()]).is_err(),
            "never overwrites a CA"
        );
    }
}

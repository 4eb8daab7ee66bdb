//! TLS for the coordinator's gRPC API and `/metrics` (rustls), and the client
//! certificate check of workers when `--worker-ca` is set (mutual TLS).

use crate::error::{CoordError, Result};
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::rustls;
use tokio_rustls::server::TlsStream;
use tracing::{debug, warn};

/// PEM material of the server's TLS (read once at start).
#[derive(Clone)]
pub struct ServerTls {
    pub cert_pem: Vec<u8>,
    pub key_pem: Vec<u8>,
    /// Workers must present a client certificate signed by this CA (users need none).
    pub worker_ca_pem: Option<Vec<u8>>,
}

impl std::fmt::Debug for ServerTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The key never reaches a log.
        f.debug_struct("ServerTls").field("worker_ca", &self.worker_ca_pem.is_some()).finish_non_exhaustive()
    }
}

impl ServerTls {
    /// Read `--tls-cert`, `--tls-key` and `--worker-ca`, checking that they parse.
    pub fn from_files(cert: &Path, key: &Path, worker_ca: Option<&Path>) -> Result<Self> {
        let read = |flag: &str, p: &Path| std::fs::read(p).map_err(|e| CoordError::InvalidArgument(format!("{flag} {}: {e}", p.display())));
        let tls = Self { cert_pem: read("--tls-cert", cert)?, key_pem: read("--tls-key", key)?, worker_ca_pem: worker_ca.map(|p| read("--worker-ca", p)).transpose()? };
        tls.rustls_config().map_err(|e| CoordError::InvalidArgument(format!("--tls-cert/--tls-key: {e}")))?;
        if let Some(ca) = &tls.worker_ca_pem {
            if certs(ca)?.is_empty() {
                return Err(CoordError::InvalidArgument("--worker-ca: no PEM certificate in it".into()));
            }
        }
        Ok(tls)
    }

    /// tonic's server TLS: this identity, and client certificates verified against the
    /// worker CA when there is one (optional at the handshake: users present none; the
    /// worker service checks them, [`require_client_cert`]).
    pub fn tonic_config(&self) -> tonic::transport::ServerTlsConfig {
        let mut c = tonic::transport::ServerTlsConfig::new().identity(tonic::transport::Identity::from_pem(&self.cert_pem, &self.key_pem));
        if let Some(ca) = &self.worker_ca_pem {
            c = c.client_ca_root(tonic::transport::Certificate::from_pem(ca)).client_auth_optional(true);
        }
        c
    }

    /// A rustls server config of this identity (for `/metrics`).
    pub fn rustls_config(&self) -> std::result::Result<rustls::ServerConfig, String> {
        let chain = certs(&self.cert_pem).map_err(|e| e.to_string())?;
        if chain.is_empty() {
            return Err("no PEM certificate in --tls-cert".into());
        }
        use rustls::pki_types::pem::PemObject;
        let key = rustls::pki_types::PrivateKeyDer::from_pem_slice(&self.key_pem).map_err(|e| format!("no PEM private key in --tls-key: {e}"))?;
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let mut cfg = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| e.to_string())?
            .with_no_client_auth()
            .with_single_cert(chain, key)
            .map_err(|e| e.to_string())?;
        cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(cfg)
    }
}

fn certs(pem: &[u8]) -> Result<Vec<rustls::pki_types::CertificateDer<'static>>> {
    use rustls::pki_types::pem::PemObject;
    rustls::pki_types::CertificateDer::pem_slice_iter(pem)
        .collect::<std::result::Result<Vec<_>, _>>()
        .map_err(|e| CoordError::InvalidArgument(format!("not a PEM certificate: {e}")))
}

/// The worker service's interceptor under `--worker-ca`: a call must come over a TLS
/// connection whose client certificate the handshake verified against that CA.
pub fn require_client_cert(req: tonic::Request<()>) -> std::result::Result<tonic::Request<()>, tonic::Status> {
    match req.peer_certs() {
        Some(c) if !c.is_empty() => Ok(req),
        _ => Err(tonic::Status::unauthenticated("workers must present a client certificate signed by the coordinator's --worker-ca (lorafleet-worker --tls-cert/--tls-key)")),
    }
}

/// A TLS listener for the metrics server: handshakes run concurrently (each bounded),
/// so a client that never finishes one holds nothing up.
pub struct TlsListener {
    rx: tokio::sync::mpsc::Receiver<(TlsStream<TcpStream>, SocketAddr)>,
    addr: SocketAddr,
}

impl TlsListener {
    pub fn new(listener: TcpListener, cfg: rustls::ServerConfig) -> std::io::Result<Self> {
        let addr = listener.local_addr()?;
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(cfg));
        let (tx, rx) = tokio::sync::mpsc::channel(64);
        tokio::spawn(async move {
            loop {
                let (tcp, peer) = match listener.accept().await {
                    Ok(c) => c,
                    Err(e) => {
                        warn!(error = %e, "metrics accept failed");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                };
                if tx.is_closed() {
                    break;
                }
                let (acceptor, tx) = (acceptor.clone(), tx.clone());
                tokio::spawn(async move {
                    match tokio::time::timeout(Duration::from_secs(10), acceptor.accept(tcp)).await {
                        Ok(Ok(tls)) => {
                            let _ = tx.send((tls, peer)).await;
                        }
                        Ok(Err(e)) => debug!(peer = %peer, error = %e, "metrics TLS handshake failed"),
                        Err(_) => debug!(peer = %peer, "metrics TLS handshake timed out"),
                    }
                });
            }
        });
        Ok(Self { rx, addr })
    }
}

impl axum::serve::Listener for TlsListener {
    type Io = TlsStream<TcpStream>;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        match self.rx.recv().await {
            Some(c) => c,
            None => std::future::pending().await,
        }
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        Ok(self.addr)
    }
}

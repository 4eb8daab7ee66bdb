//! How every lorafleet client (CLI, worker) reaches a coordinator: `http://` is plain
//! text, `https://` is TLS, trusting the CA given (`--ca`, `LORAFLEET_CA`) or else the
//! system roots, and presenting a client certificate when given one (workers, when the
//! coordinator requires `--worker-ca`).

use std::path::{Path, PathBuf};
use std::time::Duration;
use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity};

/// TLS settings of a client (all optional).
#[derive(Debug, Clone, Default)]
pub struct ClientTls {
    /// PEM file of the CA that signed the coordinator's certificate (else the system roots).
    pub ca: Option<PathBuf>,
    /// PEM certificate and key this client presents (mutual TLS).
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
}

fn read(flag: &str, p: &Path) -> Result<Vec<u8>, String> {
    std::fs::read(p).map_err(|e| format!("{flag} {}: {e}", p.display()))
}

/// An endpoint for `url` with `tls` applied (`https://` only; TLS files with an
/// `http://` URL are refused, so a setting cannot silently not apply).
pub fn endpoint(url: &str, tls: &ClientTls) -> Result<Endpoint, String> {
    let ep = Endpoint::from_shared(url.to_string())
        .map_err(|e| format!("coordinator URL {url:?}: {e}"))?
        .connect_timeout(Duration::from_secs(5))
        .tcp_nodelay(true);
    let https = url.starts_with("https://");
    if !https {
        if tls.ca.is_some() || tls.cert.is_some() || tls.key.is_some() {
            return Err(format!("coordinator URL {url:?}: TLS settings (--ca, --tls-cert, --tls-key) need an https:// URL"));
        }
        return Ok(ep);
    }
    let mut cfg = ClientTlsConfig::new();
    cfg = match &tls.ca {
        Some(ca) => cfg.ca_certificate(Certificate::from_pem(read("--ca", ca)?)),
        None => cfg.with_native_roots(),
    };
    match (&tls.cert, &tls.key) {
        (Some(c), Some(k)) => cfg = cfg.identity(Identity::from_pem(read("--tls-cert", c)?, read("--tls-key", k)?)),
        (None, None) => {}
        _ => return Err("--tls-cert and --tls-key go together".into()),
    }
    ep.tls_config(cfg).map_err(|e| format!("TLS settings for {url}: {e}"))
}

/// A lazy channel whose connection setup as a whole, TLS handshake included, is bounded
/// by the endpoint's connect timeout. ([`Endpoint::connect_lazy`] bounds only the TCP
/// connect: a server, or a link, that accepts the connection and then says nothing
/// would hold the channel in its handshake, and every call behind it, for good.)
pub fn connect_lazy_bounded(ep: &Endpoint) -> tonic::transport::Channel {
    let mut http = hyper_util::client::legacy::connect::HttpConnector::new();
    http.enforce_http(false);
    http.set_nodelay(true);
    ep.connect_with_connector_lazy(http)
}

/// Adds `authorization: Bearer <token>` to every call (`--token`, `LORAFLEET_TOKEN`).
#[derive(Clone, Default)]
pub struct BearerToken(Option<tonic::metadata::MetadataValue<tonic::metadata::Ascii>>);

impl std::fmt::Debug for BearerToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the token itself.
        f.write_str(if self.0.is_some() { "BearerToken(set)" } else { "BearerToken(none)" })
    }
}

impl BearerToken {
    /// `None` or an empty token: calls carry no token.
    pub fn new(token: Option<&str>) -> Result<Self, String> {
        match token.map(str::trim).filter(|t| !t.is_empty()) {
            None => Ok(Self(None)),
            Some(t) => {
                let mut v: tonic::metadata::MetadataValue<tonic::metadata::Ascii> =
                    format!("Bearer {t}").parse().map_err(|_| "--token: only printable ASCII characters".to_string())?;
                v.set_sensitive(true);
                Ok(Self(Some(v)))
            }
        }
    }
}

impl tonic::service::Interceptor for BearerToken {
    fn call(&mut self, mut req: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(v) = &self.0 {
            req.metadata_mut().insert("authorization", v.clone());
        }
        Ok(req)
    }
}

/// A channel whose calls carry the bearer token.
pub type AuthChannel = tonic::service::interceptor::InterceptedService<tonic::transport::Channel, BearerToken>;

/// A secret (a bearer token) whose Debug output is redacted.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(pub String);

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("<redacted>")
    }
}

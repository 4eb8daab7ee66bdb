//! TLS on `/metrics` too (the gRPC side is exercised end to end by every e2e scenario,
//! which runs over TLS with worker client certificates): a client trusting the test CA
//! reads the metrics over TLS; plain HTTP gets no answer; a coordinator refuses a
//! certificate file that is not one.

use lorafleet_coordinator::tls::ServerTls;
use lorafleet_coordinator::{serve_with_metrics, CoordinatorConfig};
use std::sync::Arc;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_rustls::rustls;

#[tokio::test]
async fn metrics_are_served_over_tls() {
    let dir = tempfile::tempdir().unwrap();
    let pki = lorafleet_e2e::TestPki::create(&dir.path().join("pki"));
    let tls = ServerTls::from_files(&pki.server_cert, &pki.server_key, Some(&pki.ca)).unwrap();
    assert!(!format!("{tls:?}").contains("PRIVATE"), "the key stays out of debug output");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let metrics = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let maddr = metrics.local_addr().unwrap();
    let store = dir.path().join("store");
    std::fs::create_dir_all(&store).unwrap();
    let mut config = CoordinatorConfig::new(dir.path().join("c.db"), format!("file://{}", store.display()));
    config.tls = Some(tls);
    config.models = lorafleet_coordinator::sources::ModelPolicy { local_paths: true, hf_revisions: lorafleet_coordinator::sources::HfRevisions::Any, ..Default::default() };
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(serve_with_metrics(listener, Some(metrics), config, async move {
        let _ = rx.await;
    }));

    // A client that trusts the test CA.
    let mut roots = rustls::RootCertStore::empty();
    use rustls::pki_types::pem::PemObject;
    for c in rustls::pki_types::CertificateDer::pem_file_iter(&pki.ca).unwrap() {
        roots.add(c.unwrap()).unwrap();
    }
    let cfg = rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::aws_lc_rs::default_provider()))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let connector = tokio_rustls::TlsConnector::from(Arc::new(cfg));
    let mut body = String::new();
    for _ in 0..50 {
        let Ok(tcp) = tokio::net::TcpStream::connect(maddr).await else {
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            continue;
        };
        let name = rustls::pki_types::ServerName::try_from("127.0.0.1").unwrap();
        let mut s = connector.connect(name, tcp).await.unwrap();
        s.write_all(b"GET /metrics HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n").await.unwrap();
        let _ = s.read_to_string(&mut body).await;
        break;
    }
    assert!(body.starts_with("HTTP/1.0 200") && body.contains("lorafleet_jobs"), "{body}");

    // Plain HTTP is not answered with metrics.
    let mut plain = tokio::net::TcpStream::connect(maddr).await.unwrap();
    plain.write_all(b"GET /metrics HTTP/1.0\r\nHost: x\r\n\r\n").await.unwrap();
    let mut got = Vec::new();
    let _ = tokio::time::timeout(std::time::Duration::from_secs(3), plain.read_to_end(&mut got)).await;
    assert!(!String::from_utf8_lossy(&got).contains("lorafleet_jobs"));

    let _ = tx.send(());
    let _ = tokio::time::timeout(std::time::Duration::from_secs(20), task).await;

    // Files that are not PEM certificates are refused with the flag named.
    let bad = dir.path().join("bad.pem");
    std::fs::write(&bad, "not a certificate").unwrap();
    let e = ServerTls::from_files(&bad, &pki.server_key, None).unwrap_err().to_string();
    assert!(e.contains("--tls-cert"), "{e}");
}

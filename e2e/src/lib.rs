//! Harness for the end-to-end tests in `tests/`: builds the three binaries once, then
//! runs a real `lorafleet-coordinator` (SQLite on disk), `lorafleet-worker` processes
//! and the `lorafleet` CLI against a real SeaweedFS server, all on loopback.
//!
//! Lease TTLs and heartbeats are short (`--lease-ttl 3`: heartbeat every second) so
//! failover scenarios finish in seconds. Every process is killed when its [`Cluster`]
//! drops.

use lorafleet_proto as pb;
use lorafleet_proto::job_service_client::JobServiceClient;
use lorafleet_storage::testing::{AzuriteServer, S3Server};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};
use lorafleet_proto::connect::AuthChannel;

pub mod browser;
pub mod faultproxy;

pub const LEASE_TTL_SECS: u64 = 3;

/// The scenarios are timing-sensitive (a cancel within one heartbeat, a takeover within
/// the lease TTL): they run one at a time, not competing for the CPU.
pub async fn serial() -> tokio::sync::MutexGuard<'static, ()> {
    static LOCK: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());
    LOCK.lock().await
}

/// The workspace root (workers run there so relative model paths resolve).
pub fn workspace_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).parent().expect("workspace").to_path_buf()
}

/// `target/<profile>/` of this test build, where the binaries are built.
fn bin_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("test exe");
    // target/<profile>/deps/<test>
    exe.parent().and_then(Path::parent).expect("target dir").to_path_buf()
}

/// Build the coordinator, worker and CLI binaries once per test process.
pub fn binaries() -> &'static PathBuf {
    static BUILT: OnceLock<PathBuf> = OnceLock::new();
    BUILT.get_or_init(|| {
        let dir = bin_dir();
        let target = dir.parent().expect("target root").to_path_buf();
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let mut cmd = Command::new(cargo);
        cmd.args(["build", "--bins", "-p", "lorafleet-coordinator", "-p", "lorafleet-worker", "-p", "lorafleet-cli"])
            .env("CARGO_TARGET_DIR", &target)
            .current_dir(workspace_root());
        if dir.file_name().and_then(|n| n.to_str()) == Some("release") {
            cmd.arg("--release");
        }
        let st = cmd.status().expect("running cargo build");
        assert!(st.success(), "building the binaries failed");
        dir
    })
}

pub fn bin(name: &str) -> PathBuf {
    binaries().join(name)
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).expect("free port").port()
}

/// A test PKI made with rcgen, as PEM files: a CA, the coordinator's certificate for
/// 127.0.0.1 and localhost, a worker client certificate from the same CA and one from
/// another CA.
#[derive(Debug, Clone)]
pub struct TestPki {
    pub ca: PathBuf,
    pub server_cert: PathBuf,
    pub server_key: PathBuf,
    pub worker_cert: PathBuf,
    pub worker_key: PathBuf,
    pub rogue_cert: PathBuf,
    pub rogue_key: PathBuf,
}

impl TestPki {
    pub fn create(dir: &Path) -> TestPki {
        use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair, KeyUsagePurpose};
        std::fs::create_dir_all(dir).expect("pki dir");
        let ca = |name: &str| {
            let mut p = CertificateParams::new(Vec::<String>::new()).expect("params");
            p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
            p.distinguished_name.push(DnType::CommonName, name);
            p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::DigitalSignature, KeyUsagePurpose::CrlSign];
            CertifiedIssuer::self_signed(p, KeyPair::generate().expect("key")).expect("ca")
        };
        let leaf = |issuer: &rcgen::Issuer<'_, KeyPair>, names: &[&str], usage: ExtendedKeyUsagePurpose, file: &str| -> (PathBuf, PathBuf) {
            let key = KeyPair::generate().expect("key");
            let mut p = CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>()).expect("params");
            p.distinguished_name.push(DnType::CommonName, file);
            p.extended_key_usages = vec![usage];
            let cert = p.signed_by(&key, issuer).expect("sign");
            let (c, k) = (dir.join(format!("{file}.pem")), dir.join(format!("{file}.key")));
            std::fs::write(&c, cert.pem()).expect("write cert");
            std::fs::write(&k, key.serialize_pem()).expect("write key");
            (c, k)
        };
        let good = ca("lorafleet test CA");
        let rogue = ca("someone else's CA");
        let ca_path = dir.join("ca.pem");
        std::fs::write(&ca_path, good.pem()).expect("write ca");
        let (server_cert, server_key) = leaf(&good, &["127.0.0.1", "localhost"], ExtendedKeyUsagePurpose::ServerAuth, "coordinator");
        let (worker_cert, worker_key) = leaf(&good, &["worker"], ExtendedKeyUsagePurpose::ClientAuth, "worker");
        let (rogue_cert, rogue_key) = leaf(&rogue, &["worker"], ExtendedKeyUsagePurpose::ClientAuth, "rogue");
        TestPki { ca: ca_path, server_cert, server_key, worker_cert, worker_key, rogue_cert, rogue_key }
    }
}

#[derive(Debug, Clone)]
pub struct Tokens {
    pub file: PathBuf,
    pub user: String,
    pub worker: String,
    pub admin: String,
}

impl Tokens {
    /// Make tokens with the real `lorafleet-coordinator token create`.
    pub fn create(dir: &Path) -> Tokens {
        let file = dir.join("auth.yaml");
        let make = |id: &str, role: &str, tenant: Option<&str>| {
            let mut cmd = Command::new(bin("lorafleet-coordinator"));
            cmd.args(["token", "create", "--auth"]).arg(&file).args(["--id", id, "--role", role]);
            if let Some(t) = tenant {
                cmd.args(["--tenant", t]);
            }
            let out = cmd.output().expect("token create");
            assert!(out.status.success(), "token create: {}", String::from_utf8_lossy(&out.stderr));
            String::from_utf8_lossy(&out.stdout).trim().to_string()
        };
        let user = make("e2e-user", "user", Some("e2e"));
        let worker = make("e2e-workers", "worker", None);
        let admin = make("e2e-admin", "admin", None);
        Tokens { file, user, worker, admin }
    }
}

pub struct Cluster {
    pub dir: tempfile::TempDir,
    /// TLS for the API (with client certificates for workers): every scenario runs
    /// over it; only [`Cluster::start_plain`] turns it off.
    pub pki: Option<TestPki>,
    /// Bearer tokens (`--auth`, made by `lorafleet-coordinator token create`): the
    /// user's (the CLI and [`Cluster::client`]) and the workers'.
    pub tokens: Option<Tokens>,
    pub s3: S3Server,
    /// Set when the cluster stores on Azure Blob Storage (Azurite) instead of S3.
    pub azurite: Option<AzuriteServer>,
    pub storage_url: String,
    pub port: u16,
    /// The coordinator's `--metrics-listen` port (`/metrics` and the dashboard).
    pub metrics_port: u16,
    pub coordinator: Option<Child>,
    pub workers: HashMap<String, Child>,
    /// The coordinator's `--lease-ttl` ([`LEASE_TTL_SECS`] unless started with
    /// [`Cluster::start_with_ttl`]); heartbeats come every sixth of it (at least 1 s).
    pub lease_ttl: u64,
}

impl Cluster {
    /// SeaweedFS, a coordinator serving TLS (workers with client certificates) and
    /// `workers` workers named w0, w1, ...
    pub async fn start(workers: usize) -> Cluster {
        binaries();
        let s3 = S3Server::start().await.unwrap_or_else(|e| panic!("{e}"));
        let storage_url = s3.unique_url("lorafleet");
        Self::launch(s3, None, storage_url, workers, true, LEASE_TTL_SECS).await
    }

    /// [`Cluster::start`] with another lease TTL (the chaos tests need room for a
    /// partition shorter than it).
    pub async fn start_with_ttl(workers: usize, lease_ttl: u64) -> Cluster {
        binaries();
        let s3 = S3Server::start().await.unwrap_or_else(|e| panic!("{e}"));
        let storage_url = s3.unique_url("lorafleet");
        Self::launch(s3, None, storage_url, workers, true, lease_ttl).await
    }

    /// The same with a plain-text coordinator (`--insecure`).
    pub async fn start_plain(workers: usize) -> Cluster {
        binaries();
        let s3 = S3Server::start().await.unwrap_or_else(|e| panic!("{e}"));
        let storage_url = s3.unique_url("lorafleet");
        Self::launch(s3, None, storage_url, workers, false, LEASE_TTL_SECS).await
    }

    /// The same on Azure Blob Storage: an Azurite server and an `az://` storage URL.
    pub async fn start_on_azure(workers: usize) -> Cluster {
        binaries();
        let s3 = S3Server::start().await.unwrap_or_else(|e| panic!("{e}"));
        let az = AzuriteServer::start().await.unwrap_or_else(|e| panic!("{e}"));
        let storage_url = az.unique_url("lorafleet").await;
        Self::launch(s3, Some(az), storage_url, workers, true, LEASE_TTL_SECS).await
    }

    async fn launch(s3: S3Server, azurite: Option<AzuriteServer>, storage_url: String, workers: usize, tls: bool, lease_ttl: u64) -> Cluster {
        let dir = tempfile::tempdir().expect("tempdir");
        let pki = tls.then(|| TestPki::create(&dir.path().join("pki")));
        let tokens = tls.then(|| Tokens::create(dir.path()));
        let mut c = Cluster { dir, pki, tokens, s3, azurite, storage_url, port: free_port(), metrics_port: free_port(), coordinator: None, workers: HashMap::new(), lease_ttl };
        c.start_coordinator().await;
        for i in 0..workers {
            c.start_worker(&format!("w{i}"));
        }
        c
    }

    /// Environment for the processes to reach the storage servers.
    pub fn storage_env(&self) -> Vec<(String, String)> {
        let mut env = self.s3.env();
        if let Some(az) = &self.azurite {
            env.extend(az.env());
        }
        env
    }

    pub fn endpoint(&self) -> String {
        let scheme = if self.pki.is_some() { "https" } else { "http" };
        format!("{scheme}://127.0.0.1:{}", self.port)
    }

    /// The dashboard's base URL (`https` when the coordinator has TLS).
    pub fn web_url(&self) -> String {
        let scheme = if self.pki.is_some() { "https" } else { "http" };
        format!("{scheme}://127.0.0.1:{}", self.metrics_port)
    }

    /// The coordinator's transport and authentication flags.
    pub fn coordinator_tls_args(&self) -> Vec<String> {
        let mut args = match &self.tokens {
            Some(t) => vec!["--auth".to_string(), t.file.display().to_string()],
            None => vec![],
        };
        args.extend(self.transport_args());
        args
    }

    fn transport_args(&self) -> Vec<String> {
        match &self.pki {
            Some(p) => vec![
                "--tls-cert".into(),
                p.server_cert.display().to_string(),
                "--tls-key".into(),
                p.server_key.display().to_string(),
                "--worker-ca".into(),
                p.ca.display().to_string(),
            ],
            None => vec!["--insecure".into()],
        }
    }

    /// A worker's flags to reach the coordinator (the CA, its client certificate).
    pub fn worker_tls_args(&self) -> Vec<String> {
        match &self.pki {
            Some(p) => vec![
                "--ca".into(),
                p.ca.display().to_string(),
                "--tls-cert".into(),
                p.worker_cert.display().to_string(),
                "--tls-key".into(),
                p.worker_key.display().to_string(),
            ],
            None => vec![],
        }
    }

    fn log(&self, name: &str) -> std::fs::File {
        std::fs::OpenOptions::new().create(true).append(true).open(self.dir.path().join(format!("{name}.log"))).expect("log file")
    }

    pub async fn start_coordinator(&mut self) {
        let log = self.log("coordinator");
        let child = Command::new(bin("lorafleet-coordinator"))
            .args(["--listen", &format!("127.0.0.1:{}", self.port)])
            .args(["--metrics-listen", &format!("127.0.0.1:{}", self.metrics_port)])
            .args(self.coordinator_tls_args())
            .arg("--db")
            .arg(self.dir.path().join("coordinator.sqlite"))
            .args(["--storage", &self.storage_url, "--lease-ttl", &self.lease_ttl.to_string()])
            // The workers load the fixture model from their disk (tests/fixtures/...).
            .args(["--allow-local-model-paths", "--audit-log"])
            .arg(self.dir.path().join("audit.jsonl"))
            .envs(self.storage_env())
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("spawning lorafleet-coordinator");
        self.coordinator = Some(child);
        // Ready when it answers.
        let t = Instant::now();
        loop {
            if let Ok(mut c) = self.client().await {
                if c.list_workers(pb::ListWorkersRequest { include_dead: true }).await.is_ok() {
                    return;
                }
            }
            assert!(t.elapsed() < Duration::from_secs(30), "coordinator did not start; log:\n{}", self.read_log("coordinator"));
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    pub fn start_worker(&mut self, name: &str) {
        self.start_worker_with(name, &[]);
    }

    /// A worker with extra flags (e.g. `--devices cpu:0,1`). Gang collectives give up
    /// after 30 s here (the lease TTL ends a stuck attempt well before).
    pub fn start_worker_with(&mut self, name: &str, extra: &[&str]) {
        self.start_worker_via(name, &self.endpoint(), &[], extra);
    }

    /// A worker that reaches the coordinator at `coordinator` (e.g. through a
    /// [`faultproxy::FaultProxy`]), with extra environment (e.g. another
    /// `AWS_ENDPOINT_URL`, to send its storage traffic through a proxy) and flags.
    pub fn start_worker_via(&mut self, name: &str, coordinator: &str, env: &[(&str, &str)], extra: &[&str]) {
        let log = self.log(name);
        let child = Command::new(bin("lorafleet-worker"))
            // No --storage: workers take the coordinator's (and prove they see it).
            .args(["--coordinator", coordinator, "--name", name, "--acquire-wait-secs", "2"])
            .args(["--collective-timeout-secs", "30"])
            .args(self.worker_tls_args())
            .envs(self.tokens.as_ref().map(|t| ("LORAFLEET_TOKEN", t.worker.clone())))
            .args(extra)
            .arg("--cache")
            .arg(self.dir.path().join(format!("cache-{name}")))
            .envs(self.storage_env())
            .envs(env.iter().map(|(k, v)| (k.to_string(), v.to_string())))
            .env("LORAFLEET_LOG", "info")
            .current_dir(workspace_root())
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("spawning lorafleet-worker");
        self.workers.insert(name.to_string(), child);
    }

    pub fn read_log(&self, name: &str) -> String {
        std::fs::read_to_string(self.dir.path().join(format!("{name}.log"))).unwrap_or_default()
    }

    pub fn signal(&self, pid: u32, sig: &str) {
        let st = Command::new("kill").args([&format!("-{sig}"), &pid.to_string()]).status().expect("kill");
        assert!(st.success(), "kill -{sig} {pid}");
    }

    pub fn kill_worker(&mut self, name: &str) {
        let mut c = self.workers.remove(name).expect("worker");
        let _ = c.kill();
        let _ = c.wait();
    }

    pub fn kill_coordinator(&mut self) {
        if let Some(mut c) = self.coordinator.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// The TLS settings a user's client has (the CA, no client certificate).
    pub fn client_tls(&self) -> lorafleet_proto::connect::ClientTls {
        lorafleet_proto::connect::ClientTls { ca: self.pki.as_ref().map(|p| p.ca.clone()), ..Default::default() }
    }

    /// The tests' own client (the CA and the admin token, which sees every tenant's jobs;
    /// the CLI runs as the user).
    pub async fn client(&self) -> Result<JobServiceClient<AuthChannel>, tonic::transport::Error> {
        let ep = lorafleet_proto::connect::endpoint(&self.endpoint(), &self.client_tls()).expect("endpoint");
        let ch = ep.connect_timeout(Duration::from_secs(2)).connect().await?;
        let token = lorafleet_proto::connect::BearerToken::new(self.tokens.as_ref().map(|t| t.admin.as_str())).expect("token");
        Ok(JobServiceClient::with_interceptor(ch, token).max_decoding_message_size(64 * 1024 * 1024))
    }

    /// Every event of a job's history (WatchJob from seq 0 until the stream ends, which it
    /// does once the job is terminal); panics if no event comes for `stall`.
    pub async fn job_events(&self, job: &str, stall: Duration) -> Vec<pb::JobEvent> {
        let client = self.client().await.expect("connect");
        let mut s = patiently(|| {
            let mut client = client.clone();
            async move { client.watch_job(pb::WatchJobRequest { job_id: job.into(), after_seq: 0 }).await }
        })
        .await
        .into_inner();
        let mut out = Vec::new();
        while let Some(e) = tokio::time::timeout(stall, s.message()).await.expect("watch stalled").expect("watch") {
            out.push(e);
        }
        out
    }

    pub async fn job(&self, id: &str) -> pb::Job {
        self.client().await.expect("connect").get_job(pb::GetJobRequest { job_id: id.into() }).await.expect("get job").into_inner()
    }

    /// Poll a job until `pred` holds.
    pub async fn wait_job(&self, id: &str, what: &str, timeout: Duration, pred: impl Fn(&pb::Job) -> bool) -> pb::Job {
        let t = Instant::now();
        loop {
            if let Ok(mut c) = self.client().await {
                if let Ok(j) = c.get_job(pb::GetJobRequest { job_id: id.into() }).await {
                    let j = j.into_inner();
                    if pred(&j) {
                        return j;
                    }
                    if t.elapsed() > timeout {
                        panic!("timed out waiting for {what}; job: {j:?}\ncoordinator log tail:\n{}", tail(&self.read_log("coordinator"), 30));
                    }
                }
            }
            assert!(t.elapsed() < timeout + Duration::from_secs(5), "timed out waiting for {what} (coordinator unreachable)");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Run the CLI against this cluster with another token (e.g. the admin's).
    pub fn cli_as(&self, token: &str, args: &[&str]) -> Output {
        self.run_cli(Some(token), args)
    }

    /// Run the CLI against this cluster (as the user).
    pub fn cli(&self, args: &[&str]) -> Output {
        self.run_cli(self.tokens.as_ref().map(|t| t.user.as_str()), args)
    }

    fn run_cli(&self, token: Option<&str>, args: &[&str]) -> Output {
        let mut cmd = Command::new(bin("lorafleet"));
        if let Some(p) = &self.pki {
            cmd.env("LORAFLEET_CA", &p.ca);
        }
        if let Some(t) = token {
            cmd.env("LORAFLEET_TOKEN", t);
        }
        cmd.args(args)
            .env("LORAFLEET_COORDINATOR", self.endpoint())
            .current_dir(workspace_root())
            .output()
            .expect("running lorafleet")
    }

    /// Write a spec file into the cluster's directory.
    pub fn spec(&self, name: &str, yaml: &str) -> PathBuf {
        let p = self.dir.path().join(format!("{name}.yaml"));
        std::fs::write(&p, yaml).expect("spec");
        p
    }

    /// Submit through the CLI; returns the job id.
    pub fn submit(&self, spec: &Path) -> String {
        let out = self.cli(&["submit", spec.to_str().expect("utf8"), "--json"]);
        assert!(out.status.success(), "submit failed: {}", String::from_utf8_lossy(&out.stderr));
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("submit --json prints a job");
        v["id"].as_str().expect("id").to_string()
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for (_, mut c) in self.workers.drain() {
            let _ = Command::new("kill").args(["-CONT", &c.id().to_string()]).status();
            let _ = c.kill();
            let _ = c.wait();
        }
        self.kill_coordinator();
        if std::thread::panicking() {
            for name in ["coordinator", "w0", "w1", "w2", "w3"] {
                let l = self.read_log(name);
                if !l.is_empty() {
                    eprintln!("----- {name} log (tail) -----\n{}", tail(&l, 40));
                }
            }
        }
    }
}

/// The command's stdout; panics with its output unless it succeeded.
pub fn ok(out: &Output) -> String {
    assert!(out.status.success(), "command failed ({}):\nstdout: {}\nstderr: {}", out.status, String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

pub fn state(j: &pb::Job) -> pb::JobState {
    pb::JobState::try_from(j.state).unwrap_or(pb::JobState::Unspecified)
}

pub trait FinalPb {
    fn is_final_pb(&self) -> bool;
}

impl FinalPb for pb::JobState {
    fn is_final_pb(&self) -> bool {
        matches!(self, pb::JobState::Succeeded | pb::JobState::Failed | pb::JobState::Cancelled)
    }
}

/// `lorafleet fetch` of a job's adapter into the cluster's directory.
pub fn fetch(c: &Cluster, job: &str) -> PathBuf {
    let dest = c.dir.path().join(format!("fetched-{job}"));
    ok(&c.cli(&["fetch", job, "-o", dest.to_str().expect("utf8")]));
    dest
}

/// Map worker ids to the names we gave the processes.
pub async fn worker_names(c: &Cluster) -> HashMap<String, String> {
    let r = c.client().await.expect("connect").list_workers(pb::ListWorkersRequest { include_dead: true }).await.expect("list workers").into_inner();
    r.workers.into_iter().map(|w| (w.worker_id, w.name)).collect()
}

/// [`faq_spec`] as a gang: `nodes` workers of `count` devices, `grad_accum` micro-batches
/// of one example per step (the batch stays global: any world size trains the same),
/// with NF4, LoRA dropout and gradient checkpointing on.
pub fn gang_spec(name: &str, steps: u64, checkpoint_every: u64, output_dir: &str, nodes: u32, count: u32, grad_accum: u32) -> String {
    faq_spec(name, steps, checkpoint_every, output_dir)
        .replace("grad_accum: 1,", &format!("grad_accum: {grad_accum},"))
        .replace("quantization: { method: none, compute_dtype: f32 }", "quantization: { method: nf4, double_quant: true, compute_dtype: f32 }")
        .replace("dropout: 0.0,", "dropout: 0.05,")
        .replace("gradient_checkpointing: false", "gradient_checkpointing: true")
        + &format!("resources: {{ device: cpu, nodes: {nodes}, count: {count} }}\n")
}

pub fn tail(s: &str, n: usize) -> String {
    let lines: Vec<&str> = s.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// The tiny-llama FAQ spec (f32, no quantization, deterministic). `model` is relative
/// to the workspace root, where workers run.
pub fn faq_spec(name: &str, steps: u64, checkpoint_every: u64, output_dir: &str) -> String {
    let data = workspace_root().join("examples/faq.json");
    format!(
        "name: {name}\nmodel: {{ source: tests/fixtures/hf/models/tiny-llama }}\nquantization: {{ method: none, compute_dtype: f32 }}\n\
lora: {{ r: 4, alpha: 8, dropout: 0.0, target_modules: all-linear }}\n\
data: {{ train: {data:?}, max_seq_len: 64, shuffle: true }}\n\
training: {{ max_steps: {steps}, micro_batch_size: 1, grad_accum: 1, lr: 1.0e-3, schedule: cosine, warmup_steps: 2, checkpoint_every: {checkpoint_every}, log_every: 1, gradient_checkpointing: false, seed: 7 }}\n\
output: {{ dir: {output_dir:?} }}\n",
        data = data.display().to_string()
    )
}

/// Every tensor of two safetensors files, compared with a tolerance.
pub fn assert_same_weights(a: &Path, b: &Path, tol: f32) {
    let (ba, bb) = (std::fs::read(a).expect("read a"), std::fs::read(b).expect("read b"));
    let (ta, tb) = (safetensors::SafeTensors::deserialize(&ba).expect("a"), safetensors::SafeTensors::deserialize(&bb).expect("b"));
    let mut na: Vec<String> = ta.names().into_iter().map(str::to_string).collect();
    let mut nb: Vec<String> = tb.names().into_iter().map(str::to_string).collect();
    na.sort();
    nb.sort();
    assert_eq!(na, nb, "tensor names differ");
    assert!(!na.is_empty());
    for n in &na {
        let (x, y) = (ta.tensor(n).expect("x"), tb.tensor(n).expect("y"));
        assert_eq!(x.shape(), y.shape(), "{n}");
        assert_eq!(x.dtype(), y.dtype(), "{n}");
        if x.dtype() != safetensors::Dtype::F32 {
            assert!(x.data() == y.data(), "{n}: {:?} tensors differ", x.dtype());
            continue;
        }
        let f = |d: &[u8]| d.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect::<Vec<_>>();
        let (vx, vy) = (f(x.data()), f(y.data()));
        let max = vx.iter().zip(&vy).map(|(p, q)| (p - q).abs()).fold(0f32, f32::max);
        assert!(max <= tol, "{n}: max abs difference {max} > {tol}");
    }
}

/// An API call, retried while the coordinator's rate limit refuses it (ResourceExhausted):
/// tests that poll many jobs stay correct under the limit instead of failing on it.
pub async fn patiently<T, F, Fut>(mut call: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, tonic::Status>>,
{
    loop {
        match call().await {
            Err(s) if s.code() == tonic::Code::ResourceExhausted => tokio::time::sleep(Duration::from_millis(100)).await,
            r => return r.expect("call"),
        }
    }
}

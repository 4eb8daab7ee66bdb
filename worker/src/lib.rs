//! lorafleet worker library (the `lorafleet-worker` binary is a thin `main.rs`; the
//! embedded `lorafleet dev` mode and the tests drive [`Worker`] directly).
//!
//! Life of a worker:
//! 1. ask the coordinator where its storage is (`GetStorage`, retried until it answers;
//!    `--storage` may only name the same place), open it, check that it refuses a second
//!    create-only put (fencing relies on create-only manifests) and that it shows the
//!    token the coordinator wrote there at start (else this worker sees another store and
//!    would fail every job: it refuses to register, naming both locations), then
//!    `RegisterWorker` with that token;
//! 2. a heartbeat task ([`heartbeat`]) runs on its own tokio task every
//!    `heartbeat_interval_secs`, whatever training is doing, and applies the
//!    coordinator's directives (cancel, abandon) to the running job;
//! 3. `AcquireJob` long-polls; a lease runs in [`job`]: fetch and verify the model,
//!    datasets and resume checkpoint, train on a dedicated std thread, upload each
//!    checkpoint under `jobs/<job>/attempts/<epoch>/checkpoints/step-<n>/` (manifest
//!    last, create-only) and commit it, upload the adapter under
//!    `jobs/<job>/attempts/<epoch>/adapter/`, then `CompleteAttempt`;
//! 4. a call refused for a stale epoch (or an ABANDON directive) stops the job at once
//!    and nothing more is written for it.

pub mod config;
pub mod gang;
pub mod heartbeat;
pub mod job;
pub mod trainer;

pub use config::{parse_devices, DeviceSel, WorkerArgs, WorkerConfig, CUDA_BUILT};
pub use trainer::{EngineTrainer, Trainer};

use lorafleet_proto as pb;
use lorafleet_proto::worker_service_client::WorkerServiceClient;
use lorafleet_storage::{Cache, Storage};
use std::collections::HashMap;
use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;
use lorafleet_proto::connect::AuthChannel as Channel;
use tracing::{error, info, warn};

#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    #[error("invalid configuration: {0}")]
    Config(String),
    #[error(transparent)]
    Storage(#[from] lorafleet_storage::Error),
    #[error("coordinator refused registration: {0}")]
    Register(String),
}

/// Stop flags of one running job, shared by the heartbeat task, the progress reporter
/// and the training thread.
pub struct JobControl {
    pub job_id: String,
    pub epoch: u64,
    cancel: AtomicBool,
    abandon: AtomicBool,
    shutdown: AtomicBool,
    /// The gang rings of this job: stopping the job shuts them, so a rank blocked in a
    /// collective returns at once.
    rings: Mutex<Vec<lorafleet_engine::collective::RingAbort>>,
}

impl std::fmt::Debug for JobControl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JobControl").field("job_id", &self.job_id).field("epoch", &self.epoch).finish_non_exhaustive()
    }
}

impl JobControl {
    pub fn new(job_id: String, epoch: u64) -> Self {
        Self {
            job_id,
            epoch,
            cancel: AtomicBool::new(false),
            abandon: AtomicBool::new(false),
            shutdown: AtomicBool::new(false),
            rings: Mutex::new(Vec::new()),
        }
    }
    /// Shut this ring when the job stops (at once if it already has).
    pub fn add_ring(&self, a: lorafleet_engine::collective::RingAbort) {
        if self.should_stop() {
            a.abort();
        }
        self.rings.lock().unwrap_or_else(|e| e.into_inner()).push(a);
    }
    fn abort_rings(&self) {
        for a in self.rings.lock().unwrap_or_else(|e| e.into_inner()).iter() {
            a.abort();
        }
    }
    /// The user cancelled the job.
    pub fn cancel(&self) {
        if !self.cancel.swap(true, Ordering::SeqCst) {
            info!(job_id = %self.job_id, epoch = self.epoch, "job cancelled; stopping");
        }
        self.abort_rings();
    }
    /// The lease is gone (stale epoch): stop and write nothing more.
    pub fn abandon(&self, why: &str) {
        if !self.abandon.swap(true, Ordering::SeqCst) {
            warn!(job_id = %self.job_id, epoch = self.epoch, reason = why, "lease lost; abandoning job");
        }
        self.abort_rings();
    }
    /// This worker is shutting down.
    pub fn shutdown(&self) {
        self.shutdown.store(true, Ordering::SeqCst);
        self.abort_rings();
    }
    pub fn is_cancelled(&self) -> bool {
        self.cancel.load(Ordering::SeqCst)
    }
    pub fn is_abandoned(&self) -> bool {
        self.abandon.load(Ordering::SeqCst)
    }
    pub fn is_shutdown(&self) -> bool {
        self.shutdown.load(Ordering::SeqCst)
    }
    pub fn should_stop(&self) -> bool {
        self.is_cancelled() || self.is_abandoned() || self.is_shutdown()
    }
}

/// State shared between the worker's tasks.
pub struct Shared {
    worker_id: RwLock<String>,
    running: Mutex<HashMap<String, Arc<JobControl>>>,
    heartbeat_ms: AtomicU64,
    lease_ttl_ms: AtomicU64,
    /// Held while registering again, so the heartbeat and the acquire loop, both told
    /// NOT_FOUND after a partition, register once between them.
    reregistering: tokio::sync::Mutex<()>,
}

impl Shared {
    pub fn worker_id(&self) -> String {
        self.worker_id.read().unwrap_or_else(|e| e.into_inner()).clone()
    }
    fn set_worker_id(&self, id: String) {
        *self.worker_id.write().unwrap_or_else(|e| e.into_inner()) = id;
    }
    pub fn running(&self) -> Vec<Arc<JobControl>> {
        self.running.lock().unwrap_or_else(|e| e.into_inner()).values().cloned().collect()
    }
    fn insert(&self, c: Arc<JobControl>) {
        self.running.lock().unwrap_or_else(|e| e.into_inner()).insert(c.job_id.clone(), c);
    }
    fn remove(&self, job_id: &str) {
        self.running.lock().unwrap_or_else(|e| e.into_inner()).remove(job_id);
    }
    pub fn heartbeat_interval(&self) -> Duration {
        Duration::from_millis(self.heartbeat_ms.load(Ordering::SeqCst).max(100))
    }
    pub fn lease_ttl(&self) -> Duration {
        Duration::from_millis(self.lease_ttl_ms.load(Ordering::SeqCst).max(1000))
    }
}

/// A worker process: one job at a time on its devices.
#[derive(Clone)]
pub struct Worker {
    pub(crate) cfg: Arc<WorkerConfig>,
    pub(crate) client: WorkerServiceClient<Channel>,
    pub(crate) storage: Storage,
    pub(crate) cache: Cache,
    pub(crate) trainer: Arc<dyn Trainer>,
    pub(crate) shared: Arc<Shared>,
    /// Where the coordinator's storage marker is (None: a coordinator without one).
    marker_key: Option<lorafleet_storage::RelPath>,
}

/// Do two storage URLs name the same place (ignoring user info, query, a trailing `/`)?
pub fn same_storage(a: &str, b: &str) -> bool {
    let norm = |s: &str| lorafleet_storage::public_url(s).trim_end_matches('/').to_string();
    norm(a) == norm(b)
}

impl Worker {
    /// Find and check the storage (module docs, step 1) and prepare a client; the worker
    /// registers when it runs.
    pub async fn new(cfg: WorkerConfig, trainer: Arc<dyn Trainer>) -> Result<Self, WorkerError> {
        if cfg.devices.is_empty() {
            return Err(WorkerError::Config("no devices".into()));
        }
        let endpoint = lorafleet_proto::connect::endpoint(&cfg.coordinator, &cfg.tls).map_err(|e| WorkerError::Config(format!("--coordinator: {e}")))?;
        let token = lorafleet_proto::connect::BearerToken::new(cfg.token.as_ref().map(|t| t.0.as_str())).map_err(WorkerError::Config)?;
        // HTTP/2 pings find a dead connection (a peer gone without a RST, a black-holed
        // link) within KEEPALIVE_INTERVAL + KEEPALIVE_TIMEOUT and close it, so the next
        // call reconnects; without them a timed-out call leaves the channel on the dead
        // connection, and every later heartbeat times out on it too. The reconnection's
        // TLS handshake is bounded as well (connect_lazy_bounded).
        let endpoint = endpoint.http2_keep_alive_interval(KEEPALIVE_INTERVAL).keep_alive_timeout(KEEPALIVE_TIMEOUT).keep_alive_while_idle(true);
        let client = WorkerServiceClient::with_interceptor(lorafleet_proto::connect::connect_lazy_bounded(&endpoint), token);
        let theirs = get_storage(&client).await?;
        let url = match (&cfg.storage_url, &theirs) {
            (Some(own), Some(t)) if !same_storage(own, &t.storage_url) => {
                return Err(WorkerError::Config(format!(
                    "--storage {own} is not the coordinator's storage {}: leave --storage out to use the coordinator's",
                    t.storage_url
                )))
            }
            (Some(own), _) => own.clone(),
            (None, Some(t)) => t.storage_url.clone(),
            (None, None) => {
                return Err(WorkerError::Config("--storage is required: this coordinator does not say where its storage is (an older version)".into()))
            }
        };
        let storage = Storage::open_with(&url, &cfg.storage_options)?;
        if cfg.check_create_only {
            storage.check_create_only().await?;
        }
        let marker_key = match &theirs {
            Some(t) => {
                let key = lorafleet_storage::RelPath::parse(&t.marker_key).map_err(|e| WorkerError::Register(format!("coordinator's marker key: {e}")))?;
                let seen = read_marker(&storage, &key).await;
                if seen.as_deref().ok() != Some(t.marker.as_str()) {
                    let why = match seen {
                        Ok(_) => format!("{key} holds another coordinator's token"),
                        Err(e) => e,
                    };
                    return Err(WorkerError::Config(format!(
                        "storage: this worker's storage {} does not show the coordinator's storage {} ({why}): give the worker the same location and credentials as the coordinator (or leave --storage out to use the coordinator's); not registering",
                        storage.public_url(),
                        t.storage_url
                    )));
                }
                info!(storage = %storage.public_url(), "storage is the coordinator's");
                Some(key)
            }
            None => None,
        };
        std::fs::create_dir_all(&cfg.cache).map_err(|e| WorkerError::Config(format!("--cache {}: {e}", cfg.cache.display())))?;
        Ok(Self {
            cache: Cache::new(cfg.cache.clone()),
            cfg: Arc::new(cfg),
            client,
            storage,
            trainer,
            marker_key,
            shared: Arc::new(Shared {
                worker_id: RwLock::new(String::new()),
                running: Mutex::new(HashMap::new()),
                heartbeat_ms: AtomicU64::new(2000),
                lease_ttl_ms: AtomicU64::new(10_000),
                reregistering: tokio::sync::Mutex::new(()),
            }),
        })
    }

    pub fn shared(&self) -> &Arc<Shared> {
        &self.shared
    }

    /// Register (retrying while the coordinator is unreachable); returns the worker id.
    pub(crate) async fn register(&self) -> Result<String, WorkerError> {
        let mut backoff = Duration::from_millis(200);
        loop {
            // Read fresh: a restarted coordinator writes a new token.
            let storage_marker = match &self.marker_key {
                Some(k) => read_marker(&self.storage, k).await.map_err(|e| WorkerError::Register(format!("storage {}: {e}", self.storage.public_url())))?,
                None => String::new(),
            };
            let req = pb::RegisterWorkerRequest {
                name: self.cfg.name.clone(),
                devices: self.cfg.devices.iter().map(|d| d.to_pb()).collect(),
                labels: self.cfg.labels.iter().cloned().collect(),
                version: env!("CARGO_PKG_VERSION").to_string(),
                storage_url: self.storage.public_url(),
                storage_marker,
            };
            let mut call = tonic::Request::new(req.clone());
            call.set_timeout(CALL_TIMEOUT);
            match self.client.clone().register_worker(call).await {
                Ok(r) => {
                    let r = r.into_inner();
                    self.shared.heartbeat_ms.store(r.heartbeat_interval_secs.max(1) as u64 * 1000, Ordering::SeqCst);
                    self.shared.lease_ttl_ms.store(r.lease_ttl_secs.max(1) as u64 * 1000, Ordering::SeqCst);
                    self.shared.set_worker_id(r.worker_id.clone());
                    info!(worker_id = %r.worker_id, heartbeat_secs = r.heartbeat_interval_secs, lease_ttl_secs = r.lease_ttl_secs, "registered");
                    return Ok(r.worker_id);
                }
                Err(s) if is_transient(&s) => {
                    warn!(code = ?s.code(), error = %s.message(), "coordinator unreachable; retrying registration");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                }
                Err(s) => return Err(WorkerError::Register(s.message().to_string())),
            }
        }
    }

    /// Register again after the coordinator said it does not know `stale` (the id the
    /// refused call carried), unless another task already has.
    pub(crate) async fn reregister(&self, stale: &str) -> Result<String, WorkerError> {
        let _one = self.shared.reregistering.lock().await;
        let now = self.shared.worker_id();
        if now != stale {
            return Ok(now);
        }
        self.register().await
    }

    /// Run until `shutdown` resolves: register, heartbeat, lease and run jobs. On
    /// shutdown a running job is stopped and handed back as a retryable failure.
    pub async fn run(self, shutdown: impl Future<Output = ()>) -> Result<(), WorkerError> {
        self.register().await?;
        let hb = tokio::spawn(heartbeat::run(self.clone()));
        tokio::pin!(shutdown);
        let result = loop {
            let asked_as = self.shared.worker_id();
            let acquired = tokio::select! {
                _ = &mut shutdown => break Ok(()),
                r = self.acquire() => r,
            };
            match acquired {
                Ok(Some(lease)) => {
                    let job = self.clone();
                    let mut task = tokio::spawn(async move { job.run_lease(lease).await });
                    tokio::select! {
                        _ = &mut task => {}
                        _ = &mut shutdown => {
                            info!("shutting down: stopping the running job");
                            for c in self.shared.running() {
                                c.shutdown();
                            }
                            let _ = tokio::time::timeout(Duration::from_secs(30), task).await;
                            break Ok(());
                        }
                    }
                }
                Ok(None) => {}
                Err(s) if s.code() == tonic::Code::NotFound => {
                    warn!(error = %s.message(), "coordinator does not know this worker; registering again");
                    self.reregister(&asked_as).await?;
                }
                Err(s) => {
                    warn!(code = ?s.code(), error = %s.message(), "acquire failed; retrying");
                    tokio::select! {
                        _ = &mut shutdown => break Ok(()),
                        _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                    }
                }
            }
        };
        hb.abort();
        result
    }

    async fn acquire(&self) -> Result<Option<pb::Lease>, tonic::Status> {
        let wait = self.cfg.acquire_wait.as_secs() as u32;
        let mut req = tonic::Request::new(pb::AcquireJobRequest { worker_id: self.shared.worker_id(), wait_secs: wait });
        req.set_timeout(self.cfg.acquire_wait + Duration::from_secs(10));
        Ok(self.client.clone().acquire_job(req).await?.into_inner().lease)
    }

    async fn run_lease(&self, lease: pb::Lease) {
        let ctl = Arc::new(JobControl::new(lease.job_id.clone(), lease.epoch));
        self.shared.insert(ctl.clone());
        info!(job_id = %lease.job_id, epoch = lease.epoch, attempt = lease.attempt, resume = %lease.resume_checkpoint_key, "lease acquired");
        let outcome = job::execute(self, &lease, &ctl).await;
        job::finish(self, &ctl, outcome).await;
        self.shared.remove(&lease.job_id);
        let scratch = job::scratch_dir(&self.cfg.cache, &lease.job_id, lease.epoch);
        if let Err(e) = std::fs::remove_dir_all(&scratch) {
            if e.kind() != std::io::ErrorKind::NotFound {
                error!(path = %scratch.display(), error = %e, "could not remove scratch directory");
            }
        }
    }
}

/// The coordinator's storage (retried while it is unreachable); `None` from a
/// coordinator that predates GetStorage.
async fn get_storage(client: &WorkerServiceClient<Channel>) -> Result<Option<pb::GetStorageResponse>, WorkerError> {
    let mut backoff = Duration::from_millis(200);
    loop {
        let mut call = tonic::Request::new(pb::GetStorageRequest {});
        call.set_timeout(CALL_TIMEOUT);
        match client.clone().get_storage(call).await {
            Ok(r) => return Ok(Some(r.into_inner())),
            Err(s) if s.code() == tonic::Code::Unimplemented => return Ok(None),
            Err(s) if is_transient(&s) => {
                warn!(code = ?s.code(), error = %s.message(), "coordinator unreachable; retrying");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(5));
            }
            Err(s) => return Err(WorkerError::Register(s.message().to_string())),
        }
    }
}

/// The token at the coordinator's marker key in this storage, or why it cannot be read.
async fn read_marker(storage: &Storage, key: &lorafleet_storage::RelPath) -> Result<String, String> {
    match storage.get_bytes(key).await {
        Ok(b) => Ok(String::from_utf8_lossy(&b).into_owned()),
        Err(lorafleet_storage::Error::NotFound { .. }) => Err(format!("{key} not found")),
        Err(e) => Err(format!("cannot read {key}: {e}")),
    }
}

/// HTTP/2 keepalive pings to the coordinator: one every interval, the connection closed
/// when a ping is not answered within the timeout.
pub const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(2);
pub const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(3);

/// The longest wait for one unary call to the coordinator (a call that gets no answer
/// fails and is retried, rather than hanging on a dead link).
pub(crate) const CALL_TIMEOUT: Duration = Duration::from_secs(10);

/// Worth retrying: the coordinator is down, restarting or overloaded.
pub(crate) fn is_transient(s: &tonic::Status) -> bool {
    matches!(s.code(), tonic::Code::Unavailable | tonic::Code::Unknown | tonic::Code::DeadlineExceeded | tonic::Code::Cancelled | tonic::Code::ResourceExhausted | tonic::Code::Aborted)
}

//! The control loop: one dedicated thread owns the writing SQLite connection and the
//! in-memory scheduler state, and takes commands over a channel (no lock is shared with
//! the async handlers).
//!
//! Group commit: the loop drains every pending command (up to [`ControlConfig::max_batch`])
//! into one SQLite transaction, applies each against the state as it goes and commits
//! once. If a statement or the commit fails, every command of the batch gets an error and
//! the in-memory state is rebuilt from the store, which still holds the last committed
//! state.
//!
//! Pipelined fsync: the writer connection runs `synchronous=NORMAL` (a commit appends to
//! the WAL without fsync) and a second thread, the syncer, fsyncs the WAL file after
//! each commit and only then sends that batch's replies and publishes its events. So
//! nothing is acknowledged before it is durable, exactly as with `synchronous=FULL`, but
//! the loop applies the next batch while the previous one is being fsynced, and one
//! fsync covers every batch committed meanwhile. Batches are released strictly in order.
//! If an fsync fails the store is poisoned: those replies are errors and every later
//! command is refused until the coordinator restarts (and recovers from the WAL).

mod handlers;
pub mod state;

use crate::error::{CoordError, Result};
use crate::metrics::Metrics;
use crate::persistence::{self as db, DeviceInfo, JobRow};
use lorafleet_proto as pb;
use lorafleet_shared::ids::{Epoch, JobId, WorkerId};
use lorafleet_shared::job::{FailureClass, JobState};
use lorafleet_shared::spec::JobSpec;
use rusqlite::Connection;
use state::State;
use std::collections::{BTreeMap, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use tokio::sync::{broadcast, mpsc, oneshot};
use tracing::{debug, error, info, warn};

/// Settings of the control loop.
#[derive(Debug, Clone)]
pub struct ControlConfig {
    /// A lease (and a worker registration) expires this long after its last renewal.
    pub lease_ttl: Duration,
    /// What workers are told to heartbeat at.
    pub heartbeat_interval: Duration,
    /// Longest AcquireJob wait honoured.
    pub max_acquire_wait: Duration,
    /// Waiting this long is worth one priority level (zero disables aging).
    pub aging: Duration,
    /// Most commands grouped into one transaction.
    pub max_batch: usize,
    /// How often leases, workers and long polls are checked for expiry.
    pub tick: Duration,
    /// How long a gang's assembly may first hold the workers it gathered (it doubles
    /// after each round that does not complete; scheduler docs).
    pub gang_hold: Duration,
    /// Per-tenant quotas (the auth file's, reloaded with it).
    pub quotas: Arc<std::sync::RwLock<crate::quota::Quotas>>,
}

impl Default for ControlConfig {
    fn default() -> Self {
        Self {
            lease_ttl: Duration::from_secs(30),
            heartbeat_interval: Duration::from_secs(5),
            max_acquire_wait: Duration::from_secs(60),
            aging: Duration::from_secs(600),
            max_batch: 1024,
            tick: Duration::from_millis(100),
            gang_hold: Duration::from_secs(120),
            quotas: Default::default(),
        }
    }
}

pub(crate) fn unix_ms() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as i64).unwrap_or(0)
}

type Reply<T> = oneshot::Sender<Result<T>>;

/// The identity of a worker call about a job.
#[derive(Debug, Clone, Copy)]
pub struct WorkerCall {
    pub job_id: JobId,
    pub epoch: Epoch,
    pub worker: WorkerId,
}

/// A submission.
#[derive(Debug, Clone)]
pub struct NewJob {
    pub spec: JobSpec,
    /// The caller's idempotency key.
    pub key: Option<String>,
    /// Its tenant (None: no tenant).
    pub tenant: Option<String>,
    /// The spec hash idempotency compares: of the spec as the caller sent it, before the
    /// coordinator rewrote anything in it (a resolved model revision). None: `spec`'s.
    pub submitted_hash: Option<String>,
    /// The reason of the job's first event (`submitted` when empty).
    pub note: String,
}

impl NewJob {
    pub fn new(spec: JobSpec, key: Option<String>, tenant: Option<String>) -> Self {
        Self { spec, key, tenant, submitted_hash: None, note: String::new() }
    }
}

#[derive(Debug)]
pub struct SubmitOutcome {
    pub job: JobRow,
    pub created: bool,
}

#[derive(Debug, Clone)]
pub struct NewWorker {
    pub name: String,
    pub devices: Vec<DeviceInfo>,
    pub labels: BTreeMap<String, String>,
    pub version: String,
}

pub(crate) enum Command {
    Submit { job: Box<NewJob>, reply: Reply<SubmitOutcome> },
    Cancel { job_id: JobId, reason: String, reply: Reply<JobRow> },
    Register { worker: NewWorker, reply: Reply<WorkerId> },
    Heartbeat { worker: WorkerId, running: Vec<(JobId, Epoch)>, reply: Reply<Vec<pb::JobDirective>> },
    Acquire { worker: WorkerId, wait: Duration, received: Instant, reply: Reply<Option<pb::Lease>> },
    Progress {
        call: WorkerCall,
        steps: Vec<pb::StepMetrics>,
        evals: Vec<pb::EvalMetrics>,
        logs: Vec<pb::LogLine>,
        ranks: Vec<pb::RankStatus>,
        reply: Reply<bool>,
    },
    Checkpoint { call: WorkerCall, step: u64, manifest_key: String, reply: Reply<bool> },
    Complete { call: WorkerCall, adapter_manifest_key: String, final_loss: Option<f64>, reply: Reply<JobState> },
    Fail { call: WorkerCall, class: FailureClass, reason: String, reply: Reply<JobState> },
    Rendezvous { call: WorkerCall, endpoints: Vec<String>, nccl_unique_id: Vec<u8>, reply: Reply<pb::RendezvousResponse> },
    ListWorkers { include_dead: bool, reply: Reply<Vec<pb::Worker>> },
    /// A tenant uploaded a dataset (answers whether it had before).
    TenantDataset { tenant: String, sha256: String, reply: Reply<bool> },
    /// Append to the audit log (no answer: the caller does not wait for it).
    Audit { row: db::AuditRow },
    /// Shutting down: answer every long poll now and stop parking new ones.
    Drain { reply: Reply<()> },
    /// Stop the loop once the commands before it are applied (after the server is down).
    Stop { reply: Reply<()> },
    Tick,
}

impl Command {
    /// Answer with an error without running the command.
    fn reject(self, e: impl Fn() -> CoordError) {
        match self {
            Command::Submit { reply, .. } => drop(reply.send(Err(e()))),
            Command::Cancel { reply, .. } => drop(reply.send(Err(e()))),
            Command::Register { reply, .. } => drop(reply.send(Err(e()))),
            Command::Heartbeat { reply, .. } => drop(reply.send(Err(e()))),
            Command::Acquire { reply, .. } => drop(reply.send(Err(e()))),
            Command::Progress { reply, .. } => drop(reply.send(Err(e()))),
            Command::Checkpoint { reply, .. } => drop(reply.send(Err(e()))),
            Command::Complete { reply, .. } => drop(reply.send(Err(e()))),
            Command::Fail { reply, .. } => drop(reply.send(Err(e()))),
            Command::Rendezvous { reply, .. } => drop(reply.send(Err(e()))),
            Command::ListWorkers { reply, .. } => drop(reply.send(Err(e()))),
            Command::TenantDataset { reply, .. } => drop(reply.send(Err(e()))),
            Command::Drain { reply } | Command::Stop { reply } => drop(reply.send(Err(e()))),
            Command::Tick | Command::Audit { .. } => {}
        }
    }
}

/// A long-polling AcquireJob.
pub(crate) struct Waiter {
    worker: WorkerId,
    deadline: Instant,
    received: Instant,
    reply: Reply<Option<pb::Lease>>,
}

/// Cheap handle to the control loop; every method is one command and one reply.
#[derive(Clone)]
pub struct ControlHandle {
    tx: mpsc::UnboundedSender<Command>,
    events: broadcast::Sender<Arc<pb::JobEvent>>,
    pub(crate) config: Arc<ControlConfig>,
}

impl ControlHandle {
    async fn call<T>(&self, make: impl FnOnce(Reply<T>) -> Command) -> Result<T> {
        let (tx, rx) = oneshot::channel();
        self.tx.send(make(tx)).map_err(|_| CoordError::ShuttingDown)?;
        rx.await.map_err(|_| CoordError::ShuttingDown)?
    }

    pub fn subscribe(&self) -> broadcast::Receiver<Arc<pb::JobEvent>> {
        self.events.subscribe()
    }

    /// Submit a job for `tenant` (None: no tenant). The idempotency key is the caller's:
    /// keys of different tenants never meet.
    pub async fn submit(&self, spec: JobSpec, key: Option<String>, tenant: Option<String>) -> Result<SubmitOutcome> {
        self.submit_new(NewJob::new(spec, key, tenant)).await
    }
    pub async fn submit_new(&self, job: NewJob) -> Result<SubmitOutcome> {
        self.call(|reply| Command::Submit { job: Box::new(job), reply }).await
    }
    pub async fn cancel(&self, job_id: JobId, reason: String) -> Result<JobRow> {
        self.call(|reply| Command::Cancel { job_id, reason, reply }).await
    }
    pub async fn register(&self, worker: NewWorker) -> Result<WorkerId> {
        self.call(|reply| Command::Register { worker, reply }).await
    }
    pub async fn heartbeat(&self, worker: WorkerId, running: Vec<(JobId, Epoch)>) -> Result<Vec<pb::JobDirective>> {
        self.call(|reply| Command::Heartbeat { worker, running, reply }).await
    }
    pub async fn acquire(&self, worker: WorkerId, wait: Duration) -> Result<Option<pb::Lease>> {
        let wait = wait.min(self.config.max_acquire_wait);
        let received = Instant::now();
        self.call(|reply| Command::Acquire { worker, wait, received, reply }).await
    }
    pub async fn progress(
        &self,
        call: WorkerCall,
        steps: Vec<pb::StepMetrics>,
        evals: Vec<pb::EvalMetrics>,
        logs: Vec<pb::LogLine>,
        ranks: Vec<pb::RankStatus>,
    ) -> Result<bool> {
        self.call(|reply| Command::Progress { call, steps, evals, logs, ranks, reply }).await
    }
    pub async fn checkpoint(&self, call: WorkerCall, step: u64, manifest_key: String) -> Result<bool> {
        self.call(|reply| Command::Checkpoint { call, step, manifest_key, reply }).await
    }
    pub async fn complete(&self, call: WorkerCall, adapter_manifest_key: String, final_loss: Option<f64>) -> Result<JobState> {
        self.call(|reply| Command::Complete { call, adapter_manifest_key, final_loss, reply }).await
    }
    pub async fn fail(&self, call: WorkerCall, class: FailureClass, reason: String) -> Result<JobState> {
        self.call(|reply| Command::Fail { call, class, reason, reply }).await
    }
    pub async fn rendezvous(&self, call: WorkerCall, endpoints: Vec<String>, nccl_unique_id: Vec<u8>) -> Result<pb::RendezvousResponse> {
        self.call(|reply| Command::Rendezvous { call, endpoints, nccl_unique_id, reply }).await
    }
    /// Record that `tenant` uploaded dataset `sha256` (durably); whether it had before.
    pub async fn tenant_dataset(&self, tenant: String, sha256: String) -> Result<bool> {
        self.call(|reply| Command::TenantDataset { tenant, sha256, reply }).await
    }
    pub async fn list_workers(&self, include_dead: bool) -> Result<Vec<pb::Worker>> {
        self.call(|reply| Command::ListWorkers { include_dead, reply }).await
    }
    /// Append `row` to the audit table (with the next batch; not waited for).
    pub fn audit(&self, row: db::AuditRow) {
        let _ = self.tx.send(Command::Audit { row });
    }
    /// Answer every parked AcquireJob with "no job" and stop parking new ones.
    pub async fn drain(&self) {
        let _ = self.call(|reply| Command::Drain { reply }).await;
    }

    /// End the loop even if other handles are still alive (connections a shutdown
    /// abandoned): later calls answer "shutting down".
    pub async fn stop(&self) {
        let _ = self.call(|reply| Command::Stop { reply }).await;
    }
}

/// The running loop: its thread and ticker. Dropping every [`ControlHandle`] and
/// calling [`ControlLoop::join`] stops it.
pub struct ControlLoop {
    thread: Option<std::thread::JoinHandle<()>>,
    syncer: Option<std::thread::JoinHandle<()>>,
    ticker: tokio::task::JoinHandle<()>,
}

impl ControlLoop {
    /// Open the store, rebuild the state and start the loop thread and its ticker.
    pub fn start(db_path: PathBuf, config: ControlConfig, metrics: Arc<Metrics>) -> Result<(ControlHandle, ControlLoop)> {
        let mut conn = db::open_writer(&db_path)?;
        // The syncer thread fsyncs the WAL before any reply (see the module docs).
        conn.pragma_update(None, "synchronous", "NORMAL")?;
        let now = Instant::now();
        let aging_ms = config.aging.as_millis() as i64;
        let mut st = State::load(&conn, now, config.lease_ttl, aging_ms)?;
        metrics.reset_jobs(&db::count_by_state(&conn)?);
        update_gauges(&metrics, &mut st);
        info!(db = %db_path.display(), active_jobs = st.jobs.len(), queued = st.queue.len(), workers = st.workers.len(), "state loaded");
        // A restart may have left leases past their grace; nothing else to repair.
        let (tx, rx) = mpsc::unbounded_channel();
        let (events, _) = broadcast::channel(4096);
        let config = Arc::new(config);
        let handle = ControlHandle { tx: tx.clone(), events: events.clone(), config: config.clone() };
        let cfg = config.clone();
        let poisoned = Arc::new(AtomicBool::new(false));
        let (sync_tx, sync_rx) = std::sync::mpsc::channel::<handlers::Output>();
        let wal = PathBuf::from(format!("{}-wal", db_path.display()));
        let (m2, ev2, p2) = (metrics.clone(), events.clone(), poisoned.clone());
        let syncer = std::thread::Builder::new()
            .name("lorafleet-fsync".into())
            .spawn(move || sync_loop(&wal, sync_rx, &m2, &ev2, &p2))
            .map_err(|e| CoordError::Internal(format!("cannot start the fsync thread: {e}")))?;
        let thread = std::thread::Builder::new()
            .name("lorafleet-control".into())
            .spawn(move || {
                let mut lp = Loop { st, waiters: VecDeque::new(), cfg, metrics, aging_ms, sync_tx, poisoned };
                lp.run(&mut conn, rx);
            })
            .map_err(|e| CoordError::Internal(format!("cannot start the control thread: {e}")))?;
        let tick = config.tick;
        let weak = tx.downgrade();
        drop(tx);
        let ticker = tokio::spawn(async move {
            let mut iv = tokio::time::interval(tick);
            iv.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                iv.tick().await;
                let Some(tx) = weak.upgrade() else { break };
                if tx.send(Command::Tick).is_err() {
                    break;
                }
            }
        });
        Ok((handle, ControlLoop { thread: Some(thread), syncer: Some(syncer), ticker }))
    }

    /// Wait for the loop to finish (after every handle was dropped).
    pub async fn join(mut self) {
        self.ticker.abort();
        let (t, s) = (self.thread.take(), self.syncer.take());
        let _ = tokio::task::spawn_blocking(move || {
            if let Some(t) = t {
                let _ = t.join();
            }
            // The loop's end drops the syncer's sender; it drains and exits.
            if let Some(s) = s {
                let _ = s.join();
            }
        })
        .await;
    }
}

struct Loop {
    st: State,
    waiters: VecDeque<Waiter>,
    cfg: Arc<ControlConfig>,
    metrics: Arc<Metrics>,
    aging_ms: i64,
    sync_tx: std::sync::mpsc::Sender<handlers::Output>,
    poisoned: Arc<AtomicBool>,
}

/// fsync the WAL (reopened each time, in case SQLite replaced the file).
fn fsync_wal(wal: &Path) -> std::io::Result<()> {
    std::fs::File::open(wal)?.sync_data()
}

/// The syncer: make committed batches durable, then release them in order.
fn sync_loop(
    wal: &Path,
    rx: std::sync::mpsc::Receiver<handlers::Output>,
    metrics: &Metrics,
    events: &broadcast::Sender<Arc<pb::JobEvent>>,
    poisoned: &AtomicBool,
) {
    while let Ok(first) = rx.recv() {
        let mut outs = vec![first];
        while let Ok(o) = rx.try_recv() {
            outs.push(o);
        }
        let mut durable = !poisoned.load(Ordering::SeqCst);
        if durable && outs.iter().any(|o| o.wrote) {
            let t = Instant::now();
            if let Err(e) = fsync_wal(wal) {
                error!(wal = %wal.display(), error = %e, "fsync of the write-ahead log failed; refusing further writes");
                poisoned.store(true, Ordering::SeqCst);
                durable = false;
            }
            metrics.fsync_seconds.observe(t.elapsed().as_secs_f64());
        }
        for out in outs {
            if durable {
                for (from, to) in &out.deltas {
                    metrics.job_moved(*from, *to);
                }
                if out.stale_refusals > 0 {
                    metrics.stale_epochs.inc_by(out.stale_refusals);
                }
            }
            for r in out.replies {
                r(durable);
            }
            if durable {
                for e in out.events {
                    let _ = events.send(e);
                }
            }
        }
    }
}

impl Loop {
    fn run(&mut self, conn: &mut Connection, mut rx: mpsc::UnboundedReceiver<Command>) {
        while let Some(first) = rx.blocking_recv() {
            let mut cmds = vec![first];
            while cmds.len() < self.cfg.max_batch {
                match rx.try_recv() {
                    Ok(c) => cmds.push(c),
                    Err(_) => break,
                }
            }
            let stop_at = cmds.iter().position(|c| matches!(c, Command::Stop { .. }));
            if let Some(i) = stop_at {
                let rest = cmds.split_off(i);
                self.batch(conn, cmds);
                rx.close();
                for c in rest.into_iter().chain(std::iter::from_fn(|| rx.try_recv().ok())) {
                    match c {
                        Command::Stop { reply } => drop(reply.send(Ok(()))),
                        c => c.reject(|| CoordError::ShuttingDown),
                    }
                }
                break;
            }
            self.batch(conn, cmds);
        }
        for w in self.waiters.drain(..) {
            let _ = w.reply.send(Err(CoordError::ShuttingDown));
        }
        debug!("control loop stopped");
    }

    fn batch(&mut self, conn: &mut Connection, cmds: Vec<Command>) {
        let started = Instant::now();
        let n = cmds.len();
        if self.poisoned.load(Ordering::SeqCst) {
            for c in cmds {
                c.reject(|| CoordError::Unavailable("the store could not be made durable; restart the coordinator".into()));
            }
            return;
        }
        let changes_before = conn.total_changes();
        let tx = match conn.transaction() {
            Ok(tx) => tx,
            Err(e) => {
                error!(error = %e, "cannot begin a transaction");
                for c in cmds {
                    c.reject(|| CoordError::Unavailable("store unavailable; retry".into()));
                }
                return;
            }
        };
        let mut ctx = handlers::Ctx::new(&tx, &mut self.st, &self.cfg, &self.metrics);
        let mut failed: Option<String> = None;
        for c in cmds {
            if failed.is_some() {
                c.reject(|| CoordError::Unavailable("store write failed; nothing was changed, retry".into()));
                continue;
            }
            if let Err(e) = ctx.handle(c, &mut self.waiters) {
                failed = Some(e.to_string());
            }
        }
        if failed.is_none() && ctx.wake {
            if let Err(e) = ctx.serve_waiters(&mut self.waiters) {
                failed = Some(e.to_string());
            }
        }
        let mut out = ctx.finish();
        let committed = match failed {
            None => match tx.commit() {
                Ok(()) => true,
                Err(e) => {
                    error!(error = %e, "commit failed");
                    false
                }
            },
            Some(e) => {
                error!(error = %e, commands = n, "store write failed; rolling back the batch");
                drop(tx);
                false
            }
        };
        self.metrics.commit_seconds.observe(started.elapsed().as_secs_f64());
        self.metrics.batch_size.observe(n as f64);
        if committed {
            out.wrote = conn.total_changes() != changes_before;
            if let Err(std::sync::mpsc::SendError(out)) = self.sync_tx.send(out) {
                for r in out.replies {
                    r(false);
                }
            }
        } else {
            for r in out.replies {
                r(false);
            }
            match State::load(conn, Instant::now(), self.cfg.lease_ttl, self.aging_ms) {
                Ok(mut st) => {
                    warn!(active_jobs = st.jobs.len(), "state reloaded from the store after a failed batch");
                    st.draining = self.st.draining;
                    self.st = st;
                }
                Err(e) => error!(error = %e, "reloading state failed; keeping the previous state"),
            }
        }
        update_gauges(&self.metrics, &mut self.st);
    }
}

/// The gauges read off the state after each batch (ticks included, so the queue's age
/// stays current): workers, leases, the queue by device kind, workers by pool (only
/// recomputed when a worker registered or expired).
fn update_gauges(metrics: &Metrics, st: &mut State) {
    metrics.workers.set(st.alive_workers() as i64);
    metrics.live_leases.set(st.live_leases() as i64);
    metrics.set_queue(st.queue.by_device(), unix_ms());
    if std::mem::take(&mut st.roster_changed) {
        metrics.set_pool_workers(&st.workers_by_pool());
    }
}

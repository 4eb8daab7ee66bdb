//! The control loop's in-memory view of the store: non-final jobs, their leases, the
//! queue and the workers. Rebuilt from SQLite at start and after any failed batch
//! ([`State::load`]), so it can never drift from the source of truth for long.

use crate::persistence::{self as db, DeviceInfo, WorkerRow};
use crate::scheduler::{Queue, QueuedJob};
use crate::error::Result;
use lorafleet_shared::ids::{Epoch, JobId, WorkerId};
use lorafleet_shared::job::JobState;
use lorafleet_shared::spec::JobSpec;
use rusqlite::Connection;
use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

#[derive(Debug, Clone)]
pub struct LeaseInfo {
    pub worker: WorkerId,
    pub devices: Vec<u32>,
    pub deadline: Instant,
    pub granted: Instant,
}

#[derive(Debug, Clone)]
pub struct ActiveJob {
    pub seq: i64,
    pub spec: Arc<JobSpec>,
    pub state: JobState,
    pub attempt: u32,
    pub epoch: Epoch,
    pub created_ms: i64,
    /// Some exactly when `state.has_lease()`.
    pub lease: Option<LeaseInfo>,
    pub latest_checkpoint: Option<String>,
    pub event_seq: u64,
    pub log_seq: u64,
}

impl ActiveJob {
    pub fn queued_entry(&self, id: JobId) -> QueuedJob {
        QueuedJob {
            id,
            seq: self.seq,
            priority: self.spec.priority,
            created_ms: self.created_ms,
            resources: self.spec.resources.clone(),
        }
    }
}

#[derive(Debug, Clone)]
pub struct WorkerState {
    pub row: WorkerRow,
    pub last_seen: Instant,
    pub alive: bool,
    /// Jobs this worker holds a lease on.
    pub jobs: HashSet<JobId>,
    /// Device indices assigned to those leases.
    pub busy: HashSet<u32>,
}

impl WorkerState {
    pub fn devices(&self) -> &[DeviceInfo] {
        &self.row.devices
    }
}

#[derive(Debug, Default)]
pub struct State {
    pub jobs: HashMap<JobId, ActiveJob>,
    pub queue: Queue,
    pub workers: HashMap<WorkerId, WorkerState>,
    /// Shutting down: long polls are not parked.
    pub draining: bool,
}

impl State {
    /// Rebuild from the store. Every live lease and every alive worker gets a full
    /// `grace` from `now`: heartbeat times are not stored, so workers get one TTL to
    /// reach the (restarted) coordinator.
    pub fn load(conn: &Connection, now: Instant, grace: Duration, aging_ms: i64) -> Result<State> {
        let mut st = State { queue: Queue::new(aging_ms), ..Default::default() };
        for w in db::load_workers(conn, false)? {
            let id = w.id;
            st.workers.insert(id, WorkerState { row: w, last_seen: now, alive: true, jobs: HashSet::new(), busy: HashSet::new() });
        }
        for row in db::load_active_jobs(conn)? {
            let (event_seq, log_seq) = db::max_seqs(conn, &row.id)?;
            let lease = if row.state.has_lease() {
                match row.worker_id {
                    Some(w) => {
                        let devices = db::attempt_devices(conn, &row.id, row.epoch)?;
                        if let Some(ws) = st.workers.get_mut(&w) {
                            ws.jobs.insert(row.id);
                            ws.busy.extend(devices.iter().copied());
                        }
                        Some(LeaseInfo { worker: w, devices, deadline: now + grace, granted: now })
                    }
                    // A leased job without a worker cannot be renewed: expire it at once.
                    None => Some(LeaseInfo { worker: WorkerId::new(), devices: Vec::new(), deadline: now, granted: now }),
                }
            } else {
                None
            };
            let job = ActiveJob {
                seq: row.seq,
                spec: Arc::new(row.spec),
                state: row.state,
                attempt: row.attempt,
                epoch: row.epoch,
                created_ms: row.created_ms,
                lease,
                latest_checkpoint: row.latest_checkpoint,
                event_seq,
                log_seq,
            };
            if job.state == JobState::Queued {
                st.queue.push(job.queued_entry(row.id));
            }
            st.jobs.insert(row.id, job);
        }
        Ok(st)
    }

    pub fn live_leases(&self) -> usize {
        self.workers.values().map(|w| w.jobs.len()).sum()
    }

    pub fn alive_workers(&self) -> usize {
        self.workers.values().filter(|w| w.alive).count()
    }

    /// Give a lease's devices back to its worker.
    pub fn release(&mut self, job_id: &JobId, lease: &LeaseInfo) {
        if let Some(ws) = self.workers.get_mut(&lease.worker) {
            ws.jobs.remove(job_id);
            for d in &lease.devices {
                ws.busy.remove(d);
            }
        }
    }
}

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

/// One worker's part of a lease: node `i` of a gang is `members[i]`.
#[derive(Debug, Clone)]
pub struct Member {
    pub worker: WorkerId,
    pub devices: Vec<u32>,
    pub deadline: Instant,
}

/// The live lease of a job: one member, or one per node of a gang, all under the job's
/// epoch. The attempt ends for every member when any member's lease does.
#[derive(Debug, Clone)]
pub struct LeaseInfo {
    pub members: Vec<Member>,
    pub granted: Instant,
}

impl LeaseInfo {
    pub fn single(worker: WorkerId, devices: Vec<u32>, deadline: Instant, granted: Instant) -> Self {
        Self { members: vec![Member { worker, devices, deadline }], granted }
    }
    /// Node 0's worker (the one that commits checkpoints and completes the attempt).
    pub fn leader(&self) -> WorkerId {
        self.members.first().map(|m| m.worker).unwrap_or_default()
    }
    /// The node rank of `worker` in this lease.
    pub fn node_of(&self, worker: &WorkerId) -> Option<usize> {
        self.members.iter().position(|m| m.worker == *worker)
    }
    /// The member whose lease runs out first.
    pub fn first_expiring(&self) -> Option<&Member> {
        self.members.iter().min_by_key(|m| m.deadline)
    }
    pub fn is_gang(&self) -> bool {
        self.members.len() > 1
    }
}

/// A parked gang: until when (`None`: until enough workers that fit it are alive).
#[derive(Debug, Clone)]
pub struct GangWait {
    pub until: Option<Instant>,
    pub next_hold: Duration,
}

/// What the members of a gang told Rendezvous (in memory only: members re-send it on
/// every poll, so a coordinator restart loses nothing).
#[derive(Debug, Clone, Default)]
pub struct Rendezvous {
    pub endpoints: std::collections::BTreeMap<usize, Vec<String>>,
    pub nccl_unique_id: Vec<u8>,
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
    /// Gang members' rendezvous of the current attempt.
    pub rendezvous: Rendezvous,
    /// The latest progress of each rank of the current attempt (multi-rank jobs).
    pub ranks: std::collections::BTreeMap<u32, lorafleet_proto::RankStatus>,
    /// Why the job waits in the queue, as last stored.
    pub waiting_reason: Option<String>,
    /// Its tenant (`""`: none).
    pub tenant: crate::scheduler::Tenant,
}

impl ActiveJob {
    pub fn queued_entry(&self, id: JobId) -> QueuedJob {
        QueuedJob {
            id,
            seq: self.seq,
            priority: self.spec.priority,
            created_ms: self.created_ms,
            resources: self.spec.resources.clone(),
            tenant: self.tenant.clone(),
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
    /// Gangs being assembled: the workers held for each (scheduler docs).
    pub assemblies: HashMap<JobId, crate::scheduler::Assembly>,
    /// Gangs parked out of the queue's order, and the hold of their next assembly.
    pub gang_waits: HashMap<JobId, GangWait>,
    /// Leases of a dispatched gang not yet handed to their workers (by the next
    /// AcquireJob of each; a member that never asks lets its lease expire).
    pub pending: HashMap<WorkerId, Vec<lorafleet_proto::Lease>>,
    /// A worker registered or expired since `lorafleet_workers` was last set.
    pub roster_changed: bool,
}

impl State {
    /// Rebuild from the store. Every live lease and every alive worker gets a full
    /// `grace` from `now`: heartbeat times are not stored, so workers get one TTL to
    /// reach the (restarted) coordinator.
    pub fn load(conn: &Connection, now: Instant, grace: Duration, aging_ms: i64) -> Result<State> {
        let mut st = State { queue: Queue::new(aging_ms), roster_changed: true, ..Default::default() };
        for w in db::load_workers(conn, false)? {
            let id = w.id;
            st.workers.insert(id, WorkerState { row: w, last_seen: now, alive: true, jobs: HashSet::new(), busy: HashSet::new() });
        }
        for row in db::load_active_jobs(conn)? {
            let (event_seq, log_seq) = db::max_seqs(conn, &row.id)?;
            let lease = if row.state.has_lease() {
                let mut members = db::attempt_members(conn, &row.id, row.epoch)?;
                if members.is_empty() {
                    // Attempts dispatched before gangs existed: the attempt row's worker.
                    if let Some(w) = row.worker_id {
                        members.push((w, db::attempt_devices(conn, &row.id, row.epoch)?));
                    }
                }
                if members.is_empty() {
                    // A leased job without a worker cannot be renewed: expire it at once.
                    Some(LeaseInfo::single(WorkerId::new(), Vec::new(), now, now))
                } else {
                    for (w, devices) in &members {
                        if let Some(ws) = st.workers.get_mut(w) {
                            ws.jobs.insert(row.id);
                            ws.busy.extend(devices.iter().copied());
                        }
                    }
                    let members = members.into_iter().map(|(worker, devices)| Member { worker, devices, deadline: now + grace }).collect();
                    Some(LeaseInfo { members, granted: now })
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
                rendezvous: Rendezvous::default(),
                ranks: Default::default(),
                waiting_reason: row.waiting_reason.clone(),
                tenant: row.tenant.as_deref().unwrap_or("").into(),
            };
            if job.state == JobState::Queued {
                st.queue.push(job.queued_entry(row.id));
            }
            st.jobs.insert(row.id, job);
        }
        Ok(st)
    }

    /// What each tenant's leased jobs hold (fair share and quotas).
    pub fn tenant_loads(&self) -> HashMap<crate::scheduler::Tenant, crate::quota::TenantLoad> {
        let mut seen = HashSet::new();
        let mut out: HashMap<crate::scheduler::Tenant, crate::quota::TenantLoad> = HashMap::new();
        for id in self.workers.values().flat_map(|w| w.jobs.iter()) {
            if !seen.insert(*id) {
                continue;
            }
            let Some(job) = self.jobs.get(id) else { continue };
            let Some(lease) = &job.lease else { continue };
            let l = out.entry(job.tenant.clone()).or_default();
            l.running_jobs += 1;
            l.devices += lease.members.iter().map(|m| m.devices.len() as u32).sum::<u32>();
        }
        out
    }

    pub fn live_leases(&self) -> usize {
        self.workers.values().map(|w| w.jobs.len()).sum()
    }

    pub fn alive_workers(&self) -> usize {
        self.workers.values().filter(|w| w.alive).count()
    }

    /// Alive workers by (pool, device kind): a worker's pool is its `pool` label
    /// (`default` without one); it counts once for each device kind it offers.
    pub fn workers_by_pool(&self) -> std::collections::BTreeMap<(String, String), i64> {
        let mut out = std::collections::BTreeMap::new();
        for w in self.workers.values().filter(|w| w.alive) {
            let pool = w.row.labels.get("pool").filter(|p| !p.is_empty()).map(String::as_str).unwrap_or("default");
            let mut kinds: Vec<&str> = w.row.devices.iter().map(|d| crate::metrics::DEVICE_KINDS[crate::scheduler::kind_index(d.kind)]).collect();
            kinds.sort_unstable();
            kinds.dedup();
            for k in kinds {
                *out.entry((pool.to_string(), k.to_string())).or_insert(0) += 1;
            }
        }
        out
    }

    /// Give a lease's devices back to its workers.
    pub fn release(&mut self, job_id: &JobId, lease: &LeaseInfo) {
        for m in &lease.members {
            if let Some(ws) = self.workers.get_mut(&m.worker) {
                ws.jobs.remove(job_id);
                for d in &m.devices {
                    ws.busy.remove(d);
                }
            }
        }
    }
}

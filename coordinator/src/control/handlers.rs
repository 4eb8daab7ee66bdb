//! One function per command. Each validates against the in-memory state, writes the
//! store (inside the batch's transaction), then updates memory; replies and events are
//! queued and released only after the batch commits.

use super::state::{ActiveJob, GangWait, LeaseInfo, Member, State, WorkerState};
use super::{Command, ControlConfig, NewJob, NewWorker, Reply, SubmitOutcome, Waiter, WorkerCall};
use crate::error::{CoordError, Result};
use crate::metrics::Metrics;
use crate::persistence::{self as db, CheckpointRow, JobRow, LogRow, WorkerRow};
use crate::scheduler::{could_fit, Assembly, Pick, QueuedJob};
use lorafleet_proto as pb;
use lorafleet_proto::convert::{device_kind_to_pb, spec_to_pb, state_to_pb};
use lorafleet_shared::ids::{Epoch, JobId, WorkerId};
use lorafleet_shared::job::{FailureClass, JobState, Transition};

/// How many older committed checkpoints a lease names to fall back to.
const FALLBACK_CHECKPOINTS: usize = 3;
use pb::job_event::Event;
use prost::Message;
use rusqlite::Connection;
use std::collections::{HashSet, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tracing::{info, warn};

type ReplyFn = Box<dyn FnOnce(bool) + Send>;

pub(super) struct Output {
    /// The batch changed the database (its commit needs an fsync before release).
    pub wrote: bool,
    pub replies: Vec<ReplyFn>,
    pub events: Vec<Arc<pb::JobEvent>>,
    pub deltas: Vec<(Option<JobState>, JobState)>,
    pub stale_refusals: u64,
}

pub(super) struct Ctx<'a> {
    conn: &'a Connection,
    st: &'a mut State,
    cfg: &'a ControlConfig,
    metrics: &'a Arc<Metrics>,
    now: Instant,
    now_ms: i64,
    replies: Vec<ReplyFn>,
    events: Vec<Arc<pb::JobEvent>>,
    deltas: Vec<(Option<JobState>, JobState)>,
    stale_refusals: u64,
    /// Something may now match a waiting AcquireJob.
    pub wake: bool,
}

/// A store failure aborts the whole batch; any other error is the command's answer.
fn is_fatal(e: &CoordError) -> bool {
    matches!(e, CoordError::Store(_) | CoordError::Internal(_))
}

fn illegal(e: lorafleet_shared::job::IllegalTransition) -> CoordError {
    CoordError::FailedPrecondition(e.to_string())
}

/// Append an event for a job: stored now, published after commit.
fn emit(conn: &Connection, events: &mut Vec<Arc<pb::JobEvent>>, now_ms: i64, id: &JobId, job: &mut ActiveJob, ev: Event) -> Result<()> {
    let e = pb::JobEvent { seq: job.event_seq + 1, job_id: id.to_string(), unix_ms: now_ms, event: Some(ev) };
    db::insert_event(conn, id, e.seq, &e.encode_to_vec())?;
    job.event_seq = e.seq;
    events.push(Arc::new(e));
    Ok(())
}

fn state_change(from: Option<JobState>, to: JobState, job: &ActiveJob, worker: Option<&WorkerId>, reason: &str) -> Event {
    Event::StateChange(pb::StateChange {
        from: from.map(state_to_pb).unwrap_or(pb::JobState::Unspecified) as i32,
        to: state_to_pb(to) as i32,
        attempt: job.attempt,
        epoch: job.epoch.get(),
        worker_id: worker.map(|w| w.to_string()).unwrap_or_default(),
        reason: reason.to_string(),
    })
}

impl<'a> Ctx<'a> {
    pub fn new(conn: &'a Connection, st: &'a mut State, cfg: &'a ControlConfig, metrics: &'a Arc<Metrics>) -> Self {
        Self {
            conn,
            st,
            cfg,
            metrics,
            now: Instant::now(),
            now_ms: super::unix_ms(),
            replies: Vec::new(),
            events: Vec::new(),
            deltas: Vec::new(),
            stale_refusals: 0,
            wake: false,
        }
    }

    pub fn finish(self) -> Output {
        Output { wrote: true, replies: self.replies, events: self.events, deltas: self.deltas, stale_refusals: self.stale_refusals }
    }

    fn reply<T: Send + 'static>(&mut self, tx: Reply<T>, r: Result<T>) {
        self.replies.push(Box::new(move |committed| {
            let r = if committed { r } else { Err(CoordError::Unavailable("store write failed or was not made durable; retry".into())) };
            let _ = tx.send(r);
        }));
    }

    /// Queue the command's answer; a fatal error aborts the batch.
    fn answer<T: Send + 'static>(&mut self, tx: Reply<T>, r: Result<T>) -> Result<()> {
        match r {
            Err(e) if is_fatal(&e) => {
                let msg = e.to_string();
                self.reply(tx, Err(e));
                Err(CoordError::Internal(msg))
            }
            r => {
                self.reply(tx, r);
                Ok(())
            }
        }
    }

    pub fn handle(&mut self, cmd: Command, waiters: &mut VecDeque<Waiter>) -> Result<()> {
        match cmd {
            Command::Submit { job, reply } => {
                let r = self.submit(*job);
                self.answer(reply, r)
            }
            Command::Audit { row } => {
                db::insert_audit(self.conn, std::slice::from_ref(&row))?;
                Ok(())
            }
            Command::Cancel { job_id, reason, reply } => {
                let r = self.cancel(job_id, &reason);
                self.answer(reply, r)
            }
            Command::Register { worker, reply } => {
                let r = self.register(worker);
                self.answer(reply, r)
            }
            Command::Heartbeat { worker, running, reply } => {
                let r = self.heartbeat(worker, running);
                self.answer(reply, r)
            }
            Command::Acquire { worker, wait, received, reply } => match self.try_dispatch(worker) {
                Ok(None) if !wait.is_zero() && !self.st.draining => {
                    waiters.push_back(Waiter { worker, deadline: self.now + wait, received, reply });
                    Ok(())
                }
                r => self.answer_lease(reply, received, r),
            },
            Command::Progress { call, steps, evals, logs, ranks, reply } => {
                let r = self.progress(call, steps, evals, logs, ranks);
                self.answer(reply, r)
            }
            Command::Checkpoint { call, step, manifest_key, reply } => {
                let r = self.checkpoint(call, step, manifest_key);
                self.answer(reply, r)
            }
            Command::Complete { call, adapter_manifest_key, final_loss, reply } => {
                let r = self.complete(call, &adapter_manifest_key, final_loss);
                self.answer(reply, r)
            }
            Command::Fail { call, class, reason, reply } => {
                let r = self.fail(call, class, &reason);
                self.answer(reply, r)
            }
            Command::Rendezvous { call, endpoints, nccl_unique_id, reply } => {
                let r = self.rendezvous(call, endpoints, nccl_unique_id);
                self.answer(reply, r)
            }
            Command::TenantDataset { tenant, sha256, reply } => {
                let r = db::record_tenant_dataset(self.conn, &tenant, &sha256, self.now_ms);
                self.answer(reply, r)
            }
            Command::ListWorkers { include_dead, reply } => {
                let r = self.list_workers(include_dead);
                self.answer(reply, r)
            }
            Command::Drain { reply } => {
                self.st.draining = true;
                for w in waiters.drain(..) {
                    self.reply(w.reply, Ok(None));
                }
                self.reply(reply, Ok(()));
                Ok(())
            }
            // The loop itself handles Stop; one that reaches here is just answered.
            Command::Stop { reply } => {
                self.reply(reply, Ok(()));
                Ok(())
            }
            Command::Tick => self.tick(waiters),
        }
    }

    fn answer_lease(&mut self, reply: Reply<Option<pb::Lease>>, received: Instant, r: Result<Option<pb::Lease>>) -> Result<()> {
        if matches!(r, Ok(Some(_))) {
            let m = self.metrics.clone();
            self.replies.push(Box::new(move |committed| {
                if committed {
                    m.dispatch_latency.observe(received.elapsed().as_secs_f64());
                }
            }));
        }
        self.answer(reply, r)
    }

    // ---- jobs ------------------------------------------------------------------------

    fn submit(&mut self, new: NewJob) -> Result<SubmitOutcome> {
        let NewJob { spec, key, tenant, submitted_hash, note } = new;
        let hash = submitted_hash.unwrap_or_else(|| db::spec_hash(&spec));
        let note = if note.is_empty() { "submitted".to_string() } else { note };
        // Stored keys are scoped by tenant (a control character no user key contains).
        let key = key.map(|k| match &tenant {
            Some(t) => format!("{t}\u{1f}{k}"),
            None => k,
        });
        if let Some(k) = &key {
            if let Some(existing) = db::find_by_idempotency_key(self.conn, k)? {
                if existing.spec_hash == hash {
                    return Ok(SubmitOutcome { job: existing, created: false });
                }
                let shown = k.rsplit_once('\u{1f}').map(|(_, k)| k).unwrap_or(k).to_string();
                return Err(CoordError::IdempotencyConflict { key: shown, job_id: existing.id });
            }
        }
        let tenant_name: crate::scheduler::Tenant = tenant.as_deref().unwrap_or("").into();
        let devices = spec.resources.ranks() as u32;
        let refusal = self.cfg.quotas.read().unwrap_or_else(|e| e.into_inner()).refuse_submit(&tenant_name, self.st.queue.queued_of(&tenant_name), devices);
        if let Some(why) = refusal {
            self.metrics.refused("quota");
            return Err(CoordError::ResourceExhausted(why));
        }
        let mut row = JobRow {
            seq: 0,
            id: JobId::new(),
            spec,
            spec_hash: hash,
            idempotency_key: key,
            state: JobState::Queued,
            attempt: 0,
            epoch: Epoch::ZERO,
            worker_id: None,
            step: 0,
            total_steps: 0,
            loss: None,
            latest_checkpoint: None,
            adapter_manifest: None,
            error: None,
            failure_class: None,
            created_ms: self.now_ms,
            updated_ms: self.now_ms,
            waiting_reason: None,
            tenant,
        };
        row.seq = db::insert_job(self.conn, &row)?;
        let mut job = ActiveJob {
            seq: row.seq,
            spec: Arc::new(row.spec.clone()),
            state: JobState::Queued,
            attempt: 0,
            epoch: Epoch::ZERO,
            created_ms: row.created_ms,
            lease: None,
            latest_checkpoint: None,
            event_seq: 0,
            log_seq: 0,
            rendezvous: Default::default(),
            ranks: Default::default(),
            waiting_reason: None,
            tenant: tenant_name,
        };
        let ev = state_change(None, JobState::Queued, &job, None, &note);
        emit(self.conn, &mut self.events, self.now_ms, &row.id, &mut job, ev)?;
        self.st.queue.push(job.queued_entry(row.id));
        self.st.jobs.insert(row.id, job);
        self.deltas.push((None, JobState::Queued));
        self.wake = true;
        info!(job_id = %row.id, name = %row.spec.name, priority = row.spec.priority, "job submitted");
        Ok(SubmitOutcome { job: row, created: true })
    }

    fn cancel(&mut self, id: JobId, reason: &str) -> Result<JobRow> {
        let reason = if reason.is_empty() { "cancelled by user" } else { reason };
        if let Some(job) = self.st.jobs.get_mut(&id) {
            let from = job.state;
            let to = from.transition(Transition::Cancel).map_err(illegal)?;
            if from != to {
                let worker = job.lease.as_ref().map(|l| l.leader());
                // Cancelling keeps the lease (and its worker) until the worker stops.
                let keep = if to == JobState::Cancelling { worker } else { None };
                db::update_state(self.conn, &id, to, keep.as_ref(), Some(reason), None, None, self.now_ms)?;
                let ev = state_change(Some(from), to, job, worker.as_ref(), reason);
                emit(self.conn, &mut self.events, self.now_ms, &id, job, ev)?;
                job.state = to;
                self.deltas.push((Some(from), to));
                if to.is_final() {
                    self.st.queue.remove(&id);
                    self.st.jobs.remove(&id);
                    self.forget_gang(&id);
                }
                info!(job_id = %id, from = %from, to = %to, "job cancel requested");
            }
        }
        db::get_job(self.conn, &id)?.ok_or(CoordError::NotFound { what: "job", id: id.to_string() })
    }

    // ---- workers ---------------------------------------------------------------------

    fn register(&mut self, w: NewWorker) -> Result<WorkerId> {
        let row = WorkerRow {
            id: WorkerId::new(),
            name: w.name,
            devices: w.devices,
            labels: w.labels,
            version: w.version,
            registered_ms: self.now_ms,
            alive: true,
        };
        db::insert_worker(self.conn, &row)?;
        let id = row.id;
        info!(worker_id = %id, name = %row.name, devices = row.devices.len(), version = %row.version, "worker registered");
        self.st.workers.insert(id, WorkerState { row, last_seen: self.now, alive: true, jobs: HashSet::new(), busy: HashSet::new() });
        self.st.roster_changed = true;
        self.wake = true;
        Ok(id)
    }

    fn live_worker(&mut self, id: &WorkerId) -> Result<&mut WorkerState> {
        match self.st.workers.get_mut(id) {
            Some(w) if w.alive => {
                w.last_seen = self.now;
                Ok(w)
            }
            _ => Err(CoordError::NotFound { what: "worker (register again)", id: id.to_string() }),
        }
    }

    fn heartbeat(&mut self, worker: WorkerId, running: Vec<(JobId, Epoch)>) -> Result<Vec<pb::JobDirective>> {
        let held: Vec<JobId> = self.live_worker(&worker)?.jobs.iter().copied().collect();
        let deadline = self.now + self.cfg.lease_ttl;
        let mut directives = Vec::with_capacity(running.len());
        let mut listed = HashSet::new();
        for (id, epoch) in running {
            listed.insert(id);
            let action = match self.st.jobs.get_mut(&id) {
                Some(job) if job.epoch == epoch && job.lease.as_ref().is_some_and(|l| l.node_of(&worker).is_some()) => {
                    if let Some(m) = job.lease.as_mut().and_then(|l| l.members.iter_mut().find(|m| m.worker == worker)) {
                        m.deadline = deadline;
                    }
                    if job.state == JobState::Cancelling {
                        pb::JobAction::Cancel
                    } else {
                        pb::JobAction::Continue
                    }
                }
                _ => {
                    warn!(worker_id = %worker, job_id = %id, epoch = epoch.get(), "heartbeat for a lease that is not live; abandon");
                    pb::JobAction::Abandon
                }
            };
            directives.push(pb::JobDirective { job_id: id.to_string(), epoch: epoch.get(), action: action as i32 });
        }
        // A cancelling job the worker no longer runs has stopped (the grace of one
        // heartbeat interval covers a heartbeat sent before the lease reached it).
        for id in held {
            if listed.contains(&id) {
                continue;
            }
            // (For a gang, node 0's worker stopping is what counts.)
            let stopped = self.st.jobs.get(&id).is_some_and(|j| {
                j.state == JobState::Cancelling
                    && j.lease.as_ref().is_some_and(|l| l.leader() == worker && l.granted + self.cfg.heartbeat_interval <= self.now)
            });
            if stopped {
                self.end_lease(id, Transition::WorkerStopped, "cancelled", "worker stopped after cancel", None, None)?;
            }
        }
        Ok(directives)
    }

    /// The lease for this worker's AcquireJob, if there is one: a gang lease waiting for
    /// it, else the best job that fits (written before the lease exists anywhere else),
    /// else nothing, also while the worker is held by a gang's assembly.
    pub fn try_dispatch(&mut self, worker: WorkerId) -> Result<Option<pb::Lease>> {
        let ws = self.live_worker(&worker)?;
        let (devices, busy) = (ws.row.devices.clone(), ws.busy.clone());
        if let Some(list) = self.st.pending.get_mut(&worker) {
            let lease = list.pop();
            if list.is_empty() {
                self.st.pending.remove(&worker);
            }
            if lease.is_some() {
                return Ok(lease);
            }
        }
        if self.st.assemblies.values().any(|a| a.members.iter().any(|(w, _)| *w == worker)) {
            return Ok(None);
        }
        let load = self.st.tenant_loads();
        let quotas = self.cfg.quotas.clone();
        let quotas = quotas.read().unwrap_or_else(|e| e.into_inner());
        let fair = crate::scheduler::Fairness { load: &load, quotas: &quotas };
        // A gang parked for lack of workers leaves the order; look again.
        for _ in 0..16 {
            let mut held = Vec::new();
            let pick = self.st.queue.pick_fair(worker, &devices, &busy, fair, &mut held);
            for (id, reason) in held {
                self.set_waiting_reason(id, Some(reason))?;
            }
            match pick {
                None => return Ok(None),
                Some(Pick::Take(q, assigned)) => {
                    let mut leases = self.dispatch(q, vec![(worker, assigned)])?;
                    return Ok(leases.pop().map(|(_, l)| l));
                }
                Some(Pick::Join(q, assigned)) => {
                    if let Some(r) = self.join_gang(worker, q, assigned)? {
                        return Ok(r);
                    }
                }
            }
        }
        Ok(None)
    }

    /// Workers alive that could run one node of `res` (ignoring what they run now).
    fn capable_workers(&self, res: &lorafleet_shared::spec::ResourceSpec) -> usize {
        self.st.workers.values().filter(|w| w.alive && could_fit(res, w.devices())).count()
    }

    /// `worker` joins the assembly of gang `q` with `devices`. Returns `Some(answer)` for
    /// the AcquireJob (a lease once the gang is complete, `None` while it is held), or
    /// `None` when the gang was parked instead and the worker should look further.
    fn join_gang(&mut self, worker: WorkerId, q: QueuedJob, devices: Vec<u32>) -> Result<Option<Option<pb::Lease>>> {
        let res = q.resources.clone();
        let nodes = res.nodes as usize;
        let capable = self.capable_workers(&res);
        let hold = self.st.gang_waits.get(&q.id).map(|g| g.next_hold).unwrap_or(self.cfg.gang_hold);
        if capable < nodes {
            let reason = Self::missing_workers_reason(&res, capable);
            self.park_gang(q.id, GangWait { until: None, next_hold: hold }, reason)?;
            return Ok(None);
        }
        let now = self.now;
        // (Members that die leave every assembly when the tick declares them dead.)
        let a = self.st.assemblies.entry(q.id).or_insert_with(|| Assembly { members: Vec::new(), started: now, hold });
        if !a.members.iter().any(|(w, _)| *w == worker) {
            a.members.push((worker, devices));
        }
        if a.members.len() < nodes {
            let reason = format!(
                "gang of {nodes} nodes: {} worker(s) held, waiting for {} more to be free (holding them for up to {}s)",
                a.members.len(),
                nodes - a.members.len(),
                a.hold.as_secs()
            );
            self.set_waiting_reason(q.id, Some(reason))?;
            return Ok(Some(None));
        }
        let a = self.st.assemblies.remove(&q.id).expect("assembly exists");
        self.st.queue.remove(&q.id);
        self.st.gang_waits.remove(&q.id);
        let leases = self.dispatch(q, a.members)?;
        let mut mine = None;
        for (w, l) in leases {
            if w == worker {
                mine = Some(l);
            } else {
                self.st.pending.entry(w).or_default().push(l);
                self.wake = true;
            }
        }
        Ok(Some(mine))
    }

    fn missing_workers_reason(res: &lorafleet_shared::spec::ResourceSpec, capable: usize) -> String {
        let nodes = res.nodes as usize;
        format!(
            "gang of {nodes} nodes: {capable} registered worker(s) can run a node ({} {:?} device(s) each); waiting for {} more worker(s) to register",
            res.count,
            res.device,
            nodes.saturating_sub(capable)
        )
        .to_lowercase()
    }

    /// Take a gang out of the order for a while (`wait`), with the reason shown.
    fn park_gang(&mut self, id: JobId, wait: GangWait, reason: String) -> Result<()> {
        self.st.queue.park(&id);
        self.st.assemblies.remove(&id);
        self.st.gang_waits.insert(id, wait);
        self.set_waiting_reason(id, Some(reason))?;
        self.wake = true;
        Ok(())
    }

    /// Drop every trace of a gang that left the queue (its held workers may take other jobs).
    fn forget_gang(&mut self, id: &JobId) {
        if self.st.assemblies.remove(id).is_some() {
            self.wake = true;
        }
        self.st.gang_waits.remove(id);
    }

    fn set_waiting_reason(&mut self, id: JobId, reason: Option<String>) -> Result<()> {
        let Some(job) = self.st.jobs.get_mut(&id) else { return Ok(()) };
        if job.waiting_reason != reason {
            db::set_waiting_reason(self.conn, &id, reason.as_deref())?;
            if let Some(r) = &reason {
                info!(job_id = %id, reason = %r, "job waiting");
            }
            job.waiting_reason = reason;
        }
        Ok(())
    }

    /// Dispatch queued job `q` (already out of the queue) to `members` (node 0 first):
    /// one new epoch and attempt, every member recorded, all in this transaction.
    /// Returns each member's lease.
    fn dispatch(&mut self, q: QueuedJob, members: Vec<(WorkerId, Vec<u32>)>) -> Result<Vec<(WorkerId, pb::Lease)>> {
        let Some(job) = self.st.jobs.get_mut(&q.id) else {
            return Err(CoordError::Internal(format!("queued job {} has no state", q.id)));
        };
        let (leader, leader_devices) = members.first().cloned().ok_or_else(|| CoordError::Internal("dispatch without members".into()))?;
        let from = job.state;
        let to = from.transition(Transition::Dispatch).map_err(|e| CoordError::Internal(e.to_string()))?;
        let epoch = job.epoch.next();
        let attempt = job.attempt + 1;
        db::record_dispatch(self.conn, &q.id, attempt, epoch, &leader, &leader_devices, self.now_ms)?;
        db::insert_attempt_members(self.conn, &q.id, epoch, &members)?;
        db::clear_ranks(self.conn, &q.id)?;
        if job.waiting_reason.take().is_some() {
            db::set_waiting_reason(self.conn, &q.id, None)?;
        }
        job.epoch = epoch;
        job.attempt = attempt;
        let reason = if members.len() > 1 { format!("dispatched to a gang of {} workers", members.len()) } else { "dispatched".into() };
        let ev = state_change(Some(from), to, job, Some(&leader), &reason);
        emit(self.conn, &mut self.events, self.now_ms, &q.id, job, ev)?;
        job.state = to;
        job.rendezvous = Default::default();
        job.ranks.clear();
        let deadline = self.now + self.cfg.lease_ttl;
        job.lease = Some(LeaseInfo {
            members: members.iter().map(|(w, d)| Member { worker: *w, devices: d.clone(), deadline }).collect(),
            granted: self.now,
        });
        let nodes = members.len() as u32;
        let per_node = job.spec.resources.count.max(1);
        let spec = spec_to_pb(&job.spec);
        let resume = job.latest_checkpoint.clone().unwrap_or_default();
        // Where node 0 may resume instead if the newest checkpoint turns out corrupt.
        let fallback: Vec<String> = if resume.is_empty() {
            Vec::new()
        } else {
            db::list_checkpoints(self.conn, &q.id)?.into_iter().rev().map(|c| c.manifest_key).filter(|k| *k != resume).take(FALLBACK_CHECKPOINTS).collect()
        };
        let mut out = Vec::with_capacity(members.len());
        for (i, (w, devices)) in members.into_iter().enumerate() {
            let lease = pb::Lease {
                job_id: q.id.to_string(),
                epoch: epoch.get(),
                attempt,
                spec: Some(spec.clone()),
                // Only node 0 resumes (the others receive its state from it).
                resume_checkpoint_key: if i == 0 { resume.clone() } else { String::new() },
                fallback_checkpoint_keys: if i == 0 { fallback.clone() } else { Vec::new() },
                device_indices: devices.clone(),
                output_prefix: attempt_prefix(&q.id, epoch),
                lease_ttl_secs: self.cfg.lease_ttl.as_secs().max(1) as u32,
                gang: (nodes > 1).then(|| pb::Gang { node_rank: i as u32, nodes, first_rank: i as u32 * per_node, world_size: nodes * per_node }),
            };
            if let Some(ws) = self.st.workers.get_mut(&w) {
                ws.jobs.insert(q.id);
                ws.busy.extend(devices.iter().copied());
            }
            info!(job_id = %q.id, worker_id = %w, node_rank = i, nodes, epoch = epoch.get(), attempt, "job dispatched");
            out.push((w, lease));
        }
        self.deltas.push((Some(from), to));
        Ok(out)
    }

    /// Hand queued jobs to waiting AcquireJob calls, oldest waiter first.
    pub fn serve_waiters(&mut self, waiters: &mut VecDeque<Waiter>) -> Result<()> {
        let mut keep = VecDeque::with_capacity(waiters.len());
        while let Some(w) = waiters.pop_front() {
            if w.reply.is_closed() {
                continue;
            }
            if self.st.queue.is_empty() && !self.st.pending.contains_key(&w.worker) {
                keep.push_back(w);
                continue;
            }
            match self.try_dispatch(w.worker) {
                Ok(None) => keep.push_back(w),
                r => {
                    let fatal = r.as_ref().err().is_some_and(is_fatal);
                    self.answer_lease(w.reply, w.received, r)?;
                    if fatal {
                        break;
                    }
                }
            }
        }
        keep.extend(waiters.drain(..));
        *waiters = keep;
        Ok(())
    }

    /// Check that a worker call holds (a member's part of) the job's live lease; renew it.
    /// Returns the caller's node rank (0 unless the job is a gang).
    fn check_lease(&mut self, call: &WorkerCall) -> Result<usize> {
        let stale = |why: String| CoordError::StaleEpoch { job_id: call.job_id, got: call.epoch, why };
        let r = match self.st.jobs.get_mut(&call.job_id) {
            None => match db::get_job(self.conn, &call.job_id)? {
                None => return Err(CoordError::NotFound { what: "job", id: call.job_id.to_string() }),
                Some(row) => Err(stale(format!("the job is {} (current epoch {})", row.state, row.epoch))),
            },
            Some(job) if job.epoch != call.epoch => Err(stale(format!("current epoch is {}", job.epoch))),
            Some(job) => match job.lease.as_mut() {
                None => Err(stale(format!("the lease expired; the job is {}", job.state))),
                Some(l) => match l.node_of(&call.worker) {
                    None => Err(stale("the lease is held by another worker".into())),
                    Some(node) => {
                        l.members[node].deadline = self.now + self.cfg.lease_ttl;
                        Ok(node)
                    }
                },
            },
        };
        match r {
            Ok(node) => {
                if let Some(w) = self.st.workers.get_mut(&call.worker) {
                    w.last_seen = self.now;
                }
                Ok(node)
            }
            Err(e) => {
                self.stale_refusals += 1;
                warn!(job_id = %call.job_id, worker_id = %call.worker, epoch = call.epoch.get(), error = %e, "stale worker call refused");
                Err(e)
            }
        }
    }

    fn progress(
        &mut self,
        call: WorkerCall,
        steps: Vec<pb::StepMetrics>,
        evals: Vec<pb::EvalMetrics>,
        logs: Vec<pb::LogLine>,
        ranks: Vec<pb::RankStatus>,
    ) -> Result<bool> {
        if !ranks.is_empty() && steps.is_empty() && evals.is_empty() && logs.is_empty() && !self.st.jobs.contains_key(&call.job_id) {
            // A gang member's last rank progress, arriving just after node 0 completed the
            // attempt (they finish together): kept for display, it changes nothing else.
            if let Some(row) = db::get_job(self.conn, &call.job_id)?.filter(|r| r.epoch == call.epoch && r.state == JobState::Succeeded) {
                let members = db::attempt_members(self.conn, &call.job_id, call.epoch)?;
                if let Some(node) = members.iter().position(|(w, _)| *w == call.worker) {
                    let per_node = row.spec.resources.count.max(1);
                    for mut r in ranks.into_iter().filter(|r| r.rank / per_node == node as u32) {
                        r.node_rank = node as u32;
                        r.worker_id = call.worker.to_string();
                        db::upsert_rank(self.conn, &call.job_id, call.epoch, &r)?;
                    }
                    return Ok(false);
                }
            }
        }
        let node = self.check_lease(&call)?;
        let id = call.job_id;
        let Some(job) = self.st.jobs.get_mut(&id) else { return Err(CoordError::Internal("leased job vanished".into())) };
        let gang = job.lease.as_ref().is_some_and(|l| l.is_gang());
        let (first, last_rank) = {
            let per_node = job.spec.resources.count.max(1);
            (node as u32 * per_node, (node as u32 + 1) * per_node)
        };
        for mut r in ranks {
            // A member reports only its own ranks.
            if r.rank < first || r.rank >= last_rank {
                return Err(CoordError::InvalidArgument(format!("ranks: rank {} is not one of node {node}'s ({first}..{last_rank})", r.rank)));
            }
            r.node_rank = node as u32;
            r.worker_id = call.worker.to_string();
            if r.updated_at_unix_ms == 0 {
                r.updated_at_unix_ms = self.now_ms;
            }
            db::upsert_rank(self.conn, &id, call.epoch, &r)?;
            job.ranks.insert(r.rank, r);
        }
        // The job's own step metrics come from node 0 (every node knows the step loss).
        let steps = if node == 0 { steps } else { Vec::new() };
        let last = steps.last().map(|s| (s.step, s.total_steps, s.loss));
        for mut s in steps {
            if gang || job.ranks.len() > 1 {
                s.ranks = job.ranks.values().cloned().collect();
            }
            emit(self.conn, &mut self.events, self.now_ms, &id, job, Event::Step(s))?;
        }
        for e in evals {
            emit(self.conn, &mut self.events, self.now_ms, &id, job, Event::Eval(e))?;
        }
        for l in logs {
            job.log_seq += 1;
            let message = if gang { format!("[node {node}] {}", l.message) } else { l.message };
            let row = LogRow { seq: job.log_seq, epoch: call.epoch, unix_ms: l.unix_ms, level: l.level, message };
            db::insert_log(self.conn, &id, &row)?;
        }
        if let Some((step, total, loss)) = last {
            db::update_progress(self.conn, &id, step, total, loss.is_finite().then_some(loss), self.now_ms)?;
        }
        Ok(job.state == JobState::Cancelling)
    }

    fn checkpoint(&mut self, call: WorkerCall, step: u64, manifest_key: String) -> Result<bool> {
        if self.check_lease(&call)? != 0 {
            return Err(CoordError::FailedPrecondition("only node 0 of a gang commits checkpoints".into()));
        }
        let id = call.job_id;
        let Some(job) = self.st.jobs.get_mut(&id) else { return Err(CoordError::Internal("leased job vanished".into())) };
        let row = CheckpointRow { step, epoch: call.epoch, attempt: job.attempt, manifest_key: manifest_key.clone(), created_ms: self.now_ms };
        db::insert_checkpoint(self.conn, &id, &row)?;
        let ev = Event::Checkpoint(pb::CheckpointCommitted { step, manifest_key: manifest_key.clone() });
        emit(self.conn, &mut self.events, self.now_ms, &id, job, ev)?;
        job.latest_checkpoint = Some(manifest_key);
        info!(job_id = %id, epoch = call.epoch.get(), step, "checkpoint committed");
        Ok(job.state == JobState::Cancelling)
    }

    fn complete(&mut self, call: WorkerCall, adapter: &str, final_loss: Option<f64>) -> Result<JobState> {
        if self.check_lease(&call)? != 0 {
            return Err(CoordError::FailedPrecondition("only node 0 of a gang completes the attempt".into()));
        }
        if let Some(loss) = final_loss.filter(|l| l.is_finite()) {
            db::update_progress_loss(self.conn, &call.job_id, loss, self.now_ms)?;
        }
        self.end_lease(call.job_id, Transition::Complete, "succeeded", "", None, Some(adapter))
    }

    fn fail(&mut self, call: WorkerCall, class: FailureClass, reason: &str) -> Result<JobState> {
        let node = self.check_lease(&call)?;
        let Some(job) = self.st.jobs.get(&call.job_id) else { return Err(CoordError::Internal("leased job vanished".into())) };
        // Any member's failure ends the gang's attempt for all (they learn it from their
        // next heartbeat or call, and their collectives fail meanwhile).
        let gang_reason;
        let reason = if job.lease.as_ref().is_some_and(|l| l.is_gang()) {
            gang_reason = format!("node {node} of the gang (worker {}): {reason}", call.worker);
            gang_reason.as_str()
        } else {
            reason
        };
        let retry = class == FailureClass::Retryable && job.attempt < job.spec.max_attempts;
        let outcome = match class {
            FailureClass::Retryable => "failed_retryable",
            FailureClass::NonRetryable => "failed_non_retryable",
        };
        let reason = if reason.is_empty() { "worker reported a failure" } else { reason };
        self.end_lease(call.job_id, Transition::AttemptFailed { retry }, outcome, reason, Some(class), None)
    }

    /// End the live lease of a job with `t` (completion, failure, expiry, cancel).
    fn end_lease(
        &mut self,
        id: JobId,
        t: Transition,
        outcome: &str,
        reason: &str,
        class: Option<FailureClass>,
        adapter: Option<&str>,
    ) -> Result<JobState> {
        let Some(job) = self.st.jobs.get_mut(&id) else { return Err(CoordError::Internal(format!("job {id} has no state"))) };
        let from = job.state;
        let to = from.transition(t).map_err(illegal)?;
        let Some(lease) = job.lease.clone() else { return Err(CoordError::Internal(format!("job {id} has no lease"))) };
        db::end_attempt(self.conn, &id, job.epoch, outcome, reason, self.now_ms)?;
        let error = (to != JobState::Succeeded && !reason.is_empty()).then_some(reason);
        let adapter = adapter.filter(|_| to == JobState::Succeeded || from == JobState::Cancelling);
        db::update_state(self.conn, &id, to, None, error, class, adapter, self.now_ms)?;
        let ev = state_change(Some(from), to, job, Some(&lease.leader()), if reason.is_empty() { outcome } else { reason });
        emit(self.conn, &mut self.events, self.now_ms, &id, job, ev)?;
        job.state = to;
        job.lease = None;
        job.rendezvous = Default::default();
        for m in &lease.members {
            if let Some(list) = self.st.pending.get_mut(&m.worker) {
                list.retain(|l| l.job_id != id.to_string());
            }
        }
        self.st.pending.retain(|_, l| !l.is_empty());
        let entry = job.queued_entry(id);
        self.st.release(&id, &lease);
        if to == JobState::Queued {
            self.st.queue.push(entry);
        }
        if to.is_final() {
            self.st.jobs.remove(&id);
        }
        self.deltas.push((Some(from), to));
        self.wake = true;
        info!(job_id = %id, worker_id = %lease.leader(), nodes = lease.members.len(), from = %from, to = %to, outcome, reason, "attempt ended");
        Ok(to)
    }

    /// A gang member's collective endpoints; ready once every member sent its own.
    fn rendezvous(&mut self, call: WorkerCall, endpoints: Vec<String>, nccl_unique_id: Vec<u8>) -> Result<pb::RendezvousResponse> {
        let node = self.check_lease(&call)?;
        let Some(job) = self.st.jobs.get_mut(&call.job_id) else { return Err(CoordError::Internal("leased job vanished".into())) };
        let Some(lease) = job.lease.as_ref() else { return Err(CoordError::Internal("leased job has no lease".into())) };
        let want = lease.members[node].devices.len().max(1);
        if endpoints.len() != want {
            return Err(CoordError::InvalidArgument(format!("endpoints: {} given, node {node} has {want} rank(s)", endpoints.len())));
        }
        for (i, e) in endpoints.iter().enumerate() {
            let ok = e.len() <= 300
                && e.rsplit_once(':').is_some_and(|(host, port)| !host.is_empty() && !host.contains(char::is_whitespace) && port.parse::<u16>().is_ok_and(|p| p > 0));
            if !ok {
                return Err(CoordError::InvalidArgument(format!("endpoints[{i}]: expected host:port, got {:?}", e.escape_default().to_string())));
            }
        }
        if nccl_unique_id.len() > 4096 {
            return Err(CoordError::InvalidArgument(format!("nccl_unique_id: {} bytes (at most 4096)", nccl_unique_id.len())));
        }
        if node == 0 && !nccl_unique_id.is_empty() {
            job.rendezvous.nccl_unique_id = nccl_unique_id;
        }
        job.rendezvous.endpoints.insert(node, endpoints);
        let nodes = lease.members.len();
        let ready = (0..nodes).all(|n| job.rendezvous.endpoints.contains_key(&n));
        let token = {
            use sha2::{Digest, Sha256};
            let d = Sha256::digest(format!("lorafleet-gang/{}/{}", call.job_id, call.epoch.get()).as_bytes());
            u64::from_le_bytes(d[..8].try_into().expect("8 bytes"))
        };
        Ok(pb::RendezvousResponse {
            ready,
            endpoints: if ready { job.rendezvous.endpoints.values().flatten().cloned().collect() } else { Vec::new() },
            nccl_unique_id: if ready { job.rendezvous.nccl_unique_id.clone() } else { Vec::new() },
            group_token: token,
        })
    }

    /// Gang waits: assemblies past their hold let their workers go and park the gang
    /// for as long (the next hold doubles); parked gangs come back when their time is
    /// up or, if they were waiting for workers, once enough that fit them are alive.
    fn gang_tick(&mut self) -> Result<()> {
        let overdue: Vec<(JobId, Duration, usize)> = self
            .st
            .assemblies
            .iter()
            .filter(|(_, a)| a.started + a.hold <= self.now)
            .map(|(id, a)| (*id, a.hold, a.members.len()))
            .collect();
        for (id, hold, held) in overdue {
            let Some(nodes) = self.st.queue.get(&id).map(|q| q.resources.nodes) else {
                self.forget_gang(&id);
                continue;
            };
            let next = (hold * 2).min(Duration::from_secs(24 * 3600));
            let reason = format!(
                "gang of {nodes} nodes: only {held} worker(s) were free within {}s; other jobs run for {}s, then it is assembled again (holding up to {}s)",
                hold.as_secs(),
                hold.as_secs(),
                next.as_secs()
            );
            warn!(job_id = %id, held, nodes, hold_secs = hold.as_secs(), "gang not assembled in time; parking it");
            self.park_gang(id, GangWait { until: Some(self.now + hold), next_hold: next }, reason)?;
        }
        let back: Vec<JobId> = self
            .st
            .gang_waits
            .iter()
            .filter(|(id, g)| {
                self.st.queue.is_parked(id)
                    && match g.until {
                        Some(t) => t <= self.now,
                        None => self.st.queue.get(id).is_some_and(|q| self.capable_workers(&q.resources) >= q.resources.nodes as usize),
                    }
            })
            .map(|(id, _)| *id)
            .collect();
        for id in back {
            self.st.queue.unpark(&id);
            self.wake = true;
            info!(job_id = %id, "gang back in the queue");
        }
        // Gangs waiting for workers: keep the reason current as workers come and go.
        let waiting: Vec<(JobId, lorafleet_shared::spec::ResourceSpec)> = self
            .st
            .gang_waits
            .iter()
            .filter(|(id, g)| g.until.is_none() && self.st.queue.is_parked(id))
            .filter_map(|(id, _)| Some((*id, self.st.queue.get(id)?.resources.clone())))
            .collect();
        for (id, res) in waiting {
            let reason = Self::missing_workers_reason(&res, self.capable_workers(&res));
            self.set_waiting_reason(id, Some(reason))?;
        }
        let running = self.st.jobs.values().filter(|j| j.lease.as_ref().is_some_and(|l| l.is_gang())).count();
        self.metrics.gangs.with_label_values(&["running"]).set(running as i64);
        self.metrics.gangs.with_label_values(&["assembling"]).set(self.st.assemblies.len() as i64);
        self.metrics.gangs.with_label_values(&["parked"]).set(self.st.gang_waits.keys().filter(|id| self.st.queue.is_parked(id)).count() as i64);
        Ok(())
    }

    fn list_workers(&mut self, include_dead: bool) -> Result<Vec<pb::Worker>> {
        let mut out: Vec<pb::Worker> = Vec::new();
        let to_pb = |row: &WorkerRow, alive: bool, last_ms: i64, jobs: Vec<String>, gang_seats: Vec<pb::GangSeat>| pb::Worker {
            worker_id: row.id.to_string(),
            name: row.name.clone(),
            devices: row
                .devices
                .iter()
                .map(|d| pb::Device { kind: device_kind_to_pb(d.kind) as i32, index: d.index, name: d.name.clone(), memory_mib: d.memory_mib })
                .collect(),
            labels: row.labels.clone().into_iter().collect(),
            version: row.version.clone(),
            registered_at_unix_ms: row.registered_ms,
            last_heartbeat_unix_ms: last_ms,
            alive,
            running_job_ids: jobs,
            gang_seats,
        };
        for w in self.st.workers.values() {
            if !w.alive && !include_dead {
                continue;
            }
            let last_ms = self.now_ms - self.now.saturating_duration_since(w.last_seen).as_millis() as i64;
            let mut jobs: Vec<String> = w.jobs.iter().map(|j| j.to_string()).collect();
            jobs.sort();
            let mut seats: Vec<pb::GangSeat> = w
                .jobs
                .iter()
                .filter_map(|j| {
                    let l = self.st.jobs.get(j)?.lease.as_ref().filter(|l| l.is_gang())?;
                    Some(pb::GangSeat { job_id: j.to_string(), node_rank: l.node_of(&w.row.id)? as u32, nodes: l.members.len() as u32 })
                })
                .collect();
            seats.sort_by(|a, b| a.job_id.cmp(&b.job_id));
            out.push(to_pb(&w.row, w.alive, last_ms, jobs, seats));
        }
        if include_dead {
            for row in db::load_workers(self.conn, true)? {
                if !self.st.workers.contains_key(&row.id) {
                    out.push(to_pb(&row, false, 0, Vec::new(), Vec::new()));
                }
            }
        }
        out.sort_by(|a, b| (a.registered_at_unix_ms, &a.worker_id).cmp(&(b.registered_at_unix_ms, &b.worker_id)));
        Ok(out)
    }

    // ---- time ------------------------------------------------------------------------

    fn tick(&mut self, waiters: &mut VecDeque<Waiter>) -> Result<()> {
        // Expired leases: the attempt is lost; retry within the budget.
        // (job, the member whose lease ran out, its (node, nodes) in a gang, retry?)
        type Expired = (JobId, WorkerId, Option<(usize, usize)>, bool);
        let expired: Vec<Expired> = self
            .st
            .jobs
            .iter()
            .filter_map(|(id, j)| {
                let l = j.lease.as_ref()?;
                let m = l.first_expiring()?;
                let gang = l.is_gang().then(|| (l.node_of(&m.worker).unwrap_or(0), l.members.len()));
                (m.deadline <= self.now).then(|| (*id, m.worker, gang, j.attempt < j.spec.max_attempts))
            })
            .collect();
        for (id, worker, gang, retry) in expired {
            let ttl = self.cfg.lease_ttl.as_secs();
            let reason = match gang {
                Some((node, nodes)) => format!("lease expired: no heartbeat from worker {worker} (node {node} of a gang of {nodes}) within {ttl}s; the whole gang stops"),
                None => format!("lease expired: no heartbeat from worker {worker} within {ttl}s"),
            };
            warn!(job_id = %id, worker_id = %worker, retry, "lease expired");
            self.end_lease(id, Transition::AttemptFailed { retry }, "lease_expired", &reason, Some(FailureClass::Retryable), None)?;
        }
        // Workers silent for a whole TTL are dead; their reservations go.
        let dead: Vec<WorkerId> = self
            .st
            .workers
            .iter()
            .filter(|(_, w)| w.alive && w.last_seen + self.cfg.lease_ttl <= self.now)
            .map(|(id, _)| *id)
            .collect();
        for id in dead {
            db::set_worker_alive(self.conn, &id, false)?;
            if let Some(w) = self.st.workers.get_mut(&id) {
                w.alive = false;
            }
            self.st.roster_changed = true;
            self.st.queue.drop_reservations_of(&id);
            for a in self.st.assemblies.values_mut() {
                a.members.retain(|(w, _)| *w != id);
            }
            self.st.pending.remove(&id);
            self.wake = true;
            warn!(worker_id = %id, "worker expired");
        }
        self.gang_tick()?;
        // Long polls past their deadline get an empty answer.
        let mut keep = VecDeque::with_capacity(waiters.len());
        while let Some(w) = waiters.pop_front() {
            if w.reply.is_closed() {
                continue;
            }
            if w.deadline <= self.now {
                self.reply(w.reply, Ok(None));
            } else {
                keep.push_back(w);
            }
        }
        *waiters = keep;
        Ok(())
    }
}

/// `jobs/<job>/attempts/<epoch>/`: where an attempt writes (storage layout).
pub fn attempt_prefix(id: &JobId, epoch: Epoch) -> String {
    match lorafleet_storage::Segment::new(id.to_string()) {
        Ok(seg) => format!("{}/", lorafleet_storage::layout::attempt(&seg, epoch.get())),
        // A UUID is always a valid segment; keep the same shape regardless.
        Err(_) => format!("jobs/{id}/attempts/{}/", epoch.get()),
    }
}

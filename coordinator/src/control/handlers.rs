//! One function per command. Each validates against the in-memory state, writes the
//! store (inside the batch's transaction), then updates memory; replies and events are
//! queued and released only after the batch commits.

use super::state::{ActiveJob, LeaseInfo, State, WorkerState};
use super::{Command, ControlConfig, NewWorker, Reply, SubmitOutcome, Waiter, WorkerCall};
use crate::error::{CoordError, Result};
use crate::metrics::Metrics;
use crate::persistence::{self as db, CheckpointRow, JobRow, LogRow, WorkerRow};
use lorafleet_proto as pb;
use lorafleet_proto::convert::{device_kind_to_pb, spec_to_pb, state_to_pb};
use lorafleet_shared::ids::{Epoch, JobId, WorkerId};
use lorafleet_shared::job::{FailureClass, JobState, Transition};
use lorafleet_shared::spec::JobSpec;
use pb::job_event::Event;
use prost::Message;
use rusqlite::Connection;
use std::collections::{HashSet, VecDeque};
use std::sync::Arc;
use std::time::Instant;
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
            Command::Submit { spec, key, reply } => {
                let r = self.submit(*spec, key);
                self.answer(reply, r)
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
            Command::Progress { call, steps, evals, logs, reply } => {
                let r = self.progress(call, steps, evals, logs);
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

    fn submit(&mut self, spec: JobSpec, key: Option<String>) -> Result<SubmitOutcome> {
        let hash = db::spec_hash(&spec);
        if let Some(k) = &key {
            if let Some(existing) = db::find_by_idempotency_key(self.conn, k)? {
                if existing.spec_hash == hash {
                    return Ok(SubmitOutcome { job: existing, created: false });
                }
                return Err(CoordError::IdempotencyConflict { key: k.clone(), job_id: existing.id });
            }
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
        };
        let ev = state_change(None, JobState::Queued, &job, None, "submitted");
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
                let worker = job.lease.as_ref().map(|l| l.worker);
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
                Some(job) if job.epoch == epoch && job.lease.as_ref().is_some_and(|l| l.worker == worker) => {
                    if let Some(l) = job.lease.as_mut() {
                        l.deadline = deadline;
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
            let stopped = self.st.jobs.get(&id).is_some_and(|j| {
                j.state == JobState::Cancelling && j.lease.as_ref().is_some_and(|l| l.granted + self.cfg.heartbeat_interval <= self.now)
            });
            if stopped {
                self.end_lease(id, Transition::WorkerStopped, "cancelled", "worker stopped after cancel", None, None)?;
            }
        }
        Ok(directives)
    }

    /// Dispatch the best job for this worker, if one fits: the new epoch and attempt are
    /// written before the lease exists anywhere else.
    pub fn try_dispatch(&mut self, worker: WorkerId) -> Result<Option<pb::Lease>> {
        let ws = self.live_worker(&worker)?;
        let (devices, busy) = (ws.row.devices.clone(), ws.busy.clone());
        let Some((q, assigned)) = self.st.queue.pick(worker, &devices, &busy) else { return Ok(None) };
        let Some(job) = self.st.jobs.get_mut(&q.id) else {
            return Err(CoordError::Internal(format!("queued job {} has no state", q.id)));
        };
        let from = job.state;
        let to = from.transition(Transition::Dispatch).map_err(|e| CoordError::Internal(e.to_string()))?;
        let epoch = job.epoch.next();
        let attempt = job.attempt + 1;
        db::record_dispatch(self.conn, &q.id, attempt, epoch, &worker, &assigned, self.now_ms)?;
        job.epoch = epoch;
        job.attempt = attempt;
        let ev = state_change(Some(from), to, job, Some(&worker), "dispatched");
        emit(self.conn, &mut self.events, self.now_ms, &q.id, job, ev)?;
        job.state = to;
        job.lease = Some(LeaseInfo { worker, devices: assigned.clone(), deadline: self.now + self.cfg.lease_ttl, granted: self.now });
        let lease = pb::Lease {
            job_id: q.id.to_string(),
            epoch: epoch.get(),
            attempt,
            spec: Some(spec_to_pb(&job.spec)),
            resume_checkpoint_key: job.latest_checkpoint.clone().unwrap_or_default(),
            device_indices: assigned.clone(),
            output_prefix: attempt_prefix(&q.id, epoch),
            lease_ttl_secs: self.cfg.lease_ttl.as_secs().max(1) as u32,
        };
        if let Some(ws) = self.st.workers.get_mut(&worker) {
            ws.jobs.insert(q.id);
            ws.busy.extend(assigned.iter().copied());
        }
        self.deltas.push((Some(from), to));
        info!(job_id = %q.id, worker_id = %worker, epoch = epoch.get(), attempt, "job dispatched");
        Ok(Some(lease))
    }

    /// Hand queued jobs to waiting AcquireJob calls, oldest waiter first.
    pub fn serve_waiters(&mut self, waiters: &mut VecDeque<Waiter>) -> Result<()> {
        let mut keep = VecDeque::with_capacity(waiters.len());
        while let Some(w) = waiters.pop_front() {
            if w.reply.is_closed() {
                continue;
            }
            if self.st.queue.is_empty() {
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

    /// Check that a worker call holds the job's live lease; renew it.
    fn check_lease(&mut self, call: &WorkerCall) -> Result<()> {
        let stale = |why: String| CoordError::StaleEpoch { job_id: call.job_id, got: call.epoch, why };
        let r = match self.st.jobs.get_mut(&call.job_id) {
            None => match db::get_job(self.conn, &call.job_id)? {
                None => return Err(CoordError::NotFound { what: "job", id: call.job_id.to_string() }),
                Some(row) => Err(stale(format!("the job is {} (current epoch {})", row.state, row.epoch))),
            },
            Some(job) if job.epoch != call.epoch => Err(stale(format!("current epoch is {}", job.epoch))),
            Some(job) => match job.lease.as_mut() {
                None => Err(stale(format!("the lease expired; the job is {}", job.state))),
                Some(l) if l.worker != call.worker => Err(stale("the lease is held by another worker".into())),
                Some(l) => {
                    l.deadline = self.now + self.cfg.lease_ttl;
                    Ok(())
                }
            },
        };
        match r {
            Ok(()) => {
                if let Some(w) = self.st.workers.get_mut(&call.worker) {
                    w.last_seen = self.now;
                }
                Ok(())
            }
            Err(e) => {
                self.stale_refusals += 1;
                warn!(job_id = %call.job_id, worker_id = %call.worker, epoch = call.epoch.get(), error = %e, "stale worker call refused");
                Err(e)
            }
        }
    }

    fn progress(&mut self, call: WorkerCall, steps: Vec<pb::StepMetrics>, evals: Vec<pb::EvalMetrics>, logs: Vec<pb::LogLine>) -> Result<bool> {
        self.check_lease(&call)?;
        let id = call.job_id;
        let Some(job) = self.st.jobs.get_mut(&id) else { return Err(CoordError::Internal("leased job vanished".into())) };
        let last = steps.last().map(|s| (s.step, s.total_steps, s.loss));
        for s in steps {
            emit(self.conn, &mut self.events, self.now_ms, &id, job, Event::Step(s))?;
        }
        for e in evals {
            emit(self.conn, &mut self.events, self.now_ms, &id, job, Event::Eval(e))?;
        }
        for l in logs {
            job.log_seq += 1;
            let row = LogRow { seq: job.log_seq, epoch: call.epoch, unix_ms: l.unix_ms, level: l.level, message: l.message };
            db::insert_log(self.conn, &id, &row)?;
        }
        if let Some((step, total, loss)) = last {
            db::update_progress(self.conn, &id, step, total, loss.is_finite().then_some(loss), self.now_ms)?;
        }
        Ok(job.state == JobState::Cancelling)
    }

    fn checkpoint(&mut self, call: WorkerCall, step: u64, manifest_key: String) -> Result<bool> {
        self.check_lease(&call)?;
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
        self.check_lease(&call)?;
        if let Some(loss) = final_loss.filter(|l| l.is_finite()) {
            db::update_progress_loss(self.conn, &call.job_id, loss, self.now_ms)?;
        }
        self.end_lease(call.job_id, Transition::Complete, "succeeded", "", None, Some(adapter))
    }

    fn fail(&mut self, call: WorkerCall, class: FailureClass, reason: &str) -> Result<JobState> {
        self.check_lease(&call)?;
        let Some(job) = self.st.jobs.get(&call.job_id) else { return Err(CoordError::Internal("leased job vanished".into())) };
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
        let ev = state_change(Some(from), to, job, Some(&lease.worker), if reason.is_empty() { outcome } else { reason });
        emit(self.conn, &mut self.events, self.now_ms, &id, job, ev)?;
        job.state = to;
        job.lease = None;
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
        info!(job_id = %id, worker_id = %lease.worker, from = %from, to = %to, outcome, reason, "attempt ended");
        Ok(to)
    }

    fn list_workers(&mut self, include_dead: bool) -> Result<Vec<pb::Worker>> {
        let mut out: Vec<pb::Worker> = Vec::new();
        let to_pb = |row: &WorkerRow, alive: bool, last_ms: i64, jobs: Vec<String>| pb::Worker {
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
        };
        for w in self.st.workers.values() {
            if !w.alive && !include_dead {
                continue;
            }
            let last_ms = self.now_ms - self.now.saturating_duration_since(w.last_seen).as_millis() as i64;
            let mut jobs: Vec<String> = w.jobs.iter().map(|j| j.to_string()).collect();
            jobs.sort();
            out.push(to_pb(&w.row, w.alive, last_ms, jobs));
        }
        if include_dead {
            for row in db::load_workers(self.conn, true)? {
                if !self.st.workers.contains_key(&row.id) {
                    out.push(to_pb(&row, false, 0, Vec::new()));
                }
            }
        }
        out.sort_by(|a, b| (a.registered_at_unix_ms, &a.worker_id).cmp(&(b.registered_at_unix_ms, &b.worker_id)));
        Ok(out)
    }

    // ---- time ------------------------------------------------------------------------

    fn tick(&mut self, waiters: &mut VecDeque<Waiter>) -> Result<()> {
        // Expired leases: the attempt is lost; retry within the budget.
        let expired: Vec<(JobId, WorkerId, bool)> = self
            .st
            .jobs
            .iter()
            .filter_map(|(id, j)| {
                let l = j.lease.as_ref()?;
                (l.deadline <= self.now).then(|| (*id, l.worker, j.attempt < j.spec.max_attempts))
            })
            .collect();
        for (id, worker, retry) in expired {
            let reason = format!("lease expired: no heartbeat from worker {worker} within {}s", self.cfg.lease_ttl.as_secs());
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
            self.st.queue.drop_reservations_of(&id);
            self.wake = true;
            warn!(worker_id = %id, "worker expired");
        }
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

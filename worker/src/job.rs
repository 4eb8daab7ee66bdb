//! Running one lease: prepare inputs (model, datasets, resume checkpoint, all verified),
//! train on a dedicated std thread, stream progress, upload and commit checkpoints,
//! upload the adapter and finish the attempt.

use crate::{is_transient, JobControl, Worker};
use lorafleet_engine::train::{EvalMetrics, StepMetrics, TrainObserver, TrainRun};
use lorafleet_engine::EngineError;
use lorafleet_proto as pb;
use lorafleet_shared::spec::JobSpec;
use lorafleet_storage::{layout, parse_dataset_ref, Segment};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, oneshot};
use tracing::{info, warn};

/// How an attempt ended, as far as this worker is concerned.
#[derive(Debug)]
pub enum Outcome {
    Completed { adapter_manifest_key: String, final_loss: f64 },
    Failed { class: pb::FailureClass, reason: String },
    Cancelled,
    /// The lease is gone: say nothing more about this job.
    Abandoned,
    /// This worker is shutting down: hand the job back.
    Shutdown,
    /// A gang member other than node 0 finished its ranks: node 0 completes the attempt.
    MemberDone,
}

pub(crate) fn non_retryable(reason: impl Into<String>) -> Outcome {
    Outcome::Failed { class: pb::FailureClass::NonRetryable, reason: reason.into() }
}

pub(crate) fn retryable(reason: impl Into<String>) -> Outcome {
    Outcome::Failed { class: pb::FailureClass::Retryable, reason: reason.into() }
}

fn storage_failure(what: &str, e: lorafleet_storage::Error) -> Outcome {
    if e.is_retryable() {
        retryable(format!("{what}: {e}"))
    } else {
        non_retryable(format!("{what}: {e}"))
    }
}

pub fn scratch_dir(cache: &Path, job_id: &str, epoch: u64) -> PathBuf {
    cache.join("work").join(format!("{job_id}-{epoch}"))
}

/// Everything needed to start training.
struct Prepared {
    run: TrainRun,
    job: Segment,
    /// The checkpoint it resumes from (the lease's, or an older one when that one was
    /// corrupt) and why the newer ones were passed over.
    resumed: Option<String>,
    skipped: Vec<String>,
}

async fn prepare(w: &Worker, lease: &pb::Lease) -> Result<Prepared, Outcome> {
    let pb_spec = lease.spec.clone().ok_or_else(|| non_retryable("lease has no job spec"))?;
    let spec = JobSpec::try_from(pb_spec).map_err(|e| non_retryable(format!("invalid job spec: {e}")))?;
    let job = Segment::new(lease.job_id.clone()).map_err(|e| non_retryable(format!("job id: {e}")))?;
    match layout::parse_attempt(&lease.output_prefix) {
        Ok((j, e)) if j == job && e == lease.epoch => {}
        _ => {
            return Err(non_retryable(format!(
                "lease output_prefix {:?} is not {}/ (this worker writes only under its attempt prefix)",
                lease.output_prefix,
                layout::attempt(&job, lease.epoch)
            )))
        }
    }
    let devices = lease_devices(&w.cfg.devices, &lease.device_indices)?;
    if devices.len() > 1 {
        info!(job_id = %lease.job_id, devices = ?devices, "data parallel over the leased devices");
    }
    let devices = devices.iter().map(|d| d.open()).collect::<Result<Vec<_>, _>>().map_err(non_retryable)?;

    let model_dir = w.cache.model(&spec.model.source, &w.cfg.storage_options).await.map_err(|e| storage_failure("model.source", e))?;
    if !model_dir.join("config.json").is_file() {
        return Err(non_retryable(format!("model.source: no config.json in {} (not a Hugging Face model directory?)", model_dir.display())));
    }
    let train_data = fetch_data(w, "data.train", &spec.data.train).await?;
    let eval_data = match &spec.data.eval {
        Some(e) => Some(fetch_data(w, "data.eval", e).await?),
        None => None,
    };
    let init_adapter = match &spec.lora.init_adapter {
        Some(a) => Some(w.cache.model(a, &w.cfg.storage_options).await.map_err(|e| storage_failure("lora.init_adapter", e))?),
        None => None,
    };
    let scratch = scratch_dir(&w.cfg.cache, &lease.job_id, lease.epoch);
    let _ = std::fs::remove_dir_all(&scratch);
    let (resume_from, resumed, skipped) = download_resume(w, lease, &scratch.join("resume")).await?;
    Ok(Prepared {
        run: TrainRun {
            spec,
            model_dir,
            train_data,
            eval_data,
            init_adapter,
            output_dir: scratch.join("output"),
            work_dir: scratch.join("work"),
            resume_from,
            devices,
        },
        job,
        resumed,
        skipped,
    })
}

/// Download the checkpoint to resume from: the lease's, else (when it is corrupt: a file
/// fails its sha256 or size check, the manifest is missing or unreadable) the newest of
/// its older committed checkpoints that is whole. Returns the local directory, the key
/// used and why newer ones were passed over. A network or server error is no reason to
/// pass over a checkpoint: the attempt fails retryable instead.
async fn download_resume(w: &Worker, lease: &pb::Lease, dest: &Path) -> Result<(Option<PathBuf>, Option<String>, Vec<String>), Outcome> {
    if lease.resume_checkpoint_key.is_empty() {
        return Ok((None, None, Vec::new()));
    }
    let mut skipped = Vec::new();
    for key in std::iter::once(&lease.resume_checkpoint_key).chain(&lease.fallback_checkpoint_keys) {
        let dir = layout::manifest_dir(key).map_err(|e| non_retryable(format!("resume checkpoint: {e}")))?;
        let _ = std::fs::remove_dir_all(dest);
        match w.storage.download_dir(&dir, dest).await {
            Ok(_) => {
                info!(job_id = %lease.job_id, checkpoint = %dir, "downloaded checkpoint to resume from");
                return Ok((Some(dest.to_path_buf()), Some(key.clone()), skipped));
            }
            Err(e @ (lorafleet_storage::Error::Corrupt { .. } | lorafleet_storage::Error::NotFound { .. } | lorafleet_storage::Error::InvalidManifest { .. })) => {
                warn!(job_id = %lease.job_id, checkpoint = %dir, error = %e, "checkpoint unusable; trying an older one");
                skipped.push(format!("{key}: {e}"));
            }
            Err(e) => return Err(storage_failure("resume checkpoint", e)),
        }
    }
    Err(non_retryable(format!("resume checkpoint: no committed checkpoint is usable: {}", skipped.join("; "))))
}

/// The devices of this worker a lease names (by index; none: the first one offered).
/// A lease naming a device this worker does not offer is refused as retryable: the
/// coordinator's view of this worker is out of date, and another attempt may fit.
fn lease_devices(offered: &[crate::DeviceSel], indices: &[u32]) -> Result<Vec<crate::DeviceSel>, Outcome> {
    if indices.is_empty() {
        return Ok(offered.iter().take(1).copied().collect());
    }
    indices
        .iter()
        .map(|&i| {
            offered
                .iter()
                .copied()
                .find(|d| match d {
                    crate::DeviceSel::Cpu(c) => *c == i,
                    crate::DeviceSel::Cuda(c) => *c == i,
                })
                .ok_or_else(|| retryable(format!("lease names device index {i}, which this worker does not offer ({offered:?})")))
        })
        .collect()
}

/// A dataset reference (`dataset://sha256/<hex>`, fetched and verified) or a local path.
async fn fetch_data(w: &Worker, field: &str, s: &str) -> Result<PathBuf, Outcome> {
    match parse_dataset_ref(s) {
        Some(Ok(sha)) => w.cache.dataset(&w.storage, &sha).await.map_err(|e| match e {
            lorafleet_storage::Error::NotFound { .. } => non_retryable(format!("{field}: dataset {s} not found in storage {}", w.storage.url())),
            e => storage_failure(field, e),
        }),
        Some(Err(e)) => Err(non_retryable(format!("{field}: {e}"))),
        None if s.contains("://") => Err(non_retryable(format!("{field}: unsupported data location {s:?} (use a dataset:// ref from `lorafleet submit`, or a path workers share)"))),
        None => {
            let p = PathBuf::from(s);
            if p.is_file() {
                Ok(p)
            } else {
                Err(non_retryable(format!("{field}: dataset file {s} not found on worker")))
            }
        }
    }
}

enum Event {
    Step(pb::StepMetrics),
    Eval(pb::EvalMetrics),
    Log(pb::LogLine),
    Rank(pb::RankStatus),
}

fn now_ms() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as i64).unwrap_or(0)
}

fn log(level: &str, message: String) -> Event {
    Event::Log(pb::LogLine { unix_ms: now_ms(), level: level.into(), message })
}

/// The training thread's view of the worker.
struct Observer {
    w: Worker,
    ctl: Arc<JobControl>,
    job: Segment,
    /// This worker's node in the job's gang (0 without one): only node 0 reports the
    /// job's step metrics.
    node: u32,
    rt: tokio::runtime::Handle,
    tx: mpsc::UnboundedSender<Event>,
    /// Why training was stopped by us, when it was (upload failed, ...).
    failure: Option<Outcome>,
}

impl TrainObserver for Observer {
    fn on_start(&mut self, total_steps: u64) {
        let _ = self.tx.send(log("info", format!("training started: {total_steps} steps")));
    }

    fn on_notice(&mut self, level: &str, message: &str) {
        let _ = self.tx.send(log(level, message.to_string()));
    }

    fn on_step(&mut self, m: &StepMetrics) {
        self.on_rank_step(m.rank as usize, m);
        if self.node != 0 {
            return;
        }
        let _ = self.tx.send(Event::Step(pb::StepMetrics {
            step: m.step,
            total_steps: m.total_steps,
            loss: m.loss,
            lr: m.lr,
            grad_norm: m.grad_norm,
            tokens_per_sec: m.tokens_per_sec,
            eta_secs: m.eta_secs,
            data_epoch: m.epoch,
            ranks: vec![],
        }));
    }

    fn on_rank_step(&mut self, rank: usize, m: &StepMetrics) {
        if m.world_size > 1 {
            let _ = self.tx.send(Event::Rank(pb::RankStatus {
                rank: rank as u32,
                step: m.step,
                tokens_per_sec: m.rank_tokens_per_sec,
                updated_at_unix_ms: now_ms(),
                ..Default::default()
            }));
        }
    }

    fn on_eval(&mut self, m: &EvalMetrics) {
        let _ = self.tx.send(Event::Eval(pb::EvalMetrics {
            step: m.step,
            eval_loss: m.loss,
            perplexity: m.perplexity,
            samples: m.samples.iter().map(|(p, c)| pb::SampleOutput { prompt: p.clone(), completion: c.clone() }).collect(),
            exact_match: m.exact_match,
            rouge_l: m.rouge_l,
            generated: m.generated as u32,
            best_metric: m.best.as_ref().map(|b| b.metric.clone()).unwrap_or_default(),
            best_step: m.best.as_ref().map(|b| b.step).unwrap_or(0),
            best_value: m.best.as_ref().map(|b| b.value),
        }));
    }

    fn on_checkpoint(&mut self, step: u64, dir: &Path) -> lorafleet_engine::Result<()> {
        if self.ctl.should_stop() {
            return Err(EngineError::Cancelled);
        }
        let key = layout::checkpoint(&self.job, self.ctl.epoch, step);
        let mut meta = BTreeMap::new();
        meta.insert("job_id".to_string(), serde_json::json!(self.ctl.job_id));
        meta.insert("epoch".to_string(), serde_json::json!(self.ctl.epoch));
        meta.insert("step".to_string(), serde_json::json!(step));
        let w = self.w.clone();
        let ctl = self.ctl.clone();
        let result = self.rt.block_on(async move {
            let m = upload_with_retry(&w, &ctl, "checkpoint upload", &key, dir, meta).await?;
            if ctl.should_stop() {
                return Err(Outcome::Abandoned);
            }
            let manifest_key = lorafleet_storage::manifest::manifest_key(&key).to_string();
            let req = pb::CommitCheckpointRequest {
                job_id: ctl.job_id.clone(),
                epoch: ctl.epoch,
                worker_id: w.shared.worker_id(),
                step,
                manifest_key: manifest_key.clone(),
            };
            let resp = call_with_retry(&w, &ctl, |mut c| {
                let req = req.clone();
                async move { c.commit_checkpoint(req).await }
            })
            .await?;
            if resp.cancel {
                ctl.cancel();
            }
            Ok((manifest_key, m.total_size()))
        });
        match result {
            Ok((manifest_key, bytes)) => {
                let _ = self.tx.send(log("info", format!("checkpoint step {step} committed ({bytes} bytes): {manifest_key}")));
                Ok(())
            }
            Err(o) => {
                if !matches!(o, Outcome::Abandoned) {
                    self.failure = Some(o);
                }
                Err(EngineError::Cancelled)
            }
        }
    }

    fn should_stop(&self) -> bool {
        self.ctl.should_stop()
    }
}

/// Call the coordinator about this job, retrying transient failures for up to one lease
/// TTL; a refused epoch (FAILED_PRECONDITION) or NOT_FOUND abandons the job.
pub(crate) async fn call_with_retry<T, F, Fut>(w: &Worker, ctl: &JobControl, f: F) -> Result<T, Outcome>
where
    F: Fn(pb::worker_service_client::WorkerServiceClient<lorafleet_proto::connect::AuthChannel>) -> Fut,
    Fut: std::future::Future<Output = Result<tonic::Response<T>, tonic::Status>>,
{
    let deadline = Instant::now() + w.shared.lease_ttl().max(Duration::from_secs(10));
    let mut backoff = Duration::from_millis(100);
    loop {
        // Every try is bounded: a call that gets no answer (a black-holed link) must not
        // hold the training thread, nor this retry loop, past its deadline.
        let per_call = per_call_timeout(w.shared.lease_ttl(), deadline.saturating_duration_since(Instant::now()));
        let answer = match tokio::time::timeout(per_call, f(w.client.clone())).await {
            Ok(r) => r,
            Err(_) => Err(tonic::Status::deadline_exceeded(format!("no answer within {per_call:?}"))),
        };
        match answer {
            Ok(r) => return Ok(r.into_inner()),
            Err(s) if matches!(s.code(), tonic::Code::FailedPrecondition | tonic::Code::NotFound | tonic::Code::PermissionDenied) => {
                ctl.abandon(s.message());
                return Err(Outcome::Abandoned);
            }
            Err(s) if is_transient(&s) && Instant::now() < deadline && !ctl.is_abandoned() => {
                warn!(job_id = %ctl.job_id, code = ?s.code(), error = %s.message(), "coordinator call failed; retrying");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(2));
            }
            Err(s) => return Err(retryable(format!("coordinator call failed: {}", s.message()))),
        }
    }
}

/// One try of [`call_with_retry`]: half a lease TTL, at least 1 s, and never past the
/// retry deadline by more than that second.
fn per_call_timeout(lease_ttl: Duration, left: Duration) -> Duration {
    (lease_ttl / 2).min(left).max(Duration::from_secs(1))
}

/// Batch progress events into ReportProgress calls (at most one a second).
async fn report_progress(w: Worker, ctl: Arc<JobControl>, mut rx: mpsc::UnboundedReceiver<Event>) {
    let mut req = empty_report(&w, &ctl);
    let mut tick = tokio::time::interval(Duration::from_millis(500));
    let mut open = true;
    while open {
        let flush = tokio::select! {
            ev = rx.recv() => match ev {
                Some(Event::Step(s)) => { req.steps.push(s); false }
                Some(Event::Eval(e)) => { req.evals.push(e); false }
                Some(Event::Log(l)) => { req.logs.push(l); false }
                Some(Event::Rank(r)) => {
                    req.ranks.retain(|x| x.rank != r.rank);
                    req.ranks.push(r);
                    false
                }
                None => { open = false; true }
            },
            _ = tick.tick() => true,
        };
        let pending = !req.steps.is_empty() || !req.evals.is_empty() || !req.logs.is_empty() || !req.ranks.is_empty();
        if !flush || !pending {
            continue;
        }
        if ctl.is_abandoned() {
            req = empty_report(&w, &ctl);
            continue;
        }
        req.worker_id = w.shared.worker_id();
        // Bounded like every call: on a dead link the report fails, is kept for the next
        // one, and the end of the job never waits on it.
        let mut call = tonic::Request::new(req.clone());
        call.set_timeout(per_call_timeout(w.shared.lease_ttl(), crate::CALL_TIMEOUT));
        let sent = tokio::time::timeout(crate::CALL_TIMEOUT, w.client.clone().report_progress(call)).await;
        let sent = sent.unwrap_or_else(|_| Err(tonic::Status::deadline_exceeded("no answer")));
        match sent {
            Ok(r) => {
                if r.into_inner().cancel {
                    ctl.cancel();
                }
                req = empty_report(&w, &ctl);
            }
            Err(s) if matches!(s.code(), tonic::Code::FailedPrecondition | tonic::Code::NotFound) => {
                ctl.abandon(s.message());
                req = empty_report(&w, &ctl);
            }
            Err(s) => {
                warn!(job_id = %ctl.job_id, code = ?s.code(), error = %s.message(), "progress report failed; keeping it for the next one");
                // Bounded: keep the newest.
                if req.steps.len() > 1000 {
                    req.steps.drain(..req.steps.len() - 1000);
                }
                if req.logs.len() > 1000 {
                    req.logs.drain(..req.logs.len() - 1000);
                }
            }
        }
    }
}

fn empty_report(w: &Worker, ctl: &JobControl) -> pb::ReportProgressRequest {
    pb::ReportProgressRequest {
        job_id: ctl.job_id.clone(),
        epoch: ctl.epoch,
        worker_id: w.shared.worker_id(),
        steps: vec![],
        evals: vec![],
        logs: vec![],
        ranks: vec![],
    }
}

/// Run the attempt to its outcome (the caller reports it).
pub async fn execute(w: &Worker, lease: &pb::Lease, ctl: &Arc<JobControl>) -> Outcome {
    let prepared = match prepare(w, lease).await {
        Ok(p) => p,
        Err(o) => return o,
    };
    let (tx, rx) = mpsc::unbounded_channel();
    let reporter = tokio::spawn(report_progress(w.clone(), ctl.clone(), rx));
    for s in &prepared.skipped {
        let _ = tx.send(log("warn", format!("checkpoint passed over: {s}")));
    }
    if let Some(key) = &prepared.resumed {
        let _ = tx.send(log("info", format!("resuming from {key}")));
    }
    let node = lease.gang.as_ref().map(|g| g.node_rank).unwrap_or(0);
    let group = match &lease.gang {
        Some(g) => match crate::gang::join(w, lease, g, &prepared.run.devices, ctl).await {
            Ok(c) => {
                let _ = tx.send(log("info", format!("gang: node {} of {}, ranks {}..{} of {}", g.node_rank, g.nodes, g.first_rank, g.first_rank as usize + c.len(), g.world_size)));
                Some(c)
            }
            Err(o) => {
                drop(tx);
                let _ = reporter.await;
                return o;
            }
        },
        None => None,
    };
    let mut observer = Observer { w: w.clone(), ctl: ctl.clone(), job: prepared.job.clone(), node, rt: tokio::runtime::Handle::current(), tx, failure: None };
    let trainer = w.trainer.clone();
    let run = prepared.run;
    let (done_tx, done_rx) = oneshot::channel();
    let spawned = std::thread::Builder::new().name(format!("train-{}", lease.job_id)).spawn(move || {
        let result = match group {
            Some(c) => trainer.train_ranks(&run, c, &mut observer),
            None => trainer.train(&run, &mut observer),
        };
        let failure = observer.failure.take();
        drop(observer); // closes the progress channel
        let _ = done_tx.send((result, failure, run.output_dir));
    });
    if let Err(e) = spawned {
        return retryable(format!("cannot start training thread: {e}"));
    }
    let (result, failure, output_dir) = match done_rx.await {
        Ok(r) => r,
        Err(_) => return retryable("training thread panicked"),
    };
    let _ = reporter.await;
    if ctl.is_abandoned() {
        return Outcome::Abandoned;
    }
    if let Some(f) = failure {
        return f;
    }
    if ctl.is_cancelled() {
        return Outcome::Cancelled;
    }
    if ctl.is_shutdown() {
        return Outcome::Shutdown;
    }
    let final_loss = match result {
        Ok(l) => l,
        Err(EngineError::Cancelled) => return retryable("training stopped"),
        Err(e) => return classify(e),
    };
    if node != 0 {
        return Outcome::MemberDone;
    }
    // Upload the adapter (and the run's metrics) under the attempt prefix.
    let key = layout::adapter(&prepared.job, lease.epoch);
    let mut meta = BTreeMap::new();
    meta.insert("job_id".to_string(), serde_json::json!(lease.job_id));
    meta.insert("epoch".to_string(), serde_json::json!(lease.epoch));
    if ctl.should_stop() {
        return if ctl.is_abandoned() { Outcome::Abandoned } else { Outcome::Cancelled };
    }
    match upload_with_retry(w, ctl, "adapter upload", &key, &output_dir, meta).await {
        Ok(_) => Outcome::Completed { adapter_manifest_key: lorafleet_storage::manifest::manifest_key(&key).to_string(), final_loss },
        Err(o) => o,
    }
}

/// Upload a directory under this attempt's prefix, retrying (with backoff) what may
/// pass, for up to `--storage-retry-secs`: an object-store outage shorter than that
/// costs only the wait (the heartbeats keep the lease meanwhile). Past it, or on an
/// error that cannot pass, the attempt fails with the reason (retryable when the error
/// is). Each try is bounded by what is left of the budget too, so a black-holed store
/// (no error, no answer) cannot hold the training past it. Uploads are idempotent:
/// files are put again and the manifest, written last by a create-only put, is accepted
/// when it is already there with the same content.
async fn upload_with_retry(
    w: &Worker,
    ctl: &JobControl,
    what: &str,
    key: &lorafleet_storage::RelPath,
    dir: &Path,
    meta: BTreeMap<String, serde_json::Value>,
) -> Result<lorafleet_storage::Manifest, Outcome> {
    let started = Instant::now();
    let mut backoff = Duration::from_millis(500);
    let mut tries = 0u32;
    loop {
        tries += 1;
        let left = w.cfg.storage_retry.saturating_sub(started.elapsed()).max(Duration::from_secs(1));
        let answer = match tokio::time::timeout(left, w.storage.upload_dir(key, dir, meta.clone())).await {
            Ok(r) => r,
            Err(_) => Err(lorafleet_storage::Error::Io {
                path: dir.to_path_buf(),
                source: std::io::Error::new(std::io::ErrorKind::TimedOut, format!("no answer from object storage within {left:.0?}")),
            }),
        };
        match answer {
            Ok(m) => {
                if tries > 1 {
                    info!(job_id = %ctl.job_id, key = %key, tries, waited = ?started.elapsed(), "{what} went through after retries");
                }
                return Ok(m);
            }
            Err(e) if e.is_retryable() && started.elapsed() + backoff < w.cfg.storage_retry && !ctl.should_stop() => {
                warn!(job_id = %ctl.job_id, key = %key, error = %e, retry_in = ?backoff, "{what} failed; retrying");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(5));
            }
            Err(e) if ctl.should_stop() => {
                return Err(if ctl.is_abandoned() { Outcome::Abandoned } else { storage_failure(what, e) });
            }
            Err(e) if e.is_retryable() => {
                return Err(retryable(format!("{what}: still failing after {:.0?} and {tries} tries (--storage-retry-secs {}): {e}", started.elapsed(), w.cfg.storage_retry.as_secs())));
            }
            Err(e) => return Err(storage_failure(what, e)),
        }
    }
}

fn classify(e: EngineError) -> Outcome {
    match e {
        EngineError::Candle(_) | EngineError::Io(_) | EngineError::Collective(_) => retryable(e.to_string()),
        e => non_retryable(e.to_string()),
    }
}

/// Tell the coordinator how the attempt ended.
pub async fn finish(w: &Worker, ctl: &Arc<JobControl>, outcome: Outcome) {
    let worker_id = w.shared.worker_id();
    let (job_id, epoch) = (ctl.job_id.clone(), ctl.epoch);
    let fail = |class: pb::FailureClass, reason: String| pb::FailAttemptRequest {
        job_id: job_id.clone(),
        epoch,
        worker_id: worker_id.clone(),
        failure_class: class as i32,
        reason,
    };
    let req = match outcome {
        Outcome::Abandoned => {
            info!(job_id = %job_id, epoch, "attempt abandoned; nothing more is written for it");
            return;
        }
        Outcome::MemberDone => {
            info!(job_id = %job_id, epoch, "gang member finished its ranks; node 0 completes the attempt");
            return;
        }
        Outcome::Completed { adapter_manifest_key, final_loss } => {
            let req = pb::CompleteAttemptRequest { job_id: job_id.clone(), epoch, worker_id: worker_id.clone(), adapter_manifest_key: adapter_manifest_key.clone(), final_loss: final_loss.is_finite().then_some(final_loss) };
            match call_with_retry(w, ctl, |mut c| {
                let req = req.clone();
                async move { c.complete_attempt(req).await }
            })
            .await
            {
                Ok(r) => info!(job_id = %job_id, epoch, state = r.state, adapter = %adapter_manifest_key, "attempt completed"),
                Err(Outcome::Abandoned) => info!(job_id = %job_id, epoch, "completion refused: lease lost"),
                Err(e) => warn!(job_id = %job_id, epoch, outcome = ?e, "could not report completion"),
            }
            return;
        }
        Outcome::Cancelled => fail(pb::FailureClass::NonRetryable, "cancelled".into()),
        Outcome::Shutdown => fail(pb::FailureClass::Retryable, "worker shutting down".into()),
        Outcome::Failed { class, reason } => {
            warn!(job_id = %job_id, epoch, class = ?class, reason = %reason, "attempt failed");
            fail(class, reason)
        }
    };
    match call_with_retry(w, ctl, |mut c| {
        let req = req.clone();
        async move { c.fail_attempt(req).await }
    })
    .await
    {
        Ok(r) => info!(job_id = %job_id, epoch, state = r.state, "attempt ended"),
        Err(e) => warn!(job_id = %job_id, epoch, outcome = ?e, "could not report the attempt's end"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::DeviceSel;

    #[test]
    fn every_try_of_a_call_is_bounded() {
        let s = Duration::from_secs;
        assert_eq!(per_call_timeout(s(6), s(10)), s(3));
        assert_eq!(per_call_timeout(s(60), s(10)), s(10));
        assert_eq!(per_call_timeout(s(6), Duration::ZERO), s(1));
        assert_eq!(per_call_timeout(s(1), s(10)), s(1));
    }

    #[test]
    fn a_lease_gets_the_devices_it_names() {
        let gpus = [DeviceSel::Cuda(0), DeviceSel::Cuda(1), DeviceSel::Cuda(3)];
        assert_eq!(lease_devices(&gpus, &[]).unwrap(), vec![DeviceSel::Cuda(0)]);
        assert_eq!(lease_devices(&gpus, &[3, 1]).unwrap(), vec![DeviceSel::Cuda(3), DeviceSel::Cuda(1)]);
        assert_eq!(lease_devices(&[DeviceSel::Cpu(0)], &[0]).unwrap(), vec![DeviceSel::Cpu(0)]);
        let slots = [DeviceSel::Cpu(0), DeviceSel::Cpu(1)];
        assert_eq!(lease_devices(&slots, &[1]).unwrap(), vec![DeviceSel::Cpu(1)]);
        match lease_devices(&gpus, &[0, 2]) {
            Err(Outcome::Failed { class, reason }) => {
                assert_eq!(class, pb::FailureClass::Retryable);
                assert!(reason.contains("device index 2"), "{reason}");
            }
            other => panic!("{other:?}"),
        }
    }
}

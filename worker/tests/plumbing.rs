//! Worker plumbing against an in-process fake coordinator (a real tonic server on
//! loopback) and a scripted trainer: heartbeats keep going while training blocks,
//! checkpoints are committed only after their manifest exists, a refused epoch stops
//! the job with nothing more committed, a cancel stops it within a heartbeat, a missing
//! dataset fails the attempt as non-retryable.

use lorafleet_engine::train::{StepMetrics, TrainObserver, TrainRun};
use lorafleet_engine::EngineError;
use lorafleet_proto as pb;
use lorafleet_proto::worker_service_server::{WorkerService, WorkerServiceServer};
use lorafleet_shared::spec::{JobSpec, SpecContext};
use lorafleet_storage::{layout, Segment, Storage};
use lorafleet_worker::{DeviceSel, Trainer, Worker, WorkerConfig};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tonic::{Request, Response, Status};

#[derive(Default)]
struct Fake {
    leases: Mutex<Vec<pb::Lease>>,
    heartbeats: AtomicU32,
    /// Refuse every job call (stale epoch) from now on.
    stale: AtomicBool,
    /// Answer heartbeats with CANCEL.
    cancel: AtomicBool,
    commits: Mutex<Vec<(u64, String, bool)>>, // step, key, manifest existed at commit time
    completes: Mutex<Vec<pb::CompleteAttemptRequest>>,
    fails: Mutex<Vec<pb::FailAttemptRequest>>,
    steps: Mutex<Vec<u64>>,
    evals: Mutex<Vec<pb::EvalMetrics>>,
    logs: Mutex<Vec<String>>,
    storage: Mutex<Option<Storage>>,
}

#[derive(Clone)]
struct Svc(Arc<Fake>);

#[tonic::async_trait]
impl WorkerService for Svc {
    // An older coordinator: the worker uses its own --storage.
    async fn get_storage(&self, _r: Request<pb::GetStorageRequest>) -> Result<Response<pb::GetStorageResponse>, Status> {
        Err(Status::unimplemented("GetStorage"))
    }
    async fn register_worker(&self, _r: Request<pb::RegisterWorkerRequest>) -> Result<Response<pb::RegisterWorkerResponse>, Status> {
        Ok(Response::new(pb::RegisterWorkerResponse { worker_id: uuid::Uuid::new_v4().to_string(), lease_ttl_secs: 3, heartbeat_interval_secs: 1 }))
    }
    async fn heartbeat(&self, r: Request<pb::HeartbeatRequest>) -> Result<Response<pb::HeartbeatResponse>, Status> {
        self.0.heartbeats.fetch_add(1, Ordering::SeqCst);
        let action = if self.0.stale.load(Ordering::SeqCst) {
            pb::JobAction::Abandon
        } else if self.0.cancel.load(Ordering::SeqCst) {
            pb::JobAction::Cancel
        } else {
            pb::JobAction::Continue
        };
        let directives = r.into_inner().running.into_iter().map(|j| pb::JobDirective { job_id: j.job_id, epoch: j.epoch, action: action as i32 }).collect();
        Ok(Response::new(pb::HeartbeatResponse { directives }))
    }
    async fn acquire_job(&self, _r: Request<pb::AcquireJobRequest>) -> Result<Response<pb::AcquireJobResponse>, Status> {
        let lease = self.0.leases.lock().unwrap().pop();
        if lease.is_none() {
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        Ok(Response::new(pb::AcquireJobResponse { lease }))
    }
    async fn report_progress(&self, r: Request<pb::ReportProgressRequest>) -> Result<Response<pb::ReportProgressResponse>, Status> {
        if self.0.stale.load(Ordering::SeqCst) {
            return Err(Status::failed_precondition("stale epoch"));
        }
        let r = r.into_inner();
        self.0.steps.lock().unwrap().extend(r.steps.iter().map(|s| s.step));
        self.0.evals.lock().unwrap().extend(r.evals);
        self.0.logs.lock().unwrap().extend(r.logs.into_iter().map(|l| l.message));
        Ok(Response::new(pb::ReportProgressResponse { cancel: self.0.cancel.load(Ordering::SeqCst) }))
    }
    async fn commit_checkpoint(&self, r: Request<pb::CommitCheckpointRequest>) -> Result<Response<pb::CommitCheckpointResponse>, Status> {
        if self.0.stale.load(Ordering::SeqCst) {
            return Err(Status::failed_precondition("stale epoch"));
        }
        let r = r.into_inner();
        let storage = self.0.storage.lock().unwrap().clone().unwrap();
        let dir = layout::manifest_dir(&r.manifest_key).unwrap();
        let exists = storage.read_manifest(&dir).await.unwrap().is_some();
        self.0.commits.lock().unwrap().push((r.step, r.manifest_key, exists));
        Ok(Response::new(pb::CommitCheckpointResponse { cancel: false }))
    }
    async fn complete_attempt(&self, r: Request<pb::CompleteAttemptRequest>) -> Result<Response<pb::CompleteAttemptResponse>, Status> {
        if self.0.stale.load(Ordering::SeqCst) {
            return Err(Status::failed_precondition("stale epoch"));
        }
        self.0.completes.lock().unwrap().push(r.into_inner());
        Ok(Response::new(pb::CompleteAttemptResponse { state: pb::JobState::Succeeded as i32 }))
    }
    async fn fail_attempt(&self, r: Request<pb::FailAttemptRequest>) -> Result<Response<pb::FailAttemptResponse>, Status> {
        self.0.fails.lock().unwrap().push(r.into_inner());
        Ok(Response::new(pb::FailAttemptResponse { state: pb::JobState::Failed as i32 }))
    }
    async fn rendezvous(&self, _r: Request<pb::RendezvousRequest>) -> Result<Response<pb::RendezvousResponse>, Status> {
        Err(Status::unimplemented("these tests lease no gangs"))
    }
}

/// Steps `steps` times (`step_ms` each), checkpointing every `ckpt` steps; step
/// `block_at` blocks for `block_ms` without polling should_stop (a long step).
struct Scripted {
    steps: u64,
    step_ms: u64,
    ckpt: u64,
    block_at: u64,
    block_ms: u64,
}

impl Trainer for Scripted {
    fn train(&self, run: &TrainRun, obs: &mut dyn TrainObserver) -> lorafleet_engine::Result<f64> {
        assert!(run.train_data.is_file());
        obs.on_start(self.steps);
        for step in 1..=self.steps {
            if obs.should_stop() {
                return Err(EngineError::Cancelled);
            }
            std::thread::sleep(Duration::from_millis(if step == self.block_at { self.block_ms } else { self.step_ms }));
            obs.on_step(&StepMetrics { step, total_steps: self.steps, epoch: 0.0, loss: 1.0 / step as f64, lr: 1e-3, grad_norm: 1.0, tokens: 10, tokens_per_sec: 100.0, elapsed_secs: 0.0, eta_secs: 0.0, rank: 0, world_size: 1, rank_tokens_per_sec: 100.0 });
            if self.ckpt > 0 && step % self.ckpt == 0 && step < self.steps {
                let dir = run.work_dir.join("checkpoints").join(format!("step-{step}"));
                std::fs::create_dir_all(&dir).unwrap();
                std::fs::write(dir.join("adapter_model.safetensors"), format!("weights at {step}")).unwrap();
                std::fs::write(dir.join("state.json"), format!("{{\"step\":{step}}}")).unwrap();
                obs.on_checkpoint(step, &dir)?;
            }
        }
        std::fs::create_dir_all(&run.output_dir).unwrap();
        std::fs::write(run.output_dir.join("adapter_config.json"), "{}").unwrap();
        std::fs::write(run.output_dir.join("adapter_model.safetensors"), "final").unwrap();
        Ok(0.5)
    }
}

struct Env {
    fake: Arc<Fake>,
    storage: Storage,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    worker: tokio::task::JoinHandle<()>,
    _dir: tempfile::TempDir,
    model: std::path::PathBuf,
}

async fn start(trainer: impl Trainer) -> Env {
    let dir = tempfile::tempdir().unwrap();
    let storage_url = url::Url::from_directory_path(dir.path().join("store")).unwrap().to_string();
    let storage = Storage::open(&storage_url).unwrap();
    let fake = Arc::new(Fake::default());
    *fake.storage.lock().unwrap() = Some(storage.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let svc = Svc(fake.clone());
    tokio::spawn(async move {
        tonic::transport::Server::builder()
            .add_service(WorkerServiceServer::new(svc))
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener))
            .await
            .unwrap();
    });
    let model = dir.path().join("model");
    std::fs::create_dir_all(&model).unwrap();
    std::fs::write(model.join("config.json"), "{}").unwrap();
    let cfg = WorkerConfig {
        coordinator: format!("http://{addr}"),
        tls: Default::default(),
        token: None,
        name: "t".into(),
        devices: vec![DeviceSel::Cpu(0)],
        labels: vec![],
        cache: dir.path().join("cache"),
        storage_url: Some(storage_url),
        storage_options: Default::default(),
        acquire_wait: Duration::from_secs(1),
        check_create_only: true,
        advertise_host: None,
        collective_timeout: Duration::from_secs(60),
        allow_nccl: true,
        storage_retry: Duration::from_secs(10),
    };
    let w = Worker::new(cfg, Arc::new(trainer)).await.unwrap();
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let worker = tokio::spawn(async move {
        w.run(async {
            let _ = rx.await;
        })
        .await
        .unwrap();
    });
    Env { fake, storage, stop: Some(tx), worker, _dir: dir, model }
}

fn lease(env: &Env, job: &str, epoch: u64, train: &str) -> pb::Lease {
    let yaml = format!("name: t\nmodel: {{ source: {} }}\ndata: {{ train: {train:?} }}\noutput: {{ dir: out }}\n", env.model.display());
    let spec = JobSpec::from_yaml(&yaml, SpecContext::Remote).unwrap();
    pb::Lease {
        job_id: job.into(),
        epoch,
        attempt: 1,
        spec: Some(pb::JobSpec::from(&spec)),
        resume_checkpoint_key: String::new(),
        device_indices: vec![0],
        output_prefix: format!("jobs/{job}/attempts/{epoch}/"),
        lease_ttl_secs: 3,
        gang: None,
        fallback_checkpoint_keys: vec![],
    }
}

async fn wait_for(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) {
    let t = Instant::now();
    while !f() {
        assert!(t.elapsed() < timeout, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn dataset(env: &Env) -> String {
    let sha = env.storage.put_dataset_bytes(bytes::Bytes::from_static(b"[{\"question\":\"q\",\"answer\":\"a\"}]")).await.unwrap();
    format!("dataset://sha256/{sha}")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn completes_with_committed_checkpoints_and_heartbeats_during_long_steps() {
    let mut env = start(Scripted { steps: 6, step_ms: 50, ckpt: 2, block_at: 3, block_ms: 2600 }).await;
    let ds = dataset(&env).await;
    let job = uuid::Uuid::new_v4().to_string();
    env.fake.leases.lock().unwrap().push(lease(&env, &job, 7, &ds));
    let hb_before_block = Arc::new(AtomicU32::new(0));
    let fake = env.fake.clone();
    wait_for("step 2", Duration::from_secs(20), || fake.steps.lock().unwrap().contains(&2) || !fake.commits.lock().unwrap().is_empty()).await;
    hb_before_block.store(fake.heartbeats.load(Ordering::SeqCst), Ordering::SeqCst);
    wait_for("completion", Duration::from_secs(30), || !fake.completes.lock().unwrap().is_empty()).await;
    // Heartbeats went on while step 3 blocked the training thread for 2.6 s.
    assert!(fake.heartbeats.load(Ordering::SeqCst) >= hb_before_block.load(Ordering::SeqCst) + 2);

    let commits = fake.commits.lock().unwrap().clone();
    assert_eq!(commits.iter().map(|c| c.0).collect::<Vec<_>>(), [2, 4]);
    for (step, key, existed) in &commits {
        assert!(existed, "manifest of step {step} must exist before the commit");
        assert_eq!(key, &format!("jobs/{job}/attempts/7/checkpoints/step-{step}/manifest.json"));
    }
    let done = fake.completes.lock().unwrap()[0].clone();
    assert_eq!(done.epoch, 7);
    assert_eq!(done.adapter_manifest_key, format!("jobs/{job}/attempts/7/adapter/manifest.json"));
    let out = tempfile::tempdir().unwrap();
    let m = env.storage.download_dir(&layout::manifest_dir(&done.adapter_manifest_key).unwrap(), out.path()).await.unwrap();
    assert!(m.files.iter().any(|f| f.name == "adapter_model.safetensors"));
    assert_eq!(std::fs::read(out.path().join("adapter_model.safetensors")).unwrap(), b"final");
    assert!(fake.fails.lock().unwrap().is_empty());
    let _ = env.stop.take().unwrap().send(());
    env.worker.await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_dataset_fails_non_retryable_with_reason() {
    let env = start(Scripted { steps: 2, step_ms: 10, ckpt: 0, block_at: 0, block_ms: 0 }).await;
    let missing = format!("dataset://sha256/{}", "ab".repeat(32));
    env.fake.leases.lock().unwrap().push(lease(&env, &uuid::Uuid::new_v4().to_string(), 1, &missing));
    let fake = env.fake.clone();
    wait_for("fail", Duration::from_secs(20), || !fake.fails.lock().unwrap().is_empty()).await;
    let f = fake.fails.lock().unwrap()[0].clone();
    assert_eq!(f.failure_class, pb::FailureClass::NonRetryable as i32);
    assert!(f.reason.contains("data.train") && f.reason.contains("not found"), "{}", f.reason);
    assert!(fake.completes.lock().unwrap().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_epoch_stops_and_nothing_more_is_committed() {
    let env = start(Scripted { steps: 400, step_ms: 20, ckpt: 5, block_at: 0, block_ms: 0 }).await;
    let ds = dataset(&env).await;
    let job = uuid::Uuid::new_v4().to_string();
    env.fake.leases.lock().unwrap().push(lease(&env, &job, 3, &ds));
    let fake = env.fake.clone();
    wait_for("a committed checkpoint", Duration::from_secs(20), || !fake.commits.lock().unwrap().is_empty()).await;
    fake.stale.store(true, Ordering::SeqCst);
    let refused_at = Instant::now();
    let commits_then = fake.commits.lock().unwrap().len();
    // The job stops: the worker's scratch directory goes away and it asks for work again.
    let scratch = env._dir.path().join("cache/work").join(format!("{job}-3"));
    wait_for("the job to stop", Duration::from_secs(10), || !scratch.exists()).await;
    assert!(refused_at.elapsed() < Duration::from_secs(4), "stopped after {:?}", refused_at.elapsed());
    assert_eq!(fake.commits.lock().unwrap().len(), commits_then, "no commit accepted after the refusal");
    assert!(fake.completes.lock().unwrap().is_empty());
    assert!(fake.fails.lock().unwrap().is_empty(), "an abandoned attempt says nothing more");
    let adapter = layout::adapter(&Segment::new(job.clone()).unwrap(), 3);
    assert!(env.storage.read_manifest(&adapter).await.unwrap().is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_stops_within_a_heartbeat() {
    let env = start(Scripted { steps: 1000, step_ms: 20, ckpt: 0, block_at: 0, block_ms: 0 }).await;
    let ds = dataset(&env).await;
    env.fake.leases.lock().unwrap().push(lease(&env, &uuid::Uuid::new_v4().to_string(), 1, &ds));
    let fake = env.fake.clone();
    wait_for("progress", Duration::from_secs(20), || !fake.steps.lock().unwrap().is_empty()).await;
    fake.cancel.store(true, Ordering::SeqCst);
    let t = Instant::now();
    wait_for("fail(cancelled)", Duration::from_secs(10), || !fake.fails.lock().unwrap().is_empty()).await;
    assert!(t.elapsed() < Duration::from_millis(1500), "took {:?} (heartbeat is 1 s)", t.elapsed());
    assert_eq!(fake.fails.lock().unwrap()[0].reason, "cancelled");
    assert!(fake.completes.lock().unwrap().is_empty());
}

/// The real engine on the tiny Llama fixture with `save_best` (eval_loss, mode max: an
/// early evaluation is the best, since the eval loss falls as the model trains on the
/// eval data) and early stopping: the job completes before max_steps with the reason in
/// its log, its adapter in storage is the best one (the attempt's `best/`), and an
/// attempt resumed from the first attempt's checkpoint in a fresh scratch directory (as
/// on another worker) gets the same best adapter back from storage.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn save_best_job_uploads_the_best_adapter_and_a_resumed_attempt_keeps_it() {
    let env = start(lorafleet_worker::EngineTrainer).await;
    let fixtures = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/hf");
    let data = std::fs::read(fixtures.join("train/tiny-llama/data.jsonl")).unwrap();
    let sha = env.storage.put_dataset_bytes(bytes::Bytes::from(data)).await.unwrap();
    let ds = format!("dataset://sha256/{sha}");
    let yaml = format!(
        "name: best\nmodel: {{ source: {m:?} }}\nquantization: {{ method: none, compute_dtype: f32 }}\n\
         lora: {{ r: 8, alpha: 16, dropout: 0.0, target_modules: all-linear }}\n\
         data: {{ train: {ds:?}, eval: {ds:?}, max_seq_len: 64 }}\n\
         training: {{ max_steps: 40, micro_batch_size: 2, grad_accum: 2, lr: 5.0e-3, schedule: constant, warmup_steps: 0, seed: 3, eval_every: 2, checkpoint_every: 4, \
         eval_generate_samples: 2, eval_generate_max_new_tokens: 4, save_best: {{ metric: eval_loss, mode: max }}, early_stopping: {{ patience: 3 }} }}\n\
         output: {{ dir: out }}\n",
        m = fixtures.join("models/tiny-llama").display().to_string()
    );
    let spec = JobSpec::from_yaml(&yaml, SpecContext::Remote).unwrap();
    let job = uuid::Uuid::new_v4().to_string();
    let mut l = lease(&env, &job, 1, &ds);
    l.spec = Some(pb::JobSpec::from(&spec));
    env.fake.leases.lock().unwrap().push(l.clone());
    let fake = env.fake.clone();
    wait_for("completion", Duration::from_secs(120), || !fake.completes.lock().unwrap().is_empty() || !fake.fails.lock().unwrap().is_empty()).await;
    assert!(fake.fails.lock().unwrap().is_empty(), "{:?}", fake.fails.lock().unwrap());
    let done = fake.completes.lock().unwrap()[0].clone();

    // Stopped early, said so in the job's log, and reported the answer metrics and the best.
    let last_step = *fake.steps.lock().unwrap().iter().max().unwrap();
    assert!(last_step < 40, "stopped at {last_step}");
    let logs = fake.logs.lock().unwrap().clone();
    let reason = logs.iter().find(|l| l.starts_with(&format!("early stopping at step {last_step}: eval_loss did not improve by more than 0 in 3 evaluations; best ")));
    assert!(reason.is_some(), "{logs:?}");
    let evals = fake.evals.lock().unwrap().clone();
    let last = evals.last().unwrap();
    assert_eq!((last.step, last.generated, last.best_metric.as_str()), (last_step, 2, "eval_loss"));
    assert!(last.exact_match.is_some() && last.rouge_l.is_some(), "{last:?}");
    let best_step = last.best_step;
    assert!(best_step < last_step);
    assert!(logs.iter().any(|l| l.contains("the adapter is the best evaluation's: eval_loss") && l.contains(&format!("at step {best_step}"))), "{logs:?}");

    // The attempt's adapter in storage is its best/ adapter.
    let got = tempfile::tempdir().unwrap();
    env.storage.download_dir(&layout::manifest_dir(&done.adapter_manifest_key).unwrap(), got.path()).await.unwrap();
    let adapter = std::fs::read(got.path().join("adapter_model.safetensors")).unwrap();
    assert!(adapter == std::fs::read(got.path().join("best/adapter_model.safetensors")).unwrap(), "the job's adapter is the best one");
    let best: serde_json::Value = serde_json::from_slice(&std::fs::read(got.path().join("best/best.json")).unwrap()).unwrap();
    assert_eq!(best["step"], best_step);
    // The committed checkpoints carry best/.
    let commits = fake.commits.lock().unwrap().clone();
    assert_eq!(commits[0].0, 4);
    let ck = tempfile::tempdir().unwrap();
    env.storage.download_dir(&layout::manifest_dir(&commits[0].1).unwrap(), ck.path()).await.unwrap();
    assert!(ck.path().join("best/adapter_model.safetensors").is_file());

    // A second attempt resumed from the step-4 checkpoint, in a fresh scratch directory:
    // the same best adapter.
    fake.completes.lock().unwrap().clear();
    let mut l2 = l.clone();
    (l2.epoch, l2.attempt, l2.output_prefix, l2.resume_checkpoint_key) = (2, 2, format!("jobs/{job}/attempts/2/"), commits[0].1.clone());
    env.fake.leases.lock().unwrap().push(l2);
    wait_for("completion of attempt 2", Duration::from_secs(120), || !fake.completes.lock().unwrap().is_empty() || !fake.fails.lock().unwrap().is_empty()).await;
    assert!(fake.fails.lock().unwrap().is_empty(), "{:?}", fake.fails.lock().unwrap());
    let done2 = fake.completes.lock().unwrap()[0].clone();
    assert_eq!(done2.adapter_manifest_key, format!("jobs/{job}/attempts/2/adapter/manifest.json"));
    let got2 = tempfile::tempdir().unwrap();
    env.storage.download_dir(&layout::manifest_dir(&done2.adapter_manifest_key).unwrap(), got2.path()).await.unwrap();
    assert!(std::fs::read(got2.path().join("adapter_model.safetensors")).unwrap() == adapter, "the resumed attempt's adapter is the same best one");
}

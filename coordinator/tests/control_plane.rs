//! End-to-end tests of the coordinator over real gRPC on 127.0.0.1, SQLite on disk.

mod common;

use common::*;
use lorafleet_proto as pb;
use std::time::{Duration, Instant};
use tonic::Code;

fn progress(job_id: &str, epoch: u64, worker_id: &str) -> pb::ReportProgressRequest {
    pb::ReportProgressRequest {
        job_id: job_id.into(),
        epoch,
        worker_id: worker_id.into(),
        steps: vec![pb::StepMetrics { step: 3, total_steps: 10, loss: 1.25, lr: 2e-4, grad_norm: 0.5, tokens_per_sec: 100.0, eta_secs: 7.0, data_epoch: 0.3, ranks: vec![] }],
        evals: vec![],
        logs: vec![pb::LogLine { unix_ms: 1, level: "info".into(), message: "step 3".into() }],
        ranks: vec![],
    }
}

fn fail_req(job_id: &str, epoch: u64, worker_id: &str, class: pb::FailureClass) -> pb::FailAttemptRequest {
    pb::FailAttemptRequest { job_id: job_id.into(), epoch, worker_id: worker_id.into(), failure_class: class as i32, reason: "boom".into() }
}

#[tokio::test]
async fn restart_keeps_jobs_states_and_epochs() {
    let dir = tempfile::tempdir().unwrap();
    let c = Coord::start(dir.path().to_path_buf(), fast_control()).await;
    let (mut j, mut w) = (c.jobs().await, c.workers().await);
    let running = submit(&mut j, spec("running")).await;
    let cancelled = submit(&mut j, spec("cancelled")).await;
    let queued = submit(&mut j, spec("queued")).await;
    let wid = register(&mut w, cpu()).await;
    let lease = acquire(&mut w, &wid, 0).await.unwrap();
    assert_eq!((lease.job_id.as_str(), lease.epoch, lease.attempt), (running.job_id.as_str(), 1, 1));
    j.cancel_job(pb::CancelJobRequest { job_id: cancelled.job_id.clone(), reason: String::new() }).await.unwrap();
    c.stop().await;

    let c = Coord::start(dir.path().to_path_buf(), fast_control()).await;
    let (mut j, mut w) = (c.jobs().await, c.workers().await);
    let r = get(&mut j, &running.job_id).await;
    assert_eq!((state(&r), r.epoch, r.attempt, r.worker_id.as_str()), (pb::JobState::Running, 1, 1, wid.as_str()));
    assert_eq!(state(&get(&mut j, &cancelled.job_id).await), pb::JobState::Cancelled);
    assert_eq!(state(&get(&mut j, &queued.job_id).await), pb::JobState::Queued);
    // The worker is still known and its lease survived the restart.
    let hb = w
        .heartbeat(pb::HeartbeatRequest { worker_id: wid.clone(), running: vec![pb::RunningJob { job_id: running.job_id.clone(), epoch: 1 }] })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(hb.directives[0].action, pb::JobAction::Continue as i32);
    // The single CPU device is still busy with the surviving lease.
    assert!(acquire(&mut w, &wid, 0).await.is_none());
    let w2 = register(&mut w, cpu()).await;
    let next = acquire(&mut w, &w2, 0).await.unwrap();
    assert_eq!((next.job_id.as_str(), next.epoch), (queued.job_id.as_str(), 1));
    c.stop().await;
}

#[tokio::test]
async fn lease_expiry_requeues_with_next_epoch_and_stale_calls_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let control = lorafleet_coordinator::ControlConfig { lease_ttl: Duration::from_millis(600), ..fast_control() };
    let c = Coord::start(dir.path().to_path_buf(), control).await;
    let (mut j, mut w) = (c.jobs().await, c.workers().await);
    let job = submit(&mut j, spec("expire")).await;
    let a = register(&mut w, cpu()).await;
    let first = acquire(&mut w, &a, 0).await.unwrap();
    assert_eq!(first.epoch, 1);
    // Worker A goes silent: the lease expires and the job is queued again.
    let requeued = wait_state(&mut j, &job.job_id, pb::JobState::Queued).await;
    assert_eq!((requeued.epoch, requeued.attempt), (1, 1));
    assert!(requeued.error.contains("lease expired"), "{}", requeued.error);
    let b = register(&mut w, cpu()).await;
    let second = acquire(&mut w, &b, 0).await.unwrap();
    assert_eq!((second.job_id.as_str(), second.epoch, second.attempt), (job.job_id.as_str(), 2, 2));
    // Every call from A with epoch 1 is refused as stale.
    let e = w.report_progress(progress(&job.job_id, 1, &a)).await.unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition);
    assert!(e.message().contains("stale epoch 1"), "{}", e.message());
    let e = w
        .complete_attempt(pb::CompleteAttemptRequest {
            job_id: job.job_id.clone(),
            epoch: 1,
            worker_id: a.clone(),
            adapter_manifest_key: format!("jobs/{}/attempts/1/adapter/manifest.json", job.job_id),
            final_loss: None,
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition);
    assert!(e.message().contains("stale epoch"), "{}", e.message());
    // A forged call with B's epoch but A's id is refused too.
    let e = w.report_progress(progress(&job.job_id, 2, &a)).await.unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition);
    // B's calls work.
    let r = w.report_progress(progress(&job.job_id, 2, &b)).await.unwrap().into_inner();
    assert!(!r.cancel);
    let got = get(&mut j, &job.job_id).await;
    assert_eq!((got.step, got.total_steps, got.loss), (3, 10, Some(1.25)));
    c.stop().await;
}

#[tokio::test]
async fn retry_budget_then_failure_and_non_retryable_fails_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let c = Coord::start(dir.path().to_path_buf(), fast_control()).await;
    let (mut j, mut w) = (c.jobs().await, c.workers().await);
    let wid = register(&mut w, cpu()).await;
    let job = submit(&mut j, spec_with("retry", |s| s.max_attempts = 2)).await;
    let l1 = acquire(&mut w, &wid, 0).await.unwrap();
    let r = w.fail_attempt(fail_req(&job.job_id, l1.epoch, &wid, pb::FailureClass::Retryable)).await.unwrap().into_inner();
    assert_eq!(r.state, pb::JobState::Queued as i32);
    let l2 = acquire(&mut w, &wid, 0).await.unwrap();
    assert_eq!((l2.epoch, l2.attempt), (2, 2));
    let r = w.fail_attempt(fail_req(&job.job_id, l2.epoch, &wid, pb::FailureClass::Retryable)).await.unwrap().into_inner();
    assert_eq!(r.state, pb::JobState::Failed as i32, "budget of 2 attempts used");
    let got = get(&mut j, &job.job_id).await;
    assert_eq!((state(&got), got.failure_class), (pb::JobState::Failed, pb::FailureClass::Retryable as i32));

    let job = submit(&mut j, spec("fatal")).await;
    let l = acquire(&mut w, &wid, 0).await.unwrap();
    let r = w.fail_attempt(fail_req(&job.job_id, l.epoch, &wid, pb::FailureClass::NonRetryable)).await.unwrap().into_inner();
    assert_eq!(r.state, pb::JobState::Failed as i32);
    let got = get(&mut j, &job.job_id).await;
    assert_eq!((got.attempt, got.error.as_str()), (1, "boom"));
    // A second report for the ended attempt is stale.
    let e = w.fail_attempt(fail_req(&job.job_id, l.epoch, &wid, pb::FailureClass::Retryable)).await.unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition);
    c.stop().await;
}

#[tokio::test]
async fn twenty_concurrent_submits_with_one_key_create_one_job() {
    let dir = tempfile::tempdir().unwrap();
    let c = Coord::start(dir.path().to_path_buf(), fast_control()).await;
    let mut tasks = Vec::new();
    for _ in 0..20 {
        let mut j = c.jobs().await;
        tasks.push(tokio::spawn(async move {
            j.submit_job(pb::SubmitJobRequest { spec: Some(spec("idem")), idempotency_key: "key-1".into() }).await.unwrap().into_inner()
        }));
    }
    let mut ids = std::collections::HashSet::new();
    let mut created = 0;
    for t in tasks {
        let r = t.await.unwrap();
        ids.insert(r.job.unwrap().job_id);
        created += r.created as usize;
    }
    assert_eq!((ids.len(), created), (1, 1));
    let mut j = c.jobs().await;
    let all = j.list_jobs(pb::ListJobsRequest::default()).await.unwrap().into_inner();
    assert_eq!(all.jobs.len(), 1);
    let e = j
        .submit_job(pb::SubmitJobRequest { spec: Some(spec_with("idem", |s| s.priority = 3)), idempotency_key: "key-1".into() })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::AlreadyExists);
    assert!(e.message().contains("different spec"), "{}", e.message());
    c.stop().await;
}

#[tokio::test]
async fn scheduling_priority_fifo_and_resources() {
    let dir = tempfile::tempdir().unwrap();
    let c = Coord::start(dir.path().to_path_buf(), fast_control()).await;
    let (mut j, mut w) = (c.jobs().await, c.workers().await);
    let a = submit(&mut j, spec("a-low")).await;
    let b = submit(&mut j, spec_with("b-high", |s| s.priority = 5)).await;
    let cc = submit(&mut j, spec("c-low")).await;
    let big = submit(&mut j, gpu_spec("d-gpu-80g", 1, 80_000)).await;
    let small = submit(&mut j, gpu_spec("e-gpu-any", 1, 0)).await;
    let cpu_w = register(&mut w, cpu()).await;
    let mut order = Vec::new();
    for _ in 0..3 {
        let l = acquire(&mut w, &cpu_w, 0).await.unwrap();
        order.push(l.job_id.clone());
        w.complete_attempt(pb::CompleteAttemptRequest {
            job_id: l.job_id.clone(),
            epoch: l.epoch,
            worker_id: cpu_w.clone(),
            adapter_manifest_key: format!("{}adapter/manifest.json", l.output_prefix),
            final_loss: Some(0.5),
        })
        .await
        .unwrap();
    }
    assert_eq!(order, vec![b.job_id, a.job_id, cc.job_id], "priority first, then FIFO");
    assert!(acquire(&mut w, &cpu_w, 0).await.is_none(), "a CPU worker never gets GPU jobs");
    let small_gpu = register(&mut w, gpus(1, 24_000)).await;
    let l = acquire(&mut w, &small_gpu, 0).await.unwrap();
    assert_eq!(l.job_id, small.job_id, "the 80 GiB job does not fit a 24 GiB GPU");
    let h100 = register(&mut w, gpus(1, 81_000)).await;
    let l = acquire(&mut w, &h100, 0).await.unwrap();
    assert_eq!((l.job_id.as_str(), l.device_indices.as_slice()), (big.job_id.as_str(), &[0u32][..]));
    c.stop().await;
}

#[tokio::test]
async fn large_job_is_not_starved_by_small_ones() {
    let dir = tempfile::tempdir().unwrap();
    let c = Coord::start(dir.path().to_path_buf(), fast_control()).await;
    let (mut j, mut w) = (c.jobs().await, c.workers().await);
    let wid = register(&mut w, gpus(2, 40_000)).await;
    let first = submit(&mut j, gpu_spec("small-0", 1, 0)).await;
    let l0 = acquire(&mut w, &wid, 0).await.unwrap();
    assert_eq!(l0.job_id, first.job_id);
    let big = submit(&mut j, gpu_spec("big", 2, 0)).await;
    for i in 1..4 {
        submit(&mut j, gpu_spec(&format!("small-{i}"), 1, 0)).await;
    }
    // GPU 1 is free, but the big job is first in line: the worker waits for it.
    assert!(acquire(&mut w, &wid, 0).await.is_none());
    w.complete_attempt(pb::CompleteAttemptRequest {
        job_id: l0.job_id.clone(),
        epoch: l0.epoch,
        worker_id: wid.clone(),
        adapter_manifest_key: format!("{}adapter/manifest.json", l0.output_prefix),
        final_loss: None,
    })
    .await
    .unwrap();
    let l = acquire(&mut w, &wid, 0).await.unwrap();
    assert_eq!((l.job_id.as_str(), l.device_indices.as_slice()), (big.job_id.as_str(), &[0u32, 1][..]));
    c.stop().await;
}

#[tokio::test]
async fn cancel_queued_and_running_jobs() {
    let dir = tempfile::tempdir().unwrap();
    let c = Coord::start(dir.path().to_path_buf(), fast_control()).await;
    let (mut j, mut w) = (c.jobs().await, c.workers().await);
    let run1 = submit(&mut j, spec("run1")).await;
    let run2 = submit(&mut j, spec("run2")).await;
    let queued = submit(&mut j, spec("queued")).await;
    let (w1, w2) = (register(&mut w, cpu()).await, register(&mut w, cpu()).await);
    let l1 = acquire(&mut w, &w1, 0).await.unwrap();
    let l2 = acquire(&mut w, &w2, 0).await.unwrap();
    assert_eq!((l1.job_id.as_str(), l2.job_id.as_str()), (run1.job_id.as_str(), run2.job_id.as_str()));

    let r = j.cancel_job(pb::CancelJobRequest { job_id: queued.job_id.clone(), reason: "not needed".into() }).await.unwrap();
    let q = r.into_inner().job.unwrap();
    assert_eq!((state(&q), q.error.as_str()), (pb::JobState::Cancelled, "not needed"));

    // Running job 1: the worker learns at its next heartbeat and progress report, stops
    // and reports; the job ends cancelled.
    let r = j.cancel_job(pb::CancelJobRequest { job_id: run1.job_id.clone(), reason: String::new() }).await.unwrap();
    assert_eq!(state(&r.into_inner().job.unwrap()), pb::JobState::Cancelling);
    let hb = w
        .heartbeat(pb::HeartbeatRequest { worker_id: w1.clone(), running: vec![pb::RunningJob { job_id: run1.job_id.clone(), epoch: l1.epoch }] })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(hb.directives[0].action, pb::JobAction::Cancel as i32);
    assert!(w.report_progress(progress(&run1.job_id, l1.epoch, &w1)).await.unwrap().into_inner().cancel);
    let r = w.fail_attempt(fail_req(&run1.job_id, l1.epoch, &w1, pb::FailureClass::Retryable)).await.unwrap().into_inner();
    assert_eq!(r.state, pb::JobState::Cancelled as i32, "a cancelled job is not retried");

    // Running job 2: the worker stops and simply no longer lists it in heartbeats.
    j.cancel_job(pb::CancelJobRequest { job_id: run2.job_id.clone(), reason: String::new() }).await.unwrap();
    tokio::time::sleep(Duration::from_millis(250)).await;
    w.heartbeat(pb::HeartbeatRequest { worker_id: w2.clone(), running: vec![] }).await.unwrap();
    assert_eq!(state(&get(&mut j, &run2.job_id).await), pb::JobState::Cancelled);
    // Its device is free again.
    let next = submit(&mut j, spec("after")).await;
    assert_eq!(acquire(&mut w, &w2, 0).await.unwrap().job_id, next.job_id);
    c.stop().await;
}

#[tokio::test]
async fn invalid_specs_are_refused_with_their_field_path() {
    let dir = tempfile::tempdir().unwrap();
    let c = Coord::start(dir.path().to_path_buf(), fast_control()).await;
    let mut j = c.jobs().await;
    let cases: Vec<(&str, pb::JobSpec)> = vec![
        ("lora.r", spec_with("a", |s| s.lora.as_mut().unwrap().r = 0)),
        ("output.dir", spec_with("a", |s| s.output.as_mut().unwrap().dir = "../escape".into())),
        ("output.dir", spec_with("a", |s| s.output.as_mut().unwrap().dir = "/etc".into())),
        ("name", spec_with("a", |s| s.name = "..".into())),
        ("name", spec_with("a", |s| s.name = "a\0b".into())),
        ("data.train", spec_with("a", |s| s.data.as_mut().unwrap().train = "/etc/passwd".into())),
        ("data.train", spec_with("a", |s| s.data.as_mut().unwrap().train = "dataset://sha256/../../x".into())),
        ("model.source", spec_with("a", |s| s.model.as_mut().unwrap().source = "../../models".into())),
        ("model", spec_with("a", |s| s.model = None)),
        ("training.betas", spec_with("a", |s| s.training.as_mut().unwrap().betas = vec![])),
        ("data.format", spec_with("a", |s| s.data.as_mut().unwrap().format = 0)),
    ];
    for (field, spec) in cases {
        let e = j.submit_job(pb::SubmitJobRequest { spec: Some(spec), idempotency_key: String::new() }).await.unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument, "{field}");
        assert!(e.message().contains(&format!("{field}: ")), "{field}: {}", e.message());
    }
    let e = j.submit_job(pb::SubmitJobRequest { spec: None, idempotency_key: String::new() }).await.unwrap_err();
    assert_eq!((e.code(), e.message()), (Code::InvalidArgument, "spec: missing"));
    let e = j.get_job(pb::GetJobRequest { job_id: "../x".into() }).await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    let e = j.get_job(pb::GetJobRequest { job_id: uuid::Uuid::new_v4().to_string() }).await.unwrap_err();
    assert_eq!(e.code(), Code::NotFound);
    assert!(j.list_jobs(pb::ListJobsRequest::default()).await.unwrap().into_inner().jobs.is_empty());
    c.stop().await;
}

#[tokio::test]
async fn long_poll_wakes_when_a_job_arrives() {
    let dir = tempfile::tempdir().unwrap();
    let c = Coord::start(dir.path().to_path_buf(), fast_control()).await;
    let (mut j, mut w) = (c.jobs().await, c.workers().await);
    let wid = register(&mut w, cpu()).await;
    let started = Instant::now();
    let mut w2 = w.clone();
    let wid2 = wid.clone();
    let poll = tokio::spawn(async move { acquire(&mut w2, &wid2, 10).await });
    tokio::time::sleep(Duration::from_millis(200)).await;
    let job = submit(&mut j, spec("late")).await;
    let lease = poll.await.unwrap().unwrap();
    assert_eq!(lease.job_id, job.job_id);
    assert!(started.elapsed() < Duration::from_secs(3));
    // A short wait with nothing queued returns empty after about the wait.
    let t = Instant::now();
    let other = register(&mut w, cpu()).await;
    assert!(acquire(&mut w, &other, 1).await.is_none());
    assert!(t.elapsed() >= Duration::from_millis(900), "{:?}", t.elapsed());
    c.stop().await;
}

#[tokio::test]
async fn unknown_worker_must_register_again() {
    let dir = tempfile::tempdir().unwrap();
    let c = Coord::start(dir.path().to_path_buf(), fast_control()).await;
    let mut w = c.workers().await;
    let e = w.heartbeat(pb::HeartbeatRequest { worker_id: uuid::Uuid::new_v4().to_string(), running: vec![] }).await.unwrap_err();
    assert_eq!(e.code(), Code::NotFound);
    let e = w
        .register_worker(pb::RegisterWorkerRequest { name: "w".into(), devices: vec![pb::Device::default()], ..Default::default() })
        .await
        .unwrap_err();
    assert!(e.message().starts_with("devices[0].kind: "), "{}", e.message());
    c.stop().await;
}

#[tokio::test]
async fn list_jobs_filters_and_pages() {
    let dir = tempfile::tempdir().unwrap();
    let c = Coord::start(dir.path().to_path_buf(), fast_control()).await;
    let mut j = c.jobs().await;
    let mut ids = Vec::new();
    for i in 0..5 {
        let s = spec_with(&format!("j{i}"), |s| {
            s.labels.insert("team".into(), if i % 2 == 0 { "nlp" } else { "cv" }.into());
        });
        ids.push(submit(&mut j, s).await.job_id);
    }
    j.cancel_job(pb::CancelJobRequest { job_id: ids[0].clone(), reason: String::new() }).await.unwrap();
    let nlp = j
        .list_jobs(pb::ListJobsRequest { labels: [("team".to_string(), "nlp".to_string())].into(), ..Default::default() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(nlp.jobs.iter().map(|j| j.job_id.clone()).collect::<Vec<_>>(), vec![ids[4].clone(), ids[2].clone(), ids[0].clone()]);
    let q = j.list_jobs(pb::ListJobsRequest { states: vec![pb::JobState::Queued as i32], ..Default::default() }).await.unwrap().into_inner();
    assert_eq!(q.jobs.len(), 4);
    let p1 = j.list_jobs(pb::ListJobsRequest { page_size: 2, ..Default::default() }).await.unwrap().into_inner();
    let p2 = j.list_jobs(pb::ListJobsRequest { page_size: 2, page_token: p1.next_page_token.clone(), ..Default::default() }).await.unwrap().into_inner();
    let p3 = j.list_jobs(pb::ListJobsRequest { page_size: 2, page_token: p2.next_page_token.clone(), ..Default::default() }).await.unwrap().into_inner();
    let all: Vec<String> = [p1.jobs, p2.jobs, p3.jobs].concat().into_iter().map(|j| j.job_id).collect();
    assert_eq!(all, ids.iter().rev().cloned().collect::<Vec<_>>());
    assert!(p3.next_page_token.is_empty());
    c.stop().await;
}

#[tokio::test]
async fn heartbeats_renew_the_lease() {
    let dir = tempfile::tempdir().unwrap();
    let control = lorafleet_coordinator::ControlConfig { lease_ttl: Duration::from_millis(600), ..fast_control() };
    let c = Coord::start(dir.path().to_path_buf(), control).await;
    let (mut j, mut w) = (c.jobs().await, c.workers().await);
    let job = submit(&mut j, spec("renewed")).await;
    let wid = register(&mut w, cpu()).await;
    let l = acquire(&mut w, &wid, 0).await.unwrap();
    // Three TTLs of heartbeats: the lease stays live and the epoch does not move.
    for _ in 0..12 {
        let hb = w
            .heartbeat(pb::HeartbeatRequest { worker_id: wid.clone(), running: vec![pb::RunningJob { job_id: l.job_id.clone(), epoch: l.epoch }] })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(hb.directives[0].action, pb::JobAction::Continue as i32);
        tokio::time::sleep(Duration::from_millis(150)).await;
    }
    let got = get(&mut j, &job.job_id).await;
    assert_eq!((state(&got), got.epoch, got.attempt), (pb::JobState::Running, 1, 1));
    // A heartbeat naming an epoch that is not the lease's is told to abandon it.
    let hb = w
        .heartbeat(pb::HeartbeatRequest { worker_id: wid.clone(), running: vec![pb::RunningJob { job_id: l.job_id.clone(), epoch: 7 }] })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(hb.directives[0].action, pb::JobAction::Abandon as i32);
    c.stop().await;
}

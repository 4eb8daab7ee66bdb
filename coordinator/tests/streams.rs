//! Streaming calls (WatchJob, UploadDataset, DownloadAdapter), logs, checkpoints,
//! health and metrics, over real gRPC.

mod common;

use common::*;
use lorafleet_proto as pb;
use std::collections::BTreeMap;
use std::time::Duration;
use tokio_stream::StreamExt;
use tonic::Code;

fn upload_msgs(name: &str, data: &[u8], sha: &str) -> Vec<pb::UploadDatasetRequest> {
    use pb::upload_dataset_request::Part;
    let mut v = vec![pb::UploadDatasetRequest {
        part: Some(Part::Header(pb::UploadDatasetHeader { file_name: name.into(), size: data.len() as u64, sha256: sha.into() })),
    }];
    for c in data.chunks(1000) {
        v.push(pb::UploadDatasetRequest { part: Some(Part::Data(c.to_vec())) });
    }
    v
}

#[tokio::test]
async fn full_job_lifecycle_with_watch_logs_checkpoints_and_adapter_download() {
    let dir = tempfile::tempdir().unwrap();
    let c = Coord::start(dir.path().to_path_buf(), fast_control()).await;
    let (mut j, mut w) = (c.jobs().await, c.workers().await);

    // Upload a dataset (twice: the second is recognised) and use its ref.
    let data: Vec<u8> = (0..5000u32).flat_map(|i| i.to_le_bytes()).collect();
    let sha = {
        use sha2::Digest;
        hex::encode(sha2::Sha256::digest(&data))
    };
    let up = j.upload_dataset(tokio_stream::iter(upload_msgs("faq.json", &data, &sha))).await.unwrap().into_inner();
    assert_eq!((up.dataset_ref.clone(), up.size, up.already_existed), (format!("dataset://sha256/{sha}"), data.len() as u64, false));
    let again = j.upload_dataset(tokio_stream::iter(upload_msgs("faq.json", &data, ""))).await.unwrap().into_inner();
    assert!(again.already_existed);
    let e = j.upload_dataset(tokio_stream::iter(upload_msgs("../faq.json", &data, ""))).await.unwrap_err();
    assert!(e.message().starts_with("header.file_name: "), "{}", e.message());
    let e = j.upload_dataset(tokio_stream::iter(upload_msgs("x.json", &data, &"0".repeat(64)))).await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);

    let job = submit(&mut j, spec_with("life", |s| s.data.as_mut().unwrap().train = up.dataset_ref.clone())).await;
    let mut watch = j.watch_job(pb::WatchJobRequest { job_id: job.job_id.clone(), after_seq: 0 }).await.unwrap().into_inner();
    let wid = register(&mut w, cpu()).await;
    let lease = acquire(&mut w, &wid, 0).await.unwrap();
    assert_eq!(lease.spec.as_ref().unwrap().data.as_ref().unwrap().train, up.dataset_ref);
    assert_eq!(lease.output_prefix, format!("jobs/{}/attempts/1/", job.job_id));
    assert!(lease.resume_checkpoint_key.is_empty());

    let progress = pb::ReportProgressRequest {
        job_id: job.job_id.clone(),
        epoch: lease.epoch,
        worker_id: wid.clone(),
        steps: vec![pb::StepMetrics { step: 1, total_steps: 2, loss: 2.0, ..Default::default() }],
        evals: vec![pb::EvalMetrics { step: 1, eval_loss: 1.9, perplexity: 6.7, samples: vec![], ..Default::default() }],
        logs: (0..3).map(|i| pb::LogLine { unix_ms: i, level: "info".into(), message: format!("line {i}") }).collect(),
        ranks: vec![],
    };
    w.report_progress(progress).await.unwrap();
    let ckpt = format!("{}checkpoints/step-1/manifest.json", lease.output_prefix);
    w.commit_checkpoint(pb::CommitCheckpointRequest { job_id: job.job_id.clone(), epoch: lease.epoch, worker_id: wid.clone(), step: 1, manifest_key: ckpt.clone() })
        .await
        .unwrap();
    let e = w
        .commit_checkpoint(pb::CommitCheckpointRequest {
            job_id: job.job_id.clone(),
            epoch: lease.epoch,
            worker_id: wid.clone(),
            step: 1,
            manifest_key: "jobs/other/x/manifest.json".into(),
        })
        .await
        .unwrap_err();
    assert!(e.message().starts_with("manifest_key: "), "{}", e.message());
    // A worker can only name what its own attempt wrote: not the job's published
    // adapter, not another attempt's directory.
    for key in [format!("jobs/{}/adapter/manifest.json", job.job_id), format!("jobs/{}/attempts/9/adapter/manifest.json", job.job_id)] {
        let e = w
            .complete_attempt(pb::CompleteAttemptRequest {
                job_id: job.job_id.clone(),
                epoch: lease.epoch,
                worker_id: wid.clone(),
                adapter_manifest_key: key.clone(),
                final_loss: None,
            })
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument, "{key}");
        assert!(e.message().contains("this attempt's prefix"), "{}", e.message());
    }

    // The worker writes the adapter through lorafleet-storage, then completes.
    let storage = lorafleet_storage::Storage::open(&c.storage_url()).unwrap();
    let local = dir.path().join("adapter");
    std::fs::create_dir_all(&local).unwrap();
    std::fs::write(local.join("adapter_config.json"), br#"{"r": 8}"#).unwrap();
    let weights: Vec<u8> = (0..700_000u32).map(|i| (i % 251) as u8).collect();
    std::fs::write(local.join("adapter_model.safetensors"), &weights).unwrap();
    let adapter_dir = lorafleet_storage::RelPath::parse(&format!("{}adapter", lease.output_prefix)).unwrap();
    storage.upload_dir(&adapter_dir, &local, BTreeMap::new()).await.unwrap();
    let r = w
        .complete_attempt(pb::CompleteAttemptRequest {
            job_id: job.job_id.clone(),
            epoch: lease.epoch,
            worker_id: wid.clone(),
            adapter_manifest_key: format!("{adapter_dir}/manifest.json"),
            final_loss: Some(1.5),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.state, pb::JobState::Succeeded as i32);

    // The watch stream saw every event in order and ended with the final state.
    let mut kinds = Vec::new();
    let mut seqs = Vec::new();
    while let Some(ev) = tokio::time::timeout(Duration::from_secs(5), watch.next()).await.unwrap() {
        let ev = ev.unwrap();
        seqs.push(ev.seq);
        kinds.push(match ev.event.unwrap() {
            pb::job_event::Event::StateChange(sc) => format!("state:{:?}", pb::JobState::try_from(sc.to).unwrap()),
            pb::job_event::Event::Step(s) => format!("step:{}", s.step),
            pb::job_event::Event::Eval(e) => format!("eval:{}", e.step),
            pb::job_event::Event::Checkpoint(c) => format!("ckpt:{}", c.step),
        });
    }
    assert_eq!(kinds, ["state:Queued", "state:Running", "step:1", "eval:1", "ckpt:1", "state:Succeeded"]);
    assert_eq!(seqs, [1, 2, 3, 4, 5, 6]);
    // Replay from a sequence number.
    let replay: Vec<u64> = j
        .watch_job(pb::WatchJobRequest { job_id: job.job_id.clone(), after_seq: 4 })
        .await
        .unwrap()
        .into_inner()
        .map(|e| e.unwrap().seq)
        .collect()
        .await;
    assert_eq!(replay, [5, 6]);

    let logs = j.get_job_logs(pb::GetJobLogsRequest { job_id: job.job_id.clone(), after_seq: 1, limit: 0 }).await.unwrap().into_inner();
    assert_eq!(logs.lines.iter().map(|l| l.line.as_ref().unwrap().message.clone()).collect::<Vec<_>>(), ["line 1", "line 2"]);
    let cps = j.list_checkpoints(pb::ListCheckpointsRequest { job_id: job.job_id.clone() }).await.unwrap().into_inner();
    assert_eq!((cps.checkpoints.len(), cps.checkpoints[0].manifest_key.as_str(), cps.checkpoints[0].epoch), (1, ckpt.as_str(), 1));
    let got = get(&mut j, &job.job_id).await;
    assert_eq!((got.latest_checkpoint_key.as_str(), got.loss), (ckpt.as_str(), Some(1.5)));

    // Download: manifest first, then the bytes of each file, matching their digests.
    let mut s = j.download_adapter(pb::DownloadAdapterRequest { job_id: job.job_id.clone() }).await.unwrap().into_inner();
    let first = s.next().await.unwrap().unwrap();
    let files = match first.part.unwrap() {
        pb::download_adapter_response::Part::Manifest(m) => m.files,
        other => panic!("first message must be the manifest: {other:?}"),
    };
    let names: Vec<_> = files.iter().map(|f| f.name.as_str()).collect();
    assert_eq!(names, ["adapter_config.json", "adapter_model.safetensors"]);
    let mut got_bytes = vec![Vec::new(); files.len()];
    while let Some(m) = s.next().await {
        match m.unwrap().part.unwrap() {
            pb::download_adapter_response::Part::Chunk(c) => {
                assert_eq!(c.offset as usize, got_bytes[c.file_index as usize].len());
                got_bytes[c.file_index as usize].extend_from_slice(&c.data);
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(got_bytes[0], br#"{"r": 8}"#);
    assert_eq!(got_bytes[1], weights);
    for (f, b) in files.iter().zip(&got_bytes) {
        use sha2::Digest;
        assert_eq!((f.size, f.sha256.clone()), (b.len() as u64, hex::encode(sha2::Sha256::digest(b))));
    }
    // The job's final adapter is published under jobs/<job>/adapter/ (by the completion
    // or, if that has not finished yet, by the download), with the same files.
    let job_seg = lorafleet_storage::Segment::new(job.job_id.clone()).unwrap();
    let published = lorafleet_storage::layout::final_adapter(&job_seg);
    assert_eq!(published.to_string(), format!("jobs/{}/adapter", job.job_id));
    let pm = storage.read_manifest(&published).await.unwrap().expect("published manifest");
    let am = storage.read_manifest(&adapter_dir).await.unwrap().unwrap();
    assert_eq!(pm.files, am.files);
    assert_eq!(pm.meta["published_from"], serde_json::json!(adapter_dir.to_string()));
    let fetched = dir.path().join("fetched");
    storage.download_dir(&published, &fetched).await.unwrap();
    assert_eq!(std::fs::read(fetched.join("adapter_model.safetensors")).unwrap(), weights);

    // No adapter for a job that did not succeed.
    let other = submit(&mut j, spec("other")).await;
    let e = j.download_adapter(pb::DownloadAdapterRequest { job_id: other.job_id }).await.unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition);
    c.stop().await;
}

#[tokio::test]
async fn resume_checkpoint_is_handed_to_the_next_attempt() {
    let dir = tempfile::tempdir().unwrap();
    let c = Coord::start(dir.path().to_path_buf(), fast_control()).await;
    let (mut j, mut w) = (c.jobs().await, c.workers().await);
    let job = submit(&mut j, spec("resume")).await;
    let wid = register(&mut w, cpu()).await;
    let l1 = acquire(&mut w, &wid, 0).await.unwrap();
    let key = format!("{}checkpoints/step-4/manifest.json", l1.output_prefix);
    w.commit_checkpoint(pb::CommitCheckpointRequest { job_id: job.job_id.clone(), epoch: 1, worker_id: wid.clone(), step: 4, manifest_key: key.clone() })
        .await
        .unwrap();
    w.fail_attempt(pb::FailAttemptRequest {
        job_id: job.job_id.clone(),
        epoch: 1,
        worker_id: wid.clone(),
        failure_class: pb::FailureClass::Retryable as i32,
        reason: "oom".into(),
    })
    .await
    .unwrap();
    let l2 = acquire(&mut w, &wid, 0).await.unwrap();
    assert_eq!((l2.epoch, l2.resume_checkpoint_key.as_str(), l2.output_prefix.clone()), (2, key.as_str(), format!("jobs/{}/attempts/2/", job.job_id)));
    c.stop().await;
}

#[tokio::test]
async fn health_metrics_and_worker_listing() {
    let dir = tempfile::tempdir().unwrap();
    let c = Coord::start(dir.path().to_path_buf(), fast_control()).await;
    let (mut j, mut w) = (c.jobs().await, c.workers().await);
    let ch = tonic::transport::Channel::from_shared(c.url()).unwrap().connect().await.unwrap();
    let mut health = tonic_health::pb::health_client::HealthClient::new(ch);
    let r = health
        .check(tonic_health::pb::HealthCheckRequest { service: "lorafleet.v1.WorkerService".into() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.status, tonic_health::pb::health_check_response::ServingStatus::Serving as i32);

    // Reflection (v1) lists both lorafleet services.
    use tonic_reflection::pb::v1 as refl;
    let ch = tonic::transport::Channel::from_shared(c.url()).unwrap().connect().await.unwrap();
    let mut rc = refl::server_reflection_client::ServerReflectionClient::new(ch);
    let req = refl::ServerReflectionRequest {
        host: String::new(),
        message_request: Some(refl::server_reflection_request::MessageRequest::ListServices(String::new())),
    };
    let mut resp = rc.server_reflection_info(tokio_stream::iter(vec![req])).await.unwrap().into_inner();
    let services = match resp.next().await.unwrap().unwrap().message_response.unwrap() {
        refl::server_reflection_response::MessageResponse::ListServicesResponse(l) => {
            l.service.into_iter().map(|s| s.name).collect::<Vec<_>>()
        }
        other => panic!("{other:?}"),
    };
    for name in ["lorafleet.v1.JobService", "lorafleet.v1.WorkerService", "grpc.health.v1.Health"] {
        assert!(services.iter().any(|s| s == name), "{name} missing from {services:?}");
    }

    submit(&mut j, spec("m1")).await;
    submit(&mut j, spec("m2")).await;
    let wid = register(&mut w, cpu()).await;
    let l = acquire(&mut w, &wid, 0).await.unwrap();
    let e = w
        .report_progress(pb::ReportProgressRequest { job_id: l.job_id.clone(), epoch: 9, worker_id: wid.clone(), ..Default::default() })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition);

    let workers = j.list_workers(pb::ListWorkersRequest::default()).await.unwrap().into_inner().workers;
    assert_eq!(workers.len(), 1);
    assert_eq!((workers[0].worker_id.as_str(), workers[0].running_job_ids.clone(), workers[0].alive), (wid.as_str(), vec![l.job_id.clone()], true));

    let body = c.scrape().await;
    for line in [
        "lorafleet_jobs{state=\"queued\"} 1",
        "lorafleet_jobs{state=\"running\"} 1",
        "lorafleet_workers_alive 1",
        "lorafleet_live_leases 1",
        "lorafleet_stale_epoch_refusals_total 1",
        "lorafleet_dispatch_latency_seconds_count 1",
    ] {
        assert!(body.contains(line), "missing {line:?} in\n{body}");
    }
    c.stop().await;
}

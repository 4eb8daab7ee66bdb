//! Bearer tokens and roles against a real coordinator (gRPC on loopback): every RPC of
//! both services, called with no token, an unknown token and each role, gets the
//! documented status; health stays open; SIGHUP-style reloads take effect.

use lorafleet_coordinator::auth::{create_token, Auth, Role};
use lorafleet_coordinator::CoordinatorConfig;
use lorafleet_proto as pb;
use pb::job_service_client::JobServiceClient;
use pb::worker_service_client::WorkerServiceClient;
use tonic::transport::Channel;
use tonic::Code;

fn req<T>(msg: T, token: Option<&str>) -> tonic::Request<T> {
    let mut r = tonic::Request::new(msg);
    if let Some(t) = token {
        r.metadata_mut().insert("authorization", format!("Bearer {t}").parse().unwrap());
    }
    r
}

/// The status of every JobService RPC called with `token` (OK counts as Ok).
async fn job_calls(c: &mut JobServiceClient<Channel>, t: Option<&str>) -> Vec<(&'static str, Code)> {
    let code = |r: Result<(), tonic::Status>| r.err().map(|s| s.code()).unwrap_or(Code::Ok);
    let id = uuid_like();
    vec![
        ("SubmitJob", code(c.submit_job(req(pb::SubmitJobRequest::default(), t)).await.map(drop))),
        ("GetJob", code(c.get_job(req(pb::GetJobRequest { job_id: id.clone() }, t)).await.map(drop))),
        ("ListJobs", code(c.list_jobs(req(pb::ListJobsRequest::default(), t)).await.map(drop))),
        ("WatchJob", code(c.watch_job(req(pb::WatchJobRequest { job_id: id.clone(), after_seq: 0 }, t)).await.map(drop))),
        ("CancelJob", code(c.cancel_job(req(pb::CancelJobRequest { job_id: id.clone(), reason: String::new() }, t)).await.map(drop))),
        ("ListCheckpoints", code(c.list_checkpoints(req(pb::ListCheckpointsRequest { job_id: id.clone() }, t)).await.map(drop))),
        ("GetJobLogs", code(c.get_job_logs(req(pb::GetJobLogsRequest { job_id: id.clone(), ..Default::default() }, t)).await.map(drop))),
        ("UploadDataset", code(c.upload_dataset(req(tokio_stream::iter(Vec::<pb::UploadDatasetRequest>::new()), t)).await.map(drop))),
        ("DownloadAdapter", code(c.download_adapter(req(pb::DownloadAdapterRequest { job_id: id.clone() }, t)).await.map(drop))),
        ("ListWorkers", code(c.list_workers(req(pb::ListWorkersRequest::default(), t)).await.map(drop))),
    ]
}

async fn worker_calls(c: &mut WorkerServiceClient<Channel>, t: Option<&str>) -> Vec<(&'static str, Code)> {
    let code = |r: Result<(), tonic::Status>| r.err().map(|s| s.code()).unwrap_or(Code::Ok);
    let (id, w) = (uuid_like(), uuid_like());
    vec![
        ("GetStorage", code(c.get_storage(req(pb::GetStorageRequest {}, t)).await.map(drop))),
        ("RegisterWorker", code(c.register_worker(req(pb::RegisterWorkerRequest::default(), t)).await.map(drop))),
        ("Heartbeat", code(c.heartbeat(req(pb::HeartbeatRequest { worker_id: w.clone(), running: vec![] }, t)).await.map(drop))),
        ("AcquireJob", code(c.acquire_job(req(pb::AcquireJobRequest { worker_id: w.clone(), wait_secs: 0 }, t)).await.map(drop))),
        ("ReportProgress", code(c.report_progress(req(pb::ReportProgressRequest { job_id: id.clone(), epoch: 1, worker_id: w.clone(), ..Default::default() }, t)).await.map(drop))),
        ("CommitCheckpoint", code(c.commit_checkpoint(req(pb::CommitCheckpointRequest { job_id: id.clone(), epoch: 1, worker_id: w.clone(), ..Default::default() }, t)).await.map(drop))),
        ("CompleteAttempt", code(c.complete_attempt(req(pb::CompleteAttemptRequest { job_id: id.clone(), epoch: 1, worker_id: w.clone(), ..Default::default() }, t)).await.map(drop))),
        ("FailAttempt", code(c.fail_attempt(req(pb::FailAttemptRequest { job_id: id.clone(), epoch: 1, worker_id: w.clone(), failure_class: 1, ..Default::default() }, t)).await.map(drop))),
        ("Rendezvous", code(c.rendezvous(req(pb::RendezvousRequest { job_id: id.clone(), epoch: 1, worker_id: w.clone(), ..Default::default() }, t)).await.map(drop))),
    ]
}

type Stop = tokio::sync::oneshot::Sender<()>;
type Task = tokio::task::JoinHandle<lorafleet_coordinator::Result<()>>;

/// A coordinator with `auth` on loopback (file storage in `dir`), and a channel to it.
async fn start(dir: &std::path::Path, auth: std::sync::Arc<Auth>) -> (Channel, Stop, Task) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let store = dir.join("store");
    std::fs::create_dir_all(&store).unwrap();
    let mut config = CoordinatorConfig::new(dir.join("c.db"), format!("file://{}", store.display()));
    config.auth = Some(auth);
    config.models = lorafleet_coordinator::sources::ModelPolicy { local_paths: true, hf_revisions: lorafleet_coordinator::sources::HfRevisions::Any, ..Default::default() };
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(lorafleet_coordinator::serve(listener, config, async move {
        let _ = rx.await;
    }));
    let ch = loop {
        if let Ok(ch) = tonic::transport::Endpoint::from_shared(url.clone()).unwrap().connect().await {
            break ch;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    };
    (ch, tx, task)
}

fn uuid_like() -> String {
    uuid::Uuid::new_v4().to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_rpc_checks_the_token_and_the_role() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("auth.yaml");
    let user = create_token(&file, "alice", Role::User, Some("acme")).unwrap();
    let worker = create_token(&file, "pool", Role::Worker, None).unwrap();
    let admin = create_token(&file, "root", Role::Admin, None).unwrap();
    let auth = Auth::load(&file).unwrap();
    let (ch, tx, task) = start(dir.path(), auth.clone()).await;
    let (mut j, mut w) = (JobServiceClient::new(ch.clone()), WorkerServiceClient::new(ch.clone()));

    let denied = |calls: Vec<(&'static str, Code)>, want: Code, who: &str| {
        for (rpc, code) in calls {
            assert_eq!(code, want, "{rpc} with {who}");
        }
    };
    let allowed = |calls: Vec<(&'static str, Code)>, who: &str| {
        for (rpc, code) in calls {
            assert!(code != Code::Unauthenticated && code != Code::PermissionDenied, "{rpc} with {who}: {code:?}");
        }
    };
    denied(job_calls(&mut j, None).await, Code::Unauthenticated, "no token");
    denied(worker_calls(&mut w, None).await, Code::Unauthenticated, "no token");
    denied(job_calls(&mut j, Some("lf_not-a-token")).await, Code::Unauthenticated, "an unknown token");
    denied(worker_calls(&mut w, Some("lf_not-a-token")).await, Code::Unauthenticated, "an unknown token");
    denied(job_calls(&mut j, Some(&worker)).await, Code::PermissionDenied, "a worker token");
    denied(worker_calls(&mut w, Some(&user)).await, Code::PermissionDenied, "a user token");
    allowed(job_calls(&mut j, Some(&user)).await, "a user token");
    allowed(worker_calls(&mut w, Some(&worker)).await, "a worker token");
    allowed(job_calls(&mut j, Some(&admin)).await, "an admin token");
    allowed(worker_calls(&mut w, Some(&admin)).await, "an admin token");

    // Health stays open.
    let mut h = tonic_health::pb::health_client::HealthClient::new(ch.clone());
    assert!(h.check(tonic_health::pb::HealthCheckRequest { service: String::new() }).await.is_ok());

    // A token added to the file works after a reload (what SIGHUP does), not before.
    let late = create_token(&file, "late", Role::User, Some("acme")).unwrap();
    assert_eq!(j.list_jobs(req(pb::ListJobsRequest::default(), Some(&late))).await.unwrap_err().code(), Code::Unauthenticated);
    auth.reload().unwrap();
    assert!(j.list_jobs(req(pb::ListJobsRequest::default(), Some(&late))).await.is_ok());

    let _ = tx.send(());
    let _ = tokio::time::timeout(std::time::Duration::from_secs(20), task).await;
}

/// Tenants: a user token reaches only its tenant's jobs; another tenant's job is
/// NOT_FOUND on every call (its existence is not revealed), lists show only one's own,
/// idempotency keys of different tenants never meet, an admin sees everything.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tenants_see_only_their_jobs() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("auth.yaml");
    let alice = create_token(&file, "alice", Role::User, Some("acme")).unwrap();
    let bob = create_token(&file, "bob", Role::User, Some("globex")).unwrap();
    let admin = create_token(&file, "root", Role::Admin, None).unwrap();
    let worker = create_token(&file, "pool", Role::Worker, None).unwrap();
    let (ch, tx, task) = start(dir.path(), Auth::load(&file).unwrap()).await;
    let (mut j, mut w) = (JobServiceClient::new(ch.clone()), WorkerServiceClient::new(ch.clone()));
    // Datasets: stored once, but each tenant may only use what it uploaded itself, and an
    // upload does not reveal whether another tenant has the same data.
    let uploader = j.clone();
    let upload = |token: String| {
        let mut j = uploader.clone();
        async move {
            let data = b"[{\"question\": \"q\", \"answer\": \"a\"}]".to_vec();
            let msgs = vec![
                pb::UploadDatasetRequest { part: Some(pb::upload_dataset_request::Part::Header(pb::UploadDatasetHeader { file_name: "d.json".into(), size: data.len() as u64, sha256: String::new() })) },
                pb::UploadDatasetRequest { part: Some(pb::upload_dataset_request::Part::Data(data)) },
            ];
            j.upload_dataset(req(tokio_stream::iter(msgs), Some(&token))).await.unwrap().into_inner()
        }
    };
    let up_a = upload(alice.clone()).await;
    assert!(!up_a.already_existed);
    let spec = |dataset: &str| {
        let y = format!("name: t\nmodel: {{ source: hf://org/m }}\ndata: {{ train: {dataset:?} }}\noutput: {{ dir: o }}\n");
        pb::JobSpec::from(&lorafleet_shared::JobSpec::from_yaml(&y, lorafleet_shared::SpecContext::Remote).unwrap())
    };
    let submit = |key: &str| pb::SubmitJobRequest { spec: Some(spec(&up_a.dataset_ref)), idempotency_key: key.into() };
    let e = j.submit_job(req(submit("nightly"), Some(&bob))).await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(e.message().contains("data.train") && e.message().contains("not uploaded by this tenant"), "{}", e.message());
    let up_b = upload(bob.clone()).await;
    assert!(!up_b.already_existed, "bob does not learn that alice has the same data");
    assert_eq!(up_b.dataset_ref, up_a.dataset_ref);
    assert!(upload(bob.clone()).await.already_existed, "his own second upload");
    let a_job = j.submit_job(req(submit("nightly"), Some(&alice))).await.unwrap().into_inner().job.unwrap();
    // The same key from another tenant is another job, not a conflict naming alice's.
    let b_sub = j.submit_job(req(submit("nightly"), Some(&bob))).await.unwrap().into_inner();
    assert!(b_sub.created);
    let b_job = b_sub.job.unwrap();
    assert_ne!(a_job.job_id, b_job.job_id);
    assert_eq!(b_job.idempotency_key, "nightly");
    let again = j.submit_job(req(submit("nightly"), Some(&alice))).await.unwrap().into_inner();
    assert!(!again.created && again.job.unwrap().job_id == a_job.job_id);

    // Bob cannot reach alice's job by any call.
    let id = a_job.job_id.clone();
    let nf = |r: Result<(), tonic::Status>| r.err().map(|s| s.code());
    assert_eq!(nf(j.get_job(req(pb::GetJobRequest { job_id: id.clone() }, Some(&bob))).await.map(drop)), Some(Code::NotFound));
    assert_eq!(nf(j.watch_job(req(pb::WatchJobRequest { job_id: id.clone(), after_seq: 0 }, Some(&bob))).await.map(drop)), Some(Code::NotFound));
    assert_eq!(nf(j.cancel_job(req(pb::CancelJobRequest { job_id: id.clone(), reason: String::new() }, Some(&bob))).await.map(drop)), Some(Code::NotFound));
    assert_eq!(nf(j.list_checkpoints(req(pb::ListCheckpointsRequest { job_id: id.clone() }, Some(&bob))).await.map(drop)), Some(Code::NotFound));
    assert_eq!(nf(j.get_job_logs(req(pb::GetJobLogsRequest { job_id: id.clone(), ..Default::default() }, Some(&bob))).await.map(drop)), Some(Code::NotFound));
    assert_eq!(nf(j.download_adapter(req(pb::DownloadAdapterRequest { job_id: id.clone() }, Some(&bob))).await.map(drop)), Some(Code::NotFound));
    // An id that exists nowhere gets the very same answer.
    let ghost = uuid_like();
    let e = j.get_job(req(pb::GetJobRequest { job_id: ghost.clone() }, Some(&bob))).await.unwrap_err();
    let e2 = j.get_job(req(pb::GetJobRequest { job_id: id.clone() }, Some(&bob))).await.unwrap_err();
    assert_eq!(e.message().replace(&ghost, "ID"), e2.message().replace(&id, "ID"));
    assert_eq!(j.get_job(req(pb::GetJobRequest { job_id: id.clone() }, Some(&alice))).await.unwrap().into_inner().job_id, id);

    let list = || pb::ListJobsRequest { page_size: 100, ..Default::default() };
    let ids = |r: pb::ListJobsResponse| r.jobs.into_iter().map(|j| j.job_id).collect::<Vec<_>>();
    assert_eq!(ids(j.list_jobs(req(list(), Some(&alice))).await.unwrap().into_inner()), vec![a_job.job_id.clone()]);
    assert_eq!(ids(j.list_jobs(req(list(), Some(&bob))).await.unwrap().into_inner()), vec![b_job.job_id.clone()]);
    assert_eq!(ids(j.list_jobs(req(list(), Some(&admin))).await.unwrap().into_inner()).len(), 2);

    // A worker runs alice's job: bob does not see its id on the worker.
    let wid = w
        .register_worker(req(
            pb::RegisterWorkerRequest { name: "w".into(), devices: vec![pb::Device { kind: pb::DeviceKind::Cpu as i32, index: 0, name: "cpu".into(), memory_mib: 0 }], ..Default::default() },
            Some(&worker),
        ))
        .await
        .unwrap()
        .into_inner()
        .worker_id;
    let lease = w.acquire_job(req(pb::AcquireJobRequest { worker_id: wid, wait_secs: 0 }, Some(&worker))).await.unwrap().into_inner().lease.unwrap();
    let running = |t: &str| {
        let t = t.to_string();
        let mut j = j.clone();
        async move { j.list_workers(req(pb::ListWorkersRequest::default(), Some(&t))).await.unwrap().into_inner().workers[0].running_job_ids.clone() }
    };
    let owner = if lease.job_id == a_job.job_id { &alice } else { &bob };
    let other = if lease.job_id == a_job.job_id { &bob } else { &alice };
    assert_eq!(running(owner).await, vec![lease.job_id.clone()]);
    assert!(running(other).await.is_empty());
    assert_eq!(running(&admin).await, vec![lease.job_id.clone()]);

    let _ = tx.send(());
    let _ = tokio::time::timeout(std::time::Duration::from_secs(20), task).await;
}

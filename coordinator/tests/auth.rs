//! Bearer tokens and roles against a real coordinator (gRPC on loopback): every RPC of
//! every service, called with no token, an unknown token and each role, gets the
//! documented status; health stays open; SIGHUP-style reloads take effect. Then what
//! comes with tokens: tenants, quotas and fair share, rate and stream limits, size
//! limits, the model-source policy (and hf:// revisions pinned at submit against a local
//! server answering the Hub's API), worker tokens bound to labels, and the audit log.

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
    start_with(dir, auth, |_| {}).await
}

/// [`start`], with the config changed by `configure` first.
async fn start_with(dir: &std::path::Path, auth: std::sync::Arc<Auth>, configure: impl FnOnce(&mut CoordinatorConfig)) -> (Channel, Stop, Task) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let store = dir.join("store");
    std::fs::create_dir_all(&store).unwrap();
    let mut config = CoordinatorConfig::new(dir.join("c.db"), format!("file://{}", store.display()));
    config.auth = Some(auth);
    config.models = lorafleet_coordinator::sources::ModelPolicy { local_paths: true, hf_revisions: lorafleet_coordinator::sources::HfRevisions::Any, ..Default::default() };
    configure(&mut config);
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

    // The AdminService is for admin tokens only.
    let mut adm = pb::admin_service_client::AdminServiceClient::new(ch.clone());
    let audit = |t: Option<&str>| req(pb::ListAuditEventsRequest::default(), t);
    assert_eq!(adm.list_audit_events(audit(None)).await.unwrap_err().code(), Code::Unauthenticated);
    assert_eq!(adm.list_audit_events(audit(Some(&user))).await.unwrap_err().code(), Code::PermissionDenied);
    assert_eq!(adm.list_audit_events(audit(Some(&worker))).await.unwrap_err().code(), Code::PermissionDenied);
    let events = adm.list_audit_events(audit(Some(&admin))).await.unwrap().into_inner().events;
    // Every refused call is in the audit log, by method and token id (never the token).
    let refused = |m: &str, id: &str, outcome: &str| events.iter().any(|e| e.method == m && e.token_id == id && e.outcome == outcome);
    assert!(refused("lorafleet.v1.JobService/SubmitJob", "?", "UNAUTHENTICATED"));
    assert!(refused("lorafleet.v1.JobService/ListJobs", "pool", "PERMISSION_DENIED"));
    assert!(refused("lorafleet.v1.WorkerService/AcquireJob", "alice", "PERMISSION_DENIED"));
    assert!(refused("lorafleet.v1.AdminService/ListAuditEvents", "alice", "PERMISSION_DENIED"));
    let all = format!("{events:?}");
    for t in [&user, &worker, &admin] {
        assert!(!all.contains(t.as_str()), "a token leaked into the audit log");
    }

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

fn spec_yaml(source: &str, extra: &str) -> pb::JobSpec {
    let y = format!("name: t\nmodel: {{ source: {source:?} }}\ndata: {{ train: s3://data/d.json }}\noutput: {{ dir: o }}\n{extra}");
    pb::JobSpec::from(&lorafleet_shared::JobSpec::from_yaml(&y, lorafleet_shared::SpecContext::Remote).unwrap())
}

const COMMIT: &str = "0123456789abcdef0123456789abcdef01234567";

/// Quotas (refused at submit, held at dispatch), fair share between tenants, the rate and
/// stream limits, request and upload sizes, the model-source policy and label-bound
/// worker tokens, through real RPCs; each refusal is in the audit log.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quotas_fair_share_limits_and_policy() {
    use lorafleet_coordinator::sources::{HfRevisions, ModelPolicy};
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("auth.yaml");
    let alice = create_token(&file, "alice", Role::User, Some("acme")).unwrap();
    let bob = create_token(&file, "bob", Role::User, Some("globex")).unwrap();
    let carol = create_token(&file, "carol", Role::User, Some("initech")).unwrap();
    let admin = create_token(&file, "root", Role::Admin, None).unwrap();
    let worker = create_token(&file, "pool-a", Role::Worker, None).unwrap();
    // Quotas and the label binding are edited into the file by hand, as an operator would.
    let text = std::fs::read_to_string(&file).unwrap().replace("- id: pool-a\n", "- id: pool-a\n  labels: { pool: a }\n");
    let text = format!("{text}quotas:\n  default: {{ max_queued_jobs: 2, max_devices: 2 }}\n  tenants:\n    globex: {{ max_running_jobs: 1 }}\n");
    std::fs::write(&file, text).unwrap();
    let audit_file = dir.path().join("audit.jsonl");
    let af = audit_file.clone();
    let (ch, tx, task) = start_with(dir.path(), Auth::load(&file).unwrap(), move |c| {
        c.limits.rate_per_sec = 2.0;
        c.limits.rate_burst = 12.0;
        c.limits.max_streams_per_caller = 2;
        c.limits.max_request_bytes = 64 * 1024;
        c.limits.max_upload_bytes = 1024;
        c.models = ModelPolicy { allow: vec!["hf://org/".into(), "s3://models".into()], hf_revisions: HfRevisions::Pinned, ..Default::default() };
        c.audit_log = Some(af);
    })
    .await;
    let (mut j, mut w) = (JobServiceClient::new(ch.clone()), WorkerServiceClient::new(ch.clone()));
    let pinned = format!("hf://org/m@{COMMIT}");
    let submit = |source: &str, extra: &str| pb::SubmitJobRequest { spec: Some(spec_yaml(source, extra)), idempotency_key: String::new() };
    let code_msg = |r: Result<tonic::Response<pb::SubmitJobResponse>, tonic::Status>| r.map(|_| ()).map_err(|s| (s.code(), s.message().to_string()));

    // Model sources: allow-list, worker-local paths, unpinned revisions.
    for (source, want, text) in [
        ("hf://evil/m@0123456789abcdef0123456789abcdef01234567", Code::PermissionDenied, "not an allowed model source"),
        ("s3://models-evil/m", Code::PermissionDenied, "not an allowed model source"),
        ("models/tiny", Code::PermissionDenied, "path on the worker's disk"),
        ("hf://org/m", Code::InvalidArgument, "not pinned to a commit"),
    ] {
        let (code, msg) = code_msg(j.submit_job(req(submit(source, ""), Some(&alice))).await).unwrap_err();
        assert_eq!(code, want, "{source}: {msg}");
        assert!(msg.starts_with("model.source: ") && msg.contains(text), "{source}: {msg}");
    }
    // Quotas at submit: too many devices for the tenant ever; then too many queued.
    let (code, msg) = code_msg(j.submit_job(req(submit(&pinned, "resources: { count: 3 }\n"), Some(&alice))).await).unwrap_err();
    assert!(code == Code::ResourceExhausted && msg.contains("max_devices"), "{msg}");
    let a1 = j.submit_job(req(submit(&pinned, ""), Some(&alice))).await.unwrap().into_inner().job.unwrap();
    let a2 = j.submit_job(req(submit("s3://models/m", ""), Some(&alice))).await.unwrap().into_inner().job.unwrap();
    let (code, msg) = code_msg(j.submit_job(req(submit(&pinned, ""), Some(&alice))).await).unwrap_err();
    assert!(code == Code::ResourceExhausted && msg.contains("max_queued_jobs") && msg.contains("acme"), "{msg}");
    let b1 = j.submit_job(req(submit(&pinned, ""), Some(&bob))).await.unwrap().into_inner().job.unwrap();
    let b2 = j.submit_job(req(submit(&pinned, ""), Some(&bob))).await.unwrap().into_inner().job.unwrap();

    // A worker token bound to pool=a registers only workers labelled so.
    let dev = |i| pb::Device { kind: pb::DeviceKind::Cpu as i32, index: i, name: format!("cpu{i}"), memory_mib: 0 };
    let reg = |pool: &str| pb::RegisterWorkerRequest {
        name: "w".into(),
        devices: (0..3).map(dev).collect(),
        labels: [("pool".to_string(), pool.to_string())].into(),
        version: "t".into(),
        ..Default::default()
    };
    let e = w.register_worker(req(reg("b"), Some(&worker))).await.unwrap_err();
    assert!(e.code() == Code::PermissionDenied && e.message().contains("pool"), "{}", e.message());
    let wid = w.register_worker(req(reg("a"), Some(&worker))).await.unwrap().into_inner().worker_id;
    // Fair share: both tenants idle, alice's first job (submitted first) goes first; then
    // bob's, since alice holds a device; then bob is at his quota of one running job, so
    // alice's second.
    let mut got = Vec::new();
    for _ in 0..4 {
        let l = w.acquire_job(req(pb::AcquireJobRequest { worker_id: wid.clone(), wait_secs: 0 }, Some(&worker))).await.unwrap().into_inner();
        got.push(l.lease.map(|l| l.job_id));
    }
    assert_eq!(got, vec![Some(a1.job_id.clone()), Some(b1.job_id.clone()), Some(a2.job_id.clone()), None]);
    let b2_now = j.get_job(req(pb::GetJobRequest { job_id: b2.job_id.clone() }, Some(&bob))).await.unwrap().into_inner();
    assert!(b2_now.waiting_reason.contains("max_running_jobs"), "{:?}", b2_now.waiting_reason);

    // Streams: two watches per token, a third is refused; closing one frees its slot.
    let watch = |id: &str| req(pb::WatchJobRequest { job_id: id.to_string(), after_seq: 0 }, Some(&alice));
    let s1 = j.watch_job(watch(&a1.job_id)).await.unwrap().into_inner();
    let _s2 = j.watch_job(watch(&a1.job_id)).await.unwrap().into_inner();
    let e = j.watch_job(watch(&a1.job_id)).await.unwrap_err();
    assert!(e.code() == Code::ResourceExhausted && e.message().contains("streams open"), "{}", e.message());
    drop(s1);
    let mut reopened = false;
    for _ in 0..100 {
        if j.watch_job(watch(&a1.job_id)).await.is_ok() {
            reopened = true;
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    assert!(reopened, "a closed watch frees its slot");

    // Sizes: a message over --max-request-bytes, an upload over --max-upload-bytes.
    let big = pb::SubmitJobRequest { spec: Some(spec_yaml(&pinned, "")), idempotency_key: "k".repeat(100 * 1024) };
    let e = j.submit_job(req(big, Some(&carol))).await.unwrap_err();
    assert_eq!(e.code(), Code::OutOfRange, "{}", e.message());
    let header = pb::UploadDatasetRequest {
        part: Some(pb::upload_dataset_request::Part::Header(pb::UploadDatasetHeader { file_name: "d.json".into(), size: 4096, sha256: String::new() })),
    };
    let e = j.upload_dataset(req(tokio_stream::iter(vec![header]), Some(&carol))).await.unwrap_err();
    assert!(e.code() == Code::ResourceExhausted && e.message().contains("--max-upload-bytes"), "{}", e.message());

    // Rate: carol's bucket (12, refilled at 2/s) runs dry within a burst of calls; others are unaffected.
    let mut limited = None;
    for i in 0..40 {
        if let Err(e) = j.list_jobs(req(pb::ListJobsRequest::default(), Some(&carol))).await {
            limited = Some((i, e));
            break;
        }
    }
    let (i, e) = limited.expect("the rate limit trips");
    assert!(i <= 12 && e.code() == Code::ResourceExhausted && e.message().contains("rate limit"), "{i}: {}", e.message());
    assert!(j.list_jobs(req(pb::ListJobsRequest::default(), Some(&bob))).await.is_ok());

    // The audit log has who did what, refusals included, in the table and the file.
    let mut adm = pb::admin_service_client::AdminServiceClient::new(ch.clone());
    let events = adm.list_audit_events(req(pb::ListAuditEventsRequest { tenant: "acme".into(), ..Default::default() }, Some(&admin))).await.unwrap().into_inner().events;
    let has = |m: &str, outcome: &str, target: &str| events.iter().any(|e| e.method.ends_with(m) && e.outcome == outcome && e.target.contains(target) && e.token_id == "alice");
    assert!(has("SubmitJob", "OK", &a1.job_id), "{events:#?}");
    assert!(has("SubmitJob", "RESOURCE_EXHAUSTED", ""));
    assert!(has("SubmitJob", "PERMISSION_DENIED", ""));
    assert!(events.iter().all(|e| e.tenant == "acme"));
    let workers = adm.list_audit_events(req(pb::ListAuditEventsRequest { token_id: "pool-a".into(), ..Default::default() }, Some(&admin))).await.unwrap().into_inner().events;
    assert!(workers.iter().any(|e| e.method.ends_with("RegisterWorker") && e.outcome == "PERMISSION_DENIED"));
    assert!(workers.iter().any(|e| e.method.ends_with("RegisterWorker") && e.outcome == "OK" && e.target == wid));
    let seqs: Vec<u64> = events.iter().map(|e| e.seq).collect();
    let after = adm.list_audit_events(req(pb::ListAuditEventsRequest { after_seq: seqs[0], tenant: "acme".into(), ..Default::default() }, Some(&admin))).await.unwrap().into_inner().events;
    assert_eq!(after.len(), events.len() - 1);
    let lines = std::fs::read_to_string(&audit_file).unwrap();
    assert!(lines.lines().all(|l| serde_json::from_str::<serde_json::Value>(l).is_ok()));
    assert!(lines.contains(&a1.job_id) && lines.contains("RESOURCE_EXHAUSTED"));
    for t in [&alice, &bob, &carol, &admin, &worker] {
        assert!(!lines.contains(t.as_str()), "a token leaked into the audit file");
    }
    // The table is append-only.
    let conn = rusqlite::Connection::open(dir.path().join("c.db")).unwrap();
    assert!(conn.execute("DELETE FROM audit", []).is_err());
    assert!(conn.execute("UPDATE audit SET outcome = 'OK'", []).is_err());

    let _ = tx.send(());
    let _ = tokio::time::timeout(std::time::Duration::from_secs(20), task).await;
}

/// A local server answering the Hub's revision API for `org/m` (`main` -> [`COMMIT`]).
async fn fake_hub() -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", l.local_addr().unwrap());
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            tokio::spawn(async move {
                let mut buf = vec![0u8; 4096];
                let n = s.read(&mut buf).await.unwrap_or(0);
                let head = String::from_utf8_lossy(&buf[..n]).to_string();
                let (status, body) = if head.starts_with("GET /api/models/org/m/revision/main ") {
                    ("200 OK", format!("{{\"sha\": \"{COMMIT}\", \"siblings\": [{{\"rfilename\": \"config.json\"}}]}}"))
                } else {
                    ("404 Not Found", "{}".to_string())
                };
                let r = format!("HTTP/1.1 {status}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}", body.len());
                let _ = s.write_all(r.as_bytes()).await;
            });
        }
    });
    url
}

/// `--hf-revisions resolve`: a branch is resolved to its commit at submit and the job is
/// stored pinned (said in its first event); a retry with the same idempotency key is the
/// same job; an unknown repository is refused at submit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hf_revisions_are_pinned_at_submit() {
    use lorafleet_coordinator::sources::{HfRevisions, ModelPolicy};
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("auth.yaml");
    let alice = create_token(&file, "alice", Role::User, Some("acme")).unwrap();
    let hub = fake_hub().await;
    let (ch, tx, task) = start_with(dir.path(), Auth::load(&file).unwrap(), move |c| {
        c.models = ModelPolicy { hf_revisions: HfRevisions::Resolve, hub_endpoint: Some(hub), ..Default::default() };
    })
    .await;
    let mut j = JobServiceClient::new(ch.clone());
    let sub = || pb::SubmitJobRequest { spec: Some(spec_yaml("hf://org/m", "")), idempotency_key: "nightly".into() };
    let r = j.submit_job(req(sub(), Some(&alice))).await.unwrap().into_inner();
    let job = r.job.unwrap();
    assert_eq!(job.spec.as_ref().unwrap().model.as_ref().unwrap().source, format!("hf://org/m@{COMMIT}"));
    let again = j.submit_job(req(sub(), Some(&alice))).await.unwrap().into_inner();
    assert!(!again.created && again.job.unwrap().job_id == job.job_id, "the same submission is the same job");
    let mut events = j.watch_job(req(pb::WatchJobRequest { job_id: job.job_id.clone(), after_seq: 0 }, Some(&alice))).await.unwrap().into_inner();
    let first = events.message().await.unwrap().unwrap();
    let Some(pb::job_event::Event::StateChange(sc)) = first.event else { panic!("{first:?}") };
    assert!(sc.reason.contains("resolved to hf://org/m@0123456789abcdef"), "{}", sc.reason);
    let e = j.submit_job(req(pb::SubmitJobRequest { spec: Some(spec_yaml("hf://org/nope", "")), idempotency_key: String::new() }, Some(&alice))).await.unwrap_err();
    assert!(e.code() == Code::InvalidArgument && e.message().starts_with("model.source: ") && e.message().contains("404"), "{}", e.message());
    let _ = tx.send(());
    let _ = tokio::time::timeout(std::time::Duration::from_secs(20), task).await;
}

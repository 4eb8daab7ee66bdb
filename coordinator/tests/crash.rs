//! Kill -9 the real `lorafleet-coordinator` binary in the middle of a stream of
//! submissions and dispatches: after a restart on the same database every
//! acknowledged job and every acknowledged lease (with its epoch) is there.

use lorafleet_proto as pb;
use lorafleet_proto::job_service_client::JobServiceClient;
use lorafleet_proto::worker_service_client::WorkerServiceClient;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

fn spec(i: usize) -> pb::JobSpec {
    let y = format!(
        "name: crash-{i}\nmodel: {{ source: hf://org/tiny }}\ndata: {{ train: \"dataset://sha256/{}\" }}\noutput: {{ dir: out }}\n",
        "cd".repeat(32)
    );
    pb::JobSpec::from(&lorafleet_shared::JobSpec::from_yaml(&y, lorafleet_shared::SpecContext::Remote).unwrap())
}

fn start(dir: &Path, port: u16) -> Child {
    Command::new(env!("CARGO_BIN_EXE_lorafleet-coordinator"))
        .args(["--listen", &format!("127.0.0.1:{port}"), "--insecure", "--hf-revisions", "any"])
        .arg("--db")
        .arg(dir.join("c.db"))
        .args(["--storage", &format!("file://{}", dir.join("store").display())])
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("coordinator binary starts")
}

async fn connect(port: u16) -> (JobServiceClient<tonic::transport::Channel>, WorkerServiceClient<tonic::transport::Channel>) {
    let url = format!("http://127.0.0.1:{port}");
    for _ in 0..300 {
        if let Ok(ch) = tonic::transport::Channel::from_shared(url.clone()).unwrap().connect().await {
            let mut j = JobServiceClient::new(ch.clone());
            if j.list_workers(pb::ListWorkersRequest::default()).await.is_ok() {
                return (j, WorkerServiceClient::new(ch));
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("coordinator did not come up on port {port}");
}

#[tokio::test]
async fn kill_9_loses_no_acknowledged_job_or_lease() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(dir.path().join("store")).unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let mut child = start(dir.path(), port);
    let (j, mut w) = connect(port).await;
    let wid = w
        .register_worker(pb::RegisterWorkerRequest {
            name: "w".into(),
            devices: (0..1000).map(|i| pb::Device { kind: pb::DeviceKind::Cpu as i32, index: i, name: "cpu".into(), memory_mib: 0 }).collect(),
            version: "t".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .worker_id;

    let acked: Arc<Mutex<Vec<String>>> = Arc::default();
    let leased: Arc<Mutex<Vec<(String, u64)>>> = Arc::default();
    let mut tasks = Vec::new();
    for t in 0..16 {
        let (mut j, mut w, wid) = (j.clone(), w.clone(), wid.clone());
        let (acked, leased) = (acked.clone(), leased.clone());
        tasks.push(tokio::spawn(async move {
            for k in 0.. {
                let i = t * 100_000 + k;
                match j.submit_job(pb::SubmitJobRequest { spec: Some(spec(i)), idempotency_key: String::new() }).await {
                    Ok(r) => acked.lock().unwrap().push(r.into_inner().job.unwrap().job_id),
                    Err(_) => return,
                }
                if k % 2 == 0 {
                    match w.acquire_job(pb::AcquireJobRequest { worker_id: wid.clone(), wait_secs: 0 }).await {
                        Ok(r) => {
                            if let Some(l) = r.into_inner().lease {
                                leased.lock().unwrap().push((l.job_id, l.epoch));
                            }
                        }
                        Err(_) => return,
                    }
                }
            }
        }));
    }
    // Let acknowledgements pile up, then kill without warning.
    for _ in 0..200 {
        if acked.lock().unwrap().len() >= 150 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    child.kill().unwrap();
    child.wait().unwrap();
    for t in tasks {
        t.await.unwrap();
    }
    let acked = acked.lock().unwrap().clone();
    let leased = leased.lock().unwrap().clone();
    assert!(acked.len() >= 100, "only {} submissions were acknowledged", acked.len());
    assert!(!leased.is_empty());

    let mut child = start(dir.path(), port);
    let (mut j, _) = connect(port).await;
    for id in &acked {
        j.get_job(pb::GetJobRequest { job_id: id.clone() }).await.unwrap_or_else(|e| panic!("acknowledged job {id} lost: {e}"));
    }
    for (id, epoch) in &leased {
        let job = j.get_job(pb::GetJobRequest { job_id: id.clone() }).await.unwrap().into_inner();
        assert_eq!((job.state, job.epoch), (pb::JobState::Running as i32, *epoch), "lease of {id} lost");
    }
    child.kill().unwrap();
    child.wait().unwrap();
}

//! A real coordinator on 127.0.0.1:0 with SQLite and file storage in a tempdir.

#![allow(dead_code)]

use lorafleet_coordinator::{serve_with_metrics, ControlConfig, CoordinatorConfig};
use lorafleet_proto as pb;
use lorafleet_proto::job_service_client::JobServiceClient;
use lorafleet_proto::worker_service_client::WorkerServiceClient;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;
use tokio::sync::oneshot;
use tonic::transport::Channel;

pub struct Coord {
    pub addr: SocketAddr,
    pub metrics_addr: SocketAddr,
    pub dir: PathBuf,
    stop: Option<oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<lorafleet_coordinator::Result<()>>>,
}

pub fn fast_control() -> ControlConfig {
    ControlConfig {
        lease_ttl: Duration::from_secs(30),
        heartbeat_interval: Duration::from_millis(200),
        tick: Duration::from_millis(20),
        aging: Duration::ZERO,
        ..ControlConfig::default()
    }
}

impl Coord {
    pub async fn start(dir: PathBuf, control: ControlConfig) -> Coord {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let metrics = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let metrics_addr = metrics.local_addr().unwrap();
        let store = dir.join("store");
        std::fs::create_dir_all(&store).unwrap();
        let mut config = CoordinatorConfig::new(dir.join("coordinator.db"), format!("file://{}", store.display()));
        config.control = control;
        // The specs name hf://org/m, which no test resolves.
        config.models = lorafleet_coordinator::sources::ModelPolicy { local_paths: true, hf_revisions: lorafleet_coordinator::sources::HfRevisions::Any, ..Default::default() };
        let (tx, rx) = oneshot::channel::<()>();
        let task = tokio::spawn(serve_with_metrics(listener, Some(metrics), config, async move {
            let _ = rx.await;
        }));
        let c = Coord { addr, metrics_addr, dir, stop: Some(tx), task: Some(task) };
        // Wait until it answers.
        for _ in 0..200 {
            if let Ok(mut j) = JobServiceClient::connect(c.url()).await {
                if j.list_workers(pb::ListWorkersRequest::default()).await.is_ok() {
                    return c;
                }
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        panic!("coordinator did not start");
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn storage_url(&self) -> String {
        format!("file://{}", self.dir.join("store").display())
    }

    /// The Prometheus text from `/metrics` (the raw HTTP/1.0 response).
    pub async fn scrape(&self) -> String {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut s = tokio::net::TcpStream::connect(self.metrics_addr).await.unwrap();
        s.write_all(b"GET /metrics HTTP/1.0\r\nHost: x\r\n\r\n").await.unwrap();
        let mut body = String::new();
        s.read_to_string(&mut body).await.unwrap();
        body
    }

    pub async fn jobs(&self) -> JobServiceClient<Channel> {
        JobServiceClient::connect(self.url()).await.unwrap()
    }

    pub async fn workers(&self) -> WorkerServiceClient<Channel> {
        WorkerServiceClient::connect(self.url()).await.unwrap()
    }

    /// Stop and wait for a clean exit.
    pub async fn stop(mut self) {
        let _ = self.stop.take().unwrap().send(());
        let r = tokio::time::timeout(Duration::from_secs(20), self.task.take().unwrap()).await.expect("coordinator stops");
        r.unwrap().unwrap();
    }
}

pub fn dataset_ref() -> String {
    format!("dataset://sha256/{}", "ab".repeat(32))
}

pub fn spec(name: &str) -> pb::JobSpec {
    let y = format!("name: {name}\nmodel: {{ source: hf://org/tiny }}\ndata: {{ train: {:?} }}\noutput: {{ dir: out }}\n", dataset_ref());
    let s = lorafleet_shared::JobSpec::from_yaml(&y, lorafleet_shared::SpecContext::Remote).unwrap();
    pb::JobSpec::from(&s)
}

pub fn spec_with(name: &str, f: impl FnOnce(&mut pb::JobSpec)) -> pb::JobSpec {
    let mut s = spec(name);
    f(&mut s);
    s
}

pub fn gpu_spec(name: &str, count: u32, memory_mib: u64) -> pb::JobSpec {
    spec_with(name, |s| {
        s.resources = Some(pb::ResourceSpec { device: pb::DeviceKind::Cuda as i32, count, memory_mib, nodes: 1 });
    })
}

pub async fn submit(j: &mut JobServiceClient<Channel>, spec: pb::JobSpec) -> pb::Job {
    j.submit_job(pb::SubmitJobRequest { spec: Some(spec), idempotency_key: String::new() }).await.unwrap().into_inner().job.unwrap()
}

pub async fn register(w: &mut WorkerServiceClient<Channel>, devices: Vec<pb::Device>) -> String {
    w.register_worker(pb::RegisterWorkerRequest { name: "w".into(), devices, version: "test".into(), ..Default::default() })
        .await
        .unwrap()
        .into_inner()
        .worker_id
}

pub fn cpu() -> Vec<pb::Device> {
    vec![pb::Device { kind: pb::DeviceKind::Cpu as i32, index: 0, name: "cpu".into(), memory_mib: 0 }]
}

pub fn gpus(n: u32, memory_mib: u64) -> Vec<pb::Device> {
    (0..n).map(|i| pb::Device { kind: pb::DeviceKind::Cuda as i32, index: i, name: format!("gpu{i}"), memory_mib }).collect()
}

pub async fn acquire(w: &mut WorkerServiceClient<Channel>, worker_id: &str, wait_secs: u32) -> Option<pb::Lease> {
    w.acquire_job(pb::AcquireJobRequest { worker_id: worker_id.into(), wait_secs }).await.unwrap().into_inner().lease
}

pub async fn get(j: &mut JobServiceClient<Channel>, id: &str) -> pb::Job {
    j.get_job(pb::GetJobRequest { job_id: id.into() }).await.unwrap().into_inner()
}

pub fn state(job: &pb::Job) -> pb::JobState {
    pb::JobState::try_from(job.state).unwrap()
}

/// Poll until the job reaches `want` (or panic after 10 s).
pub async fn wait_state(j: &mut JobServiceClient<Channel>, id: &str, want: pb::JobState) -> pb::Job {
    for _ in 0..500 {
        let job = get(j, id).await;
        if state(&job) == want {
            return job;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("job {id} never reached {want:?}: {:?}", get(j, id).await);
}

//! One place for storage: a worker takes the coordinator's storage unless told
//! otherwise, and one that does not see the coordinator's store refuses to register,
//! naming both locations (a real coordinator in-process, real workers' startup).

use lorafleet_coordinator::CoordinatorConfig;
use lorafleet_worker::{DeviceSel, EngineTrainer, Worker, WorkerConfig};
use std::sync::Arc;
use std::time::Duration;

async fn coordinator(storage_url: &str, dir: &std::path::Path) -> (String, tokio::sync::oneshot::Sender<()>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let config = CoordinatorConfig::new(dir.join("c.db"), storage_url);
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(lorafleet_coordinator::serve(listener, config, async move {
        let _ = rx.await;
    }));
    (format!("http://{addr}"), tx)
}

fn worker_config(coordinator: &str, storage: Option<String>, cache: &std::path::Path) -> WorkerConfig {
    WorkerConfig {
        coordinator: coordinator.into(),
        tls: Default::default(),
        token: None,
        name: "w".into(),
        devices: vec![DeviceSel::Cpu(0)],
        labels: vec![],
        cache: cache.into(),
        storage_url: storage,
        storage_options: Default::default(),
        acquire_wait: Duration::from_secs(1),
        check_create_only: true,
        advertise_host: None,
        collective_timeout: Duration::from_secs(60),
        allow_nccl: false,
        storage_retry: Duration::from_secs(10),
    }
}

fn dir_url(p: &std::path::Path) -> String {
    std::fs::create_dir_all(p).unwrap();
    url::Url::from_directory_path(p).unwrap().to_string()
}

#[tokio::test]
async fn workers_take_the_coordinators_storage_and_refuse_another() {
    let t = tempfile::tempdir().unwrap();
    let store = dir_url(&t.path().join("store"));
    let (url, _stop) = coordinator(&store, t.path()).await;

    // No --storage: the coordinator's, checked.
    let w = Worker::new(worker_config(&url, None, &t.path().join("c1")), Arc::new(EngineTrainer)).await;
    assert!(w.is_ok(), "{:?}", w.err());
    // The same place given explicitly (a trailing slash aside): fine.
    let w = Worker::new(worker_config(&url, Some(store.trim_end_matches('/').to_string()), &t.path().join("c2")), Arc::new(EngineTrainer)).await;
    assert!(w.is_ok(), "{:?}", w.err());

    // Another place: refused, naming both (the case of a worker left on its default).
    let other = dir_url(&t.path().join("elsewhere"));
    let err = Worker::new(worker_config(&url, Some(other.clone()), &t.path().join("c3")), Arc::new(EngineTrainer)).await.err().expect("refused").to_string();
    assert!(err.contains(&other) && err.contains(&store), "{err}");
}

#[tokio::test]
async fn a_worker_whose_store_lacks_the_marker_does_not_register() {
    // The same URL, another store: `memory://` is one store per process handle, as one
    // bucket name on two S3 endpoints would be.
    let t = tempfile::tempdir().unwrap();
    let (url, _stop) = coordinator("memory://shared", t.path()).await;
    let err = Worker::new(worker_config(&url, Some("memory://shared".into()), &t.path().join("c")), Arc::new(EngineTrainer))
        .await
        .err()
        .expect("refused")
        .to_string();
    assert!(err.contains("does not show the coordinator's storage memory://shared") && err.contains("_lorafleet/coordinator not found"), "{err}");
    assert!(err.contains("not registering"), "{err}");
    // And the coordinator itself refuses a registration with another coordinator's token.
    let mut c = lorafleet_proto::worker_service_client::WorkerServiceClient::connect(url.clone()).await.unwrap();
    let e = c
        .register_worker(lorafleet_proto::RegisterWorkerRequest {
            name: "w".into(),
            devices: vec![lorafleet_proto::Device { kind: lorafleet_proto::DeviceKind::Cpu as i32, index: 0, name: "cpu".into(), memory_mib: 0 }],
            storage_url: "s3://other/place".into(),
            storage_marker: "not-this-coordinators".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::FailedPrecondition);
    assert!(e.message().contains("s3://other/place") && e.message().contains("memory://shared"), "{}", e.message());
    let workers = lorafleet_proto::job_service_client::JobServiceClient::connect(url).await.unwrap().list_workers(lorafleet_proto::ListWorkersRequest { include_dead: true }).await.unwrap().into_inner();
    assert!(workers.workers.is_empty(), "nothing registered: {:?}", workers.workers);
}

//! `lorafleet dev`: coordinator + one worker (the CPU, or CUDA devices in a `cuda` build)
//! + file storage in one process.

use anyhow::Context;
use clap::Args;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

#[derive(Debug, Clone, Args)]
pub struct DevArgs {
    /// Where the database, storage and worker cache live.
    #[arg(long, env = "LORAFLEET_DEV_DIR", default_value = ".lorafleet")]
    pub dir: PathBuf,
    /// gRPC listen address.
    #[arg(long, env = "LORAFLEET_LISTEN", default_value = "127.0.0.1:50051")]
    pub listen: SocketAddr,
    /// Lease TTL in seconds.
    #[arg(long, env = "LORAFLEET_LEASE_TTL", default_value_t = 30)]
    pub lease_ttl: u64,
    /// What the embedded worker trains on: `cpu`, or `cuda:0,1` in a build with the `cuda`
    /// feature (jobs then ask for them with `resources: { device: cuda, count: N }`).
    #[arg(long, env = "LORAFLEET_DEVICES", default_value = "cpu")]
    pub devices: String,
}

pub async fn run(a: DevArgs) -> anyhow::Result<()> {
    let devices = lorafleet_worker::parse_devices(&a.devices).map_err(anyhow::Error::msg)?;
    std::fs::create_dir_all(&a.dir).with_context(|| format!("creating {}", a.dir.display()))?;
    let dir = a.dir.canonicalize()?;
    let storage_url = url_for(&dir.join("storage"))?;
    let listener = tokio::net::TcpListener::bind(a.listen).await.with_context(|| format!("binding {} (is another `lorafleet dev` running?)", a.listen))?;
    let addr = listener.local_addr()?;
    let mut config = lorafleet_coordinator::CoordinatorConfig::new(dir.join("coordinator.sqlite"), storage_url.clone());
    config.control.lease_ttl = Duration::from_secs(a.lease_ttl.max(2));
    config.control.heartbeat_interval = Duration::from_secs((a.lease_ttl / 6).max(1));
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let stopped = |mut rx: tokio::sync::watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|v| *v).await;
    };
    let coord = tokio::spawn(lorafleet_coordinator::serve(listener, config, stopped(stop_rx.clone())));

    let wcfg = lorafleet_worker::WorkerConfig {
        coordinator: format!("http://{addr}"),
        name: "dev-worker".into(),
        devices: devices.clone(),
        labels: vec![],
        cache: dir.join("worker-cache"),
        storage_url: storage_url.clone(),
        storage_options: Default::default(),
        acquire_wait: Duration::from_secs(20),
        check_create_only: true,
    };
    let worker = lorafleet_worker::Worker::new(wcfg, Arc::new(lorafleet_worker::EngineTrainer)).await?;
    let wtask = tokio::spawn(worker.run(stopped(stop_rx.clone())));
    eprintln!("lorafleet dev: coordinator on http://{addr}, one worker ({}), storage {storage_url}", a.devices);
    eprintln!("  try: lorafleet submit examples/faq.yaml --watch      (Ctrl-C stops everything)");

    let mut coord = coord;
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        r = &mut coord => {
            let _ = stop_tx.send(true);
            return match r {
                Ok(Ok(())) => Ok(()),
                Ok(Err(e)) => Err(anyhow::anyhow!("coordinator: {e}")),
                Err(e) => Err(anyhow::anyhow!("coordinator task: {e}")),
            };
        }
    }
    eprintln!("stopping");
    let _ = stop_tx.send(true);
    let _ = tokio::time::timeout(Duration::from_secs(35), wtask).await;
    let _ = tokio::time::timeout(Duration::from_secs(10), coord).await;
    Ok(())
}

fn url_for(p: &std::path::Path) -> anyhow::Result<String> {
    std::fs::create_dir_all(p)?;
    Ok(url::Url::from_directory_path(p).map_err(|_| anyhow::anyhow!("{} is not an absolute path", p.display()))?.to_string())
}

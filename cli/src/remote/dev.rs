//! `lorafleet dev`: coordinator + one or more workers (the CPU, or CUDA devices in a
//! `cuda` build) + file storage in one process.

use anyhow::Context;
use clap::Args;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

#[derive(Debug, Clone, Args)]
pub struct DevArgs {
    /// Where the database, storage and worker caches live.
    #[arg(long, env = "LORAFLEET_DEV_DIR", default_value = ".lorafleet")]
    pub dir: PathBuf,
    /// gRPC listen address.
    #[arg(long, env = "LORAFLEET_LISTEN", default_value = "127.0.0.1:50051")]
    pub listen: SocketAddr,
    /// Lease TTL in seconds.
    #[arg(long, env = "LORAFLEET_LEASE_TTL", default_value_t = 30)]
    pub lease_ttl: u64,
    /// What each embedded worker trains on: `cpu`, `cpu:0,1` (CPU slots sharing the cores,
    /// each a data-parallel rank), or `cuda:0,1` in a build with the `cuda` feature (jobs
    /// then ask for them with `resources: { device: cuda, count: N }`).
    #[arg(long, env = "LORAFLEET_DEVICES", default_value = "cpu")]
    pub devices: String,
    /// Embedded workers to start, each with the --devices above and its own cache: a job
    /// with `resources: { nodes: N }` runs as a gang of data-parallel ranks on N of them.
    #[arg(long, env = "LORAFLEET_DEV_WORKERS", default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=64))]
    pub workers: u32,
    /// Serve Prometheus metrics (/metrics) and the web dashboard (/) on this address,
    /// e.g. 127.0.0.1:9100.
    #[arg(long, env = "LORAFLEET_METRICS_LISTEN")]
    pub metrics_listen: Option<SocketAddr>,
}

pub async fn run(a: DevArgs) -> anyhow::Result<()> {
    let devices = lorafleet_worker::parse_devices(&a.devices).map_err(anyhow::Error::msg)?;
    std::fs::create_dir_all(&a.dir).with_context(|| format!("creating {}", a.dir.display()))?;
    let dir = a.dir.canonicalize()?;
    let storage_url = url_for(&dir.join("storage"))?;
    let listener = tokio::net::TcpListener::bind(a.listen).await.with_context(|| format!("binding {} (is another `lorafleet dev` running?)", a.listen))?;
    let addr = listener.local_addr()?;
    let metrics_listener = match a.metrics_listen {
        Some(m) => Some(tokio::net::TcpListener::bind(m).await.with_context(|| format!("binding --metrics-listen {m}"))?),
        None => None,
    };
    let web = match &metrics_listener {
        Some(l) => Some(l.local_addr()?),
        None => None,
    };
    let mut config = lorafleet_coordinator::CoordinatorConfig::new(dir.join("coordinator.sqlite"), storage_url.clone());
    config.control.lease_ttl = Duration::from_secs(a.lease_ttl.max(2));
    // Embedded: the worker is this machine, so specs may name model directories on it.
    config.models.local_paths = true;
    config.control.heartbeat_interval = Duration::from_secs((a.lease_ttl / 6).max(1));
    // The workers stop first, so that they hand their jobs back to a coordinator that is
    // still serving; the coordinator stops once they have.
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let (coord_stop_tx, coord_stop_rx) = tokio::sync::watch::channel(false);
    let stopped = |mut rx: tokio::sync::watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|v| *v).await;
    };
    let coord = tokio::spawn(lorafleet_coordinator::serve_with_metrics(listener, metrics_listener, config, stopped(coord_stop_rx)));

    let mut wtasks = Vec::new();
    for i in 0..a.workers {
        let (name, cache) = if i == 0 {
            ("dev-worker".to_string(), dir.join("worker-cache"))
        } else {
            (format!("dev-worker-{i}"), dir.join(format!("worker-cache-{i}")))
        };
        let wcfg = lorafleet_worker::WorkerConfig {
            coordinator: format!("http://{addr}"),
            tls: Default::default(),
        token: None,
            name,
            devices: devices.clone(),
            labels: vec![],
            cache,
            // The coordinator's (it says where).
            storage_url: None,
            storage_options: Default::default(),
            acquire_wait: Duration::from_secs(20),
            // They all share one storage: checking it once is enough.
            check_create_only: i == 0,
            // One machine: the gang rings run on loopback.
            advertise_host: Some("127.0.0.1".into()),
            collective_timeout: Duration::from_secs(600),
            allow_nccl: true,
            storage_retry: lorafleet_worker::config::DEFAULT_STORAGE_RETRY,
        };
        let worker = match lorafleet_worker::Worker::new(wcfg, Arc::new(lorafleet_worker::EngineTrainer)).await {
            Ok(w) => w,
            Err(e) => {
                let _ = stop_tx.send(true);
                let _ = coord_stop_tx.send(true);
                return Err(e.into());
            }
        };
        wtasks.push(tokio::spawn(worker.run(stopped(stop_rx.clone()))));
    }
    let workers = if a.workers == 1 {
        format!("one worker ({}; --workers N starts N, and a spec with `resources: {{ nodes: 2 }}` spans 2 of them)", a.devices)
    } else {
        format!("{} workers ({} each; a spec with `resources: {{ nodes: 2 }}` spans 2 of them)", a.workers, a.devices)
    };
    eprintln!("lorafleet dev: coordinator on http://{addr}, {workers}, storage {storage_url}");
    match web {
        Some(w) => eprintln!("  dashboard: http://{w}/   (metrics: http://{w}/metrics)"),
        None => eprintln!("  (--metrics-listen 127.0.0.1:9100 also serves the web dashboard and /metrics)"),
    }
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
    // The workers stop together: each gets the same 35 s from now.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(35);
    for t in wtasks {
        let _ = tokio::time::timeout_at(deadline, t).await;
    }
    let _ = coord_stop_tx.send(true);
    let _ = tokio::time::timeout(Duration::from_secs(10), coord).await;
    Ok(())
}

fn url_for(p: &std::path::Path) -> anyhow::Result<String> {
    std::fs::create_dir_all(p)?;
    Ok(url::Url::from_directory_path(p).map_err(|_| anyhow::anyhow!("{} is not an absolute path", p.display()))?.to_string())
}

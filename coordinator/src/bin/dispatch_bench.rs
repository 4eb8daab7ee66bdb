//! Dispatch benchmark: an in-process coordinator (SQLite on disk, `synchronous=FULL`)
//! with N queued jobs, and W simulated light workers over real gRPC on 127.0.0.1.
//!
//! Each worker registers, then loops: AcquireJob (timed) -> hold the job `--job-ms`
//! (simulated training) -> CompleteAttempt, and heartbeats every `--heartbeat-ms`.
//! `--job-ms 0` is the saturation run (closed loop, so AcquireJob latency there is
//! mostly queueing: W outstanding calls / throughput).
//!
//! cargo run --release -p lorafleet-coordinator --bin lorafleet-dispatch-bench -- --workers 1000 --jobs 10000

use anyhow::Context;
use clap::Parser;
use lorafleet_coordinator::{serve_with_metrics, ControlConfig, CoordinatorConfig};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use lorafleet_proto as pb;
use lorafleet_proto::job_service_client::JobServiceClient;
use lorafleet_proto::worker_service_client::WorkerServiceClient;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tonic::transport::Channel;

#[derive(Debug, Parser)]
struct Args {
    #[arg(long, default_value_t = 1000)]
    workers: usize,
    #[arg(long, default_value_t = 10_000)]
    jobs: usize,
    /// Simulated training time per job (0: saturation run).
    #[arg(long, default_value_t = 400)]
    job_ms: u64,
    /// Heartbeat period of each worker (0: none).
    #[arg(long, default_value_t = 5000)]
    heartbeat_ms: u64,
    /// HTTP/2 connections shared by the workers.
    #[arg(long, default_value_t = 8)]
    connections: usize,
    /// Directory for the database and storage (default: a temp dir).
    #[arg(long)]
    dir: Option<std::path::PathBuf>,
}

fn spec(i: usize) -> pb::JobSpec {
    let y = format!(
        "name: bench-{i}\nmodel: {{ source: hf://org/tiny }}\ndata: {{ train: \"dataset://sha256/{}\" }}\noutput: {{ dir: out }}\npriority: {}\n",
        "ab".repeat(32),
        i % 3
    );
    let s = lorafleet_shared::JobSpec::from_yaml(&y, lorafleet_shared::SpecContext::Remote).expect("bench spec is valid");
    pb::JobSpec::from(&s)
}

fn pct(sorted: &[u64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i] as f64 / 1000.0
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let tmp = tempfile::tempdir()?;
    let dir = args.dir.clone().unwrap_or_else(|| tmp.path().to_path_buf());
    std::fs::create_dir_all(dir.join("store"))?;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let mut config = CoordinatorConfig::new(dir.join("bench.db"), format!("file://{}", dir.join("store").display()));
    config.control = ControlConfig { lease_ttl: Duration::from_secs(60), ..ControlConfig::default() };
    // The specs name hf://org/tiny (never loaded): no revision to resolve.
    config.models.hf_revisions = lorafleet_coordinator::sources::HfRevisions::Any;
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let metrics_listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let metrics_addr = metrics_listener.local_addr()?;
    let server = tokio::spawn(serve_with_metrics(listener, Some(metrics_listener), config, async move {
        let _ = stop_rx.await;
    }));
    let url = format!("http://{addr}");
    let mut channels = Vec::new();
    for _ in 0..args.connections.max(1) {
        let mut ch = None;
        for _ in 0..100 {
            match Channel::from_shared(url.clone())?.connect().await {
                Ok(c) => {
                    ch = Some(c);
                    break;
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        }
        channels.push(ch.context("coordinator did not start")?);
    }

    // Fill the queue.
    let t = Instant::now();
    let next = Arc::new(AtomicU64::new(0));
    let mut fill = Vec::new();
    for k in 0..64 {
        let mut j = JobServiceClient::new(channels[k % channels.len()].clone());
        let next = next.clone();
        let n = args.jobs as u64;
        fill.push(tokio::spawn(async move {
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= n {
                    return Ok::<_, tonic::Status>(());
                }
                j.submit_job(pb::SubmitJobRequest { spec: Some(spec(i as usize)), idempotency_key: format!("bench-{i}") }).await?;
            }
        }));
    }
    for f in fill {
        f.await??;
    }
    let fill_secs = t.elapsed().as_secs_f64();
    println!("submitted {} jobs in {:.2}s ({:.0} submits/s, 64 concurrent clients)", args.jobs, fill_secs, args.jobs as f64 / fill_secs);

    // Register the workers.
    let mut ids = Vec::new();
    for i in 0..args.workers {
        let mut w = WorkerServiceClient::new(channels[i % channels.len()].clone());
        let r = w
            .register_worker(pb::RegisterWorkerRequest {
                name: format!("bench-{i}"),
                devices: vec![pb::Device { kind: pb::DeviceKind::Cpu as i32, index: 0, name: "cpu".into(), memory_mib: 0 }],
                labels: Default::default(),
                version: "bench".into(),
                ..Default::default()
            })
            .await?;
        ids.push(r.into_inner().worker_id);
    }

    let dispatched = Arc::new(AtomicU64::new(0));
    let start = Instant::now();
    let mut tasks = Vec::new();
    for (i, wid) in ids.into_iter().enumerate() {
        let ch = channels[i % channels.len()].clone();
        let dispatched = dispatched.clone();
        let (job_ms, hb_ms, total, workers) = (args.job_ms, args.heartbeat_ms, args.jobs as u64, args.workers);
        tasks.push(tokio::spawn(async move {
            let mut w = WorkerServiceClient::new(ch);
            let mut lat = Vec::new();
            let mut last_hb = Instant::now();
            // Spread the heartbeats.
            let hb_offset = Duration::from_millis(if hb_ms > 0 { (i as u64 * 7919) % hb_ms } else { 0 });
            let mut last_dispatch = start;
            // Workers come up spread over one job period, not all in the same instant.
            if job_ms > 0 {
                tokio::time::sleep(Duration::from_millis(job_ms * i as u64 / workers as u64)).await;
            }
            loop {
                if dispatched.load(Ordering::Relaxed) >= total {
                    break;
                }
                let t = Instant::now();
                let lease = w.acquire_job(pb::AcquireJobRequest { worker_id: wid.clone(), wait_secs: 0 }).await?.into_inner().lease;
                lat.push(t.elapsed().as_micros() as u64);
                let Some(l) = lease else { break };
                dispatched.fetch_add(1, Ordering::Relaxed);
                last_dispatch = Instant::now();
                if job_ms > 0 {
                    tokio::time::sleep(Duration::from_millis(job_ms)).await;
                }
                if hb_ms > 0 && last_hb.elapsed() + hb_offset >= Duration::from_millis(hb_ms) {
                    last_hb = Instant::now();
                    w.heartbeat(pb::HeartbeatRequest {
                        worker_id: wid.clone(),
                        running: vec![pb::RunningJob { job_id: l.job_id.clone(), epoch: l.epoch }],
                    })
                    .await?;
                }
                w.complete_attempt(pb::CompleteAttemptRequest {
                    job_id: l.job_id.clone(),
                    epoch: l.epoch,
                    worker_id: wid.clone(),
                    adapter_manifest_key: format!("{}adapter/manifest.json", l.output_prefix),
                    final_loss: None,
                })
                .await?;
            }
            Ok::<_, tonic::Status>((lat, last_dispatch))
        }));
    }
    let mut lat = Vec::new();
    let mut end = start;
    for t in tasks {
        let (l, last) = t.await??;
        lat.extend(l);
        end = end.max(last);
    }
    let secs = (end - start).as_secs_f64();
    let n = dispatched.load(Ordering::Relaxed);
    lat.sort_unstable();
    println!(
        "workers={} jobs={} job_ms={} heartbeat_ms={} connections={}",
        args.workers, args.jobs, args.job_ms, args.heartbeat_ms, args.connections
    );
    println!("dispatched {n} jobs in {secs:.2}s: {:.0} dispatches/s", n as f64 / secs);
    println!(
        "AcquireJob latency over {} calls: p50 {:.2} ms, p90 {:.2} ms, p99 {:.2} ms, max {:.2} ms",
        lat.len(),
        pct(&lat, 0.5),
        pct(&lat, 0.9),
        pct(&lat, 0.99),
        pct(&lat, 1.0)
    );
    // The coordinator's own view: how busy the control loop was.
    let mut s = tokio::net::TcpStream::connect(metrics_addr).await?;
    s.write_all(b"GET /metrics HTTP/1.0\r\n\r\n").await?;
    let mut body = String::new();
    s.read_to_string(&mut body).await?;
    let get = |name: &str| -> f64 {
        body.lines().find_map(|l| l.strip_prefix(name).and_then(|v| v.trim().parse().ok())).unwrap_or(0.0)
    };
    let (batches, busy) = (get("lorafleet_store_batch_seconds_count "), get("lorafleet_store_batch_seconds_sum "));
    let cmds = get("lorafleet_store_batch_commands_sum ");
    let (fn_, fs) = (get("lorafleet_store_fsync_seconds_count "), get("lorafleet_store_fsync_seconds_sum "));
    let (dn, ds) = (get("lorafleet_dispatch_latency_seconds_count "), get("lorafleet_dispatch_latency_seconds_sum "));
    println!(
        "control loop (whole run incl. fill): {batches:.0} transactions, {:.1} commands/transaction, {:.1} s busy applying+committing; \
         {fn_:.0} WAL fsyncs, mean {:.2} ms; server-side dispatch latency mean {:.2} ms",
        cmds / batches.max(1.0),
        busy,
        1000.0 * fs / fn_.max(1.0),
        1000.0 * ds / dn.max(1.0)
    );
    let _ = stop_tx.send(());
    server.await??;
    Ok(())
}


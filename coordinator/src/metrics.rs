//! Prometheus metrics, served as text at `/metrics` on `--metrics-listen`. Each
//! coordinator has its own registry (tests run several in one process).

use lorafleet_shared::job::JobState;
use prometheus::{Encoder, GaugeVec, Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry, TextEncoder};
use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;
use std::sync::{Arc, Mutex};
use tracing::{info, warn};

/// The reasons of `lorafleet_refused_calls_total`.
pub const REFUSALS: [&str; 6] = ["unauthenticated", "permission_denied", "quota", "rate_limit", "streams", "model_policy"];

pub struct Metrics {
    pub registry: Registry,
    /// Jobs per state (final states included: everything in the database).
    pub jobs: IntGaugeVec,
    /// Alive registered workers.
    pub workers: IntGauge,
    /// Leases held by workers now.
    pub live_leases: IntGauge,
    /// AcquireJob arrival to committed lease.
    pub dispatch_latency: Histogram,
    /// Worker calls refused for a stale epoch (or an expired lease).
    pub stale_epochs: IntCounter,
    /// Commands per store transaction.
    pub batch_size: Histogram,
    /// Time to apply and commit one batch.
    pub commit_seconds: Histogram,
    /// Time of one fsync of the write-ahead log.
    pub fsync_seconds: Histogram,
    /// Gangs (jobs with resources.nodes > 1) by what they do now: `running`,
    /// `assembling` (holding free workers), `parked` (waiting out of the queue's order).
    pub gangs: IntGaugeVec,
    /// Calls refused by a security or fairness rule, by `reason`: `unauthenticated`,
    /// `permission_denied`, `quota`, `rate_limit`, `streams`, `model_policy`.
    pub refusals: IntCounterVec,
    /// Queued jobs (parked gangs included) by the device kind they ask for (`cpu`,
    /// `cuda`): what an autoscaler scales worker pools on.
    pub queued_jobs: IntGaugeVec,
    /// Age of the oldest queued job by device kind, in seconds (0 when none).
    pub oldest_queued_age: GaugeVec,
    /// Alive workers by `pool` (their `pool=NAME` label, else `default`) and `device`
    /// (each device kind a worker offers).
    pub pool_workers: IntGaugeVec,
    /// The (pool, device) series `pool_workers` has now (series of pools that went away
    /// are removed, not left at their last value).
    pool_series: Mutex<BTreeSet<(String, String)>>,
}

/// The device kinds of the `device` labels.
pub const DEVICE_KINDS: [&str; 2] = ["cpu", "cuda"];

impl Metrics {
    pub fn new() -> Arc<Self> {
        let registry = Registry::new();
        let jobs = IntGaugeVec::new(Opts::new("lorafleet_jobs", "jobs per state"), &["state"]).expect("valid metric");
        let workers = IntGauge::new("lorafleet_workers_alive", "alive registered workers").expect("valid metric");
        let live_leases = IntGauge::new("lorafleet_live_leases", "leases held by workers").expect("valid metric");
        let dispatch_latency = Histogram::with_opts(
            HistogramOpts::new("lorafleet_dispatch_latency_seconds", "AcquireJob arrival to committed lease")
                .buckets(vec![0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0]),
        )
        .expect("valid metric");
        let stale_epochs =
            IntCounter::new("lorafleet_stale_epoch_refusals_total", "worker calls refused for a stale epoch").expect("valid metric");
        let batch_size = Histogram::with_opts(
            HistogramOpts::new("lorafleet_store_batch_commands", "commands per store transaction")
                .buckets(vec![1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0, 1024.0]),
        )
        .expect("valid metric");
        let commit_seconds = Histogram::with_opts(
            HistogramOpts::new("lorafleet_store_batch_seconds", "time to apply and commit one batch")
                .buckets(vec![0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.5]),
        )
        .expect("valid metric");
        let fsync_seconds = Histogram::with_opts(
            HistogramOpts::new("lorafleet_store_fsync_seconds", "one fsync of the write-ahead log")
                .buckets(vec![0.0002, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.5]),
        )
        .expect("valid metric");
        let gangs = IntGaugeVec::new(Opts::new("lorafleet_gangs", "multi-node jobs by phase (running, assembling, parked)"), &["phase"])
            .expect("valid metric");
        for p in ["running", "assembling", "parked"] {
            gangs.with_label_values(&[p]).set(0);
        }
        let refusals = IntCounterVec::new(Opts::new("lorafleet_refused_calls_total", "calls refused by authentication, roles, quotas, limits or policy"), &["reason"])
            .expect("valid metric");
        for r in REFUSALS {
            refusals.with_label_values(&[r]).reset();
        }
        let queued_jobs = IntGaugeVec::new(Opts::new("lorafleet_queued_jobs", "queued jobs by the device kind they need"), &["device"]).expect("valid metric");
        let oldest_queued_age =
            GaugeVec::new(Opts::new("lorafleet_oldest_queued_job_age_seconds", "age of the oldest queued job by device kind (0 when none)"), &["device"])
                .expect("valid metric");
        for d in DEVICE_KINDS {
            queued_jobs.with_label_values(&[d]).set(0);
            oldest_queued_age.with_label_values(&[d]).set(0.0);
        }
        let pool_workers = IntGaugeVec::new(Opts::new("lorafleet_workers", "alive workers by pool (label pool=NAME, else default) and device kind"), &["pool", "device"])
            .expect("valid metric");
        for c in [
            Box::new(jobs.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(queued_jobs.clone()),
            Box::new(oldest_queued_age.clone()),
            Box::new(pool_workers.clone()),
            Box::new(refusals.clone()),
            Box::new(gangs.clone()),
            Box::new(workers.clone()),
            Box::new(live_leases.clone()),
            Box::new(dispatch_latency.clone()),
            Box::new(stale_epochs.clone()),
            Box::new(batch_size.clone()),
            Box::new(commit_seconds.clone()),
            Box::new(fsync_seconds.clone()),
        ] {
            registry.register(c).expect("metric names are unique");
        }
        for s in JobState::ALL {
            jobs.with_label_values(&[s.as_str()]).set(0);
        }
        Arc::new(Self {
            registry,
            jobs,
            workers,
            live_leases,
            dispatch_latency,
            stale_epochs,
            batch_size,
            commit_seconds,
            fsync_seconds,
            gangs,
            refusals,
            queued_jobs,
            oldest_queued_age,
            pool_workers,
            pool_series: Mutex::new(BTreeSet::new()),
        })
    }

    /// Set the queue gauges: per device kind (`DEVICE_KINDS` order), the queued jobs
    /// and the creation time (unix ms) of the oldest; `now_ms` is the wall clock.
    pub fn set_queue(&self, by_kind: [(usize, Option<i64>); 2], now_ms: i64) {
        for (d, (n, oldest)) in DEVICE_KINDS.iter().zip(by_kind) {
            self.queued_jobs.with_label_values(&[d]).set(n as i64);
            let age = oldest.map(|c| (now_ms.saturating_sub(c)).max(0) as f64 / 1000.0).unwrap_or(0.0);
            self.oldest_queued_age.with_label_values(&[d]).set(age);
        }
    }

    /// Set `lorafleet_workers{pool,device}` to these counts; series not in `counts`
    /// are removed.
    pub fn set_pool_workers(&self, counts: &BTreeMap<(String, String), i64>) {
        let mut series = self.pool_series.lock().unwrap_or_else(|e| e.into_inner());
        for (pool, device) in series.iter() {
            if !counts.contains_key(&(pool.clone(), device.clone())) {
                let _ = self.pool_workers.remove_label_values(&[pool, device]);
            }
        }
        for ((pool, device), n) in counts {
            self.pool_workers.with_label_values(&[pool, device]).set(*n);
        }
        *series = counts.keys().cloned().collect();
    }

    /// Count a refused call (`reason`: one of [`REFUSALS`]).
    pub fn refused(&self, reason: &str) {
        self.refusals.with_label_values(&[reason]).inc();
    }

    pub fn reset_jobs(&self, counts: &[(JobState, u64)]) {
        for s in JobState::ALL {
            self.jobs.with_label_values(&[s.as_str()]).set(0);
        }
        for (s, n) in counts {
            self.jobs.with_label_values(&[s.as_str()]).set(*n as i64);
        }
    }

    pub fn job_moved(&self, from: Option<JobState>, to: JobState) {
        if let Some(f) = from {
            self.jobs.with_label_values(&[f.as_str()]).dec();
        }
        self.jobs.with_label_values(&[to.as_str()]).inc();
    }

    /// The Prometheus text exposition.
    pub fn render(&self) -> String {
        let mut buf = Vec::new();
        if let Err(e) = TextEncoder::new().encode(&self.registry.gather(), &mut buf) {
            warn!(error = %e, "encoding metrics failed");
        }
        String::from_utf8_lossy(&buf).into_owned()
    }
}

/// Serve `/metrics`, and the routes of `extra` (the dashboard), until `shutdown`
/// resolves (over TLS when `tls` is given).
pub async fn serve_metrics(
    listener: tokio::net::TcpListener,
    metrics: Arc<Metrics>,
    tls: Option<tokio_rustls::rustls::ServerConfig>,
    extra: axum::Router,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    use axum::routing::get;
    let app = axum::Router::new()
        .route(
            "/metrics",
            get(move || {
                let m = metrics.clone();
                async move { ([(axum::http::header::CONTENT_TYPE, "text/plain; version=0.0.4")], m.render()) }
            }),
        )
        .merge(extra);
    info!(addr = ?listener.local_addr().ok(), tls = tls.is_some(), "metrics listening");
    match tls {
        Some(cfg) => axum::serve(crate::tls::TlsListener::new(listener, cfg)?, app).with_graceful_shutdown(shutdown).await,
        None => axum::serve(listener, app).with_graceful_shutdown(shutdown).await,
    }
}

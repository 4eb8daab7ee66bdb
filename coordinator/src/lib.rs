//! lorafleet coordinator: the durable job queue and lease authority of the control
//! plane, served over gRPC (`lorafleet.v1.JobService` and `WorkerService`, plus health
//! and reflection) with Prometheus metrics and a web dashboard ([`dashboard`]) on the
//! metrics listener.
//!
//! - [`persistence`]: SQLite, the source of truth (what is stored and why).
//! - [`control`]: the control loop thread that owns the writer connection and the
//!   scheduler state, and commits commands in batches.
//! - [`scheduler`]: queue order (priority, FIFO, aging) and resource matching with
//!   reservations for large jobs.
//! - [`service`]: the gRPC handlers, request checks and proto conversions.
//!
//! Embed it with [`serve`]: it takes a bound listener and a shutdown future, so tests
//! and `lorafleet dev` run it in-process.

pub mod audit;
pub mod auth;
pub mod control;
pub mod dashboard;
pub mod error;
pub mod limits;
pub mod metrics;
pub mod persistence;
pub mod quota;
pub mod readers;
pub mod scheduler;
pub mod service;
pub mod sources;
pub mod tls;

pub use control::ControlConfig;
pub use error::{CoordError, Result};

use lorafleet_proto::admin_service_server::AdminServiceServer;
use lorafleet_proto::job_service_server::JobServiceServer;
use lorafleet_proto::worker_service_server::WorkerServiceServer;
use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio_stream::wrappers::TcpListenerStream;
use tonic::service::interceptor::InterceptedService;
use tracing::{info, warn};

/// Everything [`serve`] needs besides the listener.
#[derive(Debug, Clone)]
pub struct CoordinatorConfig {
    /// SQLite database file (created if missing).
    pub db_path: PathBuf,
    /// Object storage URL (`file:///dir`, `s3://bucket/prefix`, `az://container/prefix`, `memory://x`).
    pub storage_url: String,
    /// Start even if the store does not enforce create-only writes (fencing of
    /// checkpoint manifests is then not guaranteed).
    pub allow_unsafe_store: bool,
    /// Where to serve `/metrics`, if anywhere.
    pub metrics_listen: Option<SocketAddr>,
    /// TLS for the gRPC API and `/metrics` (None: plain text).
    pub tls: Option<tls::ServerTls>,
    /// Bearer tokens and roles (None: no authentication).
    pub auth: Option<Arc<auth::Auth>>,
    /// Sizes, rates and streams per caller.
    pub limits: limits::Limits,
    /// Where models may come from.
    pub models: sources::ModelPolicy,
    /// Also append the audit log to this file (JSON lines).
    pub audit_log: Option<PathBuf>,
    pub control: ControlConfig,
}

impl CoordinatorConfig {
    pub fn new(db_path: impl Into<PathBuf>, storage_url: impl Into<String>) -> Self {
        Self {
            db_path: db_path.into(),
            storage_url: storage_url.into(),
            allow_unsafe_store: false,
            metrics_listen: None,
            tls: None,
            auth: None,
            limits: limits::Limits::default(),
            models: sources::ModelPolicy::default(),
            audit_log: None,
            control: ControlConfig::default(),
        }
    }
}

/// The gRPC method of a call (`lorafleet.v1.JobService/SubmitJob`), in its extensions.
#[derive(Debug, Clone)]
pub struct CallPath(pub String);

/// What every call passes before its handler: the token and role, then the rate limit.
#[derive(Clone)]
struct Gate {
    auth: Option<Arc<auth::Auth>>,
    guards: Arc<limits::Guards>,
    audit: Arc<audit::Audit>,
    metrics: Arc<metrics::Metrics>,
}

impl Gate {
    fn check(&self, req: tonic::Request<()>, service: &str, roles: &[auth::Role], rate_limited: bool) -> Result<tonic::Request<()>, tonic::Status> {
        let Some(a) = &self.auth else { return Ok(req) };
        let method = req.extensions().get::<CallPath>().map(|p| p.0.clone()).unwrap_or_else(|| service.to_string());
        match a.authorize(req, service, roles) {
            Err((s, who)) => {
                self.metrics.refused(if s.code() == tonic::Code::Unauthenticated { "unauthenticated" } else { "permission_denied" });
                self.audit.record(who.as_deref(), &method, "", s.code(), s.message());
                Err(s)
            }
            Ok(req) => {
                if rate_limited {
                    if let Some(who) = service::caller(&req) {
                        if let Err(s) = self.guards.rate(&who) {
                            self.metrics.refused("rate_limit");
                            return Err(s);
                        }
                    }
                }
                Ok(req)
            }
        }
    }
}

/// How long, after the shutdown signal, open client connections get to finish.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

/// Run the coordinator on `listener` until `shutdown` resolves, then stop cleanly:
/// long polls are answered, watch streams end, the control loop drains and the store
/// is closed.
pub async fn serve(listener: TcpListener, config: CoordinatorConfig, shutdown: impl Future<Output = ()> + Send + 'static) -> Result<()> {
    let metrics_listener = match config.metrics_listen {
        Some(addr) => Some(TcpListener::bind(addr).await.map_err(|e| CoordError::Internal(format!("cannot bind metrics on {addr}: {e}")))?),
        None => None,
    };
    serve_with_metrics(listener, metrics_listener, config, shutdown).await
}

/// [`serve`] with an already bound metrics listener (tests bind `127.0.0.1:0`).
pub async fn serve_with_metrics(
    listener: TcpListener,
    metrics_listener: Option<TcpListener>,
    config: CoordinatorConfig,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<()> {
    let storage = lorafleet_storage::Storage::open(&config.storage_url).map_err(service::jobs::storage_err)?;
    match storage.check_create_only().await {
        Ok(()) => info!(storage = %config.storage_url, "storage enforces create-only writes"),
        Err(e) if config.allow_unsafe_store => {
            warn!(storage = %config.storage_url, error = %e, "storage self-check failed; continuing because --allow-unsafe-store is set")
        }
        Err(e) => {
            return Err(CoordError::Storage(format!("{e} (pass --allow-unsafe-store to run anyway)")));
        }
    }
    // Workers take the storage from the registration answer, and prove they see it by
    // reading back this token (issue: a worker on another store fails every job).
    let storage_marker = uuid::Uuid::new_v4().simple().to_string();
    storage
        .put_bytes(&lorafleet_storage::layout::coordinator_marker(), bytes::Bytes::from(storage_marker.clone()))
        .await
        .map_err(|e| CoordError::Storage(format!("cannot write the storage marker for workers: {e}")))?;
    let metrics = metrics::Metrics::new();
    let metrics_for_gate = metrics.clone();
    let mut control_config = config.control.clone();
    if let Some(a) = &config.auth {
        control_config.quotas = a.quotas();
    }
    let (control, control_loop) = control::ControlLoop::start(config.db_path.clone(), control_config, metrics.clone())?;
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let audit = audit::Audit::open(config.audit_log.as_deref(), control.clone()).map_err(CoordError::InvalidArgument)?;
    let guards = limits::Guards::new(config.limits.clone());
    let shared = Arc::new(service::Shared {
        control: control.clone(),
        readers: readers::Readers::new(config.db_path.clone()),
        storage,
        storage_marker,
        shutdown: stop_rx.clone(),
        guards: guards.clone(),
        audit: audit.clone(),
        metrics: metrics.clone(),
        models: config.models.clone(),
    });

    let (health, health_svc) = tonic_health::server::health_reporter();
    health.set_serving::<JobServiceServer<service::jobs::JobSvc>>().await;
    health.set_serving::<WorkerServiceServer<service::workers::WorkerSvc>>().await;
    health.set_serving::<AdminServiceServer<service::admin::AdminSvc>>().await;
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(lorafleet_proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()
        .map_err(|e| CoordError::Internal(format!("reflection: {e}")))?;

    // One shutdown signal fans out to the gRPC server, the metrics server, the watch
    // streams and the long polls.
    let drain = control.clone();
    tokio::spawn(async move {
        shutdown.await;
        info!("shutting down");
        let _ = stop_tx.send(true);
        drain.drain().await;
    });
    let metrics_tls = match &config.tls {
        Some(t) => Some(t.rustls_config().map_err(|e| CoordError::InvalidArgument(format!("--tls-cert/--tls-key: {e}")))?),
        None => None,
    };
    let metrics_task = metrics_listener.map(|l| {
        let mut rx = stop_rx.clone();
        let dash = dashboard::router(shared.clone(), config.auth.clone(), config.tls.is_some());
        tokio::spawn(metrics::serve_metrics(l, metrics, metrics_tls, dash, async move {
            let _ = rx.wait_for(|s| *s).await;
        }))
    });

    let addr = listener.local_addr().ok();
    info!(addr = ?addr, db = %config.db_path.display(), "coordinator listening");
    let mut rx = stop_rx.clone();
    // Small request/response pairs: no Nagle delay (tonic only sets this on listeners it binds).
    let incoming = tokio_stream::StreamExt::map(TcpListenerStream::new(listener), |s| {
        if let Ok(s) = &s {
            let _ = s.set_nodelay(true);
        }
        s
    });
    let mut builder = tonic::transport::Server::builder();
    if let Some(t) = &config.tls {
        builder = builder.tls_config(t.tonic_config()).map_err(|e| CoordError::InvalidArgument(format!("--tls-cert/--tls-key: {e}")))?;
    }
    let mtls = config.tls.as_ref().is_some_and(|t| t.worker_ca_pem.is_some());
    let gate = Gate { auth: config.auth.clone(), guards, audit, metrics: metrics_for_gate };
    let max = config.limits.max_request_bytes;
    let g = gate.clone();
    let worker_svc = InterceptedService::new(
        WorkerServiceServer::new(service::workers::WorkerSvc { shared: shared.clone() }).max_decoding_message_size(max),
        move |req| {
            let req = if mtls { tls::require_client_cert(req)? } else { req };
            g.check(req, "WorkerService", &[auth::Role::Worker], false)
        },
    );
    let g = gate.clone();
    let job_svc = InterceptedService::new(
        JobServiceServer::new(service::jobs::JobSvc { shared: shared.clone() }).max_decoding_message_size(max),
        move |req| g.check(req, "JobService", &[auth::Role::User], true),
    );
    let g = gate;
    let admin_svc = InterceptedService::new(
        AdminServiceServer::new(service::admin::AdminSvc { shared: shared.clone() }).max_decoding_message_size(max),
        move |req| g.check(req, "AdminService", &[], true),
    );
    info!(tls = config.tls.is_some(), worker_client_certs = mtls, tokens = config.auth.is_some(), "transport security");
    // The method of each call, for the audit of refusals (interceptors see no URI).
    let mut builder = builder.layer(tower::util::MapRequestLayer::new(|mut req: tonic::codegen::http::Request<tonic::body::Body>| {
        let path = req.uri().path().trim_start_matches('/').to_string();
        req.extensions_mut().insert(CallPath(path));
        req
    }));
    let server = builder
        .add_service(health_svc)
        .add_service(reflection)
        .add_service(job_svc)
        .add_service(worker_svc)
        .add_service(admin_svc)
        .serve_with_incoming_shutdown(incoming, async move {
            let _ = rx.wait_for(|s| *s).await;
        });
    // Graceful shutdown waits for clients to close their connections; one that never
    // reads the GOAWAY (a hung client) must not keep the coordinator up forever.
    let mut grace_rx = stop_rx.clone();
    let grace = async move {
        let _ = grace_rx.wait_for(|s| *s).await;
        tokio::time::sleep(SHUTDOWN_GRACE).await;
    };
    let result = tokio::select! {
        r = server => r.map_err(|e| CoordError::Internal(format!("grpc server: {e}"))),
        () = grace => {
            warn!(grace = ?SHUTDOWN_GRACE, "clients still connected after shutdown; closing their connections");
            Ok(())
        }
    };
    drop(shared);
    control.stop().await;
    drop(control);
    control_loop.join().await;
    if let Some(t) = metrics_task {
        let _ = t.await;
    }
    info!("coordinator stopped");
    result
}

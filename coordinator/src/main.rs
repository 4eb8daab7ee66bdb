//! `lorafleet-coordinator`: the control-plane server.

use anyhow::Context;
use clap::Parser;
use lorafleet_coordinator::limits::Limits;
use lorafleet_coordinator::{serve, ControlConfig, CoordinatorConfig};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

#[derive(Debug, Parser)]
#[command(
    name = "lorafleet-coordinator",
    about = "lorafleet coordinator: durable job queue, leases, scheduling (gRPC)",
)]
struct Args {
    /// What else to do than serve (`token create`).
    #[command(subcommand)]
    command: Option<Command>,
    /// gRPC listen address.
    #[arg(long, env = "LORAFLEET_LISTEN", default_value = "127.0.0.1:50051")]
    listen: SocketAddr,
    /// SQLite database file (created if missing). Required to serve.
    #[arg(long, env = "LORAFLEET_DB")]
    db: Option<PathBuf>,
    /// Object storage URL: file:///dir, s3://bucket/prefix, az://container/prefix.
    /// Required to serve.
    #[arg(long, env = "LORAFLEET_STORAGE")]
    storage: Option<String>,
    /// Lease TTL in seconds: a worker silent this long loses its leases.
    #[arg(long, env = "LORAFLEET_LEASE_TTL", default_value_t = 30)]
    lease_ttl: u64,
    /// Serve Prometheus metrics at http://ADDR/metrics.
    #[arg(long, env = "LORAFLEET_METRICS_LISTEN")]
    metrics_listen: Option<SocketAddr>,
    /// Start even if the storage does not enforce create-only writes.
    #[arg(long, env = "LORAFLEET_ALLOW_UNSAFE_STORE")]
    allow_unsafe_store: bool,
    /// Seconds of waiting worth one priority level (0 disables aging).
    #[arg(long, env = "LORAFLEET_AGING_SECS", default_value_t = 600)]
    aging_secs: u64,
    /// Seconds a gang (resources.nodes > 1) may first hold the free workers it gathered
    /// while it waits for the rest; after that they run other jobs for as long, and the
    /// next hold is twice as long.
    #[arg(long, env = "LORAFLEET_GANG_HOLD_SECS", default_value_t = 120)]
    gang_hold_secs: u64,
    /// PEM certificate (chain) of the gRPC API and /metrics: TLS (clients use https://
    /// URLs and --ca). With --tls-key.
    #[arg(long, env = "LORAFLEET_TLS_CERT", requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// PEM private key of --tls-cert.
    #[arg(long, env = "LORAFLEET_TLS_KEY", requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// PEM CA whose certificates workers must present (mutual TLS for the worker
    /// service; users need no certificate). Needs --tls-cert.
    #[arg(long, env = "LORAFLEET_WORKER_CA", requires = "tls_cert")]
    worker_ca: Option<PathBuf>,
    /// Serve plain text (no TLS): only say so explicitly; warned about unless listening
    /// on loopback.
    #[arg(long, env = "LORAFLEET_INSECURE", conflicts_with = "tls_cert")]
    insecure: bool,
    /// Bearer tokens with roles (admin, user, worker): a YAML file of token hashes
    /// (`token create` makes them), read again on SIGHUP. Without it, callers are not
    /// authenticated.
    #[arg(long, env = "LORAFLEET_AUTH")]
    auth: Option<PathBuf>,
    /// Also append the audit log (every state-changing call, every refused token or
    /// role) to this file as JSON lines; it is always kept in the database
    /// (`lorafleet audit`).
    #[arg(long, env = "LORAFLEET_AUDIT_LOG")]
    audit_log: Option<PathBuf>,
    /// Model sources workers may load (repeatable, or comma-separated in the
    /// environment): a source must be one of these prefixes or lie under one, e.g.
    /// `hf://meta-llama/` or `s3://models-bucket`. Default: any hf://, s3:// or az://.
    #[arg(long = "allow-model-source", env = "LORAFLEET_ALLOW_MODEL_SOURCE", value_delimiter = ',')]
    allow_model_source: Vec<String>,
    /// Let specs name model directories on the workers' disks (relative paths).
    #[arg(long, env = "LORAFLEET_ALLOW_LOCAL_MODEL_PATHS")]
    allow_local_model_paths: bool,
    /// hf:// revisions: resolve branches and tags to their commit at submit (through
    /// HF_ENDPOINT and HF_TOKEN) and store the job pinned; `pinned`: refuse unpinned
    /// sources; `any`: take them as given.
    #[arg(long, env = "LORAFLEET_HF_REVISIONS", value_enum, default_value_t = lorafleet_coordinator::sources::HfRevisions::Resolve)]
    hf_revisions: lorafleet_coordinator::sources::HfRevisions,
    /// Largest gRPC message accepted, in bytes (a spec, one upload chunk).
    #[arg(long, env = "LORAFLEET_MAX_REQUEST_BYTES", default_value_t = Limits::default().max_request_bytes)]
    max_request_bytes: usize,
    /// Largest dataset upload, in bytes.
    #[arg(long, env = "LORAFLEET_MAX_UPLOAD_BYTES", default_value_t = Limits::default().max_upload_bytes)]
    max_upload_bytes: u64,
    /// Calls per second each token may make to the job and admin services (0: no limit;
    /// worker tokens are not limited). Needs --auth.
    #[arg(long, env = "LORAFLEET_RATE_LIMIT", default_value_t = Limits::default().rate_per_sec)]
    rate_limit: f64,
    /// Calls a token may make at once above its rate.
    #[arg(long, env = "LORAFLEET_RATE_BURST", default_value_t = Limits::default().rate_burst)]
    rate_burst: f64,
    /// Streams (watch, upload, download) one token may hold open (0: unlimited). Needs --auth.
    #[arg(long, env = "LORAFLEET_MAX_STREAMS_PER_CALLER", default_value_t = Limits::default().max_streams_per_caller)]
    max_streams_per_caller: usize,
}

#[derive(Debug, clap::Subcommand)]
enum Command {
    /// Manage the bearer tokens of --auth.
    #[command(subcommand)]
    Token(TokenCommand),
}

#[derive(Debug, clap::Subcommand)]
enum TokenCommand {
    /// Make a token, print it once, and append its sha256 to the auth file (created with
    /// mode 0600 if missing). Send SIGHUP to a running coordinator to load it.
    ///
    /// Examples:
    ///   lorafleet-coordinator token create --auth /etc/lorafleet/auth.yaml --id alice --role user --tenant acme
    ///   lorafleet-coordinator token create --auth auth.yaml --id gpu-pool --role worker
    #[command(verbatim_doc_comment)]
    Create {
        #[arg(long, env = "LORAFLEET_AUTH")]
        auth: PathBuf,
        /// What logs and errors call this token (1-63 letters, digits, - _ .).
        #[arg(long)]
        id: String,
        /// admin (everything), user (jobs of its tenant), worker (the worker service).
        #[arg(long)]
        role: lorafleet_coordinator::auth::Role,
        /// The tenant of a user token (optional for the others).
        #[arg(long)]
        tenant: Option<String>,
    },
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()))
        .init();
    let args = Args::parse();
    if let Some(Command::Token(TokenCommand::Create { auth, id, role, tenant })) = &args.command {
        let token = lorafleet_coordinator::auth::create_token(auth, id, *role, tenant.as_deref()).map_err(anyhow::Error::msg)?;
        eprintln!("token {id:?} ({}) added to {}; it is shown only now:", role.as_str(), auth.display());
        println!("{token}");
        return Ok(());
    }
    anyhow::ensure!(args.lease_ttl >= 2, "--lease-ttl must be at least 2 seconds");
    let (Some(db_path), Some(storage_url)) = (args.db.clone(), args.storage.clone()) else {
        anyhow::bail!("--db and --storage are required to serve (see --help)");
    };
    let auth = match &args.auth {
        Some(p) => {
            let a = lorafleet_coordinator::auth::Auth::load(p).map_err(|e| anyhow::anyhow!("--auth: {e}"))?;
            #[cfg(unix)]
            {
                let a2 = a.clone();
                let mut hup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()).context("SIGHUP handler")?;
                tokio::spawn(async move {
                    while hup.recv().await.is_some() {
                        if let Err(e) = a2.reload() {
                            tracing::error!(error = %e, "auth file not reloaded; the tokens in force stay");
                        }
                    }
                });
            }
            Some(a)
        }
        None => {
            if !args.listen.ip().is_loopback() {
                tracing::warn!(listen = %args.listen, "no --auth: anyone who reaches this port may submit, read and cancel jobs and lease them as a worker");
            }
            None
        }
    };
    let control = ControlConfig {
        lease_ttl: Duration::from_secs(args.lease_ttl),
        heartbeat_interval: Duration::from_secs((args.lease_ttl / 6).max(1)),
        aging: Duration::from_secs(args.aging_secs),
        gang_hold: Duration::from_secs(args.gang_hold_secs.max(1)),
        ..ControlConfig::default()
    };
    let tls = match (&args.tls_cert, &args.tls_key) {
        (Some(c), Some(k)) => Some(lorafleet_coordinator::tls::ServerTls::from_files(c, k, args.worker_ca.as_deref()).map_err(|e| anyhow::anyhow!("{e}"))?),
        _ if args.insecure => {
            if !args.listen.ip().is_loopback() {
                tracing::warn!(listen = %args.listen, "serving plain text (--insecure) on a non-loopback address: tokens, datasets and adapters cross the network unencrypted");
            }
            None
        }
        _ => anyhow::bail!("refusing to serve plain text: give --tls-cert and --tls-key (TLS), or --insecure to serve without it"),
    };
    let config = CoordinatorConfig {
        tls,
        auth,
        db_path,
        storage_url,
        allow_unsafe_store: args.allow_unsafe_store,
        metrics_listen: args.metrics_listen,
        limits: Limits {
            max_request_bytes: args.max_request_bytes,
            max_upload_bytes: args.max_upload_bytes,
            rate_per_sec: args.rate_limit,
            rate_burst: args.rate_burst,
            max_streams_per_caller: args.max_streams_per_caller,
        },
        models: lorafleet_coordinator::sources::ModelPolicy {
            allow: args.allow_model_source.iter().map(|s| s.trim().to_string()).filter(|s| !s.is_empty()).collect(),
            local_paths: args.allow_local_model_paths,
            hf_revisions: args.hf_revisions,
            hub_endpoint: None,
        },
        audit_log: args.audit_log.clone(),
        control,
    };
    let listener = tokio::net::TcpListener::bind(args.listen).await.with_context(|| format!("binding {}", args.listen))?;
    let shutdown = async {
        let ctrl_c = tokio::signal::ctrl_c();
        #[cfg(unix)]
        {
            let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).expect("signal handler");
            tokio::select! { _ = ctrl_c => {}, _ = term.recv() => {} }
        }
        #[cfg(not(unix))]
        {
            let _ = ctrl_c.await;
        }
    };
    serve(listener, config, shutdown).await.context("coordinator failed")?;
    Ok(())
}

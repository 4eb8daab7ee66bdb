//! Remote commands: the gRPC client of a coordinator (`submit`, `jobs`, `status`,
//! `watch`, `logs`, `cancel`, `checkpoints`, `fetch`, `workers`, `audit`) and `dev`, which runs
//! a coordinator, one or more CPU workers and file storage in this process.
//!
//! Every command takes `--coordinator URL` (or `LORAFLEET_COORDINATOR`, default
//! `http://127.0.0.1:50051`). A server error prints one line (`error: invalid argument:
//! lora.r: must be between 1 and 1024, got 0`) and exits non-zero.

mod dev;
mod fetch;
mod output;
mod submit;
mod watch;

use anyhow::Context;
use clap::{Args, Subcommand};
use lorafleet_proto as pb;
use lorafleet_proto::job_service_client::JobServiceClient;
use std::path::PathBuf;
use lorafleet_proto::connect::AuthChannel;

#[derive(Debug, Clone, Args)]
pub struct Conn {
    /// Coordinator gRPC URL (`https://` for a coordinator started with --tls-cert).
    #[arg(long, env = "LORAFLEET_COORDINATOR", default_value = "http://127.0.0.1:50051")]
    pub coordinator: String,
    /// PEM file of the CA that signed the coordinator's certificate (https:// URLs;
    /// default: the system's trusted roots).
    #[arg(long, env = "LORAFLEET_CA")]
    pub ca: Option<std::path::PathBuf>,
    /// Bearer token for a coordinator started with --auth (from
    /// `lorafleet-coordinator token create`); prefer the environment variable.
    #[arg(long, env = "LORAFLEET_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
}

#[derive(Debug, Subcommand)]
pub enum RemoteCommand {
    /// Submit a job spec to the coordinator.
    ///
    /// The spec is validated here first (errors name the key, e.g. `lora.r`). Local
    /// dataset files it names (data.train, data.eval) are uploaded and replaced by
    /// content-addressed `dataset://sha256/...` refs. A local model path is sent as
    /// written (relative, no `..`): each worker resolves it in its working directory,
    /// which is this one with `lorafleet dev`; other coordinators take such paths only
    /// with --allow-local-model-paths: use s3:// or hf:// models there.
    ///
    /// Examples:
    ///   lorafleet submit examples/faq.yaml --watch
    ///   lorafleet submit spec.yaml --idempotency-key nightly-2026-11-28 --json
    #[command(verbatim_doc_comment)]
    Submit {
        /// The job spec (YAML).
        spec: PathBuf,
        /// Follow the job until it ends (progress bar, loss sparkline, evals).
        #[arg(long)]
        watch: bool,
        /// Submitting again with the same key returns the existing job instead of a new one.
        #[arg(long, env = "LORAFLEET_IDEMPOTENCY_KEY")]
        idempotency_key: Option<String>,
        /// Print the job as JSON.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        conn: Conn,
    },
    /// List jobs, newest first.
    ///
    /// Examples:
    ///   lorafleet jobs
    ///   lorafleet jobs --state running --state queued --json
    #[command(verbatim_doc_comment)]
    Jobs {
        /// Only jobs in this state (queued, running, succeeded, failed, cancelling, cancelled); repeatable.
        #[arg(long = "state")]
        states: Vec<String>,
        /// Most jobs to list.
        #[arg(long, default_value_t = 100)]
        limit: u32,
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        conn: Conn,
    },
    /// Show one job.
    ///
    /// Also shows its resources (`2 nodes x 1 cpu`), why a queued job waits (e.g. a gang
    /// waiting for enough free workers) and, for a data-parallel job, each rank's node,
    /// worker, step and tokens/s.
    ///
    /// Example: lorafleet status 6f1c...  (add --json for scripts)
    #[command(verbatim_doc_comment)]
    Status {
        job: String,
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        conn: Conn,
    },
    /// Follow a job: progress bar with step, loss, lr, tokens/s, ETA and a loss sparkline.
    ///
    /// A data-parallel job (a gang) also shows its ranks: `r1@5e6f7a8b 11 tok/s (step 40)`
    /// is rank 1 on worker 5e6f7a8b..., with its step when it differs from the job's.
    /// Exits 0 when the job succeeds, 1 when it fails or is cancelled.
    #[command(verbatim_doc_comment)]
    Watch {
        job: String,
        #[command(flatten)]
        conn: Conn,
    },
    /// Print a job's log lines (worker messages, checkpoints, failures).
    ///
    /// Example: lorafleet logs JOB --follow
    Logs {
        job: String,
        /// Keep printing new lines until the job ends.
        #[arg(long, short)]
        follow: bool,
        #[command(flatten)]
        conn: Conn,
    },
    /// Cancel a job (a running job stops within one worker heartbeat).
    Cancel {
        job: String,
        #[arg(long, default_value = "cancelled by user")]
        reason: String,
        #[command(flatten)]
        conn: Conn,
    },
    /// List a job's committed checkpoints.
    Checkpoints {
        job: String,
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        conn: Conn,
    },
    /// Download a finished job's PEFT adapter into a directory (sha256-verified).
    ///
    /// Example:
    ///   lorafleet fetch JOB -o out/adapter
    ///   lorafleet generate --model models/demo --adapter out/adapter --prompt "How do I reset my password?"
    #[command(verbatim_doc_comment)]
    Fetch {
        job: String,
        /// Destination directory (created if missing; files appear only once verified).
        #[arg(long, short)]
        output: PathBuf,
        #[command(flatten)]
        conn: Conn,
    },
    /// List registered workers and what they run.
    ///
    /// GANG shows the data-parallel jobs a worker is a member of: `6f1c2d3e[node 1/2]` is
    /// node 1 (0-based) of a job spanning 2 workers.
    #[command(verbatim_doc_comment)]
    Workers {
        /// Include workers whose registration expired.
        #[arg(long)]
        all: bool,
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        conn: Conn,
    },
    /// The coordinator's audit log (admin tokens only): every state-changing call
    /// (submit, cancel, upload, worker registration, attempt completion or failure) and
    /// every call refused for its token or role: who (token id), tenant, what, when and
    /// the outcome. Oldest first.
    ///
    /// Examples:
    ///   LORAFLEET_TOKEN=$ADMIN_TOKEN lorafleet audit
    ///   lorafleet audit --tenant acme --limit 50 --json
    ///   lorafleet audit --follow
    #[command(verbatim_doc_comment)]
    Audit {
        /// Only events after this sequence number.
        #[arg(long, default_value_t = 0)]
        after: u64,
        /// At most this many events (1-1000).
        #[arg(long, default_value_t = 100)]
        limit: u32,
        /// Only this tenant's events.
        #[arg(long)]
        tenant: Option<String>,
        /// Only the events of this token id.
        #[arg(long)]
        token_id: Option<String>,
        /// Keep printing new events as they come (polls every 2 s; Ctrl-C to stop).
        #[arg(long)]
        follow: bool,
        /// One JSON object per line.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        conn: Conn,
    },
    /// Run a coordinator, one or more CPU workers and file storage in this process.
    ///
    /// Everything lives under --dir (SQLite database, storage, worker caches). Then, in
    /// another terminal:
    ///   lorafleet demo-model --out models/demo
    ///   lorafleet submit examples/faq.yaml --watch
    ///   lorafleet fetch JOB -o out/adapter
    ///
    /// With --workers 2, a spec with `resources: { nodes: 2 }` runs as a gang of
    /// data-parallel ranks on both workers (see `lorafleet workers` and `status JOB`).
    #[command(verbatim_doc_comment)]
    Dev(dev::DevArgs),
}

pub fn run(c: RemoteCommand) -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build().context("starting the async runtime")?;
    rt.block_on(run_async(c))
}

async fn run_async(c: RemoteCommand) -> anyhow::Result<()> {
    match c {
        RemoteCommand::Submit { spec, watch, idempotency_key, json, conn } => {
            let mut client = connect(&conn).await?;
            let job = submit::submit(&mut client, &spec, idempotency_key).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&output::job_json(&job))?);
            } else {
                println!("{}", job.job_id);
            }
            if watch {
                watch::watch(&mut client, &job.job_id).await?;
            }
            Ok(())
        }
        RemoteCommand::Jobs { states, limit, json, conn } => {
            let mut client = connect(&conn).await?;
            let states = states.iter().map(|s| output::parse_state(s)).collect::<anyhow::Result<Vec<_>>>()?;
            let mut jobs = Vec::new();
            let mut token = String::new();
            loop {
                let r = client
                    .list_jobs(pb::ListJobsRequest { states: states.clone(), labels: Default::default(), page_size: limit.clamp(1, 1000), page_token: token })
                    .await
                    .map_err(status_err)?
                    .into_inner();
                jobs.extend(r.jobs);
                token = r.next_page_token;
                if token.is_empty() || jobs.len() >= limit as usize {
                    break;
                }
            }
            jobs.truncate(limit as usize);
            if json {
                println!("{}", serde_json::to_string_pretty(&jobs.iter().map(output::job_json).collect::<Vec<_>>())?);
            } else {
                output::print_jobs(&jobs);
            }
            Ok(())
        }
        RemoteCommand::Status { job, json, conn } => {
            let mut client = connect(&conn).await?;
            let j = client.get_job(pb::GetJobRequest { job_id: job }).await.map_err(status_err)?.into_inner();
            if json {
                println!("{}", serde_json::to_string_pretty(&output::job_json(&j))?);
            } else {
                output::print_job(&j);
            }
            Ok(())
        }
        RemoteCommand::Watch { job, conn } => watch::watch(&mut connect(&conn).await?, &job).await,
        RemoteCommand::Logs { job, follow, conn } => watch::logs(&mut connect(&conn).await?, &job, follow).await,
        RemoteCommand::Cancel { job, reason, conn } => {
            let mut client = connect(&conn).await?;
            let r = client.cancel_job(pb::CancelJobRequest { job_id: job, reason }).await.map_err(status_err)?.into_inner();
            let j = r.job.context("coordinator answered without the job")?;
            println!("{} {}", j.job_id, output::state_name(j.state));
            Ok(())
        }
        RemoteCommand::Checkpoints { job, json, conn } => {
            let mut client = connect(&conn).await?;
            let r = client.list_checkpoints(pb::ListCheckpointsRequest { job_id: job }).await.map_err(status_err)?.into_inner();
            if json {
                let v: Vec<_> = r
                    .checkpoints
                    .iter()
                    .map(|c| serde_json::json!({"step": c.step, "epoch": c.epoch, "attempt": c.attempt, "manifest_key": c.manifest_key, "created_at_unix_ms": c.created_at_unix_ms}))
                    .collect();
                println!("{}", serde_json::to_string_pretty(&v)?);
            } else if r.checkpoints.is_empty() {
                println!("no checkpoints");
            } else {
                println!("{:>8}  {:>5}  {:>7}  {:<19}  MANIFEST", "STEP", "EPOCH", "ATTEMPT", "CREATED");
                for c in &r.checkpoints {
                    println!("{:>8}  {:>5}  {:>7}  {:<19}  {}", c.step, c.epoch, c.attempt, output::time(c.created_at_unix_ms), c.manifest_key);
                }
            }
            Ok(())
        }
        RemoteCommand::Fetch { job, output, conn } => {
            let mut client = connect(&conn).await?;
            let files = fetch::fetch(&mut client, &job, &output).await?;
            for (name, size) in files {
                println!("{}  {} bytes", output.join(name).display(), size);
            }
            Ok(())
        }
        RemoteCommand::Workers { all, json, conn } => {
            let mut client = connect(&conn).await?;
            let r = client.list_workers(pb::ListWorkersRequest { include_dead: all }).await.map_err(status_err)?.into_inner();
            if json {
                println!("{}", serde_json::to_string_pretty(&r.workers.iter().map(output::worker_json).collect::<Vec<_>>())?);
            } else {
                output::print_workers(&r.workers);
            }
            Ok(())
        }
        RemoteCommand::Audit { after, limit, tenant, token_id, follow, json, conn } => {
            let (ch, token) = channel(&conn).await?;
            let mut client = pb::admin_service_client::AdminServiceClient::with_interceptor(ch, token);
            let mut after = after;
            let mut header = !json;
            loop {
                let r = pb::ListAuditEventsRequest { after_seq: after, limit, tenant: tenant.clone().unwrap_or_default(), token_id: token_id.clone().unwrap_or_default() };
                let events = client.list_audit_events(r).await.map_err(status_err)?.into_inner().events;
                if let Some(e) = events.last() {
                    after = e.seq;
                }
                output::print_audit(&events, json, std::mem::take(&mut header));
                if !follow {
                    return Ok(());
                }
                if events.len() < limit as usize {
                    tokio::time::sleep(std::time::Duration::from_secs(2)).await;
                }
            }
        }
        RemoteCommand::Dev(a) => dev::run(a).await,
    }
}

pub(crate) async fn connect(conn: &Conn) -> anyhow::Result<JobServiceClient<AuthChannel>> {
    let (ch, token) = channel(conn).await?;
    Ok(JobServiceClient::with_interceptor(ch, token).max_decoding_message_size(64 * 1024 * 1024))
}

/// A connection to the coordinator and the caller's token.
async fn channel(conn: &Conn) -> anyhow::Result<(tonic::transport::Channel, lorafleet_proto::connect::BearerToken)> {
    let tls = lorafleet_proto::connect::ClientTls { ca: conn.ca.clone(), ..Default::default() };
    let ep = lorafleet_proto::connect::endpoint(&conn.coordinator, &tls).map_err(|e| anyhow::anyhow!("--coordinator: {e}"))?;
    let ch = ep.connect().await.map_err(|e| {
        anyhow::anyhow!("cannot reach the coordinator at {}: {} (start one with `lorafleet dev`, or set --coordinator / LORAFLEET_COORDINATOR)", conn.coordinator, source_msg(&e))
    })?;
    let token = lorafleet_proto::connect::BearerToken::new(conn.token.as_deref()).map_err(anyhow::Error::msg)?;
    Ok((ch, token))
}

fn source_msg(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s = c.to_string();
        cur = c.source();
    }
    s
}

/// One clear line for a server error: `invalid argument: lora.r: must be ...`.
pub(crate) fn status_err(s: tonic::Status) -> anyhow::Error {
    let code = match s.code() {
        tonic::Code::InvalidArgument => "invalid argument",
        tonic::Code::NotFound => "not found",
        tonic::Code::AlreadyExists => "already exists",
        tonic::Code::FailedPrecondition => "failed precondition",
        tonic::Code::Unavailable => "coordinator unavailable",
        tonic::Code::PermissionDenied => "permission denied",
        tonic::Code::Unauthenticated => "not authenticated",
        tonic::Code::ResourceExhausted => "resource exhausted",
        tonic::Code::DeadlineExceeded => "deadline exceeded",
        _ => "server error",
    };
    anyhow::anyhow!("{code}: {}", s.message().lines().next().unwrap_or(""))
}

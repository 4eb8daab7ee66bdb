//! `WorkerService`: what workers call. Every call about a job carries its lease epoch;
//! the control loop refuses stale ones.

use super::{check_attempt_key, publish_adapter, Shared};
use crate::control::{NewWorker, WorkerCall};
use crate::error::CoordError;
use crate::persistence::DeviceInfo;
use lorafleet_proto as pb;
use lorafleet_proto::convert::{device_kind_from_pb, failure_class_from_pb, parse_epoch, parse_job_id, parse_worker_id, state_to_pb};
use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;
use lorafleet_shared::job::JobState;
use tonic::{Request, Response, Status};
use tracing::{info, warn};

const MAX_LOG_LINES_PER_CALL: usize = 10_000;
const MAX_LOG_LINE_CHARS: usize = 16 * 1024;
const MAX_METRICS_PER_CALL: usize = 10_000;

pub struct WorkerSvc {
    pub(crate) shared: Arc<Shared>,
}

fn call(job_id: &str, epoch: u64, worker_id: &str) -> Result<WorkerCall, CoordError> {
    Ok(WorkerCall {
        job_id: parse_job_id("job_id", job_id)?,
        epoch: parse_epoch("epoch", epoch)?,
        worker: parse_worker_id("worker_id", worker_id)?,
    })
}

fn text(field: &str, s: &str, max: usize) -> Result<(), CoordError> {
    if s.len() > max || s.contains('\0') {
        return Err(CoordError::InvalidArgument(format!("{field}: at most {max} bytes, no NUL")));
    }
    Ok(())
}

impl WorkerSvc {
    async fn register(&self, req: Request<pb::RegisterWorkerRequest>) -> Result<Response<pb::RegisterWorkerResponse>, Status> {
        let token = super::caller(&req);
        let req = req.into_inner();
        if let Some(t) = token.as_ref().filter(|t| !t.labels.is_empty()) {
            for (k, v) in &t.labels {
                if req.labels.get(k) != Some(v) {
                    return Err(CoordError::PermissionDenied(format!(
                        "labels.{k}: token {:?} registers only workers labelled {k}={v:?}, this one has {:?}",
                        t.id,
                        req.labels.get(k).map(String::as_str).unwrap_or("no such label")
                    ))
                    .into());
                }
            }
        }
        text("storage_url", &req.storage_url, 1024)?;
        if !req.storage_marker.is_empty() && req.storage_marker != self.shared.storage_marker {
            let theirs = if req.storage_url.is_empty() { "its storage".to_string() } else { req.storage_url.clone() };
            return Err(CoordError::FailedPrecondition(format!(
                "storage: the worker's storage {theirs} is not this coordinator's {} (it shows another coordinator's marker at {}): start the worker without --storage to use the coordinator's, or give it the same location and credentials",
                self.shared.storage.public_url(),
                lorafleet_storage::layout::coordinator_marker()
            ))
            .into());
        }
        if req.name.is_empty() {
            return Err(CoordError::InvalidArgument("name: missing".into()).into());
        }
        text("name", &req.name, 128)?;
        text("version", &req.version, 128)?;
        if req.devices.is_empty() {
            return Err(CoordError::InvalidArgument("devices: at least one device is required".into()).into());
        }
        let mut seen = HashSet::new();
        let mut devices = Vec::with_capacity(req.devices.len());
        for (i, d) in req.devices.into_iter().enumerate() {
            let kind = device_kind_from_pb(&format!("devices[{i}].kind"), d.kind).map_err(CoordError::from)?;
            if !seen.insert(d.index) {
                return Err(CoordError::InvalidArgument(format!("devices[{i}].index: duplicate index {}", d.index)).into());
            }
            text(&format!("devices[{i}].name"), &d.name, 256)?;
            devices.push(DeviceInfo { kind, index: d.index, name: d.name, memory_mib: d.memory_mib });
        }
        for (k, v) in &req.labels {
            text("labels", k, 63)?;
            text(&format!("labels.{k}"), v, 256)?;
        }
        let worker = NewWorker { name: req.name, devices, labels: req.labels.into_iter().collect(), version: req.version };
        let id = self.shared.control.register(worker).await?;
        let cfg = &self.shared.control.config;
        Ok(Response::new(pb::RegisterWorkerResponse {
            worker_id: id.to_string(),
            lease_ttl_secs: cfg.lease_ttl.as_secs().max(1) as u32,
            heartbeat_interval_secs: cfg.heartbeat_interval.as_secs().max(1) as u32,
        }))
    }

    async fn complete(&self, req: Request<pb::CompleteAttemptRequest>) -> Result<Response<pb::CompleteAttemptResponse>, Status> {
        let req = req.into_inner();
        let c = call(&req.job_id, req.epoch, &req.worker_id)?;
        check_attempt_key("adapter_manifest_key", &c.job_id, req.epoch, &req.adapter_manifest_key)?;
        let job_id = c.job_id;
        let state = self.shared.control.complete(c, req.adapter_manifest_key.clone(), req.final_loss).await?;
        if state == JobState::Succeeded {
            // Durably succeeded: publish the adapter under jobs/<job>/adapter/. Off the
            // reply path; if it fails (or the coordinator dies first), DownloadAdapter
            // publishes it on first use.
            let storage = self.shared.storage.clone();
            tokio::spawn(async move {
                match publish_adapter(&storage, &job_id, &req.adapter_manifest_key).await {
                    Ok((dir, _)) => info!(job_id = %job_id, adapter = %dir, "adapter published"),
                    Err(e) => warn!(job_id = %job_id, error = %e, "could not publish the adapter yet (retried on download)"),
                }
            });
        }
        Ok(Response::new(pb::CompleteAttemptResponse { state: state_to_pb(state) as i32 }))
    }

    async fn fail(&self, req: Request<pb::FailAttemptRequest>) -> Result<Response<pb::FailAttemptResponse>, Status> {
        let req = req.into_inner();
        let c = call(&req.job_id, req.epoch, &req.worker_id)?;
        let class = failure_class_from_pb("failure_class", req.failure_class).map_err(CoordError::from)?;
        let reason: String = req.reason.chars().take(4096).collect();
        let state = self.shared.control.fail(c, class, reason).await?;
        Ok(Response::new(pb::FailAttemptResponse { state: state_to_pb(state) as i32 }))
    }
}

#[tonic::async_trait]
impl pb::worker_service_server::WorkerService for WorkerSvc {
    async fn get_storage(&self, _req: Request<pb::GetStorageRequest>) -> Result<Response<pb::GetStorageResponse>, Status> {
        Ok(Response::new(pb::GetStorageResponse {
            storage_url: self.shared.storage.public_url(),
            marker_key: lorafleet_storage::layout::coordinator_marker().to_string(),
            marker: self.shared.storage_marker.clone(),
        }))
    }

    async fn register_worker(&self, req: Request<pb::RegisterWorkerRequest>) -> Result<Response<pb::RegisterWorkerResponse>, Status> {
        let who = super::caller(&req);
        let r = self.register(req).await;
        self.shared.audit.outcome(who.as_deref(), "lorafleet.v1.WorkerService/RegisterWorker", "", |r: &Response<pb::RegisterWorkerResponse>| r.get_ref().worker_id.clone(), r)
    }

    async fn complete_attempt(&self, req: Request<pb::CompleteAttemptRequest>) -> Result<Response<pb::CompleteAttemptResponse>, Status> {
        let who = super::caller(&req);
        let target = req.get_ref().job_id.chars().take(64).collect::<String>();
        let r = self.complete(req).await;
        self.shared.audit.outcome(who.as_deref(), "lorafleet.v1.WorkerService/CompleteAttempt", &target, |_| String::new(), r)
    }

    async fn fail_attempt(&self, req: Request<pb::FailAttemptRequest>) -> Result<Response<pb::FailAttemptResponse>, Status> {
        let who = super::caller(&req);
        let target = req.get_ref().job_id.chars().take(64).collect::<String>();
        let r = self.fail(req).await;
        self.shared.audit.outcome(who.as_deref(), "lorafleet.v1.WorkerService/FailAttempt", &target, |_| String::new(), r)
    }

    async fn heartbeat(&self, req: Request<pb::HeartbeatRequest>) -> Result<Response<pb::HeartbeatResponse>, Status> {
        let req = req.into_inner();
        let worker = parse_worker_id("worker_id", &req.worker_id).map_err(CoordError::from)?;
        let running = req
            .running
            .iter()
            .enumerate()
            .map(|(i, r)| Ok((parse_job_id(&format!("running[{i}].job_id"), &r.job_id)?, parse_epoch(&format!("running[{i}].epoch"), r.epoch)?)))
            .collect::<Result<Vec<_>, lorafleet_proto::convert::ConvertError>>()
            .map_err(CoordError::from)?;
        let directives = self.shared.control.heartbeat(worker, running).await?;
        Ok(Response::new(pb::HeartbeatResponse { directives }))
    }

    async fn acquire_job(&self, req: Request<pb::AcquireJobRequest>) -> Result<Response<pb::AcquireJobResponse>, Status> {
        let req = req.into_inner();
        let worker = parse_worker_id("worker_id", &req.worker_id).map_err(CoordError::from)?;
        let lease = self.shared.control.acquire(worker, Duration::from_secs(req.wait_secs as u64)).await?;
        Ok(Response::new(pb::AcquireJobResponse { lease }))
    }

    async fn report_progress(&self, req: Request<pb::ReportProgressRequest>) -> Result<Response<pb::ReportProgressResponse>, Status> {
        let req = req.into_inner();
        let c = call(&req.job_id, req.epoch, &req.worker_id)?;
        if req.steps.len() + req.evals.len() > MAX_METRICS_PER_CALL {
            return Err(CoordError::InvalidArgument(format!("steps: at most {MAX_METRICS_PER_CALL} metrics per call")).into());
        }
        if req.logs.len() > MAX_LOG_LINES_PER_CALL {
            return Err(CoordError::InvalidArgument(format!("logs: at most {MAX_LOG_LINES_PER_CALL} lines per call")).into());
        }
        let logs = req
            .logs
            .into_iter()
            .map(|mut l| {
                if l.message.len() > MAX_LOG_LINE_CHARS {
                    l.message = l.message.chars().take(MAX_LOG_LINE_CHARS).collect();
                }
                l.level.truncate(16);
                l
            })
            .collect();
        if req.ranks.len() > MAX_METRICS_PER_CALL {
            return Err(CoordError::InvalidArgument(format!("ranks: at most {MAX_METRICS_PER_CALL} per call")).into());
        }
        let cancel = self.shared.control.progress(c, req.steps, req.evals, logs, req.ranks).await?;
        Ok(Response::new(pb::ReportProgressResponse { cancel }))
    }

    async fn commit_checkpoint(&self, req: Request<pb::CommitCheckpointRequest>) -> Result<Response<pb::CommitCheckpointResponse>, Status> {
        let req = req.into_inner();
        let c = call(&req.job_id, req.epoch, &req.worker_id)?;
        check_attempt_key("manifest_key", &c.job_id, req.epoch, &req.manifest_key)?;
        let cancel = self.shared.control.checkpoint(c, req.step, req.manifest_key).await?;
        Ok(Response::new(pb::CommitCheckpointResponse { cancel }))
    }

    async fn rendezvous(&self, req: Request<pb::RendezvousRequest>) -> Result<Response<pb::RendezvousResponse>, Status> {
        let req = req.into_inner();
        let c = call(&req.job_id, req.epoch, &req.worker_id)?;
        if req.endpoints.len() > 1024 {
            return Err(CoordError::InvalidArgument("endpoints: at most 1024".into()).into());
        }
        Ok(Response::new(self.shared.control.rendezvous(c, req.endpoints, req.nccl_unique_id).await?))
    }
}

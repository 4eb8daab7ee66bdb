//! The heartbeat task: runs on its own tokio task at the coordinator's interval and
//! never waits for training (which runs on its own thread). It reports the running job
//! with its epoch and applies the answer: CANCEL or ABANDON stop the job.

use crate::{is_transient, Worker};
use lorafleet_proto as pb;
use std::time::Duration;
use tracing::{debug, warn};

pub async fn run(w: Worker) {
    loop {
        let interval = w.shared.heartbeat_interval();
        tokio::time::sleep(interval).await;
        beat(&w, interval).await;
    }
}

/// One heartbeat (public for tests).
pub async fn beat(w: &Worker, timeout: Duration) {
    let running = w.shared.running();
    let asked_as = w.shared.worker_id();
    let mut req = tonic::Request::new(pb::HeartbeatRequest {
        worker_id: asked_as.clone(),
        running: running.iter().map(|c| pb::RunningJob { job_id: c.job_id.clone(), epoch: c.epoch }).collect(),
    });
    let timeout = timeout.max(Duration::from_secs(1));
    req.set_timeout(timeout);
    // The grpc-timeout above is not applied while the channel waits for a connection;
    // this bound is, so a heartbeat never hangs on a dead link.
    let answer = tokio::time::timeout(timeout, w.client.clone().heartbeat(req)).await;
    match answer.unwrap_or_else(|_| Err(tonic::Status::deadline_exceeded("no answer"))) {
        Ok(resp) => {
            for d in resp.into_inner().directives {
                let Some(c) = running.iter().find(|c| c.job_id == d.job_id && c.epoch == d.epoch) else { continue };
                match pb::JobAction::try_from(d.action) {
                    Ok(pb::JobAction::Cancel) => c.cancel(),
                    Ok(pb::JobAction::Abandon) => c.abandon("heartbeat: lease gone"),
                    Ok(pb::JobAction::Continue) => debug!(job_id = %c.job_id, "lease renewed"),
                    _ => warn!(job_id = %c.job_id, action = d.action, "unknown heartbeat directive"),
                }
            }
        }
        Err(s) if s.code() == tonic::Code::NotFound => {
            warn!(error = %s.message(), "coordinator does not know this worker; registering again");
            if let Err(e) = w.reregister(&asked_as).await {
                warn!(error = %e, "re-registration failed");
            }
        }
        Err(s) if is_transient(&s) => warn!(code = ?s.code(), error = %s.message(), "heartbeat failed; will retry"),
        Err(s) => warn!(code = ?s.code(), error = %s.message(), "heartbeat refused"),
    }
}

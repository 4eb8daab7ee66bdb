//! The audit log: one record per state-changing call (SubmitJob, CancelJob,
//! UploadDataset, RegisterWorker, CompleteAttempt, FailAttempt) and per call refused for
//! its token or role, whatever the method: who (the token's id, never the token), role,
//! tenant, method, target, when, outcome.
//!
//! Written to a table of the database (append-only: triggers refuse updates and
//! deletes; read with `lorafleet audit`, AdminService) and, with `--audit-log FILE`, as
//! JSON lines appended to a file (mode 0600) for a log shipper. Heartbeats, progress
//! reports, checkpoints and lease grants are not audited: they are the lease's own
//! reports, and their effects are the job's events. Calls without a known token are
//! recorded at most 20 a second (bursts of 200): a flood of them cannot fill the log.

use crate::auth::Identity;
use crate::control::ControlHandle;
use crate::persistence::AuditRow;
use std::io::Write;
use std::path::Path;
use std::sync::{Arc, Mutex};
use tracing::warn;

pub struct Audit {
    file: Option<Mutex<std::fs::File>>,
    control: ControlHandle,
    /// Calls without a known token are recorded at most [`ANONYMOUS_PER_SEC`] a second
    /// (bursts of [`ANONYMOUS_BURST`]), so that a flood of them cannot fill the log; all
    /// are counted in `lorafleet_refused_calls_total`.
    anonymous: Mutex<(f64, std::time::Instant)>,
}

pub const ANONYMOUS_PER_SEC: f64 = 20.0;
pub const ANONYMOUS_BURST: f64 = 200.0;

impl Audit {
    /// Open the sink: the database through the control loop, and `file` if given.
    pub fn open(file: Option<&Path>, control: ControlHandle) -> Result<Arc<Self>, String> {
        let file = match file {
            Some(p) => {
                let mut o = std::fs::OpenOptions::new();
                o.create(true).append(true);
                #[cfg(unix)]
                {
                    use std::os::unix::fs::OpenOptionsExt;
                    o.mode(0o600);
                }
                Some(Mutex::new(o.open(p).map_err(|e| format!("--audit-log {}: {e}", p.display()))?))
            }
            None => None,
        };
        Ok(Arc::new(Self { file, control, anonymous: Mutex::new((ANONYMOUS_BURST, std::time::Instant::now())) }))
    }

    /// Record one call. `who` is None for a call without a known token.
    pub fn record(&self, who: Option<&Identity>, method: &str, target: &str, outcome: tonic::Code, detail: &str) {
        if who.is_none() {
            let mut b = self.anonymous.lock().unwrap_or_else(|e| e.into_inner());
            let now = std::time::Instant::now();
            b.0 = (b.0 + now.duration_since(b.1).as_secs_f64() * ANONYMOUS_PER_SEC).min(ANONYMOUS_BURST);
            b.1 = now;
            if b.0 < 1.0 {
                return;
            }
            b.0 -= 1.0;
        }
        let (token_id, role, tenant) = match who {
            Some(w) => (w.id.clone(), w.role.as_str().to_string(), w.tenant.clone().unwrap_or_default()),
            None => ("?".to_string(), String::new(), String::new()),
        };
        let outcome = if outcome == tonic::Code::Ok { "OK".to_string() } else { code_name(outcome).to_string() };
        let row = AuditRow {
            seq: 0,
            unix_ms: crate::control::unix_ms(),
            token_id,
            role,
            tenant,
            method: method.to_string(),
            target: target.to_string(),
            outcome,
            detail: detail.chars().take(1024).collect(),
        };
        if let Some(f) = &self.file {
            let mut line = serde_json::to_vec(&row).unwrap_or_default();
            line.push(b'\n');
            let mut f = f.lock().unwrap_or_else(|e| e.into_inner());
            if let Err(e) = f.write_all(&line).and_then(|_| f.flush()) {
                warn!(error = %e, "cannot append to the audit log file");
            }
        }
        self.control.audit(row);
    }

    /// Record the outcome of a handler's call and pass it on: the target is `known`, or
    /// what `from_reply` finds in a successful reply.
    pub fn outcome<T>(
        &self,
        who: Option<&Identity>,
        method: &str,
        known: &str,
        from_reply: impl FnOnce(&T) -> String,
        r: Result<T, tonic::Status>,
    ) -> Result<T, tonic::Status> {
        match &r {
            Ok(v) if known.is_empty() => self.record(who, method, &from_reply(v), tonic::Code::Ok, ""),
            Ok(_) => self.record(who, method, known, tonic::Code::Ok, ""),
            Err(s) => self.record(who, method, known, s.code(), s.message()),
        }
        r
    }
}

/// The gRPC name of a status code (`PERMISSION_DENIED`).
pub fn code_name(c: tonic::Code) -> &'static str {
    use tonic::Code::*;
    match c {
        Ok => "OK",
        Cancelled => "CANCELLED",
        Unknown => "UNKNOWN",
        InvalidArgument => "INVALID_ARGUMENT",
        DeadlineExceeded => "DEADLINE_EXCEEDED",
        NotFound => "NOT_FOUND",
        AlreadyExists => "ALREADY_EXISTS",
        PermissionDenied => "PERMISSION_DENIED",
        ResourceExhausted => "RESOURCE_EXHAUSTED",
        FailedPrecondition => "FAILED_PRECONDITION",
        Aborted => "ABORTED",
        OutOfRange => "OUT_OF_RANGE",
        Unimplemented => "UNIMPLEMENTED",
        Internal => "INTERNAL",
        Unavailable => "UNAVAILABLE",
        DataLoss => "DATA_LOSS",
        Unauthenticated => "UNAUTHENTICATED",
    }
}

//! The coordinator's one error type, and its one mapping to `tonic::Status`.

use lorafleet_proto::convert::ConvertError;
use lorafleet_shared::ids::{Epoch, JobId};

pub type Result<T, E = CoordError> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum CoordError {
    /// A request field is malformed; the message starts with the field path.
    #[error("{0}")]
    InvalidArgument(String),
    #[error("{what} not found: {id}")]
    NotFound { what: &'static str, id: String },
    /// The same idempotency key was used with a different spec.
    #[error("idempotency key {key:?} was already used for job {job_id} with a different spec")]
    IdempotencyConflict { key: String, job_id: JobId },
    /// A worker call whose epoch is not the job's live lease.
    #[error("stale epoch {got} for job {job_id}: {why}")]
    StaleEpoch { job_id: JobId, got: Epoch, why: String },
    /// The request is valid but the job's state does not allow it.
    #[error("{0}")]
    FailedPrecondition(String),
    /// The durable store failed; the write was not acknowledged.
    #[error("store error: {0}")]
    Store(#[from] rusqlite::Error),
    #[error("object storage error: {0}")]
    Storage(String),
    #[error("coordinator is shutting down")]
    ShuttingDown,
    /// A policy of this coordinator refuses the request (nothing was changed).
    #[error("{0}")]
    PermissionDenied(String),
    /// A quota or limit refuses the call (nothing was changed).
    #[error("{0}")]
    ResourceExhausted(String),
    /// Nothing was changed; the same call may succeed if retried.
    #[error("{0}")]
    Unavailable(String),
    #[error("internal error: {0}")]
    Internal(String),
}

impl From<ConvertError> for CoordError {
    fn from(e: ConvertError) -> Self {
        CoordError::InvalidArgument(e.to_string())
    }
}

impl From<CoordError> for tonic::Status {
    fn from(e: CoordError) -> Self {
        use tonic::Code;
        let code = match &e {
            CoordError::InvalidArgument(_) => Code::InvalidArgument,
            CoordError::NotFound { .. } => Code::NotFound,
            CoordError::IdempotencyConflict { .. } => Code::AlreadyExists,
            CoordError::StaleEpoch { .. } | CoordError::FailedPrecondition(_) => Code::FailedPrecondition,
            CoordError::Store(_) | CoordError::Storage(_) | CoordError::ShuttingDown | CoordError::Unavailable(_) => Code::Unavailable,
            CoordError::ResourceExhausted(_) => Code::ResourceExhausted,
            CoordError::PermissionDenied(_) => Code::PermissionDenied,
            CoordError::Internal(_) => Code::Internal,
        };
        tonic::Status::new(code, e.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes() {
        let j = JobId::new();
        let s: tonic::Status = CoordError::StaleEpoch { job_id: j, got: Epoch(1), why: "current epoch is 2".into() }.into();
        assert_eq!(s.code(), tonic::Code::FailedPrecondition);
        assert_eq!(s.message(), format!("stale epoch 1 for job {j}: current epoch is 2"));
        let s: tonic::Status = CoordError::IdempotencyConflict { key: "k".into(), job_id: j }.into();
        assert_eq!(s.code(), tonic::Code::AlreadyExists);
        let s: tonic::Status = CoordError::InvalidArgument("lora.r: bad".into()).into();
        assert_eq!(s.code(), tonic::Code::InvalidArgument);
        let s: tonic::Status = CoordError::Store(rusqlite::Error::InvalidQuery).into();
        assert_eq!(s.code(), tonic::Code::Unavailable);
    }
}

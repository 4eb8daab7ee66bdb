//! `AdminService`: what only admin tokens may call (the interceptor checks the role).

use super::Shared;
use crate::error::CoordError;
use crate::persistence as db;
use lorafleet_proto as pb;
use std::sync::Arc;
use tonic::{Request, Response, Status};

pub struct AdminSvc {
    pub(crate) shared: Arc<Shared>,
}

#[tonic::async_trait]
impl pb::admin_service_server::AdminService for AdminSvc {
    async fn list_audit_events(&self, req: Request<pb::ListAuditEventsRequest>) -> Result<Response<pb::ListAuditEventsResponse>, Status> {
        let r = req.into_inner();
        let limit = match r.limit {
            0 => 100,
            n if n <= 1000 => n,
            n => return Err(CoordError::InvalidArgument(format!("limit: must be at most 1000, got {n}")).into()),
        };
        let tenant = Some(r.tenant).filter(|t| !t.is_empty());
        let token = Some(r.token_id).filter(|t| !t.is_empty());
        let rows = self.shared.readers.run(move |c| db::audit_after(c, r.after_seq, limit, tenant.as_deref(), token.as_deref())).await?;
        let events = rows
            .into_iter()
            .map(|a| pb::AuditEvent {
                seq: a.seq,
                unix_ms: a.unix_ms,
                token_id: a.token_id,
                role: a.role,
                tenant: a.tenant,
                method: a.method,
                target: a.target,
                outcome: a.outcome,
                detail: a.detail,
            })
            .collect();
        Ok(Response::new(pb::ListAuditEventsResponse { events }))
    }
}

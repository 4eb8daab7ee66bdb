//! `JobService`: what users call.

use super::{check_remote_spec, job_to_pb, Shared};
use crate::error::{CoordError, Result};
use crate::persistence as db;
use lorafleet_proto as pb;
use lorafleet_proto::convert::{parse_job_id, spec_from_pb, state_from_pb};
use lorafleet_shared::job::JobState;
use lorafleet_storage::{layout, RelPath, Sha256Hex};
use prost::Message;
use sha2::{Digest, Sha256};
use std::pin::Pin;
use std::sync::Arc;
use tokio::io::AsyncWriteExt;
use tokio::sync::{broadcast, mpsc};
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::StreamExt;
use tonic::{Request, Response, Status, Streaming};
use tracing::{info, warn};

type Stream<T> = Pin<Box<dyn tokio_stream::Stream<Item = Result<T, Status>> + Send + 'static>>;

const ADAPTER_CHUNK: usize = 256 * 1024;

pub struct JobSvc {
    pub(crate) shared: Arc<Shared>,
}

fn is_final_event(e: &pb::JobEvent) -> bool {
    match &e.event {
        Some(pb::job_event::Event::StateChange(sc)) => {
            matches!(pb::JobState::try_from(sc.to), Ok(pb::JobState::Succeeded | pb::JobState::Failed | pb::JobState::Cancelled))
        }
        _ => false,
    }
}

/// The tenant a caller is confined to: a user token's tenant; `None` (everything) for an
/// admin token or when the coordinator runs without --auth.
fn scope<T>(req: &Request<T>) -> Option<String> {
    let who = super::caller(req)?;
    match who.role {
        crate::auth::Role::Admin => None,
        _ => Some(who.tenant.clone().unwrap_or_default()),
    }
}

/// The tenant a caller's submissions belong to (its token's, admins' included).
fn tenant_of<T>(req: &Request<T>) -> Option<String> {
    super::caller(req).and_then(|w| w.tenant.clone())
}

/// Another tenant's job is not found (its existence is not revealed).
fn visible(row: &db::JobRow, scope: &Option<String>) -> bool {
    scope.as_ref().is_none_or(|t| row.tenant.as_deref() == Some(t.as_str()))
}

impl JobSvc {
    async fn submit(&self, req: Request<pb::SubmitJobRequest>) -> Result<Response<pb::SubmitJobResponse>, Status> {
        let tenant = tenant_of(&req);
        let scope = scope(&req);
        let req = req.into_inner();
        let spec = req.spec.ok_or_else(|| CoordError::InvalidArgument("spec: missing".into()))?;
        let mut spec = spec_from_pb(spec).map_err(CoordError::from)?;
        spec.validate(lorafleet_shared::SpecContext::Remote).map_err(|e| CoordError::InvalidArgument(e.to_string()))?;
        check_remote_spec(&spec)?;
        // Idempotency compares the spec as sent, before the policy pins anything in it.
        let submitted_hash = db::spec_hash(&spec);
        let notes = match self.shared.models.apply(&mut spec).await {
            Ok(n) => n,
            Err(e) => {
                if matches!(e, CoordError::PermissionDenied(_)) {
                    self.shared.metrics.refused("model_policy");
                }
                return Err(e.into());
            }
        };
        if let Some(t) = scope {
            let refs: Vec<(&'static str, String)> =
                [("data.train", Some(spec.data.train.clone())), ("data.eval", spec.data.eval.clone())].into_iter().filter_map(|(f, v)| Some((f, v?))).collect();
            for (field, r) in refs {
                let Some(Ok(sha)) = lorafleet_storage::parse_dataset_ref(&r) else { continue };
                let (t2, sha_s) = (t.clone(), sha.to_string());
                if !self.shared.readers.run(move |c| db::tenant_has_dataset(c, &t2, &sha_s)).await? {
                    return Err(CoordError::InvalidArgument(format!("{field}: dataset {r} was not uploaded by this tenant (upload it with `lorafleet submit`)")).into());
                }
            }
        }
        let key = match req.idempotency_key.as_str() {
            "" => None,
            k if k.len() > 256 || k.chars().any(|c| c.is_control()) => {
                return Err(CoordError::InvalidArgument("idempotency_key: at most 256 printable characters".into()).into())
            }
            k => Some(k.to_string()),
        };
        let note = if notes.is_empty() { String::new() } else { format!("submitted ({})", notes.join("; ")) };
        let new = crate::control::NewJob { spec, key, tenant, submitted_hash: Some(submitted_hash), note };
        let out = self.shared.control.submit_new(new).await?;
        Ok(Response::new(pb::SubmitJobResponse { job: Some(job_to_pb(&out.job)), created: out.created }))
    }

    async fn upload(&self, req: Request<Streaming<pb::UploadDatasetRequest>>) -> Result<Response<pb::UploadDatasetResponse>, Status> {
        use pb::upload_dataset_request::Part;
        let scope = scope(&req);
        let _slot = self.stream_slot(&req)?;
        let mut stream = req.into_inner();
        let header = match stream.next().await {
            Some(Ok(pb::UploadDatasetRequest { part: Some(Part::Header(h)) })) => h,
            Some(Ok(_)) => return Err(CoordError::InvalidArgument("header: the first message must carry the header".into()).into()),
            Some(Err(e)) => return Err(e),
            None => return Err(CoordError::InvalidArgument("header: missing".into()).into()),
        };
        let name_ok = !header.file_name.is_empty()
            && header.file_name.len() <= 255
            && !header.file_name.contains(['/', '\\', '\0'])
            && header.file_name != ".."
            && header.file_name != ".";
        if !name_ok {
            return Err(CoordError::InvalidArgument(format!("header.file_name: must be a plain file name, got {:?}", header.file_name)).into());
        }
        let max = self.shared.guards.limits.max_upload_bytes;
        if header.size > max {
            return Err(CoordError::ResourceExhausted(format!("header.size: {} bytes is more than this coordinator accepts (--max-upload-bytes {max})", header.size)).into());
        }
        let expected_sha = match header.sha256.as_str() {
            "" => None,
            s => Some(Sha256Hex::parse(s).map_err(|e| CoordError::InvalidArgument(format!("header.sha256: {e}")))?),
        };
        let tmp = tempfile::Builder::new().prefix("lorafleet-upload-").tempdir().map_err(|e| CoordError::Internal(e.to_string()))?;
        let path = tmp.path().join("data");
        let mut f = tokio::fs::File::create(&path).await.map_err(|e| CoordError::Internal(format!("temp file: {e}")))?;
        let mut hasher = Sha256::new();
        let mut size = 0u64;
        while let Some(msg) = stream.next().await {
            match msg?.part {
                Some(Part::Data(d)) => {
                    size += d.len() as u64;
                    if size > header.size {
                        return Err(CoordError::InvalidArgument(format!("data: more than the {} bytes announced", header.size)).into());
                    }
                    hasher.update(&d);
                    f.write_all(&d).await.map_err(|e| CoordError::Internal(format!("temp file: {e}")))?;
                }
                Some(Part::Header(_)) => return Err(CoordError::InvalidArgument("header: sent twice".into()).into()),
                None => {}
            }
        }
        f.flush().await.map_err(|e| CoordError::Internal(format!("temp file: {e}")))?;
        drop(f);
        if size != header.size {
            return Err(CoordError::InvalidArgument(format!("data: received {size} bytes, header announced {}", header.size)).into());
        }
        let sha = Sha256Hex::from_digest(&hasher.finalize());
        if expected_sha.as_ref().is_some_and(|e| e != &sha) {
            return Err(CoordError::InvalidArgument(format!("header.sha256: content has sha256 {sha}")).into());
        }
        let storage = &self.shared.storage;
        let existed = storage.size(&layout::dataset(&sha)).await.map_err(storage_err)? == Some(size);
        let (stored_sha, _) = storage.put_dataset_file(&path).await.map_err(storage_err)?;
        if stored_sha != sha {
            return Err(CoordError::Internal("dataset changed while uploading".into()).into());
        }
        // Datasets are stored once, but a tenant may only name the ones it uploaded itself
        // (so one tenant cannot train on, or probe for, another's data by its hash).
        let existed = match scope {
            Some(t) => self.shared.control.tenant_dataset(t, sha.to_string()).await?,
            None => existed,
        };
        let dataset_ref = lorafleet_storage::cache::dataset_ref(&sha);
        info!(dataset = %dataset_ref, bytes = size, file_name = %header.file_name, already_existed = existed, "dataset uploaded");
        Ok(Response::new(pb::UploadDatasetResponse { dataset_ref, sha256: sha.to_string(), size, already_existed: existed }))
    }

    /// A stream slot of the caller (per-token limit).
    fn stream_slot<T>(&self, req: &Request<T>) -> Result<Option<crate::limits::StreamSlot>, Status> {
        let who = super::caller(req);
        self.shared.guards.stream(who.as_deref()).inspect_err(|_| self.shared.metrics.refused("streams"))
    }

    async fn get_row(&self, id: lorafleet_shared::ids::JobId, scope: &Option<String>) -> Result<db::JobRow> {
        self.shared
            .readers
            .run(move |c| db::get_job(c, &id))
            .await?
            .filter(|r| visible(r, scope))
            .ok_or(CoordError::NotFound { what: "job", id: id.to_string() })
    }
}

#[tonic::async_trait]
impl pb::job_service_server::JobService for JobSvc {
    async fn submit_job(&self, req: Request<pb::SubmitJobRequest>) -> Result<Response<pb::SubmitJobResponse>, Status> {
        let who = super::caller(&req);
        let r = self.submit(req).await;
        self.shared.audit.outcome(who.as_deref(), "lorafleet.v1.JobService/SubmitJob", "", |r: &Response<pb::SubmitJobResponse>| r.get_ref().job.as_ref().map(|j| j.job_id.clone()).unwrap_or_default(), r)
    }

    async fn get_job(&self, req: Request<pb::GetJobRequest>) -> Result<Response<pb::Job>, Status> {
        let scope = scope(&req);
        let id = parse_job_id("job_id", &req.into_inner().job_id).map_err(CoordError::from)?;
        let (row, ranks) = self
            .shared
            .readers
            .run(move |c| Ok((db::get_job(c, &id)?, db::job_ranks(c, &id)?)))
            .await?;
        let row = row.filter(|r| visible(r, &scope)).ok_or(CoordError::NotFound { what: "job", id: id.to_string() })?;
        let mut job = job_to_pb(&row);
        job.ranks = ranks;
        Ok(Response::new(job))
    }

    async fn list_jobs(&self, req: Request<pb::ListJobsRequest>) -> Result<Response<pb::ListJobsResponse>, Status> {
        let scope = scope(&req);
        let req = req.into_inner();
        let states = req
            .states
            .iter()
            .enumerate()
            .map(|(i, s)| state_from_pb(&format!("states[{i}]"), *s))
            .collect::<Result<Vec<JobState>, _>>()
            .map_err(CoordError::from)?;
        let size = match req.page_size {
            0 => 100,
            n if n <= 1000 => n,
            n => return Err(CoordError::InvalidArgument(format!("page_size: must be at most 1000, got {n}")).into()),
        };
        let before = match req.page_token.as_str() {
            "" => None,
            t => Some(t.parse::<i64>().map_err(|_| CoordError::InvalidArgument("page_token: invalid".into()))?),
        };
        let labels = req.labels.into_iter().collect();
        let mut rows = self.shared.readers.run(move |c| db::list_jobs(c, &states, &labels, before, size + 1, scope.as_deref())).await?;
        let next = if rows.len() > size as usize {
            rows.truncate(size as usize);
            rows.last().map(|r| r.seq.to_string()).unwrap_or_default()
        } else {
            String::new()
        };
        Ok(Response::new(pb::ListJobsResponse { jobs: rows.iter().map(job_to_pb).collect(), next_page_token: next }))
    }

    type WatchJobStream = Stream<pb::JobEvent>;

    async fn watch_job(&self, req: Request<pb::WatchJobRequest>) -> Result<Response<Self::WatchJobStream>, Status> {
        let scope = scope(&req);
        let slot = self.stream_slot(&req)?;
        let req = req.into_inner();
        let id = parse_job_id("job_id", &req.job_id).map_err(CoordError::from)?;
        // Subscribe before reading the store so no committed event falls in between.
        let mut live = self.shared.control.subscribe();
        self.get_row(id, &scope).await?;
        let readers = self.shared.readers.clone();
        let mut stop = self.shared.shutdown.clone();
        let (tx, rx) = mpsc::channel::<Result<pb::JobEvent, Status>>(256);
        let id_s = id.to_string();
        tokio::spawn(async move {
            let _slot = slot;
            let mut last = req.after_seq;
            // Replay what is stored after `last`; true when the job has ended.
            async fn replay(
                readers: &Arc<crate::readers::Readers>,
                id: lorafleet_shared::ids::JobId,
                last: &mut u64,
                tx: &mpsc::Sender<Result<pb::JobEvent, Status>>,
            ) -> Option<bool> {
                loop {
                    let after = *last;
                    let rows = match readers.run(move |c| db::events_after(c, &id, after, 512)).await {
                        Ok(r) => r,
                        Err(e) => {
                            let _ = tx.send(Err(e.into())).await;
                            return None;
                        }
                    };
                    let n = rows.len();
                    for (seq, body) in rows {
                        let Ok(ev) = pb::JobEvent::decode(body.as_slice()) else { continue };
                        *last = seq;
                        let fin = is_final_event(&ev);
                        tx.send(Ok(ev)).await.ok()?;
                        if fin {
                            return Some(true);
                        }
                    }
                    if n < 512 {
                        return Some(false);
                    }
                }
            }
            match replay(&readers, id, &mut last, &tx).await {
                Some(false) => {}
                _ => return,
            }
            loop {
                let next = tokio::select! {
                    ev = live.recv() => Some(ev),
                    _ = stop.wait_for(|s| *s) => None,
                    // The caller went away: end now (and free its stream slot).
                    () = tx.closed() => return,
                };
                let Some(next) = next else {
                    let _ = tx.send(Err(Status::unavailable("coordinator is shutting down"))).await;
                    return;
                };
                match next {
                    Ok(ev) if ev.job_id == id_s && ev.seq > last => {
                        last = ev.seq;
                        let fin = is_final_event(&ev);
                        if tx.send(Ok((*ev).clone())).await.is_err() || fin {
                            return;
                        }
                    }
                    Ok(_) => {}
                    Err(broadcast::error::RecvError::Lagged(_)) => match replay(&readers, id, &mut last, &tx).await {
                        Some(false) => {}
                        _ => return,
                    },
                    Err(broadcast::error::RecvError::Closed) => {
                        let _ = tx.send(Err(Status::unavailable("coordinator is shutting down"))).await;
                        return;
                    }
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn cancel_job(&self, req: Request<pb::CancelJobRequest>) -> Result<Response<pb::CancelJobResponse>, Status> {
        let who = super::caller(&req);
        let scope = scope(&req);
        let req = req.into_inner();
        let target = req.job_id.chars().take(64).collect::<String>();
        let r: Result<Response<pb::CancelJobResponse>, Status> = async {
            let id = parse_job_id("job_id", &req.job_id).map_err(CoordError::from)?;
            self.get_row(id, &scope).await?;
            let reason: String = req.reason.chars().take(1024).collect();
            let row = self.shared.control.cancel(id, reason).await?;
            Ok(Response::new(pb::CancelJobResponse { job: Some(job_to_pb(&row)) }))
        }
        .await;
        self.shared.audit.outcome(who.as_deref(), "lorafleet.v1.JobService/CancelJob", &target, |_| String::new(), r)
    }

    async fn list_checkpoints(&self, req: Request<pb::ListCheckpointsRequest>) -> Result<Response<pb::ListCheckpointsResponse>, Status> {
        let scope = scope(&req);
        let id = parse_job_id("job_id", &req.into_inner().job_id).map_err(CoordError::from)?;
        self.get_row(id, &scope).await?;
        let rows = self.shared.readers.run(move |c| db::list_checkpoints(c, &id)).await?;
        Ok(Response::new(pb::ListCheckpointsResponse {
            checkpoints: rows
                .into_iter()
                .map(|c| pb::Checkpoint {
                    step: c.step,
                    manifest_key: c.manifest_key,
                    epoch: c.epoch.get(),
                    attempt: c.attempt,
                    created_at_unix_ms: c.created_ms,
                })
                .collect(),
        }))
    }

    async fn get_job_logs(&self, req: Request<pb::GetJobLogsRequest>) -> Result<Response<pb::GetJobLogsResponse>, Status> {
        let scope = scope(&req);
        let req = req.into_inner();
        let id = parse_job_id("job_id", &req.job_id).map_err(CoordError::from)?;
        self.get_row(id, &scope).await?;
        let limit = match req.limit {
            0 => 1000,
            n => n.min(10_000),
        };
        let (rows, truncated) = self.shared.readers.run(move |c| db::logs_after(c, &id, req.after_seq, limit)).await?;
        Ok(Response::new(pb::GetJobLogsResponse {
            lines: rows
                .into_iter()
                .map(|l| pb::JobLogLine {
                    seq: l.seq,
                    epoch: l.epoch.get(),
                    line: Some(pb::LogLine { unix_ms: l.unix_ms, level: l.level, message: l.message }),
                })
                .collect(),
            truncated,
        }))
    }

    async fn upload_dataset(&self, req: Request<Streaming<pb::UploadDatasetRequest>>) -> Result<Response<pb::UploadDatasetResponse>, Status> {
        let who = super::caller(&req);
        let r = self.upload(req).await;
        self.shared.audit.outcome(who.as_deref(), "lorafleet.v1.JobService/UploadDataset", "", |r: &Response<pb::UploadDatasetResponse>| r.get_ref().dataset_ref.clone(), r)
    }

    type DownloadAdapterStream = Stream<pb::DownloadAdapterResponse>;

    async fn download_adapter(&self, req: Request<pb::DownloadAdapterRequest>) -> Result<Response<Self::DownloadAdapterStream>, Status> {
        use pb::download_adapter_response::Part;
        let scope = scope(&req);
        let slot = self.stream_slot(&req)?;
        let id = parse_job_id("job_id", &req.into_inner().job_id).map_err(CoordError::from)?;
        let row = self.get_row(id, &scope).await?;
        let key = match (row.state, row.adapter_manifest) {
            (JobState::Succeeded, Some(k)) => k,
            (s, _) => return Err(CoordError::FailedPrecondition(format!("job {id} has no adapter: it is {s}")).into()),
        };
        let storage = self.shared.storage.clone();
        let (dir, manifest) = super::publish_adapter(&storage, &id, &key).await?;
        let (tx, rx) = mpsc::channel::<Result<pb::DownloadAdapterResponse, Status>>(8);
        let files: Vec<pb::AdapterFile> =
            manifest.files.iter().map(|f| pb::AdapterFile { name: f.name.clone(), size: f.size, sha256: f.sha256.clone() }).collect();
        tokio::spawn(async move {
            let _slot = slot;
            if tx.send(Ok(pb::DownloadAdapterResponse { part: Some(Part::Manifest(pb::AdapterManifest { files })) })).await.is_err() {
                return;
            }
            for (i, f) in manifest.files.iter().enumerate() {
                let data = match RelPath::parse(&f.name).map(|rel| dir.join(&rel)) {
                    Ok(k) => storage.get_bytes(&k).await,
                    Err(e) => Err(e),
                };
                let data = match data {
                    Ok(d) => d,
                    Err(e) => {
                        let _ = tx.send(Err(storage_err(e).into())).await;
                        return;
                    }
                };
                let sha = hex::encode(Sha256::digest(&data));
                if sha != f.sha256 || data.len() as u64 != f.size {
                    warn!(job_id = %id, file = %f.name, "stored adapter file does not match its manifest");
                    let _ = tx.send(Err(Status::data_loss(format!("stored file {} does not match its manifest", f.name)))).await;
                    return;
                }
                for (n, chunk) in data.chunks(ADAPTER_CHUNK).enumerate() {
                    let msg = pb::AdapterChunk { file_index: i as u32, offset: (n * ADAPTER_CHUNK) as u64, data: chunk.to_vec() };
                    if tx.send(Ok(pb::DownloadAdapterResponse { part: Some(Part::Chunk(msg)) })).await.is_err() {
                        return;
                    }
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn list_workers(&self, req: Request<pb::ListWorkersRequest>) -> Result<Response<pb::ListWorkersResponse>, Status> {
        let scope = scope(&req);
        let workers = visible_workers(&self.shared, scope, req.into_inner().include_dead).await?;
        Ok(Response::new(pb::ListWorkersResponse { workers }))
    }
}

/// The workers as a caller confined to `scope` (a tenant; None: everything) sees them:
/// workers are shared, but other tenants' job ids on them are not shown.
pub(crate) async fn visible_workers(shared: &Shared, scope: Option<String>, include_dead: bool) -> Result<Vec<pb::Worker>> {
    let mut workers = shared.control.list_workers(include_dead).await?;
    if let Some(t) = scope {
        // Workers are shared; other tenants' job ids on them are not shown.
        let ids: Vec<String> = workers.iter().flat_map(|w| w.running_job_ids.iter().chain(w.gang_seats.iter().map(|g| &g.job_id)).cloned()).collect();
        let mine: std::collections::HashSet<String> = shared
            .readers
            .run(move |c| {
                let mut mine = std::collections::HashSet::new();
                for id in ids {
                    let Ok(jid) = id.parse() else { continue };
                    if db::get_job(c, &jid)?.is_some_and(|r| r.tenant.as_deref() == Some(t.as_str())) {
                        mine.insert(id);
                    }
                }
                Ok(mine)
            })
            .await?;
        for w in &mut workers {
            w.running_job_ids.retain(|j| mine.contains(j));
            w.gang_seats.retain(|g| mine.contains(&g.job_id));
        }
    }
    Ok(workers)
}

pub(crate) fn storage_err(e: lorafleet_storage::Error) -> CoordError {
    match e {
        lorafleet_storage::Error::NotFound { key } => CoordError::NotFound { what: "object", id: key },
        e => CoordError::Storage(e.to_string()),
    }
}


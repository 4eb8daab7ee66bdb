//! The web dashboard, served beside `/metrics` on `--metrics-listen` (over TLS when the
//! coordinator has TLS): server-rendered HTML ([`pages`]), one small vanilla script that
//! draws the SVG charts and polls a JSON endpoint while a job trains, and a stylesheet,
//! all embedded in the binary.
//!
//! Routes: `/` jobs, `/jobs/{id}` a job (curves, evaluations, samples, checkpoints,
//! logs), `/jobs/{id}/checkpoints/{epoch}/{step}` and `/jobs/{id}/adapter` (files,
//! streamed from object storage through the coordinator, checked against the
//! manifest's sha256 as they go), `/workers`, `/login` (GET form, POST), `/logout`,
//! `/api/jobs/{id}/progress` (JSON), `/assets/*`.
//!
//! Access follows the gRPC API: with `--auth`, a request carries a token as
//! `Authorization: Bearer` or in the `lorafleet_token` cookie the login form sets
//! (HttpOnly, SameSite=Strict, Secure under TLS); user tokens see their tenant's jobs
//! only (another tenant's job is "not found", as over gRPC), admin tokens every job,
//! worker tokens nothing. No token or an unknown one: 401 with the sign-in form.
//! Without `--auth` the dashboard is open, like the API.
//!
//! Every response carries a Content-Security-Policy without inline script or style.

pub mod pages;

use crate::auth::{Auth, Identity, Role};
use crate::persistence as db;
use crate::service::Shared;
use axum::body::Body;
use axum::extract::{Form, Path, Query, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use futures::StreamExt;
use lorafleet_proto as pb;
use lorafleet_shared::ids::JobId;
use lorafleet_storage::{layout, RelPath};
use prost::Message;
use serde::Deserialize;
use sha2::{Digest, Sha256};
use std::collections::HashMap;
use std::sync::Arc;
use tracing::{info, warn};

const JS: &str = include_str!("assets/dashboard.js");
const CSS: &str = include_str!("assets/dashboard.css");

/// The cookie the sign-in form sets.
pub const COOKIE: &str = "lorafleet_token";
const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; connect-src 'self'; \
                   form-action 'self'; frame-ancestors 'none'; base-uri 'none'";
/// Jobs per page of `/`.
const PAGE: u32 = 100;
/// Log lines on the job page (older ones stay available through `lorafleet logs`).
const PAGE_LOGS: u32 = 500;
/// Events read per progress call (a job keeps at most `MAX_EVENTS_PER_JOB`).
const EVENTS_PER_CALL: u32 = 2_500;

/// What the dashboard's handlers share.
#[derive(Clone)]
pub struct Dashboard {
    shared: Arc<Shared>,
    auth: Option<Arc<Auth>>,
    /// The coordinator serves TLS: the cookie is `Secure`.
    tls: bool,
}

/// The routes of the dashboard, to merge into the metrics listener's router.
pub fn router(shared: Arc<Shared>, auth: Option<Arc<Auth>>, tls: bool) -> Router {
    let d = Dashboard { shared, auth, tls };
    Router::new()
        .route("/", get(jobs_page))
        .route("/jobs/{id}", get(job_page))
        .route("/jobs/{id}/checkpoints/{epoch}/{step}", get(checkpoint_files))
        .route("/jobs/{id}/checkpoints/{epoch}/{step}/{*name}", get(checkpoint_download))
        .route("/jobs/{id}/adapter", get(adapter_files))
        .route("/jobs/{id}/adapter/{*name}", get(adapter_download))
        .route("/workers", get(workers_page))
        .route("/login", get(login_page).post(login))
        .route("/logout", post(logout))
        .route("/api/jobs/{id}/progress", get(progress))
        .route("/assets/dashboard.js", get(|| async { asset("text/javascript; charset=utf-8", JS) }))
        .route("/assets/dashboard.css", get(|| async { asset("text/css; charset=utf-8", CSS) }))
        .fallback(|| async { Failure::NotFound("no such page".into()).into_response() })
        .with_state(d)
}

fn security_headers(h: &mut HeaderMap) {
    h.insert(header::CONTENT_SECURITY_POLICY, HeaderValue::from_static(CSP));
    h.insert(header::X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
    h.insert(header::REFERRER_POLICY, HeaderValue::from_static("same-origin"));
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
}

fn asset(ctype: &'static str, body: &'static str) -> Response {
    let mut r = body.into_response();
    r.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static(ctype));
    r.headers_mut().insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    security_headers(r.headers_mut());
    r
}

fn html(status: StatusCode, body: String) -> Response {
    let mut r = (status, body).into_response();
    r.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("text/html; charset=utf-8"));
    r.headers_mut().insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    security_headers(r.headers_mut());
    r
}

fn json(status: StatusCode, v: &serde_json::Value) -> Response {
    let mut r = (status, v.to_string()).into_response();
    r.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    r.headers_mut().insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    security_headers(r.headers_mut());
    r
}

/// Why a request is not answered with what it asked for.
#[derive(Debug)]
enum Failure {
    /// No token or an unknown one: the sign-in form (with what to come back to).
    Unauthenticated { message: Option<String>, next: String },
    Forbidden(String),
    NotFound(String),
    BadRequest(String),
    Unavailable(String),
}

impl Failure {
    fn status(&self) -> StatusCode {
        match self {
            Failure::Unauthenticated { .. } => StatusCode::UNAUTHORIZED,
            Failure::Forbidden(_) => StatusCode::FORBIDDEN,
            Failure::NotFound(_) => StatusCode::NOT_FOUND,
            Failure::BadRequest(_) => StatusCode::BAD_REQUEST,
            Failure::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
        }
    }
    fn text(&self) -> String {
        match self {
            Failure::Unauthenticated { message, .. } => message.clone().unwrap_or_else(|| "sign in with a bearer token".into()),
            Failure::Forbidden(m) | Failure::NotFound(m) | Failure::BadRequest(m) | Failure::Unavailable(m) => m.clone(),
        }
    }
    /// The JSON form (the script's endpoint).
    fn into_json(self) -> Response {
        let mut r = json(self.status(), &serde_json::json!({ "error": self.text() }));
        if matches!(self, Failure::Unauthenticated { .. }) {
            r.headers_mut().insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        r
    }
}

impl IntoResponse for Failure {
    fn into_response(self) -> Response {
        let status = self.status();
        let none = pages::Viewer { who: None, tenant: None };
        match self {
            Failure::Unauthenticated { message, next } => {
                let mut r = html(status, pages::layout("Sign in", &none, "/login", &pages::login(message.as_deref(), &next, true)));
                r.headers_mut().insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
                r
            }
            f => {
                let title = match status {
                    StatusCode::FORBIDDEN => "Not allowed",
                    StatusCode::NOT_FOUND => "Not found",
                    StatusCode::BAD_REQUEST => "Bad request",
                    _ => "Unavailable",
                };
                html(status, pages::layout(title, &none, "", &pages::message(title, &f.text())))
            }
        }
    }
}

impl From<crate::error::CoordError> for Failure {
    fn from(e: crate::error::CoordError) -> Self {
        use crate::error::CoordError as E;
        match e {
            E::NotFound { what, id } => Failure::NotFound(format!("{what} {id} not found")),
            e => {
                warn!(error = %e, "dashboard request failed");
                Failure::Unavailable(format!("the coordinator could not answer: {e}"))
            }
        }
    }
}

/// The caller: `None` identity without `--auth`.
struct Caller {
    who: Option<Arc<Identity>>,
}

impl Caller {
    /// The tenant this caller is confined to (None: every job).
    fn scope(&self) -> Option<String> {
        match &self.who {
            Some(w) if w.role != Role::Admin => Some(w.tenant.clone().unwrap_or_default()),
            _ => None,
        }
    }
    fn viewer(&self) -> pages::Viewer<'_> {
        match &self.who {
            Some(w) => pages::Viewer { who: Some((w.id.as_str(), w.role.as_str())), tenant: w.tenant.as_deref() },
            None => pages::Viewer { who: None, tenant: None },
        }
    }
    fn sees(&self, row: &db::JobRow) -> bool {
        self.scope().is_none_or(|t| row.tenant.as_deref() == Some(t.as_str()))
    }
}

/// The token of a request: `Authorization: Bearer`, else the cookie.
fn token_of(headers: &HeaderMap) -> Option<String> {
    if let Some(v) = headers.get(header::AUTHORIZATION) {
        return Some(v.to_str().ok().and_then(|s| s.strip_prefix("Bearer ")).map(str::trim).unwrap_or("").to_string());
    }
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|c| c.trim().split_once('='))
        .find(|(k, _)| *k == COOKIE)
        .map(|(_, v)| v.trim().to_string())
}

/// A value that can travel in a cookie unquoted (RFC 6265 cookie-octets).
fn cookie_safe(s: &str) -> bool {
    !s.is_empty() && s.len() <= 4096 && s.bytes().all(|b| (0x21..=0x7e).contains(&b) && !b",;\\\"".contains(&b))
}

/// A local path to come back to after signing in (never another site).
fn local_next(s: &str) -> String {
    let ok = s.starts_with('/') && !s.starts_with("//") && !s.contains(['\\', '\r', '\n']) && s.len() <= 2048;
    if ok { s.to_string() } else { "/".to_string() }
}

impl Dashboard {
    /// Authenticate a request for `path` (what the sign-in form comes back to).
    fn caller(&self, headers: &HeaderMap, path: &str) -> Result<Caller, Failure> {
        let Some(auth) = &self.auth else { return Ok(Caller { who: None }) };
        let next = local_next(path);
        let token = match token_of(headers) {
            Some(t) if !t.is_empty() => t,
            Some(_) => {
                self.shared.metrics.refused("unauthenticated");
                return Err(Failure::Unauthenticated { message: Some("malformed authorization header: expected `Bearer <token>`".into()), next });
            }
            None => return Err(Failure::Unauthenticated { message: None, next }),
        };
        match auth.identify_token(&token) {
            None => {
                self.shared.metrics.refused("unauthenticated");
                self.shared.audit.record(None, "dashboard", path, tonic::Code::Unauthenticated, "unknown token");
                Err(Failure::Unauthenticated { message: Some("unknown token (it may have been revoked): sign in again".into()), next })
            }
            Some(w) if w.role == Role::Worker => {
                self.shared.metrics.refused("permission_denied");
                self.shared.audit.record(Some(&w), "dashboard", path, tonic::Code::PermissionDenied, "worker token");
                Err(Failure::Forbidden(format!("token {:?} is a worker token; the dashboard needs a user or admin token", w.id)))
            }
            Some(w) => Ok(Caller { who: Some(w) }),
        }
    }

    async fn job_row(&self, caller: &Caller, id: &str) -> Result<db::JobRow, Failure> {
        let not_found = || Failure::NotFound(format!("job {id} not found"));
        let jid: JobId = id.parse().map_err(|_| not_found())?;
        let row = self.shared.readers.run(move |c| db::get_job(c, &jid)).await?;
        row.filter(|r| caller.sees(r)).ok_or_else(not_found)
    }

    /// Worker id -> name, for the tables.
    async fn worker_names(&self) -> HashMap<String, String> {
        match self.shared.control.list_workers(true).await {
            Ok(ws) => ws.into_iter().map(|w| (w.worker_id, w.name)).collect(),
            Err(e) => {
                warn!(error = %e, "dashboard: listing workers failed");
                HashMap::new()
            }
        }
    }
}

#[derive(Debug, Default, Deserialize)]
struct JobsQuery {
    #[serde(default)]
    state: String,
    before: Option<i64>,
}

async fn jobs_page(State(d): State<Dashboard>, headers: HeaderMap, Query(q): Query<JobsQuery>) -> Response {
    let r: Result<Response, Failure> = async {
        let caller = d.caller(&headers, "/")?;
        let states = match q.state.as_str() {
            "" => Vec::new(),
            s => vec![s.parse::<lorafleet_shared::job::JobState>().map_err(|_| Failure::BadRequest(format!("state: unknown state {s:?}")))?],
        };
        let scope = caller.scope();
        let before = q.before;
        let mut rows =
            d.shared.readers.run(move |c| db::list_jobs(c, &states, &Default::default(), before, PAGE + 1, scope.as_deref())).await?;
        let next = if rows.len() > PAGE as usize {
            rows.truncate(PAGE as usize);
            rows.last().map(|r| r.seq)
        } else {
            None
        };
        let names = d.worker_names().await;
        Ok(html(StatusCode::OK, pages::layout("Jobs", &caller.viewer(), "/", &pages::jobs(&rows, &names, &q.state, next))))
    }
    .await;
    r.unwrap_or_else(IntoResponse::into_response)
}

/// The step and eval events of a job after `after` (of at most [`EVENTS_PER_CALL`]
/// events read), the last seq read, and whether more events may follow it.
type Events = (Vec<pb::StepMetrics>, Vec<pb::EvalMetrics>, u64, bool);

fn read_events(c: &rusqlite::Connection, id: &JobId, after: u64) -> crate::Result<Events> {
    let (mut steps, mut evals, mut last) = (Vec::new(), Vec::new(), after);
    let rows = db::events_after(c, id, after, EVENTS_PER_CALL)?;
    let more = rows.len() == EVENTS_PER_CALL as usize;
    for (seq, body) in rows {
        last = seq;
        match pb::JobEvent::decode(body.as_slice()).ok().and_then(|e| e.event) {
            Some(pb::job_event::Event::Step(s)) => steps.push(s),
            Some(pb::job_event::Event::Eval(e)) => evals.push(e),
            _ => {}
        }
    }
    Ok((steps, evals, last, more))
}

async fn job_page(State(d): State<Dashboard>, headers: HeaderMap, Path(id): Path<String>) -> Response {
    let r: Result<Response, Failure> = async {
        let caller = d.caller(&headers, &format!("/jobs/{}", pages::url_seg(&id)))?;
        let row = d.job_row(&caller, &id).await?;
        let jid = row.id;
        let (checkpoints, (logs, truncated), evals) = d
            .shared
            .readers
            .run(move |c| {
                let (_, max_log) = db::max_seqs(c, &jid)?;
                let logs = db::logs_after(c, &jid, max_log.saturating_sub(PAGE_LOGS as u64), PAGE_LOGS)?;
                let (_, evals, _, _) = read_events(c, &jid, 0)?;
                Ok((db::list_checkpoints(c, &jid)?, logs, evals))
            })
            .await?;
        let names = d.worker_names().await;
        let view = pages::JobView { job: &row, worker_names: &names, checkpoints: &checkpoints, logs: &logs, logs_truncated: truncated, evals: &evals };
        Ok(html(StatusCode::OK, pages::layout(&format!("Job {}", row.spec.name), &caller.viewer(), "", &pages::job(&view))))
    }
    .await;
    r.unwrap_or_else(IntoResponse::into_response)
}

#[derive(Debug, Default, Deserialize)]
struct ProgressQuery {
    #[serde(default)]
    after_event: u64,
    #[serde(default)]
    after_log: u64,
}

fn finite(v: f64) -> serde_json::Value {
    if v.is_finite() {
        serde_json::json!(v)
    } else {
        serde_json::Value::Null
    }
}

/// The job's state and what happened after the given event and log sequence numbers:
/// what the job page's script polls.
async fn progress(State(d): State<Dashboard>, headers: HeaderMap, Path(id): Path<String>, Query(q): Query<ProgressQuery>) -> Response {
    let r: Result<Response, Failure> = async {
        let caller = d.caller(&headers, &format!("/jobs/{}", pages::url_seg(&id)))?;
        let row = d.job_row(&caller, &id).await?;
        let jid = row.id;
        let ((steps, evals, next_event, more), logs, checkpoints) = d
            .shared
            .readers
            .run(move |c| {
                let events = read_events(c, &jid, q.after_event)?;
                let (logs, _) = db::logs_after(c, &jid, q.after_log, PAGE_LOGS)?;
                Ok((events, logs, db::list_checkpoints(c, &jid)?))
            })
            .await?;
        let names = d.worker_names().await;
        let worker = row.worker_id.map(|w| w.to_string());
        let body = serde_json::json!({
            "job": {
                "id": jid.to_string(),
                "state": row.state.as_str(),
                "final": row.state.is_final(),
                "step": row.step,
                "total_steps": row.total_steps,
                "loss": row.loss.map(finite),
                "attempt": row.attempt,
                "worker": worker.as_ref().map(|w| names.get(w).cloned().unwrap_or_else(|| w.clone())),
                "error": row.error,
                "updated": pages::utc(row.updated_ms),
            },
            "steps": steps.iter().map(|s| serde_json::json!([s.step, finite(s.loss), finite(s.lr)])).collect::<Vec<_>>(),
            "evals": evals.iter().map(|e| serde_json::json!({
                "step": e.step,
                "eval_loss": finite(e.eval_loss),
                "perplexity": finite(e.perplexity),
                "exact_match": e.exact_match.map(finite),
                "rouge_l": e.rouge_l.map(finite),
                "samples": e.samples.iter().map(|s| serde_json::json!({"prompt": s.prompt, "completion": s.completion})).collect::<Vec<_>>(),
            })).collect::<Vec<_>>(),
            "next_event": next_event,
            "more": more,
            "logs": logs.iter().map(|l| serde_json::json!({"seq": l.seq, "time": pages::utc(l.unix_ms), "level": l.level, "message": l.message})).collect::<Vec<_>>(),
            "checkpoints": checkpoints.iter().map(|c| serde_json::json!({"step": c.step, "epoch": c.epoch.get(), "attempt": c.attempt, "created": pages::utc(c.created_ms)})).collect::<Vec<_>>(),
        });
        Ok(json(StatusCode::OK, &body))
    }
    .await;
    r.unwrap_or_else(Failure::into_json)
}

async fn workers_page(State(d): State<Dashboard>, headers: HeaderMap) -> Response {
    let r: Result<Response, Failure> = async {
        let caller = d.caller(&headers, "/workers")?;
        let ws = crate::service::jobs::visible_workers(&d.shared, caller.scope(), false).await?;
        Ok(html(StatusCode::OK, pages::layout("Workers", &caller.viewer(), "/workers", &pages::workers(&ws, crate::control::unix_ms()))))
    }
    .await;
    r.unwrap_or_else(IntoResponse::into_response)
}

/// The storage directory of a job's checkpoint (by epoch and step) and its manifest.
async fn checkpoint_dir(d: &Dashboard, row: &db::JobRow, epoch: u64, step: u64) -> Result<(RelPath, lorafleet_storage::Manifest), Failure> {
    let jid = row.id;
    let cps = d.shared.readers.run(move |c| db::list_checkpoints(c, &jid)).await?;
    let cp = cps
        .into_iter()
        .find(|c| c.epoch.get() == epoch && c.step == step)
        .ok_or_else(|| Failure::NotFound(format!("job {} has no checkpoint at step {step} of epoch {epoch}", row.id)))?;
    manifest_of(d, &cp.manifest_key).await
}

async fn manifest_of(d: &Dashboard, manifest_key: &str) -> Result<(RelPath, lorafleet_storage::Manifest), Failure> {
    let dir = layout::manifest_dir(manifest_key).map_err(|e| Failure::Unavailable(format!("stored manifest key: {e}")))?;
    match d.shared.storage.read_manifest(&dir).await {
        Ok(Some(m)) => Ok((dir, m)),
        Ok(None) => Err(Failure::NotFound(format!("{dir}: no manifest in storage"))),
        Err(e) => {
            warn!(dir = %dir, error = %e, "dashboard: reading a manifest failed");
            Err(Failure::Unavailable(format!("storage: {e}")))
        }
    }
}

async fn checkpoint_files(State(d): State<Dashboard>, headers: HeaderMap, Path((id, epoch, step)): Path<(String, u64, u64)>) -> Response {
    let r: Result<Response, Failure> = async {
        let back = format!("/jobs/{}", pages::url_seg(&id));
        let caller = d.caller(&headers, &format!("{back}/checkpoints/{epoch}/{step}"))?;
        let row = d.job_row(&caller, &id).await?;
        let (_, m) = checkpoint_dir(&d, &row, epoch, step).await?;
        let title = format!("Checkpoint step {step} (epoch {epoch}) of {}", row.spec.name);
        let body = pages::files(&title, &back, &format!("{back}/checkpoints/{epoch}/{step}"), &m.files);
        Ok(html(StatusCode::OK, pages::layout(&title, &caller.viewer(), "", &body)))
    }
    .await;
    r.unwrap_or_else(IntoResponse::into_response)
}

async fn checkpoint_download(State(d): State<Dashboard>, headers: HeaderMap, Path((id, epoch, step, name)): Path<(String, u64, u64, String)>) -> Response {
    let r: Result<Response, Failure> = async {
        let caller = d.caller(&headers, &format!("/jobs/{}", pages::url_seg(&id)))?;
        let row = d.job_row(&caller, &id).await?;
        let (dir, m) = checkpoint_dir(&d, &row, epoch, step).await?;
        stream_file(&d, &caller, &row, &dir, &m, &name).await
    }
    .await;
    r.unwrap_or_else(IntoResponse::into_response)
}

/// A succeeded job's published adapter (published now if the coordinator has not yet).
async fn adapter_dir(d: &Dashboard, row: &db::JobRow) -> Result<(RelPath, lorafleet_storage::Manifest), Failure> {
    match (row.state, &row.adapter_manifest) {
        (lorafleet_shared::job::JobState::Succeeded, Some(k)) => {
            let (dir, m) = crate::service::publish_adapter(&d.shared.storage, &row.id, k).await?;
            Ok((dir, m))
        }
        (s, _) => Err(Failure::NotFound(format!("job {} has no adapter: it is {s}", row.id))),
    }
}

async fn adapter_files(State(d): State<Dashboard>, headers: HeaderMap, Path(id): Path<String>) -> Response {
    let r: Result<Response, Failure> = async {
        let back = format!("/jobs/{}", pages::url_seg(&id));
        let caller = d.caller(&headers, &format!("{back}/adapter"))?;
        let row = d.job_row(&caller, &id).await?;
        let (_, m) = adapter_dir(&d, &row).await?;
        let title = format!("Adapter of {}", row.spec.name);
        Ok(html(StatusCode::OK, pages::layout(&title, &caller.viewer(), "", &pages::files(&title, &back, &format!("{back}/adapter"), &m.files))))
    }
    .await;
    r.unwrap_or_else(IntoResponse::into_response)
}

async fn adapter_download(State(d): State<Dashboard>, headers: HeaderMap, Path((id, name)): Path<(String, String)>) -> Response {
    let r: Result<Response, Failure> = async {
        let caller = d.caller(&headers, &format!("/jobs/{}", pages::url_seg(&id)))?;
        let row = d.job_row(&caller, &id).await?;
        let (dir, m) = adapter_dir(&d, &row).await?;
        stream_file(&d, &caller, &row, &dir, &m, &name).await
    }
    .await;
    r.unwrap_or_else(IntoResponse::into_response)
}

/// Stream one file of a manifest from storage: only names the manifest lists, with
/// its size as Content-Length; the sha256 is checked as the bytes go and a mismatch
/// aborts the response before its last chunk (the client sees a failed download, never
/// a changed file as whole).
async fn stream_file(d: &Dashboard, caller: &Caller, row: &db::JobRow, dir: &RelPath, m: &lorafleet_storage::Manifest, name: &str) -> Result<Response, Failure> {
    let f = m.files.iter().find(|f| f.name == name).ok_or_else(|| Failure::NotFound(format!("{name}: not a file of this manifest")))?;
    let key = RelPath::parse(&f.name).map(|rel| dir.join(&rel)).map_err(|e| Failure::Unavailable(format!("manifest entry {name:?}: {e}")))?;
    let inner = d.shared.storage.get_stream(&key).await.map_err(|e| {
        warn!(key = %key, error = %e, "dashboard: opening a stored file failed");
        Failure::Unavailable(format!("storage: {e}"))
    })?;
    info!(job_id = %row.id, file = %key, bytes = f.size, viewer = caller.who.as_ref().map(|w| w.id.as_str()).unwrap_or("-"), "dashboard download");
    let (size, sha, key_s) = (f.size, f.sha256.clone(), key.to_string());
    // Each chunk goes out only once the next one has arrived, and the last one only once
    // the whole file matched its sha256: a changed file ends short of Content-Length.
    type St = (futures::stream::BoxStream<'static, lorafleet_storage::Result<bytes::Bytes>>, Sha256, u64, Option<bytes::Bytes>);
    let start: Option<St> = Some((inner, Sha256::new(), 0u64, None));
    let body = futures::stream::unfold(start, move |st| {
        let (sha, key_s) = (sha.clone(), key_s.clone());
        async move {
            let (mut inner, mut h, mut n, mut pending) = st?;
            let fail = |why: &str| {
                warn!(key = %key_s, why, "download aborted");
                Some((Err(std::io::Error::other(format!("stored file {key_s}: {why}"))), None))
            };
            loop {
                match inner.next().await {
                    Some(Ok(b)) => {
                        h.update(&b);
                        n += b.len() as u64;
                        if n > size {
                            return fail("larger than its manifest says");
                        }
                        if let Some(p) = pending.replace(b) {
                            return Some((Ok(p), Some((inner, h, n, pending))));
                        }
                    }
                    Some(Err(e)) => return fail(&format!("read failed: {e}")),
                    None if n != size || hex::encode(h.clone().finalize()) != sha => return fail("does not match its manifest"),
                    None => return pending.take().map(|p| (Ok(p), None)),
                }
            }
        }
    });
    let file_name: String = f.name.rsplit('/').next().unwrap_or("file").chars().map(|c| if c.is_ascii_alphanumeric() || "._-".contains(c) { c } else { '_' }).collect();
    let mut r = Response::new(Body::from_stream(body));
    let h = r.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/octet-stream"));
    h.insert(header::CONTENT_LENGTH, HeaderValue::from(size));
    if let Ok(v) = HeaderValue::from_str(&format!("attachment; filename=\"{file_name}\"")) {
        h.insert(header::CONTENT_DISPOSITION, v);
    }
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    security_headers(h);
    Ok(r)
}

#[derive(Debug, Default, Deserialize)]
struct NextQuery {
    #[serde(default)]
    next: String,
}

async fn login_page(State(d): State<Dashboard>, Query(q): Query<NextQuery>) -> Response {
    let next = local_next(&q.next);
    let none = pages::Viewer { who: None, tenant: None };
    html(StatusCode::OK, pages::layout("Sign in", &none, "/login", &pages::login(None, &next, d.auth.is_some())))
}

#[derive(Debug, Deserialize)]
struct LoginForm {
    #[serde(default)]
    token: String,
    #[serde(default)]
    next: String,
}

/// A form post from another site is refused (its Origin is not this host).
fn same_origin(headers: &HeaderMap) -> Result<(), Failure> {
    let Some(origin) = headers.get(header::ORIGIN) else { return Ok(()) };
    let host = headers.get(header::HOST).and_then(|h| h.to_str().ok()).unwrap_or("");
    let o = origin.to_str().unwrap_or("");
    let o_host = o.split_once("://").map(|(_, h)| h).unwrap_or("");
    if !host.is_empty() && o_host == host {
        Ok(())
    } else {
        Err(Failure::Forbidden("cross-site form posts are refused".into()))
    }
}

fn cookie(value: &str, max_age: u64, tls: bool) -> HeaderValue {
    let secure = if tls { "; Secure" } else { "" };
    HeaderValue::from_str(&format!("{COOKIE}={value}; Path=/; HttpOnly; SameSite=Strict; Max-Age={max_age}{secure}"))
        .unwrap_or_else(|_| HeaderValue::from_static("lorafleet_token=; Path=/; Max-Age=0"))
}

async fn login(State(d): State<Dashboard>, headers: HeaderMap, Form(f): Form<LoginForm>) -> Response {
    let r: Result<Response, Failure> = (|| {
        same_origin(&headers)?;
        let next = local_next(&f.next);
        let Some(auth) = &d.auth else { return Ok(redirect(&next, None)) };
        let token = f.token.trim();
        let unauth = |m: &str| Failure::Unauthenticated { message: Some(m.to_string()), next: next.clone() };
        if token.is_empty() {
            return Err(unauth("enter a token"));
        }
        if !cookie_safe(token) {
            return Err(unauth("this token has characters a cookie cannot carry: send it as `Authorization: Bearer` instead"));
        }
        match auth.identify_token(token) {
            None => {
                d.shared.metrics.refused("unauthenticated");
                d.shared.audit.record(None, "dashboard/login", "", tonic::Code::Unauthenticated, "unknown token");
                Err(unauth("unknown token"))
            }
            Some(w) if w.role == Role::Worker => {
                d.shared.metrics.refused("permission_denied");
                d.shared.audit.record(Some(&w), "dashboard/login", "", tonic::Code::PermissionDenied, "worker token");
                Err(Failure::Forbidden(format!("token {:?} is a worker token; the dashboard needs a user or admin token", w.id)))
            }
            Some(w) => {
                info!(token_id = %w.id, "dashboard sign-in");
                Ok(redirect(&next, Some(cookie(token, 12 * 3600, d.tls))))
            }
        }
    })();
    r.unwrap_or_else(IntoResponse::into_response)
}

fn redirect(to: &str, cookie: Option<HeaderValue>) -> Response {
    let mut r = StatusCode::SEE_OTHER.into_response();
    r.headers_mut().insert(header::LOCATION, HeaderValue::from_str(to).unwrap_or_else(|_| HeaderValue::from_static("/")));
    if let Some(c) = cookie {
        r.headers_mut().insert(header::SET_COOKIE, c);
    }
    security_headers(r.headers_mut());
    r
}

async fn logout(State(d): State<Dashboard>, headers: HeaderMap) -> Response {
    match same_origin(&headers) {
        Ok(()) => redirect("/login", Some(cookie("", 0, d.tls))),
        Err(f) => f.into_response(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_from_header_or_cookie() {
        let mut h = HeaderMap::new();
        assert_eq!(token_of(&h), None);
        h.insert(header::COOKIE, HeaderValue::from_static("a=b; lorafleet_token=lf_x ; c=d"));
        assert_eq!(token_of(&h).as_deref(), Some("lf_x"));
        h.insert(header::AUTHORIZATION, HeaderValue::from_static("Bearer lf_y"));
        assert_eq!(token_of(&h).as_deref(), Some("lf_y"));
        h.insert(header::AUTHORIZATION, HeaderValue::from_static("Basic abc"));
        assert_eq!(token_of(&h).as_deref(), Some(""));
    }

    #[test]
    fn next_stays_local_and_cookies_stay_plain() {
        assert_eq!(local_next("/jobs/x"), "/jobs/x");
        for bad in ["https://evil.example/", "//evil.example/", "/\\evil", "jobs", "/a\r\nSet-Cookie: x"] {
            assert_eq!(local_next(bad), "/", "{bad}");
        }
        assert!(cookie_safe("lf_0123abc"));
        for bad in ["", "a b", "a;b", "a,b", "é", "a\"b"] {
            assert!(!cookie_safe(bad), "{bad}");
        }
        let c = cookie("lf_1", 60, true);
        assert_eq!(c.to_str().unwrap(), "lorafleet_token=lf_1; Path=/; HttpOnly; SameSite=Strict; Max-Age=60; Secure");
    }

    #[test]
    fn cross_site_posts_are_refused() {
        let mut h = HeaderMap::new();
        h.insert(header::HOST, HeaderValue::from_static("127.0.0.1:9100"));
        assert!(same_origin(&h).is_ok());
        h.insert(header::ORIGIN, HeaderValue::from_static("https://127.0.0.1:9100"));
        assert!(same_origin(&h).is_ok());
        h.insert(header::ORIGIN, HeaderValue::from_static("https://evil.example"));
        assert!(same_origin(&h).is_err());
        h.insert(header::ORIGIN, HeaderValue::from_static("null"));
        assert!(same_origin(&h).is_err());
    }
}

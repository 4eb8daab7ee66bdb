//! Durable state: one SQLite database, the coordinator's source of truth.
//!
//! What is stored, and why:
//! - `jobs`: every accepted job with its spec (JSON), spec hash and idempotency key
//!   (unique, so a key maps to one job forever), state, attempt count and current
//!   fencing epoch, the worker holding the lease, progress, latest checkpoint, adapter
//!   manifest and error. A submission is acknowledged only after its row commits, so a
//!   restart loses no acknowledged job. `seq` (autoincrement) is the submission order:
//!   FIFO within a priority and the page token of ListJobs.
//! - `job_labels`: the labels of each job, indexed for ListJobs filters.
//! - `attempts`: one row per dispatch (job, epoch): which worker, which devices, when,
//!   and how it ended. The epoch row is written in the same transaction that moves the
//!   job to `running`, before the lease is returned: the fencing token is durable
//!   before any worker can use it, so a restarted coordinator never hands it out twice.
//! - `workers`: registrations (devices, labels, version), so a restart keeps knowing the
//!   workers that hold leases. Heartbeat times are *not* stored (that would be a write per
//!   heartbeat): after a restart every worker and lease gets one full TTL of grace.
//! - `checkpoints`: committed checkpoint manifests per job, for resume and listing.
//! - `events`, `logs`: the job's event stream (proto-encoded `JobEvent`) and log lines,
//!   bounded per job ([`MAX_EVENTS_PER_JOB`], [`MAX_LOGS_PER_JOB`]), for WatchJob replay
//!   and GetJobLogs.
//!
//! Durability: WAL, and no reply before the commit is fsynced. `open_writer` sets
//! `synchronous=FULL` (fsync at every commit). The control loop switches its connection
//! to `NORMAL` and fsyncs the WAL itself on a separate thread before releasing a batch's
//! replies (see `control`): the same guarantee, with the fsync of one batch overlapping
//! the work on the next. Plain `NORMAL` without that fsync is not enough: the last
//! commits can vanish on power loss, and a vanished dispatch could hand the same epoch to
//! a second worker, which breaks fencing.
//!
//! The control loop owns the only writing connection; readers (GetJob, ListJobs, logs,
//! event replay) use their own connections and see only committed data.

use crate::error::{CoordError, Result};
use lorafleet_shared::ids::{Epoch, JobId, WorkerId};
use lorafleet_shared::job::{FailureClass, JobState};
use lorafleet_shared::spec::{DeviceKind, JobSpec};
use rusqlite::{params, Connection, OptionalExtension, Row};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

pub const MAX_EVENTS_PER_JOB: u64 = 2_000;
pub const MAX_LOGS_PER_JOB: u64 = 10_000;
const SCHEMA_VERSION: i64 = 1;

const SCHEMA: &str = r#"
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS jobs (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT NOT NULL UNIQUE,
    name TEXT NOT NULL,
    spec_json TEXT NOT NULL,
    spec_hash TEXT NOT NULL,
    idempotency_key TEXT UNIQUE,
    state TEXT NOT NULL,
    priority INTEGER NOT NULL,
    attempt INTEGER NOT NULL DEFAULT 0,
    epoch INTEGER NOT NULL DEFAULT 0,
    max_attempts INTEGER NOT NULL,
    worker_id TEXT,
    step INTEGER NOT NULL DEFAULT 0,
    total_steps INTEGER NOT NULL DEFAULT 0,
    loss REAL,
    latest_checkpoint TEXT,
    adapter_manifest TEXT,
    error TEXT,
    failure_class TEXT,
    created_ms INTEGER NOT NULL,
    updated_ms INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS jobs_by_state ON jobs(state, seq);
CREATE TABLE IF NOT EXISTS job_labels (
    job_seq INTEGER NOT NULL REFERENCES jobs(seq),
    key TEXT NOT NULL,
    value TEXT NOT NULL,
    PRIMARY KEY (job_seq, key)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS job_labels_by_kv ON job_labels(key, value, job_seq);
CREATE TABLE IF NOT EXISTS attempts (
    job_id TEXT NOT NULL,
    epoch INTEGER NOT NULL,
    attempt INTEGER NOT NULL,
    worker_id TEXT NOT NULL,
    devices_json TEXT NOT NULL,
    started_ms INTEGER NOT NULL,
    ended_ms INTEGER,
    outcome TEXT,
    reason TEXT,
    PRIMARY KEY (job_id, epoch)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS attempt_members (
    job_id TEXT NOT NULL,
    epoch INTEGER NOT NULL,
    node_rank INTEGER NOT NULL,
    worker_id TEXT NOT NULL,
    devices_json TEXT NOT NULL,
    PRIMARY KEY (job_id, epoch, node_rank)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS job_ranks (
    job_id TEXT NOT NULL,
    rank INTEGER NOT NULL,
    epoch INTEGER NOT NULL,
    node_rank INTEGER NOT NULL,
    worker_id TEXT NOT NULL,
    step INTEGER NOT NULL,
    tokens_per_sec REAL NOT NULL,
    updated_ms INTEGER NOT NULL,
    PRIMARY KEY (job_id, rank)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS tenant_datasets (
    tenant TEXT NOT NULL,
    sha256 TEXT NOT NULL,
    created_ms INTEGER NOT NULL,
    PRIMARY KEY (tenant, sha256)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS audit (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    unix_ms INTEGER NOT NULL,
    token_id TEXT NOT NULL,
    role TEXT NOT NULL,
    tenant TEXT NOT NULL,
    method TEXT NOT NULL,
    target TEXT NOT NULL,
    outcome TEXT NOT NULL,
    detail TEXT NOT NULL
);
CREATE TRIGGER IF NOT EXISTS audit_is_append_only_u BEFORE UPDATE ON audit BEGIN SELECT RAISE(ABORT, 'the audit log is append-only'); END;
CREATE TRIGGER IF NOT EXISTS audit_is_append_only_d BEFORE DELETE ON audit BEGIN SELECT RAISE(ABORT, 'the audit log is append-only'); END;
CREATE TABLE IF NOT EXISTS workers (
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL,
    devices_json TEXT NOT NULL,
    labels_json TEXT NOT NULL,
    version TEXT NOT NULL,
    registered_ms INTEGER NOT NULL,
    alive INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS checkpoints (
    job_id TEXT NOT NULL,
    epoch INTEGER NOT NULL,
    step INTEGER NOT NULL,
    attempt INTEGER NOT NULL,
    manifest_key TEXT NOT NULL,
    created_ms INTEGER NOT NULL,
    PRIMARY KEY (job_id, epoch, step)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS events (
    job_id TEXT NOT NULL,
    seq INTEGER NOT NULL,
    body BLOB NOT NULL,
    PRIMARY KEY (job_id, seq)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS logs (
    job_id TEXT NOT NULL,
    seq INTEGER NOT NULL,
    epoch INTEGER NOT NULL,
    unix_ms INTEGER NOT NULL,
    level TEXT NOT NULL,
    message TEXT NOT NULL,
    PRIMARY KEY (job_id, seq)
) WITHOUT ROWID;
"#;

/// One device of a worker.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceInfo {
    pub kind: DeviceKind,
    pub index: u32,
    pub name: String,
    pub memory_mib: u64,
}

#[derive(Debug, Clone, PartialEq)]
pub struct WorkerRow {
    pub id: WorkerId,
    pub name: String,
    pub devices: Vec<DeviceInfo>,
    pub labels: BTreeMap<String, String>,
    pub version: String,
    pub registered_ms: i64,
    pub alive: bool,
}

#[derive(Debug, Clone, PartialEq)]
pub struct JobRow {
    pub seq: i64,
    pub id: JobId,
    pub spec: JobSpec,
    pub spec_hash: String,
    pub idempotency_key: Option<String>,
    pub state: JobState,
    pub attempt: u32,
    pub epoch: Epoch,
    pub worker_id: Option<WorkerId>,
    pub step: u64,
    pub total_steps: u64,
    pub loss: Option<f64>,
    pub latest_checkpoint: Option<String>,
    pub adapter_manifest: Option<String>,
    pub error: Option<String>,
    pub failure_class: Option<FailureClass>,
    pub created_ms: i64,
    pub updated_ms: i64,
    /// Why a queued job is not running yet (gangs), when the scheduler said.
    pub waiting_reason: Option<String>,
    /// The tenant of the token that submitted it (None: no tenant).
    pub tenant: Option<String>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct CheckpointRow {
    pub step: u64,
    pub epoch: Epoch,
    pub attempt: u32,
    pub manifest_key: String,
    pub created_ms: i64,
}

#[derive(Debug, Clone, PartialEq)]
pub struct LogRow {
    pub seq: u64,
    pub epoch: Epoch,
    pub unix_ms: i64,
    pub level: String,
    pub message: String,
}

/// sha256 of the spec's canonical JSON (struct fields in declaration order, labels sorted).
pub fn spec_hash(spec: &JobSpec) -> String {
    use sha2::{Digest, Sha256};
    let json = serde_json::to_vec(spec).expect("a JobSpec always serializes");
    hex::encode(Sha256::digest(&json))
}

fn corrupt(what: impl std::fmt::Display) -> CoordError {
    CoordError::Internal(format!("corrupt database row: {what}"))
}

fn configure(conn: &Connection) -> Result<()> {
    conn.busy_timeout(Duration::from_secs(10))?;
    conn.pragma_update(None, "journal_mode", "WAL")?;
    conn.pragma_update(None, "synchronous", "FULL")?;
    conn.pragma_update(None, "foreign_keys", "ON")?;
    // 64 MiB page cache: the active jobs' rows stay in memory (the default is 2 MiB).
    conn.pragma_update(None, "cache_size", -65_536)?;
    Ok(())
}

/// Open (creating if needed) the database for writing and bring its schema up to date.
pub fn open_writer(path: &Path) -> Result<Connection> {
    let conn = Connection::open(path)?;
    configure(&conn)?;
    conn.execute_batch(SCHEMA)?;
    // Added with gangs (additive, so the schema version stays): why a queued job waits.
    let has_reason: bool = conn.query_row("SELECT COUNT(*) FROM pragma_table_info('jobs') WHERE name = 'waiting_reason'", [], |r| r.get::<_, i64>(0))? > 0;
    if !has_reason {
        conn.execute_batch("ALTER TABLE jobs ADD COLUMN waiting_reason TEXT")?;
    }
    // Added with tokens: the tenant that submitted a job (NULL: submitted without one).
    let has_tenant: bool = conn.query_row("SELECT COUNT(*) FROM pragma_table_info('jobs') WHERE name = 'tenant'", [], |r| r.get::<_, i64>(0))? > 0;
    if !has_tenant {
        conn.execute_batch("ALTER TABLE jobs ADD COLUMN tenant TEXT; CREATE INDEX IF NOT EXISTS jobs_by_tenant ON jobs(tenant, seq);")?;
    }
    let version: Option<String> =
        conn.query_row("SELECT value FROM meta WHERE key = 'schema_version'", [], |r| r.get(0)).optional()?;
    match version {
        None => {
            conn.execute("INSERT INTO meta (key, value) VALUES ('schema_version', ?1)", [SCHEMA_VERSION.to_string()])?;
        }
        Some(v) if v == SCHEMA_VERSION.to_string() => {}
        Some(v) => return Err(CoordError::Internal(format!("database schema version {v} is not supported (expected {SCHEMA_VERSION})"))),
    }
    Ok(conn)
}

/// A read-only connection (sees committed data only).
pub fn open_reader(path: &Path) -> Result<Connection> {
    let conn = Connection::open_with_flags(path, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY | rusqlite::OpenFlags::SQLITE_OPEN_NO_MUTEX)?;
    conn.busy_timeout(Duration::from_secs(10))?;
    Ok(conn)
}

const JOB_COLUMNS: &str = "seq, id, spec_json, spec_hash, idempotency_key, state, attempt, epoch, worker_id, step, total_steps, loss, \
     latest_checkpoint, adapter_manifest, error, failure_class, created_ms, updated_ms, waiting_reason, tenant";

fn job_from_row(r: &Row<'_>) -> rusqlite::Result<Result<JobRow>> {
    let id: String = r.get(1)?;
    let spec_json: String = r.get(2)?;
    let state: String = r.get(5)?;
    let worker: Option<String> = r.get(8)?;
    let fc: Option<String> = r.get(15)?;
    let seq: i64 = r.get(0)?;
    let spec_hash: String = r.get(3)?;
    let key: Option<String> = r.get(4)?;
    let attempt: u32 = r.get(6)?;
    let epoch: i64 = r.get(7)?;
    let step: i64 = r.get(9)?;
    let total: i64 = r.get(10)?;
    let loss: Option<f64> = r.get(11)?;
    let ckpt: Option<String> = r.get(12)?;
    let adapter: Option<String> = r.get(13)?;
    let error: Option<String> = r.get(14)?;
    let created_ms: i64 = r.get(16)?;
    let updated_ms: i64 = r.get(17)?;
    let waiting_reason: Option<String> = r.get(18)?;
    let tenant: Option<String> = r.get(19)?;
    Ok((|| {
        Ok(JobRow {
            seq,
            id: id.parse().map_err(corrupt)?,
            spec: serde_json::from_str(&spec_json).map_err(|e| corrupt(format!("job {id} spec: {e}")))?,
            spec_hash,
            idempotency_key: key,
            state: state.parse().map_err(corrupt)?,
            attempt,
            epoch: Epoch(epoch as u64),
            worker_id: worker.map(|w| w.parse()).transpose().map_err(corrupt)?,
            step: step as u64,
            total_steps: total as u64,
            loss,
            latest_checkpoint: ckpt,
            adapter_manifest: adapter,
            error,
            failure_class: match fc.as_deref() {
                None => None,
                Some("retryable") => Some(FailureClass::Retryable),
                Some("non_retryable") => Some(FailureClass::NonRetryable),
                Some(other) => return Err(corrupt(format!("failure class {other:?}"))),
            },
            created_ms,
            updated_ms,
            waiting_reason,
            tenant,
        })
    })())
}

fn query_jobs(conn: &Connection, sql: &str, params: &[&dyn rusqlite::ToSql]) -> Result<Vec<JobRow>> {
    let mut stmt = conn.prepare_cached(sql)?;
    let rows = stmt.query_map(params, job_from_row)?;
    let mut out = Vec::new();
    for r in rows {
        out.push(r??);
    }
    Ok(out)
}

pub fn get_job(conn: &Connection, id: &JobId) -> Result<Option<JobRow>> {
    let sql = format!("SELECT {JOB_COLUMNS} FROM jobs WHERE id = ?1");
    Ok(query_jobs(conn, &sql, &[&id.to_string()])?.pop())
}

pub fn find_by_idempotency_key(conn: &Connection, key: &str) -> Result<Option<JobRow>> {
    let sql = format!("SELECT {JOB_COLUMNS} FROM jobs WHERE idempotency_key = ?1");
    Ok(query_jobs(conn, &sql, &[&key])?.pop())
}

/// Every job that is not final, in submission order (recovery).
pub fn load_active_jobs(conn: &Connection) -> Result<Vec<JobRow>> {
    let sql = format!("SELECT {JOB_COLUMNS} FROM jobs WHERE state IN ('queued', 'running', 'cancelling') ORDER BY seq");
    query_jobs(conn, &sql, &[])
}

/// Jobs newest first, filtered by state (any of) and labels (all of), strictly older
/// than `before_seq` when given.
pub fn list_jobs(
    conn: &Connection,
    states: &[JobState],
    labels: &BTreeMap<String, String>,
    before_seq: Option<i64>,
    limit: u32,
    tenant: Option<&str>,
) -> Result<Vec<JobRow>> {
    let mut sql = format!("SELECT {JOB_COLUMNS} FROM jobs j WHERE 1=1");
    let mut args: Vec<Box<dyn rusqlite::ToSql>> = Vec::new();
    if let Some(t) = tenant {
        args.push(Box::new(t.to_string()));
        sql.push_str(&format!(" AND tenant = ?{}", args.len()));
    }
    if !states.is_empty() {
        let marks: Vec<String> = states
            .iter()
            .map(|s| {
                args.push(Box::new(s.as_str()));
                format!("?{}", args.len())
            })
            .collect();
        sql.push_str(&format!(" AND state IN ({})", marks.join(",")));
    }
    for (k, v) in labels {
        args.push(Box::new(k.clone()));
        let kk = args.len();
        args.push(Box::new(v.clone()));
        let vv = args.len();
        sql.push_str(&format!(" AND EXISTS (SELECT 1 FROM job_labels l WHERE l.job_seq = j.seq AND l.key = ?{kk} AND l.value = ?{vv})"));
    }
    if let Some(b) = before_seq {
        args.push(Box::new(b));
        sql.push_str(&format!(" AND seq < ?{}", args.len()));
    }
    args.push(Box::new(limit as i64));
    sql.push_str(&format!(" ORDER BY seq DESC LIMIT ?{}", args.len()));
    let refs: Vec<&dyn rusqlite::ToSql> = args.iter().map(|b| b.as_ref()).collect();
    query_jobs(conn, &sql, &refs)
}

pub fn count_by_state(conn: &Connection) -> Result<Vec<(JobState, u64)>> {
    let mut stmt = conn.prepare_cached("SELECT state, COUNT(*) FROM jobs GROUP BY state")?;
    let rows = stmt.query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?)))?;
    let mut out = Vec::new();
    for r in rows {
        let (s, n) = r?;
        out.push((s.parse().map_err(corrupt)?, n as u64));
    }
    Ok(out)
}

/// Insert a new job; returns its `seq`.
pub fn insert_job(conn: &Connection, j: &JobRow) -> Result<i64> {
    let spec_json = serde_json::to_string(&j.spec).expect("a JobSpec always serializes");
    conn.prepare_cached(
        "INSERT INTO jobs (id, name, spec_json, spec_hash, idempotency_key, state, priority, attempt, epoch, max_attempts, \
         created_ms, updated_ms, tenant) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13)",
    )?
    .execute(params![
        j.id.to_string(),
        j.spec.name,
        spec_json,
        j.spec_hash,
        j.idempotency_key,
        j.state.as_str(),
        j.spec.priority,
        j.attempt,
        j.epoch.get() as i64,
        j.spec.max_attempts,
        j.created_ms,
        j.updated_ms,
        j.tenant
    ])?;
    let seq = conn.last_insert_rowid();
    let mut stmt = conn.prepare_cached("INSERT INTO job_labels (job_seq, key, value) VALUES (?1, ?2, ?3)")?;
    for (k, v) in &j.spec.labels {
        stmt.execute(params![seq, k, v])?;
    }
    Ok(seq)
}

/// Persist a dispatch: the job is running under a new epoch and attempt, and the attempt
/// row exists. Must commit before the lease is handed out.
pub fn record_dispatch(
    conn: &Connection,
    id: &JobId,
    attempt: u32,
    epoch: Epoch,
    worker: &WorkerId,
    devices: &[u32],
    now_ms: i64,
) -> Result<()> {
    let n = conn
        .prepare_cached(
            "UPDATE jobs SET state = 'running', attempt = ?2, epoch = ?3, worker_id = ?4, updated_ms = ?5 \
             WHERE id = ?1 AND state = 'queued' AND epoch < ?3",
        )?
        .execute(params![id.to_string(), attempt, epoch.get() as i64, worker.to_string(), now_ms])?;
    if n != 1 {
        return Err(CoordError::Internal(format!("dispatch of job {id} at epoch {epoch} matched {n} rows")));
    }
    conn.prepare_cached(
        "INSERT INTO attempts (job_id, epoch, attempt, worker_id, devices_json, started_ms) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
    )?
    .execute(params![
        id.to_string(),
        epoch.get() as i64,
        attempt,
        worker.to_string(),
        serde_json::to_string(devices).expect("serializes"),
        now_ms
    ])?;
    Ok(())
}

/// The members of a job's attempt by node rank: one per node of a gang (one for other
/// jobs), written in the dispatch's transaction.
pub fn insert_attempt_members(conn: &Connection, id: &JobId, epoch: Epoch, members: &[(WorkerId, Vec<u32>)]) -> Result<()> {
    let mut stmt = conn.prepare_cached("INSERT INTO attempt_members (job_id, epoch, node_rank, worker_id, devices_json) VALUES (?1, ?2, ?3, ?4, ?5)")?;
    for (i, (w, d)) in members.iter().enumerate() {
        stmt.execute(params![id.to_string(), epoch.get() as i64, i as i64, w.to_string(), serde_json::to_string(d).expect("serializes")])?;
    }
    Ok(())
}

/// The members of an attempt in node order (empty for attempts from before gangs).
pub fn attempt_members(conn: &Connection, id: &JobId, epoch: Epoch) -> Result<Vec<(WorkerId, Vec<u32>)>> {
    let mut stmt = conn.prepare_cached("SELECT worker_id, devices_json FROM attempt_members WHERE job_id = ?1 AND epoch = ?2 ORDER BY node_rank")?;
    let rows = stmt.query_map(params![id.to_string(), epoch.get() as i64], |r| Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?)))?;
    let mut out = Vec::new();
    for r in rows {
        let (w, d) = r?;
        out.push((w.parse().map_err(corrupt)?, serde_json::from_str(&d).map_err(|e| corrupt(format!("attempt member devices of {id}: {e}")))?));
    }
    Ok(out)
}

/// One row of the audit log (`seq` is assigned by the store).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditRow {
    #[serde(default)]
    pub seq: u64,
    pub unix_ms: i64,
    pub token_id: String,
    pub role: String,
    pub tenant: String,
    pub method: String,
    pub target: String,
    pub outcome: String,
    pub detail: String,
}

/// Append audit rows (the table refuses updates and deletes).
pub fn insert_audit(conn: &Connection, rows: &[AuditRow]) -> Result<()> {
    let mut st = conn.prepare_cached(
        "INSERT INTO audit (unix_ms, token_id, role, tenant, method, target, outcome, detail) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
    )?;
    for r in rows {
        st.execute(params![r.unix_ms, r.token_id, r.role, r.tenant, r.method, r.target, r.outcome, r.detail])?;
    }
    Ok(())
}

/// Audit rows after `after`, oldest first, optionally of one tenant and/or token.
pub fn audit_after(conn: &Connection, after: u64, limit: u32, tenant: Option<&str>, token_id: Option<&str>) -> Result<Vec<AuditRow>> {
    let mut st = conn.prepare_cached(
        "SELECT seq, unix_ms, token_id, role, tenant, method, target, outcome, detail FROM audit \
         WHERE seq > ?1 AND (?2 IS NULL OR tenant = ?2) AND (?3 IS NULL OR token_id = ?3) ORDER BY seq LIMIT ?4",
    )?;
    let rows = st.query_map(params![after as i64, tenant, token_id, limit], |r| {
        Ok(AuditRow {
            seq: r.get::<_, i64>(0)? as u64,
            unix_ms: r.get(1)?,
            token_id: r.get(2)?,
            role: r.get(3)?,
            tenant: r.get(4)?,
            method: r.get(5)?,
            target: r.get(6)?,
            outcome: r.get(7)?,
            detail: r.get(8)?,
        })
    })?;
    Ok(rows.collect::<rusqlite::Result<Vec<_>>>()?)
}

/// Record that `tenant` uploaded dataset `sha256`; returns whether it had before.
pub fn record_tenant_dataset(conn: &Connection, tenant: &str, sha256: &str, now_ms: i64) -> Result<bool> {
    let n = conn
        .prepare_cached("INSERT OR IGNORE INTO tenant_datasets (tenant, sha256, created_ms) VALUES (?1, ?2, ?3)")?
        .execute(params![tenant, sha256, now_ms])?;
    Ok(n == 0)
}

/// Has `tenant` uploaded dataset `sha256`?
pub fn tenant_has_dataset(conn: &Connection, tenant: &str, sha256: &str) -> Result<bool> {
    Ok(conn
        .prepare_cached("SELECT 1 FROM tenant_datasets WHERE tenant = ?1 AND sha256 = ?2")?
        .query_row(params![tenant, sha256], |_| Ok(()))
        .optional()?
        .is_some())
}

/// Record why a queued job waits (None: it no longer does).
pub fn set_waiting_reason(conn: &Connection, id: &JobId, reason: Option<&str>) -> Result<()> {
    conn.prepare_cached("UPDATE jobs SET waiting_reason = ?2 WHERE id = ?1")?.execute(params![id.to_string(), reason])?;
    Ok(())
}

/// The latest progress of one rank of a job's current attempt.
pub fn upsert_rank(conn: &Connection, id: &JobId, epoch: Epoch, r: &lorafleet_proto::RankStatus) -> Result<()> {
    conn.prepare_cached(
        "INSERT OR REPLACE INTO job_ranks (job_id, rank, epoch, node_rank, worker_id, step, tokens_per_sec, updated_ms)          VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
    )?
    .execute(params![id.to_string(), r.rank, epoch.get() as i64, r.node_rank, r.worker_id, r.step as i64, r.tokens_per_sec, r.updated_at_unix_ms])?;
    Ok(())
}

/// Forget a job's rank progress (a new attempt starts).
pub fn clear_ranks(conn: &Connection, id: &JobId) -> Result<()> {
    conn.prepare_cached("DELETE FROM job_ranks WHERE job_id = ?1")?.execute([id.to_string()])?;
    Ok(())
}

/// The ranks of a job's latest attempt that reported progress, by rank.
pub fn job_ranks(conn: &Connection, id: &JobId) -> Result<Vec<lorafleet_proto::RankStatus>> {
    let mut stmt =
        conn.prepare_cached("SELECT rank, node_rank, worker_id, step, tokens_per_sec, updated_ms FROM job_ranks WHERE job_id = ?1 ORDER BY rank")?;
    let rows = stmt.query_map([id.to_string()], |r| {
        Ok(lorafleet_proto::RankStatus {
            rank: r.get(0)?,
            node_rank: r.get(1)?,
            worker_id: r.get(2)?,
            step: r.get::<_, i64>(3)? as u64,
            tokens_per_sec: r.get(4)?,
            updated_at_unix_ms: r.get(5)?,
        })
    })?;
    Ok(rows.collect::<rusqlite::Result<Vec<_>>>()?)
}

/// The devices of a job's attempt (recovery of device assignments).
pub fn attempt_devices(conn: &Connection, id: &JobId, epoch: Epoch) -> Result<Vec<u32>> {
    let json: Option<String> = conn
        .prepare_cached("SELECT devices_json FROM attempts WHERE job_id = ?1 AND epoch = ?2")?
        .query_row(params![id.to_string(), epoch.get() as i64], |r| r.get(0))
        .optional()?;
    match json {
        None => Ok(Vec::new()),
        Some(j) => serde_json::from_str(&j).map_err(|e| corrupt(format!("attempt devices of {id}: {e}"))),
    }
}

pub fn end_attempt(conn: &Connection, id: &JobId, epoch: Epoch, outcome: &str, reason: &str, now_ms: i64) -> Result<()> {
    conn.prepare_cached(
        "UPDATE attempts SET ended_ms = ?3, outcome = ?4, reason = ?5 WHERE job_id = ?1 AND epoch = ?2 AND ended_ms IS NULL",
    )?
    .execute(params![id.to_string(), epoch.get() as i64, now_ms, outcome, reason])?;
    Ok(())
}

#[derive(Debug, Clone, PartialEq)]
pub struct AttemptRow {
    pub epoch: Epoch,
    pub attempt: u32,
    pub worker_id: String,
    /// `None` while the attempt runs.
    pub outcome: Option<String>,
}

/// Every attempt of a job, by epoch.
pub fn list_attempts(conn: &Connection, id: &JobId) -> Result<Vec<AttemptRow>> {
    let mut stmt = conn.prepare_cached("SELECT epoch, attempt, worker_id, outcome FROM attempts WHERE job_id = ?1 ORDER BY epoch")?;
    let rows = stmt.query_map([id.to_string()], |r| {
        Ok(AttemptRow { epoch: Epoch(r.get::<_, i64>(0)? as u64), attempt: r.get(1)?, worker_id: r.get(2)?, outcome: r.get(3)? })
    })?;
    Ok(rows.collect::<rusqlite::Result<Vec<_>>>()?)
}

/// A state change without a lease (queued, final, cancelling). `worker` is kept for
/// cancelling (the lease is still live) and cleared otherwise by passing `None`.
#[allow(clippy::too_many_arguments)]
pub fn update_state(
    conn: &Connection,
    id: &JobId,
    state: JobState,
    worker: Option<&WorkerId>,
    error: Option<&str>,
    failure_class: Option<FailureClass>,
    adapter_manifest: Option<&str>,
    now_ms: i64,
) -> Result<()> {
    conn.prepare_cached(
        "UPDATE jobs SET state = ?2, worker_id = ?3, error = COALESCE(?4, error), failure_class = COALESCE(?5, failure_class), \
         adapter_manifest = COALESCE(?6, adapter_manifest), updated_ms = ?7 WHERE id = ?1",
    )?
    .execute(params![
        id.to_string(),
        state.as_str(),
        worker.map(|w| w.to_string()),
        error,
        failure_class.map(|c| c.as_str()),
        adapter_manifest,
        now_ms
    ])?;
    Ok(())
}

pub fn update_progress(conn: &Connection, id: &JobId, step: u64, total_steps: u64, loss: Option<f64>, now_ms: i64) -> Result<()> {
    conn.prepare_cached("UPDATE jobs SET step = ?2, total_steps = ?3, loss = COALESCE(?4, loss), updated_ms = ?5 WHERE id = ?1")?
        .execute(params![id.to_string(), step as i64, total_steps as i64, loss, now_ms])?;
    Ok(())
}

pub fn update_progress_loss(conn: &Connection, id: &JobId, loss: f64, now_ms: i64) -> Result<()> {
    conn.prepare_cached("UPDATE jobs SET loss = ?2, updated_ms = ?3 WHERE id = ?1")?.execute(params![id.to_string(), loss, now_ms])?;
    Ok(())
}

pub fn insert_checkpoint(conn: &Connection, id: &JobId, c: &CheckpointRow) -> Result<()> {
    conn.prepare_cached(
        "INSERT OR REPLACE INTO checkpoints (job_id, epoch, step, attempt, manifest_key, created_ms) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
    )?
    .execute(params![id.to_string(), c.epoch.get() as i64, c.step as i64, c.attempt, c.manifest_key, c.created_ms])?;
    conn.prepare_cached("UPDATE jobs SET latest_checkpoint = ?2, updated_ms = ?3 WHERE id = ?1")?
        .execute(params![id.to_string(), c.manifest_key, c.created_ms])?;
    Ok(())
}

pub fn list_checkpoints(conn: &Connection, id: &JobId) -> Result<Vec<CheckpointRow>> {
    let mut stmt = conn.prepare_cached(
        "SELECT step, epoch, attempt, manifest_key, created_ms FROM checkpoints WHERE job_id = ?1 ORDER BY created_ms, epoch, step",
    )?;
    let rows = stmt.query_map([id.to_string()], |r| {
        Ok(CheckpointRow {
            step: r.get::<_, i64>(0)? as u64,
            epoch: Epoch(r.get::<_, i64>(1)? as u64),
            attempt: r.get(2)?,
            manifest_key: r.get(3)?,
            created_ms: r.get(4)?,
        })
    })?;
    Ok(rows.collect::<rusqlite::Result<Vec<_>>>()?)
}

pub fn insert_event(conn: &Connection, id: &JobId, seq: u64, body: &[u8]) -> Result<()> {
    conn.prepare_cached("INSERT INTO events (job_id, seq, body) VALUES (?1, ?2, ?3)")?.execute(params![
        id.to_string(),
        seq as i64,
        body
    ])?;
    if seq > MAX_EVENTS_PER_JOB && seq & 127 == 0 {
        conn.prepare_cached("DELETE FROM events WHERE job_id = ?1 AND seq <= ?2")?
            .execute(params![id.to_string(), (seq - MAX_EVENTS_PER_JOB) as i64])?;
    }
    Ok(())
}

pub fn events_after(conn: &Connection, id: &JobId, after_seq: u64, limit: u32) -> Result<Vec<(u64, Vec<u8>)>> {
    let mut stmt = conn.prepare_cached("SELECT seq, body FROM events WHERE job_id = ?1 AND seq > ?2 ORDER BY seq LIMIT ?3")?;
    let rows = stmt.query_map(params![id.to_string(), after_seq as i64, limit as i64], |r| {
        Ok((r.get::<_, i64>(0)? as u64, r.get::<_, Vec<u8>>(1)?))
    })?;
    Ok(rows.collect::<rusqlite::Result<Vec<_>>>()?)
}

pub fn insert_log(conn: &Connection, id: &JobId, l: &LogRow) -> Result<()> {
    conn.prepare_cached("INSERT INTO logs (job_id, seq, epoch, unix_ms, level, message) VALUES (?1, ?2, ?3, ?4, ?5, ?6)")?
        .execute(params![id.to_string(), l.seq as i64, l.epoch.get() as i64, l.unix_ms, l.level, l.message])?;
    if l.seq > MAX_LOGS_PER_JOB && l.seq & 255 == 0 {
        conn.prepare_cached("DELETE FROM logs WHERE job_id = ?1 AND seq <= ?2")?
            .execute(params![id.to_string(), (l.seq - MAX_LOGS_PER_JOB) as i64])?;
    }
    Ok(())
}

/// Log lines after `after_seq`, and whether older lines were dropped.
pub fn logs_after(conn: &Connection, id: &JobId, after_seq: u64, limit: u32) -> Result<(Vec<LogRow>, bool)> {
    let mut stmt = conn.prepare_cached(
        "SELECT seq, epoch, unix_ms, level, message FROM logs WHERE job_id = ?1 AND seq > ?2 ORDER BY seq LIMIT ?3",
    )?;
    let rows = stmt.query_map(params![id.to_string(), after_seq as i64, limit as i64], |r| {
        Ok(LogRow {
            seq: r.get::<_, i64>(0)? as u64,
            epoch: Epoch(r.get::<_, i64>(1)? as u64),
            unix_ms: r.get(2)?,
            level: r.get(3)?,
            message: r.get(4)?,
        })
    })?;
    let rows = rows.collect::<rusqlite::Result<Vec<_>>>()?;
    let min: Option<i64> =
        conn.prepare_cached("SELECT MIN(seq) FROM logs WHERE job_id = ?1")?.query_row([id.to_string()], |r| r.get(0))?;
    let truncated = min.is_some_and(|m| m as u64 > after_seq + 1);
    Ok((rows, truncated))
}

/// Highest event and log sequence numbers of a job (recovery).
pub fn max_seqs(conn: &Connection, id: &JobId) -> Result<(u64, u64)> {
    let ev: Option<i64> =
        conn.prepare_cached("SELECT MAX(seq) FROM events WHERE job_id = ?1")?.query_row([id.to_string()], |r| r.get(0))?;
    let lg: Option<i64> =
        conn.prepare_cached("SELECT MAX(seq) FROM logs WHERE job_id = ?1")?.query_row([id.to_string()], |r| r.get(0))?;
    Ok((ev.unwrap_or(0) as u64, lg.unwrap_or(0) as u64))
}

pub fn insert_worker(conn: &Connection, w: &WorkerRow) -> Result<()> {
    conn.prepare_cached(
        "INSERT INTO workers (id, name, devices_json, labels_json, version, registered_ms, alive) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
    )?
    .execute(params![
        w.id.to_string(),
        w.name,
        serde_json::to_string(&w.devices).expect("serializes"),
        serde_json::to_string(&w.labels).expect("serializes"),
        w.version,
        w.registered_ms,
        w.alive
    ])?;
    Ok(())
}

pub fn set_worker_alive(conn: &Connection, id: &WorkerId, alive: bool) -> Result<()> {
    conn.prepare_cached("UPDATE workers SET alive = ?2 WHERE id = ?1")?.execute(params![id.to_string(), alive])?;
    Ok(())
}

pub fn load_workers(conn: &Connection, include_dead: bool) -> Result<Vec<WorkerRow>> {
    let sql = if include_dead {
        "SELECT id, name, devices_json, labels_json, version, registered_ms, alive FROM workers ORDER BY registered_ms"
    } else {
        "SELECT id, name, devices_json, labels_json, version, registered_ms, alive FROM workers WHERE alive = 1 ORDER BY registered_ms"
    };
    let mut stmt = conn.prepare_cached(sql)?;
    let rows = stmt.query_map([], |r| {
        Ok((
            r.get::<_, String>(0)?,
            r.get::<_, String>(1)?,
            r.get::<_, String>(2)?,
            r.get::<_, String>(3)?,
            r.get::<_, String>(4)?,
            r.get::<_, i64>(5)?,
            r.get::<_, bool>(6)?,
        ))
    })?;
    let mut out = Vec::new();
    for r in rows {
        let (id, name, devices, labels, version, registered_ms, alive) = r?;
        out.push(WorkerRow {
            id: id.parse().map_err(corrupt)?,
            name,
            devices: serde_json::from_str(&devices).map_err(|e| corrupt(format!("worker {id} devices: {e}")))?,
            labels: serde_json::from_str(&labels).map_err(|e| corrupt(format!("worker {id} labels: {e}")))?,
            version,
            registered_ms,
            alive,
        });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use lorafleet_shared::spec::SpecContext;

    fn spec(name: &str) -> JobSpec {
        let y = format!("name: {name}\nmodel: {{ source: m }}\ndata: {{ train: t }}\noutput: {{ dir: o }}\nlabels: {{ team: a }}\n");
        JobSpec::from_yaml(&y, SpecContext::Remote).unwrap()
    }

    fn job(name: &str, key: Option<&str>) -> JobRow {
        let s = spec(name);
        JobRow {
            seq: 0,
            id: JobId::new(),
            spec_hash: spec_hash(&s),
            spec: s,
            idempotency_key: key.map(String::from),
            state: JobState::Queued,
            attempt: 0,
            epoch: Epoch::ZERO,
            worker_id: None,
            step: 0,
            total_steps: 0,
            loss: None,
            latest_checkpoint: None,
            adapter_manifest: None,
            error: None,
            failure_class: None,
            created_ms: 1,
            updated_ms: 1,
            waiting_reason: None,
            tenant: None,
        }
    }

    #[test]
    fn jobs_survive_reopen_with_epochs() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.db");
        let j = job("a", Some("k1"));
        {
            let conn = open_writer(&path).unwrap();
            let seq = insert_job(&conn, &j).unwrap();
            assert_eq!(seq, 1);
            let w = WorkerId::new();
            record_dispatch(&conn, &j.id, 1, Epoch(1), &w, &[0], 5).unwrap();
            // A second dispatch at the same epoch is refused by the row guard.
            assert!(record_dispatch(&conn, &j.id, 1, Epoch(1), &w, &[0], 5).is_err());
            end_attempt(&conn, &j.id, Epoch(1), "lease_expired", "silent", 6).unwrap();
            update_state(&conn, &j.id, JobState::Queued, None, Some("silent"), Some(FailureClass::Retryable), None, 6).unwrap();
            record_dispatch(&conn, &j.id, 2, Epoch(2), &w, &[0], 7).unwrap();
        }
        let conn = open_writer(&path).unwrap();
        let got = get_job(&conn, &j.id).unwrap().unwrap();
        assert_eq!((got.state, got.epoch, got.attempt), (JobState::Running, Epoch(2), 2));
        assert_eq!(got.failure_class, Some(FailureClass::Retryable));
        let attempts = list_attempts(&conn, &j.id).unwrap();
        assert_eq!(attempts.iter().map(|a| (a.epoch, a.outcome.clone())).collect::<Vec<_>>(), vec![(Epoch(1), Some("lease_expired".into())), (Epoch(2), None)]);
        assert_eq!(got.spec, j.spec);
        assert_eq!(find_by_idempotency_key(&conn, "k1").unwrap().unwrap().id, j.id);
        assert_eq!(attempt_devices(&conn, &j.id, Epoch(2)).unwrap(), vec![0]);
        assert_eq!(load_active_jobs(&conn).unwrap().len(), 1);
    }

    #[test]
    fn idempotency_key_is_unique() {
        let dir = tempfile::tempdir().unwrap();
        let conn = open_writer(&dir.path().join("c.db")).unwrap();
        insert_job(&conn, &job("a", Some("k"))).unwrap();
        assert!(insert_job(&conn, &job("b", Some("k"))).is_err());
        insert_job(&conn, &job("c", None)).unwrap();
        insert_job(&conn, &job("d", None)).unwrap();
    }

    #[test]
    fn list_filters_and_pages() {
        let dir = tempfile::tempdir().unwrap();
        let conn = open_writer(&dir.path().join("c.db")).unwrap();
        let mut ids = Vec::new();
        for i in 0..5 {
            let mut j = job(&format!("j{i}"), None);
            if i % 2 == 0 {
                j.spec.labels.insert("team".into(), "b".into());
            }
            insert_job(&conn, &j).unwrap();
            ids.push(j.id);
        }
        update_state(&conn, &ids[4], JobState::Cancelled, None, Some("user"), None, None, 2).unwrap();
        let all = list_jobs(&conn, &[], &BTreeMap::new(), None, 100, None).unwrap();
        assert_eq!(all.iter().map(|j| j.id).collect::<Vec<_>>(), ids.iter().rev().copied().collect::<Vec<_>>());
        let queued = list_jobs(&conn, &[JobState::Queued], &BTreeMap::new(), None, 100, None).unwrap();
        assert_eq!(queued.len(), 4);
        let team_b = list_jobs(&conn, &[], &BTreeMap::from([("team".into(), "b".into())]), None, 100, None).unwrap();
        assert_eq!(team_b.iter().map(|j| j.id).collect::<Vec<_>>(), vec![ids[4], ids[2], ids[0]]);
        let page1 = list_jobs(&conn, &[], &BTreeMap::new(), None, 2, None).unwrap();
        let page2 = list_jobs(&conn, &[], &BTreeMap::new(), Some(page1[1].seq), 2, None).unwrap();
        assert_eq!(page2.iter().map(|j| j.id).collect::<Vec<_>>(), vec![ids[2], ids[1]]);
        let counts = count_by_state(&conn).unwrap();
        assert!(counts.contains(&(JobState::Queued, 4)) && counts.contains(&(JobState::Cancelled, 1)));
    }

    #[test]
    fn events_and_logs_are_bounded() {
        let dir = tempfile::tempdir().unwrap();
        let mut conn = open_writer(&dir.path().join("c.db")).unwrap();
        let id = JobId::new();
        let tx = conn.transaction().unwrap();
        for seq in 1..=(MAX_LOGS_PER_JOB + 512) {
            insert_log(&tx, &id, &LogRow { seq, epoch: Epoch(1), unix_ms: 0, level: "info".into(), message: "x".into() }).unwrap();
        }
        for seq in 1..=(MAX_EVENTS_PER_JOB + 200) {
            insert_event(&tx, &id, seq, b"e").unwrap();
        }
        tx.commit().unwrap();
        let (rows, truncated) = logs_after(&conn, &id, 0, 5).unwrap();
        assert!(truncated);
        assert!(rows[0].seq > 1);
        let n: i64 = conn.query_row("SELECT COUNT(*) FROM logs", [], |r| r.get(0)).unwrap();
        assert!(n as u64 <= MAX_LOGS_PER_JOB + 256, "{n}");
        let n: i64 = conn.query_row("SELECT COUNT(*) FROM events", [], |r| r.get(0)).unwrap();
        assert!(n as u64 <= MAX_EVENTS_PER_JOB + 128, "{n}");
        assert_eq!(max_seqs(&conn, &id).unwrap(), (MAX_EVENTS_PER_JOB + 200, MAX_LOGS_PER_JOB + 512));
    }
}

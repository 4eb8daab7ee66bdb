//! The gRPC services and the request checks they share.

pub mod admin;
pub mod jobs;
pub mod workers;

use crate::control::ControlHandle;
use crate::error::CoordError;
use crate::persistence::JobRow;
use crate::readers::Readers;
use lorafleet_proto as pb;
use lorafleet_proto::convert::{failure_class_to_pb, spec_to_pb, state_to_pb};
use lorafleet_shared::ids::JobId;
use lorafleet_shared::spec::JobSpec;
use lorafleet_storage::{Manifest, RelPath, Storage};
use std::sync::Arc;

/// What both services use.
pub struct Shared {
    pub control: ControlHandle,
    pub readers: Arc<Readers>,
    pub storage: Storage,
    /// The token this coordinator wrote at `layout::coordinator_marker()` at start:
    /// workers read it back to prove they see the same storage.
    pub storage_marker: String,
    /// Becomes true when the server shuts down (ends watch streams).
    pub shutdown: tokio::sync::watch::Receiver<bool>,
    /// Per-caller limits (rate, streams, sizes).
    pub guards: Arc<crate::limits::Guards>,
    pub audit: Arc<crate::audit::Audit>,
    pub metrics: Arc<crate::metrics::Metrics>,
    /// Where models may come from.
    pub models: crate::sources::ModelPolicy,
}

/// The caller of a request, when the coordinator authenticates callers.
pub fn caller<T>(req: &tonic::Request<T>) -> Option<Arc<crate::auth::Identity>> {
    req.extensions().get::<Arc<crate::auth::Identity>>().cloned()
}

pub fn job_to_pb(j: &JobRow) -> pb::Job {
    pb::Job {
        job_id: j.id.to_string(),
        spec: Some(spec_to_pb(&j.spec)),
        state: state_to_pb(j.state) as i32,
        attempt: j.attempt,
        epoch: j.epoch.get(),
        worker_id: j.worker_id.map(|w| w.to_string()).unwrap_or_default(),
        step: j.step,
        total_steps: j.total_steps,
        latest_checkpoint_key: j.latest_checkpoint.clone().unwrap_or_default(),
        adapter_manifest_key: j.adapter_manifest.clone().unwrap_or_default(),
        error: j.error.clone().unwrap_or_default(),
        failure_class: j.failure_class.map(failure_class_to_pb).unwrap_or(pb::FailureClass::Unspecified) as i32,
        // Stored scoped by tenant (`<tenant>\u{1f}<key>`): the caller's key is shown.
        idempotency_key: j.idempotency_key.as_deref().map(|k| k.rsplit_once('\u{1f}').map(|(_, k)| k).unwrap_or(k)).unwrap_or_default().to_string(),
        created_at_unix_ms: j.created_ms,
        updated_at_unix_ms: j.updated_ms,
        loss: j.loss,
        waiting_reason: j.waiting_reason.clone().unwrap_or_default(),
        ranks: Vec::new(),
    }
}

/// A location a worker will read: an allowed URL scheme or a safe relative name, never
/// an absolute path, a `..` component, a backslash or NUL.
fn check_location(field: &str, s: &str, schemes: &[&str], allow_relative: bool) -> Result<(), CoordError> {
    let bad = |why: &str| Err(CoordError::InvalidArgument(format!("{field}: {why}, got {:?}", s.escape_default().to_string())));
    if s.contains('\0') {
        return bad("must not contain NUL");
    }
    if s.contains('\\') {
        return bad("must not contain backslashes");
    }
    let (scheme, rest) = match s.split_once("://") {
        Some((sc, rest)) => (Some(sc), rest),
        None => (None, s),
    };
    if rest.split('/').any(|c| c == "..") {
        return bad("must not contain '..'");
    }
    match scheme {
        Some(sc) if schemes.contains(&sc) => {
            match sc {
                "dataset" => match lorafleet_storage::parse_dataset_ref(s) {
                    Some(Ok(_)) => {}
                    _ => return bad("dataset refs look like dataset://sha256/<64 lowercase hex>"),
                },
                "hf" => {
                    if let Err(e) = lorafleet_storage::hub::parse_hf(s) {
                        return bad(&e.to_string());
                    }
                }
                _ => {
                    // What the workers' URL parser reads must be what is written: the
                    // bucket before the first '/', no user, port, query or escapes (a
                    // `%2e%2e` would be a `..` to the parser).
                    let bucket = rest.split('/').next().unwrap_or("");
                    let bucket_ok = !bucket.is_empty()
                        && bucket.len() <= 63
                        && bucket.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || "-._".contains(c));
                    if !bucket_ok {
                        return bad("the bucket (or container) must be 1-63 lowercase letters, digits, '-', '.' or '_'");
                    }
                    if rest.contains(['%', '@', '?', '#']) || rest.split('/').any(|c| c == ".") {
                        return bad("must not contain '%', '@', '?', '#' or '.' components (write keys unencoded)");
                    }
                }
            }
            Ok(())
        }
        Some(_) => bad(&format!("scheme must be one of {}", schemes.join(", "))),
        None if !allow_relative => bad(&format!("must be a URL ({}://...); upload local files first", schemes.join("://, "))),
        None if s.starts_with('/') => bad("must not be an absolute path"),
        None => Ok(()),
    }
}

/// Remote-only checks beyond `JobSpec::validate(SpecContext::Remote)`: every location a
/// worker will open must be safe on the worker's machine.
pub fn check_remote_spec(spec: &JobSpec) -> Result<(), CoordError> {
    check_location("model.source", &spec.model.source, &["hf", "s3"], true)?;
    if let Some(a) = &spec.lora.init_adapter {
        check_location("lora.init_adapter", a, &["hf", "s3"], true)?;
    }
    check_location("data.train", &spec.data.train, &["dataset", "s3"], false)?;
    if let Some(e) = &spec.data.eval {
        check_location("data.eval", e, &["dataset", "s3"], false)?;
    }
    Ok(())
}

/// A key a worker reports for its attempt must be a safe relative key under that
/// attempt's own prefix `jobs/<job_id>/attempts/<epoch>/`: a worker can only point the
/// job at what its own lease wrote.
pub fn check_attempt_key(field: &str, job_id: &JobId, epoch: u64, key: &str) -> Result<(), CoordError> {
    if key.ends_with('/') || key.contains("//") {
        return Err(CoordError::InvalidArgument(format!("{field}: must name an object (no empty path segment), got {key:?}")));
    }
    check_job_key(field, job_id, key)?;
    let prefix = format!("jobs/{job_id}/attempts/{epoch}/");
    if !key.starts_with(&prefix) || key.len() == prefix.len() {
        return Err(CoordError::InvalidArgument(format!("{field}: must be under this attempt's prefix {prefix}, got {key:?}")));
    }
    Ok(())
}

/// Publish a succeeded job's adapter: copy the accepted attempt's adapter directory
/// (`adapter_manifest_key`) to `jobs/<job>/adapter/`, verified, manifest last and
/// create-only. Only the coordinator writes there, and only from an attempt whose
/// completion it has durably accepted, so the copy is the same whoever runs it and
/// running it again is a no-op. Returns the published directory and its manifest.
pub async fn publish_adapter(storage: &Storage, job_id: &JobId, adapter_manifest_key: &str) -> Result<(RelPath, Manifest), CoordError> {
    use lorafleet_storage::layout;
    let src = layout::manifest_dir(adapter_manifest_key).map_err(jobs::storage_err)?;
    let job = lorafleet_storage::Segment::new(job_id.to_string()).map_err(jobs::storage_err)?;
    let dst = layout::final_adapter(&job);
    let meta = [("job_id".to_string(), serde_json::json!(job_id.to_string())), ("published_from".to_string(), serde_json::json!(src.to_string()))];
    let manifest = storage.copy_dir(&src, &dst, meta.into_iter().collect()).await.map_err(jobs::storage_err)?;
    Ok((dst, manifest))
}

/// A key a worker reports must be a safe relative key under `jobs/<job_id>/`.
pub fn check_job_key(field: &str, job_id: &JobId, key: &str) -> Result<(), CoordError> {
    let bad = |why: String| Err(CoordError::InvalidArgument(format!("{field}: {why}")));
    let p = match RelPath::parse(key.trim_end_matches('/')) {
        Ok(p) => p,
        Err(e) => return bad(e.to_string()),
    };
    let segs = p.segments();
    if segs.len() < 3 || segs[0].as_str() != "jobs" || segs[1].as_str() != job_id.to_string() {
        return bad(format!("must be under jobs/{job_id}/, got {key:?}"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use lorafleet_shared::spec::SpecContext;

    fn spec(train: &str, source: &str) -> JobSpec {
        let y = format!("name: a\nmodel: {{ source: {source:?} }}\ndata: {{ train: {train:?} }}\noutput: {{ dir: o }}\n");
        JobSpec::from_yaml(&y, SpecContext::Remote).unwrap()
    }

    #[test]
    fn remote_locations() {
        let ds = format!("dataset://sha256/{}", "a".repeat(64));
        check_remote_spec(&spec(&ds, "hf://org/m")).unwrap();
        check_remote_spec(&spec("s3://b/data.json", "models/tiny")).unwrap();
        for (train, source, field) in [
            ("./faq.json", "hf://o/m", "data.train"),
            ("/etc/passwd", "hf://o/m", "data.train"),
            ("dataset://sha256/../../x", "hf://o/m", "data.train"),
            ("s3://b/../x", "hf://o/m", "data.train"),
            ("file:///etc/x", "hf://o/m", "data.train"),
            (&ds, "/models/llama", "model.source"),
            (&ds, "../models", "model.source"),
            (&ds, "file:///m", "model.source"),
            (&ds, "a\\b", "model.source"),
            ("s3://b/x/%2e%2e/y", "hf://o/m", "data.train"),
            ("s3://b@other/x", "hf://o/m", "data.train"),
            ("s3://b:9000/x", "hf://o/m", "data.train"),
            ("s3://B/x", "hf://o/m", "data.train"),
            ("s3://b/./x", "hf://o/m", "data.train"),
            (&ds, "hf://o/m?x=1", "model.source"),
            (&ds, "hf://evil.com:80/m", "model.source"),
        ] {
            match check_remote_spec(&spec(train, source)) {
                Err(CoordError::InvalidArgument(m)) => assert!(m.starts_with(&format!("{field}: ")), "{m}"),
                other => panic!("{train} {source}: {other:?}"),
            }
        }
    }


    #[test]
    fn job_keys() {
        let j = JobId::new();
        check_job_key("k", &j, &format!("jobs/{j}/attempts/1/checkpoints/step-2/manifest.json")).unwrap();
        check_job_key("k", &j, &format!("jobs/{j}/adapter")).unwrap();
        for bad in [format!("jobs/{}/adapter", JobId::new()), format!("/jobs/{j}/a"), format!("jobs/{j}/../x/y"), "x".into(), format!("jobs/{j}")] {
            assert!(check_job_key("k", &j, &bad).is_err(), "{bad}");
        }
    }
}

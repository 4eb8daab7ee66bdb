//! Where workers may load models from: the coordinator's policy on `model.source` and
//! `lora.init_adapter`, applied at submit.
//!
//! - `--allow-model-source PREFIX` (repeatable): when given, a source must be one of the
//!   prefixes or lie under one (`hf://meta-llama/` admits `hf://meta-llama/Llama-3-8B`;
//!   `s3://models` admits `s3://models/x` but not `s3://models-evil/x`).
//! - Paths on the worker's own disk (a relative path; absolute ones are always refused)
//!   only with `--allow-local-model-paths` (on in `lorafleet dev`, where the worker is the
//!   same machine).
//! - `hf://` revisions (`--hf-revisions`): `resolve` (default) resolves a branch or tag to
//!   its commit at submit, through `HF_ENDPOINT`/`HF_TOKEN` of the coordinator, and
//!   stores the source pinned (`hf://org/name@<commit>`, said in the job's first event),
//!   so every attempt trains on the same weights; `pinned` refuses a source that is not
//!   pinned to a commit; `any` takes it as given (workers resolve it when they load).
//! - Users give no endpoints: object-store endpoints and credentials are the workers'
//!   own configuration, `hf://` goes to the coordinator's and workers' `HF_ENDPOINT`, and
//!   the spec parser refuses unknown fields. So a spec cannot point a worker at an
//!   arbitrary URL (SSRF).

use crate::error::CoordError;
use lorafleet_shared::spec::JobSpec;
use lorafleet_storage::hub::{self, Hub};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum HfRevisions {
    /// Resolve branches and tags to their commit at submit.
    #[default]
    Resolve,
    /// Refuse sources not pinned to a commit.
    Pinned,
    /// Take the revision as given.
    Any,
}

#[derive(Debug, Clone, Default)]
pub struct ModelPolicy {
    /// Allowed source prefixes (empty: every hf://, s3://, az:// source).
    pub allow: Vec<String>,
    /// Admit paths on the worker's disk.
    pub local_paths: bool,
    pub hf_revisions: HfRevisions,
    /// The Hub to resolve revisions with (None: `HF_ENDPOINT` / `HF_TOKEN`).
    pub hub_endpoint: Option<String>,
}

fn is_commit(rev: &str) -> bool {
    rev.len() == 40 && rev.chars().all(|c| c.is_ascii_hexdigit() && !c.is_ascii_uppercase())
}

/// Is `source` `prefix` or under it: at a `/` boundary, or for `hf://` also at the `@`
/// of a revision. (The location checks before this one refuse `%`, `@`, `.` and `..`
/// components in object-store locations, so the text is what the workers' URL parser
/// reads.)
pub fn under_prefix(source: &str, prefix: &str) -> bool {
    match source.strip_prefix(prefix) {
        Some("") => true,
        Some(rest) => prefix.ends_with('/') || rest.starts_with('/') || (source.starts_with("hf://") && rest.starts_with('@')),
        None => false,
    }
}

impl ModelPolicy {
    /// Check the spec's model sources; pin `hf://` revisions when resolving. Returns what
    /// was rewritten, for the job's first event.
    pub async fn apply(&self, spec: &mut JobSpec) -> Result<Vec<String>, CoordError> {
        let mut notes = Vec::new();
        let mut fields: Vec<(&'static str, &mut String)> = vec![("model.source", &mut spec.model.source)];
        if let Some(a) = spec.lora.init_adapter.as_mut() {
            fields.push(("lora.init_adapter", a));
        }
        for (field, source) in fields {
            if !source.contains("://") {
                if !self.local_paths {
                    return Err(CoordError::PermissionDenied(format!(
                        "{field}: {source:?} is a path on the worker's disk; this coordinator takes models from URLs only (hf://, s3://, az://), or start it with --allow-local-model-paths"
                    )));
                }
                continue;
            }
            if !self.allow.is_empty() && !self.allow.iter().any(|p| under_prefix(source, p)) {
                return Err(CoordError::PermissionDenied(format!(
                    "{field}: {source:?} is not an allowed model source on this coordinator (--allow-model-source: {})",
                    self.allow.join(", ")
                )));
            }
            if !source.starts_with("hf://") {
                continue;
            }
            let r = hub::parse_hf(source).map_err(|e| CoordError::InvalidArgument(format!("{field}: {e}")))?;
            if is_commit(&r.revision) {
                continue;
            }
            match self.hf_revisions {
                HfRevisions::Any => {}
                HfRevisions::Pinned => {
                    return Err(CoordError::InvalidArgument(format!(
                        "{field}: {source:?} is not pinned to a commit; this coordinator requires hf://org/name@<40-hex commit>"
                    )))
                }
                HfRevisions::Resolve => {
                    let hub = match &self.hub_endpoint {
                        Some(e) => Hub::new(e, hub::token_from_env()),
                        None => Hub::from_env(),
                    }
                    .map_err(|e| CoordError::Internal(e.to_string()))?;
                    let resolved = hub.resolve(&r, source).await.map_err(|e| match e {
                        // The Hub answered: no such repository or revision, or no access.
                        lorafleet_storage::Error::Hub { retryable: false, .. } => CoordError::InvalidArgument(format!("{field}: {e}")),
                        e => CoordError::Unavailable(format!(
                            "{field}: cannot resolve the revision of {source:?} at submit ({e}); pin a commit (hf://{}@<commit>) or retry",
                            r.repo
                        )),
                    })?;
                    let pinned = format!("hf://{}@{}", r.repo, resolved.commit);
                    notes.push(format!("{field} {source} resolved to {pinned}"));
                    *source = pinned;
                }
            }
        }
        Ok(notes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use lorafleet_shared::spec::SpecContext;

    fn spec(source: &str) -> JobSpec {
        let y = format!("name: a\nmodel: {{ source: {source:?} }}\ndata: {{ train: s3://b/d.json }}\noutput: {{ dir: o }}\n");
        JobSpec::from_yaml(&y, SpecContext::Remote).unwrap()
    }

    #[tokio::test]
    async fn allow_list_and_local_paths() {
        let pinned = format!("hf://meta-llama/L@{}", "a".repeat(40));
        let p = ModelPolicy { allow: vec!["hf://meta-llama/".into(), "s3://models".into()], ..Default::default() };
        for ok in [pinned.as_str(), "s3://models/x", "s3://models"] {
            p.apply(&mut spec(ok)).await.unwrap();
        }
        for bad in ["hf://evil/x", "s3://models-evil/x", "s3://models@evil/x", "s3://other/models", "az://c/models", "models/tiny"] {
            let e = p.apply(&mut spec(bad)).await.unwrap_err();
            assert!(matches!(&e, CoordError::PermissionDenied(m) if m.starts_with("model.source: ")), "{bad}: {e}");
        }
        let local = ModelPolicy { local_paths: true, hf_revisions: HfRevisions::Any, ..Default::default() };
        local.apply(&mut spec("models/tiny")).await.unwrap();
        let mut s = spec("hf://o/m@main");
        assert!(local.apply(&mut s).await.unwrap().is_empty());
        assert_eq!(s.model.source, "hf://o/m@main");
        let strict = ModelPolicy { hf_revisions: HfRevisions::Pinned, ..Default::default() };
        assert!(matches!(strict.apply(&mut spec("hf://o/m")).await, Err(CoordError::InvalidArgument(_))));
        strict.apply(&mut spec(&pinned)).await.unwrap();
    }

    #[tokio::test]
    async fn an_unreachable_hub_refuses_an_unpinned_source() {
        let p = ModelPolicy { hub_endpoint: Some("http://127.0.0.1:9".into()), ..Default::default() };
        let e = p.apply(&mut spec("hf://o/m")).await.unwrap_err();
        assert!(matches!(&e, CoordError::Unavailable(m) if m.contains("pin a commit")), "{e}");
    }
}

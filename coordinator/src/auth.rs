//! Authentication and roles: bearer tokens (`authorization: Bearer <token>`) defined in
//! a file the coordinator reads at start and again on SIGHUP (`--auth FILE`), stored only
//! as sha256 hashes, each with an id (what logs name), a role and a tenant:
//!
//! - `admin`: every service;
//! - `user`: the JobService, for the jobs and datasets of its tenant (required);
//! - `worker`: the WorkerService only.
//!
//! A missing or unknown token is `UNAUTHENTICATED`, a known token of the wrong role is
//! `PERMISSION_DENIED`. Health and reflection stay open (probes and `grpcurl list`).
//! Tokens never reach logs, errors or records: only their ids do.
//!
//! The file (YAML):
//! ```yaml
//! tokens:
//!   - { id: alice, role: user, tenant: acme, sha256: 2c26b46b... }
//!   - { id: gpu-pool, role: worker, sha256: fcde2b2e... }
//! ```
//! `lorafleet-coordinator token create --auth FILE --id alice --role user --tenant acme`
//! prints a new token once and appends its hash. The same file may hold the tenants'
//! quotas (`quotas:`, see [`crate::quota`]).

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use crate::quota::Quotas;
use tonic::Status;
use tracing::{info, warn};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    Admin,
    User,
    Worker,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Admin => "admin",
            Role::User => "user",
            Role::Worker => "worker",
        }
    }
}

impl std::str::FromStr for Role {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "admin" => Ok(Role::Admin),
            "user" => Ok(Role::User),
            "worker" => Ok(Role::Worker),
            _ => Err(format!("unknown role {s:?} (admin, user, worker)")),
        }
    }
}

/// Who a call comes from (in the request's extensions once authenticated).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    pub id: String,
    pub role: Role,
    pub tenant: Option<String>,
    /// A worker token's labels: workers registering with it must carry these.
    pub labels: std::collections::BTreeMap<String, String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Entry {
    id: String,
    role: Role,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    tenant: Option<String>,
    /// Worker tokens: the labels every worker registering with this token must carry
    /// (so a token for one pool cannot register workers of another).
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    labels: std::collections::BTreeMap<String, String>,
    sha256: String,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct AuthFile {
    #[serde(default)]
    tokens: Vec<Entry>,
    /// Per-tenant quotas ([`crate::quota`]).
    #[serde(default, skip_serializing_if = "is_default")]
    quotas: Quotas,
}

fn is_default(q: &Quotas) -> bool {
    *q == Quotas::default()
}

/// A token id or tenant name: 1-63 letters, digits, `-`, `_`, `.`.
pub(crate) fn name_ok(s: &str) -> bool {
    !s.is_empty() && s.len() <= 63 && s.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
}

type Table = HashMap<String, Arc<Identity>>;

fn parse(path: &Path) -> Result<(Table, Quotas), String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let mut file: AuthFile = serde_yaml::from_str(&text).map_err(|e| format!("{}: {e}", path.display()))?;
    let mut out = HashMap::new();
    let mut ids = std::collections::HashSet::new();
    for (i, e) in std::mem::take(&mut file.tokens).into_iter().enumerate() {
        let at = |m: String| format!("{}: tokens[{i}]: {m}", path.display());
        if !name_ok(&e.id) {
            return Err(at(format!("id {:?}: 1-63 letters, digits, - _ .", e.id)));
        }
        if !ids.insert(e.id.clone()) {
            return Err(at(format!("id {:?} appears twice", e.id)));
        }
        if e.sha256.len() != 64 || !e.sha256.chars().all(|c| c.is_ascii_hexdigit() && !c.is_ascii_uppercase()) {
            return Err(at("sha256: 64 lowercase hex digits (the hash of the token, never the token)".into()));
        }
        match (&e.tenant, e.role) {
            (None, Role::User) => return Err(at("tenant: a user token needs one".into())),
            (Some(t), _) if !name_ok(t) => return Err(at(format!("tenant {t:?}: 1-63 letters, digits, - _ ."))),
            _ => {}
        }
        if !e.labels.is_empty() && e.role != Role::Worker {
            return Err(at("labels: only worker tokens are restricted to labels".into()));
        }
        if out.insert(e.sha256.clone(), Arc::new(Identity { id: e.id, role: e.role, tenant: e.tenant, labels: e.labels })).is_some() {
            return Err(at("the same token hash appears twice".into()));
        }
    }
    file.quotas.check().map_err(|e| format!("{}: {e}", path.display()))?;
    Ok((out, file.quotas))
}

/// The token table, reloadable.
pub struct Auth {
    path: PathBuf,
    table: RwLock<Table>,
    quotas: Arc<RwLock<Quotas>>,
}

impl std::fmt::Debug for Auth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Auth").field("path", &self.path).finish_non_exhaustive()
    }
}

impl Auth {
    /// Read the token file (refused with the entry and what is wrong).
    pub fn load(path: &Path) -> Result<Arc<Self>, String> {
        let (table, quotas) = parse(path)?;
        info!(file = %path.display(), tokens = table.len(), quota_tenants = quotas.tenants.len(), "auth tokens loaded");
        Ok(Arc::new(Self { path: path.to_path_buf(), table: RwLock::new(table), quotas: Arc::new(RwLock::new(quotas)) }))
    }

    /// The quotas of the file, as reloaded (the control loop reads them).
    pub fn quotas(&self) -> Arc<RwLock<Quotas>> {
        self.quotas.clone()
    }

    /// Read the file again (SIGHUP); a bad file keeps the tokens in force.
    pub fn reload(&self) -> Result<usize, String> {
        let (table, quotas) = parse(&self.path)?;
        let n = table.len();
        *self.table.write().unwrap_or_else(|e| e.into_inner()) = table;
        *self.quotas.write().unwrap_or_else(|e| e.into_inner()) = quotas;
        info!(file = %self.path.display(), tokens = n, "auth tokens reloaded");
        Ok(n)
    }

    /// The caller of a request, if its token is known.
    pub fn identify(&self, md: &tonic::metadata::MetadataMap) -> Result<Arc<Identity>, Status> {
        let Some(v) = md.get("authorization") else {
            return Err(Status::unauthenticated("missing token: send `authorization: Bearer <token>` (lorafleet --token / LORAFLEET_TOKEN)"));
        };
        let token = v.to_str().ok().and_then(|s| s.strip_prefix("Bearer ")).map(str::trim).unwrap_or("");
        if token.is_empty() {
            return Err(Status::unauthenticated("malformed authorization header: expected `Bearer <token>`"));
        }
        self.identify_token(token).ok_or_else(|| Status::unauthenticated("unknown token"))
    }

    /// The identity of a bearer token, if it is known (the dashboard's header or cookie).
    pub fn identify_token(&self, token: &str) -> Option<Arc<Identity>> {
        let hash = hex::encode(Sha256::digest(token.as_bytes()));
        self.table.read().unwrap_or_else(|e| e.into_inner()).get(&hash).cloned()
    }

    /// Authenticate `req` for a service open to `roles` (admin always); the identity
    /// goes into the request's extensions. A refusal carries the caller when its token
    /// was known (for the audit log).
    pub fn authorize(&self, mut req: tonic::Request<()>, service: &str, roles: &[Role]) -> Result<tonic::Request<()>, (Status, Option<Arc<Identity>>)> {
        let who = self.identify(req.metadata()).map_err(|s| (s, None))?;
        if who.role != Role::Admin && !roles.contains(&who.role) {
            warn!(token_id = %who.id, role = who.role.as_str(), service, "call refused: wrong role");
            let s = Status::permission_denied(format!("token {:?} has role {}, which may not call the {service}", who.id, who.role.as_str()));
            return Err((s, Some(who)));
        }
        req.extensions_mut().insert(who);
        Ok(req)
    }
}

/// Make a token for `id`, append its hash to `path` (created if missing, mode 0600)
/// and return the token (shown once: it is not stored).
pub fn create_token(path: &Path, id: &str, role: Role, tenant: Option<&str>) -> Result<String, String> {
    let mut file = if path.exists() {
        let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
        serde_yaml::from_str::<AuthFile>(&text).map_err(|e| format!("{}: {e}", path.display()))?
    } else {
        AuthFile::default()
    };
    if file.tokens.iter().any(|e| e.id == id) {
        return Err(format!("{}: a token with id {id:?} exists already (ids name tokens in logs; pick another)", path.display()));
    }
    let token = format!("lf_{}{}", uuid::Uuid::new_v4().simple(), uuid::Uuid::new_v4().simple());
    file.tokens.push(Entry { id: id.to_string(), role, tenant: tenant.map(str::to_string), labels: Default::default(), sha256: hex::encode(Sha256::digest(token.as_bytes())) });
    let text = serde_yaml::to_string(&file).map_err(|e| e.to_string())?;
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text).map_err(|e| format!("{}: {e}", tmp.display()))?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o600)).map_err(|e| format!("{}: {e}", tmp.display()))?;
    }
    // Check what we wrote parses the way `load` reads it, before it replaces the file.
    parse(&tmp)?;
    std::fs::rename(&tmp, path).map_err(|e| format!("{}: {e}", path.display()))?;
    Ok(token)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn md(v: &str) -> tonic::metadata::MetadataMap {
        let mut m = tonic::metadata::MetadataMap::new();
        m.insert("authorization", v.parse().unwrap());
        m
    }

    #[test]
    fn tokens_are_created_hashed_and_checked() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("auth.yaml");
        let alice = create_token(&f, "alice", Role::User, Some("acme")).unwrap();
        let w = create_token(&f, "pool", Role::Worker, None).unwrap();
        assert!(create_token(&f, "alice", Role::Admin, None).is_err());
        let text = std::fs::read_to_string(&f).unwrap();
        assert!(!text.contains(&alice) && !text.contains(&w), "only hashes are stored");
        let a = Auth::load(&f).unwrap();
        let who = a.identify(&md(&format!("Bearer {alice}"))).unwrap();
        assert_eq!((who.id.as_str(), who.role, who.tenant.as_deref()), ("alice", Role::User, Some("acme")));
        assert_eq!(a.identify(&md("Bearer nope")).unwrap_err().code(), tonic::Code::Unauthenticated);
        assert_eq!(a.identify(&md(&alice)).unwrap_err().code(), tonic::Code::Unauthenticated);
        assert_eq!(a.identify(&tonic::metadata::MetadataMap::new()).unwrap_err().code(), tonic::Code::Unauthenticated);
        // Reload picks up a new token; a broken file keeps the old table.
        let bob = create_token(&f, "bob", Role::Admin, None).unwrap();
        assert!(a.identify(&md(&format!("Bearer {bob}"))).is_err());
        assert_eq!(a.reload().unwrap(), 3);
        assert!(a.identify(&md(&format!("Bearer {bob}"))).is_ok());
        std::fs::write(&f, "tokens: [ { id: x } ]").unwrap();
        assert!(a.reload().is_err());
        assert!(a.identify(&md(&format!("Bearer {bob}"))).is_ok());
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let f2 = dir.path().join("new.yaml");
            create_token(&f2, "z", Role::Worker, None).unwrap();
            assert_eq!(std::fs::metadata(&f2).unwrap().permissions().mode() & 0o777, 0o600);
        }
    }

    #[test]
    fn bad_files_name_the_entry() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("a.yaml");
        let h = "a".repeat(64);
        for (body, want) in [
            (format!("tokens: [ {{ id: u, role: user, sha256: {h} }} ]"), "a user token needs one"),
            (format!("tokens: [ {{ id: 'a b', role: admin, sha256: {h} }} ]"), "tokens[0]: id"),
            ("tokens: [ { id: a, role: admin, sha256: abc } ]".to_string(), "64 lowercase hex"),
            (format!("tokens: [ {{ id: a, role: root, sha256: {h} }} ]"), "root"),
            (format!("tokens: [ {{ id: a, role: admin, sha256: {h} }}, {{ id: a, role: worker, sha256: {} }} ]", "b".repeat(64)), "appears twice"),
        ] {
            std::fs::write(&f, &body).unwrap();
            let e = Auth::load(&f).unwrap_err();
            assert!(e.contains(want), "{body}: {e}");
        }
    }
}

//! `hf://org/name[@revision]` model sources: a model repository on the Hugging Face
//! Hub (or a mirror), fetched over HTTPS into the local cache.
//!
//! - Endpoint: `HF_ENDPOINT` (default `https://huggingface.co`), as in `huggingface_hub`.
//! - Token: `HF_TOKEN` (or `HUGGING_FACE_HUB_TOKEN`), else the file `$HF_HOME/token`
//!   (default `~/.cache/huggingface/token`); sent to the endpoint only, never to the
//!   CDN a large file redirects to.
//! - The revision (branch, tag or commit; default `main`) is resolved to its commit
//!   first, and the cache is keyed by that commit, so a moved branch is fetched anew
//!   and a pinned commit is fetched once.
//! - Only what lorafleet reads is fetched: `config.json`, `generation_config.json`,
//!   the tokenizer files and the top-level `*.safetensors` (plus the shard index).
//!   Weights in other formats (`.bin`, `.pt`, `.gguf`) are not converted: such a
//!   repository is a clear error.
//! - Every large (LFS) file is checked against the sha256 the Hub publishes for it
//!   (`X-Linked-Etag`); small git files against their size.
//!
//! The Hub is not reachable from the development machines: the tests exercise this
//! code against a local server that answers the same API (`storage/tests/hub.rs`).

use crate::key::Sha256Hex;
use crate::manifest::{FileEntry, Manifest, FORMAT};
use crate::{Error, Result};
use sha2::{Digest, Sha256};
use std::path::{Path, PathBuf};
use std::time::Duration;
use tokio::io::AsyncWriteExt;
use tracing::info;

pub const DEFAULT_ENDPOINT: &str = "https://huggingface.co";

/// Files lorafleet reads from a model repository (besides `*.safetensors`).
const WANTED: &[&str] = &[
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "model.safetensors.index.json",
    "adapter_config.json",
];

/// A parsed `hf://` source.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HubRef {
    /// `org/name` (or a bare `name`).
    pub repo: String,
    pub revision: String,
}

fn bad(source: &str, reason: impl Into<String>) -> Error {
    Error::UnsupportedSource { source_url: source.to_string(), reason: reason.into() }
}

fn hub_err(source: &str, reason: impl Into<String>, retryable: bool) -> Error {
    Error::Hub { source_url: source.to_string(), reason: reason.into(), retryable }
}

/// Parse `hf://org/name` or `hf://org/name@revision`.
pub fn parse_hf(source: &str) -> Result<HubRef> {
    let rest = source.strip_prefix("hf://").ok_or_else(|| bad(source, "not an hf:// source"))?;
    let (repo, revision) = match rest.split_once('@') {
        Some((r, v)) => (r, v),
        None => (rest, "main"),
    };
    let segs: Vec<&str> = repo.split('/').collect();
    let seg_ok = |s: &&str| !s.is_empty() && !s.starts_with('.') && s.len() <= 96 && s.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c));
    if segs.is_empty() || segs.len() > 2 || !segs.iter().all(seg_ok) || repo.contains("..") {
        return Err(bad(source, "expected hf://org/name or hf://org/name@revision (letters, digits, '-', '_', '.')"));
    }
    let rev_ok = !revision.is_empty()
        && revision.len() <= 128
        && !revision.contains("..")
        && !revision.starts_with('/')
        && revision.chars().all(|c| c.is_ascii_alphanumeric() || "-_./".contains(c));
    if !rev_ok {
        return Err(bad(source, format!("invalid revision {revision:?}")));
    }
    Ok(HubRef { repo: repo.to_string(), revision: revision.to_string() })
}

/// `HF_ENDPOINT` or the public Hub.
pub fn endpoint_from_env() -> String {
    std::env::var("HF_ENDPOINT").ok().filter(|s| !s.trim().is_empty()).unwrap_or_else(|| DEFAULT_ENDPOINT.to_string())
}

/// `HF_TOKEN`, `HUGGING_FACE_HUB_TOKEN`, or the token file `huggingface-cli login` writes.
pub fn token_from_env() -> Option<String> {
    for var in ["HF_TOKEN", "HUGGING_FACE_HUB_TOKEN"] {
        if let Some(t) = std::env::var(var).ok().map(|t| t.trim().to_string()).filter(|t| !t.is_empty()) {
            return Some(t);
        }
    }
    let home = std::env::var_os("HF_HOME").map(PathBuf::from).or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache/huggingface")))?;
    std::fs::read_to_string(home.join("token")).ok().map(|t| t.trim().to_string()).filter(|t| !t.is_empty())
}

/// A Hub client: endpoint, optional token.
#[derive(Debug, Clone)]
pub struct Hub {
    endpoint: String,
    token: Option<String>,
    client: reqwest::Client,
}

/// What the revision resolved to.
#[derive(Debug, Clone)]
pub struct Resolved {
    pub commit: String,
    pub files: Vec<String>,
}

impl Hub {
    pub fn new(endpoint: &str, token: Option<String>) -> Result<Self> {
        let client = reqwest::Client::builder()
            .user_agent(concat!("lorafleet/", env!("CARGO_PKG_VERSION")))
            .redirect(reqwest::redirect::Policy::none())
            .connect_timeout(Duration::from_secs(20))
            .read_timeout(Duration::from_secs(120))
            .build()
            .map_err(|e| bad(endpoint, format!("http client: {e}")))?;
        Ok(Self { endpoint: endpoint.trim_end_matches('/').to_string(), token, client })
    }

    /// From `HF_ENDPOINT` and `HF_TOKEN` (see the module docs).
    pub fn from_env() -> Result<Self> {
        Self::new(&endpoint_from_env(), token_from_env())
    }

    pub fn endpoint(&self) -> &str {
        &self.endpoint
    }

    fn authed(&self, rb: reqwest::RequestBuilder) -> reqwest::RequestBuilder {
        match &self.token {
            Some(t) => rb.bearer_auth(t),
            None => rb,
        }
    }

    fn status_error(&self, source: &str, what: &str, status: reqwest::StatusCode) -> Error {
        let code = status.as_u16();
        let (reason, retryable) = match code {
            401 | 403 => (format!("{what}: HTTP {code}: not authorized (set HF_TOKEN for private or gated repositories)"), false),
            404 => (format!("{what}: HTTP 404: no such repository, revision or file on {}", self.endpoint), false),
            429 | 500..=599 => (format!("{what}: HTTP {code} from {}", self.endpoint), true),
            _ => (format!("{what}: unexpected HTTP {code} from {}", self.endpoint), false),
        };
        hub_err(source, reason, retryable)
    }

    /// Resolve a revision to its commit and list the repository's files.
    pub async fn resolve(&self, r: &HubRef, source: &str) -> Result<Resolved> {
        let url = format!("{}/api/models/{}/revision/{}", self.endpoint, r.repo, r.revision);
        let resp = self.authed(self.client.get(&url)).send().await.map_err(|e| hub_err(source, format!("GET {url}: {e}"), true))?;
        if !resp.status().is_success() {
            return Err(self.status_error(source, "model info", resp.status()));
        }
        let body = resp.bytes().await.map_err(|e| hub_err(source, format!("GET {url}: {e}"), true))?;
        #[derive(serde::Deserialize)]
        struct Sibling {
            rfilename: String,
        }
        #[derive(serde::Deserialize)]
        struct Info {
            sha: String,
            #[serde(default)]
            siblings: Vec<Sibling>,
        }
        let info: Info = serde_json::from_slice(&body).map_err(|e| hub_err(source, format!("model info is not what the Hub API returns: {e}"), false))?;
        if info.sha.is_empty() || !info.sha.chars().all(|c| c.is_ascii_hexdigit()) {
            return Err(hub_err(source, format!("model info has no commit sha (got {:?})", info.sha), false));
        }
        Ok(Resolved { commit: info.sha, files: info.siblings.into_iter().map(|s| s.rfilename).collect() })
    }

    /// Download the files lorafleet reads at `commit` into `dest`; returns their manifest.
    pub async fn download(&self, r: &HubRef, source: &str, resolved: &Resolved, dest: &Path) -> Result<Manifest> {
        let wanted = select_files(source, &resolved.files)?;
        tokio::fs::create_dir_all(dest).await.map_err(|e| Error::io(dest, e))?;
        let mut files = Vec::new();
        for name in wanted {
            let (size, sha) = self.download_file(r, source, &resolved.commit, &name, &dest.join(&name)).await?;
            files.push(FileEntry { name, size, sha256: sha.to_string() });
        }
        let meta = [("source".to_string(), serde_json::json!(source)), ("commit".to_string(), serde_json::json!(resolved.commit))];
        Ok(Manifest { format: FORMAT.into(), files, meta: meta.into_iter().collect() })
    }

    async fn download_file(&self, r: &HubRef, source: &str, commit: &str, name: &str, dest: &Path) -> Result<(u64, Sha256Hex)> {
        let mut url = format!("{}/{}/resolve/{}/{}", self.endpoint, r.repo, commit, name);
        let mut expected_sha: Option<String> = None;
        let mut expected_size: Option<u64> = None;
        let mut on_endpoint = true;
        let mut resp = None;
        for _ in 0..6 {
            let rb = self.client.get(&url);
            let rb = if on_endpoint { self.authed(rb) } else { rb };
            let rsp = rb.send().await.map_err(|e| hub_err(source, format!("GET {url}: {e}"), true))?;
            let h = rsp.headers();
            // LFS files: the Hub names the content's sha256 and size on the first answer.
            if expected_sha.is_none() {
                expected_sha = header(h, "x-linked-etag").map(|s| s.trim_matches('"').trim_start_matches("W/").trim_matches('"').to_ascii_lowercase()).filter(|s| s.len() == 64 && s.chars().all(|c| c.is_ascii_hexdigit()));
                expected_size = header(h, "x-linked-size").and_then(|s| s.parse().ok());
            }
            if rsp.status().is_redirection() {
                let loc = header(h, "location").ok_or_else(|| hub_err(source, format!("{name}: redirect without a location"), false))?;
                let next = reqwest::Url::parse(&url).and_then(|base| base.join(&loc)).map_err(|e| hub_err(source, format!("{name}: bad redirect {loc:?}: {e}"), false))?;
                on_endpoint = next.as_str().starts_with(&format!("{}/", self.endpoint));
                url = next.to_string();
                continue;
            }
            resp = Some(rsp);
            break;
        }
        let mut resp = resp.ok_or_else(|| hub_err(source, format!("{name}: too many redirects"), false))?;
        if !resp.status().is_success() {
            return Err(self.status_error(source, name, resp.status()));
        }
        let expected_size = expected_size.or(resp.content_length());
        let tmp = dest.with_extension(format!("partial-{}", uuid::Uuid::new_v4().simple()));
        let guard = crate::store::TempGuard(Some(tmp.clone()));
        let mut f = tokio::fs::File::create(&tmp).await.map_err(|e| Error::io(&tmp, e))?;
        let mut hasher = Sha256::new();
        let mut n = 0u64;
        while let Some(chunk) = resp.chunk().await.map_err(|e| hub_err(source, format!("{name}: download interrupted: {e}"), true))? {
            hasher.update(&chunk);
            n += chunk.len() as u64;
            f.write_all(&chunk).await.map_err(|e| Error::io(&tmp, e))?;
        }
        f.flush().await.map_err(|e| Error::io(&tmp, e))?;
        f.sync_all().await.map_err(|e| Error::io(&tmp, e))?;
        drop(f);
        let sha = Sha256Hex::from_digest(&hasher.finalize());
        let size_bad = expected_size.is_some_and(|s| s != n);
        let sha_bad = expected_sha.as_deref().is_some_and(|s| s != sha.as_str());
        if size_bad || sha_bad {
            return Err(Error::Corrupt {
                key: url,
                expected: expected_sha.unwrap_or_else(|| "(not published)".into()),
                expected_size: expected_size.unwrap_or(0),
                actual: sha.to_string(),
                actual_size: n,
            });
        }
        tokio::fs::rename(&tmp, dest).await.map_err(|e| Error::io(dest, e))?;
        guard.disarm();
        info!(source, file = name, bytes = n, "fetched from the hub");
        Ok((n, sha))
    }
}

fn header(h: &reqwest::header::HeaderMap, name: &str) -> Option<String> {
    h.get(name).and_then(|v| v.to_str().ok()).map(|s| s.to_string())
}

/// The repository files to fetch; an error when there is no config or no safetensors.
pub fn select_files(source: &str, files: &[String]) -> Result<Vec<String>> {
    let mut out: Vec<String> = files
        .iter()
        .filter(|f| !f.contains('/') && !f.starts_with('.') && (WANTED.contains(&f.as_str()) || f.ends_with(".safetensors")))
        .cloned()
        .collect();
    out.sort();
    out.dedup();
    let has = |n: &str| out.iter().any(|f| f == n);
    if !has("config.json") && !has("adapter_config.json") {
        return Err(hub_err(source, "the repository has no config.json at its top level", false));
    }
    if !out.iter().any(|f| f.ends_with(".safetensors")) {
        let other: Vec<&String> = files.iter().filter(|f| [".bin", ".pt", ".pth", ".gguf", ".ckpt"].iter().any(|e| f.ends_with(e))).collect();
        let hint = if other.is_empty() { String::new() } else { format!(" (it has {other:?}; lorafleet reads safetensors only)") };
        return Err(hub_err(source, format!("the repository has no *.safetensors weights{hint}"), false));
    }
    Ok(out)
}

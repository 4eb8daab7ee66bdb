//! Directory manifests: `manifest.json` lists every file of a stored directory
//! (checkpoint, adapter) with its size and sha256. It is written last, create-only, so
//! its existence means the directory is complete and can never be swapped afterwards.

use crate::key::{layout, RelPath, Segment, Sha256Hex};
use crate::store::hash_file;
use crate::{Error, Result, Storage};
use bytes::Bytes;
use serde::{Deserialize, Serialize};
use sha2::Digest;
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use tracing::info;

pub const FORMAT: &str = "lorafleet.manifest.v1";

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileEntry {
    /// Path relative to the directory, `/`-separated.
    pub name: String,
    pub size: u64,
    pub sha256: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    pub format: String,
    pub files: Vec<FileEntry>,
    /// Free-form facts about the directory (job, epoch, step, ...).
    #[serde(default)]
    pub meta: BTreeMap<String, serde_json::Value>,
}

impl Manifest {
    /// Parse and check: known format, safe unique names, well-formed digests.
    pub fn parse(key: &str, bytes: &[u8]) -> Result<Self> {
        let bad = |reason: String| Error::InvalidManifest { key: key.to_string(), reason };
        let m: Manifest = serde_json::from_slice(bytes).map_err(|e| bad(e.to_string()))?;
        if m.format != FORMAT {
            return Err(bad(format!("unknown format {:?}", m.format)));
        }
        let mut seen = BTreeSet::new();
        for f in &m.files {
            RelPath::parse(&f.name).map_err(|e| bad(e.to_string()))?;
            Sha256Hex::parse(&f.sha256).map_err(|e| bad(e.to_string()))?;
            if f.name == layout::MANIFEST {
                return Err(bad("lists itself".into()));
            }
            if !seen.insert(f.name.as_str()) {
                return Err(bad(format!("duplicate file {:?}", f.name)));
            }
        }
        Ok(m)
    }

    pub fn to_bytes(&self) -> Bytes {
        Bytes::from(serde_json::to_vec_pretty(self).expect("a manifest always serializes"))
    }

    pub fn total_size(&self) -> u64 {
        self.files.iter().map(|f| f.size).sum()
    }
}

/// Every regular file under `dir`, relative to it, sorted. Symlinks and other special
/// files are refused (they could point outside the directory).
pub fn list_local_files(dir: &Path) -> Result<Vec<RelPath>> {
    fn walk(root: &Path, rel: &Path, out: &mut Vec<RelPath>) -> Result<()> {
        let here = root.join(rel);
        let rd = std::fs::read_dir(&here).map_err(|e| Error::io(&here, e))?;
        for entry in rd {
            let entry = entry.map_err(|e| Error::io(&here, e))?;
            let ty = entry.file_type().map_err(|e| Error::io(entry.path(), e))?;
            let rel_child = rel.join(entry.file_name());
            if ty.is_dir() {
                walk(root, &rel_child, out)?;
            } else if ty.is_file() {
                out.push(RelPath::from_local(&rel_child)?);
            } else {
                return Err(Error::InvalidKey { key: rel_child.display().to_string(), reason: "not a regular file".into() });
            }
        }
        Ok(())
    }
    let mut out = Vec::new();
    walk(dir, Path::new(""), &mut out)?;
    out.sort();
    Ok(out)
}

impl Storage {
    /// Upload every file of `local_dir` under `dir`, then `dir/manifest.json`
    /// (create-only). Re-running after an ambiguous failure is safe: an identical
    /// manifest counts as success; a different one is [`Error::AlreadyExists`].
    ///
    /// A directory that already has a manifest is never written to again: its files
    /// are only compared with the local ones.
    pub async fn upload_dir(&self, dir: &RelPath, local_dir: &Path, meta: BTreeMap<String, serde_json::Value>) -> Result<Manifest> {
        let local = list_local_files(local_dir)?;
        if local.iter().any(|rel| rel.to_string() == layout::MANIFEST) {
            return Err(Error::InvalidKey { key: layout::MANIFEST.into(), reason: "reserved name in a directory to upload".into() });
        }
        if let Some(existing) = self.read_manifest(dir).await? {
            let same_names = existing.files.iter().map(|f| f.name.clone()).collect::<Vec<_>>() == local.iter().map(|r| r.to_string()).collect::<Vec<_>>();
            if same_names && existing.meta == meta && verify_local(local_dir, &existing).await.is_ok() {
                return Ok(existing);
            }
            return Err(Error::AlreadyExists { key: manifest_key(dir).to_string() });
        }
        let mut files = Vec::new();
        for rel in local {
            let (size, sha) = self.put_file(&dir.join(&rel), &rel.to_local(local_dir)).await?;
            files.push(FileEntry { name: rel.to_string(), size, sha256: sha.to_string() });
        }
        let m = Manifest { format: FORMAT.into(), files, meta };
        self.put_create_only(&manifest_key(dir), m.to_bytes()).await?;
        info!(dir = %dir, files = m.files.len(), bytes = m.total_size(), "uploaded directory");
        Ok(m)
    }

    /// Copy the complete directory `src` to `dst`: every file is read, checked against
    /// `src`'s manifest (size and sha256) and written to `dst`; `dst`'s manifest (the
    /// same file list, `meta` replaced) is written last by a create-only put.
    ///
    /// Idempotent: when `dst` already has exactly that manifest, nothing is written.
    /// A `dst` completed from anything else is [`Error::AlreadyExists`]. Files are held
    /// in memory one at a time (this is meant for adapters, not base models).
    pub async fn copy_dir(&self, src: &RelPath, dst: &RelPath, meta: BTreeMap<String, serde_json::Value>) -> Result<Manifest> {
        let m = self.read_manifest(src).await?.ok_or_else(|| Error::NotFound { key: manifest_key(src).to_string() })?;
        let out = Manifest { format: FORMAT.into(), files: m.files.clone(), meta };
        if let Some(existing) = self.read_manifest(dst).await? {
            return if existing == out { Ok(existing) } else { Err(Error::AlreadyExists { key: manifest_key(dst).to_string() }) };
        }
        for f in &m.files {
            let rel = RelPath::parse(&f.name)?;
            let from = src.join(&rel);
            let data = self.get_bytes(&from).await?;
            let sha = Sha256Hex::from_digest(&sha2::Sha256::digest(&data));
            if data.len() as u64 != f.size || sha.as_str() != f.sha256 {
                return Err(Error::Corrupt { key: from.to_string(), expected: f.sha256.clone(), expected_size: f.size, actual: sha.to_string(), actual_size: data.len() as u64 });
            }
            self.put_bytes(&dst.join(&rel), data).await?;
        }
        self.put_create_only(&manifest_key(dst), out.to_bytes()).await?;
        info!(from = %src, to = %dst, files = out.files.len(), bytes = out.total_size(), "copied directory");
        Ok(out)
    }

    /// The manifest of `dir`, or `None` if the directory is not complete.
    pub async fn read_manifest(&self, dir: &RelPath) -> Result<Option<Manifest>> {
        let key = manifest_key(dir);
        match self.get_bytes(&key).await {
            Ok(b) => Manifest::parse(&key.to_string(), &b).map(Some),
            Err(Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Download the directory `dir` into `dest` (created if needed): each file is
    /// verified and renamed into place; the manifest is written last as `manifest.json`.
    pub async fn download_dir(&self, dir: &RelPath, dest: &Path) -> Result<Manifest> {
        let m = self.read_manifest(dir).await?.ok_or_else(|| Error::NotFound { key: manifest_key(dir).to_string() })?;
        tokio::fs::create_dir_all(dest).await.map_err(|e| Error::io(dest, e))?;
        for f in &m.files {
            let rel = RelPath::parse(&f.name)?;
            let sha = Sha256Hex::parse(&f.sha256)?;
            self.download_verified(&dir.join(&rel), &rel.to_local(dest), f.size, &sha).await?;
        }
        write_atomic(&dest.join(layout::MANIFEST), &m.to_bytes()).await?;
        Ok(m)
    }
}

pub fn manifest_key(dir: &RelPath) -> RelPath {
    dir.child(Segment::new(layout::MANIFEST).expect("valid"))
}

/// Check a local directory against a manifest (sizes and digests of every listed file).
pub async fn verify_local(dir: &Path, m: &Manifest) -> Result<()> {
    for f in &m.files {
        let p: PathBuf = RelPath::parse(&f.name)?.to_local(dir);
        let (size, sha) = hash_file(&p).await?;
        if size != f.size || sha.as_str() != f.sha256 {
            return Err(Error::Corrupt { key: p.display().to_string(), expected: f.sha256.clone(), expected_size: f.size, actual: sha.to_string(), actual_size: size });
        }
    }
    Ok(())
}

/// Write a small file via temp + rename.
pub(crate) async fn write_atomic(path: &Path, data: &[u8]) -> Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let tmp = dir.join(format!(".{}.partial-{}", path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default(), uuid::Uuid::new_v4().simple()));
    let guard = crate::store::TempGuard(Some(tmp.clone()));
    tokio::fs::write(&tmp, data).await.map_err(|e| Error::io(&tmp, e))?;
    tokio::fs::rename(&tmp, path).await.map_err(|e| Error::io(path, e))?;
    guard.disarm();
    Ok(())
}

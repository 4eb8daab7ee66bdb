//! Content-addressed datasets (`dataset://sha256/<hex>` → `datasets/sha256/<hex>`) and a
//! local cache directory that workers fetch models and datasets into.
//!
//! Cache layout: `<root>/datasets/<hex>` (re-hashed on every hit),
//! `<root>/models/<sha256 of the source URL>/` (`s3://`) and
//! `<root>/models/<sha256 of endpoint, repo and commit>/` (`hf://`) (downloaded into a staging directory and
//! renamed into place once complete, so a half-fetched model is never used).

use crate::key::{layout, RelPath, Sha256Hex};
use crate::manifest::{write_atomic, Manifest, FORMAT};
use crate::store::{hash_file, TempGuard};
use crate::{Error, Result, Storage, StorageOptions};
use sha2::{Digest, Sha256};
use std::path::{Path, PathBuf};
use tracing::{info, warn};

pub const DATASET_SCHEME: &str = "dataset://sha256/";

/// `Some(digest)` if `s` is a `dataset://sha256/<hex>` reference (an error if malformed),
/// `None` for anything else (a local path).
pub fn parse_dataset_ref(s: &str) -> Option<Result<Sha256Hex>> {
    if let Some(hex) = s.strip_prefix(DATASET_SCHEME) {
        return Some(Sha256Hex::parse(hex));
    }
    if s.starts_with("dataset://") {
        return Some(Err(Error::InvalidKey { key: s.to_string(), reason: "dataset refs look like dataset://sha256/<64 hex>".into() }));
    }
    None
}

pub fn dataset_ref(sha: &Sha256Hex) -> String {
    format!("{DATASET_SCHEME}{sha}")
}

impl Storage {
    /// Store a local file content-addressed; returns its digest (and size). Uploading
    /// the same content twice is a no-op.
    pub async fn put_dataset_file(&self, local: &Path) -> Result<(Sha256Hex, u64)> {
        let (size, sha) = hash_file(local).await?;
        let key = layout::dataset(&sha);
        if self.size(&key).await? == Some(size) {
            return Ok((sha, size));
        }
        let (up_size, up_sha) = self.put_file(&key, local).await?;
        if up_sha != sha || up_size != size {
            // The file changed while we read it: what we stored is not what we named.
            self.delete(&key).await?;
            return Err(Error::Corrupt { key: key.to_string(), expected: sha.to_string(), expected_size: size, actual: up_sha.to_string(), actual_size: up_size });
        }
        Ok((sha, size))
    }

    /// Store bytes content-addressed; returns the digest.
    pub async fn put_dataset_bytes(&self, data: bytes::Bytes) -> Result<Sha256Hex> {
        let sha = Sha256Hex::from_digest(&Sha256::digest(&data));
        let key = layout::dataset(&sha);
        if self.size(&key).await? != Some(data.len() as u64) {
            self.put_bytes(&key, data).await?;
        }
        Ok(sha)
    }
}

/// A worker's local cache directory.
#[derive(Debug, Clone)]
pub struct Cache {
    root: PathBuf,
}

impl Cache {
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Self { root: root.into() }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The local file of dataset `sha`, downloading and verifying it if needed.
    /// A dataset missing from storage is [`Error::NotFound`].
    pub async fn dataset(&self, storage: &Storage, sha: &Sha256Hex) -> Result<PathBuf> {
        let dest = self.root.join("datasets").join(sha.as_str());
        if tokio::fs::try_exists(&dest).await.unwrap_or(false) {
            let (_, have) = hash_file(&dest).await?;
            if &have == sha {
                return Ok(dest);
            }
            warn!(path = %dest.display(), "cached dataset is corrupt; fetching again");
        }
        let key = layout::dataset(sha);
        let size = storage.size(&key).await?.ok_or_else(|| Error::NotFound { key: key.to_string() })?;
        storage.download_verified(&key, &dest, size, sha).await?;
        info!(sha256 = %sha, bytes = size, "fetched dataset");
        Ok(dest)
    }

    /// Resolve a model source to a local directory: a plain path or `file://` URL is
    /// used in place; `s3://bucket/prefix` or `az://container/prefix` is downloaded into
    /// the cache (verified against
    /// its `manifest.json` when it has one, else by the listed sizes).
    pub async fn model(&self, source: &str, opts: &StorageOptions) -> Result<PathBuf> {
        let unsupported = |reason: &str| Error::UnsupportedSource { source_url: source.to_string(), reason: reason.to_string() };
        if let Some(rest) = source.strip_prefix("file://") {
            let url = url::Url::parse(source).map_err(|e| unsupported(&e.to_string()))?;
            let p = url.to_file_path().map_err(|_| unsupported(&format!("not a local path: {rest}")))?;
            return Ok(p);
        }
        if source.starts_with("hf://") {
            return self.hub_model(source, &crate::hub::Hub::from_env()?).await;
        }
        if !["s3://", "s3a://", "az://", "azure://", "memory://"].iter().any(|p| source.starts_with(p)) {
            if source.contains("://") {
                return Err(unsupported("expected a local path, file://, s3://, az:// or hf://"));
            }
            return Ok(PathBuf::from(source));
        }
        let digest = hex::encode(Sha256::digest(source.as_bytes()));
        let storage = Storage::open_with(source, opts)?;
        let (dest, files) = self
            .install_model(&digest, |staging| async move {
                match storage.read_manifest_at_root().await? {
                    Some(m) => {
                        storage.download_root(&m, &staging).await?;
                        Ok(m)
                    }
                    None => {
                        warn!(source, "model has no manifest.json; verifying sizes only");
                        storage.download_listed_root(&staging).await
                    }
                }
            })
            .await?;
        if let Some(files) = files {
            info!(source, path = %dest.display(), files, "fetched model");
        }
        Ok(dest)
    }

    /// An `hf://org/name[@revision]` model through `hub`: the revision is resolved to
    /// its commit, and `<root>/models/<sha256 of endpoint, repo and commit>/` is filled
    /// once, like an `s3://` model.
    pub async fn hub_model(&self, source: &str, hub: &crate::hub::Hub) -> Result<PathBuf> {
        let r = crate::hub::parse_hf(source)?;
        let resolved = hub.resolve(&r, source).await?;
        let digest = hex::encode(Sha256::digest(format!("hf://{}@{}@{}", hub.endpoint(), r.repo, resolved.commit).as_bytes()));
        let commit = resolved.commit.clone();
        let (dest, files) = self.install_model(&digest, |staging| async move { hub.download(&r, source, &resolved, &staging).await }).await?;
        if let Some(files) = files {
            info!(source, commit = %commit, path = %dest.display(), files, "fetched model from the hub");
        }
        Ok(dest)
    }

    /// `<root>/models/<digest>/`, filled by `fill` (into a staging directory, given as
    /// its argument) unless it is already complete: the manifest `fill` returns is
    /// written last, then the directory is renamed into place, so a half-fetched model
    /// is never used. Returns the directory and, when this call fetched it, the number
    /// of files.
    async fn install_model<F, Fut>(&self, digest: &str, fill: F) -> Result<(PathBuf, Option<usize>)>
    where
        F: FnOnce(PathBuf) -> Fut,
        Fut: std::future::Future<Output = Result<Manifest>>,
    {
        let dest = self.root.join("models").join(digest);
        if tokio::fs::try_exists(dest.join(layout::MANIFEST)).await.unwrap_or(false) {
            return Ok((dest, None));
        }
        let staging = self.root.join("models").join(format!(".{digest}.partial-{}", uuid::Uuid::new_v4().simple()));
        let guard = TempGuard(Some(staging.clone()));
        let manifest = fill(staging.clone()).await?;
        write_atomic(&staging.join(layout::MANIFEST), &manifest.to_bytes()).await?;
        match tokio::fs::rename(&staging, &dest).await {
            Ok(()) => guard.disarm(),
            // Another fetch of the same model won the race: use its copy.
            Err(_) if tokio::fs::try_exists(dest.join(layout::MANIFEST)).await.unwrap_or(false) => {}
            Err(e) => return Err(Error::io(&dest, e)),
        }
        Ok((dest, Some(manifest.files.len())))
    }
}

impl Storage {
    async fn read_manifest_at_root(&self) -> Result<Option<Manifest>> {
        let key = RelPath::parse(layout::MANIFEST)?;
        match self.get_bytes(&key).await {
            Ok(b) => Manifest::parse(&format!("{}/{}", self.url(), layout::MANIFEST), &b).map(Some),
            Err(Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(e),
        }
    }

    async fn download_root(&self, m: &Manifest, dest: &Path) -> Result<()> {
        for f in &m.files {
            let rel = RelPath::parse(&f.name)?;
            self.download_verified(&rel, &rel.to_local(dest), f.size, &Sha256Hex::parse(&f.sha256)?).await?;
        }
        Ok(())
    }

    /// Without a manifest: download what the listing shows, check each size, and record
    /// the digests we computed in a manifest.
    async fn download_listed_root(&self, dest: &Path) -> Result<Manifest> {
        let listing = self.list_under(None).await?;
        if listing.is_empty() {
            return Err(Error::NotFound { key: self.url().to_string() });
        }
        let mut files = Vec::new();
        for (rel, size) in listing {
            let sha = self.download_checked(&rel, &rel.to_local(dest), size, None).await?;
            files.push(crate::FileEntry { name: rel.to_string(), size, sha256: sha.to_string() });
        }
        Ok(Manifest { format: FORMAT.into(), files, meta: Default::default() })
    }
}

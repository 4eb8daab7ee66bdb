//! The [`Storage`] handle: opening a backend from a URL and the primitive operations
//! (create-only puts, multipart file uploads, verified downloads, listing).

use crate::key::{layout, RelPath, Sha256Hex};
use crate::{Error, Result};
use bytes::Bytes;
use futures::StreamExt;
use object_store::aws::AmazonS3Builder;
use object_store::azure::{AzureConfigKey, MicrosoftAzureBuilder};
use object_store::local::LocalFileSystem;
use object_store::memory::InMemory;
use object_store::path::Path as ObjPath;
use object_store::{BackoffConfig, ObjectStore, ObjectStoreExt, PutMode, PutPayload, RetryConfig, WriteMultipart};
use sha2::{Digest, Sha256};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tracing::{debug, warn};

/// Multipart part size (S3 requires at least 5 MiB for every part but the last);
/// files larger than twice the part size go up as multipart uploads.
pub const DEFAULT_PART_SIZE: usize = 8 * 1024 * 1024;
const MIN_PART_SIZE: usize = 5 * 1024 * 1024;

/// Extra settings for [`Storage::open_with`].
#[derive(Debug, Clone, Default)]
pub struct StorageOptions {
    /// `object_store` S3 settings applied over the `AWS_*` environment
    /// (`aws_endpoint`, `aws_access_key_id`, `aws_secret_access_key`, `aws_region`, ...).
    pub s3: Vec<(String, String)>,
    /// `object_store` Azure settings applied over the `AZURE_*` environment
    /// (`azure_storage_account_name`, `azure_storage_account_key`,
    /// `azure_storage_endpoint`, ...).
    pub azure: Vec<(String, String)>,
    /// Multipart part size in bytes (at least 5 MiB); files over twice this go multipart.
    pub part_size: Option<usize>,
    /// Retries per request (default 5) with exponential backoff from 100 ms to 5 s.
    pub max_retries: Option<usize>,
}

/// An object store plus the prefix every key lives under. Cheap to clone.
#[derive(Clone)]
pub struct Storage {
    store: Arc<dyn ObjectStore>,
    prefix: ObjPath,
    url: String,
    part_size: usize,
    multipart_threshold: usize,
}

impl std::fmt::Debug for Storage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Storage").field("url", &self.url).finish()
    }
}

impl Storage {
    /// Open `file:///abs/dir`, `s3://bucket/prefix`, `az://container/prefix` or
    /// `memory://prefix`.
    pub fn open(url: &str) -> Result<Self> {
        Self::open_with(url, &StorageOptions::default())
    }

    pub fn open_with(url: &str, opts: &StorageOptions) -> Result<Self> {
        let bad = |reason: &str| Error::InvalidUrl { url: url.to_string(), reason: reason.to_string() };
        let parsed = url::Url::parse(url).map_err(|e| bad(&format!("{e} (expected file:///dir, s3://bucket/prefix, az://container/prefix or memory://)")))?;
        let part_size = opts.part_size.unwrap_or(DEFAULT_PART_SIZE).max(MIN_PART_SIZE);
        let retry = RetryConfig {
            backoff: BackoffConfig { init_backoff: Duration::from_millis(100), max_backoff: Duration::from_secs(5), base: 2.0 },
            max_retries: opts.max_retries.unwrap_or(5),
            retry_timeout: Duration::from_secs(120),
        };
        let (store, prefix): (Arc<dyn ObjectStore>, String) = match parsed.scheme() {
            "file" => {
                if parsed.host_str().is_some_and(|h| !h.is_empty() && h != "localhost") {
                    return Err(bad("file URLs name a local directory: file:///absolute/dir"));
                }
                let dir = parsed.to_file_path().map_err(|_| bad("not a local directory path"))?;
                std::fs::create_dir_all(&dir).map_err(|e| Error::io(&dir, e))?;
                let fs = LocalFileSystem::new_with_prefix(&dir).map_err(|e| Error::store(url, e))?;
                (Arc::new(fs), String::new())
            }
            "memory" => {
                let prefix = format!("{}{}", parsed.host_str().unwrap_or(""), parsed.path());
                (Arc::new(InMemory::new()), prefix)
            }
            "s3" | "s3a" => {
                let bucket = parsed.host_str().filter(|b| !b.is_empty()).ok_or_else(|| bad("missing bucket: s3://bucket/prefix"))?;
                let mut b = AmazonS3Builder::from_env().with_bucket_name(bucket).with_retry(retry);
                let mut endpoint = std::env::var("AWS_ENDPOINT_URL").or_else(|_| std::env::var("AWS_ENDPOINT")).ok();
                for (k, v) in &opts.s3 {
                    let key = k.to_ascii_lowercase().parse().map_err(|e| bad(&format!("s3 option {k}: {e}")))?;
                    if matches!(k.to_ascii_lowercase().as_str(), "aws_endpoint" | "aws_endpoint_url" | "endpoint") {
                        endpoint = Some(v.clone());
                    }
                    b = b.with_config(key, v);
                }
                if let Some(ep) = &endpoint {
                    // A local server (SeaweedFS and the like): plain http, path-style.
                    b = b.with_allow_http(ep.starts_with("http://")).with_virtual_hosted_style_request(false);
                }
                let s3 = b.build().map_err(|e| bad(&e.to_string()))?;
                (Arc::new(s3), parsed.path().to_string())
            }
            "az" | "azure" => {
                let container = parsed.host_str().filter(|c| !c.is_empty()).ok_or_else(|| bad("missing container: az://container/prefix"))?;
                let mut b = MicrosoftAzureBuilder::from_env().with_container_name(container).with_retry(retry);
                for (k, v) in &opts.azure {
                    let key: AzureConfigKey = k.to_ascii_lowercase().parse().map_err(|e| bad(&format!("azure option {k}: {e}")))?;
                    b = b.with_config(key, v);
                }
                // A local server (Azurite) at an http:// endpoint.
                if b.get_config_value(&AzureConfigKey::Endpoint).is_some_and(|ep| ep.starts_with("http://")) {
                    b = b.with_allow_http(true);
                }
                let az = b.build().map_err(|e| bad(&e.to_string()))?;
                (Arc::new(az), parsed.path().to_string())
            }
            "gs" => {
                return Err(bad(
                    "this build has no gs:// storage: no GCS server that installs on the development machines takes object_store's uploads, so it is untested and off",
                ))
            }
            other => return Err(bad(&format!("unknown scheme {other:?} (expected file://, s3://, az:// or memory://)"))),
        };
        let prefix = prefix.trim_matches('/');
        let prefix = if prefix.is_empty() { ObjPath::default() } else { RelPath::parse(prefix).map(|p| to_obj(&ObjPath::default(), &p))? };
        Ok(Self { store, prefix, url: url.to_string(), part_size, multipart_threshold: 2 * part_size })
    }

    pub fn url(&self) -> &str {
        &self.url
    }

    /// The URL without anything secret ([`public_url`]): what the coordinator tells
    /// workers (credentials come from each process's environment).
    pub fn public_url(&self) -> String {
        public_url(&self.url)
    }

    /// Files larger than this are uploaded in parts.
    pub fn multipart_threshold(&self) -> usize {
        self.multipart_threshold
    }

    fn path(&self, key: &RelPath) -> ObjPath {
        to_obj(&self.prefix, key)
    }

    /// Overwrite `key` with `data`.
    pub async fn put_bytes(&self, key: &RelPath, data: Bytes) -> Result<()> {
        self.store.put(&self.path(key), PutPayload::from(data)).await.map_err(|e| Error::store(key, e))?;
        Ok(())
    }

    /// Create `key` only if it does not exist. If it exists with the same bytes (a retry
    /// of our own earlier write), that counts as success; different bytes are
    /// [`Error::AlreadyExists`].
    pub async fn put_create_only(&self, key: &RelPath, data: Bytes) -> Result<()> {
        let path = self.path(key);
        match self.store.put_opts(&path, PutPayload::from(data.clone()), PutMode::Create.into()).await {
            Ok(_) => Ok(()),
            Err(object_store::Error::AlreadyExists { .. }) | Err(object_store::Error::Precondition { .. }) => {
                let existing = self.get_bytes(key).await?;
                if existing == data {
                    debug!(key = %key, "create-only put found identical content (retried write)");
                    Ok(())
                } else {
                    Err(Error::AlreadyExists { key: key.to_string() })
                }
            }
            Err(e) => Err(Error::store(key, e)),
        }
    }

    pub async fn get_bytes(&self, key: &RelPath) -> Result<Bytes> {
        let r = self.store.get(&self.path(key)).await.map_err(|e| Error::store(key, e))?;
        r.bytes().await.map_err(|e| Error::store(key, e))
    }

    /// The bytes of `key` as a stream of chunks, so a large object is never held whole
    /// (the coordinator's dashboard streams checkpoint files through it).
    pub async fn get_stream(&self, key: &RelPath) -> Result<futures::stream::BoxStream<'static, Result<Bytes>>> {
        let r = self.store.get(&self.path(key)).await.map_err(|e| Error::store(key, e))?;
        let k = key.to_string();
        Ok(r.into_stream().map(move |c| c.map_err(|e| Error::store(&k, e))).boxed())
    }

    /// Size of `key`, or `None` if it does not exist.
    pub async fn size(&self, key: &RelPath) -> Result<Option<u64>> {
        match self.store.head(&self.path(key)).await {
            Ok(m) => Ok(Some(m.size)),
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(Error::store(key, e)),
        }
    }

    pub async fn delete(&self, key: &RelPath) -> Result<()> {
        match self.store.delete(&self.path(key)).await {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(Error::store(key, e)),
        }
    }

    /// Every object under `dir`, as (path relative to `dir`, size), sorted.
    pub async fn list(&self, dir: &RelPath) -> Result<Vec<(RelPath, u64)>> {
        self.list_under(Some(dir)).await
    }

    /// Every object under `dir` (or under the prefix itself), relative to it, sorted.
    pub async fn list_under(&self, dir: Option<&RelPath>) -> Result<Vec<(RelPath, u64)>> {
        let base = match dir {
            Some(d) => self.path(d),
            None => self.prefix.clone(),
        };
        let shown = dir.map(|d| d.to_string()).unwrap_or_default();
        let mut out = Vec::new();
        let mut s = self.store.list(Some(&base));
        while let Some(m) = s.next().await {
            let m = m.map_err(|e| Error::store(&shown, e))?;
            let rel: Vec<String> = match m.location.prefix_match(&base) {
                Some(parts) => parts.map(|p| p.as_ref().to_string()).collect(),
                None => continue,
            };
            out.push((RelPath::parse(&rel.join("/"))?, m.size));
        }
        out.sort();
        Ok(out)
    }

    /// Upload a local file to `key` (multipart when large) and return its size and sha256.
    pub async fn put_file(&self, key: &RelPath, local: &Path) -> Result<(u64, Sha256Hex)> {
        let mut f = tokio::fs::File::open(local).await.map_err(|e| Error::io(local, e))?;
        let len = f.metadata().await.map_err(|e| Error::io(local, e))?.len();
        let path = self.path(key);
        let mut hasher = Sha256::new();
        if len as usize <= self.multipart_threshold {
            let mut buf = Vec::with_capacity(len as usize);
            f.read_to_end(&mut buf).await.map_err(|e| Error::io(local, e))?;
            hasher.update(&buf);
            let size = buf.len() as u64;
            self.store.put(&path, PutPayload::from(buf)).await.map_err(|e| Error::store(key, e))?;
            return Ok((size, Sha256Hex::from_digest(&hasher.finalize())));
        }
        debug!(key = %key, bytes = len, part_size = self.part_size, "multipart upload");
        let upload = self.store.put_multipart(&path).await.map_err(|e| Error::store(key, e))?;
        let mut w = WriteMultipart::new_with_chunk_size(upload, self.part_size);
        let mut buf = vec![0u8; 1024 * 1024];
        let mut size = 0u64;
        let res: Result<()> = async {
            loop {
                let n = f.read(&mut buf).await.map_err(|e| Error::io(local, e))?;
                if n == 0 {
                    break;
                }
                hasher.update(&buf[..n]);
                size += n as u64;
                w.wait_for_capacity(4).await.map_err(|e| Error::store(key, e))?;
                w.write(&buf[..n]);
            }
            Ok(())
        }
        .await;
        match res {
            Ok(()) => {
                w.finish().await.map_err(|e| Error::store(key, e))?;
            }
            Err(e) => {
                if let Err(abort) = w.abort().await {
                    warn!(key = %key, error = %abort, "aborting multipart upload failed");
                }
                return Err(e);
            }
        }
        Ok((size, Sha256Hex::from_digest(&hasher.finalize())))
    }

    /// Download `key` to `dest`, checking size and sha256. The bytes stream into a temp
    /// file beside `dest`, which is renamed over `dest` only after the check passes; on
    /// any error no file is left behind and `dest` is untouched.
    pub async fn download_verified(&self, key: &RelPath, dest: &Path, size: u64, sha256: &Sha256Hex) -> Result<()> {
        self.download_checked(key, dest, size, Some(sha256)).await.map(|_| ())
    }

    /// [`Storage::download_verified`], with the digest check optional (the size is
    /// always checked); returns the digest of what was written.
    pub(crate) async fn download_checked(&self, key: &RelPath, dest: &Path, size: u64, sha256: Option<&Sha256Hex>) -> Result<Sha256Hex> {
        let dir = dest.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
        tokio::fs::create_dir_all(dir).await.map_err(|e| Error::io(dir, e))?;
        let name = dest.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        let tmp = dir.join(format!(".{name}.partial-{}", uuid::Uuid::new_v4().simple()));
        let guard = TempGuard(Some(tmp.clone()));
        let (actual_size, actual) = self.stream_to(key, &tmp).await?;
        if actual_size != size || sha256.is_some_and(|s| s != &actual) {
            return Err(Error::Corrupt {
                key: key.to_string(),
                expected: sha256.map(|s| s.to_string()).unwrap_or_else(|| "(any)".into()),
                expected_size: size,
                actual: actual.to_string(),
                actual_size,
            });
        }
        tokio::fs::rename(&tmp, dest).await.map_err(|e| Error::io(dest, e))?;
        guard.disarm();
        Ok(actual)
    }

    async fn stream_to(&self, key: &RelPath, tmp: &Path) -> Result<(u64, Sha256Hex)> {
        let r = self.store.get(&self.path(key)).await.map_err(|e| Error::store(key, e))?;
        let mut stream = r.into_stream();
        let mut f = tokio::fs::File::create(tmp).await.map_err(|e| Error::io(tmp, e))?;
        let mut hasher = Sha256::new();
        let mut n = 0u64;
        while let Some(chunk) = stream.next().await {
            let chunk = chunk.map_err(|e| Error::store(key, e))?;
            hasher.update(&chunk);
            n += chunk.len() as u64;
            f.write_all(&chunk).await.map_err(|e| Error::io(tmp, e))?;
        }
        f.flush().await.map_err(|e| Error::io(tmp, e))?;
        f.sync_all().await.map_err(|e| Error::io(tmp, e))?;
        Ok((n, Sha256Hex::from_digest(&hasher.finalize())))
    }

    /// Self-check run at startup: a second create-only put of the same probe key must be
    /// refused. Fencing (one manifest per checkpoint, never overwritten) relies on it.
    pub async fn check_create_only(&self) -> Result<()> {
        let key = layout::probe(&uuid::Uuid::new_v4().simple().to_string())?;
        let path = self.path(&key);
        self.store.put_opts(&path, PutPayload::from_static(b"1"), PutMode::Create.into()).await.map_err(|e| Error::store(&key, e))?;
        let second = self.store.put_opts(&path, PutPayload::from_static(b"2"), PutMode::Create.into()).await;
        let verdict = match second {
            Err(object_store::Error::AlreadyExists { .. }) | Err(object_store::Error::Precondition { .. }) => Ok(()),
            Ok(_) => Err(Error::CreateOnlyNotEnforced { url: self.url.clone(), key: key.to_string() }),
            Err(e) => Err(Error::store(&key, e)),
        };
        if let Err(e) = self.delete(&key).await {
            warn!(key = %key, error = %e, "could not delete create-only probe");
        }
        verdict
    }
}

fn to_obj(prefix: &ObjPath, key: &RelPath) -> ObjPath {
    let mut p = prefix.clone();
    for s in key.segments() {
        p = p.join(s.as_str());
    }
    p
}

/// Removes a temp file on drop unless disarmed.
pub(crate) struct TempGuard(pub(crate) Option<PathBuf>);

impl TempGuard {
    pub(crate) fn disarm(mut self) {
        self.0 = None;
    }
}

impl Drop for TempGuard {
    fn drop(&mut self) {
        if let Some(p) = self.0.take() {
            let _ = std::fs::remove_file(&p).or_else(|_| std::fs::remove_dir_all(&p));
        }
    }
}

/// A storage URL without user info, query or fragment (what may be shown or sent).
pub fn public_url(url: &str) -> String {
    match url::Url::parse(url) {
        Ok(mut u) => {
            let _ = u.set_username("");
            let _ = u.set_password(None);
            u.set_query(None);
            u.set_fragment(None);
            u.to_string()
        }
        Err(_) => url.to_string(),
    }
}

/// sha256 and size of a local file.
pub async fn hash_file(path: &Path) -> Result<(u64, Sha256Hex)> {
    let mut f = tokio::fs::File::open(path).await.map_err(|e| Error::io(path, e))?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1024 * 1024];
    let mut n = 0u64;
    loop {
        let k = f.read(&mut buf).await.map_err(|e| Error::io(path, e))?;
        if k == 0 {
            break;
        }
        hasher.update(&buf[..k]);
        n += k as u64;
    }
    Ok((n, Sha256Hex::from_digest(&hasher.finalize())))
}

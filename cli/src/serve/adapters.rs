//! Which model a request's `model` names, and the adapters held in memory.
//!
//! A name is the base model, an adapter given with `--adapter NAME=DIR`, or a job id
//! whose finished adapter is read from the job store (`--adapters-from`): its files are
//! downloaded once into the cache directory and checked against the manifest's sha256
//! (a cached copy is re-checked before use). At most `max_loaded` adapters are held in
//! memory; the least recently used one is dropped first (generations already running
//! keep theirs until they end).

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use candle_core::{DType, Device};
use lorafleet_engine::data::PromptFormat;
use lorafleet_engine::multi_lora::ServedAdapter;
use lorafleet_shared::ids::JobId;
use lorafleet_storage::{layout, Segment, Storage};

use super::api::ApiError;
use super::metrics::ServeMetrics;

/// A resolved `model`: the adapter (none for the base) and how its prompts are formatted.
#[derive(Clone)]
pub struct Resolved {
    pub adapter: Option<Arc<ServedAdapter>>,
    pub format: PromptFormat,
}

pub struct Registry {
    base: String,
    format: PromptFormat,
    local: BTreeMap<String, PathBuf>,
    store: Option<Storage>,
    cache_dir: PathBuf,
    linears: Vec<(String, usize, usize)>,
    dtype: DType,
    device: Device,
    max_loaded: usize,
    metrics: Arc<ServeMetrics>,
    lru: Mutex<Lru>,
    /// One load at a time: two requests for the same job download it once.
    loading: tokio::sync::Mutex<()>,
}

#[derive(Default)]
struct Lru {
    tick: u64,
    held: HashMap<String, (u64, Resolved)>,
    /// Job adapters seen (listed by /v1/models once loaded).
    jobs: std::collections::BTreeSet<String>,
}

pub struct RegistryConfig {
    pub base: String,
    /// For the base model and adapters that record none.
    pub format: PromptFormat,
    pub local: BTreeMap<String, PathBuf>,
    pub store: Option<Storage>,
    pub cache_dir: PathBuf,
    pub linears: Vec<(String, usize, usize)>,
    pub dtype: DType,
    pub device: Device,
    pub max_loaded: usize,
}

impl Registry {
    pub fn new(c: RegistryConfig, metrics: Arc<ServeMetrics>) -> Self {
        Self {
            base: c.base,
            format: c.format,
            local: c.local,
            store: c.store,
            cache_dir: c.cache_dir,
            linears: c.linears,
            dtype: c.dtype,
            device: c.device,
            max_loaded: c.max_loaded.max(1),
            metrics,
            lru: Mutex::new(Lru::default()),
            loading: tokio::sync::Mutex::new(()),
        }
    }

    pub fn base(&self) -> &str {
        &self.base
    }

    /// Model ids to list: the base, the local adapters, and job adapters loaded so far.
    pub fn model_ids(&self) -> Vec<String> {
        let mut ids = vec![self.base.clone()];
        ids.extend(self.local.keys().cloned());
        if let Ok(l) = self.lru.lock() {
            ids.extend(l.jobs.iter().cloned());
        }
        ids
    }

    fn cached(&self, name: &str) -> Option<Resolved> {
        let mut l = self.lru.lock().ok()?;
        l.tick += 1;
        let t = l.tick;
        let e = l.held.get_mut(name)?;
        e.0 = t;
        Some(e.1.clone())
    }

    fn insert(&self, name: &str, r: Resolved, job: bool) {
        let Ok(mut l) = self.lru.lock() else { return };
        l.tick += 1;
        let t = l.tick;
        l.held.insert(name.to_string(), (t, r.clone()));
        if job {
            l.jobs.insert(name.to_string());
        }
        while l.held.len() > self.max_loaded {
            let Some(oldest) = l.held.iter().min_by_key(|(_, (t, _))| *t).map(|(k, _)| k.clone()) else { break };
            l.held.remove(&oldest);
            self.metrics.adapters.with_label_values(&["evicted"]).inc();
            tracing::info!(adapter = %oldest, "adapter dropped from memory (least recently used)");
        }
        self.metrics.adapters_loaded.set(l.held.len() as i64);
    }

    /// What `model` names.
    pub async fn resolve(&self, model: &str) -> Result<Resolved, ApiError> {
        if model == self.base {
            return Ok(Resolved { adapter: None, format: self.format.clone() });
        }
        if let Some(r) = self.cached(model) {
            self.metrics.adapters.with_label_values(&["hit"]).inc();
            return Ok(r);
        }
        let _one = self.loading.lock().await;
        if let Some(r) = self.cached(model) {
            self.metrics.adapters.with_label_values(&["hit"]).inc();
            return Ok(r);
        }
        let (dir, job) = if let Some(dir) = self.local.get(model) {
            (dir.clone(), false)
        } else if let (Some(store), Ok(job)) = (&self.store, model.parse::<JobId>()) {
            (self.fetch_job(store, &job).await?, true)
        } else {
            return Err(ApiError::model_not_found(model));
        };
        // How the adapter was trained to be prompted, when its directory records it.
        let format = lorafleet_engine::peft::read_prompt_format(&dir)
            .map_err(|e| ApiError::internal(format!("adapter {model}: {e}")))?
            .unwrap_or_else(|| self.format.clone());
        self.metrics.adapters.with_label_values(&["miss"]).inc();
        let (name, linears, dtype, device) = (model.to_string(), self.linears.clone(), self.dtype, self.device.clone());
        let d = dir.clone();
        let adapter = tokio::task::spawn_blocking(move || ServedAdapter::load(&name, &d, &linears, dtype, &device))
            .await
            .map_err(|e| ApiError::internal(format!("loading adapter {model}: {e}")))?
            .map_err(|e| ApiError::internal(format!("adapter {model} ({}) cannot be served: {e}", dir.display())))?;
        tracing::info!(adapter = %model, dir = %dir.display(), modules = adapter.module_count(), bytes = adapter.bytes, "adapter loaded");
        let r = Resolved { adapter: Some(Arc::new(adapter)), format };
        self.insert(model, r.clone(), job);
        Ok(r)
    }

    /// The job's finished adapter in the local cache (downloaded and verified when
    /// missing or not matching its manifest).
    async fn fetch_job(&self, store: &Storage, job: &JobId) -> Result<PathBuf, ApiError> {
        let id = job.to_string();
        let seg = Segment::new(id.clone()).map_err(|e| ApiError::invalid("model", format!("{e}")))?;
        let key = layout::final_adapter(&seg);
        let manifest = match store.read_manifest(&key).await {
            Ok(Some(m)) => m,
            Ok(None) => return Err(ApiError::model_not_found(&id)),
            Err(e) => return Err(ApiError::internal(format!("reading job {id}'s adapter from the job store: {e}"))),
        };
        let dir = self.cache_dir.join("jobs").join(&id);
        let fresh = dir.join(layout::MANIFEST).exists() && lorafleet_storage::manifest::verify_local(&dir, &manifest).await.is_ok();
        if !fresh {
            tracing::info!(job = %id, dir = %dir.display(), "downloading the job's adapter");
            let tmp = self.cache_dir.join("jobs").join(format!(".{id}.partial"));
            let _ = tokio::fs::remove_dir_all(&tmp).await;
            store.download_dir(&key, &tmp).await.map_err(|e| ApiError::internal(format!("downloading job {id}'s adapter: {e}")))?;
            let _ = tokio::fs::remove_dir_all(&dir).await;
            tokio::fs::rename(&tmp, &dir).await.map_err(|e| ApiError::internal(format!("{}: {e}", dir.display())))?;
        }
        Ok(dir)
    }
}

/// Parse `--adapter NAME=DIR`.
pub fn parse_named(s: &str) -> Result<(String, PathBuf), String> {
    let (name, dir) = s.split_once('=').ok_or_else(|| format!("--adapter {s:?}: expected NAME=DIR"))?;
    if name.is_empty() || dir.is_empty() {
        return Err(format!("--adapter {s:?}: expected NAME=DIR with both parts non-empty"));
    }
    Ok((name.to_string(), Path::new(dir).to_path_buf()))
}

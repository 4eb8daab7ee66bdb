//! Many LoRA adapters over one frozen base model, in one batch (serving).
//!
//! A served model is loaded without LoRA; each request brings its own adapter (or none,
//! for the base model). A batch packs the requests' tokens into one row ordered by
//! adapter, so every frozen product runs once over all rows and each adapter adds
//! `s · (x A^T) B^T` to its own contiguous range of rows ([`RowAdapters`], applied by
//! [`crate::lora::LoraLinear`]). The arithmetic is PEFT's unmerged forward.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

use candle_core::{DType, Device, Tensor};

use crate::peft;
use crate::{EngineError, Result};

/// One adapted module's weights, transposed for the products and in the compute dtype.
#[derive(Debug)]
pub struct ModuleLora {
    /// `A^T`, `[in, r]`.
    pub a_t: Tensor,
    /// `B^T`, `[r, out]`.
    pub b_t: Tensor,
}

/// A PEFT adapter ready to be applied next to others on a shared base model.
#[derive(Debug)]
pub struct ServedAdapter {
    pub name: String,
    pub r: usize,
    pub scaling: f64,
    /// Keyed by module path (`model.layers.0.self_attn.q_proj`).
    modules: HashMap<String, ModuleLora>,
    /// Bytes held by the weights (for cache accounting and metrics).
    pub bytes: usize,
}

impl ServedAdapter {
    /// Read the PEFT adapter in `dir` and check it against the base model's linear
    /// modules (`model.linear_shapes()`: path, out, in): every tensor must name one of
    /// them, with the shapes `[r, in]` / `[out, r]`.
    pub fn load(name: &str, dir: &Path, linears: &[(String, usize, usize)], dtype: DType, device: &Device) -> Result<Self> {
        let cfg = peft::read_adapter_config(dir)?;
        let mut tensors = peft::read_adapter_tensors(dir)?;
        let file = dir.join(peft::ADAPTER_WEIGHTS);
        let shapes: HashMap<&str, (usize, usize)> = linears.iter().map(|(n, o, i)| (n.as_str(), (*o, *i))).collect();
        let mut modules = HashMap::new();
        let mut keys: Vec<String> = tensors.keys().cloned().collect();
        keys.sort();
        let mut bytes = 0;
        for key in keys {
            let Some(module) = key.strip_prefix("base_model.model.").and_then(|k| k.strip_suffix(".lora_A.weight")) else { continue };
            let module = module.to_string();
            let &(out, inp) = shapes.get(module.as_str()).ok_or_else(|| {
                EngineError::AdapterMismatch(format!("{}: tensor {key} names module {module}, which the base model does not have", file.display()))
            })?;
            let mut take = |k: &str, want: [usize; 2]| -> Result<Tensor> {
                let (shape, v) = tensors.remove(k).ok_or_else(|| EngineError::AdapterMismatch(format!("{}: missing tensor {k}", file.display())))?;
                if shape != want {
                    return Err(EngineError::AdapterMismatch(format!("{}: tensor {k} has shape {shape:?}, the base model needs {want:?}", file.display())));
                }
                Ok(Tensor::from_vec(v, (want[0], want[1]), device)?)
            };
            let a = take(&key, [cfg.r, inp])?;
            let b = take(&crate::lora::peft_key(&module, "B"), [out, cfg.r])?;
            let a_t = a.t()?.contiguous()?.to_dtype(dtype)?;
            let b_t = b.t()?.contiguous()?.to_dtype(dtype)?;
            bytes += (a_t.elem_count() + b_t.elem_count()) * dtype.size_in_bytes();
            modules.insert(module, ModuleLora { a_t, b_t });
        }
        if let Some(k) = tensors.keys().min() {
            return Err(EngineError::AdapterMismatch(format!("{}: tensor {k} is not a LoRA A/B pair of a module", file.display())));
        }
        if modules.is_empty() {
            return Err(EngineError::AdapterMismatch(format!("{}: no LoRA tensors", file.display())));
        }
        let scaling = if cfg.use_rslora { cfg.lora_alpha / (cfg.r as f64).sqrt() } else { cfg.lora_alpha / cfg.r as f64 };
        Ok(Self { name: name.to_string(), r: cfg.r, scaling, modules, bytes })
    }

    pub fn module(&self, path: &str) -> Option<&ModuleLora> {
        self.modules.get(path)
    }

    pub fn module_count(&self) -> usize {
        self.modules.len()
    }
}

/// Contiguous rows of a packed batch that share an adapter.
#[derive(Debug, Clone)]
pub struct AdapterRange {
    pub start: usize,
    pub len: usize,
    pub adapter: Option<Arc<ServedAdapter>>,
}

/// Which adapter each row of a pass uses, as ranges covering the rows in order.
#[derive(Debug, Clone, Default)]
pub struct RowAdapters {
    pub ranges: Vec<AdapterRange>,
}

impl RowAdapters {
    /// Append `len` rows using `adapter`, merged into the last range when it is the same.
    pub fn push(&mut self, len: usize, adapter: Option<&Arc<ServedAdapter>>) {
        let start = self.ranges.last().map_or(0, |r| r.start + r.len);
        if let Some(last) = self.ranges.last_mut() {
            let same = match (&last.adapter, adapter) {
                (None, None) => true,
                (Some(a), Some(b)) => Arc::ptr_eq(a, b),
                _ => false,
            };
            if same {
                last.len += len;
                return;
            }
        }
        self.ranges.push(AdapterRange { start, len, adapter: adapter.cloned() });
    }

    pub fn rows(&self) -> usize {
        self.ranges.last().map_or(0, |r| r.start + r.len)
    }

    /// `y [m, out] + s · (x A^T) B^T` on each range whose adapter has module `path`
    /// (`x [m, in]`); `y` unchanged where none does.
    pub fn apply(&self, path: &str, x: &Tensor, y: &Tensor) -> Result<Tensor> {
        let mut pieces = Vec::with_capacity(self.ranges.len());
        let mut adapted = false;
        for r in &self.ranges {
            let y_r = y.narrow(0, r.start, r.len)?;
            match r.adapter.as_ref().and_then(|a| a.module(path).map(|m| (a.scaling, m))) {
                Some((s, m)) => {
                    let h = x.narrow(0, r.start, r.len)?.matmul(&m.a_t)?;
                    let d = (h.matmul(&m.b_t)? * s)?;
                    pieces.push((y_r + d)?);
                    adapted = true;
                }
                None => pieces.push(y_r),
            }
        }
        if !adapted {
            return Ok(y.clone());
        }
        Ok(Tensor::cat(&pieces, 0)?)
    }
}

/// One sequence of a packed pass: its new tokens, its cache, its adapter.
pub struct PackedSeq<'a> {
    pub tokens: &'a [u32],
    pub cache: &'a mut crate::model::KvCache,
    pub adapter: Option<Arc<ServedAdapter>>,
}

//! LoRA layers, PEFT-exact: `y = base(x) + B(A(dropout(x))) * scaling`, A `[r, in]`
//! initialised Uniform(-1/sqrt(in), 1/sqrt(in)) from a seeded ChaCha RNG, B `[out, r]`
//! zeros. Dropout touches only the LoRA branch and only in training mode; its masks come
//! from a counter-based ChaCha stream (seed, forward pass, layer), so a recomputation
//! under gradient checkpointing draws the very same masks.

use std::collections::BTreeMap;
use std::sync::Arc;

use candle_core::{DType, Device, Tensor, Var};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::model::LoraSettings;
use crate::multi_lora::RowAdapters;
use crate::ops::FrozenLinear;
use crate::{EngineError, Result};

/// Per forward pass switches.
#[derive(Debug, Clone)]
pub struct ForwardCtx {
    /// Build the autograd graph through the LoRA variables (false: use detached copies,
    /// for the no-graph forward of a checkpointed block).
    pub track: bool,
    /// LoRA dropout on.
    pub training: bool,
    pub dropout_seed: u64,
    /// Counter of the forward pass (selects the dropout stream).
    pub pass: u64,
    /// Served adapters by row (batched serving of several adapters; inference only).
    pub adapters: Option<Arc<RowAdapters>>,
}

impl ForwardCtx {
    pub fn inference() -> Self {
        Self { track: false, training: false, dropout_seed: 0, pass: 0, adapters: None }
    }
}

/// A LoRA pair attached to one linear module.
#[derive(Debug, Clone)]
pub struct LoraAdapter {
    pub key_a: String,
    pub key_b: String,
    pub a: Var,
    pub b: Var,
    pub scaling: f64,
    pub dropout: f64,
    /// Position of the module in the model (selects its dropout stream).
    pub id: u64,
}

/// A frozen linear layer with an optional LoRA adapter.
#[derive(Debug, Clone)]
pub struct LoraLinear {
    /// Module path, e.g. `model.layers.0.self_attn.q_proj`.
    pub name: String,
    pub base: FrozenLinear,
    pub lora: Option<LoraAdapter>,
}

fn mix64(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Inverted-dropout mask (`0` or `1/(1-p)`) of `n` values for one module in one pass.
pub fn dropout_mask(n: usize, p: f64, seed: u64, pass: u64, id: u64) -> Vec<f32> {
    let mut rng = ChaCha8Rng::seed_from_u64(mix64(seed ^ mix64(pass)));
    rng.set_stream(id);
    let keep = 1.0 / (1.0 - p) as f32;
    (0..n).map(|_| if rng.gen::<f64>() < p { 0.0 } else { keep }).collect()
}

impl LoraLinear {
    pub fn forward(&self, x: &Tensor, ctx: &ForwardCtx) -> Result<Tensor> {
        let y = self.forward_own(x, ctx)?;
        let Some(rows) = &ctx.adapters else { return Ok(y) };
        let dims = y.dims().to_vec();
        let k = self.base.in_dim();
        let m = x.elem_count() / k.max(1);
        if rows.rows() != m {
            return Err(EngineError::Config(format!("{}: the pass has {m} rows, its adapters cover {}", self.name, rows.rows())));
        }
        let out = rows.apply(&self.name, &x.reshape((m, k))?, &y.reshape((m, self.base.out_dim()))?)?;
        Ok(out.reshape(dims)?)
    }

    /// The layer with its own adapter (if any).
    fn forward_own(&self, x: &Tensor, ctx: &ForwardCtx) -> Result<Tensor> {
        let Some(l) = &self.lora else { return Ok(self.base.forward(x)?) };
        if !crate::fused::lora_fusable(&self.base, x) {
            return self.forward_composite(x, ctx);
        }
        let (a, b) = if ctx.track { (l.a.as_tensor().clone(), l.b.as_tensor().clone()) } else { (l.a.as_tensor().detach(), l.b.as_tensor().detach()) };
        let mask = (ctx.training && l.dropout > 0.0).then(|| dropout_mask(x.elem_count(), l.dropout, ctx.dropout_seed, ctx.pass, l.id));
        Ok(crate::fused::lora_linear_fused(&self.base, x, &a, &b, l.scaling, mask)?)
    }

    /// The same layer from separate candle ops (any device and dtype; the reference the
    /// fused op is tested against).
    pub fn forward_composite(&self, x: &Tensor, ctx: &ForwardCtx) -> Result<Tensor> {
        let y = self.base.forward(x)?;
        let Some(l) = &self.lora else { return Ok(y) };
        let dt = y.dtype();
        let dims = x.dims().to_vec();
        let k = *dims.last().unwrap_or(&0);
        let m = x.elem_count() / k.max(1);
        let mut xa = x.to_dtype(dt)?.reshape((m, k))?;
        if ctx.training && l.dropout > 0.0 {
            let mask = dropout_mask(m * k, l.dropout, ctx.dropout_seed, ctx.pass, l.id);
            let mask = Tensor::from_vec(mask, (m, k), x.device())?.to_dtype(dt)?;
            xa = xa.mul(&mask)?;
        }
        let (a, b) = if ctx.track {
            (l.a.as_tensor().clone(), l.b.as_tensor().clone())
        } else {
            (l.a.as_tensor().detach(), l.b.as_tensor().detach())
        };
        let a = a.to_dtype(dt)?;
        let b = b.to_dtype(dt)?;
        let h = xa.matmul(&a.t()?)?;
        let d = (h.matmul(&b.t()?)? * l.scaling)?;
        let mut out_dims = dims[..dims.len() - 1].to_vec();
        out_dims.push(self.base.out_dim());
        Ok((y + d.reshape(out_dims)?)?)
    }
}

/// Where the initial LoRA weights come from.
#[allow(clippy::large_enum_variant)]
pub enum LoraSource {
    /// PEFT's default init from a seeded ChaCha RNG.
    Init(ChaCha8Rng),
    /// Tensors of a PEFT adapter file (`key -> (shape, f32 values)`), consumed as the
    /// modules are built.
    Adapter { path: std::path::PathBuf, tensors: crate::peft::AdapterTensors },
}

/// Wraps the linear modules of a model while it is built.
pub struct LoraBuilder {
    settings: Option<LoraSettings>,
    source: LoraSource,
    device: Device,
    params: BTreeMap<String, Var>,
    next_id: u64,
}

/// PEFT target matching: a module is targeted when its path equals a target or ends
/// with `.target`.
pub fn is_target(module_path: &str, targets: &[String]) -> bool {
    targets.iter().any(|t| module_path == t || module_path.ends_with(&format!(".{t}")))
}

pub fn peft_key(module_path: &str, which: &str) -> String {
    format!("base_model.model.{module_path}.lora_{which}.weight")
}

impl LoraBuilder {
    pub fn new(settings: Option<LoraSettings>, source: LoraSource, device: &Device) -> Self {
        Self { settings, source, device: device.clone(), params: BTreeMap::new(), next_id: 0 }
    }

    pub fn settings(&self) -> Option<&LoraSettings> {
        self.settings.as_ref()
    }

    /// Wrap `base` (module `path`); attaches an adapter when the path is targeted.
    pub fn wrap(&mut self, path: &str, base: FrozenLinear) -> Result<LoraLinear> {
        let id = self.next_id;
        self.next_id += 1;
        let Some(s) = &self.settings else { return Ok(LoraLinear { name: path.into(), base, lora: None }) };
        if !is_target(path, &s.target_modules) {
            return Ok(LoraLinear { name: path.into(), base, lora: None });
        }
        let (r, fan_in, fan_out) = (s.r, base.in_dim(), base.out_dim());
        let key_a = peft_key(path, "A");
        let key_b = peft_key(path, "B");
        let (a, b) = match &mut self.source {
            LoraSource::Init(rng) => {
                let bound = 1.0 / (fan_in as f64).sqrt();
                let a: Vec<f32> = (0..r * fan_in).map(|_| rng.gen_range(-bound..bound) as f32).collect();
                (a, vec![0f32; fan_out * r])
            }
            LoraSource::Adapter { path: file, tensors } => {
                let mut take = |key: &str, want: [usize; 2]| -> Result<Vec<f32>> {
                    let (shape, v) = tensors.remove(key).ok_or_else(|| {
                        EngineError::AdapterMismatch(format!(
                            "{}: missing tensor {key} (expected shape {want:?})",
                            file.display()
                        ))
                    })?;
                    if shape != want {
                        return Err(EngineError::AdapterMismatch(format!(
                            "{}: tensor {key} has shape {shape:?}, the base model needs {want:?}",
                            file.display()
                        )));
                    }
                    Ok(v)
                };
                (take(&key_a, [r, fan_in])?, take(&key_b, [fan_out, r])?)
            }
        };
        let a = Var::from_tensor(&Tensor::from_vec(a, (r, fan_in), &self.device)?.to_dtype(DType::F32)?)?;
        let b = Var::from_tensor(&Tensor::from_vec(b, (fan_out, r), &self.device)?.to_dtype(DType::F32)?)?;
        self.params.insert(key_a.clone(), a.clone());
        self.params.insert(key_b.clone(), b.clone());
        let lora = LoraAdapter { key_a, key_b, a, b, scaling: s.scaling(), dropout: s.dropout, id };
        Ok(LoraLinear { name: path.into(), base, lora: Some(lora) })
    }

    /// Finish: every adapter tensor must have found its module.
    pub fn finish(self) -> Result<BTreeMap<String, Var>> {
        if let LoraSource::Adapter { path, tensors } = &self.source {
            if let Some(key) = tensors.keys().min() {
                let (shape, _) = &tensors[key];
                return Err(EngineError::AdapterMismatch(format!(
                    "{}: tensor {key} (shape {shape:?}) matches no targeted module of the base model",
                    path.display()
                )));
            }
        }
        if let Some(s) = &self.settings {
            if self.params.is_empty() {
                return Err(EngineError::Config(format!(
                    "lora target_modules {:?} match no linear module of the model",
                    s.target_modules
                )));
            }
        }
        Ok(self.params)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dropout_masks_are_reproducible_and_distinct() {
        let a = dropout_mask(1000, 0.1, 7, 3, 2);
        assert_eq!(a, dropout_mask(1000, 0.1, 7, 3, 2));
        assert_ne!(a, dropout_mask(1000, 0.1, 7, 4, 2));
        assert_ne!(a, dropout_mask(1000, 0.1, 7, 3, 1));
        let zeros = a.iter().filter(|&&v| v == 0.0).count();
        assert!((50..150).contains(&zeros), "{zeros}");
        assert!(a.iter().all(|&v| v == 0.0 || (v - 1.0 / 0.9).abs() < 1e-6));
    }

    #[test]
    fn target_matching_is_by_suffix() {
        let t = vec!["dense".to_string(), "q_proj".to_string()];
        assert!(is_target("transformer.h.0.self_attention.dense", &t));
        assert!(!is_target("transformer.h.0.mlp.dense_h_to_4h", &t));
        assert!(is_target("model.layers.1.self_attn.q_proj", &t));
    }
}

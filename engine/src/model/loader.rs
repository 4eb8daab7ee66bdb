//! Loading a Hugging Face model directory into a [`CausalLm`].

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::{DType, Device, Tensor};
use lorafleet_shared::spec::TargetModules;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

use super::config::{ArchConfig, ModelConfig};
use super::transformer::{Block, Norm, Transformer};
use super::weights::Weights;
use super::{CausalLm, LoraSettings, ModelInfo};
use crate::lora::{LoraBuilder, LoraLinear, LoraSource};
use crate::nf4::{DeviceNf4, Nf4Tensor};
use crate::ops::{FrozenLinear, FrozenWeight};
use crate::{peft, EngineError, Result};

/// Quantization of the frozen linear weights at load time.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Quant {
    /// Keep the checkpoint's precision (converted to the compute dtype).
    #[default]
    None,
    /// NF4 (bitsandbytes-exact), blocksize 64, optional double quantization.
    Nf4 { double_quant: bool },
}

/// Where the LoRA weights start from.
#[derive(Debug, Clone, PartialEq)]
pub enum LoraInit {
    /// PEFT's init (A uniform, B zero) from a ChaCha RNG with this seed.
    PeftDefault { seed: u64 },
    /// A PEFT adapter directory. Its `adapter_config.json` decides r, alpha, rslora and
    /// the targets (the request's values for those are ignored); the request's dropout
    /// is used.
    FromAdapter(PathBuf),
}

/// LoRA settings asked for by the caller.
#[derive(Debug, Clone, PartialEq)]
pub struct LoraSettingsRequest {
    pub r: usize,
    pub alpha: f64,
    pub dropout: f64,
    pub rslora: bool,
    /// `None`: the architecture's PEFT default (llama/mistral/qwen2 `q_proj, v_proj`;
    /// falcon `query_key_value`); `"all-linear"`: every linear except the output head.
    pub target_modules: Option<TargetModules>,
    pub init: LoraInit,
}

/// How to load a model.
#[derive(Debug, Clone)]
pub struct LoadOptions {
    pub quant: Quant,
    /// F32 or BF16.
    pub compute_dtype: DType,
    pub device: Device,
    pub lora: Option<LoraSettingsRequest>,
}

impl Default for LoadOptions {
    fn default() -> Self {
        Self { quant: Quant::None, compute_dtype: DType::F32, device: Device::Cpu, lora: None }
    }
}

/// Read `config.json` (+ `generation_config.json`).
pub fn read_model_config(dir: &Path) -> Result<ModelConfig> {
    ModelConfig::from_dir(dir)
}

/// Facts about a model directory without loading weights (`lora` is `None`).
pub fn read_model_info(dir: &Path) -> Result<ModelInfo> {
    let cfg = ModelConfig::from_dir(dir)?;
    Ok(model_info(&cfg, None))
}

fn model_info(cfg: &ModelConfig, lora: Option<LoraSettings>) -> ModelInfo {
    ModelInfo {
        model_type: cfg.model_type.clone(),
        vocab_size: cfg.vocab_size(),
        hidden_size: cfg.hidden_size(),
        num_layers: cfg.num_layers(),
        eos_token_ids: cfg.eos_token_ids.clone(),
        pad_token_id: cfg.pad_token_id,
        max_position_embeddings: cfg.max_position_embeddings(),
        lora,
    }
}

/// Resolve target module names: `None` = PEFT default, `"all-linear"` = every linear of
/// a decoder block.
pub fn resolve_targets(cfg: &ModelConfig, t: Option<&TargetModules>) -> Result<Vec<String>> {
    Ok(match t {
        None => cfg.default_lora_targets(),
        Some(TargetModules::Named(s)) if s == "all-linear" => cfg.linear_module_names().iter().map(|s| s.to_string()).collect(),
        Some(TargetModules::Named(s)) => {
            return Err(EngineError::Config(format!("lora target_modules {s:?}: give a list of module names or \"all-linear\"")))
        }
        Some(TargetModules::List(l)) => l.clone(),
    })
}

fn resolve_lora(cfg: &ModelConfig, req: &LoraSettingsRequest) -> Result<(LoraSettings, LoraSource)> {
    if !(0.0..1.0).contains(&req.dropout) {
        return Err(EngineError::Config(format!("lora dropout {} must be in [0, 1)", req.dropout)));
    }
    match &req.init {
        LoraInit::PeftDefault { seed } => {
            if req.r == 0 {
                return Err(EngineError::Config("lora r must be positive".into()));
            }
            let s = LoraSettings {
                r: req.r,
                alpha: req.alpha,
                dropout: req.dropout,
                rslora: req.rslora,
                target_modules: resolve_targets(cfg, req.target_modules.as_ref())?,
            };
            Ok((s, LoraSource::Init(ChaCha8Rng::seed_from_u64(*seed))))
        }
        LoraInit::FromAdapter(dir) => {
            let a = peft::read_adapter_config(dir)?;
            let targets = match a.target_list().as_slice() {
                [one] if one == "all-linear" => resolve_targets(cfg, Some(&TargetModules::Named(one.clone())))?,
                l => l.to_vec(),
            };
            if a.r != req.r || a.lora_alpha != req.alpha || a.use_rslora != req.rslora {
                tracing::info!(
                    adapter = %dir.display(),
                    r = a.r,
                    alpha = a.lora_alpha,
                    rslora = a.use_rslora,
                    "lora settings taken from the initial adapter"
                );
            }
            let s = LoraSettings { r: a.r, alpha: a.lora_alpha, dropout: req.dropout, rslora: a.use_rslora, target_modules: targets };
            let tensors = peft::read_adapter_tensors(dir)?;
            Ok((s, LoraSource::Adapter { path: dir.join(peft::ADAPTER_WEIGHTS), tensors }))
        }
    }
}

/// Builds modules from a checkpoint (used by the architecture files).
pub struct Builder {
    weights: Weights,
    cfg: ModelConfig,
    /// The activations' dtype ([`activation_dtype`]).
    dtype: DType,
    /// The compute dtype: of the products, and of the dense frozen weights and the
    /// embedding table.
    compute: DType,
    device: Device,
    quant: Quant,
    lora: LoraBuilder,
}

impl Builder {
    /// A small non-linear tensor (norm weight, bias) in the activations' dtype,
    /// shape-checked.
    pub fn dense(&mut self, name: &str, shape: &[usize]) -> Result<Tensor> {
        self.weights.tensor_shaped(name, shape, self.dtype, &self.device)
    }

    /// The embedding table `[vocab, hidden]` in the compute dtype (looked-up rows are
    /// converted to the activations' dtype), shape-checked.
    pub fn embedding(&mut self, name: &str, shape: &[usize]) -> Result<Tensor> {
        self.weights.tensor_shaped(name, shape, self.compute, &self.device)
    }

    /// A frozen linear `prefix.weight` `[out, in]` (+ `prefix.bias`), NF4 when asked or
    /// when stored in bitsandbytes' 4-bit layout, wrapped with LoRA when targeted.
    pub fn linear(&mut self, prefix: &str, out: usize, inp: usize, bias: bool) -> Result<LoraLinear> {
        let wname = format!("{prefix}.weight");
        let file = self.weights.file_of(&wname);
        let weight = if self.weights.is_bnb_4bit(prefix) {
            let q = self.weights.bnb_nf4(prefix)?;
            if q.shape != [out, inp] {
                return Err(EngineError::file(file, format!("tensor {wname} has shape {:?}, config implies [{out}, {inp}]", q.shape)));
            }
            FrozenWeight::Nf4(Arc::new(q))
        } else {
            match self.quant {
                Quant::None => FrozenWeight::Dense(self.weights.tensor_shaped(&wname, &[out, inp], self.compute, &self.device)?),
                Quant::Nf4 { double_quant } => {
                    let (shape, values) = self.weights.f32_values(&wname)?;
                    if shape != [out, inp] {
                        return Err(EngineError::file(file, format!("tensor {wname} has shape {shape:?}, config implies [{out}, {inp}]")));
                    }
                    FrozenWeight::Nf4(Arc::new(Nf4Tensor::quantize(&values, &shape, double_quant)?))
                }
            }
        };
        // The portable ops (CUDA) keep NF4 weights 4-bit on the device; the host copy goes.
        let weight = match weight {
            FrozenWeight::Nf4(q) if !crate::ops::cpu_ops(&self.device) => FrozenWeight::Nf4Device(Arc::new(DeviceNf4::upload(&q, &self.device)?)),
            w => w,
        };
        let b = if bias { Some(self.dense(&format!("{prefix}.bias"), &[out])?) } else { None };
        let base = FrozenLinear::mixed(weight, b, self.dtype, self.compute)?;
        self.lora.wrap(prefix, base)
    }

    /// The output head (full precision; the embedding when tied).
    pub fn head(&mut self, name: &str, embed: &Tensor, tied: bool, vocab: usize, hidden: usize) -> Result<FrozenLinear> {
        let w = if tied || !self.weights.has(name) {
            if !tied {
                return Err(EngineError::file(self.weights.file_of(name), format!("missing tensor {name} (tie_word_embeddings is false)")));
            }
            embed.clone()
        } else {
            self.embedding(name, &[vocab, hidden])?
        };
        Ok(FrozenLinear::mixed(FrozenWeight::Dense(w), None, self.dtype, self.compute)?)
    }

    pub fn finish(
        self,
        embed: Tensor,
        blocks: Vec<Arc<dyn Block>>,
        norm: Norm,
        lm_head: FrozenLinear,
        inv_freq: Vec<f32>,
        sliding_window: Option<usize>,
    ) -> Result<Transformer> {
        let settings = self.lora.settings().cloned();
        let params = self.lora.finish()?;
        let info = model_info(&self.cfg, settings);
        Transformer::new(info, embed, blocks, norm, lm_head, inv_freq, sliding_window, self.dtype, self.device, params)
    }
}

/// The environment variable that keeps bf16 compute's activations in bf16 on a CPU with
/// bf16 dot products (`bf16`; anything else: f32, see [`activation_dtype`]).
pub const CPU_ACTIVATIONS_ENV: &str = "LORAFLEET_CPU_ACTIVATIONS";

/// The dtype a model's activations (hidden states, their gradients, the KV cache) are
/// kept in for `compute` (the spec's `quantization.compute_dtype`, bitsandbytes'
/// `bnb_4bit_compute_dtype`: the dtype of the frozen products) on `device`.
///
/// The compute dtype itself, except for bf16 on a CPU running the engine's ops with bf16
/// dot products (AVX512-BF16): there the products take bf16 operands (rounded as they
/// are packed) and everything else runs in f32, i.e. `torch_dtype=float32` with
/// `bnb_4bit_compute_dtype=bfloat16` in Hugging Face terms. A CPU has no bf16
/// arithmetic besides those dot products: bf16 activations cost a conversion in and out
/// of every op, and candle's backward pass sums their gradients through a slow bf16 path
/// (together ~14% of a step at sequence 1024, `docs/benchmarks.md`). Activations take twice the
/// memory of bf16 ones; `LORAFLEET_CPU_ACTIVATIONS=bf16` keeps them in bf16.
pub fn activation_dtype(compute: DType, device: &Device) -> DType {
    static BF16: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    let keep_bf16 = *BF16.get_or_init(|| std::env::var(CPU_ACTIVATIONS_ENV).is_ok_and(|v| v == "bf16"));
    if compute == DType::BF16 && crate::ops::cpu_ops(device) && crate::ops::bf16_dot_products() && !keep_bf16 {
        DType::F32
    } else {
        compute
    }
}

/// Load a model directory (`config.json` + `model.safetensors` or a sharded index).
/// bitsandbytes 4-bit checkpoints (with `quantization_config`) load as NF4 without
/// re-quantization, whatever `opts.quant` says.
pub fn load_model(dir: &Path, opts: &LoadOptions) -> Result<Box<dyn CausalLm>> {
    if !matches!(opts.compute_dtype, DType::F32 | DType::BF16) {
        return Err(EngineError::Config(format!("compute dtype {:?} is not supported (f32 or bf16)", opts.compute_dtype)));
    }
    let cfg = ModelConfig::from_dir(dir)?;
    let weights = Weights::open(dir)?;
    let (settings, source) = match &opts.lora {
        Some(req) => {
            let (s, src) = resolve_lora(&cfg, req)?;
            (Some(s), src)
        }
        None => (None, LoraSource::Adapter { path: PathBuf::new(), tensors: HashMap::new() }),
    };
    if cfg.bnb_4bit.is_some() {
        tracing::info!(model = %dir.display(), "loading a bitsandbytes 4-bit checkpoint as nf4");
    }
    let b = Builder {
        weights,
        cfg: cfg.clone(),
        dtype: activation_dtype(opts.compute_dtype, &opts.device),
        compute: opts.compute_dtype,
        device: opts.device.clone(),
        quant: opts.quant,
        lora: LoraBuilder::new(settings, source, &opts.device),
    };
    let model = match &cfg.arch {
        ArchConfig::Llama(c) => super::llama::build(c, b)?,
        ArchConfig::Falcon(c) => super::falcon::build(c, b)?,
    };
    tracing::info!(
        model_type = %cfg.model_type,
        layers = cfg.num_layers(),
        lora_params = model.lora_params().len(),
        "model loaded"
    );
    Ok(Box::new(model))
}

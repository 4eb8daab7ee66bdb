//! Folding a PEFT LoRA adapter into its base model: `W + scaling * B A` for every
//! adapted linear. A pre-quantized (NF4) base is dequantized first; nothing is ever
//! merged into 4-bit weights.
//!
//! The merge itself (`for_each_merged`) hands every tensor of the merged model to a
//! sink, one at a time, so the two output formats share it: `merge_adapter` writes a
//! Hugging Face checkpoint (f32 or bf16 safetensors), `gguf::merge_to_gguf` a llama.cpp
//! GGUF file.

use std::path::Path;

use candle_core::{DType, Device, Tensor};
use safetensors::Dtype;

use crate::model::config::ModelConfig;
use crate::model::weights::Weights;
use crate::peft::{self, AdapterConfig};
use crate::quantize::{copy_side_files, read_config_json, write_config_json, write_raw_safetensors, RawEntry};
use crate::{EngineError, Result};

/// One tensor of the merged model as the merge hands it over.
pub enum MergedTensor {
    /// A float tensor (merged or not) as f32 on the CPU, in the checkpoint's shape.
    Float(Tensor),
    /// A non-float tensor copied as stored (dtype, shape, little-endian bytes).
    Raw(Dtype, Vec<usize>, Vec<u8>),
}

/// What a merge did, for the caller's log line.
#[derive(Debug, Clone)]
pub struct MergeSummary {
    pub config: ModelConfig,
    pub adapter: AdapterConfig,
    /// Number of linear weights that received `scaling * B A`.
    pub merged: usize,
}

/// PEFT's scaling of the LoRA product: `alpha / r`, or `alpha / sqrt(r)` with rsLoRA.
pub fn lora_scaling(acfg: &AdapterConfig) -> f64 {
    if acfg.use_rslora {
        acfg.lora_alpha / (acfg.r as f64).sqrt()
    } else {
        acfg.lora_alpha / acfg.r as f64
    }
}

/// A base weight as f32: NF4 weights dequantized, other floats widened.
fn base_weight(weights: &Weights, name: &str, prefix: Option<&str>, is_4bit: bool) -> Result<Tensor> {
    if is_4bit {
        let q = weights.bnb_nf4(prefix.unwrap_or_default())?;
        Ok(Tensor::from_vec(q.dequantize(), q.shape.clone(), &Device::Cpu)?)
    } else {
        weights.tensor(name, DType::F32, &Device::Cpu)
    }
}

/// `w + scaling * B A` when the adapter has both halves for `prefix`, checking their
/// shapes against `w` (`Ok(None)` when the adapter does not touch this weight).
fn apply_lora(
    w: &Tensor,
    prefix: &str,
    lora: &mut peft::AdapterTensors,
    acfg: &AdapterConfig,
    afile: &Path,
) -> Result<Option<Tensor>> {
    let ka = crate::lora::peft_key(prefix, "A");
    let kb = crate::lora::peft_key(prefix, "B");
    if !(lora.contains_key(&ka) && lora.contains_key(&kb)) {
        return Ok(None);
    }
    let (o, i) = w.dims2().map_err(|_| {
        EngineError::AdapterMismatch(format!("{}: tensor {ka} adapts {prefix}.weight, which is not 2-d ({:?})", afile.display(), w.dims()))
    })?;
    let r = acfg.r;
    let (sa, a) = lora.remove(&ka).unwrap_or_default();
    let (sb, b) = lora.remove(&kb).unwrap_or_default();
    if sa != [r, i] {
        return Err(EngineError::AdapterMismatch(format!("{}: tensor {ka} has shape {sa:?}, the base model needs {:?}", afile.display(), [r, i])));
    }
    if sb != [o, r] {
        return Err(EngineError::AdapterMismatch(format!("{}: tensor {kb} has shape {sb:?}, the base model needs {:?}", afile.display(), [o, r])));
    }
    let a = Tensor::from_vec(a, (r, i), &Device::Cpu)?;
    let b = Tensor::from_vec(b, (o, r), &Device::Cpu)?;
    Ok(Some((w + (b.matmul(&a)? * lora_scaling(acfg))?)?))
}

/// Merge the adapter in `adapter` into the model in `model` and hand each tensor of the
/// result to `sink` (name in the checkpoint's spelling, tensor), in name order, one at
/// a time. bitsandbytes companion tensors (absmax, quant_map, ...) are consumed with
/// their weight and never handed over. Fails, naming the file and tensor, when an
/// adapter tensor has the wrong shape or matches no linear weight.
pub fn for_each_merged(model: &Path, adapter: &Path, mut sink: impl FnMut(&str, MergedTensor) -> Result<()>) -> Result<MergeSummary> {
    let config = ModelConfig::from_dir(model)?;
    let weights = Weights::open(model)?;
    let acfg = peft::read_adapter_config(adapter)?;
    let mut lora: peft::AdapterTensors = peft::read_adapter_tensors(adapter)?;
    let afile = adapter.join(peft::ADAPTER_WEIGHTS);
    let companions = Weights::companion_suffixes();
    let mut merged = 0usize;
    for name in weights.names() {
        if companions.iter().any(|s| name.ends_with(s)) {
            continue;
        }
        let prefix = name.strip_suffix(".weight");
        let is_4bit = prefix.is_some_and(|p| weights.is_bnb_4bit(p));
        let raw = weights.raw(&name)?;
        let is_float = matches!(raw.dtype, Dtype::F32 | Dtype::F16 | Dtype::BF16 | Dtype::F64);
        if !is_4bit && !is_float {
            sink(&name, MergedTensor::Raw(raw.dtype, raw.shape.clone(), raw.data.to_vec()))?;
            continue;
        }
        let mut w = base_weight(&weights, &name, prefix, is_4bit)?;
        if let Some(p) = prefix {
            if let Some(m) = apply_lora(&w, p, &mut lora, &acfg, &afile)? {
                w = m;
                merged += 1;
            }
        }
        sink(&name, MergedTensor::Float(w))?;
    }
    if let Some(key) = lora.keys().min() {
        return Err(EngineError::AdapterMismatch(format!(
            "{}: tensor {key} (shape {:?}) matches no linear weight of the base model (or lacks its lora_A/lora_B partner)",
            afile.display(),
            lora[key].0
        )));
    }
    Ok(MergeSummary { config, adapter: acfg, merged })
}

fn tensor_bytes(t: &Tensor, dtype: DType) -> Result<(Dtype, Vec<u8>)> {
    Ok(match dtype {
        DType::BF16 => {
            let v = t.to_dtype(DType::BF16)?.flatten_all()?.to_vec1::<half::bf16>()?;
            (Dtype::BF16, v.iter().flat_map(|x| x.to_le_bytes()).collect())
        }
        _ => {
            let v = t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
            (Dtype::F32, v.iter().flat_map(|x| x.to_le_bytes()).collect())
        }
    })
}

/// Merge the adapter in `adapter` into the model in `model`, writing a full Hugging Face
/// checkpoint to `out` in `dtype` (F32 or BF16).
pub fn merge_adapter(model: &Path, adapter: &Path, out: &Path, dtype: DType) -> Result<()> {
    if !matches!(dtype, DType::F32 | DType::BF16) {
        return Err(EngineError::Config(format!("merge dtype {dtype:?} is not supported (f32 or bf16)")));
    }
    let mut entries: Vec<RawEntry> = Vec::new();
    let summary = for_each_merged(model, adapter, |name, t| {
        match t {
            MergedTensor::Raw(dt, shape, bytes) => entries.push((name.to_string(), dt, shape, bytes)),
            MergedTensor::Float(w) => {
                let (dt, bytes) = tensor_bytes(&w, dtype)?;
                entries.push((name.to_string(), dt, w.dims().to_vec(), bytes));
            }
        }
        Ok(())
    })?;
    std::fs::create_dir_all(out).map_err(|e| EngineError::file(out, format!("cannot create directory: {e}")))?;
    write_raw_safetensors(&out.join("model.safetensors"), &entries)?;
    write_merged_config(model, out, dtype)?;
    copy_side_files(model, out)?;
    tracing::info!(model = %model.display(), adapter = %adapter.display(), out = %out.display(), merged = summary.merged, model_type = %summary.config.model_type, "merged adapter");
    Ok(())
}

/// config.json of the merged checkpoint: no quantization_config, the new dtype.
fn write_merged_config(model: &Path, out: &Path, dtype: DType) -> Result<()> {
    let mut config = read_config_json(model)?;
    config.remove("quantization_config");
    let name = if dtype == DType::BF16 { "bfloat16" } else { "float32" };
    config.insert("dtype".into(), serde_json::Value::String(name.into()));
    if config.contains_key("torch_dtype") {
        config.insert("torch_dtype".into(), serde_json::Value::String(name.into()));
    }
    write_config_json(out, &config)
}

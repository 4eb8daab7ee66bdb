//! Folding a PEFT LoRA adapter into its base model: a full Hugging Face checkpoint (f32
//! or bf16) with `W + scaling * B A` for every adapted linear. A pre-quantized (NF4)
//! base is dequantized first; nothing is ever merged into 4-bit weights.

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor};
use safetensors::Dtype;

use crate::model::config::ModelConfig;
use crate::model::weights::Weights;
use crate::peft;
use crate::quantize::{copy_side_files, read_config_json, write_config_json, write_raw_safetensors, RawEntry};
use crate::{EngineError, Result};

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

/// Merge the adapter in `adapter` into the model in `model`, writing a full checkpoint
/// to `out` in `dtype` (F32 or BF16).
pub fn merge_adapter(model: &Path, adapter: &Path, out: &Path, dtype: DType) -> Result<()> {
    if !matches!(dtype, DType::F32 | DType::BF16) {
        return Err(EngineError::Config(format!("merge dtype {dtype:?} is not supported (f32 or bf16)")));
    }
    let cfg = ModelConfig::from_dir(model)?;
    let weights = Weights::open(model)?;
    let acfg = peft::read_adapter_config(adapter)?;
    let scaling = if acfg.use_rslora { acfg.lora_alpha / (acfg.r as f64).sqrt() } else { acfg.lora_alpha / acfg.r as f64 };
    let mut lora: HashMap<String, (Vec<usize>, Vec<f32>)> = peft::read_adapter_tensors(adapter)?;
    let afile = adapter.join(peft::ADAPTER_WEIGHTS);
    let companions = Weights::companion_suffixes();
    let mut entries: Vec<RawEntry> = Vec::new();
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
            entries.push((name.clone(), raw.dtype, raw.shape.clone(), raw.data.to_vec()));
            continue;
        }
        let mut w = if is_4bit {
            let q = weights.bnb_nf4(prefix.unwrap_or_default())?;
            Tensor::from_vec(q.dequantize(), q.shape.clone(), &Device::Cpu)?
        } else {
            weights.tensor(&name, DType::F32, &Device::Cpu)?
        };
        if let Some(p) = prefix {
            let ka = crate::lora::peft_key(p, "A");
            let kb = crate::lora::peft_key(p, "B");
            if let (Some((sa, a)), Some((sb, b))) = (lora.remove(&ka), lora.remove(&kb)) {
                let (o, i) = w.dims2()?;
                let r = acfg.r;
                if sa != [r, i] {
                    return Err(EngineError::AdapterMismatch(format!("{}: tensor {ka} has shape {sa:?}, the base model needs {:?}", afile.display(), [r, i])));
                }
                if sb != [o, r] {
                    return Err(EngineError::AdapterMismatch(format!("{}: tensor {kb} has shape {sb:?}, the base model needs {:?}", afile.display(), [o, r])));
                }
                let a = Tensor::from_vec(a, (r, i), &Device::Cpu)?;
                let b = Tensor::from_vec(b, (o, r), &Device::Cpu)?;
                w = (w + (b.matmul(&a)? * scaling)?)?;
                merged += 1;
            }
        }
        let (dt, bytes) = tensor_bytes(&w, dtype)?;
        entries.push((name.clone(), dt, w.dims().to_vec(), bytes));
    }
    if let Some(key) = lora.keys().min() {
        return Err(EngineError::AdapterMismatch(format!(
            "{}: tensor {key} (shape {:?}) matches no linear weight of the base model (or lacks its lora_A/lora_B partner)",
            afile.display(),
            lora[key].0
        )));
    }
    std::fs::create_dir_all(out).map_err(|e| EngineError::file(out, format!("cannot create directory: {e}")))?;
    write_raw_safetensors(&out.join("model.safetensors"), &entries)?;
    let mut config = read_config_json(model)?;
    config.remove("quantization_config");
    let name = if dtype == DType::BF16 { "bfloat16" } else { "float32" };
    config.insert("dtype".into(), serde_json::Value::String(name.into()));
    if config.contains_key("torch_dtype") {
        config.insert("torch_dtype".into(), serde_json::Value::String(name.into()));
    }
    write_config_json(out, &config)?;
    copy_side_files(model, out)?;
    tracing::info!(model = %model.display(), adapter = %adapter.display(), out = %out.display(), merged, model_type = %cfg.model_type, "merged adapter");
    Ok(())
}

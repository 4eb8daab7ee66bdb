//! Writing a pre-quantized checkpoint in bitsandbytes' own 4-bit safetensors layout, so
//! that the loader (and transformers + bitsandbytes) load it without re-quantizing.
//!
//! For every linear weight `P.weight` of the decoder blocks: `P.weight` (u8
//! `[(n+1)/2, 1]`, packed NF4), `P.weight.absmax` (u8 codes when double quantized, else
//! f32), `P.weight.quant_map` (f32[16]), `P.weight.nested_absmax` and
//! `P.weight.nested_quant_map` (f32[256]) when double quantized, and
//! `P.weight.quant_state.bitsandbytes__nf4` (u8 bytes of a JSON object). Embeddings,
//! norms and the output head stay as they are (as bitsandbytes does). config.json gains
//! `quantization_config`; the other files are copied.

use std::collections::HashMap;
use std::path::Path;

use safetensors::Dtype;

use crate::model::config::ModelConfig;
use crate::model::weights::Weights;
use crate::nf4::{Nf4Tensor, NF4_BLOCKSIZE, NF4_CODE, NESTED_BLOCKSIZE};
use crate::{EngineError, Result};

/// One tensor to write: name, dtype, shape, little-endian bytes.
pub type RawEntry = (String, Dtype, Vec<usize>, Vec<u8>);

/// Write safetensors from raw entries with `{"format": "pt"}` metadata (temp file, then
/// rename).
pub fn write_raw_safetensors(path: &Path, entries: &[RawEntry]) -> Result<()> {
    let views = entries
        .iter()
        .map(|(k, dt, shape, bytes)| {
            safetensors::tensor::TensorView::new(*dt, shape.clone(), bytes)
                .map(|v| (k.clone(), v))
                .map_err(|e| EngineError::file(path, format!("tensor {k}: {e}")))
        })
        .collect::<Result<Vec<_>>>()?;
    let meta = HashMap::from([("format".to_string(), "pt".to_string())]);
    let tmp = path.with_extension("safetensors.tmp");
    safetensors::serialize_to_file(views, Some(meta), &tmp).map_err(|e| EngineError::file(&tmp, format!("cannot write: {e}")))?;
    std::fs::rename(&tmp, path).map_err(|e| EngineError::file(path, format!("cannot write: {e}")))?;
    Ok(())
}

/// Copy the files of `src` that are not weights or config.json into `out`.
pub fn copy_side_files(src: &Path, out: &Path) -> Result<()> {
    let entries = std::fs::read_dir(src).map_err(|e| EngineError::file(src, format!("cannot list: {e}")))?;
    for e in entries {
        let e = e.map_err(|e| EngineError::file(src, format!("cannot list: {e}")))?;
        let name = e.file_name().to_string_lossy().to_string();
        let is_file = e.file_type().map(|t| t.is_file()).unwrap_or(false);
        if !is_file || name == "config.json" || name.ends_with(".safetensors") || name == "model.safetensors.index.json" {
            continue;
        }
        std::fs::copy(e.path(), out.join(&name)).map_err(|err| EngineError::file(e.path(), format!("cannot copy: {err}")))?;
    }
    Ok(())
}

pub(crate) fn read_config_json(dir: &Path) -> Result<serde_json::Map<String, serde_json::Value>> {
    let path = dir.join("config.json");
    let text = std::fs::read_to_string(&path).map_err(|e| EngineError::file(&path, format!("cannot read: {e}")))?;
    match serde_json::from_str(&text) {
        Ok(serde_json::Value::Object(m)) => Ok(m),
        Ok(_) => Err(EngineError::file(&path, "not a json object")),
        Err(e) => Err(EngineError::file(&path, format!("invalid json: {e}"))),
    }
}

pub(crate) fn write_config_json(dir: &Path, cfg: &serde_json::Map<String, serde_json::Value>) -> Result<()> {
    let path = dir.join("config.json");
    let text = serde_json::to_string_pretty(cfg).map_err(|e| EngineError::file(&path, e.to_string()))?;
    std::fs::write(&path, text + "\n").map_err(|e| EngineError::file(&path, format!("cannot write: {e}")))
}

pub(crate) fn dtype_name(d: Dtype) -> &'static str {
    match d {
        Dtype::BF16 => "bfloat16",
        Dtype::F16 => "float16",
        Dtype::F64 => "float64",
        _ => "float32",
    }
}

/// Is `name` (a `.weight` tensor) a linear layer of a decoder block?
pub fn is_block_linear(cfg: &ModelConfig, name: &str) -> bool {
    let Some(prefix) = name.strip_suffix(".weight") else { return false };
    let in_block = prefix.starts_with("model.layers.") || prefix.starts_with("transformer.h.");
    let last = prefix.rsplit('.').next().unwrap_or("");
    in_block && cfg.linear_module_names().contains(&last)
}

fn f32_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

/// The JSON bitsandbytes packs into `quant_state.bitsandbytes__nf4`.
fn quant_state_json(q: &Nf4Tensor, dtype: &str) -> String {
    let shape = q.shape.iter().map(|d| d.to_string()).collect::<Vec<_>>().join(", ");
    let mut s = format!("{{\"quant_type\": \"nf4\", \"blocksize\": {NF4_BLOCKSIZE}, \"dtype\": \"{dtype}\", \"shape\": [{shape}]");
    if let Some(n) = &q.nested {
        s.push_str(&format!(
            ", \"nested_blocksize\": {NESTED_BLOCKSIZE}, \"nested_dtype\": \"float32\", \"nested_offset\": {:?}",
            n.offset as f64
        ));
    }
    s.push('}');
    s
}

/// The bitsandbytes tensors of one quantized weight `<prefix>.weight`.
pub fn bnb_entries(wname: &str, q: &Nf4Tensor, src_dtype: &str) -> Vec<RawEntry> {
    let n = q.numel();
    let mut out = vec![(wname.to_string(), Dtype::U8, vec![n.div_ceil(2), 1], q.packed.clone())];
    match &q.nested {
        Some(nested) => {
            out.push((format!("{wname}.absmax"), Dtype::U8, vec![nested.absmax_q.len()], nested.absmax_q.clone()));
            out.push((format!("{wname}.nested_absmax"), Dtype::F32, vec![nested.nested_absmax.len()], f32_bytes(&nested.nested_absmax)));
            out.push((format!("{wname}.nested_quant_map"), Dtype::F32, vec![256], f32_bytes(&nested.nested_code)));
        }
        None => out.push((format!("{wname}.absmax"), Dtype::F32, vec![q.absmax.len()], f32_bytes(&q.absmax))),
    }
    out.push((format!("{wname}.quant_map"), Dtype::F32, vec![16], f32_bytes(&NF4_CODE)));
    let qs = quant_state_json(q, src_dtype).into_bytes();
    out.push((format!("{wname}.quant_state.bitsandbytes__nf4"), Dtype::U8, vec![qs.len()], qs));
    out
}

/// Quantize the model in `src` to NF4 (bitsandbytes layout) into `out`.
pub fn quantize_model(src: &Path, out: &Path, double_quant: bool) -> Result<()> {
    let cfg = ModelConfig::from_dir(src)?;
    if cfg.bnb_4bit.is_some() {
        return Err(EngineError::file(src.join("config.json"), "the model is already quantized (quantization_config is set)"));
    }
    let weights = Weights::open(src)?;
    std::fs::create_dir_all(out).map_err(|e| EngineError::file(out, format!("cannot create directory: {e}")))?;
    let mut entries: Vec<RawEntry> = Vec::new();
    let mut src_dtype = "float32";
    let mut quantized = 0usize;
    for name in weights.names() {
        let raw = weights.raw(&name)?;
        if is_block_linear(&cfg, &name) && raw.shape.len() == 2 {
            src_dtype = dtype_name(raw.dtype);
            let (shape, values) = weights.f32_values(&name)?;
            let q = Nf4Tensor::quantize(&values, &shape, double_quant)?;
            entries.extend(bnb_entries(&name, &q, src_dtype));
            quantized += 1;
        } else {
            entries.push((name.clone(), raw.dtype, raw.shape.clone(), raw.data.to_vec()));
        }
        // One tensor at a time: its mapped pages leave the resident set once read.
        weights.release(&name);
    }
    if quantized == 0 {
        return Err(EngineError::file(weights.file_of(""), "no linear layer weights found to quantize"));
    }
    write_raw_safetensors(&out.join("model.safetensors"), &entries)?;
    let mut config = read_config_json(src)?;
    config.insert(
        "quantization_config".into(),
        serde_json::json!({
            "quant_method": "bitsandbytes",
            "load_in_4bit": true,
            "load_in_8bit": false,
            "bnb_4bit_quant_type": "nf4",
            "bnb_4bit_use_double_quant": double_quant,
            "bnb_4bit_compute_dtype": src_dtype,
            "bnb_4bit_quant_storage": "uint8",
        }),
    );
    write_config_json(out, &config)?;
    copy_side_files(src, out)?;
    tracing::info!(src = %src.display(), out = %out.display(), quantized, double_quant, "wrote nf4 checkpoint");
    Ok(())
}

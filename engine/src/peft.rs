//! PEFT LoRA adapter files: `adapter_config.json` + `adapter_model.safetensors`
//! (metadata `{"format": "pt"}`, keys `base_model.model.<module>.lora_{A,B}.weight`).

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use candle_core::{DType, Tensor};
use safetensors::Dtype;
use serde::Deserialize;

use crate::model::{CausalLm, LoraSettings};
use crate::data::PromptFormat;
use crate::{EngineError, Result};

/// Adapter tensors as f32 values: `key -> (shape, values)`.
pub type AdapterTensors = HashMap<String, (Vec<usize>, Vec<f32>)>;

pub const ADAPTER_CONFIG: &str = "adapter_config.json";
pub const ADAPTER_WEIGHTS: &str = "adapter_model.safetensors";

/// The fields of `adapter_config.json` we read (unknown fields are ignored).
#[derive(Debug, Clone, Deserialize)]
pub struct AdapterConfig {
    #[serde(default)]
    pub peft_type: Option<String>,
    pub r: usize,
    pub lora_alpha: f64,
    #[serde(default)]
    pub lora_dropout: f64,
    #[serde(default)]
    pub target_modules: Option<serde_json::Value>,
    #[serde(default)]
    pub use_rslora: bool,
    #[serde(default)]
    pub use_dora: bool,
    #[serde(default)]
    pub fan_in_fan_out: bool,
    #[serde(default)]
    pub bias: Option<String>,
    #[serde(default)]
    pub rank_pattern: Option<serde_json::Map<String, serde_json::Value>>,
    #[serde(default)]
    pub alpha_pattern: Option<serde_json::Map<String, serde_json::Value>>,
    #[serde(default)]
    pub modules_to_save: Option<serde_json::Value>,
    #[serde(default)]
    pub base_model_name_or_path: Option<String>,
}

impl AdapterConfig {
    /// Target module names as written (a list, or a single name/regex string).
    pub fn target_list(&self) -> Vec<String> {
        match &self.target_modules {
            Some(serde_json::Value::Array(a)) => a.iter().filter_map(|v| v.as_str().map(str::to_string)).collect(),
            Some(serde_json::Value::String(s)) => vec![s.clone()],
            _ => vec![],
        }
    }
}

/// Read and validate `dir/adapter_config.json`.
pub fn read_adapter_config(dir: &Path) -> Result<AdapterConfig> {
    let path = dir.join(ADAPTER_CONFIG);
    let text = std::fs::read_to_string(&path).map_err(|e| EngineError::file(&path, format!("cannot read: {e}")))?;
    let c: AdapterConfig =
        serde_json::from_str(&text).map_err(|e| EngineError::file(&path, format!("invalid adapter config: {e}")))?;
    let bad = |m: &str| Err(EngineError::file(&path, m.to_string()));
    if let Some(t) = &c.peft_type {
        if t != "LORA" {
            return bad(&format!("peft_type {t:?} is not supported (LORA only)"));
        }
    }
    if c.r == 0 {
        return bad("r must be positive");
    }
    if c.use_dora {
        return bad("use_dora adapters are not supported");
    }
    if c.fan_in_fan_out {
        return bad("fan_in_fan_out adapters are not supported");
    }
    if c.bias.as_deref().is_some_and(|b| b != "none") {
        return bad("only bias \"none\" adapters are supported");
    }
    if c.rank_pattern.as_ref().is_some_and(|m| !m.is_empty()) || c.alpha_pattern.as_ref().is_some_and(|m| !m.is_empty()) {
        return bad("rank_pattern/alpha_pattern are not supported");
    }
    if c.modules_to_save.as_ref().is_some_and(|m| !m.is_null() && m.as_array().is_none_or(|a| !a.is_empty())) {
        return bad("modules_to_save is not supported");
    }
    if let Some(serde_json::Value::String(s)) = &c.target_modules {
        if s != "all-linear" {
            return bad(&format!("target_modules regex {s:?} is not supported (give a list or \"all-linear\")"));
        }
    }
    if c.target_list().is_empty() {
        return bad("target_modules is empty");
    }
    Ok(c)
}

/// Read `dir/adapter_model.safetensors` as f32 values.
pub fn read_adapter_tensors(dir: &Path) -> Result<AdapterTensors> {
    let path = dir.join(ADAPTER_WEIGHTS);
    let bytes = std::fs::read(&path).map_err(|e| EngineError::file(&path, format!("cannot read: {e}")))?;
    let st = safetensors::SafeTensors::deserialize(&bytes)
        .map_err(|e| EngineError::file(&path, format!("not a valid safetensors file: {e}")))?;
    let mut out = HashMap::new();
    for (name, view) in st.tensors() {
        let src = match view.dtype() {
            Dtype::F32 => DType::F32,
            Dtype::BF16 => DType::BF16,
            Dtype::F16 => DType::F16,
            Dtype::F64 => DType::F64,
            d => return Err(EngineError::file(&path, format!("tensor {name}: unsupported dtype {d:?}"))),
        };
        let t = Tensor::from_raw_buffer(view.data(), src, view.shape(), &candle_core::Device::Cpu)
            .map_err(|e| EngineError::file(&path, format!("tensor {name}: {e}")))?;
        let v = t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
        out.insert(name, (view.shape().to_vec(), v));
    }
    Ok(out)
}

/// Module path of a PEFT key (`base_model.model.X.lora_A.weight` -> `X`).
pub fn module_of_key(key: &str) -> Option<&str> {
    key.strip_prefix("base_model.model.")?
        .strip_suffix(".lora_A.weight")
        .or_else(|| key.strip_prefix("base_model.model.")?.strip_suffix(".lora_B.weight"))
}

/// The `adapter_config.json` text PEFT writes.
pub fn adapter_config_json(settings: &LoraSettings, base_model_name_or_path: &str) -> serde_json::Value {
    let mut targets = settings.target_modules.clone();
    targets.sort();
    targets.dedup();
    serde_json::json!({
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "r": settings.r,
        "lora_alpha": settings.alpha,
        "lora_dropout": settings.dropout,
        "target_modules": targets,
        "bias": "none",
        "fan_in_fan_out": false,
        "use_rslora": settings.rslora,
        "use_dora": false,
        "modules_to_save": null,
        "base_model_name_or_path": base_model_name_or_path,
        "inference_mode": true,
        "init_lora_weights": true,
        "rank_pattern": {},
        "alpha_pattern": {},
    })
}

/// Write safetensors with `metadata` (f32 tensors), atomically (temp file + rename).
pub fn write_safetensors_f32(path: &Path, tensors: &BTreeMap<String, Tensor>, metadata: HashMap<String, String>) -> Result<()> {
    let mut data: Vec<(String, Vec<usize>, Vec<u8>)> = Vec::with_capacity(tensors.len());
    for (k, t) in tensors {
        let v = t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
        let bytes: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
        data.push((k.clone(), t.dims().to_vec(), bytes));
    }
    let views = data
        .iter()
        .map(|(k, shape, bytes)| {
            safetensors::tensor::TensorView::new(Dtype::F32, shape.clone(), bytes)
                .map(|v| (k.clone(), v))
                .map_err(|e| EngineError::file(path, format!("tensor {k}: {e}")))
        })
        .collect::<Result<Vec<_>>>()?;
    let tmp = path.with_extension("safetensors.tmp");
    safetensors::serialize_to_file(views, Some(metadata), &tmp)
        .map_err(|e| EngineError::file(&tmp, format!("cannot write: {e}")))?;
    std::fs::rename(&tmp, path).map_err(|e| EngineError::file(path, format!("cannot write: {e}")))?;
    Ok(())
}

/// Write a PEFT adapter directory from LoRA tensors keyed by PEFT key.
pub fn write_adapter(dir: &Path, settings: &LoraSettings, tensors: &BTreeMap<String, Tensor>, base_model_name_or_path: &str) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|e| EngineError::file(dir, format!("cannot create directory: {e}")))?;
    let cfg = adapter_config_json(settings, base_model_name_or_path);
    let cfg_path = dir.join(ADAPTER_CONFIG);
    let text = serde_json::to_string_pretty(&cfg).map_err(|e| EngineError::file(&cfg_path, e.to_string()))?;
    std::fs::write(&cfg_path, text + "\n").map_err(|e| EngineError::file(&cfg_path, format!("cannot write: {e}")))?;
    let meta = HashMap::from([("format".to_string(), "pt".to_string())]);
    write_safetensors_f32(&dir.join(ADAPTER_WEIGHTS), tensors, meta)
}

/// lorafleet's note next to the PEFT files: how the adapter's prompts were formatted
/// (`{"template": "..."}` or `{"chat_template": "model"}`), so that generation and
/// serving format them the same way. PEFT ignores it.
pub const PROMPT_FILE: &str = "lorafleet_prompt.json";

/// Write [`PROMPT_FILE`] into an adapter directory.
pub fn write_prompt_file(dir: &Path, format: &PromptFormat) -> Result<()> {
    let path = dir.join(PROMPT_FILE);
    let v = match format {
        PromptFormat::Template(t) => serde_json::json!({ "template": t }),
        PromptFormat::ModelChat => serde_json::json!({ "chat_template": "model" }),
    };
    let text = serde_json::to_string_pretty(&v).map_err(|e| EngineError::file(&path, e.to_string()))?;
    std::fs::write(&path, text + "\n").map_err(|e| EngineError::file(&path, format!("cannot write: {e}")))
}

/// The prompt format recorded in an adapter directory's [`PROMPT_FILE`]: `None` when
/// the file is absent (an adapter from elsewhere), an error when it is unreadable, or
/// has neither `chat_template: "model"` nor a `template` with `{question}`.
pub fn read_prompt_format(dir: &Path) -> Result<Option<PromptFormat>> {
    let path = dir.join(PROMPT_FILE);
    let text = match std::fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(EngineError::file(&path, format!("cannot read: {e}"))),
    };
    let v: serde_json::Value = serde_json::from_str(&text).map_err(|e| EngineError::file(&path, format!("not valid JSON: {e}")))?;
    if v.get("chat_template").and_then(|t| t.as_str()) == Some("model") {
        return Ok(Some(PromptFormat::ModelChat));
    }
    match v.get("template").and_then(|t| t.as_str()) {
        Some(t) if t.contains("{question}") => Ok(Some(PromptFormat::Template(t.to_string()))),
        _ => Err(EngineError::file(&path, "expected {\"chat_template\": \"model\"} or a \"template\" containing {question}")),
    }
}

/// Save the model's current LoRA weights as a PEFT adapter.
pub fn save_adapter(model: &dyn CausalLm, dir: &Path, base_model_name_or_path: &str) -> Result<()> {
    let settings = model
        .info()
        .lora
        .clone()
        .ok_or_else(|| EngineError::Config("the model has no lora adapter to save".into()))?;
    let tensors: BTreeMap<String, Tensor> = model.lora_params().iter().map(|(k, v)| (k.clone(), v.as_tensor().clone())).collect();
    write_adapter(dir, &settings, &tensors, base_model_name_or_path)
}

/// Overwrite the model's LoRA weights with those of a PEFT adapter directory. Keys and
/// shapes must match exactly; the adapter's r/alpha must equal the model's.
pub fn load_adapter_weights(model: &dyn CausalLm, dir: &Path) -> Result<()> {
    let cfg = read_adapter_config(dir)?;
    let settings = model
        .info()
        .lora
        .clone()
        .ok_or_else(|| EngineError::AdapterMismatch("the model was loaded without lora".into()))?;
    if cfg.r != settings.r || cfg.lora_alpha != settings.alpha || cfg.use_rslora != settings.rslora {
        return Err(EngineError::AdapterMismatch(format!(
            "{}: r {} alpha {} rslora {} differ from the model's r {} alpha {} rslora {}",
            dir.join(ADAPTER_CONFIG).display(),
            cfg.r,
            cfg.lora_alpha,
            cfg.use_rslora,
            settings.r,
            settings.alpha,
            settings.rslora
        )));
    }
    let file = dir.join(ADAPTER_WEIGHTS);
    let mut tensors = read_adapter_tensors(dir)?;
    let params = model.lora_params();
    let mut updates = Vec::with_capacity(params.len());
    for (key, var) in params {
        let want = var.as_tensor().dims().to_vec();
        let (shape, values) = tensors.remove(key).ok_or_else(|| {
            EngineError::AdapterMismatch(format!("{}: missing tensor {key} (expected shape {want:?})", file.display()))
        })?;
        if shape != want {
            return Err(EngineError::AdapterMismatch(format!(
                "{}: tensor {key} has shape {shape:?}, the base model needs {want:?}",
                file.display()
            )));
        }
        updates.push((var, Tensor::from_vec(values, shape, var.as_tensor().device())?));
    }
    if let Some(key) = tensors.keys().min() {
        return Err(EngineError::AdapterMismatch(format!(
            "{}: tensor {key} (shape {:?}) matches no lora module of the model",
            file.display(),
            tensors[key].0
        )));
    }
    for (var, t) in updates {
        var.set(&t)?;
    }
    Ok(())
}

//! Hugging Face `config.json` parsing for the Llama family (llama, mistral, qwen2) and
//! Falcon (falcon, RefinedWeb, RefinedWebModel).

use std::path::Path;

use serde_json::Value;

use crate::{EngineError, Result};

/// Rotary embedding settings.
#[derive(Debug, Clone, PartialEq)]
pub struct RopeConfig {
    pub theta: f64,
    pub scaling: RopeScaling,
}

#[derive(Debug, Clone, PartialEq)]
pub enum RopeScaling {
    None,
    /// `rope_type: "linear"`: frequencies divided by `factor`.
    Linear { factor: f64 },
    /// `rope_type: "llama3"`.
    Llama3 { factor: f64, low_freq_factor: f64, high_freq_factor: f64, original_max_position_embeddings: f64 },
}

impl RopeConfig {
    /// Inverse frequencies for `head_dim` (length `head_dim / 2`), computed like
    /// transformers does (f32 powers, then the scaling rule).
    pub fn inv_freq(&self, head_dim: usize) -> Vec<f32> {
        let base = self.theta as f32;
        let inv: Vec<f32> =
            (0..head_dim / 2).map(|i| 1.0 / base.powf((2 * i) as f32 / head_dim as f32)).collect();
        match &self.scaling {
            RopeScaling::None => inv,
            RopeScaling::Linear { factor } => inv.iter().map(|f| f / *factor as f32).collect(),
            RopeScaling::Llama3 { factor, low_freq_factor, high_freq_factor, original_max_position_embeddings } => {
                let old = *original_max_position_embeddings;
                let low_wavelen = old / low_freq_factor;
                let high_wavelen = old / high_freq_factor;
                inv.iter()
                    .map(|&f| {
                        let f = f as f64;
                        let wavelen = 2.0 * std::f64::consts::PI / f;
                        let scaled = if wavelen > low_wavelen { f / factor } else { f };
                        let out = if wavelen < high_wavelen || wavelen > low_wavelen {
                            scaled
                        } else {
                            let smooth = (old / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor);
                            (1.0 - smooth) * scaled / factor + smooth * scaled
                        };
                        out as f32
                    })
                    .collect()
            }
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct LlamaConfig {
    pub model_type: String,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_layers: usize,
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    pub rms_norm_eps: f64,
    pub rope: RopeConfig,
    pub max_position_embeddings: usize,
    pub tie_word_embeddings: bool,
    /// Bias on q/k/v (qwen2, or `attention_bias`).
    pub qkv_bias: bool,
    /// Bias on o_proj (`attention_bias`).
    pub o_bias: bool,
    pub mlp_bias: bool,
    /// Mistral-style sliding window attention.
    pub sliding_window: Option<usize>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct FalconConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub ffn_hidden_size: usize,
    pub num_layers: usize,
    pub num_heads: usize,
    /// Effective number of K/V heads (1 for multi-query).
    pub num_kv_heads: usize,
    pub head_dim: usize,
    pub multi_query: bool,
    pub parallel_attn: bool,
    pub new_decoder_architecture: bool,
    /// Two LayerNorms (`ln_attn`, `ln_mlp`) in the new decoder architecture.
    pub two_layernorms: bool,
    pub bias: bool,
    pub layer_norm_epsilon: f64,
    pub rope: RopeConfig,
    pub max_position_embeddings: usize,
    pub tie_word_embeddings: bool,
}

impl FalconConfig {
    /// Output width of the fused `query_key_value` projection: grouped K/V heads in the
    /// new decoder architecture, one shared K/V head with multi-query, else three full
    /// projections.
    pub fn qkv_out(&self) -> usize {
        if self.new_decoder_architecture {
            (2 * self.num_kv_heads + self.num_heads) * self.head_dim
        } else if self.multi_query {
            self.hidden_size + 2 * self.head_dim
        } else {
            3 * self.hidden_size
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub enum ArchConfig {
    Llama(LlamaConfig),
    Falcon(FalconConfig),
}

/// Everything parsed from config.json (+ generation_config.json).
#[derive(Debug, Clone, PartialEq)]
pub struct ModelConfig {
    /// Normalized model type: llama, mistral, qwen2 or falcon.
    pub model_type: String,
    pub arch: ArchConfig,
    pub eos_token_ids: Vec<u32>,
    pub pad_token_id: Option<u32>,
    pub bos_token_id: Option<u32>,
    /// `quantization_config` of a bitsandbytes 4-bit checkpoint.
    pub bnb_4bit: Option<BnbQuantConfig>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct BnbQuantConfig {
    pub double_quant: bool,
    pub compute_dtype: String,
}

struct Cfg<'a> {
    v: &'a Value,
    file: &'a Path,
}

impl<'a> Cfg<'a> {
    fn get(&self, keys: &[&str]) -> Option<&'a Value> {
        keys.iter().find_map(|k| self.v.get(*k).filter(|v| !v.is_null()))
    }
    fn err(&self, msg: String) -> EngineError {
        EngineError::file(self.file, msg)
    }
    fn usize_opt(&self, keys: &[&str]) -> Result<Option<usize>> {
        match self.get(keys) {
            None => Ok(None),
            Some(v) => v.as_u64().map(|x| Some(x as usize)).ok_or_else(|| self.err(format!("{} must be a non-negative integer, got {v}", keys[0]))),
        }
    }
    fn usize_req(&self, keys: &[&str]) -> Result<usize> {
        self.usize_opt(keys)?.ok_or_else(|| self.err(format!("missing field {}", keys[0])))
    }
    fn f64_opt(&self, keys: &[&str]) -> Result<Option<f64>> {
        match self.get(keys) {
            None => Ok(None),
            Some(v) => v.as_f64().map(Some).ok_or_else(|| self.err(format!("{} must be a number, got {v}", keys[0]))),
        }
    }
    fn bool_opt(&self, keys: &[&str]) -> Result<Option<bool>> {
        match self.get(keys) {
            None => Ok(None),
            Some(v) => v.as_bool().map(Some).ok_or_else(|| self.err(format!("{} must be a boolean, got {v}", keys[0]))),
        }
    }
    fn str_opt(&self, keys: &[&str]) -> Option<&'a str> {
        self.get(keys).and_then(|v| v.as_str())
    }
}

fn token_ids(v: Option<&Value>) -> Vec<u32> {
    match v {
        Some(Value::Number(n)) => n.as_u64().map(|x| vec![x as u32]).unwrap_or_default(),
        Some(Value::Array(a)) => a.iter().filter_map(|x| x.as_u64().map(|x| x as u32)).collect(),
        _ => vec![],
    }
}

fn parse_rope(c: &Cfg) -> Result<RopeConfig> {
    // transformers 5: rope_parameters {rope_theta, rope_type, ...}; older: top-level
    // rope_theta (absent = 10000) and rope_scaling.
    let params = c.get(&["rope_parameters"]);
    let scaling_obj = params.or_else(|| c.get(&["rope_scaling"]));
    let theta = match params.and_then(|p| p.get("rope_theta")).and_then(|t| t.as_f64()) {
        Some(t) => t,
        None => c.f64_opt(&["rope_theta"])?.unwrap_or(10000.0),
    };
    let scaling = match scaling_obj {
        None => RopeScaling::None,
        Some(s) => {
            let sc = Cfg { v: s, file: c.file };
            let ty = sc.str_opt(&["rope_type", "type"]).unwrap_or("default");
            let num = |k: &str| -> Result<f64> {
                sc.f64_opt(&[k])?.ok_or_else(|| c.err(format!("rope scaling {ty:?} needs {k}")))
            };
            match ty {
                "default" => RopeScaling::None,
                "linear" => RopeScaling::Linear { factor: num("factor")? },
                "llama3" => RopeScaling::Llama3 {
                    factor: num("factor")?,
                    low_freq_factor: num("low_freq_factor")?,
                    high_freq_factor: num("high_freq_factor")?,
                    original_max_position_embeddings: num("original_max_position_embeddings")?,
                },
                other => return Err(c.err(format!("unsupported rope_type {other:?} (supported: default, linear, llama3)"))),
            }
        }
    };
    Ok(RopeConfig { theta, scaling })
}

fn parse_llama(c: &Cfg, model_type: &str) -> Result<LlamaConfig> {
    let hidden_size = c.usize_req(&["hidden_size"])?;
    let num_heads = c.usize_req(&["num_attention_heads"])?;
    if num_heads == 0 || hidden_size == 0 {
        return Err(c.err("hidden_size and num_attention_heads must be positive".into()));
    }
    let num_kv_heads = c.usize_opt(&["num_key_value_heads"])?.unwrap_or(num_heads);
    if num_kv_heads == 0 || num_heads % num_kv_heads != 0 {
        return Err(c.err(format!("num_attention_heads {num_heads} is not a multiple of num_key_value_heads {num_kv_heads}")));
    }
    let head_dim = c.usize_opt(&["head_dim"])?.unwrap_or(hidden_size / num_heads);
    if head_dim == 0 || head_dim % 2 != 0 {
        return Err(c.err(format!("head_dim {head_dim} must be a positive even number")));
    }
    if let Some(act) = c.str_opt(&["hidden_act", "hidden_activation"]) {
        if act != "silu" {
            return Err(c.err(format!("unsupported hidden_act {act:?} (supported: silu)")));
        }
    }
    let attention_bias = c.bool_opt(&["attention_bias"])?.unwrap_or(false);
    let qwen = model_type == "qwen2";
    let sliding_window = match model_type {
        "mistral" => c.usize_opt(&["sliding_window"])?,
        "qwen2" if c.bool_opt(&["use_sliding_window"])?.unwrap_or(false) => c.usize_opt(&["sliding_window"])?,
        _ => None,
    };
    Ok(LlamaConfig {
        model_type: model_type.to_string(),
        vocab_size: c.usize_req(&["vocab_size"])?,
        hidden_size,
        intermediate_size: c.usize_req(&["intermediate_size"])?,
        num_layers: c.usize_req(&["num_hidden_layers"])?,
        num_heads,
        num_kv_heads,
        head_dim,
        rms_norm_eps: c.f64_opt(&["rms_norm_eps"])?.unwrap_or(1e-6),
        rope: parse_rope(c)?,
        max_position_embeddings: c.usize_opt(&["max_position_embeddings"])?.unwrap_or(4096),
        tie_word_embeddings: c.bool_opt(&["tie_word_embeddings"])?.unwrap_or(false),
        qkv_bias: qwen || attention_bias,
        o_bias: attention_bias,
        mlp_bias: c.bool_opt(&["mlp_bias"])?.unwrap_or(false),
        sliding_window,
    })
}

fn parse_falcon(c: &Cfg, raw_type: &str) -> Result<FalconConfig> {
    let hidden_size = c.usize_req(&["hidden_size", "d_model"])?;
    let num_heads = c.usize_req(&["num_attention_heads", "n_head"])?;
    if num_heads == 0 || hidden_size % num_heads != 0 {
        return Err(c.err(format!("hidden_size {hidden_size} is not a multiple of num_attention_heads {num_heads}")));
    }
    let head_dim = hidden_size / num_heads;
    if head_dim % 2 != 0 {
        return Err(c.err(format!("head_dim {head_dim} must be even")));
    }
    if c.bool_opt(&["alibi"])?.unwrap_or(false) {
        return Err(c.err("falcon with alibi is not supported (rotary only)".into()));
    }
    if let Some(act) = c.str_opt(&["activation"]) {
        if act != "gelu" {
            return Err(c.err(format!("unsupported falcon activation {act:?} (supported: gelu)")));
        }
    }
    // RefinedWeb (falcon-40b's original type) is the new decoder architecture.
    let new_decoder_architecture =
        c.bool_opt(&["new_decoder_architecture"])?.unwrap_or(raw_type == "RefinedWeb");
    let multi_query = c.bool_opt(&["multi_query"])?.unwrap_or(true);
    let parallel_attn = c.bool_opt(&["parallel_attn"])?.unwrap_or(true);
    let cfg_kv = c.usize_opt(&["num_kv_heads", "n_head_kv"])?.unwrap_or(num_heads);
    let num_kv_heads = if new_decoder_architecture {
        cfg_kv
    } else if multi_query {
        1
    } else {
        num_heads
    };
    if num_kv_heads == 0 || num_heads % num_kv_heads != 0 {
        return Err(c.err(format!("num_attention_heads {num_heads} is not a multiple of num_kv_heads {num_kv_heads}")));
    }
    let num_ln = c.usize_opt(&["num_ln_in_parallel_attn"])?;
    let two_layernorms = new_decoder_architecture && parallel_attn && num_ln.unwrap_or(2) == 2;
    Ok(FalconConfig {
        vocab_size: c.usize_req(&["vocab_size"])?,
        hidden_size,
        ffn_hidden_size: c.usize_opt(&["ffn_hidden_size"])?.unwrap_or(4 * hidden_size),
        num_layers: c.usize_req(&["num_hidden_layers", "n_layer"])?,
        num_heads,
        num_kv_heads,
        head_dim,
        multi_query,
        parallel_attn,
        new_decoder_architecture,
        two_layernorms,
        bias: c.bool_opt(&["bias"])?.unwrap_or(false),
        layer_norm_epsilon: c.f64_opt(&["layer_norm_epsilon"])?.unwrap_or(1e-5),
        rope: parse_rope(c)?,
        max_position_embeddings: c.usize_opt(&["max_position_embeddings"])?.unwrap_or(2048),
        tie_word_embeddings: c.bool_opt(&["tie_word_embeddings"])?.unwrap_or(true),
    })
}

fn read_json(path: &Path) -> Result<Value> {
    let text = std::fs::read_to_string(path).map_err(|e| EngineError::file(path, format!("cannot read: {e}")))?;
    serde_json::from_str(&text).map_err(|e| EngineError::file(path, format!("invalid json: {e}")))
}

impl ModelConfig {
    /// Parse a config.json value (`file` names it in errors).
    pub fn from_value(v: &Value, file: &Path) -> Result<Self> {
        let c = Cfg { v, file };
        let raw_type = c
            .str_opt(&["model_type"])
            .ok_or_else(|| EngineError::file(file, "missing field model_type"))?;
        let (model_type, arch) = match raw_type {
            "llama" | "mistral" | "qwen2" => (raw_type.to_string(), ArchConfig::Llama(parse_llama(&c, raw_type)?)),
            "falcon" | "RefinedWeb" | "RefinedWebModel" => ("falcon".to_string(), ArchConfig::Falcon(parse_falcon(&c, raw_type)?)),
            other => return Err(EngineError::UnsupportedArchitecture(other.to_string())),
        };
        let bnb_4bit = match c.get(&["quantization_config"]) {
            None => None,
            Some(q) => {
                let method = q.get("quant_method").and_then(|m| m.as_str()).unwrap_or("");
                let four = q.get("load_in_4bit").and_then(|m| m.as_bool()).unwrap_or(false);
                let ty = q.get("bnb_4bit_quant_type").and_then(|m| m.as_str()).unwrap_or("fp4");
                if method != "bitsandbytes" || !four {
                    return Err(EngineError::file(file, format!("unsupported quantization_config (quant_method {method:?}, load_in_4bit {four}): only bitsandbytes 4-bit nf4 checkpoints load")));
                }
                if ty != "nf4" {
                    return Err(EngineError::file(file, format!("unsupported bnb_4bit_quant_type {ty:?} (supported: nf4)")));
                }
                Some(BnbQuantConfig {
                    double_quant: q.get("bnb_4bit_use_double_quant").and_then(|m| m.as_bool()).unwrap_or(false),
                    compute_dtype: q.get("bnb_4bit_compute_dtype").and_then(|m| m.as_str()).unwrap_or("float32").to_string(),
                })
            }
        };
        Ok(Self {
            model_type,
            arch,
            eos_token_ids: token_ids(c.get(&["eos_token_id"])),
            pad_token_id: token_ids(c.get(&["pad_token_id"])).first().copied(),
            bos_token_id: token_ids(c.get(&["bos_token_id"])).first().copied(),
            bnb_4bit,
        })
    }

    /// Read `dir/config.json`; eos ids from `generation_config.json` when it has them.
    pub fn from_dir(dir: &Path) -> Result<Self> {
        let path = dir.join("config.json");
        let mut cfg = Self::from_value(&read_json(&path)?, &path)?;
        let gen = dir.join("generation_config.json");
        if gen.exists() {
            let g = read_json(&gen)?;
            let eos = token_ids(g.get("eos_token_id"));
            if !eos.is_empty() {
                cfg.eos_token_ids = eos;
            }
            if cfg.pad_token_id.is_none() {
                cfg.pad_token_id = token_ids(g.get("pad_token_id")).first().copied();
            }
        }
        Ok(cfg)
    }

    pub fn vocab_size(&self) -> usize {
        match &self.arch {
            ArchConfig::Llama(c) => c.vocab_size,
            ArchConfig::Falcon(c) => c.vocab_size,
        }
    }
    pub fn hidden_size(&self) -> usize {
        match &self.arch {
            ArchConfig::Llama(c) => c.hidden_size,
            ArchConfig::Falcon(c) => c.hidden_size,
        }
    }
    pub fn num_layers(&self) -> usize {
        match &self.arch {
            ArchConfig::Llama(c) => c.num_layers,
            ArchConfig::Falcon(c) => c.num_layers,
        }
    }
    pub fn max_position_embeddings(&self) -> usize {
        match &self.arch {
            ArchConfig::Llama(c) => c.max_position_embeddings,
            ArchConfig::Falcon(c) => c.max_position_embeddings,
        }
    }
    pub fn tie_word_embeddings(&self) -> bool {
        match &self.arch {
            ArchConfig::Llama(c) => c.tie_word_embeddings,
            ArchConfig::Falcon(c) => c.tie_word_embeddings,
        }
    }

    /// Names (last path component) of the linear layers inside a decoder block.
    pub fn linear_module_names(&self) -> Vec<&'static str> {
        match &self.arch {
            ArchConfig::Llama(_) => vec!["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
            ArchConfig::Falcon(_) => vec!["query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"],
        }
    }

    /// PEFT's default LoRA targets for the architecture.
    pub fn default_lora_targets(&self) -> Vec<String> {
        match &self.arch {
            ArchConfig::Llama(_) => vec!["q_proj".into(), "v_proj".into()],
            ArchConfig::Falcon(_) => vec!["query_key_value".into()],
        }
    }
}

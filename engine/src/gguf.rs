//! GGUF output for llama.cpp: a LoRA adapter in llama.cpp's adapter layout
//! (`export_adapter`) and a merged model (`merge_to_gguf`).
//!
//! What llama.cpp's own converters (`convert_lora_to_gguf.py`, `convert_hf_to_gguf.py`,
//! gguf-py) do, and what this module therefore does:
//! - GGUF v3, little-endian, 32-byte alignment; a tensor's dims are stored in ggml
//!   order (numpy's reversed): a PEFT `lora_A` `[r, in]` is stored with ne `[in, r]`.
//! - Tensor names from gguf-py's tensor map (`blk.0.attn_q.weight`); an adapter's halves
//!   are `<name>.lora_a` (PEFT's A as is) and `<name>.lora_b` (PEFT's B).
//! - Llama's q/k projection rows are permuted for ggml's rope layout (the halves of each
//!   head interleaved), Falcon's fused query_key_value is regrouped as all q heads, then
//!   all k heads, then all v heads. Both only reorder output rows, so for LoRA only
//!   `lora_b`'s rows move; `lora_a` is unchanged.
//! - 1-D tensors, norms and every tensor not named `.weight`/`.lora_a`/`.lora_b` stay
//!   f32; Q8_0 needs a row length that is a multiple of 32 and falls back to f16.
//! - llama.cpp scales an adapter by `alpha / r` and has no rsLoRA; an rsLoRA adapter is
//!   exported with `alpha * sqrt(r)` so the effective scaling `alpha / sqrt(r)` is kept.

use std::io::Write;
use std::path::{Path, PathBuf};

use crate::merge::{self, MergedTensor};
use crate::model::config::{ArchConfig, FalconConfig, LlamaConfig, ModelConfig, RopeScaling};
use crate::peft;
use crate::{EngineError, Result};

/// GGUF format version written.
pub const GGUF_VERSION: u32 = 3;
/// Data alignment (gguf-py's default; no `general.alignment` key is needed for it).
pub const ALIGNMENT: usize = 32;
/// Values per Q8_0 block.
pub const Q8_0_BLOCK: usize = 32;
/// ggml's quantization format version (`general.quantization_version`).
const QUANT_VERSION: u32 = 2;

/// ggml tensor types this writer produces.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GgmlType {
    F32,
    F16,
    Bf16,
    Q8_0,
}

impl GgmlType {
    /// ggml's type id (`GGMLQuantizationType`).
    pub fn id(self) -> u32 {
        match self {
            GgmlType::F32 => 0,
            GgmlType::F16 => 1,
            GgmlType::Q8_0 => 8,
            GgmlType::Bf16 => 30,
        }
    }

    /// Bytes for `numel` values (Q8_0: 34-byte blocks of 32: an f16 scale, 32 i8).
    pub fn nbytes(self, numel: usize) -> usize {
        match self {
            GgmlType::F32 => numel * 4,
            GgmlType::F16 | GgmlType::Bf16 => numel * 2,
            GgmlType::Q8_0 => numel / Q8_0_BLOCK * (2 + Q8_0_BLOCK),
        }
    }
}

/// The output type a user asks for (llama.cpp's `--outtype`); per tensor the rules of
/// `tensor_type` decide.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GgufDtype {
    F32,
    F16,
    Bf16,
    Q8_0,
}

impl GgufDtype {
    /// `general.file_type` (llama.cpp's `LlamaFileType`).
    pub fn file_type(self) -> u32 {
        match self {
            GgufDtype::F32 => 0,
            GgufDtype::F16 => 1,
            GgufDtype::Q8_0 => 7,
            GgufDtype::Bf16 => 32,
        }
    }

    fn ggml(self) -> GgmlType {
        match self {
            GgufDtype::F32 => GgmlType::F32,
            GgufDtype::F16 => GgmlType::F16,
            GgufDtype::Bf16 => GgmlType::Bf16,
            GgufDtype::Q8_0 => GgmlType::Q8_0,
        }
    }
}

/// The type a tensor is stored as: f32 for 1-D tensors, norms and anything not named
/// `.weight`/`.lora_a`/`.lora_b` (ggml's kernels expect f32 there, as llama.cpp's
/// converter keeps them); Q8_0 only when the row length (last numpy dim) is a multiple
/// of 32, else f16 (the converter's fallback).
pub fn tensor_type(name: &str, shape: &[usize], want: GgufDtype) -> GgmlType {
    let quantizable = name.ends_with(".weight") || name.ends_with(".lora_a") || name.ends_with(".lora_b");
    if shape.len() <= 1 || name.ends_with("_norm.weight") || !quantizable {
        return GgmlType::F32;
    }
    let row = shape.last().copied().unwrap_or(0);
    match want.ggml() {
        GgmlType::Q8_0 if !row.is_multiple_of(Q8_0_BLOCK) => GgmlType::F16,
        t => t,
    }
}

/// f32 to bf16 as ggml rounds (`ggml_compute_fp32_to_bf16`): NaNs made quiet, the rest
/// rounded to nearest even.
pub fn bf16_bits(x: f32) -> u16 {
    let n = x.to_bits();
    if n & 0x7fff_ffff > 0x7f80_0000 {
        return ((n & 0xffff_0000) >> 16) as u16 | 64;
    }
    ((n as u64 + (0x7fff + ((n >> 16) & 1)) as u64) >> 16) as u16
}

/// One Q8_0 block as ggml's reference quantizer (and gguf-py) computes it: scale
/// `d = max|x| / 127` in f32, `q = round(x / d)` with halves away from zero (gguf-py's
/// `np_roundf`; Rust's `f32::round` rounds the same way), `d` stored as f16.
fn q8_0_block(block: &[f32], out: &mut Vec<u8>) {
    let amax = block.iter().fold(0f32, |m, x| m.max(x.abs()));
    let d = amax / 127.0;
    let id = if d == 0.0 { 0.0 } else { 1.0 / d };
    out.extend_from_slice(&half::f16::from_f32(d).to_le_bytes());
    out.extend(block.iter().map(|x| ((x * id).round() as i8) as u8));
}

/// Encode f32 values as `ty`. Q8_0 needs a multiple of 32 values (rows are checked by
/// `tensor_type`).
pub fn encode(values: &[f32], ty: GgmlType) -> Result<Vec<u8>> {
    let mut out = Vec::with_capacity(ty.nbytes(values.len()));
    match ty {
        GgmlType::F32 => out.extend(values.iter().flat_map(|x| x.to_le_bytes())),
        GgmlType::F16 => out.extend(values.iter().flat_map(|x| half::f16::from_f32(*x).to_le_bytes())),
        GgmlType::Bf16 => out.extend(values.iter().flat_map(|x| bf16_bits(*x).to_le_bytes())),
        GgmlType::Q8_0 => {
            if !values.len().is_multiple_of(Q8_0_BLOCK) {
                return Err(EngineError::Config(format!("q8_0 needs a multiple of {Q8_0_BLOCK} values, got {}", values.len())));
            }
            values.chunks(Q8_0_BLOCK).for_each(|b| q8_0_block(b, &mut out));
        }
    }
    Ok(out)
}

/// Decode Q8_0 bytes (for tests and checks).
pub fn decode_q8_0(bytes: &[u8]) -> Vec<f32> {
    bytes
        .chunks(2 + Q8_0_BLOCK)
        .flat_map(|b| {
            let d = half::f16::from_le_bytes([b[0], b[1]]).to_f32();
            b[2..].iter().map(move |q| *q as i8 as f32 * d)
        })
        .collect()
}

/// A metadata value (the subset of GGUF's value types llama.cpp's converters use here).
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    U32(u32),
    F32(f32),
    Bool(bool),
    Str(String),
    StrArray(Vec<String>),
    I32Array(Vec<i32>),
    F32Array(Vec<f32>),
}

impl Value {
    /// GGUF's value type id (`GGUFValueType`).
    fn type_id(&self) -> u32 {
        match self {
            Value::U32(_) => 4,
            Value::F32(_) => 6,
            Value::Bool(_) => 7,
            Value::Str(_) => 8,
            Value::StrArray(_) | Value::I32Array(_) | Value::F32Array(_) => 9,
        }
    }

    fn write(&self, out: &mut Vec<u8>) {
        match self {
            Value::U32(v) => out.extend(v.to_le_bytes()),
            Value::F32(v) => out.extend(v.to_le_bytes()),
            Value::Bool(v) => out.push(*v as u8),
            Value::Str(s) => put_str(out, s),
            Value::StrArray(a) => {
                put_array_head(out, 8, a.len());
                a.iter().for_each(|s| put_str(out, s));
            }
            Value::I32Array(a) => {
                put_array_head(out, 5, a.len());
                a.iter().for_each(|v| out.extend(v.to_le_bytes()));
            }
            Value::F32Array(a) => {
                put_array_head(out, 6, a.len());
                a.iter().for_each(|v| out.extend(v.to_le_bytes()));
            }
        }
    }
}

fn put_str(out: &mut Vec<u8>, s: &str) {
    out.extend((s.len() as u64).to_le_bytes());
    out.extend(s.as_bytes());
}

fn put_array_head(out: &mut Vec<u8>, elem_type: u32, len: usize) {
    out.extend(elem_type.to_le_bytes());
    out.extend((len as u64).to_le_bytes());
}

fn pad_to(len: usize) -> usize {
    len.div_ceil(ALIGNMENT) * ALIGNMENT
}

/// One tensor, encoded. `shape` is in numpy / PyTorch order (rows last-but-one); the
/// file stores it reversed.
#[derive(Debug, Clone)]
pub struct GgufTensor {
    pub name: String,
    pub shape: Vec<usize>,
    pub ty: GgmlType,
    pub data: Vec<u8>,
}

/// A GGUF file being assembled: metadata in insertion order, then tensors.
#[derive(Debug, Default)]
pub struct GgufFile {
    kv: Vec<(String, Value)>,
    tensors: Vec<GgufTensor>,
}

impl GgufFile {
    pub fn new() -> Self {
        Self::default()
    }

    /// Set a metadata key (a later value for the same key replaces the earlier one).
    pub fn set(&mut self, key: impl Into<String>, value: Value) {
        let key = key.into();
        match self.kv.iter_mut().find(|(k, _)| *k == key) {
            Some(slot) => slot.1 = value,
            None => self.kv.push((key, value)),
        }
    }

    /// Add a tensor from f32 values in numpy order, stored as `ty`.
    pub fn add_tensor(&mut self, name: &str, shape: &[usize], values: &[f32], ty: GgmlType) -> Result<()> {
        if shape.iter().product::<usize>() != values.len() {
            return Err(EngineError::Config(format!("tensor {name}: {} values for shape {shape:?}", values.len())));
        }
        if self.tensors.iter().any(|t| t.name == name) {
            return Err(EngineError::Config(format!("tensor {name} is written twice")));
        }
        let data = encode(values, ty).map_err(|e| EngineError::Config(format!("tensor {name}: {e}")))?;
        self.tensors.push(GgufTensor { name: name.to_string(), shape: shape.to_vec(), ty, data });
        Ok(())
    }

    pub fn tensors(&self) -> &[GgufTensor] {
        &self.tensors
    }

    /// Header, metadata and tensor infos, padded to the alignment: everything before
    /// the tensor data.
    fn head_bytes(&self) -> Vec<u8> {
        let mut out = Vec::new();
        out.extend(b"GGUF");
        out.extend(GGUF_VERSION.to_le_bytes());
        out.extend((self.tensors.len() as u64).to_le_bytes());
        out.extend((self.kv.len() as u64).to_le_bytes());
        for (k, v) in &self.kv {
            put_str(&mut out, k);
            out.extend(v.type_id().to_le_bytes());
            v.write(&mut out);
        }
        let mut offset = 0usize;
        for t in &self.tensors {
            put_str(&mut out, &t.name);
            out.extend((t.shape.len() as u32).to_le_bytes());
            t.shape.iter().rev().for_each(|d| out.extend((*d as u64).to_le_bytes()));
            out.extend(t.ty.id().to_le_bytes());
            out.extend((offset as u64).to_le_bytes());
            offset += pad_to(t.data.len());
        }
        out.resize(pad_to(out.len()), 0);
        out
    }

    /// The whole file as bytes.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = self.head_bytes();
        for t in &self.tensors {
            out.extend(&t.data);
            out.resize(pad_to(out.len()), 0);
        }
        out
    }

    /// Write to `path` (a temporary file renamed into place, so a failed write leaves
    /// no half file under the final name).
    pub fn write(&self, path: &Path) -> Result<()> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|e| EngineError::file(dir, format!("cannot create directory: {e}")))?;
        }
        let tmp = PathBuf::from(format!("{}.tmp", path.display()));
        let werr = |e: std::io::Error| EngineError::file(&tmp, format!("cannot write: {e}"));
        let file = std::fs::File::create(&tmp).map_err(werr)?;
        let mut w = std::io::BufWriter::new(file);
        w.write_all(&self.head_bytes()).map_err(werr)?;
        let zeros = [0u8; ALIGNMENT];
        for t in &self.tensors {
            w.write_all(&t.data).map_err(werr)?;
            w.write_all(&zeros[..pad_to(t.data.len()) - t.data.len()]).map_err(werr)?;
        }
        w.into_inner().map_err(|e| werr(e.into_error()))?.sync_all().map_err(werr)?;
        std::fs::rename(&tmp, path).map_err(|e| EngineError::file(path, format!("cannot write: {e}")))
    }
}

/// llama.cpp's architecture for a model: llama and mistral are `llama` (converted by
/// its LlamaModel, which permutes q/k), qwen2 is `qwen2` (no permutation), falcon is
/// `falcon`.
pub fn arch_name(cfg: &ModelConfig) -> &'static str {
    match (&cfg.arch, cfg.model_type.as_str()) {
        (ArchConfig::Llama(_), "qwen2") => "qwen2",
        (ArchConfig::Llama(_), _) => "llama",
        (ArchConfig::Falcon(_), _) => "falcon",
    }
}

/// Tensors llama.cpp's converter drops (buffers some checkpoints carry).
fn is_skipped(hf_name: &str) -> bool {
    [".rotary_emb.inv_freq", ".attention.masked_bias", ".attention.bias"].iter().any(|s| hf_name.ends_with(s))
}

/// `(block, rest)` of `<prefix><block>.<rest>`.
fn split_block<'a>(module: &'a str, prefix: &str) -> Option<(usize, &'a str)> {
    let (bid, rest) = module.strip_prefix(prefix)?.split_once('.')?;
    Some((bid.parse().ok()?, rest))
}

fn llama_block_name(rest: &str) -> Option<&'static str> {
    Some(match rest {
        "input_layernorm" => "attn_norm",
        "post_attention_layernorm" => "ffn_norm",
        "self_attn.q_proj" => "attn_q",
        "self_attn.k_proj" => "attn_k",
        "self_attn.v_proj" => "attn_v",
        "self_attn.o_proj" => "attn_output",
        "mlp.gate_proj" => "ffn_gate",
        "mlp.up_proj" => "ffn_up",
        "mlp.down_proj" => "ffn_down",
        _ => return None,
    })
}

/// Falcon's block tensors as gguf-py maps them (falcon-40b's `ln_mlp` is `attn_norm`
/// and `ln_attn` is `attn_norm_2` there).
fn falcon_block_name(rest: &str) -> Option<&'static str> {
    Some(match rest {
        "input_layernorm" | "ln_mlp" => "attn_norm",
        "ln_attn" => "attn_norm_2",
        "self_attention.query_key_value" => "attn_qkv",
        "self_attention.dense" => "attn_output",
        "mlp.dense_h_to_4h" => "ffn_up",
        "mlp.dense_4h_to_h" => "ffn_down",
        _ => return None,
    })
}

/// The GGUF name of a Hugging Face module path (without `.weight`/`.bias`).
fn map_module(cfg: &ModelConfig, module: &str) -> Option<String> {
    let (embed, norm, blocks) = match cfg.arch {
        ArchConfig::Llama(_) => ("model.embed_tokens", "model.norm", "model.layers."),
        ArchConfig::Falcon(_) => ("transformer.word_embeddings", "transformer.ln_f", "transformer.h."),
    };
    match module {
        m if m == embed => return Some("token_embd".into()),
        m if m == norm => return Some("output_norm".into()),
        "lm_head" => return Some("output".into()),
        _ => {}
    }
    let (bid, rest) = split_block(module, blocks)?;
    let base = match cfg.arch {
        ArchConfig::Llama(_) => llama_block_name(rest)?,
        ArchConfig::Falcon(_) => falcon_block_name(rest)?,
    };
    Some(format!("blk.{bid}.{base}"))
}

/// The GGUF name of a Hugging Face tensor name (`model.layers.0.self_attn.q_proj.weight`
/// -> `blk.0.attn_q.weight`): `Ok(None)` for tensors llama.cpp's converter drops, an
/// error naming the tensor when llama.cpp's layout has no place for it.
pub fn map_tensor_name(cfg: &ModelConfig, hf_name: &str) -> Result<Option<String>> {
    if is_skipped(hf_name) {
        return Ok(None);
    }
    let (module, suffix) = hf_name
        .strip_suffix(".weight")
        .map(|m| (m, "weight"))
        .or_else(|| hf_name.strip_suffix(".bias").map(|m| (m, "bias")))
        .ok_or_else(|| unmappable(cfg, hf_name))?;
    let base = map_module(cfg, module).ok_or_else(|| unmappable(cfg, hf_name))?;
    Ok(Some(format!("{base}.{suffix}")))
}

fn unmappable(cfg: &ModelConfig, hf_name: &str) -> EngineError {
    EngineError::Config(format!("tensor {hf_name}: llama.cpp's {} layout has no tensor for it", arch_name(cfg)))
}

/// llama.cpp's q/k permutation for `n_head` heads of `head_dim` rows: within a head,
/// new row `2i + j` is old row `j * head_dim/2 + i` (the rotate-half pairs interleaved).
/// Returns old row indices in new order.
fn rope_permutation(n_head: usize, head_dim: usize) -> Vec<usize> {
    let half = head_dim / 2;
    (0..n_head)
        .flat_map(|h| (0..half).flat_map(move |i| (0..2).map(move |j| h * head_dim + j * half + i)))
        .collect()
}

/// llama.cpp's Falcon qkv regrouping: HF stores `n_kv` groups of (`n_head / n_kv` q
/// heads, one k head, one v head); ggml wants all q heads, then the k heads, then the v
/// heads. Returns old row indices in new order.
fn falcon_qkv_permutation(c: &FalconConfig) -> Vec<usize> {
    let (n_kv, hd) = (c.num_kv_heads, c.head_dim);
    let g = c.num_heads / n_kv;
    let row = move |kv: usize, slot: usize, d: usize| (kv * (g + 2) + slot) * hd + d;
    let q = (0..n_kv).flat_map(move |kv| (0..g).flat_map(move |s| (0..hd).map(move |d| row(kv, s, d))));
    let k = (0..n_kv).flat_map(move |kv| (0..hd).map(move |d| row(kv, g, d)));
    let v = (0..n_kv).flat_map(move |kv| (0..hd).map(move |d| row(kv, g + 1, d)));
    q.chain(k).chain(v).collect()
}

/// The row order llama.cpp's converter gives a tensor (`gguf_name` of a weight or
/// bias), or `None` when it keeps the rows as they are.
pub fn row_permutation(cfg: &ModelConfig, gguf_name: &str) -> Option<Vec<usize>> {
    let base = gguf_name.rsplit_once('.').map(|(b, _)| b).unwrap_or(gguf_name);
    let kind = base.rsplit('.').next().unwrap_or("");
    match (&cfg.arch, arch_name(cfg), kind) {
        (ArchConfig::Llama(c), "llama", "attn_q") => Some(rope_permutation(c.num_heads, c.head_dim)),
        (ArchConfig::Llama(c), "llama", "attn_k") => Some(rope_permutation(c.num_kv_heads, c.head_dim)),
        (ArchConfig::Falcon(c), _, "attn_qkv") => Some(falcon_qkv_permutation(c)),
        _ => None,
    }
}

/// Reorder the rows (first dim) of a row-major tensor: new row `r` is old row
/// `order[r]`. A permutation that does not fit the tensor is an error naming it.
pub fn permute_rows(name: &str, shape: &[usize], values: &[f32], order: &[usize]) -> Result<Vec<f32>> {
    let rows = shape.first().copied().unwrap_or(0);
    if rows != order.len() || rows == 0 {
        return Err(EngineError::Config(format!(
            "tensor {name}: shape {shape:?} does not have the {} rows the config's heads imply",
            order.len()
        )));
    }
    let width = values.len() / rows;
    Ok(order.iter().flat_map(|&o| values[o * width..(o + 1) * width].iter().copied()).collect())
}

/// `[out, in]` of a block linear (`module`'s last component) as config.json implies it.
fn linear_shape(cfg: &ModelConfig, module: &str) -> Option<[usize; 2]> {
    let last = module.rsplit('.').next().unwrap_or("");
    match &cfg.arch {
        ArchConfig::Llama(c) => llama_linear_shape(c, last),
        ArchConfig::Falcon(c) => {
            let h = c.hidden_size;
            Some(match last {
                "query_key_value" => [c.qkv_out(), h],
                "dense" => [h, h],
                "dense_h_to_4h" => [c.ffn_hidden_size, h],
                "dense_4h_to_h" => [h, c.ffn_hidden_size],
                _ => return None,
            })
        }
    }
}

fn llama_linear_shape(c: &LlamaConfig, last: &str) -> Option<[usize; 2]> {
    let (h, q, kv, i) = (c.hidden_size, c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim, c.intermediate_size);
    Some(match last {
        "q_proj" => [q, h],
        "k_proj" | "v_proj" => [kv, h],
        "o_proj" => [h, q],
        "gate_proj" | "up_proj" => [i, h],
        "down_proj" => [h, i],
        "lm_head" => [c.vocab_size, h],
        _ => return None,
    })
}

/// The architecture metadata llama.cpp's loader reads (`<arch>.context_length`, ...).
pub fn arch_metadata(cfg: &ModelConfig) -> Vec<(String, Value)> {
    let arch = arch_name(cfg);
    let k = |s: &str| format!("{arch}.{s}");
    let u = |v: usize| Value::U32(v as u32);
    match &cfg.arch {
        ArchConfig::Llama(c) => {
            let mut kv = vec![
                (k("block_count"), u(c.num_layers)),
                (k("context_length"), u(c.max_position_embeddings)),
                (k("embedding_length"), u(c.hidden_size)),
                (k("feed_forward_length"), u(c.intermediate_size)),
                (k("attention.head_count"), u(c.num_heads)),
                (k("attention.head_count_kv"), u(c.num_kv_heads)),
                (k("rope.freq_base"), Value::F32(c.rope.theta as f32)),
                (k("attention.layer_norm_rms_epsilon"), Value::F32(c.rms_norm_eps as f32)),
                (k("attention.key_length"), u(c.head_dim)),
                (k("attention.value_length"), u(c.head_dim)),
                (k("vocab_size"), u(c.vocab_size)),
                (k("rope.dimension_count"), u(c.head_dim)),
            ];
            if let RopeScaling::Linear { factor } = c.rope.scaling {
                kv.push((k("rope.scaling.type"), Value::Str("linear".into())));
                kv.push((k("rope.scaling.factor"), Value::F32(factor as f32)));
            }
            kv
        }
        ArchConfig::Falcon(c) => vec![
            (k("context_length"), u(c.max_position_embeddings)),
            (k("tensor_data_layout"), Value::Str("jploski".into())),
            (k("embedding_length"), u(c.hidden_size)),
            (k("feed_forward_length"), u(c.ffn_hidden_size)),
            (k("block_count"), u(c.num_layers)),
            (k("attention.head_count"), u(c.num_heads)),
            (k("attention.head_count_kv"), u(c.num_kv_heads)),
            (k("attention.layer_norm_epsilon"), Value::F32(c.layer_norm_epsilon as f32)),
            (k("rope.freq_base"), Value::F32(c.rope.theta as f32)),
        ],
    }
}

/// Llama 3's per-frequency rope factors, which llama.cpp's converter writes as the
/// `rope_freqs.weight` tensor (f32, `head_dim / 2` values) instead of metadata.
fn llama3_rope_factors(c: &LlamaConfig) -> Option<Vec<f32>> {
    let RopeScaling::Llama3 { factor, low_freq_factor, high_freq_factor, original_max_position_embeddings: old } = c.rope.scaling else {
        return None;
    };
    let (low_wavelen, high_wavelen) = (old / low_freq_factor, old / high_freq_factor);
    let factors = (0..c.head_dim / 2)
        .map(|i| {
            let freq = 1.0 / (c.rope.theta as f32).powf((2 * i) as f32 / c.head_dim as f32);
            let wavelen = 2.0 * std::f64::consts::PI / freq as f64;
            if wavelen < high_wavelen {
                1.0
            } else if wavelen > low_wavelen {
                factor as f32
            } else {
                let smooth = (old / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor);
                (1.0 / ((1.0 - smooth) / factor + smooth)) as f32
            }
        })
        .collect();
    Some(factors)
}

/// The last component of a directory path, for `general.name`.
fn dir_name(dir: &Path) -> String {
    let canonical = dir.canonicalize().unwrap_or_else(|_| dir.to_path_buf());
    canonical.file_name().map(|n| n.to_string_lossy().to_string()).unwrap_or_else(|| "model".into())
}

/// Where the base model's config.json is for an adapter: `--model`, else the adapter's
/// `base_model_name_or_path` when that is a local directory (as is, or relative to the
/// adapter directory).
fn base_model_dir(adapter: &Path, model: Option<&Path>, acfg: &peft::AdapterConfig) -> Result<PathBuf> {
    if let Some(m) = model {
        return Ok(m.to_path_buf());
    }
    let name = acfg.base_model_name_or_path.clone().unwrap_or_default();
    let candidates = [PathBuf::from(&name), adapter.join(&name)];
    candidates.into_iter().find(|p| !name.is_empty() && p.join("config.json").is_file()).ok_or_else(|| {
        EngineError::file(
            adapter.join(peft::ADAPTER_CONFIG),
            format!("base_model_name_or_path {name:?} is not a local model directory; pass the base model with --model DIR (only its config.json is read)"),
        )
    })
}

/// One adapted module's PEFT tensors: `(shape, values)` of A and B.
type LoraPair = ((Vec<usize>, Vec<f32>), (Vec<usize>, Vec<f32>));

/// Pair the adapter's `lora_A`/`lora_B` tensors by module path. Any other tensor (an
/// embedding adapter, `modules_to_save` copies, norms) or a half without its partner is
/// an error naming it.
fn pair_adapter_tensors(file: &Path, mut tensors: peft::AdapterTensors) -> Result<Vec<(String, LoraPair)>> {
    let mut keys: Vec<String> = tensors.keys().cloned().collect();
    keys.sort();
    let mut pairs = Vec::new();
    for key in keys {
        if !tensors.contains_key(&key) {
            continue;
        }
        let module = peft::module_of_key(&key)
            .ok_or_else(|| EngineError::file(file, format!("tensor {key}: not a lora_A/lora_B weight; llama.cpp adapters hold only those")))?
            .to_string();
        let (ka, kb) = (crate::lora::peft_key(&module, "A"), crate::lora::peft_key(&module, "B"));
        let missing = |k: &str| EngineError::file(file, format!("tensor {key}: its partner {k} is missing"));
        let a = tensors.remove(&ka).ok_or_else(|| missing(&ka))?;
        let b = tensors.remove(&kb).ok_or_else(|| missing(&kb))?;
        pairs.push((module, (a, b)));
    }
    Ok(pairs)
}

/// Check one module's A `[r, in]` and B `[out, r]` against the adapter's rank and the
/// base model's linear shape.
fn check_lora_shapes(file: &Path, cfg: &ModelConfig, module: &str, r: usize, sa: &[usize], sb: &[usize]) -> Result<()> {
    let [out, inp] = linear_shape(cfg, module).ok_or_else(|| {
        EngineError::file(file, format!("tensor {}: {module} is not a linear layer of the base model", crate::lora::peft_key(module, "A")))
    })?;
    if sa != [r, inp] {
        return Err(EngineError::file(file, format!("tensor {}: shape {sa:?}, the base model needs {:?}", crate::lora::peft_key(module, "A"), [r, inp])));
    }
    if sb != [out, r] {
        return Err(EngineError::file(file, format!("tensor {}: shape {sb:?}, the base model needs {:?}", crate::lora::peft_key(module, "B"), [out, r])));
    }
    Ok(())
}

/// The alpha to write so that llama.cpp's `alpha / r` equals PEFT's scaling (rsLoRA:
/// `alpha / sqrt(r)`, so `alpha * sqrt(r)` is written).
pub fn gguf_lora_alpha(acfg: &peft::AdapterConfig) -> f32 {
    (merge::lora_scaling(acfg) * acfg.r as f64) as f32
}

/// Build the GGUF LoRA adapter for the PEFT adapter in `adapter` (base model config from
/// `model`, or the adapter's `base_model_name_or_path` when that is a local directory).
pub fn adapter_gguf(adapter: &Path, model: Option<&Path>, dtype: GgufDtype) -> Result<GgufFile> {
    let acfg = peft::read_adapter_config(adapter)?;
    let base = base_model_dir(adapter, model, &acfg)?;
    let cfg = ModelConfig::from_dir(&base)?;
    let file = adapter.join(peft::ADAPTER_WEIGHTS);
    let pairs = pair_adapter_tensors(&file, peft::read_adapter_tensors(adapter)?)?;
    let mut g = GgufFile::new();
    g.set("general.architecture", Value::Str(arch_name(&cfg).into()));
    g.set("general.type", Value::Str("adapter".into()));
    g.set("adapter.type", Value::Str("lora".into()));
    g.set("general.name", Value::Str(dir_name(adapter)));
    g.set("adapter.lora.alpha", Value::F32(gguf_lora_alpha(&acfg)));
    g.set("general.quantization_version", Value::U32(QUANT_VERSION));
    if acfg.use_rslora {
        tracing::info!(alpha = acfg.lora_alpha, written = gguf_lora_alpha(&acfg), "rsLoRA adapter: llama.cpp scales by alpha / r, so alpha * sqrt(r) is written");
    }
    for (module, ((sa, a), (sb, b))) in pairs {
        check_lora_shapes(&file, &cfg, &module, acfg.r, &sa, &sb)?;
        let name = map_tensor_name(&cfg, &format!("{module}.weight"))
            .map_err(|e| EngineError::file(&file, format!("{e} (adapted by {})", crate::lora::peft_key(&module, "A"))))?
            .ok_or_else(|| EngineError::file(&file, format!("tensor {module}.weight: llama.cpp drops it")))?;
        if name == "output.weight" && cfg.tie_word_embeddings() {
            return Err(EngineError::file(&file, format!("{}: lm_head is tied to the embeddings; llama.cpp has no separate output tensor to adapt", crate::lora::peft_key(&module, "A"))));
        }
        let b = match row_permutation(&cfg, &name) {
            Some(order) => permute_rows(&name, &sb, &b, &order)?,
            None => b,
        };
        let (na, nb) = (format!("{name}.lora_a"), format!("{name}.lora_b"));
        g.add_tensor(&na, &sa, &a, tensor_type(&na, &sa, dtype))?;
        g.add_tensor(&nb, &sb, &b, tensor_type(&nb, &sb, dtype))?;
    }
    if g.tensors().is_empty() {
        return Err(EngineError::file(&file, "the adapter has no lora tensors"));
    }
    Ok(g)
}

/// Write the PEFT adapter in `adapter` as a llama.cpp GGUF LoRA adapter to `out`.
pub fn export_adapter(adapter: &Path, model: Option<&Path>, out: &Path, dtype: GgufDtype) -> Result<()> {
    let g = adapter_gguf(adapter, model, dtype)?;
    g.write(out)?;
    tracing::info!(adapter = %adapter.display(), out = %out.display(), tensors = g.tensors().len(), ?dtype, "wrote gguf lora adapter");
    Ok(())
}

/// Add one merged tensor under its GGUF name, rows reordered as llama.cpp's converter
/// does and stored in the type `tensor_type` picks.
fn add_merged(g: &mut GgufFile, cfg: &ModelConfig, hf_name: &str, t: MergedTensor, dtype: GgufDtype) -> Result<()> {
    let Some(name) = map_tensor_name(cfg, hf_name)? else {
        return Ok(());
    };
    let w = match t {
        MergedTensor::Float(w) => w,
        MergedTensor::Raw(dt, ..) => {
            return Err(EngineError::Config(format!("tensor {hf_name}: dtype {dt:?} cannot be written to gguf (float tensors only)")))
        }
    };
    let shape = w.dims().to_vec();
    let mut values = w.flatten_all()?.to_vec1::<f32>()?;
    if let Some(order) = row_permutation(cfg, &name) {
        values = permute_rows(&name, &shape, &values, &order)?;
    }
    let ty = tensor_type(&name, &shape, dtype);
    tracing::debug!(tensor = %name, ?shape, ?ty, "gguf tensor");
    g.add_tensor(&name, &shape, &values, ty)
}

/// Merge the adapter into the model (`merge::for_each_merged`: `W + scaling B A`, NF4
/// dequantized first) and build a GGUF model file with llama.cpp's metadata and
/// tokenizer.
pub fn merged_gguf(model: &Path, adapter: &Path, dtype: GgufDtype) -> Result<GgufFile> {
    let cfg = ModelConfig::from_dir(model)?;
    let mut g = GgufFile::new();
    g.set("general.architecture", Value::Str(arch_name(&cfg).into()));
    g.set("general.type", Value::Str("model".into()));
    g.set("general.name", Value::Str(dir_name(model)));
    for (k, v) in arch_metadata(&cfg) {
        g.set(k, v);
    }
    g.set("general.file_type", Value::U32(dtype.file_type()));
    g.set("general.quantization_version", Value::U32(QUANT_VERSION));
    for (k, v) in vocab::tokenizer_metadata(model, &cfg)? {
        g.set(k, v);
    }
    if let ArchConfig::Llama(c) = &cfg.arch {
        if let Some(f) = llama3_rope_factors(c) {
            g.add_tensor("rope_freqs.weight", &[f.len()], &f, GgmlType::F32)?;
        }
    }
    let summary = merge::for_each_merged(model, adapter, |name, t| add_merged(&mut g, &cfg, name, t, dtype))?;
    tracing::info!(merged = summary.merged, tensors = g.tensors().len(), "merged adapter for gguf");
    Ok(g)
}

/// Merge the adapter in `adapter` into the model in `model` and write one GGUF file.
pub fn merge_to_gguf(model: &Path, adapter: &Path, out: &Path, dtype: GgufDtype) -> Result<()> {
    let g = merged_gguf(model, adapter, dtype)?;
    g.write(out)?;
    tracing::info!(model = %model.display(), adapter = %adapter.display(), out = %out.display(), ?dtype, "wrote merged gguf model");
    Ok(())
}

/// Tokenizer metadata (`tokenizer.ggml.*`) from a Hugging Face `tokenizer.json`, as
/// llama.cpp's converter writes it.
pub mod vocab {
    use std::path::Path;

    use serde_json::Value as Json;

    use super::Value;
    use crate::model::config::ModelConfig;
    use crate::{EngineError, Result};

    /// gguf-py's `TokenType`.
    pub const NORMAL: i32 = 1;
    pub const CONTROL: i32 = 3;
    pub const USER_DEFINED: i32 = 4;
    pub const UNUSED: i32 = 5;
    pub const BYTE: i32 = 6;

    fn read_json(path: &Path) -> Result<Json> {
        let text = std::fs::read_to_string(path).map_err(|e| EngineError::file(path, format!("cannot read (the gguf tokenizer metadata needs it): {e}")))?;
        serde_json::from_str(&text).map_err(|e| EngineError::file(path, format!("invalid json: {e}")))
    }

    /// An added token of tokenizer.json: `(id, content, special)`.
    fn added_tokens(tok: &Json) -> Vec<(usize, String, bool)> {
        let list = tok.get("added_tokens").and_then(Json::as_array).cloned().unwrap_or_default();
        list.iter()
            .filter_map(|t| {
                let id = t.get("id")?.as_u64()? as usize;
                let content = t.get("content")?.as_str()?.to_string();
                Some((id, content, t.get("special").and_then(Json::as_bool).unwrap_or(false)))
            })
            .collect()
    }

    /// The converter's guess for added tokens not flagged special (`<|...|>` and alike).
    fn looks_special(t: &str) -> bool {
        ["<pad>", "<mask>", "<2mass>", "[@BOS@]"].contains(&t)
            || (t.starts_with("<|") && t.ends_with("|>"))
            || (t.starts_with("<\u{ff5c}") && t.ends_with("\u{ff5c}>"))
            || (t.starts_with("<unused") && t.ends_with('>'))
    }

    /// Tokens by id, padded to the model's vocab size with `[PAD<i>]` (as the converter
    /// pads), `None` where an id has no token.
    fn tokens_by_id(file: &Path, tok: &Json, vocab_size: usize) -> Result<Vec<Option<String>>> {
        let vocab = tok
            .pointer("/model/vocab")
            .and_then(Json::as_object)
            .ok_or_else(|| EngineError::file(file, "model.vocab is not an object (only BPE tokenizers are exported)"))?;
        let mut out = vec![None; vocab_size];
        let entries = vocab.iter().filter_map(|(t, id)| Some((id.as_u64()? as usize, t.clone())));
        for (id, t) in entries.chain(added_tokens(tok).into_iter().map(|(id, t, _)| (id, t))) {
            let slot = out.get_mut(id).ok_or_else(|| {
                EngineError::file(file, format!("token {t:?} has id {id}, past the model's vocab_size {vocab_size}"))
            })?;
            *slot = Some(t);
        }
        Ok(out)
    }

    /// BPE merges as `"a b"` strings (tokenizer.json has either form).
    fn merges(tok: &Json) -> Vec<String> {
        let list = tok.pointer("/model/merges").and_then(Json::as_array).cloned().unwrap_or_default();
        list.iter()
            .filter_map(|m| match m {
                Json::String(s) => Some(s.clone()),
                Json::Array(p) if p.len() == 2 => Some(format!("{} {}", p[0].as_str()?, p[1].as_str()?)),
                _ => None,
            })
            .collect()
    }

    /// llama.cpp's pre-tokenizer name. The converter identifies it by hashing the token
    /// ids of a test string; here a plain byte-level pre-tokenizer (GPT-2's regex) is
    /// `gpt-2`, anything else `default` with a warning.
    fn pre_tokenizer(tok: &Json) -> &'static str {
        let pre = tok.get("pre_tokenizer").cloned().unwrap_or(Json::Null);
        let byte_level = pre.get("type").and_then(Json::as_str) == Some("ByteLevel");
        if byte_level && pre.get("use_regex").and_then(Json::as_bool).unwrap_or(true) {
            return "gpt-2";
        }
        tracing::warn!("tokenizer.json's pre_tokenizer is not plain ByteLevel: tokenizer.ggml.pre is written as \"default\"; llama.cpp may split text differently");
        "default"
    }

    /// A special token named in tokenizer_config.json (`"<s>"` or `{"content": "<s>"}`).
    fn config_token(tc: &Json, key: &str) -> Option<String> {
        match tc.get(key)? {
            Json::String(s) => Some(s.clone()),
            o => o.get("content")?.as_str().map(str::to_string),
        }
    }

    /// Whether the tokenizer puts a BOS token first: tokenizer_config.json's
    /// `add_bos_token`, else a TemplateProcessing post-processor that starts with a
    /// special token.
    fn adds_bos(tok: &Json, tc: &Json) -> bool {
        if let Some(b) = tc.get("add_bos_token").and_then(Json::as_bool) {
            return b;
        }
        let post = tok.get("post_processor").cloned().unwrap_or(Json::Null);
        post.get("type").and_then(Json::as_str) == Some("TemplateProcessing")
            && post.pointer("/single/0/SpecialToken").is_some()
    }

    /// bos/eos/unk/padding ids: tokenizer_config.json's tokens first, then config.json's
    /// ids (gguf-py's SpecialVocab order).
    fn special_ids(tokens: &[Option<String>], tok: &Json, tc: &Json, cfg: &ModelConfig) -> Vec<(String, Value)> {
        let find = |t: Option<String>| t.and_then(|t| tokens.iter().position(|x| x.as_deref() == Some(t.as_str())));
        let unk = tok.pointer("/model/unk_token").and_then(Json::as_str).map(str::to_string);
        let ids = [
            ("bos", find(config_token(tc, "bos_token")).or(cfg.bos_token_id.map(|x| x as usize))),
            ("eos", find(config_token(tc, "eos_token")).or(cfg.eos_token_ids.first().map(|x| *x as usize))),
            ("unknown", find(config_token(tc, "unk_token")).or(find(unk))),
            ("padding", find(config_token(tc, "pad_token")).or(cfg.pad_token_id.map(|x| x as usize))),
        ];
        ids.into_iter()
            .filter_map(|(k, id)| Some((format!("tokenizer.ggml.{k}_token_id"), Value::U32(id? as u32))))
            .collect()
    }

    /// Token types and texts of a byte-level BPE vocabulary (the converter's `gpt2`
    /// path): added tokens are CONTROL when special (or looking special), else
    /// USER_DEFINED; ids without a token are `[PAD<i>]`, UNUSED.
    fn gpt2_tokens(tokens: &[Option<String>], tok: &Json) -> (Vec<String>, Vec<i32>) {
        let added = added_tokens(tok);
        tokens
            .iter()
            .enumerate()
            .map(|(i, t)| match (t, added.iter().find(|(id, ..)| *id == i)) {
                (None, _) => (format!("[PAD{i}]"), UNUSED),
                (Some(t), Some((_, _, special))) if *special || looks_special(t) => (t.clone(), CONTROL),
                (Some(t), Some(_)) => (t.replace('\u{2581}', " "), USER_DEFINED),
                (Some(t), None) => (t.clone(), NORMAL),
            })
            .unzip()
    }

    /// Token types of a SentencePiece-style BPE vocabulary (byte fallback; the
    /// converter's `llama` path from tokenizer.json): `<0xNN>` are BYTE, special added
    /// tokens CONTROL, the rest NORMAL.
    fn llama_tokens(tokens: &[Option<String>], tok: &Json) -> (Vec<String>, Vec<i32>) {
        let special: Vec<usize> = added_tokens(tok).into_iter().filter(|t| t.2).map(|t| t.0).collect();
        let is_byte = |t: &str| t.len() == 6 && t.starts_with("<0x") && t.ends_with('>') && t[3..5].chars().all(|c| c.is_ascii_hexdigit());
        tokens
            .iter()
            .enumerate()
            .map(|(i, t)| match t {
                None => (format!("[PAD{i}]"), UNUSED),
                Some(t) if special.contains(&i) => (t.clone(), CONTROL),
                Some(t) if is_byte(t) => (t.clone(), BYTE),
                Some(t) => (t.clone(), NORMAL),
            })
            .unzip()
    }

    /// The `tokenizer.*` metadata for the model in `dir`: `gpt2` (byte-level BPE: tokens,
    /// types, merges, pre-tokenizer) or `llama` (BPE with byte fallback, SentencePiece
    /// style: tokens, scores, types), special ids, add_bos_token, chat template.
    pub fn tokenizer_metadata(dir: &Path, cfg: &ModelConfig) -> Result<Vec<(String, Value)>> {
        let file = dir.join("tokenizer.json");
        let tok = read_json(&file)?;
        let tc_path = dir.join("tokenizer_config.json");
        let tc = if tc_path.is_file() { read_json(&tc_path)? } else { Json::Null };
        let model_type = tok.pointer("/model/type").and_then(Json::as_str).unwrap_or("");
        if model_type != "BPE" {
            return Err(EngineError::file(&file, format!("model.type {model_type:?}: only BPE tokenizers can be written to gguf")));
        }
        let tokens = tokens_by_id(&file, &tok, cfg.vocab_size())?;
        let byte_fallback = tok.pointer("/model/byte_fallback").and_then(Json::as_bool).unwrap_or(false);
        let mut kv = Vec::new();
        if byte_fallback {
            let (texts, types) = llama_tokens(&tokens, &tok);
            kv.push(("tokenizer.ggml.model".to_string(), Value::Str("llama".into())));
            kv.push(("tokenizer.ggml.pre".to_string(), Value::Str("default".into())));
            kv.push(("tokenizer.ggml.scores".to_string(), Value::F32Array(vec![-1000.0; texts.len()])));
            kv.push(("tokenizer.ggml.tokens".to_string(), Value::StrArray(texts)));
            kv.push(("tokenizer.ggml.token_type".to_string(), Value::I32Array(types)));
        } else {
            let (texts, types) = gpt2_tokens(&tokens, &tok);
            kv.push(("tokenizer.ggml.model".to_string(), Value::Str("gpt2".into())));
            kv.push(("tokenizer.ggml.pre".to_string(), Value::Str(pre_tokenizer(&tok).into())));
            kv.push(("tokenizer.ggml.tokens".to_string(), Value::StrArray(texts)));
            kv.push(("tokenizer.ggml.token_type".to_string(), Value::I32Array(types)));
            kv.push(("tokenizer.ggml.merges".to_string(), Value::StrArray(merges(&tok))));
        }
        kv.extend(special_ids(&tokens, &tok, &tc, cfg));
        kv.push(("tokenizer.ggml.add_bos_token".to_string(), Value::Bool(adds_bos(&tok, &tc))));
        if let Some(t) = tc.get("chat_template").and_then(Json::as_str) {
            kv.push(("tokenizer.chat_template".to_string(), Value::Str(t.to_string())));
        }
        Ok(kv)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(json: &str) -> ModelConfig {
        ModelConfig::from_value(&serde_json::from_str(json).unwrap(), Path::new("config.json")).unwrap()
    }

    fn llama() -> ModelConfig {
        cfg(r#"{"model_type":"llama","vocab_size":32,"hidden_size":8,"intermediate_size":16,"num_hidden_layers":2,"num_attention_heads":2,"num_key_value_heads":1}"#)
    }

    fn falcon40b() -> ModelConfig {
        cfg(r#"{"model_type":"falcon","vocab_size":32,"hidden_size":8,"num_hidden_layers":2,"num_attention_heads":4,"num_kv_heads":2,"new_decoder_architecture":true}"#)
    }

    #[test]
    fn header_metadata_and_alignment() {
        let mut g = GgufFile::new();
        g.set("general.architecture", Value::Str("llama".into()));
        g.set("a.u", Value::U32(7));
        g.set("a.u", Value::U32(9));
        g.set("a.list", Value::StrArray(vec!["x".into(), "yz".into()]));
        g.add_tensor("t.weight", &[2, 3], &[1., 2., 3., 4., 5., 6.], GgmlType::F32).unwrap();
        g.add_tensor("u.bias", &[1], &[0.5], GgmlType::F32).unwrap();
        let b = g.to_bytes();
        assert_eq!(&b[..4], b"GGUF");
        assert_eq!(u32::from_le_bytes(b[4..8].try_into().unwrap()), 3);
        assert_eq!(u64::from_le_bytes(b[8..16].try_into().unwrap()), 2, "tensor count");
        assert_eq!(u64::from_le_bytes(b[16..24].try_into().unwrap()), 3, "kv count (a.u replaced, not added)");
        // first key: u64 length + bytes, then the value type (8 = string)
        assert_eq!(u64::from_le_bytes(b[24..32].try_into().unwrap()), 20);
        assert_eq!(&b[32..52], b"general.architecture");
        assert_eq!(u32::from_le_bytes(b[52..56].try_into().unwrap()), 8);
        let head = g.head_bytes();
        assert_eq!(head.len() % ALIGNMENT, 0);
        // t.weight's info: dims reversed (ggml order [3, 2]), type 0, offset 0
        let at = head.windows(8).position(|w| w == b"t.weight").unwrap() + 8;
        let u64_at = |i: usize| u64::from_le_bytes(head[i..i + 8].try_into().unwrap());
        assert_eq!(u32::from_le_bytes(head[at..at + 4].try_into().unwrap()), 2);
        assert_eq!((u64_at(at + 4), u64_at(at + 12)), (3, 2));
        assert_eq!(u64_at(at + 24), 0);
        // u.bias starts at the next aligned offset after 24 bytes of data
        let at = head.windows(6).position(|w| w == b"u.bias").unwrap() + 6;
        assert_eq!(u64_at(at + 4 + 8 + 4), 32);
        assert_eq!(b.len(), head.len() + 64);
        assert_eq!(f32::from_le_bytes(b[head.len() + 32..head.len() + 36].try_into().unwrap()), 0.5);
        assert!(g.add_tensor("t.weight", &[1], &[0.0], GgmlType::F32).is_err(), "duplicate name");
        assert!(g.add_tensor("v.weight", &[2, 2], &[0.0], GgmlType::F32).is_err(), "wrong value count");
    }

    #[test]
    fn q8_0_round_trip_within_its_bound() {
        let values: Vec<f32> = (0..256).map(|i| (i as f32 * 0.37).sin() * (1.0 + i as f32 / 50.0)).collect();
        let bytes = encode(&values, GgmlType::Q8_0).unwrap();
        assert_eq!(bytes.len(), 8 * 34);
        let back = decode_q8_0(&bytes);
        for (blk, (x, y)) in values.chunks(32).zip(back.chunks(32)).enumerate() {
            let amax = x.iter().fold(0f32, |m, v| m.max(v.abs()));
            let bound = amax / 127.0 * 0.5 + amax * 2f32.powi(-11) * 1.01;
            for (a, b) in x.iter().zip(y) {
                assert!((a - b).abs() <= bound, "block {blk}: {a} -> {b} (bound {bound})");
            }
        }
        // halves round away from zero, the scale is max|x| / 127, zeros stay zero
        let mut block = vec![0f32; 32];
        block[0] = 127.0;
        block[1] = 2.5;
        block[2] = -2.5;
        let b = encode(&block, GgmlType::Q8_0).unwrap();
        assert_eq!(half::f16::from_le_bytes([b[0], b[1]]).to_f32(), 1.0);
        assert_eq!((b[2] as i8, b[3] as i8, b[4] as i8, b[5] as i8), (127, 3, -3, 0));
        assert_eq!(decode_q8_0(&encode(&[0.0; 32], GgmlType::Q8_0).unwrap()), vec![0.0; 32]);
        assert!(encode(&[1.0; 33], GgmlType::Q8_0).is_err());
    }

    #[test]
    fn bf16_rounds_to_nearest_even_like_ggml() {
        assert_eq!(bf16_bits(1.0), 0x3f80);
        assert_eq!(bf16_bits(f32::from_bits(0x3f80_8000)), 0x3f80, "tie to even (down)");
        assert_eq!(bf16_bits(f32::from_bits(0x3f81_8000)), 0x3f82, "tie to even (up)");
        assert_eq!(bf16_bits(f32::from_bits(0x7f80_0001)) & 0x7fc0, 0x7fc0, "nan made quiet");
    }

    #[test]
    fn tensor_types_follow_the_converter() {
        assert_eq!(tensor_type("blk.0.attn_norm.weight", &[64], GgufDtype::Q8_0), GgmlType::F32);
        assert_eq!(tensor_type("output_norm.weight", &[2, 64], GgufDtype::F16), GgmlType::F32);
        assert_eq!(tensor_type("blk.0.attn_q.bias", &[64, 2], GgufDtype::F16), GgmlType::F32);
        assert_eq!(tensor_type("blk.0.ffn_down.weight", &[64, 176], GgufDtype::Q8_0), GgmlType::F16);
        assert_eq!(tensor_type("blk.0.ffn_up.weight", &[176, 64], GgufDtype::Q8_0), GgmlType::Q8_0);
        assert_eq!(tensor_type("blk.0.attn_q.weight.lora_b", &[64, 8], GgufDtype::Q8_0), GgmlType::F16);
        assert_eq!(tensor_type("blk.0.attn_q.weight.lora_a", &[8, 64], GgufDtype::Bf16), GgmlType::Bf16);
    }

    #[test]
    fn llama_names_and_rope_permutation() {
        let c = llama();
        let m = |n: &str| map_tensor_name(&c, n).unwrap();
        assert_eq!(m("model.embed_tokens.weight").as_deref(), Some("token_embd.weight"));
        assert_eq!(m("model.norm.weight").as_deref(), Some("output_norm.weight"));
        assert_eq!(m("lm_head.weight").as_deref(), Some("output.weight"));
        assert_eq!(m("model.layers.1.self_attn.q_proj.weight").as_deref(), Some("blk.1.attn_q.weight"));
        assert_eq!(m("model.layers.0.post_attention_layernorm.weight").as_deref(), Some("blk.0.ffn_norm.weight"));
        assert_eq!(m("model.layers.0.mlp.down_proj.weight").as_deref(), Some("blk.0.ffn_down.weight"));
        assert_eq!(m("model.layers.0.self_attn.rotary_emb.inv_freq"), None);
        let e = map_tensor_name(&c, "model.layers.0.self_attn.q_norm.weight").unwrap_err().to_string();
        assert!(e.contains("model.layers.0.self_attn.q_norm.weight") && e.contains("llama"), "{e}");
        // head_dim 4: rows [0 1 2 3] of each head become [0 2 1 3]
        assert_eq!(row_permutation(&c, "blk.0.attn_q.weight").unwrap(), vec![0, 2, 1, 3, 4, 6, 5, 7]);
        assert_eq!(row_permutation(&c, "blk.0.attn_k.weight").unwrap(), vec![0, 2, 1, 3]);
        assert!(row_permutation(&c, "blk.0.attn_v.weight").is_none());
        let qwen = cfg(r#"{"model_type":"qwen2","vocab_size":32,"hidden_size":8,"intermediate_size":16,"num_hidden_layers":1,"num_attention_heads":2}"#);
        assert_eq!(arch_name(&qwen), "qwen2");
        assert!(row_permutation(&qwen, "blk.0.attn_q.weight").is_none(), "qwen2 keeps neox rope rows");
    }

    #[test]
    fn falcon_names_and_qkv_regrouping() {
        let c = falcon40b();
        let m = |n: &str| map_tensor_name(&c, n).unwrap().unwrap();
        assert_eq!(m("transformer.word_embeddings.weight"), "token_embd.weight");
        assert_eq!(m("transformer.ln_f.bias"), "output_norm.bias");
        assert_eq!(m("transformer.h.1.self_attention.query_key_value.weight"), "blk.1.attn_qkv.weight");
        assert_eq!(m("transformer.h.1.self_attention.dense.weight"), "blk.1.attn_output.weight");
        assert_eq!(m("transformer.h.1.mlp.dense_h_to_4h.weight"), "blk.1.ffn_up.weight");
        assert_eq!(m("transformer.h.1.ln_mlp.weight"), "blk.1.attn_norm.weight");
        assert_eq!(m("transformer.h.1.ln_attn.weight"), "blk.1.attn_norm_2.weight");
        // 4 heads in 2 kv groups, head_dim 2: HF rows per group = q q k v (2 rows each)
        let order = row_permutation(&c, "blk.0.attn_qkv.weight").unwrap();
        let q = [0, 1, 2, 3, 8, 9, 10, 11];
        let k = [4, 5, 12, 13];
        let v = [6, 7, 14, 15];
        assert_eq!(order, [&q[..], &k[..], &v[..]].concat());
        // multi-query falcon-7b: one group, already q..., k, v: unchanged
        let mq = cfg(r#"{"model_type":"falcon","vocab_size":32,"hidden_size":8,"num_hidden_layers":1,"num_attention_heads":4,"num_kv_heads":4,"multi_query":true}"#);
        let order = row_permutation(&mq, "blk.0.attn_qkv.weight").unwrap();
        assert_eq!(order, (0..12).collect::<Vec<_>>());
        let e = permute_rows("blk.0.attn_qkv.weight", &[10, 2], &[0.0; 20], &order).unwrap_err().to_string();
        assert!(e.contains("blk.0.attn_qkv.weight"), "{e}");
    }

    #[test]
    fn byte_fallback_tokenizer_is_written_as_llama() {
        let dir = tempfile::tempdir().unwrap();
        let tok = r#"{"added_tokens":[{"id":0,"content":"<s>","special":true}],"model":{"type":"BPE","byte_fallback":true,"vocab":{"<s>":0,"<0x0A>":1,"\u2581a":2},"merges":[]},
            "post_processor":{"type":"TemplateProcessing","single":[{"SpecialToken":{"id":"<s>","type_id":0}},{"Sequence":{"id":"A","type_id":0}}]}}"#;
        std::fs::write(dir.path().join("tokenizer.json"), tok).unwrap();
        let c = cfg(r#"{"model_type":"llama","vocab_size":4,"hidden_size":8,"intermediate_size":16,"num_hidden_layers":1,"num_attention_heads":2,"bos_token_id":0}"#);
        let kv: std::collections::HashMap<_, _> = vocab::tokenizer_metadata(dir.path(), &c).unwrap().into_iter().collect();
        assert_eq!(kv["tokenizer.ggml.model"], Value::Str("llama".into()));
        assert_eq!(kv["tokenizer.ggml.token_type"], Value::I32Array(vec![vocab::CONTROL, vocab::BYTE, vocab::NORMAL, vocab::UNUSED]));
        assert_eq!(kv["tokenizer.ggml.tokens"], Value::StrArray(vec!["<s>".into(), "<0x0A>".into(), "\u{2581}a".into(), "[PAD3]".into()]));
        assert_eq!(kv["tokenizer.ggml.add_bos_token"], Value::Bool(true));
        assert_eq!(kv["tokenizer.ggml.bos_token_id"], Value::U32(0));
        let small = cfg(r#"{"model_type":"llama","vocab_size":2,"hidden_size":8,"intermediate_size":16,"num_hidden_layers":1,"num_attention_heads":2}"#);
        let e = vocab::tokenizer_metadata(dir.path(), &small).unwrap_err().to_string();
        assert!(e.contains("tokenizer.json") && e.contains("vocab_size 2"), "{e}");
    }
}

//! Random checkpoints of the exact shape of real 7B models (`lorafleet bench make-model`),
//! to measure quantization, loading and training at full scale without downloading
//! anything.
//!
//! The files are what the Hugging Face hub serves: `config.json` with the real model's
//! values, bf16 safetensors shards (`model-0000i-of-0000n.safetensors`, a few GB each)
//! with `model.safetensors.index.json`, and a `tokenizer.json` (the demo's bilingual BPE,
//! vocab 1024, whose ids all lie inside the model's vocabulary; good enough to train on).
//!
//! Shards are written tensor by tensor in chunks of [`CHUNK`] values: the header is
//! computed first (every shape is known), then the values are drawn and written, so
//! memory stays at one chunk whatever the model's size. Values: a SplitMix64 stream per
//! tensor (seeded from the model seed and the tensor's index), each 64-bit draw giving
//! one value, the sum of its four 16-bit uniforms centred and scaled to std `init_std`
//! (Irwin-Hall, approximately normal, bounded at 3.46 std); norm weights are 1, biases 0.
//! The same seed gives the same bytes.

use std::io::Write;
use std::path::{Path, PathBuf};

use crate::demo::DEMO_TOKENIZER_JSON;
use crate::{EngineError, Result};

/// Values drawn and written per chunk.
pub const CHUNK: usize = 1 << 20;

/// The architecture and dimensions of a synthetic checkpoint.
#[derive(Debug, Clone, PartialEq)]
pub enum SynthShape {
    /// Falcon (old decoder architecture: one LayerNorm per block, parallel attention,
    /// multi-query), as `tiiuae/falcon-7b`.
    Falcon { vocab: usize, hidden: usize, heads: usize, layers: usize, max_positions: usize },
    /// Llama (RMSNorm, SwiGLU, untied output head), as `meta-llama/Llama-2-7b-hf`.
    Llama { vocab: usize, hidden: usize, intermediate: usize, heads: usize, kv_heads: usize, layers: usize, max_positions: usize },
}

/// The shape names `make-model --shape` takes.
pub const SHAPE_NAMES: &[&str] = &["falcon-7b", "llama-2-7b"];

impl SynthShape {
    /// `tiiuae/falcon-7b`: hidden 4544, 71 heads of 64, multi-query, 32 layers, vocab
    /// 65024, output head tied to the embedding (transformers' FalconConfig defaults,
    /// which are falcon-7b's).
    pub fn falcon_7b() -> Self {
        Self::Falcon { vocab: 65024, hidden: 4544, heads: 71, layers: 32, max_positions: 2048 }
    }

    /// `meta-llama/Llama-2-7b-hf`: hidden 4096, intermediate 11008, 32 heads (no GQA), 32
    /// layers, vocab 32000, untied head.
    pub fn llama_2_7b() -> Self {
        Self::Llama { vocab: 32000, hidden: 4096, intermediate: 11008, heads: 32, kv_heads: 32, layers: 32, max_positions: 4096 }
    }

    pub fn by_name(name: &str) -> Result<Self> {
        match name {
            "falcon-7b" => Ok(Self::falcon_7b()),
            "llama-2-7b" => Ok(Self::llama_2_7b()),
            other => Err(EngineError::Config(format!("--shape: unknown model shape {other:?} (known: {})", SHAPE_NAMES.join(", ")))),
        }
    }

    fn check(&self) -> Result<()> {
        let (hidden, heads, kv) = match self {
            Self::Falcon { hidden, heads, .. } => (*hidden, *heads, 1),
            Self::Llama { hidden, heads, kv_heads, .. } => (*hidden, *heads, *kv_heads),
        };
        if heads == 0 || kv == 0 || !hidden.is_multiple_of(heads) || !heads.is_multiple_of(kv) || !(hidden / heads).is_multiple_of(2) {
            return Err(EngineError::Config(format!(
                "synthetic model: hidden {hidden} must divide by heads {heads} into an even head size, heads by kv heads {kv}"
            )));
        }
        Ok(())
    }

    /// The model's `config.json`.
    pub fn config_json(&self, init_std: f64) -> serde_json::Value {
        match *self {
            Self::Falcon { vocab, hidden, heads, layers, max_positions } => serde_json::json!({
                "alibi": false,
                "apply_residual_connection_post_layernorm": false,
                "architectures": ["FalconForCausalLM"],
                "attention_dropout": 0.0,
                "bias": false,
                "bos_token_id": 11,
                "eos_token_id": 11,
                "hidden_dropout": 0.0,
                "hidden_size": hidden,
                "initializer_range": init_std,
                "layer_norm_epsilon": 1e-5,
                "max_position_embeddings": max_positions,
                "model_type": "falcon",
                "multi_query": true,
                "new_decoder_architecture": false,
                "num_attention_heads": heads,
                "num_hidden_layers": layers,
                "parallel_attn": true,
                "rope_theta": 10000.0,
                "tie_word_embeddings": true,
                "torch_dtype": "bfloat16",
                "vocab_size": vocab,
            }),
            Self::Llama { vocab, hidden, intermediate, heads, kv_heads, layers, max_positions } => serde_json::json!({
                "architectures": ["LlamaForCausalLM"],
                "attention_bias": false,
                "bos_token_id": 1,
                "eos_token_id": 2,
                "hidden_act": "silu",
                "hidden_size": hidden,
                "initializer_range": init_std,
                "intermediate_size": intermediate,
                "max_position_embeddings": max_positions,
                "model_type": "llama",
                "num_attention_heads": heads,
                "num_hidden_layers": layers,
                "num_key_value_heads": kv_heads,
                "pretraining_tp": 1,
                "rms_norm_eps": 1e-5,
                "rope_scaling": null,
                "rope_theta": 10000.0,
                "tie_word_embeddings": false,
                "torch_dtype": "bfloat16",
                "vocab_size": vocab,
            }),
        }
    }

    /// Every tensor in checkpoint order: name, shape, how it is filled.
    pub fn tensors(&self) -> Vec<(String, Vec<usize>, Fill)> {
        let mut t = Vec::new();
        match *self {
            Self::Falcon { vocab, hidden: h, heads, layers, .. } => {
                let hd = h / heads;
                t.push(("transformer.word_embeddings.weight".to_string(), vec![vocab, h], Fill::Normal));
                for l in 0..layers {
                    let p = format!("transformer.h.{l}");
                    t.push((format!("{p}.input_layernorm.weight"), vec![h], Fill::Ones));
                    t.push((format!("{p}.input_layernorm.bias"), vec![h], Fill::Zeros));
                    t.push((format!("{p}.self_attention.query_key_value.weight"), vec![h + 2 * hd, h], Fill::Normal));
                    t.push((format!("{p}.self_attention.dense.weight"), vec![h, h], Fill::Normal));
                    t.push((format!("{p}.mlp.dense_h_to_4h.weight"), vec![4 * h, h], Fill::Normal));
                    t.push((format!("{p}.mlp.dense_4h_to_h.weight"), vec![h, 4 * h], Fill::Normal));
                }
                t.push(("transformer.ln_f.weight".to_string(), vec![h], Fill::Ones));
                t.push(("transformer.ln_f.bias".to_string(), vec![h], Fill::Zeros));
            }
            Self::Llama { vocab, hidden: h, intermediate: i, heads, kv_heads, layers, .. } => {
                let kv = h / heads * kv_heads;
                t.push(("model.embed_tokens.weight".to_string(), vec![vocab, h], Fill::Normal));
                for l in 0..layers {
                    let p = format!("model.layers.{l}");
                    for (name, shape) in crate::demo::llama_linears(h, kv, i) {
                        t.push((format!("{p}.{name}.weight"), shape, Fill::Normal));
                    }
                    t.push((format!("{p}.input_layernorm.weight"), vec![h], Fill::Ones));
                    t.push((format!("{p}.post_attention_layernorm.weight"), vec![h], Fill::Ones));
                }
                t.push(("model.norm.weight".to_string(), vec![h], Fill::Ones));
                t.push(("lm_head.weight".to_string(), vec![vocab, h], Fill::Normal));
            }
        }
        t
    }

    /// Parameters stored in the checkpoint.
    pub fn num_params(&self) -> u64 {
        self.tensors().iter().map(|(_, s, _)| s.iter().product::<usize>() as u64).sum()
    }
}

/// How a tensor's values are drawn.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fill {
    Normal,
    Ones,
    Zeros,
}

#[derive(Debug, Clone, PartialEq)]
pub struct SynthOptions {
    pub seed: u64,
    pub init_std: f32,
    /// A shard is closed once it holds at least this many bytes (HF uses 2-10 GB).
    pub shard_bytes: u64,
}

impl Default for SynthOptions {
    fn default() -> Self {
        Self { seed: 0, init_std: 0.02, shard_bytes: 4 << 30 }
    }
}

/// What [`write_model`] wrote.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct SynthReport {
    pub dir: PathBuf,
    pub params: u64,
    pub bytes: u64,
    pub shards: Vec<String>,
}

fn splitmix64(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// f32 -> bf16 bits, round to nearest even (NaN stays NaN).
pub fn bf16_bits(x: f32) -> u16 {
    let b = x.to_bits();
    if x.is_nan() {
        return ((b >> 16) | 0x40) as u16;
    }
    ((b + 0x7FFF + ((b >> 16) & 1)) >> 16) as u16
}

/// Fill `out` with the bf16 little-endian bytes of the next `out.len() / 2` values of a
/// tensor's stream.
fn fill_chunk(fill: Fill, state: &mut u64, std: f32, out: &mut [u8]) {
    // Sum of four U(0, 1) (16 bits each): mean 2, variance 1/3.
    let scale = std * 3f32.sqrt() / 65536.0;
    for pair in out.chunks_exact_mut(2) {
        let v = match fill {
            Fill::Ones => 1.0,
            Fill::Zeros => 0.0,
            Fill::Normal => {
                let r = splitmix64(state);
                let s = (r & 0xFFFF) + ((r >> 16) & 0xFFFF) + ((r >> 32) & 0xFFFF) + (r >> 48);
                (s as f32 - 2.0 * 65535.0) * scale
            }
        };
        pair.copy_from_slice(&bf16_bits(v).to_le_bytes());
    }
}

/// One shard's header: the JSON (padded with spaces to a multiple of 8) and the byte
/// size of its data.
fn shard_header(tensors: &[&(String, Vec<usize>, Fill)]) -> Result<(Vec<u8>, u64)> {
    let mut map = serde_json::Map::new();
    map.insert("__metadata__".into(), serde_json::json!({"format": "pt"}));
    let mut off = 0u64;
    for (name, shape, _) in tensors {
        let n = shape.iter().product::<usize>() as u64 * 2;
        map.insert(name.clone(), serde_json::json!({"dtype": "BF16", "shape": shape, "data_offsets": [off, off + n]}));
        off += n;
    }
    let mut json = serde_json::to_vec(&serde_json::Value::Object(map)).map_err(|e| EngineError::Config(format!("shard header: {e}")))?;
    while !json.len().is_multiple_of(8) {
        json.push(b' ');
    }
    Ok((json, off))
}

/// Write a random checkpoint of `shape` into `dir` (module docs).
pub fn write_model(shape: &SynthShape, dir: &Path, opts: &SynthOptions) -> Result<SynthReport> {
    shape.check()?;
    if !(opts.init_std.is_finite() && opts.init_std > 0.0) {
        return Err(EngineError::Config(format!("--init-std: must be a positive number, got {}", opts.init_std)));
    }
    if opts.shard_bytes == 0 {
        return Err(EngineError::Config("--shard-gb: must be positive".into()));
    }
    std::fs::create_dir_all(dir).map_err(|e| EngineError::file(dir, format!("cannot create directory: {e}")))?;
    let tensors = shape.tensors();
    // Group into shards of about `shard_bytes`.
    let mut groups: Vec<Vec<usize>> = vec![vec![]];
    let mut size = 0u64;
    for (i, (_, s, _)) in tensors.iter().enumerate() {
        let n = s.iter().product::<usize>() as u64 * 2;
        if size >= opts.shard_bytes {
            groups.push(vec![]);
            size = 0;
        }
        groups.last_mut().expect("one group").push(i);
        size += n;
    }
    let count = groups.len();
    let mut weight_map = serde_json::Map::new();
    let mut shards = Vec::new();
    let mut total = 0u64;
    let mut buf = vec![0u8; CHUNK * 2];
    for (si, group) in groups.iter().enumerate() {
        let name = format!("model-{:05}-of-{:05}.safetensors", si + 1, count);
        let path = dir.join(&name);
        let tmp = dir.join(format!("{name}.tmp"));
        let err = |e: std::io::Error| EngineError::file(&tmp, format!("cannot write: {e}"));
        let members: Vec<&(String, Vec<usize>, Fill)> = group.iter().map(|&i| &tensors[i]).collect();
        let (header, data_len) = shard_header(&members)?;
        let mut f = std::io::BufWriter::with_capacity(4 << 20, std::fs::File::create(&tmp).map_err(err)?);
        f.write_all(&(header.len() as u64).to_le_bytes()).map_err(err)?;
        f.write_all(&header).map_err(err)?;
        for &i in group {
            let (tname, tshape, fill) = &tensors[i];
            let mut state = opts.seed ^ (i as u64 + 1).wrapping_mul(0xD1B5_4A32_D192_ED03);
            let mut left: usize = tshape.iter().product();
            while left > 0 {
                let n = left.min(CHUNK);
                fill_chunk(*fill, &mut state, opts.init_std, &mut buf[..n * 2]);
                f.write_all(&buf[..n * 2]).map_err(err)?;
                left -= n;
            }
            weight_map.insert(tname.clone(), serde_json::Value::String(name.clone()));
        }
        f.flush().map_err(err)?;
        drop(f);
        std::fs::rename(&tmp, &path).map_err(|e| EngineError::file(&path, format!("cannot write: {e}")))?;
        total += data_len;
        tracing::info!(shard = %name, bytes = data_len, tensors = group.len(), "wrote shard");
        shards.push(name);
    }
    let write = |name: &str, bytes: &[u8]| -> Result<()> {
        let p = dir.join(name);
        std::fs::write(&p, bytes).map_err(|e| EngineError::file(&p, format!("cannot write: {e}")))
    };
    let index = serde_json::json!({"metadata": {"total_size": total}, "weight_map": weight_map});
    write("model.safetensors.index.json", serde_json::to_string_pretty(&index).expect("json").as_bytes())?;
    write("config.json", serde_json::to_string_pretty(&shape.config_json(opts.init_std as f64)).expect("json").as_bytes())?;
    write("tokenizer.json", DEMO_TOKENIZER_JSON)?;
    Ok(SynthReport { dir: dir.to_path_buf(), params: shape.num_params(), bytes: total, shards })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{load_model, LoadOptions, Quant};

    fn tiny_falcon() -> SynthShape {
        SynthShape::Falcon { vocab: 1024, hidden: 64, heads: 4, layers: 2, max_positions: 128 }
    }

    #[test]
    fn the_7b_shapes_have_their_parameter_counts() {
        // falcon-7b: 6.92 B parameters (tied head); Llama-2-7b: 6.74 B.
        assert_eq!(SynthShape::falcon_7b().num_params(), 6_921_720_704);
        assert_eq!(SynthShape::llama_2_7b().num_params(), 6_738_415_616);
        assert!(SynthShape::by_name("gpt-5").unwrap_err().to_string().contains("falcon-7b, llama-2-7b"));
    }

    #[test]
    fn writes_a_loadable_sharded_deterministic_checkpoint() {
        let a = tempfile::tempdir().unwrap();
        let b = tempfile::tempdir().unwrap();
        let opts = SynthOptions { seed: 7, init_std: 0.02, shard_bytes: 100_000 };
        let r = write_model(&tiny_falcon(), a.path(), &opts).unwrap();
        write_model(&tiny_falcon(), b.path(), &opts).unwrap();
        assert!(r.shards.len() > 1, "{:?}", r.shards);
        for s in &r.shards {
            assert_eq!(std::fs::read(a.path().join(s)).unwrap(), std::fs::read(b.path().join(s)).unwrap());
        }
        let w = crate::model::weights::Weights::open(a.path()).unwrap();
        let (shape, v) = w.f32_values("transformer.h.1.mlp.dense_h_to_4h.weight").unwrap();
        assert_eq!(shape, vec![256, 64]);
        let mean = v.iter().sum::<f32>() / v.len() as f32;
        let std = (v.iter().map(|x| (x - mean) * (x - mean)).sum::<f32>() / v.len() as f32).sqrt();
        assert!(mean.abs() < 1e-3 && (std - 0.02).abs() < 1e-3, "{mean} {std}");
        let (_, ln) = w.f32_values("transformer.h.0.input_layernorm.weight").unwrap();
        assert!(ln.iter().all(|&x| x == 1.0));
        for quant in [Quant::None, Quant::Nf4 { double_quant: true }] {
            let m = load_model(a.path(), &LoadOptions { quant, ..Default::default() }).unwrap();
            assert_eq!(m.info().num_layers, 2);
            assert_eq!(m.info().eos_token_ids, vec![11]);
        }
    }

    #[test]
    fn bf16_rounding() {
        assert_eq!(bf16_bits(1.0), 0x3F80);
        assert_eq!(bf16_bits(-2.0), 0xC000);
        // 1 + 2^-8 is halfway between two bf16 values: to even (1.0).
        assert_eq!(bf16_bits(f32::from_bits(0x3F80_8000)), 0x3F80);
        assert_eq!(bf16_bits(f32::from_bits(0x3F81_8000)), 0x3F82);
    }
}

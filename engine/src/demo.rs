//! Deterministic random Llama models written as Hugging Face directories: the demo
//! base model (`lorafleet demo-model`, with the project's bilingual BPE tokenizer) and
//! the benchmark model. Nothing is downloaded: weights are drawn from ChaCha8 with a
//! seed (normal, std `init_std`; norm weights 1), so the same seed gives the same bytes.

use std::collections::HashMap;
use std::path::Path;

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use crate::{EngineError, Result};

/// The bilingual (Chinese/English) byte-level BPE tokenizer, vocab 1024, eos/pad id 0.
pub const DEMO_TOKENIZER_JSON: &[u8] = include_bytes!("../../tests/fixtures/hf/tokenizer/tokenizer.json");

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RandomLlama {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_layers: usize,
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub max_position_embeddings: usize,
    pub init_std: f64,
    pub seed: u64,
    /// Write the demo tokenizer (vocab must then be 1024).
    pub with_tokenizer: bool,
}

impl RandomLlama {
    /// The demo model: 4 layers, hidden 128, 4 heads, the bilingual tokenizer.
    pub fn demo() -> Self {
        Self {
            vocab_size: 1024,
            hidden_size: 128,
            intermediate_size: 352,
            num_layers: 4,
            num_heads: 4,
            num_kv_heads: 4,
            max_position_embeddings: 512,
            init_std: 0.15,
            seed: 20240601,
            with_tokenizer: true,
        }
    }

    /// The training-throughput benchmark model (same shapes as the PyTorch anchor).
    pub fn bench() -> Self {
        Self {
            vocab_size: 32000,
            hidden_size: 512,
            intermediate_size: 1408,
            num_layers: 4,
            num_heads: 8,
            num_kv_heads: 8,
            max_position_embeddings: 1024,
            init_std: 0.02,
            seed: 0,
            with_tokenizer: false,
        }
    }

    pub fn config_json(&self) -> serde_json::Value {
        serde_json::json!({
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_kv_heads,
            "head_dim": self.hidden_size / self.num_heads,
            "hidden_act": "silu",
            "max_position_embeddings": self.max_position_embeddings,
            "rms_norm_eps": 1e-5,
            "rope_parameters": {"rope_theta": 10000.0, "rope_type": "default"},
            "tie_word_embeddings": false,
            "attention_bias": false,
            "mlp_bias": false,
            "bos_token_id": 0,
            "eos_token_id": 0,
            "pad_token_id": 0,
            "initializer_range": self.init_std,
            "dtype": "float32",
        })
    }

    /// Write `config.json`, `generation_config.json`, `model.safetensors` (f32) and,
    /// for the demo, `tokenizer.json` into `dir`.
    pub fn write(&self, dir: &Path) -> Result<()> {
        if !self.hidden_size.is_multiple_of(self.num_heads) || !self.num_heads.is_multiple_of(self.num_kv_heads) {
            return Err(EngineError::Config("random llama: hidden_size must divide by heads, heads by kv heads".into()));
        }
        std::fs::create_dir_all(dir).map_err(|e| EngineError::file(dir, format!("cannot create directory: {e}")))?;
        let mut rng = ChaCha8Rng::seed_from_u64(self.seed);
        let (h, i, v) = (self.hidden_size, self.intermediate_size, self.vocab_size);
        let hd = h / self.num_heads;
        let kv = hd * self.num_kv_heads;
        let mut tensors: Vec<(String, Vec<usize>, Vec<f32>)> = Vec::new();
        let std = self.init_std as f32;
        let mut normal = |shape: Vec<usize>| -> (Vec<usize>, Vec<f32>) {
            let n: usize = shape.iter().product();
            (shape, normal_vec(&mut rng, n, std))
        };
        let (s, d) = normal(vec![v, h]);
        tensors.push(("model.embed_tokens.weight".into(), s, d));
        for l in 0..self.num_layers {
            let p = format!("model.layers.{l}");
            for (name, shape) in llama_linears(h, kv, i) {
                let (s, d) = normal(shape);
                tensors.push((format!("{p}.{name}.weight"), s, d));
            }
            tensors.push((format!("{p}.input_layernorm.weight"), vec![h], vec![1.0; h]));
            tensors.push((format!("{p}.post_attention_layernorm.weight"), vec![h], vec![1.0; h]));
        }
        tensors.push(("model.norm.weight".into(), vec![h], vec![1.0; h]));
        let (s, d) = normal(vec![v, h]);
        tensors.push(("lm_head.weight".into(), s, d));

        let raw: Vec<(String, Vec<usize>, Vec<u8>)> =
            tensors.into_iter().map(|(k, s, d)| (k, s, d.iter().flat_map(|x| x.to_le_bytes()).collect())).collect();
        let mut views = Vec::new();
        for (k, s, b) in &raw {
            let view = safetensors::tensor::TensorView::new(safetensors::Dtype::F32, s.clone(), b)
                .map_err(|e| EngineError::Config(format!("random llama tensor {k}: {e}")))?;
            views.push((k.clone(), view));
        }
        let meta = HashMap::from([("format".to_string(), "pt".to_string())]);
        let mp = dir.join("model.safetensors");
        safetensors::serialize_to_file(views, Some(meta), &mp).map_err(|e| EngineError::file(&mp, format!("cannot write weights: {e}")))?;
        let write = |name: &str, bytes: &[u8]| -> Result<()> {
            let p = dir.join(name);
            std::fs::write(&p, bytes).map_err(|e| EngineError::file(&p, format!("cannot write: {e}")))
        };
        write("config.json", serde_json::to_string_pretty(&self.config_json()).expect("json").as_bytes())?;
        let gen = serde_json::json!({"bos_token_id": 0, "eos_token_id": 0, "pad_token_id": 0});
        write("generation_config.json", serde_json::to_string_pretty(&gen).expect("json").as_bytes())?;
        if self.with_tokenizer {
            write("tokenizer.json", DEMO_TOKENIZER_JSON)?;
        }
        Ok(())
    }
}

/// A Llama block's linear layers (under `model.layers.N.`) and their `[out, in]` shapes,
/// for hidden size `h`, K/V width `kv` and intermediate size `i`.
pub fn llama_linears(h: usize, kv: usize, i: usize) -> [(&'static str, Vec<usize>); 7] {
    [
        ("self_attn.q_proj", vec![h, h]),
        ("self_attn.k_proj", vec![kv, h]),
        ("self_attn.v_proj", vec![kv, h]),
        ("self_attn.o_proj", vec![h, h]),
        ("mlp.gate_proj", vec![i, h]),
        ("mlp.up_proj", vec![i, h]),
        ("mlp.down_proj", vec![h, i]),
    ]
}

/// `n` draws of N(0, std) (Box-Muller on ChaCha8 uniforms).
pub fn normal_vec(rng: &mut ChaCha8Rng, n: usize, std: f32) -> Vec<f32> {
    let mut out = Vec::with_capacity(n + 1);
    while out.len() < n {
        let u1: f64 = rng.gen::<f64>().max(f64::MIN_POSITIVE);
        let u2: f64 = rng.gen();
        let r = (-2.0 * u1.ln()).sqrt();
        let t = 2.0 * std::f64::consts::PI * u2;
        out.push((r * t.cos()) as f32 * std);
        out.push((r * t.sin()) as f32 * std);
    }
    out.truncate(n);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn demo_model_is_deterministic() {
        let a = tempfile::tempdir().unwrap();
        let b = tempfile::tempdir().unwrap();
        let mut m = RandomLlama::demo();
        m.num_layers = 1;
        m.write(a.path()).unwrap();
        m.write(b.path()).unwrap();
        let wa = std::fs::read(a.path().join("model.safetensors")).unwrap();
        let wb = std::fs::read(b.path().join("model.safetensors")).unwrap();
        assert_eq!(wa, wb);
        assert!(a.path().join("tokenizer.json").is_file());
        let cfg: serde_json::Value = serde_json::from_slice(&std::fs::read(a.path().join("config.json")).unwrap()).unwrap();
        assert_eq!(cfg["hidden_size"], 128);
        let mut rng = ChaCha8Rng::seed_from_u64(1);
        let v = normal_vec(&mut rng, 20000, 0.15);
        let mean = v.iter().sum::<f32>() / v.len() as f32;
        let var = v.iter().map(|x| (x - mean) * (x - mean)).sum::<f32>() / v.len() as f32;
        assert!(mean.abs() < 0.01 && (var.sqrt() - 0.15).abs() < 0.005, "{mean} {var}");
    }
}

//! Llama family (llama, mistral, qwen2): RMSNorm, GQA attention with rotary
//! embeddings, SwiGLU MLP.

use std::sync::Arc;

use candle_core::Tensor;

use super::config::LlamaConfig;
use super::loader::Builder;
use super::transformer::{attend, split_heads, Block, BlockEnv, Kv, Norm, Transformer};
use crate::lora::{ForwardCtx, LoraLinear};
use crate::fused;
use crate::Result;

pub struct LlamaBlock {
    num_heads: usize,
    num_kv_heads: usize,
    head_dim: usize,
    eps: f64,
    input_layernorm: Tensor,
    post_attention_layernorm: Tensor,
    q_proj: LoraLinear,
    k_proj: LoraLinear,
    v_proj: LoraLinear,
    o_proj: LoraLinear,
    gate_proj: LoraLinear,
    up_proj: LoraLinear,
    down_proj: LoraLinear,
}

impl Block for LlamaBlock {
    fn forward(&self, x: &Tensor, env: &BlockEnv, ctx: &ForwardCtx, kv: Kv<'_>) -> Result<Tensor> {
        let h = fused::rms_norm_fused(x, &self.input_layernorm, self.eps)?;
        let q = fused::rope_heads(&self.q_proj.forward(&h, ctx)?, Some(self.num_heads), &env.cos, &env.sin)?;
        let k = fused::rope_heads(&self.k_proj.forward(&h, ctx)?, Some(self.num_kv_heads), &env.cos, &env.sin)?;
        let v = split_heads(&self.v_proj.forward(&h, ctx)?, self.num_kv_heads, self.head_dim)?;
        let a = attend(&q, k, v, env, kv)?;
        let x = (x + self.o_proj.forward(&a, ctx)?)?;
        let h = fused::rms_norm_fused(&x, &self.post_attention_layernorm, self.eps)?;
        let g = self.gate_proj.forward(&h, ctx)?;
        let u = self.up_proj.forward(&h, ctx)?;
        let m = self.down_proj.forward(&fused::swiglu(&g, &u)?, ctx)?;
        Ok((x + m)?)
    }

    fn linears(&self) -> Vec<&LoraLinear> {
        vec![&self.q_proj, &self.k_proj, &self.v_proj, &self.o_proj, &self.gate_proj, &self.up_proj, &self.down_proj]
    }
}

/// Build a Llama-family model from its weights.
pub fn build(cfg: &LlamaConfig, mut b: Builder) -> Result<Transformer> {
    let (hs, hd, nh, nkv, inter) = (cfg.hidden_size, cfg.head_dim, cfg.num_heads, cfg.num_kv_heads, cfg.intermediate_size);
    let embed = b.embedding("model.embed_tokens.weight", &[cfg.vocab_size, hs])?;
    let mut blocks: Vec<Arc<dyn Block>> = Vec::with_capacity(cfg.num_layers);
    for i in 0..cfg.num_layers {
        let p = format!("model.layers.{i}");
        let blk = LlamaBlock {
            num_heads: nh,
            num_kv_heads: nkv,
            head_dim: hd,
            eps: cfg.rms_norm_eps,
            input_layernorm: b.dense(&format!("{p}.input_layernorm.weight"), &[hs])?,
            post_attention_layernorm: b.dense(&format!("{p}.post_attention_layernorm.weight"), &[hs])?,
            q_proj: b.linear(&format!("{p}.self_attn.q_proj"), nh * hd, hs, cfg.qkv_bias)?,
            k_proj: b.linear(&format!("{p}.self_attn.k_proj"), nkv * hd, hs, cfg.qkv_bias)?,
            v_proj: b.linear(&format!("{p}.self_attn.v_proj"), nkv * hd, hs, cfg.qkv_bias)?,
            o_proj: b.linear(&format!("{p}.self_attn.o_proj"), hs, nh * hd, cfg.o_bias)?,
            gate_proj: b.linear(&format!("{p}.mlp.gate_proj"), inter, hs, cfg.mlp_bias)?,
            up_proj: b.linear(&format!("{p}.mlp.up_proj"), inter, hs, cfg.mlp_bias)?,
            down_proj: b.linear(&format!("{p}.mlp.down_proj"), hs, inter, cfg.mlp_bias)?,
        };
        blocks.push(Arc::new(blk));
    }
    let norm = Norm::Rms { w: b.dense("model.norm.weight", &[hs])?, eps: cfg.rms_norm_eps };
    let lm_head = b.head("lm_head.weight", &embed, cfg.tie_word_embeddings, cfg.vocab_size, hs)?;
    let inv_freq = cfg.rope.inv_freq(hd);
    b.finish(embed, blocks, norm, lm_head, inv_freq, cfg.sliding_window)
}

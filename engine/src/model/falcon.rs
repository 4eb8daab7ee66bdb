//! Falcon: fused query_key_value, rotary embeddings, LayerNorm, GELU (erf) MLP.
//! falcon-7b style (multi-query, parallel attention, one LayerNorm), falcon-40b style
//! (`new_decoder_architecture`: grouped KV heads, qkv grouped per KV head, `ln_attn` and
//! `ln_mlp`), and the classic multi-head layout (`[q, k, v]` per head).

use std::sync::Arc;

use candle_core::Tensor;

use super::config::FalconConfig;
use super::loader::Builder;
use super::transformer::{attend, Block, BlockEnv, Kv, Norm, Transformer};
use crate::lora::{ForwardCtx, LoraLinear};
use crate::ops;
use crate::Result;

struct Ln {
    w: Tensor,
    b: Tensor,
}

pub struct FalconBlock {
    num_heads: usize,
    num_kv_heads: usize,
    head_dim: usize,
    eps: f64,
    new_arch: bool,
    multi_query: bool,
    parallel_attn: bool,
    /// `input_layernorm`, or `ln_attn` in the two-LayerNorm layout.
    ln_attn: Ln,
    /// `ln_mlp` (two LayerNorms) or `post_attention_layernorm` (sequential blocks).
    ln_second: Option<Ln>,
    query_key_value: LoraLinear,
    dense: LoraLinear,
    dense_h_to_4h: LoraLinear,
    dense_4h_to_h: LoraLinear,
}

/// Split the fused projection `[b, s, out]` into `q [b, nh, s, d]` and `k`, `v`
/// `[b, nkv, s, d]` following the checkpoint layout.
pub fn split_fused_qkv(
    fused: &Tensor,
    num_heads: usize,
    num_kv_heads: usize,
    head_dim: usize,
    new_arch: bool,
    multi_query: bool,
) -> Result<(Tensor, Tensor, Tensor)> {
    let (b, s, _) = fused.dims3()?;
    let (q, k, v) = if new_arch {
        let g = num_heads / num_kv_heads;
        let x = fused.reshape((b, s, num_kv_heads, g + 2, head_dim))?;
        (
            x.narrow(3, 0, g)?.reshape((b, s, num_heads, head_dim))?,
            x.narrow(3, g, 1)?.reshape((b, s, num_kv_heads, head_dim))?,
            x.narrow(3, g + 1, 1)?.reshape((b, s, num_kv_heads, head_dim))?,
        )
    } else if multi_query {
        let x = fused.reshape((b, s, num_heads + 2, head_dim))?;
        (x.narrow(2, 0, num_heads)?, x.narrow(2, num_heads, 1)?, x.narrow(2, num_heads + 1, 1)?)
    } else {
        let x = fused.reshape((b, s, num_heads, 3, head_dim))?;
        (
            x.narrow(3, 0, 1)?.squeeze(3)?,
            x.narrow(3, 1, 1)?.squeeze(3)?,
            x.narrow(3, 2, 1)?.squeeze(3)?,
        )
    };
    let t = |x: Tensor| -> Result<Tensor> { Ok(x.transpose(1, 2)?.contiguous()?) };
    Ok((t(q)?, t(k)?, t(v)?))
}

impl Block for FalconBlock {
    fn forward(&self, x: &Tensor, env: &BlockEnv, ctx: &ForwardCtx, kv: Kv<'_>) -> Result<Tensor> {
        let ln = |l: &Ln, t: &Tensor| ops::layer_norm(t, &l.w, &l.b, self.eps);
        let attn_in = ln(&self.ln_attn, x)?;
        let fused = self.query_key_value.forward(&attn_in, ctx)?;
        let (q, k, v) =
            split_fused_qkv(&fused, self.num_heads, self.num_kv_heads, self.head_dim, self.new_arch, self.multi_query)?;
        let q = crate::fused::rope_heads(&q, None, &env.cos, &env.sin)?;
        let k = crate::fused::rope_heads(&k, None, &env.cos, &env.sin)?;
        let a = attend(&q, k, v, env, kv)?;
        let attn_out = self.dense.forward(&a, ctx)?;
        let mlp = |t: &Tensor| -> Result<Tensor> {
            let h = ops::gelu_erf(&self.dense_h_to_4h.forward(t, ctx)?)?;
            self.dense_4h_to_h.forward(&h, ctx)
        };
        if self.new_arch || self.parallel_attn {
            let mlp_in = match &self.ln_second {
                Some(l) if self.new_arch => ln(l, x)?,
                _ => attn_in,
            };
            Ok(((mlp(&mlp_in)? + attn_out)? + x)?)
        } else {
            let residual = (x + attn_out)?;
            let mlp_in = match &self.ln_second {
                Some(l) => ln(l, &residual)?,
                None => residual.clone(),
            };
            Ok((mlp(&mlp_in)? + residual)?)
        }
    }

    fn linears(&self) -> Vec<&LoraLinear> {
        vec![&self.query_key_value, &self.dense, &self.dense_h_to_4h, &self.dense_4h_to_h]
    }
}

/// Build a Falcon model from its weights.
pub fn build(cfg: &FalconConfig, mut b: Builder) -> Result<Transformer> {
    let (hs, hd, nh, nkv) = (cfg.hidden_size, cfg.head_dim, cfg.num_heads, cfg.num_kv_heads);
    let qkv_out = cfg.qkv_out();
    let embed = b.embedding("transformer.word_embeddings.weight", &[cfg.vocab_size, hs])?;
    let mut blocks: Vec<Arc<dyn Block>> = Vec::with_capacity(cfg.num_layers);
    for i in 0..cfg.num_layers {
        let p = format!("transformer.h.{i}");
        let mut ln = |name: &str| -> Result<Ln> {
            Ok(Ln { w: b.dense(&format!("{p}.{name}.weight"), &[hs])?, b: b.dense(&format!("{p}.{name}.bias"), &[hs])? })
        };
        let (ln_attn, ln_second) = if cfg.two_layernorms {
            (ln("ln_attn")?, Some(ln("ln_mlp")?))
        } else if !cfg.parallel_attn {
            (ln("input_layernorm")?, Some(ln("post_attention_layernorm")?))
        } else {
            (ln("input_layernorm")?, None)
        };
        let blk = FalconBlock {
            num_heads: nh,
            num_kv_heads: nkv,
            head_dim: hd,
            eps: cfg.layer_norm_epsilon,
            new_arch: cfg.new_decoder_architecture,
            multi_query: cfg.multi_query,
            parallel_attn: cfg.parallel_attn,
            ln_attn,
            ln_second,
            query_key_value: b.linear(&format!("{p}.self_attention.query_key_value"), qkv_out, hs, cfg.bias)?,
            dense: b.linear(&format!("{p}.self_attention.dense"), hs, nh * hd, cfg.bias)?,
            dense_h_to_4h: b.linear(&format!("{p}.mlp.dense_h_to_4h"), cfg.ffn_hidden_size, hs, cfg.bias)?,
            dense_4h_to_h: b.linear(&format!("{p}.mlp.dense_4h_to_h"), hs, cfg.ffn_hidden_size, cfg.bias)?,
        };
        blocks.push(Arc::new(blk));
    }
    let norm = Norm::Layer {
        w: b.dense("transformer.ln_f.weight", &[hs])?,
        b: b.dense("transformer.ln_f.bias", &[hs])?,
        eps: cfg.layer_norm_epsilon,
    };
    let lm_head = b.head("lm_head.weight", &embed, cfg.tie_word_embeddings, cfg.vocab_size, hs)?;
    let inv_freq = cfg.rope.inv_freq(hd);
    b.finish(embed, blocks, norm, lm_head, inv_freq, None)
}

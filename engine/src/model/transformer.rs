//! The architecture-independent decoder stack: embedding, blocks (with optional
//! gradient checkpointing), final norm, output head, masks, rotary tables, attention,
//! and the [`CausalLm`] implementation shared by Llama and Falcon.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use candle_core::{DType, Device, Tensor, Var, D};

use super::{CausalLm, ForwardInput, KvCache, ModelInfo};
use crate::lora::{ForwardCtx, LoraLinear};
use crate::multi_lora::{PackedSeq, RowAdapters};
use crate::fused;
use crate::ops::{self, CheckpointHook, FrozenLinear};
use crate::{EngineError, Result};

/// Per-pass inputs every block needs.
#[derive(Clone)]
pub struct BlockEnv {
    /// `[b, s, head_dim]` in the compute dtype.
    pub cos: Tensor,
    pub sin: Tensor,
    /// Who attends to whom.
    pub attn: AttnLayout,
}

/// The attention pattern of a pass.
#[derive(Clone)]
pub enum AttnLayout {
    /// Every row of the batch attends through one additive f32 mask `[b or 1, 1, s, t]`.
    Masked(Tensor),
    /// One row packing several sequences end to end (batched serving): each segment
    /// attends to its own cache and its own earlier tokens only.
    Packed(Arc<[PackedSegment]>),
}

/// One sequence's tokens within a packed row.
#[derive(Clone)]
pub struct PackedSegment {
    /// First token of the segment in the packed row.
    pub start: usize,
    pub len: usize,
    /// Additive f32 mask `[1, 1, len, past + len]` over the segment's cache and itself.
    pub mask: Tensor,
}

/// `(k, v)` of one layer, `[batch, kv_heads, seq, head_dim]`.
pub type LayerCache = Option<(Tensor, Tensor)>;

/// Where a block's attention keeps keys and values.
pub enum Kv<'a> {
    /// Nothing kept (training, evaluation).
    None,
    /// The cache of the pass's batch ([`AttnLayout::Masked`]).
    One(&'a mut LayerCache),
    /// One cache per segment of an [`AttnLayout::Packed`] pass, in segment order.
    Packed(Vec<&'a mut LayerCache>),
}

/// Attention of a block's rotated queries and keys (`q [b, h, s, d]`, `k`/`v`
/// `[b, kvh, s, d]`) under the pass's layout, appending the new keys and values to the
/// cache(s) it is given. Returns `[b, s, h * d]`.
pub fn attend(q: &Tensor, k: Tensor, v: Tensor, env: &BlockEnv, kv: Kv<'_>) -> Result<Tensor> {
    match (&env.attn, kv) {
        (AttnLayout::Masked(mask), Kv::None) => attention(q, &k, &v, mask),
        (AttnLayout::Masked(mask), Kv::One(slot)) => {
            let (k, v) = update_cache(Some(slot), k, v)?;
            attention(q, &k, &v, mask)
        }
        (AttnLayout::Packed(segs), Kv::Packed(slots)) if segs.len() == slots.len() => {
            let mut outs = Vec::with_capacity(segs.len());
            for (seg, slot) in segs.iter().zip(slots) {
                let part = |t: &Tensor| -> Result<Tensor> { Ok(t.narrow(2, seg.start, seg.len)?.contiguous()?) };
                let (k, v) = update_cache(Some(slot), part(&k)?, part(&v)?)?;
                outs.push(attention(&part(q)?, &k, &v, &seg.mask)?);
            }
            Ok(Tensor::cat(&outs, 1)?)
        }
        _ => Err(EngineError::Config("attention: the pass's caches do not match its layout".into())),
    }
}

/// One decoder block.
pub trait Block: Send + Sync {
    fn forward(&self, x: &Tensor, env: &BlockEnv, ctx: &ForwardCtx, kv: Kv<'_>) -> Result<Tensor>;
    /// The block's linear layers (for LoRA parameters).
    fn linears(&self) -> Vec<&LoraLinear>;
}

/// Final normalization.
pub enum Norm {
    Rms { w: Tensor, eps: f64 },
    Layer { w: Tensor, b: Tensor, eps: f64 },
}

impl Norm {
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        Ok(match self {
            Norm::Rms { w, eps } => fused::rms_norm_fused(x, w, *eps)?,
            Norm::Layer { w, b, eps } => ops::layer_norm(x, w, b, *eps)?,
        })
    }
}

pub fn to_candle(e: EngineError) -> candle_core::Error {
    match e {
        EngineError::Candle(c) => c,
        other => candle_core::Error::Msg(other.to_string()),
    }
}

/// Repeat K/V heads `[b, kvh, t, d] -> [b, kvh * n_rep, t, d]` (each head `n_rep` times,
/// consecutively, like transformers' `repeat_kv`).
pub fn repeat_kv(x: &Tensor, n_rep: usize) -> Result<Tensor> {
    if n_rep == 1 {
        return Ok(x.clone());
    }
    let (b, h, t, d) = x.dims4()?;
    Ok(x.unsqueeze(2)?.broadcast_as((b, h, n_rep, t, d))?.reshape((b, h * n_rep, t, d))?)
}

/// Scaled dot-product attention with an additive mask, softmax in f32.
/// `q [b, h, s, d]`, `k`/`v` `[b, kvh, t, d]` -> `[b, s, h * d]`.
pub fn attention(q: &Tensor, k: &Tensor, v: &Tensor, mask: &Tensor) -> Result<Tensor> {
    if fused::attention_fusable(q) {
        return Ok(fused::attention_fused(q, k, v, mask)?);
    }
    attention_composite(q, k, v, mask)
}

/// [`attention`] from separate candle ops (any device and dtype; the reference the fused
/// op is tested against).
pub fn attention_composite(q: &Tensor, k: &Tensor, v: &Tensor, mask: &Tensor) -> Result<Tensor> {
    let (b, h, s, d) = q.dims4()?;
    let kvh = k.dim(1)?;
    let k = repeat_kv(&k.contiguous()?, h / kvh)?;
    let v = repeat_kv(&v.contiguous()?, h / kvh)?;
    let scale = 1.0 / (d as f64).sqrt();
    let scores = (q.contiguous()?.matmul(&k.t()?)? * scale)?;
    let wd = ops::wide(q.dtype());
    let scores = scores.to_dtype(wd)?.broadcast_add(&mask.to_dtype(wd)?)?;
    let p = ops::softmax_last(&scores)?.to_dtype(q.dtype())?;
    let o = p.matmul(&v)?;
    Ok(o.transpose(1, 2)?.contiguous()?.reshape((b, s, h * d))?)
}

/// Additive causal mask for `s` new queries after `past` cached positions, with optional
/// packing segments (`segments[b][i]`) and a sliding window.
pub fn causal_mask(
    batch: usize,
    s: usize,
    past: usize,
    segments: Option<&[Vec<u32>]>,
    window: Option<usize>,
    device: &Device,
) -> Result<Tensor> {
    let t = past + s;
    let rows = if segments.is_some() { batch } else { 1 };
    let mut m = vec![0f32; rows * s * t];
    for r in 0..rows {
        for i in 0..s {
            let qi = past + i;
            for j in 0..t {
                let mut ok = j <= qi;
                if let Some(w) = window {
                    ok &= qi - j.min(qi) < w;
                }
                if let Some(seg) = segments {
                    ok &= j >= past && seg[r][j - past] == seg[r][i];
                }
                if !ok {
                    m[(r * s + i) * t + j] = f32::NEG_INFINITY;
                }
            }
        }
    }
    Ok(Tensor::from_vec(m, (rows, 1, s, t), device)?)
}

/// cos/sin tables `[b, s, head_dim]` for the given positions.
pub fn rope_tables(inv_freq: &[f32], positions: &[Vec<u32>], dtype: DType, device: &Device) -> Result<(Tensor, Tensor)> {
    let b = positions.len();
    let s = positions.first().map(|p| p.len()).unwrap_or(0);
    let half = inv_freq.len();
    let d = 2 * half;
    let mut cos = vec![0f32; b * s * d];
    let mut sin = vec![0f32; b * s * d];
    for (bi, row) in positions.iter().enumerate() {
        for (si, &p) in row.iter().enumerate() {
            let base = (bi * s + si) * d;
            for (i, &f) in inv_freq.iter().enumerate() {
                let a = p as f32 * f;
                let (sn, cs) = a.sin_cos();
                cos[base + i] = cs;
                cos[base + half + i] = cs;
                sin[base + i] = sn;
                sin[base + half + i] = sn;
            }
        }
    }
    let cos = Tensor::from_vec(cos, (b, s, d), device)?.to_dtype(dtype)?;
    let sin = Tensor::from_vec(sin, (b, s, d), device)?.to_dtype(dtype)?;
    Ok((cos, sin))
}

/// The shared decoder-only model.
pub struct Transformer {
    pub info: ModelInfo,
    pub embed: Tensor,
    pub blocks: Vec<Arc<dyn Block>>,
    pub final_norm: Norm,
    pub lm_head: FrozenLinear,
    pub inv_freq: Vec<f32>,
    pub sliding_window: Option<usize>,
    /// The activations' dtype (`model::activation_dtype`).
    pub dtype: DType,
    pub device: Device,
    lora: BTreeMap<String, Var>,
    training: AtomicBool,
    checkpointing: AtomicBool,
    dropout_seed: AtomicU64,
    pass: AtomicU64,
    side_grads: Arc<Mutex<BTreeMap<String, Tensor>>>,
    anchor: Var,
}

impl Transformer {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        info: ModelInfo,
        embed: Tensor,
        blocks: Vec<Arc<dyn Block>>,
        final_norm: Norm,
        lm_head: FrozenLinear,
        inv_freq: Vec<f32>,
        sliding_window: Option<usize>,
        dtype: DType,
        device: Device,
        lora: BTreeMap<String, Var>,
    ) -> Result<Self> {
        let anchor = Var::zeros(1, DType::F32, &device)?;
        Ok(Self {
            info,
            embed,
            blocks,
            final_norm,
            lm_head,
            inv_freq,
            sliding_window,
            dtype,
            device,
            lora,
            training: AtomicBool::new(false),
            checkpointing: AtomicBool::new(false),
            dropout_seed: AtomicU64::new(0),
            pass: AtomicU64::new(0),
            side_grads: Arc::new(Mutex::new(BTreeMap::new())),
            anchor,
        })
    }

    fn embed_ids(&self, ids: &Tensor) -> Result<Tensor> {
        let (b, s) = ids.dims2()?;
        let flat = ids.flatten_all()?.to_dtype(DType::U32)?;
        let max = flat.max(0)?.to_scalar::<u32>().unwrap_or(0) as usize;
        if b * s > 0 && max >= self.info.vocab_size {
            return Err(EngineError::Data(format!("token id {max} is outside the vocabulary ({})", self.info.vocab_size)));
        }
        Ok(self.embed.index_select(&flat, 0)?.reshape((b, s, self.embed.dim(1)?))?.to_dtype(self.dtype)?)
    }

    /// Run one block, checkpointed when asked (and a graph is being built), except the
    /// last one (as `torch.utils.checkpoint.checkpoint_sequential` leaves its last
    /// segment): the backward pass starts by recomputing it, so keeping its activations
    /// saves a forward pass of a block for the memory that recomputation would take at
    /// the same moment anyway (only the logits' phase overlaps them).
    fn run_block(&self, block: &Arc<dyn Block>, x: &Tensor, env: &BlockEnv, ctx: &ForwardCtx, last: bool) -> Result<Tensor> {
        if last || !(ctx.track && self.checkpointing.load(Ordering::Relaxed)) {
            return block.forward(x, env, ctx, Kv::None);
        }
        let detached = ForwardCtx { track: false, ..ctx.clone() };
        let out = block.forward(&x.detach(), env, &detached, Kv::None)?;
        let (blk, env2, ctx2, side) = (block.clone(), env.clone(), ctx.clone(), self.side_grads.clone());
        let recompute = move |input: &Tensor, grad_out: &Tensor| -> candle_core::Result<Tensor> {
            // The first block's input (from the frozen embeddings) needs no gradient:
            // left untracked, the block's backward skips every product for it.
            let v = if input.track_op() { Some(Var::from_tensor(&input.detach())?) } else { None };
            let x = v.as_ref().map_or_else(|| input.detach(), |v| v.as_tensor().clone());
            let y = blk.forward(&x, &env2, &ctx2, Kv::None).map_err(to_candle)?;
            let s = if crate::ops::cpu_ops(y.device()) {
                y.apply_op1(crate::ops::GradSeed { grad: std::sync::Mutex::new(Some(grad_out.clone())) })?
            } else {
                (y.to_dtype(DType::F32)? * grad_out.to_dtype(DType::F32)?)?.sum_all()?
            };
            let grads = s.backward()?;
            let mut side = side.lock().map_err(|_| candle_core::Error::Msg("gradient store poisoned".into()))?;
            for l in blk.linears() {
                if let Some(a) = &l.lora {
                    for (key, var) in [(&a.key_a, &a.a), (&a.key_b, &a.b)] {
                        if let Some(g) = grads.get(var.as_tensor()) {
                            let total = match side.remove(key) {
                                Some(prev) => (prev + g)?,
                                None => g.clone(),
                            };
                            side.insert(key.clone(), total);
                        }
                    }
                }
            }
            match v.as_ref().and_then(|v| grads.get(v.as_tensor())) {
                Some(g) => Ok(g.clone()),
                None => input.zeros_like(),
            }
        };
        if crate::ops::cpu_ops(x.device()) {
            let op = crate::ops::CheckpointOut { out: std::sync::Mutex::new(Some(out)), recompute: Arc::new(recompute) };
            return Ok(x.apply_op2_arc(self.anchor.as_tensor(), Arc::new(Box::new(op)))?);
        }
        let hook = CheckpointHook { recompute: Arc::new(recompute) };
        let h = x.apply_op2_arc(self.anchor.as_tensor(), Arc::new(Box::new(hook)))?;
        Ok((out + h)?)
    }

    fn positions(&self, input: &ForwardInput, b: usize, s: usize, past: usize) -> Result<Vec<Vec<u32>>> {
        match &input.position_ids {
            Some(p) => {
                if p.dims() != [b, s] {
                    return Err(EngineError::Data(format!("position_ids shape {:?} does not match input_ids [{b}, {s}]", p.dims())));
                }
                Ok(p.to_dtype(DType::U32)?.to_vec2::<u32>()?)
            }
            None => Ok(vec![(past as u32..(past + s) as u32).collect(); b]),
        }
    }
}

impl CausalLm for Transformer {
    fn info(&self) -> &ModelInfo {
        &self.info
    }

    fn hidden_states(&self, input: &ForwardInput) -> Result<Tensor> {
        let (b, s) = input.input_ids.dims2()?;
        let positions = self.positions(input, b, s, 0)?;
        let segments = match &input.segment_ids {
            Some(seg) => {
                if seg.dims() != [b, s] {
                    return Err(EngineError::Data(format!("segment_ids shape {:?} does not match input_ids [{b}, {s}]", seg.dims())));
                }
                Some(seg.to_dtype(DType::U32)?.to_vec2::<u32>()?)
            }
            None => None,
        };
        let (cos, sin) = rope_tables(&self.inv_freq, &positions, self.dtype, &self.device)?;
        let mask = causal_mask(b, s, 0, segments.as_deref(), self.sliding_window, &self.device)?;
        let env = BlockEnv { cos, sin, attn: AttnLayout::Masked(mask) };
        let ctx = ForwardCtx {
            track: true,
            training: self.training.load(Ordering::Relaxed),
            dropout_seed: self.dropout_seed.load(Ordering::Relaxed),
            pass: self.pass.fetch_add(1, Ordering::Relaxed),
            adapters: None,
        };
        let mut x = self.embed_ids(&input.input_ids)?;
        for (i, block) in self.blocks.iter().enumerate() {
            x = self.run_block(block, &x, &env, &ctx, i + 1 == self.blocks.len())?;
        }
        self.final_norm.forward(&x)
    }

    fn logits(&self, hidden: &Tensor) -> Result<Tensor> {
        Ok(self.logits_compute(hidden)?.to_dtype(DType::F32)?)
    }

    fn logits_compute(&self, hidden: &Tensor) -> Result<Tensor> {
        Ok(self.lm_head.forward(hidden)?)
    }

    fn head_loss(&self, hidden: &Tensor, targets: &Tensor) -> Result<Tensor> {
        if crate::ops::cpu_ops(hidden.device()) && matches!(self.lm_head.inner.dtype, DType::F32 | DType::BF16) && hidden.rank() == 2 {
            return crate::eval::head_cross_entropy_sum(&self.lm_head, hidden, targets);
        }
        crate::eval::head_loss_from_logits(self, hidden, targets)
    }

    fn forward_cached(&self, input_ids: &Tensor, cache: &mut KvCache) -> Result<Tensor> {
        let (b, s) = input_ids.dims2()?;
        let past = cache.seq_len;
        if cache.layers.len() != self.blocks.len() {
            cache.layers.resize_with(self.blocks.len(), || None);
        }
        let positions: Vec<Vec<u32>> = vec![(past as u32..(past + s) as u32).collect(); b];
        let (cos, sin) = rope_tables(&self.inv_freq, &positions, self.dtype, &self.device)?;
        let mask = causal_mask(b, s, past, None, self.sliding_window, &self.device)?;
        let env = BlockEnv { cos, sin, attn: AttnLayout::Masked(mask) };
        let ctx = ForwardCtx::inference();
        let mut x = self.embed_ids(input_ids)?;
        for (block, layer) in self.blocks.iter().zip(cache.layers.iter_mut()) {
            x = block.forward(&x, &env, &ctx, Kv::One(layer))?;
        }
        cache.seq_len += s;
        let x = self.final_norm.forward(&x)?;
        let last = x.narrow(1, s - 1, 1)?.squeeze(1)?;
        self.logits(&last)
    }

    fn forward_packed(&self, seqs: &mut [PackedSeq<'_>]) -> Result<Tensor> {
        if seqs.is_empty() || seqs.iter().any(|s| s.tokens.is_empty()) {
            return Err(EngineError::Config("packed pass: every sequence needs at least one new token".into()));
        }
        let mut ids = Vec::new();
        let mut positions = Vec::new();
        let mut segments = Vec::with_capacity(seqs.len());
        let mut rows = RowAdapters::default();
        let mut last = Vec::with_capacity(seqs.len());
        for seq in seqs.iter_mut() {
            if seq.cache.layers.len() != self.blocks.len() {
                seq.cache.layers.resize_with(self.blocks.len(), || None);
            }
            let (past, len) = (seq.cache.seq_len, seq.tokens.len());
            let mask = causal_mask(1, len, past, None, self.sliding_window, &self.device)?;
            segments.push(PackedSegment { start: ids.len(), len, mask });
            ids.extend_from_slice(seq.tokens);
            positions.extend(past as u32..(past + len) as u32);
            rows.push(len, seq.adapter.as_ref());
            last.push((ids.len() - 1) as u32);
        }
        let total = ids.len();
        let (cos, sin) = rope_tables(&self.inv_freq, &[positions], self.dtype, &self.device)?;
        let env = BlockEnv { cos, sin, attn: AttnLayout::Packed(segments.into()) };
        let ctx = ForwardCtx { adapters: Some(Arc::new(rows)), ..ForwardCtx::inference() };
        let mut x = self.embed_ids(&Tensor::from_vec(ids, (1, total), &self.device)?)?;
        for (l, block) in self.blocks.iter().enumerate() {
            let slots: Vec<&mut LayerCache> = seqs.iter_mut().map(|s| &mut s.cache.layers[l]).collect();
            x = block.forward(&x, &env, &ctx, Kv::Packed(slots))?;
        }
        for seq in seqs.iter_mut() {
            seq.cache.seq_len += seq.tokens.len();
        }
        let x = self.final_norm.forward(&x.squeeze(0)?)?;
        let n = last.len();
        let last = x.index_select(&Tensor::from_vec(last, n, &self.device)?, 0)?;
        self.logits(&last)
    }

    fn linear_shapes(&self) -> Vec<(String, usize, usize)> {
        self.blocks.iter().flat_map(|b| b.linears()).map(|l| (l.name.clone(), l.base.out_dim(), l.base.in_dim())).collect()
    }

    fn backward(&self, loss: &Tensor) -> Result<BTreeMap<String, Tensor>> {
        self.side_grads.lock().map_err(|_| EngineError::Config("gradient store poisoned".into()))?.clear();
        let grads = loss.backward()?;
        let mut side = std::mem::take(&mut *self.side_grads.lock().map_err(|_| EngineError::Config("gradient store poisoned".into()))?);
        let mut out = BTreeMap::new();
        for (key, var) in &self.lora {
            let g = match (grads.get(var.as_tensor()), side.remove(key)) {
                (Some(a), Some(b)) => Some((a + b)?),
                (Some(a), None) => Some(a.clone()),
                (None, Some(b)) => Some(b),
                (None, None) => None,
            };
            if let Some(g) = g {
                out.insert(key.clone(), g);
            }
        }
        Ok(out)
    }

    fn lora_params(&self) -> &BTreeMap<String, Var> {
        &self.lora
    }

    fn set_training(&self, training: bool) {
        self.training.store(training, Ordering::Relaxed);
    }

    fn set_dropout_seed(&self, seed: u64) {
        self.dropout_seed.store(seed, Ordering::Relaxed);
        self.pass.store(0, Ordering::Relaxed);
    }

    fn set_gradient_checkpointing(&self, on: bool) {
        self.checkpointing.store(on, Ordering::Relaxed);
    }
}

/// `[b, s, n * d] -> [b, n, s, d]`.
pub fn split_heads(x: &Tensor, n: usize, d: usize) -> Result<Tensor> {
    let (b, s, _) = x.dims3()?;
    Ok(x.reshape((b, s, n, d))?.transpose(1, 2)?.contiguous()?)
}

/// Append new K/V to a layer cache and return the full K/V.
pub fn update_cache(cache: Option<&mut LayerCache>, k: Tensor, v: Tensor) -> Result<(Tensor, Tensor)> {
    match cache {
        None => Ok((k, v)),
        Some(slot) => {
            let (k, v) = match slot.take() {
                Some((pk, pv)) => (Tensor::cat(&[&pk, &k], 2)?, Tensor::cat(&[&pv, &v], 2)?),
                None => (k, v),
            };
            *slot = Some((k.clone(), v.clone()));
            Ok((k, v))
        }
    }
}

/// `x [.., d]` on the last dim.
pub fn last_dim(x: &Tensor) -> Result<usize> {
    Ok(x.dim(D::Minus1)?)
}

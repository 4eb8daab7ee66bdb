//! Single custom ops with hand-written backward passes for the hot chains of a decoder
//! block, used for f32 and bf16 compute on the CPU (bf16 tensors are read into f32 and
//! the results rounded once; the composite candle ops of [`crate::ops`]
//! everywhere else, and as the reference each of these is tested against in
//! `tests/gradcheck.rs`):
//! - [`lora_linear_fused`]: the LoRA layer, its products riding in the frozen product's
//!   register tiles; one backward yields the gradients of x, A and B;
//! - [`attention_fused`]: scaled dot-product attention with an additive mask, per-head
//!   products on the built-in kernels, grouped K/V heads without copies;
//! - [`rope_heads`]: rotary embedding with the head split folded in;
//! - [`rms_norm_fused`]: Llama's RMSNorm (input gradient only: the weight is frozen);
//! - [`swiglu`]: Llama's MLP activation `silu(gate) * up`.
//!
//! The first two need the built-in kernels ([`crate::kernels`], AVX-512 or AVX2) as the
//! backend of [`crate::blas`]; the others run on any.

use std::sync::Arc;

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, DType, Layout, Shape, Storage, Tensor, D};

use crate::kernels::Isa;
use crate::ops::{cpu_f32, cpu_tensor, frozen_bwd, frozen_fwd, rms_norm, rope, to_storage, with_weight_rows, FrozenInner, FrozenLinear};

// The LoRA layer as one op.

/// Whether [`lora_linear_fused`] can run for this input: f32 or bf16 (the base layer's
/// compute dtype) on the CPU with the built-in kernels as the backend (it folds the LoRA
/// products into their tiles).
pub fn lora_fusable(base: &FrozenLinear, x: &Tensor) -> bool {
    crate::ops::cpu_ops(x.device())
        && computes_in_f32(x.dtype())
        && base.inner.dtype == x.dtype()
        && crate::blas::kernel_isa().is_some()
}

/// `y = x W^T (+ b) + s · (dropout(x) A^T) B^T` as one custom op (check [`lora_fusable`]
/// first): the LoRA products ride in the frozen product's register tiles (forward
/// `[x, s·h] [W, B]^T`, input gradient `[g, s·u] [W; A]`, `u = g B`), and the backward
/// returns the gradients of x, A and B in one go. `mask` is the inverted-dropout mask of
/// x's elements (`None`: no dropout).
pub fn lora_linear_fused(base: &FrozenLinear, x: &Tensor, a: &Tensor, b: &Tensor, scaling: f64, mask: Option<Vec<f32>>) -> candle_core::Result<Tensor> {
    let (m, k, _) = rows_of(x.shape(), base.out_dim())?;
    let (r, ka) = a.dims2()?;
    let (n, rb) = b.dims2()?;
    if k != base.in_dim() || ka != k || rb != r || n != base.out_dim() {
        candle_core::bail!("lora linear: x [.., {k}], A [{r}, {ka}], B [{n}, {rb}] do not fit the base [{}, {}]", base.out_dim(), base.in_dim());
    }
    if let Some(mk) = &mask {
        if mk.len() != m * k {
            candle_core::bail!("lora linear: dropout mask has {} values for {} inputs", mk.len(), m * k);
        }
    }
    let Some(isa) = crate::blas::kernel_isa() else { candle_core::bail!("lora linear: the fused op needs the built-in kernels (check lora_fusable)") };
    let op = LoraFused { isa, inner: base.inner.clone(), scaling: scaling as f32, mask, saved_hs: std::sync::Mutex::new(None) };
    // x as it is ([.., k], rows = the leading dims): reshapes around the op would be two
    // more nodes of the graph, and candle's backward pass zero-fills and adds a gradient
    // for every node.
    x.contiguous()?.apply_op3_arc(&a.contiguous()?, &b.contiguous()?, Arc::new(Box::new(op)))
}

/// `(rows, depth)` of an input `[.., depth]` and the shape of its output `[.., n]`.
fn rows_of(shape: &Shape, n: usize) -> candle_core::Result<(usize, usize, Shape)> {
    let dims = shape.dims();
    let Some((&k, lead)) = dims.split_last() else { candle_core::bail!("linear: scalar input") };
    let mut out = lead.to_vec();
    out.push(n);
    Ok((lead.iter().product(), k, Shape::from(out)))
}

struct LoraFused {
    isa: Isa,
    inner: Arc<FrozenInner>,
    scaling: f32,
    mask: Option<Vec<f32>>,
    /// `s · h = s · dropout(x) A^T` `[m, r]` from the forward pass.
    saved_hs: std::sync::Mutex<Option<Vec<f32>>>,
}

/// The dtypes the fused ops take: f32, and bf16 (read into f32, computed in f32 with f32
/// accumulation, the result rounded to bf16 once: what bf16 compute means on a CPU
/// without bf16 arithmetic).
fn computes_in_f32(dt: DType) -> bool {
    matches!(dt, DType::F32 | DType::BF16)
}

/// A gradient computed in f32, as a (CPU) tensor of `of`'s dtype.
fn like(v: Vec<f32>, shape: impl Into<Shape>, of: &Tensor) -> candle_core::Result<Tensor> {
    cpu_tensor(v, shape, of.dtype())
}

fn tensor_f32(t: &Tensor, what: &str) -> candle_core::Result<Vec<f32>> {
    with_f32s(&[t], what, |v| Ok(v[0].to_vec()))
}

/// Run `f` with the data of contiguous CPU tensors as f32: borrowed (no copies) for f32,
/// converted for bf16 and the other float dtypes.
fn with_f32s<R>(ts: &[&Tensor], what: &str, f: impl FnOnce(&[&[f32]]) -> candle_core::Result<R>) -> candle_core::Result<R> {
    let guards: Vec<_> = ts.iter().map(|t| t.storage_and_layout()).collect();
    let mut data = Vec::with_capacity(ts.len());
    for (storage, layout) in &guards {
        match &**storage {
            Storage::Cpu(s) if layout.is_contiguous() => data.push(cpu_f32(s, layout, what)?),
            _ => candle_core::bail!("{what}: contiguous cpu tensors expected"),
        }
    }
    let slices: Vec<&[f32]> = data.iter().map(|d| &d[..]).collect();
    f(&slices)
}

/// `[rows, cols] -> [cols, rows]`, in 16 x 16 blocks (cache-friendly both ways).
fn transpose(v: &[f32], rows: usize, cols: usize) -> Vec<f32> {
    const B: usize = 16;
    let mut t = vec![0f32; v.len()];
    for i0 in (0..rows).step_by(B) {
        for j0 in (0..cols).step_by(B) {
            for i in i0..(i0 + B).min(rows) {
                for j in j0..(j0 + B).min(cols) {
                    t[j * rows + i] = v[i * cols + j];
                }
            }
        }
    }
    t
}

impl LoraFused {
    fn dropped<'a>(&self, x: &'a [f32]) -> std::borrow::Cow<'a, [f32]> {
        match &self.mask {
            Some(mk) => std::borrow::Cow::Owned(x.iter().zip(mk).map(|(a, b)| a * b).collect()),
            None => std::borrow::Cow::Borrowed(x),
        }
    }
}

impl candle_core::CustomOp3 for LoraFused {
    fn name(&self) -> &'static str {
        "lora-linear"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout, s3: &CpuStorage, l3: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let _span = crate::profile::span(crate::profile::Op::LoraFwd);
        use crate::kernels::{linear_fwd_ext, lora_fwd, FwdExtra, LoraBranch, Rows};
        let (r, _) = l2.shape().dims2()?;
        let n = self.inner.out_dim;
        let (m, k, out_shape) = rows_of(l1.shape(), n)?;
        let x = cpu_f32(s1, l1, "lora linear input")?;
        let a = cpu_f32(s2, l2, "lora A")?;
        let b = cpu_f32(s3, l3, "lora B")?;
        let mut hs = vec![0f32; m * r];
        let (mut y, acc) = crate::ops::output_rows(&self.inner, m);
        let bf16_dot = crate::ops::bf16_dot(&self.inner);
        if self.mask.is_none() && !bf16_dot {
            // f32 compute without dropout: x A^T from the frozen product's own blocks of x.
            let branch = LoraBranch { a: &a, b: &b, r, scale: self.scaling };
            with_weight_rows(&self.inner, |w| lora_fwd(self.isa, m, n, k, &x, w, branch, &mut hs, &mut y, acc))?;
        } else {
            let xd = self.dropped(&x);
            linear_fwd_ext(self.isa, m, r, k, &xd, Rows::F32(&a), None, &mut hs, false, true);
            hs.iter_mut().for_each(|v| *v *= self.scaling);
            if bf16_dot {
                // bf16 compute: the frozen product in bf16 dot products, the LoRA branch in
                // f32 (PEFT runs it in the f32 of the LoRA weights).
                frozen_fwd(&self.inner, m, &x, &mut y, acc)?;
                // y += hs B^T with B [n, r] as the right operand: tiles added where they go
                // (as a forward product, each r-deep tile would be stored transposed).
                crate::kernels::matmul_nt(self.isa, m, n, r, &hs, &b, &mut y, true, true);
            } else {
                with_weight_rows(&self.inner, |w| linear_fwd_ext(self.isa, m, n, k, &x, w, Some(FwdExtra { x: &hs, w: &b, r }), &mut y, acc, true))?;
            }
        }
        *self.saved_hs.lock().map_err(|_| candle_core::Error::Msg("lora linear state poisoned".into()))? = Some(hs);
        Ok((to_storage(y, s1.dtype())?, out_shape))
    }

    fn bwd(&self, x: &Tensor, a: &Tensor, b: &Tensor, _res: &Tensor, grad: &Tensor) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let _span = crate::profile::span(crate::profile::Op::LoraBwd);
        let (r, _) = a.dims2()?;
        let n = self.inner.out_dim;
        let (m, k, _) = rows_of(x.shape(), n)?;
        let hs = self.saved_hs.lock().map_err(|_| candle_core::Error::Msg("lora linear state poisoned".into()))?.clone();
        let Some(hs) = hs else { candle_core::bail!("lora linear: backward before forward") };
        let grad = grad.contiguous()?;
        // An input that does not track (the first layer's, computed from the frozen
        // embeddings) needs no gradient: skip its product with the whole weight.
        let need_gx = x.track_op();
        let (gx, da, dbt) = with_f32s(&[x, a, b, &grad], "lora linear backward", |v| self.grads(m, k, r, n, &hs, v[0], v[1], v[2], v[3], need_gx))?;
        Ok((
            gx.map(|gx| like(gx, x.shape(), x)).transpose()?,
            Some(like(da, (r, k), a)?),
            Some(like(transpose(&dbt, r, n), (n, r), b)?),
        ))
    }
}

/// `(grad x [m, k] if it is needed, grad A [r, k], grad B^T [r, n])`.
type LoraGrads = (Option<Vec<f32>>, Vec<f32>, Vec<f32>);

impl LoraFused {
    /// `(grad x [m, k] if need_gx, grad A [r, k], grad B^T [r, n])`.
    #[allow(clippy::too_many_arguments)]
    fn grads(&self, m: usize, k: usize, r: usize, n: usize, hs: &[f32], xv: &[f32], av: &[f32], bv: &[f32], g: &[f32], need_gx: bool) -> candle_core::Result<LoraGrads> {
        use crate::kernels::{linear_bwd_ext, BwdExtra, Rows};
        // u = g B [m, r], scaled.
        let mut us = vec![0f32; m * r];
        linear_bwd_ext(self.isa, m, n, r, g, Rows::F32(bv), None, &mut us, false, true);
        us.iter_mut().for_each(|v| *v *= self.scaling);
        // gx = g W + (s·u) A, the LoRA part through the dropout mask.
        let mut gx = vec![0f32; if need_gx { m * k } else { 0 }];
        match &self.mask {
            _ if !need_gx => {}
            // f32 compute: the LoRA part rides in the frozen product's tiles.
            None if !crate::ops::bf16_dot(&self.inner) => {
                with_weight_rows(&self.inner, |w| linear_bwd_ext(self.isa, m, n, k, g, w, Some(BwdExtra { g: &us, w: av, r }), &mut gx, false, true))?
            }
            // bf16 dot products for the frozen part, the LoRA part in f32 after it.
            None => {
                frozen_bwd(&self.inner, m, g, &mut gx)?;
                linear_bwd_ext(self.isa, m, r, k, &us, Rows::F32(av), None, &mut gx, true, true);
            }
            Some(mk) => {
                frozen_bwd(&self.inner, m, g, &mut gx)?;
                let mut t = vec![0f32; m * k];
                linear_bwd_ext(self.isa, m, r, k, &us, Rows::F32(av), None, &mut t, false, true);
                gx.iter_mut().zip(t.iter().zip(mk)).for_each(|(d, (v, mm))| *d += v * mm);
            }
        }
        // dA = (s·u)^T dropout(x) [r, k]; dB^T = (s·h)^T g [r, n].
        let xd = self.dropped(xv);
        let mut da = vec![0f32; r * k];
        linear_bwd_ext(self.isa, r, m, k, &transpose(&us, m, r), Rows::F32(&xd), None, &mut da, false, true);
        let mut dbt = vec![0f32; r * n];
        linear_bwd_ext(self.isa, r, m, n, &transpose(hs, m, r), Rows::F32(g), None, &mut dbt, false, true);
        Ok((need_gx.then_some(gx), da, dbt))
    }
}

// ---------------------------------------------------------------------------------
// Attention as one op.

/// Whether [`attention_fused`] can run: f32 or bf16 on the CPU with the built-in kernels as the
/// backend.
pub fn attention_fusable(q: &Tensor) -> bool {
    crate::ops::cpu_ops(q.device()) && computes_in_f32(q.dtype()) && crate::blas::kernel_isa().is_some()
}

/// Scaled dot-product attention with an additive mask as one op (check
/// [`attention_fusable`] first): `q [b, h, s, d]`, `k`/`v` `[b, kvh, t, d]` (grouped
/// query heads share K/V heads without copies), `mask [b or 1, 1, s, t]` ->
/// `[b, s, h * d]`. Per head: `S = q k^T / sqrt(d) + mask`, `P = softmax(S)` (kept for
/// the backward pass), `o = P v`; the backward computes `dv = P^T do`, `dP = do v^T`,
/// `dS = P (dP - rowsum(dP P)) / sqrt(d)`, `dq = dS k`, `dk = dS^T q`. Heads run in
/// parallel, each product on the built-in kernels.
///
/// Queries go in blocks of [`QUERY_BLOCK`] rows, each against the keys up to the last one
/// its mask leaves visible to any of its rows: under a causal mask the upper triangle of
/// `S` (half of attention's products and of the kept `P`) is never computed. Masked
/// entries are exactly 0 in `P` either way, so the results are those of the full
/// products.
pub fn attention_fused(q: &Tensor, k: &Tensor, v: &Tensor, mask: &Tensor) -> candle_core::Result<Tensor> {
    let (b, h, s, d) = q.dims4()?;
    let (bk, kvh, t, dk) = k.dims4()?;
    if bk != b || dk != d || v.dims() != k.dims() || kvh == 0 || h % kvh != 0 {
        candle_core::bail!("attention: q {:?}, k {:?}, v {:?} do not fit", q.dims(), k.dims(), v.dims());
    }
    let (mrows, _, ms, mt) = mask.dims4()?;
    if (mrows != 1 && mrows != b) || ms != s || mt != t {
        candle_core::bail!("attention: mask {:?} does not fit q {:?} and k {:?}", mask.dims(), q.dims(), k.dims());
    }
    let mask = tensor_f32(&mask.to_dtype(DType::F32)?.contiguous()?, "attention mask")?;
    let Some(isa) = crate::blas::kernel_isa() else { candle_core::bail!("attention: the fused op needs the built-in kernels (check attention_fusable)") };
    let blocks = query_blocks(&mask, mrows, s, t);
    // Where each head's P starts in the kept probabilities (heads of one batch row share
    // its mask rows' blocks).
    let mut p_at = Vec::with_capacity(b * h + 1);
    p_at.push(0);
    for head in 0..b * h {
        p_at.push(p_at[head] + blocks[if mrows == 1 { 0 } else { head / h }].1);
    }
    let op = AttentionOp { isa, b, h, kvh, s, t, d, mask, blocks, p_at, saved_p: std::sync::Mutex::new(None) };
    q.contiguous()?.apply_op3_arc(&k.contiguous()?, &v.contiguous()?, Arc::new(Box::new(op)))
}

/// Query rows per block of [`attention_fused`] (a multiple of the kernels' tile sides, 12
/// and 32).
pub const QUERY_BLOCK: usize = 96;

/// Probabilities [`attention_fused`] keeps per head for a causal mask over `s` positions
/// (its query blocks against the keys they see: about `s^2 / 2 + 48 s`, not `s^2`).
pub fn causal_probabilities_kept(s: usize) -> usize {
    (0..s).step_by(QUERY_BLOCK).map(|first| QUERY_BLOCK.min(s - first) * (first + QUERY_BLOCK).min(s)).sum()
}

/// One block of query rows: `rows` rows from `first`, against keys `0 .. keys`, its `P`
/// at `p_at` of its head's kept probabilities.
#[derive(Clone, Copy, Debug, PartialEq)]
struct QueryBlock {
    first: usize,
    rows: usize,
    keys: usize,
    p_at: usize,
}

/// The query blocks of each mask row set, with the `P` size of one head.
fn query_blocks(mask: &[f32], mrows: usize, s: usize, t: usize) -> Vec<(Vec<QueryBlock>, usize)> {
    (0..mrows)
        .map(|mr| {
            let (mut blocks, mut size) = (Vec::new(), 0);
            for first in (0..s).step_by(QUERY_BLOCK) {
                let rows = QUERY_BLOCK.min(s - first);
                // 1 + the last key any row of the block may see (0: all masked).
                let keys = (first..first + rows)
                    .map(|i| mask[(mr * s + i) * t..][..t].iter().rposition(|&m| m > f32::NEG_INFINITY).map_or(0, |j| j + 1))
                    .max()
                    .unwrap_or(0);
                blocks.push(QueryBlock { first, rows, keys, p_at: size });
                size += rows * keys;
            }
            (blocks, size)
        })
        .collect()
}

struct AttentionOp {
    isa: Isa,
    b: usize,
    h: usize,
    kvh: usize,
    s: usize,
    t: usize,
    d: usize,
    mask: Vec<f32>,
    /// Per mask row set (1 or b): its query blocks and one head's `P` size.
    blocks: Vec<(Vec<QueryBlock>, usize)>,
    /// Offset of each head's `P` in the kept probabilities, and their total last.
    p_at: Vec<usize>,
    /// Softmax probabilities of every head's query blocks (`[rows, keys]` each) from the
    /// forward pass.
    saved_p: std::sync::Mutex<Option<Vec<f32>>>,
}

/// Where one head's operands are: offsets of its q rows, its K/V head's rows, its mask
/// rows and its kept `P`, and its query blocks.
struct HeadAt<'a> {
    q: usize,
    kv: usize,
    mask: usize,
    p: usize,
    blocks: &'a [QueryBlock],
}

impl AttentionOp {
    fn scale(&self) -> f32 {
        1.0 / (self.d as f32).sqrt()
    }

    fn head(&self, head: usize) -> HeadAt<'_> {
        let (bi, hh) = (head / self.h, head % self.h);
        let g = hh / (self.h / self.kvh);
        let mrow = if self.blocks.len() == 1 { 0 } else { bi };
        HeadAt {
            q: (bi * self.h + hh) * self.s * self.d,
            kv: (bi * self.kvh + g) * self.t * self.d,
            mask: mrow * self.s * self.t,
            p: self.p_at[head],
            blocks: &self.blocks[mrow].0,
        }
    }
}

impl candle_core::CustomOp3 for AttentionOp {
    fn name(&self) -> &'static str {
        "attention"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout, s3: &CpuStorage, l3: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let _span = crate::profile::span(crate::profile::Op::AttentionFwd);
        use crate::kernels::{linear_bwd_ext, matmul_nt, Out, Rows};
        let (q, k, v) = (cpu_f32(s1, l1, "attention q")?, cpu_f32(s2, l2, "attention k")?, cpu_f32(s3, l3, "attention v")?);
        let (b, h, s, t, d) = (self.b, self.h, self.s, self.t, self.d);
        let mut out = vec![0f32; b * s * h * d];
        let mut p = vec![0f32; self.p_at[b * h]];
        let (out_ptr, p_ptr) = (Out(out.as_mut_ptr()), Out(p.as_mut_ptr()));
        let scale = self.scale();
        crate::kernels::parallel_ranges(b * h, 4 * b * h * s * t * d, |heads| {
            let mut o = vec![0f32; s * d];
            for head in heads {
                let at = self.head(head);
                let (kh, vh) = (&k[at.kv..at.kv + t * d], &v[at.kv..at.kv + t * d]);
                o.fill(0.0);
                for blk in at.blocks {
                    let (i0, rows, keys) = (blk.first, blk.rows, blk.keys);
                    if keys == 0 {
                        continue; // every key masked: P and o are 0
                    }
                    // SAFETY: each head owns its blocks of p (disjoint by p_offsets).
                    let pb = unsafe { std::slice::from_raw_parts_mut(p_ptr.at(at.p + blk.p_at), rows * keys) };
                    matmul_nt(self.isa, rows, keys, d, &q[at.q + i0 * d..at.q + (i0 + rows) * d], &kh[..keys * d], pb, false, false);
                    for (i, row) in pb.chunks_exact_mut(keys).enumerate() {
                        crate::eval::attention_softmax_row(row, &self.mask[at.mask + (i0 + i) * t..][..keys], scale);
                    }
                    linear_bwd_ext(self.isa, rows, keys, d, pb, Rows::F32(&vh[..keys * d]), None, &mut o[i0 * d..(i0 + rows) * d], false, false);
                }
                let (bi, hh) = (head / h, head % h);
                for (i, row) in o.chunks_exact(d).enumerate() {
                    // SAFETY: each head owns columns hh * d .. (hh + 1) * d of out.
                    let dst = unsafe { std::slice::from_raw_parts_mut(out_ptr.at((bi * s + i) * h * d + hh * d), d) };
                    dst.copy_from_slice(row);
                }
            }
        });
        *self.saved_p.lock().map_err(|_| candle_core::Error::Msg("attention state poisoned".into()))? = Some(p);
        Ok((to_storage(out, s1.dtype())?, Shape::from((b, s, h * d))))
    }

    fn bwd(&self, q: &Tensor, k: &Tensor, v: &Tensor, _res: &Tensor, grad: &Tensor) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let _span = crate::profile::span(crate::profile::Op::AttentionBwd);
        let p = self.saved_p.lock().map_err(|_| candle_core::Error::Msg("attention state poisoned".into()))?.take();
        let Some(p) = p else { candle_core::bail!("attention: one backward pass per forward pass") };
        let grad = grad.contiguous()?;
        let (dq, dk, dv) = with_f32s(&[q, k, v, &grad], "attention backward", |x| Ok(self.grads(&p, x[0], x[1], x[2], x[3])))?;
        let (b, h, kvh, s, t, d) = (self.b, self.h, self.kvh, self.s, self.t, self.d);
        Ok((
            Some(like(dq, (b, h, s, d), q)?),
            Some(like(dk, (b, kvh, t, d), k)?),
            Some(like(dv, (b, kvh, t, d), v)?),
        ))
    }
}

impl AttentionOp {
    /// `(dq [b, h, s, d], dk [b, kvh, t, d], dv [b, kvh, t, d])`.
    fn grads(&self, p: &[f32], qv: &[f32], kv: &[f32], vv: &[f32], g: &[f32]) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
        use crate::kernels::{linear_bwd_ext, linear_bwd_tn, matmul_nt, Out, Rows};
        let (b, h, kvh, s, t, d) = (self.b, self.h, self.kvh, self.s, self.t, self.d);
        let scale = self.scale();
        let mut dq = vec![0f32; b * h * s * d];
        // Per query head; summed over the heads of each K/V group below.
        let mut dk_h = vec![0f32; b * h * t * d];
        let mut dv_h = vec![0f32; b * h * t * d];
        let (dq_ptr, dk_ptr, dv_ptr) = (Out(dq.as_mut_ptr()), Out(dk_h.as_mut_ptr()), Out(dv_h.as_mut_ptr()));
        crate::kernels::parallel_ranges(b * h, 8 * b * h * s * t * d, |heads| {
            let (mut go, mut ds) = (vec![0f32; s * d], vec![0f32; QUERY_BLOCK.min(s) * t]);
            for head in heads {
                let at = self.head(head);
                let (bi, hh) = (head / h, head % h);
                for (i, row) in go.chunks_exact_mut(d).enumerate() {
                    let src = (bi * s + i) * h * d + hh * d;
                    row.copy_from_slice(&g[src..src + d]);
                }
                let (kh, vh, qh) = (&kv[at.kv..at.kv + t * d], &vv[at.kv..at.kv + t * d], &qv[at.q..at.q + s * d]);
                // SAFETY: each head owns its [t, d] / [s, d] blocks of the outputs.
                let (dvh, dkh, dqh) = unsafe {
                    (
                        std::slice::from_raw_parts_mut(dv_ptr.at(head * t * d), t * d),
                        std::slice::from_raw_parts_mut(dk_ptr.at(head * t * d), t * d),
                        std::slice::from_raw_parts_mut(dq_ptr.at(head * s * d), s * d),
                    )
                };
                for blk in at.blocks {
                    let (i0, rows, keys) = (blk.first, blk.rows, blk.keys);
                    if keys == 0 {
                        continue; // no key seen: no gradient
                    }
                    let pb = &p[at.p + blk.p_at..at.p + blk.p_at + rows * keys];
                    let (gob, qb) = (&go[i0 * d..(i0 + rows) * d], &qh[i0 * d..(i0 + rows) * d]);
                    // dv[..keys] += P^T do
                    linear_bwd_tn(self.isa, keys, rows, d, pb, Rows::F32(gob), &mut dvh[..keys * d], true, false);
                    // dP = do v^T, then dS = P (dP - rowsum(dP P)) * scale (in ds)
                    let dsb = &mut ds[..rows * keys];
                    matmul_nt(self.isa, rows, keys, d, gob, &vh[..keys * d], dsb, false, false);
                    for (dsr, pr) in dsb.chunks_exact_mut(keys).zip(pb.chunks_exact(keys)) {
                        crate::eval::attention_softmax_grad_row(dsr, pr, scale);
                    }
                    // dq = dS k; dk[..keys] += dS^T q
                    linear_bwd_ext(self.isa, rows, keys, d, dsb, Rows::F32(&kh[..keys * d]), None, &mut dqh[i0 * d..(i0 + rows) * d], false, false);
                    linear_bwd_tn(self.isa, keys, rows, d, dsb, Rows::F32(qb), &mut dkh[..keys * d], true, false);
                }
            }
        });
        let n_rep = h / kvh;
        let group_sum = |per_head: &[f32]| -> Vec<f32> {
            let mut out = vec![0f32; b * kvh * t * d];
            for (head, chunk) in per_head.chunks_exact(t * d).enumerate() {
                let (bi, hh) = (head / h, head % h);
                let dst = &mut out[(bi * kvh + hh / n_rep) * t * d..][..t * d];
                dst.iter_mut().zip(chunk).for_each(|(a, b)| *a += b);
            }
            out
        };
        (dq, group_sum(&dk_h), group_sum(&dv_h))
    }
}

// ---------------------------------------------------------------------------------
// Rotary embedding and RMSNorm as single ops (f32 or bf16 on the CPU, any matmul backend).

/// Rotary embedding ("rotate half") of `x` as one op, reading `x` either as
/// `[b, n, s, d]` or, with `n` given, as the `[b, s, n * d]` output of a projection (the
/// head split is folded in, saving a transposed copy); the result is `[b, n, s, d]`.
/// `cos`/`sin` are `[b, s, d]`. Falls back to the composite ops off the CPU, for other
/// dtypes and for odd `d`.
pub fn rope_heads(x: &Tensor, n: Option<usize>, cos: &Tensor, sin: &Tensor) -> candle_core::Result<Tensor> {
    let (b, s, d) = cos.dims3()?;
    let (heads, split) = match n {
        Some(n) => (n, true),
        None => (x.dim(1)?, false),
    };
    let fusable = crate::ops::cpu_ops(x.device()) && computes_in_f32(x.dtype()) && d % 2 == 0;
    if !fusable {
        let x = if split { x.reshape((b, s, heads, d))?.transpose(1, 2)?.contiguous()? } else { x.clone() };
        return rope(&x, cos, sin);
    }
    let want: &[usize] = if split { &[b, s, heads * d] } else { &[b, heads, s, d] };
    if x.dims() != want {
        candle_core::bail!("rope: input {:?}, expected {want:?}", x.dims());
    }
    let cos = tensor_f32(&cos.to_dtype(DType::F32)?.contiguous()?, "rope cos")?;
    let sin = tensor_f32(&sin.to_dtype(DType::F32)?.contiguous()?, "rope sin")?;
    x.contiguous()?.apply_op1(RopeOp { b, n: heads, s, d, split, cos, sin })
}

struct RopeOp {
    b: usize,
    n: usize,
    s: usize,
    d: usize,
    /// Input `[b, s, n * d]` (else `[b, n, s, d]`).
    split: bool,
    cos: Vec<f32>,
    sin: Vec<f32>,
}

impl RopeOp {
    /// Offset of row `(bi, hh, i)` in the input.
    fn src(&self, bi: usize, hh: usize, i: usize) -> usize {
        if self.split {
            (bi * self.s + i) * self.n * self.d + hh * self.d
        } else {
            ((bi * self.n + hh) * self.s + i) * self.d
        }
    }
}

impl candle_core::CustomOp1 for RopeOp {
    fn name(&self) -> &'static str {
        "rope"
    }

    fn cpu_fwd(&self, st: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let _span = crate::profile::span(crate::profile::Op::RopeFwd);
        let x = cpu_f32(st, l, "rope input")?;
        let (b, n, s, d, half) = (self.b, self.n, self.s, self.d, self.d / 2);
        let mut y = vec![0f32; b * n * s * d];
        for (row, out) in y.chunks_exact_mut(d).enumerate() {
            let (bi, hh, i) = (row / (n * s), row / s % n, row % s);
            let xr = &x[self.src(bi, hh, i)..][..d];
            let (c, sn) = (&self.cos[(bi * s + i) * d..][..d], &self.sin[(bi * s + i) * d..][..d]);
            for j in 0..half {
                out[j] = xr[j] * c[j] + -xr[j + half] * sn[j];
                out[j + half] = xr[j + half] * c[j + half] + xr[j] * sn[j + half];
            }
        }
        Ok((to_storage(y, st.dtype())?, Shape::from((b, n, s, d))))
    }

    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad: &Tensor) -> candle_core::Result<Option<Tensor>> {
        let _span = crate::profile::span(crate::profile::Op::RopeBwd);
        let grad = grad.contiguous()?;
        let (b, n, s, d, half) = (self.b, self.n, self.s, self.d, self.d / 2);
        let mut dx = vec![0f32; b * n * s * d];
        with_f32s(&[&grad], "rope gradient", |g| {
            for (row, gr) in g[0].chunks_exact(d).enumerate() {
                let (bi, hh, i) = (row / (n * s), row / s % n, row % s);
                let (c, sn) = (&self.cos[(bi * s + i) * d..][..d], &self.sin[(bi * s + i) * d..][..d]);
                let o = self.src(bi, hh, i);
                let out = &mut dx[o..o + d];
                for j in 0..half {
                    out[j] = gr[j] * c[j] + gr[j + half] * sn[j + half];
                    out[j + half] = gr[j + half] * c[j + half] - gr[j] * sn[j];
                }
            }
            Ok(())
        })?;
        Ok(Some(like(dx, arg.dims(), arg)?))
    }
}

/// Llama RMSNorm as one op for f32 or bf16 CPU inputs (the composite [`rms_norm`] otherwise):
/// `y = x / sqrt(mean(x^2) + eps) * w`; the backward returns the input gradient only
/// (the norm weight is frozen).
pub fn rms_norm_fused(x: &Tensor, w: &Tensor, eps: f64) -> candle_core::Result<Tensor> {
    if !(crate::ops::cpu_ops(x.device()) && computes_in_f32(x.dtype()) && computes_in_f32(w.dtype())) {
        return rms_norm(x, w, eps);
    }
    let h = x.dim(D::Minus1)?;
    if w.dims() != [h] {
        candle_core::bail!("rms_norm: weight {:?} for {h} features", w.dims());
    }
    let w = tensor_f32(&w.to_dtype(DType::F32)?.contiguous()?, "rms_norm weight")?;
    x.contiguous()?.apply_op1(RmsNormOp { eps: eps as f32, w, saved_r: std::sync::Mutex::new(None) })
}

struct RmsNormOp {
    eps: f32,
    w: Vec<f32>,
    /// `1 / sqrt(mean(x^2) + eps)` per row.
    saved_r: std::sync::Mutex<Option<Vec<f32>>>,
}

impl candle_core::CustomOp1 for RmsNormOp {
    fn name(&self) -> &'static str {
        "rms-norm"
    }

    fn cpu_fwd(&self, st: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let _span = crate::profile::span(crate::profile::Op::NormFwd);
        let x = cpu_f32(st, l, "rms_norm input")?;
        let h = self.w.len();
        let mut y = vec![0f32; x.len()];
        let mut rs = Vec::with_capacity(x.len() / h.max(1));
        for (xr, yr) in x.chunks_exact(h).zip(y.chunks_exact_mut(h)) {
            let ms = xr.iter().map(|v| v * v).sum::<f32>() / h as f32;
            let r = 1.0 / (ms + self.eps).sqrt();
            for ((o, &v), &w) in yr.iter_mut().zip(xr).zip(&self.w) {
                *o = v * r * w;
            }
            rs.push(r);
        }
        *self.saved_r.lock().map_err(|_| candle_core::Error::Msg("rms_norm state poisoned".into()))? = Some(rs);
        Ok((to_storage(y, st.dtype())?, l.shape().clone()))
    }

    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad: &Tensor) -> candle_core::Result<Option<Tensor>> {
        let _span = crate::profile::span(crate::profile::Op::NormBwd);
        let rs = self.saved_r.lock().map_err(|_| candle_core::Error::Msg("rms_norm state poisoned".into()))?.clone();
        let Some(rs) = rs else { candle_core::bail!("rms_norm: backward before forward") };
        let grad = grad.contiguous()?;
        let h = self.w.len();
        let mut dx = vec![0f32; arg.elem_count()];
        with_f32s(&[arg, &grad], "rms_norm backward", |v| {
            for (((xr, gr), dr), &r) in v[0].chunks_exact(h).zip(v[1].chunks_exact(h)).zip(dx.chunks_exact_mut(h)).zip(&rs) {
                // dx = r * (g w - x_hat * mean(g w x_hat)), x_hat = x r
                let dot: f32 = xr.iter().zip(gr).zip(&self.w).map(|((x, g), w)| g * w * x * r).sum::<f32>() / h as f32;
                for (((o, &x), &g), &w) in dr.iter_mut().zip(xr).zip(gr).zip(&self.w) {
                    *o = r * (g * w - x * r * dot);
                }
            }
            Ok(())
        })?;
        Ok(Some(like(dx, arg.dims(), arg)?))
    }
}

// ---------------------------------------------------------------------------------
// SwiGLU: the gated activation of the Llama MLP.

/// `silu(g) * u` (Llama's MLP activation) as one op for f32 and bf16 CPU inputs of one
/// shape (the composite candle ops otherwise): `y = g sigmoid(g) u`; the backward returns
/// `dg = dy u s (1 + g (1 - s))` and `du = dy g s` with `s = sigmoid(g)`.
pub fn swiglu(g: &Tensor, u: &Tensor) -> candle_core::Result<Tensor> {
    let fusable = crate::ops::cpu_ops(g.device()) && computes_in_f32(g.dtype()) && g.dtype() == u.dtype() && g.dims() == u.dims();
    if !fusable {
        return crate::ops::silu(g)? * u;
    }
    g.contiguous()?.apply_op2(&u.contiguous()?, SwigluOp)
}

struct SwigluOp;

impl candle_core::CustomOp2 for SwigluOp {
    fn name(&self) -> &'static str {
        "swiglu"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let _span = crate::profile::span(crate::profile::Op::SwigluFwd);
        let (g, u) = (cpu_f32(s1, l1, "swiglu gate")?, cpu_f32(s2, l2, "swiglu up")?);
        let mut y = vec![0f32; g.len()];
        let out = crate::kernels::Out(y.as_mut_ptr());
        crate::kernels::parallel_ranges(g.len(), 20 * g.len(), |r| {
            // SAFETY: each thread writes its own range of y.
            let ys = unsafe { std::slice::from_raw_parts_mut(out.at(r.start), r.len()) };
            crate::eval::swiglu_fwd_slice(ys, &g[r.clone()], &u[r]);
        });
        Ok((to_storage(y, s1.dtype())?, l1.shape().clone()))
    }

    fn bwd(&self, g: &Tensor, u: &Tensor, _res: &Tensor, grad: &Tensor) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let _span = crate::profile::span(crate::profile::Op::SwigluBwd);
        let grad = grad.contiguous()?;
        let n = g.elem_count();
        let (mut dg, mut du) = (vec![0f32; n], vec![0f32; n]);
        with_f32s(&[g, u, &grad], "swiglu backward", |v| {
            let (gv, uv, dy) = (v[0], v[1], v[2]);
            let (dg_out, du_out) = (crate::kernels::Out(dg.as_mut_ptr()), crate::kernels::Out(du.as_mut_ptr()));
            crate::kernels::parallel_ranges(n, 30 * n, |r| {
                // SAFETY: each thread writes its own range of dg and du.
                let (dgs, dus) = unsafe { (std::slice::from_raw_parts_mut(dg_out.at(r.start), r.len()), std::slice::from_raw_parts_mut(du_out.at(r.start), r.len())) };
                crate::eval::swiglu_bwd_slice(dgs, dus, &gv[r.clone()], &uv[r.clone()], &dy[r]);
            });
            Ok(())
        })?;
        Ok((Some(like(dg, g.dims(), g)?), Some(like(du, u.dims(), u)?)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_causal_mask_keeps_the_lower_triangle_in_query_blocks() {
        for s in [1, 5, QUERY_BLOCK, QUERY_BLOCK + 1, 3 * QUERY_BLOCK + 7, 1024] {
            let mask: Vec<f32> = (0..s * s).map(|x| if x % s <= x / s { 0.0 } else { f32::NEG_INFINITY }).collect();
            let blocks = query_blocks(&mask, 1, s, s);
            let (blocks, size) = &blocks[0];
            assert_eq!(*size, causal_probabilities_kept(s), "s = {s}");
            for b in blocks {
                // A block sees the keys up to its last row, no more.
                assert_eq!(b.keys, b.first + b.rows, "s = {s}: {b:?}");
            }
            assert!(s < 2 * QUERY_BLOCK || *size * 10 < s * s * 7, "s = {s}: {size} of {}", s * s);
        }
        // A fully masked row sees nothing.
        assert_eq!(query_blocks(&[f32::NEG_INFINITY; 4], 1, 2, 2)[0].0[0].keys, 0);
    }
}

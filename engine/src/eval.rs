//! Loss and evaluation. The loss of a set of examples is the total negative
//! log-likelihood of their target (answer) tokens divided by the number of those
//! tokens; perplexity is `exp(loss)`. Logits are computed only at the positions that
//! predict a target.

use candle_core::{DType, Device, Tensor, D};
use serde::{Deserialize, Serialize};

use crate::data::{BatchTensors, MicroBatch};
#[cfg(target_arch = "x86_64")]
use crate::kernels::Isa;
use crate::model::CausalLm;
use crate::Result;

/// Summed NLL (f32 scalar tensor, differentiable) of a micro-batch's targets.
pub fn nll_sum(model: &dyn CausalLm, batch: &BatchTensors) -> Result<Tensor> {
    let hidden = model.hidden_states(&batch.input)?;
    let (b, s, h) = hidden.dims3()?;
    let flat = hidden.reshape((b * s, h))?;
    let picked = flat.index_select(&batch.loss_positions, 0)?;
    model.head_loss(&picked, &batch.targets)
}

/// The loss of [`CausalLm::head_loss`] from the model's logits: bf16 logits go to the
/// fused loss as they are (it reads them into f32); elsewhere it is taken in f32.
pub fn head_loss_from_logits<M: CausalLm + ?Sized>(model: &M, hidden: &Tensor, targets: &Tensor) -> Result<Tensor> {
    let logits = model.logits_compute(hidden)?;
    let logits = if crate::ops::cpu_ops(logits.device()) && logits.dtype() == DType::BF16 { logits } else { logits.to_dtype(DType::F32)? };
    cross_entropy_sum(&logits, targets)
}

/// The output head and [`cross_entropy_sum`] as one op (CPU, f32 or bf16 compute):
/// `hidden [n, in] -> sum_i -log softmax(hidden_i W^T)[targets_i]`. The logits never
/// become a tensor of the graph: the op keeps them (f32) for its backward pass, which
/// turns them into their gradient in place and multiplies that by the head's weight.
/// As separate ops, candle's backward pass zero-filled and added a gradient the size of
/// the logits for each of them (the biggest tensors of a step: tokens x vocab), and the
/// loss allocated a third. With bf16 compute the logits and their gradient are rounded
/// to bf16 where the separate ops stored them as bf16 tensors: the same values.
pub fn head_cross_entropy_sum(head: &crate::ops::FrozenLinear, hidden: &Tensor, targets: &Tensor) -> Result<Tensor> {
    let (n, k) = hidden.dims2()?;
    if k != head.in_dim() {
        return Err(crate::EngineError::Config(format!("output head: hidden states have {k} features, the head expects {}", head.in_dim())));
    }
    let t: Vec<u32> = targets.to_vec1()?;
    if t.len() != n {
        return Err(crate::EngineError::Config(format!("output head loss: {} targets for {n} rows", t.len())));
    }
    let vocab = head.out_dim();
    if let Some(bad) = t.iter().find(|x| **x as usize >= vocab) {
        return Err(crate::EngineError::Config(format!("target id {bad} is outside the vocabulary ({vocab})")));
    }
    let op = HeadLoss { inner: head.inner.clone(), targets: t, saved: std::sync::Mutex::new(None) };
    Ok(hidden.to_dtype(head.inner.dtype)?.contiguous()?.apply_op1(op)?)
}

struct HeadLoss {
    inner: std::sync::Arc<crate::ops::FrozenInner>,
    targets: Vec<u32>,
    /// The logits `[n, vocab]` and their rows' log-sum-exp, from the forward pass.
    saved: std::sync::Mutex<Option<(Vec<f32>, Vec<f32>)>>,
}

/// Round f32 values to bf16 in place (what storing them as bf16 does).
fn round_to_bf16(v: &mut [f32]) {
    v.iter_mut().for_each(|x| *x = crate::ops::bf16_to_f32(crate::ops::f32_to_bf16(*x)));
}

impl candle_core::CustomOp1 for HeadLoss {
    fn name(&self) -> &'static str {
        "head-cross-entropy-sum"
    }

    fn cpu_fwd(&self, storage: &candle_core::CpuStorage, layout: &candle_core::Layout) -> candle_core::Result<(candle_core::CpuStorage, candle_core::Shape)> {
        let (n, _) = layout.shape().dims2()?;
        let v = self.inner.out_dim;
        let bf16 = matches!(storage, candle_core::CpuStorage::BF16(_));
        let x = crate::ops::cpu_f32(storage, layout, "output head input")?;
        let mut logits = {
            let _span = crate::profile::span(crate::profile::Op::FrozenFwd);
            let (mut logits, bias) = crate::ops::output_rows(&self.inner, n);
            crate::ops::frozen_fwd(&self.inner, n, &x, &mut logits, bias)?;
            logits
        };
        let _span = crate::profile::span(crate::profile::Op::LossFwd);
        if bf16 {
            par_rows(&mut logits, v, |_, rows| round_to_bf16(rows));
        }
        let (lse, total) = rows_lse_and_loss(&logits, v, &self.targets);
        *self.saved.lock().unwrap_or_else(|e| e.into_inner()) = Some((logits, lse));
        Ok((candle_core::CpuStorage::F32(vec![total as f32]), candle_core::Shape::from(())))
    }

    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad_res: &Tensor) -> candle_core::Result<Option<Tensor>> {
        let (n, k) = arg.dims2()?;
        let v = self.inner.out_dim;
        let g = grad_res.to_dtype(DType::F32)?.to_scalar::<f32>()?;
        let Some((mut grad, lse)) = self.saved.lock().unwrap_or_else(|e| e.into_inner()).take() else {
            candle_core::bail!("output head loss: backward before forward (or twice)")
        };
        {
            let _span = crate::profile::span(crate::profile::Op::LossBwd);
            logits_to_grad(&mut grad, v, &lse, &self.targets, g, arg.dtype() == DType::BF16);
        }
        let _span = crate::profile::span(crate::profile::Op::FrozenBwd);
        let mut gx = vec![0f32; n * k];
        crate::ops::frozen_bwd(&self.inner, n, &grad, &mut gx)?;
        Ok(Some(crate::ops::cpu_tensor(gx, (n, k), arg.dtype())?))
    }
}

/// `sum_i -log softmax(logits_i)[targets_i]` over the rows of `[n, vocab]` logits, an f32
/// scalar. On the CPU a fused op (two passes over the logits forward, one backward, with
/// the gradient `softmax - onehot`) replaces the ~10 tensor ops of the generic form; it
/// takes f32 or bf16 logits (read into f32, the gradient rounded back to bf16, as
/// PyTorch's `logits.float()` does).
pub fn cross_entropy_sum(logits: &Tensor, targets: &Tensor) -> Result<Tensor> {
    if crate::ops::cpu_ops(logits.device()) && matches!(logits.dtype(), DType::F32 | DType::BF16) && logits.rank() == 2 {
        let t: Vec<u32> = targets.to_vec1()?;
        let vocab = logits.dim(1)?;
        if let Some(bad) = t.iter().find(|x| **x as usize >= vocab) {
            return Err(crate::EngineError::Config(format!("target id {bad} is outside the vocabulary ({vocab})")));
        }
        let op = CrossEntropySum { targets: std::sync::Arc::new(t), lse: std::sync::Mutex::new(None) };
        return Ok(logits.apply_op1(op)?);
    }
    cross_entropy_sum_generic(logits, targets)
}

/// The same loss from differentiable tensor ops (any device).
pub fn cross_entropy_sum_generic(logits: &Tensor, targets: &Tensor) -> Result<Tensor> {
    let max = logits.max_keepdim(D::Minus1)?.detach();
    let diff = logits.broadcast_sub(&max)?;
    let lse = diff.exp()?.sum_keepdim(D::Minus1)?.log()?;
    let logp = diff.broadcast_sub(&lse)?;
    let tgt = logp.gather(&targets.unsqueeze(1)?, 1)?;
    Ok(tgt.sum_all()?.neg()?)
}

#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct EvalResult {
    /// Mean NLL per target token.
    pub loss: f64,
    pub perplexity: f64,
    /// Target tokens scored.
    pub tokens: u64,
}

/// Evaluate micro-batches (no gradients kept).
pub fn evaluate(model: &dyn CausalLm, batches: &[MicroBatch], device: &Device) -> Result<EvalResult> {
    let was_training = false;
    model.set_training(was_training);
    let mut total = 0f64;
    let mut tokens = 0u64;
    for b in batches {
        if b.target_count() == 0 {
            continue;
        }
        let t = b.to_tensors(device)?;
        let s = nll_sum(model, &t)?.detach().to_scalar::<f32>()?;
        total += s as f64;
        tokens += b.target_count() as u64;
    }
    let loss = if tokens > 0 { total / tokens as f64 } else { f64::NAN };
    Ok(EvalResult { loss, perplexity: loss.exp(), tokens })
}

/// Fused cross-entropy (sum over rows) for contiguous f32 CPU logits.
/// Each row's log-sum-exp of `[n, v]` logits, and the summed loss against `targets`.
fn rows_lse_and_loss(logits: &[f32], v: usize, targets: &[u32]) -> (Vec<f32>, f64) {
    let n = targets.len();
    let mut lse = vec![0f32; n];
    par_rows(&mut lse, 1, |first, out| {
        for (j, o) in out.iter_mut().enumerate() {
            let r = first + j;
            *o = row_lse(&logits[r * v..(r + 1) * v]);
        }
    });
    let total = (0..n).map(|r| (lse[r] - logits[r * v + targets[r] as usize]) as f64).sum();
    (lse, total)
}

/// Logits `[n, v]` turned in place into the gradient of `g` times their summed loss:
/// `g (softmax - onehot)`, each row rounded to bf16 when `bf16`.
fn logits_to_grad(rows: &mut [f32], v: usize, lse: &[f32], targets: &[u32], g: f32, bf16: bool) {
    par_rows(rows, v, |first, out| {
        for (j, row) in out.chunks_mut(v).enumerate() {
            let r = first + j;
            softmax_grad_row(row, lse[r], g);
            row[targets[r] as usize] -= g;
            if bf16 {
                round_to_bf16(row);
            }
        }
    });
}

struct CrossEntropySum {
    targets: std::sync::Arc<Vec<u32>>,
    /// Row log-sum-exp saved by the forward pass for the backward pass.
    lse: std::sync::Mutex<Option<Vec<f32>>>,
}

/// Run `f(first_row, rows_chunk)` over row chunks on the candle thread count.
fn par_rows<T: Send>(data: &mut [T], row_len: usize, f: impl Fn(usize, &mut [T]) + Sync) {
    let rows = data.len() / row_len.max(1);
    let threads = candle_core::utils::get_num_threads().clamp(1, rows.max(1));
    let per = rows.div_ceil(threads).max(1);
    std::thread::scope(|s| {
        for (i, chunk) in data.chunks_mut(per * row_len).enumerate() {
            let f = &f;
            s.spawn(move || f(i * per, chunk));
        }
    });
}

/// `exp(x)` for `x <= 0` (softmax terms): Cody-Waite range reduction and a degree-6
/// polynomial, relative error ~2e-7, written so that the compiler vectorizes it.
#[inline(always)]
fn exp_neg(x: f32) -> f32 {
    let x = if x > -87.0 { x } else { -87.0 };
    // round to nearest with the 1.5 * 2^23 trick (no SSE4.1 `round` needed): the integer
    // n then sits in the low bits of t, so 2^n is built with wrapping integer ops only (a
    // checked add or a saturating float->int cast would keep the loop scalar).
    let t = x * std::f32::consts::LOG2_E + 12_582_912.0;
    let n = t - 12_582_912.0;
    let r = x - n * 0.693_145_75 - n * 1.428_606_8e-6;
    let p = 1.0 + r * (1.0 + r * (0.5 + r * (0.166_666_67 + r * (0.041_666_668 + r * (0.008_333_334 + r * 0.001_388_889)))));
    p * f32::from_bits(t.to_bits().wrapping_sub(0x4B40_0000).wrapping_add(127) << 23)
}

#[inline(always)]
fn row_max(row: &[f32]) -> f32 {
    let mut m = [f32::NEG_INFINITY; 16];
    let mut chunks = row.chunks_exact(16);
    for c in &mut chunks {
        for k in 0..16 {
            m[k] = if c[k] > m[k] { c[k] } else { m[k] };
        }
    }
    chunks.remainder().iter().chain(m.iter()).copied().fold(f32::NEG_INFINITY, f32::max)
}

/// The instruction set the loss is vectorized for: the matrix kernels' (so that
/// `LORAFLEET_BLAS=avx2` measures an AVX2 CPU on an AVX-512 one), else the CPU's best.
#[cfg(target_arch = "x86_64")]
fn loss_isa() -> Option<Isa> {
    crate::blas::kernel_isa().or_else(Isa::detect)
}

/// Calls the `#[inline(always)]` function `$body` with `$args`, compiled for the loss's
/// instruction set ([`loss_isa`]): the same code three times, since the default build
/// targets baseline x86-64.
macro_rules! on_loss_isa {
    ($body:ident($($arg:ident: $ty:ty),*) -> $ret:ty) => {{
        #[cfg(target_arch = "x86_64")]
        match loss_isa() {
            Some(Isa::Avx512) => {
                #[target_feature(enable = "avx512f")]
                unsafe fn wide($($arg: $ty),*) -> $ret {
                    $body($($arg),*)
                }
                // SAFETY: the CPU has AVX-512F.
                return unsafe { wide($($arg),*) };
            }
            Some(Isa::Avx2) => {
                #[target_feature(enable = "avx2,fma")]
                unsafe fn wide($($arg: $ty),*) -> $ret {
                    $body($($arg),*)
                }
                // SAFETY: the CPU has AVX2 and FMA.
                return unsafe { wide($($arg),*) };
            }
            None => {}
        }
        $body($($arg),*)
    }};
}

/// `log(sum(exp(row)))`, vectorized for AVX-512 or AVX2 where the CPU has them.
fn row_lse(row: &[f32]) -> f32 {
    on_loss_isa!(row_lse_body(row: &[f32]) -> f32)
}

/// One row of attention's backward pass in place: `ds[j] = p[j] (ds[j] - sum_k ds[k]
/// p[k]) * scale` (`ds` holds `dP` on entry), the sum in 16 partial sums (a float
/// reduction written as one chain stays scalar and latency-bound).
pub(crate) fn attention_softmax_grad_row(ds: &mut [f32], p: &[f32], scale: f32) {
    #[inline(always)]
    fn body(ds: &mut [f32], p: &[f32], scale: f32) {
        let mut acc = [0f32; 16];
        let (dc, pc) = (ds.chunks_exact(16), p.chunks_exact(16));
        let (dr, pr) = (dc.remainder(), pc.remainder());
        for (d, q) in dc.zip(pc) {
            for k in 0..16 {
                acc[k] += d[k] * q[k];
            }
        }
        let dot = acc.iter().sum::<f32>() + dr.iter().zip(pr).map(|(a, b)| a * b).sum::<f32>();
        ds.iter_mut().zip(p).for_each(|(x, &pp)| *x = pp * (*x - dot) * scale);
    }
    on_loss_isa!(body(ds: &mut [f32], p: &[f32], scale: f32) -> ())
}

/// `sigmoid(x)` from `exp(-|x|)` (never overflows), branch-free for the vectorizer.
#[inline(always)]
fn sigmoid(x: f32) -> f32 {
    let e = exp_neg(-x.abs());
    let d = 1.0 / (1.0 + e);
    if x >= 0.0 {
        d
    } else {
        e * d
    }
}

/// SwiGLU's forward over a range: `y = g sigmoid(g) u`, vectorized like the loss.
pub(crate) fn swiglu_fwd_slice(y: &mut [f32], g: &[f32], u: &[f32]) {
    #[inline(always)]
    fn body(y: &mut [f32], g: &[f32], u: &[f32]) {
        for ((y, &g), &u) in y.iter_mut().zip(g).zip(u) {
            *y = g * sigmoid(g) * u;
        }
    }
    on_loss_isa!(body(y: &mut [f32], g: &[f32], u: &[f32]) -> ())
}

/// SwiGLU's backward over a range: `dg = dy u s (1 + g (1 - s))`, `du = dy g s` with
/// `s = sigmoid(g)`.
pub(crate) fn swiglu_bwd_slice(dg: &mut [f32], du: &mut [f32], g: &[f32], u: &[f32], dy: &[f32]) {
    #[inline(always)]
    fn body(dg: &mut [f32], du: &mut [f32], g: &[f32], u: &[f32], dy: &[f32]) {
        for ((((dg, du), &g), &u), &dy) in dg.iter_mut().zip(du.iter_mut()).zip(g).zip(u).zip(dy) {
            let s = sigmoid(g);
            *dg = dy * u * s * (1.0 + g * (1.0 - s));
            *du = dy * g * s;
        }
    }
    on_loss_isa!(body(dg: &mut [f32], du: &mut [f32], g: &[f32], u: &[f32], dy: &[f32]) -> ())
}

/// One row of the loss gradient in place over the logits: `row[j] = g * exp(row[j] -
/// lse)` (before the target's `-g`), vectorized like [`row_lse`].
fn softmax_grad_row(row: &mut [f32], lse: f32, g: f32) {
    #[inline(always)]
    fn body(row: &mut [f32], lse: f32, g: f32) {
        for o in row.iter_mut() {
            *o = g * exp_neg(*o - lse);
        }
    }
    on_loss_isa!(body(row: &mut [f32], lse: f32, g: f32) -> ())
}

/// One attention row in place: `row[j] = softmax_j(row[j] * scale + mask[j])`, masked
/// entries (`-inf`) exactly 0 and a fully masked row all 0; vectorized like the loss.
pub(crate) fn attention_softmax_row(row: &mut [f32], mask: &[f32], scale: f32) {
    #[inline(always)]
    fn body(row: &mut [f32], mask: &[f32], scale: f32) {
        for (x, &m) in row.iter_mut().zip(mask) {
            *x = *x * scale + m;
        }
        let max = row_max(row);
        if max == f32::NEG_INFINITY {
            row.fill(0.0);
            return;
        }
        // 16 partial sums (one AVX-512 vector); exp computed for every entry and the
        // masked ones selected to 0 afterwards, so that the loop has no branch.
        let mut acc = [0f32; 16];
        let mut chunks = row.chunks_exact_mut(16);
        for c in &mut chunks {
            for k in 0..16 {
                let x = c[k];
                let e = exp_neg(x - max);
                let e = if x == f32::NEG_INFINITY { 0.0 } else { e };
                c[k] = e;
                acc[k] += e;
            }
        }
        let mut sum = 0f32;
        for x in chunks.into_remainder() {
            *x = if *x == f32::NEG_INFINITY { 0.0 } else { exp_neg(*x - max) };
            sum += *x;
        }
        sum += acc.iter().sum::<f32>();
        let inv = 1.0 / sum;
        row.iter_mut().for_each(|x| *x *= inv);
    }
    on_loss_isa!(body(row: &mut [f32], mask: &[f32], scale: f32) -> ())
}

#[inline(always)]
fn row_lse_body(row: &[f32]) -> f32 {
    let max = row_max(row);
    // 8 partial sums keep the reduction vectorizable
    let mut acc = [0f32; 8];
    let mut chunks = row.chunks_exact(8);
    for c in &mut chunks {
        for k in 0..8 {
            acc[k] += exp_neg(c[k] - max);
        }
    }
    let mut sum: f32 = chunks.remainder().iter().map(|x| exp_neg(x - max)).sum();
    sum += acc.iter().sum::<f32>();
    max + sum.ln()
}

impl candle_core::CustomOp1 for CrossEntropySum {
    fn name(&self) -> &'static str {
        "cross-entropy-sum"
    }

    fn cpu_fwd(&self, storage: &candle_core::CpuStorage, layout: &candle_core::Layout) -> candle_core::Result<(candle_core::CpuStorage, candle_core::Shape)> {
        let _span = crate::profile::span(crate::profile::Op::LossFwd);
        let (n, v) = layout.shape().dims2()?;
        let data = crate::ops::cpu_f32(storage, layout, "cross-entropy-sum logits")?;
        if self.targets.len() != n {
            candle_core::bail!("cross-entropy-sum: {} targets for {n} rows", self.targets.len());
        }
        let (lse, total) = rows_lse_and_loss(&data, v, &self.targets);
        *self.lse.lock().unwrap_or_else(|e| e.into_inner()) = Some(lse);
        Ok((candle_core::CpuStorage::F32(vec![total as f32]), candle_core::Shape::from(())))
    }

    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad_res: &Tensor) -> candle_core::Result<Option<Tensor>> {
        let _span = crate::profile::span(crate::profile::Op::LossBwd);
        let (n, v) = arg.dims2()?;
        let g = grad_res.to_dtype(DType::F32)?.to_scalar::<f32>()?;
        let arg = arg.contiguous()?;
        let (storage, layout) = arg.storage_and_layout();
        let x = match &*storage {
            candle_core::Storage::Cpu(s) => crate::ops::cpu_f32(s, layout, "cross-entropy-sum logits")?,
            _ => candle_core::bail!("cross-entropy-sum: cpu logits expected"),
        };
        let lse = match self.lse.lock().unwrap_or_else(|e| e.into_inner()).take() {
            Some(l) => l,
            None => (0..n).map(|r| row_lse(&x[r * v..(r + 1) * v])).collect(),
        };
        let mut grad = x[..n * v].to_vec();
        logits_to_grad(&mut grad, v, &lse, &self.targets, g, false);
        drop(x);
        drop(storage);
        Ok(Some(crate::ops::cpu_tensor(grad, (n, v), arg.dtype())?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    #[test]
    fn the_fused_head_and_loss_equal_the_separate_ops() {
        // Loss and the hidden states' gradient, bit for bit: the fused op computes the
        // same products and the same rows as the head op followed by the loss op (f32, a
        // bias, NF4 weights, bf16 compute with its roundings).
        use crate::ops::{FrozenLinear, FrozenWeight};
        let dev = Device::Cpu;
        let (n, k, v) = (37, 64, 300);
        let w = Tensor::randn(0f32, 0.2, (v, k), &dev).unwrap();
        let bias = Tensor::randn(0f32, 0.5, v, &dev).unwrap();
        let t = Tensor::new((0..n as u32).map(|i| i * 7 % v as u32).collect::<Vec<_>>(), &dev).unwrap();
        let nf4 = std::sync::Arc::new(crate::nf4::Nf4Tensor::quantize(&w.flatten_all().unwrap().to_vec1::<f32>().unwrap(), &[v, k], true).unwrap());
        let cases = [
            ("f32", FrozenWeight::Dense(w.clone()), None, DType::F32),
            ("f32 + bias", FrozenWeight::Dense(w.clone()), Some(bias), DType::F32),
            ("nf4", FrozenWeight::Nf4(nf4.clone()), None, DType::F32),
            ("nf4 bf16", FrozenWeight::Nf4(nf4), None, DType::BF16),
            ("bf16", FrozenWeight::Dense(w), None, DType::BF16),
        ];
        for (what, weight, bias, dt) in cases {
            let head = FrozenLinear::new(weight, bias, dt).unwrap();
            let x = Var::from_tensor(&Tensor::randn(0f32, 1.0, (n, k), &dev).unwrap().to_dtype(dt).unwrap()).unwrap();
            let fused = head_cross_entropy_sum(&head, x.as_tensor(), &t).unwrap();
            let logits = head.forward(x.as_tensor()).unwrap();
            let logits = if dt == DType::BF16 { logits } else { logits.to_dtype(DType::F32).unwrap() };
            let separate = cross_entropy_sum(&logits, &t).unwrap();
            assert_eq!(fused.to_scalar::<f32>().unwrap(), separate.to_scalar::<f32>().unwrap(), "{what}: loss");
            let gf = (fused * 0.25).unwrap().backward().unwrap().get(x.as_tensor()).unwrap().clone();
            let gs = (separate * 0.25).unwrap().backward().unwrap().get(x.as_tensor()).unwrap().clone();
            assert_eq!(gf.dtype(), dt, "{what}");
            let (gf, gs) = (gf.to_dtype(DType::F32).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap(), gs.to_dtype(DType::F32).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap());
            assert_eq!(gf, gs, "{what}: gradient");
        }
    }

    #[test]
    fn fused_cross_entropy_matches_tensor_ops() {
        let dev = Device::Cpu;
        let x = Var::from_tensor(&(Tensor::randn(0f32, 3.0, (7, 50), &dev).unwrap())).unwrap();
        let t = Tensor::new(&[0u32, 49, 3, 3, 17, 8, 25], &dev).unwrap();
        let a = cross_entropy_sum(x.as_tensor(), &t).unwrap();
        let b = cross_entropy_sum_generic(x.as_tensor(), &t).unwrap();
        let (av, bv) = (a.to_scalar::<f32>().unwrap(), b.to_scalar::<f32>().unwrap());
        assert!((av - bv).abs() < 1e-4 * bv.abs().max(1.0), "{av} vs {bv}");
        let ga = (a * 0.5).unwrap().backward().unwrap();
        let gb = (b * 0.5).unwrap().backward().unwrap();
        let d = (ga.get(x.as_tensor()).unwrap() - gb.get(x.as_tensor()).unwrap()).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
        assert!(d < 1e-6, "gradient differs by {d}");
        for x in [0.0f32, -1e-8, -0.3, -0.69, -1.0, -5.5, -20.0, -80.0, -100.0] {
            let (a, b) = (exp_neg(x), x.exp());
            assert!((a - b).abs() <= 4e-7 * b + 1e-37, "exp({x}): {a} vs {b}");
        }
        let bad = Tensor::new(&[0u32, 50, 0, 0, 0, 0, 0], &dev).unwrap();
        assert!(cross_entropy_sum(x.as_tensor(), &bad).is_err());

        // bf16 logits: the same loss as the generic form on their f32 values, and the
        // gradient of the f32 upcast, rounded to bf16.
        let xb = Var::from_tensor(&x.as_tensor().to_dtype(DType::BF16).unwrap()).unwrap();
        let a = cross_entropy_sum(xb.as_tensor(), &t).unwrap();
        assert_eq!(a.dtype(), DType::F32);
        let up = xb.as_tensor().to_dtype(DType::F32).unwrap();
        let b = cross_entropy_sum_generic(&up, &t).unwrap();
        let (av, bv) = (a.to_scalar::<f32>().unwrap(), b.to_scalar::<f32>().unwrap());
        assert!((av - bv).abs() < 1e-4 * bv.abs().max(1.0), "bf16: {av} vs {bv}");
        let ga = a.backward().unwrap().get(xb.as_tensor()).unwrap().clone();
        assert_eq!(ga.dtype(), DType::BF16);
        let gb = b.backward().unwrap().get(xb.as_tensor()).unwrap().clone();
        let d = (ga.to_dtype(DType::F32).unwrap() - gb.to_dtype(DType::F32).unwrap()).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
        assert!(d < 4e-3, "bf16 gradient differs by {d}");
    }
}

//! Custom ops and differentiable building blocks.
//!
//! - [`FrozenLinear`]: `y = x W^T (+ b)` for a frozen weight (NF4 or full precision). On
//!   CPU it is a candle `CustomOp1` that runs the product on the process-wide backend of
//!   [`crate::blas`] directly on the input buffer (the built-in kernels take NF4 weights as
//!   they are and dequantize a block at a time; the other backends get a dequantized
//!   copy through a byte-pair lookup table) and whose backward returns only
//!   `grad_x = grad_y W`: no gradient for `W` is computed or kept.
//!   On other devices (CUDA; the CPU under `LORAFLEET_OPS=portable`, see [`cpu_ops`])
//!   it is a device-generic op on candle's own matmul, again with no weight gradient, and
//!   NF4 weights stay 4-bit on the device ([`crate::nf4::DeviceNf4`]), dequantized there
//!   for each product as bitsandbytes does.
//! - [`CheckpointHook`]: the hook gradient checkpointing hangs a recomputation on.
//! - Differentiable forms of RMSNorm, LayerNorm, softmax, rotary embedding (rotate
//!   half), exact GELU and SiLU (candle's fused versions have no backward).

use std::sync::Arc;

use candle_core::{
    backend::{BackendDevice, BackendStorage}, CpuStorage, DType, Device, Layout, Shape, Storage, Tensor, D,
};
use half::bf16;

use crate::kernels::Rows;
use crate::nf4::{DeviceNf4, Nf4Tensor};

/// A frozen weight `[out, in]`.
#[derive(Debug, Clone)]
pub enum FrozenWeight {
    /// Full precision, contiguous, in the compute dtype.
    Dense(Tensor),
    /// NF4 in host memory, for the CPU ops (dequantized on the fly).
    Nf4(Arc<Nf4Tensor>),
    /// NF4 kept 4-bit on a device (the portable ops), dequantized there per product.
    Nf4Device(Arc<DeviceNf4>),
}

/// Whether tensors on `device` run on the engine's own CPU ops (built-in kernels, the
/// fused LoRA, attention, RoPE, RMSNorm, SwiGLU and loss ops, NF4 read in place): the
/// CPU, unless `LORAFLEET_OPS=portable`. Everything else runs the portable path, built
/// from candle's device-generic tensor ops only: what CUDA devices run, and what
/// `LORAFLEET_OPS=portable` forces on the CPU so that the tests check that path on
/// machines without a GPU.
pub fn cpu_ops(device: &Device) -> bool {
    static PORTABLE: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    device.is_cpu() && !*PORTABLE.get_or_init(|| std::env::var("LORAFLEET_OPS").is_ok_and(|v| v == "portable"))
}

#[derive(Debug)]
pub(crate) struct FrozenInner {
    pub(crate) weight: FrozenWeight,
    pub(crate) bias: Option<Tensor>,
    pub(crate) bias_f32: Option<Vec<f32>>,
    pub(crate) out_dim: usize,
    pub(crate) in_dim: usize,
    /// The dtype of the layer's input and output (the activations).
    pub(crate) dtype: DType,
    /// The dtype the products run in (bitsandbytes' `bnb_4bit_compute_dtype`): the same
    /// as `dtype`, or bf16 for f32 activations on a CPU with bf16 dot products
    /// ([`crate::model::activation_dtype`]). A dense weight is kept in it.
    pub(crate) products: DType,
}

/// A frozen linear layer.
#[derive(Debug, Clone)]
pub struct FrozenLinear {
    pub(crate) inner: Arc<FrozenInner>,
}

impl FrozenLinear {
    /// `weight` `[out, in]`, `bias` `[out]`; `dtype` is the compute dtype (F32 or BF16),
    /// of the products and of the activations alike.
    pub fn new(weight: FrozenWeight, bias: Option<Tensor>, dtype: DType) -> candle_core::Result<Self> {
        Self::mixed(weight, bias, dtype, dtype)
    }

    /// Like [`FrozenLinear::new`], with activations (input, output, bias) in `activations`
    /// and the products in `products` (a dense weight is kept in it): f32 activations with
    /// bf16 products are what bf16 compute runs on a CPU with bf16 dot products
    /// ([`crate::model::activation_dtype`]).
    pub fn mixed(weight: FrozenWeight, bias: Option<Tensor>, activations: DType, products: DType) -> candle_core::Result<Self> {
        let dtype = activations;
        let nf4_dims = |s: &[usize]| match s {
            [o, i] => Ok((*o, *i)),
            s => Err(candle_core::Error::Msg(format!("nf4 linear weight must be 2-d, got {s:?}"))),
        };
        let (out_dim, in_dim) = match &weight {
            FrozenWeight::Dense(w) => w.dims2()?,
            FrozenWeight::Nf4(q) => nf4_dims(&q.shape)?,
            FrozenWeight::Nf4Device(q) => nf4_dims(q.shape())?,
        };
        let weight = match weight {
            FrozenWeight::Dense(w) => FrozenWeight::Dense(w.to_dtype(products)?.contiguous()?),
            q => q,
        };
        let bias = bias.map(|b| b.to_dtype(dtype)).transpose()?;
        let bias_f32 = bias.as_ref().map(|b| b.to_dtype(DType::F32)?.to_vec1::<f32>()).transpose()?;
        if let Some(b) = &bias_f32 {
            if b.len() != out_dim {
                candle_core::bail!("linear bias has {} values, weight has {out_dim} rows", b.len());
            }
        }
        Ok(Self { inner: Arc::new(FrozenInner { weight, bias, bias_f32, out_dim, in_dim, dtype, products }) })
    }

    pub fn out_dim(&self) -> usize {
        self.inner.out_dim
    }
    pub fn in_dim(&self) -> usize {
        self.inner.in_dim
    }
    pub fn weight(&self) -> &FrozenWeight {
        &self.inner.weight
    }
    pub fn bias(&self) -> Option<&Tensor> {
        self.inner.bias.as_ref()
    }
    /// Whether this layer's products run on the bf16 dot-product kernels (bf16 compute on
    /// a CPU with AVX512-BF16; see [`crate::kernels_bf16`]).
    pub fn uses_bf16_dot(&self) -> bool {
        bf16_dot(&self.inner)
    }

    /// The weight as a dense f32 tensor `[out, in]` on `device`.
    pub fn dense_weight_f32(&self, device: &Device) -> candle_core::Result<Tensor> {
        self.inner.weight_as(DType::F32, device)
    }

    /// `x [..., in] -> [..., out]` in the compute dtype.
    pub fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let dims = x.dims().to_vec();
        let Some((&k, lead)) = dims.split_last() else { candle_core::bail!("frozen linear: scalar input") };
        if k != self.inner.in_dim {
            candle_core::bail!("frozen linear: input has {k} features, weight expects {}", self.inner.in_dim);
        }
        let m: usize = lead.iter().product();
        let x2 = x.to_dtype(self.inner.dtype)?.reshape((m, k))?;
        let y = if cpu_ops(x2.device()) {
            x2.contiguous()?.apply_op1_arc(Arc::new(Box::new(FrozenLinearFwd { inner: self.inner.clone() })))?
        } else {
            let y = x2.contiguous()?.apply_op1_arc(Arc::new(Box::new(PortableFrozenFwd { inner: self.inner.clone() })))?;
            match &self.inner.bias {
                Some(b) => y.broadcast_add(&b.to_device(x.device())?)?,
                None => y,
            }
        };
        let mut out_dims = lead.to_vec();
        out_dims.push(self.inner.out_dim);
        y.reshape(out_dims)
    }
}

pub(crate) fn cpu_f32<'a>(s: &'a CpuStorage, l: &Layout, what: &str) -> candle_core::Result<std::borrow::Cow<'a, [f32]>> {
    let Some((a, b)) = l.contiguous_offsets() else { candle_core::bail!("{what}: input must be contiguous") };
    Ok(match s {
        CpuStorage::F32(v) => std::borrow::Cow::Borrowed(&v[a..b]),
        CpuStorage::BF16(v) => std::borrow::Cow::Owned(v[a..b].iter().map(|&x| bf16_to_f32(x)).collect()),
        CpuStorage::F16(v) => std::borrow::Cow::Owned(v[a..b].iter().map(|x| x.to_f32()).collect()),
        CpuStorage::F64(v) => std::borrow::Cow::Owned(v[a..b].iter().map(|&x| x as f32).collect()),
        _ => candle_core::bail!("{what}: unsupported dtype {:?}", s.dtype()),
    })
}

/// bf16 -> f32 (exact), written as integer ops so that conversion loops vectorize.
#[inline(always)]
pub(crate) fn bf16_to_f32(x: bf16) -> f32 {
    f32::from_bits((x.to_bits() as u32) << 16)
}

/// f32 -> bf16 rounding to nearest, ties to even (NaN stays a quiet NaN): the same
/// values as `half::bf16::from_f32`, written as integer ops that vectorize.
#[inline(always)]
pub(crate) fn f32_to_bf16(x: f32) -> bf16 {
    let b = x.to_bits();
    let rounded = (b.wrapping_add(0x7fff).wrapping_add((b >> 16) & 1) >> 16) as u16;
    let nan = ((b >> 16) as u16) | 0x40;
    bf16::from_bits(if b & 0x7fff_ffff > 0x7f80_0000 { nan } else { rounded })
}

/// A CPU tensor of `dtype` (no gradient tracking) from values computed in f32.
pub(crate) fn cpu_tensor(v: Vec<f32>, shape: impl Into<Shape>, dtype: DType) -> candle_core::Result<Tensor> {
    Ok(Tensor::from_storage(Storage::Cpu(to_storage(v, dtype)?), shape, candle_core::op::BackpropOp::none(), false))
}

pub(crate) fn to_storage(v: Vec<f32>, dtype: DType) -> candle_core::Result<CpuStorage> {
    Ok(match dtype {
        DType::F32 => CpuStorage::F32(v),
        DType::BF16 => CpuStorage::BF16(v.into_iter().map(f32_to_bf16).collect()),
        DType::F16 => CpuStorage::F16(v.into_iter().map(half::f16::from_f32).collect()),
        DType::F64 => CpuStorage::F64(v.into_iter().map(|x| x as f64).collect()),
        d => candle_core::bail!("unsupported compute dtype {d:?}"),
    })
}

/// Run `f` with the weight as a row-major f32 `[out, in]` matrix: in place (f32) or as
/// NF4 rows for the built-in kernels, which dequantize block by block; a dequantized or
/// converted copy otherwise.
pub(crate) fn with_weight_rows<R>(inner: &FrozenInner, f: impl FnOnce(Rows) -> R) -> candle_core::Result<R> {
    let kernels = crate::blas::kernel_isa().is_some();
    match &inner.weight {
        FrozenWeight::Nf4(q) if kernels => Ok(f(Rows::Nf4(q))),
        FrozenWeight::Dense(w) if kernels && w.dtype() == DType::BF16 => {
            let (storage, layout) = w.storage_and_layout();
            match (&*storage, layout.contiguous_offsets()) {
                (Storage::Cpu(CpuStorage::BF16(v)), Some((a, b))) => Ok(f(Rows::Bf16(&v[a..b]))),
                _ => candle_core::bail!("frozen linear: bf16 weight is not a contiguous cpu tensor"),
            }
        }
        _ => with_weight_f32(inner, |w| f(Rows::F32(w))),
    }
}

/// Whether a layer's frozen products run on the bf16 dot-product kernels
/// ([`crate::kernels_bf16`]): bf16 products, the AVX-512 kernels as the backend, a CPU
/// with AVX512-BF16, and `LORAFLEET_BF16_DOT` not `off`.
pub(crate) fn bf16_dot(inner: &FrozenInner) -> bool {
    inner.products == DType::BF16 && bf16_dot_products()
}

/// Whether bf16 compute's frozen products run on the bf16 dot-product kernels in this
/// process: the AVX-512 kernels as the backend, a CPU with AVX512-BF16, and
/// `LORAFLEET_BF16_DOT` not `off` (decided once).
pub fn bf16_dot_products() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| {
        std::env::var("LORAFLEET_BF16_DOT").map_or(true, |v| v != "off")
            && matches!(crate::blas::kernel_isa(), Some(crate::kernels::Isa::Avx512))
            && crate::kernels_bf16::available()
    })
}

/// `y[m, out] (+)= x[m, in] W^T` on the process-wide backend.
pub(crate) fn frozen_fwd(inner: &FrozenInner, m: usize, x: &[f32], y: &mut [f32], accumulate: bool) -> candle_core::Result<()> {
    let (n, k) = (inner.out_dim, inner.in_dim);
    with_weight_rows(inner, |w| match (crate::blas::backend(), w) {
        (crate::blas::Backend::Kernels(_), w) if bf16_dot(inner) => crate::kernels_bf16::linear_fwd(m, n, k, x, w, y, accumulate, true),
        (crate::blas::Backend::Kernels(isa), w) => crate::kernels::linear_fwd(*isa, m, n, k, x, w, y, accumulate),
        // rhs = W^T: element (kk, nn) = W[nn, kk] at nn * k + kk.
        (_, Rows::F32(w)) => crate::blas::sgemm(m, n, k, y, accumulate, x, w, true),
        (_, Rows::Nf4(_) | Rows::Bf16(_)) => unreachable!("NF4 and bf16 rows are only handed to the built-in kernels"),
    })
}

/// A layer's `[m, out]` output before its products: the bias in every row (then `true`:
/// the products accumulate onto it), or zeros.
pub(crate) fn output_rows(inner: &FrozenInner, m: usize) -> (Vec<f32>, bool) {
    let mut y = vec![0f32; m * inner.out_dim];
    match &inner.bias_f32 {
        Some(b) => {
            y.chunks_exact_mut(inner.out_dim.max(1)).for_each(|row| row.copy_from_slice(b));
            (y, true)
        }
        None => (y, false),
    }
}

/// `gx[m, in] = g[m, out] W` on the process-wide backend.
pub(crate) fn frozen_bwd(inner: &FrozenInner, m: usize, g: &[f32], gx: &mut [f32]) -> candle_core::Result<()> {
    let (n, k) = (inner.out_dim, inner.in_dim);
    with_weight_rows(inner, |w| match (crate::blas::backend(), w) {
        (crate::blas::Backend::Kernels(_), w) if bf16_dot(inner) => crate::kernels_bf16::linear_bwd(m, n, k, g, w, gx, false, true),
        (crate::blas::Backend::Kernels(isa), w) => crate::kernels::linear_bwd(*isa, m, n, k, g, w, gx, false),
        // rhs = W: element (nn, kk) at nn * k + kk.
        (_, Rows::F32(w)) => crate::blas::sgemm(m, k, n, gx, false, g, w, false),
        (_, Rows::Nf4(_) | Rows::Bf16(_)) => unreachable!("NF4 and bf16 rows are only handed to the built-in kernels"),
    })
}

/// Run `f` with the weight as a row-major f32 `[out, in]` slice.
fn with_weight_f32<R>(inner: &FrozenInner, f: impl FnOnce(&[f32]) -> R) -> candle_core::Result<R> {
    match &inner.weight {
        FrozenWeight::Nf4(q) => {
            let mut buf = vec![0f32; inner.out_dim * inner.in_dim];
            q.dequantize_into(&mut buf);
            Ok(f(&buf))
        }
        FrozenWeight::Nf4Device(_) => {
            let buf = inner.weight_as(DType::F32, &Device::Cpu)?.flatten_all()?.to_vec1::<f32>()?;
            Ok(f(&buf))
        }
        FrozenWeight::Dense(w) => {
            let (storage, layout) = w.storage_and_layout();
            match &*storage {
                Storage::Cpu(s) => {
                    let v = cpu_f32(s, layout, "frozen weight")?;
                    Ok(f(&v))
                }
                _ => candle_core::bail!("frozen linear: weight is not on the cpu"),
            }
        }
    }
}

struct FrozenLinearFwd {
    inner: Arc<FrozenInner>,
}

impl candle_core::CustomOp1 for FrozenLinearFwd {
    fn name(&self) -> &'static str {
        "frozen-linear"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let _span = crate::profile::span(crate::profile::Op::FrozenFwd);
        let (m, _k) = l.shape().dims2()?;
        let n = self.inner.out_dim;
        let x = cpu_f32(s, l, "frozen linear")?;
        let (mut dst, read_dst) = output_rows(&self.inner, m);
        frozen_fwd(&self.inner, m, &x, &mut dst, read_dst)?;
        Ok((to_storage(dst, s.dtype())?, Shape::from((m, n))))
    }

    fn bwd(&self, _arg: &Tensor, _res: &Tensor, grad_res: &Tensor) -> candle_core::Result<Option<Tensor>> {
        let g = grad_res.contiguous()?;
        Ok(Some(g.apply_op1_no_bwd(&FrozenLinearBwd { inner: self.inner.clone() })?))
    }
}

/// `grad_x [m, in] = grad_y [m, out] W [out, in]`.
struct FrozenLinearBwd {
    inner: Arc<FrozenInner>,
}

impl candle_core::CustomOp1 for FrozenLinearBwd {
    fn name(&self) -> &'static str {
        "frozen-linear-bwd"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let _span = crate::profile::span(crate::profile::Op::FrozenBwd);
        let (m, _n) = l.shape().dims2()?;
        let k = self.inner.in_dim;
        let g = cpu_f32(s, l, "frozen linear backward")?;
        let mut dst = vec![0f32; m * k];
        frozen_bwd(&self.inner, m, &g, &mut dst)?;
        Ok((to_storage(dst, s.dtype())?, Shape::from((m, k))))
    }
}

/// The frozen product on any device (the portable path): `x [m, in] W^T` with candle's
/// matmul for the device, the weight in the compute dtype on x's device (NF4 dequantized
/// there for this product and dropped after it). Unlike a plain `matmul`, whose backward
/// also computes the `[out, in]` gradient of the weight, its backward is only
/// `grad_x = grad_y W` (the weight dequantized again, as bitsandbytes does, rather than
/// kept alive between forward and backward).
struct PortableFrozenFwd {
    inner: Arc<FrozenInner>,
}

impl FrozenInner {
    /// The weight as a dense `[out, in]` tensor of `dtype` on `device` (NF4 dequantized,
    /// copied across devices where it lives elsewhere).
    fn weight_as(&self, dtype: DType, device: &Device) -> candle_core::Result<Tensor> {
        match &self.weight {
            FrozenWeight::Dense(w) => w.to_dtype(dtype)?.to_device(device),
            FrozenWeight::Nf4(q) => Tensor::from_vec(q.dequantize(), (self.out_dim, self.in_dim), device)?.to_dtype(dtype),
            FrozenWeight::Nf4Device(q) => q.dequantize(dtype)?.to_device(device),
        }
    }

    /// The weight `[out, in]` in the compute dtype on `device`, where a device-resident
    /// weight must already live (the portable product never copies one per call).
    fn weight_on(&self, device: &Device) -> candle_core::Result<Tensor> {
        let stored = match &self.weight {
            FrozenWeight::Dense(w) => Some(w.device()),
            FrozenWeight::Nf4Device(q) => Some(q.device()),
            FrozenWeight::Nf4(_) => None,
        };
        if let Some(d) = stored.filter(|d| !d.same_device(device)) {
            candle_core::bail!("frozen linear: weight on {:?}, input on {device:?}", d.location());
        }
        self.weight_as(self.dtype, device)
    }
}

/// `x [m, k] W^T` for `w [n, k]` (contiguous) on any backend's storage.
fn storage_matmul_t<S: BackendStorage>(x: &S, xl: &Layout, w: &S, wl: &Layout) -> candle_core::Result<(S, Shape)> {
    let (m, k) = xl.shape().dims2()?;
    let (n, wk) = wl.shape().dims2()?;
    if k != wk {
        candle_core::bail!("frozen linear: input has {k} features, weight expects {wk}");
    }
    Ok((x.matmul(w, (1, m, n, k), xl, &wl.transpose(0, 1)?)?, Shape::from((m, n))))
}

impl candle_core::CustomOp1 for PortableFrozenFwd {
    fn name(&self) -> &'static str {
        "frozen-linear-portable"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let w = self.inner.weight_on(&Device::Cpu)?;
        let (ws, wl) = w.storage_and_layout();
        match &*ws {
            Storage::Cpu(ws) => storage_matmul_t(s, l, ws, wl),
            _ => candle_core::bail!("frozen linear: weight is not on the cpu"),
        }
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(&self, s: &candle_core::CudaStorage, l: &Layout) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        let w = self.inner.weight_on(&Device::Cuda(s.device().clone()))?;
        let (ws, wl) = w.storage_and_layout();
        match &*ws {
            Storage::Cuda(ws) => storage_matmul_t(s, l, ws, wl),
            _ => candle_core::bail!("frozen linear: weight is not on the input's cuda device"),
        }
    }

    fn bwd(&self, _arg: &Tensor, _res: &Tensor, grad_res: &Tensor) -> candle_core::Result<Option<Tensor>> {
        let w = self.inner.weight_on(grad_res.device())?;
        Ok(Some(grad_res.matmul(&w)?))
    }
}

/// Backward function of a checkpointed block: `(block input, grad of block output) ->
/// grad of block input`.
pub type RecomputeFn = dyn Fn(&Tensor, &Tensor) -> candle_core::Result<Tensor> + Send + Sync;

/// Gradient checkpointing hook: `hook(x, anchor)` is all zeros shaped like `x` in the
/// forward pass (the caller adds it to the block output computed without a graph); its
/// backward calls the recompute function. `anchor` is any variable: it keeps the hook in
/// candle's graph even when `x` itself depends on no variable (the first block).
pub struct CheckpointHook {
    pub recompute: Arc<RecomputeFn>,
}

impl candle_core::CustomOp2 for CheckpointHook {
    fn name(&self) -> &'static str {
        "checkpoint-hook"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, _s2: &CpuStorage, _l2: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        Ok((candle_core::cpu_backend::CpuDevice.zeros_impl(l1.shape(), s1.dtype())?, l1.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        _s2: &candle_core::CudaStorage,
        _l2: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        Ok((s1.device().zeros_impl(l1.shape(), s1.dtype())?, l1.shape().clone()))
    }

    fn bwd(&self, arg1: &Tensor, _arg2: &Tensor, _res: &Tensor, grad_res: &Tensor) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        Ok((Some((self.recompute)(arg1, grad_res)?), None))
    }
}

/// A checkpointed block's output on the CPU, as one op on the block's input: forward it
/// is `out` (the block computed without a graph), backward it calls the recompute
/// function. It replaces `out + hook(x)` there, whose forward zero-filled a tensor and
/// added it, and whose backward zero-filled and added a gradient for both terms (with
/// bf16 compute, through candle's scalar bf16 arithmetic).
pub struct CheckpointOut {
    /// Taken (moved into the op's result) by the forward pass.
    pub out: std::sync::Mutex<Option<Tensor>>,
    pub recompute: Arc<RecomputeFn>,
}

impl candle_core::CustomOp2 for CheckpointOut {
    fn name(&self) -> &'static str {
        "checkpoint-out"
    }

    fn cpu_fwd(&self, _s1: &CpuStorage, l1: &Layout, _s2: &CpuStorage, _l2: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let out = self.out.lock().map_err(|_| candle_core::Error::Msg("checkpoint state poisoned".into()))?.take();
        let Some(out) = out else { candle_core::bail!("checkpoint: forward ran twice") };
        if out.shape() != l1.shape() {
            candle_core::bail!("checkpoint: block output {:?} is not shaped like its input {:?}", out.dims(), l1.dims());
        }
        let (storage, layout) = out.storage_and_layout();
        let Storage::Cpu(src) = &*storage else { candle_core::bail!("checkpoint: cpu block output expected") };
        // SAFETY: every element is written by the copy below.
        let mut dst = unsafe { candle_core::cpu_backend::CpuDevice.alloc_uninit(layout.shape(), src.dtype())? };
        src.copy_strided_src(&mut dst, 0, layout)?;
        Ok((dst, layout.shape().clone()))
    }

    fn bwd(&self, arg1: &Tensor, _arg2: &Tensor, _res: &Tensor, grad_res: &Tensor) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        Ok((Some((self.recompute)(arg1, grad_res)?), None))
    }
}

/// A scalar whose gradient with respect to its input `y` is `grad` (CPU): what a
/// checkpointed block's recomputation backpropagates from, in place of `sum(y * grad)`
/// (a product, a sum and, for bf16, two conversions, each with its backward).
pub struct GradSeed {
    pub grad: std::sync::Mutex<Option<Tensor>>,
}

impl candle_core::CustomOp1 for GradSeed {
    fn name(&self) -> &'static str {
        "grad-seed"
    }

    fn cpu_fwd(&self, _s: &CpuStorage, _l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        Ok((CpuStorage::F32(vec![0.0]), Shape::from(())))
    }

    fn bwd(&self, arg: &Tensor, _res: &Tensor, _grad_res: &Tensor) -> candle_core::Result<Option<Tensor>> {
        let g = self.grad.lock().map_err(|_| candle_core::Error::Msg("gradient seed poisoned".into()))?.take();
        match g {
            Some(g) if g.shape() == arg.shape() => Ok(Some(g.to_dtype(arg.dtype())?)),
            Some(g) => candle_core::bail!("gradient seed {:?} for an output {:?}", g.dims(), arg.dims()),
            None => candle_core::bail!("gradient seed used twice"),
        }
    }
}

// ---------------------------------------------------------------------------------
// Differentiable building blocks.

/// The dtype reductions run in: f32, or f64 for f64 inputs.
pub fn wide(dt: DType) -> DType {
    if dt == DType::F64 {
        DType::F64
    } else {
        DType::F32
    }
}

/// Llama RMSNorm: computed in f32, normalized value cast back, then scaled by `w`.
pub fn rms_norm(x: &Tensor, w: &Tensor, eps: f64) -> candle_core::Result<Tensor> {
    let dt = x.dtype();
    let xf = x.to_dtype(wide(dt))?;
    let var = xf.sqr()?.mean_keepdim(D::Minus1)?;
    let y = xf.broadcast_mul(&(var + eps)?.sqrt()?.recip()?)?;
    y.to_dtype(dt)?.broadcast_mul(w)
}

/// LayerNorm with weight and bias (biased variance), computed in f32.
pub fn layer_norm(x: &Tensor, w: &Tensor, b: &Tensor, eps: f64) -> candle_core::Result<Tensor> {
    let dt = x.dtype();
    let wd = wide(dt);
    let xf = x.to_dtype(wd)?;
    let mean = xf.mean_keepdim(D::Minus1)?;
    let xc = xf.broadcast_sub(&mean)?;
    let var = xc.sqr()?.mean_keepdim(D::Minus1)?;
    let y = xc.broadcast_div(&(var + eps)?.sqrt()?)?;
    y.broadcast_mul(&w.to_dtype(wd)?)?.broadcast_add(&b.to_dtype(wd)?)?.to_dtype(dt)
}

/// Softmax over the last dimension (differentiable composite form).
pub fn softmax_last(x: &Tensor) -> candle_core::Result<Tensor> {
    let max = x.max_keepdim(D::Minus1)?.detach();
    let e = x.broadcast_sub(&max)?.exp()?;
    let s = e.sum_keepdim(D::Minus1)?;
    e.broadcast_div(&s)
}

/// `cat(-x2, x1)` over the last dimension.
pub fn rotate_half(x: &Tensor) -> candle_core::Result<Tensor> {
    let d = x.dim(D::Minus1)?;
    let x1 = x.narrow(D::Minus1, 0, d / 2)?;
    let x2 = x.narrow(D::Minus1, d / 2, d - d / 2)?;
    Tensor::cat(&[&x2.neg()?, &x1], D::Minus1)
}

/// Rotary embedding (non-interleaved, "rotate half"): `x [b, h, s, d]`, `cos`/`sin`
/// `[b, s, d]`.
pub fn rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> candle_core::Result<Tensor> {
    let cos = cos.unsqueeze(1)?.to_dtype(x.dtype())?;
    let sin = sin.unsqueeze(1)?.to_dtype(x.dtype())?;
    x.broadcast_mul(&cos)? + rotate_half(x)?.broadcast_mul(&sin)?
}

/// Exact (erf) GELU.
pub fn gelu_erf(x: &Tensor) -> candle_core::Result<Tensor> {
    x.gelu_erf()
}

/// SiLU `x * sigmoid(x)`.
pub fn silu(x: &Tensor) -> candle_core::Result<Tensor> {
    x.silu()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The portable frozen product (what CUDA runs) against the CPU op: forward with bias
    /// and the input gradient, for full-precision, host NF4 and device NF4 weights, f32
    /// and bf16.
    #[test]
    fn portable_frozen_linear_equals_the_cpu_op() {
        let dev = Device::Cpu;
        let (m, k, n) = (5usize, 70usize, 33usize);
        let wv: Vec<f32> = (0..n * k).map(|i| ((i as f32) * 0.011).sin()).collect();
        let xv: Vec<f32> = (0..m * k).map(|i| ((i as f32) * 0.07).cos()).collect();
        let gv: Vec<f32> = (0..m * n).map(|i| ((i as f32) * 0.13).sin()).collect();
        let q = Arc::new(Nf4Tensor::quantize(&wv, &[n, k], true).unwrap());
        for dtype in [DType::F32, DType::BF16] {
            let bias = Tensor::from_vec((0..n).map(|i| i as f32 * 0.1).collect::<Vec<_>>(), n, &dev).unwrap();
            let dense = Tensor::from_vec(wv.clone(), (n, k), &dev).unwrap();
            for (what, w) in [
                ("dense", FrozenWeight::Dense(dense)),
                ("nf4", FrozenWeight::Nf4(q.clone())),
                ("device nf4", FrozenWeight::Nf4Device(Arc::new(DeviceNf4::upload(&q, &dev).unwrap()))),
            ] {
                let lin = FrozenLinear::new(w, Some(bias.clone()), dtype).unwrap();
                let run = |portable: bool| {
                    let x = candle_core::Var::from_vec(xv.clone(), (m, k), &dev).unwrap();
                    let xd = x.as_tensor().to_dtype(dtype).unwrap();
                    let y = if portable {
                        xd.apply_op1_arc(Arc::new(Box::new(PortableFrozenFwd { inner: lin.inner.clone() })))
                            .unwrap()
                            .broadcast_add(lin.bias().unwrap())
                            .unwrap()
                    } else {
                        xd.apply_op1_arc(Arc::new(Box::new(FrozenLinearFwd { inner: lin.inner.clone() }))).unwrap()
                    };
                    assert_eq!(y.dtype(), dtype);
                    let g = Tensor::from_vec(gv.clone(), (m, n), &dev).unwrap();
                    let s = (y.to_dtype(DType::F32).unwrap() * g).unwrap().sum_all().unwrap();
                    let gx = s.backward().unwrap().get(x.as_tensor()).unwrap().clone();
                    (y.to_dtype(DType::F32).unwrap(), gx)
                };
                let ((y0, g0), (y1, g1)) = (run(false), run(true));
                let max = |a: &Tensor| a.abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap();
                let diff = |a: &Tensor, b: &Tensor| max(&(a - b).unwrap());
                // f32: summation order only; bf16: one rounding of the result either way,
                // but candle's bf16 product may round differently (a unit in the last place).
                let tol = if dtype == DType::F32 { 1e-5 } else { 2f32.powi(-7) } * max(&y0).max(max(&g0)).max(1.0);
                assert!(diff(&y0, &y1) < tol, "{what} {dtype:?}: forward differs by {}", diff(&y0, &y1));
                assert!(diff(&g0, &g1) < tol, "{what} {dtype:?}: input gradient differs by {}", diff(&g0, &g1));
            }
        }
    }

    #[test]
    fn bf16_conversions_equal_the_half_crate() {
        // Ties both ways, the largest finite values (rounding into infinity), subnormals,
        // signed zeros, infinities, NaNs, and a sweep of bit patterns.
        let mut bits: Vec<u32> = vec![
            0, 0x8000_0000, 0x0000_8000, 0x0001_8000, 0x0001_7fff, 0x0000_8001, 0x7f7f_ffff, 0xff7f_ffff, 0x7f7f_8000,
            0x0000_0001, 0x8000_0001, 0x7f80_0000, 0xff80_0000, 0x7fc0_0000, 0x7f80_0001, 0xffff_ffff, 0x3f80_8000, 0x3f81_8000,
        ];
        bits.extend((0..200_000u32).map(|i| i.wrapping_mul(0x9e37_79b9)));
        for b in bits {
            let x = f32::from_bits(b);
            let (ours, theirs) = (f32_to_bf16(x), bf16::from_f32(x));
            if x.is_nan() {
                assert!(ours.is_nan(), "{b:#x}: NaN stays NaN");
            } else {
                assert_eq!(ours.to_bits(), theirs.to_bits(), "{b:#x}");
            }
            let h = bf16::from_bits((b >> 16) as u16);
            if h.is_nan() {
                assert!(bf16_to_f32(h).is_nan(), "{:#x}: NaN stays NaN", b >> 16);
            } else {
                assert_eq!(bf16_to_f32(h).to_bits(), h.to_f32().to_bits(), "{:#x}", b >> 16);
            }
        }
    }
}

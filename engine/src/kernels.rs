//! Single-precision products for x86-64 CPUs with AVX-512F or AVX2 + FMA, written for
//! the frozen linear layers of LoRA training: a few hundred activation rows against
//! large weights that are full precision or NF4.
//!
//! One register-blocked micro-kernel computes a `MR x NR` (12 x 32) tile with fused
//! multiply-adds. With AVX-512 ([`Isa::Avx512`]) that is one pass: per step of the inner
//! dimension two 16-lane loads of a B row, `MR` broadcasts from the A rows, `2 * MR` FMAs
//! into 24 zmm accumulators. With AVX2 ([`Isa::Avx2`]; 16 ymm registers) it is four
//! passes of a 6 x 16 kernel (12 accumulators, two 8-lane B loads and six broadcasts per
//! step) over the same operands. Both operands are read in place with their row strides;
//! only what is not laid out for it is copied into small per-thread buffers:
//! - forward `y = x W^T` ([`Isa::linear_fwd`]) computes `y^T = W x^T` tile by tile: A is
//!   12 rows of W (read in place, or dequantized from NF4 a 12 x 2048 block at a time), B
//!   is a block of `x^T` (transposed once per block), and tiles are written back
//!   transposed;
//! - input gradient `gx = g W` ([`Isa::linear_bwd`]): A is rows of g in place, B is rows
//!   of W (in place, or dequantized a 256-row block at a time).
//!
//! So an NF4 weight is never dequantized as a whole, and a full-precision weight is never
//! copied. Threads (candle's worker pool) own disjoint output column ranges and
//! never wait for each other.
//!
//! Why it exists: candle's own CPU matmul (the gemm crate) reaches a third of what these
//! cores can do, a system BLAS is not always installed, and even where it is, it cannot
//! fold the LoRA products into the frozen product's tiles or read NF4 weights without a
//! dequantized copy. On AMD Zen 4/5 the system OpenBLAS also runs its AVX2 kernels
//! (older releases do not know these CPUs, and machines pin `OPENBLAS_CORETYPE=Haswell`
//! because the AVX-512 kernels of those releases misbehave there), which leaves half of
//! the cores' FMA throughput unused.

#[cfg(target_arch = "x86_64")]
use std::arch::x86_64::*;

use crate::nf4::Nf4Tensor;

/// Rows of a micro-tile.
pub(crate) const MR: usize = 12;
/// Columns of a micro-tile (two 16-lane vectors).
pub(crate) const NR: usize = 32;
/// Depth of a block: the `KC x NR` B panel (32 KiB) stays in L1 next to the A rows.
const KC: usize = 256;
/// Rows of the left operand per block (`MC x KC` floats = 256 KiB, in L2).
const MC: usize = 256;

/// The instruction set a kernel runs on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Isa {
    /// AVX-512F: one 12 x 32 tile per pass in 24 zmm accumulators.
    Avx512,
    /// AVX2 and FMA (Intel Haswell and later, AMD Zen): four 6 x 16 passes per tile.
    Avx2,
}

impl Isa {
    /// Every instruction set of this module, the fastest first.
    pub const ALL: [Isa; 2] = [Isa::Avx512, Isa::Avx2];

    /// Whether this CPU can run it.
    pub fn supported(self) -> bool {
        #[cfg(target_arch = "x86_64")]
        {
            match self {
                Isa::Avx512 => std::arch::is_x86_feature_detected!("avx512f"),
                Isa::Avx2 => std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma"),
            }
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            false
        }
    }

    /// The fastest instruction set this CPU supports, if any.
    pub fn detect() -> Option<Isa> {
        Isa::ALL.into_iter().find(|i| i.supported())
    }

    /// `avx512` or `avx2` (as `LORAFLEET_BLAS` spells it).
    pub fn name(self) -> &'static str {
        match self {
            Isa::Avx512 => "avx512",
            Isa::Avx2 => "avx2",
        }
    }
}

/// Whether this CPU can run the kernels of this module (on some instruction set).
pub fn available() -> bool {
    Isa::detect().is_some()
}

/// A row-major `[rows, cols]` matrix of frozen weights: f32, or bf16 or NF4 (converted
/// or dequantized to f32 a block at a time, never as a whole).
#[derive(Clone, Copy)]
pub enum Rows<'a> {
    F32(&'a [f32]),
    Bf16(&'a [half::bf16]),
    Nf4(&'a Nf4Tensor),
}

impl Rows<'_> {
    /// Elements `[row * cols + col, .. + out.len())`.
    pub(crate) fn read(&self, row: usize, cols: usize, col: usize, out: &mut [f32]) {
        let start = row * cols + col;
        match self {
            Rows::F32(v) => out.copy_from_slice(&v[start..start + out.len()]),
            Rows::Bf16(v) => {
                let src = &v[start..start + out.len()];
                out.iter_mut().zip(src).for_each(|(o, &b)| *o = crate::ops::bf16_to_f32(b))
            }
            Rows::Nf4(q) => q.dequantize_range(start, out),
        }
    }

    pub(crate) fn len(&self) -> usize {
        match self {
            Rows::F32(v) => v.len(),
            Rows::Bf16(v) => v.len(),
            Rows::Nf4(q) => q.numel(),
        }
    }
}

/// Raw output pointer shared by the threads, each writing disjoint elements (f32
/// outputs; `u32` for the bf16 kernels' packed pairs).
#[derive(Clone, Copy)]
pub(crate) struct Out<T = f32>(pub(crate) *mut T);
// SAFETY: threads write disjoint parts of the output (see the callers).
unsafe impl<T> Send for Out<T> {}
unsafe impl<T> Sync for Out<T> {}

impl<T> Out<T> {
    /// The element `i` (a method, so that closures capture the whole `Out`).
    pub(crate) fn at(&self, i: usize) -> *mut T {
        self.0.wrapping_add(i)
    }
}

/// A `MR x NR` tile (row-major) as computed by a micro-kernel, written where it goes.
pub(crate) struct Tile<'a>(pub(crate) &'a [f32; MR * NR]);

impl Tile<'_> {
    /// Transposed into rows `row0 ..` of an output with `n` columns: `out[(row0 + c) * n
    /// + j + r] (+)= tile[r][c]` for `r < rows`, `c < cols`.
    ///
    /// # Safety
    /// Those elements are inside the output and no other thread writes them.
    #[allow(clippy::too_many_arguments)]
    pub(crate) unsafe fn store_transposed(&self, out: Out, n: usize, row0: usize, j: usize, rows: usize, cols: usize, acc: bool) {
        #[cfg(target_arch = "x86_64")]
        if rows == MR && cols == NR && std::arch::is_x86_feature_detected!("avx512f") {
            return store_transposed_avx512(self.0, out, n, row0, j, acc);
        }
        self.store_transposed_scalar(out, n, row0, j, rows, cols, acc)
    }

    /// [`Tile::store_transposed`] element by element.
    ///
    /// # Safety
    /// As [`Tile::store_transposed`].
    #[allow(clippy::too_many_arguments)]
    pub(crate) unsafe fn store_transposed_scalar(&self, out: Out, n: usize, row0: usize, j: usize, rows: usize, cols: usize, acc: bool) {
        for c in 0..cols {
            let dst = std::slice::from_raw_parts_mut(out.at((row0 + c) * n + j), rows);
            if acc {
                dst.iter_mut().enumerate().for_each(|(r, d)| *d += self.0[r * NR + c]);
            } else {
                dst.iter_mut().enumerate().for_each(|(r, d)| *d = self.0[r * NR + c]);
            }
        }
    }

    /// Its top-left `rows x cols` corner at `(row0, col0)` of an output with row stride
    /// `ld`: `out[(row0 + r) * ld + col0 + c] (+)= tile[r][c]`.
    ///
    /// # Safety
    /// As [`Tile::store_transposed`].
    #[allow(clippy::too_many_arguments)]
    pub(crate) unsafe fn store(&self, out: Out, ld: usize, row0: usize, col0: usize, rows: usize, cols: usize, acc: bool) {
        for r in 0..rows {
            let dst = std::slice::from_raw_parts_mut(out.at((row0 + r) * ld + col0), cols);
            let src = &self.0[r * NR..r * NR + cols];
            if acc {
                dst.iter_mut().zip(src).for_each(|(d, s)| *d += s);
            } else {
                dst.copy_from_slice(src);
            }
        }
    }
}

/// A whole tile stored transposed ([`Tile::store_transposed`] with all `MR` rows and
/// `NR` columns): each 16-column half transposed in registers (rows padded to 16), then
/// one 12-lane masked store (after a masked load and add when accumulating) per output
/// row, instead of 384 scalar stores.
///
/// # Safety
/// AVX-512F; as [`Tile::store_transposed`].
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn store_transposed_avx512(tile: &[f32; MR * NR], out: Out, n: usize, row0: usize, j: usize, acc: bool) {
    const LANES: __mmask16 = (1 << MR) - 1;
    for half in 0..2 {
        let mut r = [_mm512_setzero_ps(); 16];
        for (i, v) in r.iter_mut().enumerate().take(MR) {
            *v = _mm512_loadu_ps(tile.as_ptr().add(i * NR + half * 16));
        }
        let r = transpose16(r);
        for (c, &v) in r.iter().enumerate() {
            let p = out.at((row0 + half * 16 + c) * n + j);
            let v = if acc { _mm512_add_ps(v, _mm512_maskz_loadu_ps(LANES, p)) } else { v };
            _mm512_mask_storeu_ps(p, LANES, v);
        }
    }
}

/// The transpose of a 16 x 16 block held as 16 row vectors: 32-bit, 64-bit and two
/// 128-bit interleaving stages.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn transpose16(r: [__m512; 16]) -> [__m512; 16] {
    let mut t = [_mm512_setzero_ps(); 16];
    for i in 0..8 {
        t[2 * i] = _mm512_unpacklo_ps(r[2 * i], r[2 * i + 1]);
        t[2 * i + 1] = _mm512_unpackhi_ps(r[2 * i], r[2 * i + 1]);
    }
    let (pd, ps) = (_mm512_castps_pd, _mm512_castpd_ps);
    let mut u = [_mm512_setzero_ps(); 16];
    for i in 0..4 {
        let b = 4 * i;
        u[b] = ps(_mm512_unpacklo_pd(pd(t[b]), pd(t[b + 2])));
        u[b + 1] = ps(_mm512_unpackhi_pd(pd(t[b]), pd(t[b + 2])));
        u[b + 2] = ps(_mm512_unpacklo_pd(pd(t[b + 1]), pd(t[b + 3])));
        u[b + 3] = ps(_mm512_unpackhi_pd(pd(t[b + 1]), pd(t[b + 3])));
    }
    let mut v = [_mm512_setzero_ps(); 16];
    for h in 0..2 {
        let b = 8 * h;
        for q in 0..4 {
            v[b + q] = _mm512_shuffle_f32x4::<0x88>(u[b + q], u[b + 4 + q]);
            v[b + 4 + q] = _mm512_shuffle_f32x4::<0xdd>(u[b + q], u[b + 4 + q]);
        }
    }
    let mut w = [_mm512_setzero_ps(); 16];
    for q in 0..8 {
        w[q] = _mm512_shuffle_f32x4::<0x88>(v[q], v[8 + q]);
        w[8 + q] = _mm512_shuffle_f32x4::<0xdd>(v[q], v[8 + q]);
    }
    w
}

/// Split `0..n` into per-thread ranges aligned to `align` (one range unless `parallel`
/// and the product has enough `flops` to pay for a hand-off).
pub(crate) fn split(n: usize, align: usize, flops: usize, parallel: bool) -> Vec<std::ops::Range<usize>> {
    // candle's count, asked once (see blas::init_early: each answer may read /proc).
    static THREADS: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    let threads = if parallel { *THREADS.get_or_init(|| candle_core::utils::get_num_threads().max(1)) } else { 1 };
    // A hand-off costs ~10 µs: below ~2 MFLOP run on the calling thread.
    let threads = if flops < 2_000_000 { 1 } else { threads };
    let per = n.div_ceil(align).div_ceil(threads).max(1) * align;
    (0..threads).map(|t| (t * per).min(n)..((t + 1) * per).min(n)).filter(|r| !r.is_empty()).collect()
}

/// Run `f` over `0..n` split into per-thread ranges (on candle's worker pool), or on the
/// calling thread when the work (`flops`) is too small to hand off.
pub(crate) fn parallel_ranges(n: usize, flops: usize, f: impl Fn(std::ops::Range<usize>) + Sync) {
    run_split(split(n, 1, flops, true), f)
}

/// Run `f` on each range, in parallel on candle's own worker pool (the threads its
/// element-wise ops run on, the calling thread included), so that no second pool of
/// threads competes with it for the cores.
pub(crate) fn run_split(ranges: Vec<std::ops::Range<usize>>, f: impl Fn(std::ops::Range<usize>) + Sync) {
    if ranges.len() <= 1 {
        ranges.into_iter().for_each(&f);
        return;
    }
    let pool = candle_core::utils::barrier_pool();
    if pool.n_workers() + 1 < ranges.len() {
        ranges.into_iter().for_each(&f);
        return;
    }
    // Each of the n_workers + 1 participants runs at most one range.
    pool.execute(|t| {
        if let Some(r) = ranges.get(t) {
            f(r.clone());
        }
    });
}

/// Checks the CPU, then [`nothing_to_multiply`].
fn empty_product(isa: Isa, m: usize, n: usize, k: usize, out: &mut [f32], accumulate: bool) -> bool {
    assert!(isa.supported(), "{} kernel on a CPU without it", isa.name());
    nothing_to_multiply(m, n, k, out, accumulate)
}

/// Handles an `[m, n]` output of a product over `k = 0` (zeros, or unchanged when
/// accumulating) or with no elements: true when nothing is left to do.
pub(crate) fn nothing_to_multiply(m: usize, n: usize, k: usize, out: &mut [f32], accumulate: bool) -> bool {
    if k == 0 && !accumulate {
        out[..m * n].fill(0.0);
    }
    m == 0 || n == 0 || k == 0
}

/// Depth of one pass of the forward kernel: a tile is accumulated in registers over up
/// to this many steps before it is written back (transposed, so that is kept rare).
const KF: usize = 2048;

/// A second product folded into [`linear_fwd_ext`]: `y += x [m, r] · w^T` for `w [n, r]`,
/// accumulated in the same register tiles (the LoRA branch `(s·h) B^T`).
#[derive(Clone, Copy)]
pub struct FwdExtra<'a> {
    pub x: &'a [f32],
    pub w: &'a [f32],
    pub r: usize,
}

/// A second product folded into [`linear_bwd_ext`]: `gx += g [m, r] · w` for `w [r, cols]`
/// (the LoRA branch of the input gradient, `(s·u) A`).
#[derive(Clone, Copy)]
pub struct BwdExtra<'a> {
    pub g: &'a [f32],
    pub w: &'a [f32],
    pub r: usize,
}

/// `y[m, n] (+)= x[m, k] · W^T` for a weight `W [n, k]` (a linear layer's forward).
/// Panics when the CPU lacks `isa` (check [`Isa::supported`]) or a slice is too short.
#[allow(clippy::too_many_arguments)]
pub fn linear_fwd(isa: Isa, m: usize, n: usize, k: usize, x: &[f32], w: Rows, y: &mut [f32], accumulate: bool) {
    linear_fwd_ext(isa, m, n, k, x, w, None, y, accumulate, true)
}

/// [`linear_fwd`] plus an optional [`FwdExtra`], on the calling thread alone unless
/// `parallel`.
#[allow(clippy::too_many_arguments)]
pub fn linear_fwd_ext(isa: Isa, m: usize, n: usize, k: usize, x: &[f32], w: Rows, extra: Option<FwdExtra>, y: &mut [f32], accumulate: bool, parallel: bool) {
    if let Some(e) = &extra {
        assert!(k > 0 && e.x.len() >= m * e.r && e.w.len() >= n * e.r);
    }
    fwd_blocks(isa, m, n, k, x, w, extra.map_or(Second::None, Second::Given), y, accumulate, parallel)
}

/// A LoRA branch folded into [`lora_fwd`]: `y += (s · x A^T) B^T` for `A [r, k]`,
/// `B [n, r]`.
#[derive(Clone, Copy)]
pub struct LoraBranch<'a> {
    pub a: &'a [f32],
    pub b: &'a [f32],
    pub r: usize,
    pub scale: f32,
}

/// A LoRA layer's forward without dropout: `y[m, n] (+)= x W^T + (s · x A^T) B^T`, and
/// `hs[m, r] = s · x A^T` (kept for the backward pass). `x A^T` is computed from the
/// same transposed blocks of x as the frozen product (x is packed once, not twice), and
/// the LoRA product rides in the frozen product's register tiles.
#[allow(clippy::too_many_arguments)]
pub fn lora_fwd(isa: Isa, m: usize, n: usize, k: usize, x: &[f32], w: Rows, lora: LoraBranch, hs: &mut [f32], y: &mut [f32], accumulate: bool) {
    let r = lora.r;
    assert!(lora.a.len() >= r * k && lora.b.len() >= n * r && hs.len() >= m * r);
    if m <= crate::gemv::MAX_M || k == 0 || r == 0 {
        // Decoding (or nothing to fold): the two products one after the other.
        linear_fwd_ext(isa, m, r, k, x, Rows::F32(lora.a), None, hs, false, true);
        hs[..m * r].iter_mut().for_each(|v| *v *= lora.scale);
        let extra = (k > 0).then_some(FwdExtra { x: hs, w: lora.b, r });
        return linear_fwd_ext(isa, m, n, k, x, w, extra, y, accumulate, true);
    }
    fwd_blocks(isa, m, n, k, x, w, Second::Lora { branch: lora, hs: Out(hs.as_mut_ptr()) }, y, accumulate, true)
}

/// What [`fwd_blocks`] folds into the frozen product's tiles.
#[derive(Clone, Copy)]
enum Second<'a> {
    None,
    Given(FwdExtra<'a>),
    /// Computes its left operand `hs` (`m x r`, written through the pointer) first.
    Lora { branch: LoraBranch<'a>, hs: Out },
}

#[allow(clippy::too_many_arguments)]
fn fwd_blocks(isa: Isa, m: usize, n: usize, k: usize, x: &[f32], w: Rows, second: Second, y: &mut [f32], accumulate: bool, parallel: bool) {
    assert!(x.len() >= m * k && w.len() >= n * k && y.len() >= m * n);
    if empty_product(isa, m, n, k, y, accumulate) {
        return;
    }
    if m <= crate::gemv::MAX_M {
        // Decoding: a tile of 32 activation rows would compute 32 columns for one.
        let extra = match second {
            Second::Given(e) => Some(e),
            _ => None,
        };
        return crate::gemv::linear_fwd(isa, m, n, k, x, w, extra, y, accumulate, parallel, false);
    }
    let out = Out(y.as_mut_ptr());
    let (mut xt, mut xt2) = (Vec::new(), Vec::new());
    for ic in (0..m).step_by(MC) {
        let mc = MC.min(m - ic);
        for pc in (0..k).step_by(KF) {
            let kc = KF.min(k - pc);
            let last = pc + kc == k;
            // x^T block as contiguous NR-column panels, shared by the threads:
            // xt[t * kc * NR + p * NR + c] = x[ic + t * NR + c, pc + p], padded
            // (contiguous panels: rows of x^T at their natural stride alias in L1).
            pack_xt(&mut xt, x, k, ic, mc, pc, kc, parallel);
            let extra = match second {
                Second::None => None,
                Second::Given(e) => last.then_some(e),
                Second::Lora { branch, hs } => {
                    lora_hs_block(isa, &xt, branch, hs, k, ic, mc, pc, kc, last, parallel);
                    // SAFETY: hs has m * r floats (checked by lora_fwd); this block's rows
                    // are complete and nothing writes them while this borrow lives.
                    last.then(|| FwdExtra { x: unsafe { std::slice::from_raw_parts(hs.0, m * branch.r) }, w: branch.b, r: branch.r })
                }
            };
            if let Some(e) = &extra {
                pack_xt(&mut xt2, e.x, e.r, ic, mc, 0, e.r, false);
            }
            let (xt, xt2) = (&xt[..], &xt2[..]);
            let acc = accumulate || pc > 0;
            // Threads own disjoint ranges of W rows = output columns.
            run_split(split(n, MR, 2 * mc * n * kc, parallel), |cols| {
                let (mut a, mut a2) = (Vec::new(), Vec::new());
                let mut tile = [0f32; MR * NR];
                for j in cols.clone().step_by(MR) {
                    let rows = MR.min(cols.end - j);
                    // A = W[j .. j + MR, pc .. pc + kc], read in place when possible.
                    let (ap, lda) = match w {
                        Rows::F32(v) if rows == MR => (v[j * k + pc..].as_ptr(), k),
                        _ => {
                            rows_block(&mut a, w, k, j, rows, pc, kc);
                            (a.as_ptr(), kc)
                        }
                    };
                    if let Some(e) = &extra {
                        rows_block(&mut a2, Rows::F32(e.w), e.r, j, rows, 0, e.r);
                    }
                    for it in (0..mc).step_by(NR) {
                        // SAFETY: A has MR rows of kc floats at stride lda; xt has kc rows
                        // of mc_pad >= it + NR floats; tile has MR * NR floats.
                        unsafe { micro(isa, kc, ap, lda, 1, xt[it * kc..].as_ptr(), NR, tile.as_mut_ptr(), NR, false) };
                        if let Some(e) = &extra {
                            // SAFETY: as above for the MR x r block and the r-row panels.
                            unsafe { micro(isa, e.r, a2.as_ptr(), e.r, 1, xt2[it * e.r..].as_ptr(), NR, tile.as_mut_ptr(), NR, true) };
                        }
                        // tile[r][c] = y[ic + it + c, j + r].
                        // SAFETY: rows ic + it + c < m, columns j .. j + rows < n, owned by
                        // this thread.
                        unsafe { Tile(&tile).store_transposed(out, n, ic + it, j, rows, NR.min(mc - it), acc) };
                    }
                }
            });
        }
    }
}

/// Rows `ic .. ic + mc` of `hs (+)= x[.., pc .. pc + kc] A[.., pc .. pc + kc]^T` from the
/// packed `xt` (accumulated over the depth blocks, scaled by `s` after the last one);
/// threads own disjoint NR-row panels.
#[allow(clippy::too_many_arguments)]
fn lora_hs_block(isa: Isa, xt: &[f32], l: LoraBranch, hs: Out, k: usize, ic: usize, mc: usize, pc: usize, kc: usize, last: bool, parallel: bool) {
    run_split(split(mc, NR, 2 * mc * MR * kc * l.r.div_ceil(MR), parallel), |panels| {
        let mut a = Vec::new();
        let mut tile = [0f32; MR * NR];
        for j in (0..l.r).step_by(MR) {
            let rows = MR.min(l.r - j);
            rows_block(&mut a, Rows::F32(l.a), k, j, rows, pc, kc);
            for it in panels.clone().step_by(NR) {
                // SAFETY: a has MR rows of kc floats; xt has kc rows of >= it + NR floats.
                unsafe { micro(isa, kc, a.as_ptr(), kc, 1, xt[it * kc..].as_ptr(), NR, tile.as_mut_ptr(), NR, false) };
                // SAFETY: rows ic + it + c < m of hs (m x r), columns j .. j + rows < r;
                // this thread owns these panels' rows.
                unsafe { Tile(&tile).store_transposed(hs, l.r, ic + it, j, rows, NR.min(mc - it), pc > 0) };
            }
        }
        if last {
            for row in panels.start..panels.end.min(mc) {
                for c in 0..l.r {
                    // SAFETY: as above.
                    unsafe { *hs.at((ic + row) * l.r + c) *= l.scale };
                }
            }
        }
    });
}

/// `xt[t * kc * NR + p * NR + c] = x[ic + t * NR + c, pc + p]` (row stride `k`) for
/// `mc` rows, padded to whole NR panels (the padding is left as it was: its tile columns are never stored).
#[allow(clippy::too_many_arguments)]
fn pack_xt(xt: &mut Vec<f32>, x: &[f32], k: usize, ic: usize, mc: usize, pc: usize, kc: usize, parallel: bool) {
    let mc_pad = mc.div_ceil(NR) * NR;
    // Not cleared: every element of the mc rows is written below, and the padding rows
    // of a last partial panel only feed tile columns that are never stored.
    xt.resize(kc * mc_pad, 0f32);
    let xt_out = Out(xt.as_mut_ptr());
    // Panel by panel, 16 depth steps at a time: the 16 panel rows being filled (2 KiB)
    // stay in L1 while 32 rows of x are read (row by row, one pass over the whole depth
    // wrote every panel row 32 times from L2).
    const PB: usize = 16;
    // Worth a hand-off from ~64K elements (a 256-row block 256 deep): the other thread
    // would otherwise wait for it.
    run_split(split(mc, NR, mc * kc * 32, parallel), |is| {
        for t in is.start / NR..is.end.div_ceil(NR) {
            let rows = NR.min(mc - t * NR);
            for p0 in (0..kc).step_by(PB) {
                let pl = PB.min(kc - p0);
                for c in 0..rows {
                    let src = &x[(ic + t * NR + c) * k + pc + p0..][..pl];
                    // Pointer steps, not index arithmetic (checked in dev builds).
                    let mut dst = xt_out.at(t * kc * NR + p0 * NR + c);
                    for &v in src {
                        // SAFETY: inside xt (pl steps of NR from a panel row); threads own
                        // disjoint whole panels.
                        unsafe { *dst = v };
                        dst = dst.wrapping_add(NR);
                    }
                }
            }
        }
    });
}

/// `a[r * kc + p] = w[j + r, pc + p]` for `r < rows`, zero rows up to `MR`.
fn rows_block(a: &mut Vec<f32>, w: Rows, k: usize, j: usize, rows: usize, pc: usize, kc: usize) {
    a.resize(MR * kc, 0f32);
    for r in 0..MR {
        let dst = &mut a[r * kc..(r + 1) * kc];
        if r < rows {
            w.read(j + r, k, pc, dst);
        } else {
            dst.fill(0.0);
        }
    }
}

/// `gx[m, cols] (+)= g[m, rows] · W` for a weight `W [rows, cols]` (a linear layer's
/// input gradient). Panics like [`linear_fwd`].
#[allow(clippy::too_many_arguments)]
pub fn linear_bwd(isa: Isa, m: usize, rows: usize, cols: usize, g: &[f32], w: Rows, gx: &mut [f32], accumulate: bool) {
    linear_bwd_ext(isa, m, rows, cols, g, w, None, gx, accumulate, true)
}

/// [`linear_bwd`] plus an optional [`BwdExtra`], on the calling thread alone unless
/// `parallel`.
#[allow(clippy::too_many_arguments)]
pub fn linear_bwd_ext(isa: Isa, m: usize, rows: usize, cols: usize, g: &[f32], w: Rows, extra: Option<BwdExtra>, gx: &mut [f32], accumulate: bool, parallel: bool) {
    linear_bwd_any(isa, m, rows, cols, Lhs::Rows(g), Rhs::Rows(w), extra, gx, accumulate, parallel)
}

/// `out[m, cols] (+)= gt^T · W` for `gt [rows, m]` (the left operand read transposed, in
/// place) and `W [rows, cols]`: attention's `P^T dO` and `dS^T Q` without transposed
/// copies. On the calling thread alone unless `parallel`.
#[allow(clippy::too_many_arguments)]
pub(crate) fn linear_bwd_tn(isa: Isa, m: usize, rows: usize, cols: usize, gt: &[f32], w: Rows, out: &mut [f32], accumulate: bool, parallel: bool) {
    linear_bwd_any(isa, m, rows, cols, Lhs::Cols(gt), Rhs::Rows(w), None, out, accumulate, parallel)
}

/// `out[m, n] (+)= a[m, k] · bt^T` for `bt [n, k]`, tiles stored as they are (where
/// [`linear_fwd`] stores them transposed, which costs more than a shallow product's
/// FMAs): attention's `q k^T` and `do v^T` over a head's 64-128 dimensions. On the
/// calling thread alone unless `parallel`.
#[allow(clippy::too_many_arguments)]
pub(crate) fn matmul_nt(isa: Isa, m: usize, n: usize, k: usize, a: &[f32], bt: &[f32], out: &mut [f32], accumulate: bool, parallel: bool) {
    linear_bwd_any(isa, m, k, n, Lhs::Rows(a), Rhs::Cols(bt), None, out, accumulate, parallel)
}

/// The right operand of [`linear_bwd_any`] (`W [rows, cols]`).
#[derive(Clone, Copy)]
enum Rhs<'a> {
    Rows(Rows<'a>),
    /// `W^T [cols, rows]`, f32.
    Cols(&'a [f32]),
}

/// The left operand of [`linear_bwd_any`].
#[derive(Clone, Copy)]
enum Lhs<'a> {
    /// `g [m, rows]`.
    Rows(&'a [f32]),
    /// `g^T [rows, m]`.
    Cols(&'a [f32]),
}

#[allow(clippy::too_many_arguments)]
fn linear_bwd_any(isa: Isa, m: usize, rows: usize, cols: usize, lhs: Lhs, rhs: Rhs, extra: Option<BwdExtra>, gx: &mut [f32], accumulate: bool, parallel: bool) {
    let (Lhs::Rows(g) | Lhs::Cols(g)) = lhs;
    let rhs_len = match rhs {
        Rhs::Rows(w) => w.len(),
        Rhs::Cols(v) => v.len(),
    };
    assert!(g.len() >= m * rows && rhs_len >= rows * cols && gx.len() >= m * cols);
    let extra_rows = extra.map_or(0, |e| e.r);
    if let Some(e) = &extra {
        assert!(e.g.len() >= m * e.r && e.w.len() >= e.r * cols);
    }
    if empty_product(isa, m, cols, rows + extra_rows, gx, accumulate) {
        return;
    }
    // Blocks of the inner dimension: (first row, rows, from the extra product).
    let mut blocks: Vec<(usize, usize, bool)> = (0..rows).step_by(KC).map(|pc| (pc, KC.min(rows - pc), false)).collect();
    blocks.extend((0..extra_rows).step_by(KC).map(|pc| (pc, KC.min(extra_rows - pc), true)));
    let out = Out(gx.as_mut_ptr());
    // Threads own disjoint column ranges of the output (and of W).
    run_split(split(cols, NR, 2 * m * (rows + extra_rows) * cols, parallel), |range| {
        let width = range.len().div_ceil(NR) * NR;
        // B block W[pc .. pc + kc, range] as contiguous NR-column panels
        // (b[jt * kc + p * NR + c]), zero-padded: W's rows at their natural stride alias
        // in L1.
        let mut b = vec![0f32; KC * width];
        let mut row = vec![0f32; width];
        let mut a = vec![0f32; MR * KC];
        let mut tile = [0f32; MR * NR];
        for (bi, &(pc, kc, is_extra)) in blocks.iter().enumerate() {
            // Element (i, p) of the left operand at g[i * gi + p * gp].
            let (g, gi, gp, w) = match (&extra, is_extra, lhs) {
                (Some(e), true, _) => (e.g, e.r, 1, Rhs::Rows(Rows::F32(e.w))),
                (_, _, Lhs::Rows(g)) => (g, rows, 1, rhs),
                (_, _, Lhs::Cols(g)) => (g, 1, m, rhs),
            };
            // One block of output rows (the LoRA gradients' r rows): each B panel is used
            // once, so f32 rows of W are read in place and only a partial last panel is
            // packed.
            let direct = match w {
                Rhs::Rows(Rows::F32(v)) if m <= MR => Some(v),
                _ => None,
            };
            match (direct, w) {
                (Some(src), _) => {
                    let full = range.len() / NR * NR;
                    if full < range.len() {
                        let (t, cs) = (full / NR, range.len() - full);
                        for p in 0..kc {
                            let dst = &mut b[t * kc * NR + p * NR..t * kc * NR + (p + 1) * NR];
                            dst[..cs].copy_from_slice(&src[(pc + p) * cols + range.start + full..][..cs]);
                            dst[cs..].fill(0.0);
                        }
                    }
                }
                (None, Rhs::Cols(wt)) => {
                    // W[pc + p, range.start + c] = wt[(range.start + c) * rows + pc + p].
                    for t in 0..range.len().div_ceil(NR) {
                        let cs = NR.min(range.len() - t * NR);
                        let panel = &mut b[t * kc * NR..(t + 1) * kc * NR];
                        if cs < NR {
                            panel.fill(0.0);
                        }
                        for c in 0..cs {
                            let src = &wt[(range.start + t * NR + c) * rows + pc..][..kc];
                            for (d, &v) in panel[c..].iter_mut().step_by(NR).zip(src) {
                                *d = v;
                            }
                        }
                    }
                }
                (None, Rhs::Rows(w)) => {
                    for p in 0..kc {
                        // The row's slice of W: in place for f32, dequantized into `row` for NF4.
                        let src: &[f32] = match w {
                            Rows::F32(v) => &v[(pc + p) * cols + range.start..][..range.len()],
                            Rows::Bf16(_) | Rows::Nf4(_) => {
                                w.read(pc + p, cols, range.start, &mut row[..range.len()]);
                                &row[..range.len()]
                            }
                        };
                        for (t, chunk) in src.chunks(NR).enumerate() {
                            let dst = &mut b[t * kc * NR + p * NR..t * kc * NR + (p + 1) * NR];
                            dst[..chunk.len()].copy_from_slice(chunk);
                            dst[chunk.len()..].fill(0.0);
                        }
                    }
                }
            }
            let acc = accumulate || bi > 0;
            for ic in (0..m).step_by(MC) {
                let mc = MC.min(m - ic);
                // A partial last block of MR rows, copied (zero-padded) once for every panel.
                let tail = ic + mc / MR * MR;
                if tail < ic + mc {
                    let nrows = ic + mc - tail;
                    for r in 0..MR {
                        let dst = &mut a[r * kc..(r + 1) * kc];
                        if r >= nrows {
                            dst.fill(0.0);
                        } else if gp == 1 {
                            dst.copy_from_slice(&g[(tail + r) * gi + pc..(tail + r) * gi + pc + kc]);
                        } else {
                            let src = g[(tail + r) * gi + pc * gp..].iter().step_by(gp);
                            dst.iter_mut().zip(src).for_each(|(d, &v)| *d = v);
                        }
                    }
                }
                for jt in (0..range.len()).step_by(NR) {
                    let ncols = NR.min(range.len() - jt);
                    let (bt, ldb) = match direct {
                        Some(v) if ncols == NR => (v[pc * cols + range.start + jt..].as_ptr(), cols),
                        _ => (b[jt * kc..].as_ptr(), NR),
                    };
                    for i in (ic..ic + mc).step_by(MR) {
                        let nrows = MR.min(ic + mc - i);
                        let (ap, lda, pa) = if nrows == MR { (g[i * gi + pc * gp..].as_ptr(), gi, gp) } else { (a.as_ptr(), kc, 1) };
                        if ncols == NR && nrows == MR {
                            // SAFETY: A has MR rows of kc floats at strides lda, pa; B has kc rows
                            // of >= jt + NR floats at stride ldb; the full tile of gx at
                            // (i, range.start + jt) is inside gx and owned by this thread.
                            unsafe { micro(isa, kc, ap, lda, pa, bt, ldb, out.at(i * cols + range.start + jt), cols, acc) };
                            continue;
                        }
                        // SAFETY: as above, into the scratch tile.
                        unsafe { micro(isa, kc, ap, lda, pa, bt, ldb, tile.as_mut_ptr(), NR, false) };
                        // SAFETY: inside gx; this thread owns these columns.
                        unsafe { Tile(&tile).store(out, cols, i, range.start + jt, nrows, ncols, acc) };
                    }
                }
            }
        }
    });
}

/// `dst[m, n] = lhs[m, k] · rhs (+ dst if accumulate)`, row-major; `rhs` is `[k, n]`
/// (`rhs_t == false`) or the transpose of a `[n, k]` matrix (`rhs_t`).
#[allow(clippy::too_many_arguments)]
pub fn sgemm(isa: Isa, m: usize, n: usize, k: usize, dst: &mut [f32], accumulate: bool, lhs: &[f32], rhs: &[f32], rhs_t: bool) {
    if rhs_t {
        linear_fwd(isa, m, n, k, lhs, Rows::F32(rhs), dst, accumulate)
    } else {
        linear_bwd(isa, m, k, n, lhs, Rows::F32(rhs), dst, accumulate)
    }
}

/// The micro-kernel: `c[r * ldc + j] (+)= sum_p a[r * lda + p * pa] * b[p * ldb + j]`
/// for `r < MR`, `j < NR`, `p < kc`, on `isa` (`pa`: 1 for rows of A in place, the row
/// length of a matrix read transposed, with `lda` 1).
///
/// # Safety
/// The CPU supports `isa`; `a` has `MR` rows of `kc` floats at strides `lda` (rows) and
/// `pa` (depth), `b` has `kc` rows of `NR` floats at stride `ldb`, `c` has `MR` rows of
/// `NR` writable floats at stride `ldc`.
#[allow(clippy::too_many_arguments)]
#[inline]
unsafe fn micro(isa: Isa, kc: usize, a: *const f32, lda: usize, pa: usize, b: *const f32, ldb: usize, c: *mut f32, ldc: usize, accumulate: bool) {
    #[cfg(target_arch = "x86_64")]
    match isa {
        Isa::Avx512 => micro_avx512(kc, a, lda, pa, b, ldb, c, ldc, accumulate),
        Isa::Avx2 => {
            // Four 6 x 16 quarters of the 12 x 32 tile, each over the whole depth: the
            // B panel and the A rows are re-read from L1/L2, which AVX2's half-width
            // FMAs leave time for.
            for (r, col) in [(0, 0), (0, 16), (6, 0), (6, 16)] {
                micro_avx2(kc, a.wrapping_add(r * lda), lda, pa, b.wrapping_add(col), ldb, c.wrapping_add(r * ldc + col), ldc, accumulate);
            }
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    unreachable!("no {} kernel on this architecture", isa.name())
}

/// The body of a micro-kernel: `c[r * ldc + j] (+)= sum_p a[r * lda + p] b[p * ldb + j]`
/// for the listed rows `r` and two vectors of columns `j`, written out register by
/// register with unchecked pointer arithmetic, so that the accumulators stay in registers
/// in every build profile. Instantiated once per instruction set with its intrinsics
/// (zero, load, store, add, fused multiply-add, broadcast) and vector width.
#[cfg(target_arch = "x86_64")]
macro_rules! fma_tile {
    ($kc:ident, $a:ident, $lda:ident, $pa:ident, $b:ident, $ldb:ident, $c:ident, $ldc:ident, $acc:ident;
     $w:literal, $zero:ident, $load:ident, $store:ident, $add:ident, $fma:ident, $set1:ident;
     $($r:literal => $c0:ident $c1:ident),*) => {{
        $(let mut $c0 = $zero(); let mut $c1 = $zero();)*
        let (mut a, mut b) = ($a, $b);
        for _ in 0..$kc {
            let b0 = $load(b);
            let b1 = $load(b.wrapping_add($w));
            $(
                let av = $set1(*a.wrapping_add($r * $lda));
                $c0 = $fma(av, b0, $c0);
                $c1 = $fma(av, b1, $c1);
            )*
            a = a.wrapping_add($pa);
            b = b.wrapping_add($ldb);
        }
        $(
            let p = $c.wrapping_add($r * $ldc);
            if $acc {
                $c0 = $add($c0, $load(p));
                $c1 = $add($c1, $load(p.wrapping_add($w)));
            }
            $store(p, $c0);
            $store(p.wrapping_add($w), $c1);
        )*
    }};
}

/// [`micro`] on AVX-512F: the whole 12 x 32 tile in 24 zmm accumulators.
///
/// # Safety
/// As [`micro`], with AVX-512F.
#[cfg(target_arch = "x86_64")]
#[allow(clippy::too_many_arguments)]
#[target_feature(enable = "avx512f")]
unsafe fn micro_avx512(kc: usize, a: *const f32, lda: usize, pa: usize, b: *const f32, ldb: usize, c: *mut f32, ldc: usize, accumulate: bool) {
    fma_tile!(kc, a, lda, pa, b, ldb, c, ldc, accumulate;
        16, _mm512_setzero_ps, _mm512_loadu_ps, _mm512_storeu_ps, _mm512_add_ps, _mm512_fmadd_ps, _mm512_set1_ps;
        0 => c0a c0b, 1 => c1a c1b, 2 => c2a c2b, 3 => c3a c3b, 4 => c4a c4b, 5 => c5a c5b,
        6 => c6a c6b, 7 => c7a c7b, 8 => c8a c8b, 9 => c9a c9b, 10 => c10a c10b, 11 => c11a c11b);
}

/// A 6 x 16 quarter of [`micro`] on AVX2 + FMA, in 12 ymm accumulators (two B loads and
/// six broadcasts per step leave 3 of the 16 registers free).
///
/// # Safety
/// AVX2 and FMA; `a` has 6 rows of `kc` floats at strides `lda` and `pa`, `b` has `kc` rows of 16
/// floats at stride `ldb`, `c` has 6 rows of 16 writable floats at stride `ldc`.
#[cfg(target_arch = "x86_64")]
#[allow(clippy::too_many_arguments)]
#[target_feature(enable = "avx2,fma")]
unsafe fn micro_avx2(kc: usize, a: *const f32, lda: usize, pa: usize, b: *const f32, ldb: usize, c: *mut f32, ldc: usize, accumulate: bool) {
    fma_tile!(kc, a, lda, pa, b, ldb, c, ldc, accumulate;
        8, _mm256_setzero_ps, _mm256_loadu_ps, _mm256_storeu_ps, _mm256_add_ps, _mm256_fmadd_ps, _mm256_set1_ps;
        0 => c0a c0b, 1 => c1a c1b, 2 => c2a c2b, 3 => c3a c3b, 4 => c4a c4b, 5 => c5a c5b);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::blas::tests::reference;

    fn close(got: &[f32], want: &[f64], what: &str) {
        for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
            assert!((g as f64 - w).abs() < 1e-4 * (1.0 + w.abs()), "{what} [{i}]: {g} vs {w}");
        }
    }

    /// Sizes around every blocking boundary (MR, NR, KC, MC) and the thread split.
    /// (8, 100, 300): one block of output rows, B read in place with a partial panel.
    const SHAPES: [(usize, usize, usize); 9] =
        [(1, 1, 1), (13, 33, 7), (12, 32, 256), (25, 65, 257), (300, 40, 300), (30, 130, 70), (255, 96, 513), (64, 1000, 64), (8, 100, 300)];

    /// The instruction sets this CPU can run (each test covers all of them).
    fn isas() -> Vec<Isa> {
        let v: Vec<Isa> = Isa::ALL.into_iter().filter(|i| i.supported()).collect();
        if v.is_empty() {
            eprintln!("neither AVX-512F nor AVX2 + FMA on this CPU: skipped");
        }
        v
    }

    #[test]
    fn this_x86_cpu_runs_a_kernel() {
        // The development and CI machines have AVX-512; any x86-64 CPU of the last ten
        // years has AVX2. Where neither exists the other tests skip, and say so.
        if cfg!(target_arch = "x86_64") && std::env::var_os("CI").is_some() {
            assert!(Isa::Avx2.supported(), "the CI machine has no AVX2: the kernel tests would skip");
        }
    }

    #[test]
    fn sgemm_matches_a_reference_on_ragged_shapes() {
        for isa in isas() {
            ragged_shapes(isa);
        }
    }

    fn ragged_shapes(isa: Isa) {
        for &(m, n, k) in &SHAPES {
            let lhs: Vec<f32> = (0..m * k).map(|i| ((i * 37 % 101) as f32 - 50.0) / 50.0).collect();
            let rhs: Vec<f32> = (0..k * n).map(|i| ((i * 53 % 97) as f32 - 48.0) / 48.0).collect();
            for rhs_t in [false, true] {
                for accumulate in [false, true] {
                    let mut dst: Vec<f32> = (0..m * n).map(|i| (i % 7) as f32 * 0.5).collect();
                    let mut want = reference(m, n, k, &lhs, &rhs, rhs_t);
                    if accumulate {
                        want.iter_mut().zip(&dst).for_each(|(w, d)| *w += *d as f64);
                    }
                    sgemm(isa, m, n, k, &mut dst, accumulate, &lhs, &rhs, rhs_t);
                    close(&dst, &want, &format!("{isa:?} {m}x{n}x{k} t={rhs_t} acc={accumulate}"));
                }
            }
        }
    }

    #[test]
    fn a_transposed_left_operand_matches_a_reference() {
        // out[m, cols] (+)= gt^T W, gt [rows, m] read in place (full and ragged tiles).
        for isa in isas() {
            for &(m, rows, cols) in &SHAPES {
                let gt: Vec<f32> = (0..rows * m).map(|i| ((i * 37 % 101) as f32 - 50.0) / 50.0).collect();
                let w: Vec<f32> = (0..rows * cols).map(|i| ((i * 53 % 97) as f32 - 48.0) / 48.0).collect();
                let g: Vec<f32> = (0..m * rows).map(|i| gt[(i % rows) * m + i / rows]).collect();
                for accumulate in [false, true] {
                    let mut out: Vec<f32> = (0..m * cols).map(|i| (i % 7) as f32 * 0.5).collect();
                    let mut want = reference(m, cols, rows, &g, &w, false);
                    if accumulate {
                        want.iter_mut().zip(&out).for_each(|(w, d)| *w += *d as f64);
                    }
                    linear_bwd_tn(isa, m, rows, cols, &gt, Rows::F32(&w), &mut out, accumulate, true);
                    close(&out, &want, &format!("{isa:?} transposed {m}x{rows}x{cols} acc={accumulate}"));
                }
            }
        }
    }

    #[test]
    fn a_transposed_right_operand_matches_a_reference() {
        // out[m, n] (+)= a · bt^T, bt [n, k] packed from its rows.
        for isa in isas() {
            for &(m, n, k) in &SHAPES {
                let a: Vec<f32> = (0..m * k).map(|i| ((i * 37 % 101) as f32 - 50.0) / 50.0).collect();
                let bt: Vec<f32> = (0..n * k).map(|i| ((i * 53 % 97) as f32 - 48.0) / 48.0).collect();
                for accumulate in [false, true] {
                    let mut out: Vec<f32> = (0..m * n).map(|i| (i % 7) as f32 * 0.5).collect();
                    let mut want = reference(m, n, k, &a, &bt, true);
                    if accumulate {
                        want.iter_mut().zip(&out).for_each(|(w, d)| *w += *d as f64);
                    }
                    matmul_nt(isa, m, n, k, &a, &bt, &mut out, accumulate, true);
                    close(&out, &want, &format!("{isa:?} nt {m}x{n}x{k} acc={accumulate}"));
                }
            }
        }
    }

    #[test]
    fn nf4_weights_match_their_dequantized_values() {
        for isa in isas() {
            nf4_weights(isa);
        }
    }

    fn nf4_weights(isa: Isa) {
        // Row lengths that do and do not align with the 64-value NF4 blocks.
        for &(m, n, k) in &[(13, 33, 64), (25, 65, 257), (255, 96, 320), (40, 7, 130)] {
            let wv: Vec<f32> = (0..n * k).map(|i| ((i * 53 % 97) as f32 - 48.0) / 48.0).collect();
            let q = Nf4Tensor::quantize(&wv, &[n, k], true).unwrap();
            let dense = q.dequantize();
            let x: Vec<f32> = (0..m * k).map(|i| ((i * 37 % 101) as f32 - 50.0) / 50.0).collect();
            let mut y = vec![0f32; m * n];
            linear_fwd(isa, m, n, k, &x, Rows::Nf4(&q), &mut y, false);
            close(&y, &reference(m, n, k, &x, &dense, true), &format!("{isa:?} nf4 fwd {m}x{n}x{k}"));
            let g: Vec<f32> = (0..m * n).map(|i| ((i * 29 % 89) as f32 - 44.0) / 44.0).collect();
            let mut gx = vec![0f32; m * k];
            linear_bwd(isa, m, n, k, &g, Rows::Nf4(&q), &mut gx, false);
            close(&gx, &reference(m, k, n, &g, &dense, false), &format!("{isa:?} nf4 bwd {m}x{n}x{k}"));
        }
    }

    #[test]
    fn a_whole_tile_stores_transposed_like_the_scalar_code() {
        let tile: [f32; MR * NR] = std::array::from_fn(|i| i as f32 * 0.5 - 17.0);
        let (n, row0, j) = (40, 3, 7);
        for acc in [false, true] {
            let start: Vec<f32> = (0..(row0 + NR) * n).map(|i| (i % 13) as f32).collect();
            let (mut a, mut b) = (start.clone(), start.clone());
            // SAFETY: rows row0 .. row0 + NR and columns j .. j + MR are inside both.
            unsafe {
                Tile(&tile).store_transposed(Out(a.as_mut_ptr()), n, row0, j, MR, NR, acc);
                Tile(&tile).store_transposed_scalar(Out(b.as_mut_ptr()), n, row0, j, MR, NR, acc);
            }
            assert_eq!(a, b, "acc={acc}");
            assert_ne!(a, start);
        }
    }

    #[test]
    fn the_lora_forward_matches_a_reference() {
        // y = x W^T + (s x A^T) B^T and hs = s x A^T: decoding rows, ragged tiles, r over
        // MR, a depth over KF (x A^T accumulated over depth blocks), NF4 weights.
        let v = |n: usize, seed: usize| -> Vec<f32> { (0..n).map(|i| (((i * 37 + seed * 11) % 101) as f32 - 50.0) / 50.0).collect() };
        for isa in isas() {
            for &(m, n, k, r) in &[(3, 20, 50, 8), (13, 33, 64, 8), (300, 65, 257, 3), (40, 7, 2100, 16), (270, 96, 128, 13)] {
                // LoRA weights small, as trained ones are (large ones make y a cancellation
                // of big terms that f32 cannot check against f64 to 1e-4).
                let small = |n: usize, seed: usize| -> Vec<f32> { v(n, seed).into_iter().map(|e| e * 0.05).collect() };
                let (x, w, a, b) = (v(m * k, 1), v(n * k, 2), small(r * k, 3), small(n * r, 4));
                let q = Nf4Tensor::quantize(&w, &[n, k], true).unwrap();
                let dense = q.dequantize();
                for (weights, wd) in [(Rows::F32(&w), &w), (Rows::Nf4(&q), &dense)] {
                    for accumulate in [false, true] {
                        let mut y: Vec<f32> = (0..m * n).map(|i| (i % 7) as f32 * 0.5).collect();
                        let mut hs = vec![f32::NAN; m * r];
                        let mut want = reference(m, n, k, &x, wd, true);
                        if accumulate {
                            want.iter_mut().zip(&y).for_each(|(w, d)| *w += *d as f64);
                        }
                        let want_hs: Vec<f64> = reference(m, r, k, &x, &a, true).into_iter().map(|h| h * 0.5).collect();
                        lora_fwd(isa, m, n, k, &x, weights, LoraBranch { a: &a, b: &b, r, scale: 0.5 }, &mut hs, &mut y, accumulate);
                        let what = format!("{isa:?} lora fwd {m}x{n}x{k} r={r} acc={accumulate}");
                        close(&hs, &want_hs, &format!("{what} hs"));
                        // The LoRA term from the hs just checked (from the reference's own,
                        // f32 rounding of hs would be amplified by the cancellations in y).
                        want.iter_mut().zip(reference(m, n, r, &hs, &b, true)).for_each(|(w, e)| *w += e);
                        close(&y, &want, &what);
                    }
                }
            }
        }
    }

    #[test]
    fn folded_extra_products_match_a_reference() {
        for isa in isas() {
            folded_extras(isa);
        }
    }

    fn folded_extras(isa: Isa) {
        let v = |n: usize, seed: usize| -> Vec<f32> { (0..n).map(|i| (((i * 37 + seed * 11) % 101) as f32 - 50.0) / 50.0).collect() };
        for &(m, n, k, r) in &[(13, 33, 64, 8), (300, 65, 257, 3), (40, 7, 2100, 16)] {
            for parallel in [false, true] {
                // forward: y = x W^T + x2 w2^T
                let (x, w, x2, w2) = (v(m * k, 1), v(n * k, 2), v(m * r, 3), v(n * r, 4));
                let mut y = vec![0f32; m * n];
                linear_fwd_ext(isa, m, n, k, &x, Rows::F32(&w), Some(FwdExtra { x: &x2, w: &w2, r }), &mut y, false, parallel);
                let mut want = reference(m, n, k, &x, &w, true);
                want.iter_mut().zip(reference(m, n, r, &x2, &w2, true)).for_each(|(a, b)| *a += b);
                close(&y, &want, &format!("{isa:?} fwd extra {m}x{n}x{k}+{r} par={parallel}"));
                // input gradient: gx = g W + g2 w2 (W [n, k], w2 [r, k])
                let (g, g2, w2) = (v(m * n, 5), v(m * r, 6), v(r * k, 7));
                let mut gx = vec![1f32; m * k];
                linear_bwd_ext(isa, m, n, k, &g, Rows::F32(&w), Some(BwdExtra { g: &g2, w: &w2, r }), &mut gx, true, parallel);
                let mut want = reference(m, k, n, &g, &w, false);
                want.iter_mut().zip(reference(m, k, r, &g2, &w2, false)).for_each(|(a, b)| *a += b + 1.0);
                close(&gx, &want, &format!("{isa:?} bwd extra {m}x{n}x{k}+{r} par={parallel}"));
            }
        }
    }
}

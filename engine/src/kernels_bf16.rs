//! bf16 products for bf16 compute on x86-64 CPUs with AVX512-BF16 (AMD Zen 4/5, Intel
//! Cooper Lake and Sapphire Rapids onwards): the frozen linear layers' forward and input
//! gradient with both operands rounded to bf16 (the activations and gradients of bf16
//! compute already are; an NF4 or bf16 weight is dequantized to bf16 a block at a time,
//! as bitsandbytes does for `bnb_4bit_compute_dtype=bfloat16`) and f32 accumulation.
//!
//! `vdpbf16ps` multiplies pairs of bf16 values and adds both products to an f32 lane, so
//! one instruction does the work of two f32 FMAs. The blocking is that of
//! [`crate::kernels`]' f32 path; the operands are packed as pairs along the inner
//! dimension (`u32` = two bf16, the lower half first): the forward's `x^T` panels pair
//! consecutive elements of an `x` row, the input gradient's `W` panels pair the same
//! column of two consecutive `W` rows.

#[cfg(target_arch = "x86_64")]
use std::arch::x86_64::*;

use crate::kernels::{nothing_to_multiply, run_split, split, Out, Rows, Tile, MR, NR};
use crate::ops::f32_to_bf16;

/// Pairs of the inner dimension per pass of the forward kernel (depth 2048).
const KPF: usize = 1024;
/// Pairs of the inner dimension per block of the input-gradient kernel (depth 256).
const KPB: usize = 128;
/// Rows of the left operand per block, at least.
const MC: usize = 256;
/// Bytes of the forward's packed `x^T` block: more rows per block where the depth is
/// small, so that each weight row is dequantized and paired fewer times (the block stays
/// in L2).
const XT_BYTES: usize = 512 << 10;

/// Whether this CPU has AVX512-BF16 (and AVX-512F).
pub fn available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx512f") && std::arch::is_x86_feature_detected!("avx512bf16")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// Two values as one pair of bf16 (`lo` in the lower half), rounded to nearest even.
#[inline(always)]
fn pair(lo: f32, hi: f32) -> u32 {
    f32_to_bf16(lo).to_bits() as u32 | (f32_to_bf16(hi).to_bits() as u32) << 16
}

/// `dst[p] = pair(src[2p], src[2p + 1])`, zero past the end of `src`: 32 values per
/// `vcvtne2ps2bf16` (the same rounding; denormal inputs count as zero).
fn pack_pairs(dst: &mut [u32], src: &[f32]) {
    // Whole chunks for the vector code (none where it does not exist).
    let whole = if cfg!(target_arch = "x86_64") { (src.len() / 32).min(dst.len() / 16) } else { 0 };
    #[cfg(target_arch = "x86_64")]
    // SAFETY: `available()` was checked by the entry points; whole * 32 <= src.len() and
    // whole * 16 <= dst.len().
    unsafe {
        pack_pairs_wide(dst.as_mut_ptr(), src.as_ptr(), whole)
    };
    for (p, d) in dst.iter_mut().enumerate().skip(whole * 16) {
        let lo = src.get(2 * p).copied().unwrap_or(0.0);
        let hi = src.get(2 * p + 1).copied().unwrap_or(0.0);
        *d = pair(lo, hi);
    }
}

/// `chunks` times: 32 floats of `src` -> 16 pairs at `dst`.
///
/// # Safety
/// AVX512-BF16; `src` has `32 * chunks` floats and `dst` room for `16 * chunks` pairs.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bf16")]
unsafe fn pack_pairs_wide(dst: *mut u32, src: *const f32, chunks: usize) {
    for i in 0..chunks {
        let lo = _mm512_loadu_ps(src.wrapping_add(32 * i));
        let hi = _mm512_loadu_ps(src.wrapping_add(32 * i + 16));
        // The second operand fills the lower half.
        let v: __m512i = std::mem::transmute(_mm512_cvtne2ps_pbh(hi, lo));
        _mm512_storeu_si512(dst.wrapping_add(16 * i) as *mut __m512i, v);
    }
}

/// `dst[c] = pair(lo[c], hi[c])` for `c < dst.len()` (`lo` and `hi` at least as long).
fn pack_interleaved(dst: &mut [u32], lo: &[f32], hi: &[f32]) {
    let whole = if cfg!(target_arch = "x86_64") { dst.len() / 16 } else { 0 };
    assert!(lo.len() >= dst.len() && hi.len() >= dst.len());
    #[cfg(target_arch = "x86_64")]
    // SAFETY: `available()` was checked by the entry points; the lengths are asserted.
    unsafe {
        pack_interleaved_wide(dst.as_mut_ptr(), lo.as_ptr(), hi.as_ptr(), whole)
    };
    for c in whole * 16..dst.len() {
        dst[c] = pair(lo[c], hi[c]);
    }
}

/// # Safety
/// AVX512-BF16; `lo` and `hi` have `16 * chunks` floats, `dst` room for as many pairs.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bf16")]
unsafe fn pack_interleaved_wide(dst: *mut u32, lo: *const f32, hi: *const f32, chunks: usize) {
    for i in 0..chunks {
        let l: __m256i = std::mem::transmute(_mm512_cvtneps_pbh(_mm512_loadu_ps(lo.wrapping_add(16 * i))));
        let h: __m256i = std::mem::transmute(_mm512_cvtneps_pbh(_mm512_loadu_ps(hi.wrapping_add(16 * i))));
        let v = _mm512_or_si512(_mm512_cvtepu16_epi32(l), _mm512_slli_epi32::<16>(_mm512_cvtepu16_epi32(h)));
        _mm512_storeu_si512(dst.wrapping_add(16 * i) as *mut __m512i, v);
    }
}

/// Fill `panel`, rows of `kp` pairs: the first `valid` rows by `fill(row, dst)`, the
/// rest (padding up to whole tiles) with zeros.
fn pack_panel(panel: &mut [u32], kp: usize, valid: usize, mut fill: impl FnMut(usize, &mut [u32])) {
    for (r, dst) in panel.chunks_exact_mut(kp).enumerate() {
        if r < valid {
            fill(r, dst);
        } else {
            dst.fill(0);
        }
    }
}

fn empty(m: usize, n: usize, k: usize, out: &mut [f32], accumulate: bool) -> bool {
    assert!(available(), "bf16 dot-product kernel on a CPU without AVX512-BF16");
    nothing_to_multiply(m, n, k, out, accumulate)
}

/// `y[m, n] (+)= x[m, k] · W^T` for a weight `W [n, k]`, operands rounded to bf16, f32
/// accumulation. Panics without AVX512-BF16 (check [`available`]) or on short slices.
#[allow(clippy::too_many_arguments)]
pub fn linear_fwd(m: usize, n: usize, k: usize, x: &[f32], w: Rows, y: &mut [f32], accumulate: bool, parallel: bool) {
    assert!(x.len() >= m * k && w.len() >= n * k && y.len() >= m * n);
    if empty(m, n, k, y, accumulate) {
        return;
    }
    if m <= crate::gemv::MAX_M {
        // Decoding: the same rounding, one FMA per weight element instead of a tile.
        return crate::gemv::linear_fwd(crate::kernels::Isa::Avx512, m, n, k, x, w, None, y, accumulate, parallel, true);
    }
    let out = Out(y.as_mut_ptr());
    let kp_all = k.div_ceil(2);
    let mc_max = (XT_BYTES / (4 * KPF.min(kp_all)) / NR * NR).max(MC);
    let mut xt: Vec<u32> = Vec::new();
    for ic in (0..m).step_by(mc_max) {
        let mc = mc_max.min(m - ic);
        let mc_pad = mc.div_ceil(NR) * NR;
        for pp in (0..kp_all).step_by(KPF) {
            let kp = KPF.min(kp_all - pp);
            let (k0, k1) = (2 * pp, (2 * (pp + kp)).min(k));
            // xt[t * kp * NR + p * NR + c] = pair of x[ic + t * NR + c, k0 + 2p ..], zero
            // rows up to whole panels; panels split between the threads.
            xt.clear();
            xt.resize(kp * mc_pad, 0);
            let xt_out = Out(xt.as_mut_ptr());
            run_split(split(mc.div_ceil(NR), 1, 16 * mc * kp, parallel), |panels| {
                // Panel by panel: its rows paired into `rows_buf`, then moved 16 depth
                // steps at a time, so that the panel rows being filled stay in L1.
                let mut rows_buf = vec![0u32; NR * kp];
                for t in panels {
                    let rows = NR.min(mc - t * NR);
                    for c in 0..rows {
                        let i = ic + t * NR + c;
                        pack_pairs(&mut rows_buf[c * kp..(c + 1) * kp], &x[i * k + k0..i * k + k1]);
                    }
                    // SAFETY: panel t of xt (kp * NR pairs from t * kp * NR) is inside it
                    // and written by this thread only.
                    let panel = unsafe { std::slice::from_raw_parts_mut(xt_out.at(t * kp * NR), kp * NR) };
                    for p0 in (0..kp).step_by(16) {
                        let pl = 16.min(kp - p0);
                        for c in 0..rows {
                            let src = &rows_buf[c * kp + p0..c * kp + p0 + pl];
                            for (d, &v) in panel[p0 * NR + c..].iter_mut().step_by(NR).zip(src) {
                                *d = v;
                            }
                        }
                    }
                }
            });
            let xt = &xt[..];
            let acc = accumulate || pp > 0;
            run_split(split(n, MR, 4 * mc * n * kp, parallel), |cols| {
                let mut a = vec![0u32; MR * kp];
                let mut row = vec![0f32; k1 - k0];
                let mut tile = [0f32; MR * NR];
                for j in cols.clone().step_by(MR) {
                    let rows = MR.min(cols.end - j);
                    pack_panel(&mut a, kp, rows, |r, dst| {
                        w.read(j + r, k, k0, &mut row);
                        pack_pairs(dst, &row);
                    });
                    for it in (0..mc).step_by(NR) {
                        // SAFETY: a has MR rows of kp pairs; xt has kp rows of NR pairs
                        // from it * kp on; tile has MR * NR floats.
                        unsafe { micro(kp, a.as_ptr(), kp, xt[it * kp..].as_ptr(), NR, tile.as_mut_ptr(), NR, false) };
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

/// `gx[m, cols] (+)= g[m, rows] · W` for a weight `W [rows, cols]`, operands rounded to
/// bf16, f32 accumulation. Panics like [`linear_fwd`].
#[allow(clippy::too_many_arguments)]
pub fn linear_bwd(m: usize, rows: usize, cols: usize, g: &[f32], w: Rows, gx: &mut [f32], accumulate: bool, parallel: bool) {
    assert!(g.len() >= m * rows && w.len() >= rows * cols && gx.len() >= m * cols);
    if empty(m, cols, rows, gx, accumulate) {
        return;
    }
    let out = Out(gx.as_mut_ptr());
    let kp_all = rows.div_ceil(2);
    let m_pad = m.div_ceil(MR) * MR;
    run_split(split(cols, NR, 2 * m * rows * cols, parallel), |range| {
        let width = range.len().div_ceil(NR) * NR;
        let (mut b, mut ga) = (vec![0u32; KPB * width], vec![0u32; m_pad * KPB]);
        let mut inter = vec![0u32; range.len()];
        let (mut r0, mut r1) = (vec![0f32; range.len()], vec![0f32; range.len()]);
        let mut tile = [0f32; MR * NR];
        for (bi, pp) in (0..kp_all).step_by(KPB).enumerate() {
            let kp = KPB.min(kp_all - pp);
            let (k0, k1) = (2 * pp, (2 * (pp + kp)).min(rows));
            // B: b[t * kp * NR + p * NR + c] = pair(W[k0 + 2p, range.start + t * NR + c],
            // W[k0 + 2p + 1, ..]), zero-padded.
            for p in 0..kp {
                let rr = k0 + 2 * p;
                w.read(rr, cols, range.start, &mut r0);
                if rr + 1 < rows {
                    w.read(rr + 1, cols, range.start, &mut r1);
                } else {
                    r1.fill(0.0);
                }
                pack_interleaved(&mut inter, &r0, &r1);
                for (t, chunk) in inter.chunks(NR).enumerate() {
                    let dst = &mut b[t * kp * NR + p * NR..t * kp * NR + (p + 1) * NR];
                    dst[..chunk.len()].copy_from_slice(chunk);
                    dst[chunk.len()..].fill(0);
                }
            }
            // A: ga[i * kp + p] = pair of g[i, k0 + 2p ..], zero rows up to whole tiles.
            pack_panel(&mut ga[..m_pad * kp], kp, m, |i, dst| pack_pairs(dst, &g[i * rows + k0..i * rows + k1]));
            let acc = accumulate || bi > 0;
            for jt in (0..range.len()).step_by(NR) {
                let ncols = NR.min(range.len() - jt);
                for i in (0..m).step_by(MR) {
                    let nrows = MR.min(m - i);
                    let (ap, bt) = (ga[i * kp..].as_ptr(), b[jt * kp..].as_ptr());
                    if ncols == NR && nrows == MR {
                        // SAFETY: ga has MR rows of kp pairs from row i; b has kp rows of NR
                        // pairs from jt * kp; the full tile of gx at (i, range.start + jt) is
                        // inside gx and owned by this thread.
                        unsafe { micro(kp, ap, kp, bt, NR, out.at(i * cols + range.start + jt), cols, acc) };
                        continue;
                    }
                    // SAFETY: as above, into the scratch tile.
                    unsafe { micro(kp, ap, kp, bt, NR, tile.as_mut_ptr(), NR, false) };
                    // SAFETY: inside gx; this thread owns these columns.
                    unsafe { Tile(&tile).store(out, cols, i, range.start + jt, nrows, ncols, acc) };
                }
            }
        }
    });
}

/// `c[r * ldc + j] (+)= sum_p dot(a[r * lda + p], b[p * ldb + j])` for `r < MR`,
/// `j < NR`, `p < kp`, where each `a`/`b` element is a pair of bf16 and `dot` is the sum
/// of the two products, in f32.
///
/// # Safety
/// AVX512-BF16 ([`available`]); `a` has `MR` rows of `kp` pairs at stride `lda`, `b` has
/// `kp` rows of `NR` pairs at stride `ldb`, `c` has `MR` rows of `NR` writable floats at
/// stride `ldc`.
#[allow(clippy::too_many_arguments)]
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bf16")]
unsafe fn micro(kp: usize, a: *const u32, lda: usize, b: *const u32, ldb: usize, c: *mut f32, ldc: usize, accumulate: bool) {
    macro_rules! kernel {
        ($($r:literal => $c0:ident $c1:ident),*) => {{
            $(let mut $c0 = _mm512_setzero_ps(); let mut $c1 = _mm512_setzero_ps();)*
            let (mut a, mut b) = (a, b);
            for _ in 0..kp {
                // SAFETY (of the transmutes): both are 512-bit vectors of plain bits.
                let b0: __m512bh = std::mem::transmute(_mm512_loadu_si512(b as *const __m512i));
                let b1: __m512bh = std::mem::transmute(_mm512_loadu_si512(b.wrapping_add(16) as *const __m512i));
                $(
                    let av: __m512bh = std::mem::transmute(_mm512_set1_epi32(*a.wrapping_add($r * lda) as i32));
                    $c0 = _mm512_dpbf16_ps($c0, av, b0);
                    $c1 = _mm512_dpbf16_ps($c1, av, b1);
                )*
                a = a.wrapping_add(1);
                b = b.wrapping_add(ldb);
            }
            $(
                let p = c.wrapping_add($r * ldc);
                if accumulate {
                    $c0 = _mm512_add_ps($c0, _mm512_loadu_ps(p));
                    $c1 = _mm512_add_ps($c1, _mm512_loadu_ps(p.wrapping_add(16)));
                }
                _mm512_storeu_ps(p, $c0);
                _mm512_storeu_ps(p.wrapping_add(16), $c1);
            )*
        }};
    }
    kernel!(0 => c0a c0b, 1 => c1a c1b, 2 => c2a c2b, 3 => c3a c3b, 4 => c4a c4b, 5 => c5a c5b, 6 => c6a c6b, 7 => c7a c7b, 8 => c8a c8b, 9 => c9a c9b, 10 => c10a c10b, 11 => c11a c11b);
}

#[cfg(not(target_arch = "x86_64"))]
#[allow(clippy::too_many_arguments)]
unsafe fn micro(_kp: usize, _a: *const u32, _lda: usize, _b: *const u32, _ldb: usize, _c: *mut f32, _ldc: usize, _accumulate: bool) {
    unreachable!("no bf16 kernel on this architecture")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nf4::Nf4Tensor;
    use crate::ops::bf16_to_f32;

    /// Round to bf16 and back.
    fn r(v: &[f32]) -> Vec<f32> {
        v.iter().map(|&x| bf16_to_f32(f32_to_bf16(x))).collect()
    }

    /// `lhs · rhs` in f64 (`rhs` `[k, n]`, or `[n, k]` transposed when `rhs_t`).
    fn reference(m: usize, n: usize, k: usize, lhs: &[f32], rhs: &[f32], rhs_t: bool) -> Vec<f64> {
        crate::blas::tests::reference(m, n, k, lhs, rhs, rhs_t)
    }

    fn close(got: &[f32], want: &[f64], what: &str) {
        for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
            assert!((g as f64 - w).abs() < 1e-4 * (1.0 + w.abs()), "{what} [{i}]: {g} vs {w}");
        }
    }

    #[test]
    fn products_equal_the_f64_product_of_bf16_operands() {
        if !available() {
            eprintln!("no AVX512-BF16 on this CPU: skipped");
            return;
        }
        // Odd depths (a half pair), ragged tiles, several passes and blocks (of 256 rows
        // at depth 2101, of 4096 at depth 64), threads.
        for &(m, n, k) in &[(1, 1, 1), (13, 33, 7), (25, 65, 257), (300, 40, 300), (30, 130, 2101), (255, 96, 513), (600, 33, 2101), (4200, 17, 64)] {
            let v = |len: usize, s: usize| -> Vec<f32> { (0..len).map(|i| (((i * 37 + s * 11) % 101) as f32 - 50.0) / 37.0).collect() };
            let (x, w, g) = (v(m * k, 1), v(n * k, 2), v(m * n, 3));
            for accumulate in [false, true] {
                let mut y = vec![0.5f32; m * n];
                linear_fwd(m, n, k, &x, Rows::F32(&w), &mut y, accumulate, true);
                let mut want = reference(m, n, k, &r(&x), &r(&w), true);
                if accumulate {
                    want.iter_mut().for_each(|v| *v += 0.5);
                }
                close(&y, &want, &format!("fwd {m}x{n}x{k} acc={accumulate}"));
                let mut gx = vec![0.5f32; m * k];
                linear_bwd(m, n, k, &g, Rows::F32(&w), &mut gx, accumulate, true);
                let mut want = reference(m, k, n, &r(&g), &r(&w), false);
                if accumulate {
                    want.iter_mut().for_each(|v| *v += 0.5);
                }
                close(&gx, &want, &format!("bwd {m}x{n}x{k} acc={accumulate}"));
            }
            // NF4 weights: dequantized, then rounded to bf16.
            let q = Nf4Tensor::quantize(&w, &[n, k], true).unwrap();
            let dense = r(&q.dequantize());
            let mut y = vec![0f32; m * n];
            linear_fwd(m, n, k, &x, Rows::Nf4(&q), &mut y, false, false);
            close(&y, &reference(m, n, k, &r(&x), &dense, true), &format!("nf4 fwd {m}x{n}x{k}"));
            let mut gx = vec![0f32; m * k];
            linear_bwd(m, n, k, &g, Rows::Nf4(&q), &mut gx, false, false);
            close(&gx, &reference(m, k, n, &r(&g), &dense, false), &format!("nf4 bwd {m}x{n}x{k}"));
        }
    }
}

//! Matrix-vector products for decoding: one to [`MAX_M`] activation rows against a
//! frozen weight (`y = x W^T`), where the register tiles of [`crate::kernels`] (12 weight
//! rows x 32 activation rows) would compute 32 columns for one.
//!
//! Each step takes [`RB`] weight rows and one activation row and keeps one accumulator
//! per weight row (four independent FMA chains), so a product reads each weight element
//! once per activation row and does one fused multiply-add for it: decoding is then
//! bound by reading the weights, which is what the NF4 path saves:
//! - f32 weights are read in place;
//! - NF4 weights are decoded in registers (AVX-512: 16 codes per `vpermps` from a
//!   16-entry table held in one register, times the block's absmax: exactly the values
//!   [`crate::nf4::Nf4Tensor::dequantize`] gives), never written out; the activation row
//!   is split once into its even and odd elements to meet the high and low nibbles;
//! - bf16 weights are widened in registers;
//! - otherwise (AVX2, or rows that do not start on an NF4 block) a few rows are read into
//!   an f32 buffer first.
//!
//! With `bf16` set (bf16 compute, the entry of [`crate::kernels_bf16`]) both operands are
//! rounded to bf16 first, as the bf16 dot-product kernels do; their products are exact in
//! f32, so only the order of the f32 sums differs from those kernels.

#[cfg(target_arch = "x86_64")]
use std::arch::x86_64::*;

use crate::kernels::{run_split, split, FwdExtra, Isa, Out, Rows};
use crate::nf4::NF4_BLOCKSIZE;
use crate::ops::{bf16_to_f32, f32_to_bf16};

/// Activation rows up to which a forward product runs here.
pub(crate) const MAX_M: usize = 4;
/// Weight rows per step.
const RB: usize = 4;

fn round_bf16(v: f32) -> f32 {
    bf16_to_f32(f32_to_bf16(v))
}

/// `y[m, n] (+)= x[m, k] · W^T (+ extra)` for `m <= MAX_M`; sizes and emptiness are the
/// caller's ([`crate::kernels::linear_fwd_ext`], [`crate::kernels_bf16::linear_fwd`]).
#[allow(clippy::too_many_arguments)]
pub(crate) fn linear_fwd(isa: Isa, m: usize, n: usize, k: usize, x: &[f32], w: Rows, extra: Option<FwdExtra>, y: &mut [f32], accumulate: bool, parallel: bool, bf16: bool) {
    debug_assert!(m <= MAX_M && x.len() >= m * k && w.len() >= n * k && y.len() >= m * n);
    let x: std::borrow::Cow<[f32]> = if bf16 { x[..m * k].iter().map(|&v| round_bf16(v)).collect() } else { std::borrow::Cow::Borrowed(&x[..m * k]) };
    let fused_nf4 = matches!(w, Rows::Nf4(_)) && isa == Isa::Avx512 && k.is_multiple_of(NF4_BLOCKSIZE);
    // For the fused NF4 product: each activation row as [even elements, odd elements].
    let split_x: Vec<f32> = if fused_nf4 {
        let mut v = vec![0f32; m * k];
        for (row, dst) in x.chunks_exact(k).zip(v.chunks_exact_mut(k)) {
            let (even, odd) = dst.split_at_mut(k / 2);
            for (p, pair) in row.chunks_exact(2).enumerate() {
                even[p] = pair[0];
                odd[p] = pair[1];
            }
        }
        v
    } else {
        Vec::new()
    };
    let (x, split_x) = (&x[..], &split_x[..]);
    let out = Out(y.as_mut_ptr());
    // Bound by reading the weights: hand off from 64 Ki weight elements on.
    run_split(split(n, RB, 32 * n * k, parallel), |cols| {
        let mut buf: Vec<f32> = Vec::new();
        for j in cols.clone().step_by(RB) {
            let rows = RB.min(cols.end - j);
            // Row r of the block (the last one repeated past `rows`: read, not used).
            let at = |r: usize| j + r.min(rows - 1);
            let source = match w {
                Rows::F32(v) if !bf16 => Source::F32(std::array::from_fn(|r| v[at(r) * k..].as_ptr())),
                Rows::Bf16(v) if isa == Isa::Avx512 => Source::Bf16(std::array::from_fn(|r| v[at(r) * k..].as_ptr())),
                Rows::Nf4(q) if fused_nf4 => Source::Nf4(
                    std::array::from_fn(|r| q.packed[at(r) * k / 2..].as_ptr()),
                    std::array::from_fn(|r| q.absmax[at(r) * k / NF4_BLOCKSIZE..].as_ptr()),
                ),
                _ => {
                    buf.resize(RB * k, 0.0);
                    for r in 0..RB {
                        let dst = &mut buf[r * k..(r + 1) * k];
                        w.read(at(r), k, 0, dst);
                        if bf16 {
                            dst.iter_mut().for_each(|v| *v = round_bf16(*v));
                        }
                    }
                    Source::F32(std::array::from_fn(|r| buf[r * k..].as_ptr()))
                }
            };
            for i in 0..m {
                // SAFETY: every pointer starts a weight row of k elements (k / 2 bytes and
                // k / 64 absmax values for NF4; split rows of k floats), x rows have k floats.
                let mut sums = unsafe { source.dot(isa, k, &x[i * k..(i + 1) * k], split_x.get(i * k..(i + 1) * k), bf16) };
                if let Some(e) = &extra {
                    let xe = &e.x[i * e.r..(i + 1) * e.r];
                    for (r, s) in sums.iter_mut().enumerate().take(rows) {
                        *s += xe.iter().zip(&e.w[(j + r) * e.r..(j + r + 1) * e.r]).map(|(a, b)| a * b).sum::<f32>();
                    }
                }
                for (r, &s) in sums.iter().enumerate().take(rows) {
                    // SAFETY: row i < m, column j + r inside this thread's range.
                    let d = unsafe { &mut *out.at(i * n + j + r) };
                    *d = if accumulate { *d + s } else { s };
                }
            }
        }
    });
}

/// Where a step's `RB` weight rows are read from.
enum Source {
    F32([*const f32; RB]),
    Bf16([*const half::bf16; RB]),
    /// Packed codes and absmax values of rows that start on a block.
    Nf4([*const u8; RB], [*const f32; RB]),
}

impl Source {
    /// The dot products of the `RB` rows with the activation row `x`.
    ///
    /// # Safety
    /// The CPU supports `isa` (AVX-512 for `Bf16` and `Nf4`); each row pointer starts `k`
    /// readable weights; `split_x` is `x` split into even and odd elements for `Nf4`.
    unsafe fn dot(&self, isa: Isa, k: usize, x: &[f32], split_x: Option<&[f32]>, bf16: bool) -> [f32; RB] {
        #[cfg(target_arch = "x86_64")]
        match (self, isa) {
            (Source::F32(w), Isa::Avx512) => dot_f32_avx512(k, *w, x.as_ptr()),
            (Source::F32(w), Isa::Avx2) => dot_f32_avx2(k, *w, x.as_ptr()),
            (Source::Bf16(w), _) => dot_bf16_avx512(k, *w, x.as_ptr()),
            (Source::Nf4(codes, absmax), _) => {
                let split_x = split_x.expect("split activations for the NF4 product");
                dot_nf4_avx512(k / NF4_BLOCKSIZE, *codes, *absmax, split_x.as_ptr(), split_x[k / 2..].as_ptr(), bf16)
            }
        }
        #[cfg(not(target_arch = "x86_64"))]
        unreachable!("no {} kernel on this architecture ({k}, {}, {:?}, {bf16})", isa.name(), x.len(), split_x.map(|s| s.len()))
    }
}

/// Sum of each row's products with `x`.
///
/// # Safety
/// AVX-512F; each row and `x` have `k` readable floats.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn dot_f32_avx512(k: usize, w: [*const f32; RB], x: *const f32) -> [f32; RB] {
    let mut acc = [_mm512_setzero_ps(); RB];
    let mut p = 0;
    while p + 16 <= k {
        let xv = _mm512_loadu_ps(x.add(p));
        for r in 0..RB {
            acc[r] = _mm512_fmadd_ps(_mm512_loadu_ps(w[r].add(p)), xv, acc[r]);
        }
        p += 16;
    }
    if p < k {
        let mask: __mmask16 = (1u16 << (k - p)) - 1;
        let xv = _mm512_maskz_loadu_ps(mask, x.add(p));
        for r in 0..RB {
            acc[r] = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(mask, w[r].add(p)), xv, acc[r]);
        }
    }
    acc.map(|a| _mm512_reduce_add_ps(a))
}

/// [`dot_f32_avx512`] on AVX2 + FMA.
///
/// # Safety
/// AVX2 and FMA; each row and `x` have `k` readable floats.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn dot_f32_avx2(k: usize, w: [*const f32; RB], x: *const f32) -> [f32; RB] {
    let mut acc = [_mm256_setzero_ps(); RB];
    let mut p = 0;
    while p + 8 <= k {
        let xv = _mm256_loadu_ps(x.add(p));
        for r in 0..RB {
            acc[r] = _mm256_fmadd_ps(_mm256_loadu_ps(w[r].add(p)), xv, acc[r]);
        }
        p += 8;
    }
    let mut out = [0f32; RB];
    for r in 0..RB {
        let mut lanes = [0f32; 8];
        _mm256_storeu_ps(lanes.as_mut_ptr(), acc[r]);
        out[r] = lanes.iter().sum::<f32>() + (p..k).map(|q| *w[r].add(q) * *x.add(q)).sum::<f32>();
    }
    out
}

/// Sum of each bf16 row's products with `x` (widened in registers).
///
/// # Safety
/// AVX-512F; each row and `x` have `k` readable elements.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn dot_bf16_avx512(k: usize, w: [*const half::bf16; RB], x: *const f32) -> [f32; RB] {
    let mut acc = [_mm512_setzero_ps(); RB];
    let mut p = 0;
    while p + 16 <= k {
        let xv = _mm512_loadu_ps(x.add(p));
        for r in 0..RB {
            let h = _mm512_cvtepu16_epi32(_mm256_loadu_si256(w[r].add(p) as *const __m256i));
            acc[r] = _mm512_fmadd_ps(_mm512_castsi512_ps(_mm512_slli_epi32::<16>(h)), xv, acc[r]);
        }
        p += 16;
    }
    let mut out = acc.map(|a| _mm512_reduce_add_ps(a));
    for r in 0..RB {
        out[r] += (p..k).map(|q| bf16_to_f32(*w[r].add(q)) * *x.add(q)).sum::<f32>();
    }
    out
}

/// Sum of each NF4 row's products with the activations, `blocks` blocks of 64 per row,
/// decoded in registers: per 16 bytes, the high nibbles (even elements) meet `even` and
/// the low nibbles (odd elements) meet `odd`. Weights are `code * absmax` in f32 (rounded
/// to bf16 when `bf16`).
///
/// # Safety
/// AVX-512F; each row has `blocks * 32` bytes and `blocks` absmax values; `even` and
/// `odd` have `blocks * 32` floats.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn dot_nf4_avx512(blocks: usize, codes: [*const u8; RB], absmax: [*const f32; RB], even: *const f32, odd: *const f32, bf16: bool) -> [f32; RB] {
    let lut = _mm512_loadu_ps(crate::nf4::NF4_CODE.as_ptr());
    let low = _mm512_set1_epi32(15);
    let (mut acc_hi, mut acc_lo) = ([_mm512_setzero_ps(); RB], [_mm512_setzero_ps(); RB]);
    for b in 0..blocks {
        let scale: [__m512; RB] = std::array::from_fn(|r| _mm512_set1_ps(*absmax[r].add(b)));
        for half in 0..2 {
            let off = b * 32 + half * 16;
            let (xe, xo) = (_mm512_loadu_ps(even.add(off)), _mm512_loadu_ps(odd.add(off)));
            for r in 0..RB {
                let v = _mm512_cvtepu8_epi32(_mm_loadu_si128(codes[r].add(off) as *const __m128i));
                let mut hi = _mm512_mul_ps(_mm512_permutexvar_ps(_mm512_srli_epi32::<4>(v), lut), scale[r]);
                let mut lo = _mm512_mul_ps(_mm512_permutexvar_ps(_mm512_and_si512(v, low), lut), scale[r]);
                if bf16 {
                    hi = round_bf16_avx512(hi);
                    lo = round_bf16_avx512(lo);
                }
                acc_hi[r] = _mm512_fmadd_ps(hi, xe, acc_hi[r]);
                acc_lo[r] = _mm512_fmadd_ps(lo, xo, acc_lo[r]);
            }
        }
    }
    std::array::from_fn(|r| _mm512_reduce_add_ps(_mm512_add_ps(acc_hi[r], acc_lo[r])))
}

/// f32 lanes rounded to bf16 (nearest, ties to even; as [`f32_to_bf16`] for finite
/// values, which dequantized NF4 weights are).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn round_bf16_avx512(v: __m512) -> __m512 {
    let b = _mm512_castps_si512(v);
    let lsb = _mm512_and_si512(_mm512_srli_epi32::<16>(b), _mm512_set1_epi32(1));
    let r = _mm512_add_epi32(b, _mm512_add_epi32(_mm512_set1_epi32(0x7fff), lsb));
    _mm512_castsi512_ps(_mm512_and_si512(r, _mm512_set1_epi32(0xffff_0000u32 as i32)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::blas::tests::reference;
    use crate::nf4::Nf4Tensor;

    fn v(n: usize, seed: usize) -> Vec<f32> {
        (0..n).map(|i| (((i * 37 + seed * 11) % 101) as f32 - 50.0) / 50.0).collect()
    }

    fn close(got: &[f32], want: &[f64], what: &str) {
        for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
            assert!((g as f64 - w).abs() < 1e-4 * (1.0 + w.abs()), "{what} [{i}]: {g} vs {w}");
        }
    }

    fn isas() -> Vec<Isa> {
        Isa::ALL.into_iter().filter(|i| i.supported()).collect()
    }

    /// Shapes with ragged ends everywhere: n not a multiple of RB, k not a multiple of
    /// 16 or of the NF4 block, and wide enough to split across threads.
    const SHAPES: [(usize, usize); 6] = [(1, 1), (5, 17), (7, 64), (33, 320), (130, 1000), (600, 512)];

    #[test]
    fn f32_bf16_and_nf4_rows_match_a_reference() {
        for isa in isas() {
            for m in 1..=MAX_M {
                for &(n, k) in &SHAPES {
                    let (x, wv) = (v(m * k, 1), v(n * k, 2));
                    let q = Nf4Tensor::quantize(&wv, &[n, k], true).unwrap();
                    let dense = q.dequantize();
                    let wb: Vec<half::bf16> = wv.iter().map(|&a| f32_to_bf16(a)).collect();
                    let wb_f32: Vec<f32> = wb.iter().map(|&a| bf16_to_f32(a)).collect();
                    for (rows, want_w, name) in [(Rows::F32(&wv), &wv, "f32"), (Rows::Bf16(&wb), &wb_f32, "bf16"), (Rows::Nf4(&q), &dense, "nf4")] {
                        for (accumulate, parallel) in [(false, true), (true, false)] {
                            let mut y: Vec<f32> = (0..m * n).map(|i| (i % 5) as f32).collect();
                            let mut want = reference(m, n, k, &x, want_w, true);
                            if accumulate {
                                want.iter_mut().zip(&y).for_each(|(w, d)| *w += *d as f64);
                            }
                            linear_fwd(isa, m, n, k, &x, rows, None, &mut y, accumulate, parallel, false);
                            close(&y, &want, &format!("{isa:?} {name} {m}x{n}x{k} acc={accumulate}"));
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn the_folded_extra_product_is_added() {
        for isa in isas() {
            let (m, n, k, r) = (2, 37, 96, 8);
            let (x, w, x2, w2) = (v(m * k, 1), v(n * k, 2), v(m * r, 3), v(n * r, 4));
            let mut y = vec![0f32; m * n];
            linear_fwd(isa, m, n, k, &x, Rows::F32(&w), Some(FwdExtra { x: &x2, w: &w2, r }), &mut y, false, true, false);
            let mut want = reference(m, n, k, &x, &w, true);
            want.iter_mut().zip(reference(m, n, r, &x2, &w2, true)).for_each(|(a, b)| *a += b);
            close(&y, &want, &format!("{isa:?} extra"));
        }
    }

    #[test]
    fn bf16_rounds_both_operands() {
        // As the bf16 dot-product kernels: NF4 weights dequantized then rounded to bf16,
        // activations rounded to bf16, products summed in f32.
        if !Isa::Avx512.supported() {
            return;
        }
        let (m, n, k) = (1, 21, 192);
        let x: Vec<f32> = v(m * k, 5).iter().map(|a| a * 1.001).collect();
        let wv: Vec<f32> = v(n * k, 6).iter().map(|a| a * 0.9871).collect();
        let q = Nf4Tensor::quantize(&wv, &[n, k], true).unwrap();
        let round = |s: &[f32]| -> Vec<f32> { s.iter().map(|&a| round_bf16(a)).collect() };
        for (rows, w_used) in [(Rows::Nf4(&q), round(&q.dequantize())), (Rows::F32(&wv), round(&wv))] {
            let mut y = vec![0f32; m * n];
            linear_fwd(Isa::Avx512, m, n, k, &x, rows, None, &mut y, false, false, true);
            close(&y, &reference(m, n, k, &round(&x), &w_used, true), "bf16 rounding");
        }
    }
}

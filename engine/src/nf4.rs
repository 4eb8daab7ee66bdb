//! bitsandbytes-exact NF4 quantization (blocksize 64) with optional double quantization
//! of the absmax statistics (signed dynamic 8-bit map, blocksize 256).
//!
//! Layout: the row-major flattened `[out, in]` weight is cut into blocks of 64 values;
//! each block stores `absmax = max |x|`; every value is scaled by `1/absmax` (a multiply
//! by the reciprocal, as bitsandbytes does), clamped to [-1, 1] and mapped to the nearest
//! of the 16 NF4 codes (ties go to the lower index). Two codes per byte, the first
//! element in the high nibble.

use crate::{EngineError, Result};

/// The 16 NF4 code values (bitsandbytes `get_4bit_type("nf4")`), written with
/// bitsandbytes' own digits.
#[allow(clippy::excessive_precision)]
pub const NF4_CODE: [f32; 16] = [
    -1.0,
    -0.696_192_800_998_687_7,
    -0.525_073_051_452_636_7,
    -0.394_917_488_098_144_53,
    -0.284_441_381_692_886_35,
    -0.184_773_430_228_233_34,
    -0.091_050_036_251_544_95,
    0.0,
    0.079_580_299_556_255_34,
    0.160_930_201_411_247_25,
    0.246_112_301_945_686_34,
    0.337_915_241_718_292_24,
    0.440_709_829_330_444_34,
    0.562_617_003_917_694_1,
    0.722_956_836_223_602_3,
    1.0,
];

pub const NF4_BLOCKSIZE: usize = 64;
pub const NESTED_BLOCKSIZE: usize = 256;

/// `torch.linspace(start, end, steps, dtype=float32)` in the scalar form of the CPU
/// kernel (first half counted up from `start`, second half down from `end`).
fn linspace_f32(start: f32, end: f32, steps: usize) -> Vec<f32> {
    if steps == 1 {
        return vec![start];
    }
    let step = (end as f64 - start as f64) / (steps - 1) as f64;
    let halfway = steps / 2;
    (0..steps)
        .map(|i| {
            if i < halfway {
                (start as f64 + step * i as f64) as f32
            } else {
                (end as f64 - step * (steps - i - 1) as f64) as f32
            }
        })
        .collect()
}

/// bitsandbytes `create_dynamic_map(signed=True, max_exponent_bits=7, total_bits=8)`
/// recomputed from its definition: the 256-entry signed dynamic 8-bit code, sorted.
/// PyTorch's vectorized `linspace` rounds a handful of entries differently (by one ulp),
/// so quantization uses [`DYNAMIC_MAP`], the exact table bitsandbytes produces; this
/// function exists to check that table against the formula.
pub fn create_dynamic_map() -> Vec<f32> {
    let max_exponent_bits = 7i32;
    let non_sign_bits = 7i32;
    let mut data: Vec<f32> = Vec::with_capacity(256);
    for i in 0..max_exponent_bits {
        let fraction_items = 2usize.pow((i + non_sign_bits - max_exponent_bits) as u32) + 1;
        let b = linspace_f32(0.1, 1.0, fraction_items);
        let means: Vec<f32> = b.windows(2).map(|w| (w[0] + w[1]) / 2.0).collect();
        let scale = 10f64.powi(-(max_exponent_bits - 1) + i) as f32;
        data.extend(means.iter().map(|m| scale * m));
        data.extend(means.iter().map(|m| -scale * m));
    }
    data.push(0.0);
    data.push(1.0);
    while data.len() < 256 {
        data.push(0.0);
    }
    data.sort_by(|a, b| a.total_cmp(b));
    data
}

/// The dynamic map exactly as bitsandbytes stores it (`nested_quant_map`), f32 bit
/// patterns, ascending.
const DYNAMIC_MAP_BITS: [u32; 256] = [
    0xbf7e3333, 0xbf7a999a, 0xbf770000, 0xbf736666, 0xbf6fcccd, 0xbf6c3333, 0xbf68999a, 0xbf650000,
    0xbf616666, 0xbf5dcccd, 0xbf5a3333, 0xbf56999a, 0xbf530000, 0xbf4f6666, 0xbf4bcccd, 0xbf483333,
    0xbf44999a, 0xbf410000, 0xbf3d6666, 0xbf39cccd, 0xbf363334, 0xbf32999a, 0xbf2f0000, 0xbf2b6666,
    0xbf27cccd, 0xbf243334, 0xbf20999a, 0xbf1d0000, 0xbf196666, 0xbf15cccd, 0xbf123334, 0xbf0e999a,
    0xbf0b0000, 0xbf076666, 0xbf03cccc, 0xbf003333, 0xbef93332, 0xbef20000, 0xbeeacccc, 0xbee3999a,
    0xbedc6666, 0xbed53333, 0xbece0000, 0xbec6cccc, 0xbebf999a, 0xbeb86666, 0xbeb13333, 0xbeaa0000,
    0xbea2cccc, 0xbe9b999a, 0xbe946666, 0xbe8d3334, 0xbe860000, 0xbe7d9999, 0xbe6f3333, 0xbe60cccd,
    0xbe526666, 0xbe440000, 0xbe35999a, 0xbe273333, 0xbe18cccd, 0xbe0a6666, 0xbdf80000, 0xbddb3334,
    0xbdc9eb85, 0xbdc428f7, 0xbdbe6667, 0xbdb8a3d7, 0xbdb2e148, 0xbdad1eb8, 0xbda75c2a, 0xbda1999a,
    0xbd9bd70a, 0xbd96147b, 0xbd9051eb, 0xbd8a8f5d, 0xbd84cccd, 0xbd7e147b, 0xbd728f5d, 0xbd670a3d,
    0xbd5b851f, 0xbd500000, 0xbd447ae1, 0xbd38f5c3, 0xbd2d70a3, 0xbd21eb85, 0xbd166667, 0xbd0ae148,
    0xbcfeb852, 0xbce7ae15, 0xbcd0a3d7, 0xbcb9999a, 0xbca28f5d, 0xbc8b851f, 0xbc68f5c3, 0xbc3ae148,
    0xbc1f3b64, 0xbc160418, 0xbc0ccccd, 0xbc039581, 0xbbf4bc6a, 0xbbe24dd3, 0xbbcfdf3b, 0xbbbd70a4,
    0xbbab020d, 0xbb989374, 0xbb8624dd, 0xbb676c8a, 0xbb428f5c, 0xbb1db22d, 0xbaf1a9fc, 0xbaa7ef9d,
    0xba7765ff, 0xba59e83e, 0xba3c6a80, 0xba1eecc1, 0xba016f01, 0xb9c7e283, 0xb98ce705, 0xb923d70b,
    0xb8ba1f4b, 0xb88aefb3, 0xb8378034, 0xb7b24206, 0xb70205ff, 0xb65a1a94, 0xb513a3b7, 0x00000000,
    0x3513a3b7, 0x365a1a94, 0x370205ff, 0x37b24206, 0x38378034, 0x388aefb3, 0x38ba1f4b, 0x3923d70b,
    0x398ce705, 0x39c7e283, 0x3a016f01, 0x3a1eecc1, 0x3a3c6a80, 0x3a59e83e, 0x3a7765ff, 0x3aa7ef9d,
    0x3af1a9fc, 0x3b1db22d, 0x3b428f5c, 0x3b676c8a, 0x3b8624dd, 0x3b989374, 0x3bab020d, 0x3bbd70a4,
    0x3bcfdf3b, 0x3be24dd3, 0x3bf4bc6a, 0x3c039581, 0x3c0ccccd, 0x3c160418, 0x3c1f3b64, 0x3c3ae148,
    0x3c68f5c3, 0x3c8b851f, 0x3ca28f5d, 0x3cb9999a, 0x3cd0a3d7, 0x3ce7ae15, 0x3cfeb852, 0x3d0ae148,
    0x3d166667, 0x3d21eb85, 0x3d2d70a3, 0x3d38f5c3, 0x3d447ae1, 0x3d500000, 0x3d5b851f, 0x3d670a3d,
    0x3d728f5d, 0x3d7e147b, 0x3d84cccd, 0x3d8a8f5d, 0x3d9051eb, 0x3d96147b, 0x3d9bd70a, 0x3da1999a,
    0x3da75c2a, 0x3dad1eb8, 0x3db2e148, 0x3db8a3d7, 0x3dbe6667, 0x3dc428f7, 0x3dc9eb85, 0x3ddb3334,
    0x3df80000, 0x3e0a6666, 0x3e18cccd, 0x3e273333, 0x3e35999a, 0x3e440000, 0x3e526666, 0x3e60cccd,
    0x3e6f3333, 0x3e7d9999, 0x3e860000, 0x3e8d3334, 0x3e946666, 0x3e9b999a, 0x3ea2cccc, 0x3eaa0000,
    0x3eb13333, 0x3eb86666, 0x3ebf999a, 0x3ec6cccc, 0x3ece0000, 0x3ed53333, 0x3edc6666, 0x3ee3999a,
    0x3eeacccc, 0x3ef20000, 0x3ef93332, 0x3f003333, 0x3f03cccc, 0x3f076666, 0x3f0b0000, 0x3f0e999a,
    0x3f123334, 0x3f15cccd, 0x3f196666, 0x3f1d0000, 0x3f20999a, 0x3f243334, 0x3f27cccd, 0x3f2b6666,
    0x3f2f0000, 0x3f32999a, 0x3f363334, 0x3f39cccd, 0x3f3d6666, 0x3f410000, 0x3f44999a, 0x3f483333,
    0x3f4bcccd, 0x3f4f6666, 0x3f530000, 0x3f56999a, 0x3f5a3333, 0x3f5dcccd, 0x3f616666, 0x3f650000,
    0x3f68999a, 0x3f6c3333, 0x3f6fcccd, 0x3f736666, 0x3f770000, 0x3f7a999a, 0x3f7e3333, 0x3f800000,
];

/// The 256-entry signed dynamic map used for double quantization.
pub fn dynamic_map() -> &'static [f32; 256] {
    static MAP: std::sync::OnceLock<[f32; 256]> = std::sync::OnceLock::new();
    MAP.get_or_init(|| DYNAMIC_MAP_BITS.map(f32::from_bits))
}

/// Blockwise NF4 quantization as bitsandbytes 0.50 does it on the CPU
/// (`quantize_4bit`, default backend): per block of 64, `absmax = max |a|`,
/// `s = clamp(a * (1 / absmax), -1, 1)` (a division by absmax for a final partial
/// block), and the code is the number of midpoints `(c[k] + c[k+1]) / 2` (in `f32`)
/// strictly below `s` (`torch.bucketize`), so a value exactly on a midpoint takes the
/// lower code. Returns codes and the absmax of every block.
fn quantize_blockwise(values: &[f32], code: &[f32], blocksize: usize) -> (Vec<u8>, Vec<f32>) {
    let mids: Vec<f32> = code.windows(2).map(|w| (w[0] + w[1]) / 2.0).collect();
    let bucket = |s: f32| mids.partition_point(|&m| m < s) as u8;
    let full = values.len() - values.len() % blocksize;
    let mut q = Vec::with_capacity(values.len());
    let mut absmax = Vec::with_capacity(values.len().div_ceil(blocksize));
    for (bi, block) in values.chunks(blocksize).enumerate() {
        let am = block.iter().fold(0f32, |m, v| m.max(v.abs()));
        absmax.push(am);
        let am_safe = am.max(1e-38);
        if bi * blocksize < full {
            let inv = 1.0 / am_safe;
            q.extend(block.iter().map(|&v| bucket((v * inv).clamp(-1.0, 1.0))));
        } else {
            q.extend(block.iter().map(|&v| bucket((v / am_safe).clamp(-1.0, 1.0))));
        }
    }
    (q, absmax)
}

/// Double-quantized absmax statistics.
#[derive(Debug, Clone, PartialEq)]
pub struct NestedAbsmax {
    /// One u8 code per 64-block.
    pub absmax_q: Vec<u8>,
    /// One f32 scale per 256 codes.
    pub nested_absmax: Vec<f32>,
    /// The 256-entry dynamic map.
    pub nested_code: Vec<f32>,
    /// `mean(absmax)`.
    pub offset: f32,
}

impl NestedAbsmax {
    /// `code2[q] * nested_absmax[i / 256] + offset`.
    pub fn dequantize(&self) -> Vec<f32> {
        self.absmax_q
            .iter()
            .enumerate()
            .map(|(i, &q)| self.nested_code[q as usize] * self.nested_absmax[i / NESTED_BLOCKSIZE] + self.offset)
            .collect()
    }
}

/// A 4-bit NF4 tensor (always 2-D `[rows, cols]` for weights; any shape flattens).
#[derive(Debug, Clone)]
pub struct Nf4Tensor {
    pub shape: Vec<usize>,
    /// `ceil(n / 2)` bytes, first element in the high nibble.
    pub packed: Vec<u8>,
    /// The absmax per 64-block actually used for dequantization (after the double
    /// quantization round trip when `nested` is set).
    pub absmax: Vec<f32>,
    /// Present when the statistics are double quantized.
    pub nested: Option<NestedAbsmax>,
}

impl Nf4Tensor {
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }

    /// Quantize `values` (row-major, `shape`).
    pub fn quantize(values: &[f32], shape: &[usize], double_quant: bool) -> Result<Self> {
        let n: usize = shape.iter().product();
        if n != values.len() {
            return Err(EngineError::Config(format!(
                "nf4 quantize: shape {shape:?} does not match {} values",
                values.len()
            )));
        }
        let (q, absmax) = quantize_blockwise(values, &NF4_CODE, NF4_BLOCKSIZE);
        let packed = pack_nibbles(&q);
        let (absmax, nested) = if double_quant {
            let nested = double_quantize(&absmax);
            (nested.dequantize(), Some(nested))
        } else {
            (absmax, None)
        };
        Ok(Self { shape: shape.to_vec(), packed, absmax, nested })
    }

    /// Build from stored parts, checking their sizes.
    pub fn from_parts(shape: Vec<usize>, packed: Vec<u8>, absmax: Vec<f32>, nested: Option<NestedAbsmax>) -> Result<Self> {
        let n: usize = shape.iter().product();
        if packed.len() != n.div_ceil(2) {
            return Err(EngineError::Config(format!(
                "nf4: {} packed bytes for shape {shape:?} (expected {})",
                packed.len(),
                n.div_ceil(2)
            )));
        }
        if absmax.len() != n.div_ceil(NF4_BLOCKSIZE) {
            return Err(EngineError::Config(format!(
                "nf4: {} absmax values for shape {shape:?} (expected {})",
                absmax.len(),
                n.div_ceil(NF4_BLOCKSIZE)
            )));
        }
        Ok(Self { shape, packed, absmax, nested })
    }

    /// Dequantize everything to f32.
    pub fn dequantize(&self) -> Vec<f32> {
        let mut out = vec![0f32; self.numel()];
        self.dequantize_into(&mut out);
        out
    }

    /// Dequantize into `out` (length `numel`). Uses a 256-entry pair table so each byte
    /// is one lookup; blocks of 64 values (32 bytes) share one absmax.
    pub fn dequantize_into(&self, out: &mut [f32]) {
        let lut = pair_lut();
        let n = out.len().min(self.numel());
        let full = n / 2;
        for (bi, chunk) in out[..full * 2].chunks_mut(NF4_BLOCKSIZE).enumerate() {
            let am = self.absmax[bi];
            let bytes = &self.packed[bi * NF4_BLOCKSIZE / 2..bi * NF4_BLOCKSIZE / 2 + chunk.len() / 2];
            for (o, &b) in chunk.chunks_exact_mut(2).zip(bytes) {
                let (hi, lo) = lut[b as usize];
                o[0] = hi * am;
                o[1] = lo * am;
            }
        }
        if n % 2 == 1 {
            let b = self.packed[full];
            out[n - 1] = NF4_CODE[(b >> 4) as usize] * self.absmax[(n - 1) / NF4_BLOCKSIZE];
        }
    }

    /// Dequantize the flat elements `[start, start + out.len())` into `out`.
    pub fn dequantize_range(&self, start: usize, out: &mut [f32]) {
        let end = start + out.len();
        assert!(end <= self.numel(), "nf4 range {start}..{end} of {} values", self.numel());
        let (mut i, mut o) = (start, 0usize);
        #[cfg(target_arch = "x86_64")]
        if std::arch::is_x86_feature_detected!("avx512f") {
            // Scalar up to a multiple of 32, then 32 values (16 bytes, inside one 64-block)
            // per step in registers.
            let head = (start.next_multiple_of(32) - start).min(out.len());
            self.dequantize_scalar(start, &mut out[..head]);
            (i, o) = (start + head, head);
            let chunks = (end - i) / 32;
            // SAFETY: AVX-512F is present; chunks * 32 values from i (a multiple of 32)
            // are inside the tensor (asserted above) and inside out from o.
            unsafe { dequantize_chunks_avx512(&self.packed, &self.absmax, i, chunks, out[o..].as_mut_ptr()) };
            (i, o) = (i + chunks * 32, o + chunks * 32);
        }
        self.dequantize_scalar(i, &mut out[o..]);
    }

    fn dequantize_scalar(&self, start: usize, out: &mut [f32]) {
        let lut = pair_lut();
        let end = start + out.len();
        let (mut i, mut o) = (start, 0usize);
        while i < end {
            if i % 2 == 0 && i + 1 < end {
                // Both elements of a byte share a 64-block (blocks start at even indices).
                let (hi, lo) = lut[self.packed[i / 2] as usize];
                let am = self.absmax[i / NF4_BLOCKSIZE];
                out[o] = hi * am;
                out[o + 1] = lo * am;
                i += 2;
                o += 2;
            } else {
                let b = self.packed[i / 2];
                let c = if i % 2 == 0 { b >> 4 } else { b & 15 };
                out[o] = NF4_CODE[c as usize] * self.absmax[i / NF4_BLOCKSIZE];
                i += 1;
                o += 1;
            }
        }
    }

    /// Dequantize rows `[r0, r1)` of a 2-D tensor into `out` (converted by `f`).
    pub fn dequantize_rows_with<T>(&self, r0: usize, r1: usize, out: &mut [T], f: impl Fn(f32) -> T) {
        let cols = self.shape.last().copied().unwrap_or(1);
        let start = r0 * cols;
        let end = r1 * cols;
        for (o, i) in out.iter_mut().zip(start..end) {
            let b = self.packed[i / 2];
            let c = if i % 2 == 0 { b >> 4 } else { b & 15 };
            *o = f(NF4_CODE[c as usize] * self.absmax[i / NF4_BLOCKSIZE]);
        }
    }
}

/// `chunks` runs of 32 values from `start` (a multiple of 32: each run is 16 bytes inside
/// one 64-block) into `out`: codes looked up 16 at a time in a register table
/// (`vpermps`), times the block's absmax (the scalar path's one multiply: the same
/// values), high and low nibbles interleaved back into element order.
///
/// # Safety
/// AVX-512F; `packed` and `absmax` cover the runs; `out` has `chunks * 32` floats.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn dequantize_chunks_avx512(packed: &[u8], absmax: &[f32], start: usize, chunks: usize, out: *mut f32) {
    use std::arch::x86_64::*;
    debug_assert!(start.is_multiple_of(32) && (start + chunks * 32).div_ceil(2) <= packed.len());
    let lut = _mm512_loadu_ps(NF4_CODE.as_ptr());
    let low = _mm512_set1_epi32(15);
    // Element 2j is the high nibble of byte j, 2j + 1 its low nibble.
    let first = _mm512_setr_epi32(0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23);
    let second = _mm512_setr_epi32(8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31);
    for c in 0..chunks {
        let i = start + c * 32;
        let scale = _mm512_set1_ps(*absmax.get_unchecked(i / NF4_BLOCKSIZE));
        let v = _mm512_cvtepu8_epi32(_mm_loadu_si128(packed.as_ptr().add(i / 2) as *const __m128i));
        let hi = _mm512_mul_ps(_mm512_permutexvar_ps(_mm512_srli_epi32::<4>(v), lut), scale);
        let lo = _mm512_mul_ps(_mm512_permutexvar_ps(_mm512_and_si512(v, low), lut), scale);
        let o = out.add(c * 32);
        _mm512_storeu_ps(o, _mm512_permutex2var_ps(hi, first, lo));
        _mm512_storeu_ps(o.add(16), _mm512_permutex2var_ps(hi, second, lo));
    }
}

/// An NF4 tensor kept 4-bit on a device (the portable ops' NF4: CUDA devices, or the CPU
/// under `LORAFLEET_OPS=portable`; see [`crate::ops::cpu_ops`]), dequantized there with
/// candle's tensor ops for each product, as bitsandbytes does on a GPU. Device memory: the
/// packed codes (half a byte per value) and the absmax statistics as stored (one u8 per
/// 64 values plus an f32 per 256 blocks when double quantized, else one f32 per 64
/// values). The dequantized values equal [`Nf4Tensor::dequantize`] bit for bit: the same
/// f32 products in the same order.
#[derive(Debug)]
pub struct DeviceNf4 {
    shape: Vec<usize>,
    /// u8 `[ceil(n / 2)]`, first element in the high nibble.
    packed: candle_core::Tensor,
    absmax: DeviceAbsmax,
    /// f32 `[256, 2]`: the two code values of every byte (high nibble, low nibble).
    pairs: candle_core::Tensor,
}

#[derive(Debug)]
enum DeviceAbsmax {
    /// f32 `[blocks]`.
    Plain(candle_core::Tensor),
    /// u8 codes `[blocks]`, the f32 dynamic map `[256]`, f32 scales `[groups]`, offset.
    Nested { q: candle_core::Tensor, code: candle_core::Tensor, scale: candle_core::Tensor, offset: f32 },
}

impl DeviceNf4 {
    /// Copy `q` to `device` (the host copy can be dropped afterwards).
    pub fn upload(q: &Nf4Tensor, device: &candle_core::Device) -> candle_core::Result<Self> {
        use candle_core::Tensor;
        let blocks = q.numel().div_ceil(NF4_BLOCKSIZE);
        let absmax = match &q.nested {
            Some(n) => {
                if n.absmax_q.len() != blocks || n.nested_absmax.len() != blocks.div_ceil(NESTED_BLOCKSIZE) || n.nested_code.len() != 256 {
                    candle_core::bail!(
                        "nf4: nested statistics do not fit {blocks} blocks ({} codes, {} scales, a {}-entry map)",
                        n.absmax_q.len(),
                        n.nested_absmax.len(),
                        n.nested_code.len()
                    );
                }
                DeviceAbsmax::Nested {
                    q: Tensor::from_slice(&n.absmax_q, blocks, device)?,
                    code: Tensor::from_slice(&n.nested_code, 256, device)?,
                    scale: Tensor::from_slice(&n.nested_absmax, n.nested_absmax.len(), device)?,
                    offset: n.offset,
                }
            }
            None => DeviceAbsmax::Plain(Tensor::from_slice(&q.absmax, q.absmax.len(), device)?),
        };
        let pairs: Vec<f32> = pair_lut().iter().flat_map(|&(hi, lo)| [hi, lo]).collect();
        Ok(Self {
            shape: q.shape.clone(),
            packed: Tensor::from_slice(&q.packed, q.packed.len(), device)?,
            absmax,
            pairs: Tensor::from_vec(pairs, (256, 2), device)?,
        })
    }

    pub fn shape(&self) -> &[usize] {
        &self.shape
    }

    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }

    pub fn device(&self) -> &candle_core::Device {
        self.packed.device()
    }

    /// Bytes held on the device.
    pub fn device_bytes(&self) -> usize {
        let t = |t: &candle_core::Tensor| t.elem_count() * t.dtype().size_in_bytes();
        t(&self.packed)
            + t(&self.pairs)
            + match &self.absmax {
                DeviceAbsmax::Plain(a) => t(a),
                DeviceAbsmax::Nested { q, code, scale, .. } => t(q) + t(code) + t(scale),
            }
    }

    /// The absmax of every 64-block, f32 `[blocks]` (`code[q] * scale[i / 256] + offset`
    /// when double quantized).
    fn absmax(&self) -> candle_core::Result<candle_core::Tensor> {
        match &self.absmax {
            DeviceAbsmax::Plain(a) => Ok(a.clone()),
            DeviceAbsmax::Nested { q, code, scale, offset } => {
                let blocks = q.elem_count();
                let per_group = per_group(&code.index_select(&q.to_dtype(candle_core::DType::U32)?, 0)?, scale, NESTED_BLOCKSIZE)?;
                per_group.narrow(0, 0, blocks)?.affine(1.0, *offset as f64)
            }
        }
    }

    /// All values, shaped, in `dtype`, on the device.
    pub fn dequantize(&self, dtype: candle_core::DType) -> candle_core::Result<candle_core::Tensor> {
        let n = self.numel();
        // u32 indices: candle's index_select reads an index equal to its type's maximum
        // (u8 255, a byte of two 1.0 codes) as "no row" and returns zeros for it.
        let codes = self.pairs.index_select(&self.packed.to_dtype(candle_core::DType::U32)?, 0)?.flatten_all()?;
        let values = per_group(&codes, &self.absmax()?, NF4_BLOCKSIZE)?;
        values.narrow(0, 0, n)?.reshape(self.shape.as_slice())?.to_dtype(dtype)
    }
}

/// `v[i] * scale[i / group]` for a flat `v` (zero-padded to whole groups; the result has
/// `groups * group` values).
fn per_group(v: &candle_core::Tensor, scale: &candle_core::Tensor, group: usize) -> candle_core::Result<candle_core::Tensor> {
    let groups = scale.elem_count();
    let len = v.elem_count();
    if len > groups * group {
        candle_core::bail!("nf4: {len} values for {groups} scales of {group}");
    }
    let v = if len < groups * group {
        candle_core::Tensor::cat(&[v, &candle_core::Tensor::zeros(groups * group - len, v.dtype(), v.device())?], 0)?
    } else {
        v.clone()
    };
    v.reshape((groups, group))?.broadcast_mul(&scale.reshape((groups, 1))?)?.flatten_all()
}

fn pair_lut() -> &'static [(f32, f32); 256] {
    static LUT: std::sync::OnceLock<[(f32, f32); 256]> = std::sync::OnceLock::new();
    LUT.get_or_init(|| {
        let mut t = [(0f32, 0f32); 256];
        for (b, e) in t.iter_mut().enumerate() {
            *e = (NF4_CODE[b >> 4], NF4_CODE[b & 15]);
        }
        t
    })
}

fn pack_nibbles(q: &[u8]) -> Vec<u8> {
    q.chunks(2).map(|p| (p[0] << 4) | p.get(1).copied().unwrap_or(0)).collect()
}

/// `torch.mean` of a contiguous f32 vector exactly as PyTorch's CPU kernel computes it:
/// `cascade_sum` over 8-lane vectors with 4 interleaved accumulators (and the cascade
/// levels for long inputs), scalar tail first, then the lanes, then divided by `n`.
#[allow(clippy::needless_range_loop)]
fn mean_f32(v: &[f32]) -> f32 {
    const VS: usize = 8;
    type V8 = [f32; VS];
    fn add(a: &mut V8, b: &[f32]) {
        for (x, y) in a.iter_mut().zip(b) {
            *x += *y;
        }
    }
    let n = v.len();
    let nvec = n / VS;
    let vec = |i: usize| &v[i * VS..(i + 1) * VS];
    let size_ilp = nvec / 4;
    let ceil_log2 = |x: usize| if x <= 2 { 1 } else { (usize::BITS - (x - 1).leading_zeros()) as usize };
    let level_power = 4usize.max(ceil_log2(size_ilp) / 4);
    let level_step = 1usize << level_power;
    let level_mask = level_step - 1;
    let mut acc = [[[0f32; VS]; 4]; 4];
    let mut i = 0usize;
    while i + level_step <= size_ilp {
        for _ in 0..level_step {
            for k in 0..4 {
                add(&mut acc[0][k], vec(i * 4 + k));
            }
            i += 1;
        }
        for j in 1..4 {
            for k in 0..4 {
                let prev = acc[j - 1][k];
                add(&mut acc[j][k], &prev);
                acc[j - 1][k] = [0f32; VS];
            }
            if i & (level_mask << (j * level_power)) != 0 {
                break;
            }
        }
    }
    while i < size_ilp {
        for k in 0..4 {
            add(&mut acc[0][k], vec(i * 4 + k));
        }
        i += 1;
    }
    for j in 1..4 {
        for k in 0..4 {
            let a = acc[j][k];
            add(&mut acc[0][k], &a);
        }
    }
    let mut partial = acc[0];
    for i in size_ilp * 4..nvec {
        add(&mut partial[0], vec(i));
    }
    for k in 1..4 {
        let p = partial[k];
        add(&mut partial[0], &p);
    }
    let mut total = 0f32;
    for &x in &v[nvec * VS..] {
        total += x;
    }
    for l in partial[0] {
        total += l;
    }
    total / n.max(1) as f32
}

/// bitsandbytes `compress_statistics`: `offset = mean(absmax)`, then `absmax - offset`
/// quantized blockwise (256) with the dynamic map.
pub fn double_quantize(absmax: &[f32]) -> NestedAbsmax {
    let offset = mean_f32(absmax);
    let centered: Vec<f32> = absmax.iter().map(|&v| v - offset).collect();
    let code = dynamic_map().to_vec();
    let (absmax_q, nested_absmax) = bnb_quantize_blockwise_8bit(&centered, &code, NESTED_BLOCKSIZE);
    NestedAbsmax { absmax_q, nested_absmax, nested_code: code, offset }
}

/// bitsandbytes' CPU blockwise 8-bit quantizer (`quantize_cpu`, bitsandbytes 0.50), which
/// makes the double-quantized absmax codes. Per block: `absmax = max |a|`; each
/// `a * (1 / absmax)`, clamped to [-1, 1], is mapped to one of 65,536 evenly spaced bins
/// (`trunc(((v + 1) * 0.5) * 65535 + 0.5)`, each step rounded to `f32`), and the bin's
/// code comes from a table built once per code book: bin `i` stands for
/// `-1 + 2i / 65535` and takes the first code whose upper midpoint
/// `0.5 * (c[k] + c[k+1])` is not below it.
///
/// So the code is the nearest one only up to the bin width (3e-5): a value within half
/// a bin of a midpoint can get the farther code. We reproduce that because "the same
/// absmax codes as bitsandbytes" is the contract (`tests/fixtures/hf` was made with it).
pub fn bnb_quantize_blockwise_8bit(values: &[f32], code: &[f32], blocksize: usize) -> (Vec<u8>, Vec<f32>) {
    const LUT_SIZE: usize = 65536;
    let lut = {
        let mids: Vec<f32> = code.windows(2).map(|w| 0.5f32 * (w[0] + w[1])).collect();
        let mut lut = vec![0u8; LUT_SIZE];
        let mut k = 0usize;
        for (i, slot) in lut.iter_mut().enumerate() {
            let val = -1.0f32 + (2.0f32 * i as f32) / (LUT_SIZE - 1) as f32;
            while k < mids.len() && mids[k] < val {
                k += 1;
            }
            *slot = k as u8;
        }
        lut
    };
    let mut q = Vec::with_capacity(values.len());
    let mut absmax = Vec::with_capacity(values.len().div_ceil(blocksize));
    for block in values.chunks(blocksize) {
        // NaN never wins the max (bitsandbytes drops NaN lanes).
        let am = block.iter().fold(0f32, |m, v| if v.abs() > m { v.abs() } else { m });
        absmax.push(am);
        if am == 0.0 {
            q.extend(std::iter::repeat_n(0u8, block.len()));
            continue;
        }
        let inv = 1.0f32 / am;
        for &v in block {
            let v = (v * inv).clamp(-1.0, 1.0);
            let t = ((v + 1.0) * 0.5) * (LUT_SIZE - 1) as f32 + 0.5;
            q.push(lut[(t as usize).min(LUT_SIZE - 1)]);
        }
    }
    (q, absmax)
}

#[cfg(test)]
mod tests {
    #[test]
    fn any_range_dequantizes_to_the_whole_tensors_values() {
        // Ranges starting and ending inside and on 32- and 64-value boundaries, an odd
        // total (a half-used last byte): the vectorized runs and the scalar edges agree
        // with the whole dequantization bit for bit.
        let values: Vec<f32> = (0..1001).map(|i| ((i * 37 % 101) as f32 - 50.0) / 7.0).collect();
        let q = super::Nf4Tensor::quantize(&values, &[1001], true).unwrap();
        let all = q.dequantize();
        for (start, len) in [(0, 1001), (0, 32), (1, 31), (5, 200), (31, 66), (32, 64), (64, 937), (990, 11), (1000, 1), (500, 0)] {
            let mut out = vec![f32::NAN; len];
            q.dequantize_range(start, &mut out);
            let want = &all[start..start + len];
            assert!(out.iter().zip(want).all(|(a, b)| a.to_bits() == b.to_bits()), "range {start}+{len}");
        }
    }

    use super::*;

    #[test]
    fn pack_roundtrip_odd_length() {
        let v = [0.5f32, -1.0, 0.25];
        let t = Nf4Tensor::quantize(&v, &[3], false).unwrap();
        assert_eq!(t.packed.len(), 2);
        assert_eq!(t.packed[1] & 15, 0);
        let d = t.dequantize();
        assert_eq!(d[1], -1.0);
        assert!((d[0] - 0.5).abs() < 0.07);
    }

    #[test]
    fn device_nf4_equals_host_dequant_on_ragged_shapes() {
        // Odd element counts (a half-filled last byte), partial last 64-block, and more
        // than 256 blocks (a partial last group of nested statistics).
        for (shape, dq) in [(vec![3usize], false), (vec![7, 9], true), (vec![3, 50], true), (vec![130, 131], true), (vec![130, 131], false)] {
            let n: usize = shape.iter().product();
            let v: Vec<f32> = (0..n).map(|i| (i as f32 * 0.37).sin() * (1.0 + (i / 64) as f32 * 0.01)).collect();
            let q = Nf4Tensor::quantize(&v, &shape, dq).unwrap();
            let d = DeviceNf4::upload(&q, &candle_core::Device::Cpu).unwrap();
            let got = d.dequantize(candle_core::DType::F32).unwrap();
            assert_eq!(got.dims(), shape.as_slice());
            let got: Vec<u32> = got.flatten_all().unwrap().to_vec1::<f32>().unwrap().iter().map(|x| x.to_bits()).collect();
            let want: Vec<u32> = q.dequantize().iter().map(|x| x.to_bits()).collect();
            assert_eq!(got, want, "{shape:?} double quant {dq}");
        }
    }

    #[test]
    fn zero_block_dequantizes_to_zero() {
        let v = vec![0f32; 64];
        let t = Nf4Tensor::quantize(&v, &[64], true).unwrap();
        assert!(t.dequantize().iter().all(|&x| x == 0.0));
    }
}

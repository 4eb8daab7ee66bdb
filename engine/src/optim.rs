//! AdamW (exactly `torch.optim.AdamW`'s single-tensor algorithm) with saveable state,
//! an 8-bit variant with blockwise-quantized moments (bitsandbytes' `AdamW8bit`
//! semantics), and global gradient-norm clipping (`torch.nn.utils.clip_grad_norm_`).
//!
//! torch's update for one parameter at step `t` (1-based):
//! ```text
//! p  = p * (1 - lr * wd)                 // decoupled weight decay, first
//! m  = lerp(m, g, 1 - b1)                // m + (1 - b1) * (g - m)
//! v  = v * b2 + (1 - b2) * g * g
//! step_size = lr / (1 - b1^t)
//! denom = sqrt(v) / sqrt(1 - b2^t) + eps // eps after the bias-corrected sqrt
//! p  = p - step_size * m / denom
//! ```
//! Scalars (`1 - b1^t`, `step_size`...) are computed in f64 as torch does in Python, the
//! element-wise arithmetic in f32.
//!
//! 8-bit (bitsandbytes `AdamW8bit`, `optim_bits=8`, blockwise): parameters with fewer
//! than 4096 elements (`min_8bit_size`) keep f32 moments. Larger ones store each moment
//! as u8 codes in blocks of 256 consecutive elements with one f32 absmax per block; the
//! first moment uses the signed dynamic map, the second the unsigned one
//! (`create_dynamic_map(signed=True/False)`, 256 values). Each step dequantizes a block
//! (`code[q] * absmax`), updates the moments in f32, updates the parameter with those
//! f32 values, then stores the new moments with the block's new absmax and the nearest
//! code (a value exactly between two codes takes the lower one). The parameter update
//! is torch's formula above (bitsandbytes' kernel writes the same expression as
//! `p += -lr * sqrt(1-b2^t) / (1-b1^t) * m / (sqrt(v) + eps * sqrt(1-b2^t))`).

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use candle_core::{DType, Device, Tensor, Var};
use serde::{Deserialize, Serialize};

use crate::{EngineError, Result};

pub const BLOCK_8BIT: usize = 256;
pub const MIN_8BIT_SIZE: usize = 4096;

#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct AdamWConfig {
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
    /// Quantize moments to 8 bits (bitsandbytes AdamW8bit).
    pub eight_bit: bool,
}

impl Default for AdamWConfig {
    fn default() -> Self {
        Self { beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 0.0, eight_bit: false }
    }
}

/// bitsandbytes' signed dynamic map exactly as bitsandbytes 0.50 produced it (the
/// `nested_quant_map` of the NF4 fixtures): recomputing it in f32 here lands one ulp
/// away on a few entries, depending on torch's SIMD `linspace`.
#[rustfmt::skip]
#[allow(clippy::excessive_precision)]
pub(crate) const SIGNED_DYNAMIC_MAP: [f32; 256] = [
    -0.992968738079071, -0.9789062738418579, -0.96484375, -0.9507812261581421,
    -0.936718761920929, -0.922656238079071, -0.9085937738418579, -0.89453125,
    -0.8804687261581421, -0.866406261920929, -0.852343738079071, -0.8382812738418579,
    -0.82421875, -0.8101562261581421, -0.796093761920929, -0.782031238079071,
    -0.7679687738418579, -0.75390625, -0.7398437261581421, -0.725781261920929,
    -0.7117187976837158, -0.6976562738418579, -0.68359375, -0.6695312261581421,
    -0.655468761920929, -0.6414062976837158, -0.6273437738418579, -0.61328125,
    -0.5992187261581421, -0.585156261920929, -0.5710937976837158, -0.5570312738418579,
    -0.54296875, -0.5289062261581421, -0.5148437023162842, -0.500781238079071,
    -0.48671871423721313, -0.47265625, -0.4585937261581421, -0.44453126192092896,
    -0.43046873807907104, -0.4164062440395355, -0.40234375, -0.3882812261581421,
    -0.37421876192092896, -0.36015623807907104, -0.3460937440395355, -0.33203125,
    -0.3179687261581421, -0.30390626192092896, -0.28984373807907104, -0.2757812738418579,
    -0.26171875, -0.24765624105930328, -0.23359374701976776, -0.21953125298023224,
    -0.20546874403953552, -0.19140625, -0.17734375596046448, -0.16328124701976776,
    -0.14921875298023224, -0.13515624403953552, -0.12109375, -0.10703125596046448,
    -0.09859374910593033, -0.09578125923871994, -0.09296875447034836, -0.09015624970197678,
    -0.08734375238418579, -0.08453124761581421, -0.08171875774860382, -0.07890625298023224,
    -0.07609374821186066, -0.07328125089406967, -0.07046874612569809, -0.0676562562584877,
    -0.06484375149011612, -0.062031250447034836, -0.05921875312924385, -0.05640624836087227,
    -0.053593751043081284, -0.05078125, -0.047968748956918716, -0.04515625163912773,
    -0.04234374687075615, -0.039531249552965164, -0.03671875223517418, -0.033906251192092896,
    -0.031093750149011612, -0.028281250968575478, -0.025468749925494194, -0.02265625074505806,
    -0.019843751564621925, -0.017031250521540642, -0.014218750409781933, -0.011406250298023224,
    -0.009718749672174454, -0.009156249463558197, -0.008593750186264515, -0.008031249977648258,
    -0.0074687497690320015, -0.006906250026077032, -0.006343749817460775, -0.005781250074505806,
    -0.0052187503315508366, -0.0046562496572732925, -0.004093749914318323, -0.0035312497057020664,
    -0.002968749962747097, -0.002406249986961484, -0.001843750011175871, -0.001281249918974936,
    -0.0009437500848434865, -0.0008312499849125743, -0.0007187500596046448, -0.0006062500760890543,
    -0.000493750034365803, -0.0003812500217463821, -0.0002687500382307917, -0.00015625001105945557,
    -8.874999912222847e-05, -6.625000241911039e-05, -4.374999844003469e-05, -2.1249998098937795e-05,
    -7.749999895168003e-06, -3.250000190746505e-06, -5.500000384017767e-07, 0.0,
    5.500000384017767e-07, 3.250000190746505e-06, 7.749999895168003e-06, 2.1249998098937795e-05,
    4.374999844003469e-05, 6.625000241911039e-05, 8.874999912222847e-05, 0.00015625001105945557,
    0.0002687500382307917, 0.0003812500217463821, 0.000493750034365803, 0.0006062500760890543,
    0.0007187500596046448, 0.0008312499849125743, 0.0009437500848434865, 0.001281249918974936,
    0.001843750011175871, 0.002406249986961484, 0.002968749962747097, 0.0035312497057020664,
    0.004093749914318323, 0.0046562496572732925, 0.0052187503315508366, 0.005781250074505806,
    0.006343749817460775, 0.006906250026077032, 0.0074687497690320015, 0.008031249977648258,
    0.008593750186264515, 0.009156249463558197, 0.009718749672174454, 0.011406250298023224,
    0.014218750409781933, 0.017031250521540642, 0.019843751564621925, 0.02265625074505806,
    0.025468749925494194, 0.028281250968575478, 0.031093750149011612, 0.033906251192092896,
    0.03671875223517418, 0.039531249552965164, 0.04234374687075615, 0.04515625163912773,
    0.047968748956918716, 0.05078125, 0.053593751043081284, 0.05640624836087227,
    0.05921875312924385, 0.062031250447034836, 0.06484375149011612, 0.0676562562584877,
    0.07046874612569809, 0.07328125089406967, 0.07609374821186066, 0.07890625298023224,
    0.08171875774860382, 0.08453124761581421, 0.08734375238418579, 0.09015624970197678,
    0.09296875447034836, 0.09578125923871994, 0.09859374910593033, 0.10703125596046448,
    0.12109375, 0.13515624403953552, 0.14921875298023224, 0.16328124701976776,
    0.17734375596046448, 0.19140625, 0.20546874403953552, 0.21953125298023224,
    0.23359374701976776, 0.24765624105930328, 0.26171875, 0.2757812738418579,
    0.28984373807907104, 0.30390626192092896, 0.3179687261581421, 0.33203125,
    0.3460937440395355, 0.36015623807907104, 0.37421876192092896, 0.3882812261581421,
    0.40234375, 0.4164062440395355, 0.43046873807907104, 0.44453126192092896,
    0.4585937261581421, 0.47265625, 0.48671871423721313, 0.500781238079071,
    0.5148437023162842, 0.5289062261581421, 0.54296875, 0.5570312738418579,
    0.5710937976837158, 0.585156261920929, 0.5992187261581421, 0.61328125,
    0.6273437738418579, 0.6414062976837158, 0.655468761920929, 0.6695312261581421,
    0.68359375, 0.6976562738418579, 0.7117187976837158, 0.725781261920929,
    0.7398437261581421, 0.75390625, 0.7679687738418579, 0.782031238079071,
    0.796093761920929, 0.8101562261581421, 0.82421875, 0.8382812738418579,
    0.852343738079071, 0.866406261920929, 0.8804687261581421, 0.89453125,
    0.9085937738418579, 0.922656238079071, 0.936718761920929, 0.9507812261581421,
    0.96484375, 0.9789062738418579, 0.992968738079071, 1.0,
];

/// bitsandbytes `create_dynamic_map(signed, max_exponent_bits=7, total_bits=8)`, sorted.
/// The signed map is bitsandbytes' own table; the unsigned one is computed in f32 like
/// torch's `linspace` and products (it may differ from bitsandbytes by an ulp).
pub fn dynamic_map(signed: bool) -> [f32; 256] {
    if signed {
        return SIGNED_DYNAMIC_MAP;
    }
    computed_dynamic_map(signed)
}

fn computed_dynamic_map(signed: bool) -> [f32; 256] {
    let max_exp = 7i32;
    let non_sign_bits = 7i32; // total_bits - 1 in current bitsandbytes, signed or not
    let mut data: Vec<f32> = Vec::with_capacity(256);
    for i in 0..max_exp {
        let items = if signed { (1i64 << (i + non_sign_bits - max_exp)) + 1 } else { (1i64 << (i + non_sign_bits - max_exp + 1)) + 1 };
        let bounds = linspace_f32(0.1, 1.0, items as usize);
        let scale = 10f64.powi(-(max_exp - 1) + i) as f32;
        for w in bounds.windows(2) {
            let mean = (w[0] + w[1]) / 2.0;
            data.push(scale * mean);
            if signed {
                data.push(-(scale * mean));
            }
        }
    }
    data.push(0.0);
    data.push(1.0);
    while data.len() < 256 {
        data.push(0.0);
    }
    data.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let mut out = [0f32; 256];
    out.copy_from_slice(&data[..256]);
    out
}

/// torch.linspace in float32 as ATen's CPU kernel computes it: `step = (end - start) /
/// (n - 1)`; whole SIMD vectors (`LINSPACE_LANES` floats) are `base + i * step` from
/// the vector's first index, the remainder is scalar (`start + step * i` below the
/// halfway point, `end - step * (n - 1 - i)` above).
fn linspace_f32(start: f32, end: f32, n: usize) -> Vec<f32> {
    linspace_lanes(start, end, n, LINSPACE_LANES)
}

const LINSPACE_LANES: usize = 8;

fn linspace_lanes(start: f32, end: f32, n: usize, lanes: usize) -> Vec<f32> {
    if n == 1 {
        return vec![start];
    }
    let step = (end - start) / (n as f32 - 1.0);
    let half = n / 2;
    let scalar = |i: usize| if i < half { start + step * i as f32 } else { end - step * (n - 1 - i) as f32 };
    let mut out = Vec::with_capacity(n);
    let mut idx = 0;
    while idx + lanes <= n {
        let base = scalar(idx);
        for l in 0..lanes {
            out.push(base + l as f32 * step);
        }
        idx += lanes;
    }
    while idx < n {
        out.push(scalar(idx));
        idx += 1;
    }
    out
}

/// Nearest code index in a sorted map (ties to the lower index).
fn quantize_code(map: &[f32; 256], x: f32) -> u8 {
    let mut lo = 0usize;
    let mut hi = 255usize;
    if x <= map[0] {
        return 0;
    }
    if x >= map[255] {
        return 255;
    }
    while hi - lo > 1 {
        let mid = (lo + hi) / 2;
        if map[mid] <= x {
            lo = mid
        } else {
            hi = mid
        }
    }
    // map[lo] <= x < map[hi]
    if (x - map[lo]) <= (map[hi] - x) {
        lo as u8
    } else {
        hi as u8
    }
}

/// Blockwise 8-bit storage of one moment.
#[derive(Debug, Clone, PartialEq)]
pub struct Quantized8 {
    pub codes: Vec<u8>,
    pub absmax: Vec<f32>,
}

impl Quantized8 {
    pub fn zeros(n: usize, map: &[f32; 256]) -> Self {
        let zero = quantize_code(map, 0.0);
        Self { codes: vec![zero; n], absmax: vec![0.0; n.div_ceil(BLOCK_8BIT)] }
    }

    pub fn quantize(values: &[f32], map: &[f32; 256]) -> Self {
        let mut q = Self { codes: vec![0; values.len()], absmax: vec![0.0; values.len().div_ceil(BLOCK_8BIT)] };
        for (b, chunk) in values.chunks(BLOCK_8BIT).enumerate() {
            q.store_block(b, chunk, map);
        }
        q
    }

    fn store_block(&mut self, b: usize, vals: &[f32], map: &[f32; 256]) {
        let absmax = vals.iter().fold(0f32, |m, x| m.max(x.abs()));
        self.absmax[b] = absmax;
        let inv = if absmax > 0.0 { 1.0 / absmax } else { 0.0 };
        for (i, v) in vals.iter().enumerate() {
            self.codes[b * BLOCK_8BIT + i] = quantize_code(map, v * inv);
        }
    }

    fn load_block(&self, b: usize, out: &mut [f32], map: &[f32; 256]) {
        let a = self.absmax[b];
        for (i, o) in out.iter_mut().enumerate() {
            *o = map[self.codes[b * BLOCK_8BIT + i] as usize] * a;
        }
    }

    pub fn dequantize(&self, map: &[f32; 256]) -> Vec<f32> {
        let mut out = vec![0f32; self.codes.len()];
        for (b, chunk) in out.chunks_mut(BLOCK_8BIT).enumerate() {
            self.load_block(b, chunk, map);
        }
        out
    }
}

/// The moments of one parameter.
#[derive(Debug, Clone, PartialEq)]
pub enum Moments {
    F32 { m: Vec<f32>, v: Vec<f32> },
    Q8 { m: Quantized8, v: Quantized8 },
}

#[derive(Debug, Clone, PartialEq)]
pub struct ParamState {
    pub step: u64,
    pub moments: Moments,
}

/// AdamW over named f32 parameters.
pub struct AdamW {
    pub config: AdamWConfig,
    pub state: BTreeMap<String, ParamState>,
    signed_map: [f32; 256],
    unsigned_map: [f32; 256],
}

/// One element-wise AdamW update in f32 given torch's f64 scalars.
#[inline]
fn adam_elem(p: &mut f32, m: &mut f32, v: &mut f32, g: f32, k: &StepScalars) {
    *p *= k.decay;
    // torch lerp with weight < 0.5: self + weight * (end - self)
    *m += k.one_minus_b1 * (g - *m);
    *v = *v * k.b2 + k.one_minus_b2 * g * g;
    let denom = v.sqrt() / k.bc2_sqrt + k.eps;
    *p += k.neg_step_size * (*m / denom);
}

struct StepScalars {
    decay: f32,
    one_minus_b1: f32,
    b2: f32,
    one_minus_b2: f32,
    bc2_sqrt: f32,
    eps: f32,
    neg_step_size: f32,
}

impl AdamW {
    pub fn new(config: AdamWConfig) -> Self {
        Self { config, state: BTreeMap::new(), signed_map: dynamic_map(true), unsigned_map: dynamic_map(false) }
    }

    fn scalars(&self, step: u64, lr: f64) -> StepScalars {
        let c = &self.config;
        let bc1 = 1.0 - c.beta1.powf(step as f64);
        let bc2 = 1.0 - c.beta2.powf(step as f64);
        StepScalars {
            decay: (1.0 - lr * c.weight_decay) as f32,
            one_minus_b1: (1.0 - c.beta1) as f32,
            b2: c.beta2 as f32,
            one_minus_b2: (1.0 - c.beta2) as f32,
            bc2_sqrt: bc2.sqrt() as f32,
            eps: c.eps as f32,
            neg_step_size: (-(lr / bc1)) as f32,
        }
    }

    /// Update one parameter held on the host.
    pub fn update_host(&mut self, name: &str, p: &mut [f32], g: &[f32], lr: f64) -> Result<()> {
        if p.len() != g.len() {
            return Err(EngineError::Config(format!("optimizer: gradient of {name} has {} elements, parameter {}", g.len(), p.len())));
        }
        let n = p.len();
        let eight = self.config.eight_bit && n >= MIN_8BIT_SIZE;
        let (sm, um) = (self.signed_map, self.unsigned_map);
        let st = self.state.entry(name.to_string()).or_insert_with(|| ParamState {
            step: 0,
            moments: if eight {
                Moments::Q8 { m: Quantized8::zeros(n, &sm), v: Quantized8::zeros(n, &um) }
            } else {
                Moments::F32 { m: vec![0.0; n], v: vec![0.0; n] }
            },
        });
        st.step += 1;
        let step = st.step;
        let k = self.scalars(step, lr);
        let st = self.state.get_mut(name).expect("inserted above");
        match &mut st.moments {
            Moments::F32 { m, v } => {
                if m.len() != n {
                    return Err(EngineError::Config(format!("optimizer state of {name} has {} elements, parameter {n}", m.len())));
                }
                for i in 0..n {
                    adam_elem(&mut p[i], &mut m[i], &mut v[i], g[i], &k);
                }
            }
            Moments::Q8 { m, v } => {
                if m.codes.len() != n {
                    return Err(EngineError::Config(format!("optimizer state of {name} has {} elements, parameter {n}", m.codes.len())));
                }
                let mut mb = [0f32; BLOCK_8BIT];
                let mut vb = [0f32; BLOCK_8BIT];
                for b in 0..n.div_ceil(BLOCK_8BIT) {
                    let lo = b * BLOCK_8BIT;
                    let hi = (lo + BLOCK_8BIT).min(n);
                    let len = hi - lo;
                    m.load_block(b, &mut mb[..len], &sm);
                    v.load_block(b, &mut vb[..len], &um);
                    for i in 0..len {
                        adam_elem(&mut p[lo + i], &mut mb[i], &mut vb[i], g[lo + i], &k);
                    }
                    m.store_block(b, &mb[..len], &sm);
                    v.store_block(b, &vb[..len], &um);
                }
            }
        }
        Ok(())
    }

    /// One optimizer step over every parameter that has a gradient.
    pub fn step(&mut self, params: &BTreeMap<String, Var>, grads: &BTreeMap<String, Tensor>, lr: f64) -> Result<()> {
        for (name, var) in params {
            let Some(g) = grads.get(name) else { continue };
            let t = var.as_tensor();
            let shape = t.shape().clone();
            let device = t.device().clone();
            let mut p: Vec<f32> = t.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
            let gv: Vec<f32> = g.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
            self.update_host(name, &mut p, &gv, lr)?;
            let new = Tensor::from_vec(p, shape, &device)?.to_dtype(t.dtype())?;
            var.set(&new)?;
        }
        Ok(())
    }

    /// Number of steps taken (that of the first parameter).
    pub fn steps_taken(&self) -> u64 {
        self.state.values().next().map(|s| s.step).unwrap_or(0)
    }

    /// Save the moments and step counts to a safetensors file.
    pub fn save(&self, path: &Path) -> Result<()> {
        let mut map: HashMap<String, Tensor> = HashMap::new();
        let cpu = Device::Cpu;
        for (name, st) in &self.state {
            map.insert(format!("{name}.step"), Tensor::from_vec(vec![st.step as i64], 1, &cpu)?);
            match &st.moments {
                Moments::F32 { m, v } => {
                    map.insert(format!("{name}.exp_avg"), Tensor::from_vec(m.clone(), m.len(), &cpu)?);
                    map.insert(format!("{name}.exp_avg_sq"), Tensor::from_vec(v.clone(), v.len(), &cpu)?);
                }
                Moments::Q8 { m, v } => {
                    for (k, q) in [("exp_avg", m), ("exp_avg_sq", v)] {
                        map.insert(format!("{name}.{k}.q8"), Tensor::from_vec(q.codes.clone(), q.codes.len(), &cpu)?);
                        map.insert(format!("{name}.{k}.absmax"), Tensor::from_vec(q.absmax.clone(), q.absmax.len(), &cpu)?);
                    }
                }
            }
        }
        candle_core::safetensors::save(&map, path).map_err(|e| EngineError::file(path, format!("cannot write optimizer state: {e}")))
    }

    /// Restore moments saved by [`AdamW::save`].
    pub fn load(&mut self, path: &Path) -> Result<()> {
        let map = candle_core::safetensors::load(path, &Device::Cpu)
            .map_err(|e| EngineError::file(path, format!("cannot read optimizer state: {e}")))?;
        let bad = |m: String| EngineError::file(path, m);
        let mut state = BTreeMap::new();
        for key in map.keys() {
            let Some(name) = key.strip_suffix(".step") else { continue };
            let step = map[key].to_vec1::<i64>().map_err(|e| bad(format!("{key}: {e}")))?;
            let step = *step.first().ok_or_else(|| bad(format!("{key}: empty")))? as u64;
            let moments = if let (Some(m), Some(v)) = (map.get(&format!("{name}.exp_avg")), map.get(&format!("{name}.exp_avg_sq"))) {
                Moments::F32 { m: m.to_vec1()?, v: v.to_vec1()? }
            } else {
                let get = |k: &str| map.get(&format!("{name}.{k}")).ok_or_else(|| bad(format!("missing tensor {name}.{k}")));
                let q = |k: &str| -> Result<Quantized8> {
                    Ok(Quantized8 { codes: get(&format!("{k}.q8"))?.to_vec1()?, absmax: get(&format!("{k}.absmax"))?.to_vec1()? })
                };
                Moments::Q8 { m: q("exp_avg")?, v: q("exp_avg_sq")? }
            };
            state.insert(name.to_string(), ParamState { step, moments });
        }
        self.state = state;
        Ok(())
    }
}

/// The global L2 norm of all gradients (f32 per tensor, combined as torch does: the
/// norm of the per-tensor norms).
pub fn global_grad_norm(grads: &BTreeMap<String, Tensor>) -> Result<f64> {
    let mut sq = 0f64;
    for g in grads.values() {
        let n = g.to_dtype(DType::F32)?.sqr()?.sum_all()?.to_scalar::<f32>()?.sqrt();
        sq += (n as f64) * (n as f64);
    }
    Ok(sq.sqrt())
}

/// `clip_grad_norm_`: scale every gradient by `max_norm / (norm + 1e-6)` when that is
/// below 1. Returns the norm before clipping. `max_norm == 0` only measures.
pub fn clip_grad_norm(grads: &mut BTreeMap<String, Tensor>, max_norm: f64) -> Result<f64> {
    let norm = global_grad_norm(grads)?;
    if max_norm > 0.0 {
        let coef = max_norm / (norm + 1e-6);
        if coef < 1.0 {
            for g in grads.values_mut() {
                *g = (&*g * coef)?;
            }
        }
    }
    Ok(norm)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dynamic_maps_have_256_sorted_values() {
        let s = dynamic_map(true);
        let u = dynamic_map(false);
        assert_eq!(s[255], 1.0);
        assert_eq!(u[255], 1.0);
        assert_eq!(u[0], 0.0);
        assert!(s[0] < -0.99 && s[0] > -1.0);
        assert!(s.windows(2).all(|w| w[0] <= w[1]));
        assert!(u.windows(2).all(|w| w[0] < w[1]));
        // smallest non-zero magnitudes: 1e-6 * 0.55 (signed), 1e-6 * (0.1 + 0.225)
        assert!(s.contains(&0.0));
        // the computed signed map is within an ulp of bitsandbytes' table
        let c = computed_dynamic_map(true);
        for (a, b) in c.iter().zip(s.iter()) {
            assert!((a - b).abs() <= 1e-7, "{a} vs {b}");
        }
    }

    #[test]
    fn quantize_code_picks_nearest() {
        let u = dynamic_map(false);
        for &x in &[0.0f32, 1.0, 0.5, 0.123, 3e-5] {
            let c = quantize_code(&u, x) as usize;
            let best = (0..256).min_by(|&a, &b| (u[a] - x).abs().partial_cmp(&(u[b] - x).abs()).unwrap()).unwrap();
            assert!((u[c] - x).abs() <= (u[best] - x).abs(), "{x}");
        }
    }
}

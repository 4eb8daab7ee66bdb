//! Gradients of every op the model trains through, against central finite differences
//! (f64 where the op supports it), and model-level gradient checks: every LoRA
//! parameter of every layer gets a non-zero gradient, checkpointing on/off agree, and
//! a directional finite difference of the full loss matches.

mod common;

use std::path::PathBuf;
use std::sync::Arc;

use candle_core::{DType, Device, Tensor, Var};
use lorafleet_engine::lora::{ForwardCtx, LoraLinear};
use lorafleet_engine::model::transformer::{attention, attention_composite, causal_mask};
use lorafleet_engine::model::{load_model, CausalLm, ForwardInput, LoadOptions, LoraInit, LoraSettingsRequest, Quant};
use lorafleet_engine::nf4::Nf4Tensor;
use lorafleet_engine::fused;
use lorafleet_engine::ops::{self, FrozenLinear, FrozenWeight};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

fn rand_t(shape: &[usize], seed: u64, dtype: DType) -> Tensor {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let n: usize = shape.iter().product();
    let v: Vec<f64> = (0..n).map(|_| rng.gen_range(-1.0..1.0)).collect();
    Tensor::from_vec(v, shape, &Device::Cpu).unwrap().to_dtype(dtype).unwrap()
}

/// Check d/dx sum(f(x) * r) against central differences.
fn check_grad(name: &str, x0: &Tensor, f: &dyn Fn(&Tensor) -> Tensor, eps: f64, tol: f64) {
    let x = Var::from_tensor(x0).unwrap();
    let y = f(x.as_tensor());
    let r = rand_t(y.dims(), 99, y.dtype());
    let loss = (y * &r).unwrap().sum_all().unwrap();
    let grads = loss.backward().unwrap();
    let g = grads.get(x.as_tensor()).unwrap_or_else(|| panic!("{name}: no gradient reached the input"));
    let g: Vec<f64> = g.to_dtype(DType::F64).unwrap().flatten_all().unwrap().to_vec1().unwrap();
    let base: Vec<f64> = x0.to_dtype(DType::F64).unwrap().flatten_all().unwrap().to_vec1().unwrap();
    let eval = |v: &[f64]| -> f64 {
        let t = Tensor::from_vec(v.to_vec(), x0.dims(), &Device::Cpu).unwrap().to_dtype(x0.dtype()).unwrap();
        (f(&t) * &r).unwrap().sum_all().unwrap().to_dtype(DType::F64).unwrap().to_scalar::<f64>().unwrap()
    };
    let mut worst = 0f64;
    for i in 0..base.len() {
        let mut p = base.clone();
        p[i] += eps;
        let mut m = base.clone();
        m[i] -= eps;
        let fd = (eval(&p) - eval(&m)) / (2.0 * eps);
        let err = (fd - g[i]).abs() / (1.0 + fd.abs());
        worst = worst.max(err);
        assert!(err < tol, "{name}[{i}]: analytic {} finite difference {fd}", g[i]);
    }
    assert!(g.iter().any(|v| *v != 0.0), "{name}: all-zero gradient");
    eprintln!("{name}: worst relative error {worst:e}");
}

#[test]
fn rms_norm_grad() {
    let w = rand_t(&[8], 2, DType::F64);
    check_grad("rms_norm", &rand_t(&[3, 8], 1, DType::F64), &|x| ops::rms_norm(x, &w, 1e-5).unwrap(), 1e-6, 1e-6);
}

#[test]
fn layer_norm_grad() {
    let w = rand_t(&[8], 2, DType::F64);
    let b = rand_t(&[8], 3, DType::F64);
    check_grad("layer_norm", &rand_t(&[3, 8], 1, DType::F64), &|x| ops::layer_norm(x, &w, &b, 1e-5).unwrap(), 1e-6, 1e-6);
}

#[test]
fn softmax_grad() {
    check_grad("softmax", &(rand_t(&[2, 3, 7], 4, DType::F64) * 3.0).unwrap(), &|x| ops::softmax_last(x).unwrap(), 1e-6, 1e-6);
}

#[test]
fn rope_grad() {
    let inv: Vec<f32> = (0..4).map(|i| 1.0 / 10000f32.powf(2.0 * i as f32 / 8.0)).collect();
    let (cos, sin) =
        lorafleet_engine::model::transformer::rope_tables(&inv, &[vec![0, 1, 2, 5], vec![3, 4, 5, 6]], DType::F64, &Device::Cpu).unwrap();
    check_grad("rope", &rand_t(&[2, 3, 4, 8], 5, DType::F64), &|x| ops::rope(x, &cos, &sin).unwrap(), 1e-6, 1e-6);
}

#[test]
fn gelu_erf_grad() {
    // candle's gelu_erf backward uses 0.398942 for 1/sqrt(2 pi): accurate to ~1e-6.
    check_grad("gelu_erf", &(rand_t(&[4, 6], 6, DType::F64) * 3.0).unwrap(), &|x| ops::gelu_erf(x).unwrap(), 1e-6, 1e-5);
}

#[test]
fn silu_grad() {
    check_grad("silu", &(rand_t(&[4, 6], 7, DType::F64) * 3.0).unwrap(), &|x| ops::silu(x).unwrap(), 1e-6, 1e-6);
}

#[test]
fn attention_grad_through_q_k_v() {
    // GQA (4 query heads, 2 kv heads), causal + segment mask.
    let mask = causal_mask(1, 5, 0, Some(&[vec![0, 0, 0, 1, 1]]), None, &Device::Cpu).unwrap();
    let k = rand_t(&[1, 2, 5, 4], 11, DType::F64);
    let v = rand_t(&[1, 2, 5, 4], 12, DType::F64);
    let q = rand_t(&[1, 4, 5, 4], 13, DType::F64);
    check_grad("attention/q", &q, &|x| attention(x, &k, &v, &mask).unwrap(), 1e-6, 1e-6);
    check_grad("attention/k", &k, &|x| attention(&q, x, &v, &mask).unwrap(), 1e-6, 1e-6);
    check_grad("attention/v", &v, &|x| attention(&q, &k, x, &mask).unwrap(), 1e-6, 1e-6);
}

fn frozen(nf4: bool, bias: bool) -> (FrozenLinear, Tensor) {
    let w = rand_t(&[5, 128], 21, DType::F32);
    let b = bias.then(|| rand_t(&[5], 22, DType::F32));
    let weight = if nf4 {
        let v: Vec<f32> = w.flatten_all().unwrap().to_vec1().unwrap();
        FrozenWeight::Nf4(Arc::new(Nf4Tensor::quantize(&v, &[5, 128], true).unwrap()))
    } else {
        FrozenWeight::Dense(w.clone())
    };
    let l = FrozenLinear::new(weight, b, DType::F32).unwrap();
    let dense = l.dense_weight_f32(&Device::Cpu).unwrap();
    (l, dense)
}

#[test]
fn frozen_linear_forward_and_grad() {
    for nf4 in [false, true] {
        for bias in [false, true] {
            let (l, w) = frozen(nf4, bias);
            let x = rand_t(&[2, 3, 128], 23, DType::F32);
            // Forward equals a plain matmul against the (dequantized) weight.
            let mut want = x.broadcast_matmul(&w.t().unwrap()).unwrap();
            if let Some(b) = l.bias() {
                want = want.broadcast_add(b).unwrap();
            }
            let got = l.forward(&x).unwrap();
            let d = (got - &want).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap();
            assert!(d < 1e-5, "nf4={nf4} bias={bias}: forward differs by {d}");
            // The function is linear, so f32 finite differences with a large step are exact
            // up to rounding.
            check_grad(&format!("frozen_linear nf4={nf4} bias={bias}"), &x, &|t| l.forward(t).unwrap(), 1e-1, 1e-4);
        }
    }
}

#[test]
fn frozen_linear_grad_does_not_touch_weight() {
    // The weight is a constant: backward yields a gradient only for the input.
    let (l, _) = frozen(false, false);
    let x = Var::from_tensor(&rand_t(&[4, 128], 24, DType::F32)).unwrap();
    let FrozenWeight::Dense(w) = l.weight() else { unreachable!() };
    let loss = l.forward(x.as_tensor()).unwrap().sum_all().unwrap();
    let grads = loss.backward().unwrap();
    assert!(grads.get(x.as_tensor()).is_some());
    assert!(grads.get(w).is_none());
}

#[test]
fn frozen_linear_bf16_matches_f32() {
    let (l32, w) = frozen(true, true);
    let FrozenWeight::Nf4(q) = l32.weight().clone() else { unreachable!() };
    let l16 = FrozenLinear::new(FrozenWeight::Nf4(q), l32.bias().cloned(), DType::BF16).unwrap();
    let x = rand_t(&[3, 128], 25, DType::F32);
    let a = l32.forward(&x).unwrap();
    let b = l16.forward(&x.to_dtype(DType::BF16).unwrap()).unwrap();
    assert_eq!(b.dtype(), DType::BF16);
    let d = (a - b.to_dtype(DType::F32).unwrap()).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap();
    assert!(d < 0.1, "bf16 differs by {d}");
    let _ = w;
}

#[test]
fn lora_linear_grads() {
    let (base, _) = frozen(true, true);
    let a = Var::from_tensor(&(rand_t(&[4, 128], 31, DType::F32) * 0.1).unwrap()).unwrap();
    let b = Var::from_tensor(&rand_t(&[5, 4], 32, DType::F32)).unwrap();
    let adapter = lorafleet_engine::lora::LoraAdapter {
        key_a: "a".into(),
        key_b: "b".into(),
        a: a.clone(),
        b: b.clone(),
        scaling: 2.0,
        dropout: 0.0,
        id: 0,
    };
    let layer = LoraLinear { name: "m".into(), base, lora: Some(adapter) };
    let ctx = ForwardCtx { track: true, training: false, dropout_seed: 0, pass: 0, adapters: None };
    let x = rand_t(&[2, 3, 128], 33, DType::F32);
    check_grad("lora/x", &x, &|t| layer.forward(t, &ctx).unwrap(), 1e-1, 1e-4);
    // Gradients wrt A and B through the layer (rebuild the layer around perturbed copies).
    for which in ["A", "B"] {
        let p0 = if which == "A" { a.as_tensor().clone() } else { b.as_tensor().clone() };
        let f = |p: &Tensor| {
            let (aa, bb) = if which == "A" { (p.clone(), b.as_tensor().clone()) } else { (a.as_tensor().clone(), p.clone()) };
            let h = x.reshape((6, 128)).unwrap().matmul(&aa.t().unwrap()).unwrap();
            let d = (h.matmul(&bb.t().unwrap()).unwrap() * 2.0).unwrap();
            let y = layer.base.forward(&x).unwrap().reshape((6, 5)).unwrap();
            (y + d).unwrap()
        };
        // Reference gradient from the layer itself.
        let r = rand_t(&[2, 3, 5], 34, DType::F32);
        let loss = (layer.forward(&x, &ctx).unwrap() * &r).unwrap().sum_all().unwrap();
        let grads = loss.backward().unwrap();
        let var = if which == "A" { &a } else { &b };
        let g = grads.get(var.as_tensor()).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let r2 = r.reshape((6, 5)).unwrap();
        let base: Vec<f32> = p0.flatten_all().unwrap().to_vec1().unwrap();
        for i in (0..base.len()).step_by(7) {
            let eval = |delta: f32| {
                let mut v = base.clone();
                v[i] += delta;
                let p = Tensor::from_vec(v, p0.dims(), &Device::Cpu).unwrap();
                (f(&p) * &r2).unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap()
            };
            let fd = (eval(1e-2) - eval(-1e-2)) / 2e-2;
            assert!((fd - g[i]).abs() < 1e-3 * (1.0 + fd.abs()), "lora {which}[{i}]: {} vs {fd}", g[i]);
        }
    }
}

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/hf")
}

fn load(model: &str, quant: Quant, dropout: f64) -> Box<dyn CausalLm> {
    let opts = LoadOptions {
        quant,
        compute_dtype: DType::F32,
        device: Device::Cpu,
        lora: Some(LoraSettingsRequest {
            r: 8,
            alpha: 16.0,
            dropout,
            rslora: false,
            target_modules: None,
            init: LoraInit::FromAdapter(fixtures().join(format!("adapters/{model}"))),
        }),
    };
    load_model(&fixtures().join(format!("models/{model}")), &opts).unwrap()
}

fn batch() -> ForwardInput {
    let ids: Vec<u32> = (0..2 * 12).map(|i| (i * 37 + 5) % 1000).collect();
    ForwardInput { input_ids: Tensor::from_vec(ids, (2, 12), &Device::Cpu).unwrap(), position_ids: None, segment_ids: None }
}

fn loss_of(m: &dyn CausalLm, input: &ForwardInput) -> Tensor {
    let h = m.hidden_states(input).unwrap();
    let logits = m.logits(&h).unwrap().reshape((24, 1024)).unwrap();
    let targets: Vec<u32> = (0..24).map(|i| (i * 11 + 3) % 1024).collect();
    let t = Tensor::from_vec(targets, 24, &Device::Cpu).unwrap();
    candle_nn::loss::cross_entropy(&logits, &t).unwrap()
}

fn grads(m: &dyn CausalLm) -> std::collections::BTreeMap<String, Tensor> {
    let loss = loss_of(m, &batch());
    m.backward(&loss).unwrap()
}

#[test]
fn every_lora_parameter_gets_a_gradient() {
    for model in ["tiny-llama", "tiny-falcon"] {
        for quant in [Quant::None, Quant::Nf4 { double_quant: true }] {
            let m = load(model, quant, 0.0);
            for ckpt in [false, true] {
                m.set_gradient_checkpointing(ckpt);
                let g = grads(m.as_ref());
                for (key, var) in m.lora_params() {
                    let gk = g.get(key).unwrap_or_else(|| panic!("{model} ckpt={ckpt}: no gradient for {key}"));
                    assert_eq!(gk.dims(), var.as_tensor().dims(), "{key}");
                    let norm = gk.sqr().unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap();
                    assert!(norm > 0.0 && norm.is_finite(), "{model} ckpt={ckpt}: gradient of {key} is {norm}");
                }
                assert_eq!(g.len(), m.lora_params().len());
            }
        }
    }
}

fn assert_same_grads(a: &std::collections::BTreeMap<String, Tensor>, b: &std::collections::BTreeMap<String, Tensor>, what: &str) {
    assert_eq!(a.len(), b.len(), "{what}");
    for (k, ga) in a {
        let gb = &b[k];
        let d = (ga - gb).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap();
        let s = ga.abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap();
        assert!(d <= 1e-5 * (1.0 + s), "{what}: {k} differs by {d} (scale {s})");
    }
}

#[test]
fn gradient_checkpointing_gives_identical_gradients() {
    for model in ["tiny-llama", "tiny-falcon"] {
        // With dropout in training mode: the recomputation must replay the same masks.
        let m = load(model, Quant::Nf4 { double_quant: true }, 0.2);
        m.set_training(true);
        m.set_dropout_seed(5);
        m.set_gradient_checkpointing(false);
        let off = grads(m.as_ref());
        m.set_dropout_seed(5);
        m.set_gradient_checkpointing(true);
        let on = grads(m.as_ref());
        assert_same_grads(&off, &on, model);
        // Dropout is really on: another seed changes the gradients.
        m.set_dropout_seed(6);
        let other = grads(m.as_ref());
        let k = off.keys().next().unwrap();
        let d = (&off[k] - &other[k]).unwrap().abs().unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap();
        assert!(d > 0.0, "{model}: dropout seed has no effect");
    }
}

#[test]
fn full_model_directional_finite_difference() {
    for model in ["tiny-llama", "tiny-falcon"] {
        let m = load(model, Quant::None, 0.0);
        let g = grads(m.as_ref());
        // Direction: random perturbation of every LoRA parameter.
        let mut dirs = Vec::new();
        let mut predicted = 0f64;
        for (i, (k, v)) in m.lora_params().iter().enumerate() {
            let d = rand_t(v.as_tensor().dims(), 100 + i as u64, DType::F32);
            predicted += (&g[k] * &d).unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap() as f64;
            dirs.push((v.clone(), v.as_tensor().copy().unwrap(), d));
        }
        let eval = |eps: f64| -> f64 {
            for (v, orig, d) in &dirs {
                v.set(&(orig + (d * eps).unwrap()).unwrap()).unwrap();
            }
            loss_of(m.as_ref(), &batch()).to_scalar::<f32>().unwrap() as f64
        };
        let eps = 1e-3;
        let fd = (eval(eps) - eval(-eps)) / (2.0 * eps);
        eval(0.0);
        assert!((fd - predicted).abs() < 2e-2 * (1e-3 + predicted.abs()), "{model}: directional derivative {predicted} vs finite difference {fd}");
    }
}

#[test]
fn fused_lora_layer_equals_the_composite_ops() {
    // The fused op (AVX-512 CPUs) against the separate candle ops whose gradients are
    // finite-difference checked above: output and the gradients of x, A and B, with and
    // without dropout, bias, NF4 or dense base, ragged shapes; and with an input that
    // does not track (the first layer's), whose gradient the fused op skips.
    for (nf4, bias, dropout, (m, n, k, r), x_tracks) in [
        (false, false, 0.0, (6, 5, 128, 4), true),
        (true, true, 0.0, (37, 70, 192, 8), true),
        (false, true, 0.25, (300, 33, 64, 3), true),
        (true, false, 0.1, (13, 1408, 512, 8), true),
        (true, true, 0.1, (37, 70, 192, 8), false),
    ] {
        let w = rand_t(&[n, k], 41, DType::F32);
        let weight = if nf4 {
            let v: Vec<f32> = w.flatten_all().unwrap().to_vec1().unwrap();
            FrozenWeight::Nf4(Arc::new(Nf4Tensor::quantize(&v, &[n, k], true).unwrap()))
        } else {
            FrozenWeight::Dense(w)
        };
        let base = FrozenLinear::new(weight, bias.then(|| rand_t(&[n], 42, DType::F32)), DType::F32).unwrap();
        let a = Var::from_tensor(&(rand_t(&[r, k], 43, DType::F32) * 0.1).unwrap()).unwrap();
        let b = Var::from_tensor(&rand_t(&[n, r], 44, DType::F32)).unwrap();
        let adapter = lorafleet_engine::lora::LoraAdapter { key_a: "a".into(), key_b: "b".into(), a: a.clone(), b: b.clone(), scaling: 1.5, dropout, id: 3 };
        let layer = LoraLinear { name: "m".into(), base, lora: Some(adapter) };
        let ctx = ForwardCtx { track: true, training: dropout > 0.0, dropout_seed: 9, pass: 2, adapters: None };
        let x0 = rand_t(&[1, m, k], 45, DType::F32);
        let x = if x_tracks { Var::from_tensor(&x0).unwrap().as_tensor().clone() } else { x0 };
        let rw = rand_t(&[1, m, n], 46, DType::F32);
        if common::expect_fused() {
            assert!(fused::lora_fusable(&layer.base, &x), "the fused path must be the one under test here");
        }
        let run = |fused: bool| {
            let y = if fused { layer.forward(&x, &ctx) } else { layer.forward_composite(&x, &ctx) }.unwrap();
            let grads = (&y * &rw).unwrap().sum_all().unwrap().backward().unwrap();
            let flat = |t: &Tensor| -> Vec<f32> { t.flatten_all().unwrap().to_vec1().unwrap() };
            let gx = grads.get(&x).map(flat).unwrap_or_default();
            assert_eq!(gx.is_empty(), !x_tracks, "fused={fused}: a gradient for x exactly when x tracks");
            [flat(&y), gx, flat(grads.get(a.as_tensor()).unwrap()), flat(grads.get(b.as_tensor()).unwrap())]
        };
        let (fused, composite) = (run(true), run(false));
        for (name, (f, c)) in ["y", "grad x", "grad A", "grad B"].iter().zip(fused.iter().zip(&composite)) {
            let scale = c.iter().fold(1f32, |s, v| s.max(v.abs()));
            let worst = f.iter().zip(c).map(|(p, q)| (p - q).abs()).fold(0f32, f32::max);
            assert!(worst <= 2e-5 * scale, "nf4={nf4} bias={bias} dropout={dropout} {m}x{n}x{k} r={r}: {name} differs by {worst} (scale {scale})");
        }
    }
}

#[test]
fn fused_attention_equals_the_composite_ops() {
    // The fused op (AVX-512 CPUs) against the separate candle ops whose gradients are
    // finite-difference checked above: output and the gradients of q, k and v. Plain
    // causal, GQA with packing segments per batch row, multi-query with a sliding window,
    // and a decode step with a KV cache (s < t); then the same over several query blocks
    // of the fused op (fused::QUERY_BLOCK rows each, the last one ragged): causal, packing
    // segments, a sliding window, and a prompt after cached positions.
    let segs = vec![vec![0u32; 20].into_iter().chain(vec![1; 17]).collect::<Vec<_>>(), vec![0; 37]];
    let long = fused::QUERY_BLOCK * 2 + 9;
    let long_segs = vec![vec![0u32; 100].into_iter().chain(vec![1; long - 100]).collect::<Vec<_>>(), vec![0; long]];
    let cases: Vec<(usize, usize, usize, usize, usize, Tensor)> = vec![
        (1, 8, 8, 64, 64, causal_mask(1, 64, 0, None, None, &Device::Cpu).unwrap()),
        (2, 4, 2, 37, 16, causal_mask(2, 37, 0, Some(&segs), None, &Device::Cpu).unwrap()),
        (1, 6, 1, 50, 8, causal_mask(1, 50, 0, None, Some(16), &Device::Cpu).unwrap()),
        (1, 4, 2, 3, 32, causal_mask(1, 3, 29, None, None, &Device::Cpu).unwrap()),
        (1, 2, 1, long, 16, causal_mask(1, long, 0, None, None, &Device::Cpu).unwrap()),
        (2, 2, 2, long, 8, causal_mask(2, long, 0, Some(&long_segs), None, &Device::Cpu).unwrap()),
        (1, 2, 1, long, 8, causal_mask(1, long, 0, None, Some(40), &Device::Cpu).unwrap()),
        (1, 2, 2, 100, 8, causal_mask(1, 100, 29, None, None, &Device::Cpu).unwrap()),
    ];
    for (b, h, kvh, s, d, mask) in cases {
        let t = mask.dim(3).unwrap();
        let q = Var::from_tensor(&rand_t(&[b, h, s, d], 51, DType::F32)).unwrap();
        let k = Var::from_tensor(&rand_t(&[b, kvh, t, d], 52, DType::F32)).unwrap();
        let v = Var::from_tensor(&rand_t(&[b, kvh, t, d], 53, DType::F32)).unwrap();
        if common::expect_fused() {
            assert!(fused::attention_fusable(q.as_tensor()), "the fused path must be the one under test here");
        }
        let rw = rand_t(&[b, s, h * d], 54, DType::F32);
        let run = |fused: bool| {
            let (qt, kt, vt) = (q.as_tensor(), k.as_tensor(), v.as_tensor());
            let y = if fused { attention(qt, kt, vt, &mask) } else { attention_composite(qt, kt, vt, &mask) }.unwrap();
            let grads = (&y * &rw).unwrap().sum_all().unwrap().backward().unwrap();
            let flat = |t: &Tensor| -> Vec<f32> { t.flatten_all().unwrap().to_vec1().unwrap() };
            [flat(&y), flat(grads.get(qt).unwrap()), flat(grads.get(kt).unwrap()), flat(grads.get(vt).unwrap())]
        };
        let (fused, composite) = (run(true), run(false));
        for (name, (f, c)) in ["out", "grad q", "grad k", "grad v"].iter().zip(fused.iter().zip(&composite)) {
            let scale = c.iter().fold(1f32, |s, v| s.max(v.abs()));
            let worst = f.iter().zip(c).map(|(p, q)| (p - q).abs()).fold(0f32, f32::max);
            assert!(worst <= 1e-5 * scale, "b={b} h={h} kvh={kvh} s={s} t={t} d={d}: {name} differs by {worst} (scale {scale})");
        }
    }
}

/// Output and input gradient of `fused` and `composite` (f32) agree to `tol` relative to
/// the largest value.
fn same_as_composite(name: &str, x0: &Tensor, fused: &dyn Fn(&Tensor) -> Tensor, composite: &dyn Fn(&Tensor) -> Tensor, tol: f32) {
    let run = |f: &dyn Fn(&Tensor) -> Tensor| {
        let x = Var::from_tensor(x0).unwrap();
        let y = f(x.as_tensor());
        assert_eq!(y.dtype(), x0.dtype(), "{name}: output dtype");
        let r = rand_t(y.dims(), 77, DType::F32).to_dtype(y.dtype()).unwrap();
        let g = (&y * &r).unwrap().sum_all().unwrap().backward().unwrap();
        let flat = |t: &Tensor| -> Vec<f32> { t.to_dtype(DType::F32).unwrap().flatten_all().unwrap().to_vec1().unwrap() };
        let gx = g.get(x.as_tensor()).unwrap();
        assert_eq!(gx.dtype(), x0.dtype(), "{name}: gradient dtype");
        (y.dims().to_vec(), flat(&y), flat(gx))
    };
    let (fd, fy, fg) = run(fused);
    let (cd, cy, cg) = run(composite);
    assert_eq!(fd, cd, "{name}: shapes");
    for (what, f, c) in [("output", &fy, &cy), ("input gradient", &fg, &cg)] {
        let scale = c.iter().fold(1f32, |s, v| s.max(v.abs()));
        let worst = f.iter().zip(c).map(|(p, q)| (p - q).abs()).fold(0f32, f32::max);
        assert!(worst <= tol * scale, "{name}: {what} differs by {worst} (scale {scale})");
    }
}

#[test]
fn fused_rope_rms_norm_and_swiglu_equal_the_composite_ops() {
    let inv: Vec<f32> = (0..8).map(|i| 1.0 / 10000f32.powf(2.0 * i as f32 / 16.0)).collect();
    let pos = [(0..7).collect::<Vec<u32>>(), vec![3, 4, 5, 9, 10, 11, 12]];
    let (cos, sin) = lorafleet_engine::model::transformer::rope_tables(&inv, &pos, DType::F32, &Device::Cpu).unwrap();
    // [b, n, s, d] input
    same_as_composite(
        "rope [b, n, s, d]",
        &rand_t(&[2, 3, 7, 16], 61, DType::F32),
        &|x| fused::rope_heads(x, None, &cos, &sin).unwrap(),
        &|x| ops::rope(x, &cos, &sin).unwrap(),
        1e-6,
    );
    // [b, s, n * d] projection output, heads split inside the op
    same_as_composite(
        "rope [b, s, n * d]",
        &rand_t(&[2, 7, 3 * 16], 62, DType::F32),
        &|x| fused::rope_heads(x, Some(3), &cos, &sin).unwrap(),
        &|x| ops::rope(&x.reshape((2, 7, 3, 16)).unwrap().transpose(1, 2).unwrap().contiguous().unwrap(), &cos, &sin).unwrap(),
        1e-6,
    );
    let w = rand_t(&[48], 63, DType::F32);
    same_as_composite(
        "rms_norm",
        &(rand_t(&[2, 7, 48], 64, DType::F32) * 3.0).unwrap(),
        &|x| fused::rms_norm_fused(x, &w, 1e-5).unwrap(),
        &|x| ops::rms_norm(x, &w, 1e-5).unwrap(),
        2e-6,
    );
    // SwiGLU: the gradient of the gate input, then of the up input (gates up to +-6,
    // where the sigmoid saturates).
    let u = (rand_t(&[2, 7, 48], 65, DType::F32) * 2.0).unwrap();
    same_as_composite(
        "swiglu gate",
        &(rand_t(&[2, 7, 48], 66, DType::F32) * 6.0).unwrap(),
        &|x| fused::swiglu(x, &u).unwrap(),
        &|x| (ops::silu(x).unwrap() * &u).unwrap(),
        2e-6,
    );
    let g = (rand_t(&[2, 7, 48], 67, DType::F32) * 6.0).unwrap();
    same_as_composite("swiglu up", &u, &|x| fused::swiglu(&g, x).unwrap(), &|x| (ops::silu(&g).unwrap() * x).unwrap(), 2e-6);
}

#[test]
fn fused_ops_in_bf16_equal_the_composite_ops() {
    // bf16 compute: the fused ops read bf16, compute in f32 and round once; the
    // composite ops round after every op (and run the LoRA products in bf16), so they
    // agree to bf16 precision (2^-8 relative), not bit for bit.
    let bf = |t: Tensor| t.to_dtype(DType::BF16).unwrap();
    let tol = 3e-2;
    let inv: Vec<f32> = (0..8).map(|i| 1.0 / 10000f32.powf(2.0 * i as f32 / 16.0)).collect();
    let pos = [(0..7).collect::<Vec<u32>>()];
    let (cos, sin) = lorafleet_engine::model::transformer::rope_tables(&inv, &pos, DType::BF16, &Device::Cpu).unwrap();
    same_as_composite(
        "bf16 rope",
        &bf(rand_t(&[1, 7, 3 * 16], 62, DType::F32)),
        &|x| fused::rope_heads(x, Some(3), &cos, &sin).unwrap(),
        &|x| ops::rope(&x.reshape((1, 7, 3, 16)).unwrap().transpose(1, 2).unwrap().contiguous().unwrap(), &cos, &sin).unwrap(),
        tol,
    );
    let w = bf(rand_t(&[48], 63, DType::F32));
    same_as_composite("bf16 rms_norm", &bf((rand_t(&[2, 7, 48], 64, DType::F32) * 3.0).unwrap()), &|x| fused::rms_norm_fused(x, &w, 1e-5).unwrap(), &|x| ops::rms_norm(x, &w, 1e-5).unwrap(), tol);
    let u = bf((rand_t(&[2, 7, 48], 65, DType::F32) * 2.0).unwrap());
    same_as_composite("bf16 swiglu", &bf((rand_t(&[2, 7, 48], 66, DType::F32) * 6.0).unwrap()), &|x| fused::swiglu(x, &u).unwrap(), &|x| (ops::silu(x).unwrap() * &u).unwrap(), tol);
    let mask = causal_mask(1, 37, 0, None, None, &Device::Cpu).unwrap();
    let (k, v) = (bf(rand_t(&[1, 2, 37, 16], 52, DType::F32)), bf(rand_t(&[1, 2, 37, 16], 53, DType::F32)));
    if common::expect_fused() {
        assert!(fused::attention_fusable(&k), "the fused path must be the one under test here");
    }
    same_as_composite("bf16 attention", &bf(rand_t(&[1, 4, 37, 16], 51, DType::F32)), &|q| attention(q, &k, &v, &mask).unwrap(), &|q| attention_composite(q, &k, &v, &mask).unwrap(), tol);
    for nf4 in [false, true] {
        let (n, k, r) = (70, 192, 8);
        let w = rand_t(&[n, k], 41, DType::F32);
        let weight = if nf4 {
            let v: Vec<f32> = w.flatten_all().unwrap().to_vec1().unwrap();
            FrozenWeight::Nf4(Arc::new(Nf4Tensor::quantize(&v, &[n, k], true).unwrap()))
        } else {
            FrozenWeight::Dense(bf(w))
        };
        let base = FrozenLinear::new(weight, Some(rand_t(&[n], 42, DType::F32)), DType::BF16).unwrap();
        let a = Var::from_tensor(&(rand_t(&[r, k], 43, DType::F32) * 0.1).unwrap()).unwrap();
        let b = Var::from_tensor(&rand_t(&[n, r], 44, DType::F32)).unwrap();
        let adapter = lorafleet_engine::lora::LoraAdapter { key_a: "a".into(), key_b: "b".into(), a, b, scaling: 1.5, dropout: 0.0, id: 3 };
        let layer = LoraLinear { name: "m".into(), base, lora: Some(adapter) };
        let ctx = ForwardCtx { track: true, training: false, dropout_seed: 9, pass: 2, adapters: None };
        let x0 = bf(rand_t(&[1, 37, k], 45, DType::F32));
        if common::expect_fused() {
            assert!(fused::lora_fusable(&layer.base, &x0), "the fused path must be the one under test here");
        }
        if lorafleet_engine::kernels_bf16::available() && std::env::var_os("LORAFLEET_BLAS").is_none() && std::env::var_os("LORAFLEET_BF16_DOT").is_none() {
            assert!(layer.base.uses_bf16_dot(), "AVX512-BF16 CPU: the frozen products must run on the bf16 dot-product kernels");
        }
        same_as_composite(&format!("bf16 lora nf4={nf4}"), &x0, &|x| layer.forward(x, &ctx).unwrap(), &|x| layer.forward_composite(x, &ctx).unwrap(), tol);
    }
}

#[test]
fn avx2_kernels_pass_the_fused_and_model_gradient_checks() {
    // The fused ops against the composite ones, and the model-level checks (every LoRA
    // parameter gets a gradient, checkpointing agrees, directional finite difference),
    // again on the AVX2 kernels.
    common::rerun_on_avx2("_equal", 3);
    common::rerun_on_avx2("every_lora_parameter_gets_a_gradient", 1);
    common::rerun_on_avx2("gradient_checkpointing_gives_identical_gradients", 1);
    common::rerun_on_avx2("full_model_directional_finite_difference", 1);
}

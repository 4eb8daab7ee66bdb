//! AdamW vs hand-computed torch.optim.AdamW values, 8-bit moments, clipping, state I/O.
#![allow(clippy::excessive_precision)] // hand-computed reference values keep their f64 digits

use std::collections::BTreeMap;

use candle_core::{Device, Tensor, Var};
use lorafleet_engine::optim::{clip_grad_norm, dynamic_map, AdamW, AdamWConfig, Quantized8};

fn cfg(wd: f64, eight_bit: bool) -> AdamWConfig {
    AdamWConfig { beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: wd, eight_bit }
}

/// torch: p=[1,-2], AdamW(lr=0.1, weight_decay=0.01), grads [0.5,0.1] then [-0.25,0.3]
/// (values from torch's single-tensor formula evaluated by hand in f64).
#[test]
fn adamw_matches_torch_two_steps() {
    let mut opt = AdamW::new(cfg(0.01, false));
    let mut p = vec![1.0f32, -2.0];
    opt.update_host("w", &mut p, &[0.5, 0.1], 0.1).unwrap();
    assert!((p[0] - 0.899000002).abs() < 1e-6, "{p:?}");
    assert!((p[1] - -2.09799999).abs() < 1e-6, "{p:?}");
    opt.update_host("w", &mut p, &[-0.25, 0.3], 0.1).unwrap();
    assert!((p[0] - 0.8714672987).abs() < 2e-6, "{p:?}");
    assert!((p[1] - -2.1876800978).abs() < 2e-6, "{p:?}");
    assert_eq!(opt.steps_taken(), 2);
}

#[test]
fn weight_decay_is_decoupled_and_applied_first() {
    // zero gradient: Adam part is 0 / (0 + eps) = 0, only decay remains: p * (1 - lr*wd)
    let mut opt = AdamW::new(cfg(0.5, false));
    let mut p = vec![2.0f32];
    opt.update_host("w", &mut p, &[0.0], 0.1).unwrap();
    assert!((p[0] - 2.0 * 0.95).abs() < 1e-7);
}

#[test]
fn step_on_vars_and_state_round_trip() {
    let dev = Device::Cpu;
    let mut params = BTreeMap::new();
    params.insert("a".to_string(), Var::from_tensor(&Tensor::new(&[1.0f32, -2.0], &dev).unwrap()).unwrap());
    let mut grads = BTreeMap::new();
    grads.insert("a".to_string(), Tensor::new(&[0.5f32, 0.1], &dev).unwrap());
    let mut opt = AdamW::new(cfg(0.01, false));
    opt.step(&params, &grads, 0.1).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("opt.safetensors");
    opt.save(&path).unwrap();
    let mut opt2 = AdamW::new(cfg(0.01, false));
    opt2.load(&path).unwrap();
    assert_eq!(opt.state, opt2.state);
    // both continue identically
    let g2 = BTreeMap::from([("a".to_string(), Tensor::new(&[-0.25f32, 0.3], &dev).unwrap())]);
    let params2 = BTreeMap::from([("a".to_string(), Var::from_tensor(&params["a"].as_tensor().copy().unwrap()).unwrap())]);
    opt.step(&params, &g2, 0.1).unwrap();
    opt2.step(&params2, &g2, 0.1).unwrap();
    let a: Vec<f32> = params["a"].as_tensor().to_vec1().unwrap();
    let b: Vec<f32> = params2["a"].as_tensor().to_vec1().unwrap();
    assert_eq!(a, b);
    assert!((a[0] - 0.8714672987).abs() < 2e-6);
}

#[test]
fn signed_dynamic_map_matches_bitsandbytes_fixture() {
    // the NF4 fixture stores bitsandbytes' create_dynamic_map() (signed) as nested_code
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../tests/fixtures/hf/nf4/golden.safetensors");
    let t = candle_core::safetensors::load(path, &Device::Cpu).unwrap();
    let key = t.keys().find(|k| k.ends_with("nested_code")).expect("nested_code in fixture").clone();
    let want: Vec<f32> = t[&key].flatten_all().unwrap().to_vec1().unwrap();
    let got = dynamic_map(true);
    assert_eq!(want.len(), 256);
    for (i, (g, w)) in got.iter().zip(&want).enumerate() {
        assert!((g - w).abs() <= 1e-7 * w.abs().max(1e-6), "code {i}: {g} vs {w}");
    }
}

#[test]
fn eight_bit_round_trip_is_close_blockwise() {
    let map = dynamic_map(true);
    let vals: Vec<f32> = (0..1000).map(|i| ((i as f32) * 0.37).sin() * if i < 256 { 1e-3 } else { 5.0 }).collect();
    let q = Quantized8::quantize(&vals, &map);
    assert_eq!(q.absmax.len(), 4); // blocks of 256
    let back = q.dequantize(&map);
    for (b, chunk) in vals.chunks(256).enumerate() {
        let absmax = chunk.iter().fold(0f32, |m, x| m.max(x.abs()));
        assert_eq!(q.absmax[b], absmax);
        for (i, x) in chunk.iter().enumerate() {
            let y = back[b * 256 + i];
            // the dynamic map's relative step is < 10% near the top of each decade
            assert!((x - y).abs() <= 0.06 * absmax, "block {b} elem {i}: {x} vs {y}");
        }
    }
    // requantizing the dequantized values moves no code by more than one step
    let q2 = Quantized8::quantize(&back, &map);
    assert!(q.codes.iter().zip(&q2.codes).all(|(a, b)| (*a as i32 - *b as i32).abs() <= 1));
}

#[test]
fn eight_bit_adamw_tracks_f32_and_saves() {
    let n = 5000; // >= 4096: quantized moments
    let mut p32: Vec<f32> = (0..n).map(|i| (i as f32 * 0.01).cos()).collect();
    let mut p8 = p32.clone();
    let mut o32 = AdamW::new(cfg(0.0, false));
    let mut o8 = AdamW::new(cfg(0.0, true));
    for step in 0..5 {
        let g: Vec<f32> = (0..n).map(|i| ((i + step * 7) as f32 * 0.013).sin()).collect();
        o32.update_host("w", &mut p32, &g, 1e-3).unwrap();
        o8.update_host("w", &mut p8, &g, 1e-3).unwrap();
    }
    let max_diff = p32.iter().zip(&p8).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
    assert!(max_diff < 5e-4, "8-bit drifted {max_diff}");
    assert!(max_diff > 0.0, "8-bit state should not be exact");
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("opt8.safetensors");
    o8.save(&path).unwrap();
    let mut back = AdamW::new(cfg(0.0, true));
    back.load(&path).unwrap();
    assert_eq!(back.state, o8.state);
    // small tensors keep f32 moments
    let mut small = vec![1.0f32; 10];
    o8.update_host("small", &mut small, &[0.1; 10], 1e-3).unwrap();
    assert!(matches!(o8.state["small"].moments, lorafleet_engine::optim::Moments::F32 { .. }));
}

#[test]
fn clipping_scales_to_max_norm() {
    let dev = Device::Cpu;
    let mut g = BTreeMap::new();
    g.insert("a".to_string(), Tensor::new(&[3.0f32, 0.0], &dev).unwrap());
    g.insert("b".to_string(), Tensor::new(&[4.0f32], &dev).unwrap());
    let norm = clip_grad_norm(&mut g, 1.0).unwrap();
    assert!((norm - 5.0).abs() < 1e-6);
    let a: Vec<f32> = g["a"].to_vec1().unwrap();
    assert!((a[0] - 3.0 / (5.0 + 1e-6) as f32).abs() < 1e-6);
    // 0 disables clipping but still reports the norm
    let mut g2 = BTreeMap::from([("a".to_string(), Tensor::new(&[3.0f32, 4.0], &dev).unwrap())]);
    assert!((clip_grad_norm(&mut g2, 0.0).unwrap() - 5.0).abs() < 1e-6);
    assert_eq!(g2["a"].to_vec1::<f32>().unwrap(), vec![3.0, 4.0]);
}

//! NF4 double quantization bit for bit against bitsandbytes 0.50.2 (CPU), on inputs
//! chosen where its decisions are delicate: NF4 midpoints and their f32 neighbours,
//! a final block shorter than 64, several nested 256-blocks, and the dynamic 8-bit map
//! around each of its midpoints, where bitsandbytes' 65,536-bin lookup table does not
//! always pick the nearest code. `tests/fixtures/bnb/make_golden.py` made the file.

use candle_core::{DType, Device, Tensor};
use lorafleet_engine::nf4::{bnb_quantize_blockwise_8bit, dynamic_map, Nf4Tensor};
use std::collections::HashMap;

fn golden() -> HashMap<String, Tensor> {
    let p = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/bnb/golden.safetensors");
    candle_core::safetensors::load(p, &Device::Cpu).unwrap()
}

fn f32s(t: &Tensor) -> Vec<f32> {
    t.to_dtype(DType::F32).unwrap().flatten_all().unwrap().to_vec1().unwrap()
}

fn u8s(t: &Tensor) -> Vec<u8> {
    t.flatten_all().unwrap().to_vec1().unwrap()
}

#[test]
fn nf4_double_quant_matches_bitsandbytes_bit_for_bit() {
    let g = golden();
    for name in ["normal", "wide", "partial", "mid4"] {
        let w = &g[&format!("{name}.weight")];
        let q = Nf4Tensor::quantize(&f32s(w), w.dims(), true).unwrap();
        let nested = q.nested.as_ref().unwrap();
        assert_eq!(q.packed, u8s(&g[&format!("{name}.packed")]), "{name}: packed NF4 codes");
        assert_eq!(nested.absmax_q, u8s(&g[&format!("{name}.absmax_q")]), "{name}: absmax codes");
        let na: Vec<u32> = nested.nested_absmax.iter().map(|v| v.to_bits()).collect();
        let want: Vec<u32> = f32s(&g[&format!("{name}.nested_absmax")]).iter().map(|v| v.to_bits()).collect();
        assert_eq!(na, want, "{name}: nested absmax");
        assert_eq!(nested.offset.to_bits(), f32s(&g[&format!("{name}.offset")])[0].to_bits(), "{name}: offset");
    }
}

#[test]
fn dynamic_8bit_blockwise_matches_bitsandbytes_lookup_table() {
    let g = golden();
    let input = f32s(&g["dyn.input"]);
    let (codes, absmax) = bnb_quantize_blockwise_8bit(&input, dynamic_map(), 256);
    let want = u8s(&g["dyn.codes"]);
    let differing = codes.iter().zip(&want).filter(|(a, b)| a != b).count();
    assert_eq!(differing, 0, "{differing} of {} codes differ", want.len());
    assert_eq!(absmax, f32s(&g["dyn.absmax"]));
    // The table really is not "nearest": some inputs here get the farther code.
    let code = dynamic_map();
    let farther = input
        .iter()
        .zip(&want)
        .filter(|(&x, &c)| {
            let d = (x - code[c as usize]).abs();
            code.iter().any(|&o| (x - o).abs() < d)
        })
        .count();
    assert!(farther > 0, "the golden set should contain lookup-table decisions that differ from nearest");
}

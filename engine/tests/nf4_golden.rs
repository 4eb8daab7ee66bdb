//! NF4 quantization against bitsandbytes' own output (tests/fixtures/hf/nf4/golden.safetensors).

use lorafleet_engine::nf4::{create_dynamic_map, dynamic_map, DeviceNf4, Nf4Tensor, NF4_CODE};
use safetensors::SafeTensors;

fn fixture() -> Vec<u8> {
    let p = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/hf/nf4/golden.safetensors");
    std::fs::read(p).expect("golden fixture")
}

fn f32s(st: &SafeTensors, k: &str) -> Vec<f32> {
    let t = st.tensor(k).unwrap_or_else(|_| panic!("missing {k}"));
    t.data().chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect()
}

fn u8s(st: &SafeTensors, k: &str) -> Vec<u8> {
    st.tensor(k).unwrap_or_else(|_| panic!("missing {k}")).data().to_vec()
}

/// bitsandbytes' CPU dequantize kernel (the one that produced `dequant`/`dequant_dq`)
/// indexes absmax as `row * (cols / 64) + col / 64`: the flat block index when `cols` is
/// a multiple of 64, a different (wrong) block otherwise. Our dequantization uses the
/// flat block index of the quantizer (as the CUDA kernels do); for golden tensors whose
/// rows are not a multiple of 64 the comparison goes through this reference indexing.
fn bnb_cpu_dequant(q: &Nf4Tensor) -> Vec<f32> {
    let cols = q.shape[1];
    let rows = q.shape[0];
    let mut out = Vec::with_capacity(rows * cols);
    for r in 0..rows {
        for c in 0..cols {
            let i = r * cols + c;
            let b = q.packed[i / 2];
            let code = if i.is_multiple_of(2) { b >> 4 } else { b & 15 };
            out.push(NF4_CODE[code as usize] * q.absmax[r * (cols / 64) + c / 64]);
        }
    }
    out
}

fn expected_dequant(q: &Nf4Tensor) -> Vec<f32> {
    if q.shape[1].is_multiple_of(64) {
        q.dequantize()
    } else {
        bnb_cpu_dequant(q)
    }
}

#[test]
fn nf4_code_table_matches() {
    let bytes = fixture();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    assert_eq!(f32s(&st, "nf4_code"), NF4_CODE.to_vec());
}

#[test]
fn dynamic_map_matches_nested_code() {
    let bytes = fixture();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let table = dynamic_map();
    for t in 0..4 {
        let golden = f32s(&st, &format!("t{t}.nested_code"));
        assert_eq!(golden.len(), 256);
        for (i, (a, b)) in table.iter().zip(&golden).enumerate() {
            assert_eq!(a.to_bits(), b.to_bits(), "nested_code[{i}]: ours {a} golden {b}");
        }
    }
    // The formula (create_dynamic_map) reproduces the table up to torch's linspace
    // rounding: at most two ulps per entry, and at most a few entries.
    let generated = create_dynamic_map();
    let mut off_by_one = 0;
    for (i, (a, b)) in generated.iter().zip(table.iter()).enumerate() {
        let d = (a.to_bits() as i64 - b.to_bits() as i64).abs();
        assert!(d <= 2, "dynamic map entry {i}: generated {a} table {b}");
        off_by_one += d;
    }
    assert!(off_by_one <= 32, "{off_by_one} ulps of difference in total");
}

#[test]
fn quantize_without_double_quant_is_bit_exact() {
    let bytes = fixture();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    for t in 0..4 {
        let w = f32s(&st, &format!("t{t}.weight"));
        let shape = st.tensor(&format!("t{t}.weight")).unwrap().shape().to_vec();
        let q = Nf4Tensor::quantize(&w, &shape, false).unwrap();
        let packed = u8s(&st, &format!("t{t}.packed"));
        assert_eq!(q.packed.len(), packed.len(), "t{t} packed length");
        let diff = q.packed.iter().zip(&packed).filter(|(a, b)| a != b).count();
        assert_eq!(diff, 0, "t{t}: {diff} packed bytes differ");
        assert_eq!(q.absmax, f32s(&st, &format!("t{t}.absmax_fp32")), "t{t} absmax");
        if shape[1].is_multiple_of(64) {
            assert_eq!(q.dequantize(), bnb_cpu_dequant(&q), "t{t}: indexings agree");
        }
        let deq = expected_dequant(&q);
        let golden = f32s(&st, &format!("t{t}.dequant"));
        for (i, (a, b)) in deq.iter().zip(&golden).enumerate() {
            assert_eq!(a.to_bits(), b.to_bits(), "t{t} dequant[{i}]: {a} vs {b}");
        }
    }
}

#[test]
fn double_quant_is_bit_exact() {
    let bytes = fixture();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    for t in 0..4 {
        let w = f32s(&st, &format!("t{t}.weight"));
        let shape = st.tensor(&format!("t{t}.weight")).unwrap().shape().to_vec();
        let q = Nf4Tensor::quantize(&w, &shape, true).unwrap();
        assert_eq!(q.packed, u8s(&st, &format!("t{t}.packed")), "t{t} packed");
        let nested = q.nested.as_ref().expect("nested stats");
        assert_eq!(vec![nested.offset], f32s(&st, &format!("t{t}.offset")), "t{t} offset");
        assert_eq!(nested.nested_absmax, f32s(&st, &format!("t{t}.nested_absmax")), "t{t} nested_absmax");
        assert_eq!(nested.absmax_q, u8s(&st, &format!("t{t}.absmax_q")), "t{t} absmax_q");
        let deq = expected_dequant(&q);
        let golden = f32s(&st, &format!("t{t}.dequant_dq"));
        let max = deq.iter().zip(&golden).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
        assert_eq!(max, 0.0, "t{t} dequant_dq max diff {max}");
    }
}

/// Golden tensor `t` as bitsandbytes stored it (packed codes, double-quantized absmax).
fn stored_nf4(st: &SafeTensors, t: usize, shape: Vec<usize>) -> Nf4Tensor {
    let nested = lorafleet_engine::nf4::NestedAbsmax {
        absmax_q: u8s(st, &format!("t{t}.absmax_q")),
        nested_absmax: f32s(st, &format!("t{t}.nested_absmax")),
        nested_code: f32s(st, &format!("t{t}.nested_code")),
        offset: f32s(st, &format!("t{t}.offset"))[0],
    };
    let absmax = nested.dequantize();
    Nf4Tensor::from_parts(shape, u8s(st, &format!("t{t}.packed")), absmax, Some(nested)).unwrap()
}

#[test]
fn dequant_from_stored_parts() {
    let bytes = fixture();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    for t in 0..4 {
        let shape = st.tensor(&format!("t{t}.weight")).unwrap().shape().to_vec();
        let q = stored_nf4(&st, t, shape);
        assert_eq!(expected_dequant(&q), f32s(&st, &format!("t{t}.dequant_dq")), "t{t}");
        // Our flat-block dequantization: every value is its code times its own block's absmax.
        let flat = q.dequantize();
        let w = f32s(&st, &format!("t{t}.weight"));
        for (i, (d, x)) in flat.iter().zip(&w).enumerate() {
            assert!((d - x).abs() <= q.absmax[i / 64] * 0.2 + 1e-6, "t{t}[{i}]: {d} far from {x}");
        }
        let mut rows = vec![0f32; q.numel()];
        q.dequantize_rows_with(0, q.shape[0], &mut rows, |v| v);
        assert_eq!(rows, q.dequantize());
        // Any sub-range, odd or even start.
        for (start, len) in [(0usize, 7usize), (1, 64), (63, 66), (129, 1), (5, q.numel() - 5)] {
            let mut part = vec![0f32; len];
            q.dequantize_range(start, &mut part);
            assert_eq!(part, rows[start..start + len].to_vec(), "range {start}+{len}");
        }
    }
}

/// NF4 on a device (the portable ops) dequantizes to the same bits as the host code,
/// from bitsandbytes' stored parts (double quantized) and from our quantizer (plain).
#[test]
fn device_nf4_dequantizes_bit_exact() {
    let bytes = fixture();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let dev = candle_core::Device::Cpu;
    for t in 0..4 {
        let shape = st.tensor(&format!("t{t}.weight")).unwrap().shape().to_vec();
        let stored = stored_nf4(&st, t, shape.clone());
        let plain = Nf4Tensor::quantize(&f32s(&st, &format!("t{t}.weight")), &shape, false).unwrap();
        for (what, q) in [("double quantized", &stored), ("plain", &plain)] {
            let d = DeviceNf4::upload(q, &dev).unwrap();
            assert_eq!(d.shape(), shape.as_slice());
            let got = d.dequantize(candle_core::DType::F32).unwrap();
            assert_eq!(got.dims(), shape.as_slice());
            let got: Vec<u32> = got.flatten_all().unwrap().to_vec1::<f32>().unwrap().iter().map(|v| v.to_bits()).collect();
            let want: Vec<u32> = q.dequantize().iter().map(|v| v.to_bits()).collect();
            assert_eq!(got, want, "t{t} {what}");
            let bf: Vec<u16> = d.dequantize(candle_core::DType::BF16).unwrap().flatten_all().unwrap().to_vec1::<half::bf16>().unwrap().iter().map(|v| v.to_bits()).collect();
            let want_bf: Vec<u16> = q.dequantize().iter().map(|&v| half::bf16::from_f32(v).to_bits()).collect();
            assert_eq!(bf, want_bf, "t{t} {what} bf16");
        }
        // 4-bit on the device: half a byte per value plus the statistics.
        let d = DeviceNf4::upload(&stored, &dev).unwrap();
        let n = stored.numel();
        assert!(d.device_bytes() < n / 2 + n / 64 + 4096, "t{t}: {} bytes for {n} values", d.device_bytes());
    }
}

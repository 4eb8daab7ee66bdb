//! Logits of the tiny fixture models against Hugging Face's (base, base + adapter,
//! NF4 base + adapter), f32 compute, plus KV-cache decoding against the full forward.

use std::path::PathBuf;

use candle_core::{DType, Device, Tensor};
use lorafleet_engine::model::{load_model, CausalLm, ForwardInput, KvCache, LoadOptions, LoraInit, LoraSettingsRequest, Quant};

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/hf")
}

fn expected(model: &str) -> std::collections::HashMap<String, Tensor> {
    candle_core::safetensors::load(fixtures().join(format!("expected/{model}.safetensors")), &Device::Cpu).unwrap()
}

fn adapter_opts(model: &str, quant: Quant) -> LoadOptions {
    LoadOptions {
        quant,
        compute_dtype: DType::F32,
        device: Device::Cpu,
        lora: Some(LoraSettingsRequest {
            r: 8,
            alpha: 16.0,
            dropout: 0.0,
            rslora: false,
            target_modules: None,
            init: LoraInit::FromAdapter(fixtures().join(format!("adapters/{model}"))),
        }),
    }
}

fn logits_of(m: &dyn CausalLm, ids: &Tensor) -> Tensor {
    let ids = ids.to_dtype(DType::U32).unwrap().reshape((1, ids.elem_count())).unwrap();
    let h = m.hidden_states(&ForwardInput { input_ids: ids, position_ids: None, segment_ids: None }).unwrap();
    m.logits(&h).unwrap().squeeze(0).unwrap()
}

fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
    assert_eq!(a.dims(), b.dims());
    (a - b).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap()
}

fn check(model: &str, m: &dyn CausalLm, which: &str, tol: f32) {
    let exp = expected(model);
    for i in 0..4 {
        let ids = &exp[&format!("input_ids.{i}")];
        let want = &exp[&format!("{which}.{i}")];
        let got = logits_of(m, ids);
        let d = max_diff(&got, want);
        eprintln!("{model} {which}.{i}: max abs diff {d}");
        assert!(d < tol, "{model} {which}.{i}: max abs diff {d}");
    }
}

#[test]
fn tiny_llama_base_logits() {
    let m = load_model(&fixtures().join("models/tiny-llama"), &LoadOptions::default()).unwrap();
    check("tiny-llama", m.as_ref(), "logits_base", 1e-4);
}

#[test]
fn tiny_falcon_base_logits() {
    let m = load_model(&fixtures().join("models/tiny-falcon"), &LoadOptions::default()).unwrap();
    check("tiny-falcon", m.as_ref(), "logits_base", 1e-4);
}

#[test]
fn tiny_llama_adapter_logits() {
    let m = load_model(&fixtures().join("models/tiny-llama"), &adapter_opts("tiny-llama", Quant::None)).unwrap();
    assert_eq!(m.lora_params().len(), 2 * 7 * 2);
    check("tiny-llama", m.as_ref(), "logits_adapter", 1e-4);
}

#[test]
fn tiny_falcon_adapter_logits() {
    let m = load_model(&fixtures().join("models/tiny-falcon"), &adapter_opts("tiny-falcon", Quant::None)).unwrap();
    assert_eq!(m.lora_params().len(), 2 * 4 * 2);
    check("tiny-falcon", m.as_ref(), "logits_adapter", 1e-4);
}

#[test]
fn tiny_llama_nf4_adapter_logits() {
    let m = load_model(&fixtures().join("models/tiny-llama"), &adapter_opts("tiny-llama", Quant::Nf4 { double_quant: true })).unwrap();
    check("tiny-llama", m.as_ref(), "logits_nf4_adapter", 1e-4);
}

#[test]
fn tiny_falcon_nf4_adapter_logits() {
    let m = load_model(&fixtures().join("models/tiny-falcon"), &adapter_opts("tiny-falcon", Quant::Nf4 { double_quant: true })).unwrap();
    check("tiny-falcon", m.as_ref(), "logits_nf4_adapter", 1e-4);
}

#[test]
fn kv_cache_decoding_matches_full_forward() {
    for model in ["tiny-llama", "tiny-falcon"] {
        let m = load_model(&fixtures().join(format!("models/{model}")), &adapter_opts(model, Quant::None)).unwrap();
        let exp = expected(model);
        let ids = exp["input_ids.1"].to_dtype(DType::U32).unwrap();
        let n = ids.elem_count();
        let full = logits_of(m.as_ref(), &ids);
        let mut cache = KvCache::default();
        // Prompt in one chunk, then one token at a time.
        let split = n / 2;
        let first = m.forward_cached(&ids.narrow(0, 0, split).unwrap().unsqueeze(0).unwrap(), &mut cache).unwrap();
        let d = max_diff(&first.squeeze(0).unwrap(), &full.get(split - 1).unwrap());
        assert!(d < 1e-4, "{model} prefill: {d}");
        for t in split..n {
            let step = m.forward_cached(&ids.narrow(0, t, 1).unwrap().unsqueeze(0).unwrap(), &mut cache).unwrap();
            let d = max_diff(&step.squeeze(0).unwrap(), &full.get(t).unwrap());
            assert!(d < 1e-4, "{model} step {t}: {d}");
        }
        assert_eq!(cache.seq_len, n);
    }
}

#[test]
fn packed_segments_equal_separate_sequences() {
    // Two prompts packed in one row with restarted positions give the same logits as
    // each prompt on its own.
    for model in ["tiny-llama", "tiny-falcon"] {
        let m = load_model(&fixtures().join(format!("models/{model}")), &LoadOptions::default()).unwrap();
        let exp = expected(model);
        let a = exp["input_ids.0"].to_dtype(DType::U32).unwrap();
        let b = exp["input_ids.2"].to_dtype(DType::U32).unwrap();
        let (na, nb) = (a.elem_count(), b.elem_count());
        let ids = Tensor::cat(&[&a, &b], 0).unwrap().unsqueeze(0).unwrap();
        let pos: Vec<u32> = (0..na as u32).chain(0..nb as u32).collect();
        let seg: Vec<u32> = std::iter::repeat_n(0u32, na).chain(std::iter::repeat_n(1u32, nb)).collect();
        let input = ForwardInput {
            input_ids: ids,
            position_ids: Some(Tensor::from_vec(pos, (1, na + nb), &Device::Cpu).unwrap()),
            segment_ids: Some(Tensor::from_vec(seg, (1, na + nb), &Device::Cpu).unwrap()),
        };
        let h = m.hidden_states(&input).unwrap();
        let packed = m.logits(&h).unwrap().squeeze(0).unwrap();
        let d1 = max_diff(&packed.narrow(0, 0, na).unwrap(), &logits_of(m.as_ref(), &a));
        let d2 = max_diff(&packed.narrow(0, na, nb).unwrap(), &logits_of(m.as_ref(), &b));
        assert!(d1 < 1e-4 && d2 < 1e-4, "{model}: {d1} {d2}");
    }
}


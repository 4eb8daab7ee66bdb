//! merge_adapter: merged model logits equal base + adapter logits.

use std::path::PathBuf;

use candle_core::{DType, Device, Tensor};
use lorafleet_engine::merge::merge_adapter;
use lorafleet_engine::model::{load_model, CausalLm, ForwardInput, LoadOptions, LoraInit, LoraSettingsRequest, Quant};
use lorafleet_engine::quantize::quantize_model;

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/hf")
}

fn logits(m: &dyn CausalLm) -> Tensor {
    let ids: Vec<u32> = (0..16).map(|i| (i * 91 + 3) % 1024).collect();
    let input = ForwardInput { input_ids: Tensor::from_vec(ids, (1, 16), &Device::Cpu).unwrap(), position_ids: None, segment_ids: None };
    m.logits(&m.hidden_states(&input).unwrap()).unwrap()
}

fn with_adapter(model: &str) -> LoadOptions {
    LoadOptions {
        quant: Quant::None,
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

fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
    (a - b).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap()
}

#[test]
fn merged_logits_equal_base_plus_adapter() {
    for model in ["tiny-llama", "tiny-falcon"] {
        let src = fixtures().join(format!("models/{model}"));
        let adapter = fixtures().join(format!("adapters/{model}"));
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("merged");
        merge_adapter(&src, &adapter, &out, DType::F32).unwrap();
        let merged = load_model(&out, &LoadOptions::default()).unwrap();
        let reference = load_model(&src, &with_adapter(model)).unwrap();
        let base = load_model(&src, &LoadOptions::default()).unwrap();
        let (lm, lr, lb) = (logits(merged.as_ref()), logits(reference.as_ref()), logits(base.as_ref()));
        let d = max_diff(&lm, &lr);
        assert!(d < 1e-4, "{model}: merged vs adapter {d}");
        assert!(max_diff(&lm, &lb) > 1e-3, "{model}: merge changed nothing");
        assert!(out.join("tokenizer.json").exists());

        // bf16 output: close to the f32 merge, stored as bf16.
        let out16 = dir.path().join("merged16");
        merge_adapter(&src, &adapter, &out16, DType::BF16).unwrap();
        let bytes = std::fs::read(out16.join("model.safetensors")).unwrap();
        let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
        assert!(st.tensors().iter().all(|(_, v)| v.dtype() == safetensors::Dtype::BF16));
        let cfg: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(out16.join("config.json")).unwrap()).unwrap();
        assert_eq!(cfg["dtype"], "bfloat16");
        let m16 = load_model(&out16, &LoadOptions::default()).unwrap();
        assert!(max_diff(&logits(m16.as_ref()), &lr) < 0.1);
    }
}

#[test]
fn merge_into_prequantized_base_dequantizes_first() {
    for model in ["tiny-llama", "tiny-falcon"] {
        let src = fixtures().join(format!("models/{model}"));
        let adapter = fixtures().join(format!("adapters/{model}"));
        let dir = tempfile::tempdir().unwrap();
        let q = dir.path().join("q");
        quantize_model(&src, &q, true).unwrap();
        let out = dir.path().join("merged");
        merge_adapter(&q, &adapter, &out, DType::F32).unwrap();
        let cfg: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(out.join("config.json")).unwrap()).unwrap();
        assert!(cfg.get("quantization_config").is_none());
        let bytes = std::fs::read(out.join("model.safetensors")).unwrap();
        let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
        assert!(st.names().iter().all(|n| !n.contains("absmax") && !n.contains("quant_")));
        let merged = load_model(&out, &LoadOptions::default()).unwrap();
        let reference = load_model(&q, &with_adapter(model)).unwrap();
        let d = max_diff(&logits(merged.as_ref()), &logits(reference.as_ref()));
        assert!(d < 1e-4, "{model}: merged (from nf4) vs nf4 + adapter {d}");
    }
}

#[test]
fn merge_rejects_mismatched_adapter() {
    let dir = tempfile::tempdir().unwrap();
    let err = merge_adapter(
        &fixtures().join("models/tiny-llama"),
        &fixtures().join("adapters/tiny-falcon"),
        &dir.path().join("m"),
        DType::F32,
    )
    .unwrap_err();
    assert!(matches!(err, lorafleet_engine::EngineError::AdapterMismatch(_)), "{err}");
    assert!(err.to_string().contains("transformer.h.0"), "{err}");
}

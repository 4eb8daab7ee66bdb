//! quantize_model writes bitsandbytes' layout; loading it gives the same logits as
//! quantizing on the fly.

use std::path::PathBuf;

use candle_core::{DType, Device, Tensor};
use lorafleet_engine::model::{load_model, CausalLm, ForwardInput, LoadOptions, LoraInit, LoraSettingsRequest, Quant};
use lorafleet_engine::quantize::quantize_model;

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/hf")
}

fn logits(m: &dyn CausalLm) -> Tensor {
    let ids: Vec<u32> = (0..20).map(|i| (i * 53 + 7) % 1024).collect();
    let input = ForwardInput { input_ids: Tensor::from_vec(ids, (1, 20), &Device::Cpu).unwrap(), position_ids: None, segment_ids: None };
    m.logits(&m.hidden_states(&input).unwrap()).unwrap()
}

fn opts(quant: Quant, model: &str) -> LoadOptions {
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

#[test]
fn quantized_checkpoint_loads_without_requantizing() {
    for model in ["tiny-llama", "tiny-falcon"] {
        for dq in [true, false] {
            let src = fixtures().join(format!("models/{model}"));
            let dir = tempfile::tempdir().unwrap();
            let out = dir.path().join("q");
            quantize_model(&src, &out, dq).unwrap();

            // Layout and config.
            let cfg: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(out.join("config.json")).unwrap()).unwrap();
            let qc = &cfg["quantization_config"];
            assert_eq!(qc["quant_method"], "bitsandbytes");
            assert_eq!(qc["load_in_4bit"], true);
            assert_eq!(qc["bnb_4bit_quant_type"], "nf4");
            assert_eq!(qc["bnb_4bit_use_double_quant"], dq);
            assert_eq!(qc["bnb_4bit_compute_dtype"], "float32");
            for f in ["tokenizer.json", "generation_config.json", "tokenizer_config.json"] {
                assert!(out.join(f).exists(), "{f} not copied");
            }
            let bytes = std::fs::read(out.join("model.safetensors")).unwrap();
            let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
            let p = if model == "tiny-llama" { "model.layers.0.mlp.down_proj.weight" } else { "transformer.h.0.self_attention.query_key_value.weight" };
            let w = st.tensor(p).unwrap();
            assert_eq!(w.dtype(), safetensors::Dtype::U8);
            let (o, i) = if model == "tiny-llama" { (64, 176) } else { (96, 64) };
            assert_eq!(w.shape(), &[o * i / 2, 1]);
            let absmax = st.tensor(&format!("{p}.absmax")).unwrap();
            assert_eq!(absmax.dtype(), if dq { safetensors::Dtype::U8 } else { safetensors::Dtype::F32 });
            assert_eq!(st.tensor(&format!("{p}.quant_map")).unwrap().shape(), &[16]);
            assert_eq!(st.tensor(&format!("{p}.nested_quant_map")).is_ok(), dq);
            assert_eq!(st.tensor(&format!("{p}.nested_absmax")).is_ok(), dq);
            let qs: serde_json::Value = serde_json::from_slice(st.tensor(&format!("{p}.quant_state.bitsandbytes__nf4")).unwrap().data()).unwrap();
            assert_eq!(qs["quant_type"], "nf4");
            assert_eq!(qs["blocksize"], 64);
            assert_eq!(qs["dtype"], "float32");
            assert_eq!(qs["shape"], serde_json::json!([o, i]));
            if dq {
                assert_eq!(qs["nested_blocksize"], 256);
                assert_eq!(qs["nested_dtype"], "float32");
                assert!(qs["nested_offset"].as_f64().unwrap() > 0.0);
            }
            // Embeddings and norms stay full precision.
            let emb = if model == "tiny-llama" { "model.embed_tokens.weight" } else { "transformer.word_embeddings.weight" };
            assert_eq!(st.tensor(emb).unwrap().dtype(), safetensors::Dtype::F32);
            if model == "tiny-llama" {
                assert_eq!(st.tensor("lm_head.weight").unwrap().dtype(), safetensors::Dtype::F32);
            }

            // Same logits as quantizing on the fly; opts.quant is ignored for a
            // pre-quantized checkpoint.
            let fly = load_model(&src, &opts(Quant::Nf4 { double_quant: dq }, model)).unwrap();
            let pre = load_model(&out, &opts(Quant::None, model)).unwrap();
            let d = (logits(fly.as_ref()) - logits(pre.as_ref())).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap();
            assert_eq!(d, 0.0, "{model} dq={dq}: logits differ by {d}");
            // And they differ from the full-precision model (quantization happened).
            let full = load_model(&src, &opts(Quant::None, model)).unwrap();
            let d = (logits(full.as_ref()) - logits(pre.as_ref())).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap();
            assert!(d > 1e-4, "{model}: quantized logits equal full precision");
            // Quantizing twice is refused.
            assert!(quantize_model(&out, &dir.path().join("qq"), dq).is_err());
        }
    }
}

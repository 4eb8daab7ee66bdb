//! PEFT adapter files: init, save -> reload identity, on-disk format, target resolution.

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use lorafleet_engine::model::{load_model, CausalLm, ForwardInput, LoadOptions, LoraInit, LoraSettingsRequest, Quant};
use lorafleet_engine::peft::{load_adapter_weights, save_adapter};
use lorafleet_shared::spec::TargetModules;
use rand::{Rng, SeedableRng};

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/hf")
}

fn req(init: LoraInit, targets: Option<TargetModules>) -> LoraSettingsRequest {
    LoraSettingsRequest { r: 8, alpha: 16.0, dropout: 0.0, rslora: false, target_modules: targets, init }
}

fn load(model: &str, quant: Quant, lora: LoraSettingsRequest) -> Box<dyn CausalLm> {
    let opts = LoadOptions { quant, compute_dtype: DType::F32, device: Device::Cpu, lora: Some(lora) };
    load_model(&fixtures().join(format!("models/{model}")), &opts).unwrap()
}

fn logits(m: &dyn CausalLm) -> Tensor {
    let ids: Vec<u32> = (0..14).map(|i| (i * 29 + 1) % 1024).collect();
    let input = ForwardInput { input_ids: Tensor::from_vec(ids, (1, 14), &Device::Cpu).unwrap(), position_ids: None, segment_ids: None };
    m.logits(&m.hidden_states(&input).unwrap()).unwrap()
}

fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
    (a - b).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap()
}

fn randomize_b(m: &dyn CausalLm, seed: u64) {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    for (k, v) in m.lora_params() {
        if k.ends_with("lora_B.weight") {
            let n = v.as_tensor().elem_count();
            let vals: Vec<f32> = (0..n).map(|_| rng.gen_range(-0.1..0.1)).collect();
            v.set(&Tensor::from_vec(vals, v.as_tensor().dims(), &Device::Cpu).unwrap()).unwrap();
        }
    }
}

#[test]
fn peft_default_init() {
    let m = load("tiny-llama", Quant::None, req(LoraInit::PeftDefault { seed: 1 }, None));
    let keys: Vec<&String> = m.lora_params().keys().collect();
    assert_eq!(keys.len(), 2 * 2 * 2, "q_proj and v_proj of 2 layers by default");
    assert!(m.lora_params().contains_key("base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"));
    assert!(m.lora_params().contains_key("base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight"));
    for (k, v) in m.lora_params() {
        let t = v.as_tensor();
        assert_eq!(t.dtype(), DType::F32);
        let vals: Vec<f32> = t.flatten_all().unwrap().to_vec1().unwrap();
        if k.ends_with("lora_A.weight") {
            assert_eq!(t.dims(), &[8, 64]);
            let bound = 1.0 / 64f32.sqrt();
            assert!(vals.iter().all(|x| x.abs() <= bound), "{k} out of bounds");
            assert!(vals.iter().any(|x| x.abs() > bound * 0.5), "{k} not spread over the range");
        } else {
            assert!(vals.iter().all(|&x| x == 0.0), "{k} must start at zero");
        }
    }
    // Reproducible per seed; B = 0 means the output equals the base model.
    let again = load("tiny-llama", Quant::None, req(LoraInit::PeftDefault { seed: 1 }, None));
    let other = load("tiny-llama", Quant::None, req(LoraInit::PeftDefault { seed: 2 }, None));
    let k = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight";
    assert_eq!(max_diff(m.lora_params()[k].as_tensor(), again.lora_params()[k].as_tensor()), 0.0);
    assert!(max_diff(m.lora_params()[k].as_tensor(), other.lora_params()[k].as_tensor()) > 0.0);
    let base = load_model(&fixtures().join("models/tiny-llama"), &LoadOptions::default()).unwrap();
    assert_eq!(max_diff(&logits(m.as_ref()), &logits(base.as_ref())), 0.0);
    assert_eq!(m.info().lora.as_ref().unwrap().target_modules, vec!["q_proj".to_string(), "v_proj".to_string()]);
}

#[test]
fn target_resolution() {
    let all = Some(TargetModules::Named("all-linear".into()));
    let m = load("tiny-llama", Quant::None, req(LoraInit::PeftDefault { seed: 1 }, all.clone()));
    assert_eq!(m.lora_params().len(), 2 * 7 * 2);
    let f = load("tiny-falcon", Quant::None, req(LoraInit::PeftDefault { seed: 1 }, None));
    assert_eq!(f.lora_params().len(), 2 * 2);
    assert_eq!(
        f.lora_params()["base_model.model.transformer.h.0.self_attention.query_key_value.lora_A.weight"].as_tensor().dims(),
        &[8, 64]
    );
    assert_eq!(
        f.lora_params()["base_model.model.transformer.h.0.self_attention.query_key_value.lora_B.weight"].as_tensor().dims(),
        &[96, 8]
    );
    let f = load("tiny-falcon", Quant::None, req(LoraInit::PeftDefault { seed: 1 }, all));
    assert_eq!(f.lora_params().len(), 2 * 4 * 2);
    let list = Some(TargetModules::List(vec!["dense".into()]));
    let f = load("tiny-falcon", Quant::None, req(LoraInit::PeftDefault { seed: 1 }, list));
    let keys: Vec<&String> = f.lora_params().keys().collect();
    assert_eq!(keys.len(), 4, "{keys:?}");
    assert!(keys.iter().all(|k| k.contains("self_attention.dense.")), "{keys:?}");
}

fn check_written(dir: &Path, model: &dyn CausalLm, base_name: &str) {
    let cfg: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(dir.join("adapter_config.json")).unwrap()).unwrap();
    let s = model.info().lora.as_ref().unwrap();
    assert_eq!(cfg["peft_type"], "LORA");
    assert_eq!(cfg["task_type"], "CAUSAL_LM");
    assert_eq!(cfg["r"], s.r);
    assert_eq!(cfg["lora_alpha"].as_f64().unwrap(), s.alpha);
    assert_eq!(cfg["lora_dropout"].as_f64().unwrap(), s.dropout);
    assert_eq!(cfg["bias"], "none");
    assert_eq!(cfg["fan_in_fan_out"], false);
    assert_eq!(cfg["use_rslora"], s.rslora);
    assert_eq!(cfg["use_dora"], false);
    assert!(cfg["modules_to_save"].is_null());
    assert_eq!(cfg["base_model_name_or_path"], base_name);
    assert_eq!(cfg["inference_mode"], true);
    assert_eq!(cfg["rank_pattern"], serde_json::json!({}));
    assert_eq!(cfg["alpha_pattern"], serde_json::json!({}));
    let mut targets: Vec<String> = cfg["target_modules"].as_array().unwrap().iter().map(|v| v.as_str().unwrap().to_string()).collect();
    targets.sort();
    let mut want = s.target_modules.clone();
    want.sort();
    assert_eq!(targets, want);

    let bytes = std::fs::read(dir.join("adapter_model.safetensors")).unwrap();
    let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
    assert_eq!(meta.metadata().as_ref().unwrap().get("format").map(String::as_str), Some("pt"));
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut names: Vec<String> = st.names().into_iter().map(|s| s.to_string()).collect();
    names.sort();
    let want: Vec<String> = model.lora_params().keys().cloned().collect();
    assert_eq!(names, want);
    for (k, v) in model.lora_params() {
        let t = st.tensor(k).unwrap();
        assert_eq!(t.dtype(), safetensors::Dtype::F32);
        assert_eq!(t.shape(), v.as_tensor().dims());
    }
}

#[test]
fn save_then_reload_gives_identical_logits() {
    for model in ["tiny-llama", "tiny-falcon"] {
        for quant in [Quant::None, Quant::Nf4 { double_quant: true }] {
            let all = Some(TargetModules::Named("all-linear".into()));
            let m = load(model, quant, req(LoraInit::PeftDefault { seed: 3 }, all));
            randomize_b(m.as_ref(), 9);
            let dir = tempfile::tempdir().unwrap();
            save_adapter(m.as_ref(), dir.path(), model).unwrap();
            check_written(dir.path(), m.as_ref(), model);
            let back = load(model, quant, req(LoraInit::FromAdapter(dir.path().to_path_buf()), None));
            assert_eq!(max_diff(&logits(m.as_ref()), &logits(back.as_ref())), 0.0, "{model}");
            // load_adapter_weights into a fresh model gives the same as well.
            let fresh = load(model, quant, req(LoraInit::PeftDefault { seed: 4 }, Some(TargetModules::Named("all-linear".into()))));
            assert!(max_diff(&logits(m.as_ref()), &logits(fresh.as_ref())) > 1e-4);
            load_adapter_weights(fresh.as_ref(), dir.path()).unwrap();
            assert_eq!(max_diff(&logits(m.as_ref()), &logits(fresh.as_ref())), 0.0, "{model}");
        }
    }
}

#[test]
fn fixture_adapter_round_trips_bit_exactly() {
    for model in ["tiny-llama", "tiny-falcon"] {
        let src = fixtures().join(format!("adapters/{model}"));
        let m = load(model, Quant::None, req(LoraInit::FromAdapter(src.clone()), None));
        let dir = tempfile::tempdir().unwrap();
        save_adapter(m.as_ref(), dir.path(), model).unwrap();
        let a = std::fs::read(src.join("adapter_model.safetensors")).unwrap();
        let b = std::fs::read(dir.path().join("adapter_model.safetensors")).unwrap();
        let (sa, sb) = (safetensors::SafeTensors::deserialize(&a).unwrap(), safetensors::SafeTensors::deserialize(&b).unwrap());
        assert_eq!(sa.len(), sb.len());
        for (k, v) in sa.tensors() {
            let w = sb.tensor(&k).unwrap();
            assert_eq!(v.shape(), w.shape(), "{k}");
            assert_eq!(v.data(), w.data(), "{k}");
        }
    }
}

#[test]
fn dropout_only_in_training_mode() {
    let mut r = req(LoraInit::FromAdapter(fixtures().join("adapters/tiny-llama")), None);
    r.dropout = 0.3;
    let m = load("tiny-llama", Quant::None, r);
    let eval1 = logits(m.as_ref());
    m.set_training(true);
    m.set_dropout_seed(1);
    let t1 = logits(m.as_ref());
    m.set_dropout_seed(1);
    let t1b = logits(m.as_ref());
    let t2 = logits(m.as_ref());
    m.set_training(false);
    let eval2 = logits(m.as_ref());
    assert_eq!(max_diff(&eval1, &eval2), 0.0);
    assert!(max_diff(&eval1, &t1) > 1e-4, "dropout had no effect");
    assert_eq!(max_diff(&t1, &t1b), 0.0, "same seed, same masks");
    assert!(max_diff(&t1, &t2) > 0.0, "next pass draws new masks");
}

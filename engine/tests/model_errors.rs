//! Loader errors: unknown architectures, missing or corrupt files, adapters that do not
//! fit the base model. Every error names the file, tensor or field.

use std::path::{Path, PathBuf};

use candle_core::{DType, Device};
use lorafleet_engine::model::{load_model, LoadOptions, LoraInit, LoraSettingsRequest, Quant};
use lorafleet_engine::EngineError;

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/hf")
}

fn copy_dir(src: &Path, dst: &Path) {
    std::fs::create_dir_all(dst).unwrap();
    for e in std::fs::read_dir(src).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), dst.join(e.file_name())).unwrap();
    }
}

fn with_adapter(dir: &Path) -> LoadOptions {
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
            init: LoraInit::FromAdapter(dir.to_path_buf()),
        }),
    }
}

fn load_err(dir: &Path, opts: &LoadOptions) -> EngineError {
    match load_model(dir, opts) {
        Ok(_) => panic!("loading {} should fail", dir.display()),
        Err(e) => e,
    }
}

#[test]
fn unknown_model_type() {
    let tmp = tempfile::tempdir().unwrap();
    copy_dir(&fixtures().join("models/tiny-llama"), tmp.path());
    let p = tmp.path().join("config.json");
    let mut cfg: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap();
    cfg["model_type"] = "gpt2".into();
    std::fs::write(&p, cfg.to_string()).unwrap();
    let e = load_err(tmp.path(), &LoadOptions::default());
    assert!(matches!(&e, EngineError::UnsupportedArchitecture(n) if n == "gpt2"), "{e}");
    assert!(e.to_string().contains("gpt2"));
}

#[test]
fn missing_model_file() {
    let tmp = tempfile::tempdir().unwrap();
    copy_dir(&fixtures().join("models/tiny-llama"), tmp.path());
    std::fs::remove_file(tmp.path().join("model.safetensors")).unwrap();
    let e = load_err(tmp.path(), &LoadOptions::default());
    assert!(matches!(e, EngineError::File { .. }), "{e}");
    assert!(e.to_string().contains("model.safetensors"), "{e}");
}

#[test]
fn missing_config_file() {
    let tmp = tempfile::tempdir().unwrap();
    let e = load_err(tmp.path(), &LoadOptions::default());
    assert!(e.to_string().contains("config.json"), "{e}");
}

#[test]
fn corrupt_model_file() {
    let tmp = tempfile::tempdir().unwrap();
    copy_dir(&fixtures().join("models/tiny-llama"), tmp.path());
    std::fs::write(tmp.path().join("model.safetensors"), b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}").unwrap();
    let e = load_err(tmp.path(), &LoadOptions::default());
    assert!(e.to_string().contains("model.safetensors"), "{e}");
}

#[test]
fn missing_tensor_is_named() {
    // A shard index pointing at a file that lacks a layer.
    let tmp = tempfile::tempdir().unwrap();
    copy_dir(&fixtures().join("models/tiny-llama"), tmp.path());
    let bytes = std::fs::read(tmp.path().join("model.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let kept: Vec<(String, safetensors::tensor::TensorView)> =
        st.tensors().into_iter().filter(|(k, _)| !k.contains("layers.1.mlp.up_proj")).collect();
    std::fs::remove_file(tmp.path().join("model.safetensors")).unwrap();
    safetensors::serialize_to_file(kept, None, &tmp.path().join("model-00001-of-00001.safetensors")).unwrap();
    let names: Vec<String> = st.names().into_iter().map(|s| s.to_string()).collect();
    let map: serde_json::Map<String, serde_json::Value> =
        names.iter().map(|n| (n.clone(), serde_json::Value::String("model-00001-of-00001.safetensors".into()))).collect();
    std::fs::write(tmp.path().join("model.safetensors.index.json"), serde_json::json!({"metadata": {}, "weight_map": map}).to_string()).unwrap();
    let e = load_err(tmp.path(), &LoadOptions::default());
    let msg = e.to_string();
    assert!(msg.contains("model.layers.1.mlp.up_proj.weight") && msg.contains("model-00001-of-00001.safetensors"), "{msg}");
}

#[test]
fn sharded_checkpoint_loads() {
    let tmp = tempfile::tempdir().unwrap();
    copy_dir(&fixtures().join("models/tiny-falcon"), tmp.path());
    let bytes = std::fs::read(tmp.path().join("model.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let (a, b): (Vec<_>, Vec<_>) = st.tensors().into_iter().partition(|(k, _)| k.contains(".h.0."));
    let mut map = serde_json::Map::new();
    for (file, part) in [("model-00001-of-00002.safetensors", a), ("model-00002-of-00002.safetensors", b)] {
        for (k, _) in &part {
            map.insert(k.clone(), file.into());
        }
        safetensors::serialize_to_file(part, None, &tmp.path().join(file)).unwrap();
    }
    std::fs::remove_file(tmp.path().join("model.safetensors")).unwrap();
    std::fs::write(tmp.path().join("model.safetensors.index.json"), serde_json::json!({"weight_map": map}).to_string()).unwrap();
    let m = load_model(tmp.path(), &LoadOptions::default()).unwrap();
    assert_eq!(m.info().model_type, "falcon");
}

fn rewrite_adapter(src: &Path, dst: &Path, edit: impl Fn(&str, Vec<usize>, Vec<f32>) -> Option<(String, Vec<usize>, Vec<f32>)>) {
    copy_dir(src, dst);
    let bytes = std::fs::read(src.join("adapter_model.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut out: Vec<(String, Vec<usize>, Vec<u8>)> = Vec::new();
    for (k, v) in st.tensors() {
        let vals: Vec<f32> = v.data().chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect();
        if let Some((k2, shape, vals)) = edit(&k, v.shape().to_vec(), vals) {
            out.push((k2, shape, vals.iter().flat_map(|x| x.to_le_bytes()).collect()));
        }
    }
    let views: Vec<(String, safetensors::tensor::TensorView)> = out
        .iter()
        .map(|(k, s, b)| (k.clone(), safetensors::tensor::TensorView::new(safetensors::Dtype::F32, s.clone(), b).unwrap()))
        .collect();
    safetensors::serialize_to_file(views, None, &dst.join("adapter_model.safetensors")).unwrap();
}

#[test]
fn adapter_with_wrong_shape() {
    let tmp = tempfile::tempdir().unwrap();
    let key = "base_model.model.model.layers.1.mlp.down_proj.lora_A.weight";
    rewrite_adapter(&fixtures().join("adapters/tiny-llama"), tmp.path(), |k, shape, vals| {
        if k == key {
            // [8, 176] -> [8, 170]
            let v: Vec<f32> = vals.chunks(176).flat_map(|row| row[..170].to_vec()).collect();
            Some((k.to_string(), vec![shape[0], 170], v))
        } else {
            Some((k.to_string(), shape, vals))
        }
    });
    let e = load_err(&fixtures().join("models/tiny-llama"), &with_adapter(tmp.path()));
    assert!(matches!(e, EngineError::AdapterMismatch(_)), "{e}");
    let msg = e.to_string();
    assert!(msg.contains(key) && msg.contains("[8, 170]") && msg.contains("[8, 176]"), "{msg}");
}

#[test]
fn adapter_for_another_architecture() {
    let e = load_err(&fixtures().join("models/tiny-llama"), &with_adapter(&fixtures().join("adapters/tiny-falcon")));
    assert!(matches!(e, EngineError::AdapterMismatch(_)) || matches!(e, EngineError::Config(_)), "{e}");
}

#[test]
fn adapter_with_unknown_key() {
    let tmp = tempfile::tempdir().unwrap();
    rewrite_adapter(&fixtures().join("adapters/tiny-llama"), tmp.path(), |k, shape, vals| {
        Some((k.replace("layers.1.", "layers.7."), shape, vals))
    });
    let e = load_err(&fixtures().join("models/tiny-llama"), &with_adapter(tmp.path()));
    assert!(matches!(e, EngineError::AdapterMismatch(_)), "{e}");
    assert!(e.to_string().contains("layers.1.") || e.to_string().contains("layers.7."), "{e}");
}

#[test]
fn adapter_missing_a_tensor() {
    let tmp = tempfile::tempdir().unwrap();
    let key = "base_model.model.model.layers.0.self_attn.k_proj.lora_B.weight";
    rewrite_adapter(&fixtures().join("adapters/tiny-llama"), tmp.path(), |k, shape, vals| (k != key).then(|| (k.to_string(), shape, vals)));
    let e = load_err(&fixtures().join("models/tiny-llama"), &with_adapter(tmp.path()));
    assert!(matches!(e, EngineError::AdapterMismatch(_)), "{e}");
    assert!(e.to_string().contains(key), "{e}");
}

#[test]
fn unsupported_adapter_config() {
    let tmp = tempfile::tempdir().unwrap();
    copy_dir(&fixtures().join("adapters/tiny-llama"), tmp.path());
    let p = tmp.path().join("adapter_config.json");
    let mut cfg: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap();
    cfg["use_dora"] = true.into();
    std::fs::write(&p, cfg.to_string()).unwrap();
    let e = load_err(&fixtures().join("models/tiny-llama"), &with_adapter(tmp.path()));
    assert!(e.to_string().contains("adapter_config.json") && e.to_string().contains("dora"), "{e}");
}

#[test]
fn bad_config_field() {
    let tmp = tempfile::tempdir().unwrap();
    copy_dir(&fixtures().join("models/tiny-llama"), tmp.path());
    let p = tmp.path().join("config.json");
    let mut cfg: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap();
    cfg["num_key_value_heads"] = 3.into();
    std::fs::write(&p, cfg.to_string()).unwrap();
    let e = load_err(tmp.path(), &LoadOptions::default());
    assert!(e.to_string().contains("config.json") && e.to_string().contains("num_key_value_heads"), "{e}");
    cfg["num_key_value_heads"] = 2.into();
    cfg["rope_parameters"] = serde_json::json!({"rope_type": "yarn", "factor": 2.0});
    std::fs::write(&p, cfg.to_string()).unwrap();
    let e = load_err(tmp.path(), &LoadOptions::default());
    assert!(e.to_string().contains("yarn"), "{e}");
}

#[test]
fn out_of_vocabulary_token() {
    let m = load_model(&fixtures().join("models/tiny-llama"), &LoadOptions::default()).unwrap();
    let ids = candle_core::Tensor::from_vec(vec![1u32, 5000], (1, 2), &Device::Cpu).unwrap();
    let e = m.hidden_states(&lorafleet_engine::model::ForwardInput { input_ids: ids, position_ids: None, segment_ids: None }).unwrap_err();
    assert!(e.to_string().contains("5000"), "{e}");
}

//! Reproduce the PEFT + torch.optim.AdamW training traces of the fixtures: every loss
//! and every final adapter weight within 1e-4 (fixtures README, "Training trace").

mod common;

use std::path::{Path, PathBuf};

use candle_core::Device;
use lorafleet_engine::train::{train, StepMetrics, TrainObserver, TrainRun};
use lorafleet_shared::spec::{JobSpec, SpecContext};

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/hf")
}

#[derive(Default)]
struct Losses(Vec<f64>, Vec<String>);
impl TrainObserver for Losses {
    fn on_step(&mut self, m: &StepMetrics) {
        self.0.push(m.loss);
    }
    fn on_notice(&mut self, level: &str, message: &str) {
        self.1.push(format!("{level}: {message}"));
    }
}

fn trace_spec(model: &str, trace: &serde_json::Value, out: &Path, checkpointing: bool) -> JobSpec {
    let targets: Vec<String> = trace["target_modules"].as_array().unwrap().iter().map(|v| v.as_str().unwrap().to_string()).collect();
    let y = format!(
        r#"
name: trace-{model}
model: {{ source: {m} }}
quantization: {{ method: none, compute_dtype: f32 }}
lora: {{ r: {r}, alpha: {alpha}, dropout: 0.0, target_modules: {targets:?} }}
data: {{ train: {d}, shuffle: false, max_seq_len: 512 }}
training:
  max_steps: {steps}
  micro_batch_size: 1
  grad_accum: 1
  lr: {lr}
  schedule: constant
  warmup_steps: 0
  weight_decay: 0.0
  betas: [0.9, 0.999]
  eps: 1.0e-8
  max_grad_norm: 0.0
  gradient_checkpointing: {checkpointing}
  seed: 0
output: {{ dir: {o} }}
"#,
        m = fixtures().join("models").join(model).display(),
        r = trace["r"],
        alpha = trace["lora_alpha"],
        d = fixtures().join("train").join(model).join("data.jsonl").display(),
        steps = trace["steps"],
        lr = trace["lr"],
        o = out.display(),
    );
    JobSpec::from_yaml(&y, SpecContext::Local).unwrap()
}

/// A run of a trace spec from the fixture's data and initial adapter; scratch in `tmp`
/// (the spec's output dir is `tmp/out`).
fn trace_run(model: &str, spec: JobSpec, tmp: &Path, devices: Vec<Device>) -> TrainRun {
    let dir = fixtures().join("train").join(model);
    TrainRun {
        spec,
        model_dir: fixtures().join("models").join(model),
        train_data: dir.join("data.jsonl"),
        eval_data: None,
        init_adapter: Some(dir.join("init_adapter")),
        output_dir: tmp.join("out"),
        work_dir: tmp.join("work"),
        resume_from: None,
        devices,
    }
}

fn check_trace(model: &str, checkpointing: bool) {
    let dir = fixtures().join("train").join(model);
    let trace: serde_json::Value = serde_json::from_slice(&std::fs::read(dir.join("trace.json")).unwrap()).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out");
    let spec = trace_spec(model, &trace, &out, checkpointing);
    let run = trace_run(model, spec, tmp.path(), vec![Device::Cpu]);
    let mut obs = Losses::default();
    let summary = train(&run, &mut obs).unwrap();
    let want: Vec<f64> = trace["losses"].as_array().unwrap().iter().map(|v| v.as_f64().unwrap()).collect();
    assert_eq!(obs.0.len(), want.len());
    assert_eq!(summary.steps, want.len() as u64);
    assert!(obs.1.is_empty(), "f32 on the CPU needs no advice: {:?}", obs.1);
    for (i, (g, w)) in obs.0.iter().zip(&want).enumerate() {
        assert!((g - w).abs() < 1e-4, "{model}: step {} loss {g} vs {w}", i + 1);
    }
    let got = candle_core::safetensors::load(out.join("adapter_model.safetensors"), &Device::Cpu).unwrap();
    let exp = candle_core::safetensors::load(dir.join("final_adapter/adapter_model.safetensors"), &Device::Cpu).unwrap();
    assert_eq!(got.len(), exp.len(), "{model}: same adapter tensors");
    let mut worst = 0f32;
    for (k, e) in &exp {
        let g = got.get(k).unwrap_or_else(|| panic!("{model}: missing {k}"));
        assert_eq!(g.dims(), e.dims(), "{k}");
        let d = (g - e).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap();
        worst = worst.max(d);
        assert!(d < 1e-4, "{model}: {k} differs by {d}");
    }
    eprintln!("{model}: worst adapter difference {worst:e}");
    // outputs the CLI and worker rely on
    for f in ["adapter_config.json", "metrics.jsonl", "loss.svg", "train_summary.json"] {
        assert!(out.join(f).is_file(), "{f}");
    }
    let metrics = std::fs::read_to_string(out.join("metrics.jsonl")).unwrap();
    assert_eq!(metrics.lines().filter(|l| l.contains("\"type\":\"step\"")).count(), want.len());
}

#[test]
fn tiny_llama_trace_matches_peft() {
    check_trace("tiny-llama", false);
}

#[test]
fn tiny_falcon_trace_matches_peft() {
    check_trace("tiny-falcon", false);
}

#[test]
fn tiny_llama_trace_with_gradient_checkpointing() {
    check_trace("tiny-llama", true);
}

#[test]
fn traces_match_peft_on_the_avx2_kernels() {
    common::rerun_on_avx2("_trace", 3);
}

/// The portable ops (what CUDA devices run) reproduce the PEFT traces too, and train the
/// QLoRA defaults (NF4 kept 4-bit and dequantized by tensor ops, bf16, dropout, gradient
/// checkpointing).
#[test]
fn traces_match_peft_on_the_portable_ops() {
    common::rerun_portable("", 5);
}

/// The spec's QLoRA defaults (NF4 double-quant, bf16 compute, dropout, grad accumulation
/// 4, cosine with warm-up, clipping, gradient checkpointing) train and save an adapter.
#[test]
fn qlora_defaults_train_nf4_bf16() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out");
    let y = format!(
        "name: q\nmodel: {{ source: m }}\ndata: {{ train: d }}\ntraining: {{ max_steps: 3, lr: 1.0e-3 }}\noutput: {{ dir: {} }}\n",
        out.display()
    );
    let spec = JobSpec::from_yaml(&y, SpecContext::Local).unwrap();
    assert_eq!(spec.training.grad_accum, 4);
    let run = TrainRun {
        spec,
        model_dir: fixtures().join("models/tiny-falcon"),
        train_data: fixtures().join("train/tiny-falcon/data.jsonl"),
        eval_data: None,
        init_adapter: None,
        output_dir: out.clone(),
        work_dir: tmp.path().join("work"),
        resume_from: None,
        devices: vec![Device::Cpu],
    };
    let mut obs = Losses::default();
    let s = train(&run, &mut obs).unwrap();
    assert_eq!(obs.0.len(), 3);
    assert!(obs.0.iter().all(|l| l.is_finite() && *l > 0.0), "{:?}", obs.0);
    // bf16 compute on the CPU works, and where the CPU has no bf16 dot products (or they
    // are turned off) the run says that f32 would be faster.
    let dot = lorafleet_engine::ops::bf16_dot_products();
    let warned = obs.1.iter().any(|n| n.starts_with("warn: quantization.compute_dtype: bf16 on a CPU without bf16 dot products"));
    assert_eq!(warned, !dot, "{:?}", obs.1);
    assert_eq!(s.steps, 3);
    let cfg: serde_json::Value = serde_json::from_slice(&std::fs::read(out.join("adapter_config.json")).unwrap()).unwrap();
    assert_eq!(cfg["r"], 8);
    assert_eq!(cfg["target_modules"], serde_json::json!(["query_key_value"]));
}

//! Resuming from a checkpoint reproduces the uninterrupted run exactly.

use std::path::{Path, PathBuf};

use candle_core::Device;
use lorafleet_engine::train::{train, StepMetrics, TrainObserver, TrainRun};
use lorafleet_shared::spec::{JobSpec, SpecContext};

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/hf")
}

#[derive(Default)]
struct Rec {
    losses: Vec<(u64, f64)>,
    checkpoints: Vec<(u64, PathBuf)>,
}
impl TrainObserver for Rec {
    fn on_step(&mut self, m: &StepMetrics) {
        self.losses.push((m.step, m.loss));
    }
    fn on_checkpoint(&mut self, step: u64, dir: &Path) -> lorafleet_engine::Result<()> {
        self.checkpoints.push((step, dir.to_path_buf()));
        Ok(())
    }
}

fn run(out: &Path, work: &Path, resume: Option<PathBuf>) -> TrainRun {
    // shuffling, dropout, accumulation, warm-up + cosine and 8-bit AdamW all engaged
    // (r = 64 makes the LoRA matrices of the hidden-64 model >= 4096 elements, so their
    // moments are stored in 8 bits)
    let y = format!(
        r#"
name: resume
model: {{ source: {m} }}
quantization: {{ method: none, compute_dtype: f32 }}
lora: {{ r: 64, alpha: 128, dropout: 0.1, target_modules: all-linear }}
data: {{ train: {d}, shuffle: true, max_seq_len: 64 }}
training: {{ max_steps: 10, micro_batch_size: 2, grad_accum: 2, lr: 5.0e-3, schedule: cosine, warmup_steps: 2, weight_decay: 0.01, max_grad_norm: 1.0, optimizer: adamw_8bit, checkpoint_every: 5, seed: 11 }}
output: {{ dir: {o} }}
"#,
        m = fixtures().join("models/tiny-llama").display(),
        d = fixtures().join("train/tiny-llama/data.jsonl").display(),
        o = out.display()
    );
    TrainRun {
        spec: JobSpec::from_yaml(&y, SpecContext::Local).unwrap(),
        model_dir: fixtures().join("models/tiny-llama"),
        train_data: fixtures().join("train/tiny-llama/data.jsonl"),
        eval_data: None,
        init_adapter: None,
        output_dir: out.to_path_buf(),
        work_dir: work.to_path_buf(),
        resume_from: resume,
        devices: vec![Device::Cpu],
    }
}

#[test]
fn resume_from_step_5_reproduces_steps_6_to_10() {
    let tmp = tempfile::tempdir().unwrap();
    let mut full = Rec::default();
    train(&run(&tmp.path().join("a"), &tmp.path().join("wa"), None), &mut full).unwrap();
    assert_eq!(full.losses.len(), 10);
    assert_eq!(full.checkpoints.len(), 1);
    let (step, ck) = full.checkpoints[0].clone();
    assert_eq!(step, 5);
    assert_eq!(ck, tmp.path().join("wa/checkpoints/step-5"));
    for f in ["adapter_model.safetensors", "adapter_config.json", "optimizer.safetensors", "state.json"] {
        assert!(ck.join(f).is_file(), "{f}");
    }

    let mut resumed = Rec::default();
    let s = train(&run(&tmp.path().join("b"), &tmp.path().join("wb"), Some(ck)), &mut resumed).unwrap();
    assert_eq!(s.resumed_from_step, Some(5));
    assert_eq!(resumed.losses, full.losses[5..].to_vec(), "losses 6-10 must be identical");
    let a = std::fs::read(tmp.path().join("a/adapter_model.safetensors")).unwrap();
    let b = std::fs::read(tmp.path().join("b/adapter_model.safetensors")).unwrap();
    assert_eq!(a, b, "final adapters identical");
    // the resumed run's metrics file carries the whole history
    let m = std::fs::read_to_string(tmp.path().join("b/metrics.jsonl")).unwrap();
    assert_eq!(m.lines().filter(|l| l.contains("\"type\":\"step\"")).count(), 10);
}

#[derive(Default)]
struct Evals(Vec<lorafleet_engine::train::EvalMetrics>);
impl TrainObserver for Evals {
    fn on_eval(&mut self, m: &lorafleet_engine::train::EvalMetrics) {
        self.0.push(m.clone());
    }
}

#[test]
fn eval_split_and_samples_are_reported() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("o");
    let mut r = run(&out, &tmp.path().join("w"), None);
    r.spec.data.eval_split = 0.2;
    r.spec.training.max_steps = Some(4);
    r.spec.training.eval_every = 2;
    r.spec.training.checkpoint_every = 0;
    r.spec.training.sample_prompts = vec!["How do I create an account?".into()];
    r.spec.training.sample_max_new_tokens = 5;
    let mut ev = Evals::default();
    let s = train(&r, &mut ev).unwrap();
    assert_eq!(ev.0.iter().map(|e| e.step).collect::<Vec<_>>(), vec![2, 4]);
    let e = &ev.0[1];
    assert!(e.tokens > 0 && e.loss.is_finite() && (e.perplexity - e.loss.exp()).abs() < 1e-9);
    assert_eq!(e.samples.len(), 1);
    assert_eq!(s.eval_data.as_ref().unwrap().examples, 2);
    assert_eq!(s.train_data.examples, 8);
    assert_eq!(s.final_eval.as_ref().unwrap().step, 4);
}

#[test]
fn eight_bit_moments_are_checkpointed() {
    let tmp = tempfile::tempdir().unwrap();
    let mut r = run(&tmp.path().join("o"), &tmp.path().join("w"), None);
    r.spec.training.max_steps = Some(2);
    r.spec.training.checkpoint_every = 1;
    train(&r, &mut Rec::default()).unwrap();
    let st = candle_core::safetensors::load(tmp.path().join("w/checkpoints/step-1/optimizer.safetensors"), &Device::Cpu).unwrap();
    assert!(st.keys().any(|k| k.ends_with(".exp_avg.q8")), "8-bit moments expected");
    assert!(st.keys().any(|k| k.ends_with(".exp_avg_sq.absmax")));
}

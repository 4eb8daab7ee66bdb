//! Answer-quality evaluation, `save_best` and `early_stopping` on the tiny Llama fixture:
//! generation metrics in every evaluation, the best adapter (not the last) as the run's
//! adapter bit for bit, its survival of a resume into a fresh output directory (a job
//! resumed on another worker), early stopping with its reason, and two data-parallel
//! ranks stopping at the same step.

use std::path::{Path, PathBuf};

use candle_core::Device;
use lorafleet_engine::checkpoint::{BestRecord, PatienceState};
use lorafleet_engine::train::{train, EvalMetrics, MetricTracker, StepMetrics, TrainObserver, TrainRun};
use lorafleet_shared::spec::{EarlyStoppingSpec, EvalMetric, JobSpec, MetricMode, SpecContext};

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/hf")
}

#[derive(Default)]
struct Rec {
    steps: Vec<u64>,
    evals: Vec<EvalMetrics>,
    notices: Vec<String>,
    rank_steps: Vec<(usize, u64)>,
    checkpoints: Vec<(u64, PathBuf)>,
}

impl TrainObserver for Rec {
    fn on_step(&mut self, m: &StepMetrics) {
        self.steps.push(m.step);
    }
    fn on_eval(&mut self, m: &EvalMetrics) {
        self.evals.push(m.clone());
    }
    fn on_notice(&mut self, level: &str, message: &str) {
        self.notices.push(format!("{level}: {message}"));
    }
    fn on_rank_step(&mut self, rank: usize, m: &StepMetrics) {
        self.rank_steps.push((rank, m.step));
    }
    fn on_checkpoint(&mut self, step: u64, dir: &Path) -> lorafleet_engine::Result<()> {
        self.checkpoints.push((step, dir.to_path_buf()));
        Ok(())
    }
}

/// The tiny Llama fixture, f32, its data as both training and eval set (so the eval loss
/// falls as it trains). `training` is the spec's training section.
fn run(tmp: &Path, training: &str, devices: usize, resume: Option<PathBuf>) -> TrainRun {
    let data = fixtures().join("train/tiny-llama/data.jsonl");
    let out = tmp.join("out");
    let y = format!(
        r#"
name: best
model: {{ source: {m} }}
quantization: {{ method: none, compute_dtype: f32 }}
lora: {{ r: 8, alpha: 16, dropout: 0.0, target_modules: all-linear }}
data: {{ train: {d}, eval: {d}, shuffle: true, max_seq_len: 64 }}
training: {training}
output: {{ dir: {o} }}
"#,
        m = fixtures().join("models/tiny-llama").display(),
        d = data.display(),
        o = out.display()
    );
    TrainRun {
        spec: JobSpec::from_yaml(&y, SpecContext::Local).unwrap(),
        model_dir: fixtures().join("models/tiny-llama"),
        train_data: data.clone(),
        eval_data: Some(data),
        init_adapter: None,
        output_dir: out,
        work_dir: tmp.join("work"),
        resume_from: resume,
        devices: vec![Device::Cpu; devices],
    }
}

fn read(p: impl AsRef<Path>) -> Vec<u8> {
    std::fs::read(p.as_ref()).unwrap_or_else(|e| panic!("{}: {e}", p.as_ref().display()))
}

const BASE: &str = "max_steps: 8, micro_batch_size: 2, grad_accum: 2, lr: 5.0e-3, schedule: constant, warmup_steps: 0, seed: 3, eval_every: 2";

#[test]
fn save_best_keeps_the_best_adapter_not_the_last_and_survives_a_resume() {
    // mode max on eval_loss: the best evaluation is the worst loss, an early one, since
    // the eval loss falls while the model trains on the eval data.
    let training = format!(
        "{{ {BASE}, checkpoint_every: 4, eval_generate_samples: 2, eval_generate_max_new_tokens: 4, save_best: {{ metric: eval_loss, mode: max }} }}"
    );
    let tmp = tempfile::tempdir().unwrap();
    let mut rec = Rec::default();
    let s = train(&run(tmp.path(), &training, 1, None), &mut rec).unwrap();
    assert_eq!(rec.evals.iter().map(|e| e.step).collect::<Vec<_>>(), [2, 4, 6, 8]);
    for e in &rec.evals {
        assert_eq!(e.generated, 2);
        let (em, rl) = (e.exact_match.unwrap(), e.rouge_l.unwrap());
        assert!((0.0..=1.0).contains(&em) && (0.0..=1.0).contains(&rl), "{e:?}");
    }
    let (worst_step, worst) = rec.evals.iter().map(|e| (e.step, e.loss)).fold((0, f64::NEG_INFINITY), |a, b| if b.1 > a.1 { b } else { a });
    let best = s.best.clone().expect("a best evaluation");
    assert_eq!(best, BestRecord { metric: "eval_loss".into(), step: worst_step, value: worst });
    assert!(best.step < 8, "the construction needs a best before the last step: {:?}", rec.evals);
    assert_eq!(s.adapter_step, best.step);
    assert!(!s.stopped_early);
    // Every eval event carries the best so far.
    assert_eq!(rec.evals.last().unwrap().best.as_ref(), Some(&best));

    let out = tmp.path().join("out");
    let adapter = read(out.join("adapter_model.safetensors"));
    assert!(adapter == read(out.join("best/adapter_model.safetensors")), "the run's adapter is best/'s, bit for bit");
    assert_eq!(read(out.join("adapter_config.json")), read(out.join("best/adapter_config.json")));
    let bj: BestRecord = serde_json::from_slice(&read(out.join("best/best.json"))).unwrap();
    assert_eq!(bj, best);
    let summary: serde_json::Value = serde_json::from_slice(&read(out.join("train_summary.json"))).unwrap();
    assert_eq!(summary["adapter_step"], best.step);
    assert_eq!(summary["best"]["step"], best.step);
    assert_eq!(summary["stopped_early"], false);
    // metrics.jsonl: eval lines with the answer metrics and the best.
    let metrics = String::from_utf8(read(out.join("metrics.jsonl"))).unwrap();
    let evals: Vec<serde_json::Value> = metrics.lines().map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()).filter(|v| v["type"] == "eval").collect();
    assert_eq!(evals.len(), 4);
    for e in &evals {
        assert!(e["exact_match"].is_f64() && e["rouge_l"].is_f64() && e["generated"] == 2, "{e}");
        assert_eq!(e["best"]["metric"], "eval_loss", "{e}");
    }
    // The plot: eval points and the best step.
    let svg = String::from_utf8(read(out.join("loss.svg"))).unwrap();
    assert_eq!(svg.matches("class=\"eval\"").count(), 4);
    assert!(svg.contains(&format!("best (step {})", best.step)), "{svg}");

    // The checkpoint at step 4 carries the best adapter as of step 4.
    let ck = tmp.path().join("work/checkpoints/step-4");
    assert_eq!(rec.checkpoints, [(4, ck.clone())]);
    let state: serde_json::Value = serde_json::from_slice(&read(ck.join("state.json"))).unwrap();
    let best_at_4 = rec.evals[1].best.clone().unwrap();
    assert_eq!(state["best"]["step"], best_at_4.step);
    assert_eq!(state["evals"].as_array().unwrap().len(), 2);
    assert!(ck.join("best/adapter_model.safetensors").is_file());

    // Resumed from it into a fresh output directory (another worker): the same best and
    // the same adapter, bit for bit.
    let tmp2 = tempfile::tempdir().unwrap();
    let mut rec2 = Rec::default();
    let s2 = train(&run(tmp2.path(), &training, 1, Some(ck)), &mut rec2).unwrap();
    assert_eq!(s2.resumed_from_step, Some(4));
    assert_eq!(rec2.evals.iter().map(|e| e.step).collect::<Vec<_>>(), [6, 8]);
    assert_eq!(s2.best, Some(best.clone()));
    assert!(read(tmp2.path().join("out/adapter_model.safetensors")) == adapter, "resumed run's adapter is the same best one");
    // the resumed run's metrics and plot still have the evaluations before the checkpoint
    let metrics2 = String::from_utf8(read(tmp2.path().join("out/metrics.jsonl"))).unwrap();
    assert_eq!(metrics2.lines().filter(|l| l.contains("\"type\":\"eval\"")).count(), 4);
    assert_eq!(String::from_utf8(read(tmp2.path().join("out/loss.svg"))).unwrap().matches("class=\"eval\"").count(), 4);

    // Without save_best the run's adapter is the last one, which differs.
    let tmp3 = tempfile::tempdir().unwrap();
    let s3 = train(&run(tmp3.path(), &format!("{{ {BASE} }}"), 1, None), &mut Rec::default()).unwrap();
    assert_eq!((s3.adapter_step, s3.best.as_ref()), (8, None));
    assert!(read(tmp3.path().join("out/adapter_model.safetensors")) != adapter, "the last adapter is another one");
    assert!(!tmp3.path().join("out/best").exists());
}

const EARLY: &str = "early_stopping: { patience: 2, min_delta: 100 }";

#[test]
fn early_stopping_ends_the_run_before_max_steps_with_the_reason() {
    // No evaluation improves by more than 100: the first sets the reference, the next two
    // do not improve on it, and the run stops at step 6 of 12.
    let tmp = tempfile::tempdir().unwrap();
    let mut rec = Rec::default();
    let training = format!("{{ {}, {EARLY} }}", BASE.replace("max_steps: 8", "max_steps: 12"));
    let s = train(&run(tmp.path(), &training, 1, None), &mut rec).unwrap();
    assert_eq!(s.steps, 6);
    assert_eq!(s.total_steps, 12);
    assert_eq!(rec.steps, (1..=6).collect::<Vec<_>>());
    assert!(s.stopped_early);
    let best = s.best.clone().unwrap();
    let want = format!(
        "early stopping at step 6: eval_loss did not improve by more than 100 in 2 evaluations; best {:.6} at step {}",
        best.value, best.step
    );
    assert_eq!(s.stop_reason.as_deref(), Some(want.as_str()));
    assert!(rec.notices.contains(&format!("info: {want}")), "{:?}", rec.notices);
    assert_eq!(s.adapter_step, 6, "without save_best the adapter is the last one");
    let summary: serde_json::Value = serde_json::from_slice(&read(tmp.path().join("out/train_summary.json"))).unwrap();
    assert_eq!(summary["stopped_early"], true);
    assert_eq!(summary["stop_reason"], want.as_str());
    assert!(tmp.path().join("out/adapter_model.safetensors").is_file());
}

#[test]
fn two_ranks_stop_early_at_the_same_step() {
    let tmp = tempfile::tempdir().unwrap();
    let mut rec = Rec::default();
    let training = format!("{{ {}, {EARLY} }}", BASE.replace("max_steps: 8", "max_steps: 12"));
    let s = train(&run(tmp.path(), &training, 2, None), &mut rec).unwrap();
    assert!(s.stopped_early);
    assert_eq!(s.steps, 6);
    assert_eq!(rec.steps, (1..=6).collect::<Vec<_>>());
    let rank1: Vec<u64> = rec.rank_steps.iter().filter(|(r, _)| *r == 1).map(|(_, s)| *s).collect();
    assert_eq!(rank1, (1..=6).collect::<Vec<_>>(), "rank 1 stops at the same step");
    assert_eq!(rec.notices.iter().filter(|n| n.contains("early stopping at step 6")).count(), 1, "{:?}", rec.notices);
}

#[test]
fn tracker_best_is_strict_and_patience_counts_against_min_delta() {
    let tr = MetricTracker { metric: EvalMetric::EvalLoss, mode: MetricMode::Min, early_stopping: Some(EarlyStoppingSpec { patience: 2, min_delta: 0.1 }) };
    let (mut best, mut p) = (None, PatienceState::default());
    let mut obs = |step, v: f64| tr.observe(&mut best, &mut p, step, v);
    assert!(obs(1, 2.0).improved);
    // better, but not by more than min_delta: a new best, and one evaluation without improvement
    let t = obs(2, 1.95);
    assert!(t.improved && t.stop.is_none());
    // equal is not better; NaN neither improves nor counts
    assert!(!obs(3, f64::NAN).improved);
    let t = obs(4, 1.95);
    assert!(!t.improved);
    assert_eq!(t.stop.as_deref(), Some("early stopping at step 4: eval_loss did not improve by more than 0.1 in 2 evaluations; best 1.950000 at step 2"));
    assert_eq!(best, Some(BestRecord { metric: "eval_loss".into(), step: 2, value: 1.95 }));

    // mode max; an improvement by more than min_delta resets the count
    let tr = MetricTracker { metric: EvalMetric::RougeL, mode: MetricMode::Max, early_stopping: Some(EarlyStoppingSpec { patience: 2, min_delta: 0.05 }) };
    let (mut best, mut p) = (None, PatienceState::default());
    let mut obs = |step, v: f64| tr.observe(&mut best, &mut p, step, v);
    assert!(obs(1, 0.2).improved);
    assert!(obs(2, 0.22).stop.is_none()); // count 1
    assert!(obs(3, 0.3).stop.is_none()); // > 0.2 + 0.05: count 0
    assert!(obs(4, 0.1).stop.is_none()); // count 1
    assert!(obs(5, 0.34).stop.is_some(), "0.34 is not more than 0.3 + 0.05");
    assert_eq!(best.unwrap().step, 5);
}

#[test]
fn without_an_evaluation_the_last_adapter_is_kept() {
    // An eval split of a one-row file leaves no eval set: no evaluation ever happens.
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("one.jsonl");
    std::fs::write(&data, "{\"question\": \"How do I create an account?\", \"answer\": \"Click [Sign up].\"}\n").unwrap();
    let mut r = run(tmp.path(), &format!("{{ {}, save_best: {{ metric: eval_loss }} }}", BASE.replace("max_steps: 8", "max_steps: 2")), 1, None);
    r.spec.data.eval = None;
    r.spec.data.eval_split = 0.5;
    r.spec.validate(SpecContext::Local).unwrap();
    (r.train_data, r.eval_data) = (data, None);
    let mut rec = Rec::default();
    let s = train(&r, &mut rec).unwrap();
    assert!(rec.evals.is_empty());
    assert_eq!((s.best.as_ref(), s.adapter_step, s.stopped_early), (None, 2, false));
    assert!(tmp.path().join("out/adapter_model.safetensors").is_file());
    assert!(!tmp.path().join("out/best").exists());
}

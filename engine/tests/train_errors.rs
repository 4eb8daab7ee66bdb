//! Bad input to `train` fails with an error that names the file and the problem.

use std::path::{Path, PathBuf};

use candle_core::Device;
use lorafleet_engine::train::{train, NoObserver, TrainObserver, TrainRun};
use lorafleet_engine::EngineError;
use lorafleet_shared::spec::{JobSpec, SpecContext};

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/hf")
}

fn run(model_dir: &Path, data: &Path, out: &Path) -> TrainRun {
    let y = format!(
        "name: t\nmodel: {{ source: {} }}\nquantization: {{ method: none, compute_dtype: f32 }}\ndata: {{ train: {} }}\ntraining: {{ max_steps: 3, grad_accum: 1 }}\noutput: {{ dir: {} }}\n",
        model_dir.display(),
        data.display(),
        out.display()
    );
    TrainRun {
        spec: JobSpec::from_yaml(&y, SpecContext::Local).unwrap(),
        model_dir: model_dir.to_path_buf(),
        train_data: data.to_path_buf(),
        eval_data: None,
        init_adapter: None,
        output_dir: out.to_path_buf(),
        work_dir: out.join("work"),
        resume_from: None,
        devices: vec![Device::Cpu],
    }
}

fn model() -> PathBuf {
    fixtures().join("models/tiny-llama")
}

fn err_of(r: &TrainRun) -> String {
    train(r, &mut NoObserver).unwrap_err().to_string()
}

#[test]
fn malformed_json_names_file_and_line() {
    let t = tempfile::tempdir().unwrap();
    let d = t.path().join("d.jsonl");
    std::fs::write(&d, "{\"question\": \"a\", \"answer\": \"b\"}\n{oops}\n").unwrap();
    let e = err_of(&run(&model(), &d, &t.path().join("o")));
    assert!(e.contains("d.jsonl") && e.contains("malformed json at line 2"), "{e}");
}

#[test]
fn malformed_csv_names_file_and_line() {
    let t = tempfile::tempdir().unwrap();
    let d = t.path().join("d.csv");
    std::fs::write(&d, "question,answer\na,b\n\"unterminated,c\n").unwrap();
    let e = err_of(&run(&model(), &d, &t.path().join("o")));
    assert!(e.contains("d.csv") && e.contains("malformed csv"), "{e}");
}

#[test]
fn missing_fields_everywhere_is_an_error() {
    let t = tempfile::tempdir().unwrap();
    let d = t.path().join("d.json");
    std::fs::write(&d, r#"[{"q": "a", "answer": "b"}, {"question": "c"}]"#).unwrap();
    let e = err_of(&run(&model(), &d, &t.path().join("o")));
    assert!(e.contains("d.json") && e.contains("no usable rows") && e.contains("missing field \"question\""), "{e}");
}

#[test]
fn empty_file_is_an_error() {
    let t = tempfile::tempdir().unwrap();
    let d = t.path().join("d.jsonl");
    std::fs::write(&d, "").unwrap();
    let e = err_of(&run(&model(), &d, &t.path().join("o")));
    assert!(e.contains("d.jsonl") && e.contains("empty"), "{e}");
}

#[test]
fn missing_tokenizer_is_named() {
    let t = tempfile::tempdir().unwrap();
    let m = t.path().join("model");
    std::fs::create_dir_all(&m).unwrap();
    for f in ["config.json", "model.safetensors", "generation_config.json"] {
        std::fs::copy(model().join(f), m.join(f)).unwrap();
    }
    let e = err_of(&run(&m, &fixtures().join("train/tiny-llama/data.jsonl"), &t.path().join("o")));
    assert!(e.contains("tokenizer.json"), "{e}");
}

#[test]
fn bad_checkpoint_is_named() {
    let t = tempfile::tempdir().unwrap();
    let mut r = run(&model(), &fixtures().join("train/tiny-llama/data.jsonl"), &t.path().join("o"));
    r.resume_from = Some(t.path().join("nowhere"));
    let e = err_of(&r);
    assert!(e.contains("nowhere") && e.contains("state.json"), "{e}");
}

struct StopAfter(u64, u64);
impl TrainObserver for StopAfter {
    fn on_step(&mut self, m: &lorafleet_engine::train::StepMetrics) {
        self.1 = m.step;
    }
    fn should_stop(&self) -> bool {
        self.1 >= self.0
    }
}

#[test]
fn should_stop_cancels() {
    let t = tempfile::tempdir().unwrap();
    let r = run(&model(), &fixtures().join("train/tiny-llama/data.jsonl"), &t.path().join("o"));
    let mut obs = StopAfter(1, 0);
    let e = train(&r, &mut obs).err().unwrap();
    assert!(matches!(e, EngineError::Cancelled), "{e}");
    assert_eq!(obs.1, 1);
}

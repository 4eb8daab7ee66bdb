//! The demo: LoRA on the random demo Llama memorises the bilingual FAQ
//! (examples/faq.json with examples/faq.yaml's settings): at least 90% of the training
//! questions answered exactly under greedy decoding.

use std::path::{Path, PathBuf};

use candle_core::Device;
use lorafleet_engine::demo::RandomLlama;
use lorafleet_engine::generate;
use lorafleet_engine::model::load_model;
use lorafleet_engine::tokenizer::Tokenizer;
use lorafleet_engine::train::{train, NoObserver, TrainRun};
use lorafleet_shared::spec::{JobSpec, SpecContext};

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

#[test]
fn demo_memorises_the_faq() {
    let tmp = tempfile::tempdir().unwrap();
    let model_dir = tmp.path().join("demo-model");
    RandomLlama::demo().write(&model_dir).unwrap();
    let spec = JobSpec::from_yaml(&std::fs::read_to_string(repo().join("examples/faq.yaml")).unwrap(), SpecContext::Local).unwrap();
    let out = tmp.path().join("out");
    let run = TrainRun {
        spec: spec.clone(),
        model_dir: model_dir.clone(),
        train_data: repo().join("examples/faq.json"),
        eval_data: None,
        init_adapter: None,
        output_dir: out.clone(),
        work_dir: tmp.path().join("work"),
        resume_from: None,
        devices: vec![Device::Cpu],
    };
    let t0 = std::time::Instant::now();
    let summary = train(&run, &mut NoObserver).unwrap();
    eprintln!("trained {} steps in {:.1}s, final loss {:.4}", summary.steps, t0.elapsed().as_secs_f64(), summary.final_loss);

    // the trained adapter, loaded the way `lorafleet generate --adapter` does
    let opts = lorafleet_engine::train::load_options(&spec, Some(&out), &Device::Cpu);
    let model = load_model(&model_dir, &opts).unwrap();
    let tok = Tokenizer::from_model_dir(&model_dir, Some(0), Some(0)).unwrap();
    let rows: Vec<serde_json::Value> = serde_json::from_slice(&std::fs::read(repo().join("examples/faq.json")).unwrap()).unwrap();
    assert!(rows.len() >= 24);
    let mut exact = 0;
    for r in &rows {
        let (q, a) = (r["question"].as_str().unwrap(), r["answer"].as_str().unwrap());
        let got = generate::answer(model.as_ref(), &tok, &lorafleet_engine::data::PromptFormat::of(&spec.data), q, 96, &Device::Cpu).unwrap();
        if got == a.trim() {
            exact += 1;
        } else {
            eprintln!("miss: {q}\n  want {a}\n  got  {got}");
        }
    }
    let frac = exact as f64 / rows.len() as f64;
    eprintln!("exact answers: {exact}/{} ({:.0}%)", rows.len(), frac * 100.0);
    assert!(frac >= 0.9, "only {exact}/{} answers memorised", rows.len());
}

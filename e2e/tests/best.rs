//! Answer-quality evaluation through the service: a job with eval data, generated eval
//! answers, `save_best` and `early_stopping`, submitted and watched with the CLI on a real
//! coordinator and worker. It succeeds before max_steps with the reason in its log,
//! `watch` shows the answer metrics and the best so far, and the adapter `lorafleet
//! fetch` returns is the best evaluation's (the attempt's `best/`), not the last one.

use lorafleet_e2e::*;
use lorafleet_proto as pb;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn save_best_job_succeeds_early_and_its_adapter_is_the_best() {
    let _g = serial().await;
    let c = Cluster::start(1).await;
    let data = workspace_root().join("examples/faq.json").display().to_string();
    // eval_loss with mode max: an early evaluation is the best, since the eval loss falls
    // while the model trains on the eval data; two evaluations without improvement stop it.
    let yaml = faq_spec("best-e2e", 40, 4, "out/best")
        .replace("shuffle: true }", &format!("shuffle: true, eval: {data:?} }}"))
        .replace(
            "seed: 7 }",
            "seed: 7, eval_every: 2, eval_generate_samples: 2, eval_generate_max_new_tokens: 4, save_best: { metric: eval_loss, mode: max }, early_stopping: { patience: 2 } }",
        );
    assert!(yaml.contains("early_stopping") && yaml.contains("eval: "), "{yaml}");
    let job = c.submit(&c.spec("best", &yaml));
    let watched = ok(&c.cli(&["watch", &job]));
    assert!(watched.contains("succeeded"), "{watched}");
    assert!(watched.contains("exact match") && watched.contains("ROUGE-L") && watched.contains("best eval_loss"), "{watched}");
    let done = c.job(&job).await;
    assert_eq!(state(&done), pb::JobState::Succeeded, "{done:?}");
    assert!(done.step < 40, "stopped at step {}", done.step);
    let logs = ok(&c.cli(&["logs", &job]));
    let want = format!("early stopping at step {}: eval_loss did not improve by more than 0 in 2 evaluations; best ", done.step);
    assert!(logs.contains(&want), "{logs}");
    assert!(logs.contains("the adapter is the best evaluation's: eval_loss"), "{logs}");

    let fetched = fetch(&c, &job);
    let adapter = std::fs::read(fetched.join("adapter_model.safetensors")).unwrap();
    assert!(adapter == std::fs::read(fetched.join("best/adapter_model.safetensors")).unwrap(), "the job's adapter is best/'s");
    let best: serde_json::Value = serde_json::from_slice(&std::fs::read(fetched.join("best/best.json")).unwrap()).unwrap();
    assert!(best["step"].as_u64().unwrap() < done.step, "{best}");
    let summary: serde_json::Value = serde_json::from_slice(&std::fs::read(fetched.join("train_summary.json")).unwrap()).unwrap();
    assert_eq!(summary["stopped_early"], true);
    assert_eq!(summary["adapter_step"], best["step"]);
}

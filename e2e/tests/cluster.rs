//! End-to-end scenarios: real `lorafleet-coordinator` and `lorafleet-worker` processes
//! and the `lorafleet` CLI on loopback, SeaweedFS for storage, SQLite on disk.
//! Run with `scripts/test.sh -p lorafleet-e2e` (or `cargo test -p lorafleet-e2e`, which
//! starts its own SeaweedFS per test).

use lorafleet_e2e::*;
use lorafleet_proto as pb;
use lorafleet_storage::{layout, Storage};
use std::collections::HashMap;
use std::time::{Duration, Instant};

/// `lorafleet train` of the same spec, locally; returns the output directory.
fn local_train(c: &Cluster, name: &str, steps: u64, ckpt: u64) -> std::path::PathBuf {
    let out = c.dir.path().join(format!("local-{name}"));
    let spec = c.spec(&format!("local-{name}"), &faq_spec(name, steps, ckpt, out.to_str().unwrap()));
    ok(&c.cli(&["train", spec.to_str().unwrap()]));
    out
}

fn storage(c: &Cluster) -> Storage {
    Storage::open_with(&c.storage_url, &c.s3.options()).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn faq_job_on_two_workers_matches_local_train() {
    let _g = serial().await;
    let c = Cluster::start(2).await;
    let spec = c.spec("faq", &faq_spec("faq-e2e", 12, 4, "out/faq"));
    let job = c.submit(&spec);
    let watched = ok(&c.cli(&["watch", &job]));
    assert!(watched.contains("succeeded"), "{watched}");
    let status: serde_json::Value = serde_json::from_str(&ok(&c.cli(&["status", &job, "--json"]))).unwrap();
    for k in ["id", "state", "attempt", "step", "worker", "error"] {
        assert!(status.get(k).is_some(), "status --json lacks {k}: {status}");
    }
    assert_eq!(status["state"], "succeeded");
    assert_eq!(status["step"], 12);
    let workers: serde_json::Value = serde_json::from_str(&ok(&c.cli(&["workers", "--json"]))).unwrap();
    assert_eq!(workers.as_array().unwrap().len(), 2, "{workers}");
    let cps = ok(&c.cli(&["checkpoints", &job]));
    assert!(cps.contains("step-4/manifest.json") && cps.contains("step-8/manifest.json"), "{cps}");

    let fetched = fetch(&c, &job);
    let local = local_train(&c, "faq-e2e", 12, 4);
    assert_same_weights(&fetched.join("adapter_model.safetensors"), &local.join("adapter_model.safetensors"), 1e-6);
    assert!(fetched.join("adapter_config.json").is_file());
    // Nothing but verified files in the destination.
    assert!(std::fs::read_dir(&fetched).unwrap().all(|e| !e.unwrap().file_name().to_string_lossy().contains(".partial")));
}

/// The same run with `az://` storage (Azurite): checkpoints and the adapter go through
/// Azure Blob Storage, the coordinator's create-only self-check passes there, and the
/// fetched adapter equals a local `lorafleet train`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn faq_job_on_azure_storage_matches_local_train() {
    let _g = serial().await;
    let c = Cluster::start_on_azure(1).await;
    assert!(c.storage_url.starts_with("az://"), "{}", c.storage_url);
    let spec = c.spec("faq-az", &faq_spec("faq-az", 8, 4, "out/faq-az"));
    let job = c.submit(&spec);
    let watched = ok(&c.cli(&["watch", &job]));
    assert!(watched.contains("succeeded"), "{watched}");
    let cps = ok(&c.cli(&["checkpoints", &job]));
    assert!(cps.contains("step-4/manifest.json"), "{cps}");
    assert!(c.read_log("coordinator").contains("storage enforces create-only writes"), "{}", c.read_log("coordinator"));
    let fetched = fetch(&c, &job);
    let local = local_train(&c, "faq-az", 8, 4);
    assert_same_weights(&fetched.join("adapter_model.safetensors"), &local.join("adapter_model.safetensors"), 1e-6);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn worker_sigkill_after_first_checkpoint_resumes_elsewhere_with_same_adapter() {
    let _g = serial().await;
    let mut c = Cluster::start(2).await;
    let (steps, every) = (900, 60);
    let job = c.submit(&c.spec("kill", &faq_spec("kill", steps, every, "out/kill")));
    let j = c.wait_job(&job, "first checkpoint", Duration::from_secs(120), |j| !j.latest_checkpoint_key.is_empty()).await;
    assert_eq!(j.epoch, 1);
    let names = worker_names(&c).await;
    let victim = names[&j.worker_id].clone();
    c.kill_worker(&victim);
    let killed_at = Instant::now();
    let j2 = c
        .wait_job(&job, "takeover by the other worker", Duration::from_secs(LEASE_TTL_SECS + 10), |j| j.epoch >= 2 && state(j) == pb::JobState::Running)
        .await;
    assert!(killed_at.elapsed() <= Duration::from_secs(LEASE_TTL_SECS + 10));
    assert_ne!(names.get(&j2.worker_id), Some(&victim));
    let done = c.wait_job(&job, "success", Duration::from_secs(240), |j| state(j).is_final_pb()).await;
    assert_eq!(state(&done), pb::JobState::Succeeded, "{done:?}");
    assert_eq!(done.attempt, 2);
    let logs = ok(&c.cli(&["logs", &job]));
    assert!(logs.contains(&format!("resuming from jobs/{job}/attempts/1/checkpoints/step-")), "{logs}");
    assert!(done.adapter_manifest_key.starts_with(&format!("jobs/{job}/attempts/{}/adapter/", done.epoch)));

    let fetched = fetch(&c, &job);
    let local = local_train(&c, "kill", steps, every);
    assert_same_weights(&fetched.join("adapter_model.safetensors"), &local.join("adapter_model.safetensors"), 1e-5);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigstopped_worker_is_refused_after_its_lease_expires() {
    let _g = serial().await;
    let mut c = Cluster::start(2).await;
    let job = c.submit(&c.spec("stop", &faq_spec("stop", 900, 60, "out/stop")));
    let j = c.wait_job(&job, "first checkpoint", Duration::from_secs(120), |j| !j.latest_checkpoint_key.is_empty()).await;
    let names = worker_names(&c).await;
    let victim = names[&j.worker_id].clone();
    let pid = c.workers[&victim].id();
    c.signal(pid, "STOP");
    let before: Vec<u64> = list_checkpoints(&c, &job).await.iter().filter(|k| k.epoch == 1).map(|k| k.step).collect();
    c.wait_job(&job, "re-dispatch after lease expiry", Duration::from_secs(LEASE_TTL_SECS + 15), |j| j.epoch >= 2 && state(j) == pb::JobState::Running).await;
    // Let the other worker commit something of its own, then wake the stale one.
    c.wait_job(&job, "a checkpoint of the new attempt", Duration::from_secs(60), |j| j.latest_checkpoint_key.contains("/attempts/2/")).await;
    c.signal(pid, "CONT");
    let t = Instant::now();
    loop {
        let log = c.read_log(&victim);
        if log.contains("abandon") {
            break;
        }
        assert!(t.elapsed() < Duration::from_secs(10), "stale worker did not stop; log:\n{}", tail(&log, 30));
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let done = c.wait_job(&job, "success", Duration::from_secs(240), |j| state(j).is_final_pb()).await;
    assert_eq!(state(&done), pb::JobState::Succeeded, "{done:?}");
    // The stale attempt got nothing committed after it was stopped, and every committed
    // manifest lies under a live attempt's prefix.
    let after: Vec<u64> = list_checkpoints(&c, &job).await.iter().filter(|k| k.epoch == 1).map(|k| k.step).collect();
    assert_eq!(before, after, "epoch-1 checkpoints committed after SIGSTOP");
    assert!(done.epoch >= 2);
    assert!(done.adapter_manifest_key.starts_with(&format!("jobs/{job}/attempts/{}/", done.epoch)), "{}", done.adapter_manifest_key);
    let s = storage(&c);
    let m = s.read_manifest(&layout::manifest_dir(&done.adapter_manifest_key).unwrap()).await.unwrap().unwrap();
    assert!(m.files.iter().any(|f| f.name == "adapter_model.safetensors"));
    // The stopped worker is still alive and asks for work again.
    let mut w = c.workers.remove(&victim).unwrap();
    assert!(w.try_wait().unwrap().is_none(), "the stale worker crashed");
    let _ = w.kill();
    let _ = w.wait();
}

async fn list_checkpoints(c: &Cluster, job: &str) -> Vec<pb::Checkpoint> {
    c.client().await.unwrap().list_checkpoints(pb::ListCheckpointsRequest { job_id: job.into() }).await.unwrap().into_inner().checkpoints
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn coordinator_restart_keeps_jobs_and_leases() {
    let _g = serial().await;
    let mut c = Cluster::start(2).await;
    let jobs: Vec<String> = (0..3).map(|i| c.submit(&c.spec(&format!("r{i}"), &faq_spec(&format!("r{i}"), 400, 50, &format!("out/r{i}"))))).collect();
    // Two run (one per worker), one waits.
    let t = Instant::now();
    let states = loop {
        let mut st = Vec::new();
        for j in &jobs {
            st.push(c.job(j).await);
        }
        if st.iter().filter(|j| state(j) == pb::JobState::Running).count() == 2 {
            break st;
        }
        assert!(t.elapsed() < Duration::from_secs(60), "two jobs never ran at once: {st:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    c.kill_coordinator();
    tokio::time::sleep(Duration::from_millis(500)).await;
    c.start_coordinator().await;
    // Every job comes back in the state it had (a running job may have finished meanwhile only if it was running).
    for before in &states {
        let now = c.job(&before.job_id).await;
        match state(before) {
            pb::JobState::Queued => assert!(matches!(state(&now), pb::JobState::Queued | pb::JobState::Running), "{now:?}"),
            pb::JobState::Running => assert!(matches!(state(&now), pb::JobState::Running | pb::JobState::Succeeded | pb::JobState::Queued), "{now:?}"),
            s => panic!("unexpected state {s:?}"),
        }
        assert!(now.epoch >= before.epoch);
    }
    // Until all finish: never one job in two workers' running lists.
    let t = Instant::now();
    loop {
        let ws = c.client().await.unwrap().list_workers(pb::ListWorkersRequest { include_dead: false }).await.unwrap().into_inner().workers;
        let mut seen = HashMap::new();
        for w in &ws {
            for j in &w.running_job_ids {
                assert!(seen.insert(j.clone(), w.worker_id.clone()).is_none(), "job {j} leased to two workers: {ws:?}");
            }
        }
        let mut all_done = true;
        for j in &jobs {
            let s = state(&c.job(j).await);
            assert_ne!(s, pb::JobState::Failed);
            all_done &= s == pb::JobState::Succeeded;
        }
        if all_done {
            break;
        }
        assert!(t.elapsed() < Duration::from_secs(240), "jobs did not finish after the restart");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(worker_names(&c).await.values().any(|n| n == "w0"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_stops_the_worker_within_a_heartbeat() {
    let _g = serial().await;
    let c = Cluster::start(1).await;
    let job = c.submit(&c.spec("cancel", &faq_spec("cancel", 5000, 0, "out/cancel")));
    c.wait_job(&job, "progress", Duration::from_secs(60), |j| state(j) == pb::JobState::Running && j.step > 0).await;
    let t = Instant::now();
    ok(&c.cli(&["cancel", &job]));
    let done = c.wait_job(&job, "cancelled", Duration::from_secs(10), |j| state(j) == pb::JobState::Cancelled).await;
    // One heartbeat is 1 s (lease TTL 3 s); allow for process scheduling.
    assert!(t.elapsed() < Duration::from_millis(2500), "took {:?}", t.elapsed());
    assert!(done.step < 5000);
    // The worker is free again: a new job runs.
    let next = c.submit(&c.spec("after", &faq_spec("after", 4, 0, "out/after")));
    let j = c.wait_job(&next, "next job", Duration::from_secs(60), |j| state(j).is_final_pb()).await;
    assert_eq!(state(&j), pb::JobState::Succeeded);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_is_refused_with_the_field() {
    let _g = serial().await;
    let c = Cluster::start(1).await;
    let good = faq_spec("bad", 4, 0, "out/bad");
    let cases = [
        (good.replace("r: 4,", "r: 0,"), "lora.r"),
        (good.replace("dir: \"out/bad\"", "dir: \"../escape\""), "output.dir"),
        (good.replace("dir: \"out/bad\"", "dir: \"/etc/lorafleet\""), "output.dir"),
        (good.replace("dir: \"out/bad\"", "dir: \"a\\u0000b\""), "output.dir"),
        (good.replace("name: bad", "name: \"../x\""), "name"),
        (good.replace("source: tests/fixtures/hf/models/tiny-llama", "source: ../../etc"), "model.source"),
        (good.replace("source: tests/fixtures/hf/models/tiny-llama", "source: /etc/models"), "model.source"),
        (good.replace("max_steps: 4,", "max_stepz: 4,"), "training"),
    ];
    for (i, (yaml, field)) in cases.iter().enumerate() {
        assert_ne!(yaml, &good, "case {i} did not change the spec");
        let p = c.spec(&format!("bad{i}"), yaml);
        let out = c.cli(&["submit", p.to_str().unwrap()]);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "case {i} ({field}) was accepted");
        assert!(err.contains(field), "case {i}: error does not name {field}: {err}");
        assert_eq!(err.trim().lines().filter(|l| l.starts_with("error:")).count(), 1, "one error line: {err}");
    }
    // A dataset ref this tenant never uploaded: refused at submit, naming the field.
    let missing = format!("dataset://sha256/{}", "0".repeat(64));
    let data = workspace_root().join("examples/faq.json").display().to_string();
    let yaml = good.replace(&format!("{data:?}"), &format!("{missing:?}"));
    assert_ne!(yaml, good);
    let spec = c.spec("missing", &yaml);
    let out = c.cli(&["submit", spec.to_str().unwrap()]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("data.train") && err.contains("not uploaded by this tenant"), "{err}");
    // An admin (no tenant scope) may submit it: the job fails, non-retryable, with the reason.
    let admin = c.tokens.as_ref().expect("tokens").admin.clone();
    let out = c.cli_as(&admin, &["submit", spec.to_str().unwrap(), "--json"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    let job = v["id"].as_str().expect("id").to_string();
    let j = c.wait_job(&job, "failure", Duration::from_secs(60), |j| state(j).is_final_pb()).await;
    assert_eq!(state(&j), pb::JobState::Failed, "{j:?}");
    assert_eq!(j.failure_class, pb::FailureClass::NonRetryable as i32);
    assert!(j.error.contains("not found") && j.error.contains(&missing), "{}", j.error);
    assert_eq!(j.attempt, 1, "a non-retryable failure is not retried");
}

/// One place for storage: the cluster's workers run without --storage (they take the
/// coordinator's); a worker pointed at another store refuses to register and says
/// where both are.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_on_another_storage_is_refused_at_registration() {
    let _g = serial().await;
    let c = Cluster::start(1).await;
    let other = format!("file://{}/elsewhere", c.dir.path().display());
    let out = std::process::Command::new(bin("lorafleet-worker"))
        .args(["--coordinator", &c.endpoint(), "--name", "stray", "--storage", &other])
        .args(c.worker_tls_args())
        .envs(c.tokens.as_ref().map(|t| ("LORAFLEET_TOKEN", t.worker.clone())))
        .arg("--cache")
        .arg(c.dir.path().join("cache-stray"))
        .envs(c.storage_env())
        .output()
        .expect("run lorafleet-worker");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(stderr.contains(&other) && stderr.contains(&c.storage_url), "the message names both stores: {stderr}");
    let t = Instant::now();
    let names = loop {
        let names: Vec<String> = worker_names(&c).await.into_values().collect();
        if names.contains(&"w0".to_string()) || t.elapsed() > Duration::from_secs(20) {
            break names;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(names, vec!["w0".to_string()], "the stray worker never registered");
    assert!(c.read_log("w0").contains("storage is the coordinator's"), "{}", c.read_log("w0"));
}

/// TLS and tokens on the API: the whole cluster above runs with them (workers with
/// client certificates and a worker token, the CLI with a user token); here the
/// refusals. A worker without a client certificate is refused (mutual TLS for the worker
/// service), a user's client needs none, plain text does not reach the coordinator, and
/// each role reaches only its service.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_and_tokens_refuse_what_they_should() {
    let _g = serial().await;
    let c = Cluster::start(0).await;
    let pki = c.pki.clone().expect("the cluster runs TLS");
    // A worker that trusts the CA but presents no certificate: refused, and says why.
    let out = std::process::Command::new(bin("lorafleet-worker"))
        .args(["--coordinator", &c.endpoint(), "--name", "nocert", "--ca"])
        .arg(&pki.ca)
        .arg("--cache")
        .arg(c.dir.path().join("cache-nocert"))
        .envs(c.storage_env())
        .output()
        .expect("run lorafleet-worker");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(stderr.contains("client certificate"), "{stderr}");
    // A user's CLI with the CA only works.
    let w = ok(&c.cli(&["workers", "--json"]));
    assert_eq!(w.trim(), "[]");
    // Plain text does not reach it.
    let plain = c.endpoint().replace("https://", "http://");
    let out = std::process::Command::new(bin("lorafleet")).args(["workers", "--coordinator", &plain]).output().expect("run lorafleet");
    assert!(!out.status.success(), "{}", String::from_utf8_lossy(&out.stdout));
    // Without the CA the coordinator's certificate is not trusted.
    let out = std::process::Command::new(bin("lorafleet")).args(["workers", "--coordinator", &c.endpoint()]).env_remove("LORAFLEET_CA").output().expect("run lorafleet");
    assert!(!out.status.success());
    // Tokens and roles (the real binaries): a worker's token cannot submit, a user's
    // token cannot run a worker, no token gets nothing.
    let tokens = c.tokens.clone().expect("the cluster runs with --auth");
    let spec = c.spec("denied", &faq_spec("denied", 2, 0, "out/denied"));
    let out = std::process::Command::new(bin("lorafleet"))
        .args(["submit", spec.to_str().unwrap(), "--coordinator", &c.endpoint()])
        .env("LORAFLEET_CA", &pki.ca)
        .env("LORAFLEET_TOKEN", &tokens.worker)
        .current_dir(workspace_root())
        .output()
        .expect("run lorafleet");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && stderr.to_lowercase().contains("permission denied") && stderr.contains("e2e-workers"), "{stderr}");
    assert!(!stderr.contains(&tokens.worker), "the token is never echoed: {stderr}");
    let out = std::process::Command::new(bin("lorafleet")).args(["jobs", "--coordinator", &c.endpoint()]).env("LORAFLEET_CA", &pki.ca).env_remove("LORAFLEET_TOKEN").output().expect("run lorafleet");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && stderr.contains("missing token"), "{stderr}");
    let out = std::process::Command::new(bin("lorafleet-worker"))
        .args(["--coordinator", &c.endpoint(), "--name", "user-as-worker"])
        .args(c.worker_tls_args())
        .arg("--cache")
        .arg(c.dir.path().join("cache-user"))
        .env("LORAFLEET_TOKEN", &tokens.user)
        .envs(c.storage_env())
        .output()
        .expect("run lorafleet-worker");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && stderr.contains("may not call the WorkerService"), "{stderr}");
    // An admin token reaches both.
    let out = std::process::Command::new(bin("lorafleet")).args(["workers", "--coordinator", &c.endpoint()]).env("LORAFLEET_CA", &pki.ca).env("LORAFLEET_TOKEN", &tokens.admin).output().expect("run lorafleet");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(!c.read_log("coordinator").contains(&tokens.user) && !c.read_log("coordinator").contains(&tokens.worker), "tokens never reach the log");
    // The audit log (`lorafleet audit`, admins only) has each refusal, by token id.
    let out = c.cli(&["audit"]);
    assert!(!out.status.success() && String::from_utf8_lossy(&out.stderr).contains("permission denied"));
    let audit = ok(&c.cli_as(&tokens.admin, &["audit", "--json", "--limit", "1000"]));
    let events: Vec<serde_json::Value> = audit.lines().map(|l| serde_json::from_str(l).expect("one JSON object per line")).collect();
    let has = |method: &str, token: &str, outcome: &str| events.iter().any(|e| e["method"] == method && e["token_id"] == token && e["outcome"] == outcome);
    // (the CLI uploads the dataset first: that is the call refused)
    assert!(has("lorafleet.v1.JobService/UploadDataset", "e2e-workers", "PERMISSION_DENIED"), "{audit}");
    assert!(has("lorafleet.v1.WorkerService/GetStorage", "e2e-user", "PERMISSION_DENIED"), "{audit}");
    assert!(has("lorafleet.v1.JobService/ListJobs", "?", "UNAUTHENTICATED"), "{audit}");
    assert!(has("lorafleet.v1.AdminService/ListAuditEvents", "e2e-user", "PERMISSION_DENIED"), "{audit}");
    let file = std::fs::read_to_string(c.dir.path().join("audit.jsonl")).expect("--audit-log file");
    assert!(file.lines().count() >= events.len() && !file.contains(&tokens.user) && !file.contains(&tokens.admin));

    // A worker whose certificate another CA signed never gets in.
    let mut rogue = std::process::Command::new(bin("lorafleet-worker"))
        .args(["--coordinator", &c.endpoint(), "--name", "rogue", "--ca"])
        .arg(&pki.ca)
        .arg("--tls-cert")
        .arg(&pki.rogue_cert)
        .arg("--tls-key")
        .arg(&pki.rogue_key)
        .arg("--cache")
        .arg(c.dir.path().join("cache-rogue"))
        .envs(c.storage_env())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("spawn lorafleet-worker");
    tokio::time::sleep(Duration::from_secs(3)).await;
    let _ = rogue.kill();
    let _ = rogue.wait();
    assert!(worker_names(&c).await.is_empty(), "nobody registered");
}

//! Gangs end to end: one job spanning several `lorafleet-worker` processes as
//! data-parallel ranks (a TCP ring between them, rendezvous through the coordinator),
//! on loopback with SeaweedFS, against a real coordinator, with NF4, LoRA dropout,
//! gradient accumulation and checkpointing on: the same adapter, bit for bit, as a local
//! `lorafleet train` of the spec (one device, or four ranks in one process), a killed
//! or stopped rank, a gang waiting for workers, and `lorafleet dev --workers 2`.

use lorafleet_e2e::*;
use lorafleet_proto as pb;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// `lorafleet train` of the gang spec on one device; returns the output directory.
fn local_train(c: &Cluster, name: &str, yaml_of: impl Fn(&str) -> String) -> PathBuf {
    local_train_on(c, name, "cpu", yaml_of)
}

/// The same on `devices` (`cpu:0,1,2,3`: one process, four ranks).
fn local_train_on(c: &Cluster, name: &str, devices: &str, yaml_of: impl Fn(&str) -> String) -> PathBuf {
    let out = c.dir.path().join(format!("local-{name}"));
    let spec = c.spec(&format!("local-{name}"), &yaml_of(out.to_str().unwrap()));
    ok(&c.cli(&["train", "--devices", devices, spec.to_str().unwrap()]));
    out
}

fn ranks(j: &pb::Job) -> Vec<(u32, u32)> {
    j.ranks.iter().map(|r| (r.rank, r.node_rank)).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_two_node_gang_trains_the_adapter_of_a_local_run() {
    let _g = serial().await;
    let mut c = Cluster::start(2).await;
    let spec = |out: &str| gang_spec("gang2", 12, 4, out, 2, 1, 2);
    let job = c.submit(&c.spec("gang2", &spec("out/gang2")));
    let watched = ok(&c.cli(&["watch", &job]));
    assert!(watched.contains("succeeded"), "{watched}");
    // The last rank reports arrive with (or just after) node 0's completion.
    let done = c.wait_job(&job, "every rank's last step", Duration::from_secs(10), |j| j.ranks.len() == 2 && j.ranks.iter().all(|r| r.step == 12)).await;
    assert_eq!(done.step, 12);
    assert_eq!(ranks(&done), vec![(0, 0), (1, 1)], "{:?}", done.ranks);
    assert!(done.ranks.iter().all(|r| r.step == 12 && r.tokens_per_sec > 0.0), "{:?}", done.ranks);
    let status = ok(&c.cli(&["status", &job]));
    assert!(status.contains("rank") || status.contains("RANK"), "status shows the ranks:\n{status}");
    let cps = ok(&c.cli(&["checkpoints", &job]));
    assert!(cps.contains("step-4/manifest.json") && cps.contains("step-8/manifest.json"), "{cps}");
    let logs = ok(&c.cli(&["logs", &job]));
    assert!(logs.contains("[node 1] gang: node 1 of 2"), "{logs}");
    let fetched = fetch(&c, &job);
    let local = local_train(&c, "gang2", spec);
    assert_same_weights(&fetched.join("adapter_model.safetensors"), &local.join("adapter_model.safetensors"), 0.0);

    // Two workers of two CPU slots each (4 ranks) train what one process of four ranks
    // does (`lorafleet train --devices cpu:0,1,2,3`).
    c.kill_worker("w0");
    c.kill_worker("w1");
    c.start_worker_with("w2", &["--devices", "cpu:0,1"]);
    c.start_worker_with("w3", &["--devices", "cpu:0,1"]);
    let spec4 = |out: &str| gang_spec("gang2x2", 8, 0, out, 2, 2, 4);
    let job4 = c.submit(&c.spec("gang2x2", &spec4("out/gang2x2")));
    let j = c.wait_job(&job4, "success", Duration::from_secs(240), |j| state(j).is_final_pb()).await;
    assert_eq!(state(&j), pb::JobState::Succeeded, "{j:?}");
    let j = c.wait_job(&job4, "every rank's last step", Duration::from_secs(10), |j| j.ranks.len() == 4 && j.ranks.iter().all(|r| r.step == 8)).await;
    assert_eq!(ranks(&j), vec![(0, 0), (1, 0), (2, 1), (3, 1)], "{:?}", j.ranks);
    let workers: serde_json::Value = serde_json::from_str(&ok(&c.cli(&["workers", "--json"]))).unwrap();
    assert!(workers.to_string().contains("gang_seats"), "{workers}");
    let one_worker = |out: &str| gang_spec("gang2x2", 8, 0, out, 1, 4, 4);
    let local4 = local_train_on(&c, "gang1x4", "cpu:0,1,2,3", one_worker);
    assert_same_weights(&fetch(&c, &job4).join("adapter_model.safetensors"), &local4.join("adapter_model.safetensors"), 0.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_rank_stops_the_gang_which_resumes_from_its_checkpoint() {
    let _g = serial().await;
    let mut c = Cluster::start(3).await;
    let (steps, every) = (600, 40);
    let spec = |out: &str| gang_spec("gkill", steps, every, out, 2, 1, 2);
    let job = c.submit(&c.spec("gkill", &spec("out/gkill")));
    let j = c.wait_job(&job, "first checkpoint", Duration::from_secs(180), |j| !j.latest_checkpoint_key.is_empty()).await;
    assert_eq!(j.epoch, 1);
    let j = c.wait_job(&job, "both ranks reporting", Duration::from_secs(30), |j| j.ranks.len() == 2).await;
    let names = worker_names(&c).await;
    let member = j.ranks.iter().find(|r| r.node_rank == 1).unwrap().worker_id.clone();
    let victim = names[&member].clone();
    c.kill_worker(&victim);
    let killed = Instant::now();
    // Node 0's collective fails at once (the dead rank's sockets close): the attempt ends
    // well before the lease TTL, and the gang is assembled again on the two live workers.
    let j2 = c
        .wait_job(&job, "the gang's next attempt", Duration::from_secs(LEASE_TTL_SECS + 10), |j| j.epoch >= 2 && state(j) == pb::JobState::Running)
        .await;
    eprintln!("next attempt running {:?} after the kill", killed.elapsed());
    let log = c.read_log("coordinator");
    assert!(log.contains("collective"), "node 0 reported the broken ring:\n{}", tail(&log, 40));
    assert_ne!(names.get(&j2.worker_id), Some(&victim));
    let done = c.wait_job(&job, "success", Duration::from_secs(300), |j| state(j).is_final_pb()).await;
    assert_eq!(state(&done), pb::JobState::Succeeded, "{done:?}");
    let logs = ok(&c.cli(&["logs", &job]));
    assert!(logs.contains(&format!("resuming from jobs/{job}/attempts/1/checkpoints/step-")), "{logs}");
    let local = local_train(&c, "gkill", spec);
    assert_same_weights(&fetch(&c, &job).join("adapter_model.safetensors"), &local.join("adapter_model.safetensors"), 0.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopped_leader_is_fenced_and_commits_nothing() {
    let _g = serial().await;
    let c = Cluster::start(3).await;
    let spec = |out: &str| gang_spec("gstop", 600, 40, out, 2, 1, 2);
    let job = c.submit(&c.spec("gstop", &spec("out/gstop")));
    let j = c.wait_job(&job, "first checkpoint", Duration::from_secs(180), |j| !j.latest_checkpoint_key.is_empty()).await;
    let names = worker_names(&c).await;
    let leader = names[&j.worker_id].clone();
    let pid = c.workers[&leader].id();
    c.signal(pid, "STOP");
    let before: Vec<u64> = c.client().await.unwrap().list_checkpoints(pb::ListCheckpointsRequest { job_id: job.clone() }).await.unwrap().into_inner().checkpoints.iter().filter(|k| k.epoch == 1).map(|k| k.step).collect();
    c.wait_job(&job, "the next attempt", Duration::from_secs(LEASE_TTL_SECS + 20), |j| j.epoch >= 2 && state(j) == pb::JobState::Running).await;
    c.wait_job(&job, "a checkpoint of the next attempt", Duration::from_secs(120), |j| j.latest_checkpoint_key.contains("/attempts/2/")).await;
    c.signal(pid, "CONT");
    let t = Instant::now();
    while !c.read_log(&leader).contains("abandon") {
        assert!(t.elapsed() < Duration::from_secs(15), "the stale leader did not stop; log:\n{}", tail(&c.read_log(&leader), 30));
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let done = c.wait_job(&job, "success", Duration::from_secs(300), |j| state(j).is_final_pb()).await;
    assert_eq!(state(&done), pb::JobState::Succeeded, "{done:?}");
    let after: Vec<u64> = c.client().await.unwrap().list_checkpoints(pb::ListCheckpointsRequest { job_id: job.clone() }).await.unwrap().into_inner().checkpoints.iter().filter(|k| k.epoch == 1).map(|k| k.step).collect();
    assert_eq!(before, after, "epoch-1 checkpoints committed after SIGSTOP");
    assert!(done.adapter_manifest_key.starts_with(&format!("jobs/{job}/attempts/{}/", done.epoch)), "{}", done.adapter_manifest_key);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gang_larger_than_the_cluster_waits_visibly_until_a_worker_registers() {
    let _g = serial().await;
    let mut c = Cluster::start(2).await;
    let job = c.submit(&c.spec("g3", &gang_spec("g3", 6, 0, "out/g3", 3, 1, 3)));
    // (Once both workers are up: the reason follows the workers as they register.)
    let j = c.wait_job(&job, "the waiting reason", Duration::from_secs(30), |j| j.waiting_reason.contains("1 more worker")).await;
    assert_eq!(state(&j), pb::JobState::Queued);
    assert!(j.waiting_reason.contains("gang of 3 nodes") && j.waiting_reason.contains("1 more worker"), "{}", j.waiting_reason);
    let status = ok(&c.cli(&["status", &job]));
    assert!(status.contains("waiting") && status.contains("gang of 3 nodes"), "{status}");
    // Meanwhile the two workers are not held: a small job runs.
    let small = c.submit(&c.spec("small", &faq_spec("small", 4, 0, "out/small")));
    let s = c.wait_job(&small, "the small job", Duration::from_secs(120), |j| state(j).is_final_pb()).await;
    assert_eq!(state(&s), pb::JobState::Succeeded);
    assert_eq!(state(&c.job(&job).await), pb::JobState::Queued);
    c.start_worker("w2");
    let done = c.wait_job(&job, "success", Duration::from_secs(240), |j| state(j).is_final_pb()).await;
    assert_eq!(state(&done), pb::JobState::Succeeded, "{done:?}");
    assert!(done.waiting_reason.is_empty(), "{}", done.waiting_reason);
    assert_eq!(ranks(&done).len(), 3);
}

/// What a newcomer tries: `lorafleet dev --workers 2`, then a spec with `nodes: 2`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dev_with_two_workers_runs_a_two_node_spec() {
    let _g = serial().await;
    binaries();
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let log = std::fs::File::create(dir.path().join("dev.log")).unwrap();
    let mut dev = Command::new(bin("lorafleet"))
        .args(["dev", "--workers", "2", "--lease-ttl", "6", "--listen", &format!("127.0.0.1:{port}"), "--dir"])
        .arg(dir.path().join("state"))
        .current_dir(workspace_root())
        .stdin(Stdio::null())
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .unwrap();
    let spec = dir.path().join("gang.yaml");
    std::fs::write(&spec, gang_spec("dev-gang", 6, 3, "out/dev-gang", 2, 1, 2)).unwrap();
    let endpoint = format!("http://127.0.0.1:{port}");
    let t = Instant::now();
    let out = loop {
        let out = Command::new(bin("lorafleet")).args(["submit", spec.to_str().unwrap(), "--watch"]).env("LORAFLEET_COORDINATOR", &endpoint).output().unwrap();
        if out.status.success() || t.elapsed() > Duration::from_secs(30) || !String::from_utf8_lossy(&out.stderr).contains("cannot reach") {
            break out;
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    };
    let _ = dev.kill();
    let _ = dev.wait();
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "{text}\ndev log:\n{}", tail(&std::fs::read_to_string(dir.path().join("dev.log")).unwrap_or_default(), 40));
    assert!(text.contains("succeeded"), "{text}");
}

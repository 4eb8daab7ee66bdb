//! A randomized soak: a coordinator, three workers and the S3 server on loopback, small
//! jobs with checkpoints submitted throughout, and a seeded random schedule of faults,
//! one at a time: worker SIGKILL (restarted), worker SIGSTOP (continued), coordinator
//! SIGKILL (restarted), a worker's link to the coordinator cut, its S3 traffic
//! black-holed, 200 ms ± 100 ms latency on its link. Every worker reaches the coordinator
//! and S3 through its own [`FaultProxy`].
//!
//! At the end, with every fault lifted, it checks the invariants and prints a report:
//! every acknowledged job succeeded, exactly once; checkpoints were committed in epoch
//! order (no older attempt committed after a newer one had); every adapter downloads
//! with a valid manifest (sha256-verified) and equals a fault-free run of the same spec
//! bit for bit; no committed file belongs to an attempt the coordinator never started or
//! to another job's prefix; and the work redone after faults.
//!
//! `LORAFLEET_SOAK_SECS` (default 40), `LORAFLEET_SOAK_SEED` (default 1; the seed
//! reproduces a run's fault schedule), `LORAFLEET_SOAK_REPORT` (also write the report to
//! this file). `scripts/soak.sh` runs it long.

use lorafleet_e2e::faultproxy::{FaultProxy, Mode};
use lorafleet_e2e::*;
use lorafleet_proto as pb;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::{Duration, Instant};

const TTL: u64 = 6;
const WORKERS: usize = 3;
/// About 10 ms a step on the tiny model: a few seconds a job, a checkpoint every 50 steps.
const STEPS: u64 = 300;
const EVERY: u64 = 50;

fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

struct Node {
    name: String,
    coordinator: FaultProxy,
    s3: FaultProxy,
}

fn start_worker(c: &mut Cluster, n: &Node) {
    let via = format!("https://127.0.0.1:{}", n.coordinator.port());
    let s3 = format!("http://127.0.0.1:{}", n.s3.port());
    c.start_worker_via(&n.name, &via, &[("AWS_ENDPOINT_URL", s3.as_str())], &["--storage-retry-secs", "120"]);
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Fault {
    KillWorker,
    StopWorker,
    KillCoordinator,
    Partition,
    S3Outage,
    Latency,
}

const FAULTS: [Fault; 6] = [Fault::KillWorker, Fault::StopWorker, Fault::KillCoordinator, Fault::Partition, Fault::S3Outage, Fault::Latency];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn randomized_faults_lose_nothing() {
    let _g = serial().await;
    let secs = env_u64("LORAFLEET_SOAK_SECS", 40);
    let seed = env_u64("LORAFLEET_SOAK_SEED", 1);
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut c = Cluster::start_with_ttl(0, TTL).await;
    let s3: std::net::SocketAddr = c.s3.endpoint.trim_start_matches("http://").trim_end_matches('/').parse().expect("s3 endpoint is http://ip:port");
    let mut nodes = Vec::new();
    for i in 0..WORKERS {
        let coordinator = FaultProxy::start(([127, 0, 0, 1], c.port).into(), seed * 100 + i as u64).await.expect("proxy");
        let s3 = FaultProxy::start(s3, seed * 100 + 50 + i as u64).await.expect("proxy");
        let n = Node { name: format!("w{i}"), coordinator, s3 };
        start_worker(&mut c, &n);
        nodes.push(n);
    }

    // The fault-free adapter every job must end with (one local run of the same spec).
    let local = c.dir.path().join("local");
    let local_spec = c.dir.path().join("local.yaml");
    std::fs::write(&local_spec, faq_spec("soak", STEPS, EVERY, local.to_str().expect("utf8"))).expect("spec");
    let t = Instant::now();
    ok(&c.cli(&["train", local_spec.to_str().expect("utf8")]));
    let step_secs = t.elapsed().as_secs_f64() / STEPS as f64;
    let reference = local.join("adapter_model.safetensors");

    let mut log: Vec<String> = Vec::new();
    let mut counts: BTreeMap<Fault, u32> = BTreeMap::new();
    let mut jobs: Vec<String> = Vec::new();
    let started = Instant::now();
    let deadline = started + Duration::from_secs(secs);
    let mut next_submit = Instant::now();
    while Instant::now() < deadline {
        // New jobs keep arriving (submissions retried through coordinator restarts).
        while Instant::now() >= next_submit {
            let name = format!("soak-{}", jobs.len());
            let spec = c.spec(&name, &format!("{}max_attempts: 100\n", faq_spec("soak", STEPS, EVERY, &format!("out/{name}"))));
            jobs.push(submit_retrying(&c, &spec).await);
            next_submit += Duration::from_millis(rng.gen_range(1500..3500));
        }
        let f = FAULTS[rng.gen_range(0..FAULTS.len())];
        let i = rng.gen_range(0..WORKERS);
        let hold = Duration::from_millis(rng.gen_range(1000..8000));
        *counts.entry(f).or_default() += 1;
        log.push(format!("{:6.1}s {f:?} w{i} {:.1}s", started.elapsed().as_secs_f64(), hold.as_secs_f64()));
        match f {
            Fault::KillWorker => {
                c.kill_worker(&nodes[i].name);
                tokio::time::sleep(hold.min(Duration::from_secs(3))).await;
                start_worker(&mut c, &nodes[i]);
            }
            Fault::StopWorker => {
                let pid = c.workers[&nodes[i].name].id();
                c.signal(pid, "STOP");
                tokio::time::sleep(hold).await;
                c.signal(pid, "CONT");
            }
            Fault::KillCoordinator => {
                c.kill_coordinator();
                tokio::time::sleep(hold.min(Duration::from_secs(2))).await;
                c.start_coordinator().await;
            }
            Fault::Partition => {
                nodes[i].coordinator.set(Mode::Cut);
                tokio::time::sleep(hold).await;
                nodes[i].coordinator.set(Mode::Pass);
            }
            Fault::S3Outage => {
                nodes[i].s3.set(Mode::BlackHole);
                tokio::time::sleep(hold).await;
                nodes[i].s3.set(Mode::Pass);
            }
            Fault::Latency => {
                nodes[i].coordinator.set(Mode::Delay { base: Duration::from_millis(200), jitter: Duration::from_millis(100) });
                tokio::time::sleep(hold).await;
                nodes[i].coordinator.set(Mode::Pass);
            }
        }
        // A breath between faults.
        tokio::time::sleep(Duration::from_millis(rng.gen_range(500..2000))).await;
    }
    let faults: u32 = counts.values().sum();

    // Every acknowledged job ends, and succeeds.
    let mut report = vec![format!("soak: seed {seed}, {secs} s of faults, {WORKERS} workers, {} jobs of {STEPS} steps", jobs.len())];
    for job in &jobs {
        let j = c.wait_job(job, "a final state", Duration::from_secs(600), |j| matches!(state(j), pb::JobState::Succeeded | pb::JobState::Failed | pb::JobState::Cancelled)).await;
        assert_eq!(state(&j), pb::JobState::Succeeded, "job {job} ended {:?}: {}\nfaults:\n{}", state(&j), j.error, log.join("\n"));
    }
    let store = lorafleet_storage::Storage::open_with(&c.storage_url, &c.s3.options()).expect("storage");
    let (mut redone, mut attempts) = (0u64, 0u64);
    for job in &jobs {
        // The checks make a handful of calls a job: stay under the API's rate limit.
        tokio::time::sleep(Duration::from_millis(150)).await;
        let j = c.wait_job(job, "succeeded", Duration::from_secs(10), |j| state(j) == pb::JobState::Succeeded).await;
        attempts += u64::from(j.attempt);
        // Succeeded exactly once.
        let ev = c.job_events(job, Duration::from_secs(20)).await;
        let succeeded = ev.iter().filter(|e| matches!(&e.event, Some(pb::job_event::Event::StateChange(s)) if s.to == pb::JobState::Succeeded as i32)).count();
        assert_eq!(succeeded, 1, "job {job} succeeded {succeeded} times");
        // Checkpoints committed in epoch order: no older attempt committed after a newer one.
        let client = c.client().await.expect("connect");
        let mut cps = patiently(|| {
            let mut client = client.clone();
            async move { client.list_checkpoints(pb::ListCheckpointsRequest { job_id: job.clone() }).await }
        })
        .await
        .into_inner()
        .checkpoints;
        cps.sort_by_key(|k| (k.created_at_unix_ms, k.epoch));
        // Work redone: when a new attempt starts, the steps the job had reported past the
        // checkpoint it resumes from (the newest committed by then) are trained again (a
        // lower bound: steps trained but never reported are not seen).
        let mut last_step = 0;
        for e in &ev {
            match &e.event {
                Some(pb::job_event::Event::Step(s)) => last_step = last_step.max(s.step),
                Some(pb::job_event::Event::StateChange(s)) if s.to == pb::JobState::Running as i32 && s.attempt > 1 => {
                    let resume = cps.iter().filter(|k| k.created_at_unix_ms <= e.unix_ms).map(|k| k.step).max().unwrap_or(0);
                    redone += last_step.saturating_sub(resume);
                    last_step = resume;
                }
                _ => {}
            }
        }
        assert!(cps.windows(2).all(|w| w[0].epoch <= w[1].epoch), "job {job}: checkpoints committed out of epoch order: {cps:?}");
        assert!(cps.iter().all(|k| k.epoch <= j.epoch), "job {job}: a checkpoint from an epoch the job never reached: {cps:?}");
        // Committed files: only under this job's attempts the coordinator started, and
        // its published adapter.
        let seg = lorafleet_storage::Segment::new(job.clone()).expect("segment");
        let files = store.list_under(Some(&lorafleet_storage::layout::job(&seg))).await.expect("list");
        for (key, _) in files.iter().filter(|(k, _)| k.to_string().ends_with("manifest.json")) {
            let parts: Vec<String> = key.segments().iter().map(|s| s.as_str().to_string()).collect();
            // (keys relative to the job's prefix)
            let ok = match parts.iter().map(String::as_str).collect::<Vec<_>>().as_slice() {
                ["adapter", "manifest.json"] => true,
                ["attempts", epoch, ..] => epoch.parse::<u64>().is_ok_and(|e| e >= 1 && e <= j.epoch),
                _ => false,
            };
            assert!(ok, "job {job}: a committed file outside its attempts: {key}");
        }
        // The adapter: a valid manifest (fetch verifies every sha256), bit-equal to the
        // fault-free run's.
        let fetched = fetch(&c, job);
        assert_same_weights(&fetched.join("adapter_model.safetensors"), &reference, 0.0);
    }
    let wasted = redone as f64 * step_secs;
    report.push(format!(
        "faults: {faults} ({})",
        counts.iter().map(|(f, n)| format!("{f:?} {n}")).collect::<Vec<_>>().join(", ")
    ));
    report.push(format!("attempts: {attempts} for {} jobs ({} retried)", jobs.len(), attempts.saturating_sub(jobs.len() as u64)));
    report.push("invariants: every job succeeded exactly once; checkpoints in epoch order; committed files only under the job's own started attempts; every adapter sha256-verified and bit-equal to the fault-free run: all held".into());
    report.push(format!(
        "work redone: at least {redone} of {} steps trained again after faults (~{wasted:.1} s of training at {:.1} ms a step; {:.2} s per fault)",
        jobs.len() as u64 * STEPS,
        step_secs * 1e3,
        if faults > 0 { wasted / f64::from(faults) } else { 0.0 }
    ));
    report.push(format!("fault schedule (seed {seed}):"));
    report.extend(log.iter().map(|l| format!("  {l}")));
    let text = report.join("\n");
    println!("{text}");
    eprintln!("{text}");
    if let Ok(p) = std::env::var("LORAFLEET_SOAK_REPORT") {
        std::fs::write(PathBuf::from(p), text + "\n").expect("write the report");
    }
    drop(nodes);
}

/// Submit, retrying while the coordinator restarts.
async fn submit_retrying(c: &Cluster, spec: &std::path::Path) -> String {
    let t = Instant::now();
    loop {
        // The same key on every try: a submission whose reply was lost is not made twice.
        let key = spec.file_stem().and_then(|s| s.to_str()).expect("utf8 name");
        let out = c.cli(&["submit", spec.to_str().expect("utf8"), "--json", "--idempotency-key", key]);
        if out.status.success() {
            let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("submit --json");
            return v["id"].as_str().expect("id").to_string();
        }
        assert!(t.elapsed() < Duration::from_secs(60), "submit kept failing: {}", String::from_utf8_lossy(&out.stderr));
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

//! Network faults between real processes: a worker reaches the coordinator (or its
//! object storage) through a [`FaultProxy`], and the tests cut, black-hole, strand and
//! slow that link in the middle of a job. Every job trains the same spec, so the
//! adapters are compared with one fault-free local run.
//!
//! The lease TTL is 6 s here (heartbeat every second), so a 2.5 s cut fits inside it.

use lorafleet_e2e::faultproxy::{FaultProxy, Mode};
use lorafleet_e2e::*;
use lorafleet_proto as pb;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

const TTL: u64 = 6;
/// About 10 ms a step on the tiny model: 15 s of training, a checkpoint every 3 s.
const STEPS: u64 = 1500;
const EVERY: u64 = 300;

fn spec(c: &Cluster, name: &str) -> PathBuf {
    c.spec(name, &faq_spec("chaos", STEPS, EVERY, &format!("out/{name}")))
}

/// `lorafleet train` of the same spec without any fault, once per test binary.
fn fault_free_adapter(c: &Cluster) -> &'static Path {
    static DIR: OnceLock<(tempfile::TempDir, PathBuf)> = OnceLock::new();
    &DIR.get_or_init(|| {
        let tmp = tempfile::tempdir().expect("tempdir");
        let out = tmp.path().join("local");
        let p = tmp.path().join("local.yaml");
        std::fs::write(&p, faq_spec("chaos", STEPS, EVERY, out.to_str().expect("utf8"))).expect("spec");
        ok(&c.cli(&["train", p.to_str().expect("utf8")]));
        (tmp, out.join("adapter_model.safetensors"))
    })
    .1
}

fn assert_adapter_is_fault_free(c: &Cluster, job: &str) {
    let fetched = fetch(c, job);
    assert_same_weights(&fetched.join("adapter_model.safetensors"), fault_free_adapter(c), 0.0);
}

async fn coordinator_proxy(c: &Cluster, seed: u64) -> FaultProxy {
    FaultProxy::start(([127, 0, 0, 1], c.port).into(), seed).await.expect("proxy")
}

fn via(p: &FaultProxy) -> String {
    format!("https://127.0.0.1:{}", p.port())
}

/// Every event of a finished job (the stream ends at the final state).
async fn events(c: &Cluster, job: &str) -> Vec<pb::JobEvent> {
    let mut s = c.client().await.expect("connect").watch_job(pb::WatchJobRequest { job_id: job.into(), after_seq: 0 }).await.expect("watch").into_inner();
    let mut out = Vec::new();
    while let Some(e) = tokio::time::timeout(Duration::from_secs(10), s.message()).await.expect("watch stalled").expect("watch") {
        out.push(e);
    }
    out
}

/// Steps reported, sorted and deduplicated, and the states the job entered.
async fn steps_and_states(c: &Cluster, job: &str) -> (Vec<u64>, Vec<pb::JobState>) {
    let (mut steps, mut states) = (Vec::new(), Vec::new());
    for e in events(c, job).await {
        match e.event {
            Some(pb::job_event::Event::Step(s)) => steps.push(s.step),
            Some(pb::job_event::Event::StateChange(s)) => states.push(pb::JobState::try_from(s.to).unwrap_or(pb::JobState::Unspecified)),
            _ => {}
        }
    }
    steps.sort_unstable();
    steps.dedup();
    (steps, states)
}

/// Wait for `needle` in a process's log; returns how long it took.
async fn wait_log(c: &Cluster, name: &str, needle: &str, timeout: Duration) -> Duration {
    let t = Instant::now();
    loop {
        if c.read_log(name).contains(needle) {
            return t.elapsed();
        }
        assert!(t.elapsed() < timeout, "no {needle:?} in {name}'s log after {timeout:?}:\n{}", tail(&c.read_log(name), 40));
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn epoch_checkpoints(c: &Cluster, job: &str, epoch: u64) -> Vec<u64> {
    let cps = c.client().await.unwrap().list_checkpoints(pb::ListCheckpointsRequest { job_id: job.into() }).await.unwrap().into_inner().checkpoints;
    cps.iter().filter(|k| k.epoch == epoch).map(|k| k.step).collect()
}

/// (a) A cut shorter than the lease TTL: the same worker keeps the same attempt and
/// epoch, its checkpoint commits and progress reports are retried, and no step is lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cut_shorter_than_the_lease_keeps_the_attempt_and_every_step() {
    let _g = serial().await;
    let mut c = Cluster::start_with_ttl(0, TTL).await;
    let proxy = coordinator_proxy(&c, 1).await;
    c.start_worker_via("w0", &via(&proxy), &[], &[]);
    let job = c.submit(&spec(&c, "short-cut"));
    c.wait_job(&job, "training", Duration::from_secs(60), |j| state(j) == pb::JobState::Running && j.step >= 50).await;
    proxy.set(Mode::Cut);
    tokio::time::sleep(Duration::from_millis(2500)).await;
    proxy.set(Mode::Pass);
    // The cut was felt (and the job still ran when it ended).
    assert!(c.read_log("w0").contains("heartbeat failed"), "{}", tail(&c.read_log("w0"), 30));
    assert!(state(&c.job(&job).await) == pb::JobState::Running, "the job ended before the cut did; make it longer");
    let done = c.wait_job(&job, "success", Duration::from_secs(120), |j| state(j).is_final_pb()).await;
    assert_eq!(state(&done), pb::JobState::Succeeded, "{done:?}");
    assert_eq!((done.attempt, done.epoch), (1, 1), "a new attempt after a cut shorter than the lease: {done:?}");
    let (steps, states) = steps_and_states(&c, &job).await;
    assert_eq!(steps, (1..=STEPS).collect::<Vec<_>>(), "steps lost");
    assert_eq!(states.iter().filter(|s| **s == pb::JobState::Running).count(), 1, "{states:?}");
    assert_eq!(epoch_checkpoints(&c, &job, 1).await, (1..STEPS / EVERY).map(|i| i * EVERY).collect::<Vec<_>>());
    assert_adapter_is_fault_free(&c, &job);
}

/// (b, c) A partition longer than the lease TTL: the coordinator requeues the job, a
/// second worker resumes from the last checkpoint, and when the link returns the first
/// worker is fenced (ABANDON on its next heartbeat, or its commit refused) and stops
/// within a heartbeat or two. The job succeeds once, with the fault-free adapter.
///
/// `heal`: `Pass` puts the held connections back (a partition that heals); with
/// `strand`, the connections held through the partition stay dead and only new ones
/// pass (the far end vanished), so the worker must notice by itself and reconnect.
async fn partition_past_the_lease(mode: Mode, strand: bool, name: &str) {
    let _g = serial().await;
    let mut c = Cluster::start_with_ttl(0, TTL).await;
    let proxy = coordinator_proxy(&c, 2).await;
    c.start_worker_via("w0", &via(&proxy), &[], &[]);
    let job = c.submit(&spec(&c, name));
    let j = c.wait_job(&job, "first checkpoint", Duration::from_secs(60), |j| !j.latest_checkpoint_key.is_empty()).await;
    assert_eq!(j.epoch, 1);
    let first = j.worker_id.clone();
    c.start_worker("w1");
    proxy.set(mode);
    let parted = Instant::now();
    let j2 = c.wait_job(&job, "takeover", Duration::from_secs(TTL + 15), |j| j.epoch >= 2 && state(j) == pb::JobState::Running).await;
    assert_ne!(j2.worker_id, first, "the partitioned worker got the job back");
    assert!(parted.elapsed() >= Duration::from_secs(TTL - 2), "requeued before the lease could expire: {:?}", parted.elapsed());
    let before = epoch_checkpoints(&c, &job, 1).await;
    assert!(!c.read_log("w0").contains("lease lost"), "fenced before the link returned");
    if strand {
        proxy.strand();
    }
    proxy.set(Mode::Pass);
    // One heartbeat is 1 s; a stranded connection must first be found dead.
    let limit = if strand { Duration::from_secs(12) } else { Duration::from_secs(4) };
    let took = wait_log(&c, "w0", "lease lost; abandoning job", limit).await;
    eprintln!("{name}: the partitioned worker stopped {took:?} after the link returned");
    let done = c.wait_job(&job, "success", Duration::from_secs(120), |j| state(j).is_final_pb()).await;
    assert_eq!(state(&done), pb::JobState::Succeeded, "{done:?}");
    assert_eq!((done.attempt, done.epoch), (2, 2), "{done:?}");
    assert_eq!(epoch_checkpoints(&c, &job, 1).await, before, "the fenced worker committed after the takeover");
    assert!(done.adapter_manifest_key.starts_with(&format!("jobs/{job}/attempts/2/")), "{}", done.adapter_manifest_key);
    let logs = ok(&c.cli(&["logs", &job]));
    assert!(logs.contains(&format!("resuming from jobs/{job}/attempts/1/checkpoints/step-")), "{logs}");
    let (_, states) = steps_and_states(&c, &job).await;
    assert_eq!(states.iter().filter(|s| **s == pb::JobState::Succeeded).count(), 1, "{states:?}");
    assert_adapter_is_fault_free(&c, &job);
    // The fenced worker is alive and takes work again.
    let mut w0 = c.workers.remove("w0").unwrap();
    assert!(w0.try_wait().unwrap().is_none(), "the fenced worker exited");
    let _ = w0.kill();
    let _ = w0.wait();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cut_longer_than_the_lease_hands_over_and_fences_the_first_worker() {
    partition_past_the_lease(Mode::Cut, false, "long-cut").await;
}

/// A black hole gives no error at all: every call must time out by itself.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn black_hole_longer_than_the_lease_hands_over_and_fences_the_first_worker() {
    partition_past_the_lease(Mode::BlackHole, false, "black-hole").await;
}

/// The connections held through the black hole never come back: the worker must find
/// its connection dead and open a new one to hear that it is fenced.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn black_hole_that_strands_the_connection_still_fences_the_first_worker() {
    partition_past_the_lease(Mode::BlackHole, true, "stranded").await;
}

/// (d) 200 ms ± 100 ms on every chunk both ways: no lease expires by mistake, the job
/// finishes in its first attempt.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn latency_on_every_chunk_causes_no_false_lease_expiry() {
    let _g = serial().await;
    let mut c = Cluster::start_with_ttl(0, TTL).await;
    let proxy = coordinator_proxy(&c, 3).await;
    proxy.set(Mode::Delay { base: Duration::from_millis(200), jitter: Duration::from_millis(100) });
    c.start_worker_via("w0", &via(&proxy), &[], &[]);
    let job = c.submit(&spec(&c, "latency"));
    let done = c.wait_job(&job, "success", Duration::from_secs(120), |j| state(j).is_final_pb()).await;
    assert_eq!(state(&done), pb::JobState::Succeeded, "{done:?}");
    assert_eq!((done.attempt, done.epoch), (1, 1), "{done:?}");
    assert!(proxy.bytes_forwarded() > 0);
    assert!(!c.read_log("w0").contains("lease lost"), "{}", tail(&c.read_log("w0"), 30));
    let (steps, _) = steps_and_states(&c, &job).await;
    assert_eq!(steps, (1..=STEPS).collect::<Vec<_>>(), "steps lost");
    assert_adapter_is_fault_free(&c, &job);
}

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
/// Steps reported, sorted and deduplicated, and the states the job entered.
async fn steps_and_states(c: &Cluster, job: &str) -> (Vec<u64>, Vec<pb::JobState>) {
    let (mut steps, mut states) = (Vec::new(), Vec::new());
    for e in c.job_events(job, Duration::from_secs(10)).await {
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

/// A log without its colour codes.
fn strip_ansi(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars();
    while let Some(ch) = chars.next() {
        if ch == '\u{1b}' {
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(ch);
        }
    }
    out
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
    // The coordinator forgot the partitioned worker too: it registered again, once (its
    // heartbeat and its acquire loop were both told so).
    let log = strip_ansi(&c.read_log("w0"));
    assert_eq!(log.matches(" registered worker_id=").count(), 2, "{}", tail(&log, 40));
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

fn storage(c: &Cluster) -> lorafleet_storage::Storage {
    lorafleet_storage::Storage::open_with(&c.storage_url, &c.s3.options()).unwrap()
}

/// A checkpoint corrupted in storage (one byte of a file flipped, same size) is caught
/// by its sha256 when the next attempt downloads it, and that attempt resumes from the
/// previous committed checkpoint instead; the adapter is still the fault-free one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_corrupt_checkpoint_is_caught_and_the_previous_one_is_used() {
    use lorafleet_storage::{layout, RelPath};
    let _g = serial().await;
    let mut c = Cluster::start_with_ttl(1, TTL).await;
    let job = c.submit(&spec(&c, "corrupt"));
    c.wait_job(&job, "two checkpoints", Duration::from_secs(60), |j| j.latest_checkpoint_key.contains(&format!("/step-{}/", 2 * EVERY))).await;
    c.kill_worker("w0");
    let cps = c.client().await.unwrap().list_checkpoints(pb::ListCheckpointsRequest { job_id: job.clone() }).await.unwrap().into_inner().checkpoints;
    let newest = c.job(&job).await.latest_checkpoint_key;
    let pos = cps.iter().position(|k| k.manifest_key == newest).expect("newest is listed");
    assert!(pos >= 1, "{cps:?}");
    let previous = cps[pos - 1].manifest_key.clone();
    let s = storage(&c);
    let dir = layout::manifest_dir(&newest).unwrap();
    let m = s.read_manifest(&dir).await.unwrap().unwrap();
    let f = m.files.iter().max_by_key(|f| f.size).unwrap();
    let key = dir.join(&RelPath::parse(&f.name).unwrap());
    let mut bytes = s.get_bytes(&key).await.unwrap().to_vec();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x40;
    s.put_bytes(&key, bytes.into()).await.unwrap();
    c.start_worker("w1");
    let done = c.wait_job(&job, "success", Duration::from_secs(120), |j| state(j).is_final_pb()).await;
    assert_eq!(state(&done), pb::JobState::Succeeded, "{done:?}");
    assert_eq!(done.attempt, 2);
    let logs = ok(&c.cli(&["logs", &job]));
    assert!(logs.contains(&format!("checkpoint passed over: {newest}: checksum mismatch")), "{logs}");
    assert!(logs.contains(&format!("resuming from {previous}")), "{logs}");
    assert_adapter_is_fault_free(&c, &job);
}

/// The worker's object-storage traffic goes through the proxy, which cuts it for 12 s
/// in the middle of the job: the checkpoint uploads are retried with backoff (training
/// waits, the heartbeats keep the lease) and the job succeeds in its first attempt.
/// Then a black hole past a short `--storage-retry-secs`: the attempt fails retryable
/// with the reason, and the next one resumes from the last committed checkpoint.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn object_store_outage_is_retried_then_fails_the_attempt_past_its_budget() {
    let _g = serial().await;
    let mut c = Cluster::start_with_ttl(0, TTL).await;
    let s3: std::net::SocketAddr = c.s3.endpoint.trim_start_matches("http://").trim_end_matches('/').parse().expect("s3 endpoint is http://ip:port");
    let proxy = FaultProxy::start(s3, 4).await.unwrap();
    let via_s3 = format!("http://127.0.0.1:{}", proxy.port());
    c.start_worker_via("w0", &c.endpoint(), &[("AWS_ENDPOINT_URL", via_s3.as_str())], &["--storage-retry-secs", "60"]);

    // 1. A 12 s cut, shorter than the budget.
    let job = c.submit(&spec(&c, "s3-cut"));
    c.wait_job(&job, "first checkpoint", Duration::from_secs(60), |j| !j.latest_checkpoint_key.is_empty()).await;
    let through = proxy.bytes_forwarded();
    assert!(through > 0, "the worker's storage traffic does not go through the proxy");
    proxy.set(Mode::Cut);
    tokio::time::sleep(Duration::from_secs(12)).await;
    assert_eq!(state(&c.job(&job).await), pb::JobState::Running);
    proxy.set(Mode::Pass);
    let done = c.wait_job(&job, "success", Duration::from_secs(120), |j| state(j).is_final_pb()).await;
    assert_eq!(state(&done), pb::JobState::Succeeded, "{done:?}");
    assert_eq!((done.attempt, done.epoch), (1, 1), "{done:?}");
    let log = c.read_log("w0");
    assert!(log.contains("checkpoint upload failed; retrying"), "{}", tail(&log, 30));
    assert!(log.contains("checkpoint upload went through after retries"), "{}", tail(&log, 30));
    assert_adapter_is_fault_free(&c, &job);

    // 2. Past the budget: a worker that gives up after 3 s.
    c.kill_worker("w0");
    c.start_worker_via("w1", &c.endpoint(), &[("AWS_ENDPOINT_URL", via_s3.as_str())], &["--storage-retry-secs", "3"]);
    let job = c.submit(&spec(&c, "s3-budget"));
    let first = c.wait_job(&job, "first checkpoint", Duration::from_secs(60), |j| !j.latest_checkpoint_key.is_empty()).await;
    proxy.set(Mode::BlackHole);
    let failed_at = Instant::now();
    c.wait_job(&job, "the attempt to fail", Duration::from_secs(30), |j| j.attempt >= 2 || state(j).is_final_pb()).await;
    assert!(failed_at.elapsed() < Duration::from_secs(15), "the budget of 3 s did not bound the upload: {:?}", failed_at.elapsed());
    proxy.set(Mode::Pass);
    let done = c.wait_job(&job, "success", Duration::from_secs(120), |j| state(j).is_final_pb()).await;
    assert_eq!(state(&done), pb::JobState::Succeeded, "{done:?}");
    assert!(done.attempt >= 2);
    let reasons: Vec<String> = c.job_events(&job, Duration::from_secs(10)).await.into_iter().filter_map(|e| match e.event {
        Some(pb::job_event::Event::StateChange(s)) => Some(s.reason),
        _ => None,
    }).collect();
    assert!(reasons.iter().any(|r| r.contains("checkpoint upload: still failing after") && r.contains("--storage-retry-secs 3")), "{reasons:?}");
    let logs = ok(&c.cli(&["logs", &job]));
    assert!(logs.contains(&format!("resuming from {}", first.latest_checkpoint_key)) || logs.contains("resuming from jobs/"), "{logs}");
    assert_adapter_is_fault_free(&c, &job);
}

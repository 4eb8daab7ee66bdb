//! The scaling metrics on `/metrics` (what an autoscaler and a Grafana dashboard read):
//! `lorafleet_queued_jobs{device}`, `lorafleet_oldest_queued_job_age_seconds{device}`,
//! `lorafleet_workers{pool,device}` and `lorafleet_gangs{phase}`, followed through
//! submits, a dispatch, cancels, registrations and a worker's expiry.

mod common;

use common::*;
use lorafleet_proto as pb;
use std::collections::BTreeMap;
use std::time::{Duration, Instant};


/// Every sample of the exposition: (name, labels) -> value.
fn samples(text: &str) -> BTreeMap<(String, BTreeMap<String, String>), f64> {
    let mut out = BTreeMap::new();
    for line in text.lines().filter(|l| l.starts_with("lorafleet_")) {
        let (series, value) = line.rsplit_once(' ').unwrap();
        let (name, labels) = match series.split_once('{') {
            Some((n, rest)) => {
                let labels = rest
                    .trim_end_matches('}')
                    .split(',')
                    .filter(|p| !p.is_empty())
                    .map(|p| {
                        let (k, v) = p.split_once('=').unwrap();
                        (k.to_string(), v.trim_matches('"').to_string())
                    })
                    .collect();
                (n.to_string(), labels)
            }
            None => (series.to_string(), BTreeMap::new()),
        };
        out.insert((name, labels), value.parse::<f64>().unwrap());
    }
    out
}

fn get(m: &BTreeMap<(String, BTreeMap<String, String>), f64>, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    let l = labels.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
    m.get(&(name.to_string(), l)).copied()
}

fn worker(name: &str, devices: Vec<pb::Device>, labels: &[(&str, &str)]) -> pb::RegisterWorkerRequest {
    pb::RegisterWorkerRequest {
        name: name.into(),
        devices,
        labels: labels.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
        version: "test".into(),
        ..Default::default()
    }
}

#[tokio::test]
async fn queue_and_pool_gauges_follow_jobs_and_workers() {
    let dir = tempfile::tempdir().unwrap();
    // A short TTL so that a silent worker expires within the test.
    let control = lorafleet_coordinator::ControlConfig { lease_ttl: Duration::from_secs(2), ..fast_control() };
    let c = Coord::start(dir.path().to_path_buf(), control).await;
    let (mut j, mut w) = (c.jobs().await, c.workers().await);

    // Nothing queued: both device kinds are there, at 0.
    let m = samples(&c.scrape().await);
    for d in ["cpu", "cuda"] {
        assert_eq!(get(&m, "lorafleet_queued_jobs", &[("device", d)]), Some(0.0), "{d}");
        assert_eq!(get(&m, "lorafleet_oldest_queued_job_age_seconds", &[("device", d)]), Some(0.0), "{d}");
    }
    assert_eq!(get(&m, "lorafleet_gangs", &[("phase", "running")]), Some(0.0));

    let first = submit(&mut j, spec("cpu-1")).await;
    let submitted = Instant::now();
    let second = submit(&mut j, spec("cpu-2")).await;
    let gpu = submit(&mut j, gpu_spec("gpu-1", 1, 0)).await;
    let gang = submit(&mut j, spec_with("gang", |s| s.resources = Some(pb::ResourceSpec { device: pb::DeviceKind::Cpu as i32, count: 1, memory_mib: 0, nodes: 2 }))).await;
    let m = samples(&c.scrape().await);
    assert_eq!(get(&m, "lorafleet_queued_jobs", &[("device", "cpu")]), Some(3.0));
    assert_eq!(get(&m, "lorafleet_queued_jobs", &[("device", "cuda")]), Some(1.0));

    // The age is refreshed by the control loop's ticks, not only on changes.
    tokio::time::sleep(Duration::from_millis(1300)).await;
    let m = samples(&c.scrape().await);
    let age = get(&m, "lorafleet_oldest_queued_job_age_seconds", &[("device", "cpu")]).unwrap();
    assert!(age >= 1.2 && age <= submitted.elapsed().as_secs_f64() + 0.5, "cpu age {age}");
    assert!(get(&m, "lorafleet_oldest_queued_job_age_seconds", &[("device", "cuda")]).unwrap() >= 1.0);

    // Workers by pool and device kind: the `pool` label, else "default"; a worker with
    // two device kinds counts under both.
    let cpu_default = w.register_worker(worker("a", cpu(), &[])).await.unwrap().into_inner().worker_id;
    let mut both = gpus(2, 80_000);
    both.push(pb::Device { kind: pb::DeviceKind::Cpu as i32, index: 9, name: "cpu".into(), memory_mib: 0 });
    w.register_worker(worker("b", both, &[("pool", "a100"), ("zone", "x")])).await.unwrap();
    w.register_worker(worker("c", gpus(1, 24_000), &[("pool", "a100")])).await.unwrap();
    let m = samples(&c.scrape().await);
    assert_eq!(get(&m, "lorafleet_workers", &[("device", "cpu"), ("pool", "default")]), Some(1.0));
    assert_eq!(get(&m, "lorafleet_workers", &[("device", "cuda"), ("pool", "a100")]), Some(2.0));
    assert_eq!(get(&m, "lorafleet_workers", &[("device", "cpu"), ("pool", "a100")]), Some(1.0));
    assert_eq!(get(&m, "lorafleet_workers", &[("device", "cuda"), ("pool", "default")]), None);
    assert_eq!(get(&m, "lorafleet_workers_alive", &[]), Some(3.0));

    // A dispatch takes the oldest CPU job out of the queue.
    let lease = acquire(&mut w, &cpu_default, 0).await.unwrap();
    assert_eq!(lease.job_id, first.job_id);
    let m = samples(&c.scrape().await);
    assert_eq!(get(&m, "lorafleet_queued_jobs", &[("device", "cpu")]), Some(2.0));

    // Cancelled jobs leave the queue; with none left the age is 0.
    for id in [&second.job_id, &gang.job_id, &gpu.job_id] {
        j.cancel_job(pb::CancelJobRequest { job_id: id.clone(), reason: "test".into() }).await.unwrap();
    }
    let m = samples(&c.scrape().await);
    for d in ["cpu", "cuda"] {
        assert_eq!(get(&m, "lorafleet_queued_jobs", &[("device", d)]), Some(0.0), "{d}");
        assert_eq!(get(&m, "lorafleet_oldest_queued_job_age_seconds", &[("device", d)]), Some(0.0), "{d}");
    }

    // Keep worker "a" alive; "b" and "c" go silent and expire after the TTL: the a100
    // series disappear.
    let t = Instant::now();
    loop {
        w.heartbeat(pb::HeartbeatRequest { worker_id: cpu_default.clone(), ..Default::default() }).await.unwrap();
        let m = samples(&c.scrape().await);
        if get(&m, "lorafleet_workers", &[("device", "cuda"), ("pool", "a100")]).is_none() {
            assert_eq!(get(&m, "lorafleet_workers", &[("device", "cpu"), ("pool", "a100")]), None);
            assert_eq!(get(&m, "lorafleet_workers", &[("device", "cpu"), ("pool", "default")]), Some(1.0));
            assert_eq!(get(&m, "lorafleet_workers_alive", &[]), Some(1.0));
            break;
        }
        assert!(t.elapsed() < Duration::from_secs(10), "expired workers still counted:\n{}", c.scrape().await);
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    c.stop().await;
}

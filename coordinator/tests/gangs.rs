//! Gang scheduling against a real coordinator (gRPC on loopback, SQLite on disk):
//! randomized worker pools and job mixes never see a partial gang or a device leased
//! twice; the hold/park policy lets small jobs run beside a gang that cannot assemble
//! and still runs the gang once its workers free up; rendezvous is fenced and complete.

mod common;

use common::*;
use lorafleet_proto as pb;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::time::Duration;


/// The members of a dispatched attempt seen so far: node -> (worker, devices).
type Members = BTreeMap<u32, (String, Vec<u32>)>;

fn cpus(n: u32) -> Vec<pb::Device> {
    (0..n).map(|i| pb::Device { kind: pb::DeviceKind::Cpu as i32, index: i, name: format!("cpu:{i}"), memory_mib: 0 }).collect()
}

fn gang(name: &str, nodes: u32, count: u32) -> pb::JobSpec {
    spec_with(name, |s| {
        s.resources = Some(pb::ResourceSpec { device: pb::DeviceKind::Cpu as i32, count, memory_mib: 0, nodes });
        s.training.as_mut().unwrap().grad_accum = nodes * count;
    })
}

fn complete(l: &pb::Lease, worker: &str) -> pb::CompleteAttemptRequest {
    pb::CompleteAttemptRequest {
        job_id: l.job_id.clone(),
        epoch: l.epoch,
        worker_id: worker.into(),
        adapter_manifest_key: format!("{}adapter/manifest.json", l.output_prefix),
        final_loss: None,
    }
}

/// Every running gang has all its members (checked on the coordinator's own view).
async fn assert_no_partial_gang(w: &mut pb::worker_service_client::WorkerServiceClient<tonic::transport::Channel>, j: &mut pb::job_service_client::JobServiceClient<tonic::transport::Channel>) {
    let _ = w;
    let ws = j.list_workers(pb::ListWorkersRequest { include_dead: false }).await.unwrap().into_inner().workers;
    let mut seats: HashMap<String, (u32, HashSet<u32>, HashSet<String>)> = HashMap::new();
    for wk in &ws {
        for s in &wk.gang_seats {
            let e = seats.entry(s.job_id.clone()).or_insert((s.nodes, HashSet::new(), HashSet::new()));
            assert!(e.1.insert(s.node_rank), "node {} of {} held twice", s.node_rank, s.job_id);
            assert!(e.2.insert(wk.worker_id.clone()), "a worker holds two seats of {}", s.job_id);
        }
    }
    for (job, (nodes, ranks, _)) in seats {
        assert_eq!(ranks.len() as u32, nodes, "gang {job} is partial: {ranks:?} of {nodes}");
    }
}

/// A small property test (fixed-seed xorshift): random pools of 2-5 workers with 1-3 CPU
/// slots, random mixes of 1-3 node jobs of 1-2 devices, random acquires, completions and
/// failures. Invariants: never a partial gang, never a device leased twice, every gang
/// lease names distinct workers and node ranks, and every gang dispatched gets all its
/// leases delivered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn random_pools_never_see_a_partial_gang_or_a_double_lease() {
    let mut seed = 0x2545_f491_4f6c_dd1du64;
    let mut rnd = move |n: u64| {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed % n
    };
    let (mut gang_leases, mut completed) = (0, 0);
    for round in 0..4 {
        let dir = tempfile::tempdir().unwrap();
        let c = Coord::start(dir.path().to_path_buf(), fast_control()).await;
        let (mut j, mut w) = (c.jobs().await, c.workers().await);
        let mut workers: Vec<(String, u32)> = Vec::new();
        for _ in 0..2 + rnd(4) {
            let n = 1 + rnd(3) as u32;
            workers.push((register(&mut w, cpus(n)).await, n));
        }
        let max_slots = workers.iter().map(|w| w.1).max().unwrap();
        let mut jobs = 0;
        for k in 0..12 {
            let nodes = 1 + rnd(3) as u32;
            let count = 1 + rnd(max_slots.min(2) as u64) as u32;
            submit(&mut j, gang(&format!("r{round}-{k}"), nodes, count)).await;
            jobs += 1;
        }
        // Live leases: (job, epoch) -> node -> (worker, devices).
        let mut live: HashMap<(String, u64), Members> = HashMap::new();
        let mut nodes_of: HashMap<(String, u64), u32> = HashMap::new();
        let mut finished = 0;
        for _ in 0..400 {
            if finished == jobs {
                break;
            }
            let (wid, _) = workers[rnd(workers.len() as u64) as usize].clone();
            if rnd(3) > 0 {
                if let Some(l) = acquire(&mut w, &wid, 0).await {
                    gang_leases += usize::from(l.gang.is_some());
                    let key = (l.job_id.clone(), l.epoch);
                    let (node, nodes) = l.gang.as_ref().map(|g| (g.node_rank, g.nodes)).unwrap_or((0, 1));
                    // Never a device leased twice.
                    for ((other, _), members) in &live {
                        for (ow, od) in members.values() {
                            if *ow == wid {
                                assert!(od.iter().all(|d| !l.device_indices.contains(d)), "device of {wid} leased to {} and {other}", l.job_id);
                            }
                        }
                    }
                    let e = live.entry(key.clone()).or_default();
                    assert!(e.insert(node, (wid.clone(), l.device_indices.clone())).is_none(), "node {node} leased twice");
                    let ws: HashSet<&String> = e.values().map(|m| &m.0).collect();
                    assert_eq!(ws.len(), e.len(), "a worker holds two nodes of one gang");
                    nodes_of.insert(key, nodes);
                }
            } else if let Some(key) = live.keys().find(|k| live[k].len() as u32 == nodes_of[k]).cloned() {
                // A whole gang is running: end its attempt (node 0 completes, or any
                // member fails it).
                let members = live.remove(&key).unwrap();
                let l = pb::Lease { job_id: key.0.clone(), epoch: key.1, output_prefix: format!("jobs/{}/attempts/{}/", key.0, key.1), ..Default::default() };
                if rnd(4) > 0 {
                    w.complete_attempt(complete(&l, &members[&0].0)).await.unwrap();
                    finished += 1;
                    completed += 1;
                } else {
                    let node = rnd(members.len() as u64) as u32;
                    let r = pb::FailAttemptRequest {
                        job_id: key.0.clone(),
                        epoch: key.1,
                        worker_id: members[&node].0.clone(),
                        failure_class: pb::FailureClass::Retryable as i32,
                        reason: "test".into(),
                    };
                    let st = w.fail_attempt(r).await.unwrap().into_inner().state;
                    if st != pb::JobState::Queued as i32 {
                        finished += 1;
                    }
                    // The other members are told to abandon.
                    for (n, (mw, _)) in &members {
                        if *n == node {
                            continue;
                        }
                        let hb = w.heartbeat(pb::HeartbeatRequest { worker_id: mw.clone(), running: vec![pb::RunningJob { job_id: key.0.clone(), epoch: key.1 }] }).await.unwrap().into_inner();
                        assert_eq!(hb.directives[0].action, pb::JobAction::Abandon as i32);
                    }
                }
            }
            assert_no_partial_gang(&mut w, &mut j).await;
        }
        // Whatever was dispatched is fully delivered once every worker asks again
        // (until a whole pass hands out nothing).
        loop {
            let mut any = false;
            for (wid, _) in &workers {
                while let Some(l) = acquire(&mut w, wid, 0).await {
                    any = true;
                    let (node, nodes) = l.gang.as_ref().map(|g| (g.node_rank, g.nodes)).unwrap_or((0, 1));
                    let key = (l.job_id.clone(), l.epoch);
                    assert!(live.entry(key.clone()).or_default().insert(node, (wid.clone(), l.device_indices.clone())).is_none());
                    nodes_of.insert(key, nodes);
                }
            }
            if !any {
                break;
            }
        }
        for (k, m) in &live {
            assert_eq!(m.len() as u32, nodes_of[k], "{k:?}: only nodes {:?} were delivered", m.keys().collect::<Vec<_>>());
        }
        assert_no_partial_gang(&mut w, &mut j).await;
        c.stop().await;
    }
    // The mix really exercised gangs.
    assert!(gang_leases >= 10 && completed >= 10, "{gang_leases} gang leases, {completed} completions");
}

/// The policy: a gang that cannot assemble holds its free workers only for its hold
/// time, then parks for as long while they run other jobs; once the busy worker is free
/// the gang assembles and runs. Small jobs do not starve it: held workers take nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gang_holds_briefly_lets_small_jobs_run_and_still_runs() {
    let dir = tempfile::tempdir().unwrap();
    let control = lorafleet_coordinator::ControlConfig { gang_hold: Duration::from_millis(2000), ..fast_control() };
    let c = Coord::start(dir.path().to_path_buf(), control).await;
    let (mut j, mut w) = (c.jobs().await, c.workers().await);
    let (a, b) = (register(&mut w, cpu()).await, register(&mut w, cpu()).await);
    let long = submit(&mut j, spec("long")).await;
    let la = acquire(&mut w, &a, 0).await.unwrap();
    assert_eq!(la.job_id, long.job_id);
    let g = submit(&mut j, gang("gang", 2, 1)).await;
    let small = submit(&mut j, spec("small")).await;
    // b is free: it joins the gang's assembly and is held (it does not take `small`).
    assert!(acquire(&mut w, &b, 0).await.is_none());
    let job = get(&mut j, &g.job_id).await;
    assert!(job.waiting_reason.contains("1 worker(s) held, waiting for 1 more"), "{}", job.waiting_reason);
    assert!(acquire(&mut w, &b, 0).await.is_none(), "a held worker takes nothing else");
    tokio::time::sleep(Duration::from_millis(100)).await;
    let m = c.scrape().await;
    assert!(m.contains("lorafleet_gangs{phase=\"assembling\"} 1") && m.contains("lorafleet_gangs{phase=\"running\"} 0"), "{m}");
    // After the hold (2 s), the gang parks (for 2 s) and b runs the small job.
    tokio::time::sleep(Duration::from_millis(2300)).await;
    let lb = acquire(&mut w, &b, 0).await.expect("the held worker is let go");
    assert_eq!(lb.job_id, small.job_id);
    let job = get(&mut j, &g.job_id).await;
    assert!(job.waiting_reason.contains("other jobs run for"), "{}", job.waiting_reason);
    tokio::time::sleep(Duration::from_millis(100)).await;
    let m = c.scrape().await;
    assert!(m.contains("lorafleet_gangs{phase=\"parked\"} 1"), "{m}");
    w.complete_attempt(complete(&lb, &b)).await.unwrap();
    w.complete_attempt(complete(&la, &a)).await.unwrap();
    // Both free: once the park ends, the gang assembles from both and runs.
    let t = std::time::Instant::now();
    let (mut got_a, mut got_b) = (None, None);
    while got_a.is_none() || got_b.is_none() {
        assert!(t.elapsed() < Duration::from_secs(10), "the gang never ran: {:?}", get(&mut j, &g.job_id).await);
        if got_a.is_none() {
            got_a = acquire(&mut w, &a, 0).await;
        }
        if got_b.is_none() {
            got_b = acquire(&mut w, &b, 0).await;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (la, lb) = (got_a.unwrap(), got_b.unwrap());
    assert_eq!((la.job_id.as_str(), lb.job_id.as_str()), (g.job_id.as_str(), g.job_id.as_str()));
    assert_eq!(la.epoch, lb.epoch);
    let mut nodes = [la.gang.as_ref().unwrap().node_rank, lb.gang.as_ref().unwrap().node_rank];
    nodes.sort();
    assert_eq!(nodes, [0, 1]);
    assert!(get(&mut j, &g.job_id).await.waiting_reason.is_empty());
    tokio::time::sleep(Duration::from_millis(100)).await;
    let m = c.scrape().await;
    assert!(m.contains("lorafleet_gangs{phase=\"running\"} 1") && m.contains("lorafleet_gangs{phase=\"assembling\"} 0"), "{m}");

    // Rendezvous: fenced by the epoch, ready only once both members called.
    let leader = if la.gang.as_ref().unwrap().node_rank == 0 { (&la, &a) } else { (&lb, &b) };
    let member = if la.gang.as_ref().unwrap().node_rank == 0 { (&lb, &b) } else { (&la, &a) };
    let rv = |l: &pb::Lease, wid: &str, port: u16| pb::RendezvousRequest {
        job_id: l.job_id.clone(),
        epoch: l.epoch,
        worker_id: wid.into(),
        endpoints: vec![format!("127.0.0.1:{port}")],
        nccl_unique_id: vec![],
    };
    let r0 = w.rendezvous(rv(leader.0, leader.1, 4000)).await.unwrap().into_inner();
    assert!(!r0.ready && r0.endpoints.is_empty());
    let mut stale = rv(member.0, member.1, 4001);
    stale.epoch += 1;
    assert_eq!(w.rendezvous(stale).await.unwrap_err().code(), tonic::Code::FailedPrecondition);
    let mut bad = rv(member.0, member.1, 4001);
    bad.endpoints = vec!["no-port".into()];
    assert_eq!(w.rendezvous(bad).await.unwrap_err().code(), tonic::Code::InvalidArgument);
    let r1 = w.rendezvous(rv(member.0, member.1, 4001)).await.unwrap().into_inner();
    assert!(r1.ready);
    assert_eq!(r1.endpoints, vec!["127.0.0.1:4000".to_string(), "127.0.0.1:4001".to_string()]);
    assert_eq!(r0.group_token, r1.group_token);
    // Only node 0 completes; a member that is not node 0 is refused.
    let err = w.complete_attempt(complete(member.0, member.1)).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::FailedPrecondition);
    // A member's failure ends the gang's attempt for both.
    let f = pb::FailAttemptRequest {
        job_id: member.0.job_id.clone(),
        epoch: member.0.epoch,
        worker_id: member.1.clone(),
        failure_class: pb::FailureClass::Retryable as i32,
        reason: "collective: rank 0 died".into(),
    };
    assert_eq!(w.fail_attempt(f).await.unwrap().into_inner().state, pb::JobState::Queued as i32);
    let hb = w
        .heartbeat(pb::HeartbeatRequest { worker_id: leader.1.clone(), running: vec![pb::RunningJob { job_id: leader.0.job_id.clone(), epoch: leader.0.epoch }] })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(hb.directives[0].action, pb::JobAction::Abandon as i32);
    let job = get(&mut j, &g.job_id).await;
    assert!(job.error.contains("node 1 of the gang"), "{}", job.error);
    c.stop().await;
}

/// A gang that more workers than are registered could fit parks with the reason and
/// runs once enough register; submit refuses a gang with fewer micro-batches than ranks.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gang_waits_for_workers_to_register_and_bad_gangs_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let c = Coord::start(dir.path().to_path_buf(), fast_control()).await;
    let (mut j, mut w) = (c.jobs().await, c.workers().await);
    let bad = spec_with("bad", |s| {
        s.resources = Some(pb::ResourceSpec { device: pb::DeviceKind::Cpu as i32, count: 2, memory_mib: 0, nodes: 2 });
        s.training.as_mut().unwrap().grad_accum = 3;
    });
    let err = j.submit_job(pb::SubmitJobRequest { spec: Some(bad), idempotency_key: String::new() }).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    assert!(err.message().contains("training.grad_accum: 3 micro-batches per step cannot be shared by 4 data-parallel ranks"), "{}", err.message());

    let a = register(&mut w, cpu()).await;
    let g = submit(&mut j, gang("g", 2, 1)).await;
    assert!(acquire(&mut w, &a, 0).await.is_none());
    let job = get(&mut j, &g.job_id).await;
    assert!(job.waiting_reason.contains("waiting for 1 more worker(s) to register"), "{}", job.waiting_reason);
    let b = register(&mut w, cpu()).await;
    let t = std::time::Instant::now();
    let mut got = HashSet::new();
    while got.len() < 2 {
        assert!(t.elapsed() < Duration::from_secs(10), "{:?}", get(&mut j, &g.job_id).await);
        for wid in [&a, &b] {
            if let Some(l) = acquire(&mut w, wid, 0).await {
                got.insert(l.gang.unwrap().node_rank);
            }
        }
        tokio::time::sleep(Duration::from_millis(30)).await;
    }
    assert_eq!(state(&get(&mut j, &g.job_id).await), pb::JobState::Running);
    c.stop().await;
}

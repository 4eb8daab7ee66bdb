//! Human and JSON renderings of jobs and workers.

use lorafleet_proto as pb;
use serde_json::{json, Value};

pub fn state_name(s: i32) -> &'static str {
    match pb::JobState::try_from(s) {
        Ok(pb::JobState::Queued) => "queued",
        Ok(pb::JobState::Running) => "running",
        Ok(pb::JobState::Succeeded) => "succeeded",
        Ok(pb::JobState::Failed) => "failed",
        Ok(pb::JobState::Cancelling) => "cancelling",
        Ok(pb::JobState::Cancelled) => "cancelled",
        _ => "unknown",
    }
}

pub fn parse_state(s: &str) -> anyhow::Result<i32> {
    let st = match s.to_ascii_lowercase().as_str() {
        "queued" => pb::JobState::Queued,
        "running" => pb::JobState::Running,
        "succeeded" => pb::JobState::Succeeded,
        "failed" => pb::JobState::Failed,
        "cancelling" => pb::JobState::Cancelling,
        "cancelled" => pb::JobState::Cancelled,
        _ => anyhow::bail!("--state: unknown state {s:?} (queued, running, succeeded, failed, cancelling, cancelled)"),
    };
    Ok(st as i32)
}

pub fn is_final(s: i32) -> bool {
    matches!(pb::JobState::try_from(s), Ok(pb::JobState::Succeeded | pb::JobState::Failed | pb::JobState::Cancelled))
}

pub fn time(ms: i64) -> String {
    lorafleet_shared::time::utc_datetime(ms).unwrap_or_else(|| "-".into())
}

pub fn job_json(j: &pb::Job) -> Value {
    json!({
        "id": j.job_id,
        "name": j.spec.as_ref().map(|s| s.name.clone()).unwrap_or_default(),
        "state": state_name(j.state),
        "attempt": j.attempt,
        "epoch": j.epoch,
        "step": j.step,
        "total_steps": j.total_steps,
        "loss": j.loss,
        "worker": if j.worker_id.is_empty() { Value::Null } else { json!(j.worker_id) },
        "error": if j.error.is_empty() { Value::Null } else { json!(j.error) },
        "failure_class": match pb::FailureClass::try_from(j.failure_class) {
            Ok(pb::FailureClass::Retryable) => json!("retryable"),
            Ok(pb::FailureClass::NonRetryable) => json!("non_retryable"),
            _ => Value::Null,
        },
        "latest_checkpoint": if j.latest_checkpoint_key.is_empty() { Value::Null } else { json!(j.latest_checkpoint_key) },
        "adapter": if j.adapter_manifest_key.is_empty() { Value::Null } else { json!(j.adapter_manifest_key) },
        "idempotency_key": if j.idempotency_key.is_empty() { Value::Null } else { json!(j.idempotency_key) },
        "waiting_reason": if j.waiting_reason.is_empty() { Value::Null } else { json!(j.waiting_reason) },
        "nodes": nodes(j),
        "ranks": j.ranks.iter().map(|r| json!({
            "rank": r.rank,
            "node_rank": r.node_rank,
            "worker": r.worker_id,
            "step": r.step,
            "tokens_per_sec": r.tokens_per_sec,
            "updated_at_unix_ms": r.updated_at_unix_ms,
        })).collect::<Vec<_>>(),
        "created_at_unix_ms": j.created_at_unix_ms,
        "updated_at_unix_ms": j.updated_at_unix_ms,
    })
}

pub fn worker_json(w: &pb::Worker) -> Value {
    json!({
        "id": w.worker_id,
        "name": w.name,
        "alive": w.alive,
        "version": w.version,
        "devices": w.devices.iter().map(|d| d.name.clone()).collect::<Vec<_>>(),
        "device_memory_mib": w.devices.iter().map(|d| d.memory_mib).collect::<Vec<_>>(),
        "labels": w.labels,
        "running": w.running_job_ids,
        "gang_seats": w.gang_seats.iter().map(|g| json!({"job_id": g.job_id, "node_rank": g.node_rank, "nodes": g.nodes})).collect::<Vec<_>>(),
        "registered_at_unix_ms": w.registered_at_unix_ms,
        "last_heartbeat_unix_ms": w.last_heartbeat_unix_ms,
    })
}

pub(crate) fn short(id: &str) -> &str {
    id.get(..8).unwrap_or(id)
}

/// Workers the job spans (`resources.nodes`, 0 or absent meaning 1).
fn nodes(j: &pb::Job) -> u32 {
    j.spec.as_ref().and_then(|s| s.resources.as_ref()).map_or(1, |r| r.nodes.max(1))
}

/// `2 nodes x 1 cpu`, `1 node x 2 cuda, 40960 MiB`: what the job asks for (an absent
/// `resources` section means its defaults, one CPU).
fn resources_label(j: &pb::Job) -> String {
    let r = j.spec.as_ref().and_then(|s| s.resources).unwrap_or(pb::ResourceSpec {
        device: pb::DeviceKind::Cpu as i32,
        count: 1,
        memory_mib: 0,
        nodes: 1,
    });
    let device = match pb::DeviceKind::try_from(r.device) {
        Ok(pb::DeviceKind::Cpu) => "cpu",
        Ok(pb::DeviceKind::Cuda) => "cuda",
        _ => "unspecified",
    };
    let n = r.nodes.max(1);
    let mut s = format!("{n} node{} x {} {device}", if n == 1 { "" } else { "s" }, r.count.max(1));
    if r.memory_mib > 0 {
        s.push_str(&format!(", {} MiB", r.memory_mib));
    }
    s
}

/// `1a2b3c4d[node 0/2]` per gang seat, comma-separated; `-` when none.
fn gang_label(w: &pb::Worker) -> String {
    if w.gang_seats.is_empty() {
        return "-".into();
    }
    w.gang_seats.iter().map(|g| format!("{}[node {}/{}]", short(&g.job_id), g.node_rank, g.nodes)).collect::<Vec<_>>().join(",")
}

pub fn print_jobs(jobs: &[pb::Job]) {
    if jobs.is_empty() {
        println!("no jobs");
        return;
    }
    println!("{:<36}  {:<20}  {:<10}  {:>7}  {:>11}  {:>8}  WORKER", "ID", "NAME", "STATE", "ATTEMPT", "STEP", "LOSS");
    for j in jobs {
        let name = j.spec.as_ref().map(|s| s.name.as_str()).unwrap_or("");
        let step = if j.total_steps > 0 { format!("{}/{}", j.step, j.total_steps) } else { j.step.to_string() };
        let loss = j.loss.map(|l| format!("{l:.4}")).unwrap_or_else(|| "-".into());
        let worker = if j.worker_id.is_empty() { "-" } else { short(&j.worker_id) };
        let waiting = if j.waiting_reason.is_empty() { String::new() } else { format!(" (waiting: {})", j.waiting_reason) };
        println!("{:<36}  {:<20}  {:<10}  {:>7}  {:>11}  {:>8}  {worker}{waiting}", j.job_id, name, state_name(j.state), j.attempt, step, loss);
    }
}

pub fn print_job(j: &pb::Job) {
    let name = j.spec.as_ref().map(|s| s.name.as_str()).unwrap_or("");
    println!("job:         {}", j.job_id);
    println!("name:        {name}");
    println!("state:       {}", state_name(j.state));
    if !j.waiting_reason.is_empty() {
        println!("waiting:     {}", j.waiting_reason);
    }
    println!("resources:   {}", resources_label(j));
    println!("attempt:     {} (epoch {})", j.attempt, j.epoch);
    println!("step:        {}/{}", j.step, j.total_steps);
    if let Some(l) = j.loss {
        println!("loss:        {l:.4}");
    }
    println!("worker:      {}", if j.worker_id.is_empty() { "-" } else { &j.worker_id });
    if !j.latest_checkpoint_key.is_empty() {
        println!("checkpoint:  {}", j.latest_checkpoint_key);
    }
    if !j.adapter_manifest_key.is_empty() {
        println!("adapter:     {}", j.adapter_manifest_key);
    }
    if !j.error.is_empty() {
        println!("error:       {}", j.error);
    }
    println!("created:     {}", time(j.created_at_unix_ms));
    println!("updated:     {}", time(j.updated_at_unix_ms));
    if !j.ranks.is_empty() {
        println!("ranks:");
        println!("  {:>4}  {:>4}  {:<8}  {:>8}  {:>8}  UPDATED", "RANK", "NODE", "WORKER", "STEP", "TOK/S");
        for r in &j.ranks {
            let worker = if r.worker_id.is_empty() { "-" } else { short(&r.worker_id) };
            println!("  {:>4}  {:>4}  {:<8}  {:>8}  {:>8.0}  {}", r.rank, r.node_rank, worker, r.step, r.tokens_per_sec, time(r.updated_at_unix_ms));
        }
    }
}

/// `cuda:0 (80G)`: a device and its memory in GiB, when known.
fn device_label(d: &pb::Device) -> String {
    if d.memory_mib == 0 {
        d.name.clone()
    } else {
        format!("{} ({}G)", d.name, d.memory_mib / 1024)
    }
}

pub fn print_workers(ws: &[pb::Worker]) {
    if ws.is_empty() {
        println!("no workers");
        return;
    }
    println!("{:<36}  {:<16}  {:<5}  {:<16}  {:<19}  {:<18}  RUNNING", "ID", "NAME", "ALIVE", "DEVICES", "LAST HEARTBEAT", "GANG");
    for w in ws {
        let devices = w.devices.iter().map(device_label).collect::<Vec<_>>().join(",");
        let running = if w.running_job_ids.is_empty() { "-".to_string() } else { w.running_job_ids.join(",") };
        let alive = if w.alive { "yes" } else { "no" };
        println!(
            "{:<36}  {:<16}  {:<5}  {:<16}  {:<19}  {:<18}  {}",
            w.worker_id,
            w.name,
            alive,
            devices,
            time(w.last_heartbeat_unix_ms),
            gang_label(w),
            running
        );
    }
}

/// Audit events: a table (with its header when `header`), or one JSON object per line.
pub fn print_audit(events: &[pb::AuditEvent], json: bool, header: bool) {
    if json {
        for e in events {
            let v = json!({
                "seq": e.seq, "unix_ms": e.unix_ms, "token_id": e.token_id, "role": e.role, "tenant": e.tenant,
                "method": e.method, "target": e.target, "outcome": e.outcome, "detail": e.detail,
            });
            println!("{v}");
        }
        return;
    }
    if header {
        println!("{:<6} {:<19} {:<14} {:<7} {:<10} {:<36} {:<36} OUTCOME", "SEQ", "TIME", "TOKEN", "ROLE", "TENANT", "METHOD", "TARGET");
    }
    for e in events {
        let method = e.method.strip_prefix("lorafleet.v1.").unwrap_or(&e.method);
        let detail = if e.detail.is_empty() { String::new() } else { format!(" ({})", e.detail.lines().next().unwrap_or("")) };
        println!(
            "{:<6} {:<19} {:<14} {:<7} {:<10} {:<36} {:<36} {}{detail}",
            e.seq,
            time(e.unix_ms),
            e.token_id,
            e.role,
            if e.tenant.is_empty() { "-" } else { &e.tenant },
            method,
            if e.target.is_empty() { "-" } else { &e.target },
            e.outcome
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_and_states() {
        assert_eq!(time(0), "-");
        assert_eq!(time(1_764_302_400_000), "2025-11-28 04:00:00");
        assert_eq!(time(951_782_400_000), "2000-02-29 00:00:00");
        assert_eq!(state_name(parse_state("Running").unwrap()), "running");
        assert!(parse_state("bogus").is_err());
        assert!(is_final(pb::JobState::Cancelled as i32) && !is_final(pb::JobState::Cancelling as i32));
    }

    #[test]
    fn job_json_has_the_documented_keys() {
        let j = pb::Job { job_id: "j".into(), state: pb::JobState::Failed as i32, attempt: 2, error: "boom".into(), ..Default::default() };
        let v = job_json(&j);
        for k in ["id", "state", "attempt", "step", "worker", "error"] {
            assert!(v.get(k).is_some(), "{k}");
        }
        assert_eq!(v["state"], "failed");
        assert_eq!(v["error"], "boom");
        assert_eq!(v["worker"], Value::Null);
        assert_eq!(v["waiting_reason"], Value::Null);
        assert_eq!(v["nodes"], 1);
        assert_eq!(v["ranks"], json!([]));
    }

    #[test]
    fn gangs_in_jobs_and_workers() {
        let spec = pb::JobSpec {
            resources: Some(pb::ResourceSpec { device: pb::DeviceKind::Cpu as i32, count: 1, memory_mib: 0, nodes: 2 }),
            ..Default::default()
        };
        let rank = |rank, node_rank, worker: &str| pb::RankStatus {
            rank,
            node_rank,
            worker_id: worker.into(),
            step: 7,
            tokens_per_sec: 12.5,
            updated_at_unix_ms: 1,
        };
        let j = pb::Job {
            job_id: "j".into(),
            spec: Some(spec),
            waiting_reason: "gang of 2 nodes: 1 worker fits, waiting for 1 more".into(),
            ranks: vec![rank(0, 0, "1a2b3c4d-aaaa"), rank(1, 1, "5e6f7a8b-bbbb")],
            ..Default::default()
        };
        let v = job_json(&j);
        assert_eq!(v["nodes"], 2);
        assert_eq!(v["waiting_reason"], "gang of 2 nodes: 1 worker fits, waiting for 1 more");
        assert_eq!(
            v["ranks"][1],
            json!({"rank": 1, "node_rank": 1, "worker": "5e6f7a8b-bbbb", "step": 7, "tokens_per_sec": 12.5, "updated_at_unix_ms": 1})
        );
        assert_eq!(resources_label(&j), "2 nodes x 1 cpu");
        assert_eq!(resources_label(&pb::Job::default()), "1 node x 1 cpu");
        let cuda = pb::ResourceSpec { device: pb::DeviceKind::Cuda as i32, count: 2, memory_mib: 40_960, nodes: 0 };
        assert_eq!(
            resources_label(&pb::Job { spec: Some(pb::JobSpec { resources: Some(cuda), ..Default::default() }), ..Default::default() }),
            "1 node x 2 cuda, 40960 MiB"
        );

        let mut w = pb::Worker { worker_id: "w".into(), ..Default::default() };
        assert_eq!(gang_label(&w), "-");
        assert_eq!(worker_json(&w)["gang_seats"], json!([]));
        w.gang_seats = vec![
            pb::GangSeat { job_id: "0123456789abcdef".into(), node_rank: 1, nodes: 2 },
            pb::GangSeat { job_id: "fedcba98".into(), node_rank: 0, nodes: 3 },
        ];
        assert_eq!(gang_label(&w), "01234567[node 1/2],fedcba98[node 0/3]");
        assert_eq!(worker_json(&w)["gang_seats"][0], json!({"job_id": "0123456789abcdef", "node_rank": 1, "nodes": 2}));
    }
}

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
    if ms <= 0 {
        return "-".into();
    }
    let secs = ms / 1000;
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    let (y, m, d) = civil_from_days(days);
    format!("{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02}", rem / 3600, rem % 3600 / 60, rem % 60)
}

/// Days since 1970-01-01 to a (year, month, day) in the proleptic Gregorian calendar.
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (yoe + era * 400 + i64::from(m <= 2), m, d)
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
        "registered_at_unix_ms": w.registered_at_unix_ms,
        "last_heartbeat_unix_ms": w.last_heartbeat_unix_ms,
    })
}

fn short(id: &str) -> &str {
    id.get(..8).unwrap_or(id)
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
        println!("{:<36}  {:<20}  {:<10}  {:>7}  {:>11}  {:>8}  {}", j.job_id, name, state_name(j.state), j.attempt, step, loss, worker);
    }
}

pub fn print_job(j: &pb::Job) {
    let name = j.spec.as_ref().map(|s| s.name.as_str()).unwrap_or("");
    println!("job:         {}", j.job_id);
    println!("name:        {name}");
    println!("state:       {}", state_name(j.state));
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
    println!("{:<36}  {:<16}  {:<5}  {:<16}  {:<19}  RUNNING", "ID", "NAME", "ALIVE", "DEVICES", "LAST HEARTBEAT");
    for w in ws {
        let devices = w.devices.iter().map(device_label).collect::<Vec<_>>().join(",");
        let running = if w.running_job_ids.is_empty() { "-".to_string() } else { w.running_job_ids.join(",") };
        println!("{:<36}  {:<16}  {:<5}  {:<16}  {:<19}  {}", w.worker_id, w.name, if w.alive { "yes" } else { "no" }, devices, time(w.last_heartbeat_unix_ms), running);
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
    }
}

//! A store write that fails mid-batch: the batch is rolled back, its callers get
//! UNAVAILABLE, the in-memory state is rebuilt from the store, and work continues.

use lorafleet_coordinator::control::{ControlLoop, NewWorker};
use lorafleet_coordinator::metrics::Metrics;
use lorafleet_coordinator::persistence::{self, DeviceInfo};
use lorafleet_coordinator::{ControlConfig, CoordError};
use lorafleet_shared::spec::{DeviceKind, JobSpec, SpecContext};
use std::time::Duration;

fn spec(name: &str) -> JobSpec {
    let y = format!("name: {name}\nmodel: {{ source: hf://o/m }}\ndata: {{ train: \"dataset://sha256/{}\" }}\noutput: {{ dir: o }}\n", "ef".repeat(32));
    JobSpec::from_yaml(&y, SpecContext::Remote).unwrap()
}

#[tokio::test]
async fn failed_batch_rolls_back_and_state_is_reloaded() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("c.db");
    let (ctl, lp) = ControlLoop::start(db.clone(), ControlConfig::default(), Metrics::new()).unwrap();
    let a = ctl.submit(spec("a"), None, None).await.unwrap().job;

    // Break the store under the loop: the next submission cannot write its event.
    let other = rusqlite::Connection::open(&db).unwrap();
    other.execute_batch("DROP TABLE events").unwrap();
    let err = ctl.submit(spec("b"), Some("key-b".into()), None).await.unwrap_err();
    assert!(matches!(err, CoordError::Unavailable(_)), "{err:?}");
    let n: i64 = other.query_row("SELECT COUNT(*) FROM jobs WHERE name = 'b'", [], |r| r.get(0)).unwrap();
    assert_eq!(n, 0, "the failed batch was rolled back");

    // Repair; the loop carries on from what the store holds.
    drop(persistence::open_writer(&db).unwrap());
    let c = ctl.submit(spec("c"), None, None).await.unwrap().job;
    let again = ctl.submit(spec("b"), Some("key-b".into()), None).await.unwrap();
    assert!(again.created, "the refused submission left no trace");
    let w = ctl
        .register(NewWorker {
            name: "w".into(),
            devices: vec![DeviceInfo { kind: DeviceKind::Cpu, index: 0, name: "cpu".into(), memory_mib: 0 }],
            labels: Default::default(),
            version: "t".into(),
        })
        .await
        .unwrap();
    let mut order = Vec::new();
    while let Some(l) = ctl.acquire(w, Duration::ZERO).await.unwrap() {
        order.push(l.job_id.clone());
        let call = lorafleet_coordinator::control::WorkerCall { job_id: l.job_id.parse().unwrap(), epoch: lorafleet_shared::ids::Epoch(l.epoch), worker: w };
        ctl.complete(call, format!("{}adapter/manifest.json", l.output_prefix), None).await.unwrap();
    }
    assert_eq!(order, vec![a.id.to_string(), c.id.to_string(), again.job.id.to_string()]);
    drop(ctl);
    lp.join().await;
}

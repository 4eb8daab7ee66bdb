//! The web dashboard over plain HTTP against a real coordinator with `--auth` (gRPC
//! for the job and a worker, HTTP/1.1 on the metrics listener for the pages): 401 and
//! the sign-in form without a token, bearer header and login cookie, tenant isolation
//! (another tenant's job is not found, nor listed, nor its files downloadable), worker
//! tokens refused, escaping of what workers and models wrote, the security headers,
//! the progress JSON, and checkpoint and adapter files streamed from storage.
//! The browser side (the script drawing the curves) is tested in e2e/tests/dashboard.rs.

use lorafleet_coordinator::auth::{create_token, Auth, Role};
use lorafleet_coordinator::{serve_with_metrics, CoordinatorConfig};
use lorafleet_proto as pb;
use pb::job_service_client::JobServiceClient;
use pb::worker_service_client::WorkerServiceClient;
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn req<T>(msg: T, token: &str) -> tonic::Request<T> {
    let mut r = tonic::Request::new(msg);
    r.metadata_mut().insert("authorization", format!("Bearer {token}").parse().unwrap());
    r
}

struct Reply {
    status: u16,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl Reply {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(k, _)| k.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
    }
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

/// One HTTP/1.0 exchange (the server closes the connection after it).
async fn http(addr: SocketAddr, method: &str, path: &str, headers: &[(&str, &str)], body: &str) -> Reply {
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    let mut r = format!("{method} {path} HTTP/1.0\r\nHost: {addr}\r\n");
    for (k, v) in headers {
        r.push_str(&format!("{k}: {v}\r\n"));
    }
    if !body.is_empty() || method == "POST" {
        r.push_str(&format!("Content-Type: application/x-www-form-urlencoded\r\nContent-Length: {}\r\n", body.len()));
    }
    r.push_str("\r\n");
    r.push_str(body);
    s.write_all(r.as_bytes()).await.unwrap();
    let mut raw = Vec::new();
    tokio::time::timeout(Duration::from_secs(20), s.read_to_end(&mut raw)).await.expect("reply in time").unwrap();
    let split = raw.windows(4).position(|w| w == b"\r\n\r\n").expect("headers end");
    let head = String::from_utf8_lossy(&raw[..split]).into_owned();
    let mut lines = head.lines();
    let status = lines.next().unwrap().split(' ').nth(1).unwrap().parse().unwrap();
    let headers = lines.filter_map(|l| l.split_once(':')).map(|(k, v)| (k.trim().to_string(), v.trim().to_string())).collect();
    Reply { status, headers, body: raw[split + 4..].to_vec() }
}

fn bearer(t: &str) -> (&'static str, String) {
    ("Authorization", format!("Bearer {t}"))
}

async fn get(addr: SocketAddr, path: &str, token: Option<&str>) -> Reply {
    match token {
        Some(t) => {
            let (k, v) = bearer(t);
            http(addr, "GET", path, &[(k, &v)], "").await
        }
        None => http(addr, "GET", path, &[], "").await,
    }
}

const XSS_LOG: &str = "<img src=x onerror=alert(1)> \"quoted\" & done";
const XSS_SAMPLE: &str = "</dd><script>alert('sample')</script>";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dashboard_pages_auth_tenants_escaping_and_downloads() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("auth.yaml");
    let alice = create_token(&file, "alice", Role::User, Some("acme")).unwrap();
    let bob = create_token(&file, "bob", Role::User, Some("other")).unwrap();
    let admin = create_token(&file, "root", Role::Admin, None).unwrap();
    let worker = create_token(&file, "pool", Role::Worker, None).unwrap();

    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let metrics = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let (url, web) = (format!("http://{}", listener.local_addr().unwrap()), metrics.local_addr().unwrap());
    let store = dir.path().join("store");
    std::fs::create_dir_all(&store).unwrap();
    let storage_url = format!("file://{}", store.display());
    let mut config = CoordinatorConfig::new(dir.path().join("c.db"), storage_url.clone());
    config.auth = Some(Auth::load(&file).unwrap());
    config.models = lorafleet_coordinator::sources::ModelPolicy { local_paths: true, hf_revisions: lorafleet_coordinator::sources::HfRevisions::Any, ..Default::default() };
    let (stop, rx) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(serve_with_metrics(listener, Some(metrics), config, async move {
        let _ = rx.await;
    }));
    let ch = loop {
        if let Ok(ch) = tonic::transport::Endpoint::from_shared(url.clone()).unwrap().connect().await {
            break ch;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let (mut j, mut w) = (JobServiceClient::new(ch.clone()), WorkerServiceClient::new(ch));

    // Alice's job, leased by a worker that reports steps, an evaluation with samples, a
    // log line and a checkpoint.
    let y = "name: faq-dash\nmodel: { source: hf://org/tiny }\ndata: { train: s3://bucket/faq.json }\noutput: { dir: out }\ntraining: { max_steps: 10 }\n";
    let spec = pb::JobSpec::from(&lorafleet_shared::JobSpec::from_yaml(y, lorafleet_shared::SpecContext::Remote).unwrap());
    let job = j.submit_job(req(pb::SubmitJobRequest { spec: Some(spec), idempotency_key: String::new() }, &alice)).await.unwrap().into_inner().job.unwrap();
    let id = job.job_id.clone();
    let cpu = vec![pb::Device { kind: pb::DeviceKind::Cpu as i32, index: 0, name: "cpu".into(), memory_mib: 2048 }];
    let labels = [("pool".to_string(), "cpu-spot".to_string())].into_iter().collect();
    let wid = w
        .register_worker(req(pb::RegisterWorkerRequest { name: "dash-worker".into(), devices: cpu, labels, version: "test".into(), ..Default::default() }, &worker))
        .await
        .unwrap()
        .into_inner()
        .worker_id;
    let lease = w.acquire_job(req(pb::AcquireJobRequest { worker_id: wid.clone(), wait_secs: 0 }, &worker)).await.unwrap().into_inner().lease.unwrap();
    assert_eq!(lease.job_id, id);
    let steps: Vec<pb::StepMetrics> = (1..=6).map(|s| pb::StepMetrics { step: s, total_steps: 10, loss: 3.0 - 0.2 * s as f64, lr: 1e-3 * s as f64, ..Default::default() }).collect();
    let eval = pb::EvalMetrics {
        step: 5,
        eval_loss: 2.25,
        perplexity: 9.49,
        samples: vec![pb::SampleOutput { prompt: "How do I <b>reset</b>?".into(), completion: XSS_SAMPLE.into() }],
        exact_match: Some(0.5),
        rouge_l: Some(0.75),
        generated: 2,
        ..Default::default()
    };
    let log = pb::LogLine { unix_ms: 1_796_133_617_000, level: "warn".into(), message: XSS_LOG.into() };
    w.report_progress(req(pb::ReportProgressRequest { job_id: id.clone(), epoch: lease.epoch, worker_id: wid.clone(), steps, evals: vec![eval], logs: vec![log], ranks: vec![] }, &worker))
        .await
        .unwrap();
    let storage = lorafleet_storage::Storage::open(&storage_url).unwrap();
    let local = dir.path().join("ckpt");
    std::fs::create_dir_all(local.join("best")).unwrap();
    let weights: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
    std::fs::write(local.join("adapter_model.safetensors"), &weights).unwrap();
    std::fs::write(local.join("best").join("best.json"), br#"{"step": 5}"#).unwrap();
    let ckpt_dir = lorafleet_storage::RelPath::parse(&format!("{}checkpoints/step-6", lease.output_prefix)).unwrap();
    storage.upload_dir(&ckpt_dir, &local, BTreeMap::new()).await.unwrap();
    w.commit_checkpoint(req(
        pb::CommitCheckpointRequest { job_id: id.clone(), epoch: lease.epoch, worker_id: wid.clone(), step: 6, manifest_key: format!("{ckpt_dir}/manifest.json") },
        &worker,
    ))
    .await
    .unwrap();

    // No token: 401 and the sign-in form (pages), 401 JSON (the script's endpoint).
    for path in ["/", &format!("/jobs/{id}"), "/workers", &format!("/jobs/{id}/checkpoints/{}/6", lease.epoch)] {
        let r = get(web, path, None).await;
        assert_eq!(r.status, 401, "{path}");
        assert_eq!(r.header("www-authenticate"), Some("Bearer"), "{path}");
        let t = r.text();
        assert!(t.contains("<form method=\"post\" action=\"/login\"") && t.contains("<label for=\"token\">"), "{path}: {t}");
    }
    let r = get(web, &format!("/api/jobs/{id}/progress"), None).await;
    assert_eq!((r.status, r.header("content-type")), (401, Some("application/json")));
    // A bad token, a malformed header, a worker token.
    assert!(get(web, "/", Some("lf_nope")).await.text().contains("unknown token"));
    assert_eq!(http(web, "GET", "/", &[("Authorization", "Basic eDp5")], "").await.status, 401);
    assert_eq!(get(web, "/", Some(&worker)).await.status, 403);
    // Assets and /metrics need no token; /metrics is unchanged.
    let js = get(web, "/assets/dashboard.js", None).await;
    assert_eq!((js.status, js.header("content-type")), (200, Some("text/javascript; charset=utf-8")));
    assert!(get(web, "/metrics", None).await.text().contains("lorafleet_queued_jobs{device=\"cpu\"} 0"));

    // Alice sees her job everywhere, with every user-written text escaped.
    let list = get(web, "/", Some(&alice)).await;
    assert_eq!(list.status, 200);
    let csp = list.header("content-security-policy").unwrap();
    assert!(csp.contains("script-src 'self'") && !csp.contains("unsafe-inline"), "{csp}");
    assert_eq!(list.header("x-content-type-options"), Some("nosniff"));
    let t = list.text();
    assert!(t.contains(&format!("href=\"/jobs/{id}\">faq-dash</a>")) && t.contains("acme") && t.contains("dash-worker"), "{t}");
    assert!(t.contains("<html lang=\"en\">") && t.contains("<th scope=\"col\">State</th>"), "{t}");
    let page = get(web, &format!("/jobs/{id}"), Some(&alice)).await;
    assert_eq!(page.status, 200);
    let t = page.text();
    assert!(!t.contains("<img src=x") && t.contains("&lt;img src=x onerror=alert(1)&gt; &quot;quoted&quot; &amp; done"), "{t}");
    assert!(!t.contains("<script>alert") && t.contains("&lt;/dd&gt;&lt;script&gt;alert(&#39;sample&#39;)&lt;/script&gt;"), "{t}");
    assert!(t.contains("How do I &lt;b&gt;reset&lt;/b&gt;?"), "{t}");
    assert_eq!(t.matches("<script").count(), 1, "only the external script: {t}");
    assert!(!t.contains(" style=") && !t.contains(" onclick="), "no inline style or handlers");
    assert!(t.contains("id=\"loss-chart\"") && t.contains("aria-label=\"Training loss by step"), "{t}");
    assert!(t.contains("<td>50.0%</td><td>75.0%</td>"), "exact match and ROUGE-L: {t}");
    assert!(t.contains(&format!("href=\"/jobs/{id}/checkpoints/{}/6\"", lease.epoch)), "{t}");

    // The progress JSON: every step (loss and learning rate), the evaluation, the log.
    let p: serde_json::Value = serde_json::from_slice(&get(web, &format!("/api/jobs/{id}/progress"), Some(&alice)).await.body).unwrap();
    assert_eq!(p["job"]["state"], "running");
    assert_eq!(p["job"]["worker"], "dash-worker");
    assert_eq!(p["steps"].as_array().unwrap().len(), 6);
    assert_eq!(p["steps"][5], serde_json::json!([6, 3.0 - 0.2 * 6.0, 6e-3]));
    assert_eq!((p["evals"][0]["exact_match"].as_f64(), p["evals"][0]["rouge_l"].as_f64()), (Some(0.5), Some(0.75)));
    assert_eq!(p["evals"][0]["samples"][0]["completion"], XSS_SAMPLE);
    assert_eq!(p["logs"][0]["message"], XSS_LOG);
    assert_eq!(p["checkpoints"][0]["step"], 6);
    assert_eq!(p["more"], false);
    // Incremental: nothing new after the last seq.
    let after = p["next_event"].as_u64().unwrap();
    let log_seq = p["logs"][0]["seq"].as_u64().unwrap();
    let p2: serde_json::Value =
        serde_json::from_slice(&get(web, &format!("/api/jobs/{id}/progress?after_event={after}&after_log={log_seq}"), Some(&alice)).await.body).unwrap();
    assert_eq!((p2["steps"].as_array().unwrap().len(), p2["logs"].as_array().unwrap().len()), (0, 0));
    assert_eq!(get(web, &format!("/api/jobs/{id}/progress?after_event=x"), Some(&alice)).await.status, 400);

    // Checkpoint files: listed from the manifest, streamed with the right bytes; names
    // not in the manifest are not found.
    let base = format!("/jobs/{id}/checkpoints/{}/6", lease.epoch);
    let files = get(web, &base, Some(&alice)).await.text();
    assert!(files.contains(&format!("href=\"{base}/adapter_model.safetensors\"")) && files.contains(&format!("href=\"{base}/best/best.json\"")), "{files}");
    let dl = get(web, &format!("{base}/adapter_model.safetensors"), Some(&alice)).await;
    assert_eq!(dl.status, 200);
    assert_eq!(dl.header("content-disposition"), Some("attachment; filename=\"adapter_model.safetensors\""));
    assert!(dl.body == weights, "downloaded bytes differ");
    assert_eq!(get(web, &format!("{base}/best/best.json"), Some(&alice)).await.body, br#"{"step": 5}"#);
    for bad in ["manifest.json", "../../adapter/x", "nope", "best/../adapter_model.safetensors"] {
        assert_eq!(get(web, &format!("{base}/{bad}"), Some(&alice)).await.status, 404, "{bad}");
    }
    assert_eq!(get(web, &format!("/jobs/{id}/checkpoints/{}/7", lease.epoch), Some(&alice)).await.status, 404);
    // A file changed in storage after its manifest was written is not served whole.
    let stored = store.join(format!("{ckpt_dir}/adapter_model.safetensors"));
    let mut bad = weights.clone();
    bad[1000] ^= 1;
    std::fs::write(&stored, &bad).unwrap();
    let broken = get(web, &format!("{base}/adapter_model.safetensors"), Some(&alice)).await;
    assert!(broken.body.len() < weights.len() || broken.body != bad, "a corrupt file was served as if whole");
    std::fs::write(&stored, &weights).unwrap();

    // Bob (another tenant) neither sees nor reaches it; the admin does.
    let t = get(web, "/", Some(&bob)).await.text();
    assert!(!t.contains(&id) && t.contains("No jobs."), "{t}");
    for path in [format!("/jobs/{id}"), format!("/api/jobs/{id}/progress"), base.clone(), format!("{base}/adapter_model.safetensors")] {
        assert_eq!(get(web, &path, Some(&bob)).await.status, 404, "{path}");
    }
    let wt = get(web, "/workers", Some(&bob)).await.text();
    assert!(wt.contains("dash-worker") && wt.contains("cpu-spot") && !wt.contains(&id) && wt.contains("idle"), "{wt}");
    let wt = get(web, "/workers", Some(&alice)).await.text();
    assert!(wt.contains(&format!("href=\"/jobs/{id}\"")) && wt.contains("<code>pool=cpu-spot</code>") && wt.contains("cpu (2.0 GiB)"), "{wt}");
    assert!(get(web, "/", Some(&admin)).await.text().contains(&id));

    // The sign-in form: a cookie that scripts cannot read, sent back on later pages.
    let r = http(web, "POST", "/login", &[], &format!("token={alice}&next=%2Fworkers")).await;
    assert_eq!((r.status, r.header("location")), (303, Some("/workers")));
    let c = r.header("set-cookie").unwrap().to_string();
    assert!(c.starts_with(&format!("lorafleet_token={alice};")) && c.contains("HttpOnly") && c.contains("SameSite=Strict"), "{c}");
    assert!(!c.contains("Secure"), "no TLS here: {c}");
    let cookie = format!("lorafleet_token={alice}");
    let r = http(web, "GET", &format!("/jobs/{id}"), &[("Cookie", &cookie)], "").await;
    assert_eq!(r.status, 200);
    assert!(r.text().contains("Signed in as alice (user, tenant acme)"));
    let r = http(web, "POST", "/login", &[], "token=lf_wrong&next=https%3A%2F%2Fevil.example%2F").await;
    assert_eq!(r.status, 401);
    assert!(r.text().contains("unknown token") && r.text().contains("name=\"next\" value=\"/\""), "{}", r.text());
    let r = http(web, "POST", "/login", &[("Origin", "https://evil.example")], &format!("token={alice}")).await;
    assert_eq!(r.status, 403, "cross-site login");
    let r = http(web, "POST", "/logout", &[("Cookie", &cookie)], "").await;
    assert_eq!(r.status, 303);
    assert!(r.header("set-cookie").unwrap().contains("Max-Age=0"));

    // Completed: the published adapter's files.
    let local = dir.path().join("adapter");
    std::fs::create_dir_all(&local).unwrap();
    std::fs::write(local.join("adapter_config.json"), br#"{"r": 8}"#).unwrap();
    let adapter_dir = lorafleet_storage::RelPath::parse(&format!("{}adapter", lease.output_prefix)).unwrap();
    storage.upload_dir(&adapter_dir, &local, BTreeMap::new()).await.unwrap();
    w.complete_attempt(req(
        pb::CompleteAttemptRequest { job_id: id.clone(), epoch: lease.epoch, worker_id: wid.clone(), adapter_manifest_key: format!("{adapter_dir}/manifest.json"), final_loss: Some(1.7) },
        &worker,
    ))
    .await
    .unwrap();
    let t = get(web, &format!("/jobs/{id}"), Some(&alice)).await.text();
    assert!(t.contains(&format!("href=\"/jobs/{id}/adapter\"")) && t.contains("state-succeeded"), "{t}");
    assert!(get(web, &format!("/jobs/{id}/adapter"), Some(&alice)).await.text().contains("adapter_config.json"));
    assert_eq!(get(web, &format!("/jobs/{id}/adapter/adapter_config.json"), Some(&alice)).await.body, br#"{"r": 8}"#);
    assert_eq!(get(web, &format!("/jobs/{id}/adapter/adapter_config.json"), Some(&bob)).await.status, 404);

    let _ = stop.send(());
    tokio::time::timeout(Duration::from_secs(20), task).await.unwrap().unwrap().unwrap();
}

//! `lorafleet serve` driven by a client no one here wrote: the official `openai` Python
//! package (installed by scripts/py-clients.sh) against the real binary over loopback.
//! Two adapters trained here on the demo model answer one concurrent burst exactly as
//! `lorafleet generate` answers with each; errors come back in OpenAI's format and the
//! server keeps serving. A second test serves a finished job's adapter straight from the
//! job store of a real `lorafleet dev` (coordinator + worker + file storage).

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_lorafleet");
const MAX_NEW: usize = 40;

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// The Python with the clients, or `None` (and a note) where they cannot be installed
/// outside CI; in CI that is a failure.
fn python() -> Option<PathBuf> {
    let out = Command::new(repo().join("scripts/py-clients.sh")).output().expect("run scripts/py-clients.sh");
    if out.status.success() {
        return Some(PathBuf::from(String::from_utf8_lossy(&out.stdout).trim()));
    }
    let why = String::from_utf8_lossy(&out.stderr);
    assert!(std::env::var_os("CI").is_none(), "the Python test clients could not be installed: {why}");
    eprintln!("note: skipped, the Python test clients could not be installed: {why}");
    None
}

fn run(args: &[&str]) -> String {
    let out = Command::new(BIN).args(args).output().expect("run lorafleet");
    assert!(out.status.success(), "lorafleet {args:?} failed: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).expect("utf-8 output")
}

fn s(p: &Path) -> &str {
    p.to_str().expect("utf-8 path")
}

const TEMPLATE: &str = r#"template: "<human>: {question}\n<assistant>:""#;

/// A spec training the demo model on `data` (the example's settings, with `template`).
fn spec(dir: &Path, model: &Path, data: &Path, out: &Path, template: &str) -> PathBuf {
    let text = std::fs::read_to_string(repo().join("examples/faq.yaml")).expect("example spec");
    assert!(text.contains(TEMPLATE), "examples/faq.yaml changed shape");
    let text = text
        .replace(TEMPLATE, template)
        .replace("source: ./models/demo", &format!("source: {}", s(model)))
        .replace("train: ./examples/faq.json", &format!("train: {}", s(data)))
        .replace("dir: ./out/faq", &format!("dir: {}", s(out)));
    assert!(text.contains(s(model)) && text.contains(s(data)) && text.contains(s(out)), "examples/faq.yaml changed shape");
    let p = dir.join(format!("{}.yaml", out.file_name().and_then(|n| n.to_str()).unwrap_or("spec")));
    std::fs::write(&p, text).expect("write spec");
    p
}

fn faq() -> Vec<(String, String)> {
    let v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(repo().join("examples/faq.json")).expect("faq.json")).expect("json");
    v.as_array().expect("array").iter().map(|r| (r["question"].as_str().unwrap().to_string(), r["answer"].as_str().unwrap().to_string())).collect()
}

struct Server(Child);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Start `lorafleet serve` on a free port; returns the process and its /v1 URL.
fn serve(args: &[&str]) -> (Server, String) {
    let mut child = Command::new(BIN).arg("serve").args(args).args(["--listen", "127.0.0.1:0", "--log", "info"]).stdout(Stdio::piped()).stderr(Stdio::inherit()).spawn().expect("start serve");
    let stdout = child.stdout.take().expect("stdout");
    let mut line = String::new();
    BufReader::new(stdout).read_line(&mut line).expect("read serve's first line");
    let url = line.split_whitespace().find(|w| w.starts_with("http://")).unwrap_or_else(|| panic!("serve printed {line:?}")).to_string();
    (Server(child), url)
}

fn generate(model: &Path, adapter: Option<&Path>, prompt: &str, raw: bool) -> String {
    let n = MAX_NEW.to_string();
    let mut args = vec!["generate", "--model", s(model), "--prompt", prompt, "--max-new-tokens", &n];
    if let Some(a) = adapter {
        args.extend(["--adapter", s(a)]);
    }
    if raw {
        args.push("--raw");
    }
    let out = run(&args);
    out.strip_suffix('\n').unwrap_or(&out).to_string()
}

fn client_check(py: &Path, url: &str, expect: &serde_json::Value, dir: &Path) {
    let path = dir.join("expect.json");
    std::fs::write(&path, expect.to_string()).expect("write expectations");
    let out = Command::new(py).arg(repo().join("scripts/py/serve_client_check.py")).arg(url).arg(&path).output().expect("run the client");
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    eprintln!("{text}");
    assert!(out.status.success() && text.contains("all checks passed"), "the OpenAI client's checks failed:\n{text}");
}

/// The model's context length (config.json's max_position_embeddings).
fn context(model: &Path) -> u64 {
    let cfg: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(model.join("config.json")).expect("config.json")).expect("json");
    cfg["max_position_embeddings"].as_u64().expect("max_position_embeddings")
}

fn metrics(url: &str) -> String {
    let base = url.trim_end_matches("/v1");
    let out = Command::new("curl").args(["-sf", &format!("{base}/metrics")]).output().expect("curl");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn metric(text: &str, name: &str) -> f64 {
    text.lines().find(|l| l.starts_with(name)).and_then(|l| l.rsplit(' ').next()).and_then(|v| v.parse().ok()).unwrap_or_else(|| panic!("metric {name} missing in:\n{text}"))
}

#[test]
fn openai_client_gets_each_adapters_answers_in_one_burst() {
    let Some(py) = python() else { return };
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path();
    let model = dir.join("demo");
    run(&["demo-model", "--out", s(&model)]);
    // The base model has a chat template of its own (as instruct models do).
    let chat_template = r#"{% for m in messages %}{{ '<|' + m['role'] + '|>\n' + m['content'] + eos_token + '\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"#;
    std::fs::write(model.join("tokenizer_config.json"), serde_json::json!({"eos_token": "<|endoftext|>", "chat_template": chat_template}).to_string()).unwrap();
    // Adapter a learns the FAQ; adapter b the same questions with other answers.
    let qa = faq();
    let other: Vec<serde_json::Value> = qa.iter().map(|(q, a)| serde_json::json!({"question": q, "answer": format!("Support says: {}", a.to_uppercase())})).collect();
    let data_b = dir.join("other.json");
    std::fs::write(&data_b, serde_json::to_string(&other).unwrap()).unwrap();
    let (out_a, out_b) = (dir.join("a"), dir.join("b"));
    run(&["train", s(&spec(dir, &model, &repo().join("examples/faq.json"), &out_a, TEMPLATE))]);
    // b has a template of its own: serve and generate both take it from the adapter.
    run(&["train", s(&spec(dir, &model, &data_b, &out_b, r#"template: "Q: {question}\nA:""#))]);
    assert!(std::fs::read_to_string(out_b.join("lorafleet_prompt.json")).expect("the template is recorded").contains("Q: {question}"));
    // c learns the FAQ through the model's own chat template.
    let out_c = dir.join("c");
    run(&["train", s(&spec(dir, &model, &repo().join("examples/faq.json"), &out_c, &format!("{TEMPLATE}\n  chat_template: model")))]);
    assert!(std::fs::read_to_string(out_c.join("lorafleet_prompt.json")).expect("the format is recorded").contains("\"chat_template\": \"model\""));

    let mut chat = Vec::new();
    for (q, _) in qa.iter().take(3) {
        for (name, out) in [("a", &out_a), ("b", &out_b), ("c", &out_c)] {
            chat.push(serde_json::json!({"model": name, "question": q, "answer": generate(&model, Some(out), q, false)}));
        }
    }
    // The base model answers chat through its chat template (here, untrained, whatever it says).
    chat.push(serde_json::json!({"model": "demo", "question": qa[0].0, "answer": generate(&model, None, &qa[0].0, false)}));
    let raw = vec![
        serde_json::json!({"model": "demo", "prompt": "The answer is", "text": generate(&model, None, "The answer is", true)}),
        serde_json::json!({"model": "a", "prompt": "<human>: How", "text": generate(&model, Some(&out_a), "<human>: How", true)}),
    ];
    let (server, url) = serve(&["--model", s(&model), "--adapter", &format!("a={}", s(&out_a)), "--adapter", &format!("b={}", s(&out_b)), "--adapter", &format!("c={}", s(&out_c)), "--api-key", "test-key", "--max-adapters", "2"]);
    let context = context(&model);
    let expect = serde_json::json!({"models": ["demo", "a", "b", "c"], "chat": chat, "raw": raw, "max_new_tokens": MAX_NEW, "context": context, "distinct": ["a", "b"]});
    client_check(&py, &url, &expect, dir);

    let m = metrics(&url);
    assert!(metric(&m, "lorafleet_serve_generated_tokens_total") > 0.0, "{m}");
    assert!(metric(&m, "lorafleet_serve_adapter_cache_total{result=\"hit\"}") > 0.0, "{m}");
    // Three adapters through a cache of two: the least recently used ones were dropped.
    assert!(metric(&m, "lorafleet_serve_adapter_cache_total{result=\"evicted\"}") > 0.0, "{m}");
    assert!(metric(&m, "lorafleet_serve_time_to_first_token_seconds_count") > 0.0, "{m}");
    // The burst was batched: some pass carried more than one sequence.
    let single = metric(&m, "lorafleet_serve_batch_sequences_bucket{le=\"1\"}");
    let all = metric(&m, "lorafleet_serve_batch_sequences_count");
    assert!(all > single, "no pass batched more than one sequence:\n{m}");
    assert!(m.contains("lorafleet_serve_requests_total{endpoint=\"chat\",status=\"404\"}"), "{m}");
    drop(server);
}

#[test]
fn a_finished_jobs_adapter_is_served_from_the_job_store() {
    let Some(py) = python() else { return };
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path();
    let model = dir.join("demo");
    run(&["demo-model", "--out", s(&model)]);
    // A submitted spec names local sources relative to where `dev` and `submit` run.
    std::fs::copy(repo().join("examples/faq.json"), dir.join("faq.json")).expect("copy data");
    let spec = spec(dir, Path::new("./demo"), Path::new("./faq.json"), Path::new("faq"), TEMPLATE);
    let mut dev = Command::new(BIN).current_dir(dir).args(["dev", "--dir", "dev", "--listen", "127.0.0.1:0"]).stderr(Stdio::piped()).spawn().expect("start dev");
    let stderr = dev.stderr.take().expect("stderr");
    let mut lines = BufReader::new(stderr).lines();
    let coordinator = loop {
        let line = lines.next().expect("dev exited").expect("read dev's output");
        if let Some(rest) = line.split("coordinator on ").nth(1) {
            break rest.split([',', ' ']).next().unwrap_or_default().to_string();
        }
    };
    std::thread::spawn(move || for _ in lines {});
    let dev = Server(dev);
    let conn = ["--coordinator", coordinator.as_str()];
    let out = Command::new(BIN).current_dir(dir).args(["submit", s(&spec), "--json"]).args(conn).output().expect("submit");
    assert!(out.status.success(), "submit: {}", String::from_utf8_lossy(&out.stderr));
    let submitted: serde_json::Value = serde_json::from_slice(&out.stdout).expect("submit --json");
    let job = submitted["id"].as_str().expect("job id").to_string();
    let started = Instant::now();
    loop {
        let st: serde_json::Value = serde_json::from_str(&run(&[&["status", &job, "--json"][..], &conn].concat())).expect("status --json");
        let state = st["state"].as_str().unwrap_or_default().to_string();
        if state.eq_ignore_ascii_case("succeeded") || state.ends_with("SUCCEEDED") {
            break;
        }
        assert!(!state.to_lowercase().contains("fail") && !state.to_lowercase().contains("cancel"), "job ended {state}: {st}");
        assert!(started.elapsed() < Duration::from_secs(600), "job still {state}");
        std::thread::sleep(Duration::from_millis(500));
    }
    let fetched = dir.join("fetched");
    run(&[&["fetch", &job, "-o", s(&fetched)][..], &conn].concat());
    let store = format!("file://{}", s(&dir.join("dev/storage")));
    let (server, url) = serve(&["--model", s(&model), "--adapters-from", &store, "--cache-dir", s(&dir.join("serve-cache"))]);
    let qa = faq();
    let chat: Vec<serde_json::Value> = qa.iter().take(2).map(|(q, _)| serde_json::json!({"model": job, "question": q, "answer": generate(&model, Some(&fetched), q, false)})).collect();
    let expect = serde_json::json!({"models": ["demo"], "chat": chat, "raw": [], "max_new_tokens": MAX_NEW, "context": context(&model)});
    client_check(&py, &url, &expect, dir);
    let m = metrics(&url);
    assert_eq!(metric(&m, "lorafleet_serve_adapter_cache_total{result=\"miss\"}"), 1.0, "the job's adapter is loaded once:\n{m}");
    // Downloaded once into the cache, with the manifest it was verified against.
    assert!(dir.join(format!("serve-cache/jobs/{job}/manifest.json")).exists());
    assert!(dir.join(format!("serve-cache/jobs/{job}/adapter_model.safetensors")).exists());
    drop(server);
    drop(dev);
}

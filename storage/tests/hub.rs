//! `hf://` model sources against a local HTTP server that answers the Hugging Face Hub's
//! API the way the Hub does: `GET /api/models/<repo>/revision/<rev>` (commit + file
//! list) and `GET /<repo>/resolve/<commit>/<file>`, where large files answer with a
//! redirect to a CDN carrying `X-Linked-Etag` (sha256) and `X-Linked-Size`. The real
//! Hub is not reachable from these machines.

use lorafleet_storage::hub::{parse_hf, select_files, Hub, HubRef};
use lorafleet_storage::{Cache, Error};
use sha2::Digest;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const COMMIT: &str = "0123456789abcdef0123456789abcdef01234567";

fn model_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/hf/models/tiny-llama")
}

#[derive(Default)]
struct State {
    files: BTreeMap<String, Vec<u8>>,
    /// Serve a corrupted body for LFS files (the published sha256 stays right).
    corrupt: AtomicBool,
    /// Require this bearer token on the hub (not on the CDN).
    token: Option<String>,
    requests: Mutex<Vec<(String, Option<String>)>>,
    info_calls: AtomicUsize,
}

struct FakeHub {
    url: String,
    state: Arc<State>,
}

fn response(status: &str, headers: &[(&str, String)], body: &[u8]) -> Vec<u8> {
    let mut r = format!("HTTP/1.1 {status}\r\nContent-Length: {}\r\nConnection: close\r\n", body.len());
    for (k, v) in headers {
        r.push_str(&format!("{k}: {v}\r\n"));
    }
    r.push_str("\r\n");
    let mut out = r.into_bytes();
    out.extend_from_slice(body);
    out
}

impl FakeHub {
    async fn start(extra_files: &[(&str, &[u8])], token: Option<&str>) -> Self {
        let mut files = BTreeMap::new();
        for e in std::fs::read_dir(model_dir()).unwrap() {
            let e = e.unwrap();
            files.insert(e.file_name().to_string_lossy().to_string(), std::fs::read(e.path()).unwrap());
        }
        for (n, b) in extra_files {
            files.insert(n.to_string(), b.to_vec());
        }
        let state = Arc::new(State { files, token: token.map(str::to_string), ..Default::default() });
        // Two servers, as on the real Hub: the API/resolve host and a CDN on another origin.
        let hub = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let cdn = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", hub.local_addr().unwrap());
        let cdn_url = format!("http://{}", cdn.local_addr().unwrap());
        for listener in [hub, cdn] {
            let st = state.clone();
            let cdn_url = cdn_url.clone();
            tokio::spawn(async move {
                loop {
                    let (mut sock, _) = listener.accept().await.unwrap();
                    let st = st.clone();
                    let cdn_url = cdn_url.clone();
                    tokio::spawn(async move {
                        let mut buf = Vec::new();
                        let mut tmp = [0u8; 4096];
                        while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
                            let n = sock.read(&mut tmp).await.unwrap();
                            if n == 0 {
                                return;
                            }
                            buf.extend_from_slice(&tmp[..n]);
                        }
                        let head = String::from_utf8_lossy(&buf).to_string();
                        let path = head.split_whitespace().nth(1).unwrap_or("/").to_string();
                        let auth = head.lines().find(|l| l.to_ascii_lowercase().starts_with("authorization:")).map(|l| l["authorization:".len()..].trim().to_string());
                        st.requests.lock().unwrap().push((path.clone(), auth.clone()));
                        let out = Self::answer(&st, &path, auth, &cdn_url);
                        let _ = sock.write_all(&out).await;
                        let _ = sock.shutdown().await;
                    });
                }
            });
        }
        FakeHub { url, state }
    }

    fn answer(st: &State, path: &str, auth: Option<String>, cdn_url: &str) -> Vec<u8> {
        let authorized = st.token.as_ref().is_none_or(|t| auth.as_deref() == Some(&format!("Bearer {t}")));
        if let Some(rest) = path.strip_prefix("/api/models/") {
            if !authorized {
                return response("401 Unauthorized", &[], b"{}");
            }
            st.info_calls.fetch_add(1, Ordering::SeqCst);
            let ok = rest == "org/tiny-llama/revision/main" || rest == format!("org/tiny-llama/revision/{COMMIT}");
            if !ok {
                return response("404 Not Found", &[], b"{\"error\":\"Repository not found\"}");
            }
            let mut siblings: Vec<serde_json::Value> = st.files.keys().map(|n| serde_json::json!({ "rfilename": n })).collect();
            siblings.push(serde_json::json!({ "rfilename": "README.md" }));
            siblings.push(serde_json::json!({ "rfilename": "onnx/model.onnx" }));
            let body = serde_json::json!({ "id": "org/tiny-llama", "sha": COMMIT, "siblings": siblings }).to_string();
            return response("200 OK", &[("Content-Type", "application/json".into())], body.as_bytes());
        }
        if let Some(rest) = path.strip_prefix(&format!("/org/tiny-llama/resolve/{COMMIT}/")) {
            if !authorized {
                return response("401 Unauthorized", &[], b"");
            }
            let Some(data) = st.files.get(rest) else { return response("404 Not Found", &[], b"") };
            if rest.ends_with(".safetensors") {
                let sha = hex::encode(sha2::Sha256::digest(data));
                return response(
                    "302 Found",
                    &[("Location", format!("{cdn_url}/cdn/{rest}")), ("X-Linked-Etag", format!("\"{sha}\"")), ("X-Linked-Size", data.len().to_string())],
                    b"",
                );
            }
            return response("200 OK", &[("ETag", "\"gitblobsha1\"".into())], data);
        }
        if let Some(rest) = path.strip_prefix("/cdn/") {
            let Some(data) = st.files.get(rest) else { return response("404 Not Found", &[], b"") };
            let mut data = data.clone();
            if st.corrupt.load(Ordering::SeqCst) {
                data[100] ^= 0xff;
            }
            return response("200 OK", &[], &data);
        }
        response("404 Not Found", &[], b"")
    }
}

fn same_files(a: &Path, b: &Path, names: &[&str]) {
    for n in names {
        assert_eq!(std::fs::read(a.join(n)).unwrap(), std::fs::read(b.join(n)).unwrap(), "{n}");
    }
}

#[test]
fn parses_sources() {
    assert_eq!(parse_hf("hf://org/name").unwrap(), HubRef { repo: "org/name".into(), revision: "main".into() });
    assert_eq!(parse_hf("hf://gpt2@v1.0").unwrap(), HubRef { repo: "gpt2".into(), revision: "v1.0".into() });
    assert_eq!(parse_hf("hf://tiiuae/falcon-7b@refs/pr/1").unwrap().revision, "refs/pr/1");
    for bad in ["hf://", "hf://a/b/c", "hf://../x", "hf://org/.x", "hf://org/x@", "hf://org/x@a b", "hf://org/x@../main", "hf://org/na me"] {
        let e = parse_hf(bad).unwrap_err();
        assert!(matches!(e, Error::UnsupportedSource { .. }), "{bad}: {e}");
    }
}

#[test]
fn selects_what_lorafleet_reads() {
    let files: Vec<String> =
        ["config.json", "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "README.md", "onnx/model.safetensors", "tokenizer.json", ".gitattributes"]
            .iter()
            .map(|s| s.to_string())
            .collect();
    assert_eq!(
        select_files("hf://o/m", &files).unwrap(),
        ["config.json", "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors", "model.safetensors.index.json", "tokenizer.json"]
    );
    let e = select_files("hf://o/m", &["config.json".into(), "pytorch_model.bin".into()]).unwrap_err().to_string();
    assert!(e.contains("no *.safetensors") && e.contains("pytorch_model.bin"), "{e}");
    let e = select_files("hf://o/m", &["model.safetensors".into()]).unwrap_err().to_string();
    assert!(e.contains("no config.json"), "{e}");
}

#[tokio::test]
async fn fetches_a_model_verified_and_cached_by_commit() {
    let hub = FakeHub::start(&[], Some("hf_secret")).await;
    let client = Hub::new(&hub.url, Some("hf_secret".into())).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let cache = Cache::new(tmp.path());
    let dir = cache.hub_model("hf://org/tiny-llama", &client).await.unwrap();
    same_files(&dir, &model_dir(), &["config.json", "generation_config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"]);
    assert!(!dir.join("README.md").exists() && !dir.join("onnx").exists(), "only what lorafleet reads is fetched");
    let m: serde_json::Value = serde_json::from_slice(&std::fs::read(dir.join("manifest.json")).unwrap()).unwrap();
    assert_eq!(m["meta"]["commit"], COMMIT);
    // The token went to the hub, never to the CDN.
    for (path, auth) in hub.state.requests.lock().unwrap().iter() {
        if path.starts_with("/cdn/") {
            assert_eq!(auth, &None, "{path}");
        } else {
            assert_eq!(auth.as_deref(), Some("Bearer hf_secret"), "{path}");
        }
    }
    // Second use: the revision is resolved again, nothing is downloaded again.
    let n = hub.state.requests.lock().unwrap().len();
    assert_eq!(cache.hub_model("hf://org/tiny-llama", &client).await.unwrap(), dir);
    assert_eq!(hub.state.requests.lock().unwrap().len(), n + 1);
    // A pinned commit resolves to the same cached directory.
    assert_eq!(cache.hub_model(&format!("hf://org/tiny-llama@{COMMIT}"), &client).await.unwrap(), dir);
}

#[tokio::test]
async fn refuses_corrupt_downloads_and_leaves_nothing_behind() {
    let hub = FakeHub::start(&[], None).await;
    hub.state.corrupt.store(true, Ordering::SeqCst);
    let client = Hub::new(&hub.url, None).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let cache = Cache::new(tmp.path());
    let e = cache.hub_model("hf://org/tiny-llama", &client).await.unwrap_err();
    assert!(matches!(e, Error::Corrupt { .. }), "{e}");
    assert!(e.to_string().contains("model.safetensors"), "{e}");
    let left: Vec<_> = std::fs::read_dir(tmp.path().join("models")).unwrap().collect();
    assert!(left.is_empty(), "nothing half-fetched stays in the cache: {left:?}");
    // Once the CDN serves the right bytes, the same cache succeeds.
    hub.state.corrupt.store(false, Ordering::SeqCst);
    cache.hub_model("hf://org/tiny-llama", &client).await.unwrap();
}

#[tokio::test]
async fn clear_errors_for_missing_repos_and_tokens() {
    let hub = FakeHub::start(&[], Some("hf_secret")).await;
    let tmp = tempfile::tempdir().unwrap();
    let cache = Cache::new(tmp.path());
    let e = cache.hub_model("hf://org/tiny-llama", &Hub::new(&hub.url, None).unwrap()).await.unwrap_err();
    assert!(e.to_string().contains("HF_TOKEN") && !e.is_retryable(), "{e}");
    let authed = Hub::new(&hub.url, Some("hf_secret".into())).unwrap();
    let e = cache.hub_model("hf://org/nope", &authed).await.unwrap_err();
    assert!(e.to_string().contains("404") && e.to_string().contains("hf://org/nope") && !e.is_retryable(), "{e}");
    // Nothing listening: retryable (a worker's attempt is retried).
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let e = cache.hub_model("hf://org/tiny-llama", &Hub::new(&format!("http://127.0.0.1:{port}"), None).unwrap()).await.unwrap_err();
    assert!(e.is_retryable(), "{e}");
}

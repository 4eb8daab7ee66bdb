//! Storage against a real Azure Blob Storage emulator (Azurite, started here on a free
//! port). These tests never skip: without `azurite-blob` they fail and say how to install
//! it (`scripts/s3-server.sh install-azurite`).

mod common;

use lorafleet_storage::testing::AzuriteServer;
use lorafleet_storage::{Cache, Error, RelPath, Storage};

async fn server() -> AzuriteServer {
    AzuriteServer::start().await.unwrap_or_else(|e| panic!("{e}"))
}

async fn open(srv: &AzuriteServer) -> Storage {
    Storage::open_with(&srv.unique_url("prefix/a").await, &srv.options()).unwrap()
}

/// The same scenarios as the S3 and local backends: directories with manifests, sha256
/// verification, create-only writes (a 16-writer race has one winner), datasets, cache.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn azure_backend_scenarios() {
    let srv = server().await;
    common::dir_round_trip(&open(&srv).await).await;
    common::corruption_detected(&open(&srv).await).await;
    common::create_only(&open(&srv).await).await;
    common::create_only_race(&open(&srv).await).await;
    common::datasets_and_cache(&open(&srv).await, &srv.options()).await;
}

/// An az:// model source is fetched into the cache, only its own prefix.
#[tokio::test]
async fn azure_model_source_and_prefix_isolation() {
    let srv = server().await;
    let url = srv.unique_url("models/tiny").await;
    let container_root = url.trim_end_matches("/models/tiny").to_string();
    let model = Storage::open_with(&url, &srv.options()).unwrap();
    let src = tempfile::tempdir().unwrap();
    common::write(src.path(), "config.json", b"{}");
    common::write(src.path(), "model.safetensors", &vec![7u8; 3000]);
    model.upload_dir(&RelPath::parse("d").unwrap(), src.path(), Default::default()).await.unwrap();
    let other = Storage::open_with(&format!("{container_root}/models/other"), &srv.options()).unwrap();
    other.put_bytes(&RelPath::parse("d/x").unwrap(), bytes::Bytes::from_static(b"not mine")).await.unwrap();

    let cache_dir = tempfile::tempdir().unwrap();
    let dir = Cache::new(cache_dir.path()).model(&format!("{url}/d"), &srv.options()).await.unwrap();
    assert_eq!(std::fs::read(dir.join("model.safetensors")).unwrap(), vec![7u8; 3000]);
    assert_eq!(std::fs::read(dir.join("config.json")).unwrap(), b"{}");
    assert!(!dir.join("x").exists());
}

/// A wrong account key is refused (Shared Key enforced), and not retried as transient.
#[tokio::test]
async fn azure_bad_key_refused() {
    let srv = server().await;
    let mut opts = srv.options();
    opts.azure.retain(|(k, _)| k != "azure_storage_account_key");
    opts.azure.push(("azure_storage_account_key".into(), "d3Jvbmcta2V5LXdyb25nLWtleS13cm9uZy1rZXk=".into()));
    let s = Storage::open_with(&srv.unique_url("p").await, &opts).unwrap();
    let err = s.put_bytes(&RelPath::parse("k").unwrap(), bytes::Bytes::from_static(b"v")).await.unwrap_err();
    assert!(matches!(err, Error::Store { .. }), "{err:?}");
}

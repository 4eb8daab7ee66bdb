//! Storage against a real SeaweedFS S3 server (started here, or shared through
//! `LORAFLEET_TEST_S3_ENDPOINT`). These tests never skip: without `weed` they fail
//! and say how to install it.

mod common;

use lorafleet_storage::testing::S3Server;
use lorafleet_storage::{Cache, Error, RelPath, Storage, StorageOptions};

async fn server() -> S3Server {
    S3Server::start().await.unwrap_or_else(|e| panic!("{e}"))
}

fn open(srv: &S3Server) -> Storage {
    Storage::open_with(&srv.unique_url("prefix/a"), &srv.options()).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn s3_backend_scenarios() {
    let srv = server().await;
    let s = open(&srv);
    common::dir_round_trip(&s).await;
    common::corruption_detected(&open(&srv)).await;
    common::create_only(&open(&srv)).await;
    common::create_only_race(&open(&srv)).await;
    common::datasets_and_cache(&open(&srv), &srv.options()).await;
}

/// Objects written through a prefixed storage are listed only under that prefix.
#[tokio::test]
async fn s3_prefix_isolation_and_model_fetch() {
    let srv = server().await;
    let url = srv.unique_url("models/tiny");
    let bucket_root = url.trim_end_matches("/models/tiny").to_string();
    let model = Storage::open_with(&url, &srv.options()).unwrap();
    let src = tempfile::tempdir().unwrap();
    common::write(src.path(), "config.json", b"{}");
    common::write(src.path(), "model.safetensors", &vec![7u8; 3000]);
    // A model uploaded without a manifest is fetched by listing (sizes checked).
    model.put_file(&RelPath::parse("config.json").unwrap(), &src.path().join("config.json")).await.unwrap();
    model.put_file(&RelPath::parse("model.safetensors").unwrap(), &src.path().join("model.safetensors")).await.unwrap();
    let other = Storage::open_with(&format!("{bucket_root}/models/other"), &srv.options()).unwrap();
    other.put_bytes(&RelPath::parse("x").unwrap(), bytes::Bytes::from_static(b"not mine")).await.unwrap();

    let cache_dir = tempfile::tempdir().unwrap();
    let cache = Cache::new(cache_dir.path());
    let dir = cache.model(&url, &srv.options()).await.unwrap();
    assert_eq!(std::fs::read(dir.join("model.safetensors")).unwrap(), vec![7u8; 3000]);
    assert!(!dir.join("x").exists());
    // Second call is a cache hit (works with the server's copy gone).
    model.delete(&RelPath::parse("model.safetensors").unwrap()).await.unwrap();
    assert_eq!(cache.model(&url, &srv.options()).await.unwrap(), dir);

    // A model with a manifest is verified against it.
    let url2 = format!("{bucket_root}/models/with-manifest");
    let m2 = Storage::open_with(&url2, &srv.options()).unwrap();
    common::write(src.path(), "manifest.json", b""); // not uploaded: reserved name
    std::fs::remove_file(src.path().join("manifest.json")).unwrap();
    let root = RelPath::parse("d").unwrap();
    let manifest = m2.upload_dir(&root, src.path(), Default::default()).await.unwrap();
    assert_eq!(manifest.files.len(), 2);
    let fetched = cache.model(&format!("{url2}/d"), &srv.options()).await.unwrap();
    assert_eq!(std::fs::read(fetched.join("config.json")).unwrap(), b"{}");
}

/// Wrong credentials are refused (SigV4 enforced), and that error is not retryable.
#[tokio::test]
async fn s3_bad_credentials_refused() {
    let srv = server().await;
    let mut opts: StorageOptions = srv.options();
    opts.s3.retain(|(k, _)| k != "aws_secret_access_key");
    opts.s3.push(("aws_secret_access_key".into(), "wrong-secret".into()));
    let s = Storage::open_with(&srv.unique_url("p"), &opts).unwrap();
    let err = s.put_bytes(&RelPath::parse("k").unwrap(), bytes::Bytes::from_static(b"v")).await.unwrap_err();
    assert!(matches!(err, Error::Store { .. }), "{err:?}");
}

//! Storage against memory:// and file:// backends.

mod common;

use lorafleet_storage::{Error, RelPath, Storage, StorageOptions};

fn file_storage() -> (tempfile::TempDir, Storage) {
    let d = tempfile::tempdir().unwrap();
    let url = url::Url::from_directory_path(d.path().join("root")).unwrap().to_string();
    let s = Storage::open_with(&url, &small_parts()).unwrap();
    (d, s)
}

/// 5 MiB parts (the S3 minimum), so the 11 MiB test file is a multipart upload.
fn small_parts() -> StorageOptions {
    StorageOptions { part_size: Some(5 * 1024 * 1024), ..Default::default() }
}

#[tokio::test]
async fn memory_dir_round_trip() {
    common::dir_round_trip(&Storage::open_with("memory://p/q", &small_parts()).unwrap()).await;
}

#[tokio::test]
async fn file_dir_round_trip() {
    let (_d, s) = file_storage();
    common::dir_round_trip(&s).await;
}

#[tokio::test]
async fn memory_corruption_detected() {
    common::corruption_detected(&Storage::open("memory://").unwrap()).await;
}

#[tokio::test]
async fn file_corruption_detected() {
    let (_d, s) = file_storage();
    common::corruption_detected(&s).await;
}

#[tokio::test]
async fn memory_and_file_create_only() {
    common::create_only(&Storage::open("memory://x").unwrap()).await;
    let (_d, s) = file_storage();
    common::create_only(&s).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn file_create_only_race() {
    let (_d, s) = file_storage();
    common::create_only_race(&s).await;
}

#[tokio::test]
async fn file_datasets_and_cache() {
    let (_d, s) = file_storage();
    common::datasets_and_cache(&s, &Default::default()).await;
}

/// Keys stay under the configured directory: nothing can be written outside it.
#[tokio::test]
async fn keys_cannot_escape_the_prefix() {
    let d = tempfile::tempdir().unwrap();
    let root = d.path().join("root");
    let s = Storage::open(url::Url::from_directory_path(&root).unwrap().as_str()).unwrap();
    for bad in ["../escape", "/etc/x", "a/../../b", "a\0b", "a/./b", ""] {
        assert!(matches!(RelPath::parse(bad), Err(Error::InvalidKey { .. })), "{bad:?}");
    }
    // A directory containing a symlink is refused rather than followed.
    let src = d.path().join("src");
    std::fs::create_dir_all(&src).unwrap();
    std::os::unix::fs::symlink("/etc/hostname", src.join("link")).unwrap();
    let key = RelPath::parse("jobs/j/adapter").unwrap();
    assert!(matches!(s.upload_dir(&key, &src, Default::default()).await, Err(Error::InvalidKey { .. })));
    // A manifest naming an escaping file is refused before anything is downloaded.
    let evil = br#"{"format":"lorafleet.manifest.v1","files":[{"name":"../../outside","size":1,"sha256":"6b86b273ff34fce19d6b804eff5a3f5747ada4eaa22f1d49c01e52ddb7875b4b"}]}"#;
    s.put_bytes(&RelPath::parse("jobs/j/adapter/manifest.json").unwrap(), bytes::Bytes::from_static(evil)).await.unwrap();
    let dest = d.path().join("dest");
    assert!(matches!(s.download_dir(&key, &dest).await, Err(Error::InvalidManifest { .. })));
    assert!(!d.path().join("outside").exists());
    // Everything written so far lives under root/.
    let all: Vec<_> = std::fs::read_dir(d.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert!(all.iter().all(|n| n == "root" || n == "src"), "{all:?}");
}

#[test]
fn urls() {
    for bad in ["gs://b/p", "az:///nocontainer", "ftp://x", "not a url", "s3:///nobucket"] {
        assert!(matches!(Storage::open(bad), Err(Error::InvalidUrl { .. })), "{bad}");
    }
    let gs = Storage::open("gs://b/p").unwrap_err().to_string();
    assert!(gs.contains("no gs:// storage"), "{gs}");
    assert!(lorafleet_storage::parse_dataset_ref("./faq.json").is_none());
    assert!(lorafleet_storage::parse_dataset_ref("dataset://sha256/xyz").unwrap().is_err());
    assert!(lorafleet_storage::parse_dataset_ref("dataset://md5/ab").unwrap().is_err());
    let ok = format!("dataset://sha256/{}", "a".repeat(64));
    assert!(lorafleet_storage::parse_dataset_ref(&ok).unwrap().is_ok());
}

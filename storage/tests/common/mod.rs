//! Scenarios run against every backend (memory://, file://, SeaweedFS s3://).

use bytes::Bytes;
use lorafleet_storage::{layout, Cache, Error, RelPath, Segment, Sha256Hex, Storage, StorageOptions};
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;
use std::path::Path;

pub fn write(dir: &Path, name: &str, data: &[u8]) {
    let p = dir.join(name);
    std::fs::create_dir_all(p.parent().unwrap()).unwrap();
    std::fs::write(p, data).unwrap();
}

fn pseudo_random(n: usize, seed: u8) -> Vec<u8> {
    let mut x: u32 = 0x9E3779B9 ^ seed as u32;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            x as u8
        })
        .collect()
}

fn entries(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
    v.sort();
    v
}

/// Upload a checkpoint directory (with a multipart-sized file), download it, compare.
pub async fn dir_round_trip(s: &Storage) {
    let src = tempfile::tempdir().unwrap();
    let big = pseudo_random(11 * 1024 * 1024 + 17, 1); // 3 parts of 5 MiB
    assert!(big.len() > s.multipart_threshold(), "the big file must go up as a multipart upload");
    write(src.path(), "adapter_model.safetensors", &big);
    write(src.path(), "adapter_config.json", b"{\"r\": 8}");
    write(src.path(), "state/optimizer.safetensors", &pseudo_random(1000, 2));
    let job = Segment::new("job-1").unwrap();
    let dir = layout::checkpoint(&job, 2, 10);
    let mut meta = BTreeMap::new();
    meta.insert("step".to_string(), serde_json::json!(10));
    let m = s.upload_dir(&dir, src.path(), meta).await.unwrap();
    assert_eq!(m.files.len(), 3);
    assert_eq!(m.files.iter().map(|f| f.name.as_str()).collect::<Vec<_>>(), ["adapter_config.json", "adapter_model.safetensors", "state/optimizer.safetensors"]);
    let big_entry = &m.files[1];
    assert_eq!(big_entry.size, big.len() as u64);
    assert_eq!(big_entry.sha256, hex::encode(Sha256::digest(&big)));

    // Uploading the same directory again (a retried upload) is fine; different content is not.
    s.upload_dir(&dir, src.path(), m.meta.clone()).await.unwrap();
    write(src.path(), "adapter_config.json", b"{\"r\": 16}");
    match s.upload_dir(&dir, src.path(), m.meta.clone()).await {
        Err(Error::AlreadyExists { .. }) => {}
        other => panic!("expected AlreadyExists, got {other:?}"),
    }

    let dest = tempfile::tempdir().unwrap();
    let got = s.download_dir(&dir, &dest.path().join("ckpt")).await.unwrap();
    assert_eq!(got, m);
    assert_eq!(std::fs::read(dest.path().join("ckpt/adapter_model.safetensors")).unwrap(), big);
    assert_eq!(std::fs::read(dest.path().join("ckpt/state/optimizer.safetensors")).unwrap(), pseudo_random(1000, 2));
    // Only the manifest's content (the first upload) is referenced.
    assert_eq!(std::fs::read(dest.path().join("ckpt/adapter_config.json")).unwrap(), b"{\"r\": 8}");
    assert_eq!(entries(&dest.path().join("ckpt")), ["adapter_config.json", "adapter_model.safetensors", "manifest.json", "state"]);

    let listed = s.list(&dir).await.unwrap();
    assert_eq!(listed.len(), 4, "{listed:?}");
    assert!(s.read_manifest(&layout::checkpoint(&job, 2, 11)).await.unwrap().is_none());
}

/// A stored object modified after the manifest: the download fails with a sha
/// mismatch, and no file (partial or complete) is left in the destination.
pub async fn corruption_detected(s: &Storage) {
    let src = tempfile::tempdir().unwrap();
    write(src.path(), "adapter_model.safetensors", &pseudo_random(4096, 3));
    let dir = layout::adapter(&Segment::new("job-c").unwrap(), 1);
    s.upload_dir(&dir, src.path(), BTreeMap::new()).await.unwrap();
    let key = dir.child(Segment::new("adapter_model.safetensors").unwrap());
    let mut bad = pseudo_random(4096, 3);
    bad[100] ^= 1;
    s.put_bytes(&key, Bytes::from(bad)).await.unwrap();

    let dest = tempfile::tempdir().unwrap();
    std::fs::write(dest.path().join("keep.txt"), b"x").unwrap();
    match s.download_dir(&dir, dest.path()).await {
        Err(Error::Corrupt { key: k, .. }) => assert!(k.ends_with("adapter_model.safetensors"), "{k}"),
        other => panic!("expected a checksum mismatch, got {other:?}"),
    }
    assert_eq!(entries(dest.path()), ["keep.txt"], "nothing but the pre-existing file");

    // A truncated object (size differs) is refused the same way.
    s.put_bytes(&key, Bytes::from(pseudo_random(10, 3))).await.unwrap();
    assert!(matches!(s.download_dir(&dir, dest.path()).await, Err(Error::Corrupt { .. })));
    assert_eq!(entries(dest.path()), ["keep.txt"]);
}

pub async fn create_only(s: &Storage) {
    s.check_create_only().await.unwrap();
    let key = RelPath::parse("jobs/j/adapter/manifest.json").unwrap();
    s.put_create_only(&key, Bytes::from_static(b"one")).await.unwrap();
    s.put_create_only(&key, Bytes::from_static(b"one")).await.unwrap(); // identical retry
    assert!(matches!(s.put_create_only(&key, Bytes::from_static(b"two")).await, Err(Error::AlreadyExists { .. })));
    assert_eq!(&s.get_bytes(&key).await.unwrap()[..], b"one");
}

/// 16 concurrent create-only writers of the same key with different content: exactly one wins.
pub async fn create_only_race(s: &Storage) {
    let key = RelPath::parse("race/manifest.json").unwrap();
    let mut tasks = Vec::new();
    for i in 0..16u8 {
        let s = s.clone();
        let key = key.clone();
        tasks.push(tokio::spawn(async move { (i, s.put_create_only(&key, Bytes::from(vec![i; 64])).await) }));
    }
    let mut winners = Vec::new();
    for t in tasks {
        let (i, r) = t.await.unwrap();
        match r {
            Ok(()) => winners.push(i),
            Err(Error::AlreadyExists { .. }) => {}
            Err(e) => panic!("writer {i}: unexpected error {e}"),
        }
    }
    assert_eq!(winners.len(), 1, "winners: {winners:?}");
    assert_eq!(&s.get_bytes(&key).await.unwrap()[..], &vec![winners[0]; 64][..]);
}

pub async fn datasets_and_cache(s: &Storage, opts: &StorageOptions) {
    let src = tempfile::tempdir().unwrap();
    let data = b"[{\"question\": \"q\", \"answer\": \"a\"}]".to_vec();
    write(src.path(), "faq.json", &data);
    let (sha, size) = s.put_dataset_file(&src.path().join("faq.json")).await.unwrap();
    assert_eq!(size, data.len() as u64);
    assert_eq!(sha.as_str(), hex::encode(Sha256::digest(&data)));
    assert_eq!(s.put_dataset_bytes(Bytes::from(data.clone())).await.unwrap(), sha);

    let cache_dir = tempfile::tempdir().unwrap();
    let cache = Cache::new(cache_dir.path());
    let p = cache.dataset(s, &sha).await.unwrap();
    assert_eq!(std::fs::read(&p).unwrap(), data);
    // A corrupted cache entry is fetched again.
    std::fs::write(&p, b"garbage").unwrap();
    assert_eq!(std::fs::read(cache.dataset(s, &sha).await.unwrap()).unwrap(), data);

    let missing = Sha256Hex::parse(&"0".repeat(64)).unwrap();
    assert!(matches!(cache.dataset(s, &missing).await, Err(Error::NotFound { .. })));

    // Plain paths and file:// model sources are used in place.
    assert_eq!(cache.model("/models/x", opts).await.unwrap(), Path::new("/models/x"));
    assert_eq!(cache.model("file:///models/x", opts).await.unwrap(), Path::new("/models/x"));
    assert!(matches!(cache.model("hf://../m", opts).await, Err(Error::UnsupportedSource { .. })));
    assert!(matches!(cache.model("hf://org/m@bad rev", opts).await, Err(Error::UnsupportedSource { .. })));
}

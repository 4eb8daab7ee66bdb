//! `lorafleet fetch`: stream the adapter through DownloadAdapter, verify every file's
//! sha256 and size, and rename each into place only once verified.

use super::status_err;
use anyhow::{bail, Context};
use lorafleet_proto as pb;
use lorafleet_proto::job_service_client::JobServiceClient;
use lorafleet_storage::RelPath;
use sha2::{Digest, Sha256};
use std::path::{Path, PathBuf};
use tokio::io::AsyncWriteExt;
use lorafleet_proto::connect::AuthChannel;

struct Partial {
    tmp: PathBuf,
    dest: PathBuf,
    file: tokio::fs::File,
    hasher: Sha256,
    written: u64,
}

/// Deletes temp files left by a failed fetch.
struct Cleanup(Vec<PathBuf>);

impl Drop for Cleanup {
    fn drop(&mut self) {
        for p in &self.0 {
            let _ = std::fs::remove_file(p);
        }
    }
}

pub async fn fetch(client: &mut JobServiceClient<AuthChannel>, job: &str, out: &Path) -> anyhow::Result<Vec<(String, u64)>> {
    let mut stream = client.download_adapter(pb::DownloadAdapterRequest { job_id: job.to_string() }).await.map_err(status_err)?.into_inner();
    let first = stream.message().await.map_err(status_err)?.context("empty download stream")?;
    let manifest = match first.part {
        Some(pb::download_adapter_response::Part::Manifest(m)) => m,
        _ => bail!("download stream did not start with the adapter manifest"),
    };
    let mut names = Vec::new();
    for f in &manifest.files {
        let rel = RelPath::parse(&f.name).map_err(|e| anyhow::anyhow!("refusing adapter file name: {e}"))?;
        if f.sha256.len() != 64 {
            bail!("adapter file {}: malformed sha256", f.name);
        }
        names.push(rel);
    }
    tokio::fs::create_dir_all(out).await.with_context(|| format!("creating {}", out.display()))?;
    let mut cleanup = Cleanup(Vec::new());
    let mut open: Option<(usize, Partial)> = None;
    let mut done = vec![false; manifest.files.len()];

    let finish = |i: usize, p: Partial, manifest: &pb::AdapterManifest| -> anyhow::Result<(PathBuf, PathBuf)> {
        let f = &manifest.files[i];
        let got = hex::encode(p.hasher.finalize());
        if p.written != f.size || got != f.sha256 {
            bail!("{}: checksum mismatch (expected sha256 {} and {} bytes, got {got} and {} bytes); nothing written", f.name, f.sha256, f.size, p.written);
        }
        Ok((p.tmp, p.dest))
    };
    let mut verified: Vec<(PathBuf, PathBuf)> = Vec::new();
    while let Some(msg) = stream.message().await.map_err(status_err)? {
        let Some(pb::download_adapter_response::Part::Chunk(c)) = msg.part else { bail!("unexpected second manifest in download stream") };
        let i = c.file_index as usize;
        if i >= manifest.files.len() || done[i] {
            bail!("download stream names file index {i} out of order");
        }
        if open.as_ref().map(|(j, _)| *j) != Some(i) {
            if let Some((j, p)) = open.take() {
                p.file.sync_all().await.ok();
                verified.push(finish(j, p, &manifest)?);
                done[j] = true;
            }
            let dest = names[i].to_local(out);
            if let Some(parent) = dest.parent() {
                tokio::fs::create_dir_all(parent).await?;
            }
            let tmp = dest.with_file_name(format!(".{}.partial-{}", names[i].file_name(), uuid::Uuid::new_v4().simple()));
            cleanup.0.push(tmp.clone());
            let file = tokio::fs::File::create(&tmp).await.with_context(|| format!("creating {}", tmp.display()))?;
            open = Some((i, Partial { tmp, dest, file, hasher: Sha256::new(), written: 0 }));
        }
        let (_, p) = open.as_mut().expect("just opened");
        if c.offset != p.written {
            bail!("{}: chunk at offset {} but {} bytes received", manifest.files[i].name, c.offset, p.written);
        }
        p.hasher.update(&c.data);
        p.written += c.data.len() as u64;
        p.file.write_all(&c.data).await?;
    }
    if let Some((j, mut p)) = open.take() {
        p.file.flush().await?;
        p.file.sync_all().await.ok();
        verified.push(finish(j, p, &manifest)?);
        done[j] = true;
    }
    for (i, f) in manifest.files.iter().enumerate() {
        if !done[i] {
            if f.size == 0 && f.sha256 == hex::encode(Sha256::digest(b"")) {
                let dest = names[i].to_local(out);
                tokio::fs::write(&dest, b"").await?;
                continue;
            }
            bail!("download ended before {} arrived", f.name);
        }
    }
    // Everything verified: move the files into place.
    for (tmp, dest) in verified {
        tokio::fs::rename(&tmp, &dest).await.with_context(|| format!("moving into {}", dest.display()))?;
    }
    cleanup.0.clear();
    Ok(manifest.files.iter().map(|f| (f.name.clone(), f.size)).collect())
}

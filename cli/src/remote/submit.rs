//! `lorafleet submit`: validate locally, upload local datasets, submit.

use super::status_err;
use anyhow::{bail, Context};
use lorafleet_proto as pb;
use lorafleet_proto::job_service_client::JobServiceClient;
use lorafleet_shared::spec::{JobSpec, SpecContext};
use sha2::{Digest, Sha256};
use std::path::{Path, PathBuf};
use tokio::io::AsyncReadExt;
use lorafleet_proto::connect::AuthChannel;

const CHUNK: usize = 1024 * 1024;

/// Parse and validate a spec for the control plane. A leading `./` of `output.dir`
/// is dropped (`./out/faq` and `out/faq` name the same place under the job's prefix).
pub fn load_remote_spec(path: &Path) -> anyhow::Result<JobSpec> {
    let text = std::fs::read_to_string(path).with_context(|| format!("{}: cannot read spec", path.display()))?;
    let mut spec = JobSpec::from_yaml(&text, SpecContext::Local).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
    let mut dir = spec.output.dir.as_str();
    while let Some(rest) = dir.strip_prefix("./") {
        dir = rest.trim_start_matches('/');
    }
    spec.output.dir = dir.to_string();
    spec.validate(SpecContext::Remote).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
    Ok(spec)
}

/// A path from the spec: as given if it exists (relative to the working directory),
/// else beside the spec file (as `lorafleet train` resolves it).
fn spec_path(spec_dir: &Path, p: &str) -> PathBuf {
    let path = PathBuf::from(p);
    if path.is_absolute() || path.exists() {
        return path;
    }
    let beside = spec_dir.join(&path);
    if beside.exists() {
        beside
    } else {
        path
    }
}

pub async fn submit(client: &mut JobServiceClient<AuthChannel>, path: &Path, idempotency_key: Option<String>) -> anyhow::Result<pb::Job> {
    let mut spec = load_remote_spec(path)?;
    let spec_dir = path.parent().map(Path::to_path_buf).unwrap_or_default();

    // Local model paths go as written: the coordinator accepts relative paths only,
    // resolved by each worker in its working directory (shared, as with `lorafleet dev`).
    let src = spec.model.source.clone();
    if !src.contains("://") && !Path::new(&src).exists() {
        eprintln!("warning: model.source {src} does not exist here; workers must have it (the demo model: `lorafleet demo-model --out {src}`)");
    }
    spec.data.train = upload_if_local(client, &spec_dir, "data.train", &spec.data.train).await?;
    if let Some(e) = spec.data.eval.clone() {
        spec.data.eval = Some(upload_if_local(client, &spec_dir, "data.eval", &e).await?);
    }
    let req = pb::SubmitJobRequest { spec: Some(pb::JobSpec::from(&spec)), idempotency_key: idempotency_key.unwrap_or_default() };
    let r = client.submit_job(req).await.map_err(status_err)?.into_inner();
    let job = r.job.context("coordinator answered without the job")?;
    if !r.created {
        eprintln!("job {} already existed for this idempotency key", job.job_id);
    }
    Ok(job)
}

async fn upload_if_local(client: &mut JobServiceClient<AuthChannel>, spec_dir: &Path, field: &str, value: &str) -> anyhow::Result<String> {
    if value.contains("://") {
        return Ok(value.to_string());
    }
    let p = spec_path(spec_dir, value);
    if !p.is_file() {
        bail!("{field}: dataset file {} not found", p.display());
    }
    upload_dataset(client, &p).await.with_context(|| format!("{field}: uploading {}", p.display()))
}

/// Stream a file through UploadDataset; returns its `dataset://sha256/...` ref.
pub async fn upload_dataset(client: &mut JobServiceClient<AuthChannel>, path: &Path) -> anyhow::Result<String> {
    let (size, sha) = {
        let mut f = tokio::fs::File::open(path).await?;
        let mut h = Sha256::new();
        let mut buf = vec![0u8; CHUNK];
        let mut n = 0u64;
        loop {
            let k = f.read(&mut buf).await?;
            if k == 0 {
                break;
            }
            h.update(&buf[..k]);
            n += k as u64;
        }
        (n, hex::encode(h.finalize()))
    };
    let file_name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| "data".into());
    let path = path.to_path_buf();
    let header = pb::UploadDatasetRequest { part: Some(pb::upload_dataset_request::Part::Header(pb::UploadDatasetHeader { file_name, size, sha256: sha.clone() })) };
    let (tx, rx) = tokio::sync::mpsc::channel::<pb::UploadDatasetRequest>(4);
    let reader = tokio::spawn(async move {
        if tx.send(header).await.is_err() {
            return Ok(());
        }
        let mut f = tokio::fs::File::open(&path).await?;
        loop {
            let mut buf = vec![0u8; CHUNK];
            let k = f.read(&mut buf).await?;
            if k == 0 {
                return Ok::<(), std::io::Error>(());
            }
            buf.truncate(k);
            if tx.send(pb::UploadDatasetRequest { part: Some(pb::upload_dataset_request::Part::Data(buf)) }).await.is_err() {
                return Ok(());
            }
        }
    });
    let r = client.upload_dataset(tokio_stream::wrappers::ReceiverStream::new(rx)).await.map_err(status_err)?.into_inner();
    reader.await.context("reading the dataset")??;
    if r.sha256 != sha {
        bail!("coordinator stored sha256 {} but the file has {sha}", r.sha256);
    }
    Ok(r.dataset_ref)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn output_dir_dot_prefix_is_dropped_and_escapes_refused() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("s.yaml");
        let base = "name: t\nmodel: { source: ./m }\ndata: { train: ./d.json }\n";
        std::fs::write(&p, format!("{base}output: {{ dir: ./out/faq }}\n")).unwrap();
        assert_eq!(load_remote_spec(&p).unwrap().output.dir, "out/faq");
        for bad in ["../up", "/abs/x", "out/../../x", "a\\u0000b"] {
            std::fs::write(&p, format!("{base}output: {{ dir: \"{bad}\" }}\n")).unwrap();
            let e = load_remote_spec(&p).unwrap_err().to_string();
            assert!(e.contains("output.dir"), "{bad}: {e}");
        }
        std::fs::write(&p, format!("{base}output: {{ dir: out }}\nlora: {{ r: 0 }}\n")).unwrap();
        assert!(load_remote_spec(&p).unwrap_err().to_string().contains("lora.r: must be between 1 and 1024, got 0"));
    }
}

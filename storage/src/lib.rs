//! lorafleet object storage.
//!
//! One [`Storage`] is an `object_store` backend plus a key prefix: `file:///abs/dir`
//! (the embedded default), `s3://bucket/prefix` (endpoint, region and credentials from
//! the standard `AWS_*` environment variables, path-style requests, plain http allowed
//! for `http://` endpoints), `az://container/prefix` (account and credentials from the
//! `AZURE_*` environment variables; Azurite at an `http://` endpoint) or
//! `memory://prefix` (tests). `gs://` is not compiled in: nothing that installs on the
//! development machines can test it.
//!
//! Guarantees:
//! - every key is built from validated [`Segment`]s ([`key`]), so nothing escapes the prefix;
//! - large files go up as multipart uploads; requests retry with exponential backoff;
//! - every download is checked against its sha256 and size while streaming into a temp
//!   file in the destination directory, and only then renamed into place;
//! - a directory ([`Manifest`]) is complete only once its `manifest.json` exists: it is
//!   written last, with a create-only put, so a reader never sees half a checkpoint;
//! - [`Storage::check_create_only`] refuses a backend that silently overwrites
//!   create-only puts (Garage, for one), since fencing depends on it.

pub mod cache;
mod error;
pub mod hub;
pub mod key;
pub mod manifest;
mod store;
#[cfg(feature = "testing")]
pub mod testing;

pub use cache::{parse_dataset_ref, Cache, DATASET_SCHEME};
pub use error::{Error, Result};
pub use key::{layout, RelPath, Segment, Sha256Hex};
pub use manifest::{FileEntry, Manifest};
pub use store::{public_url, Storage, StorageOptions};

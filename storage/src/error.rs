use std::path::PathBuf;

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything storage can fail with. [`Error::is_retryable`] says whether trying the
/// same thing again may help (network, server, local disk) or not (bad input, corrupt
/// or missing objects, a backend that cannot fence).
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("invalid storage url {url:?}: {reason}")]
    InvalidUrl { url: String, reason: String },
    #[error("invalid key {key:?}: {reason}")]
    InvalidKey { key: String, reason: String },
    #[error("object not found: {key}")]
    NotFound { key: String },
    #[error("object already exists with different content: {key}")]
    AlreadyExists { key: String },
    #[error("checksum mismatch for {key}: expected sha256 {expected} ({expected_size} bytes), got {actual} ({actual_size} bytes)")]
    Corrupt { key: String, expected: String, expected_size: u64, actual: String, actual_size: u64 },
    #[error("storage {url} does not enforce create-only writes (a second create-only put of {key} succeeded); refusing to use it because checkpoint fencing depends on it")]
    CreateOnlyNotEnforced { url: String, key: String },
    #[error("invalid manifest {key}: {reason}")]
    InvalidManifest { key: String, reason: String },
    #[error("unsupported source {source_url:?}: {reason}")]
    UnsupportedSource { source_url: String, reason: String },
    #[error("model hub source {source_url:?}: {reason}")]
    Hub { source_url: String, reason: String, retryable: bool },
    #[error("object store error on {key}: {source}")]
    Store {
        key: String,
        #[source]
        source: object_store::Error,
    },
    #[error("i/o error on {}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

impl Error {
    pub(crate) fn store(key: impl std::fmt::Display, e: object_store::Error) -> Self {
        match e {
            object_store::Error::NotFound { .. } => Error::NotFound { key: key.to_string() },
            e => Error::Store { key: key.to_string(), source: e },
        }
    }

    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io { path: path.into(), source }
    }

    /// May the same operation succeed if tried again later?
    pub fn is_retryable(&self) -> bool {
        match self {
            Error::Store { source, .. } => !matches!(
                source,
                object_store::Error::PermissionDenied { .. }
                    | object_store::Error::Unauthenticated { .. }
                    | object_store::Error::NotSupported { .. }
                    | object_store::Error::NotImplemented { .. }
                    | object_store::Error::UnknownConfigurationKey { .. }
            ),
            Error::Io { .. } => true,
            Error::Hub { retryable, .. } => *retryable,
            _ => false,
        }
    }
}

//! The engine's one error type. Messages are lowercase and name the file, field or
//! tensor that is wrong.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error("{path}: {message}")]
    File { path: PathBuf, message: String },
    #[error("{0}")]
    Config(String),
    #[error("unsupported architecture: model_type {0:?} (supported: llama, mistral, qwen2, falcon)")]
    UnsupportedArchitecture(String),
    #[error("adapter does not fit the base model: {0}")]
    AdapterMismatch(String),
    #[error("data: {0}")]
    Data(String),
    /// A data-parallel collective failed: a peer rank died, stopped, timed out or was
    /// aborted (worth another attempt).
    #[error("collective: {0}")]
    Collective(String),
    /// A run that cannot fit in the memory this process may use (`memory::check_fits`).
    #[error("not enough memory: {0}")]
    Memory(String),
    #[error("training cancelled")]
    Cancelled,
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

impl EngineError {
    pub fn file(path: impl Into<PathBuf>, message: impl Into<String>) -> Self {
        Self::File { path: path.into(), message: message.into() }
    }
}

pub type Result<T, E = EngineError> = std::result::Result<T, E>;

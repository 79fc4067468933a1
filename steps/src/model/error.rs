//! The model layer's typed error: every variant names the file, tensor or request that failed,
//! so a caller can print it without extra context.

use std::path::PathBuf;

/// Everything that can go wrong while loading, running or saving a [`super::LanguageModel`].
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    /// Reading or writing a file failed.
    #[error("I/O error on {path}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// `config.json` (or the GGUF metadata standing in for it) is missing a field or invalid.
    #[error("{path}: invalid model config: {msg}")]
    Config { path: PathBuf, msg: String },
    /// The architecture is not one this crate implements (Llama, Qwen2, Mistral).
    #[error("{path}: unsupported architecture {arch:?} (supported: Llama, Qwen2, Mistral)")]
    UnsupportedArchitecture { path: PathBuf, arch: String },
    /// A dtype this crate does not load or compute in.
    #[error("{path}: tensor {tensor:?}: unsupported dtype {dtype}")]
    UnsupportedDtype {
        path: PathBuf,
        tensor: String,
        dtype: String,
    },
    /// A tensor the architecture needs is absent from the weight files.
    #[error("{path}: missing tensor {tensor:?}")]
    MissingTensor { path: PathBuf, tensor: String },
    /// A tensor exists but its shape disagrees with the config.
    #[error("{path}: tensor {tensor:?} has shape {got:?}, expected {expected:?}")]
    ShapeMismatch {
        path: PathBuf,
        tensor: String,
        got: Vec<usize>,
        expected: Vec<usize>,
    },
    /// A weight file could not be parsed (truncated, corrupt header, bad offsets ...).
    #[error("{path}: cannot read weights{}: {msg}", tensor.as_ref().map(|t| format!(" (tensor {t:?})")).unwrap_or_default())]
    BadWeights {
        path: PathBuf,
        tensor: Option<String>,
        msg: String,
    },
    /// The tokenizer files are missing or invalid.
    #[error("{path}: tokenizer: {msg}")]
    Tokenizer { path: PathBuf, msg: String },
    /// Encoding or decoding text failed at run time.
    #[error("tokenizer: {0}")]
    Tokenize(String),
    /// The chat template could not be compiled or rendered.
    #[error("chat template: {0}")]
    Template(String),
    /// A Hugging Face hub id was not found in the local cache.
    #[error("model {id:?} not found in the local Hugging Face cache: looked for {looked_up} (set HF_HOME, or pass a model directory or a .gguf file)")]
    HubNotFound { id: String, looked_up: PathBuf },
    /// A model specification string could not be understood.
    #[error(
        "invalid model source {0:?}: expected a directory, a .gguf file or an Org/Name hub id"
    )]
    BadSource(String),
    /// A device string could not be parsed or the device is not available.
    #[error("device {spec:?}: {msg}")]
    Device { spec: String, msg: String },
    /// A request given to generate / logprobs / mean_hidden is invalid.
    #[error("invalid request: {0}")]
    InvalidRequest(String),
    /// An export folder cannot be written as asked.
    #[error("{path}: {msg}")]
    Export { path: PathBuf, msg: String },
    /// A LoRA adapter folder cannot be applied as it is (the setting or tensor is named).
    #[error("adapter {path}: {msg}")]
    Adapter { path: PathBuf, msg: String },
    /// A tensor operation failed inside candle.
    #[error("tensor operation failed")]
    Candle(#[from] candle_core::Error),
}

impl ModelError {
    /// Wraps an I/O error with the path it concerns.
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        ModelError::Io {
            path: path.into(),
            source,
        }
    }
}

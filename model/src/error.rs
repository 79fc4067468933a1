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
    /// A tensor operation failed inside candle (its backtraces removed: see
    /// [`without_backtrace`]).
    #[error("tensor operation failed")]
    Candle(#[source] candle_core::Error),
}

impl From<candle_core::Error> for ModelError {
    fn from(e: candle_core::Error) -> Self {
        ModelError::Candle(without_backtrace(e))
    }
}

/// A candle error's text, without backtraces (for errors that carry a message).
pub fn candle_text(e: candle_core::Error) -> String {
    without_backtrace(e).to_string()
}

/// A candle error without the backtraces candle captures when `RUST_BACKTRACE` or
/// `RUST_LIB_BACKTRACE` is set. candle prints them as part of the error's text, so an error
/// message would carry dozens of stack frames; the cause stays, backtraces are for panics.
pub fn without_backtrace(e: candle_core::Error) -> candle_core::Error {
    use candle_core::Error as E;
    match e {
        E::WithBacktrace { inner, .. } => without_backtrace(*inner),
        E::Context { inner, context } => E::Context {
            inner: Box::new(without_backtrace(*inner)),
            context,
        },
        E::WithPath { inner, path } => E::WithPath {
            inner: Box::new(without_backtrace(*inner)),
            path,
        },
        e => e,
    }
}

impl From<tsr_base::PathError> for ModelError {
    fn from(e: tsr_base::PathError) -> Self {
        ModelError::Io {
            path: e.path,
            source: e.source,
        }
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn candle_backtraces_never_reach_the_message() {
        let bt = |e: candle_core::Error| candle_core::Error::WithBacktrace {
            inner: Box::new(e),
            backtrace: Box::new(std::backtrace::Backtrace::force_capture()),
        };
        let nested = bt(candle_core::Error::Msg("unexpected end of file".into()))
            .with_path("/m/model.gguf")
            .context("reading tensor blk.0.attn_q.weight");
        let full = format!("{nested}");
        assert!(
            full.lines().count() > 3,
            "a captured backtrace prints: {full}"
        );
        let e = ModelError::from(bt(nested));
        let source = std::error::Error::source(&e).unwrap().to_string();
        assert_eq!(
            source,
            "reading tensor blk.0.attn_q.weight\npath: \"/m/model.gguf\" unexpected end of file"
        );
    }
}

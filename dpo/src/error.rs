//! The one error type of the DPO building blocks.
//!
//! Every variant names what failed (a tensor, a parameter, a format) so that a failed resume
//! or a diverged step can be diagnosed from the message alone.

use thiserror::Error;

/// Errors of the DPO loss, optimizer, clipping, data cursor and checkpoint code.
#[derive(Debug, Error)]
pub enum DpoError {
    /// A candle operation failed (shape mismatch, device error, ...).
    #[error("tensor operation failed")]
    Candle(#[source] candle_core::Error),

    /// A loss, gradient norm or other scalar became NaN or infinite.
    #[error("non-finite {what} at optimizer step {step}")]
    NonFinite { what: String, step: u64 },

    /// A trainable parameter received no gradient: the autograd graph was cut (some candle
    /// fused ops do this silently) or the parameter is not used by the loss.
    #[error("parameter `{name}` received no gradient (graph cut or unused parameter)")]
    MissingGrad { name: String },

    /// Two parameters were registered under one name.
    #[error("parameter `{name}` has gradients both in candle's store and in the weight-gradient sink: one of its uses bypassed the sink's ops")]
    SplitGrad { name: String },

    #[error("parameter `{name}` is registered twice")]
    DuplicateParam { name: String },

    /// Saved optimizer state does not fit the current parameters.
    #[error("optimizer state does not match the model at tensor `{tensor}`: {detail}")]
    StateMismatch { tensor: String, detail: String },

    /// Saved optimizer state was written with other hyperparameters.
    #[error(
        "optimizer state was saved with {saved}, but the optimizer is configured with {current}"
    )]
    ConfigMismatch { saved: String, current: String },

    /// A checkpoint was saved against another data plan (dataset size, batch sizes, seed).
    #[error("checkpoint was saved for data plan {saved}, but the current plan is {current}")]
    PlanMismatch { saved: String, current: String },

    /// Bytes were written by a format version this code does not read.
    #[error("{what} has format version {found}; this build reads version {supported}")]
    UnsupportedVersion {
        what: &'static str,
        found: u32,
        supported: u32,
    },

    /// Bytes are not a valid encoding of `what`.
    #[error("corrupt {what}: {reason}")]
    Corrupt { what: &'static str, reason: String },

    /// A configuration value is out of range.
    #[error("invalid configuration: {0}")]
    InvalidConfig(String),

    /// safetensors encoding or decoding failed.
    #[error("safetensors encoding or decoding failed")]
    Safetensors(#[from] safetensors::SafeTensorError),

    /// Writing an encoding of `what` failed.
    #[error("writing {what}")]
    Io {
        what: &'static str,
        #[source]
        source: std::io::Error,
    },

    /// JSON encoding or decoding of a header failed.
    #[error("JSON encoding or decoding failed")]
    Json(#[from] serde_json::Error),
}

impl From<candle_core::Error> for DpoError {
    fn from(e: candle_core::Error) -> Self {
        DpoError::Candle(tsr_model::without_backtrace(e))
    }
}

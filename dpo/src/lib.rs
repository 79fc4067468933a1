//! DPO training for tsr: the trainer ([`trainer::DpoTrainer`], DPO over a `tsr_model`
//! policy with precomputed reference log-probs, exact checkpoints into any sink) and its
//! model-independent building blocks, which work on candle tensors and `Var`s and know nothing
//! about the Llama model or the tokenizer. The crate knows nothing of the workflow store
//! either: it depends on `tsr-model` and `tsr-base` only.
//!
//! - [`loss`]: sigmoid DPO, IPO and their length-normalised variants, with per-pair metrics;
//! - [`optim`]: an AdamW (PyTorch semantics) whose state is saved and restored exactly;
//! - [`clip`]: global gradient norm and clipping;
//! - [`schedule`]: warmup + constant / linear / cosine learning rate, a pure fn of the step;
//! - [`shuffle`]: deterministic epoch order and a resumable cursor for gradient accumulation;
//! - [`state`]: the versioned trainer checkpoint (cursor, optimizer, RNG, metrics tail);
//! - [`train`]: one optimizer step over micro-batches (`train_step`);
//! - [`trainer`]: `DpoTrainer`, its checkpoints and text pairs for `tsr dpo`;
//! - [`bench`]: the DPO step's speed measurement (`tsr bench`, the `bench_dpo` example).
//!
//! Invariants: parameter order is always name order; every persisted encoding carries a format
//! version and deterministic bytes; a non-finite loss or norm is an error, never a skipped step.

pub mod bench;
pub mod clip;
mod error;
mod fused;
pub mod loss;
pub mod optim;
pub mod schedule;
pub mod shuffle;
pub mod state;
pub mod train;
pub mod trainer;

pub use clip::{clip_grad_norm, ensure_finite, global_grad_norm, ClipOutcome};
pub use error::DpoError;
pub use loss::{
    dpo_loss, log_sigmoid, DpoLossConfig, DpoLossKind, DpoOutput, DpoSummary, PairLogps,
};
pub use optim::{AdamW, AdamWConfig, NoDecayRule, ParamGrads, ADAMW_STATE_VERSION};
pub use schedule::{Decay, LrSchedule};
pub use shuffle::{epoch_permutation, Batch, BatchPlan, DataCursor, MicroBatch};
pub use state::{RngState, TrainerCheckpoint, CHECKPOINT_FORMAT_VERSION, METRICS_TAIL};
pub use train::{train_step, MicroLoss, StepMetrics};

/// Serde for f64 fields that must survive a JSON round trip bit for bit.
///
/// serde_json's default float parser (without its `float_roundtrip` feature) is not always
/// correctly rounded, so a metric read back from a checkpoint could differ in the last bit.
/// These fields are written as strings in Rust's shortest round-trip notation (`{:?}`) and
/// parsed with `str::parse`, which is exact.
pub(crate) mod exact_f64 {
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(v: &f64, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&format!("{v:?}"))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<f64, D::Error> {
        String::deserialize(d)?
            .parse()
            .map_err(serde::de::Error::custom)
    }
}

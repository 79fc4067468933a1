//! The DPO trainer: a [`LanguageModel`] policy, preference pairs with precomputed reference
//! log-probs, and the model-free pieces of this crate (loss, AdamW, clipping, schedule,
//! data cursor, checkpoint format) put together. Used by the `dpo` workflow step and by the
//! `tsr dpo` command, so both train, checkpoint and resume the same way.
//!
//! One call to [`DpoTrainer::step`] is one optimizer step: the plan's next batch, one
//! forward/backward per micro-batch through the differentiable path of the model, clipping,
//! one AdamW update. A non-finite loss or gradient norm is an error raised before any
//! parameter changes, so the last checkpoint and the weights in memory stay good.
//!
//! A checkpoint ([`DpoTrainer::write_checkpoint_with`]) is two files taken at a step boundary:
//! the weights as canonical safetensors (the bytes `save_hf` writes, so the model digest of a
//! resumed run can be compared with an uninterrupted one) and the versioned
//! [`TrainerCheckpoint`] (plan, cursor, optimizer moments and step count, metrics tail).
//! [`DpoTrainer::restore`] puts both back; the learning rate is a pure function of the step
//! and nothing else is stateful, so the continued run is bit-identical to an uninterrupted one.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use thiserror::Error;

use crate::{
    train_step, AdamW, AdamWConfig, BatchPlan, DataCursor, DpoError, DpoLossConfig, LrSchedule,
    StepMetrics,
};
use tsr_model::{GradSink, LanguageModel, ModelError};

mod checkpoint;
mod forward;
mod pairs;
pub mod testing;

use forward::{micro_loss, policy_logps};

pub use checkpoint::{cursor_bytes, CheckpointFiles, CheckpointPart};
pub use pairs::{encode_text_pairs, parse_pairs_jsonl, reference_logps, TextPair};

/// Errors of the trainer: the DPO pieces, the model, or checkpoint files.
#[derive(Debug, Error)]
pub enum TrainerError {
    #[error(transparent)]
    Dpo(#[from] DpoError),
    #[error(transparent)]
    Model(#[from] ModelError),
    #[error("I/O error on {path}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// Streaming one part of a checkpoint (named by its file name) failed.
    #[error("writing the checkpoint's {part}")]
    Checkpoint {
        part: &'static str,
        #[source]
        source: Box<TrainerError>,
    },
    /// The sink a checkpoint is written into (e.g. a blob store) failed.
    #[error(transparent)]
    Sink(Box<dyn std::error::Error + Send + Sync>),
    #[error("{0}")]
    Invalid(String),
}

impl TrainerError {
    /// A failure of a checkpoint's sink (see [`DpoTrainer::write_checkpoint_with`]).
    pub fn sink(e: impl std::error::Error + Send + Sync + 'static) -> TrainerError {
        TrainerError::Sink(Box::new(e))
    }

    /// Whether the error is a diverged step (NaN / infinite loss or gradient norm).
    pub fn is_non_finite(&self) -> bool {
        matches!(self, TrainerError::Dpo(DpoError::NonFinite { .. }))
    }
}

fn io_err(path: &Path) -> impl Fn(std::io::Error) -> TrainerError + '_ {
    move |source| TrainerError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// One training pair as token ids, with the frozen reference model's summed log-probs.
#[derive(Debug, Clone, PartialEq)]
pub struct TrainPair {
    /// The prompt rendered with the chat template and generation prompt.
    pub prompt: Vec<u32>,
    /// Chosen response tokens (ending with the end-of-turn token).
    pub chosen: Vec<u32>,
    /// Rejected response tokens.
    pub rejected: Vec<u32>,
    /// Reference log-prob of `chosen` given `prompt`.
    pub ref_chosen: f32,
    /// Reference log-prob of `rejected` given `prompt`.
    pub ref_rejected: f32,
}

/// Everything that decides what training does. Equal configs on equal data and weights give
/// bit-identical results.
#[derive(Debug, Clone, PartialEq)]
pub struct TrainerConfig {
    /// Loss kind, beta, length normalisation.
    pub loss: DpoLossConfig,
    /// Learning rate per optimizer step.
    pub schedule: LrSchedule,
    /// AdamW hyperparameters.
    pub optimizer: AdamWConfig,
    /// Passes over the data.
    pub epochs: u64,
    /// Stop after this many optimizer steps even if epochs remain.
    pub max_steps: Option<u64>,
    /// Pairs per forward/backward pass.
    pub micro_batch: usize,
    /// Micro-batches per optimizer step.
    pub accum_steps: usize,
    /// Global gradient-norm clip.
    pub max_grad_norm: Option<f64>,
    /// Shuffle seed.
    pub seed: u64,
    /// Shuffle each epoch.
    pub shuffle: bool,
}

impl TrainerConfig {
    /// The batch plan of `n` pairs under this configuration.
    fn plan(&self, n: usize) -> Result<BatchPlan, DpoError> {
        BatchPlan::new(
            n,
            self.micro_batch,
            self.accum_steps,
            self.seed,
            self.shuffle,
        )
    }
}

/// Policy log-probs of one pair as computed inside a training step (before its update).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PairLogp {
    /// Index of the pair in the trainer's data.
    pub index: usize,
    /// Policy log-prob of the chosen response.
    pub chosen: f32,
    /// Policy log-prob of the rejected response.
    pub rejected: f32,
}

/// What one optimizer step did.
#[derive(Debug, Clone, PartialEq)]
pub struct StepReport {
    /// Loss, rewards, margin, accuracy, gradient norm, learning rate.
    pub metrics: StepMetrics,
    /// The pairs the step consumed, in order, with the policy's log-probs before the update.
    pub pairs: Vec<PairLogp>,
}

/// The dropout-mask seed of micro-batch `micro` of optimizer step `step`.
fn dropout_seed(seed: u64, step: u64, micro: usize) -> u64 {
    let mut h = blake3::Hasher::new();
    h.update(b"tsr dpo dropout");
    h.update(&seed.to_le_bytes());
    h.update(&step.to_le_bytes());
    h.update(&(micro as u64).to_le_bytes());
    u64::from_le_bytes(h.finalize().as_bytes()[..8].try_into().expect("8 bytes"))
}

/// A DPO training run over one policy model. See the module docs.
pub struct DpoTrainer<'m> {
    model: &'m LanguageModel,
    pairs: Vec<TrainPair>,
    cfg: TrainerConfig,
    plan: BatchPlan,
    opt: AdamW,
    cursor: DataCursor,
    metrics: Vec<StepMetrics>,
    /// Where the ops that compute a weight's gradient themselves put it (on the CPU).
    sink: Arc<GradSink>,
}

impl<'m> DpoTrainer<'m> {
    /// A trainer at step 0 over `model` (its `Var`s are updated in place).
    pub fn new(
        model: &'m LanguageModel,
        pairs: Vec<TrainPair>,
        cfg: TrainerConfig,
    ) -> Result<Self, TrainerError> {
        if pairs.is_empty() {
            return Err(TrainerError::Invalid("DPO needs at least one pair".into()));
        }
        if cfg.epochs == 0 || cfg.max_steps == Some(0) {
            return Err(TrainerError::Invalid(
                "DPO needs epochs >= 1 and max_steps >= 1".into(),
            ));
        }
        for (i, p) in pairs.iter().enumerate() {
            if !(p.ref_chosen.is_finite() && p.ref_rejected.is_finite()) {
                return Err(TrainerError::Invalid(format!(
                    "pair {i}: non-finite reference log-probs ({}, {})",
                    p.ref_chosen, p.ref_rejected
                )));
            }
        }
        if model.lora().is_none() && model.base_dtype() != model.dtype() {
            return Err(TrainerError::Invalid(format!(
                "every weight would train, but the base is held in {:?}; full fine-tuning needs {:?} weights: train a LoRA adapter, or load the model in {:?}",
                model.base_dtype(),
                model.dtype(),
                model.dtype()
            )));
        }
        cfg.schedule.validate()?;
        let plan = cfg.plan(pairs.len())?;
        let opt = AdamW::new(model.trainable_vars(), cfg.optimizer.clone())?;
        Ok(Self {
            model,
            pairs,
            cfg,
            plan,
            opt,
            cursor: DataCursor::default(),
            metrics: Vec::new(),
            sink: GradSink::new(),
        })
    }

    /// The data plan (pairs, batch sizes, seed).
    pub fn plan(&self) -> &BatchPlan {
        &self.plan
    }

    /// The next data position; `cursor().optimizer_step` is the number of steps taken.
    pub fn cursor(&self) -> &DataCursor {
        &self.cursor
    }

    /// Optimizer steps taken so far.
    pub fn steps_done(&self) -> u64 {
        self.cursor.optimizer_step
    }

    /// Optimizer steps of the whole run: `epochs * steps_per_epoch`, capped by `max_steps`.
    pub fn total_steps(&self) -> u64 {
        let all = self.cfg.epochs * self.plan.steps_per_epoch();
        self.cfg.max_steps.map_or(all, |m| m.min(all))
    }

    /// Whether every step has been taken.
    pub fn is_done(&self) -> bool {
        self.cursor.optimizer_step >= self.total_steps()
    }

    /// Metrics of every step taken (after a restore: those the caller gave back, or the tail
    /// kept in the checkpoint).
    pub fn metrics(&self) -> &[StepMetrics] {
        &self.metrics
    }

    /// The model being trained.
    pub fn model(&self) -> &LanguageModel {
        self.model
    }

    /// The training pairs.
    pub fn pairs(&self) -> &[TrainPair] {
        &self.pairs
    }

    /// One optimizer step. Fails, leaving weights, optimizer and cursor unchanged, on a
    /// non-finite loss or gradient norm.
    pub fn step(&mut self) -> Result<StepReport, TrainerError> {
        if self.is_done() {
            return Err(TrainerError::Invalid(format!(
                "training is finished ({} steps)",
                self.total_steps()
            )));
        }
        let (batch, next) = self.plan.next_batch(&self.cursor)?;
        let lr = self.cfg.schedule.lr_at(self.cursor.optimizer_step);
        let (model, pairs, loss) = (self.model, &self.pairs, &self.cfg.loss);
        let (seed, step) = (self.cfg.seed, self.cursor.optimizer_step);
        let sink = &self.sink;
        let mut logps = Vec::with_capacity(batch.pairs());
        // train_step's closure can only fail with a DpoError: keep a model error aside and
        // return it as itself.
        let mut failure: Option<TrainerError> = None;
        let result = train_step(
            &mut self.opt,
            batch.micro_batches.len(),
            self.cfg.max_grad_norm,
            lr,
            |i| {
                // Dropout masks (when the adapter trains with dropout) depend on the step and
                // the micro-batch alone, so a resumed run draws the same ones.
                model.set_lora_dropout_seed(Some(dropout_seed(seed, step, i)));
                let active = sink.activate();
                let r = micro_loss(model, pairs, &batch.micro_batches[i], loss);
                drop(active);
                model.set_lora_dropout_seed(None);
                match r {
                    Ok((mut micro, lp)) => {
                        logps.extend(lp);
                        micro.sink = Some(sink.clone());
                        Ok(micro)
                    }
                    Err(TrainerError::Dpo(e)) => Err(e),
                    Err(other) => {
                        failure = Some(other);
                        Err(DpoError::InvalidConfig("policy forward failed".into()))
                    }
                }
            },
        );
        let metrics = match (result, failure) {
            (_, Some(e)) => return Err(e),
            (r, None) => r?,
        };
        self.cursor = next;
        self.metrics.push(metrics.clone());
        Ok(StepReport {
            metrics,
            pairs: logps,
        })
    }

    /// Mean DPO loss over all pairs under the current weights (forward only, the same code
    /// path and micro-batches of `micro_batch` pairs in dataset order).
    pub fn mean_loss(&self) -> Result<f64, TrainerError> {
        let mut sum = 0.0f64;
        let all: Vec<usize> = (0..self.pairs.len()).collect();
        for idx in all.chunks(self.cfg.micro_batch) {
            let (micro, _) = micro_loss(self.model, &self.pairs, idx, &self.cfg.loss)?;
            let v = micro.dpo.map(|d| d.loss).unwrap_or(f64::NAN);
            sum += v * idx.len() as f64;
        }
        Ok(sum / self.pairs.len() as f64)
    }

    /// Reference log-probs for training `model` against its own current weights: computed
    /// with the training code path on epoch 0's micro-batches, so that the first step sees
    /// policy == reference bit for bit (loss exactly ln 2 for sigmoid DPO). `pairs`' reference
    /// fields are overwritten.
    pub fn self_reference(
        model: &LanguageModel,
        pairs: &mut [TrainPair],
        cfg: &TrainerConfig,
    ) -> Result<(), TrainerError> {
        let plan = cfg.plan(pairs.len())?;
        let order = plan.order(0);
        let mut values = vec![(0f32, 0f32); pairs.len()];
        for step in order.chunks(plan.batch_size()) {
            for idx in step.chunks(plan.micro_batch) {
                let (pc, pr) = policy_logps(model, pairs, idx)?;
                let pc = pc.to_vec1::<f32>().map_err(DpoError::from)?;
                let pr = pr.to_vec1::<f32>().map_err(DpoError::from)?;
                for (k, &j) in idx.iter().enumerate() {
                    values[j] = (pc[k], pr[k]);
                }
            }
        }
        for (p, (c, r)) in pairs.iter_mut().zip(values) {
            p.ref_chosen = c;
            p.ref_rejected = r;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests;

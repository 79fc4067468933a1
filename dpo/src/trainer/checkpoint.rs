//! Checkpoints of a [`DpoTrainer`]: the weights as canonical safetensors and the
//! [`TrainerCheckpoint`] encoding, written in parallel into any sink, and restored.

use std::io::Write;
use std::path::{Path, PathBuf};

use super::{io_err, DpoTrainer, TrainerError};
use crate::{DataCursor, DpoError, StepMetrics, TrainerCheckpoint};

/// One of the two parts of a checkpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CheckpointPart {
    /// Canonical safetensors of the policy weights.
    Weights,
    /// The [`TrainerCheckpoint`] encoding.
    Trainer,
}

impl CheckpointPart {
    /// The file name [`DpoTrainer::write_checkpoint`] uses.
    pub fn file_name(self) -> &'static str {
        match self {
            CheckpointPart::Weights => "weights.safetensors",
            CheckpointPart::Trainer => "trainer.ckpt",
        }
    }
}

/// The files of one checkpoint (see the module docs).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CheckpointFiles {
    /// Canonical safetensors of the policy weights.
    pub weights: PathBuf,
    /// [`TrainerCheckpoint::to_bytes`].
    pub trainer: PathBuf,
}

impl DpoTrainer<'_> {
    /// Streams the policy weights as canonical safetensors (the bytes `save_hf` writes).
    pub fn write_weights(&self, w: &mut impl Write) -> Result<(), TrainerError> {
        Ok(self.model.write_trainable(w)?)
    }

    /// Streams the trainer state ([`TrainerCheckpoint`] encoding: plan, cursor, optimizer
    /// moments and step count, metrics tail) at the current step boundary.
    pub fn write_state(&self, w: &mut impl Write) -> Result<(), TrainerError> {
        Ok(TrainerCheckpoint::write_captured(
            &self.plan,
            &self.cursor,
            &self.opt,
            None,
            &self.metrics,
            w,
        )?)
    }

    /// Writes both parts of a checkpoint at once, one thread each: `open(part)` makes the sink
    /// (in its thread), the part is streamed into it, and `close(part, sink)` finishes it (e.g.
    /// fsync and install a blob), so one part's fsync overlaps the other's writing. The
    /// weights and the optimizer moments are about 0.5 and 1.1 GB for a 135M model, and
    /// writing fresh pages costs kernel time that two threads share. Returns
    /// `(weights, trainer)`.
    pub fn write_checkpoint_with<W, T, E>(
        &self,
        open: impl Fn(CheckpointPart) -> Result<W, E> + Sync,
        close: impl Fn(CheckpointPart, W) -> Result<T, E> + Sync,
    ) -> Result<(T, T), E>
    where
        W: Write,
        T: Send,
        E: From<TrainerError> + Send,
    {
        let part = |p: CheckpointPart| -> Result<T, E> {
            let mut w = open(p)?;
            let written = match p {
                CheckpointPart::Weights => self.write_weights(&mut w),
                CheckpointPart::Trainer => self.write_state(&mut w),
            };
            written.map_err(|e| TrainerError::Checkpoint {
                part: p.file_name(),
                source: Box::new(e),
            })?;
            close(p, w)
        };
        let (weights, trainer) = std::thread::scope(|s| {
            let weights = s.spawn(|| part(CheckpointPart::Weights));
            let trainer = part(CheckpointPart::Trainer);
            (weights.join(), trainer)
        });
        let weights = match weights {
            Ok(r) => r,
            Err(panic) => std::panic::resume_unwind(panic),
        };
        Ok((weights?, trainer?))
    }

    /// Writes a checkpoint into `dir` as `weights.safetensors` and `trainer.ckpt` (see
    /// [`Self::write_checkpoint_with`]). Not fsynced: the caller decides durability.
    pub fn write_checkpoint(&self, dir: &Path) -> Result<CheckpointFiles, TrainerError> {
        std::fs::create_dir_all(dir).map_err(io_err(dir))?;
        let (weights, trainer) = self.write_checkpoint_with(
            |p| {
                let path = dir.join(p.file_name());
                let f = std::fs::File::create(&path).map_err(io_err(&path))?;
                Ok(std::io::BufWriter::with_capacity(1 << 20, f))
            },
            |p, mut w| {
                let path = dir.join(p.file_name());
                w.flush().map_err(io_err(&path))?;
                Ok::<_, TrainerError>(path)
            },
        )?;
        Ok(CheckpointFiles { weights, trainer })
    }

    /// Restores weights and trainer state written by [`Self::write_checkpoint`] (or the same
    /// two encodings from elsewhere). `metrics`, when given, is the full history of the steps
    /// taken (the checkpoint keeps only a tail); it must end at the checkpoint's step.
    pub fn restore(
        &mut self,
        weights: &Path,
        trainer: &[u8],
        metrics: Option<Vec<StepMetrics>>,
    ) -> Result<(), TrainerError> {
        let ck = TrainerCheckpoint::from_bytes(trainer)?;
        let tensors =
            candle_core::safetensors::load(weights, self.model.device()).map_err(|e| {
                TrainerError::Invalid(format!(
                    "{}: {}",
                    weights.display(),
                    tsr_model::candle_text(e)
                ))
            })?;
        // Check everything before changing anything.
        let vars = self.model.trainable_vars();
        for (name, var) in &vars {
            match tensors.get(name) {
                Some(t) if t.dims() == var.dims() => {}
                Some(t) => {
                    return Err(TrainerError::Invalid(format!(
                        "{}: tensor {name} has shape {:?}, the model {:?}",
                        weights.display(),
                        t.dims(),
                        var.dims()
                    )))
                }
                None => {
                    return Err(TrainerError::Invalid(format!(
                        "{}: checkpoint lacks tensor {name}",
                        weights.display()
                    )))
                }
            }
        }
        let steps = ck.cursor.optimizer_step;
        let metrics = match metrics {
            Some(m) => {
                if m.len() as u64 != steps
                    || m.last().map(|l| l.step) != ck.metrics_tail.last().map(|l| l.step)
                {
                    return Err(TrainerError::Invalid(format!(
                        "metrics history has {} steps, the checkpoint is at step {steps}",
                        m.len()
                    )));
                }
                m
            }
            None => ck.metrics_tail.clone(),
        };
        let cursor = ck.restore(&self.plan, &mut self.opt)?;
        for (name, var) in &vars {
            let t = tensors[name]
                .to_dtype(var.dtype())
                .map_err(DpoError::from)?;
            var.set(&t).map_err(DpoError::from)?;
        }
        self.cursor = cursor;
        self.metrics = metrics;
        Ok(())
    }
}

/// A checkpoint's cursor bytes for the engine's journal: the data cursor as JSON (for
/// inspection; the authoritative copy is inside the trainer file).
pub fn cursor_bytes(cursor: &DataCursor) -> Vec<u8> {
    serde_json::to_vec(cursor).expect("a cursor serializes")
}

//! `dpo`: train a policy (initialised from the `model` input) on preference pairs against
//! reference log-probs computed by `ref-logprobs`, with [`DpoTrainer`]. Checkpoints every
//! `checkpoint_every` optimizer steps and at a stop request: files `weights` (safetensors),
//! `trainer` ([`tsr_dpo::TrainerCheckpoint`]: plan, cursor, optimizer state) and `metrics`
//! (the full per-step history); the journal cursor is the data cursor as JSON, for
//! inspection. A resumed step continues from the checkpoint and ends with bit-identical
//! weights and metrics. A diverged step (non-finite loss or gradient) fails with an `Invalid`
//! error before touching the weights, so the last checkpoint stays the last good state.

use crate::kinds::ref_logprobs::{encode_pair, RefLogps};
use crate::lm::{self, model_err};
use crate::records::Pair;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use tsr_dpo::trainer::{cursor_bytes, DpoTrainer, TrainPair, TrainerConfig, TrainerError};
use tsr_dpo::{AdamWConfig, DpoLossConfig, DpoLossKind, LrSchedule, StepMetrics};
use tsr_engine::{OutputData, Step, StepContext, StepError, StepInputs, StepOutputs};
use tsr_model::adapter::LoraSpec;
use tsr_model::LanguageModel;

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Dpo {
    pub beta: f64,
    pub loss: DpoLossKind,
    pub lr: f64,
    pub warmup_steps: u64,
    pub epochs: u64,
    pub micro_batch: usize,
    pub accum_steps: usize,
    pub max_grad_norm: Option<f64>,
    pub weight_decay: f64,
    pub checkpoint_every: u64,
    /// Train a LoRA adapter over the frozen input model instead of every weight (`None`: full
    /// fine-tuning; left out of the step's config, so full runs keep their step keys).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lora: Option<LoraTraining>,
}

/// How LoRA training is set up: the adapter a first DPO creates (an input model that already
/// has one trains that adapter further, with its own rank, alpha and targets).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct LoraTraining {
    pub r: usize,
    pub alpha: f64,
    pub dropout: f64,
    pub targets: Vec<String>,
}

/// The step's `metrics` output: every optimizer step's metrics.
#[derive(Serialize, Deserialize)]
pub struct DpoReport {
    pub pairs: usize,
    pub steps: u64,
    pub metrics: Vec<StepMetrics>,
}

/// A trainer's error as the step reports it.
fn trainer_err(e: TrainerError) -> StepError {
    if e.is_non_finite() {
        // Deterministic: retrying the same step diverges again. The last checkpoint (taken
        // after the last good step) is intact.
        StepError::Invalid(format!("DPO diverged: {e}; the last checkpoint is kept"))
    } else {
        StepError::wrap("DPO", e)
    }
}

/// An error while a checkpoint is written into the journal: the trainer's (as [`trainer_err`]
/// makes it) or the journal's own.
struct CheckpointError(StepError);

impl From<TrainerError> for CheckpointError {
    fn from(e: TrainerError) -> Self {
        CheckpointError(trainer_err(e))
    }
}

/// The seed of a new adapter's initialisation: from the step's seed, apart from the shuffle's.
fn lora_init_seed(step_seed: u64) -> u64 {
    let mut h = blake3::Hasher::new();
    h.update(b"tsr lora init");
    h.update(&step_seed.to_le_bytes());
    u64::from_le_bytes(h.finalize().as_bytes()[..8].try_into().expect("8 bytes"))
}

impl Dpo {
    /// The step's `weights` output: the whole model in canonical safetensors, or with LoRA the
    /// adapter as the store holds it (naming the base it adapts).
    fn save_model(
        &self,
        model: &LanguageModel,
        inputs: &StepInputs,
        out_dir: &std::path::Path,
    ) -> Result<StepOutputs, StepError> {
        if self.lora.is_none() {
            model
                .save_hf(out_dir)
                .map_err(model_err("saving the trained model"))?;
            return Ok(StepOutputs::new().file(
                "weights",
                "model-weights",
                &out_dir.join("model.safetensors"),
            ));
        }
        let base = lm::base_digest(inputs, "model")?;
        std::fs::create_dir_all(out_dir)
            .map_err(|e| StepError::io(format!("creating {}", out_dir.display()), e))?;
        let path = out_dir.join("adapter.safetensors");
        tsr_state::fsio::create_synced(&path, |w| {
            model
                .write_adapter_blob(w, &base)
                .map_err(model_err("saving the trained adapter"))
        })?;
        Ok(StepOutputs::new().file("weights", "lora-adapter", &path))
    }

    fn trainer_config(&self, seed: u64) -> TrainerConfig {
        TrainerConfig {
            loss: DpoLossConfig {
                beta: self.beta,
                kind: self.loss,
                length_normalize: false,
            },
            schedule: LrSchedule {
                warmup_steps: self.warmup_steps,
                ..LrSchedule::constant(self.lr)
            },
            optimizer: AdamWConfig {
                weight_decay: self.weight_decay,
                ..AdamWConfig::default()
            },
            epochs: self.epochs,
            max_steps: None,
            micro_batch: self.micro_batch,
            accum_steps: self.accum_steps,
            max_grad_norm: self.max_grad_norm,
            seed,
            shuffle: true,
        }
    }
}

/// Writes a checkpoint of `t` straight into the store's blobs (hashed while written, fsynced,
/// installed; the two files in parallel) and records it in the step's journal; the engine
/// drops the previous checkpoint once this one is committed.
fn save(t: &DpoTrainer, ctx: &StepContext) -> Result<(), StepError> {
    let journal = ctx.items();
    let (weights, trainer) = t
        .write_checkpoint_with(
            |_| journal.blob_writer().map_err(CheckpointError),
            |part, w| {
                w.finish().map_err(|e| {
                    CheckpointError(StepError::wrap(
                        format!("DPO checkpoint ({})", part.file_name()),
                        e,
                    ))
                })
            },
        )
        .map_err(|e| e.0)?;
    let metrics = serde_json::to_vec(t.metrics()).expect("metrics serialize");
    let mut out = BTreeMap::new();
    out.insert("weights".to_string(), OutputData::Blob(weights));
    out.insert("trainer".to_string(), OutputData::Blob(trainer));
    out.insert("metrics".to_string(), OutputData::Bytes(metrics));
    journal.save_checkpoint(out, cursor_bytes(t.cursor()))
}

fn restore(t: &mut DpoTrainer, ctx: &StepContext) -> Result<(), StepError> {
    let Some(cp) = ctx.items().load_checkpoint()? else {
        return Ok(());
    };
    let file = |name: &str| {
        cp.files.get(name).ok_or_else(|| {
            StepError::Invalid(format!("DPO checkpoint {} has no `{name}` file", cp.seq))
        })
    };
    let trainer = std::fs::read(file("trainer")?)
        .map_err(|e| StepError::io("reading the DPO trainer checkpoint", e))?;
    let metrics = std::fs::read(file("metrics")?)
        .map_err(|e| StepError::io("reading the DPO metrics checkpoint", e))?;
    let metrics: Vec<StepMetrics> = serde_json::from_slice(&metrics).map_err(|e| {
        StepError::Invalid(format!("DPO checkpoint metrics cannot be decoded: {e}"))
    })?;
    t.restore(file("weights")?, &trainer, Some(metrics))
        .map_err(trainer_err)
}

fn progress_message(m: &StepMetrics) -> String {
    let d = m.dpo.unwrap_or_default();
    format!(
        "loss {:.4} r+ {:.3} r- {:.3} margin {:.3} acc {:.2} |g| {:.3} lr {:.2e}",
        m.loss, d.reward_chosen, d.reward_rejected, d.margin, d.accuracy, m.grad_norm, m.lr
    )
}

impl Step for Dpo {
    fn kind(&self) -> &'static str {
        "dpo"
    }
    fn runs_as_job(&self) -> bool {
        true
    }
    fn version(&self) -> u32 {
        // 2: checkpoints are weights + TrainerCheckpoint + metrics files (v1 used another cursor).
        // 3: fused CPU kernels for RMS norm, rope, SwiGLU and the masked softmax with their
        //    backward, and the gradient norm summed in lanes: the trained weights' last bits.
        3
    }
    fn config(&self) -> serde_json::Value {
        serde_json::to_value(self).unwrap()
    }
    fn outputs(&self) -> Vec<&'static str> {
        vec!["weights", "metrics"]
    }
    fn run(&self, inputs: &StepInputs, ctx: &StepContext) -> Result<StepOutputs, StepError> {
        let pairs: Vec<Pair> = lm::from_jsonl(&inputs.bytes("pairs")?, "pairs")?;
        let refs: BTreeMap<String, RefLogps> =
            lm::from_jsonl::<RefLogps>(&inputs.bytes("ref_logps")?, "reference log-probs")?
                .into_iter()
                .map(|r| (r.pair_id.clone(), r))
                .collect();
        let model = match &self.lora {
            None => lm::load(inputs, "model", ctx)?,
            Some(l) => {
                let (base, adapter) = lm::load_parts(inputs, "model", ctx)?;
                match adapter {
                    // Mi's adapter trains further (PEFT's `is_trainable`).
                    Some(a) => base
                        .with_trainable_adapter(&a)
                        .map_err(model_err("setting up the adapter for training"))?,
                    None => base
                        .with_new_lora(
                            &LoraSpec {
                                r: l.r,
                                alpha: l.alpha,
                                targets: l.targets.clone(),
                                dropout: l.dropout,
                            },
                            lora_init_seed(ctx.seed()),
                        )
                        .map_err(model_err("creating the adapter"))?,
                }
                .with_lora_dropout(l.dropout)
                .map_err(model_err("setting the adapter's dropout"))?
            }
        };
        let out_dir = ctx.scratch().join("out");
        if pairs.is_empty() {
            // Nothing to learn from: the policy is the input model, unchanged.
            let report = DpoReport {
                pairs: 0,
                steps: 0,
                metrics: vec![],
            };
            return Ok(self
                .save_model(&model, inputs, &out_dir)?
                .json("metrics", &report));
        }
        let mut encoded = Vec::with_capacity(pairs.len());
        for p in &pairs {
            let r = refs.get(&p.pair_id).ok_or_else(|| {
                StepError::Invalid(format!("pair {} has no reference log-probs", p.pair_id))
            })?;
            let (prompt, chosen, rejected) = encode_pair(model.tokenizer(), p)?;
            encoded.push(TrainPair {
                prompt,
                chosen,
                rejected,
                ref_chosen: r.chosen,
                ref_rejected: r.rejected,
            });
        }
        let mut t = DpoTrainer::new(&model, encoded, self.trainer_config(ctx.seed()))
            .map_err(trainer_err)?;
        restore(&mut t, ctx)?;
        ctx.progress().set_length(t.total_steps());
        ctx.progress().set_position(t.steps_done());
        let every = self.checkpoint_every.max(1);
        let mut saved_at = t.steps_done();
        while !t.is_done() {
            if ctx.should_stop() {
                if saved_at != t.steps_done() {
                    save(&t, ctx)?;
                }
                return Err(StepError::Interrupted);
            }
            let report = t.step().map_err(trainer_err)?;
            ctx.progress().inc(1);
            ctx.progress()
                .set_message(progress_message(&report.metrics));
            if t.steps_done() % every == 0 && !t.is_done() {
                save(&t, ctx)?;
                saved_at = t.steps_done();
            }
        }
        let report = DpoReport {
            pairs: pairs.len(),
            steps: t.steps_done(),
            metrics: t.metrics().to_vec(),
        };
        drop(t);
        let out = self
            .save_model(&model, inputs, &out_dir)?
            .json("metrics", &report);
        drop(model);
        // The allocator keeps freed memory for reuse (`tune_allocator`): the optimizer state
        // and the step's buffers go back to the system here, not at the process's end.
        tsr_model::release_memory();
        Ok(out)
    }
}

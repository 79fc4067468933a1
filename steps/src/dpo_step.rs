//! `dpo`: train a policy (initialised from the `model` input) on preference pairs against
//! reference log-probs computed by `ref-logprobs`. Checkpoints (weights, optimizer state, data
//! cursor, metrics so far) every `checkpoint_every` optimizer steps and at a stop request; a
//! resumed step continues from the checkpoint and ends with bit-identical weights.

use crate::dpo::{
    dpo_loss, train_step, AdamW, AdamWConfig, BatchPlan, DataCursor, DpoError, DpoLossConfig,
    DpoLossKind, LrSchedule, MicroLoss, StepMetrics,
};
use crate::lm::{self, model_err};
use crate::pairs::Pair;
use crate::reference::{encode_pair, RefLogps};
use candle_core::Tensor;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use tsr_engine::{OutputData, Step, StepContext, StepError, StepInputs, StepOutputs};

#[derive(Clone, Debug, Serialize)]
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
}

#[derive(Serialize, Deserialize)]
struct Cursor {
    cursor: DataCursor,
    metrics: Vec<StepMetrics>,
}

#[derive(Serialize, Deserialize)]
pub struct DpoReport {
    pub pairs: usize,
    pub steps: u64,
    pub metrics: Vec<StepMetrics>,
}

fn dpo_err(e: DpoError) -> StepError {
    StepError::wrap("DPO", e)
}

impl Step for Dpo {
    fn kind(&self) -> &'static str {
        "dpo"
    }
    fn version(&self) -> u32 {
        1
    }
    fn config(&self) -> serde_json::Value {
        serde_json::to_value(self).unwrap()
    }
    fn outputs(&self) -> Vec<&'static str> {
        vec!["weights", "metrics"]
    }
    fn run(&self, inputs: &StepInputs, ctx: &StepContext) -> Result<StepOutputs, StepError> {
        let pairs: Vec<Pair> = lm::from_jsonl(&inputs.bytes("pairs")?, "pairs")?;
        let refs: BTreeMap<String, RefLogps> = lm::from_jsonl::<RefLogps>(&inputs.bytes("ref_logps")?, "reference log-probs")?
            .into_iter()
            .map(|r| (r.pair_id.clone(), r))
            .collect();
        let model = lm::load(inputs, "model", ctx)?;
        let out_dir = ctx.scratch().join("out");
        if pairs.is_empty() {
            // Nothing to learn from: the policy is the input model, unchanged.
            model.save_hf(&out_dir).map_err(model_err("saving the model"))?;
            let report = DpoReport { pairs: 0, steps: 0, metrics: vec![] };
            return Ok(StepOutputs::new()
                .file("weights", "model-weights", &out_dir.join("model.safetensors"))
                .json("metrics", &report));
        }
        let tok = model.tokenizer();
        let mut encoded = Vec::with_capacity(pairs.len());
        for p in &pairs {
            let r = refs.get(&p.pair_id).ok_or_else(|| {
                StepError::Invalid(format!("pair {} has no reference log-probs", p.pair_id))
            })?;
            encoded.push((encode_pair(tok, p)?, r.chosen, r.rejected));
        }
        let plan = BatchPlan::new(pairs.len(), self.micro_batch, self.accum_steps, ctx.seed(), true).map_err(dpo_err)?;
        let total_steps = plan.steps_per_epoch() * self.epochs;
        let schedule = LrSchedule { warmup_steps: self.warmup_steps, ..LrSchedule::constant(self.lr) };
        let mut opt = AdamW::new(model.vars(), AdamWConfig { weight_decay: self.weight_decay, ..AdamWConfig::default() }).map_err(dpo_err)?;
        let mut cursor = DataCursor::default();
        let mut metrics: Vec<StepMetrics> = Vec::new();
        if let Some(cp) = ctx.items().load_checkpoint()? {
            let saved: Cursor = serde_json::from_slice(&cp.cursor)
                .map_err(|e| StepError::Invalid(format!("DPO checkpoint cursor cannot be decoded: {e}")))?;
            let weights = candle_core::safetensors::load(&cp.files["weights"], model.device())
                .map_err(|e| StepError::wrap("reading checkpoint weights", e))?;
            for (name, var) in model.vars() {
                let t = weights.get(&name).ok_or_else(|| StepError::Invalid(format!("checkpoint lacks tensor {name}")))?;
                var.set(&t.to_dtype(var.dtype()).map_err(|e| StepError::wrap("checkpoint dtype", e))?)
                    .map_err(|e| StepError::wrap(format!("restoring {name}"), e))?;
            }
            let optim = std::fs::read(&cp.files["optim"]).map_err(|e| StepError::io("reading optimizer state", e))?;
            opt.load_state(&optim).map_err(dpo_err)?;
            cursor = saved.cursor;
            metrics = saved.metrics;
        }
        let loss_cfg = DpoLossConfig { beta: self.beta, kind: self.loss, length_normalize: false };
        ctx.progress().set_length(total_steps);
        ctx.progress().set_position(cursor.optimizer_step);
        let save = |cursor: &DataCursor, metrics: &[StepMetrics], opt: &AdamW| -> Result<(), StepError> {
            let dir = ctx.scratch().join("checkpoint");
            model.save_hf(&dir).map_err(model_err("saving checkpoint weights"))?;
            let mut files = BTreeMap::new();
            files.insert("weights".to_string(), OutputData::File(dir.join("model.safetensors")));
            files.insert("optim".to_string(), OutputData::Bytes(opt.save_state().map_err(dpo_err)?));
            let c = serde_json::to_vec(&Cursor { cursor: *cursor, metrics: metrics.to_vec() }).expect("cursor serializes");
            ctx.items().save_checkpoint(files, c)
        };
        while cursor.epoch < self.epochs {
            if ctx.should_stop() {
                save(&cursor, &metrics, &opt)?;
                return Err(StepError::Interrupted);
            }
            let (batch, next) = plan.next_batch(&cursor).map_err(dpo_err)?;
            let lr = schedule.lr_at(cursor.optimizer_step);
            let dev = model.device().clone();
            let m = train_step(&mut opt, batch.micro_batches.len(), self.max_grad_norm, lr, |i| -> Result<MicroLoss, DpoError> {
                let idx = &batch.micro_batches[i];
                let mut seqs = Vec::with_capacity(idx.len() * 2);
                let (mut rc, mut rr) = (Vec::new(), Vec::new());
                for &j in idx {
                    let ((p, c, r), ref_c, ref_r) = &encoded[j];
                    seqs.push((p.clone(), c.clone()));
                    seqs.push((p.clone(), r.clone()));
                    rc.push(*ref_c);
                    rr.push(*ref_r);
                }
                let lp = model.response_logprobs_tensor(&seqs).map_err(|e| DpoError::InvalidConfig(format!("policy log-probs: {e}")))?;
                let n = idx.len();
                let lp = lp.reshape((n, 2))?;
                let pc = lp.narrow(1, 0, 1)?.squeeze(1)?;
                let pr = lp.narrow(1, 1, 1)?.squeeze(1)?;
                let rc = Tensor::from_vec(rc, n, &dev)?.to_dtype(pc.dtype())?;
                let rr = Tensor::from_vec(rr, n, &dev)?.to_dtype(pc.dtype())?;
                let out = dpo_loss(
                    &crate::dpo::PairLogps {
                        policy_chosen: &pc,
                        policy_rejected: &pr,
                        reference_chosen: &rc,
                        reference_rejected: &rr,
                        chosen_tokens: None,
                        rejected_tokens: None,
                    },
                    &loss_cfg,
                )?;
                let dpo = Some(out.summary()?);
                Ok(MicroLoss { loss: out.loss, pairs: n, dpo })
            })
            .map_err(dpo_err)?;
            ctx.progress().inc(1);
            ctx.progress().set_message(format!("loss {:.4} acc {:.2}", m.loss, m.dpo.map(|d| d.accuracy).unwrap_or(0.0)));
            metrics.push(m);
            cursor = next;
            if cursor.optimizer_step % self.checkpoint_every.max(1) == 0 && cursor.epoch < self.epochs {
                save(&cursor, &metrics, &opt)?;
            }
        }
        model.save_hf(&out_dir).map_err(model_err("saving the trained model"))?;
        let report = DpoReport { pairs: pairs.len(), steps: cursor.optimizer_step, metrics };
        Ok(StepOutputs::new()
            .file("weights", "model-weights", &out_dir.join("model.safetensors"))
            .json("metrics", &report))
    }
}

//! The DPO step's speed measurement, shared by `tsr bench` and the `bench_dpo` example, which
//! the GPU benchmark compares with PyTorch (`scripts/bench_torch_gpu.py` runs the same shapes
//! and token ids):
//!
//! - [`bench_dpo`]: DPO optimizer steps on `batch` pairs of `prompt + response` tokens. One
//!   step = the frozen reference model's forward on every pair (inference path) + the policy's
//!   forward and backward on chosen and rejected + clipping + the AdamW update, exactly what a
//!   trainer without precomputed reference log-probs does. The first step is a warm-up
//!   (allocations, CUDA kernel JIT) and is excluded.
//!
//! The device is synchronised before every clock read, so CUDA's asynchronous kernels are
//! inside the time they belong to.

use std::time::Instant;

use tsr_model::bench::{dpo_flops_per_pair, median, synthetic_ids};
use tsr_model::{LanguageModel, ModelError};

use crate::trainer::{reference_logps, DpoTrainer, TrainPair, TrainerConfig, TrainerError};
use crate::{AdamWConfig, DpoLossConfig, LrSchedule};

/// The trainer settings every DPO bench uses: constant lr 5e-7, no weight decay, clip at 1.0,
/// no shuffling, one micro-batch per optimizer step.
pub fn bench_trainer_config(epochs: u64, micro_batch: usize) -> TrainerConfig {
    TrainerConfig {
        loss: DpoLossConfig::default(),
        schedule: LrSchedule::constant(5e-7),
        optimizer: AdamWConfig {
            weight_decay: 0.0,
            ..AdamWConfig::default()
        },
        epochs,
        max_steps: None,
        micro_batch,
        accum_steps: 1,
        max_grad_norm: Some(1.0),
        seed: 0,
        shuffle: false,
    }
}

/// The result of [`bench_dpo`].
#[derive(Debug, Clone)]
pub struct DpoBench {
    pub batch: usize,
    /// Seconds of each timed step (warm-up excluded).
    pub step_s: Vec<f64>,
    /// Of each timed step, the seconds of the reference forward (the rest is the policy's
    /// step: what a workflow's `dpo` step does, its reference log-probs precomputed).
    pub reference_s: Vec<f64>,
    /// Median over the timed steps of the policy's step alone (step minus reference forward).
    pub policy_median_s: f64,
    /// Seconds of the warm-up step.
    pub warmup_s: f64,
    /// Median over `step_s`.
    pub median_s: f64,
    pub pairs_per_s: f64,
    /// Achieved model FLOP/s ([`dpo_flops_per_pair`] x pairs/s).
    pub flops_per_s: f64,
    /// Loss of the last step (a sanity check: finite, near ln 2 at the start).
    pub last_loss: f64,
}

/// DPO throughput on `batch` synthetic pairs of `prompt + response` tokens: one warm-up step
/// and `steps` timed ones (see the module docs). `on_step(i, seconds, loss)` reports each step
/// (`i = 0` is the warm-up).
pub fn bench_dpo(
    policy: &LanguageModel,
    reference: &LanguageModel,
    batch: usize,
    prompt: usize,
    response: usize,
    steps: usize,
    mut on_step: impl FnMut(usize, f64, f64),
) -> Result<DpoBench, TrainerError> {
    let vocab = policy.config().vocab_size;
    let mut pairs: Vec<TrainPair> = (0..batch)
        .map(|i| TrainPair {
            prompt: synthetic_ids(vocab, i, prompt, 131, 17),
            chosen: synthetic_ids(vocab, i, response, 71, 29),
            rejected: synthetic_ids(vocab, i, response, 53, 37),
            ref_chosen: 0.0,
            ref_rejected: 0.0,
        })
        .collect();
    reference_logps(reference, &mut pairs, batch)?;
    // One optimizer step per epoch: the whole data set is one batch.
    let cfg = bench_trainer_config(steps as u64 + 1, batch);
    let mut trainer = DpoTrainer::new(policy, pairs.clone(), cfg)?;
    let dev = policy.device().clone();
    let mut times = Vec::with_capacity(steps);
    let mut ref_times = Vec::with_capacity(steps);
    let mut warmup_s = f64::NAN;
    let mut last_loss = f64::NAN;
    for i in 0..=steps {
        dev.synchronize().map_err(ModelError::from)?;
        let t = Instant::now();
        // The trainer's reference values were fixed at construction; the reference forward
        // is still run (and timed) every step, as a trainer without precomputed ones would.
        let mut fresh = pairs.clone();
        reference_logps(reference, &mut fresh, batch)?;
        dev.synchronize().map_err(ModelError::from)?;
        let ref_s = t.elapsed().as_secs_f64();
        let report = trainer.step()?;
        dev.synchronize().map_err(ModelError::from)?;
        let s = t.elapsed().as_secs_f64();
        last_loss = report.metrics.loss;
        on_step(i, s, last_loss);
        if i == 0 {
            warmup_s = s;
        } else {
            times.push(s);
            ref_times.push(ref_s);
        }
    }
    let median_s = median(times.clone());
    let policy_median_s = median(times.iter().zip(&ref_times).map(|(t, r)| t - r).collect());
    let pairs_per_s = batch as f64 / median_s;
    Ok(DpoBench {
        batch,
        step_s: times,
        reference_s: ref_times,
        policy_median_s,
        warmup_s,
        median_s,
        pairs_per_s,
        flops_per_s: pairs_per_s * dpo_flops_per_pair(policy.config(), prompt, response),
        last_loss,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use tsr_model::testing::{random_model, tiny_config};
    use tsr_model::{DType, Device};

    #[test]
    fn benches_run_on_the_tiny_shape() {
        let m = random_model(&tiny_config(384), 3, &Device::Cpu, DType::F32).unwrap();
        let r = m.clone_weights().unwrap();
        let mut seen = Vec::new();
        let d = bench_dpo(&m, &r, 2, 6, 5, 2, |i, s, loss| seen.push((i, s, loss))).unwrap();
        assert_eq!(seen.iter().map(|x| x.0).collect::<Vec<_>>(), vec![0, 1, 2]);
        assert_eq!(d.step_s.len(), 2);
        // Step 0 starts at policy == reference: sigmoid DPO's loss is ln 2.
        assert!(
            (seen[0].2 - std::f64::consts::LN_2).abs() < 1e-4,
            "{seen:?}"
        );
        assert!(d.pairs_per_s > 0.0 && d.last_loss.is_finite());
        let sampling = tsr_model::Sampling::Sample {
            temperature: 1.0,
            top_p: None,
            top_k: None,
        };
        let g = tsr_model::bench::bench_generate(&m, 3, 12, 5, sampling.clone(), false).unwrap();
        assert!(g.new_tokens >= 3 && g.new_tokens <= 15, "{g:?}");
        // Ignoring the end of turn, every row makes all its tokens.
        let g = tsr_model::bench::bench_generate(&m, 3, 12, 5, sampling, true).unwrap();
        assert_eq!((g.new_tokens, g.stopped_early), (15, 0), "{g:?}");
        assert_eq!(tsr_model::bench::prompt_ids(&m, 12).unwrap().len(), 12);
        assert!(tsr_model::bench::prompt_ids(&m, 3).is_err());
    }
}

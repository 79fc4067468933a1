//! One optimizer step: micro-batch forwards and backwards, accumulation, clipping, AdamW.
//!
//! The caller's closure computes one micro-batch's loss (the mean over its pairs) and says how
//! many pairs it holds. Each micro loss is back-propagated at once (so only one micro-batch's
//! graph is alive at a time) with weight `pairs_i`, and the accumulated gradient is divided
//! by the step's total pair count. The result is the gradient of the mean loss over all pairs
//! of the step; with equal micro-batches that is exactly "sum of micro losses times
//! 1 / accum_steps", and the short last step of an epoch is still weighted per pair.

use std::sync::Arc;

use candle_core::{DType, Tensor};
use serde::{Deserialize, Serialize};
use tsr_model::GradSink;

use super::clip::clip_owned_grad_norm;
use super::{ensure_finite, AdamW, DpoError, DpoSummary, ParamGrads};

/// What the closure returns for one micro-batch.
#[derive(Debug, Clone)]
pub struct MicroLoss {
    /// Scalar loss, the mean over the micro-batch's pairs, carrying the autograd graph.
    pub loss: Tensor,
    /// Pairs in the micro-batch (> 0).
    pub pairs: usize,
    /// DPO metrics of the micro-batch, if the loss is a DPO loss.
    pub dpo: Option<DpoSummary>,
    /// The sink that was active while the loss was built, where the backward puts the
    /// gradients of the weights whose ops compute them (the rest go to candle's store).
    pub sink: Option<Arc<GradSink>>,
}

/// What one optimizer step did.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StepMetrics {
    /// Optimizer step count after this update (1 for the first update).
    pub step: u64,
    /// Learning rate used.
    #[serde(with = "super::exact_f64")]
    pub lr: f64,
    /// Mean loss over the step's pairs.
    #[serde(with = "super::exact_f64")]
    pub loss: f64,
    /// Global gradient L2 norm before clipping.
    #[serde(with = "super::exact_f64")]
    pub grad_norm: f64,
    /// Whether clipping scaled the gradients down.
    pub clipped: bool,
    /// Pairs in the step.
    pub pairs: usize,
    /// Micro-batches in the step.
    pub micro_batches: usize,
    /// Pair-weighted DPO metrics, when every micro-batch reported them.
    pub dpo: Option<DpoSummary>,
}

/// Runs `micro_batches` forward/backward passes (`loss_fn(i)` for micro-batch `i`), then
/// clips the accumulated gradient to `clip` (global L2 norm) and applies one AdamW update at
/// `lr`. A non-finite loss or gradient norm fails with [`DpoError::NonFinite`] before any
/// parameter changes.
pub fn train_step<F, E>(
    opt: &mut AdamW,
    micro_batches: usize,
    clip: Option<f64>,
    lr: f64,
    mut loss_fn: F,
) -> Result<StepMetrics, DpoError>
where
    F: FnMut(usize) -> Result<MicroLoss, E>,
    E: Into<DpoError>,
{
    if micro_batches == 0 {
        return Err(DpoError::InvalidConfig(
            "a step needs at least one micro-batch".into(),
        ));
    }
    let step = opt.step_count() + 1;
    let mut acc: Option<ParamGrads> = None;
    let mut total_pairs = 0usize;
    let mut weighted_loss = 0.0f64;
    let mut summaries = Vec::with_capacity(micro_batches);
    for i in 0..micro_batches {
        let micro = loss_fn(i).map_err(Into::into)?;
        if micro.pairs == 0 {
            return Err(DpoError::InvalidConfig(format!(
                "micro-batch {i} has no pairs"
            )));
        }
        let value = micro.loss.to_dtype(DType::F64)?.to_scalar::<f64>()?;
        ensure_finite(value, &format!("loss of micro-batch {i}"), step)?;
        let grads = {
            // The store goes at the end of this block: the collected gradients are then the
            // only holders of their storage, so they are accumulated and scaled in place.
            let store = micro.loss.affine(micro.pairs as f64, 0.0)?.backward()?;
            opt.collect_grads_with(&store, micro.sink.as_deref())?
        };
        match acc.as_mut() {
            None => acc = Some(grads),
            Some(a) => a.add_assign_owned(&grads)?,
        }
        total_pairs += micro.pairs;
        weighted_loss += value * micro.pairs as f64;
        summaries.push(micro.dpo);
    }
    let mut grads = acc.expect("at least one micro-batch");
    if total_pairs > 1 {
        // Scaling by exactly 1 would be an identity pass over every gradient.
        grads.scale_owned(1.0 / total_pairs as f64)?;
    }
    let outcome = clip_owned_grad_norm(&mut grads, clip, step)?;
    opt.step_with(&grads, lr)?;
    let dpo = summaries
        .iter()
        .copied()
        .collect::<Option<Vec<_>>>()
        .map(|parts| DpoSummary::combine(&parts));
    Ok(StepMetrics {
        step: opt.step_count(),
        lr,
        loss: weighted_loss / total_pairs as f64,
        grad_norm: outcome.norm,
        clipped: outcome.clipped(),
        pairs: total_pairs,
        micro_batches,
        dpo,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::AdamWConfig;
    use candle_core::{Device, Var};

    /// Loss = mean over pairs of (w . x_p)^2; accumulation over micro-batches must give the
    /// same update as one full batch.
    fn run(split: &[(usize, usize)]) -> Vec<f32> {
        let xs: Vec<[f32; 3]> = (0..5)
            .map(|p| [p as f32 * 0.3 - 0.5, 1.0 - p as f32 * 0.2, 0.25])
            .collect();
        let w =
            Var::from_tensor(&Tensor::new(&[[0.5f32, -0.2, 0.1]], &Device::Cpu).unwrap()).unwrap();
        let mut opt =
            AdamW::new(vec![("w".to_string(), w.clone())], AdamWConfig::default()).unwrap();
        let m = train_step(&mut opt, split.len(), Some(10.0), 0.1, |i| {
            let (lo, hi) = split[i];
            let rows: Vec<f32> = xs[lo..hi].concat();
            let x = Tensor::from_vec(rows, (hi - lo, 3), &Device::Cpu)?;
            let loss = w.as_tensor().broadcast_mul(&x)?.sum(1)?.sqr()?.mean_all()?;
            Ok::<_, DpoError>(MicroLoss {
                loss,
                pairs: hi - lo,
                dpo: None,
                sink: None,
            })
        })
        .unwrap();
        assert_eq!(m.pairs, 5);
        assert_eq!(m.step, 1);
        w.as_tensor().flatten_all().unwrap().to_vec1().unwrap()
    }

    #[test]
    fn accumulation_matches_the_full_batch() {
        let full = run(&[(0, 5)]);
        let parts = run(&[(0, 2), (2, 4), (4, 5)]);
        for (a, b) in full.iter().zip(&parts) {
            assert!((a - b).abs() < 1e-6, "{full:?} vs {parts:?}");
        }
    }

    #[test]
    fn non_finite_loss_stops_before_any_update() {
        let w = Var::from_tensor(&Tensor::new(&[1f32], &Device::Cpu).unwrap()).unwrap();
        let mut opt =
            AdamW::new(vec![("w".to_string(), w.clone())], AdamWConfig::default()).unwrap();
        let err = train_step(&mut opt, 1, None, 0.1, |_| {
            Ok::<_, DpoError>(MicroLoss {
                loss: w.as_tensor().affine(f64::NAN, 0.0)?.sum_all()?,
                pairs: 1,
                dpo: None,
                sink: None,
            })
        })
        .unwrap_err();
        assert!(matches!(err, DpoError::NonFinite { step: 1, .. }), "{err}");
        assert_eq!(opt.step_count(), 0);
        assert_eq!(w.as_tensor().to_vec1::<f32>().unwrap(), vec![1.0]);
    }
}

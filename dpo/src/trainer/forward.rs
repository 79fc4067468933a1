//! The policy side of a DPO step: differentiable log-probs of a micro-batch of pairs and its
//! loss against the stored reference log-probs.

use candle_core::Tensor;

use super::{PairLogp, TrainPair, TrainerError};
use crate::{dpo_loss, DpoError, DpoLossConfig, MicroLoss, PairLogps};
use tsr_model::LanguageModel;

/// Differentiable policy log-probs `(chosen [n], rejected [n])` of the pairs `idx`.
pub(super) fn policy_logps(
    model: &LanguageModel,
    pairs: &[TrainPair],
    idx: &[usize],
) -> Result<(Tensor, Tensor), TrainerError> {
    let mut seqs = Vec::with_capacity(idx.len() * 2);
    for &j in idx {
        let p = &pairs[j];
        seqs.push((p.prompt.clone(), p.chosen.clone()));
        seqs.push((p.prompt.clone(), p.rejected.clone()));
    }
    let lp = model
        .response_logprobs_tensor(&seqs)?
        .reshape((idx.len(), 2))
        .map_err(DpoError::from)?;
    let chosen = lp.narrow(1, 0, 1).and_then(|t| t.squeeze(1));
    let rejected = lp.narrow(1, 1, 1).and_then(|t| t.squeeze(1));
    Ok((
        chosen.map_err(DpoError::from)?,
        rejected.map_err(DpoError::from)?,
    ))
}

/// The DPO loss of the pairs `idx` from the policy's log-probs.
pub(super) fn micro_loss(
    model: &LanguageModel,
    pairs: &[TrainPair],
    idx: &[usize],
    loss: &DpoLossConfig,
) -> Result<(MicroLoss, Vec<PairLogp>), TrainerError> {
    let (pc, pr) = policy_logps(model, pairs, idx)?;
    let dev = model.device();
    let n = idx.len();
    let col = |f: fn(&TrainPair) -> f32| -> Result<Tensor, DpoError> {
        let v: Vec<f32> = idx.iter().map(|&j| f(&pairs[j])).collect();
        Ok(Tensor::from_vec(v, n, dev)?)
    };
    let rc = col(|p| p.ref_chosen)?;
    let rr = col(|p| p.ref_rejected)?;
    let nc: Vec<u32> = idx.iter().map(|&j| pairs[j].chosen.len() as u32).collect();
    let nr: Vec<u32> = idx
        .iter()
        .map(|&j| pairs[j].rejected.len() as u32)
        .collect();
    let out = dpo_loss(
        &PairLogps {
            policy_chosen: &pc,
            policy_rejected: &pr,
            reference_chosen: &rc,
            reference_rejected: &rr,
            chosen_tokens: Some(&nc),
            rejected_tokens: Some(&nr),
        },
        loss,
    )?;
    let vc = pc
        .to_dtype(candle_core::DType::F32)
        .and_then(|t| t.to_vec1::<f32>());
    let vr = pr
        .to_dtype(candle_core::DType::F32)
        .and_then(|t| t.to_vec1::<f32>());
    let (vc, vr) = (vc.map_err(DpoError::from)?, vr.map_err(DpoError::from)?);
    let logps = idx
        .iter()
        .zip(vc.iter().zip(&vr))
        .map(|(&index, (&chosen, &rejected))| PairLogp {
            index,
            chosen,
            rejected,
        })
        .collect();
    let summary = out.summary()?;
    Ok((
        MicroLoss {
            loss: out.loss,
            pairs: n,
            dpo: Some(summary),
            sink: None,
        },
        logps,
    ))
}

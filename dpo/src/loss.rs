//! DPO-family losses as pure functions of summed response log-probabilities.
//!
//! Inputs are four `(batch,)` tensors: the policy's and the reference's log-probability of the
//! chosen and of the rejected response of each pair. The policy tensors carry the autograd
//! graph; the reference tensors are detached here so no gradient can leak into them. With
//! `logits = (pc - rc) - (pr - rr)`:
//!
//! - sigmoid DPO: `-log sigmoid(beta * logits)`, averaged over the batch;
//! - IPO: `(logits - 1 / (2 beta))^2`, averaged over the batch;
//! - either one length-normalised: every log-prob is first divided by its response's token
//!   count (policy and reference alike, as in open-instruct's `dpo_norm`).
//!
//! The log-sigmoid is built from primitive, differentiable candle ops only (`abs`, `exp`, `log`,
//! `affine`), because several fused candle ops silently drop gradients. The formula
//! `log sigmoid(x) = x/2 - |x|/2 - ln(1 + exp(-|x|))` never overflows (`exp` sees only
//! non-positive arguments) and, unlike `min(x, 0) - ln(1 + exp(-|x|))`, has the exact gradient
//! `1 - sigmoid(x)` at `x = 0` whatever sign candle assigns to `|x|'(0)`: the two kinks
//! cancel. `x = 0` is the first DPO step (policy == reference), so this matters.
//!
//! All arithmetic is in f32 (inputs of another dtype are converted).

use candle_core::{DType, Tensor};
use serde::{Deserialize, Serialize};

use super::DpoError;

/// Which preference loss to apply to the log-ratio logits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DpoLossKind {
    /// `-log sigmoid(beta * logits)` (Rafailov et al. 2023).
    Sigmoid,
    /// `(logits - 1 / (2 beta))^2` (Azar et al. 2023).
    Ipo,
}

/// Hyperparameters of the loss.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DpoLossConfig {
    /// Strength of the implicit KL penalty; must be finite and > 0.
    pub beta: f64,
    /// Sigmoid (DPO) or IPO.
    pub kind: DpoLossKind,
    /// Divide each log-prob by its response token count before forming the logits.
    pub length_normalize: bool,
}

impl Default for DpoLossConfig {
    fn default() -> Self {
        Self {
            beta: 0.1,
            kind: DpoLossKind::Sigmoid,
            length_normalize: false,
        }
    }
}

/// The log-probabilities of one batch of pairs, each `(batch,)`.
#[derive(Debug, Clone, Copy)]
pub struct PairLogps<'a> {
    /// Summed log-prob of each chosen response under the policy (carries the graph).
    pub policy_chosen: &'a Tensor,
    /// Summed log-prob of each rejected response under the policy (carries the graph).
    pub policy_rejected: &'a Tensor,
    /// Summed log-prob of each chosen response under the frozen reference.
    pub reference_chosen: &'a Tensor,
    /// Summed log-prob of each rejected response under the frozen reference.
    pub reference_rejected: &'a Tensor,
    /// Response token counts of the chosen responses; required with `length_normalize`.
    pub chosen_tokens: Option<&'a [u32]>,
    /// Response token counts of the rejected responses; required with `length_normalize`.
    pub rejected_tokens: Option<&'a [u32]>,
}

/// The loss and TRL-style per-pair metrics of one batch.
#[derive(Debug, Clone)]
pub struct DpoOutput {
    /// Scalar loss (mean over the batch), differentiable w.r.t. the policy log-probs.
    pub loss: Tensor,
    /// `beta * (pc - rc)` per pair (`rewards/chosen`).
    pub chosen_rewards: Vec<f32>,
    /// `beta * (pr - rr)` per pair (`rewards/rejected`).
    pub rejected_rewards: Vec<f32>,
    /// `chosen_rewards - rejected_rewards` per pair (`rewards/margins`).
    pub margins: Vec<f32>,
    /// Whether the chosen reward is strictly greater than the rejected one.
    pub accuracies: Vec<bool>,
}

/// Batch means of [`DpoOutput`], for logs and checkpoints.
#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize, Deserialize)]
pub struct DpoSummary {
    /// Number of pairs averaged.
    pub pairs: usize,
    /// Mean loss.
    #[serde(with = "super::exact_f64")]
    pub loss: f64,
    /// Mean chosen reward.
    #[serde(with = "super::exact_f64")]
    pub reward_chosen: f64,
    /// Mean rejected reward.
    #[serde(with = "super::exact_f64")]
    pub reward_rejected: f64,
    /// Mean margin.
    #[serde(with = "super::exact_f64")]
    pub margin: f64,
    /// Fraction of pairs whose chosen reward beats the rejected one.
    #[serde(with = "super::exact_f64")]
    pub accuracy: f64,
}

impl DpoSummary {
    /// Pair-weighted mean of several summaries (micro-batches of one optimizer step).
    pub fn combine(parts: &[DpoSummary]) -> DpoSummary {
        let pairs: usize = parts.iter().map(|p| p.pairs).sum();
        if pairs == 0 {
            return DpoSummary::default();
        }
        let w = |f: fn(&DpoSummary) -> f64| {
            parts.iter().map(|p| f(p) * p.pairs as f64).sum::<f64>() / pairs as f64
        };
        DpoSummary {
            pairs,
            loss: w(|p| p.loss),
            reward_chosen: w(|p| p.reward_chosen),
            reward_rejected: w(|p| p.reward_rejected),
            margin: w(|p| p.margin),
            accuracy: w(|p| p.accuracy),
        }
    }
}

impl DpoOutput {
    /// Batch means of the loss and metrics (reads the loss value from the device).
    pub fn summary(&self) -> Result<DpoSummary, DpoError> {
        let n = self.chosen_rewards.len();
        let mean = |xs: &[f32]| xs.iter().map(|&x| x as f64).sum::<f64>() / n.max(1) as f64;
        Ok(DpoSummary {
            pairs: n,
            loss: self.loss.to_dtype(DType::F64)?.to_scalar::<f64>()?,
            reward_chosen: mean(&self.chosen_rewards),
            reward_rejected: mean(&self.rejected_rewards),
            margin: mean(&self.margins),
            accuracy: self.accuracies.iter().filter(|&&a| a).count() as f64 / n.max(1) as f64,
        })
    }
}

/// Numerically stable, fully differentiable `log(sigmoid(x))`, elementwise.
///
/// `x/2 - |x|/2 - ln(1 + exp(-|x|))`; see the module docs for why this form.
pub fn log_sigmoid(x: &Tensor) -> candle_core::Result<Tensor> {
    let abs = x.abs()?;
    let softplus_tail = (abs.neg()?.exp()? + 1.0)?.log()?;
    (x.affine(0.5, 0.0)? - abs.affine(0.5, 0.0)?)? - softplus_tail
}

/// Computes the configured preference loss and per-pair metrics for one batch.
pub fn dpo_loss(logps: &PairLogps<'_>, cfg: &DpoLossConfig) -> Result<DpoOutput, DpoError> {
    if !(cfg.beta.is_finite() && cfg.beta > 0.0) {
        return Err(DpoError::InvalidConfig(format!(
            "beta must be finite and > 0, got {}",
            cfg.beta
        )));
    }
    let f32_vec = |t: &Tensor, what: &str| -> Result<Tensor, DpoError> {
        let t = t.to_dtype(DType::F32)?;
        if t.rank() != 1 {
            return Err(DpoError::InvalidConfig(format!(
                "{what} must have shape (batch,), got {:?}",
                t.dims()
            )));
        }
        Ok(t)
    };
    let mut pc = f32_vec(logps.policy_chosen, "policy_chosen")?;
    let mut pr = f32_vec(logps.policy_rejected, "policy_rejected")?;
    let mut rc = f32_vec(logps.reference_chosen, "reference_chosen")?.detach();
    let mut rr = f32_vec(logps.reference_rejected, "reference_rejected")?.detach();
    let n = pc.dim(0)?;
    for (t, what) in [
        (&pr, "policy_rejected"),
        (&rc, "reference_chosen"),
        (&rr, "reference_rejected"),
    ] {
        if t.dim(0)? != n {
            return Err(DpoError::InvalidConfig(format!(
                "{what} has {} pairs, policy_chosen has {n}",
                t.dim(0)?
            )));
        }
    }
    if n == 0 {
        return Err(DpoError::InvalidConfig("empty batch".into()));
    }

    if cfg.length_normalize {
        let counts = |c: Option<&[u32]>, what: &str| -> Result<Tensor, DpoError> {
            let c = c.ok_or_else(|| {
                DpoError::InvalidConfig(format!("length_normalize needs {what} token counts"))
            })?;
            if c.len() != n || c.contains(&0) {
                return Err(DpoError::InvalidConfig(format!(
                    "{what} token counts must be {n} positive numbers, got {c:?}"
                )));
            }
            let v: Vec<f32> = c.iter().map(|&x| x as f32).collect();
            Ok(Tensor::from_vec(v, n, pc.device())?)
        };
        let nc = counts(logps.chosen_tokens, "chosen")?;
        let nr = counts(logps.rejected_tokens, "rejected")?;
        pc = pc.div(&nc)?;
        rc = rc.div(&nc)?;
        pr = pr.div(&nr)?;
        rr = rr.div(&nr)?;
    }

    let chosen_logratio = (&pc - &rc)?;
    let rejected_logratio = (&pr - &rr)?;
    let logits = (&chosen_logratio - &rejected_logratio)?;
    let losses = match cfg.kind {
        DpoLossKind::Sigmoid => log_sigmoid(&logits.affine(cfg.beta, 0.0)?)?.neg()?,
        DpoLossKind::Ipo => logits.affine(1.0, -1.0 / (2.0 * cfg.beta))?.sqr()?,
    };
    let loss = losses.mean_all()?;

    let chosen_rewards = chosen_logratio
        .detach()
        .affine(cfg.beta, 0.0)?
        .to_vec1::<f32>()?;
    let rejected_rewards = rejected_logratio
        .detach()
        .affine(cfg.beta, 0.0)?
        .to_vec1::<f32>()?;
    let margins: Vec<f32> = chosen_rewards
        .iter()
        .zip(&rejected_rewards)
        .map(|(c, r)| c - r)
        .collect();
    let accuracies = chosen_rewards
        .iter()
        .zip(&rejected_rewards)
        .map(|(c, r)| c > r)
        .collect();
    Ok(DpoOutput {
        loss,
        chosen_rewards,
        rejected_rewards,
        margins,
        accuracies,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    fn t(xs: &[f32]) -> Tensor {
        Tensor::new(xs, &Device::Cpu).unwrap()
    }

    fn logps<'a>(pc: &'a Tensor, pr: &'a Tensor, rc: &'a Tensor, rr: &'a Tensor) -> PairLogps<'a> {
        PairLogps {
            policy_chosen: pc,
            policy_rejected: pr,
            reference_chosen: rc,
            reference_rejected: rr,
            chosen_tokens: None,
            rejected_tokens: None,
        }
    }

    #[test]
    fn policy_equal_to_reference_gives_exactly_ln2_and_half_gradient() {
        for n in [1usize, 2, 4, 8] {
            let c: Vec<f32> = (0..n).map(|i| -10.0 - 3.7 * i as f32).collect();
            let r: Vec<f32> = (0..n).map(|i| -20.5 + 1.3 * i as f32).collect();
            let pc = Var::from_tensor(&t(&c)).unwrap();
            let pr = Var::from_tensor(&t(&r)).unwrap();
            let (rc, rr) = (t(&c), t(&r));
            let cfg = DpoLossConfig::default();
            let out = dpo_loss(&logps(pc.as_tensor(), pr.as_tensor(), &rc, &rr), &cfg).unwrap();
            let loss = out.loss.to_scalar::<f32>().unwrap();
            assert_eq!(loss, 2f32.ln(), "batch {n}");
            // d loss / d pc_i = -beta * (1 - sigmoid(0)) / n = -beta / (2 n).
            let g = out.loss.backward().unwrap();
            let gc = g.get(pc.as_tensor()).unwrap().to_vec1::<f32>().unwrap();
            let gr = g.get(pr.as_tensor()).unwrap().to_vec1::<f32>().unwrap();
            let want = (-cfg.beta / (2.0 * n as f64)) as f32;
            for i in 0..n {
                assert!((gc[i] - want).abs() <= 1e-7, "{gc:?}");
                assert!((gr[i] + want).abs() <= 1e-7, "{gr:?}");
            }
            assert!(out.accuracies.iter().all(|a| !a));
            assert!(out.margins.iter().all(|&m| m == 0.0));
        }
    }

    #[test]
    fn log_sigmoid_values_and_gradient_match_closed_form() {
        let xs = [
            -200.0f32, -30.0, -5.0, -1e-3, 0.0, 1e-3, 0.7, 5.0, 30.0, 200.0,
        ];
        let x = Var::from_tensor(&t(&xs)).unwrap();
        let y = log_sigmoid(x.as_tensor()).unwrap();
        let g = y.sum_all().unwrap().backward().unwrap();
        let gx = g.get(x.as_tensor()).unwrap().to_vec1::<f32>().unwrap();
        let ys = y.to_vec1::<f32>().unwrap();
        for (i, &xi) in xs.iter().enumerate() {
            let xi = xi as f64;
            let want = -(-xi).exp().ln_1p();
            let sig = 1.0 / (1.0 + (-xi).exp());
            assert!(
                (ys[i] as f64 - want).abs() <= 1e-6 * want.abs().max(1.0),
                "x={xi}"
            );
            assert!(
                (gx[i] as f64 - (1.0 - sig)).abs() <= 1e-6,
                "x={xi} grad {}",
                gx[i]
            );
            assert!(ys[i].is_finite() && gx[i].is_finite());
        }
    }

    #[test]
    fn rewards_margin_accuracy_and_ipo() {
        let pc = t(&[-1.0, -4.0]);
        let pr = t(&[-3.0, -2.0]);
        let rc = t(&[-2.0, -3.0]);
        let rr = t(&[-2.0, -3.0]);
        let cfg = DpoLossConfig {
            beta: 0.5,
            ..Default::default()
        };
        let out = dpo_loss(&logps(&pc, &pr, &rc, &rr), &cfg).unwrap();
        assert_eq!(out.chosen_rewards, vec![0.5, -0.5]);
        assert_eq!(out.rejected_rewards, vec![-0.5, 0.5]);
        assert_eq!(out.margins, vec![1.0, -1.0]);
        assert_eq!(out.accuracies, vec![true, false]);
        // logits = [2, -2]: loss = mean(-ln sigmoid(1), -ln sigmoid(-1)).
        let want = 0.5 * ((1.0 + (-1f64).exp()).ln() + (1.0 + 1f64.exp()).ln());
        let got = out.loss.to_scalar::<f32>().unwrap() as f64;
        assert!((got - want).abs() < 1e-6);

        let ipo = DpoLossConfig {
            beta: 0.5,
            kind: DpoLossKind::Ipo,
            length_normalize: false,
        };
        let out = dpo_loss(&logps(&pc, &pr, &rc, &rr), &ipo).unwrap();
        // (2 - 1)^2 and (-2 - 1)^2.
        assert_eq!(out.loss.to_scalar::<f32>().unwrap(), 5.0);
    }

    #[test]
    fn length_normalisation_divides_all_four_logps() {
        let pc = t(&[-6.0]);
        let pr = t(&[-8.0]);
        let rc = t(&[-3.0]);
        let rr = t(&[-12.0]);
        let mut lp = logps(&pc, &pr, &rc, &rr);
        let cfg = DpoLossConfig {
            beta: 1.0,
            kind: DpoLossKind::Ipo,
            length_normalize: true,
        };
        assert!(matches!(
            dpo_loss(&lp, &cfg),
            Err(DpoError::InvalidConfig(_))
        ));
        lp.chosen_tokens = Some(&[3]);
        lp.rejected_tokens = Some(&[4]);
        let out = dpo_loss(&lp, &cfg).unwrap();
        // (-2 - -1) - (-2 - -3) = -2; (-2 - 0.5)^2 = 6.25.
        assert_eq!(out.chosen_rewards, vec![-1.0]);
        assert_eq!(out.rejected_rewards, vec![1.0]);
        assert_eq!(out.loss.to_scalar::<f32>().unwrap(), 6.25);
    }

    #[test]
    fn reference_gets_no_gradient_and_bad_input_is_rejected() {
        let pc = Var::from_tensor(&t(&[-1.0])).unwrap();
        let rc = Var::from_tensor(&t(&[-2.0])).unwrap();
        let pr = t(&[-1.0]);
        let out = dpo_loss(
            &logps(pc.as_tensor(), &pr, rc.as_tensor(), &pr),
            &DpoLossConfig::default(),
        )
        .unwrap();
        let g = out.loss.backward().unwrap();
        assert!(g.get(pc.as_tensor()).is_some());
        assert!(g.get(rc.as_tensor()).is_none());

        let bad = DpoLossConfig {
            beta: 0.0,
            ..Default::default()
        };
        assert!(dpo_loss(&logps(&pr, &pr, &pr, &pr), &bad).is_err());
        let two = t(&[-1.0, -2.0]);
        assert!(dpo_loss(&logps(&pr, &two, &pr, &pr), &DpoLossConfig::default()).is_err());
    }
}

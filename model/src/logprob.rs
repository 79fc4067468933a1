//! The log-probability of each row's target token, `logits[t] - logsumexp(logits)`, as one
//! graph node on the CPU.
//!
//! Scoring computed it through candle's ops: the row maximum (outside the graph), a shifted
//! copy, `exp`, the row sum, `log`, the maximum added back, the target gathered and the
//! difference: eight passes over a `[rows, vocab]` chunk forward, each a single-threaded loop,
//! and in the backward a zeroed `[rows, vocab]` gradient and an add for four of those nodes,
//! again on the calling thread while the thread pool waited. Here the forward is one parallel
//! pass per row and the backward another, recomputing the exponentials from the logits (they
//! are not kept: the chunk's `[rows, vocab]` copies were the largest tensors a scoring graph
//! held).
//!
//! **The same bits as candle's ops, by construction.** Each row takes its maximum as candle's
//! `max_keepdim` does (the first value, replaced by each larger one), its exponentials with
//! the same `f32::exp` of the same differences, and its sum through candle's own row reduction
//! (`VecOps::vec_reduce_sum`, whatever vector unit it picks at run time). The backward is the
//! chain rule through candle's nodes, each step as candle's backward computes it, including
//! its additions into zeroed gradients (`0.0 + g` turns `-0.0` into `+0.0`). Unit tests compare
//! values and gradients bit for bit with candle's ops.

use candle_core::{CpuStorage, CustomOp1, CustomOp2, DType, Layout, Result, Shape, Tensor, D};
use rayon::prelude::*;

use super::fused::slice;

/// `logits [rows, vocab]` -> `[rows, 1]`: `logits[r, t_r] - logsumexp(logits[r])`.
struct TargetLogprob {
    /// Each row's target token.
    targets: Vec<u32>,
}

/// `(rows, vocab)` of a `[rows, vocab]` input with one target per row, each below `vocab`.
fn check(l: &Layout, targets: &[u32], op: &str) -> Result<(usize, usize)> {
    let (rows, vocab) = l.shape().dims2()?;
    if rows != targets.len() || vocab == 0 {
        candle_core::bail!("{op}: logits {:?} for {} targets", l.dims(), targets.len());
    }
    if let Some(t) = targets.iter().find(|&&t| t as usize >= vocab) {
        candle_core::bail!("{op}: target {t} outside a vocabulary of {vocab}");
    }
    Ok((rows, vocab))
}

/// The row's maximum as candle's `max_keepdim` takes it.
fn row_max(xs: &[f32]) -> f32 {
    let mut m = xs[0];
    for &v in xs {
        if m < v {
            m = v;
        }
    }
    m
}

/// `e = exp(xs - m)`, and candle's row sum of `e`.
fn shifted_exp(xs: &[f32], m: f32, e: &mut [f32]) -> f32 {
    for (ei, &x) in e.iter_mut().zip(xs) {
        *ei = (x - m).exp();
    }
    let mut s = 0f32;
    // SAFETY: `e` holds `e.len()` initialised values and `s` is a valid f32.
    unsafe {
        <f32 as candle_core::cpu::kernels::VecOps>::vec_reduce_sum(e.as_ptr(), &mut s, e.len())
    };
    s
}

impl CustomOp1 for TargetLogprob {
    fn name(&self) -> &'static str {
        "target-logprob"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let (rows, vocab) = check(l, &self.targets, self.name())?;
        let x = slice(s, l, self.name())?;
        let mut out = vec![0f32; rows];
        out.par_iter_mut().enumerate().for_each_init(
            || vec![0f32; vocab],
            |e, (r, o)| {
                let xs = &x[r * vocab..(r + 1) * vocab];
                let m = row_max(xs);
                let lse = shifted_exp(xs, m, e).ln() + m;
                *o = xs[self.targets[r] as usize] - lse;
            },
        );
        Ok((CpuStorage::F32(out), Shape::from((rows, 1))))
    }

    fn bwd(&self, logits: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let op = TargetLogprobBwd {
            targets: self.targets.clone(),
        };
        logits.apply_op2_no_bwd(&grad.contiguous()?, &op).map(Some)
    }
}

/// The backward of [`TargetLogprob`]: `(logits [rows, vocab], g [rows, 1])` -> the logits'
/// gradient, `g (onehot(t) - softmax(logits))` computed step by step as candle's backward of
/// its ops does.
struct TargetLogprobBwd {
    targets: Vec<u32>,
}

impl CustomOp2 for TargetLogprobBwd {
    fn name(&self) -> &'static str {
        "target-logprob-bwd"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let name = self.name();
        let (rows, vocab) = check(l1, &self.targets, name)?;
        let (x, g) = (slice(s1, l1, name)?, slice(s2, l2, name)?);
        if g.len() != rows {
            candle_core::bail!("{name}: gradient {:?} for {rows} rows", l2.dims());
        }
        let mut out = vec![0f32; rows * vocab];
        out.par_chunks_mut(vocab).enumerate().for_each(|(r, o)| {
            let xs = &x[r * vocab..(r + 1) * vocab];
            let m = row_max(xs);
            let s = shifted_exp(xs, m, o);
            // Down candle's nodes: `lp = gathered - lse` hands `0 - g` to `lse = log(s) + m`,
            // which hands it on to `log(s)` (`0 + ..`); `log` divides by `s`; the row sum
            // broadcasts it; `exp` multiplies by its output; the shift passes it to the logits.
            let to_lse = 0.0 - g[r];
            let to_log = 0.0 + to_lse;
            let to_sum = 0.0 + to_log / s;
            let to_exp = 0.0 + to_sum;
            for v in o.iter_mut() {
                *v = 0.0 + to_exp * *v;
            }
            // The gathered target's share, `0 + g`, added into the same gradient.
            o[self.targets[r] as usize] += 0.0 + g[r];
        });
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }
}

/// `logits[r, targets[r]] - logsumexp(logits[r])`, `[rows, 1]`, as one graph node: the bits of
/// candle's ops forward and backward. `None` where it does not apply (another device or dtype,
/// a non-contiguous or empty input); the caller then takes candle's ops.
pub(crate) fn target_logprob(logits: &Tensor, targets: &[u32]) -> Result<Option<Tensor>> {
    let applies = logits.device().is_cpu()
        && logits.dtype() == DType::F32
        && logits.rank() == 2
        && logits.is_contiguous()
        && logits.elem_count() > 0;
    if !applies {
        return Ok(None);
    }
    logits
        .apply_op1(TargetLogprob {
            targets: targets.to_vec(),
        })
        .map(Some)
}

/// candle's ops for the same: `logits [rows, vocab]`, `targets [rows, 1]` (u32).
pub(crate) fn target_logprob_by_ops(logits: &Tensor, targets: &Tensor) -> Result<Tensor> {
    // log p = logit[target] - logsumexp(logits); the max shift carries no gradient.
    let m = logits.max_keepdim(D::Minus1)?.detach();
    let lse = (logits
        .broadcast_sub(&m)?
        .exp()?
        .sum_keepdim(D::Minus1)?
        .log()?
        + m)?;
    logits.gather(targets, 1)? - lse
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::bits;
    use candle_core::{Device, Var};

    /// Values with repeats (ties for the maximum) and exact zeros of both signs.
    fn values(n: usize, seed: u64, spread: f32) -> Vec<f32> {
        (0..n as u64)
            .map(|i| {
                let h = (i.wrapping_mul(2654435761) ^ seed.wrapping_mul(97)) % 1013;
                match h % 11 {
                    0 => 0.0,
                    1 => -0.0,
                    _ => (h as f32 - 506.0) / 1013.0 * spread,
                }
            })
            .collect()
    }

    /// Scoring's use, both ways: logits from a product with a trained weight, the rows'
    /// log-probabilities in chunks, concatenated and summed per sequence by a 0/1 matrix, under
    /// an upstream weighting with signed zeros. Values, and the weight's and input's gradients,
    /// bit for bit; vocabulary sizes around candle's vector steps, targets at the maximum, at a
    /// tie and elsewhere.
    #[test]
    fn the_same_bits_as_candles_ops_forward_and_backward() {
        let dev = Device::Cpu;
        for (rows, k, vocab, spread) in [
            (5, 8, 31, 3.0),
            (40, 16, 64, 20.0),
            (33, 12, 97, 80.0),
            (130, 24, 257, 5.0),
        ] {
            let w0 = Tensor::from_vec(values(vocab * k, 1, 1.0), (vocab, k), &dev).unwrap();
            let h0 = Tensor::from_vec(values(rows * k, 2, spread), (rows, k), &dev).unwrap();
            let targets: Vec<u32> = (0..rows as u32)
                .map(|r| (r * 7 + 3) % vocab as u32)
                .collect();
            // Two "sequences" own alternate rows; the upstream weights hold signed zeros.
            let sel: Vec<f32> = (0..2 * rows)
                .map(|i| ((i / rows) == (i % rows) % 2) as u8 as f32)
                .collect();
            let up = Tensor::new(&[-0.0f32, 1.5], &dev).unwrap();
            let run = |ours: bool| {
                let w = Var::from_tensor(&w0).unwrap();
                let hv = Var::from_tensor(&h0).unwrap();
                let logits = hv.as_tensor().matmul(&w.as_tensor().t().unwrap()).unwrap();
                let mut parts = Vec::new();
                for start in (0..rows).step_by(16) {
                    let len = 16.min(rows - start);
                    let chunk = logits.narrow(0, start, len).unwrap().contiguous().unwrap();
                    let tg = &targets[start..start + len];
                    parts.push(match ours {
                        true => target_logprob(&chunk, tg).unwrap().expect("applies"),
                        false => {
                            let t = Tensor::new(tg, &dev).unwrap().unsqueeze(1).unwrap();
                            target_logprob_by_ops(&chunk, &t).unwrap()
                        }
                    });
                }
                let lp = Tensor::cat(&parts, 0).unwrap();
                let sel = Tensor::from_vec(sel.clone(), (2, rows), &dev).unwrap();
                let per_seq = sel.matmul(&lp).unwrap().squeeze(1).unwrap();
                let g = (&per_seq * &up)
                    .unwrap()
                    .sum_all()
                    .unwrap()
                    .backward()
                    .unwrap();
                (
                    bits(&lp),
                    bits(g.get(w.as_tensor()).unwrap()),
                    bits(g.get(hv.as_tensor()).unwrap()),
                )
            };
            let (theirs, ours) = (run(false), run(true));
            assert_eq!(ours.0, theirs.0, "values, {rows} x {vocab}");
            assert_eq!(ours.1, theirs.1, "weight gradient, {rows} x {vocab}");
            assert_eq!(ours.2, theirs.2, "input gradient, {rows} x {vocab}");
        }
    }

    /// The gradient of the logits themselves, row by row against candle's ops, with upstream
    /// gradients of both zero signs, and without a graph (inference) the same values.
    #[test]
    fn the_logits_gradient_and_inference_values_match() {
        let dev = Device::Cpu;
        let (rows, vocab) = (6, 50);
        let x0 = Tensor::from_vec(values(rows * vocab, 3, 30.0), (rows, vocab), &dev).unwrap();
        let targets: Vec<u32> = vec![0, 49, 7, 7, 25, 13];
        let up = Tensor::new(&[[0.5f32], [-0.0], [0.0], [-2.0], [1e-30], [3.0]], &dev).unwrap();
        let run = |ours: bool| {
            let x = Var::from_tensor(&x0).unwrap();
            let lp = match ours {
                true => target_logprob(x.as_tensor(), &targets).unwrap().unwrap(),
                false => {
                    let t = Tensor::new(targets.as_slice(), &dev)
                        .unwrap()
                        .unsqueeze(1)
                        .unwrap();
                    target_logprob_by_ops(x.as_tensor(), &t).unwrap()
                }
            };
            let g = (&lp * &up).unwrap().sum_all().unwrap().backward().unwrap();
            (bits(&lp), bits(g.get(x.as_tensor()).unwrap()))
        };
        let (theirs, ours) = (run(false), run(true));
        assert_eq!(ours, theirs);
        let plain = target_logprob(&x0, &targets).unwrap().unwrap();
        assert_eq!(bits(&plain), theirs.0);
    }

    /// A target outside the vocabulary, or a count that does not match the rows, is an error
    /// naming the op; other devices' and dtypes' inputs are left to candle's ops.
    #[test]
    fn bad_targets_are_errors_and_other_inputs_are_not_taken() {
        let dev = Device::Cpu;
        let x = Tensor::zeros((2, 4), DType::F32, &dev).unwrap();
        let e = target_logprob(&x, &[1, 4]).unwrap_err().to_string();
        assert!(e.contains("target 4 outside a vocabulary of 4"), "{e}");
        let e = target_logprob(&x, &[1]).unwrap_err().to_string();
        assert!(e.contains("for 1 targets"), "{e}");
        let f64s = x.to_dtype(DType::F64).unwrap();
        assert!(target_logprob(&f64s, &[0, 1]).unwrap().is_none());
        assert!(target_logprob(&x.t().unwrap(), &[0, 1, 2, 3])
            .unwrap()
            .is_none());
    }
}

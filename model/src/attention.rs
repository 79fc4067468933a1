//! Training attention on the CPU as one graph node: the scaled scores, the masked softmax and
//! the weighted values.
//!
//! Through candle's ops these were seven nodes (the scaling, a reshape, the keys' transpose,
//! the scores' product, two reshapes around the softmax, the values' product), and candle's
//! backward zeroes and adds into the gradient of each on the calling thread: for the `T x S`
//! scores of every layer four times over. Here the forward makes no node between the inputs
//! and the output and keeps the probabilities and scaled queries (candle's ops kept the scores
//! as well), and the backward runs the chain rule through the same products and the same
//! softmax backward as candle's ops would, in the same layouts. (Without what the forward kept,
//! the backward recomputes it by the same ops: the same bits.)
//!
//! **The same bits as candle's ops.** The forward calls the storage's own `affine` and
//! `matmul` with the layouts `Tensor` would pass, and the fused softmax's row kernel. The
//! backward calls `Tensor::matmul` on the operands candle's matmul backward uses. Where
//! candle added a gradient into zeros between two of these nodes and this op does not, only
//! the sign of an exact zero can differ (`-0.0 + 0.0` is `+0.0`), and a zero's sign reaches no
//! other value through products, sums and differences; the inputs' gradients are accumulated
//! into zeros by candle as before. A unit test compares values and gradients bit for bit.

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp3, DType, Layout, Result, Shape, Tensor};

use super::kernels::{masked_softmax_rows, SoftmaxBwd};

/// `softmax(scale * q k^T + mask) v` with grouped KV heads.
struct AttentionCore {
    /// `1 / sqrt(head_dim)`.
    scale: f64,
    /// Query heads per KV head.
    n_rep: usize,
    /// The additive mask `[B, 1, 1, T, S]`, contiguous, outside the graph.
    mask: Tensor,
    /// The forward's probabilities `[B, KVH, R * T, S]` and scaled queries `[B, KVH, R * T,
    /// D]`, kept for the backward (taken by it; recomputed, to the same bits, if missing).
    kept: std::sync::Mutex<Option<(Tensor, Tensor)>>,
}

/// `(B, KV heads, T, S, head_dim)` of `q [B, H, T, D]` and `k`, `v [B, KVH, S, D]`.
fn dims_of(lq: &[usize], lk: &[usize], lv: &[usize], n_rep: usize) -> Result<[usize; 5]> {
    match (lq, lk) {
        (&[b, h, t, d], &[bk, g, s, dk]) if lk == lv && (b, d) == (bk, dk) && h == g * n_rep => {
            Ok([b, g, t, s, d])
        }
        _ => candle_core::bail!(
            "attention: queries {lq:?}, keys {lk:?} and values {lv:?} do not fit {n_rep} query heads per key head"
        ),
    }
}

impl AttentionCore {
    /// The probabilities `[B, KVH, R * T, S]` and the scaled queries `[B, KVH, R * T, D]`, by
    /// the ops of the forward, outside the graph.
    fn probs(&self, q: &Tensor, k: &Tensor) -> Result<(Tensor, Tensor)> {
        let [b, g, t, s, d] = dims_of(q.dims(), k.dims(), k.dims(), self.n_rep)?;
        let q2 = (q.detach() * self.scale)?.reshape((b, g, self.n_rep * t, d))?;
        let scores = q2
            .matmul(&k.detach().t()?)?
            .reshape((b, g, self.n_rep, t, s))?;
        let p = super::kernels::masked_softmax(&scores, &self.mask, false)?;
        Ok((p.reshape((b, g, self.n_rep * t, s))?, q2))
    }
}

impl CustomOp3 for AttentionCore {
    fn name(&self) -> &'static str {
        "attention-core"
    }

    fn cpu_fwd(
        &self,
        sq: &CpuStorage,
        lq: &Layout,
        sk: &CpuStorage,
        lk: &Layout,
        sv: &CpuStorage,
        lv: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let [b, g, t, s, d] = dims_of(lq.dims(), lk.dims(), lv.dims(), self.n_rep)?;
        let rt = self.n_rep * t;
        // `(q * scale).reshape(..)`: candle's affine (`x * scale + 0`), a contiguous result.
        let CpuStorage::F32(qs) = sq.affine(lq, self.scale, 0.0)? else {
            candle_core::bail!("attention: f32 only");
        };
        let qs = CpuStorage::F32(qs);
        let lq2 = Layout::contiguous((b, g, rt, d));
        // `.matmul(&k.t())`.
        let scores = qs.matmul(sk, (b * g, rt, s, d), &lq2, &lk.transpose(2, 3)?)?;
        let CpuStorage::F32(scores) = scores else {
            candle_core::bail!("attention: f32 only");
        };
        let (mask, lm) = self.mask.storage_and_layout();
        let (candle_core::Storage::Cpu(CpuStorage::F32(m)), Some((m0, m1))) =
            (&*mask, lm.contiguous_offsets())
        else {
            candle_core::bail!("attention: the mask must be contiguous f32 on the CPU");
        };
        let p = masked_softmax_rows(&scores, [b, g, self.n_rep, t, s], &m[m0..m1]);
        drop(scores);
        // `.matmul(&v)`.
        let p = CpuStorage::F32(p);
        let y = p.matmul(
            sv,
            (b * g, rt, d, s),
            &Layout::contiguous((b, g, rt, s)),
            lv,
        )?;
        // Kept for the backward as tensors (moved, not copied).
        let (CpuStorage::F32(p), CpuStorage::F32(qs)) = (p, qs) else {
            unreachable!("both made as f32 above")
        };
        let dev = candle_core::Device::Cpu;
        let kept = (
            Tensor::from_vec(p, (b, g, rt, s), &dev)?,
            Tensor::from_vec(qs, (b, g, rt, d), &dev)?,
        );
        *self.kept.lock().unwrap_or_else(|e| e.into_inner()) = Some(kept);
        Ok((y, Shape::from((b, g, rt, d))))
    }

    fn bwd(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let [b, g, t, s, _] = dims_of(q.dims(), k.dims(), v.dims(), self.n_rep)?;
        let kept = self.kept.lock().unwrap_or_else(|e| e.into_inner()).take();
        let (p, q2) = match kept {
            Some(kept) => kept,
            None => self.probs(q, k)?,
        };
        let v = v.detach();
        // The values' product: `grad @ v.t()` for the probabilities, `p.t() @ grad` for `v`.
        let gp = grad.matmul(&v.t()?)?;
        let gv = p.t()?.matmul(grad)?;
        // The softmax (from its result), then the scores' product: `ds @ k` for the scaled
        // queries (`k.t().t()` has `k`'s layout), `q2.t() @ ds` for `k.t()`, handed to `k`
        // transposed; the scaling's backward scales.
        let p5 = p.reshape((b, g, self.n_rep, t, s))?;
        let gp5 = gp.reshape((b, g, self.n_rep, t, s))?.contiguous()?;
        let ds = p5
            .apply_op2_no_bwd(&gp5, &SoftmaxBwd)?
            .reshape((b, g, self.n_rep * t, s))?;
        let gq = ds
            .matmul(&k.detach())?
            .reshape(q.dims())?
            .affine(self.scale, 0.0)?;
        let gk = q2.t()?.matmul(&ds)?.t()?;
        Ok((Some(gq), Some(gk), Some(gv)))
    }
}

/// `softmax(q k^T / sqrt(D) + mask) v` for `q [B, H, T, D]`, `k`, `v [B, KVH, S, D]` and
/// `mask [B, 1, 1, T, S]`, as one node of the autograd graph: `[B, KVH, R * T, D]` (`R = H /
/// KVH`), the bits of candle's ops forward and backward. `None` where it does not apply
/// (another device or dtype, non-contiguous inputs); the caller then takes candle's ops.
pub(crate) fn attention_core(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    mask: &Tensor,
    n_rep: usize,
) -> Result<Option<Tensor>> {
    let fits = |t: &Tensor| t.device().is_cpu() && t.dtype() == DType::F32 && t.is_contiguous();
    if !(fits(q) && fits(k) && fits(v) && mask.device().is_cpu() && mask.dtype() == DType::F32) {
        return Ok(None);
    }
    let [b, _, t, s, _] = dims_of(q.dims(), k.dims(), v.dims(), n_rep)?;
    let mask = mask.detach().contiguous()?;
    if mask.dims() != [b, 1, 1, t, s] {
        candle_core::bail!(
            "attention: mask {:?} does not fit [{b}, 1, 1, {t}, {s}]",
            mask.dims()
        );
    }
    let hd = q.dim(3)?;
    let op = AttentionCore {
        scale: 1.0 / (hd as f64).sqrt(),
        n_rep,
        mask,
        kept: std::sync::Mutex::new(None),
    };
    q.apply_op3(k, v, op).map(Some)
}

/// Moves heads between `[B, T, N * D]` and `[B, N, T, D]` (both contiguous). `to_heads`: the
/// first into the second; otherwise back. Values are moved, never computed: the bits stay.
struct SwapHeads {
    heads: usize,
    to_heads: bool,
}

/// `[B, T, N, D]` `src` into `[B, N, T, D]` (`to_heads`), or back; each task one batch row and
/// head.
fn swap_heads(src: &[f32], [_, t, n, d]: [usize; 4], to_heads: bool) -> Vec<f32> {
    use rayon::prelude::*;
    let mut out = vec![0f32; src.len()];
    if src.is_empty() {
        return out;
    }
    if to_heads {
        out.par_chunks_mut(t * d).enumerate().for_each(|(bh, o)| {
            let (bi, h) = (bh / n, bh % n);
            for ti in 0..t {
                let from = ((bi * t + ti) * n + h) * d;
                o[ti * d..(ti + 1) * d].copy_from_slice(&src[from..from + d]);
            }
        });
    } else {
        out.par_chunks_mut(n * d).enumerate().for_each(|(bt, o)| {
            let (bi, ti) = (bt / t, bt % t);
            for h in 0..n {
                let from = ((bi * n + h) * t + ti) * d;
                o[h * d..(h + 1) * d].copy_from_slice(&src[from..from + d]);
            }
        });
    }
    out
}

impl SwapHeads {
    /// `[B, T, N, D]` of the op's input.
    fn dims(&self, l: &Layout) -> Result<[usize; 4]> {
        let n = self.heads;
        match (self.to_heads, l.dims()) {
            (true, &[b, t, nd]) if n > 0 && nd % n == 0 => Ok([b, t, n, nd / n]),
            (false, &[b, x, y, d]) if n > 0 && (x * y) % n == 0 => Ok([b, x * y / n, n, d]),
            (_, dims) => candle_core::bail!("heads: {dims:?} does not split into {n} heads"),
        }
    }
}

impl candle_core::CustomOp1 for SwapHeads {
    fn name(&self) -> &'static str {
        "swap-heads"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let [b, t, n, d] = self.dims(l)?;
        let (CpuStorage::F32(v), Some((a, z))) = (s, l.contiguous_offsets()) else {
            candle_core::bail!("heads: contiguous f32 input only");
        };
        let out = swap_heads(&v[a..z], [b, t, n, d], self.to_heads);
        let shape = match self.to_heads {
            true => Shape::from((b, n, t, d)),
            false => Shape::from((b, t, n * d)),
        };
        Ok((CpuStorage::F32(out), shape))
    }

    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let back = SwapHeads {
            heads: self.heads,
            to_heads: !self.to_heads,
        };
        let g = grad.contiguous()?.apply_op1_no_bwd(&back)?;
        g.reshape(arg.dims()).map(Some)
    }
}

/// Whether the heads ops apply to `x`: contiguous f32 on the CPU.
fn heads_apply(x: &Tensor) -> bool {
    x.device().is_cpu() && x.dtype() == DType::F32 && x.is_contiguous()
}

/// `x [B, T, N * D]` as `[B, N, T, D]`, contiguous, one graph node: the values of candle's
/// `reshape`, `transpose(1, 2)` and `contiguous` (three nodes, each a zeroed gradient and an
/// add in the backward). `None` where it does not apply.
pub(crate) fn split_heads(x: &Tensor, heads: usize) -> Result<Option<Tensor>> {
    if !heads_apply(x) || x.rank() != 3 {
        return Ok(None);
    }
    let op = SwapHeads {
        heads,
        to_heads: true,
    };
    x.apply_op1(op).map(Some)
}

/// `y`, `[B, N, T, D]` (or any contiguous 4-d shape holding those values, such as
/// [`attention_core`]'s `[B, KVH, R * T, D]`), back as `[B, T, N * D]`, one graph node: the
/// values of candle's `reshape`, `transpose(1, 2)` and `reshape`. `None` where it does not
/// apply.
pub(crate) fn merge_heads(y: &Tensor, heads: usize) -> Result<Option<Tensor>> {
    if !heads_apply(y) || y.rank() != 4 {
        return Ok(None);
    }
    let op = SwapHeads {
        heads,
        to_heads: false,
    };
    y.apply_op1(op).map(Some)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::bits;
    use candle_core::{Device, Var};

    fn values(n: usize, seed: u64) -> Vec<f32> {
        (0..n as u64)
            .map(|i| {
                let h = (i.wrapping_mul(2654435761) ^ seed.wrapping_mul(7919)) % 2003;
                match h % 17 {
                    0 => 0.0,
                    1 => -0.0,
                    _ => (h as f32 - 1001.0) / 211.0,
                }
            })
            .collect()
    }

    /// candle's ops, as the forward pass used them.
    fn candle_way(q: &Tensor, k: &Tensor, v: &Tensor, mask: &Tensor, n_rep: usize) -> Tensor {
        let (b, h, t, d) = q.dims4().unwrap();
        let (g, s) = (h / n_rep, k.dim(2).unwrap());
        let scale = 1.0 / (d as f64).sqrt();
        let q = (q * scale).unwrap().reshape((b, g, n_rep * t, d)).unwrap();
        let att = q.matmul(&k.t().unwrap()).unwrap();
        let att = att.reshape((b, g, n_rep, t, s)).unwrap();
        let att = super::super::kernels::masked_softmax(&att, mask, true)
            .unwrap()
            .reshape((b, g, n_rep * t, s))
            .unwrap();
        att.matmul(v).unwrap()
    }

    /// Values and the gradients of `q`, `k` and `v` agree bit for bit with candle's ops:
    /// grouped and ungrouped heads, a causal mask with padding, several batch rows, an upstream
    /// gradient with signed zeros, and inputs that reach the op through other ops (so their
    /// gradients accumulate into zeros as in a model).
    #[test]
    fn the_same_bits_as_candles_ops_forward_and_backward() {
        let dev = Device::Cpu;
        for (b, h, g, t, d) in [(1, 2, 2, 5, 8), (2, 9, 3, 37, 16), (3, 4, 1, 64, 32)] {
            let n_rep = h / g;
            let q0 = Tensor::from_vec(values(b * h * t * d, 1), (b, h, t, d), &dev).unwrap();
            let k0 = Tensor::from_vec(values(b * g * t * d, 2), (b, g, t, d), &dev).unwrap();
            let v0 = Tensor::from_vec(values(b * g * t * d, 3), (b, g, t, d), &dev).unwrap();
            let up =
                Tensor::from_vec(values(b * h * t * d, 4), (b, g, n_rep * t, d), &dev).unwrap();
            // Causal, the first row of each batch padded for `bi` positions.
            let mut m = vec![0f32; b * t * t];
            for bi in 0..b {
                for i in 0..t {
                    for j in 0..t {
                        if j > i || j < bi {
                            m[(bi * t + i) * t + j] = -1e9;
                        }
                    }
                }
            }
            let mask = Tensor::from_vec(m, (b, 1, 1, t, t), &dev).unwrap();
            let run = |ours: bool| {
                let (qv, kv, vv) = (
                    Var::from_tensor(&q0).unwrap(),
                    Var::from_tensor(&k0).unwrap(),
                    Var::from_tensor(&v0).unwrap(),
                );
                let q = qv.as_tensor().affine(1.25, 0.0).unwrap();
                let k = kv.as_tensor().affine(0.5, 0.1).unwrap();
                let v = vv.as_tensor().affine(1.0, -0.2).unwrap();
                let y = match ours {
                    true => attention_core(&q, &k, &v, &mask, n_rep)
                        .unwrap()
                        .expect("applies"),
                    false => candle_way(&q, &k, &v, &mask, n_rep),
                };
                let grads = (&y * &up).unwrap().sum_all().unwrap().backward().unwrap();
                let gb = |x: &Var| bits(grads.get(x.as_tensor()).unwrap());
                (bits(&y), gb(&qv), gb(&kv), gb(&vv))
            };
            let (theirs, ours) = (run(false), run(true));
            let case = format!("b {b}, heads {h}/{g}, t {t}, d {d}");
            assert_eq!(ours.0, theirs.0, "forward, {case}");
            assert_eq!(ours.1, theirs.1, "q gradient, {case}");
            assert_eq!(ours.2, theirs.2, "k gradient, {case}");
            assert_eq!(ours.3, theirs.3, "v gradient, {case}");
        }
    }

    /// A second backward pass through the same graph (what the forward kept is gone) recomputes
    /// it and gives the same gradients.
    #[test]
    fn a_second_backward_recomputes_to_the_same_bits() {
        let dev = Device::Cpu;
        let (b, h, g, t, d) = (2, 4, 2, 9, 8);
        let q = Var::from_tensor(
            &Tensor::from_vec(values(b * h * t * d, 11), (b, h, t, d), &dev).unwrap(),
        )
        .unwrap();
        let k = Var::from_tensor(
            &Tensor::from_vec(values(b * g * t * d, 12), (b, g, t, d), &dev).unwrap(),
        )
        .unwrap();
        let v = Var::from_tensor(
            &Tensor::from_vec(values(b * g * t * d, 13), (b, g, t, d), &dev).unwrap(),
        )
        .unwrap();
        let mut m = vec![0f32; b * t * t];
        for (i, x) in m.iter_mut().enumerate() {
            if (i % t) > (i / t) % t {
                *x = -1e9;
            }
        }
        let mask = Tensor::from_vec(m, (b, 1, 1, t, t), &dev).unwrap();
        let y = attention_core(q.as_tensor(), k.as_tensor(), v.as_tensor(), &mask, h / g)
            .unwrap()
            .expect("applies");
        let loss = y.sqr().unwrap().sum_all().unwrap();
        let grads = |g: &candle_core::backprop::GradStore| {
            [&q, &k, &v].map(|x| bits(g.get(x.as_tensor()).unwrap()))
        };
        let first = grads(&loss.backward().unwrap());
        let second = grads(&loss.backward().unwrap());
        assert_eq!(first, second);
    }

    /// Splitting and merging heads give candle's values, and the gradients of the tensor
    /// before them are candle's bit for bit.
    #[test]
    fn heads_move_like_candles_reshape_and_transpose() {
        let dev = Device::Cpu;
        let (b, t, n, d) = (2, 7, 3, 4);
        let x0 = Tensor::from_vec(values(b * t * n * d, 5), (b, t, n * d), &dev).unwrap();
        let up = Tensor::from_vec(values(b * t * n * d, 6), (b, t, n * d), &dev).unwrap();
        let scale = Tensor::from_vec(values(b * n * t * d, 7), (b, n, t, d), &dev).unwrap();
        let run = |ours: bool| {
            let xv = Var::from_tensor(&x0).unwrap();
            let x = xv.as_tensor().affine(2.0, 0.5).unwrap();
            let h = match ours {
                true => split_heads(&x, n).unwrap().expect("applies"),
                false => x
                    .reshape((b, t, n, d))
                    .unwrap()
                    .transpose(1, 2)
                    .unwrap()
                    .contiguous()
                    .unwrap(),
            };
            let h2 = (&h * &scale).unwrap();
            // Merged from the `[B, KVH, R * T, D]` view attention gives back.
            let h2 = h2.reshape((b, 1, n * t, d)).unwrap();
            let y = match ours {
                true => merge_heads(&h2, n).unwrap().expect("applies"),
                false => h2
                    .reshape((b, n, t, d))
                    .unwrap()
                    .transpose(1, 2)
                    .unwrap()
                    .reshape((b, t, n * d))
                    .unwrap(),
            };
            let g = (&y * &up).unwrap().sum_all().unwrap().backward().unwrap();
            (bits(&h), bits(&y), bits(g.get(xv.as_tensor()).unwrap()))
        };
        let (theirs, ours) = (run(false), run(true));
        assert_eq!(ours.0, theirs.0, "split");
        assert_eq!(ours.1, theirs.1, "merged");
        assert_eq!(ours.2, theirs.2, "gradient");
    }
}

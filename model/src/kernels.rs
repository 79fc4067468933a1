//! CPU kernels. A frozen-weight matmul whose backward gives only the input's gradient (LoRA
//! training over a frozen base; see [`frozen_matmul_wt`]). A masked softmax over attention
//! scores, fusing the
//! additive mask (broadcast over heads) with the softmax and using a vectorisable `exp`.
//! candle's separate `broadcast_add` + `softmax_last_dim` spend most of their time in glibc's
//! scalar `expf`, including its slow underflow path for every masked (-1e9) entry. With this
//! kernel, scoring 16 x 256 tokens of SmolLM2-135M on 2 cores went from about 460 to about
//! 515 tok/s. Training uses it too, with its backward (the gradient to the scores, from the
//! result; the mask is a constant). And `x @ w^T` itself ([`matmul_wt`]), in the faster gemm
//! orientation for the shape.
//! And a decode step's whole attention against the KV cache ([`decode_attention`]): batch-16
//! greedy decoding of SmolLM2-135M on 2 cores went from about 146 to about 161 tok/s, with the
//! same tokens on every generation measured (BENCHMARKS.md).

use candle_core::{CpuStorage, CustomOp1, CustomOp2, DType, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use super::fused::{dot, slice, slice_pair};
use super::trained::SMALL_M;

/// `exp(x)` for `x <= 0` to about 2e-7 relative error, branch-free so loops vectorise: range
/// reduction `x = n ln2 + r`, degree-6 Taylor polynomial on `|r| <= ln2/2`, `2^n` built from
/// exponent bits. Inputs below -87 give ~0 (as `expf` underflows).
#[inline(always)]
pub(crate) fn exp_neg(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_145_75;
    const LN2_LO: f32 = 1.428_606_8e-6;
    const ROUND: f32 = 12_582_912.0; // 1.5 * 2^23: adding and subtracting rounds to an integer
    let x = x.max(-87.0);
    let n = (x * LOG2E + ROUND) - ROUND;
    let r = x - n * LN2_HI - n * LN2_LO;
    let p = 1.0
        + r * (1.0
            + r * (0.5
                + r * (1.0 / 6.0 + r * (1.0 / 24.0 + r * (1.0 / 120.0 + r * (1.0 / 720.0))))));
    // `n` is a whole number in [-126, 0], so `n + ROUND` is exact and holds `n` in its low
    // bits: the integer without a float-to-int conversion (whose saturating form does not
    // vectorise).
    let ni = (n + ROUND).to_bits() as i32 - ROUND.to_bits() as i32;
    let scale = f32::from_bits(((ni + 127) as u32) << 23);
    p * scale
}

/// `o = softmax(xs + ms)` for one row. The elementwise passes (the mask's add, `exp`, the
/// scaling) are loops of their own so that they vectorise; the max and the sum stay one
/// sequential pass each, in order.
#[inline(always)]
fn softmax_row(xs: &[f32], ms: &[f32], o: &mut [f32]) {
    for (oi, (&xi, &mi)) in o.iter_mut().zip(xs.iter().zip(ms)) {
        *oi = xi + mi;
    }
    let max = o.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v));
    for oi in o.iter_mut() {
        *oi = exp_neg(*oi - max);
    }
    let mut sum = 0f32;
    for &oi in o.iter() {
        sum += oi;
    }
    let inv = 1.0 / sum;
    for oi in o.iter_mut() {
        *oi *= inv;
    }
}

/// `softmax(x + mask)` over the last dim, `x [B, H, R, T, S]` and `mask [B, 1, 1, T, S]` both
/// contiguous: each row one task's sequential max and sum.
pub(crate) fn masked_softmax_rows(x: &[f32], dims: [usize; 5], m: &[f32]) -> Vec<f32> {
    let [_, h, r, t, s] = dims;
    let mut out = vec![0f32; x.len()];
    let per_batch = h * r * t;
    let wide = super::fused::wide_simd();
    out.par_chunks_mut(s.max(1))
        .zip(x.par_chunks(s.max(1)))
        .enumerate()
        .for_each(|(row, (o, xs))| {
            let (bi, ti) = (row / per_batch, row % t);
            let ms = &m[(bi * t + ti) * s..(bi * t + ti + 1) * s];
            super::fused::simd!(wide, softmax_row(xs, ms, o));
        });
    out
}

/// Softmax over the last dim of `scores [B, H, R, T, S]` after adding `mask [B, 1, 1, T, S]`.
struct MaskedSoftmax;

impl CustomOp2 for MaskedSoftmax {
    fn name(&self) -> &'static str {
        "masked-softmax"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (x, m) = (slice(s1, l1, self.name())?, slice(s2, l2, self.name())?);
        let d = l1.dims();
        let [b, h, r, t, s] = d[..] else {
            candle_core::bail!("masked-softmax: scores must be 5-D, got {d:?}");
        };
        if l2.dims() != [b, 1, 1, t, s] {
            candle_core::bail!(
                "masked-softmax: mask {:?} does not fit scores {d:?}",
                l2.dims()
            );
        }
        let out = masked_softmax_rows(x, [b, h, r, t, s], m);
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }

    fn bwd(
        &self,
        _scores: &Tensor,
        _mask: &Tensor,
        res: &Tensor,
        grad_res: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let ds = res.apply_op2(&grad_res.contiguous()?, SoftmaxBwd)?;
        Ok((Some(ds), None))
    }
}

/// The softmax's backward over the last dim, from its result `p` and the incoming gradient
/// `g`: `p (g - sum(g p))`, each row one thread's sequential sum.
pub(crate) struct SoftmaxBwd;

impl CustomOp2 for SoftmaxBwd {
    fn name(&self) -> &'static str {
        "softmax-bwd"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (p, g) = slice_pair((s1, l1), (s2, l2), self.name(), ("result", "gradient"))?;
        let s = l1.dims().last().copied().unwrap_or(1).max(1);
        let mut out = vec![0f32; p.len()];
        out.par_chunks_mut(s)
            .zip(p.par_chunks(s).zip(g.par_chunks(s)))
            .for_each(|(o, (p, g))| {
                let dot: f32 = p.iter().zip(g).map(|(a, b)| a * b).sum();
                for ((o, &p), &g) in o.iter_mut().zip(p).zip(g) {
                    *o = p * (g - dot);
                }
            });
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }
}

/// `softmax(scores + mask, last dim)` for `scores [B, H, R, T, S]`, `mask [B, 1, 1, T, S]`:
/// the fused kernel for contiguous f32 CPU tensors, candle's ops otherwise. With
/// `differentiable`, the kernel carries its backward (to the scores; the mask is a constant)
/// and the fallback is candle's unfused softmax, whose gradients flow (its fused
/// `softmax_last_dim` has no backward on the CPU).
pub(crate) fn masked_softmax(
    scores: &Tensor,
    mask: &Tensor,
    differentiable: bool,
) -> Result<Tensor> {
    let fast = scores.device().is_cpu()
        && scores.dtype() == candle_core::DType::F32
        && mask.dtype() == candle_core::DType::F32
        && scores.rank() == 5;
    if fast {
        let (scores, mask) = (scores.contiguous()?, mask.detach().contiguous()?);
        if differentiable {
            scores.apply_op2(&mask, MaskedSoftmax)
        } else {
            scores.apply_op2_no_bwd(&mask, &MaskedSoftmax)
        }
    } else if differentiable {
        candle_nn::ops::softmax(&scores.broadcast_add(mask)?, candle_core::D::Minus1)
    } else {
        candle_nn::ops::softmax_last_dim(&scores.broadcast_add(mask)?)
    }
}

/// One decode step's attention (one new query per row) against the key/value cache, fused:
/// for each row, KV group and query head of the group, the scores `q . k_j` over the cache's
/// first `len` slots plus the additive mask, their softmax (the same `exp` as
/// [`MaskedSoftmax`]), and the weighted sum of the values. candle's path does this as two
/// batched matmuls of one-row products (one gemm call per row and group, where the call costs
/// more than its arithmetic) around the softmax. Each output row is one thread's sequential
/// sums, so the result does not depend on the thread count.
/// Additive mask entries at or below this hide their slot (masks put `-1e9` there).
pub(crate) const MASKED: f32 = -1e8;

struct DecodeAttention {
    /// Valid cache slots.
    len: usize,
    /// The additive mask, `[B, len]`.
    mask: Vec<f32>,
    /// Each row starts at its first visible slot instead of adding the masked slots before it
    /// at their (tiny, not zero) weights: what continuous batching asks, whose rows start far
    /// into the cache, and what a prompt's fused attention computes (`PromptAttention`).
    skip_masked_prefix: bool,
}

impl candle_core::CustomOp3 for DecodeAttention {
    fn name(&self) -> &'static str {
        "decode-attention"
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
        let (CpuStorage::F32(q), CpuStorage::F32(k), CpuStorage::F32(v)) = (sq, sk, sv) else {
            candle_core::bail!("decode-attention: f32 only");
        };
        let (Some((q0, q1)), Some((k0, k1)), Some((v0, v1))) = (
            lq.contiguous_offsets(),
            lk.contiguous_offsets(),
            lv.contiguous_offsets(),
        ) else {
            candle_core::bail!("decode-attention: contiguous inputs only");
        };
        let (q, k, v) = (&q[q0..q1], &k[k0..k1], &v[v0..v1]);
        let [b, g, r, d] = lq.dims()[..] else {
            candle_core::bail!(
                "decode-attention: queries must be [B, KVH, R, D], got {:?}",
                lq.dims()
            );
        };
        let [kb, kg, cap, kd] = lk.dims()[..] else {
            candle_core::bail!(
                "decode-attention: keys must be [B, KVH, capacity, D], got {:?}",
                lk.dims()
            );
        };
        let len = self.len;
        if (kb, kg, kd) != (b, g, d)
            || lv.dims() != lk.dims()
            || len > cap
            || self.mask.len() != b * len
        {
            candle_core::bail!(
                "decode-attention: queries {:?}, keys {:?}, values {:?}, {len} slots and a mask of {} do not fit",
                lq.dims(),
                lk.dims(),
                lv.dims(),
                self.mask.len()
            );
        }
        let mut out = vec![0f32; q.len()];
        let wide = super::fused::wide_simd();
        // One task per batch row and KV head: its `r` query heads share one read of the cache.
        out.par_chunks_mut(r * d)
            .zip(q.par_chunks(r * d))
            .enumerate()
            .for_each_init(
                || vec![0f32; r * len],
                |scores, (group, (y, qg))| {
                    let bi = group / g;
                    let base = group * cap * d;
                    let mask = &self.mask[bi * len..(bi + 1) * len];
                    let from = if self.skip_masked_prefix {
                        mask.iter().position(|&m| m > MASKED).unwrap_or(0)
                    } else {
                        0
                    };
                    let (k, v) = (
                        &k[base + from * d..base + len * d],
                        &v[base + from * d..base + len * d],
                    );
                    let (mask, scores) = (&mask[from..], &mut scores[..r * (len - from)]);
                    super::fused::simd!(wide, attend_group(qg, k, v, mask, scores, y));
                },
            );
        Ok((CpuStorage::F32(out), lq.shape().clone()))
    }
}

/// The attention of the query rows `qg [R, D]` that share one KV head, over `len` cached keys
/// and values (`k`, `v`: `[len, D]`), into `y [R, D]`. Each row's arithmetic is that of a row
/// alone (its scores, their softmax, then the weighted values in key order); the rows only share
/// the reads. The loops are arranged so that the compiler vectorises them: the exponentials
/// apart from their sum (which stays sequential), and for 64-wide heads the weighted values of up
/// to four rows summed over the keys in registers, each column in key order.
#[inline(always)]
fn attend_group(qg: &[f32], k: &[f32], v: &[f32], mask: &[f32], scores: &mut [f32], y: &mut [f32]) {
    let len = mask.len();
    let d = k.len() / len.max(1);
    let r = qg.len() / d.max(1);
    for j in 0..len {
        let kr = &k[j * d..(j + 1) * d];
        for i in 0..r {
            scores[i * len + j] = dot(&qg[i * d..(i + 1) * d], kr) + mask[j];
        }
    }
    for sc in scores.chunks_mut(len) {
        let max = sc.iter().fold(f32::NEG_INFINITY, |m, &x| m.max(x));
        for x in sc.iter_mut() {
            *x = exp_neg(*x - max);
        }
        let mut sum = 0f32;
        for &x in sc.iter() {
            sum += x;
        }
        let inv = 1.0 / sum;
        for x in sc.iter_mut() {
            *x *= inv;
        }
    }
    if d == 64 {
        // Up to four rows at a time share each read of a value row.
        let mut i = 0;
        while i < r {
            let n = (r - i).min(4);
            let (p, yi) = (&scores[i * len..(i + n) * len], &mut y[i * d..(i + n) * d]);
            match n {
                4 => weigh_values_64::<4>(p, v, len, yi),
                3 => weigh_values_64::<3>(p, v, len, yi),
                2 => weigh_values_64::<2>(p, v, len, yi),
                _ => weigh_values_64::<1>(p, v, len, yi),
            }
            i += n;
        }
        return;
    }
    y.fill(0.0);
    for j in 0..len {
        let vr = &v[j * d..(j + 1) * d];
        for i in 0..r {
            let p = scores[i * len + j];
            for (yi, vi) in y[i * d..(i + 1) * d].iter_mut().zip(vr) {
                *yi += p * vi;
            }
        }
    }
}

/// `y[i] = sum over j of p[i][j] * v[j]` for `R` rows of a 64-wide head: each column summed from
/// 0 in key order, the bits of adding `p[i][j] * v[j]` into a zeroed `y` key by key, with the
/// `R x 64` sums in registers.
#[inline(always)]
fn weigh_values_64<const R: usize>(p: &[f32], v: &[f32], len: usize, y: &mut [f32]) {
    let mut acc = [[0f32; 64]; R];
    for (j, vr) in v.chunks_exact(64).take(len).enumerate() {
        for (i, a) in acc.iter_mut().enumerate() {
            let pj = p[i * len + j];
            for (a, &x) in a.iter_mut().zip(vr) {
                *a += pj * x;
            }
        }
    }
    for (yi, a) in y.chunks_exact_mut(64).zip(&acc) {
        yi.copy_from_slice(a);
    }
}

/// Attention of one decode step, `q [B, KVH, R, D]` (already scaled; `R` query heads per KV
/// head) against the first `len` slots of the caches `[B, KVH, capacity, D]` with the additive
/// `mask [B, 1, 1, 1, len]`: `[B, KVH, R, D]`. `None` where the fused CPU kernel does not apply
/// (another device or dtype); the caller then takes candle's ops.
pub(crate) fn decode_attention(
    q: &Tensor,
    k_cache: &Tensor,
    v_cache: &Tensor,
    len: usize,
    mask: &Tensor,
    skip_masked_prefix: bool,
) -> Result<Option<Tensor>> {
    let f32_cpu = |t: &Tensor| t.device().is_cpu() && t.dtype() == candle_core::DType::F32;
    let fits = f32_cpu(q)
        && f32_cpu(k_cache)
        && f32_cpu(v_cache)
        && f32_cpu(mask)
        && k_cache.is_contiguous()
        && v_cache.is_contiguous();
    if !fits {
        return Ok(None);
    }
    let mask = mask.flatten_all()?.to_vec1::<f32>()?;
    let op = DecodeAttention {
        len,
        mask,
        skip_masked_prefix,
    };
    q.contiguous()?
        .apply_op3_no_bwd(k_cache, v_cache, &op)
        .map(Some)
}

/// `x @ w^T` for a frozen weight `w [out, in]` (a LoRA base): the backward pass gives the
/// gradient of `x` only. candle's matmul backward also computes the weight's gradient, a
/// full-size matmul and tensor per projection, even for a weight that is not trained.
struct FrozenMatmulT {
    w: Tensor,
}

impl CustomOp1 for FrozenMatmulT {
    fn name(&self) -> &'static str {
        "frozen-matmul-t"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let CpuStorage::F32(x) = s else {
            candle_core::bail!("frozen-matmul-t: f32 only");
        };
        let Some((o0, o1)) = l.contiguous_offsets() else {
            candle_core::bail!("frozen-matmul-t: contiguous input only");
        };
        // `[.., K]`: the leading dimensions are the rows (a 3-d input is its 2-d reshape).
        let dims = l.dims();
        let Some((&k, lead)) = dims.split_last().filter(|(_, lead)| !lead.is_empty()) else {
            candle_core::bail!("frozen-matmul-t: input of shape {dims:?}");
        };
        let m: usize = lead.iter().product();
        let x = Tensor::from_slice(&x[o0..o1], (m, k), self.w.device())?;
        let y = matmul_wt(&x, &self.w)?;
        let shape = Shape::from(lead.to_vec()).extend(&[y.dim(1)?]);
        Ok((CpuStorage::F32(y.flatten_all()?.to_vec1::<f32>()?), shape))
    }

    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad_res: &Tensor) -> Result<Option<Tensor>> {
        // A half-precision base is cast for the product (the gradient stays f32), by the
        // vector widening where it applies.
        let w = match grad_res.dtype() {
            DType::F32 if self.w.dtype() != DType::F32 => super::skinny::widened(&self.w)?,
            _ => None,
        };
        let w = match w {
            Some(w) => w,
            None => self.w.to_dtype(grad_res.dtype())?,
        };
        let g = match grad_res.rank() {
            2 => grad_res.clone(),
            r => grad_res.flatten_to(r - 2)?,
        };
        Ok(Some(g.matmul(&w)?.reshape(arg.dims())?))
    }
}

/// `x [M, in] @ w^T` where `w` is frozen: gradients flow to `x` only (CPU f32 `x`, `w` in f32
/// or half precision; elsewhere candle's matmul, whose backward also computes the unused weight
/// gradient). On the CPU `x` may also be `[B, T, in]`: the product of its 2-d reshape, as
/// `[B, T, out]` (see [`frozen_applies`]).
pub(crate) fn frozen_matmul_wt(x: &Tensor, w: &Tensor) -> Result<Tensor> {
    if x.device().is_cpu() && x.dtype() == candle_core::DType::F32 {
        x.contiguous()?.apply_op1(FrozenMatmulT { w: w.detach() })
    } else if x.dtype() != w.dtype() {
        // A half-precision base elsewhere (CUDA): the product in the base's precision, so no
        // f32 copy of the weight is made and kept for the backward pass.
        x.to_dtype(w.dtype())?.matmul(&w.t()?)?.to_dtype(x.dtype())
    } else {
        matmul_wt(x, w)
    }
}

/// Whether [`frozen_matmul_wt`] takes `x` with more than two dimensions: a CPU f32 `x`.
pub(crate) fn frozen_applies(x: &Tensor) -> bool {
    x.device().is_cpu() && x.dtype() == candle_core::DType::F32
}

thread_local! {
    /// Set while this thread generates: see [`matmul_wt`].
    static HALF_NATIVE: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Runs `f` as generation: on the CPU, products of few rows by [`super::skinny`]'s kernel,
/// which has no backward and reads half-precision weights as they are (widened, exactly, as it
/// reads them); off the CPU, products against half-precision weights computed in their
/// precision (casting every weight for each new token would cost more than the products).
/// Scoring and training, whose numbers must agree with each other, cast instead and use gemm.
pub(crate) fn with_half_native<R>(f: impl FnOnce() -> R) -> R {
    /// Restores the flag also when `f` panics (the thread may run another step after).
    struct Restore(bool);
    impl Drop for Restore {
        fn drop(&mut self) {
            HALF_NATIVE.with(|c| c.set(self.0));
        }
    }
    let _restore = Restore(HALF_NATIVE.with(|c| c.replace(true)));
    f()
}

/// Whether this thread is generating (inside [`with_half_native`]): products of few rows may
/// then use [`super::skinny`]'s kernels, which have no backward.
pub(crate) fn generating() -> bool {
    HALF_NATIVE.with(|c| c.get())
}

/// `x @ w^T` for `x [M, in]`, `w [out, in]`, choosing the faster gemm orientation. A weight in
/// another dtype than `x` (a half-precision base) is cast to `x`'s dtype for the product, except
/// while generating: on the CPU few rows go to [`super::skinny`], which widens the weight as it
/// reads it, and off the CPU `x` is cast to the weight's. The result has `x`'s dtype.
pub(crate) fn matmul_wt(x: &Tensor, w: &Tensor) -> Result<Tensor> {
    if generating() {
        // A decode step's few rows: the kernel that reads the weight once (no backward), also
        // for half-precision weights, which it widens as it reads them.
        if let Some(y) = super::skinny::matmul_wt(x, w)? {
            return Ok(y);
        }
    }
    if w.dtype() != x.dtype() {
        // On the CPU, a longer input (a prompt's prefill) is faster against the weight cast to
        // f32 than through gemm's half-precision kernels: for 16 prompts of 64 tokens with
        // SmolLM2-135M, 2.7 s through gemm's f16 kernels, 2.0 s with candle's cast and 1.6 s
        // (as with f32 weights) with [`super::skinny::widened`]'s, exact and vectorised.
        return if generating() && !x.device().is_cpu() {
            matmul_wt(&x.to_dtype(w.dtype())?, w)?.to_dtype(x.dtype())
        } else {
            // The vector widening makes a tensor outside the autograd graph: only while
            // generating (no backward) or for a weight that is not tracked (a frozen base); a
            // tracked one keeps candle's cast, and its gradient.
            let wide = match x.dtype() {
                DType::F32 if generating() || !w.track_op() => super::skinny::widened(w)?,
                _ => None,
            };
            match wide {
                Some(w) => matmul_wt(x, &w),
                None => matmul_wt(x, &w.to_dtype(x.dtype())?),
            }
        };
    }
    if w.track_op() && !generating() {
        // A trained weight: the same bits as below, one graph node with a cheaper backward.
        if let Some(y) = super::trained::trained_matmul_wt(x, w)? {
            return Ok(y);
        }
    }
    if x.dim(0)? <= SMALL_M {
        w.matmul(&x.t()?)?.t()
    } else {
        x.matmul(&w.t()?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, D};

    /// A tracked half-precision weight keeps its gradient through the cast (the vector
    /// widening, outside the graph, serves only untracked weights and generation), and both
    /// casts give the same product.
    #[test]
    fn a_tracked_half_weight_keeps_its_gradient() {
        let dev = Device::Cpu;
        let x = Tensor::randn(0f32, 1.0, (3, 8), &dev).unwrap();
        let w16 = Tensor::randn(0f32, 1.0, (5, 8), &dev)
            .unwrap()
            .to_dtype(DType::F16)
            .unwrap();
        let var = candle_core::Var::from_tensor(&w16).unwrap();
        let y = matmul_wt(&x, var.as_tensor()).unwrap();
        let grads = y.sum_all().unwrap().backward().unwrap();
        let g = grads.get(var.as_tensor()).expect("the weight's gradient");
        assert_eq!(g.dims(), &[5, 8]);
        let frozen = matmul_wt(&x, &w16).unwrap();
        assert_eq!(
            y.to_vec2::<f32>().unwrap(),
            frozen.to_vec2::<f32>().unwrap()
        );
    }

    /// The exponent's integer taken from the float's bits gives the bits of the conversion it
    /// replaced, over the whole input range (below -87, NaN and -inf clamp to -87).
    #[test]
    fn exp_keeps_its_bits_without_the_float_to_int_conversion() {
        fn converted(x: f32) -> f32 {
            const LOG2E: f32 = std::f32::consts::LOG2_E;
            const LN2_HI: f32 = 0.693_145_75;
            const LN2_LO: f32 = 1.428_606_8e-6;
            const ROUND: f32 = 12_582_912.0;
            let x = x.max(-87.0);
            let n = (x * LOG2E + ROUND) - ROUND;
            let r = x - n * LN2_HI - n * LN2_LO;
            let p = 1.0
                + r * (1.0
                    + r * (0.5
                        + r * (1.0 / 6.0
                            + r * (1.0 / 24.0 + r * (1.0 / 120.0 + r * (1.0 / 720.0))))));
            p * f32::from_bits(((n as i32 + 127) as u32) << 23)
        }
        let mut xs = vec![
            0.0f32,
            -0.0,
            -1e-30,
            -87.0,
            -87.5,
            -1e9,
            f32::NEG_INFINITY,
            f32::NAN,
        ];
        xs.extend((0..2_000_000).map(|i| -(i as f32) * 4.5e-5));
        xs.extend((0..100_000).map(|i| -f32::from_bits(i * 10_000)));
        for x in xs {
            assert_eq!(exp_neg(x).to_bits(), converted(x).to_bits(), "{x}");
        }
    }

    #[test]
    fn exp_is_accurate_on_softmax_inputs() {
        for i in 0..20_000 {
            let x = -(i as f32) * 0.005;
            let (a, e) = (exp_neg(x), x.exp());
            if x < -87.0 {
                assert!(a < 2e-38, "{x}: {a}");
            } else {
                assert!((a - e).abs() <= 4e-7 * e, "{x}: {a} vs {e}");
            }
        }
        assert!(exp_neg(-1e9) < 1e-37);
    }

    #[test]
    fn matches_candle_softmax() {
        let dev = Device::Cpu;
        let scores = Tensor::randn(0f32, 3.0, (2, 3, 2, 4, 5), &dev).unwrap();
        let m: Vec<f32> = (0..2 * 4 * 5)
            .map(|i| if i % 3 == 0 { -1e9 } else { 0.0 })
            .collect();
        let mask = Tensor::from_vec(m, (2, 1, 1, 4, 5), &dev).unwrap();
        let fast = masked_softmax(&scores, &mask, false).unwrap();
        let slow =
            candle_nn::ops::softmax(&scores.broadcast_add(&mask).unwrap(), D::Minus1).unwrap();
        let diff = (fast - slow)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!(diff < 1e-6, "{diff}");
    }

    /// The differentiable kernel's gradient against candle's unfused softmax, with a padded
    /// row (its first slots masked) and a fully masked row, from a non-contiguous input.
    #[test]
    fn masked_softmax_gradient_matches_candles() {
        let dev = Device::Cpu;
        let (b, h, r, t, s) = (2, 3, 2, 4, 6);
        let x = candle_core::Var::from_tensor(
            &Tensor::randn(0f32, 3.0, (b, h, r, s, t), &dev).unwrap(),
        )
        .unwrap();
        let scores = x.as_tensor().transpose(3, 4).unwrap(); // [b, h, r, t, s], strided
        let mut m = vec![0f32; b * t * s];
        for (i, v) in m.iter_mut().enumerate() {
            let (bi, ti, si) = (i / (t * s), (i / s) % t, i % s);
            if (bi == 1 && si < 2) || si > ti + 2 || (bi == 0 && ti == 3) {
                *v = -1e9;
            }
        }
        let mask = Tensor::from_vec(m, (b, 1, 1, t, s), &dev).unwrap();
        let weights: Vec<f32> = (0..b * h * r * t * s)
            .map(|i| ((i * 29 % 53) as f32 - 26.0) / 13.0)
            .collect();
        let weights = Tensor::from_vec(weights, (b, h, r, t, s), &dev).unwrap();
        let run = |fused: bool| {
            let p = if fused {
                masked_softmax(&scores, &mask, true).unwrap()
            } else {
                candle_nn::ops::softmax(&scores.broadcast_add(&mask).unwrap(), D::Minus1).unwrap()
            };
            let loss = (&p * &weights).unwrap().sum_all().unwrap();
            let g = loss.backward().unwrap();
            (p, g.get(x.as_tensor()).unwrap().clone())
        };
        let ((p, dx), (p0, dx0)) = (run(true), run(false));
        let max = |a: Tensor, b: Tensor| {
            (a - b)
                .unwrap()
                .abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap()
        };
        assert!(max(p, p0) < 1e-6);
        let d = max(dx, dx0);
        assert!(d < 1e-5, "gradient differs by {d}");
    }

    /// The wide-vector builds of the decode attention give the portable build's bits.
    #[test]
    fn decode_attention_builds_agree_bit_for_bit() {
        use super::super::fused::{simd, wide_simd, Simd};
        let (r, d, len) = (3, 20, 37);
        let f = |n: usize, s: f32| -> Vec<f32> {
            (0..n).map(|i| (i as f32 * 0.37 + s).sin()).collect()
        };
        let (q, k, v) = (f(r * d, 0.1), f(len * d, 0.2), f(len * d, 0.3));
        let mask: Vec<f32> = (0..len).map(|j| if j < 5 { -1e9 } else { 0.0 }).collect();
        let run = |isa: Simd| {
            let (mut sc, mut y) = (vec![0f32; r * len], vec![0f32; r * d]);
            simd!(isa, attend_group(&q, &k, &v, &mask, &mut sc, &mut y));
            y
        };
        let base = run(Simd::Base);
        let wide = run(wide_simd());
        assert!(base
            .iter()
            .zip(&wide)
            .all(|(a, b)| a.to_bits() == b.to_bits()));
        // Each row equals that row attended alone.
        for i in 0..r {
            let (mut sc, mut y) = (vec![0f32; len], vec![0f32; d]);
            attend_group(&q[i * d..(i + 1) * d], &k, &v, &mask, &mut sc, &mut y);
            assert_eq!(y, base[i * d..(i + 1) * d]);
        }
    }

    /// The decode attention's defining arithmetic, written plainly: each score a `dot` plus
    /// its mask, the softmax's exponentials summed in key order, and each row's weighted values
    /// added into a zeroed row key by key.
    fn attend_group_reference(qg: &[f32], k: &[f32], v: &[f32], mask: &[f32]) -> Vec<f32> {
        let len = mask.len();
        let d = k.len() / len.max(1);
        let r = qg.len() / d.max(1);
        let mut scores = vec![0f32; r * len];
        for j in 0..len {
            for i in 0..r {
                scores[i * len + j] =
                    dot(&qg[i * d..(i + 1) * d], &k[j * d..(j + 1) * d]) + mask[j];
            }
        }
        for sc in scores.chunks_mut(len) {
            let max = sc.iter().fold(f32::NEG_INFINITY, |m, &x| m.max(x));
            let mut sum = 0f32;
            for x in sc.iter_mut() {
                *x = exp_neg(*x - max);
                sum += *x;
            }
            let inv = 1.0 / sum;
            for x in sc.iter_mut() {
                *x *= inv;
            }
        }
        let mut y = vec![0f32; r * d];
        for j in 0..len {
            for i in 0..r {
                let p = scores[i * len + j];
                for (yi, vi) in y[i * d..(i + 1) * d].iter_mut().zip(&v[j * d..(j + 1) * d]) {
                    *yi += p * vi;
                }
            }
        }
        y
    }

    /// Every build of the decode attention gives the reference arithmetic's bits: 64-wide
    /// heads with 1 to 5 and 9 rows (each register tile, then 4 + 1 and 4 + 4 + 1), and other
    /// widths.
    #[test]
    fn decode_attention_keeps_the_reference_bits() {
        use super::super::fused::{simd, wide_simd, Simd};
        let f = |n: usize, s: f32| -> Vec<f32> {
            (0..n).map(|i| (i as f32 * 0.731 + s).sin() * 1.7).collect()
        };
        for (r, d, len) in [
            (3, 64, 37),
            (1, 64, 5),
            (2, 64, 30),
            (4, 64, 1),
            (5, 64, 12),
            (9, 64, 23),
            (2, 20, 9),
            (5, 7, 12),
            (9, 40, 23),
            (3, 128, 64),
        ] {
            let (q, k, v) = (f(r * d, 0.1), f(len * d, 0.2), f(len * d, 0.3));
            let mask: Vec<f32> = (0..len)
                .map(|j| if j % 5 == 1 { -1e9 } else { 0.0 })
                .collect();
            let want = attend_group_reference(&q, &k, &v, &mask);
            for isa in [Simd::Base, wide_simd()] {
                let (mut sc, mut y) = (vec![0f32; r * len], vec![0f32; r * d]);
                simd!(isa, attend_group(&q, &k, &v, &mask, &mut sc, &mut y));
                assert!(
                    y.iter().zip(&want).all(|(a, b)| a.to_bits() == b.to_bits()),
                    "{isa:?} r {r} d {d} len {len}"
                );
            }
        }
    }

    /// The fused decode attention against candle's ops on random inputs: grouped KV heads,
    /// rows with left padding (masked slots), a cache with unused capacity.
    #[test]
    fn decode_attention_matches_candles_ops() {
        let dev = Device::Cpu;
        let (b, g, r, d, cap, len) = (3, 2, 3, 20, 11, 7);
        let q = Tensor::randn(0f32, 1.0, (b, g, r, d), &dev).unwrap();
        let k = Tensor::randn(0f32, 1.0, (b, g, cap, d), &dev).unwrap();
        let v = Tensor::randn(0f32, 1.0, (b, g, cap, d), &dev).unwrap();
        let pad = [0usize, 2, 5];
        let mut m = vec![0f32; b * len];
        for (row, &p) in pad.iter().enumerate() {
            for j in 0..p {
                m[row * len + j] = -1e9;
            }
        }
        let mask = Tensor::from_vec(m, (b, 1, 1, 1, len), &dev).unwrap();
        let fused = decode_attention(&q, &k, &v, len, &mask, false)
            .unwrap()
            .unwrap();
        let kk = k.narrow(2, 0, len).unwrap();
        let vv = v.narrow(2, 0, len).unwrap();
        let att = q.matmul(&kk.t().unwrap()).unwrap(); // [b, g, r, len]
        let att = att
            .broadcast_add(&mask.reshape((b, 1, 1, len)).unwrap())
            .unwrap();
        let att = candle_nn::ops::softmax(&att, D::Minus1).unwrap();
        let want = att.matmul(&vv).unwrap();
        let diff = (&fused - want)
            .unwrap()
            .abs()
            .unwrap()
            .flatten_all()
            .unwrap()
            .max(0)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!(diff < 1e-5, "largest difference {diff}");
        // Skipping each row's masked slots: a row computes what it computes alone on a cache
        // that holds its visible slots only, bit for bit.
        let skipped = decode_attention(&q, &k, &v, len, &mask, true)
            .unwrap()
            .unwrap();
        for (row, &p) in pad.iter().enumerate() {
            let one = |t: &Tensor| t.narrow(0, row, 1).unwrap();
            let kr = one(&k).narrow(2, p, cap - p).unwrap().contiguous().unwrap();
            let vr = one(&v).narrow(2, p, cap - p).unwrap().contiguous().unwrap();
            let none = Tensor::zeros((1, 1, 1, 1, len - p), DType::F32, &dev).unwrap();
            let alone = decode_attention(&one(&q), &kr, &vr, len - p, &none, false)
                .unwrap()
                .unwrap();
            assert_eq!(
                one(&skipped)
                    .flatten_all()
                    .unwrap()
                    .to_vec1::<f32>()
                    .unwrap(),
                alone.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
                "row {row}"
            );
        }
        // Another dtype is left to candle's ops.
        let half = q.to_dtype(candle_core::DType::F16).unwrap();
        assert!(decode_attention(&half, &k, &v, len, &mask, false)
            .unwrap()
            .is_none());
    }

    #[test]
    fn a_frozen_matmul_gives_the_input_gradient_and_no_weight_gradient() {
        let dev = Device::Cpu;
        let x = candle_core::Var::from_tensor(&Tensor::randn(0f32, 1.0, (5, 7), &dev).unwrap())
            .unwrap();
        let w = candle_core::Var::from_tensor(&Tensor::randn(0f32, 1.0, (3, 7), &dev).unwrap())
            .unwrap();
        let t = Tensor::randn(0f32, 1.0, (5, 3), &dev).unwrap();
        let loss = |y: Tensor| (y * &t).unwrap().sum_all().unwrap();
        let plain = loss(x.as_tensor().matmul(&w.as_tensor().t().unwrap()).unwrap())
            .backward()
            .unwrap();
        let frozen = loss(frozen_matmul_wt(x.as_tensor(), w.as_tensor()).unwrap())
            .backward()
            .unwrap();
        let gx = |g: &candle_core::backprop::GradStore| {
            g.get(x.as_tensor())
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap()
        };
        for (a, b) in gx(&plain).iter().zip(gx(&frozen)) {
            assert!((a - b).abs() < 1e-5, "{a} vs {b}");
        }
        assert!(plain.get(w.as_tensor()).is_some());
        assert!(
            frozen.get(w.as_tensor()).is_none(),
            "no gradient for the frozen weight"
        );
        let y1 = x.as_tensor().matmul(&w.as_tensor().t().unwrap()).unwrap();
        let y2 = frozen_matmul_wt(x.as_tensor(), w.as_tensor()).unwrap();
        let d = (y1 - y2)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!(d < 1e-5, "{d}");
    }
}

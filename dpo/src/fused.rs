//! Fused, in-place CPU kernels for the AdamW update, and for the gradients' accumulation and
//! clipping before it.
//!
//! The portable update in [`super::optim`] is about 14 tensor ops, each allocating a new
//! tensor the size of the parameter: on 134 M parameters and 2 cores that measured 1.5 to
//! 2.8 s per step. On CPU, with contiguous f32 tensors, three in-place passes do the same:
//! `m` from `g`, `v` from `g`, then the parameter from `m` and `v`. Each pass evaluates the
//! same f32 expressions in the same order as the portable path (`affine` is `x * mul + add`,
//! no fused multiply-add), so both give equal values; a unit test in `optim` checks it.
//! Other devices and dtypes take the portable path.
//!
//! Each pass runs on the thread pool in fixed chunks of [`CHUNK`] elements. Every element is
//! computed alone, so the split changes no value: only how many cores share the pass.

use candle_core::{CpuStorage, InplaceOp1, InplaceOp2, InplaceOp3, Layout, Tensor};
use rayon::prelude::*;

/// Elements per parallel task of a pass (256 KiB of f32).
const CHUNK: usize = 1 << 16;

/// The f32 scalars of one update, cast exactly as candle's `affine` casts them.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Scalars {
    /// `1 - beta1`.
    pub w1: f32,
    /// `beta2`.
    pub b2: f32,
    /// `1 - beta2`.
    pub w2: f32,
    /// `1 - lr * weight_decay`, or `None` when this parameter is not decayed.
    pub decay: Option<f32>,
    /// `1 / sqrt(1 - beta2^t)`.
    pub inv_bc2_sqrt: f32,
    /// `eps`.
    pub eps: f32,
    /// `-lr / (1 - beta1^t)`.
    pub neg_step_size: f32,
}

fn slice<'a>(s: &'a CpuStorage, l: &Layout, name: &str) -> candle_core::Result<&'a [f32]> {
    match (s, l.contiguous_offsets()) {
        (CpuStorage::F32(v), Some((a, b))) => Ok(&v[a..b]),
        _ => candle_core::bail!("{name}: needs contiguous f32 input"),
    }
}

fn slice_mut<'a>(
    s: &'a mut CpuStorage,
    l: &Layout,
    name: &str,
) -> candle_core::Result<&'a mut [f32]> {
    match (s, l.contiguous_offsets()) {
        (CpuStorage::F32(v), Some((a, b))) => Ok(&mut v[a..b]),
        _ => candle_core::bail!("{name}: needs contiguous f32 output"),
    }
}

struct FirstMoment(f32);

impl InplaceOp2 for FirstMoment {
    fn name(&self) -> &'static str {
        "tsr-adamw-m"
    }

    fn cpu_fwd(
        &self,
        s1: &mut CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<()> {
        let g = slice(s2, l2, self.name())?;
        let m = slice_mut(s1, l1, self.name())?;
        if m.len() != g.len() {
            candle_core::bail!("{}: length mismatch", self.name());
        }
        let w = self.0;
        m.par_chunks_mut(CHUNK)
            .zip(g.par_chunks(CHUNK))
            .for_each(|(m, g)| {
                for (m, &g) in m.iter_mut().zip(g) {
                    *m += (g - *m) * w;
                }
            });
        Ok(())
    }
}

struct SecondMoment {
    b2: f32,
    w2: f32,
}

impl InplaceOp2 for SecondMoment {
    fn name(&self) -> &'static str {
        "tsr-adamw-v"
    }

    fn cpu_fwd(
        &self,
        s1: &mut CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<()> {
        let g = slice(s2, l2, self.name())?;
        let v = slice_mut(s1, l1, self.name())?;
        if v.len() != g.len() {
            candle_core::bail!("{}: length mismatch", self.name());
        }
        let (b2, w2) = (self.b2, self.w2);
        v.par_chunks_mut(CHUNK)
            .zip(g.par_chunks(CHUNK))
            .for_each(|(v, g)| {
                for (v, &g) in v.iter_mut().zip(g) {
                    *v = *v * b2 + (g * g) * w2;
                }
            });
        Ok(())
    }
}

struct ParamUpdate(Scalars);

impl InplaceOp3 for ParamUpdate {
    fn name(&self) -> &'static str {
        "tsr-adamw-param"
    }

    fn cpu_fwd(
        &self,
        s1: &mut CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> candle_core::Result<()> {
        let m = slice(s2, l2, self.name())?;
        let v = slice(s3, l3, self.name())?;
        let p = slice_mut(s1, l1, self.name())?;
        if p.len() != m.len() || p.len() != v.len() {
            candle_core::bail!("{}: length mismatch", self.name());
        }
        let s = self.0;
        p.par_chunks_mut(CHUNK)
            .zip(m.par_chunks(CHUNK).zip(v.par_chunks(CHUNK)))
            .for_each(|(p, (m, v))| {
                for ((p, &m), &v) in p.iter_mut().zip(m).zip(v) {
                    let mut theta = *p;
                    if let Some(d) = s.decay {
                        theta *= d;
                    }
                    let denom = v.sqrt() * s.inv_bc2_sqrt + s.eps;
                    *p = theta + (m / denom) * s.neg_step_size;
                }
            });
        Ok(())
    }
}

/// Whether the fused kernel applies: everything on CPU, f32 and contiguous.
pub(crate) fn applies(param: &Tensor, m: &Tensor, v: &Tensor, g: &Tensor) -> bool {
    [param, m, v, g]
        .iter()
        .all(|t| t.device().is_cpu() && t.dtype() == candle_core::DType::F32 && t.is_contiguous())
}

/// Updates `m`, `v` and `param` in place. Call only where [`applies`] holds.
pub(crate) fn update(
    param: &Tensor,
    m: &Tensor,
    v: &Tensor,
    g: &Tensor,
    s: Scalars,
) -> candle_core::Result<()> {
    m.inplace_op2(g, &FirstMoment(s.w1))?;
    v.inplace_op2(g, &SecondMoment { b2: s.b2, w2: s.w2 })?;
    param.inplace_op3(m, v, &ParamUpdate(s))
}

/// `g = g * mul + add` in place: candle's `affine` (its scalars cast to f32 as it casts them,
/// the same two roundings).
struct Affine {
    mul: f32,
    add: f32,
}

impl InplaceOp1 for Affine {
    fn name(&self) -> &'static str {
        "tsr-grad-affine"
    }

    fn cpu_fwd(&self, s: &mut CpuStorage, l: &Layout) -> candle_core::Result<()> {
        let g = slice_mut(s, l, self.name())?;
        let (mul, add) = (self.mul, self.add);
        g.par_chunks_mut(CHUNK).for_each(|g| {
            for g in g {
                *g = *g * mul + add;
            }
        });
        Ok(())
    }
}

/// Whether the in-place gradient kernels apply to `t`: on the CPU, f32 and contiguous.
pub(crate) fn in_place(t: &Tensor) -> bool {
    t.device().is_cpu() && t.dtype() == candle_core::DType::F32 && t.is_contiguous()
}

/// `g.affine(mul, add)` into `g`'s own storage. Call only where [`in_place`] holds and no
/// other tensor shares `g`'s storage.
pub(crate) fn affine(g: &Tensor, mul: f64, add: f64) -> candle_core::Result<()> {
    g.inplace_op1(&Affine {
        mul: mul as f32,
        add: add as f32,
    })
}

/// `a + b` into `a`'s own storage (the model layer's kernel, which the gradient sink uses too).
/// Call only where [`in_place`] holds for both, their shapes are equal and no other tensor
/// shares `a`'s storage.
pub(crate) fn add_into(a: &Tensor, b: &Tensor) -> candle_core::Result<()> {
    tsr_model::grad_sink::add_into(a, b)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;
    use tsr_model::testing::bits;

    /// Values over several chunks, with exact zeros of both signs.
    fn values(n: usize, seed: u32) -> Vec<f32> {
        (0..n as u32)
            .map(
                |i| match i.wrapping_mul(2654435761).wrapping_add(seed) % 17 {
                    0 => 0.0,
                    1 => -0.0,
                    h => (h as f32 - 8.5) * 1.37e-3 * (i % 1000) as f32,
                },
            )
            .collect()
    }

    /// The in-place kernels give candle's `affine` and `add` bit for bit, over a tensor of
    /// several chunks and a partial one.
    #[test]
    fn in_place_affine_and_add_give_candles_bits() {
        let n = 3 * CHUNK + 1234;
        let dev = Device::Cpu;
        let a0 = Tensor::from_vec(values(n, 1), (n / 2, 2), &dev).unwrap();
        let b0 = Tensor::from_vec(values(n, 2), (n / 2, 2), &dev).unwrap();
        for (mul, add) in [(0.123456789f64, 0.0), (1.0 / 3.0, 0.0), (-2.5, 1e-3)] {
            let a = a0.copy().unwrap();
            assert!(in_place(&a));
            affine(&a, mul, add).unwrap();
            assert_eq!(bits(&a), bits(&a0.affine(mul, add).unwrap()), "{mul} {add}");
        }
        let a = a0.copy().unwrap();
        add_into(&a, &b0).unwrap();
        assert_eq!(bits(&a), bits(&(&a0 + &b0).unwrap()));
        let short = Tensor::zeros(5, candle_core::DType::F32, &dev).unwrap();
        assert!(add_into(&a.flatten_all().unwrap(), &short).is_err());
    }
}

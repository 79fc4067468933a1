//! Fused CPU kernels of the differentiable (training) path, each with its backward: RMS norm,
//! SwiGLU (`silu(gate) * up`) and the half-split rotary embedding. candle's own fused
//! `rms_norm` and `rope` have no backward on the CPU (their gradients are silently dropped), so
//! training composed them from primitive ops: seven tensor passes, and as many fresh buffers,
//! per norm, six per rotary embedding, and more again in each backward. Each kernel here is one
//! pass forward and one backward.
//!
//! Every output element is computed by one thread in a fixed order, and the one reduction over
//! rows (the norm weight's gradient) sums fixed blocks of [`ROW_BLOCK`] rows in their order, so
//! the results never depend on the thread count.
//!
//! f32 on the CPU only: the wrappers return `None` for anything else and the caller keeps
//! candle's primitive ops.

use candle_core::{CpuStorage, CustomOp2, CustomOp3, DType, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

/// Rows per task of a reduction over rows: partial sums, and the order they are added in, are
/// fixed by the data's shape, never by the number of threads.
const ROW_BLOCK: usize = 64;

/// Elements per task of the elementwise kernels.
const CHUNK: usize = 1 << 14;

/// The f32 values of a contiguous CPU input, or an error naming `op`.
pub(crate) fn slice<'a>(s: &'a CpuStorage, l: &Layout, op: &str) -> Result<&'a [f32]> {
    let CpuStorage::F32(v) = s else {
        candle_core::bail!("{op}: f32 only");
    };
    let Some((a, b)) = l.contiguous_offsets() else {
        candle_core::bail!("{op}: contiguous inputs only");
    };
    Ok(&v[a..b])
}

/// The f32 values of a contiguous CPU tensor written in place, or an error naming `op`.
pub(crate) fn slice_mut<'a>(s: &'a mut CpuStorage, l: &Layout, op: &str) -> Result<&'a mut [f32]> {
    match (s, l.contiguous_offsets()) {
        (CpuStorage::F32(v), Some((a, b))) => Ok(&mut v[a..b]),
        _ => candle_core::bail!("{op}: a contiguous f32 tensor only"),
    }
}

/// The f32 values of two contiguous CPU inputs of the same shape (`what` names them in the
/// error), or an error naming `op`.
pub(crate) fn slice_pair<'a>(
    (s1, l1): (&'a CpuStorage, &Layout),
    (s2, l2): (&'a CpuStorage, &Layout),
    op: &str,
    what: (&str, &str),
) -> Result<(&'a [f32], &'a [f32])> {
    if l1.dims() != l2.dims() {
        candle_core::bail!(
            "{op}: {} {:?} and {} {:?} differ",
            what.0,
            l1.dims(),
            what.1,
            l2.dims()
        );
    }
    Ok((slice(s1, l1, op)?, slice(s2, l2, op)?))
}

fn cpu_f32(ts: &[&Tensor]) -> bool {
    ts.iter()
        .all(|t| t.device().is_cpu() && t.dtype() == DType::F32)
}

/// Whether this CPU runs the kernels' wide-vector builds ([`simd!`]): AVX-512F, else AVX2.
/// Checked once.
pub(crate) fn wide_simd() -> Simd {
    static SIMD: std::sync::OnceLock<Simd> = std::sync::OnceLock::new();
    *SIMD.get_or_init(|| {
        #[cfg(target_arch = "x86_64")]
        {
            if std::arch::is_x86_feature_detected!("avx512f") {
                return Simd::Avx512;
            }
            if std::arch::is_x86_feature_detected!("avx2") {
                return Simd::Avx2;
            }
        }
        Simd::Base
    })
}

/// The vector width a kernel's loops are compiled for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Simd {
    Avx512,
    Avx2,
    Base,
}

/// Runs `f` compiled for AVX-512F.
///
/// # Safety
/// The CPU must have AVX-512F.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
pub(crate) unsafe fn on_avx512<R>(f: impl FnOnce() -> R) -> R {
    f()
}

/// Runs `f` compiled for AVX2.
///
/// # Safety
/// The CPU must have AVX2.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
pub(crate) unsafe fn on_avx2<R>(f: impl FnOnce() -> R) -> R {
    f()
}

/// `simd!(wide_simd(), expr)`: evaluates `expr` (calls to `#[inline(always)]` kernels) in a
/// function compiled for the widest vectors this CPU has. The kernels are written as explicit
/// lanes with separate multiplies and adds (Rust never fuses them), so every build computes the
/// same bits; only the instructions differ.
macro_rules! simd {
    ($isa:expr, $e:expr) => {{
        match $isa {
            #[cfg(target_arch = "x86_64")]
            // SAFETY: `wide_simd` saw the feature on this CPU.
            $crate::fused::Simd::Avx512 => unsafe {
                $crate::fused::on_avx512(
                    #[inline(always)]
                    || $e,
                )
            },
            #[cfg(target_arch = "x86_64")]
            // SAFETY: as above.
            $crate::fused::Simd::Avx2 => unsafe {
                $crate::fused::on_avx2(
                    #[inline(always)]
                    || $e,
                )
            },
            _ => $e,
        }
    }};
}
pub(crate) use simd;

/// Sum of `a[i] * b[i]` in eight lanes, then the lanes in order: a fixed order for a row.
#[inline]
pub(crate) fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for l in 0..8 {
            acc[l] += x[l] * y[l];
        }
    }
    let mut s = acc.iter().sum::<f32>();
    for (x, y) in ra.iter().zip(rb) {
        s += x * y;
    }
    s
}

/// `1 / sqrt(mean(x^2) + eps)` of one row.
#[inline]
fn inv_rms(x: &[f32], eps: f32) -> f32 {
    1.0 / (dot(x, x) / x.len() as f32 + eps).sqrt()
}

/// `x * rsqrt(mean(x^2) + eps) * w` over the last dim.
struct RmsNorm {
    eps: f32,
}

impl CustomOp2 for RmsNorm {
    fn name(&self) -> &'static str {
        "rms-norm"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (x, w) = (slice(s1, l1, self.name())?, slice(s2, l2, self.name())?);
        let d = w.len();
        if d == 0 || l1.dims().last() != Some(&d) || l2.dims().len() != 1 {
            candle_core::bail!(
                "rms-norm: input {:?} and weight {:?} do not fit",
                l1.dims(),
                l2.dims()
            );
        }
        let mut y = vec![0f32; x.len()];
        y.par_chunks_mut(d).zip(x.par_chunks(d)).for_each(|(y, x)| {
            let r = inv_rms(x, self.eps);
            for ((y, &x), &w) in y.iter_mut().zip(x).zip(w) {
                *y = x * r * w;
            }
        });
        Ok((CpuStorage::F32(y), l1.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _res: &Tensor,
        dy: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let (n, d) = (x.elem_count(), w.elem_count());
        let both = x.apply_op3(w, &dy.contiguous()?, RmsNormBwd { eps: self.eps })?;
        let dx = both.narrow(0, 0, n)?.reshape(x.shape())?;
        let dw = both.narrow(0, n, d)?.reshape(w.shape())?;
        Ok((Some(dx), Some(dw)))
    }
}

/// The RMS norm's backward: `[dx (x's elements) | dw (w's)]` in one buffer. With
/// `r = rsqrt(mean(x^2) + eps)`, `xh = x r` and `g = dy w`:
/// `dx = r (g - xh mean(g xh))`, `dw = sum over rows of dy xh`.
struct RmsNormBwd {
    eps: f32,
}

impl CustomOp3 for RmsNormBwd {
    fn name(&self) -> &'static str {
        "rms-norm-bwd"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let name = self.name();
        let (x, w, dy) = (
            slice(s1, l1, name)?,
            slice(s2, l2, name)?,
            slice(s3, l3, name)?,
        );
        let (n, d) = (x.len(), w.len());
        if dy.len() != n || d == 0 || n % d != 0 {
            candle_core::bail!(
                "rms-norm-bwd: input {:?}, weight {:?} and gradient {:?} do not fit",
                l1.dims(),
                l2.dims(),
                l3.dims()
            );
        }
        let mut out = vec![0f32; n + d];
        let (dx, dw) = out.split_at_mut(n);
        let block = ROW_BLOCK * d;
        let partials: Vec<Vec<f32>> = dx
            .par_chunks_mut(block)
            .zip(x.par_chunks(block))
            .zip(dy.par_chunks(block))
            .map(|((dxb, xb), dyb)| {
                let mut pw = vec![0f32; d];
                let mut xh = vec![0f32; d];
                let mut g = vec![0f32; d];
                for ((dxr, xr), dyr) in dxb.chunks_mut(d).zip(xb.chunks(d)).zip(dyb.chunks(d)) {
                    let r = inv_rms(xr, self.eps);
                    for i in 0..d {
                        xh[i] = xr[i] * r;
                        g[i] = dyr[i] * w[i];
                        pw[i] += dyr[i] * xh[i];
                    }
                    let c = dot(&g, &xh) / d as f32;
                    for i in 0..d {
                        dxr[i] = r * (g[i] - xh[i] * c);
                    }
                }
                pw
            })
            .collect();
        for p in partials {
            for (a, b) in dw.iter_mut().zip(p) {
                *a += b;
            }
        }
        Ok((CpuStorage::F32(out), Shape::from(n + d)))
    }
}

/// RMS norm over the last dim of `x` with weight `w [hidden]`, with its backward; `None` off
/// the CPU or outside f32.
pub(crate) fn rms_norm(x: &Tensor, w: &Tensor, eps: f64) -> Result<Option<Tensor>> {
    if !cpu_f32(&[x, w]) {
        return Ok(None);
    }
    let op = RmsNorm { eps: eps as f32 };
    x.contiguous()?.apply_op2(&w.contiguous()?, op).map(Some)
}

/// `silu(x)` exactly as candle computes it (`x / (1 + exp(-x))`), so a fused SwiGLU gives the
/// bits of candle's `silu` followed by `mul`.
#[inline]
pub(crate) fn silu(v: f32) -> f32 {
    v / (1.0 + (-v).exp())
}

/// `silu(gate) * up`.
struct Swiglu;

impl CustomOp2 for Swiglu {
    fn name(&self) -> &'static str {
        "swiglu"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (g, u) = slice_pair((s1, l1), (s2, l2), self.name(), ("gate", "up"))?;
        let mut y = vec![0f32; g.len()];
        y.par_chunks_mut(CHUNK)
            .zip(g.par_chunks(CHUNK).zip(u.par_chunks(CHUNK)))
            .for_each(|(y, (g, u))| {
                for ((y, &g), &u) in y.iter_mut().zip(g).zip(u) {
                    *y = silu(g) * u;
                }
            });
        Ok((CpuStorage::F32(y), l1.shape().clone()))
    }

    fn bwd(
        &self,
        g: &Tensor,
        u: &Tensor,
        _res: &Tensor,
        dy: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let n = g.elem_count();
        let both = g.apply_op3(u, &dy.contiguous()?, SwigluBwd)?;
        let dg = both.narrow(0, 0, n)?.reshape(g.shape())?;
        let du = both.narrow(0, n, n)?.reshape(u.shape())?;
        Ok((Some(dg), Some(du)))
    }
}

/// SwiGLU's backward, `[d gate | d up]` in one buffer: with `s = sigmoid(g)`,
/// `d gate = dy u s (1 + g (1 - s))` and `d up = dy g s`.
struct SwigluBwd;

impl CustomOp3 for SwigluBwd {
    fn name(&self) -> &'static str {
        "swiglu-bwd"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let name = self.name();
        let (g, u, dy) = (
            slice(s1, l1, name)?,
            slice(s2, l2, name)?,
            slice(s3, l3, name)?,
        );
        let n = g.len();
        if u.len() != n || dy.len() != n {
            candle_core::bail!(
                "swiglu-bwd: gate {:?}, up {:?} and gradient {:?} differ",
                l1.dims(),
                l2.dims(),
                l3.dims()
            );
        }
        let mut out = vec![0f32; 2 * n];
        let (dg, du) = out.split_at_mut(n);
        dg.par_chunks_mut(CHUNK)
            .zip(du.par_chunks_mut(CHUNK))
            .zip(g.par_chunks(CHUNK).zip(u.par_chunks(CHUNK)))
            .zip(dy.par_chunks(CHUNK))
            .for_each(|(((dg, du), (g, u)), dy)| {
                for i in 0..g.len() {
                    let s = 1.0 / (1.0 + (-g[i]).exp());
                    dg[i] = dy[i] * u[i] * s * (1.0 + g[i] * (1.0 - s));
                    du[i] = dy[i] * g[i] * s;
                }
            });
        Ok((CpuStorage::F32(out), Shape::from(2 * n)))
    }
}

/// `silu(gate) * up` with its backward; `None` off the CPU or outside f32. Its values are the
/// bits of candle's `silu` then `mul`.
pub(crate) fn swiglu(gate: &Tensor, up: &Tensor) -> Result<Option<Tensor>> {
    if !cpu_f32(&[gate, up]) || gate.dims() != up.dims() {
        return Ok(None);
    }
    gate.contiguous()?
        .apply_op2(&up.contiguous()?, Swiglu)
        .map(Some)
}

/// One row of the half-split rotation: `y1 = x1 cos - x2 sin`, `y2 = x2 cos + x1 sin` (the
/// bits of candle's CPU `rope`, whose second sum has its terms the other way round).
#[inline(always)]
fn rope_row(x: &[f32], c: &[f32], s: &[f32], y: &mut [f32]) {
    let half = c.len();
    let (x1, x2) = x.split_at(half);
    let (y1, y2) = y.split_at_mut(half);
    // Every slice cut to `half`, so the compiler sees the loop's indices in bounds and keeps it
    // vectorised throughout (about 2x faster per row than without the cuts; the same bits).
    let (x2, s, y2) = (&x2[..half], &s[..half], &mut y2[..half]);
    for i in 0..half {
        y1[i] = x1[i] * c[i] - x2[i] * s[i];
        y2[i] = x2[i] * c[i] + x1[i] * s[i];
    }
}

/// Half-split rotary embedding of `x [B, H, T, D]` with tables `cos`, `sin` of `[B or 1, T,
/// D/2]`: `y1 = x1 cos - x2 sin`, `y2 = x2 cos + x1 sin`. Its backward is the same rotation
/// with `-sin`.
struct Rope;

impl CustomOp3 for Rope {
    fn name(&self) -> &'static str {
        "rope"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let name = self.name();
        let (x, cos, sin) = (
            slice(s1, l1, name)?,
            slice(s2, l2, name)?,
            slice(s3, l3, name)?,
        );
        let [b, h, t, d] = l1.dims()[..] else {
            candle_core::bail!("rope: input must be [B, H, T, D], got {:?}", l1.dims());
        };
        let [cb, ct, half] = l2.dims()[..] else {
            candle_core::bail!("rope: tables must be [B, T, D/2], got {:?}", l2.dims());
        };
        if d == 0 || half * 2 != d || ct != t || !(cb == b || cb == 1) || l3.dims() != l2.dims() {
            candle_core::bail!(
                "rope: input {:?} and tables {:?}, {:?} do not fit",
                l1.dims(),
                l2.dims(),
                l3.dims()
            );
        }
        let mut y = vec![0f32; x.len()];
        let wide = wide_simd();
        y.par_chunks_mut(d)
            .zip(x.par_chunks(d))
            .enumerate()
            .for_each(|(row, (y, x))| {
                let (bi, ti) = (row / (h * t), row % t);
                let at = ((if cb == 1 { 0 } else { bi }) * t + ti) * half;
                let (c, s) = (&cos[at..at + half], &sin[at..at + half]);
                simd!(wide, rope_row(x, c, s, y));
            });
        Ok((CpuStorage::F32(y), l1.shape().clone()))
    }

    fn bwd(
        &self,
        _x: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        _res: &Tensor,
        dy: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let dx = dy.contiguous()?.apply_op3(cos, &sin.neg()?, Rope)?;
        Ok((Some(dx), None, None))
    }
}

/// Half-split ("NeoX" / Hugging Face layout) rotary embedding of `x [B, H, T, D]` with tables of
/// `[B or 1, T, D/2]`, with its backward (to `x` only: the tables are constants); `None` off
/// the CPU or outside f32. Its values are the bits of `x cos + rotate_half(x) sin` from
/// candle's ops.
pub(crate) fn rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Option<Tensor>> {
    if !cpu_f32(&[x, cos, sin]) || x.rank() != 4 || cos.rank() != 3 {
        return Ok(None);
    }
    x.contiguous()?
        .apply_op3(
            &cos.detach().contiguous()?,
            &sin.detach().contiguous()?,
            Rope,
        )
        .map(Some)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::bits;
    use candle_core::{Device, Var, D};

    fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
        (a - b)
            .unwrap()
            .abs()
            .unwrap()
            .flatten_all()
            .unwrap()
            .max(0)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
    }

    /// `sum(f(vars) * r)` for a fixed random `r`, so every output element's gradient differs.
    fn weighted(y: &Tensor, seed_shape: &[usize]) -> Tensor {
        let n: usize = seed_shape.iter().product();
        let r: Vec<f32> = (0..n)
            .map(|i| ((i * 37 % 101) as f32 - 50.0) / 25.0)
            .collect();
        let r = Tensor::from_vec(r, seed_shape, y.device()).unwrap();
        (y * r).unwrap().sum_all().unwrap()
    }

    fn rms_ref(x: &Tensor, w: &Tensor, eps: f64) -> Tensor {
        let var = x.sqr().unwrap().mean_keepdim(D::Minus1).unwrap();
        x.broadcast_mul(&(var + eps).unwrap().sqrt().unwrap().recip().unwrap())
            .unwrap()
            .broadcast_mul(w)
            .unwrap()
    }

    /// Values and both gradients against the primitive ops, on more rows than one block, from a
    /// non-contiguous input; and the same bits whatever the thread count.
    #[test]
    fn rms_norm_matches_primitive_ops_with_gradients() {
        let dev = Device::Cpu;
        let (rows, d) = (3 * ROW_BLOCK + 5, 40);
        let x = Var::from_tensor(&Tensor::randn(0f32, 2.0, (d, rows), &dev).unwrap()).unwrap();
        let w = Var::from_tensor(&Tensor::randn(1f32, 0.3, d, &dev).unwrap()).unwrap();
        let xt = x.as_tensor().t().unwrap(); // [rows, d], not contiguous
        let run = |fused: bool| {
            let y = if fused {
                rms_norm(&xt, w.as_tensor(), 1e-5).unwrap().unwrap()
            } else {
                rms_ref(&xt, w.as_tensor(), 1e-5)
            };
            let g = weighted(&y, &[rows, d]).backward().unwrap();
            (
                y,
                g.get(x.as_tensor()).unwrap().clone(),
                g.get(w.as_tensor()).unwrap().clone(),
            )
        };
        let (y, dx, dw) = run(true);
        let (y0, dx0, dw0) = run(false);
        assert!(max_diff(&y, &y0) < 1e-5, "values {}", max_diff(&y, &y0));
        assert!(max_diff(&dx, &dx0) < 1e-4, "dx {}", max_diff(&dx, &dx0));
        assert!(max_diff(&dw, &dw0) < 1e-3, "dw {}", max_diff(&dw, &dw0));
        let on = |threads: usize| {
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .unwrap();
            pool.install(|| {
                let (y, dx, dw) = run(true);
                (bits(&y), bits(&dx), bits(&dw))
            })
        };
        assert_eq!(on(1), on(3));
    }

    #[test]
    fn swiglu_matches_candles_silu_and_mul_bit_for_bit_with_gradients() {
        let dev = Device::Cpu;
        let shape = (3, 7, 50);
        let g = Var::from_tensor(&Tensor::randn(0f32, 3.0, shape, &dev).unwrap()).unwrap();
        let u = Var::from_tensor(&Tensor::randn(0f32, 1.0, shape, &dev).unwrap()).unwrap();
        let run = |fused: bool| {
            let y = if fused {
                swiglu(g.as_tensor(), u.as_tensor()).unwrap().unwrap()
            } else {
                (g.as_tensor().silu().unwrap() * u.as_tensor()).unwrap()
            };
            let grads = weighted(&y, &[3, 7, 50]).backward().unwrap();
            (
                y,
                grads.get(g.as_tensor()).unwrap().clone(),
                grads.get(u.as_tensor()).unwrap().clone(),
            )
        };
        let (y, dg, du) = run(true);
        let (y0, dg0, du0) = run(false);
        assert_eq!(bits(&y), bits(&y0));
        assert!(max_diff(&dg, &dg0) < 1e-5, "d gate {}", max_diff(&dg, &dg0));
        assert!(max_diff(&du, &du0) < 1e-5, "d up {}", max_diff(&du, &du0));
        // Another dtype is left to candle's ops.
        let half = g.as_tensor().to_dtype(DType::F16).unwrap();
        assert!(swiglu(&half, &half).unwrap().is_none());
    }

    fn rotate_half(x: &Tensor) -> Tensor {
        let d = x.dim(D::Minus1).unwrap();
        let x1 = x.narrow(D::Minus1, 0, d / 2).unwrap();
        let x2 = x.narrow(D::Minus1, d / 2, d / 2).unwrap();
        Tensor::cat(&[&x2.neg().unwrap(), &x1], D::Minus1).unwrap()
    }

    #[test]
    fn rope_matches_primitive_ops_bit_for_bit_with_gradients() {
        let dev = Device::Cpu;
        let (b, h, t, d) = (2, 3, 5, 8);
        // Tables per row (positions differ by row, as with left padding) and shared ones.
        for cb in [b, 1] {
            let x =
                Var::from_tensor(&Tensor::randn(0f32, 1.0, (b, h, t, d), &dev).unwrap()).unwrap();
            let ang = Tensor::randn(0f32, 2.0, (cb, t, d / 2), &dev).unwrap();
            let (cos, sin) = (ang.cos().unwrap(), ang.sin().unwrap());
            let run = |fused: bool| {
                let y = if fused {
                    rope(x.as_tensor(), &cos, &sin).unwrap().unwrap()
                } else {
                    let c = Tensor::cat(&[&cos, &cos], D::Minus1)
                        .unwrap()
                        .unsqueeze(1)
                        .unwrap();
                    let s = Tensor::cat(&[&sin, &sin], D::Minus1)
                        .unwrap()
                        .unsqueeze(1)
                        .unwrap();
                    (x.as_tensor().broadcast_mul(&c).unwrap()
                        + rotate_half(x.as_tensor()).broadcast_mul(&s).unwrap())
                    .unwrap()
                };
                let grads = weighted(&y, &[b, h, t, d]).backward().unwrap();
                (y, grads.get(x.as_tensor()).unwrap().clone())
            };
            let (y, dx) = run(true);
            let (y0, dx0) = run(false);
            assert_eq!(bits(&y), bits(&y0), "tables of batch {cb}");
            assert!(max_diff(&dx, &dx0) < 1e-5, "dx {}", max_diff(&dx, &dx0));
        }
    }
}

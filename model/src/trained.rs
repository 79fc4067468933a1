//! `x @ w^T` for a trained weight on the CPU, with a backward pass that does less.
//!
//! Through candle's ops the product is `x.matmul(w.t())` (or, for few rows, `(w @ x^T)^T`):
//! three graph nodes. candle's backward starts every node's gradient as zeros and adds each
//! contribution into it, one elementwise pass on the calling thread per node. For the weight
//! that meant a zeroed `[in, out]` buffer plus an add, then a zeroed `[out, in]` buffer plus an
//! add that reads the first one transposed, 135 M strided reads per full DPO step of
//! SmolLM2-135M, while the thread pool waited. Here the product is one node: its backward
//! computes the same gemm products with the same operands and layouts (so the same bits), and
//! hands candle the weight's gradient already in `[out, in]` order, transposed on the thread
//! pool. candle then makes one contiguous add into the weight's gradient.
//!
//! **The same bits as candle's ops, by construction.** The forward calls the storage's own
//! `matmul` with the layouts `Tensor::matmul` would pass. The backward calls `Tensor::matmul`
//! on the operands candle's matmul backward uses, in the same layouts. Each transposed copy
//! made in the backward adds its values to `0.0`, as candle's accumulation into a zeroed
//! gradient does (`-0.0` becomes `+0.0`; nothing else changes). The result has the layout
//! candle's ops gave it (with few rows, the transposed view of `w @ x^T`), so the ops after it
//! see the same strides. Gradients of other nodes reach them in the same order: only nodes
//! between this product and its operands went.

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp1, CustomOp2, DType, Layout, Result, Shape, Tensor, D};
use rayon::prelude::*;
use std::sync::Arc;

use super::grad_sink::{plus_zero, slot_for, Slot};

/// Below this many rows, `x @ w^T` is computed as `(w @ x^T)^T`: gemm then streams the
/// row-major weight once instead of repacking it per call, 2-10x faster for decode-sized inputs
/// (measured on 2 AVX-512 cores: 16x1536 @ 1536x576 takes 2.2 ms one way, 0.28 ms the other).
pub(crate) const SMALL_M: usize = 128;

/// Side of the square tiles a transposed copy moves at a time (a tile of f32 stays in L1).
const TILE: usize = 32;

/// `src [rows, cols]` (row-major, contiguous) into `[cols, rows]`, each value added to `0.0`
/// on the way (the bits of candle's accumulation into a zeroed gradient). Tasks take bands of
/// [`TILE`] output rows: each value is moved alone, so the split changes nothing.
fn transposed(src: &[f32], rows: usize, cols: usize) -> Vec<f32> {
    let mut dst = vec![0f32; rows * cols];
    if rows == 0 || cols == 0 {
        return dst;
    }
    dst.par_chunks_mut(TILE * rows)
        .enumerate()
        .for_each(|(band, out)| {
            let c0 = band * TILE;
            let nc = out.len() / rows;
            for r0 in (0..rows).step_by(TILE) {
                let r1 = (r0 + TILE).min(rows);
                for c in 0..nc {
                    let o = &mut out[c * rows + r0..c * rows + r1];
                    for (r, o) in (r0..r1).zip(o) {
                        *o = 0.0 + src[r * cols + c0 + c];
                    }
                }
            }
        });
    dst
}

/// The transposed copy of a 2-d f32 tensor, each value added to `0.0` (see [`transposed`]).
struct TransposeAddZero;

impl CustomOp1 for TransposeAddZero {
    fn name(&self) -> &'static str {
        "transpose-add-zero"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let (rows, cols) = l.shape().dims2()?;
        let (CpuStorage::F32(v), Some((a, b))) = (s, l.contiguous_offsets()) else {
            candle_core::bail!("transpose-add-zero: contiguous f32 input only");
        };
        Ok((
            CpuStorage::F32(transposed(&v[a..b], rows, cols)),
            Shape::from((cols, rows)),
        ))
    }
}

/// `t^T`, contiguous, each value added to `0.0`, outside the autograd graph.
fn transpose_add_zero(t: &Tensor) -> Result<Tensor> {
    t.contiguous()?.apply_op1_no_bwd(&TransposeAddZero)
}

/// `x [M, K]` (or a contiguous `[B, T, K]`) and `[N, K]` `w` as the 2-d `x` of the product:
/// the `[M, K]` view that `x`'s reshape was, and `M`.
fn rows_of(lx: &Layout, lw: &Layout, op: &str) -> Result<(Layout, usize, usize, usize)> {
    let dims = lx.dims();
    let (k, lead) = match dims.split_last() {
        Some((&k, lead)) if !lead.is_empty() => (k, lead),
        _ => candle_core::bail!("{op}: x of shape {dims:?}"),
    };
    let m: usize = lead.iter().product();
    let lx = match lead.len() {
        1 => lx.clone(),
        _ => Layout::contiguous_with_offset((m, k), lx.start_offset()),
    };
    let (n, kw) = lw.shape().dims2()?;
    if k != kw {
        candle_core::bail!("{op}: x is [{m}, {k}], the weight [{n}, {kw}]");
    }
    Ok((lx, m, n, k))
}

/// `t` as 2-d: its leading dimensions as rows (a 2-d `t` as it is).
fn flat(t: &Tensor) -> Result<Tensor> {
    match t.rank() {
        2 => Ok(t.clone()),
        _ => t.flatten_to(t.rank() - 2),
    }
}

/// A weight's gradient `g` (already `0.0 + g`, a tensor only this op holds): given to the slot
/// if there is one (candle then gets none), else returned for candle to accumulate.
fn sink_or_return(sink: &Option<Arc<Slot>>, g: Tensor) -> Result<Option<Tensor>> {
    match sink {
        Some(slot) => {
            slot.put(g)?;
            Ok(None)
        }
        None => Ok(Some(g)),
    }
}

/// `x @ w^T` (`x` with more than [`SMALL_M`] rows): `x.matmul(&w.t())` as one graph node,
/// `[.., N]` in `x`'s leading dimensions. With a slot, the weight's gradient goes there.
struct XWt {
    sink: Option<Arc<Slot>>,
}

impl CustomOp2 for XWt {
    fn name(&self) -> &'static str {
        "trained-x-wt"
    }

    fn cpu_fwd(
        &self,
        sx: &CpuStorage,
        lx: &Layout,
        sw: &CpuStorage,
        lw: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (lx2, m, n, k) = rows_of(lx, lw, self.name())?;
        // The layouts `Tensor::matmul` passes for `x.matmul(&w.t())`.
        let y = sx.matmul(sw, (1, m, n, k), &lx2, &lw.transpose(0, 1)?)?;
        let lead = &lx.dims()[..lx.dims().len() - 1];
        Ok((y, Shape::from(lead.to_vec()).extend(&[n])))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let (x2, grad) = (flat(x)?, flat(grad)?);
        // candle's matmul backward for `x @ wt` (`wt = w.t()`): `grad @ wt.t()` for `x`
        // (`wt.t()` has `w`'s layout) and `x.t() @ grad` for `wt`, which its transpose node
        // then hands to `w` transposed.
        let gx = match x.track_op() {
            true => Some(grad.matmul(w)?.reshape(x.dims())?),
            false => None,
        };
        let gw = match w.track_op() {
            true => sink_or_return(&self.sink, transpose_add_zero(&x2.t()?.matmul(&grad)?)?)?,
            false => None,
        };
        Ok((gx, gw))
    }
}

/// `w @ x^T`, `[N, M]` (`x` with at most [`SMALL_M`] rows): `w.matmul(&x.t())` as one graph
/// node. The caller takes its transposed view, as candle's ops did. With a slot, the weight's
/// gradient goes there.
struct WXt {
    sink: Option<Arc<Slot>>,
}

impl CustomOp2 for WXt {
    fn name(&self) -> &'static str {
        "trained-w-xt"
    }

    fn cpu_fwd(
        &self,
        sx: &CpuStorage,
        lx: &Layout,
        sw: &CpuStorage,
        lw: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (lx2, m, n, k) = rows_of(lx, lw, self.name())?;
        // The layouts `Tensor::matmul` passes for `w.matmul(&x.t())`.
        let p = sw.matmul(sx, (1, n, m, k), lw, &lx2.transpose(0, 1)?)?;
        Ok((p, Shape::from((n, m))))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let x2 = flat(x)?;
        // candle's matmul backward for `w @ xt` (`xt = x.t()`): `grad @ xt.t()` for `w`
        // (`xt.t()` has `x`'s layout) and `w.t() @ grad` for `xt`, which its transpose node
        // then hands to `x` transposed.
        let gw = match (w.track_op(), &self.sink) {
            (true, Some(_)) => {
                // candle's accumulation into zeros, done here: the sink keeps it as it is.
                let g = grad.matmul(&x2)?;
                plus_zero(&g)?;
                sink_or_return(&self.sink, g)?
            }
            (true, None) => Some(grad.matmul(&x2)?),
            (false, _) => None,
        };
        let gx = match x.track_op() {
            true => Some(transpose_add_zero(&w.t()?.matmul(grad)?)?.reshape(x.dims())?),
            false => None,
        };
        Ok((gx, gw))
    }
}

/// `x [M, K] @ w [N, K]^T` for a trained f32 weight on the CPU, with a cheaper backward: the
/// bits and layout of candle's `x.matmul(&w.t())` (more than [`SMALL_M`] rows) or
/// `w.matmul(&x.t()).t()` (otherwise, a transposed view), forward and backward. `None` where
/// it does not apply (another device or dtype, an empty product); the caller then takes
/// candle's ops.
///
/// A 3-d `x [B, T, K]` (contiguous) gives `[B, T, N]`: the bits of the same product on its
/// `[B * T, K]` reshape, without the reshape nodes (each another zeroed gradient and add in
/// candle's backward; with few rows the result is the reshaped transposed view, a copy, as
/// candle's reshape makes it).
pub(crate) fn trained_matmul_wt(x: &Tensor, w: &Tensor) -> Result<Option<Tensor>> {
    let f32_cpu = |t: &Tensor| t.device().is_cpu() && t.dtype() == DType::F32;
    let shape_ok = match x.rank() {
        2 => true,
        3 => x.is_contiguous(),
        _ => false,
    };
    if !(f32_cpu(x) && f32_cpu(w) && shape_ok) || w.rank() != 2 {
        return Ok(None);
    }
    if x.elem_count() == 0 || w.elem_count() == 0 {
        return Ok(None);
    }
    let m = x.elem_count() / x.dim(D::Minus1)?;
    let sink = slot_for(w);
    if m > SMALL_M {
        return x.apply_op2(w, XWt { sink }).map(Some);
    }
    let y = x.apply_op2(w, WXt { sink })?.t()?;
    match x.rank() {
        2 => Ok(Some(y)),
        _ => {
            let mut dims = x.dims().to_vec();
            *dims.last_mut().expect("rank 3") = w.dim(0)?;
            y.reshape(dims).map(Some)
        }
    }
}

/// `x [M, K] @ w [N, K]^T` as [`trained_matmul_wt`] with more than [`SMALL_M`] rows computes
/// it, whatever `M`: the bits and layout of candle's `x.matmul(&w.t())` forward and backward,
/// for a caller that used that orientation at every size (the scoring head). `None` where it
/// does not apply.
pub(crate) fn x_wt(x: &Tensor, w: &Tensor) -> Result<Option<Tensor>> {
    let f32_cpu = |t: &Tensor| t.device().is_cpu() && t.dtype() == DType::F32;
    if !(f32_cpu(x) && f32_cpu(w)) || x.rank() != 2 || w.rank() != 2 {
        return Ok(None);
    }
    if x.elem_count() == 0 || w.elem_count() == 0 {
        return Ok(None);
    }
    x.apply_op2(w, XWt { sink: slot_for(w) }).map(Some)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::bits;
    use candle_core::{Device, Var};

    /// candle's ops, as `matmul_wt` used them for a trained weight.
    fn candle_way(x: &Tensor, w: &Tensor) -> Tensor {
        if x.dim(0).unwrap() <= SMALL_M {
            w.matmul(&x.t().unwrap()).unwrap().t().unwrap()
        } else {
            x.matmul(&w.t().unwrap()).unwrap()
        }
    }

    /// Values with exact zeros of both signs among them, so a lost `+0.0` would show.
    fn values(n: usize, seed: u64) -> Vec<f32> {
        (0..n as u64)
            .map(|i| {
                let h = (i.wrapping_mul(2654435761) ^ seed.wrapping_mul(97)) % 1009;
                match h % 13 {
                    0 => 0.0,
                    1 => -0.0,
                    _ => (h as f32 - 504.0) / 97.0,
                }
            })
            .collect()
    }

    /// Forward values and the gradients of `x` and the weights agree bit for bit with candle's
    /// ops, for both orientations, a weight used twice (its gradients accumulate in order), a
    /// product of a product, a non-contiguous input, and an upstream gradient with signed zeros.
    #[test]
    fn the_same_bits_as_candles_ops_forward_and_backward() {
        let dev = Device::Cpu;
        for (m, k, n) in [
            (3, 40, 70),
            (128, 64, 33),
            (129, 64, 33),
            (300, 96, 130),
            (1100, 80, 48),
        ] {
            let w0 = Tensor::from_vec(values(n * k, 1), (n, k), &dev).unwrap();
            let x0 = Tensor::from_vec(values(k * m, 2), (k, m), &dev).unwrap();
            let up = Tensor::from_vec(values(m * n, 3), (m, n), &dev).unwrap();
            let v0 = Tensor::from_vec(values(5 * n, 4), (5, n), &dev).unwrap();
            let run = |ours: bool| {
                let w = Var::from_tensor(&w0).unwrap();
                let v = Var::from_tensor(&v0).unwrap();
                let xv = Var::from_tensor(&x0).unwrap();
                // `x [M, K]` is a transposed view of a tracked tensor: not contiguous.
                let x = xv.as_tensor().affine(1.5, 0.25).unwrap().t().unwrap();
                assert!(!x.is_contiguous());
                let prod = |x: &Tensor, w: &Tensor| match ours {
                    true => trained_matmul_wt(x, w).unwrap().expect("applies"),
                    false => candle_way(x, w),
                };
                let y = prod(&x, w.as_tensor());
                // The weight a second time, on other rows: its two gradients add up in order.
                let y2 = prod(&(&x * 0.5).unwrap(), w.as_tensor());
                // A product of the product as it comes (a LoRA adapter's two factors): the
                // second sees the first's layout.
                let z = prod(&y, v.as_tensor());
                let loss = ((&y * &up).unwrap() + (&y2 * &up).unwrap().sqr().unwrap())
                    .unwrap()
                    .sum_all()
                    .unwrap();
                let loss = (loss + z.sqr().unwrap().sum_all().unwrap()).unwrap();
                let g = loss.backward().unwrap();
                (
                    [bits(&y), bits(&z)].concat(),
                    [
                        bits(g.get(w.as_tensor()).unwrap()),
                        bits(g.get(v.as_tensor()).unwrap()),
                    ]
                    .concat(),
                    bits(g.get(xv.as_tensor()).unwrap()),
                )
            };
            let (theirs, ours) = (run(false), run(true));
            assert_eq!(ours.0, theirs.0, "forward, {m} x {k} x {n}");
            assert_eq!(ours.1, theirs.1, "weight gradient, {m} x {k} x {n}");
            assert_eq!(ours.2, theirs.2, "input gradient, {m} x {k} x {n}");
        }
    }

    /// The scoring head's orientation at any row count: the bits of `x.matmul(&w.t())`,
    /// forward and backward, also at few rows (where `trained_matmul_wt` turns it around).
    #[test]
    fn the_x_wt_orientation_at_any_row_count() {
        let dev = Device::Cpu;
        for (m, k, n) in [(1, 24, 50), (7, 40, 70), (128, 64, 33), (200, 16, 90)] {
            let w0 = Tensor::from_vec(values(n * k, 11), (n, k), &dev).unwrap();
            let x0 = Tensor::from_vec(values(m * k, 12), (m, k), &dev).unwrap();
            let up = Tensor::from_vec(values(m * n, 13), (m, n), &dev).unwrap();
            let run = |ours: bool| {
                let w = Var::from_tensor(&w0).unwrap();
                let xv = Var::from_tensor(&x0).unwrap();
                let x = xv.as_tensor().affine(1.25, 0.5).unwrap();
                let y = match ours {
                    true => x_wt(&x, w.as_tensor()).unwrap().expect("applies"),
                    false => x.matmul(&w.as_tensor().t().unwrap()).unwrap(),
                };
                // Used twice, as the tied head is beside the embedding.
                let y2 = x.matmul(&w.as_tensor().t().unwrap()).unwrap();
                let loss = ((&y * &up).unwrap().sum_all().unwrap()
                    + y2.sqr().unwrap().sum_all().unwrap())
                .unwrap();
                let g = loss.backward().unwrap();
                (
                    bits(&y),
                    bits(g.get(w.as_tensor()).unwrap()),
                    bits(g.get(xv.as_tensor()).unwrap()),
                )
            };
            let (theirs, ours) = (run(false), run(true));
            assert_eq!(ours.0, theirs.0, "forward, {m} x {k} x {n}");
            assert_eq!(ours.1, theirs.1, "weight gradient, {m} x {k} x {n}");
            assert_eq!(ours.2, theirs.2, "input gradient, {m} x {k} x {n}");
        }
    }

    /// A 3-d input gives the bits of the same product on its 2-d reshape, forward and
    /// backward, at both orientations (`B * T` on either side of `SMALL_M`).
    #[test]
    fn a_3d_input_gives_the_bits_of_its_2d_reshape() {
        let dev = Device::Cpu;
        for (b, t, k, n) in [(2, 40, 48, 70), (2, 65, 48, 70), (3, 100, 32, 20)] {
            let w0 = Tensor::from_vec(values(n * k, 7), (n, k), &dev).unwrap();
            let x0 = Tensor::from_vec(values(b * t * k, 8), (b, t, k), &dev).unwrap();
            let up = Tensor::from_vec(values(b * t * n, 9), (b, t, n), &dev).unwrap();
            let run = |ours: bool| {
                let w = Var::from_tensor(&w0).unwrap();
                let xv = Var::from_tensor(&x0).unwrap();
                let x = xv.as_tensor().affine(0.75, -0.5).unwrap();
                let y = match ours {
                    true => trained_matmul_wt(&x, w.as_tensor())
                        .unwrap()
                        .expect("applies"),
                    false => candle_way(&x.reshape((b * t, k)).unwrap(), w.as_tensor())
                        .reshape((b, t, n))
                        .unwrap(),
                };
                let g = (&y * &up).unwrap().sum_all().unwrap().backward().unwrap();
                (
                    bits(&y),
                    bits(g.get(w.as_tensor()).unwrap()),
                    bits(g.get(xv.as_tensor()).unwrap()),
                )
            };
            let (theirs, ours) = (run(false), run(true));
            assert_eq!(ours.0, theirs.0, "forward, {b} x {t} x {k} x {n}");
            assert_eq!(ours.1, theirs.1, "weight gradient, {b} x {t} x {k} x {n}");
            assert_eq!(ours.2, theirs.2, "input gradient, {b} x {t} x {k} x {n}");
        }
    }

    /// The transposed copy, on a shape that leaves partial tiles both ways.
    #[test]
    fn transposed_copies_every_value_adding_zero() {
        let (rows, cols) = (37, 70);
        let src = values(rows * cols, 5);
        let t = transposed(&src, rows, cols);
        for r in 0..rows {
            for c in 0..cols {
                let (a, b) = (src[r * cols + c], t[c * rows + r]);
                assert_eq!(b.to_bits(), (0.0 + a).to_bits(), "({r}, {c})");
            }
        }
        assert!(transposed(&[-0.0], 1, 1)[0].is_sign_positive());
    }
}

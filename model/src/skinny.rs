//! `x [M, K] @ w [N, K]^T` for a few rows `x` against a large weight `w`: the products of a
//! decode step (one row per live sequence) while generating on the CPU.
//!
//! gemm is built for large products: with 16 rows on an AVX-512 machine (Zen 4) it ran its
//! 1 x 6 microkernel (six accumulators), 76-122 GFLOP/s on a decode step's shapes with the
//! weights in cache, against 164-172 for this kernel (BENCHMARKS.md). On AVX2 only (Zen 3)
//! the two were measured about equal (75-91 against 78-90 GFLOP/s at 16 rows): there the fixed
//! arithmetic below makes every multiply-add load both its operands. Here each weight tile is
//! read from memory once (prefetched ahead into L2) and kept in L1 while it meets every row of
//! `x`, in tiles of 4 weight rows x 4 input rows with AVX-512 (16 accumulators), 3 x 2 with
//! AVX2 (`TW_AVX2`, `TX_AVX2`). Up to 4 input rows the AVX-512 build takes one weight row at a
//! time instead (`FEW_ROWS_AVX512`): bound by reading the weights, it reads them faster as one
//! sequential stream.
//!
//! **Arithmetic, the same on every CPU and at any thread count.** Each output is the dot product
//! of its two rows in 16 lanes: lane `l` sums `x[k] * w[k]` by fused multiply-adds over
//! `k = l, l + 16, l + 32, ...` in increasing `k`, starting from 0. The lanes are then added as a
//! fixed tree: `l + (l + 8)`, then `+ 4`, `+ 2`, `+ 1`. The AVX-512 kernel, the AVX2 one (two
//! 8-lane halves) and the portable one (`f32::mul_add`) compute exactly that, so the bits agree
//! between them. An output never depends on the other rows of `x`, on `M`, or on how the weight
//! rows are split among threads. (gemm's results, used for longer inputs, may differ by CPU.)
//!
//! **Half-precision weights** (f16 or bf16, a generation step's `weights` setting or a frozen
//! half base) are widened to f32 as they are read, which is exact, and meet f32 inputs: the
//! outputs are the bits of the f32 kernel on the widened weights, with half the bytes read.
//!
//! Inference only: the op has no backward; [`super::kernels::matmul_wt`] calls it only while
//! generating.

use candle_core::{DType, Result, Tensor};
use half::{bf16, f16};
use rayon::prelude::*;

/// A weight element this kernel reads: f32, or a half-precision one widened exactly to f32.
pub(crate) trait Weight: candle_core::WithDType + Send + Sync {
    /// Which vector load widens it (0: f32, 1: f16, 2: bf16), chosen at compile time.
    const KIND: u8;
    /// Its value in f32 (exact).
    fn widen(self) -> f32;
}

impl Weight for f32 {
    const KIND: u8 = 0;
    #[inline(always)]
    fn widen(self) -> f32 {
        self
    }
}

impl Weight for f16 {
    const KIND: u8 = 1;
    #[inline(always)]
    fn widen(self) -> f32 {
        self.to_f32()
    }
}

impl Weight for bf16 {
    const KIND: u8 = 2;
    #[inline(always)]
    fn widen(self) -> f32 {
        self.to_f32()
    }
}

/// Lanes of the dot product's partial sums.
const LANES: usize = 16;

/// Weight rows per tile (AVX-512 and portable builds).
const TW: usize = 4;

/// Input rows per tile (AVX-512 and portable builds).
const TX: usize = 4;

/// The AVX2 build's tile: each output's 16 lanes take two of its 16 registers, so a 4 x 4
/// tile's 32 partial sums spilled to memory; 3 x 2 keeps its 12 sums, 2 inputs and a weight
/// in registers (one input row keeps 4 x 1). The tile shape changes no result: each output
/// adds its own lanes in order.
const TW_AVX2: usize = 3;
const TX_AVX2: usize = 2;

/// Up to this many input rows, the AVX-512 build's tiles take one weight row at a time
/// ([`FEW_TW_AVX512`]), so the weights are read as one sequential stream per thread. Such
/// products are bound by reading the weights; on a Zen 5 the kernel alone read a decode step's
/// weights at 49-62 GB/s this way against 33-42 GB/s four rows at a time (one input row; two
/// input rows gained about 18%, four about 6%), about the machine's plain read. With 8 and more
/// input rows the 4 x 4 tile's arithmetic pays for reading four weight rows together.
const FEW_ROWS_AVX512: usize = 4;
const FEW_TW_AVX512: usize = 1;

/// Most rows of `x` this kernel takes: a decode step's batch (and a short single prompt's
/// prefill); longer inputs go to gemm, built for them.
pub(crate) const MAX_ROWS: usize = 64;

/// How many weight rows ahead the tiles prefetch.
const PF_ROWS: usize = 32;

/// Weight rows per parallel task (a multiple of [`TW`]; the AVX2 build ends each with a smaller
/// tile): the split changes no result.
const TASK_ROWS: usize = 32;

/// The fixed tree that adds a dot product's 16 lanes.
#[inline(always)]
fn reduce(p: &[f32; LANES]) -> f32 {
    let mut p8 = [0f32; 8];
    for i in 0..8 {
        p8[i] = p[i] + p[i + 8];
    }
    let mut p4 = [0f32; 4];
    for i in 0..4 {
        p4[i] = p8[i] + p8[i + 4];
    }
    let p2 = [p4[0] + p4[2], p4[1] + p4[3]];
    p2[0] + p2[1]
}

/// One output by the defining arithmetic, one lane at a time: the portable kernel, and the
/// reference the SIMD kernels are tested against.
fn dot_portable<W: Weight>(x: &[f32], w: &[W]) -> f32 {
    let mut p = [0f32; LANES];
    for (k, (&a, &b)) in x.iter().zip(w).enumerate() {
        p[k % LANES] = a.mul_add(b.widen(), p[k % LANES]);
    }
    reduce(&p)
}

/// Which kernel this CPU runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Isa {
    Avx512,
    Avx2,
    Portable,
}

fn isa() -> Isa {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx512f") {
            return Isa::Avx512;
        }
        if std::arch::is_x86_feature_detected!("avx2")
            && std::arch::is_x86_feature_detected!("fma")
            && std::arch::is_x86_feature_detected!("f16c")
        {
            return Isa::Avx2;
        }
    }
    Isa::Portable
}

/// Writes `y[m * n + o]` for the weight rows `o` in `rows` and every row `m` of `x`. `y` is the
/// whole output: tasks write disjoint elements.
///
/// # Safety
/// `y` must point to `m_rows * n` writable f32s that no other task writes at these indices.
unsafe fn task<W: Weight>(
    isa: Isa,
    x: &[f32],
    w: &[W],
    k: usize,
    rows: std::ops::Range<usize>,
    y: *mut f32,
) {
    let m_rows = x.len() / k;
    let n = w.len() / k;
    match isa {
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512 => unsafe { x86::task_avx512(x, w, k, n, rows, m_rows, y) },
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 => unsafe { x86::task_avx2(x, w, k, n, rows, m_rows, y) },
        _ => {
            let o0 = rows.start;
            for r in 0..rows.len() {
                let wr = &w[(o0 + r) * k..(o0 + r + 1) * k];
                for m in 0..m_rows {
                    let v = dot_portable(&x[m * k..(m + 1) * k], wr);
                    unsafe { *y.add(m * n + o0 + r) = v };
                }
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::{reduce, Weight, LANES, PF_ROWS};

    /// Where prefetched weight lines go: L2 (measured best against none and against L1 four
    /// rows ahead, for 1 and 16 input rows with the weights streamed from memory).
    const PF_HINT: i32 = _MM_HINT_T1;
    use std::arch::x86_64::*;

    /// Asks for the cache line holding element `off` of each of the `rows` weight rows from
    /// `pf` (none when `pf` is null), once per line: at the offsets that start one.
    ///
    /// # Safety
    /// `pf` must be null or point to `rows` rows of `k` values.
    #[inline(always)]
    unsafe fn prefetch<W>(pf: *const W, rows: usize, k: usize, off: usize) {
        let size = std::mem::size_of::<W>();
        if !pf.is_null() && (off * size).is_multiple_of(64) {
            for i in 0..rows {
                unsafe { _mm_prefetch::<PF_HINT>(pf.add(i * k + off) as *const i8) };
            }
        }
    }

    /// 16 weights from `p`, widened to f32 (AVX-512).
    macro_rules! load512 {
        ($w:ty, $p:expr) => {
            match <$w as Weight>::KIND {
                0 => _mm512_loadu_ps($p as *const f32),
                1 => _mm512_cvtph_ps(_mm256_loadu_si256($p as *const __m256i)),
                _ => _mm512_castsi512_ps(_mm512_slli_epi32::<16>(_mm512_cvtepu16_epi32(
                    _mm256_loadu_si256($p as *const __m256i),
                ))),
            }
        };
    }

    /// 8 weights from `p`, widened to f32 (AVX2 and F16C).
    macro_rules! load256 {
        ($w:ty, $p:expr) => {
            match <$w as Weight>::KIND {
                0 => _mm256_loadu_ps($p as *const f32),
                1 => _mm256_cvtph_ps(_mm_loadu_si128($p as *const __m128i)),
                _ => _mm256_castsi256_ps(_mm256_slli_epi32::<16>(_mm256_cvtepu16_epi32(
                    _mm_loadu_si128($p as *const __m128i),
                ))),
            }
        };
    }

    /// `n` weights from `src` widened into `dst` (AVX-512).
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn widen512<W: Weight>(src: *const W, dst: *mut f32, n: usize) {
        let full = n / 16;
        for b in 0..full {
            unsafe { _mm512_storeu_ps(dst.add(b * 16), load512!(W, src.add(b * 16))) };
        }
        for i in full * 16..n {
            unsafe { *dst.add(i) = (*src.add(i)).widen() };
        }
    }

    /// `n` weights from `src` widened into `dst` (AVX2 and F16C).
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn widen256<W: Weight>(src: *const W, dst: *mut f32, n: usize) {
        let full = n / 8;
        for b in 0..full {
            unsafe { _mm256_storeu_ps(dst.add(b * 8), load256!(W, src.add(b * 8))) };
        }
        for i in full * 8..n {
            unsafe { *dst.add(i) = (*src.add(i)).widen() };
        }
    }

    /// The 16 lanes of `v` added by [`reduce`]'s tree.
    #[inline]
    #[target_feature(enable = "avx512f")]
    fn reduce512(v: __m512) -> f32 {
        let lo = _mm512_castps512_ps256(v);
        let hi = _mm256_castpd_ps(_mm512_extractf64x4_pd::<1>(_mm512_castps_pd(v)));
        let p8 = _mm256_add_ps(lo, hi);
        let p4 = _mm_add_ps(_mm256_castps256_ps128(p8), _mm256_extractf128_ps::<1>(p8));
        let p2 = _mm_add_ps(p4, _mm_movehl_ps(p4, p4));
        _mm_cvtss_f32(_mm_add_ss(p2, _mm_shuffle_ps::<1>(p2, p2)))
    }

    /// A tile of `TW' x TX'` outputs (`WR` weight rows from `w`, `XR` input rows from `x`, each
    /// row `k` long) with AVX-512; `out[i][j]` for weight row `i`, input row `j`.
    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn tile512<W: Weight, P, const WR: usize, const XR: usize>(
        x: *const f32,
        w: *const W,
        k: usize,
        pf: *const P,
        pf_rows: usize,
    ) -> [[f32; XR]; WR] {
        let mut acc = [[_mm512_setzero_ps(); XR]; WR];
        let full = k / LANES;
        for b in 0..full {
            let off = b * LANES;
            unsafe { prefetch(pf, pf_rows, k, off) };
            let mut xv = [_mm512_setzero_ps(); XR];
            for (j, v) in xv.iter_mut().enumerate() {
                *v = unsafe { _mm512_loadu_ps(x.add(j * k + off)) };
            }
            for (i, row) in acc.iter_mut().enumerate() {
                let wv = unsafe { load512!(W, w.add(i * k + off)) };
                for (j, a) in row.iter_mut().enumerate() {
                    *a = _mm512_fmadd_ps(xv[j], wv, *a);
                }
            }
        }
        let rest = k % LANES;
        if rest != 0 {
            // The lanes past the row's end keep their sums (`mask3`: unchanged where masked).
            let mask: __mmask16 = (1u16 << rest) - 1;
            let off = full * LANES;
            for (i, row) in acc.iter_mut().enumerate() {
                let wv = if W::KIND == 0 {
                    unsafe { _mm512_maskz_loadu_ps(mask, w.add(i * k + off) as *const f32) }
                } else {
                    let mut b = [0f32; LANES];
                    for (l, v) in b.iter_mut().take(rest).enumerate() {
                        *v = unsafe { *w.add(i * k + off + l) }.widen();
                    }
                    unsafe { _mm512_loadu_ps(b.as_ptr()) }
                };
                for (j, a) in row.iter_mut().enumerate() {
                    let xv = unsafe { _mm512_maskz_loadu_ps(mask, x.add(j * k + off)) };
                    *a = _mm512_mask3_fmadd_ps(xv, wv, *a, mask);
                }
            }
        }
        let mut out = [[0f32; XR]; WR];
        for (o, a) in out.iter_mut().zip(&acc) {
            for (o, &a) in o.iter_mut().zip(a) {
                *o = reduce512(a);
            }
        }
        out
    }

    /// A tile with AVX2 and FMA: each lane-16 partial sum as two 8-lane halves, the row's tail
    /// lane by lane, then [`reduce`].
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn tile256<W: Weight, P, const WR: usize, const XR: usize>(
        x: *const f32,
        w: *const W,
        k: usize,
        pf: *const P,
        pf_rows: usize,
    ) -> [[f32; XR]; WR] {
        let mut acc = [[[_mm256_setzero_ps(); 2]; XR]; WR];
        let full = k / LANES;
        for b in 0..full {
            let off = b * LANES;
            unsafe { prefetch(pf, pf_rows, k, off) };
            for h in 0..2 {
                let mut xv = [_mm256_setzero_ps(); XR];
                for (j, v) in xv.iter_mut().enumerate() {
                    *v = unsafe { _mm256_loadu_ps(x.add(j * k + off + 8 * h)) };
                }
                for (i, row) in acc.iter_mut().enumerate() {
                    let wv = unsafe { load256!(W, w.add(i * k + off + 8 * h)) };
                    for (j, a) in row.iter_mut().enumerate() {
                        a[h] = _mm256_fmadd_ps(xv[j], wv, a[h]);
                    }
                }
            }
        }
        let mut out = [[0f32; XR]; WR];
        for i in 0..WR {
            for j in 0..XR {
                let mut p = [0f32; LANES];
                unsafe {
                    _mm256_storeu_ps(p.as_mut_ptr(), acc[i][j][0]);
                    _mm256_storeu_ps(p.as_mut_ptr().add(8), acc[i][j][1]);
                }
                for (l, kk) in (full * LANES..k).enumerate() {
                    let (a, b) = unsafe { (*x.add(j * k + kk), (*w.add(i * k + kk)).widen()) };
                    p[l] = a.mul_add(b, p[l]);
                }
                out[i][j] = reduce(&p);
            }
        }
        out
    }

    /// Runs `tile::<WR, XR>` over all tiles of the task, remainders with smaller tiles.
    macro_rules! task_body {
        ($tile:ident, $widen:ident, $tw:expr, $tx:expr, $few_rows:expr, $few_tw:expr, $x:expr, $w:expr, $k:expr, $n:expr, $rows:expr, $m_rows:expr, $y:expr) => {{
            const TW: usize = $tw;
            const TX: usize = $tx;
            const FEW_ROWS: usize = $few_rows;
            const FEW_TW: usize = $few_tw;
            let (x, w, k, n, rows, m_rows, y): (
                &[f32],
                &[W],
                usize,
                usize,
                std::ops::Range<usize>,
                usize,
                *mut f32,
            ) = ($x, $w, $k, $n, $rows, $m_rows, $y);
            let o0 = rows.start;
            let rows = rows.len();
            // Half-precision weights met by more than one tile of inputs are widened once per
            // weight tile, into `wide`, rather than once per input tile.
            let widen_once = W::KIND != 0 && m_rows > TX;
            let mut wide = vec![0f32; if widen_once { TW * k } else { 0 }];
            let mut r = 0;
            while r < rows {
                // Few input rows take `FEW_TW` weight rows per tile (their sums fit in
                // registers either way).
                let wr = (rows - r).min(if m_rows <= FEW_ROWS { FEW_TW } else { TW });
                if widen_once {
                    unsafe { $widen(w.as_ptr().add((o0 + r) * k), wide.as_mut_ptr(), wr * k) };
                }
                let mut m = 0;
                while m < m_rows {
                    let xr = (m_rows - m).min(TX);
                    let xp = unsafe { x.as_ptr().add(m * k) };
                    let wp = unsafe { w.as_ptr().add((o0 + r) * k) };
                    // The weight rows PF_ROWS ahead are fetched while this tile runs, their
                    // share spread over the tile's input-row passes (within the weight).
                    let (passes, pass) = (m_rows.div_ceil(TX), m / TX);
                    let (lo, hi) = (pass * wr / passes, (pass + 1) * wr / passes);
                    let (pf, pf_rows) = if o0 + r + PF_ROWS + hi <= n {
                        (
                            unsafe { w.as_ptr().add((o0 + r + PF_ROWS + lo) * k) },
                            hi - lo,
                        )
                    } else {
                        (std::ptr::null(), 0)
                    };
                    macro_rules! run {
                        ($a:literal, $b:literal) => {{
                            let t = if widen_once {
                                unsafe {
                                    $tile::<f32, W, $a, $b>(xp, wide.as_ptr(), k, pf, pf_rows)
                                }
                            } else {
                                unsafe { $tile::<W, W, $a, $b>(xp, wp, k, pf, pf_rows) }
                            };
                            for i in 0..$a {
                                for j in 0..$b {
                                    unsafe { *y.add((m + j) * n + o0 + r + i) = t[i][j] };
                                }
                            }
                        }};
                    }
                    match (wr, xr) {
                        (4, 4) => run!(4, 4),
                        (4, 3) => run!(4, 3),
                        (4, 2) => run!(4, 2),
                        (4, 1) => run!(4, 1),
                        (3, 4) => run!(3, 4),
                        (3, 3) => run!(3, 3),
                        (3, 2) => run!(3, 2),
                        (3, 1) => run!(3, 1),
                        (2, 4) => run!(2, 4),
                        (2, 3) => run!(2, 3),
                        (2, 2) => run!(2, 2),
                        (2, 1) => run!(2, 1),
                        (1, 4) => run!(1, 4),
                        (1, 3) => run!(1, 3),
                        (1, 2) => run!(1, 2),
                        _ => run!(1, 1),
                    }
                    m += xr;
                }
                r += wr;
            }
        }};
    }

    /// A task's whole loop over its tiles, compiled for one instruction set.
    macro_rules! task_fn {
        ($name:ident, $features:literal, $tile:ident, $widen:ident, $tw:expr, $tx:expr, $few_rows:expr, $few_tw:expr) => {
            #[target_feature(enable = $features)]
            pub(super) unsafe fn $name<W: Weight>(
                x: &[f32],
                w: &[W],
                k: usize,
                n: usize,
                rows: std::ops::Range<usize>,
                m_rows: usize,
                y: *mut f32,
            ) {
                task_body!($tile, $widen, $tw, $tx, $few_rows, $few_tw, x, w, k, n, rows, m_rows, y)
            }
        };
    }
    task_fn!(
        task_avx512,
        "avx512f",
        tile512,
        widen512,
        super::TW,
        super::TX,
        super::FEW_ROWS_AVX512,
        super::FEW_TW_AVX512
    );
    task_fn!(
        task_avx2,
        "avx2,fma,f16c",
        tile256,
        widen256,
        super::TW_AVX2,
        super::TX_AVX2,
        1,
        super::TW
    );
}

/// A raw output pointer the tasks share (each writes its own elements).
#[derive(Clone, Copy)]
struct Out(*mut f32);
unsafe impl Send for Out {}
unsafe impl Sync for Out {}

impl Out {
    /// The pointer (a method, so closures capture the whole `Send` wrapper).
    fn ptr(self) -> *mut f32 {
        self.0
    }
}

/// `x [M, K] @ w [N, K]^T` by the arithmetic above, with the given kernel.
#[cfg(test)]
fn product<W: Weight>(isa: Isa, x: &[f32], w: &[W], m: usize, k: usize) -> Vec<f32> {
    products(isa, x, m, k, &[w]).pop().expect("one product")
}

/// `x [M, K] @ w [N, K]^T` for f32 values with the kernel this CPU runs: what
/// [`super::bench`] times to measure the kernel apart from everything around it.
pub(crate) fn product_f32(x: &[f32], m: usize, k: usize, w: &[f32]) -> Vec<f32> {
    products(isa(), x, m, k, &[w]).pop().expect("one product")
}

/// `x @ w^T` for each weight (each `[N_i, K]`), in one parallel pass over all their rows.
fn products<W: Weight>(isa: Isa, x: &[f32], m: usize, k: usize, ws: &[&[W]]) -> Vec<Vec<f32>> {
    let ns: Vec<usize> = ws
        .iter()
        .map(|w| w.len().checked_div(k).unwrap_or(0))
        .collect();
    let mut ys: Vec<Vec<f32>> = ns.iter().map(|&n| vec![0f32; m * n]).collect();
    if k == 0 {
        return ys;
    }
    let outs: Vec<Out> = ys.iter_mut().map(|y| Out(y.as_mut_ptr())).collect();
    let jobs: Vec<(usize, std::ops::Range<usize>)> = ns
        .iter()
        .enumerate()
        .flat_map(|(i, &n)| {
            (0..n.div_ceil(TASK_ROWS))
                .map(move |t| (i, t * TASK_ROWS..((t + 1) * TASK_ROWS).min(n)))
        })
        .collect();
    jobs.into_par_iter().for_each(|(i, rows)| {
        // SAFETY: each job writes the columns `rows` of every row of its own output only.
        unsafe { task(isa, x, ws[i], k, rows, outs[i].ptr()) }
    });
    ys
}

/// `silu(x @ gate^T) * (x @ up^T)`: each task computes both products for its rows, then their
/// SwiGLU (the bits of [`super::fused`]'s kernel).
fn swiglu_product<W: Weight>(
    isa: Isa,
    x: &[f32],
    m: usize,
    k: usize,
    gate: &[W],
    up: &[W],
) -> Vec<f32> {
    let n = gate.len().checked_div(k).unwrap_or(0);
    let (mut g, mut u, mut h) = (vec![0f32; m * n], vec![0f32; m * n], vec![0f32; m * n]);
    let (go, uo, ho) = (
        Out(g.as_mut_ptr()),
        Out(u.as_mut_ptr()),
        Out(h.as_mut_ptr()),
    );
    (0..n.div_ceil(TASK_ROWS)).into_par_iter().for_each(|t| {
        let rows = t * TASK_ROWS..((t + 1) * TASK_ROWS).min(n);
        // SAFETY: this task alone writes the columns `rows` of `g`, `u` and `h`, and reads back
        // only what it wrote.
        unsafe {
            let (g, u, h) = (go.ptr(), uo.ptr(), ho.ptr());
            task(isa, x, gate, k, rows.clone(), g);
            task(isa, x, up, k, rows.clone(), u);
            for mi in 0..m {
                for o in rows.clone() {
                    let i = mi * n + o;
                    *h.add(i) = super::fused::silu(*g.add(i)) * *u.add(i);
                }
            }
        }
    });
    drop((g, u));
    h
}

/// `x`'s rows and width and the weights' dtype when this kernel takes them: a CPU f32 `[M, K]`
/// with `M <= MAX_ROWS`, and contiguous CPU weights `[N, K]`, all f32, all f16 or all bf16.
fn takes(x: &Tensor, ws: &[&Tensor]) -> Result<Option<(usize, usize, DType)>> {
    if !x.device().is_cpu() || x.dtype() != DType::F32 || x.rank() != 2 || x.dim(0)? > MAX_ROWS {
        return Ok(None);
    }
    let (m, k) = x.dims2()?;
    let Some(dtype) = ws.first().map(|w| w.dtype()) else {
        return Ok(None);
    };
    if !matches!(dtype, DType::F32 | DType::F16 | DType::BF16) {
        return Ok(None);
    }
    for w in ws {
        if !w.device().is_cpu()
            || w.dtype() != dtype
            || w.rank() != 2
            || w.dim(1)? != k
            || !w.is_contiguous()
        {
            return Ok(None);
        }
    }
    Ok(Some((m, k, dtype)))
}

/// Runs `f` on the values of the contiguous CPU tensors `x` (f32) and `ws` (`W`); `None` if
/// one is not.
fn with_values<W: Weight, R>(
    x: &Tensor,
    ws: &[&Tensor],
    f: impl FnOnce(&[f32], &[&[W]]) -> R,
) -> Result<Option<R>> {
    let held_x = x.storage_and_layout();
    let held: Vec<_> = ws.iter().map(|t| t.storage_and_layout()).collect();
    let xs = match (&*held_x.0, held_x.1.contiguous_offsets()) {
        (candle_core::Storage::Cpu(cpu), Some((a, b))) => &cpu.as_slice::<f32>()?[a..b],
        _ => return Ok(None),
    };
    let mut vals = Vec::with_capacity(ws.len());
    for (storage, layout) in &held {
        match (&**storage, layout.contiguous_offsets()) {
            (candle_core::Storage::Cpu(cpu), Some((a, b))) => {
                vals.push(&cpu.as_slice::<W>()?[a..b]);
            }
            _ => return Ok(None),
        }
    }
    Ok(Some(f(xs, &vals)))
}

/// `x [M, K] @ w [N, K]^T` for an f32 CPU `x` with at most [`MAX_ROWS`] rows and an f32, f16 or
/// bf16 weight, without a backward; `None` for anything else (the caller keeps gemm).
pub(crate) fn matmul_wt(x: &Tensor, w: &Tensor) -> Result<Option<Tensor>> {
    Ok(matmul_wt_many(x, &[w])?.map(|mut v| v.remove(0)))
}

/// `x @ w^T` for each of `ws`, in one pass (a block's query, key and value projections); `None`
/// when [`matmul_wt`] would decline any of them.
pub(crate) fn matmul_wt_many(x: &Tensor, ws: &[&Tensor]) -> Result<Option<Vec<Tensor>>> {
    let Some((m, k, dtype)) = takes(x, ws)? else {
        return Ok(None);
    };
    let x = x.contiguous()?;
    fn run<W: Weight>(
        x: &Tensor,
        ws: &[&Tensor],
        m: usize,
        k: usize,
    ) -> Result<Option<Vec<Vec<f32>>>> {
        with_values::<W, _>(x, ws, |x, ws| products(isa(), x, m, k, ws))
    }
    let ys = match dtype {
        DType::F16 => run::<f16>(&x, ws, m, k)?,
        DType::BF16 => run::<bf16>(&x, ws, m, k)?,
        _ => run::<f32>(&x, ws, m, k)?,
    };
    let Some(ys) = ys else {
        return Ok(None);
    };
    let dev = x.device();
    ys.into_iter()
        .zip(ws)
        .map(|(y, w)| Tensor::from_vec(y, (m, w.dim(0)?), dev))
        .collect::<Result<Vec<_>>>()
        .map(Some)
}

/// `silu(x @ gate^T) * (x @ up^T)` in one pass; `None` when [`matmul_wt`] would decline.
pub(crate) fn swiglu_wt(x: &Tensor, gate: &Tensor, up: &Tensor) -> Result<Option<Tensor>> {
    let Some((m, k, dtype)) = takes(x, &[gate, up])? else {
        return Ok(None);
    };
    if gate.dims() != up.dims() {
        return Ok(None);
    }
    let x = x.contiguous()?;
    fn run<W: Weight>(
        x: &Tensor,
        gate: &Tensor,
        up: &Tensor,
        m: usize,
        k: usize,
    ) -> Result<Option<Vec<f32>>> {
        with_values::<W, _>(x, &[gate, up], |x, ws| {
            swiglu_product(isa(), x, m, k, ws[0], ws[1])
        })
    }
    let h = match dtype {
        DType::F16 => run::<f16>(&x, gate, up, m, k)?,
        DType::BF16 => run::<bf16>(&x, gate, up, m, k)?,
        _ => run::<f32>(&x, gate, up, m, k)?,
    };
    h.map(|h| Tensor::from_vec(h, (m, gate.dim(0)?), x.device()))
        .transpose()
}

/// The f32 values of a contiguous CPU f16 or bf16 tensor, widened (exactly) by this module's
/// vector loads, in parallel: candle's cast converts one element at a time, about 6x slower.
/// `None` for anything else.
pub(crate) fn widened(w: &Tensor) -> Result<Option<Tensor>> {
    if !w.device().is_cpu() || !w.is_contiguous() {
        return Ok(None);
    }
    fn run<W: Weight>(w: &Tensor) -> Result<Option<Vec<f32>>> {
        let held = w.storage_and_layout();
        let src = match (&*held.0, held.1.contiguous_offsets()) {
            (candle_core::Storage::Cpu(cpu), Some((a, b))) => &cpu.as_slice::<W>()?[a..b],
            _ => return Ok(None),
        };
        let mut out = vec![0f32; src.len()];
        const CHUNK: usize = 1 << 16;
        let isa = isa();
        out.par_chunks_mut(CHUNK)
            .zip(src.par_chunks(CHUNK))
            .for_each(|(dst, src)| widen(isa, src, dst));
        Ok(Some(out))
    }
    let values = match w.dtype() {
        DType::F16 => run::<f16>(w)?,
        DType::BF16 => run::<bf16>(w)?,
        _ => None,
    };
    values
        .map(|v| Tensor::from_vec(v, w.shape(), w.device()))
        .transpose()
}

/// `dst[i] = src[i]` widened to f32, with the given kernel's loads.
fn widen<W: Weight>(isa: Isa, src: &[W], dst: &mut [f32]) {
    let n = src.len().min(dst.len());
    match isa {
        // SAFETY: `src` and `dst` hold at least `n` values.
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512 => unsafe { x86::widen512(src.as_ptr(), dst.as_mut_ptr(), n) },
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 => unsafe { x86::widen256(src.as_ptr(), dst.as_mut_ptr(), n) },
        _ => {
            for (d, s) in dst.iter_mut().zip(src) {
                *d = s.widen();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    /// Every kernel this CPU can run (the portable one always).
    fn available_isas() -> Vec<Isa> {
        let mut isas = vec![Isa::Portable];
        #[cfg(target_arch = "x86_64")]
        {
            if std::arch::is_x86_feature_detected!("avx2")
                && std::arch::is_x86_feature_detected!("fma")
                && std::arch::is_x86_feature_detected!("f16c")
            {
                isas.push(Isa::Avx2);
            }
            if std::arch::is_x86_feature_detected!("avx512f") {
                isas.push(Isa::Avx512);
            }
        }
        isas
    }

    fn random(n: usize, seed: u64) -> Vec<f32> {
        use rand::{Rng, SeedableRng};
        let mut r = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        (0..n).map(|_| r.gen_range(-1f32..1.0)).collect()
    }

    /// Every kernel this CPU has gives the portable kernel's bits, for tails, tile remainders and
    /// more than one task; and the product is within rounding of candle's.
    #[test]
    fn kernels_agree_bit_for_bit_and_with_candle() {
        let isas = available_isas();
        for (m, k, n) in [
            (1, 16, 1),
            (16, 576, 192),
            (5, 37, 70),
            (3, 7, 5),
            (7, 100, 33),
            (1, 1, 1),
        ] {
            let x = random(m * k, 1);
            let w = random(n * k, 2);
            let want: Vec<f32> = (0..m)
                .flat_map(|i| {
                    let (x, w) = (&x, &w);
                    (0..n)
                        .map(move |o| dot_portable(&x[i * k..(i + 1) * k], &w[o * k..(o + 1) * k]))
                })
                .collect();
            for &isa in &isas {
                let got = product(isa, &x, &w, m, k);
                let same = got
                    .iter()
                    .zip(&want)
                    .all(|(a, b)| a.to_bits() == b.to_bits());
                assert!(
                    same,
                    "{isa:?} differs from the portable kernel at {m}x{k}x{n}"
                );
            }
            let dev = Device::Cpu;
            let xt = Tensor::from_vec(x.clone(), (m, k), &dev).unwrap();
            let wt = Tensor::from_vec(w.clone(), (n, k), &dev).unwrap();
            let candle = xt.matmul(&wt.t().unwrap()).unwrap().flatten_all().unwrap();
            let candle = candle.to_vec1::<f32>().unwrap();
            let ours = matmul_wt(&xt, &wt).unwrap().unwrap().flatten_all().unwrap();
            let ours = ours.to_vec1::<f32>().unwrap();
            for (a, b) in ours.iter().zip(&candle) {
                assert!(
                    (a - b).abs() <= 1e-5 * (k as f32).sqrt() * b.abs().max(1.0),
                    "{a} vs {b}"
                );
            }
        }
    }

    /// Half-precision weights give the bits of the f32 kernel on the same weights widened, on
    /// every kernel this CPU has, through the tensor entry points too.
    #[test]
    fn half_weights_give_the_bits_of_their_widened_values() {
        let isas = available_isas();
        let dev = Device::Cpu;
        for (m, k, n) in [(16, 576, 70), (5, 37, 33), (1, 100, 9), (3, 16, 4)] {
            let x = random(m * k, 7);
            let w = random(n * k, 8);
            let w16: Vec<f16> = w.iter().map(|&v| f16::from_f32(v)).collect();
            let wb: Vec<bf16> = w.iter().map(|&v| bf16::from_f32(v)).collect();
            let w16f: Vec<f32> = w16.iter().map(|v| v.to_f32()).collect();
            let wbf: Vec<f32> = wb.iter().map(|v| v.to_f32()).collect();
            let want16 = product(Isa::Portable, &x, &w16f, m, k);
            let wantb = product(Isa::Portable, &x, &wbf, m, k);
            for &i in &isas {
                assert_eq!(product(i, &x, &w16, m, k), want16, "f16 {i:?} {m}x{k}x{n}");
                assert_eq!(product(i, &x, &wb, m, k), wantb, "bf16 {i:?} {m}x{k}x{n}");
            }
            let xt = Tensor::from_vec(x.clone(), (m, k), &dev).unwrap();
            let wt = Tensor::from_vec(w16.clone(), (n, k), &dev).unwrap();
            let got = matmul_wt(&xt, &wt).unwrap().unwrap();
            let got: Vec<f32> = got.flatten_all().unwrap().to_vec1().unwrap();
            assert_eq!(got, product(isa(), &x, &w16f, m, k));
            // SwiGLU and the one-pass products take half weights as well.
            let up = Tensor::from_vec(wb.clone(), (n, k), &dev).unwrap();
            let gate = (up.to_dtype(DType::F32).unwrap() * 0.5)
                .unwrap()
                .to_dtype(DType::BF16)
                .unwrap();
            let h = swiglu_wt(&xt, &gate, &up).unwrap().unwrap();
            let g = matmul_wt(&xt, &gate).unwrap().unwrap();
            let u = matmul_wt(&xt, &up).unwrap().unwrap();
            let want = crate::fused::swiglu(&g, &u).unwrap().unwrap();
            assert_eq!(h.to_vec2::<f32>().unwrap(), want.to_vec2::<f32>().unwrap());
            // Weights of mixed dtypes are declined.
            assert!(matmul_wt_many(&xt, &[&wt, &up]).unwrap().is_none());
            // Widening a whole tensor gives candle's cast, on every kernel.
            for t in [&wt, &up] {
                let cast: Vec<f32> = t
                    .to_dtype(DType::F32)
                    .unwrap()
                    .flatten_all()
                    .unwrap()
                    .to_vec1()
                    .unwrap();
                let ours: Vec<f32> = widened(t)
                    .unwrap()
                    .unwrap()
                    .flatten_all()
                    .unwrap()
                    .to_vec1()
                    .unwrap();
                assert_eq!(ours, cast);
                for &i in &isas {
                    let mut d = vec![0f32; n * k];
                    match t.dtype() {
                        DType::F16 => widen(i, &w16, &mut d),
                        _ => widen(i, &wb, &mut d),
                    }
                    assert_eq!(d, cast, "{i:?}");
                }
            }
        }
    }

    /// A row's result is the same whatever rows it is batched with.
    #[test]
    fn a_rows_result_does_not_depend_on_the_other_rows() {
        let (k, n) = (96, 40);
        let w = random(n * k, 3);
        let x = random(9 * k, 4);
        let all = product(isa(), &x, &w, 9, k);
        for m in 0..9 {
            let one = product(isa(), &x[m * k..(m + 1) * k], &w, 1, k);
            assert_eq!(one, all[m * n..(m + 1) * n]);
        }
    }

    /// The one-pass forms give the bits of separate products (and of the SwiGLU kernel after
    /// them), including a width with a tail and more rows than one task holds.
    #[test]
    fn one_pass_forms_match_separate_products() {
        let dev = Device::Cpu;
        let (m, k) = (6, 100);
        let t = |v: Vec<f32>, r: usize| Tensor::from_vec(v, (r, k), &dev).unwrap();
        let x = t(random(m * k, 5), m);
        let ws: Vec<Tensor> = [(70, 6), (33, 7), (33, 8)]
            .iter()
            .map(|&(n, seed)| t(random(n * k, seed), n))
            .collect();
        let refs: Vec<&Tensor> = ws.iter().collect();
        let many = matmul_wt_many(&x, &refs).unwrap().unwrap();
        for (y, w) in many.iter().zip(&ws) {
            let one = matmul_wt(&x, w).unwrap().unwrap();
            let (a, b) = (y.to_vec2::<f32>().unwrap(), one.to_vec2::<f32>().unwrap());
            assert_eq!(a, b);
        }
        let h = swiglu_wt(&x, &ws[1], &ws[2]).unwrap().unwrap();
        let want = crate::fused::swiglu(&many[1], &many[2]).unwrap().unwrap();
        let (a, b) = (h.to_vec2::<f32>().unwrap(), want.to_vec2::<f32>().unwrap());
        assert_eq!(a, b);
        // Mismatched or unsupported inputs are declined, not computed wrongly.
        assert!(swiglu_wt(&x, &ws[0], &ws[1]).unwrap().is_none());
        let bad = Tensor::zeros((4, k + 1), candle_core::DType::F32, &dev).unwrap();
        assert!(matmul_wt_many(&x, &[&ws[0], &bad]).unwrap().is_none());
        let strided = ws[0].t().unwrap();
        assert!(matmul_wt(&x.narrow(1, 0, 70).unwrap(), &strided)
            .unwrap()
            .is_none());
    }

    #[test]
    fn more_rows_than_it_takes_are_left_to_gemm() {
        let dev = Device::Cpu;
        let x = Tensor::zeros((MAX_ROWS + 1, 8), candle_core::DType::F32, &dev).unwrap();
        let w = Tensor::zeros((4, 8), candle_core::DType::F32, &dev).unwrap();
        assert!(matmul_wt(&x, &w).unwrap().is_none());
        let x16 = Tensor::zeros((2, 8), candle_core::DType::F16, &dev).unwrap();
        assert!(matmul_wt(&x16, &w).unwrap().is_none());
        let w64 = Tensor::zeros((4, 8), candle_core::DType::F64, &dev).unwrap();
        let x32 = Tensor::zeros((2, 8), candle_core::DType::F32, &dev).unwrap();
        assert!(matmul_wt(&x32, &w64).unwrap().is_none());
    }
}

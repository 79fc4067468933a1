//! A prompt's causal attention while generating on the CPU (the prefill of a batch of prompts,
//! or of requests that join a running batch), fused: scores, softmax and weighted values of
//! blocks of 16 query rows, over only the keys some row of the block can see.
//!
//! candle's path multiplies every query by every key (both halves of the causal square), writes
//! the `[B, H, T, T]` scores and their softmax to memory, and sums the values in gemm's blocks.
//! Here each query row's arithmetic is that of a decode step's attention
//! ([`super::kernels::decode_attention`]) for the same row: its visible keys only, each score
//! `dot(q, k) + 0` with [`super::fused::dot`]'s lanes and order, the softmax's exponentials
//! summed in key order, and the weighted values added into a zeroed row key by key. So a token's
//! attention has the same bits whether its prompt is prefilled or decoded, and whatever else
//! shares the batch (the padding, the other rows, the thread count). Only the loops differ: the
//! 16 query rows of a block are the lanes of the score and softmax vectors, and up to four rows
//! share each read of a value row.
//!
//! Inference only: the op has no backward.

use candle_core::{CpuStorage, CustomOp3, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

#[cfg(target_arch = "x86_64")]
use super::fused::{on_avx2, on_avx512};
use super::fused::{slice, wide_simd, Simd};
use super::kernels::{exp_neg, MASKED};

/// Query rows per block: the lanes of the score vectors.
const LANES: usize = 16;

/// The lanes of [`super::fused::dot`]'s partial sums.
const DOT_LANES: usize = 8;

/// Each query row's visible keys, `[from, to)`, from an additive causal mask `[B, 1, 1, T, S]`:
/// `None` unless every row sees one run of keys with mask 0 and hides the others (at or below
/// [`MASKED`]), which is what the generator's masks are. A row that sees nothing gets an empty
/// range.
fn visible_ranges(mask: &[f32], rows: usize, s: usize) -> Option<Vec<(usize, usize)>> {
    let mut out = Vec::with_capacity(rows);
    for row in mask.chunks_exact(s.max(1)).take(rows) {
        let from = row.iter().position(|&m| m > MASKED).unwrap_or(s);
        let to = from + row[from..].iter().take_while(|&&m| m > MASKED).count();
        let seen = &row[from..to];
        if seen.iter().any(|&m| m != 0.0) || row[to..].iter().any(|&m| m > MASKED) {
            return None;
        }
        out.push((from, to));
    }
    (out.len() == rows).then_some(out)
}

struct PrefillAttention {
    /// Keys in the cache that the queries may see (`offset + T`).
    len: usize,
    /// Query heads per KV head.
    n_rep: usize,
    /// Per batch row and query row, its visible keys `[from, to)`.
    ranges: Vec<(usize, usize)>,
}

impl CustomOp3 for PrefillAttention {
    fn name(&self) -> &'static str {
        "prefill-attention"
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
        let (q, k, v) = (
            slice(sq, lq, self.name())?,
            slice(sk, lk, self.name())?,
            slice(sv, lv, self.name())?,
        );
        let [b, nh, t, d] = lq.dims()[..] else {
            candle_core::bail!(
                "prefill-attention: queries must be [B, H, T, D], got {:?}",
                lq.dims()
            );
        };
        let [kb, g, cap, kd] = lk.dims()[..] else {
            candle_core::bail!(
                "prefill-attention: keys must be [B, KVH, capacity, D], got {:?}",
                lk.dims()
            );
        };
        if (kb, kd) != (b, d)
            || lv.dims() != lk.dims()
            || g * self.n_rep != nh
            || self.len > cap
            || self.ranges.len() != b * t
            || self.ranges.iter().any(|&(_, to)| to > self.len)
        {
            candle_core::bail!(
                "prefill-attention: queries {:?}, keys {:?}, values {:?}, {} slots and {} query ranges do not fit",
                lq.dims(),
                lk.dims(),
                lv.dims(),
                self.len,
                self.ranges.len()
            );
        }
        let mut out = vec![0f32; q.len()];
        if out.is_empty() {
            return Ok((CpuStorage::F32(out), lq.shape().clone()));
        }
        let wide = wide_simd();
        // A task per block of 16 query rows of one head; every row's sums are its own, so
        // neither the blocks nor the threads change a bit.
        out.par_chunks_mut(t * d)
            .enumerate()
            .for_each(|(bh, out_bh)| {
                let (bi, h) = (bh / nh, bh % nh);
                let base = (bi * g + h / self.n_rep) * cap * d;
                let (k, v) = (&k[base..base + self.len * d], &v[base..base + self.len * d]);
                let q_bh = &q[bh * t * d..(bh + 1) * t * d];
                let ranges = &self.ranges[bi * t..(bi + 1) * t];
                out_bh.par_chunks_mut(LANES * d).enumerate().for_each_init(
                    Scratch::default,
                    |scratch, (blk, y)| {
                        let rows = blk * LANES..(blk * LANES + LANES).min(t);
                        let qb = &q_bh[rows.start * d..rows.end * d];
                        let rb = &ranges[rows];
                        run_block(wide, qb, rb, k, v, d, scratch, y);
                    },
                );
            });
        Ok((CpuStorage::F32(out), lq.shape().clone()))
    }
}

/// [`attend_block`] in the build for `isa`: keys per score tile and rows per value tile sized
/// to its registers.
#[allow(clippy::too_many_arguments)]
fn run_block(
    isa: Simd,
    qb: &[f32],
    ranges: &[(usize, usize)],
    k: &[f32],
    v: &[f32],
    d: usize,
    scratch: &mut Scratch,
    y: &mut [f32],
) {
    match isa {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `wide_simd` saw AVX-512F on this CPU.
        Simd::Avx512 => unsafe {
            on_avx512(
                #[inline(always)]
                || attend_block::<x86::Avx512, 8, 4>(qb, ranges, k, v, d, scratch, y),
            )
        },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `wide_simd` saw AVX2 on this CPU.
        Simd::Avx2 => unsafe {
            on_avx2(
                #[inline(always)]
                || attend_block::<x86::Avx2, 2, 1>(qb, ranges, k, v, d, scratch, y),
            )
        },
        _ => attend_block::<Plain, 1, 1>(qb, ranges, k, v, d, scratch, y),
    }
}

/// A block's working memory, kept by each thread between blocks.
#[derive(Default)]
struct Scratch {
    /// The queries transposed, `[D][LANES]`.
    qt: Vec<f32>,
    /// Scores, then weights, `[keys][LANES]`.
    p: Vec<f32>,
}

/// The attention of up to 16 query rows `qb [n, D]` of one head, each over its visible keys
/// `ranges[i]` of `k`, `v` (`[len, D]`), into `y [n, D]`.
#[inline(always)]
fn attend_block<V: V16, const N: usize, const R: usize>(
    qb: &[f32],
    ranges: &[(usize, usize)],
    k: &[f32],
    v: &[f32],
    d: usize,
    scratch: &mut Scratch,
    y: &mut [f32],
) {
    let n = ranges.len();
    let seen = || ranges.iter().filter(|r| r.0 < r.1);
    let (Some(lo), Some(hi)) = (seen().map(|r| r.0).min(), seen().map(|r| r.1).max()) else {
        // No row sees a key (padding): zeros.
        y.fill(0.0);
        return;
    };
    // Each lane's visible keys, relative to `lo`. Lanes without a row, or whose row sees no
    // key, compute over every key (their results are dropped): so the keys that every lane
    // sees, `full`, are most of the block, and only the keys around them need a lane's mask.
    let mut from = [0u32; LANES];
    let mut to = [(hi - lo) as u32; LANES];
    for (i, &(f, e)) in ranges.iter().enumerate() {
        if f < e {
            (from[i], to[i]) = ((f - lo) as u32, (e - lo) as u32);
        }
    }
    let full = (*from.iter().max().unwrap() as usize)..(*to.iter().min().unwrap() as usize);
    let sees = |i: usize, key: usize| from[i] as usize <= key && key < to[i] as usize;
    // The queries as lanes: `qt[c * LANES + i] = q[i][c]`; absent rows are zeros.
    let qt = &mut scratch.qt;
    qt.clear();
    qt.resize(d * LANES, 0.0);
    for (c, col) in qt.chunks_exact_mut(LANES).enumerate() {
        for (i, x) in col.iter_mut().enumerate().take(n) {
            *x = qb[i * d + c];
        }
    }
    // Scores of keys `lo..hi`, each plus 0 (the decode attention adds the mask's 0 to a
    // visible key's score); a lane's hidden keys hold -inf (they cannot raise its max).
    let p = &mut scratch.p;
    p.clear();
    p.resize((hi - lo) * LANES, 0.0);
    let zero_sum: f32 = std::iter::empty::<f32>().sum();
    let mut j = lo;
    while j < hi {
        let nk = (hi - j).min(N);
        let out = &mut p[(j - lo) * LANES..(j - lo + nk) * LANES];
        let keys = &k[j * d..(j + nk) * d];
        if nk == N {
            scores::<V, N>(qt, keys, d, zero_sum, out);
        } else {
            for (kr, o) in keys.chunks_exact(d).zip(out.chunks_exact_mut(LANES)) {
                scores::<V, 1>(qt, kr, d, zero_sum, o);
            }
        }
        j += nk;
    }
    let edges = (0..full.start.min(hi - lo)).chain(full.end.max(full.start)..hi - lo);
    for key in edges.clone() {
        for i in 0..LANES {
            if !sees(i, key) {
                p[key * LANES + i] = f32::NEG_INFINITY;
            }
        }
    }
    // The softmax of each lane over its own keys: max, exponentials (a hidden key's weight is
    // 0), their sum in key order, then the scaling.
    // SAFETY: every row of `p` holds `LANES` values; the vector type's instructions are this
    // CPU's (the caller chose it from `wide_simd`).
    unsafe {
        let mut max = V::splat(f32::NEG_INFINITY);
        for row in p.chunks_exact(LANES) {
            max = max.max(V::load(row.as_ptr()));
        }
        let mut m = [0f32; LANES];
        max.store(m.as_mut_ptr());
        for row in p.chunks_exact_mut(LANES) {
            let row: &mut [f32; LANES] = row.try_into().unwrap();
            for i in 0..LANES {
                row[i] = exp_neg(row[i] - m[i]);
            }
        }
        for key in edges {
            for i in 0..LANES {
                if !sees(i, key) {
                    p[key * LANES + i] = 0.0;
                }
            }
        }
        let mut sum = V::zero();
        for row in p.chunks_exact(LANES) {
            sum = sum.add(V::load(row.as_ptr()));
        }
        let mut inv = [0f32; LANES];
        sum.store(inv.as_mut_ptr());
        for x in inv.iter_mut() {
            *x = if *x > 0.0 { 1.0 / *x } else { 0.0 };
        }
        let inv = V::load(inv.as_ptr());
        for row in p.chunks_exact_mut(LANES) {
            V::load(row.as_ptr()).mul(inv).store(row.as_mut_ptr());
        }
    }
    // The weighted values, up to four rows sharing each value row; a row's hidden keys add
    // exact zeros to its sums (which start at +0 and so never become -0).
    let mut i = 0;
    while i < n {
        let m = (n - i).min(R);
        let seen = ranges[i..i + m].iter().filter(|r| r.0 < r.1);
        let (glo, ghi) = (
            seen.clone().map(|r| r.0).min().unwrap_or(lo),
            seen.map(|r| r.1).max().unwrap_or(lo),
        );
        let yi = &mut y[i * d..(i + m) * d];
        if d == 64 {
            match m {
                4 => weigh_values_64::<V, 4>(p, lo, glo, ghi, i, v, yi),
                3 => weigh_values_64::<V, 3>(p, lo, glo, ghi, i, v, yi),
                2 => weigh_values_64::<V, 2>(p, lo, glo, ghi, i, v, yi),
                _ => weigh_values_64::<V, 1>(p, lo, glo, ghi, i, v, yi),
            }
        } else {
            yi.fill(0.0);
            for key in glo..ghi {
                let vr = &v[key * d..(key + 1) * d];
                for (r, yr) in yi.chunks_exact_mut(d).enumerate() {
                    let w = p[(key - lo) * LANES + i + r];
                    for (a, &x) in yr.iter_mut().zip(vr) {
                        *a += w * x;
                    }
                }
            }
        }
        i += m;
    }
    // A row that sees no key (padding) is zeros.
    for (yr, r) in y.chunks_exact_mut(d).zip(ranges) {
        if r.0 >= r.1 {
            yr.fill(0.0);
        }
    }
}

/// The scores of the block's query lanes (`qt`, `[D][LANES]`) against `N` keys (`k`, `[N, D]`)
/// into `out [N][LANES]`: for each, [`super::fused::dot`]'s arithmetic, eight partial sums of
/// products in order, added in order, then the remaining dimensions one by one.
#[inline(always)]
fn scores<V: V16, const N: usize>(qt: &[f32], k: &[f32], d: usize, zero_sum: f32, out: &mut [f32]) {
    assert!(qt.len() >= d * LANES && k.len() >= N * d && out.len() >= N * LANES);
    let whole = d / DOT_LANES * DOT_LANES;
    // SAFETY: every read is inside `qt` (`c < d`) or `k` (`n < N`, `c < d`), every write
    // inside `out`, as asserted above; the vector type's instructions are this CPU's (its
    // caller chose it from `wide_simd`).
    unsafe {
        let (q, k) = (qt.as_ptr(), k.as_ptr());
        let mut s = [V::splat(zero_sum); N];
        for l in 0..DOT_LANES {
            let mut a = [V::zero(); N];
            for c in (l..whole).step_by(DOT_LANES) {
                let qv = V::load(q.add(c * LANES));
                for (n, an) in a.iter_mut().enumerate() {
                    *an = an.add(qv.mul(V::splat(*k.add(n * d + c))));
                }
            }
            for (sn, an) in s.iter_mut().zip(&a) {
                *sn = sn.add(*an);
            }
        }
        for c in whole..d {
            let qv = V::load(q.add(c * LANES));
            for (n, sn) in s.iter_mut().enumerate() {
                *sn = sn.add(qv.mul(V::splat(*k.add(n * d + c))));
            }
        }
        let zero = V::zero();
        for (n, sn) in s.iter().enumerate() {
            sn.add(zero).store(out.as_mut_ptr().add(n * LANES));
        }
    }
}

/// `y[r] = sum over keys glo..hi of p[key][lane + r] * v[key]` for `R` rows of a 64-wide head,
/// each column summed from 0 in key order, with the `R x 64` sums in registers.
#[inline(always)]
fn weigh_values_64<V: V16, const R: usize>(
    p: &[f32],
    lo: usize,
    glo: usize,
    ghi: usize,
    lane: usize,
    v: &[f32],
    y: &mut [f32],
) {
    assert!(lo <= glo && glo <= ghi && v.len() >= ghi * 64 && y.len() >= R * 64);
    assert!(lane + R <= LANES && p.len() >= (ghi - lo) * LANES);
    // SAFETY: the reads stay in `p` (`key - lo < ghi - lo`, `lane + r < LANES`) and `v`
    // (`key < ghi`), the writes in `y`, as asserted above; the vector type's instructions are
    // this CPU's.
    unsafe {
        let mut acc = [[V::zero(); 4]; R];
        for key in glo..ghi {
            let vp = v.as_ptr().add(key * 64);
            let vr = [
                V::load(vp),
                V::load(vp.add(LANES)),
                V::load(vp.add(2 * LANES)),
                V::load(vp.add(3 * LANES)),
            ];
            let w = p.as_ptr().add((key - lo) * LANES + lane);
            for (r, a) in acc.iter_mut().enumerate() {
                let wr = V::splat(*w.add(r));
                for c in 0..4 {
                    a[c] = a[c].add(wr.mul(vr[c]));
                }
            }
        }
        for (r, a) in acc.iter().enumerate() {
            for (c, ac) in a.iter().enumerate() {
                ac.store(y.as_mut_ptr().add(r * 64 + c * LANES));
            }
        }
    }
}

/// Sixteen f32 lanes: one AVX-512 vector, two AVX2 ones, or plain values. Multiplies and adds
/// are separate (never fused), so every build computes the same bits.
trait V16: Copy {
    /// # Safety
    /// Every method runs this type's instructions: the CPU must have them.
    unsafe fn zero() -> Self;
    unsafe fn splat(x: f32) -> Self;
    /// # Safety
    /// Also: `p` points to 16 readable values.
    unsafe fn load(p: *const f32) -> Self;
    /// # Safety
    /// Also: `p` points to 16 writable values.
    unsafe fn store(self, p: *mut f32);
    unsafe fn add(self, o: Self) -> Self;
    unsafe fn mul(self, o: Self) -> Self;
    /// `f32::max` in each lane (a NaN gives way to the other value).
    unsafe fn max(self, o: Self) -> Self;
}

#[derive(Clone, Copy)]
struct Plain([f32; LANES]);

impl V16 for Plain {
    #[inline(always)]
    unsafe fn zero() -> Self {
        Plain([0.0; LANES])
    }
    #[inline(always)]
    unsafe fn splat(x: f32) -> Self {
        Plain([x; LANES])
    }
    #[inline(always)]
    unsafe fn load(p: *const f32) -> Self {
        Plain(unsafe { p.cast::<[f32; LANES]>().read_unaligned() })
    }
    #[inline(always)]
    unsafe fn store(self, p: *mut f32) {
        unsafe { p.cast::<[f32; LANES]>().write_unaligned(self.0) }
    }
    #[inline(always)]
    unsafe fn add(self, o: Self) -> Self {
        Plain(std::array::from_fn(|i| self.0[i] + o.0[i]))
    }
    #[inline(always)]
    unsafe fn mul(self, o: Self) -> Self {
        Plain(std::array::from_fn(|i| self.0[i] * o.0[i]))
    }
    #[inline(always)]
    unsafe fn max(self, o: Self) -> Self {
        Plain(std::array::from_fn(|i| self.0[i].max(o.0[i])))
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::{LANES, V16};
    use std::arch::x86_64::*;

    #[derive(Clone, Copy)]
    pub(super) struct Avx512(__m512);

    impl V16 for Avx512 {
        #[inline(always)]
        unsafe fn zero() -> Self {
            Avx512(unsafe { _mm512_setzero_ps() })
        }
        #[inline(always)]
        unsafe fn splat(x: f32) -> Self {
            Avx512(unsafe { _mm512_set1_ps(x) })
        }
        #[inline(always)]
        unsafe fn load(p: *const f32) -> Self {
            Avx512(unsafe { _mm512_loadu_ps(p) })
        }
        #[inline(always)]
        unsafe fn store(self, p: *mut f32) {
            unsafe { _mm512_storeu_ps(p, self.0) }
        }
        #[inline(always)]
        unsafe fn add(self, o: Self) -> Self {
            Avx512(unsafe { _mm512_add_ps(self.0, o.0) })
        }
        #[inline(always)]
        unsafe fn mul(self, o: Self) -> Self {
            Avx512(unsafe { _mm512_mul_ps(self.0, o.0) })
        }
        #[inline(always)]
        unsafe fn max(self, o: Self) -> Self {
            // `vmaxps` gives its second operand where either is NaN: where that is `o`'s
            // NaN, `self`.
            unsafe {
                let m = _mm512_max_ps(self.0, o.0);
                Avx512(_mm512_mask_blend_ps(
                    _mm512_cmp_ps_mask::<_CMP_UNORD_Q>(o.0, o.0),
                    m,
                    self.0,
                ))
            }
        }
    }

    #[derive(Clone, Copy)]
    pub(super) struct Avx2(__m256, __m256);

    impl V16 for Avx2 {
        #[inline(always)]
        unsafe fn zero() -> Self {
            unsafe { Avx2(_mm256_setzero_ps(), _mm256_setzero_ps()) }
        }
        #[inline(always)]
        unsafe fn splat(x: f32) -> Self {
            unsafe { Avx2(_mm256_set1_ps(x), _mm256_set1_ps(x)) }
        }
        #[inline(always)]
        unsafe fn load(p: *const f32) -> Self {
            unsafe { Avx2(_mm256_loadu_ps(p), _mm256_loadu_ps(p.add(LANES / 2))) }
        }
        #[inline(always)]
        unsafe fn store(self, p: *mut f32) {
            unsafe {
                _mm256_storeu_ps(p, self.0);
                _mm256_storeu_ps(p.add(LANES / 2), self.1);
            }
        }
        #[inline(always)]
        unsafe fn add(self, o: Self) -> Self {
            unsafe { Avx2(_mm256_add_ps(self.0, o.0), _mm256_add_ps(self.1, o.1)) }
        }
        #[inline(always)]
        unsafe fn mul(self, o: Self) -> Self {
            unsafe { Avx2(_mm256_mul_ps(self.0, o.0), _mm256_mul_ps(self.1, o.1)) }
        }
        #[inline(always)]
        unsafe fn max(self, o: Self) -> Self {
            // As `Avx512::max`, per half.
            #[inline(always)]
            unsafe fn half(a: __m256, b: __m256) -> __m256 {
                unsafe {
                    let m = _mm256_max_ps(a, b);
                    _mm256_blendv_ps(m, a, _mm256_cmp_ps::<_CMP_UNORD_Q>(b, b))
                }
            }
            unsafe { Avx2(half(self.0, o.0), half(self.1, o.1)) }
        }
    }
}

/// The attention of the queries `q [B, H, T, D]` (already scaled) of a forward with a cache:
/// against the first `len` slots of the caches `[B, KVH, capacity, D]` (the new keys already
/// written), under the additive `mask [B, 1, 1, T, len]`, `n_rep` query heads per KV head:
/// `[B, H, T, D]`. `None` where the fused CPU kernel does not apply (another device or dtype,
/// or a mask that is not one run of visible keys per row); the caller then takes candle's ops.
pub(crate) fn prefill_attention(
    q: &Tensor,
    k_cache: &Tensor,
    v_cache: &Tensor,
    len: usize,
    mask: &Tensor,
    n_rep: usize,
) -> Result<Option<Tensor>> {
    let f32_cpu = |t: &Tensor| t.device().is_cpu() && t.dtype() == candle_core::DType::F32;
    let fits = f32_cpu(q)
        && f32_cpu(k_cache)
        && f32_cpu(v_cache)
        && f32_cpu(mask)
        && k_cache.is_contiguous()
        && v_cache.is_contiguous()
        && q.rank() == 4
        && mask.rank() == 5;
    if !fits {
        return Ok(None);
    }
    let (b, _, t, _) = q.dims4()?;
    if mask.dims() != [b, 1, 1, t, len] {
        return Ok(None);
    }
    let m = mask.flatten_all()?.to_vec1::<f32>()?;
    let Some(ranges) = visible_ranges(&m, b * t, len) else {
        return Ok(None);
    };
    let op = PrefillAttention { len, n_rep, ranges };
    q.contiguous()?
        .apply_op3_no_bwd(k_cache, v_cache, &op)
        .map(Some)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    fn values(n: usize, seed: f32) -> Vec<f32> {
        (0..n)
            .map(|i| (i as f32 * 0.37 + seed).sin() * 1.7 + (i as f32 * 0.011).cos())
            .collect()
    }

    #[test]
    fn visible_ranges_read_the_generators_masks() {
        // Two rows of 3 queries over 5 slots: the first padded by 1 behind 2 cached slots.
        let mut m = vec![0f32; 2 * 3 * 5];
        for (r, pad) in [(0usize, 1usize), (1, 0)] {
            for i in 0..3 {
                for j in 0..5 {
                    if j < pad || j > 2 + i {
                        m[(r * 3 + i) * 5 + j] = -1e9;
                    }
                }
            }
        }
        let got = visible_ranges(&m, 6, 5).unwrap();
        assert_eq!(got, [(1, 3), (1, 4), (1, 5), (0, 3), (0, 4), (0, 5)]);
        // A hole in the middle, or a visible key with a bias, is not a causal mask.
        let mut holed = m.clone();
        holed[7] = -1e9;
        assert!(visible_ranges(&holed, 6, 5).is_none());
        let mut biased = m;
        biased[2] = 0.5;
        assert!(visible_ranges(&biased, 6, 5).is_none());
    }

    /// The generator's mask for `t` new tokens after `off` cached slots, rows padded on the
    /// left by `pads`.
    fn causal_mask(pads: &[usize], t: usize, off: usize) -> Vec<f32> {
        let s = off + t;
        let mut m = vec![0f32; pads.len() * t * s];
        for (r, &pad) in pads.iter().enumerate() {
            for i in 0..t {
                for j in 0..s {
                    if j < pad || j > off + i {
                        m[(r * t + i) * s + j] = -1e9;
                    }
                }
            }
        }
        m
    }

    /// Every query row of a prefill has the bits of a decode step's attention for that row
    /// (the same query against the same cache, up to its own slot): rows padded on the left,
    /// grouped KV heads, blocks cut short (`t` not a multiple of 16), slots cached before the
    /// new ones, 64-wide heads and others (with dimensions left over after the dot product's
    /// eight lanes). A row that sees no key (padding) is zeros.
    #[test]
    fn each_row_has_the_bits_of_a_decode_step() {
        let dev = Device::Cpu;
        for &(b, g, n_rep, d, t, off, cap) in &[
            (3usize, 2usize, 3usize, 64usize, 37usize, 0usize, 40usize),
            (2, 1, 2, 20, 21, 5, 30),
            (1, 3, 1, 64, 16, 9, 25),
            (2, 2, 2, 12, 3, 0, 3),
        ] {
            let nh = g * n_rep;
            let len = off + t;
            let pads: Vec<usize> = (0..b).map(|r| (r * 7) % (len / 2 + 1)).collect();
            let q = Tensor::from_vec(values(b * nh * t * d, 0.1), (b, nh, t, d), &dev).unwrap();
            let k = Tensor::from_vec(values(b * g * cap * d, 0.2), (b, g, cap, d), &dev).unwrap();
            let v = Tensor::from_vec(values(b * g * cap * d, 0.3), (b, g, cap, d), &dev).unwrap();
            let m = causal_mask(&pads, t, off);
            let mask = Tensor::from_vec(m.clone(), (b, 1, 1, t, len), &dev).unwrap();
            let y = prefill_attention(&q, &k, &v, len, &mask, n_rep)
                .unwrap()
                .expect("the fused kernel applies");
            assert_eq!(y.dims(), [b, nh, t, d]);
            let y = y.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            for i in 0..t {
                // Query row `i` of every head, as a decode step at slot `off + i`.
                let qi = q
                    .narrow(2, i, 1)
                    .unwrap()
                    .reshape((b, g, n_rep, d))
                    .unwrap();
                let seen = off + i + 1;
                let mi: Vec<f32> = (0..b)
                    .flat_map(|r| m[(r * t + i) * len..(r * t + i) * len + seen].to_vec())
                    .collect();
                let mi = Tensor::from_vec(mi, (b, 1, 1, 1, seen), &dev).unwrap();
                let want = super::super::kernels::decode_attention(&qi, &k, &v, seen, &mi, true)
                    .unwrap()
                    .unwrap()
                    .flatten_all()
                    .unwrap()
                    .to_vec1::<f32>()
                    .unwrap();
                for (r, &pad) in pads.iter().enumerate() {
                    for h in 0..nh {
                        let got = &y[((r * nh + h) * t + i) * d..][..d];
                        let at = (r * nh + h) * d;
                        if seen <= pad {
                            assert!(got.iter().all(|&x| x == 0.0), "padding row {i}");
                            continue;
                        }
                        assert!(
                            got.iter()
                                .zip(&want[at..at + d])
                                .all(|(a, b)| a.to_bits() == b.to_bits()),
                            "d {d} t {t} off {off}: batch row {r}, head {h}, query {i}"
                        );
                    }
                }
            }
        }
    }

    /// The portable build, the AVX2 one and the widest one this CPU has give the same bits.
    #[test]
    fn builds_agree_bit_for_bit() {
        for d in [64usize, 20] {
            let (n, len) = (13, 45);
            let qb = values(n * d, 0.4);
            let (k, v) = (values(len * d, 0.5), values(len * d, 0.6));
            let ranges: Vec<(usize, usize)> = (0..n)
                .map(|i| (if i == 0 { 3 } else { 2 }, 30 + i))
                .collect();
            let run = |isa: Simd| {
                let mut y = vec![0f32; n * d];
                let mut scratch = Scratch::default();
                run_block(isa, &qb, &ranges, &k, &v, d, &mut scratch, &mut y);
                y
            };
            let base = run(Simd::Base);
            let mut builds = vec![wide_simd()];
            #[cfg(target_arch = "x86_64")]
            if std::arch::is_x86_feature_detected!("avx2") {
                builds.push(Simd::Avx2);
            }
            for isa in builds {
                let y = run(isa);
                assert!(
                    base.iter().zip(&y).all(|(a, b)| a.to_bits() == b.to_bits()),
                    "{isa:?}, d {d}"
                );
            }
        }
    }

    /// The fused kernel against candle's ops (scores, mask, softmax, weighted values) on the
    /// visible rows, and another dtype or an unusual mask left to candle's ops.
    #[test]
    fn matches_candles_ops_and_declines_what_it_does_not_cover() {
        let dev = Device::Cpu;
        let (b, g, n_rep, d, t, off, cap) = (2, 2, 3, 64, 29, 4, 40);
        let (nh, len) = (g * n_rep, off + t);
        let pads = [0usize, 6];
        let q = Tensor::randn(0f32, 1.0, (b, nh, t, d), &dev).unwrap();
        let k = Tensor::randn(0f32, 1.0, (b, g, cap, d), &dev).unwrap();
        let v = Tensor::randn(0f32, 1.0, (b, g, cap, d), &dev).unwrap();
        let m = causal_mask(&pads, t, off);
        let mask = Tensor::from_vec(m.clone(), (b, 1, 1, t, len), &dev).unwrap();
        let fused = prefill_attention(&q, &k, &v, len, &mask, n_rep)
            .unwrap()
            .unwrap();
        let kk = k.narrow(2, 0, len).unwrap();
        let vv = v.narrow(2, 0, len).unwrap();
        let qg = q.reshape((b, g, n_rep * t, d)).unwrap();
        let att = qg
            .matmul(&kk.t().unwrap())
            .unwrap()
            .reshape((b, g, n_rep, t, len));
        let att = att.unwrap().broadcast_add(&mask).unwrap();
        let att = candle_nn::ops::softmax(&att, candle_core::D::Minus1).unwrap();
        let want = att
            .reshape((b, g, n_rep * t, len))
            .unwrap()
            .matmul(&vv)
            .unwrap()
            .reshape((b, nh, t, d))
            .unwrap();
        // The second row's first `pads[1] - off` queries are padding (candle spreads them over
        // every slot; the kernel gives zeros): compare the rows that see a key.
        let largest = |a: Tensor, b: Tensor| -> f32 {
            (a - b)
                .and_then(|d| d.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>())
                .unwrap()
        };
        let seen = (pads[1] - off)..t;
        let diff = largest(
            fused.narrow(2, seen.start, seen.len()).unwrap(),
            want.narrow(2, seen.start, seen.len()).unwrap(),
        );
        assert!(diff < 1e-5, "largest difference {diff}");
        let first = largest(
            fused.narrow(0, 0, 1).unwrap(),
            want.narrow(0, 0, 1).unwrap(),
        );
        assert!(first < 1e-5, "largest difference {first}");
        let half = q.to_dtype(candle_core::DType::F16).unwrap();
        assert!(prefill_attention(&half, &k, &v, len, &mask, n_rep)
            .unwrap()
            .is_none());
        let mut holed = m;
        holed[3 * len + 1] = -1e9;
        let holed = Tensor::from_vec(holed, (b, 1, 1, t, len), &dev).unwrap();
        assert!(prefill_attention(&q, &k, &v, len, &holed, n_rep)
            .unwrap()
            .is_none());
    }
}

//! The decoder forward pass shared by Llama, Qwen2 and Mistral, written for batching:
//! per-row positions (rope tables are `[B, T, D/2]`), an additive mask (`-1e9`, never `-inf`, so
//! fully masked padding rows stay finite) and an optional preallocated KV cache written in place.
//!
//! One code path, two op sets, chosen by [`Weights::differentiable`]:
//! - differentiable (training): this crate's fused CPU kernels that carry their backward
//!   (RMS norm, rope, SwiGLU in [`super::fused`], the masked softmax in [`super::kernels`]);
//!   off the CPU, rope, softmax and RMS norm from primitive ops, because candle's fused kernels
//!   cut the autograd graph without an error (see CANDLE.md);
//! - inference: candle's fused `rms_norm`, this crate's fused rope (the bits of candle's),
//!   masked softmax and SwiGLU on detached tensors, and while generating [`super::skinny`]'s
//!   few-row products.
//!
//! Grouped-query attention never materialises repeated K/V: the query heads that share a KV
//! head are folded into the row dimension of one matmul (`[B, KVH, n_rep*T, D]`).
//! This module does no I/O: weights come in as tensors.

use candle_core::{DType, Device, Result, Tensor, D};

use super::attention;
use super::config::Config;
use super::fused;
use super::kernels::{self, matmul_wt};
use super::prefill;
use super::projection::Proj;
use super::skinny;
use super::trained;
use super::ModelError;

/// One linear projection of a block: its weight `[out, in]`, optional bias, optional LoRA
/// factors (A `[r, in]`, B `[out, r]`) with their scale, and the dropout on the adapter's input
/// while training with it.
pub(crate) struct Projection {
    pub weight: Tensor,
    pub bias: Option<Tensor>,
    pub lora: Option<(Tensor, Tensor)>,
    /// `alpha / r` of the LoRA factors.
    pub scale: f64,
    /// (probability, mask seed) while training with dropout.
    pub dropout: Option<(f64, u64)>,
    /// The weight is frozen under training LoRA factors: its matmul skips the weight gradient.
    pub frozen: bool,
}

impl Projection {
    /// A weight and maybe a bias, nothing else: no adapter, no dropout, not frozen under one.
    fn plain(&self) -> bool {
        self.lora.is_none() && self.dropout.is_none() && !self.frozen
    }

    /// `x W^T (+ b)`, plus the LoRA update `scale * (x A^T) B^T` when it has factors.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let y = if self.frozen {
            linear_frozen(x, &self.weight, self.bias.as_ref())?
        } else {
            linear(x, &self.weight, self.bias.as_ref())?
        };
        let Some((a, bm)) = &self.lora else {
            return Ok(y);
        };
        let (bs, t, i) = x.dims3()?;
        if bs * t > trained::SMALL_M {
            // Trained factors on `x` as it is: the bits of the reshapes below (whose products
            // are laid out alike at this many rows), with three graph nodes fewer.
            let mut x3 = x.clone();
            if let Some((p, seed)) = self.dropout {
                x3 = (x3 * dropout_mask(bs * t * i, p, seed, x)?.reshape((bs, t, i))?)?;
            }
            if let Some(xa) = trained::trained_matmul_wt(&x3, a)? {
                if let Some(xb) = trained::trained_matmul_wt(&xa, bm)? {
                    return y + (xb * self.scale)?;
                }
            }
        }
        let mut x2 = x.reshape((bs * t, i))?;
        if let Some((p, seed)) = self.dropout {
            x2 = (x2 * dropout_mask(bs * t * i, p, seed, x)?.reshape((bs * t, i))?)?;
        }
        let xa = matmul_wt(&x2, a)?;
        let d = (matmul_wt(&xa, bm)? * self.scale)?;
        y + d.reshape((bs, t, ()))?
    }
}

/// Where one forward pass's tensors come from: the model's weights by name, and per layer and
/// projection its LoRA factors and dropout.
pub(crate) struct TensorSource<'a> {
    pub get: &'a dyn Fn(&str) -> std::result::Result<Tensor, ModelError>,
    pub lora: &'a dyn Fn(usize, Proj) -> Option<(Tensor, Tensor)>,
    pub dropout: &'a dyn Fn(usize, Proj) -> Option<(f64, u64)>,
    pub lora_scale: f64,
    pub frozen_base: bool,
}

impl TensorSource<'_> {
    fn projection(
        &self,
        cfg: &Config,
        layer: usize,
        p: Proj,
    ) -> std::result::Result<Projection, ModelError> {
        Ok(Projection {
            weight: (self.get)(&p.weight_name(layer))?,
            bias: if p.has_bias(cfg) {
                Some((self.get)(&p.bias_name(layer))?)
            } else {
                None
            },
            lora: (self.lora)(layer, p),
            scale: self.lora_scale,
            dropout: (self.dropout)(layer, p),
            frozen: self.frozen_base,
        })
    }
}

/// Attention's projections.
pub(crate) struct Attention {
    pub q: Projection,
    pub k: Projection,
    pub v: Projection,
    pub o: Projection,
}

impl Attention {
    fn load(
        src: &TensorSource,
        cfg: &Config,
        layer: usize,
    ) -> std::result::Result<Self, ModelError> {
        Ok(Attention {
            q: src.projection(cfg, layer, Proj::Q)?,
            k: src.projection(cfg, layer, Proj::K)?,
            v: src.projection(cfg, layer, Proj::V)?,
            o: src.projection(cfg, layer, Proj::O)?,
        })
    }
}

/// The SwiGLU feed-forward block: `down(silu(gate(x)) * up(x))`.
pub(crate) struct Mlp {
    pub gate: Projection,
    pub up: Projection,
    pub down: Projection,
}

impl Mlp {
    fn load(
        src: &TensorSource,
        cfg: &Config,
        layer: usize,
    ) -> std::result::Result<Self, ModelError> {
        Ok(Mlp {
            gate: src.projection(cfg, layer, Proj::Gate)?,
            up: src.projection(cfg, layer, Proj::Up)?,
            down: src.projection(cfg, layer, Proj::Down)?,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (g, u) = (self.gate.forward(x)?, self.up.forward(x)?);
        // The fused kernel gives the bits of `silu` then `mul` (with a backward).
        let h = match fused::swiglu(&g, &u)? {
            Some(h) => h,
            None => (g.silu()? * u)?,
        };
        self.down.forward(&h)
    }
}

/// One transformer block's parameters.
pub(crate) struct Layer {
    pub attn_norm: Tensor,
    pub attn: Attention,
    pub mlp_norm: Tensor,
    pub mlp: Mlp,
}

impl Layer {
    /// Layer `layer`'s tensors under their Hugging Face names.
    pub fn load(
        src: &TensorSource,
        cfg: &Config,
        layer: usize,
    ) -> std::result::Result<Self, ModelError> {
        let p = format!("model.layers.{layer}");
        Ok(Layer {
            attn_norm: (src.get)(&format!("{p}.input_layernorm.weight"))?,
            attn: Attention::load(src, cfg, layer)?,
            mlp_norm: (src.get)(&format!("{p}.post_attention_layernorm.weight"))?,
            mlp: Mlp::load(src, cfg, layer)?,
        })
    }
}

/// All parameters, as tensors that either track gradients (from `Var`s) or are detached views
/// of the same storage (inference: optimizer updates are visible, no graph is built).
pub(crate) struct Weights {
    pub cfg: Config,
    pub embed: Tensor,
    pub layers: Vec<Layer>,
    pub norm: Tensor,
    pub lm_head: Tensor,
    pub differentiable: bool,
    /// Training LoRA factors over frozen base weights: the base matmuls (the LM head's too)
    /// skip the weight gradient.
    pub frozen_base: bool,
}

/// One layer's view of the cache in a forward: its keys and values, the filled slots, and the
/// cache's two settings (`skip_masked_prefix`, `fused_prompts`).
type CacheView<'a> = (&'a Tensor, &'a Tensor, usize, bool, bool);

/// Per-layer K/V buffers `[B, KVH, capacity, head_dim]`, filled left to right.
pub(crate) struct KvCache {
    pub k: Vec<Tensor>,
    pub v: Vec<Tensor>,
    /// Number of filled slots (the same for every row; rows differ by their left padding).
    pub len: usize,
    pub capacity: usize,
    /// Decode steps start each row's attention at its first visible slot (see
    /// `kernels::decode_attention`); off, a row's masked slots add their tiny weights.
    pub skip_masked_prefix: bool,
    /// A forward of several tokens (a prefill) takes the fused causal kernel
    /// (`PromptAttention::Fused`).
    pub fused_prompts: bool,
}

impl KvCache {
    pub fn new(
        cfg: &Config,
        batch: usize,
        capacity: usize,
        dtype: DType,
        dev: &Device,
    ) -> Result<Self> {
        let shape = (batch, cfg.num_key_value_heads, capacity, cfg.head_dim);
        let mut k = Vec::with_capacity(cfg.num_hidden_layers);
        let mut v = Vec::with_capacity(cfg.num_hidden_layers);
        for _ in 0..cfg.num_hidden_layers {
            k.push(Tensor::zeros(shape, dtype, dev)?);
            v.push(Tensor::zeros(shape, dtype, dev)?);
        }
        Ok(KvCache {
            k,
            v,
            len: 0,
            capacity,
            skip_masked_prefix: false,
            fused_prompts: false,
        })
    }

    /// Keeps only the given batch rows (after some rows finished generating).
    pub fn retain_rows(&mut self, rows: &Tensor) -> Result<()> {
        for t in self.k.iter_mut().chain(self.v.iter_mut()) {
            *t = t.index_select(rows, 0)?;
        }
        Ok(())
    }

    /// Writes `len` slots of row `src_row` of `src`, from its slot `src_start`, into row `row`
    /// at slot `dst_start`; the row's other slots become zeros (its mask hides them).
    pub fn place_row(
        &mut self,
        row: usize,
        src: &KvCache,
        src_row: usize,
        src_start: usize,
        len: usize,
        dst_start: usize,
    ) -> Result<()> {
        for (dst, s) in self
            .k
            .iter_mut()
            .zip(&src.k)
            .chain(self.v.iter_mut().zip(&src.v))
        {
            let (_, h, cap, d) = dst.dims4()?;
            let part = s
                .narrow(0, src_row, 1)?
                .narrow(2, src_start, len)?
                .contiguous()?;
            let full = Tensor::zeros((1, h, cap, d), dst.dtype(), dst.device())?;
            full.slice_set(&part, 2, dst_start)?;
            dst.slice_set(&full, 0, row)?;
        }
        Ok(())
    }

    /// Drops the first `n` filled slots of every row (slot `n` becomes slot 0).
    pub fn drop_slots(&mut self, n: usize) -> Result<()> {
        if n == 0 {
            return Ok(());
        }
        let kept = self.len - n;
        for t in self.k.iter_mut().chain(self.v.iter_mut()) {
            let moved = t.narrow(2, n, kept)?.contiguous()?;
            let fresh = Tensor::zeros(t.shape(), t.dtype(), t.device())?;
            fresh.slice_set(&moved, 2, 0)?;
            *t = fresh;
        }
        self.len = kept;
        Ok(())
    }
}

/// Rotary tables for one forward call: `[B, T, head_dim/2]` each.
pub(crate) struct Rope {
    pub cos: Tensor,
    pub sin: Tensor,
}

impl Rope {
    /// `positions` is row-major `[B, T]`; `row_len[b]` is the length of row `b`'s own sequence
    /// (its largest position + 1), which decides dynamic RoPE's base per row: each sequence
    /// gets what transformers computes for it alone, whatever it is batched with.
    pub fn new(
        config: &super::Config,
        positions: &[u32],
        row_len: &[usize],
        t: usize,
        dtype: DType,
        dev: &Device,
    ) -> Result<Self> {
        let b = row_len.len();
        let half = config.head_dim / 2;
        let mut cos = Vec::with_capacity(b * t * half);
        let mut sin = Vec::with_capacity(b * t * half);
        let mut cached: Option<(usize, super::rope::RopeFrequencies)> = None;
        for (r, &len) in row_len.iter().enumerate() {
            let freqs = match &cached {
                Some((l, f)) if *l == len || !config.rope.depends_on_length() => f.clone(),
                _ => {
                    let f = config.rope_frequencies(len);
                    cached = Some((len, f.clone()));
                    f
                }
            };
            let scale = freqs.attention_scaling as f64;
            for &p in &positions[r * t..(r + 1) * t] {
                for &f in &freqs.inv_freq {
                    // f32 product as in transformers, then an accurate cos/sin of that angle,
                    // times the attention scaling (YaRN's; 1 for the other types).
                    let a = (p as f32 * f) as f64;
                    cos.push((a.cos() * scale) as f32);
                    sin.push((a.sin() * scale) as f32);
                }
            }
        }
        let cos = Tensor::from_vec(cos, (b, t, half), dev)?.to_dtype(dtype)?;
        let sin = Tensor::from_vec(sin, (b, t, half), dev)?.to_dtype(dtype)?;
        Ok(Rope { cos, sin })
    }
}

/// Additive attention mask `[B, 1, 1, T, S]`: query `i` sits in slot `offset + i`; key slot `j`
/// is visible to it iff `pad_left[b] <= j <= offset + i`. Masked entries are `-1e9`.
pub(crate) fn attention_mask(
    pad_left: &[usize],
    t: usize,
    s: usize,
    offset: usize,
    dtype: DType,
    dev: &Device,
) -> Result<Tensor> {
    let b = pad_left.len();
    let mut m = vec![0f32; b * t * s];
    for (r, &pad) in pad_left.iter().enumerate() {
        for i in 0..t {
            let row = &mut m[(r * t + i) * s..(r * t + i + 1) * s];
            for (j, x) in row.iter_mut().enumerate() {
                if j < pad || j > offset + i {
                    *x = -1e9;
                }
            }
        }
    }
    Tensor::from_vec(m, (b, 1, 1, t, s), dev)?.to_dtype(dtype)
}

/// `x [B, T, in] @ w[out, in]^T (+ b)`.
fn linear(x: &Tensor, w: &Tensor, b: Option<&Tensor>) -> Result<Tensor> {
    let (bs, t, i) = x.dims3()?;
    if b.is_none() && w.track_op() && !kernels::generating() {
        // A trained weight, no bias: the product on `x` as it is (the bits of the reshapes
        // below, with two graph nodes fewer).
        if let Some(y) = trained::trained_matmul_wt(x, w)? {
            return Ok(y);
        }
    }
    let y = matmul_wt(&x.reshape((bs * t, i))?, w)?;
    let y = match b {
        Some(b) => y.broadcast_add(b)?,
        None => y,
    };
    y.reshape((bs, t, ()))
}

/// `x [B, T, in] @ w^T (+ b)` for a frozen `w` (no weight gradient).
fn linear_frozen(x: &Tensor, w: &Tensor, b: Option<&Tensor>) -> Result<Tensor> {
    let (bs, t, i) = x.dims3()?;
    if b.is_none() && kernels::frozen_applies(x) {
        // On `x` as it is: the bits of the reshapes below, with two graph nodes fewer.
        return kernels::frozen_matmul_wt(x, w);
    }
    let y = kernels::frozen_matmul_wt(&x.reshape((bs * t, i))?, w)?;
    let y = match b {
        Some(b) => y.broadcast_add(b)?,
        None => y,
    };
    y.reshape((bs, t, ()))
}

/// An inverted-dropout mask of `n` values (0, or `1 / (1 - p)` with probability `1 - p`) in
/// `like`'s dtype and device, drawn from a ChaCha8 generator seeded with `seed`.
fn dropout_mask(n: usize, p: f64, seed: u64, like: &Tensor) -> Result<Tensor> {
    use rand::{Rng, SeedableRng};
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let keep = (1.0 / (1.0 - p)) as f32;
    let v: Vec<f32> = (0..n)
        .map(|_| if rng.gen::<f64>() < p { 0.0 } else { keep })
        .collect();
    Tensor::from_vec(v, n, like.device())?.to_dtype(like.dtype())
}

fn rotate_half(x: &Tensor) -> Result<Tensor> {
    let d = x.dim(D::Minus1)?;
    let x1 = x.narrow(D::Minus1, 0, d / 2)?;
    let x2 = x.narrow(D::Minus1, d / 2, d / 2)?;
    Tensor::cat(&[&x2.neg()?, &x1], D::Minus1)
}

impl Weights {
    fn rms_norm(&self, x: &Tensor, w: &Tensor) -> Result<Tensor> {
        let eps = self.cfg.rms_norm_eps;
        if self.differentiable {
            if let Some(y) = fused::rms_norm(x, w, eps)? {
                return Ok(y);
            }
            let var = x.sqr()?.mean_keepdim(D::Minus1)?;
            x.broadcast_mul(&(var + eps)?.sqrt()?.recip()?)?
                .broadcast_mul(w)
        } else {
            candle_nn::ops::rms_norm(&x.contiguous()?, w, eps as f32)
        }
    }

    /// Half-split ("NeoX" / HF layout) rotary embedding of `x [B, H, T, D]`: this crate's fused
    /// kernel on the CPU (the bits of candle's `rope`, faster, with a backward).
    fn rope(&self, x: &Tensor, rope: &Rope) -> Result<Tensor> {
        if let Some(y) = fused::rope(x, &rope.cos, &rope.sin)? {
            return Ok(y);
        }
        if self.differentiable {
            let cos = Tensor::cat(&[&rope.cos, &rope.cos], D::Minus1)?.unsqueeze(1)?;
            let sin = Tensor::cat(&[&rope.sin, &rope.sin], D::Minus1)?.unsqueeze(1)?;
            x.broadcast_mul(&cos)? + rotate_half(x)?.broadcast_mul(&sin)?
        } else {
            candle_nn::rotary_emb::rope(&x.contiguous()?, &rope.cos, &rope.sin)
        }
    }

    /// The query, key and value projections of `x [B, T, hidden]`; while generating, few rows
    /// of plain projections in one pass of [`skinny`]'s kernel.
    fn qkv(&self, a: &Attention, x: &Tensor) -> Result<(Tensor, Tensor, Tensor)> {
        let ps = [&a.q, &a.k, &a.v];
        if !self.differentiable && kernels::generating() && ps.iter().all(|p| p.plain()) {
            let (b, t, i) = x.dims3()?;
            let ws = ps.map(|p| &p.weight);
            if let Some(ys) = skinny::matmul_wt_many(&x.reshape((b * t, i))?, &ws)? {
                let mut out = Vec::with_capacity(3);
                for (y, p) in ys.into_iter().zip(ps) {
                    let y = match &p.bias {
                        Some(bias) => y.broadcast_add(bias)?,
                        None => y,
                    };
                    out.push(y.reshape((b, t, ()))?);
                }
                let [q, k, v] = <[Tensor; 3]>::try_from(out).expect("three projections");
                return Ok((q, k, v));
            }
        }
        Ok((a.q.forward(x)?, a.k.forward(x)?, a.v.forward(x)?))
    }

    /// The feed-forward block of `x [B, T, hidden]`; while generating, few rows of plain
    /// projections have their gate, up and SwiGLU in one pass of [`skinny`]'s kernel.
    fn mlp(&self, m: &Mlp, x: &Tensor) -> Result<Tensor> {
        let plain = |p: &Projection| p.plain() && p.bias.is_none();
        if !self.differentiable && kernels::generating() && plain(&m.gate) && plain(&m.up) {
            let (b, t, i) = x.dims3()?;
            if let Some(h) =
                skinny::swiglu_wt(&x.reshape((b * t, i))?, &m.gate.weight, &m.up.weight)?
            {
                return m.down.forward(&h.reshape((b, t, ()))?);
            }
        }
        m.forward(x)
    }

    /// `softmax(scores + mask)` over the keys.
    fn masked_softmax(&self, scores: &Tensor, mask: &Tensor) -> Result<Tensor> {
        kernels::masked_softmax(scores, mask, self.differentiable)
    }

    fn attention(
        &self,
        l: &Layer,
        x: &Tensor,
        rope: &Rope,
        mask: &Tensor,
        cache: Option<CacheView<'_>>,
    ) -> Result<Tensor> {
        let cfg = &self.cfg;
        let (b, t, _) = x.dims3()?;
        let (nh, nkv, hd) = (
            cfg.num_attention_heads,
            cfg.num_key_value_heads,
            cfg.head_dim,
        );
        let n_rep = nh / nkv;
        // On the CPU one node that moves the values (one gradient to accumulate, not three).
        let heads = |y: Tensor, n: usize| -> Result<Tensor> {
            match attention::split_heads(&y, n)? {
                Some(h) => Ok(h),
                None => y.reshape((b, t, n, hd))?.transpose(1, 2)?.contiguous(),
            }
        };
        let merge = |y: Tensor| -> Result<Tensor> {
            match attention::merge_heads(&y, nh)? {
                Some(m) => Ok(m),
                None => y
                    .reshape((b, nh, t, hd))?
                    .transpose(1, 2)?
                    .reshape((b, t, nh * hd)),
            }
        };
        let (q, k, v) = self.qkv(&l.attn, x)?;
        let q = heads(q, nh)?;
        let k = heads(k, nkv)?;
        let v = heads(v, nkv)?;
        let q = self.rope(&q, rope)?;
        let k = self.rope(&k, rope)?;
        // A decode step (one new token per row) on the CPU: the fused kernel.
        if let (Some((kc, vc, off, skip, _)), false, 1) = (cache, self.differentiable, t) {
            kc.slice_set(&k, 2, off)?;
            vc.slice_set(&v, 2, off)?;
            let scale = 1.0 / (hd as f64).sqrt();
            let qs = (q.clone() * scale)?.reshape((b, nkv, n_rep, hd))?;
            if let Some(y) = kernels::decode_attention(&qs, kc, vc, off + 1, mask, skip)? {
                let y = y
                    .reshape((b, nh, 1, hd))?
                    .transpose(1, 2)?
                    .reshape((b, 1, nh * hd))?;
                return l.attn.o.forward(&y);
            }
        }
        let scale = 1.0 / (hd as f64).sqrt();
        let (k, v) = match cache {
            Some((kc, vc, off, _, fused)) => {
                kc.slice_set(&k, 2, off)?;
                vc.slice_set(&v, 2, off)?;
                // A prompt's tokens while generating on the CPU, when asked: the fused causal
                // kernel, each row with a decode step's arithmetic.
                if fused && !self.differentiable {
                    let qs = (&q * scale)?;
                    if let Some(y) = prefill::prefill_attention(&qs, kc, vc, off + t, mask, n_rep)?
                    {
                        return l.attn.o.forward(&merge(y)?);
                    }
                }
                (kc.narrow(2, 0, off + t)?, vc.narrow(2, 0, off + t)?)
            }
            None => (k, v),
        };
        // Training on the CPU: scores, softmax and values as one graph node.
        let core = match (self.differentiable, cache.is_none()) {
            (true, true) => attention::attention_core(&q, &k, &v, mask, n_rep)?,
            _ => None,
        };
        if let Some(y) = core {
            return l.attn.o.forward(&merge(y)?);
        }
        let s = k.dim(2)?;
        let q = (q * scale)?.reshape((b, nkv, n_rep * t, hd))?;
        let att = q.matmul(&k.t()?)?;
        let att = att.reshape((b, nkv, n_rep, t, s))?;
        let att = self
            .masked_softmax(&att, mask)?
            .reshape((b, nkv, n_rep * t, s))?;
        let y = att.matmul(&v)?;
        l.attn.o.forward(&merge(y)?)
    }

    /// Hidden states after the final norm, `[B, T, hidden]`, for token ids `[B, T]`.
    /// With a cache, the new keys/values go to slots `cache.len..cache.len+T` and `cache.len`
    /// advances; `mask` must then be `[B, 1, 1, T, cache.len + T]`.
    pub fn forward(
        &self,
        ids: &Tensor,
        rope: &Rope,
        mask: &Tensor,
        mut cache: Option<&mut KvCache>,
    ) -> Result<Tensor> {
        let (b, t) = ids.dims2()?;
        let flat = ids.flatten_all()?;
        // While training with a gradient sink, the lookup hands its gradient's rows there.
        let rows = match super::grad_sink::embedding(&self.embed, &flat)? {
            Some(rows) => rows,
            None => self.embed.index_select(&flat, 0)?,
        };
        let mut x = rows.to_dtype(self.norm.dtype())?.reshape((b, t, ()))?;
        let off = cache.as_ref().map(|c| c.len).unwrap_or(0);
        if let Some(c) = cache.as_ref() {
            if off + t > c.capacity {
                candle_core::bail!("kv cache overflow: {} + {t} > {}", off, c.capacity);
            }
        }
        for (i, l) in self.layers.iter().enumerate() {
            let h = self.rms_norm(&x, &l.attn_norm)?;
            let kv = cache
                .as_ref()
                .map(|c| (&c.k[i], &c.v[i], off, c.skip_masked_prefix, c.fused_prompts));
            let a = self.attention(l, &h, rope, mask, kv)?;
            x = (x + a)?;
            let h = self.rms_norm(&x, &l.mlp_norm)?;
            x = (&x + self.mlp(&l.mlp, &h)?)?;
        }
        if let Some(c) = cache.as_mut() {
            c.len += t;
        }
        self.rms_norm(&x, &self.norm)
    }

    /// Logits `[N, vocab]` for hidden rows `[N, hidden]` (possibly a transposed view: callers
    /// that need a contiguous tensor make it so).
    pub fn logits(&self, h: &Tensor) -> Result<Tensor> {
        if self.frozen_base {
            kernels::frozen_matmul_wt(h, &self.lm_head)
        } else {
            matmul_wt(h, &self.lm_head)
        }
    }
}

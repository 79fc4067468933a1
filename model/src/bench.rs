//! Speed measurements shared by `tsr bench` and the `bench_*` examples: process counters
//! (`/proc`), a median, the FLOP model behind MFU, synthetic token ids, and the generation
//! measurement the GPU benchmark compares with PyTorch (`scripts/bench_torch_gpu.py` runs the
//! same shapes and token ids; the DPO step's measurement is `tsr_dpo::bench`):
//!
//! - [`bench_generate`]: one batch of `batch` sampled continuations of a `prompt`-token chat
//!   prompt, at most `max_new` tokens each; tokens per second counts the tokens produced
//!   (a row that samples the end-of-turn token stops early; the count says how many did).
//!
//! The device is synchronised before every clock read, so CUDA's asynchronous kernels are
//! inside the time they belong to.

use std::time::Instant;

use crate::{Config, FinishReason, GenRequest, LanguageModel, ModelError, Sampling};

/// Where `scripts/fetch-model.sh` caches the default model (SmolLM2-135M-Instruct, GGUF Q4_1).
pub fn cached_default_model() -> Option<std::path::PathBuf> {
    let home = std::env::var_os("HOME")?;
    Some(std::path::Path::new(&home).join(".cache/tsr/models/SmolLM2-135M-Instruct.Q4_1.gguf"))
}

/// The model a bench example loads: `arg`, else `$TSR_MODEL`, else [`cached_default_model`].
pub fn bench_model_spec(arg: Option<&String>) -> String {
    arg.cloned()
        .or_else(|| std::env::var("TSR_MODEL").ok())
        .or_else(|| cached_default_model().map(|p| p.display().to_string()))
        .unwrap_or_default()
}

/// Peak resident memory of this process (VmHWM) in MB; NaN where `/proc` is unavailable.
pub fn vm_hwm_mb() -> f64 {
    let s = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    s.lines()
        .find(|l| l.starts_with("VmHWM:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|kb| kb.parse::<f64>().ok())
        .map_or(f64::NAN, |kb| kb / 1024.0)
}

/// Minor page faults of this process so far (`/proc/self/stat`, field 10): each is, almost
/// always, a fresh 4 KiB page the kernel zeroed for a new buffer. `None` where that file is
/// not readable (not Linux).
pub fn minor_faults() -> Option<u64> {
    let s = std::fs::read_to_string("/proc/self/stat").ok()?;
    // The command name (field 2) is in parentheses and may hold spaces: count after it.
    let rest = &s[s.rfind(')')? + 1..];
    rest.split_whitespace().nth(7)?.parse().ok()
}

/// Resets VmHWM to the current resident size, so the next reading is the peak from now on.
pub fn reset_hwm() {
    let _ = std::fs::write("/proc/self/clear_refs", "5");
}

/// CPU seconds (user + system) this process has used.
pub fn cpu_s() -> f64 {
    stat_cpu_s("/proc/self/stat")
}

/// CPU seconds of the calling thread so far (user + system; 0 where `/proc` is missing). In a
/// step whose products run on the thread pool, what this thread did alone while the pool
/// waited: elementwise work, candle's backward bookkeeping.
pub fn thread_cpu_s() -> f64 {
    stat_cpu_s("/proc/thread-self/stat")
}

/// utime + stime of a `/proc` stat file, in seconds.
fn stat_cpu_s(path: &str) -> f64 {
    let s = std::fs::read_to_string(path).unwrap_or_default();
    // Fields after the command name (which is in parentheses): utime is the 12th, stime the 13th.
    let rest = s.rsplit(')').next().unwrap_or("");
    let f: Vec<f64> = rest
        .split_whitespace()
        .map(|x| x.parse().unwrap_or(0.0))
        .collect();
    (f.get(11).unwrap_or(&0.0) + f.get(12).unwrap_or(&0.0)) / 100.0
}

/// The median (NaN for no values).
pub fn median(mut v: Vec<f64>) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

/// Parameters that take part in a matrix multiply per token: the attention and MLP projections
/// of every layer and the output head (the tied embedding counts once, as the head: the input
/// lookup is not a matmul). Norms and biases are left out (under 0.1 % here).
pub fn matmul_params(cfg: &Config) -> f64 {
    let h = cfg.hidden_size as f64;
    let q = (cfg.num_attention_heads * cfg.head_dim) as f64;
    let kv = (cfg.num_key_value_heads * cfg.head_dim) as f64;
    let per_layer = h * (q + 2.0 * kv) + q * h + 3.0 * h * cfg.intermediate_size as f64;
    cfg.num_hidden_layers as f64 * per_layer + cfg.vocab_size as f64 * h
}

/// Forward FLOPs of one token in a sequence of `seq` tokens: `2 * matmul_params` plus the
/// attention scores and weighted sum, `4 * layers * heads * head_dim * seq` (PaLM's
/// convention: the full `seq x seq` product, which is also what this model computes; the
/// causal mask hides half of it but nothing is skipped). The backward pass is counted as twice
/// the forward, so a training token costs 3x this.
pub fn forward_flops_per_token(cfg: &Config, seq: usize) -> f64 {
    let attn = 4.0
        * cfg.num_hidden_layers as f64
        * (cfg.num_attention_heads * cfg.head_dim) as f64
        * seq as f64;
    2.0 * matmul_params(cfg) + attn
}

/// Model FLOPs of one DPO pair: two sequences (chosen, rejected) of `prompt + response`
/// tokens, each run forward by the reference (1x) and forward + backward by the policy (3x).
/// The prompt is recomputed for both sequences, as the trainer does.
pub fn dpo_flops_per_pair(cfg: &Config, prompt: usize, response: usize) -> f64 {
    let seq = prompt + response;
    2.0 * seq as f64 * 4.0 * forward_flops_per_token(cfg, seq)
}

/// `n` token ids of real text (the model's own tokenizer), the text repeated to length: what
/// the DPO examples train on. A text the tokenizer cannot encode is an error naming it.
pub fn text_tokens(
    model: &crate::LanguageModel,
    text: &str,
    n: usize,
) -> Result<Vec<u32>, crate::ModelError> {
    let ids = model.tokenizer().encode(text)?;
    if ids.is_empty() && n > 0 {
        return Err(crate::ModelError::InvalidRequest(format!(
            "`{text}` encodes to no tokens: nothing to repeat to {n}"
        )));
    }
    Ok(ids.iter().cycle().take(n).copied().collect())
}

/// Deterministic token ids in `[100, vocab)`; `scripts/bench_torch_gpu.py` uses the same
/// formula, so both sides train on the same ids.
pub fn synthetic_ids(vocab: usize, row: usize, len: usize, a: usize, b: usize) -> Vec<u32> {
    let span = vocab.saturating_sub(100).clamp(1, 40_000);
    (0..len)
        .map(|j| (100 + (row * a + j * b) % span) as u32)
        .collect()
}

/// The result of [`bench_generate`].
#[derive(Debug, Clone)]
pub struct GenBench {
    pub batch: usize,
    /// Tokens produced, the end-of-turn token included.
    pub new_tokens: usize,
    /// Rows that stopped before `max_new` tokens.
    pub stopped_early: usize,
    /// Wall time of the batch, prefill included.
    pub seconds: f64,
    pub tokens_per_s: f64,
}

/// A chat prompt of exactly `len` tokens: a long request, cut in the middle so that the
/// template's start and its assistant header (the last 3 tokens) are kept.
pub fn prompt_ids(model: &LanguageModel, len: usize) -> Result<Vec<u32>, ModelError> {
    let text = "Write a long story about a brave knight who travels across the kingdom to find \
                a dragon, and describe every village, river and mountain on the way. "
        .repeat(24);
    let ids = model.tokenizer().encode_prompt(&text)?;
    if len < 4 || ids.len() < len {
        return Err(ModelError::InvalidRequest(format!(
            "prompt length {len}: must be in 4..={}",
            ids.len()
        )));
    }
    let tail = &ids[ids.len() - 3..];
    Ok([&ids[..len - 3], tail].concat())
}

/// Batched sampling throughput (see the module docs): a short warm-up at the full batch,
/// then one timed batch.
pub fn bench_generate(
    model: &LanguageModel,
    batch: usize,
    prompt: usize,
    max_new: usize,
    sampling: Sampling,
    ignore_end_of_turn: bool,
) -> Result<GenBench, ModelError> {
    let ids = prompt_ids(model, prompt)?;
    let reqs = |n: usize| -> Vec<GenRequest> {
        (0..batch as u64)
            .map(|seed| GenRequest {
                prompt_ids: ids.clone(),
                max_new_tokens: n,
                sampling: sampling.clone(),
                seed,
            })
            .collect()
    };
    model.generate(&reqs(4.min(max_new)), batch)?;
    let dev = model.device();
    dev.synchronize()?;
    let t = Instant::now();
    let out = if ignore_end_of_turn {
        model.generate_ignoring_end_of_turn(&reqs(max_new), batch)?
    } else {
        model.generate(&reqs(max_new), batch)?
    };
    dev.synchronize()?;
    Ok(GenBench::of(&out, batch, t.elapsed().as_secs_f64()))
}

/// A logprob judge's forward, timed: the next-token logits of `seqs` in one batch, after a
/// warm-up call. Returns the seconds. With [`crate::PromptAttention::Fused`] set it is
/// generation's prefill, the tokens the prompts share computed once (see
/// [`LanguageModel::next_token_logits`]).
pub fn bench_judge(model: &LanguageModel, seqs: &[Vec<u32>]) -> Result<f64, ModelError> {
    let batch = seqs.len();
    model.next_token_logits(seqs, batch)?;
    let dev = model.device();
    dev.synchronize()?;
    let t = Instant::now();
    std::hint::black_box(model.next_token_logits(seqs, batch)?);
    dev.synchronize()?;
    Ok(t.elapsed().as_secs_f64())
}

impl GenBench {
    /// The measurement of `out`, made in `seconds` by `batch` rows: the end-of-turn token
    /// counts as a token made.
    fn of(out: &[crate::GenOutput], batch: usize, seconds: f64) -> Self {
        let new_tokens: usize = out
            .iter()
            .map(|o| o.token_ids.len() + usize::from(o.finished == FinishReason::EndOfTurn))
            .sum();
        GenBench {
            batch,
            new_tokens,
            stopped_early: out
                .iter()
                .filter(|o| o.finished == FinishReason::EndOfTurn)
                .count(),
            seconds,
            tokens_per_s: new_tokens as f64 / seconds,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::smollm2_135m_config;

    #[test]
    fn flop_model_of_smollm2() {
        let cfg = smollm2_135m_config();
        // Every parameter but the 61 norm vectors is in a matmul (the tied embedding once).
        let all: usize = cfg
            .expected_tensors()
            .iter()
            .map(|(_, s)| s.iter().product::<usize>())
            .sum();
        assert_eq!(matmul_params(&cfg) as usize, all - 61 * 576);
        assert_eq!(matmul_params(&cfg) as usize, 134_479_872);
        // 128 + 128: 2 * 134.48 M + 4 * 30 * 576 * 256 per token forward, x 4 (policy fwd + bwd,
        // reference fwd), x 512 tokens (chosen and rejected).
        let per_token = 2.0 * 134_479_872.0 + 4.0 * 30.0 * 576.0 * 256.0;
        assert_eq!(dpo_flops_per_pair(&cfg, 128, 128), 512.0 * 4.0 * per_token);
        assert!((dpo_flops_per_pair(&cfg, 128, 128) / 1e9 - 587.1).abs() < 0.1);
        // The decode kernel's measurement reads what a decode step of this model reads.
        assert_eq!(DECODE_KERNEL_BYTES as f64, weight_bytes_f32(&cfg));
    }
}

/// What the machine can do at most, measured here: f32 matmul FLOP/s through candle's CPU
/// kernels (the ones tsr's models use) and memory bandwidth, so a benchmark can print its result
/// as a share of its bound.
#[derive(Clone, Debug)]
pub struct Bounds {
    /// (M, K, N, GFLOP/s) per measured product, square first.
    pub matmul: Vec<(usize, usize, usize, f64)>,
    /// The best of them, in GFLOP/s.
    pub peak_gflops: f64,
    /// Read bandwidth (sum of a 512 MiB array, all threads), GB/s: the better of two timings,
    /// one before the decode kernel's and one after.
    pub read_gbs: f64,
    /// STREAM triad `a = b + s c` over three 256 MiB arrays (bytes counted as STREAM counts
    /// them, 3 per element), GB/s.
    pub triad_gbs: f64,
    /// The few-row kernel that decode steps run, alone.
    pub decode_kernel: DecodeKernel,
}

/// The few-row kernel of a decode step on the CPU, timed alone: every product of a
/// SmolLM2-135M decode step (its shapes, [`DECODE_KERNEL_BYTES`] of f32 weights, far more than
/// the caches hold), on a worker of the thread pool as generation runs them. Against a
/// generation result it separates the kernel's own speed from the work around the products
/// (norms, attention, sampling, the threads' hand-offs).
#[derive(Clone, Debug)]
pub struct DecodeKernel {
    /// One input row (batch 1): GB/s of weights read.
    pub one_row_gbs: f64,
    /// Sixteen input rows (batch 16): GFLOP/s.
    pub rows16_gflops: f64,
}

/// SmolLM2-135M's products per layer, as `[N, K]` weights: queries, keys and values (one pass),
/// output, gate and up (one pass), down.
const DECODE_LAYER_SHAPES: [(usize, usize); 4] = [(960, 576), (576, 576), (3072, 576), (576, 1536)];

/// SmolLM2-135M's layers.
const DECODE_LAYERS: usize = 30;

/// SmolLM2-135M's output projection, `[N, K]`.
const DECODE_HEAD: (usize, usize) = (49_152, 576);

/// Weight bytes one decode step of SmolLM2-135M reads: every layer's products and the output
/// projection, in f32.
pub const DECODE_KERNEL_BYTES: usize = {
    let mut per_layer = 0;
    let mut i = 0;
    while i < DECODE_LAYER_SHAPES.len() {
        per_layer += DECODE_LAYER_SHAPES[i].0 * DECODE_LAYER_SHAPES[i].1;
        i += 1;
    }
    4 * (DECODE_LAYERS * per_layer + DECODE_HEAD.0 * DECODE_HEAD.1)
};

/// Measures [`DecodeKernel`]: about two seconds, and the weights' 538 MB while it runs.
fn measure_decode_kernel() -> Result<DecodeKernel, ModelError> {
    use rayon::prelude::*;
    let mut shapes: Vec<(usize, usize)> = Vec::new();
    for _ in 0..DECODE_LAYERS {
        shapes.extend(DECODE_LAYER_SHAPES);
    }
    shapes.push(DECODE_HEAD);
    let weights: Vec<Vec<f32>> = shapes
        .par_iter()
        .map(|&(n, k)| (0..n * k).map(|i| (i % 7) as f32 * 0.01 - 0.03).collect())
        .collect();
    let step = |m: usize| {
        for (w, &(_, k)) in weights.iter().zip(&shapes) {
            let x = vec![0.5f32; m * k];
            std::hint::black_box(crate::skinny::product_f32(&x, m, k, w));
        }
        Ok(())
    };
    let (one, sixteen) = rayon::scope(|_| -> Result<(f64, f64), ModelError> {
        Ok((
            time_per_call(1.0, || step(1))?,
            time_per_call(1.0, || step(16))?,
        ))
    })?;
    let bytes = DECODE_KERNEL_BYTES as f64;
    Ok(DecodeKernel {
        one_row_gbs: bytes / one / 1e9,
        // 2 FLOP per weight per row.
        rows16_gflops: 16.0 * 2.0 * (bytes / 4.0) / sixteen / 1e9,
    })
}

/// Runs `f` at least `min_s` seconds (after one warm-up call) and returns the mean seconds per
/// call.
fn time_per_call(
    min_s: f64,
    mut f: impl FnMut() -> Result<(), ModelError>,
) -> Result<f64, ModelError> {
    f()?;
    let t = Instant::now();
    let mut n = 0u32;
    while n == 0 || t.elapsed().as_secs_f64() < min_s {
        f()?;
        n += 1;
    }
    Ok(t.elapsed().as_secs_f64() / n as f64)
}

/// Read bandwidth in GB/s: the sum of a 512 MiB array, all threads.
fn measure_read_gbs() -> Result<f64, ModelError> {
    use rayon::prelude::*;
    let len = 128 << 20; // f32 elements: 512 MiB
    let big: Vec<f32> = (0..len).into_par_iter().map(|i| (i % 7) as f32).collect();
    // Sixteen independent sums per chunk, compiled for the CPU's widest vectors, so that
    // memory is the limit.
    #[inline(always)]
    fn lanes(c: &[f32]) -> f32 {
        let mut acc = [0f32; 16];
        for w in c.chunks_exact(16) {
            for (a, x) in acc.iter_mut().zip(w) {
                *a += x;
            }
        }
        acc.iter().sum::<f32>()
    }
    let wide = crate::fused::wide_simd();
    let s = time_per_call(1.0, || {
        let sum: f32 = big
            .par_chunks(1 << 16)
            .map(|c| crate::fused::simd!(wide, lanes(c)))
            .sum();
        std::hint::black_box(sum);
        Ok(())
    })?;
    Ok((len * 4) as f64 / s / 1e9)
}

/// Measures [`Bounds`] on the CPU: products of SmolLM2-135M's shapes (a 1024 cube, a DPO
/// step's 256 x 576 x 1536 and a batch-16 decode step's 16 x 576 x 1536), the bandwidths, and
/// the decode step's own kernel ([`DecodeKernel`]). Takes about twelve seconds.
pub fn measure_cpu_bounds() -> Result<Bounds, ModelError> {
    use candle_core::{Device, Tensor};
    use rayon::prelude::*;
    let dev = Device::Cpu;
    let mut matmul = Vec::new();
    for (m, k, n) in [(1024, 1024, 1024), (256, 576, 1536), (16, 576, 1536)] {
        let a = Tensor::randn(0f32, 1.0, (m, k), &dev)?;
        let b = Tensor::randn(0f32, 1.0, (k, n), &dev)?;
        let s = time_per_call(1.0, || {
            let c = a.matmul(&b)?;
            std::hint::black_box(c);
            Ok(())
        })?;
        matmul.push((m, k, n, 2.0 * (m * k * n) as f64 / s / 1e9));
    }
    let peak_gflops = matmul.iter().map(|x| x.3).fold(0.0, f64::max);
    // Bandwidth: arrays far larger than the caches, touched once before timing. The read is
    // timed again after the decode kernel and the better of the two kept: on a shared host
    // the bandwidth moves within seconds, and the kernel's share is printed against it.
    let read_gbs = measure_read_gbs()?;
    let len = 64 << 20; // 256 MiB each
    let b: Vec<f32> = (0..len).into_par_iter().map(|i| (i % 5) as f32).collect();
    let c: Vec<f32> = (0..len).into_par_iter().map(|i| (i % 3) as f32).collect();
    let mut a: Vec<f32> = vec![0.0; len];
    a.par_iter_mut().for_each(|x| *x = 1.0);
    let s = time_per_call(1.0, || {
        a.par_chunks_mut(1 << 16)
            .zip(b.par_chunks(1 << 16))
            .zip(c.par_chunks(1 << 16))
            .for_each(|((a, b), c)| {
                for ((a, b), c) in a.iter_mut().zip(b).zip(c) {
                    *a = b + 3.0 * c;
                }
            });
        std::hint::black_box(&a);
        Ok(())
    })?;
    let triad_gbs = (3 * len * 4) as f64 / s / 1e9;
    drop((a, b, c));
    let decode_kernel = measure_decode_kernel()?;
    let read_gbs = read_gbs.max(measure_read_gbs()?);
    Ok(Bounds {
        matmul,
        peak_gflops,
        read_gbs,
        triad_gbs,
        decode_kernel,
    })
}

/// Bytes of f32 weights one decode step reads: every matmul weight once, the output projection
/// included (the embedding lookup reads only the batch's rows).
pub fn weight_bytes_f32(cfg: &Config) -> f64 {
    4.0 * matmul_params(cfg)
}

/// How [`bench_workload`] hands its requests to the model.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Batching {
    /// `batch` requests per call, in request order: a generation step whose commit unit is
    /// its batch. A batch's rows that stop early leave it smaller until its longest row ends.
    OneBatchAtATime,
    /// Every request in one call: a row that stops takes the next waiting request, so the
    /// batch stays full (a step whose commit unit holds them all).
    Continuous,
}

/// A generation step's workload: `samples` sampled continuations of each prompt (token ids
/// of a chat prompt), at most `max_new` tokens each, end-of-turn honoured, `batch` rows at a
/// time, handed over as `batching` says. Request `i` is sample `i % samples` of prompt
/// `i / samples`, seeded by `i`, as a generation step orders its items.
pub fn bench_workload(
    model: &LanguageModel,
    prompts: &[Vec<u32>],
    samples: usize,
    batch: usize,
    max_new: usize,
    sampling: Sampling,
    batching: Batching,
) -> Result<GenBench, ModelError> {
    let reqs: Vec<GenRequest> = prompts
        .iter()
        .flat_map(|p| std::iter::repeat_n(p, samples.max(1)))
        .enumerate()
        .map(|(i, p)| GenRequest {
            prompt_ids: p.clone(),
            max_new_tokens: max_new,
            sampling: sampling.clone(),
            seed: i as u64,
        })
        .collect();
    let dev = model.device();
    dev.synchronize()?;
    let t = Instant::now();
    let out = match batching {
        Batching::Continuous => model.generate(&reqs, batch)?,
        Batching::OneBatchAtATime => {
            let mut out = Vec::with_capacity(reqs.len());
            for chunk in reqs.chunks(batch.max(1)) {
                out.extend(model.generate(chunk, batch)?);
            }
            out
        }
    };
    dev.synchronize()?;
    Ok(GenBench::of(&out, batch, t.elapsed().as_secs_f64()))
}

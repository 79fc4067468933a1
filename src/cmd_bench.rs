//! `tsr bench`: DPO step throughput (pairs/s, MFU) and batched generation (new tokens/s) on one
//! device, with the shapes of the benchmark plan, so one GPU session can set tsr beside PyTorch
//! (`scripts/bench_torch_gpu.py` prints the same figures for the same shapes and token ids).
//! The measurements and the FLOP model live in `tsr_model::bench` and `tsr_dpo::bench`.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{bail, Context};
use clap::{Args, ValueEnum};
use tsr_dpo::bench::bench_dpo;
use tsr_model::bench::{
    bench_generate, bench_judge, bench_workload, dpo_flops_per_pair, forward_flops_per_token,
    matmul_params, measure_cpu_bounds, median, minor_faults, reset_hwm, vm_hwm_mb,
    weight_bytes_f32, Batching, DECODE_KERNEL_BYTES,
};
use tsr_model::testing::{random_model, smollm2_135m_config};
use tsr_model::{parse_device, DType, LanguageModel, ModelSource, Sampling};

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum BenchDtype {
    F32,
    Bf16,
}

/// The precision of the weights while generating (a generation step's `weights`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum GenWeights {
    F32,
    Bf16,
    F16,
}

/// How generation computes a prompt's attention (a run's `prompt_attention`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum GenAttention {
    Batched,
    Fused,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum BenchWhat {
    Dpo,
    Generate,
    /// A logprob judge's forward: the next-token logits of --gen-batch prompts of
    /// --gen-prompt-tokens tokens (with --gen-attention fused, generation's prefill).
    Judge,
    /// The machine's own bounds only: f32 matmul FLOP/s and memory bandwidth.
    Bounds,
}

#[derive(Args, Debug)]
pub struct BenchArgs {
    /// cpu or cuda:N.
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// Model (GGUF, HF folder, Org/Name). Default: the quickstart's SmolLM2-135M GGUF if cached,
    /// else random weights of its shape.
    #[arg(long)]
    pub model: Option<String>,
    /// Random weights of SmolLM2-135M's shape even if the GGUF is cached (same speed).
    #[arg(long, conflicts_with = "model")]
    pub random: bool,
    /// Compute dtype. bf16 needs CUDA; its weights are bf16 too (AdamW's arithmetic is f32 but
    /// there is no f32 master copy), unlike tsr's training, which is f32 throughout.
    #[arg(long, value_enum, default_value = "f32")]
    pub dtype: BenchDtype,
    /// What to measure (default both).
    #[arg(long, value_enum)]
    pub only: Option<BenchWhat>,
    /// DPO batch sizes in pairs (default: 8,32 on CUDA, 1 on CPU).
    #[arg(long, value_delimiter = ',')]
    pub dpo_batch: Vec<usize>,
    /// Timed DPO steps per batch size, after one warm-up step.
    #[arg(long, default_value_t = 3)]
    pub steps: usize,
    #[arg(long, default_value_t = 128)]
    pub prompt_tokens: usize,
    #[arg(long, default_value_t = 128)]
    pub response_tokens: usize,
    /// Generation batch (default: 256 on CUDA, 16 on CPU).
    #[arg(long)]
    pub gen_batch: Option<usize>,
    #[arg(long, default_value_t = 64)]
    pub gen_prompt_tokens: usize,
    #[arg(long, default_value_t = 128)]
    pub gen_new_tokens: usize,
    /// Measure a generation step's workload instead of one batch of one synthetic prompt:
    /// the prompts of this JSONL file (a workflow's prompts), --gen-samples continuations of
    /// each, end-of-turn honoured, handed to the model one batch at a time (a step whose
    /// commit unit is its batch) and all at once (continuous batching), alternating.
    #[arg(long, value_name = "FILE")]
    pub gen_prompts: Option<PathBuf>,
    /// With --gen-prompts: continuations per prompt.
    #[arg(long, default_value_t = 4)]
    pub gen_samples: usize,
    /// With --gen-prompts: how many times each way is measured, alternating.
    #[arg(long, default_value_t = 2)]
    pub rounds: usize,
    /// Sampling temperature (0: greedy).
    #[arg(long, default_value_t = 1.0)]
    pub temperature: f64,
    /// Nucleus sampling: keep the smallest set of tokens whose probability reaches P.
    #[arg(long, value_name = "P")]
    pub top_p: Option<f64>,
    /// Every row makes all its --gen-new-tokens: end-of-turn tokens count as ordinary tokens
    /// (what llama.cpp's batched benchmark does).
    #[arg(long)]
    pub ignore_end_of_turn: bool,
    /// The weights' precision while generating, as a generation step's `weights` setting
    /// (on the CPU the products still add in f32; the DPO measurement keeps f32).
    #[arg(long, value_enum, default_value = "f32")]
    pub gen_weights: GenWeights,
    /// How generation (and --only judge) computes a prompt's attention, as a run's
    /// `prompt_attention` setting: `fused` (a new run's default) is tsr's causal kernel (the
    /// prefill's attention on the CPU), `batched` gemm's products.
    #[arg(long, value_enum, default_value = "fused")]
    pub gen_attention: GenAttention,
    /// Peak dense TFLOP/s of the device for MFU (default on CUDA: 989, an H100 SXM's bf16
    /// dense peak; no default on CPU, where MFU is then not printed).
    #[arg(long)]
    pub peak_tflops: Option<f64>,
}

fn default_gguf() -> Option<PathBuf> {
    tsr_model::bench::cached_default_model().filter(|p| p.is_file())
}

pub fn run(a: BenchArgs) -> anyhow::Result<ExitCode> {
    if let Some(p) = a.top_p.filter(|p| !(*p > 0.0 && *p <= 1.0)) {
        bail!("--top-p {p}: must be above 0 and at most 1");
    }
    let device = parse_device(&a.device)?;
    let cuda = !device.is_cpu();
    let dtype = match a.dtype {
        BenchDtype::F32 => DType::F32,
        BenchDtype::Bf16 if cuda => DType::BF16,
        BenchDtype::Bf16 => {
            bail!("--dtype bf16 needs --device cuda:N (on CPU tsr computes in f32)")
        }
    };
    if a.gen_weights != GenWeights::F32 && dtype != DType::F32 {
        bail!("--gen-weights holds f32 weights in half precision; leave it out with --dtype bf16");
    }
    let dpo_batches = if !a.dpo_batch.is_empty() {
        a.dpo_batch.clone()
    } else if cuda {
        vec![8, 32]
    } else {
        vec![1]
    };
    if dpo_batches.contains(&0) || a.steps == 0 {
        bail!("--dpo-batch and --steps must be at least 1");
    }
    let gen_batch = a.gen_batch.unwrap_or(if cuda { 256 } else { 16 });
    let peak = a.peak_tflops.or(cuda.then_some(989.0));

    // On CPU, what the machine allows, so each result is also a share of its bound.
    let bounds = if device.is_cpu() {
        let b = measure_cpu_bounds()?;
        let products: Vec<String> = b
            .matmul
            .iter()
            .map(|(m, k, n, g)| format!("{m}x{k}x{n} {g:.1}"))
            .collect();
        let k = &b.decode_kernel;
        say!(
            "bounds ({} threads): f32 matmul GFLOP/s {} (peak {:.1}); memory read {:.1} GB/s, triad {:.1} GB/s; \
             generation's few-row kernel alone over a decode step's {:.0} MB of weights: 1 row {:.1} GB/s ({:.0}% of the read), 16 rows {:.1} GFLOP/s ({:.0}% of the peak)",
            tsr_model::cpu_threads(),
            products.join(", "),
            b.peak_gflops,
            b.read_gbs,
            b.triad_gbs,
            DECODE_KERNEL_BYTES as f64 / 1e6,
            k.one_row_gbs,
            100.0 * k.one_row_gbs / b.read_gbs,
            k.rows16_gflops,
            100.0 * k.rows16_gflops / b.peak_gflops
        );
        // The bounds' arrays (up to 768 MiB) are not the benchmark's own memory: hand them
        // back and start the peak RSS over, so the peak printed at the end is the work's.
        tsr_model::release_memory();
        reset_hwm();
        Some(b)
    } else {
        None
    };
    if a.only == Some(BenchWhat::Bounds) {
        return Ok(ExitCode::SUCCESS);
    }
    let t = std::time::Instant::now();
    let (policy, what) = match (&a.model, a.random, default_gguf()) {
        (Some(spec), _, _) => (
            LanguageModel::load(&ModelSource::parse(spec)?, &device, dtype)
                .with_context(|| format!("loading model {spec}"))?,
            spec.clone(),
        ),
        (None, false, Some(gguf)) => (
            LanguageModel::load(&ModelSource::Gguf(gguf.clone()), &device, dtype)
                .with_context(|| format!("loading model {}", gguf.display()))?,
            gguf.display().to_string(),
        ),
        (None, _, _) => (
            random_model(&smollm2_135m_config(), 1, &device, dtype)?,
            "random weights, SmolLM2-135M shape".to_string(),
        ),
    };
    let cfg = policy.config().clone();
    say!(
        "tsr bench: {what} ({:.1} M parameters, {:.1} M in matmuls), {} {:?}, loaded in {:.1} s; \
         threads {}",
        policy.num_parameters() as f64 / 1e6,
        matmul_params(&cfg) / 1e6,
        a.device,
        dtype,
        t.elapsed().as_secs_f64(),
        std::env::var("RAYON_NUM_THREADS").unwrap_or_else(|_| "?".into()),
    );
    let mfu = |flops_per_s: f64| match peak {
        Some(p) => format!(
            "MFU {:.2} % of {p} TFLOP/s",
            100.0 * flops_per_s / (p * 1e12)
        ),
        None => "MFU n/a (--peak-tflops)".into(),
    };

    if a.only == Some(BenchWhat::Judge) {
        policy.set_prompt_attention(match a.gen_attention {
            GenAttention::Batched => tsr_model::PromptAttention::Batched,
            GenAttention::Fused => tsr_model::PromptAttention::Fused,
        });
        let seqs = judge_prompts(&policy, gen_batch, a.gen_prompt_tokens)?;
        let s = bench_judge(&policy, &seqs)?;
        let tokens: usize = seqs.iter().map(|p| p.len()).sum();
        let (short, long) = (
            seqs.iter().map(|p| p.len()).min().unwrap_or(0),
            seqs.iter().map(|p| p.len()).max().unwrap_or(0),
        );
        let shared = seqs.iter().skip(1).fold(short, |n, p| {
            n.min(seqs[0].iter().zip(p).take_while(|(a, b)| a == b).count())
        });
        say!(
            "RESULT judge batch {gen_batch}: {:.1} prompt tok/s ({tokens} tokens in {s:.2} s: \
             the next-token logits of {gen_batch} judge prompts of {short}-{long} tokens, the \
             default rubric around a question and a response, their first {shared} tokens \
             alike, as a logprob judge computes its verdict's; prompt attention {:?})",
            tokens as f64 / s,
            a.gen_attention
        );
        if device.is_cpu() {
            say!("peak RSS {:.0} MB", vm_hwm_mb());
        }
        return Ok(ExitCode::SUCCESS);
    }

    if a.only != Some(BenchWhat::Generate) {
        let reference = policy.clone_weights()?;
        let (p, r) = (a.prompt_tokens, a.response_tokens);
        say!(
            "DPO: {p} prompt + {r} response tokens; reference forward + policy forward/backward + \
             clip + AdamW; {:.1} GFLOP per pair",
            dpo_flops_per_pair(&cfg, p, r) / 1e9
        );
        for &b in &dpo_batches {
            let mut faults = minor_faults();
            let res = bench_dpo(&policy, &reference, b, p, r, a.steps, |i, s, loss| {
                let tag = if i == 0 { " (warm-up)" } else { "" };
                let now = minor_faults();
                let fresh = match (faults, now) {
                    (Some(a), Some(b)) => {
                        format!(", {:.0} MB of fresh pages", (b - a) as f64 * 4096.0 / 1e6)
                    }
                    _ => String::new(),
                };
                faults = now;
                say!("  batch {b} step {i}{tag}: {s:.3} s, loss {loss:.6}{fresh}");
            })?;
            say!(
                "RESULT dpo batch {b}: {:.2} pairs/s (median step {:.3} s over {}; the policy's \
                 step alone, reference log-probs precomputed as workflows do: {:.3} s), \
                 {:.2} TFLOP/s, {}{}",
                res.pairs_per_s,
                res.median_s,
                res.step_s.len(),
                res.policy_median_s,
                res.flops_per_s / 1e12,
                mfu(res.flops_per_s),
                bounds
                    .as_ref()
                    .map(|x| format!(
                        "; {:.0}% of the measured matmul peak",
                        100.0 * res.flops_per_s / 1e9 / x.peak_gflops
                    ))
                    .unwrap_or_default()
            );
        }
    }

    if a.only != Some(BenchWhat::Dpo) {
        let half = match a.gen_weights {
            GenWeights::F32 => None,
            GenWeights::Bf16 => Some(DType::BF16),
            GenWeights::F16 => Some(DType::F16),
        };
        if let Some(d) = half {
            policy
                .to_half_base(d)
                .context("holding the weights in half precision")?;
        }
        policy.set_prompt_attention(match a.gen_attention {
            GenAttention::Batched => tsr_model::PromptAttention::Batched,
            GenAttention::Fused => tsr_model::PromptAttention::Fused,
        });
        // Bytes of weights a decode step reads: half for half-precision matrices.
        let weight_bytes = weight_bytes_f32(&cfg) * if half.is_some() { 0.5 } else { 1.0 };
        let sampling = Sampling::Sample {
            temperature: a.temperature,
            top_p: a.top_p,
            top_k: None,
        };
        if let Some(file) = &a.gen_prompts {
            bench_workload_both(&policy, file, gen_batch, &a, sampling)?;
            return Ok(ExitCode::SUCCESS);
        }
        let res = bench_generate(
            &policy,
            gen_batch,
            a.gen_prompt_tokens,
            a.gen_new_tokens,
            sampling,
            a.ignore_end_of_turn,
        )?;
        say!(
            "RESULT generate batch {gen_batch}: {:.1} new tok/s ({} tokens in {:.2} s, prefill \
             included; {} of {gen_batch} rows stopped early at end-of-turn; {}-token prompts, <= {} new, \
             temperature {}{}; weights {:?}; prompt attention {:?})",
            res.tokens_per_s,
            res.new_tokens,
            res.seconds,
            res.stopped_early,
            a.gen_prompt_tokens,
            a.gen_new_tokens,
            a.temperature,
            a.top_p.map(|p| format!(", top-p {p}")).unwrap_or_default(),
            a.gen_weights,
            a.gen_attention
        );
        if let Some(b) = &bounds {
            // A decode step reads every weight once and does 2 FLOP per weight per row: its
            // time is at least the larger of the two (prefill and attention left out).
            let read_s = weight_bytes / (b.read_gbs * 1e9);
            let seq = a.gen_prompt_tokens + a.gen_new_tokens / 2;
            let flop_s =
                gen_batch as f64 * forward_flops_per_token(&cfg, seq) / (b.peak_gflops * 1e9);
            let bound = gen_batch as f64 / read_s.max(flop_s);
            // The measured kernel's own rate, for the batches it was measured at, f32 weights of
            // the default model's shape: decode steps with nothing around their products (a
            // token reads every weight at batch 1, and costs 2 FLOP per weight at batch 16).
            let kernel = match (
                gen_batch,
                a.gen_weights,
                weight_bytes == DECODE_KERNEL_BYTES as f64,
            ) {
                (1, GenWeights::F32, true) => {
                    Some(b.decode_kernel.one_row_gbs * 1e9 / weight_bytes)
                }
                (16, GenWeights::F32, true) => {
                    Some(b.decode_kernel.rows16_gflops * 1e9 / (2.0 * weight_bytes / 4.0))
                }
                _ => None,
            };
            say!(
                "  bound at batch {gen_batch}: {bound:.0} tok/s ({} per step: {:.1} ms to read {:.0} MB of weights, {:.1} ms of matmul at the peak); {:.0}% of it{}",
                if read_s >= flop_s { "memory-bound" } else { "compute-bound" },
                read_s * 1e3,
                weight_bytes / 1e6,
                flop_s * 1e3,
                100.0 * res.tokens_per_s / bound,
                kernel
                    .map(|k| format!(
                        "; the few-row kernel alone decodes {k:.0} tok/s ({:.0}% of it reached, prefill included)",
                        100.0 * res.tokens_per_s / k
                    ))
                    .unwrap_or_default()
            );
        }
    }
    if device.is_cpu() {
        say!("peak RSS {:.0} MB", vm_hwm_mb());
    }
    Ok(ExitCode::SUCCESS)
}

/// `batch` judge prompts: the default rubric around a question and a response of their own, in
/// the chat template, as a judge step renders them. Each response is filler text, as many
/// words as keep the prompt within `tokens` tokens (none when the rubric alone is longer).
fn judge_prompts(
    policy: &LanguageModel,
    batch: usize,
    tokens: usize,
) -> anyhow::Result<Vec<Vec<u32>>> {
    use tsr_steps::rules::verdict::{render, DEFAULT_RUBRIC};
    const WORDS: [&str; 12] = [
        "river", "mountain", "village", "bridge", "lantern", "harvest", "market", "winter",
        "library", "garden", "harbour", "festival",
    ];
    let tok = policy.tokenizer();
    (0..batch)
        .map(|r| {
            let question = format!("Question {r}: how would you describe place number {r}?");
            let encode = |n: usize| {
                let response: Vec<&str> =
                    (0..n).map(|i| WORDS[(i + 5 * r) % WORDS.len()]).collect();
                tok.encode_prompt(&render(DEFAULT_RUBRIC, &question, &response.join(" ")))
                    .context("encoding a judge prompt")
            };
            // The most words whose prompt fits, by bisection (tokens grow with words).
            let (mut lo, mut hi) = (0, 4 * tokens + 1);
            if encode(0)?.len() > tokens {
                return encode(0);
            }
            while hi - lo > 1 {
                let mid = (lo + hi) / 2;
                if encode(mid)?.len() <= tokens {
                    lo = mid;
                } else {
                    hi = mid;
                }
            }
            encode(lo)
        })
        .collect()
}

/// `--gen-prompts`: one batch at a time against continuous batching, alternating.
fn bench_workload_both(
    policy: &LanguageModel,
    file: &std::path::Path,
    batch: usize,
    a: &BenchArgs,
    sampling: Sampling,
) -> anyhow::Result<()> {
    let bytes = std::fs::read(file).with_context(|| format!("reading {}", file.display()))?;
    let prompts = tsr_steps::prompts::parse_prompts(&bytes, &file.display().to_string())
        .context("--gen-prompts")?;
    if prompts.is_empty() || a.gen_samples == 0 || a.rounds == 0 {
        bail!("--gen-prompts needs at least one prompt, and --gen-samples and --rounds at least 1");
    }
    let ids = prompts
        .iter()
        .map(|p| policy.tokenizer().encode_prompt(&p.prompt))
        .collect::<Result<Vec<_>, _>>()
        .context("encoding the prompts")?;
    let n = ids.len() * a.gen_samples;
    say!(
        "generation workload: {} prompts x {} samples = {n} requests, batch {batch}, <= {} new tokens, temperature {}{}; weights {:?}",
        ids.len(),
        a.gen_samples,
        a.gen_new_tokens,
        a.temperature,
        a.top_p.map(|p| format!(", top-p {p}")).unwrap_or_default(),
        a.gen_weights
    );
    let mut times = [Vec::new(), Vec::new()];
    for round in 0..a.rounds {
        for (i, how) in [Batching::OneBatchAtATime, Batching::Continuous]
            .into_iter()
            .enumerate()
        {
            let r = bench_workload(
                policy,
                &ids,
                a.gen_samples,
                batch,
                a.gen_new_tokens,
                sampling.clone(),
                how,
            )?;
            say!(
                "  round {round}, {}: {:.1} new tok/s ({} tokens in {:.2} s; {} of {n} stopped at end-of-turn)",
                match how {
                    Batching::OneBatchAtATime => "one batch at a time",
                    Batching::Continuous => "continuous",
                },
                r.tokens_per_s,
                r.new_tokens,
                r.seconds,
                r.stopped_early
            );
            times[i].push(r.seconds);
        }
    }
    let (one, cont) = (median(times[0].clone()), median(times[1].clone()));
    say!(
        "RESULT generate workload: one batch at a time {one:.2} s, continuous {cont:.2} s (medians of {}): {:.2}x",
        a.rounds,
        one / cont
    );
    Ok(())
}

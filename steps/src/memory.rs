//! Peak-memory estimates of the steps, from a model's shape and the step's settings, without
//! loading anything: what `tsr plan` prints and what a run is checked against before it starts.
//!
//! The model of memory follows the code: weights are held once at the base precision (f32
//! unless `[model] dtype` says otherwise); loading reads one tensor at a time; compute is f32
//! (a half-precision matrix is cast where it is used, one at a time). Training
//! keeps every activation of the micro-batch for the backward pass, plus a gradient and
//! AdamW's two moments per trainable parameter (every weight, or only a LoRA adapter's). The
//! per-token activation constants were fitted to this project's forward pass (BENCHMARKS.md,
//! "Memory plan, LoRA in runs and half-precision bases"): the estimate is meant to be within
//! 25% of the measured peak resident memory.

use tsr_model::{Config, Proj};

/// Bytes in a mebibyte / gibibyte, for printing.
pub const MIB: f64 = 1024.0 * 1024.0;
pub const GIB: f64 = 1024.0 * MIB;

/// Memory a tsr process holds besides the model: code, tokenizer, store caches, allocator
/// slack.
pub const OVERHEAD: u64 = 160 << 20;

/// The dimensions that memory depends on.
#[derive(Clone, Debug, PartialEq)]
pub struct Shape {
    pub hidden: u64,
    pub intermediate: u64,
    pub layers: u64,
    pub heads: u64,
    pub kv_heads: u64,
    pub head_dim: u64,
    pub vocab: u64,
    /// Every parameter (a tied output head counted once).
    pub params: u64,
    /// `(in, out)` of the seven projections of one layer, in [`Proj::ALL`] order.
    pub projections: [(u64, u64); 7],
    /// Elements of the largest tensor (what a load reads at once besides the model).
    pub largest: u64,
}

impl Shape {
    pub fn of(c: &Config) -> Shape {
        let params = c
            .expected_tensors()
            .iter()
            .map(|(_, s)| s.iter().product::<usize>() as u64)
            .sum();
        let (h, f) = (c.hidden_size as u64, c.intermediate_size as u64);
        Shape {
            hidden: h,
            intermediate: f,
            layers: c.num_hidden_layers as u64,
            heads: c.num_attention_heads as u64,
            kv_heads: c.num_key_value_heads as u64,
            head_dim: c.head_dim as u64,
            vocab: c.vocab_size as u64,
            params,
            projections: Proj::ALL.map(|p| {
                let (i, o) = p.shape(c);
                (i as u64, o as u64)
            }),
            largest: (c.vocab_size as u64 * h).max(f * h),
        }
    }

    /// Parameters of a LoRA adapter of rank `r` on `targets`.
    pub fn lora_params(&self, r: u64, targets: &[String]) -> u64 {
        Proj::ALL
            .iter()
            .zip(self.projections)
            .filter(|(p, _)| targets.iter().any(|t| t == p.name()))
            .map(|(_, (i, o))| r * (i + o))
            .sum::<u64>()
            * self.layers
    }
}

/// A LoRA adapter's rank and targets.
#[derive(Clone, Debug)]
pub struct LoraShape {
    pub r: u64,
    pub targets: Vec<String>,
    /// Trains with dropout on the adapters' inputs (each keeps its mask and dropped input).
    pub dropout: bool,
}

/// One step's estimate, in bytes, by what holds the memory.
#[derive(Clone, Debug, Default, PartialEq, serde::Serialize)]
pub struct Estimate {
    /// Model weights at their precision.
    pub weights: u64,
    /// The read buffer while the weights load (one tensor at a time).
    pub load: u64,
    /// Trainable parameters beyond the weights (a LoRA adapter).
    pub adapter: u64,
    /// Gradients of the trainable parameters.
    pub gradients: u64,
    /// AdamW's first and second moments.
    pub optimizer: u64,
    /// Activations (kept for the backward pass when training) and logits.
    pub activations: u64,
    /// Keys and values of the sequences being generated.
    pub kv_cache: u64,
    /// The process besides the model.
    pub overhead: u64,
}

impl Estimate {
    /// The peak: the larger of loading and working.
    pub fn peak(&self) -> u64 {
        self.overhead
            + self.weights
            + self.load.max(
                self.adapter + self.gradients + self.optimizer + self.activations + self.kv_cache,
            )
    }
}

/// f32 bytes.
const F: u64 = 4;

/// A half-precision weight is cast to f32 where it is used: one at a time, the largest being
/// the embedding / output head.
fn cast_buffer(s: &Shape, weight_bytes: u64) -> u64 {
    if weight_bytes < F {
        s.largest * F
    } else {
        0
    }
}

/// Inference activations live at the forward's widest point: one layer's tensors for the
/// batch (the residual stream, the MLP's wide tensor, the attention probabilities), freed layer
/// by layer.
fn forward_activations(s: &Shape, batch: u64, tokens: u64, context: u64) -> u64 {
    let per_token = 2 * s.hidden + s.intermediate + s.heads * context;
    batch * tokens * per_token * F
}

/// Generation of `new_tokens` after prompts of `prompt_tokens`, `batch` sequences at a time.
/// `refill`: the model is handed more requests than `batch` at once (continuous batching), so
/// its cache holds the longest prompt plus twice the budget (a row may join when the others are
/// half done, see `tsr_model`'s generation), and the rows that join are prefilled in a cache of
/// their own before they are copied in.
pub fn generation(
    s: &Shape,
    weight_bytes: u64,
    batch: u64,
    prompt_tokens: u64,
    new_tokens: u64,
    refill: bool,
) -> Estimate {
    let context = if refill {
        prompt_tokens + 2 * new_tokens
    } else {
        prompt_tokens + new_tokens
    };
    let joining = if refill { prompt_tokens } else { 0 };
    Estimate {
        weights: s.params * weight_bytes,
        load: s.largest * weight_bytes,
        kv_cache: 2 * s.layers * batch * (context + joining) * s.kv_heads * s.head_dim * F,
        // The prompt's forward, and per new token the logits and the sampler's sorted copy.
        activations: forward_activations(s, batch, prompt_tokens, prompt_tokens)
            + 3 * batch * s.vocab * F
            + cast_buffer(s, weight_bytes),
        overhead: OVERHEAD,
        ..Default::default()
    }
}

/// A forward pass scoring `batch` sequences of `tokens` (reference log-probs, judge
/// probabilities, metrics): activations and the logits of the scored positions.
pub fn scoring(s: &Shape, weight_bytes: u64, batch: u64, tokens: u64) -> Estimate {
    Estimate {
        weights: s.params * weight_bytes,
        load: s.largest * weight_bytes,
        activations: forward_activations(s, batch, tokens, tokens)
            + 3 * (batch * tokens).min(128) * s.vocab * F
            + cast_buffer(s, weight_bytes),
        overhead: OVERHEAD,
        ..Default::default()
    }
}

/// DPO on `micro_batch` pairs at a time whose longest sequence (prompt + response) has
/// `tokens` tokens, `response_tokens` of them scored: every weight trains, or only `lora`.
pub fn training(
    s: &Shape,
    weight_bytes: u64,
    lora: Option<&LoraShape>,
    micro_batch: u64,
    tokens: u64,
    response_tokens: u64,
) -> Estimate {
    let trainable = match lora {
        Some(l) => s.lora_params(l.r, &l.targets),
        None => s.params,
    };
    // Chosen and rejected of each pair; every layer's intermediate tensors stay alive for the
    // backward pass (the differentiable norm, rope and softmax keep several each), then the
    // backward pass holds one layer's gradients of them at a time.
    let seqs = 2 * micro_batch;
    // An adapted projection also keeps its update and the sum (two tensors of its output).
    let lora_extra: u64 = match lora {
        Some(l) => Proj::ALL
            .iter()
            .zip(s.projections)
            .filter(|(p, _)| l.targets.iter().any(|t| t == p.name()))
            .map(|(_, (inp, out))| 2 * out + if l.dropout { 2 * inp } else { 0 })
            .sum(),
        None => 0,
    };
    let per_token_layer = 40 * s.hidden + 12 * s.intermediate + 6 * s.heads * tokens + lora_extra;
    let kept = seqs * tokens * s.layers * per_token_layer * F;
    let logits = 4 * seqs * response_tokens * s.vocab * F;
    Estimate {
        weights: s.params * weight_bytes,
        load: s.largest * weight_bytes,
        adapter: if lora.is_some() { trainable * F } else { 0 },
        // The accumulated gradient and the one backward pass returns.
        gradients: 2 * trainable * F,
        optimizer: 2 * trainable * F,
        activations: kept + logits + cast_buffer(s, weight_bytes),
        overhead: OVERHEAD,
        ..Default::default()
    }
}

/// Importing a model and writing it in the store's form. A GGUF file is read whole and
/// dequantised to f32. A Hugging Face folder is read a tensor at a time: into f32, or with a
/// half-precision base (`half`) at the precision it is stored in.
pub fn import(s: &Shape, source_bytes: u64, gguf: bool, half: bool) -> Estimate {
    let (weights, load) = if gguf {
        (s.params * F, source_bytes)
    } else {
        let stored = (source_bytes / s.params.max(1)).clamp(2, F);
        let held = if half { stored } else { F };
        (s.params * held, s.largest * stored)
    };
    Estimate {
        weights,
        load,
        overhead: OVERHEAD,
        ..Default::default()
    }
}

/// Steps that hold no model (prompts, selection).
pub fn small() -> Estimate {
    Estimate {
        overhead: OVERHEAD,
        ..Default::default()
    }
}

/// Tokens in `text` at most, as the plan counts them: a token per 3 bytes (English text
/// averages about 4 with Llama-style vocabularies), plus the chat template's markers.
pub fn tokens_of(text_bytes: usize) -> u64 {
    (text_bytes as u64).div_ceil(3) + 16
}

/// Caps the memory a run plans for (`20GB`): on a machine other work shares, or to check a
/// plan against a smaller machine.
pub const LIMIT_ENV: &str = "TSR_MEMORY_LIMIT";

/// What memory is there for a plan: `(bytes, where the number comes from)`: what the device
/// has free, or [`LIMIT_ENV`] when that is smaller.
pub fn available(device: &str) -> Result<(u64, String), String> {
    let found = device_available(device);
    match std::env::var(LIMIT_ENV) {
        Ok(v) => {
            let limit = parse_size(&v).map_err(|e| format!("{LIMIT_ENV}: {e}"))?;
            match found {
                Ok((a, from)) if a <= limit => Ok((a, from)),
                _ => Ok((limit, LIMIT_ENV.to_string())),
            }
        }
        Err(_) => found,
    }
}

fn device_available(device: &str) -> Result<(u64, String), String> {
    if device == "cpu" {
        return cpu_available();
    }
    let index = match device.strip_prefix("cuda") {
        Some("") => 0,
        Some(rest) => rest
            .strip_prefix(':')
            .and_then(|n| n.parse::<usize>().ok())
            .ok_or_else(|| format!("device `{device}`: use cpu, cuda or cuda:N"))?,
        None => return Err(format!("device `{device}`: use cpu, cuda or cuda:N")),
    };
    // CUDA numbers the devices CUDA_VISIBLE_DEVICES lists; nvidia-smi numbers them all.
    let id = match std::env::var("CUDA_VISIBLE_DEVICES") {
        Ok(list) if !list.trim().is_empty() => list
            .split(',')
            .nth(index)
            .map(|s| s.trim().to_string())
            .ok_or_else(|| {
                format!("device `{device}`: CUDA_VISIBLE_DEVICES={list} lists no device {index}")
            })?,
        _ => index.to_string(),
    };
    let out = std::process::Command::new("nvidia-smi")
        .args([
            "--query-gpu=memory.free",
            "--format=csv,noheader,nounits",
            &format!("--id={id}"),
        ])
        .output()
        .map_err(|e| {
            format!("cannot read the free memory of {device} (nvidia-smi: {e}); give the device's memory with --memory, e.g. --memory 80GB")
        })?;
    let text = String::from_utf8_lossy(&out.stdout);
    let mib: u64 = text.trim().parse().map_err(|_| {
        format!(
            "cannot read the free memory of {device} (nvidia-smi said {:?}); give it with --memory, e.g. --memory 80GB",
            text.trim()
        )
    })?;
    Ok((mib << 20, format!("free memory of {device} (nvidia-smi)")))
}

/// The smaller of MemAvailable and what the cgroup still allows.
fn cpu_available() -> Result<(u64, String), String> {
    let meminfo = std::fs::read_to_string("/proc/meminfo")
        .map_err(|e| format!("cannot read /proc/meminfo ({e}); give the memory with --memory"))?;
    let avail = meminfo
        .lines()
        .find_map(|l| l.strip_prefix("MemAvailable:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map(|kb| kb * 1024)
        .ok_or("/proc/meminfo has no MemAvailable line; give the memory with --memory")?;
    let mut best = (avail, "MemAvailable".to_string());
    if let Some(limit) = cgroup_room() {
        if limit < best.0 {
            best = (limit, "the cgroup's memory limit less its usage".into());
        }
    }
    Ok(best)
}

/// cgroup v2 (`memory.max` - `memory.current`) or v1 (`limit_in_bytes` - `usage_in_bytes`) of
/// this process, when limited.
fn cgroup_room() -> Option<u64> {
    let read = |p: &str| std::fs::read_to_string(p).ok();
    let num = |s: Option<String>| s.and_then(|s| s.trim().parse::<u64>().ok());
    let cg = read("/proc/self/cgroup")?;
    for line in cg.lines() {
        let mut parts = line.splitn(3, ':');
        let (_, controllers, path) = (parts.next()?, parts.next()?, parts.next()?);
        if controllers.is_empty() {
            let dir = format!("/sys/fs/cgroup{path}");
            let max = num(read(&format!("{dir}/memory.max")))
                .or_else(|| num(read("/sys/fs/cgroup/memory.max")));
            let cur = num(read(&format!("{dir}/memory.current")))
                .or_else(|| num(read("/sys/fs/cgroup/memory.current")))
                .unwrap_or(0);
            if let Some(m) = max {
                return Some(m.saturating_sub(cur));
            }
        } else if controllers.split(',').any(|c| c == "memory") {
            let dir = format!("/sys/fs/cgroup/memory{path}");
            let max = num(read(&format!("{dir}/memory.limit_in_bytes")))
                .or_else(|| num(read("/sys/fs/cgroup/memory/memory.limit_in_bytes")))?;
            if max >= 1 << 60 {
                return None; // unlimited
            }
            let cur = num(read(&format!("{dir}/memory.usage_in_bytes")))
                .or_else(|| num(read("/sys/fs/cgroup/memory/memory.usage_in_bytes")))
                .unwrap_or(0);
            return Some(max.saturating_sub(cur));
        }
    }
    None
}

/// `80GB`, `24GiB`, `512MB`, `1.5TB` (GB and GiB both mean 2^30 here, as memory is sold).
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: f64 = num
        .parse()
        .map_err(|_| format!("`{s}`: give a size such as 80GB or 512MB"))?;
    let mult = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1.0,
        "k" | "kb" | "kib" => 1024.0,
        "m" | "mb" | "mib" => MIB,
        "g" | "gb" | "gib" => GIB,
        "t" | "tb" | "tib" => GIB * 1024.0,
        other => return Err(format!("`{s}`: unknown unit `{other}` (use MB, GB or TB)")),
    };
    if !(n > 0.0 && n.is_finite()) {
        return Err(format!("`{s}`: the size must be positive"));
    }
    Ok((n * mult) as u64)
}

/// `12.3 GB` (binary gigabytes, as memory is sold and as `free -g` counts).
pub fn human(bytes: u64) -> String {
    let b = bytes as f64;
    if b >= GIB {
        format!("{:.1} GB", b / GIB)
    } else {
        format!("{:.0} MB", b / MIB)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn smollm2_1_7b() -> Shape {
        Shape::of(&tsr_model::testing::smollm2_1_7b_config())
    }

    #[test]
    fn parameter_counts_match_the_published_models() {
        let s = smollm2_1_7b();
        assert!(
            (1.70e9..1.72e9).contains(&(s.params as f64)),
            "{}",
            s.params
        );
        let l = Shape::of(&tsr_model::testing::llama31_8b_config());
        assert!(
            (8.02e9..8.04e9).contains(&(l.params as f64)),
            "{}",
            l.params
        );
        // r (in + out) per projection, as PEFT counts: 18,087,936 for r = 16 on all seven.
        let all: Vec<String> = Proj::ALL.iter().map(|p| p.name().to_string()).collect();
        assert_eq!(s.lora_params(16, &all), 18_087_936);
    }

    #[test]
    fn full_training_needs_twenty_bytes_a_parameter_and_lora_far_less() {
        let s = smollm2_1_7b();
        let full = training(&s, 4, None, 1, 64, 32);
        // Weights, AdamW's two moments and the accumulated gradient (16 bytes), plus the
        // gradient a backward pass returns before it is accumulated.
        assert_eq!(
            full.weights + full.gradients + full.optimizer,
            20 * s.params
        );
        let l = LoraShape {
            r: 16,
            targets: vec!["q_proj".into(), "v_proj".into()],
            dropout: false,
        };
        let lora = training(&s, 2, Some(&l), 1, 64, 32);
        assert!(lora.peak() * 3 < full.peak(), "{lora:?} vs {full:?}");
        assert_eq!(lora.weights, 2 * s.params);
    }

    #[test]
    fn a_refilled_generation_holds_twice_the_budget_and_the_joining_prompts() {
        let s = smollm2_1_7b();
        let one = generation(&s, 4, 16, 500, 256, false);
        let refill = generation(&s, 4, 16, 500, 256, true);
        // 500 + 256 slots a row, against 500 + 2 x 256 and the 500 of the rows that join.
        assert_eq!(
            one.kv_cache * (500 + 512 + 500),
            refill.kv_cache * (500 + 256)
        );
        assert_eq!(one.activations, refill.activations);
        assert!(refill.peak() > one.peak());
    }

    #[test]
    fn sizes_parse_and_print() {
        assert_eq!(parse_size("80GB").unwrap(), 80 << 30);
        assert_eq!(parse_size("512 MiB").unwrap(), 512 << 20);
        assert_eq!(parse_size("1.5g").unwrap(), 3 << 29);
        assert!(parse_size("80 parsecs").unwrap_err().contains("parsecs"));
        assert!(parse_size("-3GB").is_err());
        assert_eq!(human(3 << 29), "1.5 GB");
        assert_eq!(human(300 << 20), "300 MB");
        assert!(available("tpu").unwrap_err().contains("tpu"));
        let (cpu, why) = available("cpu").unwrap();
        assert!(cpu > 0 && !why.is_empty());
    }
}

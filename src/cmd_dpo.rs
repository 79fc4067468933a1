//! `tsr dpo`: DPO-train a model on a JSONL file of preference pairs, outside any workflow, with
//! the same trainer as the workflow's `dpo` step (`tsr_dpo::trainer`). Each optimizer
//! step takes `--batch-size` pairs (default: all of them, i.e. full-batch steps); reference
//! log-probs come from `--ref`, or from the policy's own starting weights, computed with the
//! training code path so that the first step's loss is exactly ln 2.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{bail, Context};
use clap::Args;
use serde_json::json;
use tsr_dpo::trainer::{
    encode_text_pairs, parse_pairs_jsonl, reference_logps, DpoTrainer, StepReport, TrainerConfig,
};
use tsr_dpo::{AdamWConfig, DpoLossConfig, DpoLossKind, LrSchedule, StepMetrics};
use tsr_model::{tune_runtime, LanguageModel};

#[derive(Args, Debug)]
pub struct DpoArgs {
    /// Policy to train: Hugging Face directory, .gguf file, or Org/Name in the local HF cache.
    #[arg(long)]
    pub model: String,
    /// Frozen reference model (default: the policy's starting weights).
    #[arg(long = "ref")]
    pub reference: Option<String>,
    /// JSONL file, one {"prompt", "chosen", "rejected"} object per line.
    #[arg(long)]
    pub pairs: PathBuf,
    #[arg(long, default_value_t = 0.1)]
    pub beta: f64,
    #[arg(long, default_value_t = 5e-7)]
    pub lr: f64,
    /// Optimizer steps.
    #[arg(long, default_value_t = 1)]
    pub steps: u64,
    /// Pairs per optimizer step (default: all pairs).
    #[arg(long)]
    pub batch_size: Option<usize>,
    /// Pairs per forward/backward pass (gradients accumulate up to --batch-size).
    #[arg(long, default_value_t = 1)]
    pub micro_batch: usize,
    /// Global gradient-norm clip; 0 disables clipping.
    #[arg(long, default_value_t = 1.0)]
    pub max_grad_norm: f64,
    #[arg(long, default_value_t = 0.0)]
    pub weight_decay: f64,
    #[arg(long, default_value_t = 0)]
    pub warmup_steps: u64,
    /// `sigmoid` (DPO) or `ipo`.
    #[arg(long, default_value = "sigmoid")]
    pub loss: String,
    /// Shuffle the pairs each epoch with this seed (default: file order).
    #[arg(long)]
    pub shuffle_seed: Option<u64>,
    /// Train a new LoRA adapter over the frozen model instead of every weight:
    /// `r=16,alpha=32[,dropout=0.05][,targets=q_proj+k_proj+...]` (alpha defaults to 2r, targets to every
    /// projection). A is initialised as PEFT does (Kaiming-uniform, seeded by --seed), B to zero.
    #[arg(long, conflicts_with = "adapter")]
    pub lora: Option<tsr_model::adapter::LoraSpec>,
    /// Train this PEFT LoRA adapter folder further (the reference is the model with the
    /// adapter as loaded, so the first loss is ln 2).
    #[arg(long)]
    pub adapter: Option<PathBuf>,
    /// Seed of a new adapter's initialisation (--lora).
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Save the trained model here: a Hugging Face folder, or with --lora / --adapter the
    /// adapter as a PEFT folder (adapter_config.json, adapter_model.safetensors).
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Replace --out when it already holds an adapter folder (--lora / --adapter).
    #[arg(long)]
    pub force: bool,
    /// "cpu" or "cuda:N".
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// Hold the frozen base's weight matrices in bf16 or f16 (with --lora or --adapter: half
    /// the memory; adapters, gradients and optimizer state stay f32).
    #[arg(long)]
    pub base_dtype: Option<String>,
    /// Print one JSON object: first-step loss, gradient norm and per-pair log-probs, per-step
    /// metrics, and the mean loss after the last step.
    #[arg(long)]
    pub json: bool,
}

fn metrics_json(m: &StepMetrics) -> serde_json::Value {
    let d = m.dpo.unwrap_or_default();
    json!({
        "step": m.step, "lr": m.lr, "loss": m.loss, "grad_norm": m.grad_norm, "clipped": m.clipped,
        "pairs": m.pairs, "reward_chosen": d.reward_chosen, "reward_rejected": d.reward_rejected,
        "margin": d.margin, "accuracy": d.accuracy,
    })
}

fn config(a: &DpoArgs, n_pairs: usize) -> anyhow::Result<TrainerConfig> {
    if a.steps == 0 {
        bail!("--steps must be at least 1");
    }
    let kind = match a.loss.as_str() {
        "sigmoid" => DpoLossKind::Sigmoid,
        "ipo" => DpoLossKind::Ipo,
        other => bail!("--loss must be `sigmoid` or `ipo`, not `{other}`"),
    };
    let batch = a.batch_size.unwrap_or(n_pairs).clamp(1, n_pairs);
    let micro = a.micro_batch.clamp(1, batch);
    let accum = batch.div_ceil(micro);
    let steps_per_epoch = n_pairs.div_ceil(micro * accum) as u64;
    Ok(TrainerConfig {
        loss: DpoLossConfig {
            beta: a.beta,
            kind,
            length_normalize: false,
        },
        schedule: LrSchedule {
            warmup_steps: a.warmup_steps,
            ..LrSchedule::constant(a.lr)
        },
        optimizer: AdamWConfig {
            weight_decay: a.weight_decay,
            ..AdamWConfig::default()
        },
        epochs: a.steps.div_ceil(steps_per_epoch),
        max_steps: Some(a.steps),
        micro_batch: micro,
        accum_steps: accum,
        max_grad_norm: (a.max_grad_norm > 0.0).then_some(a.max_grad_norm),
        seed: a.shuffle_seed.unwrap_or(0),
        shuffle: a.shuffle_seed.is_some(),
    })
}

pub fn run(a: DpoArgs) -> anyhow::Result<ExitCode> {
    tune_runtime();
    let text = std::fs::read_to_string(&a.pairs)
        .with_context(|| format!("reading {}", a.pairs.display()))?;
    let texts = parse_pairs_jsonl(&text)
        .with_context(|| format!("reading pairs from {}", a.pairs.display()))?;
    let cfg = config(&a, texts.len())?;
    if let Some(dir) = &a.out {
        // Refused before training, not after it.
        let occupied = std::fs::read_dir(dir).is_ok_and(|mut d| d.next().is_some());
        if (a.lora.is_some() || a.adapter.is_some()) && occupied && !a.force {
            bail!(
                "{} already holds files; choose an empty or new folder, or pass --force to replace an adapter folder",
                dir.display()
            );
        }
    }
    if a.base_dtype.as_deref().is_some_and(|d| d != "f32")
        && a.lora.is_none()
        && a.adapter.is_none()
    {
        bail!("--base-dtype holds the base frozen in half precision: train an adapter with --lora or --adapter");
    }
    let model = crate::cmd_model::load_model(&a.model, &a.device, a.base_dtype.as_deref())?;
    let model = match (&a.lora, &a.adapter) {
        (Some(spec), _) => model.with_new_lora(spec, a.seed)?,
        (None, Some(dir)) => {
            let adapter = tsr_model::LoraAdapter::load(dir, model.device())?;
            model.with_trainable_adapter(&adapter)?
        }
        (None, None) => model,
    };
    let mut pairs = encode_text_pairs(&model, &texts).context("tokenizing the pairs")?;
    match &a.reference {
        Some(spec) => {
            let reference = LanguageModel::load_str(spec, &a.device)
                .with_context(|| format!("loading reference model {spec}"))?;
            reference_logps(&reference, &mut pairs, cfg.micro_batch)
                .context("reference log-probs")?;
        }
        None => {
            DpoTrainer::self_reference(&model, &mut pairs, &cfg).context("reference log-probs")?
        }
    }
    let mut trainer = DpoTrainer::new(&model, pairs, cfg)?;
    let total = trainer.total_steps();
    let mut first: Option<StepReport> = None;
    while !trainer.is_done() {
        let r = trainer
            .step()
            .with_context(|| format!("optimizer step {}", trainer.steps_done() + 1))?;
        if !a.json {
            let d = r.metrics.dpo.unwrap_or_default();
            eprintln!(
                "step {}/{total}: loss {:.6} reward chosen {:.4} rejected {:.4} margin {:.4} acc {:.2} grad norm {:.4} lr {:.3e}",
                r.metrics.step, r.metrics.loss, d.reward_chosen, d.reward_rejected, d.margin, d.accuracy,
                r.metrics.grad_norm, r.metrics.lr
            );
        }
        first.get_or_insert(r);
    }
    let final_loss = trainer.mean_loss().context("loss after the last step")?;
    let digest = match &a.out {
        // A half-precision base: the digest of the merged model would need an f32 copy of
        // it; the trained adapter's bytes identify the result with the base.
        out if model.lora().is_some() && model.base_dtype() != model.dtype() => {
            if let Some(dir) = out {
                model
                    .save_peft_adapter(dir, a.force)
                    .with_context(|| format!("saving the adapter to {}", dir.display()))?;
            }
            let mut h = blake3::Hasher::new();
            model.write_trainable(&mut h)?;
            h.finalize().to_hex().to_string()
        }
        Some(dir) if model.lora().is_some() => {
            model
                .save_peft_adapter(dir, a.force)
                .with_context(|| format!("saving the adapter to {}", dir.display()))?;
            model.digest()?
        }
        Some(dir) => model
            .save_hf_with_digest(dir)
            .with_context(|| format!("saving the model to {}", dir.display()))?,
        None => model.digest()?,
    };
    if a.json {
        let first = first.expect("at least one step");
        let pairs: Vec<_> = first
            .pairs
            .iter()
            .map(|p| {
                let t = &trainer.pairs()[p.index];
                json!({"index": p.index, "chosen": p.chosen, "rejected": p.rejected,
                       "ref_chosen": t.ref_chosen, "ref_rejected": t.ref_rejected})
            })
            .collect();
        let out = json!({
            "pairs": trainer.pairs().len(),
            "steps": trainer.steps_done(),
            "first_step": {
                "loss_before": first.metrics.loss,
                "grad_norm": first.metrics.grad_norm,
                "pairs": pairs,
            },
            "final_loss": final_loss,
            "metrics": trainer.metrics().iter().map(metrics_json).collect::<Vec<_>>(),
            "digest": digest,
            "out": a.out.as_ref().map(|p| p.display().to_string()),
        });
        say!("{}", serde_json::to_string_pretty(&out)?);
    } else {
        say!(
            "{} steps on {} pairs: loss {final_loss:.6} after the last step; model {digest}",
            trainer.steps_done(),
            trainer.pairs().len()
        );
        if let Some(dir) = &a.out {
            say!("saved to {}", dir.display());
        }
    }
    Ok(ExitCode::SUCCESS)
}

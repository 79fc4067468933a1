//! Digests of what DPO training produces on the real model, to compare two builds bit for bit
//! (a kernel change that claims the same bits):
//!
//! ```text
//! cargo run --release -p tsr-steps --example dpo_digest -- [MODEL]
//! ```
//! MODEL defaults to `$TSR_MODEL`, else the GGUF that `scripts/fetch-model.sh` caches. For full
//! training and for a LoRA adapter (r 16, dropout 0.1), at two lengths, it trains 3 optimizer
//! steps of 4 pairs in 2 micro-batches, clipped at 1.0 (so accumulation, the per-pair scaling
//! and clipping all run), and prints each step's loss and gradient norm as exact bits, then the
//! blake3 of the trained weights and of the trainer state (optimizer moments, cursor).
//! Two builds agree when every printed line does.

use tsr_dpo::bench::bench_trainer_config;
use tsr_dpo::trainer::{reference_logps, DpoTrainer, TrainPair};
use tsr_model::bench::{bench_model_spec, text_tokens};
use tsr_model::{tune_runtime, LanguageModel, ModelError};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    tune_runtime();
    let args: Vec<String> = std::env::args().skip(1).collect();
    let spec = bench_model_spec(args.first());
    let base = LanguageModel::load_str(&spec, "cpu")?;
    let texts = [
        "Why is the sky blue? Explain it to a child in two sentences.",
        "Write a short poem about the sea, the wind and a lighthouse at night.",
        "List three ways to save energy at home and say why each one works.",
        "What is the capital of France, and what river runs through it?",
    ];
    let answers = [
        "Sunlight is scattered by the air, and blue light is scattered the most.",
        "I do not know. Maybe the sky is blue because the sea reflects it.",
    ];
    for lora in [None, Some("r=16,alpha=32,dropout=0.1")] {
        for (p, r) in [(40usize, 24usize), (128, 128)] {
            let policy = match lora {
                Some(spec) => base.clone_weights()?.with_new_lora(&spec.parse()?, 7)?,
                None => base.clone_weights()?,
            };
            let mut pairs = texts
                .iter()
                .enumerate()
                .map(|(i, t)| {
                    Ok(TrainPair {
                        prompt: text_tokens(&base, t, p)?,
                        chosen: text_tokens(&base, answers[i % 2], r)?,
                        rejected: text_tokens(&base, answers[(i + 1) % 2], r - i)?,
                        ref_chosen: 0.0,
                        ref_rejected: 0.0,
                    })
                })
                .collect::<Result<Vec<TrainPair>, ModelError>>()?;
            reference_logps(&base, &mut pairs, 2)?;
            let mut cfg = bench_trainer_config(3, 2);
            cfg.accum_steps = 2;
            let mut t = DpoTrainer::new(&policy, pairs, cfg)?;
            let what = format!("{} {p}+{r}", lora.map_or("full", |_| "lora"));
            while !t.is_done() {
                let m = t.step()?.metrics;
                println!(
                    "{what} step {}: loss {:016x} grad norm {:016x} clipped {}",
                    m.step,
                    m.loss.to_bits(),
                    m.grad_norm.to_bits(),
                    m.clipped
                );
            }
            let (mut w, mut s) = (Vec::new(), Vec::new());
            t.write_weights(&mut w)?;
            t.write_state(&mut s)?;
            println!(
                "{what}: weights {} state {}",
                blake3::hash(&w),
                blake3::hash(&s)
            );
        }
    }
    Ok(())
}

//! DPO step speed, peak memory and checkpoint time on the real model:
//!
//! ```text
//! cargo run --release -p tsr-steps --example bench_dpo -- [MODEL] [STEPS] [LORA]
//! ```
//! MODEL defaults to `$TSR_MODEL`, else the GGUF that `scripts/fetch-model.sh` caches; STEPS
//! (default 5) optimizer steps per length, the first one (warm-up) excluded from the median;
//! LORA (e.g. `r=16,alpha=32`) trains a new LoRA adapter over the frozen model instead of
//! every weight (as `tsr dpo --lora`). The RESULT line also gives the median step without the
//! reference forward (workflows precompute reference log-probs in their own step).
//!
//! One step = the frozen reference model's forward on the pair (inference path) + the
//! policy's forward and backward on chosen and rejected + clipping + the AdamW update, on one
//! pair of `P` prompt + `R` response tokens, f32 on CPU. Peak memory is the process's VmHWM,
//! reset (`/proc/self/clear_refs`) after loading so that each length reports its own peak.
//! The checkpoint is what the `dpo` step writes: weights (safetensors) + trainer state
//! (optimizer moments, cursor) streamed into the blob store, durable (fsynced and installed)
//! when timed. `bench_checkpoint` times checkpoints alone, in a fresh process.

use std::time::Instant;

use tsr_dpo::bench::bench_trainer_config;
use tsr_dpo::trainer::{reference_logps, DpoTrainer, TrainPair, TrainerError};
use tsr_model::bench::{
    bench_model_spec, cpu_s, median, reset_hwm, text_tokens, thread_cpu_s, vm_hwm_mb,
};
use tsr_model::{tune_runtime, LanguageModel};
use tsr_state::BlobStore;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let tuned = tune_runtime();
    let args: Vec<String> = std::env::args().skip(1).collect();
    let spec = bench_model_spec(args.first());
    let steps: usize = args.get(1).map(|s| s.parse()).transpose()?.unwrap_or(5);
    println!(
        "mallopt tuned: {tuned}; threads: {}",
        tsr_model::cpu_threads()
    );
    let t = Instant::now();
    let policy = LanguageModel::load_str(&spec, "cpu")?;
    let reference = policy.clone_weights()?;
    let policy = match args.get(2) {
        Some(lora) => {
            let lora: tsr_model::adapter::LoraSpec = lora.parse()?;
            println!("training a LoRA adapter: {lora:?}");
            policy.with_new_lora(&lora, 0)?
        }
        None => policy,
    };
    println!(
        "load {spec}: {:.2} s, {} parameters, peak so far {:.0} MB",
        t.elapsed().as_secs_f64(),
        policy.num_parameters(),
        vm_hwm_mb()
    );
    let text = "The quick brown fox jumps over the lazy dog while the students read their books \
                and write long answers about the history of science, art and music.";
    let answer_a = "Sunlight is scattered by the air, and blue light is scattered the most, so the sky looks blue.";
    let answer_b =
        "I do not know. Maybe the sky is blue because the sea is blue and it reflects it.";
    let cfg = bench_trainer_config(steps as u64, 1);
    let ckdir = std::env::temp_dir().join(format!("tsr-bench-dpo-{}", std::process::id()));
    let blobs = BlobStore::open(ckdir.join("blobs"), ckdir.join("tmp"))?;
    for (p, r) in [(64usize, 64usize), (128, 128)] {
        let mut pair = TrainPair {
            prompt: text_tokens(&policy, text, p)?,
            chosen: text_tokens(&policy, answer_a, r)?,
            rejected: text_tokens(&policy, answer_b, r)?,
            ref_chosen: 0.0,
            ref_rejected: 0.0,
        };
        reset_hwm();
        // The trainer's reference fields are fixed at construction; the reference forward is
        // still run (and timed) every step, as a trainer without precomputed log-probs would.
        reference_logps(&reference, std::slice::from_mut(&mut pair), 1)?;
        let mut t = DpoTrainer::new(&policy, vec![pair.clone()], cfg.clone())?;
        let mut times = Vec::new();
        let mut policy_times = Vec::new();
        let mut own_times = Vec::new();
        for i in 0..steps {
            let s = Instant::now();
            let cpu0 = cpu_s();
            let faults0 = tsr_model::bench::minor_faults();
            let mut fresh = pair.clone();
            reference_logps(&reference, std::slice::from_mut(&mut fresh), 1)?;
            let ref_s = s.elapsed().as_secs_f64();
            let own_ref = thread_cpu_s();
            let m = t.step()?.metrics;
            let total = s.elapsed().as_secs_f64();
            let own = thread_cpu_s() - own_ref;
            let cpu = cpu_s() - cpu0;
            let fresh_mb = match (faults0, tsr_model::bench::minor_faults()) {
                (Some(a), Some(b)) => format!("{:.0} MB", (b - a) as f64 * 4096.0 / 1e6),
                _ => "unknown".into(),
            };
            println!(
                "{p}+{r} step {i}: {total:.2} s (reference {ref_s:.2} s, policy fwd/bwd + AdamW {:.2} s, \
                 of which the calling thread alone {own:.2} s; {:.2} cores busy; fresh pages {fresh_mb}), \
                 loss {:.6}, grad norm {:.4}",
                total - ref_s,
                cpu / total,
                m.loss,
                m.grad_norm
            );
            if i > 0 {
                times.push(total);
                policy_times.push(total - ref_s);
                own_times.push(own);
            }
        }
        let peak = vm_hwm_mb();
        let mut ck = Vec::new();
        let mut previous = Vec::new();
        for _ in 0..2 {
            // As the `dpo` step takes it: both parts streamed in parallel into blob writers
            // (hashed while written, fsynced, installed); the previous checkpoint then removed.
            let s = Instant::now();
            let (w, st) = t.write_checkpoint_with(
                |_| blobs.large_writer().map_err(TrainerError::sink),
                |_, w| w.finish().map_err(TrainerError::sink),
            )?;
            let secs = s.elapsed().as_secs_f64();
            for d in previous.drain(..) {
                blobs.remove(&d)?;
            }
            let size = blobs.size(&w).unwrap_or(0) + blobs.size(&st).unwrap_or(0);
            ck.push((secs, size));
            previous = vec![w, st];
        }
        println!(
            "RESULT {p}+{r}: median step {:.2} s over {} steps (min {:.2}, max {:.2}); without the reference forward {:.2} s; \
             the calling thread alone busy {:.2} s of it; \
             peak RSS {:.0} MB; checkpoint {:.0} MB durable: first {:.2} s, second {:.2} s",
            median(times.clone()),
            times.len(),
            times.iter().cloned().fold(f64::INFINITY, f64::min),
            times.iter().cloned().fold(0.0, f64::max),
            median(policy_times.clone()),
            median(own_times.clone()),
            peak,
            ck[0].1 as f64 / 1e6,
            ck[0].0,
            ck[1].0
        );
    }
    let _ = std::fs::remove_dir_all(&ckdir);
    Ok(())
}

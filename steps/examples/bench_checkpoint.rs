//! DPO checkpoint time on the real model, as the `dpo` step takes it:
//!
//! ```text
//! cargo run --release -p tsr-steps --example bench_checkpoint -- [direct|blobs|files] [MODEL] [N]
//! ```
//! After one optimizer step (so the AdamW moments exist), takes `N` (default 3) checkpoints
//! into a fresh blob store and prints the time of each; the first is the first of the process.
//!
//! - `direct` (what the `dpo` step does): weights and trainer state streamed in parallel into
//!   two large-blob writers (`BlobStore::large_writer`: hashed while written, direct I/O past
//!   the page cache); each is fsynced and renamed into place.
//! - `blobs`: the same through ordinary buffered blob writers.
//! - `files` (what it did before): both files written into a scratch folder, then each one
//!   hashed, fsynced and renamed into the blob store (`BlobStore::put_file`).
//!
//! Both end with the files durable under their digests; the store's commit record that follows
//! is a few hundred bytes and is not included. The previous checkpoint's blobs are removed
//! before the next one, as the engine does.

use std::time::Instant;

use tsr_dpo::bench::bench_trainer_config;
use tsr_dpo::trainer::{DpoTrainer, TrainPair, TrainerError};
use tsr_model::bench::bench_model_spec;
use tsr_model::{tune_runtime, LanguageModel};
use tsr_state::BlobStore;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    tune_runtime();
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mode = args
        .first()
        .map(String::as_str)
        .unwrap_or("direct")
        .to_string();
    if !["direct", "blobs", "files"].contains(&mode.as_str()) {
        return Err(format!("mode must be `direct`, `blobs` or `files`, not `{mode}`").into());
    }
    let spec = bench_model_spec(args.get(1));
    let n: usize = args.get(2).map(|s| s.parse()).transpose()?.unwrap_or(3);
    let policy = LanguageModel::load_str(&spec, "cpu")?;
    let ids = policy
        .tokenizer()
        .encode("Why is the sky blue? Because of scattering.")?;
    let pair = TrainPair {
        prompt: ids.clone(),
        chosen: ids[..6].to_vec(),
        rejected: ids[4..].to_vec(),
        ref_chosen: -20.0,
        ref_rejected: -20.0,
    };
    let cfg = bench_trainer_config(4, 1);
    let mut t = DpoTrainer::new(&policy, vec![pair], cfg)?;
    t.step()?;

    let root = std::env::temp_dir().join(format!("tsr-bench-ckpt-{}", std::process::id()));
    let blobs = BlobStore::open(root.join("blobs"), root.join("tmp"))?;
    let scratch = root.join("scratch");
    let mut previous = Vec::new();
    for i in 0..n {
        for d in previous.drain(..) {
            blobs.remove(&d)?;
        }
        let start = Instant::now();
        let (w, s) = if mode == "direct" {
            t.write_checkpoint_with(
                |_| blobs.large_writer().map_err(TrainerError::sink),
                |_, w| w.finish().map_err(TrainerError::sink),
            )?
        } else if mode == "blobs" {
            t.write_checkpoint_with(
                |_| blobs.writer().map_err(TrainerError::sink),
                |_, w| w.finish().map_err(TrainerError::sink),
            )?
        } else {
            let files = t.write_checkpoint(&scratch)?;
            (
                blobs.put_file(&files.weights)?,
                blobs.put_file(&files.trainer)?,
            )
        };
        let secs = start.elapsed().as_secs_f64();
        let mb = (blobs.size(&w).unwrap_or(0) + blobs.size(&s).unwrap_or(0)) as f64 / 1e6;
        println!(
            "RESULT {mode} checkpoint {i} ({}): {mb:.0} MB durable in {secs:.2} s ({:.0} MB/s)",
            if i == 0 {
                "first of the process"
            } else {
                "later"
            },
            mb / secs
        );
        previous = vec![w, s];
    }
    let _ = std::fs::remove_dir_all(&root);
    Ok(())
}

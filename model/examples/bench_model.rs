//! Speed measurements of the model layer on the real model (or any model spec):
//!
//! ```text
//! cargo run --release -p tsr-model --example bench_model -- [MODEL] [what...]
//! ```
//! MODEL defaults to `$TSR_MODEL`; `what` is any of `load decode16 decode1 prefill train`
//! (default: all). Prints tokens per second; each measurement runs once after a warm-up.

use std::time::Instant;

use tsr_model::{tune_runtime, FinishReason, GenRequest, LanguageModel, Sampling};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let tuned = tune_runtime();
    let mut args: Vec<String> = std::env::args().skip(1).collect();
    let model = if args
        .first()
        .is_some_and(|a| a.contains('/') || a.ends_with(".gguf"))
    {
        args.remove(0)
    } else {
        std::env::var("TSR_MODEL")?
    };
    let all = args.is_empty();
    let want = |w: &str| all || args.iter().any(|a| a == w);
    println!(
        "mallopt tuned: {tuned}; threads: {}",
        tsr_model::cpu_threads()
    );

    let t = Instant::now();
    let m = LanguageModel::load_str(&model, "cpu")?;
    let load_s = t.elapsed().as_secs_f64();
    if want("load") {
        println!(
            "load {model}: {load_s:.2} s ({} parameters)",
            m.num_parameters()
        );
    }
    let tok = m.tokenizer();
    // A 48-token prompt: template + filler text, trimmed to exactly 48 tokens.
    let mut prompt = tok.encode_prompt("Write a long story about a brave knight who travels across the kingdom to find a dragon and")?;
    prompt.truncate(48);
    while prompt.len() < 48 {
        prompt.insert(prompt.len() - 3, prompt[prompt.len() - 4]);
    }
    let req = |seed: u64| GenRequest {
        prompt_ids: prompt.clone(),
        max_new_tokens: 64,
        sampling: Sampling::Sample {
            temperature: 1.0,
            top_p: Some(1.0),
            top_k: None,
        },
        seed,
    };
    // Sampling at temperature 1 may stop early at <|im_end|>: count the tokens actually produced
    // (the end-of-turn token included).
    let decode = |b: usize| -> Result<(), Box<dyn std::error::Error>> {
        let reqs: Vec<GenRequest> = (0..b as u64).map(req).collect();
        let _ = m.generate(&reqs[..1], 1)?; // warm-up
        let t = Instant::now();
        let out = m.generate(&reqs, b)?;
        let s = t.elapsed().as_secs_f64();
        let n: usize = out
            .iter()
            .map(|o| o.token_ids.len() + usize::from(o.finished == FinishReason::EndOfTurn))
            .sum();
        println!("decode batch {b} (48-token prompts, <=64 new): {n} tokens in {s:.2} s = {:.1} tok/s (incl. prefill)", n as f64 / s);
        Ok(())
    };
    if want("decode16") {
        decode(16)?;
    }
    if want("decode1") {
        decode(1)?;
    }
    if want("prefill") {
        let pairs: Vec<(Vec<u32>, Vec<u32>)> = (0..16u32)
            .map(|i| {
                let p: Vec<u32> = (0..128).map(|j| 100 + (i * 131 + j * 17) % 40000).collect();
                let r: Vec<u32> = (0..128).map(|j| 100 + (i * 71 + j * 29) % 40000).collect();
                (p, r)
            })
            .collect();
        let _ = m.logprobs(&pairs[..2], 2)?;
        let t = Instant::now();
        let _ = m.logprobs(&pairs, 16)?;
        let s = t.elapsed().as_secs_f64();
        println!(
            "scoring 16 x 256 tokens (128 prompt + 128 response): {:.2} s = {:.0} tok/s",
            s,
            16.0 * 256.0 / s
        );
        let seqs: Vec<Vec<u32>> = pairs
            .iter()
            .map(|(p, r)| [p.as_slice(), r.as_slice()].concat())
            .collect();
        let t = Instant::now();
        let _ = m.mean_hidden(&seqs, 16)?;
        let s = t.elapsed().as_secs_f64();
        println!(
            "mean_hidden 16 x 256 tokens: {:.2} s = {:.0} tok/s",
            s,
            16.0 * 256.0 / s
        );
    }
    if want("train") {
        let pairs: Vec<(Vec<u32>, Vec<u32>)> = (0..2u32)
            .map(|i| {
                (
                    (0..64).map(|j| 100 + (i * 7 + j * 13) % 40000).collect(),
                    (0..64).map(|j| 100 + (i * 3 + j * 11) % 40000).collect(),
                )
            })
            .collect();
        for step in 0..2 {
            let t = Instant::now();
            let lp = m.response_logprobs_tensor(&pairs)?;
            let loss = lp.sum_all()?.neg()?;
            let grads = loss.backward()?;
            let s = t.elapsed().as_secs_f64();
            println!(
                "forward+backward 2 x (64+64) step {step}: {s:.2} s ({} grads)",
                m.vars()
                    .iter()
                    .filter(|(_, v)| grads.get(v.as_tensor()).is_some())
                    .count()
            );
        }
    }
    Ok(())
}

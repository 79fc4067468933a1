//! Write a random-weight model of a published shape as a Hugging Face folder, for runs and
//! memory measurements at sizes this machine cannot download (weights are never committed).
//!
//! `cargo run --release -p tsr-model --example write_random_model -- SHAPE DIR [--dtype f32|bf16|f16] [--tokenizer-from HF_DIR] [--seed N]`
//!
//! SHAPE: `smollm2-135m`, `smollm2-360m`, `smollm2-1.7b` or `llama3.1-8b`. Tensors are streamed to disk one at
//! a time, so an 8B model is written with little memory. `--tokenizer-from` copies the
//! tokenizer of a real model folder (e.g. SmolLM2-135M exported with `tsr export-model`, which
//! shares SmolLM2-1.7B's tokenizer); without it the tiny test tokenizer is used.

use tsr_model::testing;
use tsr_model::DType;

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let usage = "usage: write_random_model SHAPE DIR [--dtype f32|bf16|f16] [--tokenizer-from HF_DIR] [--seed N]";
    if args.len() < 2 {
        eprintln!("{usage}");
        std::process::exit(2);
    }
    let cfg = match args[0].as_str() {
        "smollm2-135m" => testing::smollm2_135m_config(),
        "smollm2-360m" => testing::smollm2_360m_config(),
        "smollm2-1.7b" => testing::smollm2_1_7b_config(),
        "llama3.1-8b" => testing::llama31_8b_config(),
        other => {
            eprintln!(
                "unknown shape `{other}`: smollm2-135m, smollm2-360m, smollm2-1.7b or llama3.1-8b"
            );
            std::process::exit(2);
        }
    };
    let dir = std::path::PathBuf::from(&args[1]);
    let mut dtype = DType::F32;
    let mut tokenizer = None;
    let mut seed = 1;
    let mut rest = args[2..].iter();
    while let Some(a) = rest.next() {
        let v = rest.next().unwrap_or_else(|| {
            eprintln!("{a} needs a value\n{usage}");
            std::process::exit(2)
        });
        match a.as_str() {
            "--dtype" => {
                dtype = match v.as_str() {
                    "f32" => DType::F32,
                    "bf16" => DType::BF16,
                    "f16" => DType::F16,
                    _ => {
                        eprintln!("--dtype: f32, bf16 or f16");
                        std::process::exit(2)
                    }
                }
            }
            "--tokenizer-from" => tokenizer = Some(std::path::PathBuf::from(v)),
            "--seed" => seed = v.parse().expect("--seed: a number"),
            _ => {
                eprintln!("{usage}");
                std::process::exit(2)
            }
        }
    }
    if let Err(e) = testing::write_random_hf_model(&dir, &cfg, seed, dtype, tokenizer.as_deref()) {
        eprintln!("error: {e}");
        std::process::exit(1);
    }
    println!("{}", dir.display());
}

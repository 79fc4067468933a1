//! Write the tiny random-weight Llama used by the tests (Hugging Face layout) into a folder, for
//! trying workflows and load tests without the real model.
//!
//! `cargo run --release -p tsr-model --example write_tiny_model -- DIR [SEED]`

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let Some(dir) = args.get(1) else {
        eprintln!("usage: write_tiny_model DIR [SEED]");
        std::process::exit(2);
    };
    let seed = args.get(2).and_then(|s| s.parse().ok()).unwrap_or(1);
    let dir = tsr_model::testing::write_tiny_hf_model(std::path::Path::new(dir), seed);
    println!("{}", dir.display());
}

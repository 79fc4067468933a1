//! Always-run tests on the real default model (SmolLM2-135M-Instruct, GGUF Q4_1, dequantised
//! to f32). The model path comes from `$TSR_MODEL` or from `scripts/fetch-model.sh` (which CI
//! runs first and which reuses its cache). One model load is shared by the tests of this file.

use std::path::PathBuf;
use std::sync::OnceLock;

use tsr_steps::model::{GenRequest, LanguageModel, Sampling};

fn model_path() -> PathBuf {
    if let Ok(p) = std::env::var("TSR_MODEL") {
        return PathBuf::from(p);
    }
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../scripts/fetch-model.sh");
    let out = std::process::Command::new("bash").arg(&script).output().expect("run fetch-model.sh");
    assert!(out.status.success(), "fetch-model.sh failed: {}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8(out.stdout).expect("utf8");
    PathBuf::from(text.lines().last().expect("a path").trim())
}

fn model() -> &'static LanguageModel {
    static M: OnceLock<LanguageModel> = OnceLock::new();
    M.get_or_init(|| {
        tsr_steps::model::tune_allocator();
        LanguageModel::load_str(model_path().to_str().expect("utf8 path"), "cpu").expect("load real model")
    })
}

#[test]
fn greedy_answer_names_paris() {
    let m = model();
    let prompt = m.tokenizer().encode_prompt("What is the capital of France?").unwrap();
    let out = m
        .generate(&[GenRequest { prompt_ids: prompt, max_new_tokens: 24, sampling: Sampling::Greedy, seed: 0 }], 1)
        .unwrap();
    println!("{:?}", out[0]);
    assert!(out[0].text.contains("Paris"), "{:?}", out[0].text);
}

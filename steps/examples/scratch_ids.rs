use tsr_steps::model::{GenRequest, LanguageModel, Sampling};
fn main() {
    if let Ok(dir) = std::env::var("EXPORT") { let m = LanguageModel::load_str(&std::env::var("TSR_MODEL").unwrap(), "cpu").unwrap(); let t = std::time::Instant::now(); println!("{}", m.save_hf_with_digest(std::path::Path::new(&dir)).unwrap()); println!("save {:?}", t.elapsed()); let t = std::time::Instant::now(); println!("{}", m.digest().unwrap()); println!("digest {:?}", t.elapsed()); return; }
    let m = LanguageModel::load_str(&std::env::var("TSR_MODEL").unwrap(), "cpu").unwrap();
    let t = m.tokenizer();
    for s in ["What is the capital of France?", "In 2024, 12345 apples cost $3.50.", "  leading spaces and café 日本語 🙂", "Hello world"] {
        println!("ENC {s:?} {:?}", t.encode(s).unwrap());
    }
    let p = t.encode_prompt("What is the capital of France?").unwrap();
    let r = t.encode_response("The capital of France is Paris.").unwrap();
    println!("PROMPT {:?}\nRESP {:?}", p, r);
    println!("LP {:?}", m.logprobs(&[(p.clone(), r.clone())], 1).unwrap());
    let p2 = t.encode_prompt("Write a short story about a robot who learns to paint.").unwrap();
    println!("PROMPT2 {:?}", p2);
    let o = m.generate(&[GenRequest { prompt_ids: p2, max_new_tokens: 32, sampling: Sampling::Greedy, seed: 0 }], 1).unwrap();
    println!("GEN2 {:?} {:?}", o[0].token_ids, o[0].text);
}
#[allow(dead_code)]
fn export() {}

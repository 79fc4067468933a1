//! Always-run tests on the real default model (SmolLM2-135M-Instruct, GGUF Q4_1, dequantised
//! to f32). The model path comes from `$TSR_MODEL` or from `scripts/fetch-model.sh` (which CI
//! runs first and which reuses its cache). One model load is shared by the tests of this file.

use std::path::PathBuf;
use std::sync::OnceLock;

use tsr_model::{GenRequest, LanguageModel, PromptAttention, Sampling};

fn model_path() -> PathBuf {
    tsr_model::testing::default_model_path()
}

fn model() -> &'static LanguageModel {
    static M: OnceLock<LanguageModel> = OnceLock::new();
    M.get_or_init(|| {
        tsr_model::tune_runtime();
        LanguageModel::load_str(model_path().to_str().expect("utf8 path"), "cpu")
            .expect("load real model")
    })
}

#[test]
fn greedy_answer_names_paris() {
    let m = model();
    let prompt = m
        .tokenizer()
        .encode_prompt("What is the capital of France?")
        .unwrap();
    let out = m
        .generate(
            &[GenRequest {
                prompt_ids: prompt,
                max_new_tokens: 24,
                sampling: Sampling::Greedy,
                seed: 0,
            }],
            1,
        )
        .unwrap();
    println!("{:?}", out[0]);
    assert!(out[0].text.contains("Paris"), "{:?}", out[0].text);
}

/// Golden values from PyTorch 2.15 + transformers 5.24 on the same GGUF (CPU, f32), obtained
/// with (`m.gguf` = the fetched file; transformers dequantises it itself through `gguf`):
/// ```python
/// m = AutoModelForCausalLM.from_pretrained(d, gguf_file="m.gguf", dtype=torch.float32)
/// tok = AutoTokenizer.from_pretrained(d, gguf_file="m.gguf")
/// tok(s, add_special_tokens=False)["input_ids"]                       # ENCODINGS
/// lp = torch.log_softmax(m(torch.tensor([P + R])).logits[0].double(), -1)
/// sum(lp[len(P) - 1 + i, R[i]].item() for i in range(len(R)))         # -2.8369301833820533
/// m.generate(torch.tensor([P2]), do_sample=False, max_new_tokens=32, min_new_tokens=32)  # GOLDEN_32
/// ```
/// The same numbers came out of transformers loading this crate's `save_hf` export instead of
/// the GGUF, which checks the export as well.
const ENCODINGS: [(&str, &[u32]); 4] = [
    (
        "What is the capital of France?",
        &[1780, 314, 260, 3575, 282, 4649, 47],
    ),
    (
        "In 2024, 12345 apples cost $3.50.",
        &[
            788, 216, 34, 32, 34, 36, 28, 216, 33, 34, 35, 36, 37, 13855, 1708, 1885, 35, 30, 37,
            32, 30,
        ],
    ),
    (
        "  leading spaces and café 日本語 🙂",
        &[
            216, 2899, 5600, 284, 37366, 17097, 241, 115, 40993, 179, 120, 248, 47526,
        ],
    ),
    ("Hello world", &[19556, 905]),
];
const TRANSFORMERS_LOGPROB: f64 = -2.8369301833820533;
const STORY_PROMPT: &str = "Write a short story about a robot who learns to paint.";
const GOLDEN_32: [u32; 32] = [
    1653, 260, 5646, 28, 5646, 29, 14519, 8085, 28, 476, 64, 32206, 1627, 2585, 624, 3444, 282,
    639, 29, 20003, 28, 260, 5646, 506, 1945, 2585, 288, 31103, 253, 14886, 282, 6168,
];

fn france_pair() -> (Vec<u32>, Vec<u32>) {
    let t = model().tokenizer();
    (
        t.encode_prompt("What is the capital of France?").unwrap(),
        t.encode_response("The capital of France is Paris.")
            .unwrap(),
    )
}

#[test]
fn tokenizer_matches_reference_ids_and_round_trips() {
    let t = model().tokenizer();
    for (s, ids) in ENCODINGS {
        assert_eq!(t.encode(s).unwrap(), ids, "{s:?}");
    }
    for s in [
        "",
        " x",
        "   three",
        "tabs\tand\nnewlines\r\n",
        "9876543210",
        "x=3.14159; y=-2e10",
        "Ünïcödé ✓ 👩‍🚀 中文",
        "<|im_start|>user\nhi<|im_end|>",
    ] {
        let ids = t.encode(s).unwrap();
        assert_eq!(t.decode_with_special(&ids).unwrap(), s, "{ids:?}");
    }
    // Digits are split one by one (SmolLM2's Digits pre-tokenizer).
    assert_eq!(t.encode("9876543210").unwrap().len(), 10);
    assert_eq!((t.eot_id(), t.eot_token()), (2, "<|im_end|>"));
    let p = t.encode_prompt("What is the capital of France?").unwrap();
    assert_eq!(
        t.decode_with_special(&p).unwrap(),
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n"
    );
}

#[test]
fn logprob_of_fixed_pair_matches_transformers() {
    let m = model();
    let pair = france_pair();
    let lp = m.logprobs(std::slice::from_ref(&pair), 1).unwrap()[0] as f64;
    println!("logprob {lp} (transformers {TRANSFORMERS_LOGPROB})");
    // This crate gives -2.836906 (f32 logits and accumulation); transformers -2.836930.
    assert!((lp - TRANSFORMERS_LOGPROB).abs() < 2e-3, "{lp}");
    let diff = m
        .response_logprobs_tensor(&[pair])
        .unwrap()
        .to_vec1::<f32>()
        .unwrap()[0] as f64;
    assert!((diff - TRANSFORMERS_LOGPROB).abs() < 2e-3, "{diff}");
}

#[test]
fn greedy_tokens_match_transformers_alone_and_batched() {
    let m = model();
    let t = m.tokenizer();
    let req = |p: &str, n: usize| GenRequest {
        prompt_ids: t.encode_prompt(p).unwrap(),
        max_new_tokens: n,
        sampling: Sampling::Greedy,
        seed: 0,
    };
    let alone = m.generate(&[req(STORY_PROMPT, 32)], 1).unwrap().remove(0);
    assert_eq!(alone.token_ids, GOLDEN_32, "{:?}", alone.text);
    // In a batch with shorter and longer prompts (left padding, per-row positions).
    let batch = vec![
        req("Hi!", 12),
        req(STORY_PROMPT, 32),
        req(
            "List three colors of the rainbow, separated by commas, and nothing else.",
            12,
        ),
    ];
    let together = m.generate(&batch, 3).unwrap();
    assert_eq!(together[1].token_ids, GOLDEN_32);
    for (r, o) in batch.iter().zip(&together) {
        assert_eq!(&m.generate(std::slice::from_ref(r), 1).unwrap()[0], o);
    }
    // The fused prompt attention (a copy: the other tests share the model) gives
    // transformers' tokens too, alone, batched with left padding, and refilled.
    let fused = m.clone_weights().unwrap();
    fused.set_prompt_attention(PromptAttention::Fused);
    let alone = fused
        .generate(&[req(STORY_PROMPT, 32)], 1)
        .unwrap()
        .remove(0);
    assert_eq!(alone.token_ids, GOLDEN_32, "{:?}", alone.text);
    let fused_together = fused.generate(&batch, 3).unwrap();
    assert_eq!(fused_together[1].token_ids, GOLDEN_32);
    assert_eq!(fused.generate(&batch, 2).unwrap(), fused_together);
    for (r, o) in batch.iter().zip(&fused_together) {
        assert_eq!(&fused.generate(std::slice::from_ref(r), 1).unwrap()[0], o);
    }
}

/// Judge-length prompts (506 tokens: the rubric, a question and a response; and a short one
/// that pads beside it): transformers' greedy tokens (`tests/fixtures/long-prompt/golden.json`,
/// made by `scripts/long_prompt_golden.sh`, whose decisions are at least 0.13 apart in logits),
/// alone and batched, with either prompt attention. The long prompt's prefill takes gemm's
/// products (more than 64 rows) and 32 blocks of the fused kernel.
/// The greedy choice among `logits`: the largest, the lowest id on a tie (as generation picks).
fn argmax(logits: &[f32]) -> u32 {
    (0..logits.len())
        .max_by(|&a, &b| logits[a].total_cmp(&logits[b]).then(b.cmp(&a)))
        .unwrap() as u32
}

#[test]
fn judge_length_prompts_match_transformers_with_either_prompt_attention() {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../tests/fixtures/long-prompt/golden.json");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| {
        panic!(
            "{}: {e} (run scripts/long_prompt_golden.sh)",
            path.display()
        )
    });
    let golden: serde_json::Value = serde_json::from_str(&text).expect("golden JSON");
    let ids = |v: &serde_json::Value| -> Vec<u32> {
        v.as_array()
            .expect("id list")
            .iter()
            .map(|x| x.as_u64().expect("id") as u32)
            .collect()
    };
    let cases: Vec<(Vec<u32>, Vec<u32>)> = golden["cases"]
        .as_array()
        .expect("cases")
        .iter()
        .map(|c| (ids(&c["prompt_ids"]), ids(&c["greedy"])))
        .collect();
    assert!(cases[0].0.len() > 500, "{}", cases[0].0.len());
    let reqs: Vec<GenRequest> = cases
        .iter()
        .map(|(p, want)| GenRequest {
            prompt_ids: p.clone(),
            max_new_tokens: want.len(),
            sampling: Sampling::Greedy,
            seed: 0,
        })
        .collect();
    let fused = model().clone_weights().unwrap();
    fused.set_prompt_attention(PromptAttention::Fused);
    for (m, how) in [(model(), "batched"), (&fused, "fused")] {
        let together = m.generate_ignoring_end_of_turn(&reqs, 2).unwrap();
        for (i, (r, (_, want))) in reqs.iter().zip(&cases).enumerate() {
            assert_eq!(&together[i].token_ids, want, "{how}, prompt {i}, batched");
            let alone = m
                .generate_ignoring_end_of_turn(std::slice::from_ref(r), 1)
                .unwrap()
                .remove(0);
            assert_eq!(&alone.token_ids, want, "{how}, prompt {i}, alone");
        }
        // A logprob judge's next-token logits: the first greedy token is their best.
        let prompts: Vec<Vec<u32>> = cases.iter().map(|(p, _)| p.clone()).collect();
        for (i, l) in m.next_token_logits(&prompts, 2).unwrap().iter().enumerate() {
            assert_eq!(
                argmax(l),
                cases[i].1[0],
                "{how}, prompt {i}, next-token logits"
            );
        }
    }
    // Judge prompts share their rubric: with the fused prompt attention a batch computes the
    // tokens its prompts share (here the first 300) once, and each prompt keeps the logits of
    // its own prefill.
    let long = &cases[0].0;
    let variants = vec![
        long.clone(),
        [&long[..400], &long[450..]].concat(),
        [&long[..300], &long[..60]].concat(),
    ];
    let together = fused.next_token_logits(&variants, 3).unwrap();
    assert_eq!(argmax(&together[0]), cases[0].1[0]);
    for (v, got) in variants.iter().zip(&together) {
        let alone = fused
            .next_token_logits(std::slice::from_ref(v), 1)
            .unwrap()
            .remove(0);
        let worst = alone
            .iter()
            .zip(got)
            .map(|(a, b)| (a - b).abs() / (1.0 + a.abs()))
            .fold(0f32, f32::max);
        assert!(worst < 1e-4, "{worst}");
        assert_eq!(argmax(&alone), argmax(got));
    }
}

#[test]
fn export_to_hf_and_reload_is_identical() {
    let m = model();
    let tmp = tempfile::tempdir().unwrap();
    let digest = m.save_hf_with_digest(tmp.path()).unwrap();
    assert_eq!(digest, m.digest().unwrap());
    let re = LanguageModel::load_str(tmp.path().to_str().unwrap(), "cpu").unwrap();
    assert_eq!(re.digest().unwrap(), digest);
    let pair = france_pair();
    assert_eq!(
        re.logprobs(std::slice::from_ref(&pair), 1).unwrap(),
        m.logprobs(&[pair], 1).unwrap()
    );
    assert_eq!(
        re.tokenizer().encode_prompt("Hi").unwrap(),
        m.tokenizer().encode_prompt("Hi").unwrap()
    );
}

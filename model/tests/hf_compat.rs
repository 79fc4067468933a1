//! tsr against transformers on models that transformers itself wrote.
//!
//! `tests/fixtures/hf/` holds tiny random-weight models of each architecture and RoPE form,
//! written by `save_pretrained` of transformers 5.23 (`rope_parameters`, `dtype`, Qwen2's
//! `layer_types`, `chat_template.jinja`) and 4.57 (top-level `rope_theta` + `rope_scaling`),
//! with the token ids and summed response log-probs transformers computed on them
//! (`goldens-transformers{5,4}.json`). `scripts/hf_golden.sh` regenerates all of it.

use std::path::Path;

use tsr_model::testing::{golden_ids as ids, hf_fixtures as fixtures, read_golden as read_json};
use tsr_model::{DType, Device, LanguageModel, ModelSource, PromptAttention};

/// Summed log-probs agree with transformers to 1e-3 (absolute, or relative for sums of
/// hundreds of nats: both sides accumulate in f32).
fn close(tsr: f32, reference: f64) -> bool {
    let diff = (tsr as f64 - reference).abs();
    diff <= 1e-3 || diff <= 2e-6 * reference.abs()
}

/// Every fixture model: tsr's prompt and response ids equal transformers', its log-probs match,
/// and a sequence longer than a sliding window is refused rather than computed differently.
#[test]
fn models_written_by_transformers_score_as_transformers_scores_them() {
    let mut checked = 0;
    let mut raw = 0;
    for golden in ["goldens-transformers5.json", "goldens-transformers4.json"] {
        let g = read_json(&fixtures().join(golden));
        for (name, entry) in g["models"].as_object().expect("models") {
            let dir = fixtures().join(name);
            let m = LanguageModel::load(&ModelSource::HfDir(dir.clone()), &Device::Cpu, DType::F32)
                .unwrap_or_else(|e| panic!("{name}: {e}"));
            let window = m.config().sliding_window.as_ref().map(|s| s.window);
            for pair in entry["pairs"].as_array().expect("pairs") {
                let t = m.tokenizer();
                let p = t.encode_prompt(pair["prompt"].as_str().unwrap()).unwrap();
                let r = t
                    .encode_response(pair["response"].as_str().unwrap())
                    .unwrap();
                assert_eq!(p, ids(&pair["prompt_ids"]), "{name}: prompt ids");
                assert_eq!(r, ids(&pair["response_ids"]), "{name}: response ids");
                let want = pair["logprob"].as_f64().unwrap();
                // One pair per call, as transformers scored them.
                let got = m.logprobs(&[(p.clone(), r.clone())], 1);
                match window {
                    Some(w) if p.len() + r.len() > w => {
                        let e = got.expect_err("longer than the sliding window").to_string();
                        assert!(
                            e.contains("sliding attention window of 8 tokens"),
                            "{name}: {e}"
                        );
                    }
                    _ => {
                        let lp = got.unwrap_or_else(|e| panic!("{name}: {e}"))[0];
                        println!("{name}: tsr {lp:.4} transformers {want:.4}");
                        assert!(
                            close(lp, want),
                            "{name}: tsr {lp} vs transformers {want} ({golden})"
                        );
                        checked += 1;
                    }
                }
            }
            // Raw ids, 8 tokens: inside every window, so the sliding-window models compare too.
            for pair in entry["raw_pairs"].as_array().expect("raw_pairs") {
                let (p, r) = (ids(&pair["prompt_ids"]), ids(&pair["response_ids"]));
                let want = pair["logprob"].as_f64().unwrap();
                let lp = m
                    .logprobs(&[(p, r)], 1)
                    .unwrap_or_else(|e| panic!("{name}: {e}"))[0];
                assert!(
                    close(lp, want),
                    "{name} raw: tsr {lp} vs transformers {want} ({golden})"
                );
                raw += 1;
            }
        }
    }
    assert!(checked >= 25, "only {checked} pairs compared");
    assert_eq!(raw, 2 * 11, "raw pairs of every fixture model");
}

/// The settings read from each form are the ones transformers used.
#[test]
fn config_forms_parse_to_the_settings_transformers_used() {
    use tsr_model::RopeScaling;
    let load = |name: &str| {
        let path = fixtures().join(name).join("config.json");
        tsr_model::Config::from_hf_json(&read_json(&path), &path).unwrap()
    };
    let new = load("llama-llama3");
    let old = load("llama-llama3-4x");
    assert_eq!(
        new.rope, old.rope,
        "rope_parameters and rope_scaling forms agree"
    );
    assert_eq!(new.rope.theta, 500000.0);
    assert!(matches!(new.rope.scaling, RopeScaling::Llama3 { .. }));
    assert_eq!(load("qwen2").rope.theta, 1e6);
    assert_eq!(load("qwen2").sliding_window, None);
    let s = load("qwen2-sliding")
        .sliding_window
        .expect("sliding layers");
    assert_eq!((s.window, s.layers), (8, vec![1]));
    assert_eq!(load("mistral").sliding_window.map(|s| s.window), Some(4096));
    assert_eq!(load("llama-head-dim").head_dim, 24);
    assert!(
        matches!(load("llama-yarn").rope.scaling, RopeScaling::Yarn { factor, original_max_position_embeddings: 32, .. } if factor == 4.0)
    );
}

/// RoPE settings the tiny models do not cover: inverse frequencies and attention factors
/// equal transformers' own (`ROPE_INIT_FUNCTIONS` / `LlamaRotaryEmbedding`) on its serialized
/// config: Llama 3.1's real numbers, a top-level original_max_position_embeddings, dynamic
/// below and above max_position_embeddings, YaRN with mscale, betas, no truncation, a null
/// truncate and an explicit attention factor.
#[test]
fn rope_frequencies_equal_transformers() {
    let g = read_json(&fixtures().join("goldens-transformers5.json"));
    let cases = g["rope_cases"].as_array().expect("rope_cases");
    assert_eq!(cases.len(), 9);
    for case in cases {
        let name = case["name"].as_str().unwrap();
        let c = tsr_model::Config::from_hf_json(&case["config"], Path::new(name))
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        let f = c.rope_frequencies(case["seq_len"].as_u64().unwrap() as usize);
        let want: Vec<f64> = case["inv_freq"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_f64().unwrap())
            .collect();
        assert_eq!(f.inv_freq.len(), want.len(), "{name}");
        for (i, (a, b)) in f.inv_freq.iter().zip(&want).enumerate() {
            assert!(
                ((*a as f64) - b).abs() <= 2e-6 * b.abs(),
                "{name}: inv_freq[{i}] tsr {a} vs transformers {b}"
            );
        }
        let att = case["attention_factor"].as_f64().unwrap();
        assert!(
            (f.attention_scaling as f64 - att).abs() < 1e-6,
            "{name}: attention factor {} vs {att}",
            f.attention_scaling
        );
    }
}

/// Dynamic RoPE is computed per sequence: a pair scores the same alone and batched with
/// longer ones (each against transformers on that sequence alone).
#[test]
fn dynamic_rope_does_not_depend_on_the_batch() {
    let g = read_json(&fixtures().join("goldens-transformers5.json"));
    let entry = &g["models"]["llama-dynamic"];
    let m = LanguageModel::load(
        &ModelSource::HfDir(fixtures().join("llama-dynamic")),
        &Device::Cpu,
        DType::F32,
    )
    .unwrap();
    let mut pairs: Vec<(Vec<u32>, Vec<u32>)> = Vec::new();
    let mut want = Vec::new();
    for p in entry["pairs"]
        .as_array()
        .unwrap()
        .iter()
        .chain(entry["raw_pairs"].as_array().unwrap())
    {
        pairs.push((ids(&p["prompt_ids"]), ids(&p["response_ids"])));
        want.push(p["logprob"].as_f64().unwrap());
    }
    let batched = m.logprobs(&pairs, pairs.len()).unwrap();
    for (lp, w) in batched.iter().zip(&want) {
        assert!(close(*lp, *w), "batched: tsr {lp} vs transformers {w}");
    }
}

/// Batched greedy generation with dynamic RoPE gives each prompt what it gets alone (left
/// padding and decode positions give every row its own sequence length).
#[test]
fn dynamic_rope_generation_does_not_depend_on_the_batch() {
    let m = LanguageModel::load(
        &ModelSource::HfDir(fixtures().join("llama-dynamic")),
        &Device::Cpu,
        DType::F32,
    )
    .unwrap();
    let t = m.tokenizer();
    let reqs: Vec<tsr_model::GenRequest> =
        ["Hi", "Please explain why the sky is blue, step by step."]
            .iter()
            .map(|p| tsr_model::GenRequest {
                prompt_ids: t.encode_prompt(p).unwrap(),
                max_new_tokens: 12,
                sampling: tsr_model::Sampling::Greedy,
                seed: 0,
            })
            .collect();
    // Both prompts are longer than max_position_embeddings (16): the base grows per row.
    assert!(reqs.iter().all(|r| r.prompt_ids.len() > 16));
    let together = m.generate(&reqs, 2).unwrap();
    for (r, both) in reqs.iter().zip(&together) {
        let alone = m.generate(std::slice::from_ref(r), 1).unwrap().remove(0);
        assert_eq!(alone.token_ids, both.token_ids);
    }
    assert_ne!(together[0].token_ids, together[1].token_ids);
}

/// Generation refuses a request that would run past a sliding window.
#[test]
fn generation_past_a_sliding_window_is_refused() {
    let dir = fixtures().join("mistral-window");
    let m = LanguageModel::load(&ModelSource::HfDir(dir), &Device::Cpu, DType::F32).unwrap();
    let req = tsr_model::GenRequest {
        prompt_ids: vec![5, 6, 7],
        max_new_tokens: 16,
        sampling: tsr_model::Sampling::Greedy,
        seed: 0,
    };
    let e = m.generate(&[req], 1).unwrap_err().to_string();
    assert!(e.contains("19 tokens") && e.contains("window of 8"), "{e}");
    // A logprob judge's next-token logits too, by either path.
    let long: Vec<u32> = (0..9).map(|i| 5 + i).collect();
    for attention in [PromptAttention::Batched, PromptAttention::Fused] {
        m.set_prompt_attention(attention);
        let e = m
            .next_token_logits(std::slice::from_ref(&long), 1)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("9 tokens") && e.contains("window of 8"),
            "{attention:?}: {e}"
        );
    }
}

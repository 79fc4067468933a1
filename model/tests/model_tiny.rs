//! Model-layer tests on tiny random models written by the tests themselves (HF layout and
//! GGUF): loading, equivalence of the two sources, save/digest, tokenizer and chat template,
//! generation determinism across batchings, scoring paths, gradients and typed errors.

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor};
use tsr_model::testing::{random_weights, tiny_config, write_tiny_gguf, write_tiny_hf_model};
use tsr_model::{GenRequest, LanguageModel, ModelError, ModelSource, PromptAttention, Sampling};

fn load(src: ModelSource) -> LanguageModel {
    LanguageModel::load(&src, &Device::Cpu, DType::F32).expect("load")
}

fn tiny(dir: &Path, seed: u64) -> LanguageModel {
    load(ModelSource::HfDir(write_tiny_hf_model(dir, seed)))
}

fn pairs(m: &LanguageModel) -> Vec<(Vec<u32>, Vec<u32>)> {
    let t = m.tokenizer();
    [
        ("What is the capital of France?", "Paris is the capital."),
        ("Hi", "Hello! How can I help you today?"),
        ("Count: 1 2 3", "4 5 6"),
    ]
    .iter()
    .map(|(p, r)| (t.encode_prompt(p).unwrap(), t.encode_response(r).unwrap()))
    .collect()
}

fn close(a: &[f32], b: &[f32], tol: f32) {
    assert_eq!(a.len(), b.len());
    for (x, y) in a.iter().zip(b) {
        assert!((x - y).abs() <= tol * (1.0 + x.abs()), "{a:?} vs {b:?}");
    }
}

/// The greedy choice among `logits`: the largest, the lowest id on a tie (as generation picks).
fn argmax(logits: &[f32]) -> u32 {
    (0..logits.len())
        .max_by(|&a, &b| logits[a].total_cmp(&logits[b]).then(b.cmp(&a)))
        .unwrap() as u32
}

#[test]
fn hf_and_gguf_sources_give_the_same_model() {
    let tmp = tempfile::tempdir().unwrap();
    let hf = tiny(&tmp.path().join("hf"), 7);
    let gguf_path = tmp.path().join("tiny.gguf");
    write_tiny_gguf(&gguf_path, 7);
    let gg = load(ModelSource::parse(gguf_path.to_str().unwrap()).unwrap());
    assert_eq!(hf.config(), gg.config());
    assert_eq!(hf.digest().unwrap(), gg.digest().unwrap());
    let p = pairs(&hf);
    assert_eq!(p, pairs(&gg), "same tokenizer ids");
    assert_eq!(hf.logprobs(&p, 2).unwrap(), gg.logprobs(&p, 2).unwrap());
    // Export the GGUF-loaded model to HF layout and reload: same digest, same numbers.
    let out = tmp.path().join("export");
    let d = gg.save_hf_with_digest(&out).unwrap();
    assert_eq!(d, gg.digest().unwrap());
    let re = load(ModelSource::HfDir(out.clone()));
    assert_eq!(re.digest().unwrap(), d);
    assert_eq!(re.logprobs(&p, 3).unwrap(), gg.logprobs(&p, 3).unwrap());
    for f in [
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
    ] {
        assert!(out.join(f).is_file(), "{f}");
    }
    let tc: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("tokenizer_config.json")).unwrap()).unwrap();
    assert!(tc["chat_template"].as_str().unwrap().contains("im_start"));
    // Saving twice gives byte-identical weights.
    gg.save_hf(&tmp.path().join("again")).unwrap();
    assert_eq!(
        std::fs::read(out.join("model.safetensors")).unwrap(),
        std::fs::read(tmp.path().join("again/model.safetensors")).unwrap()
    );
}

#[test]
fn different_seeds_give_different_digests_and_clone_is_deep() {
    let tmp = tempfile::tempdir().unwrap();
    let a = tiny(&tmp.path().join("a"), 1);
    let b = tiny(&tmp.path().join("b"), 2);
    assert_ne!(a.digest().unwrap(), b.digest().unwrap());
    let c = a.clone_weights().unwrap();
    assert_eq!(a.digest().unwrap(), c.digest().unwrap());
    let (name, var) = c
        .vars()
        .into_iter()
        .find(|(n, _)| n.ends_with("q_proj.weight"))
        .unwrap();
    var.set(&(var.as_tensor() * 2.0).unwrap()).unwrap();
    assert_ne!(
        a.digest().unwrap(),
        c.digest().unwrap(),
        "{name} changed only in the clone"
    );
    let names: Vec<String> = a.vars().into_iter().map(|(n, _)| n).collect();
    let mut sorted = names.clone();
    sorted.sort();
    assert_eq!(names, sorted);
}

#[test]
fn tokenizer_round_trips_and_chat_template() {
    let tmp = tempfile::tempdir().unwrap();
    let m = tiny(tmp.path(), 3);
    let t = m.tokenizer();
    for s in [
        "Hello world",
        "  two leading spaces",
        "digits 12345 and 3.14",
        "unicode: café, 日本語, 🙂",
        "line\nbreaks\n\n",
        " ",
        "<|im_end|> inside",
    ] {
        let ids = t.encode(s).unwrap();
        assert_eq!(t.decode_with_special(&ids).unwrap(), s, "{ids:?}");
    }
    // Individual digits: each digit is its own token.
    let ids = t.encode("12345").unwrap();
    assert_eq!(ids.len(), 5);
    let prompt = t.encode_prompt("Hi").unwrap();
    let text = t.decode_with_special(&prompt).unwrap();
    assert_eq!(text, "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n");
    let r = t.encode_response("Sure.").unwrap();
    assert_eq!(*r.last().unwrap(), t.eot_id());
    assert_eq!(t.eot_token(), "<|im_end|>");
    assert_eq!(t.decode(&r).unwrap(), "Sure.");
    // Prompt + response tokens equal the tokens of the rendered two-turn chat (minus the final
    // newline the template adds after <|im_end|>).
    let full = t
        .render(&[("user", "Hi"), ("assistant", "Sure.")], false)
        .unwrap();
    let mut joined = prompt.clone();
    joined.extend(&r);
    assert_eq!(t.encode(full.trim_end_matches('\n')).unwrap(), joined);
}

#[test]
fn fused_inference_matches_differentiable_path_and_batching() {
    let tmp = tempfile::tempdir().unwrap();
    let m = tiny(tmp.path(), 5);
    let p = pairs(&m);
    let fused = m
        .response_logprobs(&p, false)
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    let diff = m
        .response_logprobs_tensor(&p)
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    close(&fused, &diff, 1e-4);
    let b1 = m.logprobs(&p, 1).unwrap();
    let b3 = m.logprobs(&p, 3).unwrap();
    close(&b1, &b3, 1e-5);
    close(&b1, &fused, 1e-5);
    assert!(b1.iter().all(|x| x.is_finite() && *x < 0.0));
    // Mean hidden: batch-invariant, hidden-sized.
    let seqs: Vec<Vec<u32>> = p
        .iter()
        .map(|(a, b)| [a.as_slice(), b.as_slice()].concat())
        .collect();
    let h1 = m.mean_hidden(&seqs, 1).unwrap();
    let h3 = m.mean_hidden(&seqs, 3).unwrap();
    assert_eq!(h1[0].len(), m.config().hidden_size);
    for (a, b) in h1.iter().zip(&h3) {
        close(a, b, 1e-5);
    }
}

#[test]
fn kv_cache_generation_matches_full_recomputation() {
    let tmp = tempfile::tempdir().unwrap();
    let m = tiny(tmp.path(), 11);
    let prompts = [
        "What is the capital of France?",
        "Hi",
        "Write a short poem about the sea.",
    ];
    let reqs: Vec<GenRequest> = prompts
        .iter()
        .map(|p| GenRequest {
            prompt_ids: m.tokenizer().encode_prompt(p).unwrap(),
            max_new_tokens: 12,
            sampling: Sampling::Greedy,
            seed: 0,
        })
        .collect();
    let out = m.generate(&reqs, 3).unwrap();
    for (r, o) in reqs.iter().zip(&out) {
        // Re-derive each greedy token from a cache-free forward pass over prompt + tokens so far.
        let mut seq = r.prompt_ids.clone();
        for &tok in &o.token_ids {
            let logits = &m.next_token_logits(&[seq.clone()], 1).unwrap()[0];
            assert_eq!(tok, argmax(logits), "at {} of {:?}", seq.len(), o.token_ids);
            seq.push(tok);
        }
        assert_eq!(o.text, m.tokenizer().decode(&o.token_ids).unwrap());
    }
}

/// Continuous batching: with more requests than rows, each request, whichever row it joins
/// and whenever, generates what it generates alone. With 2 rows and budgets of 3 to 20 tokens
/// (157 in all, end-of-turn ignored), the run takes at least (157 - 14) / 2 = 72 decode steps
/// while its cache holds the longest prompt plus 2 x 20 slots, so it also drops slots on the
/// way (at least once); requests without a budget take no row.
#[test]
fn refilled_rows_generate_what_they_generate_alone() {
    let tmp = tempfile::tempdir().unwrap();
    let m = tiny(tmp.path(), 17);
    let t = m.tokenizer();
    let prompts = [
        "Hello",
        "What is two plus two?",
        "Please explain why the sky is blue, step by step, with an example.",
        "Rust",
        "Name three rivers in Europe.",
        "Why?",
        "Write a haiku about the sea.",
    ];
    let mut reqs = Vec::new();
    for (i, p) in prompts.iter().enumerate() {
        for s in 0..2usize {
            let k = 2 * i + s;
            reqs.push(GenRequest {
                prompt_ids: t.encode_prompt(p).unwrap(),
                max_new_tokens: 3 + (k * 7) % 18,
                sampling: if s == 0 {
                    Sampling::Greedy
                } else {
                    Sampling::Sample {
                        temperature: 0.9,
                        top_p: Some(0.95),
                        top_k: None,
                    }
                },
                seed: 40 + k as u64,
            });
        }
    }
    assert_eq!(reqs.iter().map(|r| r.max_new_tokens).sum::<usize>(), 157);
    let alone: Vec<_> = reqs
        .iter()
        .map(|r| {
            m.generate_ignoring_end_of_turn(std::slice::from_ref(r), 1)
                .unwrap()
                .remove(0)
        })
        .collect();
    for rows in [2, 3, 5] {
        assert_eq!(
            m.generate_ignoring_end_of_turn(&reqs, rows).unwrap(),
            alone,
            "{rows} rows"
        );
    }
    // End of turn honoured, and requests with no budget among them.
    let mut some_empty = reqs.clone();
    for r in some_empty.iter_mut().step_by(4) {
        r.max_new_tokens = 0;
    }
    let alone: Vec<_> = some_empty
        .iter()
        .map(|r| m.generate(std::slice::from_ref(r), 1).unwrap().remove(0))
        .collect();
    assert_eq!(m.generate(&some_empty, 2).unwrap(), alone);
    assert!(alone.iter().step_by(4).all(|o| o.token_ids.is_empty()));
    // An observer (a progress bar) sees the finished count grow to every request, each new
    // count once, at many decode steps (at most 2 rows finish at a step), and changes nothing.
    let seen = std::sync::Mutex::new(Vec::new());
    let observed = m
        .generate_observed(&some_empty, 2, &|n| seen.lock().unwrap().push(n))
        .unwrap();
    assert_eq!(observed, alone);
    let seen = seen.into_inner().unwrap();
    assert!(seen.windows(2).all(|w| w[0] < w[1]), "{seen:?}");
    assert_eq!(seen.last(), Some(&some_empty.len()), "{seen:?}");
    assert!(seen.len() >= 5, "{seen:?}");
}

/// The fused prompt attention: each request generates what it generates alone whatever its
/// batch (left padding, refilled rows), and what the batched products generate (the same
/// attention, added in another order: the tokens agree on these prompts).
#[test]
fn fused_prompt_attention_generates_the_same_alone_batched_and_refilled() {
    let tmp = tempfile::tempdir().unwrap();
    let m = tiny(tmp.path(), 23);
    let t = m.tokenizer();
    let prompts = [
        "Hello",
        "What is two plus two?",
        "Please explain why the sky is blue, step by step, with an example or two.",
        "Rust",
        "Name three rivers in Europe.",
    ];
    let mut reqs = Vec::new();
    for (i, p) in prompts.iter().enumerate() {
        for s in 0..2usize {
            reqs.push(GenRequest {
                prompt_ids: t.encode_prompt(p).unwrap(),
                max_new_tokens: 6 + (i * 5 + s * 3) % 11,
                sampling: if s == 0 {
                    Sampling::Greedy
                } else {
                    Sampling::Sample {
                        temperature: 0.9,
                        top_p: Some(0.95),
                        top_k: None,
                    }
                },
                seed: 70 + (2 * i + s) as u64,
            });
        }
    }
    let alone = |m: &LanguageModel| -> Vec<_> {
        reqs.iter()
            .map(|r| {
                m.generate_ignoring_end_of_turn(std::slice::from_ref(r), 1)
                    .unwrap()
                    .remove(0)
            })
            .collect()
    };
    assert_eq!(m.prompt_attention(), PromptAttention::Batched);
    let batched = alone(&m);
    m.set_prompt_attention(PromptAttention::Fused);
    let fused = alone(&m);
    assert_eq!(fused, batched);
    for rows in [10, 3, 2] {
        assert_eq!(
            m.generate_ignoring_end_of_turn(&reqs, rows).unwrap(),
            fused,
            "{rows} rows"
        );
    }
    // A copy keeps the setting.
    assert_eq!(
        m.clone_weights().unwrap().prompt_attention(),
        PromptAttention::Fused
    );
}

/// With the fused prompt attention, the next token's logits (a logprob judge's verdict) come
/// from generation's prefill: generation, batched the same way, picks its first greedy tokens
/// from them, and they are close to the scoring forward's (alone or batched). Set back to
/// batched, the scoring forward's bits return.
#[test]
fn fused_next_token_logits_are_generations_first_logits() {
    let tmp = tempfile::tempdir().unwrap();
    let m = tiny(tmp.path(), 29);
    let t = m.tokenizer();
    let seqs: Vec<Vec<u32>> = [
        "Hi",
        "Please explain why the sky is blue, with an example.",
        "Name three rivers.",
    ]
    .iter()
    .map(|p| t.encode_prompt(p).unwrap())
    .collect();
    let bits = |v: &[Vec<f32>]| -> Vec<Vec<u32>> {
        v.iter()
            .map(|r| r.iter().map(|x| x.to_bits()).collect())
            .collect()
    };
    let reqs: Vec<GenRequest> = seqs
        .iter()
        .map(|s| GenRequest {
            prompt_ids: s.clone(),
            max_new_tokens: 1,
            sampling: Sampling::Greedy,
            seed: 0,
        })
        .collect();
    let scoring = m.next_token_logits(&seqs, 3).unwrap();
    m.set_prompt_attention(PromptAttention::Fused);
    let together = m.next_token_logits(&seqs, 3).unwrap();
    let first = m.generate(&reqs, 3).unwrap();
    for (i, s) in seqs.iter().enumerate() {
        assert_eq!(first[i].token_ids, vec![argmax(&together[i])], "prompt {i}");
        close(&together[i], &scoring[i], 1e-4);
        let alone = m.next_token_logits(std::slice::from_ref(s), 1).unwrap();
        close(&alone[0], &scoring[i], 1e-4);
    }
    // The two ways add in another order: some logit differs.
    assert_ne!(bits(&together), bits(&scoring));
    m.set_prompt_attention(PromptAttention::Batched);
    assert_eq!(
        bits(&m.next_token_logits(&seqs, 3).unwrap()),
        bits(&scoring)
    );
}

#[test]
fn generation_does_not_depend_on_batch_composition() {
    let tmp = tempfile::tempdir().unwrap();
    let m = tiny(tmp.path(), 13);
    let t = m.tokenizer();
    let sample = Sampling::Sample {
        temperature: 0.9,
        top_p: Some(0.95),
        top_k: Some(40),
    };
    let mut reqs = Vec::new();
    for (i, p) in [
        "Hello",
        "What is two plus two?",
        "Please explain why the sky is blue, step by step.",
        "Rust",
    ]
    .iter()
    .enumerate()
    {
        reqs.push(GenRequest {
            prompt_ids: t.encode_prompt(p).unwrap(),
            max_new_tokens: 10 + i,
            sampling: Sampling::Greedy,
            seed: 0,
        });
        reqs.push(GenRequest {
            prompt_ids: t.encode_prompt(p).unwrap(),
            max_new_tokens: 16,
            sampling: sample.clone(),
            seed: 100 + i as u64,
        });
    }
    let alone: Vec<_> = reqs
        .iter()
        .map(|r| m.generate(std::slice::from_ref(r), 1).unwrap().remove(0))
        .collect();
    let together = m.generate(&reqs, 8).unwrap();
    let mut rev = reqs.clone();
    rev.reverse();
    let mut reversed = m.generate(&rev, 3).unwrap();
    reversed.reverse();
    for o in &alone {
        println!("{:?} {:?} {:?}", o.finished, o.token_ids, o.text);
    }
    assert_eq!(alone, together);
    assert_eq!(alone, reversed);
    for (r, o) in reqs.iter().zip(&alone) {
        assert!(o.token_ids.len() <= r.max_new_tokens);
    }
    // Same request, other seed: the sample changes (16 tokens from a peaked but not one-hot
    // distribution), and a zero budget yields nothing.
    let mut other = reqs[1].clone();
    other.seed = 999;
    assert_ne!(
        m.generate(&[other], 1).unwrap()[0].token_ids,
        alone[1].token_ids
    );
    let mut none = reqs[0].clone();
    none.max_new_tokens = 0;
    assert!(m.generate(&[none], 1).unwrap()[0].token_ids.is_empty());
}

/// Weights held in f16 or bf16 while generating are their values rounded to that precision and
/// nothing else: prompts of at most 64 tokens, one at a time (every product of few rows, where
/// the weights are widened as they are read), generate exactly what the f32 model with the
/// rounded weights generates, greedy and sampled.
#[test]
fn half_weights_generate_what_their_rounded_values_generate() {
    let tmp = tempfile::tempdir().unwrap();
    let m = tiny(tmp.path(), 17);
    let t = m.tokenizer();
    let mut reqs = Vec::new();
    for (i, p) in ["Hello", "Name a colour.", "Rust"].iter().enumerate() {
        reqs.push(GenRequest {
            prompt_ids: t.encode_prompt(p).unwrap(),
            max_new_tokens: 12,
            sampling: if i == 1 {
                Sampling::Greedy
            } else {
                Sampling::Sample {
                    temperature: 0.9,
                    top_p: Some(0.95),
                    top_k: None,
                }
            },
            seed: 7 + i as u64,
        });
    }
    // One prompt at a time: the chat template makes each about 60 tokens.
    let rows: usize = reqs.iter().map(|r| r.prompt_ids.len()).max().unwrap();
    assert!(
        rows <= 64,
        "{rows} prompt rows: the prefill would leave the few-row kernel"
    );
    let f32_out = m.generate(&reqs, 1).unwrap();
    for dtype in [DType::F16, DType::BF16] {
        let rounded = m.clone_weights().unwrap();
        for v in rounded.varmap().data().lock().unwrap().values() {
            if v.rank() == 2 {
                let r = v
                    .as_tensor()
                    .to_dtype(dtype)
                    .unwrap()
                    .to_dtype(DType::F32)
                    .unwrap();
                v.set(&r).unwrap();
            }
        }
        let half = m.clone_weights().unwrap();
        half.to_half_base(dtype).unwrap();
        assert_eq!(half.base_dtype(), dtype);
        let want = rounded.generate(&reqs, 1).unwrap();
        assert_eq!(half.generate(&reqs, 1).unwrap(), want, "{dtype:?}");
        if dtype == DType::BF16 {
            // bf16 keeps 8 bits of mantissa: the tiny model's answers change.
            assert_ne!(want, f32_out);
        }
    }
}

fn check_gradients(m: &LanguageModel) {
    let p = pairs(m);
    let loss = m
        .response_logprobs_tensor(&p)
        .unwrap()
        .sum_all()
        .unwrap()
        .neg()
        .unwrap();
    let grads = loss.backward().unwrap();
    for (name, var) in m.vars() {
        let g = grads
            .get(var.as_tensor())
            .unwrap_or_else(|| panic!("no gradient for {name}"));
        let norm = g
            .sqr()
            .unwrap()
            .sum_all()
            .unwrap()
            .to_dtype(DType::F64)
            .unwrap()
            .to_scalar::<f64>()
            .unwrap();
        assert!(
            norm > 0.0 && norm.is_finite(),
            "{name}: gradient norm {norm}"
        );
    }
}

#[test]
fn gradients_reach_every_parameter_llama_and_qwen2() {
    let tmp = tempfile::tempdir().unwrap();
    check_gradients(&tiny(tmp.path(), 17));
    // Qwen2 variant (q/k/v biases, untied head) through save + reload.
    let base = tiny(&tmp.path().join("base"), 17);
    let mut cfg = tiny_config(base.config().vocab_size);
    cfg.arch = tsr_model::Arch::Qwen2;
    cfg.qkv_bias = true;
    cfg.tie_word_embeddings = false;
    let q = LanguageModel::from_tensors(
        cfg.clone(),
        base.tokenizer().clone(),
        random_weights(&cfg, 3),
        Path::new("mem"),
        &Device::Cpu,
        DType::F32,
    )
    .unwrap();
    q.save_hf(&tmp.path().join("qwen")).unwrap();
    let q2 = load(ModelSource::HfDir(tmp.path().join("qwen")));
    assert_eq!(q2.config(), &cfg);
    assert_eq!(q.digest().unwrap(), q2.digest().unwrap());
    assert!(q2.vars().iter().any(|(n, _)| n.ends_with("k_proj.bias")));
    check_gradients(&q2);
}

#[test]
fn gradients_match_finite_differences() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = write_tiny_hf_model(tmp.path(), 19);
    // f64 so that central differences are accurate.
    let m = LanguageModel::load(&ModelSource::HfDir(dir), &Device::Cpu, DType::F64).unwrap();
    let p = pairs(&m);
    let loss = |m: &LanguageModel| {
        m.response_logprobs_tensor(&p)
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar::<f64>()
            .unwrap()
    };
    let grads = m
        .response_logprobs_tensor(&p)
        .unwrap()
        .sum_all()
        .unwrap()
        .backward()
        .unwrap();
    let vars: HashMap<String, _> = m.vars().into_iter().collect();
    let probes = [
        ("model.layers.0.self_attn.q_proj.weight", 5usize),
        ("model.layers.1.self_attn.k_proj.weight", 77),
        ("model.layers.0.mlp.down_proj.weight", 300),
        ("model.layers.1.input_layernorm.weight", 9),
        ("model.norm.weight", 3),
        ("model.embed_tokens.weight", 2 * 64 + 7), // the end-of-turn row: used as input and output
    ];
    for (name, idx) in probes {
        let var = &vars[name];
        let shape = var.shape().clone();
        let orig = var
            .as_tensor()
            .flatten_all()
            .unwrap()
            .to_vec1::<f64>()
            .unwrap();
        let g = grads
            .get(var.as_tensor())
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f64>()
            .unwrap()[idx];
        let eps = 1e-5;
        let at = |delta: f64| {
            let mut v = orig.clone();
            v[idx] += delta;
            var.set(&Tensor::from_vec(v, shape.clone(), &Device::Cpu).unwrap())
                .unwrap();
            loss(&m)
        };
        let fd = (at(eps) - at(-eps)) / (2.0 * eps);
        var.set(&Tensor::from_vec(orig, shape.clone(), &Device::Cpu).unwrap())
            .unwrap();
        assert!(
            (fd - g).abs() <= 1e-5 + 1e-4 * g.abs(),
            "{name}[{idx}]: backward {g} vs finite difference {fd}"
        );
    }
}

#[test]
fn sharded_checkpoints_load() {
    let tmp = tempfile::tempdir().unwrap();
    let m = tiny(&tmp.path().join("one"), 23);
    let dir = tmp.path().join("sharded");
    m.save_hf(&dir).unwrap();
    std::fs::remove_file(dir.join("model.safetensors")).unwrap();
    let mut shards: [HashMap<String, Tensor>; 2] = Default::default();
    let mut index = serde_json::Map::new();
    for (i, (name, var)) in m.vars().into_iter().enumerate() {
        let file = format!("model-0000{}-of-00002.safetensors", i % 2 + 1);
        index.insert(name.clone(), file.into());
        // bf16 shards: converted to f32 on load.
        shards[i % 2].insert(name, var.as_tensor().to_dtype(DType::BF16).unwrap());
    }
    for (i, s) in shards.iter().enumerate() {
        candle_core::safetensors::save(
            s,
            dir.join(format!("model-0000{}-of-00002.safetensors", i + 1)),
        )
        .unwrap();
    }
    std::fs::write(
        dir.join("model.safetensors.index.json"),
        serde_json::to_vec(&serde_json::json!({"metadata": {}, "weight_map": index})).unwrap(),
    )
    .unwrap();
    let re = load(ModelSource::HfDir(dir));
    assert_eq!(re.num_parameters(), m.num_parameters());
    let p = pairs(&m);
    close(
        &re.logprobs(&p, 3).unwrap(),
        &m.logprobs(&p, 3).unwrap(),
        0.05,
    );
}

fn rewrite_weights(dir: &Path, f: impl FnOnce(&mut HashMap<String, Tensor>)) {
    let path = dir.join("model.safetensors");
    let mut t = candle_core::safetensors::load(&path, &Device::Cpu).unwrap();
    f(&mut t);
    candle_core::safetensors::save(&t, &path).unwrap();
}

#[test]
fn bad_checkpoints_give_typed_errors_naming_file_and_tensor() {
    let tmp = tempfile::tempdir().unwrap();
    let fresh = |name: &str| write_tiny_hf_model(&tmp.path().join(name), 29);
    let try_load = |dir: &Path| {
        LanguageModel::load(
            &ModelSource::HfDir(dir.to_path_buf()),
            &Device::Cpu,
            DType::F32,
        )
        .unwrap_err()
    };

    let d = fresh("missing");
    rewrite_weights(&d, |t| {
        t.remove("model.layers.1.mlp.up_proj.weight");
    });
    let e = try_load(&d);
    assert!(
        matches!(&e, ModelError::MissingTensor { tensor, .. } if tensor == "model.layers.1.mlp.up_proj.weight"),
        "{e}"
    );
    assert!(e.to_string().contains("model.safetensors"), "{e}");

    let d = fresh("shape");
    rewrite_weights(&d, |t| {
        t.insert(
            "model.norm.weight".into(),
            Tensor::zeros(63, DType::F32, &Device::Cpu).unwrap(),
        );
    });
    let e = try_load(&d);
    assert!(
        matches!(&e, ModelError::ShapeMismatch { tensor, got, .. } if tensor == "model.norm.weight" && got == &vec![63]),
        "{e}"
    );

    let d = fresh("truncated");
    let f = d.join("model.safetensors");
    let bytes = std::fs::read(&f).unwrap();
    std::fs::write(&f, &bytes[..bytes.len() / 2]).unwrap();
    let e = try_load(&d);
    assert!(
        matches!(
            &e,
            ModelError::BadWeights {
                tensor: Some(_),
                ..
            }
        ),
        "{e}"
    );
    assert!(
        e.to_string().contains("truncated") && e.to_string().contains("model.safetensors"),
        "{e}"
    );

    let d = fresh("arch");
    let cfg_path = d.join("config.json");
    let mut cfg: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&cfg_path).unwrap()).unwrap();
    cfg["architectures"] = serde_json::json!(["GPTNeoXForCausalLM"]);
    cfg["model_type"] = serde_json::json!("gpt_neox");
    std::fs::write(&cfg_path, serde_json::to_vec(&cfg).unwrap()).unwrap();
    let e = try_load(&d);
    assert!(
        matches!(&e, ModelError::UnsupportedArchitecture { .. }),
        "{e}"
    );
    assert!(e.to_string().contains("GPTNeoXForCausalLM"), "{e}");

    let d = fresh("dtype");
    rewrite_weights(&d, |t| {
        t.insert(
            "model.norm.weight".into(),
            Tensor::zeros(64, DType::U32, &Device::Cpu).unwrap(),
        );
    });
    let e = try_load(&d);
    assert!(
        matches!(&e, ModelError::UnsupportedDtype { tensor, .. } if tensor == "model.norm.weight"),
        "{e}"
    );

    // Truncated GGUF: the error names the file and the first tensor that does not fit.
    let g = tmp.path().join("cut.gguf");
    write_tiny_gguf(&g, 29);
    let bytes = std::fs::read(&g).unwrap();
    std::fs::write(&g, &bytes[..bytes.len() - 1000]).unwrap();
    let e =
        LanguageModel::load(&ModelSource::Gguf(g.clone()), &Device::Cpu, DType::F32).unwrap_err();
    assert!(
        matches!(
            &e,
            ModelError::BadWeights {
                tensor: Some(_),
                ..
            }
        ),
        "{e}"
    );
    assert!(e.to_string().contains("cut.gguf"), "{e}");

    assert!(matches!(
        ModelSource::parse("not a model"),
        Err(ModelError::BadSource(_))
    ));
    assert!(matches!(
        ModelSource::parse("Org/Name"),
        Ok(ModelSource::HubId(_))
    ));
    assert!(LanguageModel::load_str("whatever.gguf", "cuda:7").is_err());
}

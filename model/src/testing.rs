//! Tiny random-weight models for fast tests in any crate (public on purpose, not `cfg(test)`).
//!
//! The tiny model is a real Llama (hidden 64, 2 layers, 4 heads, 2 KV heads, tied embeddings)
//! with a real byte-level BPE tokenizer (SmolLM2's pre-tokenizer, 3 special tokens, 256 byte
//! tokens and merges learned from a small built-in corpus, about 384 tokens in all) and
//! SmolLM2's chat template. Weights are drawn from a ChaCha RNG seeded by `seed`, scaled so that
//! logits are peaked (greedy decoding is then stable against float noise). The same seed gives
//! the same model in HF layout and in GGUF.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::quantized::gguf_file::{self, Value as GValue};
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{Device, Tensor};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde_json::json;

use super::config::{Arch, Config};
use super::load_gguf::{permute, tokenizer_json_from_parts};
use super::{DType, LanguageModel, ModelError, ModelSource};
use tsr_base::fsio;

/// SmolLM2-135M-Instruct's chat template (adds a default system turn).
pub const SMOLLM2_CHAT_TEMPLATE: &str = "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";

const SPECIALS: [&str; 3] = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"];
const TINY_VOCAB: usize = 384;

const CORPUS: &str = "You are a helpful AI assistant named SmolLM, trained by Hugging Face. \
The capital of France is Paris. The capital of Germany is Berlin. The capital of Italy is Rome. \
What is the capital of France? What is two plus two? The answer is four. \
Write a short poem about the sea. The sea is blue and the sky is wide. \
user assistant system the quick brown fox jumps over the lazy dog. \
A good answer is helpful, honest and harmless. Please explain why the sky is blue. \
Sunlight is scattered by the air, and blue light is scattered the most. \
Rate the response on a scale of one to five. The response is correct and clear. \
Hello! How can I help you today? Thank you for your question. \
In the morning the students read their books, and in the evening they write their answers. \
Python and Rust are programming languages; Rust is fast and safe. Let me think step by step.";

/// GPT-2's byte -> printable-character table (the byte-level BPE alphabet).
fn bytes_to_unicode() -> Vec<char> {
    let mut bs: Vec<u32> = (b'!' as u32..=b'~' as u32)
        .chain(0xA1..=0xAC)
        .chain(0xAE..=0xFF)
        .collect();
    let mut cs = bs.clone();
    let mut n = 0;
    for b in 0..256u32 {
        if !bs.contains(&b) {
            bs.push(b);
            cs.push(256 + n);
            n += 1;
        }
    }
    let mut table = vec![' '; 256];
    for (b, c) in bs.iter().zip(cs) {
        table[*b as usize] = char::from_u32(c).expect("valid char");
    }
    table
}

/// Learns BPE merges on the built-in corpus: (tokens in id order, merges).
fn tiny_vocab_and_merges() -> (Vec<String>, Vec<String>) {
    let table = bytes_to_unicode();
    let mut tokens: Vec<String> = SPECIALS.iter().map(|s| s.to_string()).collect();
    tokens.extend(table.iter().map(|c| c.to_string()));
    // Words as the byte-level pre-tokenizer sees them: a leading space belongs to the word.
    let mut words: HashMap<Vec<String>, usize> = HashMap::new();
    for (i, w) in CORPUS.split(' ').enumerate() {
        let text = if i == 0 {
            w.to_string()
        } else {
            format!(" {w}")
        };
        let syms: Vec<String> = text
            .bytes()
            .map(|b| table[b as usize].to_string())
            .collect();
        *words.entry(syms).or_default() += 1;
    }
    let mut words: Vec<(Vec<String>, usize)> = words.into_iter().collect();
    words.sort();
    let mut merges = Vec::new();
    while tokens.len() < TINY_VOCAB {
        let mut counts: HashMap<(String, String), usize> = HashMap::new();
        for (w, c) in &words {
            for p in w.windows(2) {
                *counts.entry((p[0].clone(), p[1].clone())).or_default() += c;
            }
        }
        // Most frequent pair, ties broken by the pair itself: deterministic.
        let Some((best, n)) = counts
            .into_iter()
            .max_by(|a, b| a.1.cmp(&b.1).then(b.0.cmp(&a.0)))
        else {
            break;
        };
        if n < 2 {
            break;
        }
        let joined = format!("{}{}", best.0, best.1);
        for (w, _) in words.iter_mut() {
            let mut out = Vec::with_capacity(w.len());
            let mut i = 0;
            while i < w.len() {
                if i + 1 < w.len() && w[i] == best.0 && w[i + 1] == best.1 {
                    out.push(joined.clone());
                    i += 2;
                } else {
                    out.push(w[i].clone());
                    i += 1;
                }
            }
            *w = out;
        }
        merges.push(format!("{} {}", best.0, best.1));
        tokens.push(joined);
    }
    (tokens, merges)
}

/// The bits of an f32 tensor's values in order, to compare two computations exactly (`-0.0`
/// and `+0.0` differ, as do two NaNs of different payloads).
pub fn bits(t: &Tensor) -> Vec<u32> {
    t.flatten_all()
        .and_then(|t| t.to_vec1::<f32>())
        .expect("an f32 tensor")
        .into_iter()
        .map(f32::to_bits)
        .collect()
}

/// How this machine's f32 matrix products add: a digest of the bits of three products on fixed
/// inputs, each sensitive to one of gemm's choices. gemm picks its kernel from the CPU's vector
/// features (64 x 600 by a vector, a horizontal sum as wide as the vector: other bits on AVX2
/// than on AVX-512) and sizes the slices of the shared dimension it adds at a time from the L1
/// data cache (600 x 600 by 600 x 64, 256 x 1536 by 1536 x 576: other bits on AVX2 with a 48K
/// 12-way L1d than with a 32K 8-way one, measured under `scripts/as-avx2.sh`). Two machines with
/// the same digest computed the same bits for every product tried; the test fixtures of
/// digests are kept per digest ([`fixture_kind`]).
pub fn gemm_probe() -> String {
    // Computed once per process: the fixture tests ask for every file they compare.
    static PROBE: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    PROBE.get_or_init(compute_gemm_probe).clone()
}

fn compute_gemm_probe() -> String {
    let dev = Device::Cpu;
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for (m, k, n) in [
        (64usize, 600usize, 1usize),
        (600, 600, 64),
        (256, 1536, 576),
    ] {
        let a: Vec<f32> = (0..m * k)
            .map(|i| ((i * 7919) % 1999) as f32 / 997.0 - 1.0)
            .collect();
        let b: Vec<f32> = (0..k * n)
            .map(|i| ((i * 104_729) % 1997) as f32 / 991.0 - 1.0)
            .collect();
        let c = Tensor::from_vec(a, (m, k), &dev)
            .and_then(|a| a.matmul(&Tensor::from_vec(b, (k, n), &dev)?))
            .expect("a product on the CPU");
        for x in bits(&c) {
            h = (h ^ x as u64).wrapping_mul(0x0000_0100_0000_01b3);
        }
    }
    format!("{h:016x}")
}

/// The gemm probes ([`gemm_probe`]) of the kinds of CPU whose fixture sets of digests the
/// repository's tests hold, and the folder name of each.
const FIXTURE_KINDS: &[(&str, &str)] = &[
    // AVX-512: Zen 4 and Zen 5 (gemm adds up to 512 of the shared dimension at a time on both).
    ("046b4ee181920b4c", "avx512"),
    // AVX2 and FMA, no AVX-512, a 32K 8-way L1d: a Zen 3 (`scripts/as-avx2.sh`).
    ("a61447d8c7be3bba", "avx2"),
    // AVX2 and FMA, no AVX-512, a 48K 12-way L1d (Intel's Ice Lake to Raptor Lake cores): gemm
    // adds up to 1024 at a time (`scripts/as-avx2.sh --l1d 48K:12`).
    ("bb8dd4ecf8175235", "avx2-l1d48k"),
];

/// The kind of CPU whose float results a test fixture of digests holds, named by how this
/// machine's gemm adds ([`gemm_probe`]): `avx512`, `avx2` (a Zen 3's L1d) or `avx2-l1d48k`. A
/// machine whose probe is none of those gets its vector features' kind (`avx512`, `avx2`, else
/// the architecture's name), whose fixtures may or may not hold its bits:
/// [`fixture_kind_is_known`] says which. gemm's kernels add in another order on AVX-512 than on
/// AVX2 (measured 2026-12-07: a Zen 3's judge in logprob mode and a DPO resumed there from a Zen
/// 4's checkpoint gave other bits), and with another L1d on AVX2 (measured 2026-12-08 under
/// `scripts/as-avx2.sh`).
pub fn fixture_kind() -> String {
    let probe = gemm_probe();
    match FIXTURE_KINDS.iter().find(|(p, _)| *p == probe) {
        Some((_, kind)) => kind.to_string(),
        None => vector_features().to_string(),
    }
}

/// Whether this machine's gemm probe is that of a kind the fixtures were made on (see
/// [`fixture_kind`]).
pub fn fixture_kind_is_known() -> bool {
    let probe = gemm_probe();
    FIXTURE_KINDS.iter().any(|(p, _)| *p == probe)
}

/// The name for a new fixture set made on this machine when its probe is no known kind's
/// (`avx2-gemm-1a2b3c4d`: its vector features and the probe's first digits), to add to
/// `FIXTURE_KINDS` with the probe. A known kind's name otherwise.
pub fn fixture_kind_to_make() -> String {
    if fixture_kind_is_known() {
        fixture_kind()
    } else {
        format!("{}-gemm-{}", vector_features(), &gemm_probe()[..8])
    }
}

/// The vector features that choose gemm's kernel: `avx512`, `avx2` (with FMA), else the
/// architecture's name.
fn vector_features() -> &'static str {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx512f") {
            return "avx512";
        }
        if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
        {
            return "avx2";
        }
    }
    std::env::consts::ARCH
}

/// The tiny model's config for a vocabulary of `vocab` tokens.
pub fn tiny_config(vocab: usize) -> Config {
    Config {
        arch: Arch::Llama,
        hidden_size: 64,
        intermediate_size: 128,
        num_hidden_layers: 2,
        num_attention_heads: 4,
        num_key_value_heads: 2,
        head_dim: 16,
        vocab_size: vocab,
        rms_norm_eps: 1e-5,
        rope: super::rope::Rope::plain(10_000.0),
        max_position_embeddings: 2048,
        tie_word_embeddings: true,
        qkv_bias: false,
        o_bias: false,
        bos_token_id: Some(1),
        eos_token_ids: vec![2],
        sliding_window: None,
    }
}

/// Random weights (HF names and layout) for `cfg`, from `seed`.
/// Standard normal samples from a ChaCha8 generator seeded with `seed` (Box-Muller: two
/// uniforms, one normal).
fn normal_sampler(seed: u64) -> impl FnMut() -> f32 {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    move || {
        let u1: f64 = rng.gen::<f64>().max(1e-12);
        let u2: f64 = rng.gen();
        ((-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()) as f32
    }
}

pub fn random_weights(cfg: &Config, seed: u64) -> HashMap<String, Tensor> {
    let mut normal = normal_sampler(seed);
    let mut out = HashMap::new();
    for (name, shape) in cfg.expected_tensors() {
        let n: usize = shape.iter().product();
        let data: Vec<f32> = if name.ends_with("norm.weight") {
            (0..n).map(|_| 1.0 + 0.1 * normal()).collect()
        } else if name.contains("embed_tokens") || name.starts_with("lm_head") {
            // Logit std about 0.35 * sqrt(hidden) = 2.8: peaked enough for stable greedy
            // decoding, flat enough that sampling varies with the seed.
            (0..n).map(|_| 0.35 * normal()).collect()
        } else {
            let fan_in = *shape.last().expect("shape") as f32;
            let scale = if name.ends_with(".bias") {
                0.1
            } else {
                1.0 / fan_in.sqrt()
            };
            (0..n).map(|_| scale * normal()).collect()
        };
        out.insert(
            name,
            Tensor::from_vec(data, shape, &Device::Cpu).expect("tensor"),
        );
    }
    out
}

/// Writes a random model of shape `cfg` as a Hugging Face folder `dir` without holding its
/// weights in memory: tensors are drawn (as [`random_weights`] draws them, same seed, same
/// values) and streamed into `model.safetensors` one at a time, at `dtype` (f32, bf16 or f16).
/// The tokenizer files are copied from `tokenizer_from` (a Hugging Face folder with the
/// model's real tokenizer) or are the tiny test tokenizer.
pub fn write_random_hf_model(
    dir: &Path,
    cfg: &Config,
    seed: u64,
    dtype: DType,
    tokenizer_from: Option<&Path>,
) -> Result<(), ModelError> {
    use std::io::Write;
    std::fs::create_dir_all(dir).map_err(|e| ModelError::io(dir, e))?;
    match tokenizer_from {
        Some(src) => {
            for f in ["tokenizer.json", "tokenizer_config.json"] {
                std::fs::copy(src.join(f), dir.join(f))
                    .map_err(|e| ModelError::io(src.join(f), e))?;
            }
        }
        None => write_tiny_tokenizer(dir)?,
    }
    let (tag, size) = match dtype {
        DType::F32 => ("F32", 4),
        DType::BF16 => ("BF16", 2),
        DType::F16 => ("F16", 2),
        other => {
            return Err(ModelError::UnsupportedDtype {
                path: dir.to_path_buf(),
                tensor: String::new(),
                dtype: format!("{other:?} (write f32, bf16 or f16)"),
            })
        }
    };
    let mut hf = cfg.to_hf_json();
    hf["torch_dtype"] = json!(match dtype {
        DType::F32 => "float32",
        DType::BF16 => "bfloat16",
        _ => "float16",
    });
    fsio::write_atomic(
        &dir.join("config.json"),
        &serde_json::to_vec_pretty(&hf).expect("json"),
    )?;
    let tensors = cfg.expected_tensors();
    let mut header = serde_json::Map::new();
    header.insert("__metadata__".into(), json!({"format": "pt"}));
    let mut off = 0usize;
    for (name, shape) in &tensors {
        let n = shape.iter().product::<usize>() * size;
        header.insert(
            name.clone(),
            json!({"dtype": tag, "shape": shape, "data_offsets": [off, off + n]}),
        );
        off += n;
    }
    let mut h = serde_json::to_vec(&header).expect("json");
    while !h.len().is_multiple_of(8) {
        h.push(b' ');
    }
    let path = dir.join("model.safetensors");
    let file = std::fs::File::create(&path).map_err(|e| ModelError::io(&path, e))?;
    let mut w = std::io::BufWriter::with_capacity(1 << 22, file);
    let io = |e: std::io::Error| ModelError::io(&path, e);
    w.write_all(&(h.len() as u64).to_le_bytes()).map_err(io)?;
    w.write_all(&h).map_err(io)?;
    let mut normal = normal_sampler(seed);
    let mut buf: Vec<u8> = Vec::with_capacity(1 << 22);
    for (name, shape) in &tensors {
        let n: usize = shape.iter().product();
        let scale = if name.ends_with("norm.weight") {
            0.1
        } else if name.contains("embed_tokens") || name.starts_with("lm_head") {
            0.35
        } else if name.ends_with(".bias") {
            0.1
        } else {
            1.0 / (*shape.last().expect("shape") as f32).sqrt()
        };
        let offset = if name.ends_with("norm.weight") {
            1.0
        } else {
            0.0
        };
        let mut left = n;
        while left > 0 {
            let k = left.min(1 << 20);
            buf.clear();
            for _ in 0..k {
                let x = offset + scale * normal();
                match dtype {
                    DType::F32 => buf.extend_from_slice(&x.to_le_bytes()),
                    DType::BF16 => buf.extend_from_slice(&half::bf16::from_f32(x).to_le_bytes()),
                    _ => buf.extend_from_slice(&half::f16::from_f32(x).to_le_bytes()),
                }
            }
            w.write_all(&buf).map_err(io)?;
            left -= k;
        }
    }
    let file = w
        .into_inner()
        .map_err(|e| ModelError::io(&path, e.into_error()))?;
    file.sync_all().map_err(|e| ModelError::io(&path, e))
}

fn tiny_tokenizer_files() -> (String, serde_json::Value, Vec<String>, Vec<String>) {
    let (tokens, merges) = tiny_vocab_and_merges();
    let types: Vec<i32> = (0..tokens.len())
        .map(|i| if i < SPECIALS.len() { 3 } else { 1 })
        .collect();
    let pre = json!({"type": "Sequence", "pretokenizers": [
        {"type": "Digits", "individual_digits": true},
        {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true}]});
    let tj = serde_json::to_string(&tokenizer_json_from_parts(&tokens, &types, &merges, pre))
        .expect("json");
    let tc = json!({
        "add_prefix_space": false,
        "bos_token": "<|im_start|>",
        "eos_token": "<|im_end|>",
        "pad_token": "<|im_end|>",
        "unk_token": "<|endoftext|>",
        "chat_template": SMOLLM2_CHAT_TEMPLATE,
        "clean_up_tokenization_spaces": false,
        "model_max_length": 2048,
        "tokenizer_class": "GPT2Tokenizer",
    });
    (tj, tc, tokens, merges)
}

/// Writes a tiny random Llama in Hugging Face layout into `dir` (created) and returns `dir`.
/// Panics on I/O errors (test helper).
pub fn write_tiny_hf_model(dir: &Path, seed: u64) -> PathBuf {
    try_write_tiny_hf_model(dir, seed).expect("write tiny HF model")
}

/// [`write_tiny_hf_model`] returning errors.
/// The tiny test tokenizer's `tokenizer.json` and `tokenizer_config.json` in `dir`.
fn write_tiny_tokenizer(dir: &Path) -> Result<(), ModelError> {
    let (tj, tc, _, _) = tiny_tokenizer_files();
    fsio::write_atomic(&dir.join("tokenizer.json"), tj.as_bytes())?;
    Ok(fsio::write_atomic(
        &dir.join("tokenizer_config.json"),
        &serde_json::to_vec_pretty(&tc).expect("json"),
    )?)
}

pub fn try_write_tiny_hf_model(dir: &Path, seed: u64) -> Result<PathBuf, ModelError> {
    std::fs::create_dir_all(dir).map_err(|e| ModelError::io(dir, e))?;
    let (tj, tc, tokens, _) = tiny_tokenizer_files();
    let cfg = tiny_config(tokens.len());
    write_tiny_tokenizer(dir)?;
    fsio::write_atomic(
        &dir.join("config.json"),
        &serde_json::to_vec_pretty(&cfg.to_hf_json()).expect("json"),
    )?;
    let tok = super::ChatTokenizer::from_parts(tj, tc, Some(2), &[2], dir)?;
    let m = LanguageModel::from_tensors(
        cfg.clone(),
        tok,
        random_weights(&cfg, seed),
        dir,
        &Device::Cpu,
        DType::F32,
    )?;
    // Re-save through the canonical writer so the directory is exactly what save_hf writes.
    m.save_hf(dir)?;
    Ok(dir.to_path_buf())
}

/// Writes the same tiny model as [`write_tiny_hf_model`] (same seed, same weights) as an f32
/// GGUF file in llama.cpp's layout (q/k rows permuted, `llama.*` and `tokenizer.ggml.*` keys).
pub fn write_tiny_gguf(path: &Path, seed: u64) {
    try_write_tiny_gguf(path, seed).expect("write tiny GGUF")
}

/// [`write_tiny_gguf`] returning errors.
pub fn try_write_tiny_gguf(path: &Path, seed: u64) -> Result<(), ModelError> {
    let (_, _, tokens, merges) = tiny_tokenizer_files();
    let cfg = tiny_config(tokens.len());
    let weights = random_weights(&cfg, seed);
    let gguf_name = |hf: &str| -> String {
        if hf == "model.embed_tokens.weight" {
            return "token_embd.weight".into();
        }
        if hf == "model.norm.weight" {
            return "output_norm.weight".into();
        }
        let rest = hf.strip_prefix("model.layers.").expect("layer tensor");
        let (n, rest) = rest.split_once('.').expect("layer index");
        let (part, kind) = rest.rsplit_once('.').expect("kind");
        let g = match part {
            "input_layernorm" => "attn_norm",
            "self_attn.q_proj" => "attn_q",
            "self_attn.k_proj" => "attn_k",
            "self_attn.v_proj" => "attn_v",
            "self_attn.o_proj" => "attn_output",
            "post_attention_layernorm" => "ffn_norm",
            "mlp.gate_proj" => "ffn_gate",
            "mlp.up_proj" => "ffn_up",
            "mlp.down_proj" => "ffn_down",
            other => panic!("unexpected tensor {other}"),
        };
        format!("blk.{n}.{g}.{kind}")
    };
    let mut names: Vec<&String> = weights.keys().collect();
    names.sort();
    let mut qtensors = Vec::new();
    for name in names {
        let mut t = weights[name].clone();
        if name.contains("q_proj") {
            t = permute(&t, cfg.num_attention_heads)?;
        } else if name.contains("k_proj") {
            t = permute(&t, cfg.num_key_value_heads)?;
        }
        qtensors.push((gguf_name(name), QTensor::quantize(&t, GgmlDType::F32)?));
    }
    let types: Vec<GValue> = (0..tokens.len())
        .map(|i| GValue::I32(if i < SPECIALS.len() { 3 } else { 1 }))
        .collect();
    let u32v = |x: usize| GValue::U32(x as u32);
    let meta: Vec<(&str, GValue)> = vec![
        ("general.architecture", GValue::String("llama".into())),
        ("general.name", GValue::String("tsr-tiny".into())),
        ("llama.block_count", u32v(cfg.num_hidden_layers)),
        ("llama.context_length", u32v(cfg.max_position_embeddings)),
        ("llama.embedding_length", u32v(cfg.hidden_size)),
        ("llama.feed_forward_length", u32v(cfg.intermediate_size)),
        ("llama.attention.head_count", u32v(cfg.num_attention_heads)),
        (
            "llama.attention.head_count_kv",
            u32v(cfg.num_key_value_heads),
        ),
        ("llama.rope.freq_base", GValue::F32(cfg.rope.theta as f32)),
        (
            "llama.attention.layer_norm_rms_epsilon",
            GValue::F32(cfg.rms_norm_eps as f32),
        ),
        ("llama.vocab_size", u32v(cfg.vocab_size)),
        ("llama.rope.dimension_count", u32v(cfg.head_dim)),
        ("tokenizer.ggml.model", GValue::String("gpt2".into())),
        ("tokenizer.ggml.pre", GValue::String("smollm".into())),
        (
            "tokenizer.ggml.tokens",
            GValue::Array(tokens.iter().map(|t| GValue::String(t.clone())).collect()),
        ),
        ("tokenizer.ggml.token_type", GValue::Array(types)),
        (
            "tokenizer.ggml.merges",
            GValue::Array(merges.iter().map(|m| GValue::String(m.clone())).collect()),
        ),
        ("tokenizer.ggml.bos_token_id", GValue::U32(1)),
        ("tokenizer.ggml.eos_token_id", GValue::U32(2)),
        ("tokenizer.ggml.unknown_token_id", GValue::U32(0)),
        ("tokenizer.ggml.padding_token_id", GValue::U32(2)),
        (
            "tokenizer.chat_template",
            GValue::String(SMOLLM2_CHAT_TEMPLATE.into()),
        ),
    ];
    let meta_refs: Vec<(&str, &GValue)> = meta.iter().map(|(k, v)| (*k, v)).collect();
    let tensor_refs: Vec<(&str, &QTensor)> =
        qtensors.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let mut buf = std::io::Cursor::new(Vec::new());
    gguf_file::write(&mut buf, &meta_refs, &tensor_refs)?;
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir).map_err(|e| ModelError::io(dir, e))?;
    let name = path
        .file_name()
        .ok_or_else(|| ModelError::BadSource(path.display().to_string()))?
        .to_string_lossy()
        .to_string();
    Ok(fsio::write_atomic(&dir.join(&name), buf.get_ref())?)
}

/// Writes the tiny HF model into `dir` and loads it (f32, CPU).
pub fn tiny_model(dir: &Path, seed: u64) -> LanguageModel {
    let d = write_tiny_hf_model(dir, seed);
    LanguageModel::load(&ModelSource::HfDir(d), &Device::Cpu, DType::F32).expect("load tiny model")
}

/// The shape of SmolLM2-135M (hidden 576, 30 layers, 9 heads, 3 KV heads, vocab 49152, tied
/// embeddings): random weights of this shape cost what the real model costs.
pub fn smollm2_135m_config() -> Config {
    Config {
        hidden_size: 576,
        intermediate_size: 1536,
        num_hidden_layers: 30,
        num_attention_heads: 9,
        num_key_value_heads: 3,
        head_dim: 64,
        vocab_size: 49152,
        rope: super::rope::Rope::plain(100_000.0),
        max_position_embeddings: 8192,
        ..tiny_config(49152)
    }
}

/// The shape of SmolLM2-360M (hidden 960, 32 layers, 15 heads, 5 KV heads, intermediate 2560,
/// vocab 49152, tied embeddings; 362 M parameters): the next size whose full training fits a
/// 24 GiB machine.
pub fn smollm2_360m_config() -> Config {
    Config {
        hidden_size: 960,
        intermediate_size: 2560,
        num_hidden_layers: 32,
        num_attention_heads: 15,
        num_key_value_heads: 5,
        head_dim: 64,
        vocab_size: 49152,
        rope: super::rope::Rope::plain(100_000.0),
        max_position_embeddings: 8192,
        ..tiny_config(49152)
    }
}

/// The shape of SmolLM2-1.7B (hidden 2048, 24 layers, 32 heads and KV heads, intermediate
/// 8192, vocab 49152, tied embeddings; 1.71 B parameters).
pub fn smollm2_1_7b_config() -> Config {
    Config {
        hidden_size: 2048,
        intermediate_size: 8192,
        num_hidden_layers: 24,
        num_attention_heads: 32,
        num_key_value_heads: 32,
        head_dim: 64,
        vocab_size: 49152,
        rope: super::rope::Rope::plain(130_000.0),
        max_position_embeddings: 8192,
        ..tiny_config(49152)
    }
}

/// The shape of Llama-3.1-8B (hidden 4096, 32 layers, 32 heads, 8 KV heads, intermediate
/// 14336, vocab 128256, untied output head; 8.03 B parameters).
pub fn llama31_8b_config() -> Config {
    Config {
        hidden_size: 4096,
        intermediate_size: 14336,
        num_hidden_layers: 32,
        num_attention_heads: 32,
        num_key_value_heads: 8,
        head_dim: 128,
        vocab_size: 128256,
        rope: super::rope::Rope::plain(500_000.0),
        max_position_embeddings: 131072,
        tie_word_embeddings: false,
        ..tiny_config(128256)
    }
}

/// A model of any shape with [`random_weights`] and the tiny tokenizer (stop and pad token 2).
/// For speed measurements: ids beyond the tiny tokenizer's vocabulary decode to nothing.
pub fn random_model(
    cfg: &Config,
    seed: u64,
    device: &Device,
    dtype: DType,
) -> Result<LanguageModel, ModelError> {
    let (tj, tc, _, _) = tiny_tokenizer_files();
    let here = Path::new("<random model>");
    let tok = super::ChatTokenizer::from_parts(tj, tc, Some(2), &[2], here)?;
    LanguageModel::from_tensors(
        cfg.clone(),
        tok,
        random_weights(cfg, seed),
        here,
        device,
        dtype,
    )
}

/// `tests/fixtures/hf/` of the repository: models written by transformers and the reference
/// numbers (`scripts/hf_golden.sh`).
pub fn hf_fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/hf")
}

/// A golden JSON file; panics naming the script that makes it (test helper).
pub fn read_golden(path: &Path) -> serde_json::Value {
    let text = std::fs::read_to_string(path)
        .unwrap_or_else(|e| panic!("{}: {e} (run scripts/hf_golden.sh)", path.display()));
    serde_json::from_str(&text).expect("golden JSON")
}

/// A JSON list of token ids (test helper).
pub fn golden_ids(v: &serde_json::Value) -> Vec<u32> {
    v.as_array()
        .expect("id list")
        .iter()
        .map(|x| x.as_u64().expect("id") as u32)
        .collect()
}

/// The default real model (SmolLM2-135M-Instruct GGUF): `$TSR_MODEL`, else the cached file
/// `scripts/fetch-model.sh --cached` prints. Tests never download: `scripts/test.sh` fetches the
/// model before it runs them. Test helper.
pub fn default_model_path() -> PathBuf {
    if let Ok(p) = std::env::var("TSR_MODEL") {
        return PathBuf::from(p);
    }
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../scripts/fetch-model.sh");
    let out = std::process::Command::new("bash")
        .arg(&script)
        .arg("--cached")
        .output()
        .expect("run fetch-model.sh");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).expect("utf8");
    PathBuf::from(text.lines().last().expect("a path").trim())
}

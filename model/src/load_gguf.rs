//! Loading a GGUF file as a float model: every tensor is dequantised (f32), renamed to the
//! Hugging Face layout, and Llama q/k rows are un-permuted from GGUF's interleaved-rope order to
//! HF's half-split order, so the same forward pass and the same export serve both sources.
//! The tokenizer is rebuilt from metadata as a `tokenizer.json` with the correct pre-tokenizer
//! (candle's own GGUF tokenizer adds a prefix space and misses digit splitting for SmolLM2).

use std::collections::HashMap;
use std::path::Path;

use candle_core::quantized::gguf_file::{Content, Value as GValue};
use candle_core::{DType, Device, Tensor};
use serde_json::{json, Map, Value};

use super::config::{Arch, Config};
use super::error::candle_text;
use super::{ChatTokenizer, LanguageModel, ModelError};

const LLAMA3_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
const QWEN2_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

pub(crate) fn load(
    path: &Path,
    device: &Device,
    dtype: DType,
) -> Result<LanguageModel, ModelError> {
    let (mut file, content) = open_gguf(path)?;
    let config = config_from_gguf(&content, path)?;
    let tokenizer = tokenizer_from_gguf(&content, &config, path)?;
    if content.tensor_infos.contains_key("rope_freqs.weight") {
        return Err(ModelError::Config {
            path: path.to_path_buf(),
            msg: "rope_freqs.weight (llama3 rope scaling stored as a tensor) is not supported from GGUF; load the Hugging Face directory instead".into(),
        });
    }
    let mut names: Vec<&String> = content.tensor_infos.keys().collect();
    names.sort();
    let mut tensors = HashMap::new();
    for gname in names {
        let Some(hf) = hf_name(gname) else { continue };
        let bad = |msg: String| ModelError::BadWeights {
            path: path.to_path_buf(),
            tensor: Some(gname.clone()),
            msg,
        };
        let q = content
            .tensor(&mut file, gname, &Device::Cpu)
            .map_err(|e| bad(candle_text(e)))?;
        let mut t = q
            .dequantize(&Device::Cpu)
            .map_err(|e| bad(candle_text(e)))?;
        if config.arch == Arch::Llama {
            if hf.contains("self_attn.q_proj.") {
                t = unpermute(&t, config.num_attention_heads).map_err(|e| bad(candle_text(e)))?;
            } else if hf.contains("self_attn.k_proj.") {
                t = unpermute(&t, config.num_key_value_heads).map_err(|e| bad(candle_text(e)))?;
            }
        }
        tensors.insert(hf, t);
    }
    LanguageModel::from_tensors(config, tokenizer, tensors, path, device, dtype)
}

/// GGUF tensor name -> Hugging Face name (`None` for tensors the model does not use).
fn hf_name(g: &str) -> Option<String> {
    let simple = match g {
        "token_embd.weight" => Some("model.embed_tokens.weight"),
        "output_norm.weight" => Some("model.norm.weight"),
        "output.weight" => Some("lm_head.weight"),
        _ => None,
    };
    if let Some(s) = simple {
        return Some(s.to_string());
    }
    let rest = g.strip_prefix("blk.")?;
    let (n, rest) = rest.split_once('.')?;
    let n: usize = n.parse().ok()?;
    let (part, kind) = rest.rsplit_once('.')?;
    let hf = match part {
        "attn_norm" => "input_layernorm",
        "attn_q" => "self_attn.q_proj",
        "attn_k" => "self_attn.k_proj",
        "attn_v" => "self_attn.v_proj",
        "attn_output" => "self_attn.o_proj",
        "ffn_norm" => "post_attention_layernorm",
        "ffn_gate" => "mlp.gate_proj",
        "ffn_up" => "mlp.up_proj",
        "ffn_down" => "mlp.down_proj",
        _ => return None,
    };
    Some(format!("model.layers.{n}.{hf}.{kind}"))
}

/// GGUF (interleaved rope) -> HF (half-split) row order: (heads, hd/2, 2, ..) -> (heads, 2, hd/2, ..).
pub(crate) fn unpermute(t: &Tensor, heads: usize) -> candle_core::Result<Tensor> {
    let dims = t.dims().to_vec();
    let hd = dims[0] / heads;
    let rest: usize = dims[1..].iter().product();
    t.reshape((heads, hd / 2, 2, rest))?
        .transpose(1, 2)?
        .contiguous()?
        .reshape(dims)
}

/// HF -> GGUF row order (the inverse of [`unpermute`]), used to write test GGUF files.
pub(crate) fn permute(t: &Tensor, heads: usize) -> candle_core::Result<Tensor> {
    let dims = t.dims().to_vec();
    let hd = dims[0] / heads;
    let rest: usize = dims[1..].iter().product();
    t.reshape((heads, 2, hd / 2, rest))?
        .transpose(1, 2)?
        .contiguous()?
        .reshape(dims)
}

fn meta<'a>(c: &'a Content, key: &str, path: &Path) -> Result<&'a GValue, ModelError> {
    c.metadata.get(key).ok_or_else(|| ModelError::Config {
        path: path.to_path_buf(),
        msg: format!("GGUF metadata has no {key:?}"),
    })
}

fn meta_usize(c: &Content, key: &str, path: &Path) -> Result<usize, ModelError> {
    let v = meta(c, key, path)?;
    v.to_u64()
        .or_else(|_| v.to_u32().map(u64::from))
        .or_else(|_| v.to_i32().map(|x| x as u64))
        .map(|x| x as usize)
        .map_err(|e| ModelError::Config {
            path: path.to_path_buf(),
            msg: format!("{key}: {e}"),
        })
}

fn meta_f64(c: &Content, key: &str) -> Option<f64> {
    let v = c.metadata.get(key)?;
    // GGUF stores most floats as f32: go through the shortest decimal form so 1e-5 stays 1e-5
    // (and config.json exports show the value the model was converted from).
    v.to_f32()
        .map(|x| x.to_string().parse::<f64>().unwrap_or(x as f64))
        .or_else(|_| v.to_f64())
        .ok()
}

fn meta_u32(c: &Content, key: &str) -> Option<u32> {
    let v = c.metadata.get(key)?;
    v.to_u32()
        .or_else(|_| v.to_u64().map(|x| x as u32))
        .or_else(|_| v.to_i32().map(|x| x as u32))
        .ok()
}

fn config_from_gguf(c: &Content, path: &Path) -> Result<Config, ModelError> {
    let arch_name = meta(c, "general.architecture", path)?
        .to_string()
        .map_err(|e| ModelError::Config {
            path: path.to_path_buf(),
            msg: candle_text(e),
        })?
        .clone();
    let arch = match arch_name.as_str() {
        "llama" => Arch::Llama,
        "qwen2" => Arch::Qwen2,
        _ => {
            return Err(ModelError::UnsupportedArchitecture {
                path: path.to_path_buf(),
                arch: arch_name,
            })
        }
    };
    let a = &arch_name;
    let hidden = meta_usize(c, &format!("{a}.embedding_length"), path)?;
    let heads = meta_usize(c, &format!("{a}.attention.head_count"), path)?;
    let kv = meta_usize(c, &format!("{a}.attention.head_count_kv"), path).unwrap_or(heads);
    let head_dim = meta_usize(c, &format!("{a}.attention.key_length"), path)
        .or_else(|_| meta_usize(c, &format!("{a}.rope.dimension_count"), path))
        .unwrap_or(hidden / heads.max(1));
    let vocab = match meta_usize(c, &format!("{a}.vocab_size"), path) {
        Ok(v) => v,
        Err(_) => meta(c, "tokenizer.ggml.tokens", path)?
            .to_vec()
            .map(|v| v.len())
            .map_err(|e| ModelError::Config {
                path: path.to_path_buf(),
                msg: candle_text(e),
            })?,
    };
    let mut eos = Vec::new();
    for key in ["tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id"] {
        if let Some(id) = meta_u32(c, key) {
            if !eos.contains(&id) {
                eos.push(id);
            }
        }
    }
    let has_bias = c.tensor_infos.contains_key("blk.0.attn_q.bias");
    let theta = meta_f64(c, &format!("{a}.rope.freq_base")).unwrap_or(10_000.0);
    let scaling_type = c
        .metadata
        .get(&format!("{a}.rope.scaling.type"))
        .and_then(|v| v.to_string().ok().cloned());
    let rope = match scaling_type.as_deref() {
        None | Some("none") => super::rope::Rope::plain(theta),
        Some("linear") => super::rope::Rope {
            theta,
            scaling: super::rope::RopeScaling::Linear {
                factor: meta_f64(c, &format!("{a}.rope.scaling.factor")).ok_or_else(|| {
                    ModelError::Config {
                        path: path.to_path_buf(),
                        msg: format!("{a}.rope.scaling.type is linear but {a}.rope.scaling.factor is missing"),
                    }
                })?,
            },
        },
        Some(other) => {
            return Err(ModelError::Config {
                path: path.to_path_buf(),
                msg: format!(
                    "{a}.rope.scaling.type {other:?} is not supported from GGUF (none, linear); load the Hugging Face directory instead"
                ),
            })
        }
    };
    let num_hidden_layers = meta_usize(c, &format!("{a}.block_count"), path)?;
    let sliding_window = meta_u32(c, &format!("{a}.attention.sliding_window"))
        .filter(|w| *w > 0)
        .map(|w| super::SlidingWindow {
            window: w as usize,
            layers: (0..num_hidden_layers).collect(),
        });
    Ok(Config {
        arch,
        hidden_size: hidden,
        intermediate_size: meta_usize(c, &format!("{a}.feed_forward_length"), path)?,
        num_hidden_layers,
        num_attention_heads: heads,
        num_key_value_heads: kv,
        head_dim,
        vocab_size: vocab,
        rms_norm_eps: meta_f64(c, &format!("{a}.attention.layer_norm_rms_epsilon")).unwrap_or(1e-6),
        rope,
        max_position_embeddings: meta_usize(c, &format!("{a}.context_length"), path)
            .unwrap_or(2048),
        tie_word_embeddings: !c.tensor_infos.contains_key("output.weight"),
        qkv_bias: arch == Arch::Qwen2 || has_bias,
        o_bias: arch == Arch::Llama && c.tensor_infos.contains_key("blk.0.attn_output.bias"),
        bos_token_id: meta_u32(c, "tokenizer.ggml.bos_token_id"),
        eos_token_ids: eos,
        sliding_window,
    })
}

fn strings(c: &Content, key: &str, path: &Path) -> Result<Vec<String>, ModelError> {
    let err = |msg: String| ModelError::Tokenizer {
        path: path.to_path_buf(),
        msg: format!("{key}: {msg}"),
    };
    let v = c.metadata.get(key).ok_or_else(|| err("missing".into()))?;
    v.to_vec()
        .map_err(|e| err(candle_text(e)))?
        .iter()
        .map(|x| x.to_string().cloned().map_err(|e| err(candle_text(e))))
        .collect()
}

/// The pre-tokenizer JSON for a GGUF `tokenizer.ggml.pre` value.
fn pre_tokenizer(pre: &str, path: &Path) -> Result<Value, ModelError> {
    let byte_level = |use_regex: bool| json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": use_regex});
    let split = |re: &str| json!({"type": "Split", "pattern": {"Regex": re}, "behavior": "Isolated", "invert": false});
    Ok(match pre {
        // SmolLM2's tokenizer.json: Sequence[Digits(individual), ByteLevel(no prefix space)].
        "smollm" => json!({"type": "Sequence", "pretokenizers": [
            {"type": "Digits", "individual_digits": true}, byte_level(true)]}),
        "gpt2" | "default" => byte_level(true),
        "llama-bpe" | "llama3" => json!({"type": "Sequence", "pretokenizers": [split(LLAMA3_SPLIT), byte_level(false)]}),
        "qwen2" => json!({"type": "Sequence", "pretokenizers": [split(QWEN2_SPLIT), byte_level(false)]}),
        other => {
            return Err(ModelError::Tokenizer {
                path: path.to_path_buf(),
                msg: format!("unsupported GGUF pre-tokenizer {other:?} (supported: smollm, gpt2, llama-bpe, qwen2)"),
            })
        }
    })
}

/// Builds a byte-level BPE `tokenizer.json` and a `tokenizer_config.json` from GGUF metadata.
pub(crate) fn tokenizer_json_from_parts(
    tokens: &[String],
    token_types: &[i32],
    merges: &[String],
    pre: Value,
) -> Value {
    let mut vocab = Map::new();
    for (i, t) in tokens.iter().enumerate() {
        vocab.insert(t.clone(), json!(i));
    }
    let added: Vec<Value> = tokens
        .iter()
        .enumerate()
        .filter(|(i, _)| matches!(token_types.get(*i), Some(3) | Some(4)))
        .map(|(i, t)| {
            json!({"id": i, "content": t, "single_word": false, "lstrip": false, "rstrip": false,
                   "normalized": false, "special": token_types[i] == 3})
        })
        .collect();
    json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added,
        "normalizer": null,
        "pre_tokenizer": pre,
        "post_processor": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": false, "use_regex": true},
        "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
        "model": {"type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
                  "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false,
                  "ignore_merges": false, "vocab": vocab, "merges": merges},
    })
}

fn tokenizer_from_gguf(
    c: &Content,
    cfg: &Config,
    path: &Path,
) -> Result<ChatTokenizer, ModelError> {
    let tok_err = |msg: String| ModelError::Tokenizer {
        path: path.to_path_buf(),
        msg,
    };
    let model = meta(c, "tokenizer.ggml.model", path)?
        .to_string()
        .map_err(|e| tok_err(e.to_string()))?;
    if model != "gpt2" {
        return Err(tok_err(format!(
            "GGUF tokenizer model {model:?} is not supported (only byte-level BPE \"gpt2\"); load the Hugging Face directory instead"
        )));
    }
    let pre_name = c
        .metadata
        .get("tokenizer.ggml.pre")
        .and_then(|v| v.to_string().ok().cloned())
        .unwrap_or_else(|| "default".into());
    let tokens = strings(c, "tokenizer.ggml.tokens", path)?;
    let merges = strings(c, "tokenizer.ggml.merges", path)?;
    let types: Vec<i32> = match c.metadata.get("tokenizer.ggml.token_type") {
        Some(v) => v
            .to_vec()
            .map_err(|e| tok_err(e.to_string()))?
            .iter()
            .map(|x| x.to_i32().unwrap_or(1))
            .collect(),
        None => vec![1; tokens.len()],
    };
    let tj = tokenizer_json_from_parts(&tokens, &types, &merges, pre_tokenizer(&pre_name, path)?);
    let name = |key: &str| meta_u32(c, key).and_then(|id| tokens.get(id as usize).cloned());
    let mut tc = json!({
        "add_prefix_space": false,
        "clean_up_tokenization_spaces": false,
        "model_max_length": cfg.max_position_embeddings,
        "tokenizer_class": "GPT2Tokenizer",
    });
    if let Some(GValue::String(t)) = c.metadata.get("tokenizer.chat_template") {
        tc["chat_template"] = json!(t);
    }
    for (field, key) in [
        ("bos_token", "tokenizer.ggml.bos_token_id"),
        ("eos_token", "tokenizer.ggml.eos_token_id"),
        ("pad_token", "tokenizer.ggml.padding_token_id"),
        ("unk_token", "tokenizer.ggml.unknown_token_id"),
    ] {
        if let Some(t) = name(key) {
            tc[field] = json!(t);
        }
    }
    let json_text = serde_json::to_string(&tj).map_err(|e| tok_err(e.to_string()))?;
    ChatTokenizer::from_parts(
        json_text,
        tc,
        cfg.eos_token_ids.first().copied(),
        &cfg.eos_token_ids,
        path,
    )
}

/// The hyper-parameters of the GGUF file at `path`, from its header alone.
pub(crate) fn read_config(path: &Path) -> Result<Config, ModelError> {
    config_from_gguf(&open_gguf(path)?.1, path)
}

/// The GGUF file at `path` and its header.
fn open_gguf(path: &Path) -> Result<(std::fs::File, Content), ModelError> {
    let mut file = std::fs::File::open(path).map_err(|e| ModelError::io(path, e))?;
    let content = Content::read(&mut file).map_err(|e| ModelError::BadWeights {
        path: path.to_path_buf(),
        tensor: None,
        msg: format!("not a readable GGUF file: {}", candle_text(e)),
    })?;
    Ok((file, content))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn permute_inverts_unpermute() {
        let t = Tensor::arange(0f32, 8.0 * 3.0, &Device::Cpu)
            .unwrap()
            .reshape((8, 3))
            .unwrap();
        let back = unpermute(&permute(&t, 2).unwrap(), 2).unwrap();
        assert_eq!(back.to_vec2::<f32>().unwrap(), t.to_vec2::<f32>().unwrap());
        // Row order within a head of 4: GGUF interleaves the two rope halves.
        let p = permute(&t, 2).unwrap().to_vec2::<f32>().unwrap();
        assert_eq!(p[1][0], t.to_vec2::<f32>().unwrap()[2][0]);
    }

    #[test]
    fn names_map_to_hf() {
        assert_eq!(
            hf_name("blk.3.attn_q.weight").unwrap(),
            "model.layers.3.self_attn.q_proj.weight"
        );
        assert_eq!(
            hf_name("blk.0.ffn_norm.weight").unwrap(),
            "model.layers.0.post_attention_layernorm.weight"
        );
        assert!(hf_name("rope_freqs.weight").is_none());
    }
}

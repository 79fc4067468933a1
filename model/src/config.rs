//! Model hyper-parameters, read from a Hugging Face `config.json` or rebuilt from GGUF
//! metadata, and written back as a `config.json` that `transformers` can load.

use std::path::Path;

use serde_json::{json, Value};

use super::rope::{Rope, RopeFrequencies};
use super::ModelError;

/// The decoder families this crate implements. They share one forward pass
/// ([`super::llama`]); they differ only in biases and naming.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Arch {
    /// Llama 1/2/3 and SmolLM2 (optional attention biases, llama3 rope scaling).
    Llama,
    /// Qwen2 / Qwen2.5: always has q/k/v biases, no o bias.
    Qwen2,
    /// Mistral: a Llama without biases (sliding window is ignored: sequences here are short).
    Mistral,
}

impl Arch {
    fn model_type(self) -> &'static str {
        match self {
            Arch::Llama => "llama",
            Arch::Qwen2 => "qwen2",
            Arch::Mistral => "mistral",
        }
    }

    fn class_name(self) -> &'static str {
        match self {
            Arch::Llama => "LlamaForCausalLM",
            Arch::Qwen2 => "Qwen2ForCausalLM",
            Arch::Mistral => "MistralForCausalLM",
        }
    }
}

/// Sliding-window attention: the layers that use it and the window (a query sees the last
/// `window` positions, itself included). tsr computes full attention only, which equals
/// sliding-window attention while a sequence is no longer than the window; longer sequences are
/// refused ([`Config::check_context`]).
#[derive(Clone, Debug, PartialEq)]
pub struct SlidingWindow {
    pub window: usize,
    pub layers: Vec<usize>,
}

/// Hyper-parameters of a decoder-only transformer.
#[derive(Clone, Debug, PartialEq)]
pub struct Config {
    pub arch: Arch,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    pub head_dim: usize,
    pub vocab_size: usize,
    pub rms_norm_eps: f64,
    /// RoPE base and scaling (every form transformers writes; see [`super::rope`]).
    pub rope: Rope,
    pub max_position_embeddings: usize,
    pub tie_word_embeddings: bool,
    /// Biases on q/k/v projections (Qwen2 always; Llama when `attention_bias`).
    pub qkv_bias: bool,
    /// Bias on the output projection (Llama with `attention_bias`).
    pub o_bias: bool,
    pub bos_token_id: Option<u32>,
    pub eos_token_ids: Vec<u32>,
    /// Layers with sliding-window attention, if any.
    pub sliding_window: Option<SlidingWindow>,
}

fn get_usize(v: &Value, key: &str, path: &Path) -> Result<usize, ModelError> {
    v.get(key)
        .and_then(Value::as_u64)
        .map(|x| x as usize)
        .ok_or_else(|| ModelError::Config {
            path: path.to_path_buf(),
            msg: format!("missing or non-integer field {key:?}"),
        })
}

fn ids(v: Option<&Value>) -> Vec<u32> {
    match v {
        Some(Value::Number(n)) => n.as_u64().map(|x| vec![x as u32]).unwrap_or_default(),
        Some(Value::Array(a)) => a
            .iter()
            .filter_map(|x| x.as_u64())
            .map(|x| x as u32)
            .collect(),
        _ => Vec::new(),
    }
}

/// Which layers use sliding-window attention, read as transformers 5.23 reads it: Mistral
/// applies `sliding_window` (default 4096; null for none) to every layer; Qwen2 only with
/// `use_sliding_window`, to the layers `layer_types` marks (or, without it, layers from
/// `max_window_layers` on); Llama has none and refuses a `layer_types` that says otherwise.
fn sliding_window(
    v: &Value,
    arch: Arch,
    num_layers: usize,
    path: &Path,
) -> Result<Option<SlidingWindow>, ModelError> {
    let err = |msg: String| ModelError::Config {
        path: path.to_path_buf(),
        msg,
    };
    let window = |default: Option<usize>| -> Result<Option<usize>, ModelError> {
        match v.get("sliding_window") {
            None => Ok(default),
            Some(Value::Null) => Ok(None),
            Some(x) => x
                .as_u64()
                .filter(|w| *w > 0)
                .map(|w| Some(w as usize))
                .ok_or_else(|| {
                    err(format!(
                        "sliding_window must be a positive integer or null, found {x}"
                    ))
                }),
        }
    };
    let layer_types: Option<Vec<&str>> = match v.get("layer_types") {
        None | Some(Value::Null) => None,
        Some(Value::Array(a)) => {
            let types: Vec<&str> = a.iter().map(|x| x.as_str().unwrap_or("?")).collect();
            if let Some(bad) = types
                .iter()
                .find(|t| !matches!(**t, "full_attention" | "sliding_attention"))
            {
                return Err(err(format!(
                    "layer_types entry {bad:?} is not supported (full_attention, sliding_attention)"
                )));
            }
            if types.len() != num_layers {
                return Err(err(format!(
                    "layer_types has {} entries for {num_layers} layers",
                    types.len()
                )));
            }
            Some(types)
        }
        Some(x) => return Err(err(format!("layer_types must be a list, found {x}"))),
    };
    let sliding_in = |types: &[&str]| -> Vec<usize> {
        (0..num_layers)
            .filter(|&i| types[i] == "sliding_attention")
            .collect()
    };
    let (w, layers) = match arch {
        Arch::Llama => {
            if let Some(t) = &layer_types {
                if !sliding_in(t).is_empty() {
                    return Err(err(
                        "layer_types marks sliding_attention layers, which Llama does not have"
                            .into(),
                    ));
                }
            }
            return Ok(None);
        }
        Arch::Mistral => (window(Some(4096))?, (0..num_layers).collect()),
        Arch::Qwen2 => {
            let on = match v.get("use_sliding_window") {
                None | Some(Value::Null) => false,
                Some(Value::Bool(b)) => *b,
                Some(x) => {
                    return Err(err(format!(
                        "use_sliding_window must be true or false, found {x}"
                    )))
                }
            };
            let w = if on { window(Some(4096))? } else { None };
            let layers = match &layer_types {
                // transformers refuses sliding layers without a window ("Could not find a
                // `sliding_window`"); so does tsr.
                Some(t) if w.is_none() && !sliding_in(t).is_empty() => {
                    return Err(err(format!(
                        "layer_types marks layers {:?} as sliding_attention, but there is no sliding window (use_sliding_window is false or sliding_window is null)",
                        sliding_in(t)
                    )))
                }
                Some(t) => sliding_in(t),
                None => {
                    let from = match v.get("max_window_layers") {
                        None | Some(Value::Null) => 28,
                        Some(_) => get_usize(v, "max_window_layers", path)?,
                    };
                    (from.min(num_layers)..num_layers).collect()
                }
            };
            (w, layers)
        }
    };
    Ok(match w {
        Some(window) if !layers.is_empty() => Some(SlidingWindow { window, layers }),
        _ => None,
    })
}

impl Config {
    /// Parses a Hugging Face `config.json` value; `path` is only used in error messages.
    pub fn from_hf_json(v: &Value, path: &Path) -> Result<Self, ModelError> {
        let cfg_err = |msg: String| ModelError::Config {
            path: path.to_path_buf(),
            msg,
        };
        let model_type = v.get("model_type").and_then(Value::as_str).unwrap_or("");
        let class = v
            .get("architectures")
            .and_then(|a| a.get(0))
            .and_then(Value::as_str)
            .unwrap_or("");
        let arch = match (model_type, class) {
            ("llama", _) | (_, "LlamaForCausalLM") => Arch::Llama,
            ("qwen2", _) | (_, "Qwen2ForCausalLM") => Arch::Qwen2,
            ("mistral", _) | (_, "MistralForCausalLM") => Arch::Mistral,
            _ => {
                return Err(ModelError::UnsupportedArchitecture {
                    path: path.to_path_buf(),
                    arch: if class.is_empty() {
                        model_type.to_string()
                    } else {
                        class.to_string()
                    },
                })
            }
        };
        let hidden_size = get_usize(v, "hidden_size", path)?;
        let num_attention_heads = get_usize(v, "num_attention_heads", path)?;
        let num_key_value_heads = v
            .get("num_key_value_heads")
            .and_then(Value::as_u64)
            .map(|x| x as usize)
            .unwrap_or(num_attention_heads);
        let head_dim = v
            .get("head_dim")
            .and_then(Value::as_u64)
            .map(|x| x as usize)
            .unwrap_or(hidden_size / num_attention_heads.max(1));
        if num_attention_heads == 0
            || num_key_value_heads == 0
            || num_attention_heads % num_key_value_heads != 0
            || !head_dim.is_multiple_of(2)
        {
            return Err(cfg_err(format!(
                "inconsistent heads: {num_attention_heads} attention heads, {num_key_value_heads} kv heads, head_dim {head_dim}"
            )));
        }
        let attention_bias = v
            .get("attention_bias")
            .and_then(Value::as_bool)
            .unwrap_or(false);
        // Keys of related architectures (Gemma, Granite, Cohere, OLMo, quantized checkpoints)
        // that change the math when set: a config carrying one is not a plain
        // Llama/Qwen2/Mistral, whatever its model_type says.
        for key in [
            "quantization_config",
            "final_logit_softcapping",
            "attn_logit_softcapping",
            "embedding_multiplier",
            "residual_multiplier",
            "attention_multiplier",
            "logits_scaling",
            "logit_scale",
            "use_qk_norm",
            "qk_layernorm",
        ] {
            let neutral = match v.get(key) {
                None | Some(Value::Null) | Some(Value::Bool(false)) => true,
                // A scale of exactly 1 changes nothing.
                Some(Value::Number(n)) => {
                    n.as_f64() == Some(1.0)
                        && (key.ends_with("multiplier") || key.starts_with("logit"))
                }
                _ => false,
            };
            if !neutral {
                return Err(cfg_err(format!(
                    "{key} = {} changes the model's computation and is not supported (supported: plain Llama, Qwen2 and Mistral weights in f32/f16/bf16)",
                    v[key]
                )));
            }
        }
        if v.get("mlp_bias").and_then(Value::as_bool).unwrap_or(false) {
            return Err(cfg_err("mlp_bias = true is not supported".into()));
        }
        if let Some(act) = v.get("hidden_act").and_then(Value::as_str) {
            if act != "silu" {
                return Err(cfg_err(format!(
                    "hidden_act {act:?} is not supported (only silu)"
                )));
            }
        }
        let num_hidden_layers = get_usize(v, "num_hidden_layers", path)?;
        // transformers' defaults per architecture where config.json leaves a key out.
        let max_position_embeddings = match v.get("max_position_embeddings") {
            None | Some(Value::Null) => match arch {
                Arch::Llama => 2048,
                Arch::Qwen2 => 32768,
                Arch::Mistral => 4096 * 32,
            },
            Some(_) => get_usize(v, "max_position_embeddings", path)?,
        };
        let rope = Rope::from_hf_json(v, max_position_embeddings, path)?;
        let sliding_window = sliding_window(v, arch, num_hidden_layers, path)?;
        Ok(Config {
            arch,
            hidden_size,
            intermediate_size: get_usize(v, "intermediate_size", path)?,
            num_hidden_layers,
            num_attention_heads,
            num_key_value_heads,
            head_dim,
            vocab_size: get_usize(v, "vocab_size", path)?,
            rms_norm_eps: v
                .get("rms_norm_eps")
                .and_then(Value::as_f64)
                .unwrap_or(1e-6),
            rope,
            max_position_embeddings,
            tie_word_embeddings: v
                .get("tie_word_embeddings")
                .and_then(Value::as_bool)
                .unwrap_or(false),
            qkv_bias: arch == Arch::Qwen2 || attention_bias,
            o_bias: arch == Arch::Llama && attention_bias,
            bos_token_id: ids(v.get("bos_token_id")).first().copied(),
            eos_token_ids: ids(v.get("eos_token_id")),
            sliding_window,
        })
    }

    /// The `config.json` written by [`super::LanguageModel::save_hf`] (weights stored as f32).
    pub fn to_hf_json(&self) -> Value {
        let mut v = json!({
            "architectures": [self.arch.class_name()],
            "model_type": self.arch.model_type(),
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim,
            "vocab_size": self.vocab_size,
            "rms_norm_eps": self.rms_norm_eps,
            "max_position_embeddings": self.max_position_embeddings,
            "tie_word_embeddings": self.tie_word_embeddings,
            "hidden_act": "silu",
            "torch_dtype": "float32",
            "use_cache": true,
        });
        let obj = v.as_object_mut().expect("json object");
        if self.arch == Arch::Llama {
            obj.insert("attention_bias".into(), json!(self.qkv_bias));
            obj.insert("mlp_bias".into(), json!(false));
        }
        self.rope.write_hf_json(obj);
        match self.arch {
            Arch::Llama => {}
            Arch::Mistral => {
                // Absent means 4096 to transformers: write null for full attention.
                let w = self.sliding_window.as_ref().map(|s| s.window);
                obj.insert("sliding_window".into(), json!(w));
            }
            Arch::Qwen2 => {
                let layer_types: Vec<&str> = (0..self.num_hidden_layers)
                    .map(|i| match &self.sliding_window {
                        Some(s) if s.layers.contains(&i) => "sliding_attention",
                        _ => "full_attention",
                    })
                    .collect();
                obj.insert(
                    "use_sliding_window".into(),
                    json!(self.sliding_window.is_some()),
                );
                if let Some(s) = &self.sliding_window {
                    obj.insert("sliding_window".into(), json!(s.window));
                    let first = s.layers.iter().min().copied().unwrap_or(0);
                    obj.insert("max_window_layers".into(), json!(first));
                    obj.insert("layer_types".into(), json!(layer_types));
                }
            }
        }
        if let Some(b) = self.bos_token_id {
            obj.insert("bos_token_id".into(), json!(b));
        }
        match self.eos_token_ids.as_slice() {
            [] => {}
            [one] => {
                obj.insert("eos_token_id".into(), json!(one));
            }
            many => {
                obj.insert("eos_token_id".into(), json!(many));
            }
        }
        v
    }

    /// Rotary tables' parameters for a forward call whose largest position is `seq_len - 1`.
    pub fn rope_frequencies(&self, seq_len: usize) -> RopeFrequencies {
        self.rope
            .frequencies(self.head_dim, self.max_position_embeddings, seq_len)
    }

    /// Refuses a sequence of `len` tokens that sliding-window layers would treat differently
    /// from full attention (the only attention computed here). `what` names the request.
    pub fn check_context(&self, len: usize, what: &str) -> Result<(), ModelError> {
        match &self.sliding_window {
            Some(s) if len > s.window => Err(ModelError::InvalidRequest(format!(
                "{what} spans {len} tokens, more than the model's sliding attention window of {} tokens (layers {:?}); tsr computes full attention only, which differs beyond the window: shorten the prompt or max_new_tokens",
                s.window, s.layers
            ))),
            _ => Ok(()),
        }
    }

    /// Every parameter name this config needs, in HF layout, with its shape.
    pub fn expected_tensors(&self) -> Vec<(String, Vec<usize>)> {
        let h = self.hidden_size;
        let q = self.num_attention_heads * self.head_dim;
        let kv = self.num_key_value_heads * self.head_dim;
        let f = self.intermediate_size;
        let mut out = vec![
            (
                "model.embed_tokens.weight".to_string(),
                vec![self.vocab_size, h],
            ),
            ("model.norm.weight".to_string(), vec![h]),
        ];
        if !self.tie_word_embeddings {
            out.push(("lm_head.weight".to_string(), vec![self.vocab_size, h]));
        }
        for i in 0..self.num_hidden_layers {
            let p = format!("model.layers.{i}");
            out.push((format!("{p}.input_layernorm.weight"), vec![h]));
            out.push((format!("{p}.post_attention_layernorm.weight"), vec![h]));
            out.push((format!("{p}.self_attn.q_proj.weight"), vec![q, h]));
            out.push((format!("{p}.self_attn.k_proj.weight"), vec![kv, h]));
            out.push((format!("{p}.self_attn.v_proj.weight"), vec![kv, h]));
            out.push((format!("{p}.self_attn.o_proj.weight"), vec![h, q]));
            if self.qkv_bias {
                out.push((format!("{p}.self_attn.q_proj.bias"), vec![q]));
                out.push((format!("{p}.self_attn.k_proj.bias"), vec![kv]));
                out.push((format!("{p}.self_attn.v_proj.bias"), vec![kv]));
            }
            if self.o_bias {
                out.push((format!("{p}.self_attn.o_proj.bias"), vec![h]));
            }
            out.push((format!("{p}.mlp.gate_proj.weight"), vec![f, h]));
            out.push((format!("{p}.mlp.up_proj.weight"), vec![f, h]));
            out.push((format!("{p}.mlp.down_proj.weight"), vec![h, f]));
        }
        out.sort();
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hf_json_round_trips() {
        let v = json!({"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_size": 64,
            "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
            "num_key_value_heads": 2, "vocab_size": 300, "rms_norm_eps": 1e-6, "rope_theta": 1e6,
            "tie_word_embeddings": true, "eos_token_id": [2, 3]});
        let c = Config::from_hf_json(&v, Path::new("x")).unwrap();
        assert!(c.qkv_bias && !c.o_bias);
        assert_eq!(c.head_dim, 16);
        let c2 = Config::from_hf_json(&c.to_hf_json(), Path::new("x")).unwrap();
        assert_eq!(c, c2);
    }

    #[test]
    fn keys_that_change_the_math_are_refused() {
        let base = json!({"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 64,
            "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4, "vocab_size": 300});
        let with = |k: &str, x: Value| {
            let mut v = base.clone();
            v[k] = x;
            Config::from_hf_json(&v, Path::new("/m/config.json")).map_err(|e| e.to_string())
        };
        for (k, x) in [
            ("quantization_config", json!({"quant_method": "gptq"})),
            ("final_logit_softcapping", json!(30.0)),
            ("embedding_multiplier", json!(12.0)),
            ("use_qk_norm", json!(true)),
            ("partial_rotary_factor", json!(0.5)),
            (
                "layer_types",
                json!(["full_attention", "sliding_attention"]),
            ),
            ("mlp_bias", json!(true)),
        ] {
            let e = with(k, x).unwrap_err();
            assert!(e.contains(k) && e.contains("/m/config.json"), "{e}");
        }
        assert!(with("final_logit_softcapping", Value::Null).is_ok());
        assert!(with("embedding_multiplier", json!(1.0)).is_ok());
        // Mistral without a sliding_window key gets transformers' default of 4096.
        let mut m = base.clone();
        m["model_type"] = json!("mistral");
        m["architectures"] = json!(["MistralForCausalLM"]);
        let c = Config::from_hf_json(&m, Path::new("x")).unwrap();
        assert_eq!(c.sliding_window.as_ref().map(|s| s.window), Some(4096));
        assert!(c.check_context(4096, "t").is_ok());
        let e = c
            .check_context(4097, "a scored sequence")
            .unwrap_err()
            .to_string();
        assert!(e.contains("4097 tokens") && e.contains("4096"), "{e}");
        // Written back, read again: the same window (null would mean none).
        assert_eq!(
            Config::from_hf_json(&c.to_hf_json(), Path::new("x")).unwrap(),
            c
        );
        m["sliding_window"] = Value::Null;
        let c = Config::from_hf_json(&m, Path::new("x")).unwrap();
        assert_eq!(
            Config::from_hf_json(&c.to_hf_json(), Path::new("x"))
                .unwrap()
                .sliding_window,
            None
        );
    }

    #[test]
    fn unsupported_architecture_is_named() {
        let v = json!({"architectures": ["GPTNeoXForCausalLM"], "model_type": "gpt_neox"});
        let e = Config::from_hf_json(&v, Path::new("/m/config.json")).unwrap_err();
        let s = e.to_string();
        assert!(
            s.contains("GPTNeoXForCausalLM") && s.contains("/m/config.json"),
            "{s}"
        );
    }
}

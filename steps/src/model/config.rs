//! Model hyper-parameters, read from a Hugging Face `config.json` or rebuilt from GGUF
//! metadata, and written back as a `config.json` that `transformers` can load.

use std::path::Path;

use serde_json::{json, Value};

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

/// Llama 3.1-style frequency-dependent rope scaling (`rope_scaling.rope_type == "llama3"`).
#[derive(Clone, Debug, PartialEq)]
pub struct Llama3RopeScaling {
    pub factor: f64,
    pub low_freq_factor: f64,
    pub high_freq_factor: f64,
    pub original_max_position_embeddings: usize,
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
    pub rope_theta: f64,
    pub rope_scaling: Option<Llama3RopeScaling>,
    pub max_position_embeddings: usize,
    pub tie_word_embeddings: bool,
    /// Biases on q/k/v projections (Qwen2 always; Llama when `attention_bias`).
    pub qkv_bias: bool,
    /// Bias on the output projection (Llama with `attention_bias`).
    pub o_bias: bool,
    pub bos_token_id: Option<u32>,
    pub eos_token_ids: Vec<u32>,
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
        let rope_scaling = match v.get("rope_scaling") {
            None | Some(Value::Null) => None,
            Some(rs) => {
                let kind = rs
                    .get("rope_type")
                    .or_else(|| rs.get("type"))
                    .and_then(Value::as_str)
                    .unwrap_or("");
                match kind {
                    "default" => None,
                    "llama3" => {
                        let f = |k: &str| {
                            rs.get(k)
                                .and_then(Value::as_f64)
                                .ok_or_else(|| cfg_err(format!("rope_scaling.{k} missing")))
                        };
                        Some(Llama3RopeScaling {
                            factor: f("factor")?,
                            low_freq_factor: f("low_freq_factor")?,
                            high_freq_factor: f("high_freq_factor")?,
                            original_max_position_embeddings: f("original_max_position_embeddings")?
                                as usize,
                        })
                    }
                    other => {
                        return Err(cfg_err(format!(
                            "rope_scaling type {other:?} is not supported (only llama3)"
                        )))
                    }
                }
            }
        };
        Ok(Config {
            arch,
            hidden_size,
            intermediate_size: get_usize(v, "intermediate_size", path)?,
            num_hidden_layers: get_usize(v, "num_hidden_layers", path)?,
            num_attention_heads,
            num_key_value_heads,
            head_dim,
            vocab_size: get_usize(v, "vocab_size", path)?,
            rms_norm_eps: v
                .get("rms_norm_eps")
                .and_then(Value::as_f64)
                .unwrap_or(1e-6),
            rope_theta: v
                .get("rope_theta")
                .and_then(Value::as_f64)
                .unwrap_or(10_000.0),
            rope_scaling,
            max_position_embeddings: v
                .get("max_position_embeddings")
                .and_then(Value::as_u64)
                .unwrap_or(2048) as usize,
            tie_word_embeddings: v
                .get("tie_word_embeddings")
                .and_then(Value::as_bool)
                .unwrap_or(false),
            qkv_bias: arch == Arch::Qwen2 || attention_bias,
            o_bias: arch == Arch::Llama && attention_bias,
            bos_token_id: ids(v.get("bos_token_id")).first().copied(),
            eos_token_ids: ids(v.get("eos_token_id")),
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
            "rope_theta": self.rope_theta,
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
        if let Some(rs) = &self.rope_scaling {
            obj.insert(
                "rope_scaling".into(),
                json!({
                    "rope_type": "llama3",
                    "factor": rs.factor,
                    "low_freq_factor": rs.low_freq_factor,
                    "high_freq_factor": rs.high_freq_factor,
                    "original_max_position_embeddings": rs.original_max_position_embeddings,
                }),
            );
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

    /// Rotary inverse frequencies (length `head_dim / 2`), with llama3 scaling when configured.
    /// Computed in f64 and rounded once, close to what `transformers` computes in f32.
    pub fn inv_freq(&self) -> Vec<f32> {
        let d = self.head_dim;
        (0..d / 2)
            .map(|i| {
                let f = 1.0 / self.rope_theta.powf((2 * i) as f64 / d as f64);
                match &self.rope_scaling {
                    None => f as f32,
                    Some(rs) => {
                        let old = rs.original_max_position_embeddings as f64;
                        let low_wavelen = old / rs.low_freq_factor;
                        let high_wavelen = old / rs.high_freq_factor;
                        let wavelen = 2.0 * std::f64::consts::PI / f;
                        let scaled = if wavelen < high_wavelen {
                            f
                        } else if wavelen > low_wavelen {
                            f / rs.factor
                        } else {
                            let smooth = (old / wavelen - rs.low_freq_factor)
                                / (rs.high_freq_factor - rs.low_freq_factor);
                            (1.0 - smooth) * f / rs.factor + smooth * f
                        };
                        scaled as f32
                    }
                }
            })
            .collect()
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

//! The model layer: load a causal language model (Hugging Face directory, GGUF file or hub id
//! from the local cache), tokenize with its chat template, generate in batches, score
//! responses (plain numbers or a differentiable tensor for DPO), mean-pool hidden states and
//! save in Hugging Face layout with a content digest.
//!
//! This crate imports no other tsr crate but `tsr-base` (digests and crash-safe writes).
//!
//! Code map:
//! - [`config`]: hyper-parameters (`config.json` in and out).
//! - `llama`: the batched forward pass (Llama / Qwen2 / Mistral), no I/O.
//! - `load_hf`, `load_gguf`, `hub`: the three ways in; `save`: the way out and the digest.
//! - [`tokenizer`]: [`ChatTokenizer`] (tokenizer + Jinja chat template + end-of-turn token).
//! - `generate`: batched sampling with a KV cache; `score`: log-probs and mean hidden states.
//! - [`testing`]: tiny random models for fast tests in any crate.
//!
//! Invariants: weights live in a [`VarMap`] under Hugging Face names, q/k in HF (half-split
//! rope) layout whatever the source; inference reads detached views of the same storage, so
//! optimizer updates are seen and no autograd graph is built; training reads the `Var`s and
//! uses only differentiable ops.

pub mod adapter;
mod alloc;
mod attention;
pub mod bench;
pub mod config;
mod device;
mod error;
pub mod export;
mod fused;
mod generate;
pub mod grad_sink;
mod hub;
mod kernels;
mod llama;
mod load_gguf;
mod load_hf;
mod logprob;
mod prefill;
pub mod projection;
pub mod rope;
mod save;
mod score;
mod skinny;
pub mod testing;
pub mod tokenizer;
mod trained;

use std::collections::HashMap;
use std::path::{Path, PathBuf};

pub use candle_core::{DType, Device, Tensor, Var};
pub use candle_nn::VarMap;

pub use adapter::{LoraAdapter, StoredAdapter};
pub use alloc::{cpu_threads, release_memory, tune_allocator, tune_runtime};
pub use config::{Arch, Config, SlidingWindow};
pub use device::parse_device;
pub use error::candle_text;
pub use error::{without_backtrace, ModelError};
pub use generate::{FinishReason, GenOutput, GenRequest, Sampling};
pub use grad_sink::GradSink;
pub use hub::resolve_hub_id;
pub use projection::Proj;
pub use rope::{Rope as RopeSettings, RopeScaling};
pub use save::write_f32_le;
pub use tokenizer::ChatTokenizer;

use llama::{Layer, Weights};

/// Where a model comes from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ModelSource {
    /// A Hugging Face model directory (config.json, *.safetensors, tokenizer files).
    HfDir(PathBuf),
    /// A GGUF file (dequantised to float on load).
    Gguf(PathBuf),
    /// `Org/Name`, looked up in the local Hugging Face cache.
    HubId(String),
}

impl ModelSource {
    /// An existing directory is an HF directory, a `*.gguf` path a GGUF file, and `Org/Name`
    /// (not an existing path) a hub id.
    pub fn parse(spec: &str) -> Result<Self, ModelError> {
        let p = Path::new(spec);
        if p.is_dir() {
            return Ok(ModelSource::HfDir(p.to_path_buf()));
        }
        if spec.to_ascii_lowercase().ends_with(".gguf") {
            return Ok(ModelSource::Gguf(p.to_path_buf()));
        }
        let parts: Vec<&str> = spec.split('/').collect();
        let ok_part = |s: &str| {
            !s.is_empty()
                && !s.starts_with('.')
                && s.chars()
                    .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
        };
        if !p.exists() && parts.len() == 2 && parts.iter().all(|s| ok_part(s)) {
            return Ok(ModelSource::HubId(spec.to_string()));
        }
        Err(ModelError::BadSource(spec.to_string()))
    }
}

impl ModelSource {
    /// The model's hyper-parameters and the size of its weight files, without loading the
    /// weights (a hub id is looked up in the local cache).
    pub fn read_config(&self) -> Result<(Config, u64), ModelError> {
        match self {
            ModelSource::HfDir(dir) => load_hf::read_config(dir),
            ModelSource::Gguf(path) => Ok((
                load_gguf::read_config(path)?,
                std::fs::metadata(path)
                    .map_err(|e| ModelError::io(path, e))?
                    .len(),
            )),
            ModelSource::HubId(id) => load_hf::read_config(&resolve_hub_id(id)?),
        }
    }
}

impl std::fmt::Display for ModelSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ModelSource::HfDir(p) | ModelSource::Gguf(p) => write!(f, "{}", p.display()),
            ModelSource::HubId(id) => write!(f, "{id}"),
        }
    }
}

/// A loaded causal language model: config, tokenizer with chat template, and weights as
/// trainable `Var`s (Hugging Face names) on one device.
pub struct LanguageModel {
    config: Config,
    tokenizer: ChatTokenizer,
    varmap: VarMap,
    device: Device,
    dtype: DType,
    /// Trainable LoRA factors over frozen base weights (`None`: every weight trains).
    lora: Option<adapter::LoraState>,
    /// How generation computes a prompt's attention ([`PromptAttention`]).
    prompt_attention: std::sync::atomic::AtomicBool,
}

/// How generation on the CPU computes the attention of a prompt's tokens (its prefill, and the
/// prefill of requests that join a running batch).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum PromptAttention {
    /// Batched products (gemm) around a softmax over every slot: the arithmetic generation has
    /// always had, whose bits depend on the CPU kind and on the prompt's batch (its padding).
    #[default]
    Batched,
    /// tsr's fused causal kernel: each token's attention over only the slots it sees, with a
    /// decode step's arithmetic, so its bits depend on neither the batch nor the CPU kind; a
    /// decode step's rows also skip their masked slots. Faster on long prompts (about 20% on
    /// 4 x 512-token prompts of SmolLM2-135M, BENCHMARKS.md). It also sends
    /// [`LanguageModel::next_token_logits`] (a logprob judge) through generation's prefill.
    /// Off the CPU, as `Batched`.
    Fused,
}

impl std::fmt::Debug for LanguageModel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LanguageModel")
            .field("config", &self.config)
            .field("device", &self.device)
            .field("dtype", &self.dtype)
            .finish()
    }
}

fn check_dtype(dtype: DType) -> Result<(), ModelError> {
    match dtype {
        DType::F32 | DType::BF16 | DType::F16 | DType::F64 => Ok(()),
        other => Err(ModelError::UnsupportedDtype {
            path: PathBuf::new(),
            tensor: String::new(),
            dtype: format!("{other:?} (compute dtype must be f32, bf16, f16 or f64)"),
        }),
    }
}

impl LanguageModel {
    /// Loads a model onto `device`, computing in `dtype` (f32 on CPU; bf16/f16 for CUDA; f64 for
    /// precise gradient checks in tests).
    pub fn load(src: &ModelSource, device: &Device, dtype: DType) -> Result<Self, ModelError> {
        check_dtype(dtype)?;
        match src {
            ModelSource::HfDir(dir) => load_hf::load(dir, device, dtype),
            ModelSource::Gguf(path) => load_gguf::load(path, device, dtype),
            ModelSource::HubId(id) => load_hf::load(&resolve_hub_id(id)?, device, dtype),
        }
    }

    /// [`load`](Self::load) keeping weight matrices that are stored in bf16 or f16 in that
    /// precision (see [`from_tensors_opts`](Self::from_tensors_opts)): how a run loads its
    /// models when `[model] dtype` holds the base in half precision.
    pub fn load_keep_half(
        src: &ModelSource,
        device: &Device,
        dtype: DType,
    ) -> Result<Self, ModelError> {
        check_dtype(dtype)?;
        match src {
            ModelSource::HfDir(dir) => load_hf::load_opts(dir, device, dtype, true),
            _ => Self::load(src, device, dtype),
        }
    }

    /// Sets how generation computes a prompt's attention from now on.
    pub fn set_prompt_attention(&self, a: PromptAttention) {
        self.prompt_attention.store(
            a == PromptAttention::Fused,
            std::sync::atomic::Ordering::Relaxed,
        );
    }

    /// How generation computes a prompt's attention.
    pub fn prompt_attention(&self) -> PromptAttention {
        if self
            .prompt_attention
            .load(std::sync::atomic::Ordering::Relaxed)
        {
            PromptAttention::Fused
        } else {
            PromptAttention::Batched
        }
    }

    /// The weight precision of the base: bf16 or f16 when its matrices are held in half
    /// precision, else the compute dtype.
    pub fn base_dtype(&self) -> DType {
        let data = self.varmap.data().lock().expect("varmap lock");
        data.values()
            .map(|v| v.dtype())
            .find(|d| matches!(d, DType::BF16 | DType::F16))
            .unwrap_or(self.dtype)
    }

    /// Holds the weight matrices in `dtype` (bf16 or f16) from now on: a frozen base at half
    /// the memory. Norms and biases keep the compute dtype.
    pub fn to_half_base(&self, dtype: DType) -> Result<(), ModelError> {
        if !matches!(dtype, DType::BF16 | DType::F16) {
            return Err(ModelError::UnsupportedDtype {
                path: PathBuf::from("<in-memory model>"),
                tensor: String::new(),
                dtype: format!("{dtype:?} (a half-precision base is bf16 or f16)"),
            });
        }
        let mut data = self.varmap.data().lock().expect("varmap lock");
        for v in data.values_mut() {
            if v.rank() == 2 {
                *v = Var::from_tensor(&v.as_tensor().to_dtype(dtype)?)?;
            }
        }
        Ok(())
    }

    /// `load(ModelSource::parse(spec), parse_device(device_spec), f32)`.
    pub fn load_str(spec: &str, device_spec: &str) -> Result<Self, ModelError> {
        let device = parse_device(device_spec)?;
        Self::load(&ModelSource::parse(spec)?, &device, DType::F32)
    }

    /// Builds a model from named tensors in Hugging Face layout, checking that every tensor
    /// the config needs is present with the right shape (`path` names the source in errors).
    /// Extra tensors (e.g. `lm_head.weight` of a tied model) are ignored.
    pub fn from_tensors(
        config: Config,
        tokenizer: ChatTokenizer,
        tensors: HashMap<String, Tensor>,
        path: &Path,
        device: &Device,
        dtype: DType,
    ) -> Result<Self, ModelError> {
        Self::from_tensors_opts(config, tokenizer, tensors, path, device, dtype, false)
    }

    /// [`from_tensors`](Self::from_tensors); with `keep_half`, weight matrices stored in bf16
    /// or f16 stay so (a frozen half-precision base: half the memory, cast to the compute
    /// dtype where used) while everything else is converted to `dtype`.
    pub fn from_tensors_opts(
        config: Config,
        tokenizer: ChatTokenizer,
        mut tensors: HashMap<String, Tensor>,
        path: &Path,
        device: &Device,
        dtype: DType,
        keep_half: bool,
    ) -> Result<Self, ModelError> {
        check_dtype(dtype)?;
        let varmap = VarMap::new();
        {
            let mut data = varmap.data().lock().expect("varmap lock");
            for (name, shape) in config.expected_tensors() {
                let t = tensors
                    .remove(&name)
                    .ok_or_else(|| ModelError::MissingTensor {
                        path: path.to_path_buf(),
                        tensor: name.clone(),
                    })?;
                if t.dims() != shape.as_slice() {
                    return Err(ModelError::ShapeMismatch {
                        path: path.to_path_buf(),
                        tensor: name,
                        got: t.dims().to_vec(),
                        expected: shape,
                    });
                }
                match t.dtype() {
                    DType::F32 | DType::BF16 | DType::F16 | DType::F64 => {}
                    other => {
                        return Err(ModelError::UnsupportedDtype {
                            path: path.to_path_buf(),
                            tensor: name,
                            dtype: format!("{other:?}"),
                        })
                    }
                }
                let half = matches!(t.dtype(), DType::BF16 | DType::F16) && t.rank() == 2;
                let t = if keep_half && half {
                    t.to_device(device)?
                } else {
                    t.to_dtype(dtype)?.to_device(device)?
                };
                data.insert(name, Var::from_tensor(&t)?);
            }
        }
        Ok(LanguageModel {
            config,
            tokenizer,
            varmap,
            device: device.clone(),
            dtype,
            lora: None,
            prompt_attention: Default::default(),
        })
    }

    /// The model's hyper-parameters.
    pub fn config(&self) -> &Config {
        &self.config
    }

    /// Tokenizer, chat template and end-of-turn token.
    pub fn tokenizer(&self) -> &ChatTokenizer {
        &self.tokenizer
    }

    /// The device the weights live on.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// The compute dtype.
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// The weights' `VarMap` (Hugging Face names).
    pub fn varmap(&self) -> &VarMap {
        &self.varmap
    }

    /// The parameters training updates, sorted by name (a stable order for optimizers and
    /// checkpoints): the LoRA factors when the model has trainable ones, else every weight.
    pub fn trainable_vars(&self) -> Vec<(String, Var)> {
        match &self.lora {
            Some(l) => l.vars(),
            None => self.vars(),
        }
    }

    /// The trainable LoRA factors, if any.
    pub fn lora(&self) -> Option<&adapter::LoraState> {
        self.lora.as_ref()
    }

    /// Every weight of the base model, sorted by name.
    pub fn vars(&self) -> Vec<(String, Var)> {
        let data = self.varmap.data().lock().expect("varmap lock");
        let mut v: Vec<(String, Var)> = data.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
        v.sort_by(|a, b| a.0.cmp(&b.0));
        v
    }

    /// Number of scalar parameters.
    pub fn num_parameters(&self) -> usize {
        self.vars().iter().map(|(_, v)| v.elem_count()).sum()
    }

    /// A deep copy with its own weight storage (e.g. the frozen DPO reference and the policy).
    pub fn clone_weights(&self) -> Result<Self, ModelError> {
        let varmap = VarMap::new();
        {
            let mut data = varmap.data().lock().expect("varmap lock");
            for (name, var) in self.vars() {
                data.insert(name, Var::from_tensor(&var.as_tensor().copy()?)?);
            }
        }
        Ok(LanguageModel {
            config: self.config.clone(),
            tokenizer: self.tokenizer.clone(),
            varmap,
            device: self.device.clone(),
            dtype: self.dtype,
            lora: self.lora.as_ref().map(|l| l.deep_copy()).transpose()?,
            prompt_attention: std::sync::atomic::AtomicBool::new(
                self.prompt_attention() == PromptAttention::Fused,
            ),
        })
    }

    /// Parameter tensors for one forward pass: `Var`s (graph-tracking, differentiable ops) or
    /// detached views of the same storage (fused inference ops).
    pub(crate) fn weights(&self, differentiable: bool) -> Result<Weights, ModelError> {
        let data = self.varmap.data().lock().expect("varmap lock");
        // With LoRA factors the base is frozen: only the factors track gradients.
        let base_tracked = differentiable && self.lora.is_none();
        let get = |name: &str| -> Result<Tensor, ModelError> {
            let var = data.get(name).ok_or_else(|| ModelError::MissingTensor {
                path: PathBuf::from("<in-memory model>"),
                tensor: name.to_string(),
            })?;
            Ok(if base_tracked {
                var.as_tensor().clone()
            } else {
                var.as_tensor().detach()
            })
        };
        let lora_of = |layer: usize, p: Proj| -> Option<(Tensor, Tensor)> {
            let l = self.lora.as_ref()?;
            let (a, b) = l.factors.get(&p.weight_name(layer))?;
            Some(if differentiable {
                (a.as_tensor().clone(), b.as_tensor().clone())
            } else {
                (a.as_tensor().detach(), b.as_tensor().detach())
            })
        };
        // Dropout on the adapters' inputs: only in a training pass with a mask seed set.
        let drop = self.lora.as_ref().and_then(|l| {
            let seed = *l.dropout_seed.lock().expect("seed lock");
            (differentiable && l.dropout > 0.0)
                .then_some(seed)
                .flatten()
                .map(|s| (l.dropout, s))
        });
        let drop_of = |layer: usize, p: Proj| -> Option<(f64, u64)> {
            let (prob, seed) = drop?;
            let k = Proj::ALL
                .iter()
                .position(|x| *x == p)
                .expect("a projection") as u64;
            let mut h = blake3::Hasher::new();
            h.update(b"tsr lora dropout");
            h.update(&seed.to_le_bytes());
            h.update(&(layer as u64).to_le_bytes());
            h.update(&k.to_le_bytes());
            let d = h.finalize();
            Some((
                prob,
                u64::from_le_bytes(d.as_bytes()[..8].try_into().expect("8 bytes")),
            ))
        };
        let cfg = &self.config;
        let src = llama::TensorSource {
            get: &get,
            lora: &lora_of,
            dropout: &drop_of,
            lora_scale: self.lora.as_ref().map_or(0.0, |l| l.scale()),
            frozen_base: differentiable && self.lora.is_some(),
        };
        let layers = (0..cfg.num_hidden_layers)
            .map(|i| Layer::load(&src, cfg, i))
            .collect::<Result<Vec<_>, _>>()?;
        let embed = get("model.embed_tokens.weight")?;
        let lm_head = if cfg.tie_word_embeddings {
            embed.clone()
        } else {
            get("lm_head.weight")?
        };
        Ok(Weights {
            cfg: cfg.clone(),
            embed,
            layers,
            norm: get("model.norm.weight")?,
            lm_head,
            differentiable,
            frozen_base: differentiable && self.lora.is_some(),
        })
    }
}

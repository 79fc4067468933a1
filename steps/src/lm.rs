//! Models as step inputs. A model in the store is four blobs in Hugging Face layout: `config`,
//! `tokenizer`, `tokenizer_config` (shared by every model of a run, from the import step) and
//! `weights` (canonical safetensors; its digest is the model's identity). A step that uses a
//! model declares inputs `<prefix>.config`, `<prefix>.tokenizer`, `<prefix>.tokenizer_config`,
//! `<prefix>.weights`; [`load`] links them into a scratch folder and loads it.
//!
//! A model made by LoRA training is a base plus an adapter: its `weights` blob is the adapter
//! (a [`StoredAdapter`], whose header names the base's digest, so its digest still identifies
//! the model) and the step also declares `<prefix>.base`, the base's weights.

use tsr_engine::{StepContext, StepError, StepInputs};
use tsr_model::{parse_device, DType, LanguageModel, LoraAdapter, ModelSource, StoredAdapter};
use tsr_state::Digest;

/// (input suffix, file name in the Hugging Face layout).
pub const MODEL_FILES: [(&str, &str); 4] = [
    ("config", "config.json"),
    ("tokenizer", "tokenizer.json"),
    ("tokenizer_config", "tokenizer_config.json"),
    ("weights", "model.safetensors"),
];

/// The digest (model identity) of the model under `prefix`.
pub fn model_digest(inputs: &StepInputs, prefix: &str) -> Result<Digest, StepError> {
    inputs.digest(&format!("{prefix}.weights"))
}

/// Load the model whose files are the inputs under `prefix`, on the step's device, with its
/// adapter (if it has one) merged in (applied unmerged over a half-precision base).
pub fn load(
    inputs: &StepInputs,
    prefix: &str,
    ctx: &StepContext,
) -> Result<LanguageModel, StepError> {
    let (model, adapter) = load_parts(inputs, prefix, ctx)?;
    let Some(a) = adapter else {
        return Ok(model);
    };
    let what = || format!("applying the adapter of model `{prefix}`");
    if model.base_dtype() != model.dtype() {
        // A half-precision base: merging would round the update to the base's precision, so
        // the adapter is applied unmerged, in f32, as DPO trains it.
        return model
            .with_trainable_adapter(&a)
            .map_err(|e| StepError::wrap(what(), e));
    }
    model
        .merge_lora(&a)
        .map_err(|e| StepError::wrap(what(), e))?;
    Ok(model)
}

/// How a generating or judging step computes its prompts' attention on the CPU: its
/// `prompt_attention` setting, in its key when set. A judge in logprob mode with `fused` takes
/// its verdict's logits from generation's prefill, the tokens its batch's prompts start with
/// computed once (the scoring forward otherwise). `batched` (also what a step's config without
/// it means; a run's config without it records `fused` for a new run): gemm's products
/// around a softmax over every slot, the arithmetic of steps made before the setting. `fused`:
/// tsr's causal kernel, each token over only the slots it sees with a decode step's
/// arithmetic (faster on long prompts; bits that depend on neither the batch nor the CPU).
#[derive(Clone, Copy, Debug, serde::Serialize, serde::Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum PromptAttention {
    Batched,
    Fused,
}

impl PromptAttention {
    /// The model layer's setting.
    pub fn model(self) -> tsr_model::PromptAttention {
        match self {
            PromptAttention::Batched => tsr_model::PromptAttention::Batched,
            PromptAttention::Fused => tsr_model::PromptAttention::Fused,
        }
    }
}

/// The precision a generation step holds its model's weight matrices in while it runs: its
/// `weights` setting, part of its key. `f16` or `bf16` reads half the bytes per generated
/// token; on the CPU the products still add in f32.
#[derive(Clone, Copy, Debug, serde::Serialize, serde::Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Weights {
    F32,
    Bf16,
    F16,
}

impl Weights {
    /// The name a config file uses.
    pub fn name(self) -> &'static str {
        match self {
            Weights::F32 => "f32",
            Weights::Bf16 => "bf16",
            Weights::F16 => "f16",
        }
    }

    /// The setting that holds weights in `dtype`, if one does.
    pub fn of(dtype: DType) -> Option<Weights> {
        [Weights::F32, Weights::Bf16, Weights::F16]
            .into_iter()
            .find(|w| w.dtype() == dtype)
    }

    /// The tensor dtype.
    pub fn dtype(self) -> DType {
        match self {
            Weights::F32 => DType::F32,
            Weights::Bf16 => DType::BF16,
            Weights::F16 => DType::F16,
        }
    }
}

/// Holds `model`'s weight matrices in `weights` (the setting of the step kind `kind`) from
/// now on; nothing to do when they already are. A base already held in half precision (`[model]
/// dtype`) is not converted again: another setting is refused, naming both.
pub fn hold_weights(model: &LanguageModel, weights: Weights, kind: &str) -> Result<(), StepError> {
    let (want, have) = (weights.dtype(), model.base_dtype());
    if want == have {
        return Ok(());
    }
    if have != model.dtype() {
        let held = Weights::of(have).map_or("another precision", Weights::name);
        return Err(StepError::Invalid(format!(
            "the {kind} step's `weights = \"{}\"` differs from its model's base, held in {held} (`[model] dtype`): set `weights = \"{held}\"` or leave it out",
            weights.name()
        )));
    }
    model
        .to_half_base(want)
        .map_err(model_err("holding the weights in half precision"))
}

/// Whether the model under `prefix` is a base plus an adapter.
pub fn has_adapter(inputs: &StepInputs, prefix: &str) -> bool {
    inputs.has(&format!("{prefix}.base"))
}

/// The digest of the base weights of the model under `prefix` (its own weights when it has no
/// adapter).
pub fn base_digest(inputs: &StepInputs, prefix: &str) -> Result<String, StepError> {
    let name = if has_adapter(inputs, prefix) {
        format!("{prefix}.base")
    } else {
        format!("{prefix}.weights")
    };
    Ok(inputs.digest(&name)?.to_hex())
}

/// The model under `prefix` as its base (loaded) and its adapter (read, checked against the
/// base's digest, not applied).
pub fn load_parts(
    inputs: &StepInputs,
    prefix: &str,
    ctx: &StepContext,
) -> Result<(LanguageModel, Option<LoraAdapter>), StepError> {
    let dir = ctx.scratch().join(format!("model-{prefix}"));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)
        .map_err(|e| StepError::io(format!("creating {}", dir.display()), e))?;
    let adapted = has_adapter(inputs, prefix);
    for (suffix, file) in MODEL_FILES {
        let suffix = if adapted && suffix == "weights" {
            "base"
        } else {
            suffix
        };
        let src = inputs.path(&format!("{prefix}.{suffix}"))?;
        let dst = dir.join(file);
        std::os::unix::fs::symlink(&src, &dst).map_err(|e| {
            StepError::io(format!("linking {} to {}", dst.display(), src.display()), e)
        })?;
    }
    let device =
        parse_device(ctx.device()).map_err(|e| StepError::wrap("choosing the device", e))?;
    // A base stored in half precision (`[model] dtype`) stays so in memory.
    let model =
        LanguageModel::load_keep_half(&ModelSource::HfDir(dir.clone()), &device, DType::F32)
            .map_err(|e| StepError::wrap(format!("loading model `{prefix}`"), e))?;
    let adapter =
        if adapted {
            let path = inputs.path(&format!("{prefix}.weights"))?;
            let base = base_digest(inputs, prefix)?;
            Some(StoredAdapter::load(&path, &base, &device).map_err(|e| {
                StepError::wrap(format!("reading the adapter of model `{prefix}`"), e)
            })?)
        } else {
            None
        };
    Ok((model, adapter))
}

pub fn model_err(what: &str) -> impl Fn(tsr_model::ModelError) -> StepError + '_ {
    move |e| StepError::wrap(what.to_string(), e)
}

/// JSONL of serializable rows.
pub fn to_jsonl<T: serde::Serialize>(rows: &[T]) -> Vec<u8> {
    let mut out = Vec::new();
    for r in rows {
        serde_json::to_writer(&mut out, r).expect("row serializes");
        out.push(b'\n');
    }
    out
}

pub fn from_jsonl<T: serde::de::DeserializeOwned>(
    bytes: &[u8],
    what: &str,
) -> Result<Vec<T>, StepError> {
    let mut rows = Vec::new();
    for (i, line) in bytes.split(|&b| b == b'\n').enumerate() {
        if line.iter().all(|b| b.is_ascii_whitespace()) {
            continue;
        }
        rows.push(serde_json::from_slice(line).map_err(|e| {
            StepError::Invalid(format!("{what}: line {} is not a valid record: {e}", i + 1))
        })?);
    }
    Ok(rows)
}

pub fn decode_item<T: serde::de::DeserializeOwned>(
    bytes: &[u8],
    what: &str,
    index: u64,
) -> Result<T, StepError> {
    serde_json::from_slice(bytes).map_err(|e| {
        StepError::Invalid(format!(
            "{what}: committed item {index} cannot be decoded: {e}"
        ))
    })
}

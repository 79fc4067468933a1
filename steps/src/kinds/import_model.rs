//! `import-model`: read the user's model (GGUF file or Hugging Face folder; a hub id is resolved
//! to a folder by the workflow), merge a PEFT LoRA adapter into it when the optional `adapter`
//! input is given, and write it in canonical Hugging Face layout. Its `weights` digest is M0's
//! identity.

use crate::lm::model_err;
use serde::Serialize;
use tsr_engine::{Step, StepContext, StepError, StepInputs, StepOutputs};
use tsr_model::{parse_device, DType, LanguageModel, ModelSource};

#[derive(Serialize)]
pub struct ImportModel {
    /// How to read the external input: `gguf` or `hf`.
    pub format: String,
    /// Hold the weight matrices in this precision (`bf16` or `f16`): a frozen base for LoRA
    /// training at half the memory. Left out of the config when f32, so imports keep their keys.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dtype: Option<String>,
}

impl Step for ImportModel {
    fn kind(&self) -> &'static str {
        "import-model"
    }
    /// Folders: 2, since RoPE settings in transformers 5's `rope_parameters` form (and every
    /// RoPE type, sliding windows) are read; version 1 fell back to theta 10000 for such
    /// models, so its imports of them must not be reused. GGUF: still 1, its reading of the
    /// file did not change, so runs from a GGUF keep their steps.
    fn version(&self) -> u32 {
        if self.format == "gguf" {
            1
        } else {
            2
        }
    }
    fn config(&self) -> serde_json::Value {
        serde_json::to_value(self).unwrap()
    }
    fn outputs(&self) -> Vec<&'static str> {
        vec!["config", "tokenizer", "tokenizer_config", "weights"]
    }
    fn run(&self, inputs: &StepInputs, ctx: &StepContext) -> Result<StepOutputs, StepError> {
        let path = inputs.path("source")?;
        let src = match self.format.as_str() {
            "gguf" => ModelSource::Gguf(path),
            _ => ModelSource::HfDir(path),
        };
        let device = parse_device("cpu").map_err(model_err("device"))?;
        // With a half-precision base, weights already stored in half stay so while loading
        // (an 8B bf16 checkpoint then never needs its f32 size).
        let half = matches!(self.dtype.as_deref(), Some("bf16") | Some("f16"));
        let model = if half {
            LanguageModel::load_keep_half(&src, &device, DType::F32)
        } else {
            LanguageModel::load(&src, &device, DType::F32)
        }
        .map_err(model_err("importing the model"))?;
        if inputs.has("adapter") {
            let dir = inputs.path("adapter")?;
            let adapter = tsr_model::LoraAdapter::load(&dir, &device)
                .map_err(model_err("reading the LoRA adapter"))?;
            model
                .merge_lora(&adapter)
                .map_err(model_err("merging the LoRA adapter"))?;
        }
        match self.dtype.as_deref() {
            None | Some("f32") => {}
            Some(d) => {
                let dt = match d {
                    "bf16" => DType::BF16,
                    "f16" => DType::F16,
                    other => {
                        return Err(StepError::Invalid(format!(
                            "dtype `{other}`: use f32, bf16 or f16"
                        )))
                    }
                };
                model
                    .to_half_base(dt)
                    .map_err(model_err("converting the weights to half precision"))?;
            }
        }
        let out = ctx.scratch().join("export");
        model
            .save_hf(&out)
            .map_err(model_err("writing the model in Hugging Face layout"))?;
        let mut o = StepOutputs::new();
        for (name, file) in crate::lm::MODEL_FILES {
            o = o.file(name, "model-file", &out.join(file));
        }
        Ok(o)
    }
}

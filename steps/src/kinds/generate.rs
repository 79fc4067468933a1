//! `generate`: K samples per prompt from one model. Item `i` is sample `i % K` of prompt
//! `i / K`; its seed derives from the step key, the prompt id and the sample index, so it does not
//! depend on batching, and a resumed step produces exactly what an uninterrupted one would.

use crate::items::{self, Model};
use crate::lm::{self, model_err};
use crate::prompts::Prompt;
use crate::records::Response;
use serde::{Deserialize, Serialize};
use tsr_engine::{Step, StepContext, StepError, StepInputs, StepOutputs};
use tsr_model::{GenRequest, Sampling};

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Generate {
    pub k: u32,
    pub max_new_tokens: usize,
    pub temperature: f64,
    pub top_p: f64,
    pub top_k: Option<usize>,
    /// Rows the model decodes at once (the KV cache's rows).
    pub batch_size: usize,
    /// Batches per commit. Above 1, the model is handed `commit_batches * batch_size` items at
    /// once and keeps `batch_size` rows busy: a row that ends takes the next waiting item
    /// (continuous batching). The commit unit is the fixed partition a resumed or sharded step
    /// computes, so the outputs stay a function of the key. Left out of the key at 1.
    #[serde(
        default = "items::one_batch",
        skip_serializing_if = "items::is_one_batch"
    )]
    pub commit_batches: usize,
    /// The precision of the weights while generating (`None`: as stored).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub weights: Option<lm::Weights>,
    /// How the model computes its prompts' attention ([`crate::lm::PromptAttention`]); left
    /// out of the key when unset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prompt_attention: Option<crate::lm::PromptAttention>,
}

impl Step for Generate {
    fn kind(&self) -> &'static str {
        "generate"
    }
    fn version(&self) -> u32 {
        // 2: decode steps on the CPU use tsr's own few-row matmul and attention kernels.
        2
    }
    fn config(&self) -> serde_json::Value {
        serde_json::to_value(self).unwrap()
    }
    fn outputs(&self) -> Vec<&'static str> {
        vec!["responses"]
    }
    fn run(&self, inputs: &StepInputs, ctx: &StepContext) -> Result<StepOutputs, StepError> {
        let rows = items::run(&self.batches(inputs)?, inputs, ctx)?;
        Ok(StepOutputs::new().bytes("responses", "responses-jsonl", lm::to_jsonl(&rows)))
    }
    items::shard_by_batches!();
}

impl Generate {
    fn batches(&self, inputs: &StepInputs) -> Result<Samples<'_>, StepError> {
        Ok(Samples {
            step: self,
            prompts: lm::from_jsonl(&inputs.bytes("prompts")?, "prompts")?,
        })
    }
}

/// Item `i`: sample `i % K` of prompt `i / K`.
struct Samples<'a> {
    step: &'a Generate,
    prompts: Vec<Prompt>,
}

impl Samples<'_> {
    fn k(&self) -> u64 {
        self.step.k.max(1) as u64
    }
}

impl items::Batches for Samples<'_> {
    type Item = Response;
    const NAME: &'static str = "generate";
    fn prompt_attention(&self) -> Option<crate::lm::PromptAttention> {
        self.step.prompt_attention
    }
    fn count(&self) -> u64 {
        self.prompts.len() as u64 * self.k()
    }
    /// The commit unit: `commit_batches` batches.
    fn batch_size(&self) -> usize {
        items::items_per_commit(self.step.batch_size, 1, self.step.commit_batches)
    }
    fn weights(&self) -> Option<lm::Weights> {
        self.step.weights
    }
    fn message(&self) -> String {
        "generating".into()
    }
    fn compute(
        &self,
        model: Model<'_>,
        idx: &[u64],
        ctx: &StepContext,
    ) -> Result<Vec<Response>, StepError> {
        let model = model.get();
        let (k, s) = (self.k(), self.step);
        let tok = model.tokenizer();
        let mut reqs = Vec::with_capacity(idx.len());
        let mut meta = Vec::with_capacity(idx.len());
        for &i in idx {
            let p = &self.prompts[(i / k) as usize];
            let sample = (i % k) as u32;
            let seed = ctx.derive_seed(&format!("sample/{}", p.id), sample as u64);
            let prompt_ids = tok
                .encode_prompt(&p.prompt)
                .map_err(model_err("encoding a prompt"))?;
            reqs.push(GenRequest {
                prompt_ids,
                max_new_tokens: s.max_new_tokens,
                sampling: Sampling::Sample {
                    temperature: s.temperature,
                    top_p: Some(s.top_p),
                    top_k: s.top_k,
                },
                seed,
            });
            meta.push((p.id.clone(), sample, seed));
        }
        let outs = items::generate(model, &reqs, s.batch_size, 1, 0, ctx)
            .map_err(model_err("generating"))?;
        Ok(outs
            .into_iter()
            .zip(meta)
            .map(|(o, (prompt_id, sample, seed))| Response {
                prompt_id,
                sample,
                seed,
                tokens: o.token_ids.len(),
                text: o.text,
                finish: match o.finished {
                    tsr_model::FinishReason::EndOfTurn => "eot".into(),
                    tsr_model::FinishReason::MaxTokens => "length".into(),
                },
            })
            .collect())
    }
}

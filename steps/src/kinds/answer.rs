//! `answer`: one response per held-out prompt from the evaluated model (greedy by default, or
//! seeded sampling), with the model's digest as its generator. Seeds derive from the step key and
//! the prompt id, so a resumed step equals an uninterrupted one.

use crate::items::{self, Model};
use crate::lm::{self, model_err};
use crate::prompts::Prompt;
use crate::records::EvalOutput;
use serde::{Deserialize, Serialize};
use tsr_engine::{Step, StepContext, StepError, StepInputs, StepOutputs};
use tsr_model::{GenRequest, Sampling};

/// `answer`: one response per prompt from the model under `model`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Answer {
    pub max_new_tokens: usize,
    /// 0: greedy (the default for evaluation); > 0: seeded sampling.
    pub temperature: f64,
    pub top_p: f64,
    /// Rows the model decodes at once (the KV cache's rows).
    pub batch_size: usize,
    /// Batches per commit, as `Generate::commit_batches` (continuous batching above 1). Left
    /// out of the key at 1.
    #[serde(
        default = "items::one_batch",
        skip_serializing_if = "items::is_one_batch"
    )]
    pub commit_batches: usize,
    /// How the model computes its prompts' attention ([`crate::lm::PromptAttention`]); left
    /// out of the key when unset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prompt_attention: Option<crate::lm::PromptAttention>,
}

impl Step for Answer {
    fn kind(&self) -> &'static str {
        "answer"
    }
    fn version(&self) -> u32 {
        // 2: decode steps on the CPU use tsr's own few-row matmul and attention kernels.
        2
    }
    fn config(&self) -> serde_json::Value {
        serde_json::to_value(self).unwrap()
    }
    fn outputs(&self) -> Vec<&'static str> {
        vec!["outputs"]
    }
    fn run(&self, inputs: &StepInputs, ctx: &StepContext) -> Result<StepOutputs, StepError> {
        let rows = items::run(&self.batches(inputs)?, inputs, ctx)?;
        Ok(StepOutputs::new().bytes("outputs", "eval-outputs-jsonl", lm::to_jsonl(&rows)))
    }
    items::shard_by_batches!();
}

impl Answer {
    fn batches(&self, inputs: &StepInputs) -> Result<Answers<'_>, StepError> {
        Ok(Answers {
            step: self,
            prompts: lm::from_jsonl(&inputs.bytes("prompts")?, "prompts")?,
            generator: lm::model_digest(inputs, "model")?.to_hex(),
        })
    }
}

/// Item `i`: the answer to prompt `i`.
struct Answers<'a> {
    step: &'a Answer,
    prompts: Vec<Prompt>,
    /// The model's digest.
    generator: String,
}

impl items::Batches for Answers<'_> {
    type Item = EvalOutput;
    const NAME: &'static str = "answer";
    fn prompt_attention(&self) -> Option<crate::lm::PromptAttention> {
        self.step.prompt_attention
    }
    fn count(&self) -> u64 {
        self.prompts.len() as u64
    }
    /// The commit unit: `commit_batches` batches.
    fn batch_size(&self) -> usize {
        items::items_per_commit(self.step.batch_size, 1, self.step.commit_batches)
    }
    fn message(&self) -> String {
        "answering evaluation prompts".into()
    }
    fn compute(
        &self,
        model: Model<'_>,
        idx: &[u64],
        ctx: &StepContext,
    ) -> Result<Vec<EvalOutput>, StepError> {
        let model = model.get();
        let st = self.step;
        let greedy = st.temperature <= 0.0;
        let tok = model.tokenizer();
        let mut reqs = Vec::with_capacity(idx.len());
        let mut seeds = Vec::with_capacity(idx.len());
        for &i in idx {
            let p = &self.prompts[i as usize];
            let seed = ctx.derive_seed(&format!("answer/{}", p.id), 0);
            reqs.push(GenRequest {
                prompt_ids: tok
                    .encode_prompt(&p.prompt)
                    .map_err(model_err("encoding a prompt"))?,
                max_new_tokens: st.max_new_tokens,
                sampling: if greedy {
                    Sampling::Greedy
                } else {
                    Sampling::Sample {
                        temperature: st.temperature,
                        top_p: Some(st.top_p),
                        top_k: None,
                    }
                },
                seed,
            });
            seeds.push((p.id.clone(), (!greedy).then_some(seed)));
        }
        let outs = items::generate(model, &reqs, st.batch_size, 1, 0, ctx)
            .map_err(model_err("answering"))?;
        Ok(outs
            .into_iter()
            .zip(seeds)
            .map(|(o, (prompt_id, seed))| EvalOutput {
                prompt_id,
                tokens: Some(o.token_ids.len()),
                output: o.text,
                generator: self.generator.clone(),
                finish: Some(
                    match o.finished {
                        tsr_model::FinishReason::EndOfTurn => "eot",
                        tsr_model::FinishReason::MaxTokens => "length",
                    }
                    .into(),
                ),
                seed,
            })
            .collect())
    }
}

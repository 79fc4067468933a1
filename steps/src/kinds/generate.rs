//! `generate`: K samples per prompt from one model. Item `i` is sample `i % K` of prompt
//! `i / K`; its seed derives from the step key, the prompt id and the sample index, so it does not
//! depend on batching, and a resumed step produces exactly what an uninterrupted one would.

use crate::lm::{self, decode_item, model_err};
use crate::prompts::Prompt;
use crate::records::Response;
use serde::Serialize;
use tsr_engine::{Step, StepContext, StepError, StepInputs, StepOutputs};
use tsr_model::{GenRequest, Sampling};

#[derive(Clone, Debug, Serialize)]
pub struct Generate {
    pub k: u32,
    pub max_new_tokens: usize,
    pub temperature: f64,
    pub top_p: f64,
    pub top_k: Option<usize>,
    pub batch_size: usize,
}

impl Step for Generate {
    fn kind(&self) -> &'static str {
        "generate"
    }
    fn version(&self) -> u32 {
        1
    }
    fn config(&self) -> serde_json::Value {
        serde_json::to_value(self).unwrap()
    }
    fn outputs(&self) -> Vec<&'static str> {
        vec!["responses"]
    }
    fn run(&self, inputs: &StepInputs, ctx: &StepContext) -> Result<StepOutputs, StepError> {
        let prompts: Vec<Prompt> = lm::from_jsonl(&inputs.bytes("prompts")?, "prompts")?;
        let k = self.k.max(1) as u64;
        let total = prompts.len() as u64 * k;
        let done = ctx.items().indices()?.len() as u64;
        let model = if done < total {
            Some(lm::load(inputs, "model", ctx)?)
        } else {
            None
        };
        ctx.progress().set_message("generating");
        ctx.for_each_batch(total, self.batch_size, |idx| {
            let model = model.as_ref().expect("model loaded when work remains");
            let tok = model.tokenizer();
            let mut reqs = Vec::with_capacity(idx.len());
            let mut meta = Vec::with_capacity(idx.len());
            for &i in idx {
                let p = &prompts[(i / k) as usize];
                let sample = (i % k) as u32;
                let seed = ctx.derive_seed(&format!("sample/{}", p.id), sample as u64);
                let prompt_ids = tok
                    .encode_prompt(&p.prompt)
                    .map_err(model_err("encoding a prompt"))?;
                reqs.push(GenRequest {
                    prompt_ids,
                    max_new_tokens: self.max_new_tokens,
                    sampling: Sampling::Sample {
                        temperature: self.temperature,
                        top_p: Some(self.top_p),
                        top_k: self.top_k,
                    },
                    seed,
                });
                meta.push((p.id.clone(), sample, seed));
            }
            let outs = model
                .generate(&reqs, self.batch_size)
                .map_err(model_err("generating"))?;
            Ok(outs
                .into_iter()
                .zip(meta)
                .map(|(o, (prompt_id, sample, seed))| {
                    let r = Response {
                        prompt_id,
                        sample,
                        seed,
                        tokens: o.token_ids.len(),
                        text: o.text,
                        finish: match o.finished {
                            tsr_model::FinishReason::EndOfTurn => "eot".into(),
                            tsr_model::FinishReason::MaxTokens => "length".into(),
                        },
                    };
                    serde_json::to_vec(&r).expect("response serializes")
                })
                .collect())
        })?;
        let mut rows: Vec<Response> = Vec::with_capacity(total as usize);
        for (i, b) in ctx.items().all()? {
            rows.push(decode_item(&b, "generate", i)?);
        }
        Ok(StepOutputs::new().bytes("responses", "responses-jsonl", lm::to_jsonl(&rows)))
    }
}

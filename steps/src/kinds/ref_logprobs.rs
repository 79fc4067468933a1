//! `ref-logprobs`: summed log-probs of each pair's chosen and rejected response under the
//! frozen reference model, computed once per pair (items) and reused by every DPO epoch and by
//! resume. The reference model's digest is recorded with the numbers.

use crate::lm::{self, decode_item, model_err};
use crate::records::Pair;
use serde::{Deserialize, Serialize};
use tsr_engine::{Step, StepContext, StepError, StepInputs, StepOutputs};

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct RefLogps {
    pub pair_id: String,
    pub chosen: f32,
    pub rejected: f32,
    pub chosen_tokens: usize,
    pub rejected_tokens: usize,
    pub reference_model: String,
}

#[derive(Clone, Debug, Serialize)]
pub struct ReferenceLogprobs {
    pub batch_size: usize,
}

/// (prompt ids, chosen ids, rejected ids) of a pair, encoded exactly as for scoring:
/// template(prompt, generation prompt) then response + end-of-turn.
pub fn encode_pair(
    tok: &tsr_model::ChatTokenizer,
    p: &Pair,
) -> Result<(Vec<u32>, Vec<u32>, Vec<u32>), StepError> {
    let prompt = tok
        .encode_prompt(&p.prompt)
        .map_err(model_err("encoding a prompt"))?;
    let chosen = tok
        .encode_response(&p.chosen.text)
        .map_err(model_err("encoding a response"))?;
    let rejected = tok
        .encode_response(&p.rejected.text)
        .map_err(model_err("encoding a response"))?;
    Ok((prompt, chosen, rejected))
}

impl Step for ReferenceLogprobs {
    fn kind(&self) -> &'static str {
        "ref-logprobs"
    }
    fn version(&self) -> u32 {
        1
    }
    fn config(&self) -> serde_json::Value {
        serde_json::to_value(self).unwrap()
    }
    fn outputs(&self) -> Vec<&'static str> {
        vec!["logps"]
    }
    fn run(&self, inputs: &StepInputs, ctx: &StepContext) -> Result<StepOutputs, StepError> {
        let pairs: Vec<Pair> = lm::from_jsonl(&inputs.bytes("pairs")?, "pairs")?;
        let digest = lm::model_digest(inputs, "model")?;
        let total = pairs.len() as u64;
        let done = ctx.items().indices()?.len() as u64;
        let model = if done < total {
            Some(lm::load(inputs, "model", ctx)?)
        } else {
            None
        };
        ctx.progress().set_message("reference log-probs");
        ctx.for_each_batch(total, self.batch_size, |idx| {
            let model = model.as_ref().expect("model loaded when work remains");
            let mut seqs = Vec::with_capacity(idx.len() * 2);
            let mut lens = Vec::with_capacity(idx.len());
            for &i in idx {
                let (p, c, r) = encode_pair(model.tokenizer(), &pairs[i as usize])?;
                lens.push((c.len(), r.len()));
                seqs.push((p.clone(), c));
                seqs.push((p, r));
            }
            let lp = model
                .logprobs(&seqs, self.batch_size * 2)
                .map_err(model_err("reference log-probs"))?;
            Ok(idx
                .iter()
                .enumerate()
                .map(|(n, &i)| {
                    serde_json::to_vec(&RefLogps {
                        pair_id: pairs[i as usize].pair_id.clone(),
                        chosen: lp[2 * n],
                        rejected: lp[2 * n + 1],
                        chosen_tokens: lens[n].0,
                        rejected_tokens: lens[n].1,
                        reference_model: digest.clone(),
                    })
                    .expect("serializes")
                })
                .collect())
        })?;
        let mut rows: Vec<RefLogps> = Vec::new();
        for (i, b) in ctx.items().all()? {
            rows.push(decode_item(&b, "ref-logprobs", i)?);
        }
        Ok(StepOutputs::new().bytes("logps", "ref-logps-jsonl", lm::to_jsonl(&rows)))
    }
}

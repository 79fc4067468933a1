//! `ref-logprobs`: summed log-probs of each pair's chosen and rejected response under the
//! frozen reference model, computed once per pair (items) and reused by every DPO epoch and by
//! resume. The reference model's digest is recorded with the numbers.

use crate::items::{self, Model};
use crate::lm::{self, model_err};
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
    #[serde(with = "tsr_state::hex")]
    pub reference_model: tsr_state::Digest,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ReferenceLogprobs {
    pub batch_size: usize,
}

/// A pair's token ids: the prompt, the chosen response and the rejected one.
pub type PairIds = (Vec<u32>, Vec<u32>, Vec<u32>);

/// (prompt ids, chosen ids, rejected ids) of a pair, encoded exactly as for scoring:
/// template(prompt, generation prompt) then response + end-of-turn.
pub fn encode_pair(tok: &tsr_model::ChatTokenizer, p: &Pair) -> Result<PairIds, StepError> {
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
        let rows = items::run(&self.batches(inputs)?, inputs, ctx)?;
        Ok(StepOutputs::new().bytes("logps", "ref-logps-jsonl", lm::to_jsonl(&rows)))
    }
    items::shard_by_batches!();
}

impl ReferenceLogprobs {
    fn batches(&self, inputs: &StepInputs) -> Result<PairLogps<'_>, StepError> {
        Ok(PairLogps {
            step: self,
            pairs: lm::from_jsonl(&inputs.bytes("pairs")?, "pairs")?,
            digest: lm::model_digest(inputs, "model")?,
        })
    }
}

/// Item `i`: the reference model's log-probabilities of both sides of pair `i`.
struct PairLogps<'a> {
    step: &'a ReferenceLogprobs,
    pairs: Vec<Pair>,
    /// The reference model's digest.
    digest: tsr_state::Digest,
}

impl items::Batches for PairLogps<'_> {
    type Item = RefLogps;
    const NAME: &'static str = "ref-logprobs";
    fn count(&self) -> u64 {
        self.pairs.len() as u64
    }
    fn batch_size(&self) -> usize {
        self.step.batch_size
    }
    fn message(&self) -> String {
        "reference log-probs".into()
    }
    fn compute(
        &self,
        model: Model<'_>,
        idx: &[u64],
        _ctx: &StepContext,
    ) -> Result<Vec<RefLogps>, StepError> {
        let model = model.get();
        let mut seqs = Vec::with_capacity(idx.len() * 2);
        let mut lens = Vec::with_capacity(idx.len());
        for &i in idx {
            let (p, c, r) = encode_pair(model.tokenizer(), &self.pairs[i as usize])?;
            lens.push((c.len(), r.len()));
            seqs.push((p.clone(), c));
            seqs.push((p, r));
        }
        let lp = model
            .logprobs(&seqs, self.step.batch_size * 2)
            .map_err(model_err("reference log-probs"))?;
        Ok(idx
            .iter()
            .enumerate()
            .map(|(n, &i)| RefLogps {
                pair_id: self.pairs[i as usize].pair_id.clone(),
                chosen: lp[2 * n],
                rejected: lp[2 * n + 1],
                chosen_tokens: lens[n].0,
                rejected_tokens: lens[n].1,
                reference_model: self.digest,
            })
            .collect())
    }
}

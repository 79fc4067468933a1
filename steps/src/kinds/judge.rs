//! `judge`: LLM-as-a-Judge over a set of responses with the additive 5-point rubric.
//!
//! - `text` mode: generate J judgements per response (seeded per response and judge sample),
//!   parse `Score: N` from each, score = mean of the parsed ones; unparseable judgements are
//!   kept verbatim and count as unscored.
//! - `logprob` mode: one forward pass per response: the judge prompt followed by the opening of
//!   the verdict, `Score: `; score = expected value of the digit tokens 0-5 under the model's
//!   next-token distribution (renormalised over those six tokens).

use crate::items::{self, Model};
use crate::lm::{self, model_err};
use crate::prompts::Prompt;
use crate::records::Judgement;
use crate::records::Response;
use crate::records::Verdict;
use crate::rules::verdict::{parse_score, render, MAX_SCORE};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use tsr_engine::{Step, StepContext, StepError, StepInputs, StepOutputs};
use tsr_model::{GenRequest, Sampling};

#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum JudgeMode {
    Text,
    Logprob,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Judge {
    pub mode: JudgeMode,
    /// J: judgements per response (text mode).
    pub samples: u32,
    pub max_new_tokens: usize,
    pub temperature: f64,
    pub top_p: f64,
    /// Requests the model decodes at once in text mode (J per response); sequences per
    /// forward pass in logprob mode.
    pub batch_size: usize,
    /// Batches per commit in text mode, as `Generate::commit_batches` (continuous batching
    /// above 1); logprob mode takes 1. Left out of the key at 1.
    #[serde(
        default = "items::one_batch",
        skip_serializing_if = "items::is_one_batch"
    )]
    pub commit_batches: usize,
    /// The rubric template (`{prompt}`, `{response}`); part of the step key.
    pub template: String,
    /// The precision of the weights while judging (`None`: as stored).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub weights: Option<crate::lm::Weights>,
    /// How the model computes its prompts' attention ([`crate::lm::PromptAttention`]); left
    /// out of the key when unset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prompt_attention: Option<crate::lm::PromptAttention>,
}

impl Judge {
    pub fn template_digest(&self) -> String {
        blake3::hash(self.template.as_bytes()).to_hex().to_string()
    }
}

impl Step for Judge {
    fn kind(&self) -> &'static str {
        "judge"
    }
    fn version(&self) -> u32 {
        // 2: decode steps on the CPU use tsr's own few-row matmul and attention kernels.
        2
    }
    fn config(&self) -> serde_json::Value {
        serde_json::to_value(self).unwrap()
    }
    fn outputs(&self) -> Vec<&'static str> {
        vec!["judgements"]
    }
    fn run(&self, inputs: &StepInputs, ctx: &StepContext) -> Result<StepOutputs, StepError> {
        let rows = items::run(&self.batches(inputs)?, inputs, ctx)?;
        Ok(StepOutputs::new().bytes("judgements", "judgements-jsonl", lm::to_jsonl(&rows)))
    }
    items::shard_by_batches!();
}

impl Judge {
    fn batches(&self, inputs: &StepInputs) -> Result<Judgements<'_>, StepError> {
        Ok(Judgements {
            step: self,
            prompts: lm::from_jsonl::<Prompt>(&inputs.bytes("prompts")?, "prompts")?
                .into_iter()
                .map(|p| (p.id.clone(), p))
                .collect(),
            responses: lm::from_jsonl(&inputs.bytes("responses")?, "responses")?,
        })
    }
}

/// Item `i`: the judgement of response `i`.
struct Judgements<'a> {
    step: &'a Judge,
    prompts: BTreeMap<String, Prompt>,
    responses: Vec<Response>,
}

impl items::Batches for Judgements<'_> {
    type Item = Judgement;
    const NAME: &'static str = "judge";
    fn prompt_attention(&self) -> Option<crate::lm::PromptAttention> {
        self.step.prompt_attention
    }
    fn count(&self) -> u64 {
        self.responses.len() as u64
    }
    /// Responses per commit: text mode makes J requests per response, `commit_batches` batches
    /// of them at a time.
    fn batch_size(&self) -> usize {
        match self.step.mode {
            JudgeMode::Text => items::items_per_commit(
                self.step.batch_size,
                self.step.samples as usize,
                self.step.commit_batches,
            ),
            JudgeMode::Logprob => self.step.batch_size.max(1),
        }
    }
    fn message(&self) -> String {
        format!("judging ({:?})", self.step.mode)
    }
    fn weights(&self) -> Option<crate::lm::Weights> {
        self.step.weights
    }
    fn compute(
        &self,
        model: Model<'_>,
        idx: &[u64],
        ctx: &StepContext,
    ) -> Result<Vec<Judgement>, StepError> {
        let model = model.get();
        let st = self.step;
        let tok = model.tokenizer();
        let mut prompt_ids = Vec::with_capacity(idx.len());
        for &i in idx {
            let r = &self.responses[i as usize];
            let p = self.prompts.get(&r.prompt_id).ok_or_else(|| {
                StepError::Invalid(format!("response for unknown prompt id `{}`", r.prompt_id))
            })?;
            let text = render(&st.template, &p.prompt, &r.text);
            prompt_ids.push(
                tok.encode_prompt(&text)
                    .map_err(model_err("encoding a judge prompt"))?,
            );
        }
        let rows: Vec<Judgement> = match st.mode {
            JudgeMode::Text => {
                let j = st.samples.max(1) as usize;
                let mut reqs = Vec::with_capacity(idx.len() * j);
                for (n, &i) in idx.iter().enumerate() {
                    let r = &self.responses[i as usize];
                    for s in 0..j {
                        reqs.push(GenRequest {
                            prompt_ids: prompt_ids[n].clone(),
                            max_new_tokens: st.max_new_tokens,
                            sampling: Sampling::Sample {
                                temperature: st.temperature,
                                top_p: Some(st.top_p),
                                top_k: None,
                            },
                            seed: ctx.derive_seed(
                                &format!("judge/{}/{}", r.prompt_id, r.sample),
                                s as u64,
                            ),
                        });
                    }
                }
                let outs = items::generate(model, &reqs, st.batch_size, j, 0, ctx)
                    .map_err(model_err("judging"))?;
                idx.iter()
                    .enumerate()
                    .map(|(n, &i)| {
                        let r = &self.responses[i as usize];
                        let texts: Vec<String> = outs[n * j..(n + 1) * j]
                            .iter()
                            .map(|o| o.text.clone())
                            .collect();
                        let verdicts: Vec<Verdict> = texts.iter().map(|t| parse_score(t)).collect();
                        let parsed: Vec<f64> = verdicts
                            .iter()
                            .filter_map(|v| v.score())
                            .map(f64::from)
                            .collect();
                        let score = (!parsed.is_empty())
                            .then(|| parsed.iter().sum::<f64>() / parsed.len() as f64);
                        Judgement {
                            prompt_id: r.prompt_id.clone(),
                            sample: r.sample,
                            texts,
                            verdicts,
                            probs: None,
                            score,
                        }
                    })
                    .collect()
            }
            JudgeMode::Logprob => {
                let opening = tok
                    .encode("Score: ")
                    .map_err(model_err("encoding the verdict opening"))?;
                let digits: Vec<u32> = (0..=MAX_SCORE)
                    .map(|d| {
                        let ids = tok.encode(&d.to_string()).map_err(model_err("encoding a digit"))?;
                        match ids.as_slice() {
                            [one] => Ok(*one),
                            _ => Err(StepError::Invalid(format!(
                                "the tokenizer splits the digit {d} into {} tokens; use judge mode `text`",
                                ids.len()
                            ))),
                        }
                    })
                    .collect::<Result<_, _>>()?;
                let seqs: Vec<Vec<u32>> = prompt_ids
                    .into_iter()
                    .map(|mut p| {
                        p.extend_from_slice(&opening);
                        p
                    })
                    .collect();
                let logps = model
                    .next_token_logprobs(&seqs, &digits, st.batch_size)
                    .map_err(model_err("scoring the verdict tokens"))?;
                idx.iter()
                    .zip(logps)
                    .map(|(&i, lp)| {
                        let r = &self.responses[i as usize];
                        let m = lp
                            .iter()
                            .cloned()
                            .fold(f64::NEG_INFINITY, |a, b| a.max(b as f64));
                        let w: Vec<f64> = lp.iter().map(|&l| (l as f64 - m).exp()).collect();
                        let z: f64 = w.iter().sum();
                        let probs: Vec<f64> = w.iter().map(|x| x / z).collect();
                        let score = probs
                            .iter()
                            .enumerate()
                            .map(|(d, p)| d as f64 * p)
                            .sum::<f64>();
                        let (score, verdicts) = if score.is_finite() {
                            (Some(score), vec![])
                        } else {
                            (
                                None,
                                vec![Verdict::Unscored(
                                    "non-finite score-token probabilities".into(),
                                )],
                            )
                        };
                        Judgement {
                            prompt_id: r.prompt_id.clone(),
                            sample: r.sample,
                            texts: vec![],
                            verdicts,
                            probs: Some(probs),
                            score,
                        }
                    })
                    .collect()
            }
        };
        Ok(rows)
    }
}

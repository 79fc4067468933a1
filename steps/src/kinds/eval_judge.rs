//! `eval-judge`: did a model get better? Held-out prompts are answered by the evaluated model
//! (`answer`) and by a baseline (`answer` or `reference-outputs`), and a fixed judge compares the
//! two answers of every prompt, as AlpacaEval does.
//!
//! Pairwise judging in both orders (position bias). A preference counts only when both orders
//! agree; orders that disagree make a tie; a verdict that cannot be read leaves the prompt
//! undecided (counted and shown, never guessed). Identical outputs are a tie without asking the
//! judge. Two modes: `text` (the judge writes, `Better: A|B` is parsed) and `logprob` (the
//! probabilities of the tokens `A` and `B` after the verdict opening `Better: `; usable with
//! small judges). Outputs: `annotations` (one per prompt, with both raw verdicts) and `summary`
//! (win rate as AlpacaEval computes it, bootstrap interval, length-controlled win rate, lengths,
//! exact match; `rules::eval`).
//!
//! Items are prompts (both orders in one item); seeds derive from the step key, the prompt id
//! and the order, so a resumed step equals an uninterrupted one.

use crate::items::{self, Model};
use crate::lm::{self, model_err};
use crate::prompts::Prompt;
use crate::records::Annotation;
use crate::records::EvalOutput;
use crate::records::MetaVerdict;
use crate::records::Order;
use crate::records::OrderVerdict;
use crate::records::Prefers;
use crate::rules::eval::combine;
use crate::rules::eval::render_placeholders;
use crate::rules::eval::summarize;
use crate::rules::eval::VERDICT_OPENING;
use crate::rules::meta_verdict::parse_better;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use tsr_engine::{Step, StepContext, StepError, StepInputs, StepOutputs};
use tsr_model::{GenRequest, Sampling};

/// `eval-judge`: a fixed judge compares the baseline's and the model's output of every prompt.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct PairwiseJudge {
    pub mode: crate::kinds::judge::JudgeMode,
    pub max_new_tokens: usize,
    /// 0: greedy verdicts (the default); > 0: seeded sampling per prompt and order.
    pub temperature: f64,
    pub top_p: f64,
    /// Requests the model decodes at once in text mode (two per prompt: both orders);
    /// sequences per forward pass in logprob mode.
    pub batch_size: usize,
    /// Batches per commit in text mode, as `Generate::commit_batches` (continuous batching
    /// above 1); logprob mode takes 1. Left out of the key at 1.
    #[serde(
        default = "items::one_batch",
        skip_serializing_if = "items::is_one_batch"
    )]
    pub commit_batches: usize,
    pub bootstrap_resamples: usize,
    /// The pairwise template; part of the step key.
    pub template: String,
    /// How the model computes its prompts' attention ([`crate::lm::PromptAttention`]); left
    /// out of the key when unset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prompt_attention: Option<crate::lm::PromptAttention>,
}

impl PairwiseJudge {
    pub fn template_digest(&self) -> String {
        blake3::hash(self.template.as_bytes()).to_hex().to_string()
    }
    fn mode_name(&self) -> &'static str {
        match self.mode {
            crate::kinds::judge::JudgeMode::Text => "text",
            crate::kinds::judge::JudgeMode::Logprob => "logprob",
        }
    }
}

pub(crate) fn read_outputs(
    inputs: &StepInputs,
    name: &str,
    prompts: &[Prompt],
) -> Result<BTreeMap<String, EvalOutput>, StepError> {
    let rows: Vec<EvalOutput> = lm::from_jsonl(&inputs.bytes(name)?, name)?;
    let map: BTreeMap<String, EvalOutput> =
        rows.into_iter().map(|r| (r.prompt_id.clone(), r)).collect();
    if let Some(p) = prompts.iter().find(|p| !map.contains_key(&p.id)) {
        return Err(StepError::Invalid(format!(
            "the {name} outputs have no output for evaluation prompt `{}`",
            p.id
        )));
    }
    Ok(map)
}

impl Step for PairwiseJudge {
    fn kind(&self) -> &'static str {
        "eval-judge"
    }
    fn version(&self) -> u32 {
        // 2: decode steps on the CPU use tsr's own few-row matmul and attention kernels.
        2
    }
    fn config(&self) -> serde_json::Value {
        serde_json::to_value(self).unwrap()
    }
    fn outputs(&self) -> Vec<&'static str> {
        vec!["annotations", "summary"]
    }
    fn run(&self, inputs: &StepInputs, ctx: &StepContext) -> Result<StepOutputs, StepError> {
        let work = self.batches(inputs)?;
        let mode = work.mode;
        let rows = items::run(&work, inputs, ctx)?;
        let Annotations {
            judge_model,
            template_digest,
            ..
        } = work;
        let summary = summarize(
            &rows,
            judge_model,
            mode,
            &template_digest,
            ctx.derive_seed("bootstrap", 0),
            self.bootstrap_resamples,
        );
        Ok(StepOutputs::new()
            .bytes("annotations", "eval-annotations-jsonl", lm::to_jsonl(&rows))
            .json("summary", &summary))
    }
    items::shard_by_batches!();
}

impl PairwiseJudge {
    fn batches(&self, inputs: &StepInputs) -> Result<Annotations<'_>, StepError> {
        let prompts: Vec<Prompt> = lm::from_jsonl(&inputs.bytes("prompts")?, "prompts")?;
        let baseline = read_outputs(inputs, "baseline", &prompts)?;
        let candidate = read_outputs(inputs, "candidate", &prompts)?;
        Ok(Annotations {
            step: self,
            prompts,
            baseline,
            candidate,
            judge_model: lm::model_digest(inputs, "model")?,
            mode: self.mode_name(),
            template_digest: self.template_digest(),
        })
    }
}

/// Item `i`: the annotation of prompt `i` (both orders judged, unless the outputs are
/// identical).
struct Annotations<'a> {
    step: &'a PairwiseJudge,
    prompts: Vec<Prompt>,
    baseline: BTreeMap<String, EvalOutput>,
    candidate: BTreeMap<String, EvalOutput>,
    judge_model: tsr_state::Digest,
    mode: &'static str,
    template_digest: String,
}

impl items::Batches for Annotations<'_> {
    type Item = Annotation;
    const NAME: &'static str = "eval-judge";
    fn prompt_attention(&self) -> Option<crate::lm::PromptAttention> {
        self.step.prompt_attention
    }
    fn count(&self) -> u64 {
        self.prompts.len() as u64
    }
    /// Prompts per commit: text mode asks twice per prompt (both orders), `commit_batches`
    /// batches of them at a time.
    fn batch_size(&self) -> usize {
        match self.step.mode {
            crate::kinds::judge::JudgeMode::Text => {
                items::items_per_commit(self.step.batch_size, 2, self.step.commit_batches)
            }
            crate::kinds::judge::JudgeMode::Logprob => self.step.batch_size.max(1),
        }
    }
    fn message(&self) -> String {
        format!("evaluating ({})", self.mode)
    }
    fn needs_model(&self) -> bool {
        self.prompts
            .iter()
            .any(|p| self.baseline[&p.id].output != self.candidate[&p.id].output)
    }
    fn compute(
        &self,
        model: Model<'_>,
        idx: &[u64],
        ctx: &StepContext,
    ) -> Result<Vec<Annotation>, StepError> {
        let st = self.step;
        // (item position, order, judge prompt ids)
        let mut asks: Vec<(usize, Order, Vec<u32>)> = Vec::new();
        for (n, &i) in idx.iter().enumerate() {
            let p = &self.prompts[i as usize];
            let (b, c) = (&self.baseline[&p.id], &self.candidate[&p.id]);
            if b.output == c.output {
                continue;
            }
            let model = model.get();
            for order in [Order::BaselineFirst, Order::ModelFirst] {
                let (a, bb) = match order {
                    Order::BaselineFirst => (&b.output, &c.output),
                    Order::ModelFirst => (&c.output, &b.output),
                };
                let text = render_placeholders(
                    &st.template,
                    &[
                        ("{instruction}", &p.prompt),
                        ("{output_a}", a),
                        ("{output_b}", bb),
                    ],
                );
                let ids = model
                    .tokenizer()
                    .encode_prompt(&text)
                    .map_err(model_err("encoding an evaluation judge prompt"))?;
                asks.push((n, order, ids));
            }
        }
        let mut verdicts: Vec<Vec<OrderVerdict>> = vec![Vec::new(); idx.len()];
        let side = |order: Order, letter: MetaVerdict| match (order, letter) {
            (Order::BaselineFirst, MetaVerdict::A) | (Order::ModelFirst, MetaVerdict::B) => {
                Prefers::Baseline
            }
            _ => Prefers::Model,
        };
        if !asks.is_empty() {
            let model = model.get();
            match st.mode {
                crate::kinds::judge::JudgeMode::Text => {
                    let reqs: Vec<GenRequest> = asks
                        .iter()
                        .map(|(n, order, ids)| GenRequest {
                            prompt_ids: ids.clone(),
                            max_new_tokens: st.max_new_tokens,
                            sampling: if st.temperature <= 0.0 {
                                Sampling::Greedy
                            } else {
                                Sampling::Sample {
                                    temperature: st.temperature,
                                    top_p: Some(st.top_p),
                                    top_k: None,
                                }
                            },
                            seed: ctx.derive_seed(
                                &format!("eval-judge/{}", self.prompts[idx[*n] as usize].id),
                                *order as u64,
                            ),
                        })
                        .collect();
                    // Items with identical outputs are settled without the judge.
                    let settled = idx.len() - asks.len() / 2;
                    let outs = items::generate(model, &reqs, st.batch_size, 2, settled, ctx)
                        .map_err(model_err("judging evaluation outputs"))?;
                    for ((n, order, _), o) in asks.iter().zip(outs) {
                        let prefers = match parse_better(&o.text) {
                            MetaVerdict::Unparsed(why) => Prefers::Unparsed(why),
                            letter => side(*order, letter),
                        };
                        verdicts[*n].push(OrderVerdict {
                            order: *order,
                            text: Some(o.text),
                            prob_a: None,
                            prob_b: None,
                            prefers,
                        });
                    }
                }
                crate::kinds::judge::JudgeMode::Logprob => {
                    let tok = model.tokenizer();
                    let opening = tok
                        .encode(VERDICT_OPENING)
                        .map_err(model_err("encoding the verdict opening"))?;
                    let letters: Vec<u32> = ["A", "B"]
                        .iter()
                        .map(|l| {
                            let ids = tok.encode(l).map_err(model_err("encoding a verdict letter"))?;
                            match ids.as_slice() {
                                [one] => Ok(*one),
                                _ => Err(StepError::Invalid(format!(
                                    "the judge's tokenizer splits `{l}` into {} tokens; use evaluation judge mode `text`",
                                    ids.len()
                                ))),
                            }
                        })
                        .collect::<Result<_, _>>()?;
                    let seqs: Vec<Vec<u32>> = asks
                        .iter()
                        .map(|(_, _, ids)| {
                            let mut s = ids.clone();
                            s.extend_from_slice(&opening);
                            s
                        })
                        .collect();
                    let lps = model
                        .next_token_logprobs(&seqs, &letters, st.batch_size)
                        .map_err(model_err("scoring the verdict letters"))?;
                    for ((n, order, _), lp) in asks.iter().zip(lps) {
                        let (la, lb) = (lp[0] as f64, lp[1] as f64);
                        let m = la.max(lb);
                        let (wa, wb) = ((la - m).exp(), (lb - m).exp());
                        let (pa, pb) = (wa / (wa + wb), wb / (wa + wb));
                        let prefers = if !(pa.is_finite() && pb.is_finite()) {
                            Prefers::Unparsed("non-finite verdict-token probabilities".into())
                        } else if pa > pb {
                            side(*order, MetaVerdict::A)
                        } else if pb > pa {
                            side(*order, MetaVerdict::B)
                        } else {
                            Prefers::Tie
                        };
                        verdicts[*n].push(OrderVerdict {
                            order: *order,
                            text: None,
                            prob_a: Some(pa),
                            prob_b: Some(pb),
                            prefers,
                        });
                    }
                }
            }
        }
        Ok(idx
            .iter()
            .zip(verdicts)
            .map(|(&i, verdicts)| {
                let p = &self.prompts[i as usize];
                let (b, c) = (&self.baseline[&p.id], &self.candidate[&p.id]);
                let (preference, decision) = if verdicts.is_empty() {
                    (Some(1.5), crate::rules::eval::IDENTICAL.to_string())
                } else {
                    combine(&verdicts)
                };
                crate::rules::eval::annotation(
                    p,
                    b,
                    c,
                    crate::rules::eval::Judged {
                        preference,
                        decision,
                        verdicts,
                        judge_model: self.judge_model,
                        mode: self.mode.to_string(),
                        template_digest: self.template_digest.clone(),
                        api: None,
                    },
                )
            })
            .collect())
    }
}

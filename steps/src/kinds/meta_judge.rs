//! `meta-judge` (Meta-Rewarding, Wu et al. 2024): the model judges its own judgements, so the
//! judge improves too. For the responses whose judge scores vary most (`judge_pairs::uncertain`)
//! the model compares the highest- and the lowest-scored judgement with the meta-judge prompt
//! (`rules::meta_verdict`), in both orders; a preference counts only when both orders agree. Each decided
//! comparison becomes a judge pair (`judge_pairs::judge_pair`).
//!
//! Items: one per uncertain response (both orders in one item); seeds derive from the step key,
//! the response (prompt id, sample) and the order, so a resumed step generates exactly what an
//! uninterrupted one would. Outputs: `pairs` (judge pairs), `comparisons` (every item, decided
//! or not) and `summary`.

use crate::items::{self, Model};
use crate::lm::{self, model_err};
use crate::prompts::Prompt;
use crate::records::Judgement;
use crate::records::Response;
use crate::rules::judge_pairs::{self, Comparison, JudgePairContext, Uncertain, UncertainSpec};
use crate::rules::meta_verdict::parse_better;
use crate::rules::meta_verdict::render_meta;
use crate::rules::verdict::render;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use tsr_engine::{Step, StepContext, StepError, StepInputs, StepOutputs};
use tsr_model::{GenRequest, Sampling};

#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct MetaSummary {
    pub responses: usize,
    /// Responses with two differing parsed judge scores.
    pub uncertain: usize,
    /// Of those, how many were meta-judged (after the caps).
    pub compared: usize,
    pub agreed: usize,
    pub disagreed: usize,
    pub unparsed: usize,
    pub pairs: usize,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct MetaJudge {
    pub iteration: u32,
    pub max_responses: usize,
    pub response_share: f64,
    pub max_per_prompt: usize,
    pub max_new_tokens: usize,
    pub temperature: f64,
    pub top_p: f64,
    /// Requests the model decodes at once (two per compared response: both orders).
    pub batch_size: usize,
    /// Batches per commit, as `Generate::commit_batches` (continuous batching above 1). Left
    /// out of the key at 1.
    #[serde(
        default = "items::one_batch",
        skip_serializing_if = "items::is_one_batch"
    )]
    pub commit_batches: usize,
    /// The meta-judge prompt; part of the step key.
    pub template: String,
    /// The judge's rubric, to render the judge prompt of each response.
    pub judge_template: String,
    /// How the model computes its prompts' attention ([`crate::lm::PromptAttention`]); left
    /// out of the key when unset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prompt_attention: Option<crate::lm::PromptAttention>,
}

impl MetaJudge {
    pub fn template_digest(&self) -> String {
        blake3::hash(self.template.as_bytes()).to_hex().to_string()
    }
    fn spec(&self) -> UncertainSpec {
        UncertainSpec {
            max_responses: self.max_responses,
            response_share: self.response_share,
            max_per_prompt: self.max_per_prompt,
        }
    }
}

impl Step for MetaJudge {
    fn kind(&self) -> &'static str {
        "meta-judge"
    }
    fn version(&self) -> u32 {
        // 2: decode steps on the CPU use tsr's own few-row matmul and attention kernels.
        2
    }
    fn config(&self) -> serde_json::Value {
        serde_json::to_value(self).unwrap()
    }
    fn outputs(&self) -> Vec<&'static str> {
        vec!["pairs", "comparisons", "summary"]
    }
    fn run(&self, inputs: &StepInputs, ctx: &StepContext) -> Result<StepOutputs, StepError> {
        let judgements = judgements_of(inputs)?;
        let uncertain = judge_pairs::uncertain(
            &judgements,
            UncertainSpec {
                max_responses: 0,
                response_share: 1.0,
                max_per_prompt: 0,
            },
        )
        .len();
        let work = self.batches(inputs, &judgements)?;
        let comparisons = items::run(&work, inputs, ctx)?;
        let generator = lm::model_digest(inputs, "generator")?;
        let judge_model = lm::model_digest(inputs, "judge")?;
        let meta_model = lm::model_digest(inputs, "model")?;
        let judge_template_digest = blake3::hash(self.judge_template.as_bytes())
            .to_hex()
            .to_string();
        let meta_template_digest = self.template_digest();
        let mut pairs = Vec::new();
        for c in &comparisons {
            let (jp, r) = work.judge_prompt(&c.prompt_id, c.sample)?;
            let x = JudgePairContext {
                iteration: self.iteration,
                judge_prompt: &jp,
                response_text: &r.text,
                generator_model: generator,
                judge_model,
                judge_template_digest: &judge_template_digest,
                meta_model,
                meta_template_digest: &meta_template_digest,
            };
            pairs.extend(judge_pairs::judge_pair(
                c,
                work.by_key[&(c.prompt_id.clone(), c.sample)],
                &x,
            ));
        }
        use judge_pairs::Decision;
        let summary = MetaSummary {
            responses: judgements.len(),
            uncertain,
            compared: comparisons.len(),
            agreed: comparisons
                .iter()
                .filter(|c| matches!(c.decision, Decision::Prefer { .. }))
                .count(),
            disagreed: comparisons
                .iter()
                .filter(|c| c.decision == Decision::Disagree)
                .count(),
            unparsed: comparisons
                .iter()
                .filter(|c| c.decision == Decision::Unparsed)
                .count(),
            pairs: pairs.len(),
        };
        Ok(StepOutputs::new()
            .bytes("pairs", "pairs-jsonl", lm::to_jsonl(&pairs))
            .bytes(
                "comparisons",
                "meta-comparisons-jsonl",
                lm::to_jsonl(&comparisons),
            )
            .json("summary", &summary))
    }
    fn shardable(&self) -> bool {
        true
    }
    fn shard(&self, inputs: &StepInputs, ctx: &StepContext) -> Result<(), StepError> {
        let judgements = judgements_of(inputs)?;
        items::compute(&self.batches(inputs, &judgements)?, inputs, ctx)
    }
}

/// The judgements to meta-judge: text-mode ones, with one verdict per written judgement.
fn judgements_of(inputs: &StepInputs) -> Result<Vec<Judgement>, StepError> {
    let judgements: Vec<Judgement> = lm::from_jsonl(&inputs.bytes("judgements")?, "judgements")?;
    if let Some(j) = judgements
        .iter()
        .find(|j| j.texts.len() != j.verdicts.len())
    {
        return Err(StepError::Invalid(format!(
            "judgement of ({}, sample {}) has {} texts but {} verdicts; the meta-judge needs text-mode judgements",
            j.prompt_id,
            j.sample,
            j.texts.len(),
            j.verdicts.len()
        )));
    }
    Ok(judgements)
}

impl MetaJudge {
    /// The uncertain responses of `judgements` to compare, with what comparing them reads.
    fn batches<'a>(
        &'a self,
        inputs: &StepInputs,
        judgements: &'a [Judgement],
    ) -> Result<Comparisons<'a>, StepError> {
        Ok(Comparisons {
            step: self,
            prompts: lm::from_jsonl::<Prompt>(&inputs.bytes("prompts")?, "prompts")?
                .into_iter()
                .map(|p| (p.id.clone(), p))
                .collect(),
            responses: lm::from_jsonl::<Response>(&inputs.bytes("responses")?, "responses")?
                .into_iter()
                .map(|r| ((r.prompt_id.clone(), r.sample), r))
                .collect(),
            by_key: judgements
                .iter()
                .map(|j| ((j.prompt_id.clone(), j.sample), j))
                .collect(),
            todo: judge_pairs::uncertain(judgements, self.spec()),
        })
    }
}

/// Item `i`: the comparison, in both orders, of the two judgements of uncertain response `i`.
struct Comparisons<'a> {
    step: &'a MetaJudge,
    prompts: BTreeMap<String, Prompt>,
    responses: BTreeMap<(String, u32), Response>,
    by_key: BTreeMap<(String, u32), &'a Judgement>,
    todo: Vec<Uncertain>,
}

impl Comparisons<'_> {
    /// The judge prompt of a response, exactly as the judge step rendered it.
    fn judge_prompt(&self, prompt_id: &str, sample: u32) -> Result<(String, &Response), StepError> {
        let p = self.prompts.get(prompt_id).ok_or_else(|| {
            StepError::Invalid(format!("judgement for unknown prompt id `{prompt_id}`"))
        })?;
        let r = self
            .responses
            .get(&(prompt_id.to_string(), sample))
            .ok_or_else(|| {
                StepError::Invalid(format!(
                    "judgement for a missing response ({prompt_id}, sample {sample})"
                ))
            })?;
        Ok((render(&self.step.judge_template, &p.prompt, &r.text), r))
    }
}

impl items::Batches for Comparisons<'_> {
    type Item = Comparison;
    const NAME: &'static str = "meta-judge";
    fn prompt_attention(&self) -> Option<crate::lm::PromptAttention> {
        self.step.prompt_attention
    }
    fn count(&self) -> u64 {
        self.todo.len() as u64
    }
    /// Responses per commit: each asks twice (both orders), `commit_batches` batches of them
    /// at a time.
    fn batch_size(&self) -> usize {
        items::items_per_commit(self.step.batch_size, 2, self.step.commit_batches)
    }
    fn message(&self) -> String {
        "meta-judging".into()
    }
    fn compute(
        &self,
        model: Model<'_>,
        idx: &[u64],
        ctx: &StepContext,
    ) -> Result<Vec<Comparison>, StepError> {
        let model = model.get();
        let st = self.step;
        let tok = model.tokenizer();
        let mut reqs = Vec::with_capacity(idx.len() * 2);
        let mut seeds = Vec::with_capacity(idx.len());
        for &i in idx {
            let u = &self.todo[i as usize];
            let j = self.by_key[&(u.prompt_id.clone(), u.sample)];
            let (jp, _) = self.judge_prompt(&u.prompt_id, u.sample)?;
            let (ta, tb) = (&j.texts[u.a], &j.texts[u.b]);
            let mut pair_seeds = [0u64; 2];
            for (order, (first, second)) in [(ta, tb), (tb, ta)].into_iter().enumerate() {
                let seed =
                    ctx.derive_seed(&format!("meta/{}/{}", u.prompt_id, u.sample), order as u64);
                pair_seeds[order] = seed;
                let text = render_meta(&st.template, &jp, first, second);
                reqs.push(GenRequest {
                    prompt_ids: tok
                        .encode_prompt(&text)
                        .map_err(model_err("encoding a meta-judge prompt"))?,
                    max_new_tokens: st.max_new_tokens,
                    sampling: Sampling::Sample {
                        temperature: st.temperature,
                        top_p: Some(st.top_p),
                        top_k: None,
                    },
                    seed,
                });
            }
            seeds.push(pair_seeds);
        }
        let outs = items::generate(model, &reqs, st.batch_size, 2, 0, ctx)
            .map_err(model_err("meta-judging"))?;
        idx.iter()
            .enumerate()
            .map(|(n, &i)| {
                let u = &self.todo[i as usize];
                let j = self.by_key[&(u.prompt_id.clone(), u.sample)];
                let texts = [outs[2 * n].text.clone(), outs[2 * n + 1].text.clone()];
                let verdicts = [parse_better(&texts[0]), parse_better(&texts[1])];
                let score = |k: usize| {
                    j.verdicts[k]
                        .score()
                        .expect("uncertain judgements are scored")
                };
                let tokens = |k: usize| {
                    tok.encode(&j.texts[k])
                        .map(|t| t.len())
                        .map_err(model_err("counting judgement tokens"))
                };
                Ok(Comparison {
                    prompt_id: u.prompt_id.clone(),
                    sample: u.sample,
                    variance: u.variance,
                    a: u.a,
                    b: u.b,
                    scores: [score(u.a), score(u.b)],
                    tokens: [tokens(u.a)?, tokens(u.b)?],
                    decision: judge_pairs::decide(&verdicts[0], &verdicts[1], u.a, u.b),
                    meta_texts: texts,
                    meta_verdicts: verdicts,
                    meta_seeds: seeds[n],
                })
            })
            .collect()
    }
}

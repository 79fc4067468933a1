//! `select`: turn judged responses into preference pairs by a rule (`rules::selection`), each pair
//! carrying its lineage: the prompt, both responses with their generator role, model digest,
//! sample index and seed, the judge (model, mode, template) with raw judgements and scores, the
//! rule and the comparison that decided it.
//!
//! With a `judge_pairs` input (the Meta-Rewarding workflows), the step also mixes in the judge
//! pairs of the `meta-judge` step, at most `judge_pair_share` of the total (see
//! `judge_pairs::mix`), so the DPO step trains on both from one `pairs` input.

use crate::lm::{self, model_digest};
use crate::prompts::Prompt;
use crate::records::JudgeInfo;
use crate::records::Judgement;
use crate::records::Pair;
use crate::records::Response;
use crate::records::Role;
use crate::records::Rule;
use crate::records::Side;
use crate::rules::selection::decide;
use crate::rules::selection::Outcome;
use crate::rules::selection::{Candidate, LengthControl, Skip};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use tsr_engine::{Resource, Step, StepContext, StepError, StepInputs, StepOutputs};

#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct SelectSummary {
    pub prompts: usize,
    pub pairs: usize,
    pub skipped_no_scored: usize,
    pub skipped_no_gap: usize,
    pub skipped_no_phase1: usize,
    pub unscored_judgements: usize,
    pub rejected_from_anchor: usize,
    pub chosen_from_future: usize,
    pub mean_chosen_score: f64,
    pub mean_rejected_score: f64,
    pub mean_chosen_tokens: f64,
    pub mean_rejected_tokens: f64,
    /// Judge pairs offered by the meta-judge and kept under the share cap (meta workflows).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub judge_pairs_offered: Option<usize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub judge_pairs_kept: Option<usize>,
}

#[derive(Clone, Debug, Serialize)]
pub struct Select {
    pub rule: Rule,
    pub length_band: Option<f64>,
    pub iteration: u32,
    pub phase: String,
    pub judge_mode: String,
    pub judge_template_digest: String,
    /// With a `judge_pairs` input: the most judge pairs may be of the total (1.0: no cap).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub judge_pair_share: Option<f64>,
}

struct Set {
    role: Role,
    model: tsr_state::Digest,
    responses: BTreeMap<(String, u32), Response>,
    judgements: BTreeMap<(String, u32), Judgement>,
}

impl Set {
    fn load(inputs: &StepInputs, prefix: &str, role: Role) -> Result<Option<Set>, StepError> {
        if !inputs.has(&format!("{prefix}_responses")) {
            return Ok(None);
        }
        let responses: Vec<Response> =
            lm::from_jsonl(&inputs.bytes(&format!("{prefix}_responses"))?, "responses")?;
        let judgements: Vec<Judgement> = lm::from_jsonl(
            &inputs.bytes(&format!("{prefix}_judgements"))?,
            "judgements",
        )?;
        Ok(Some(Set {
            role,
            model: inputs.digest(&format!("{prefix}_model"))?,
            responses: responses
                .into_iter()
                .map(|r| ((r.prompt_id.clone(), r.sample), r))
                .collect(),
            judgements: judgements
                .into_iter()
                .map(|j| ((j.prompt_id.clone(), j.sample), j))
                .collect(),
        }))
    }

    fn candidates(&self, prompt_id: &str) -> Vec<Candidate> {
        self.responses
            .range((prompt_id.to_string(), 0)..=(prompt_id.to_string(), u32::MAX))
            .map(|((_, s), r)| Candidate {
                role: self.role,
                sample: *s,
                score: self
                    .judgements
                    .get(&(prompt_id.to_string(), *s))
                    .and_then(|j| j.score),
                len: r.tokens,
            })
            .collect()
    }

    fn side(&self, prompt_id: &str, c: &Candidate) -> Side {
        let key = (prompt_id.to_string(), c.sample);
        let r = &self.responses[&key];
        let j = self.judgements.get(&key);
        Side {
            text: r.text.clone(),
            role: self.role,
            generator_model: self.model,
            sample: c.sample,
            seed: r.seed,
            tokens: r.tokens,
            judgements: j.map(|j| j.texts.clone()).unwrap_or_default(),
            scores: j
                .map(|j| j.verdicts.iter().map(|v| v.score()).collect())
                .unwrap_or_default(),
            score: c.score.unwrap_or(f64::NAN),
        }
    }

    fn unscored(&self) -> usize {
        self.judgements
            .values()
            .map(|j| j.verdicts.iter().filter(|v| v.score().is_none()).count())
            .sum()
    }
}

impl Step for Select {
    fn kind(&self) -> &'static str {
        "select"
    }
    fn version(&self) -> u32 {
        1
    }
    fn config(&self) -> serde_json::Value {
        serde_json::to_value(self).unwrap()
    }
    fn outputs(&self) -> Vec<&'static str> {
        vec!["pairs", "summary"]
    }
    fn resources(&self) -> Vec<Resource> {
        vec![]
    }
    fn run(&self, inputs: &StepInputs, ctx: &StepContext) -> Result<StepOutputs, StepError> {
        let prompts: Vec<Prompt> = lm::from_jsonl(&inputs.bytes("prompts")?, "prompts")?;
        let missing = |what: &str| {
            StepError::Invalid(format!(
                "select ({:?}) needs the {what} responses",
                self.rule
            ))
        };
        let current =
            Set::load(inputs, "current", Role::Current)?.ok_or_else(|| missing("current"))?;
        let anchor = Set::load(inputs, "anchor", Role::Anchor)?;
        let future = Set::load(inputs, "future", Role::Future)?;
        let phase1: BTreeMap<String, Pair> = if inputs.has("phase1_pairs") {
            lm::from_jsonl::<Pair>(&inputs.bytes("phase1_pairs")?, "phase-1 pairs")?
                .into_iter()
                .filter(|p| !p.is_judge())
                .map(|p| (p.prompt_id.clone(), p))
                .collect()
        } else {
            BTreeMap::new()
        };
        let judge = JudgeInfo {
            model: model_digest(inputs, "judge")?,
            mode: self.judge_mode.clone(),
            template_digest: self.judge_template_digest.clone(),
        };
        if self.rule == Rule::MetaJudge {
            return Err(StepError::Invalid("select: `meta-judge` pairs come from the meta-judge step, not from a selection rule".into()));
        }
        let lc = self.length_band.map(|band| LengthControl { band });
        let mut pairs = Vec::new();
        let mut sum = SelectSummary {
            prompts: prompts.len(),
            ..Default::default()
        };
        sum.unscored_judgements = current.unscored()
            + anchor.as_ref().map_or(0, Set::unscored)
            + future.as_ref().map_or(0, Set::unscored);
        for p in &prompts {
            let cur = current.candidates(&p.id);
            let fut_c = future.as_ref().map(|f| f.candidates(&p.id));
            let anc_c = anchor.as_ref().map(|a| a.candidates(&p.id));
            if self.rule == Rule::Anchored && anc_c.is_none() {
                return Err(missing("anchor"));
            }
            if self.rule == Rule::FutureGuided && fut_c.is_none() {
                return Err(missing("future"));
            }
            let (sel, reused_rejected) = match decide(
                self.rule,
                lc,
                &cur,
                anc_c.as_deref(),
                fut_c.as_deref(),
                phase1.get(&p.id),
            ) {
                Outcome::Pair(sel, reused) => (sel, reused),
                Outcome::NoPhase1 => {
                    sum.skipped_no_phase1 += 1;
                    continue;
                }
                Outcome::Skipped(Skip::NoScored) => {
                    sum.skipped_no_scored += 1;
                    continue;
                }
                Outcome::Skipped(Skip::NoGap { .. }) => {
                    sum.skipped_no_gap += 1;
                    continue;
                }
            };
            let set_of = |role: Role| match role {
                Role::Current => Some(&current),
                Role::Anchor => anchor.as_ref(),
                Role::Future => future.as_ref(),
            };
            let chosen = set_of(sel.chosen.role)
                .expect("chosen set present")
                .side(&p.id, &sel.chosen);
            let rejected = match reused_rejected {
                Some(r) => r,
                None => set_of(sel.rejected.role)
                    .expect("rejected set present")
                    .side(&p.id, &sel.rejected),
            };
            sum.rejected_from_anchor += (rejected.role == Role::Anchor) as usize;
            sum.chosen_from_future += (chosen.role == Role::Future) as usize;
            let pair_id = format!("i{}-{}-{}", self.iteration, self.phase, p.id);
            pairs.push(Pair {
                pair_id,
                iteration: self.iteration,
                phase: self.phase.clone(),
                prompt_id: p.id.clone(),
                prompt: p.prompt.clone(),
                prompt_digest: blake3::hash(p.prompt.as_bytes()).to_hex().to_string(),
                chosen,
                rejected,
                judge: judge.clone(),
                rule: self.rule,
                decision: sel.decision,
                kind: None,
                meta: None,
            });
        }
        sum.pairs = pairs.len();
        if !pairs.is_empty() {
            let n = pairs.len() as f64;
            sum.mean_chosen_score = pairs.iter().map(|p| p.chosen.score).sum::<f64>() / n;
            sum.mean_rejected_score = pairs.iter().map(|p| p.rejected.score).sum::<f64>() / n;
            sum.mean_chosen_tokens = pairs.iter().map(|p| p.chosen.tokens as f64).sum::<f64>() / n;
            sum.mean_rejected_tokens =
                pairs.iter().map(|p| p.rejected.tokens as f64).sum::<f64>() / n;
        }
        if inputs.has("judge_pairs") {
            let judge: Vec<Pair> = lm::from_jsonl(&inputs.bytes("judge_pairs")?, "judge pairs")?;
            if let Some(p) = judge.iter().find(|p| !p.is_judge()) {
                return Err(StepError::Invalid(format!(
                    "judge_pairs: pair {} is not a judge pair",
                    p.pair_id
                )));
            }
            sum.judge_pairs_offered = Some(judge.len());
            let share = self.judge_pair_share.unwrap_or(1.0);
            let (mixed, kept) =
                crate::rules::judge_pairs::mix(pairs, judge, share, ctx.derive_seed("mix", 0));
            sum.judge_pairs_kept = Some(kept);
            pairs = mixed;
        }
        Ok(StepOutputs::new()
            .bytes("pairs", "pairs-jsonl", lm::to_jsonl(&pairs))
            .json("summary", &sum))
    }
}

//! `meta-judge` (Meta-Rewarding, Wu et al. 2024): the model judges its own judgements, so the
//! judge improves too. For the responses whose judge scores vary most (`judge_pairs::uncertain`)
//! the model compares the highest- and the lowest-scored judgement with the meta-judge prompt
//! below, in both orders; a preference counts only when both orders agree. Each decided
//! comparison becomes a judge pair (`judge_pairs::judge_pair`).
//!
//! Items: one per uncertain response (both orders in one item); seeds derive from the step key,
//! the response (prompt id, sample) and the order, so a resumed step generates exactly what an
//! uninterrupted one would. Outputs: `pairs` (judge pairs), `comparisons` (every item, decided
//! or not) and `summary`.

use crate::generate::Response;
use crate::judge::Judgement;
use crate::judge_pairs::{self, Comparison, JudgePairContext, MetaVerdict, UncertainSpec};
use crate::judge_text::{render, MAX_JUDGEMENT_SCAN};
use crate::lm::{self, decode_item, model_err};
use crate::prompts::Prompt;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use tsr_engine::{Step, StepContext, StepError, StepInputs, StepOutputs};
use tsr_model::{GenRequest, Sampling};

/// The default meta-judge prompt. Placeholders: `{judge_prompt}` (the task the judge was given:
/// rubric, question and response), `{judgement_a}`, `{judgement_b}`.
pub const DEFAULT_META_PROMPT: &str = "A judge was given the task below and wrote two independent judgements of the same response. Decide which judgement is more accurate and better reasoned.

A good judgement applies each point of the rubric correctly to this response, notices the response's real strengths and weaknesses instead of inventing them, and gives a total that follows from its own reasoning. Do not prefer a judgement because it is longer, more confident or more generous.

<task>
{judge_prompt}
</task>

<judgement_a>
{judgement_a}
</judgement_a>

<judgement_b>
{judgement_b}
</judgement_b>

Compare the two judgements in up to 100 words, then end with a line in exactly this form:
Better: <A or B>";

pub const META_PLACEHOLDERS: [&str; 3] = ["{judge_prompt}", "{judgement_a}", "{judgement_b}"];

/// A user meta-judge template must contain the three placeholders.
pub fn check_meta_template(template: &str) -> Result<(), String> {
    match crate::judge_text::missing_placeholder(template, &META_PLACEHOLDERS) {
        Some(p) => Err(format!(
            "the meta-judge template lacks the placeholder {p}; it needs {{judge_prompt}}, {{judgement_a}} and {{judgement_b}}"
        )),
        None => Ok(()),
    }
}

/// Fill the meta-judge template, single-pass (braces inside the values are never substituted).
pub fn render_meta(template: &str, judge_prompt: &str, a: &str, b: &str) -> String {
    crate::judge_text::fill_placeholders(
        template,
        &[
            ("{judge_prompt}", judge_prompt),
            ("{judgement_a}", a),
            ("{judgement_b}", b),
        ],
    )
}

/// Find the verdict: a line starting (after markdown emphasis, `#`, `>` or `-`) with `Better`,
/// optionally `judgement`, a colon, then `A` or `B` (optionally after `judgement`) not followed
/// by a letter or digit. Case-insensitive. Several equal verdicts count once; different ones or
/// none make the output unparsed, with the reason.
pub fn parse_better(text: &str) -> MetaVerdict {
    let text = if text.len() > MAX_JUDGEMENT_SCAN {
        let mut cut = text.len() - MAX_JUDGEMENT_SCAN;
        while !text.is_char_boundary(cut) {
            cut += 1;
        }
        &text[cut..]
    } else {
        text
    };
    let skip = |s: &str| -> String {
        s.trim_start_matches(['*', '_', ' ', '\t', '"', '\'', '`', '[', '('])
            .to_string()
    };
    let mut found: Vec<MetaVerdict> = Vec::new();
    for line in text.lines() {
        let l = line.to_ascii_lowercase();
        let l = l.trim_start_matches(['*', '_', '#', '>', '-', ' ', '\t']);
        let Some(rest) = l.strip_prefix("better") else {
            continue;
        };
        let mut rest = skip(rest);
        for word in ["judgement", "judgment"] {
            if let Some(r) = rest.strip_prefix(word) {
                rest = skip(r);
            }
        }
        let Some(r) = rest.strip_prefix(':') else {
            continue;
        };
        let mut rest = skip(r);
        for word in ["judgement", "judgment"] {
            if let Some(r) = rest.strip_prefix(word) {
                rest = skip(r);
            }
        }
        let mut chars = rest.chars();
        let verdict = match chars.next() {
            Some('a') => MetaVerdict::A,
            Some('b') => MetaVerdict::B,
            _ => continue,
        };
        if chars.next().is_some_and(|c| c.is_alphanumeric()) {
            continue;
        }
        found.push(verdict);
    }
    match found.as_slice() {
        [] => MetaVerdict::Unparsed("no `Better: A` or `Better: B` line".into()),
        [first, rest @ ..] if rest.iter().any(|v| v != first) => {
            MetaVerdict::Unparsed("several different verdicts".into())
        }
        [first, ..] => first.clone(),
    }
}

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

#[derive(Clone, Debug, Serialize)]
pub struct MetaJudge {
    pub iteration: u32,
    pub max_responses: usize,
    pub response_share: f64,
    pub max_per_prompt: usize,
    pub max_new_tokens: usize,
    pub temperature: f64,
    pub top_p: f64,
    pub batch_size: usize,
    /// The meta-judge prompt; part of the step key.
    pub template: String,
    /// The judge's rubric, to render the judge prompt of each response.
    pub judge_template: String,
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
        1
    }
    fn config(&self) -> serde_json::Value {
        serde_json::to_value(self).unwrap()
    }
    fn outputs(&self) -> Vec<&'static str> {
        vec!["pairs", "comparisons", "summary"]
    }
    fn run(&self, inputs: &StepInputs, ctx: &StepContext) -> Result<StepOutputs, StepError> {
        let prompts: BTreeMap<String, Prompt> =
            lm::from_jsonl::<Prompt>(&inputs.bytes("prompts")?, "prompts")?
                .into_iter()
                .map(|p| (p.id.clone(), p))
                .collect();
        let responses: BTreeMap<(String, u32), Response> =
            lm::from_jsonl::<Response>(&inputs.bytes("responses")?, "responses")?
                .into_iter()
                .map(|r| ((r.prompt_id.clone(), r.sample), r))
                .collect();
        let judgements: Vec<Judgement> =
            lm::from_jsonl(&inputs.bytes("judgements")?, "judgements")?;
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
        let by_key: BTreeMap<(String, u32), &Judgement> = judgements
            .iter()
            .map(|j| ((j.prompt_id.clone(), j.sample), j))
            .collect();
        let todo = judge_pairs::uncertain(&judgements, self.spec());
        let uncertain = judge_pairs::uncertain(
            &judgements,
            UncertainSpec {
                max_responses: 0,
                response_share: 1.0,
                max_per_prompt: 0,
            },
        )
        .len();
        // The judge prompt of a response, exactly as the judge step rendered it.
        let judge_prompt =
            |prompt_id: &str, sample: u32| -> Result<(String, &Response), StepError> {
                let p = prompts.get(prompt_id).ok_or_else(|| {
                    StepError::Invalid(format!("judgement for unknown prompt id `{prompt_id}`"))
                })?;
                let r = responses
                    .get(&(prompt_id.to_string(), sample))
                    .ok_or_else(|| {
                        StepError::Invalid(format!(
                            "judgement for a missing response ({prompt_id}, sample {sample})"
                        ))
                    })?;
                Ok((render(&self.judge_template, &p.prompt, &r.text), r))
            };
        let total = todo.len() as u64;
        let done = ctx.items().indices()?.len() as u64;
        let model = if done < total {
            Some(lm::load(inputs, "model", ctx)?)
        } else {
            None
        };
        ctx.progress().set_message("meta-judging");
        ctx.for_each_batch(total, (self.batch_size / 2).max(1), |idx| {
            let model = model.as_ref().expect("model loaded when work remains");
            let tok = model.tokenizer();
            let mut reqs = Vec::with_capacity(idx.len() * 2);
            let mut seeds = Vec::with_capacity(idx.len());
            for &i in idx {
                let u = &todo[i as usize];
                let j = by_key[&(u.prompt_id.clone(), u.sample)];
                let (jp, _) = judge_prompt(&u.prompt_id, u.sample)?;
                let (ta, tb) = (&j.texts[u.a], &j.texts[u.b]);
                let mut pair_seeds = [0u64; 2];
                for (order, (first, second)) in [(ta, tb), (tb, ta)].into_iter().enumerate() {
                    let seed = ctx
                        .derive_seed(&format!("meta/{}/{}", u.prompt_id, u.sample), order as u64);
                    pair_seeds[order] = seed;
                    let text = render_meta(&self.template, &jp, first, second);
                    reqs.push(GenRequest {
                        prompt_ids: tok
                            .encode_prompt(&text)
                            .map_err(model_err("encoding a meta-judge prompt"))?,
                        max_new_tokens: self.max_new_tokens,
                        sampling: Sampling::Sample {
                            temperature: self.temperature,
                            top_p: Some(self.top_p),
                            top_k: None,
                        },
                        seed,
                    });
                }
                seeds.push(pair_seeds);
            }
            let outs = model
                .generate(&reqs, self.batch_size)
                .map_err(model_err("meta-judging"))?;
            idx.iter()
                .enumerate()
                .map(|(n, &i)| {
                    let u = &todo[i as usize];
                    let j = by_key[&(u.prompt_id.clone(), u.sample)];
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
                    let c = Comparison {
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
                    };
                    Ok(serde_json::to_vec(&c).expect("comparison serializes"))
                })
                .collect()
        })?;
        let mut comparisons: Vec<Comparison> = Vec::with_capacity(total as usize);
        for (i, b) in ctx.items().all()? {
            comparisons.push(decode_item(&b, "meta-judge", i)?);
        }
        let generator = lm::model_digest(inputs, "generator")?;
        let judge_model = lm::model_digest(inputs, "judge")?;
        let meta_model = lm::model_digest(inputs, "model")?;
        let judge_template_digest = blake3::hash(self.judge_template.as_bytes())
            .to_hex()
            .to_string();
        let meta_template_digest = self.template_digest();
        let mut pairs = Vec::new();
        for c in &comparisons {
            let (jp, r) = judge_prompt(&c.prompt_id, c.sample)?;
            let x = JudgePairContext {
                iteration: self.iteration,
                judge_prompt: &jp,
                response_text: &r.text,
                generator_model: &generator,
                judge_model: &judge_model,
                judge_template_digest: &judge_template_digest,
                meta_model: &meta_model,
                meta_template_digest: &meta_template_digest,
            };
            pairs.extend(judge_pairs::judge_pair(
                c,
                by_key[&(c.prompt_id.clone(), c.sample)],
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
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn verdict_forms() {
        assert_eq!(parse_better("A is vague.\nBetter: A"), MetaVerdict::A);
        assert_eq!(parse_better("**Better:** B"), MetaVerdict::B);
        assert_eq!(parse_better("better: b."), MetaVerdict::B);
        assert_eq!(parse_better("Better judgement: A"), MetaVerdict::A);
        assert_eq!(parse_better("Better: Judgement B"), MetaVerdict::B);
        assert_eq!(parse_better("## Better: **A**"), MetaVerdict::A);
        assert_eq!(parse_better("Better: (B)"), MetaVerdict::B);
        assert_eq!(parse_better("Better: A\nBetter: A"), MetaVerdict::A);
        assert_eq!(
            parse_better("  - Better: A (it follows the rubric)"),
            MetaVerdict::A
        );
    }

    #[test]
    fn unparseable_meta_judgements_are_kept_with_a_reason() {
        let un = |t: &str| matches!(parse_better(t), MetaVerdict::Unparsed(_));
        assert!(
            matches!(parse_better("I cannot decide."), MetaVerdict::Unparsed(r) if r.contains("no `Better"))
        );
        assert!(
            matches!(parse_better("Better: A\nBetter: B"), MetaVerdict::Unparsed(r) if r.contains("several"))
        );
        assert!(
            un("Better: Both"),
            "a word starting with b is not a verdict"
        );
        assert!(un("Better: AB"));
        assert!(un("Better: C"));
        assert!(un("Better: "));
        assert!(un("Better A"), "a colon is required");
        assert!(
            un("Judgement B is better: A misses the point"),
            "prose mid-line is not the verdict line"
        );
        assert!(un(""));
        assert!(un("Better:"));
        let huge = format!("{}\nBetter: B", "blah ".repeat(1_000_000));
        assert_eq!(parse_better(&huge), MetaVerdict::B);
        let multibyte = format!("{}\nBetter: A", "é".repeat(20_000));
        assert_eq!(parse_better(&multibyte), MetaVerdict::A);
        assert!(un("Better: é"));
    }

    #[test]
    fn the_meta_prompt_renders_single_pass_and_templates_are_checked() {
        let t = "T: {judge_prompt}\nA: {judgement_a}\nB: {judgement_b}\n{other}";
        assert_eq!(
            render_meta(t, "{judgement_a}", "x{judgement_b}", "y"),
            "T: {judgement_a}\nA: x{judgement_b}\nB: y\n{other}"
        );
        assert!(check_meta_template(DEFAULT_META_PROMPT).is_ok());
        assert!(check_meta_template("{judge_prompt} {judgement_a}")
            .unwrap_err()
            .contains("{judgement_b}"));
        let shown = render_meta(DEFAULT_META_PROMPT, "P", "first", "second");
        assert!(shown.find("first").unwrap() < shown.find("second").unwrap());
        assert!(shown.ends_with("Better: <A or B>"));
    }
}

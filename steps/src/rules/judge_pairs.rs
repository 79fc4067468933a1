//! Meta-Rewarding's judge preference data, as pure functions (the `meta-judge` step in
//! `kinds/meta_judge.rs` does the generation around them):
//!
//! - [`uncertain`]: the responses whose judge scores vary most across the J judge samples
//!   (population variance of the parsed scores; ties by (prompt id, sample)), capped per prompt,
//!   by count and by share.
//! - [`judgement_pair`]: the two judgements of a response to compare: the highest- and the
//!   lowest-scored (ties to the lowest judgement index); none when the scores do not differ.
//! - [`decide`]: the meta-judge is asked in both orders; a preference counts only if both orders
//!   name the same judgement (this cancels position bias).
//! - [`judge_pair`]: a decided comparison as a `Pair` whose prompt is the rendered judge prompt,
//!   so DPO trains the judging skill; its lineage says which response and which judgements.
//! - [`mix`]: actor pairs plus at most `share` of judge pairs (deterministic subsample): a large
//!   share is reported to collapse the judge into always giving the top score.

use crate::records::Judgement;
use crate::records::Verdict;
use crate::records::{JudgeInfo, Pair, PairKind, Rule, Side};
use crate::records::{JudgementRef, MetaLineage, MetaVerdict, Role};
use crate::rules::agreement::{agree, Agreement, Said};
use crate::rules::verdict::MAX_SCORE;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use tsr_state::Digest;

/// The outcome of both orders.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Decision {
    /// Both orders prefer this judgement (its index among the response's J judgements).
    Prefer { judgement: usize },
    /// Both orders parsed but named different judgements: position bias, no pair.
    Disagree,
    /// At least one order had no parseable verdict: no pair.
    Unparsed,
}

/// How many uncertain responses to keep.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct UncertainSpec {
    /// At most this many responses in all (0: no cap).
    pub max_responses: usize,
    /// At most this share of all judged responses, rounded up (1.0: no cap).
    pub response_share: f64,
    /// At most this many responses per prompt (0: no cap); Meta-Rewarding uses 1.
    pub max_per_prompt: usize,
}

/// A response chosen for meta-judging, with the two judgements to compare (`a` is shown first in
/// order "ab"; `a < b`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Uncertain {
    pub prompt_id: String,
    pub sample: u32,
    pub variance: f64,
    pub a: usize,
    pub b: usize,
}

/// Population variance of the parsed scores; `None` with fewer than two.
pub fn variance(verdicts: &[Verdict]) -> Option<f64> {
    let s: Vec<f64> = verdicts
        .iter()
        .filter_map(|v| v.score())
        .map(f64::from)
        .collect();
    if s.len() < 2 {
        return None;
    }
    let mean = s.iter().sum::<f64>() / s.len() as f64;
    Some(s.iter().map(|x| (x - mean) * (x - mean)).sum::<f64>() / s.len() as f64)
}

/// (highest-scored, lowest-scored) judgement indices, ties to the lowest index; `None` unless
/// two parsed scores differ.
pub fn judgement_pair(verdicts: &[Verdict]) -> Option<(usize, usize)> {
    let scored: Vec<(usize, u8)> = verdicts
        .iter()
        .enumerate()
        .filter_map(|(i, v)| v.score().map(|s| (i, s)))
        .collect();
    let hi = scored
        .iter()
        .fold(None::<(usize, u8)>, |m, &(i, s)| match m {
            Some((_, ms)) if ms >= s => m,
            _ => Some((i, s)),
        })?;
    let lo = scored
        .iter()
        .fold(None::<(usize, u8)>, |m, &(i, s)| match m {
            Some((_, ms)) if ms <= s => m,
            _ => Some((i, s)),
        })?;
    (hi.1 != lo.1).then_some((hi.0, lo.0))
}

/// The responses to meta-judge, most uncertain first.
pub fn uncertain(judgements: &[Judgement], spec: UncertainSpec) -> Vec<Uncertain> {
    let mut all: Vec<Uncertain> = judgements
        .iter()
        .filter_map(|j| {
            let (hi, lo) = judgement_pair(&j.verdicts)?;
            Some(Uncertain {
                prompt_id: j.prompt_id.clone(),
                sample: j.sample,
                variance: variance(&j.verdicts)?,
                a: hi.min(lo),
                b: hi.max(lo),
            })
        })
        .collect();
    all.sort_by(|x, y| {
        y.variance
            .total_cmp(&x.variance)
            .then_with(|| x.prompt_id.cmp(&y.prompt_id))
            .then(x.sample.cmp(&y.sample))
    });
    let by_share = (spec.response_share.clamp(0.0, 1.0) * judgements.len() as f64 - 1e-9)
        .ceil()
        .max(0.0) as usize;
    let cap = if spec.max_responses == 0 {
        by_share
    } else {
        spec.max_responses.min(by_share)
    };
    let mut per_prompt: BTreeMap<String, usize> = BTreeMap::new();
    let mut out = Vec::new();
    for u in all {
        if out.len() >= cap {
            break;
        }
        let n = per_prompt.entry(u.prompt_id.clone()).or_default();
        if spec.max_per_prompt != 0 && *n >= spec.max_per_prompt {
            continue;
        }
        *n += 1;
        out.push(u);
    }
    out
}

/// Combine the verdicts of order "ab" (a shown first) and order "ba" (b shown first).
pub fn decide(ab: &MetaVerdict, ba: &MetaVerdict, a: usize, b: usize) -> Decision {
    // Order "ab" shows a as A; order "ba" shows b as A.
    let said = |v: &MetaVerdict, shown_a: usize, shown_b: usize| match v {
        MetaVerdict::A => Said::Prefers(shown_a),
        MetaVerdict::B => Said::Prefers(shown_b),
        MetaVerdict::Unparsed(_) => Said::Unreadable,
    };
    match agree(&[said(ab, a, b), said(ba, b, a)]) {
        Agreement::Both(judgement) => Decision::Prefer { judgement },
        Agreement::Disagree => Decision::Disagree,
        Agreement::Unreadable(_) => Decision::Unparsed,
    }
}

/// One meta-judged response: the committed item of the `meta-judge` step.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Comparison {
    pub prompt_id: String,
    pub sample: u32,
    pub variance: f64,
    /// Judgement indices shown as A and B in order "ab" (swapped in order "ba").
    pub a: usize,
    pub b: usize,
    pub scores: [u8; 2],
    /// Token counts of judgements a and b.
    pub tokens: [usize; 2],
    /// Meta-judgements verbatim, order "ab" then order "ba".
    pub meta_texts: [String; 2],
    pub meta_verdicts: [MetaVerdict; 2],
    pub meta_seeds: [u64; 2],
    pub decision: Decision,
}

/// What a judge pair needs besides its comparison.
pub struct JudgePairContext<'a> {
    pub iteration: u32,
    /// The rendered judge prompt (rubric + question + response): the pair's prompt.
    pub judge_prompt: &'a str,
    pub response_text: &'a str,
    pub generator_model: Digest,
    pub judge_model: Digest,
    pub judge_template_digest: &'a str,
    pub meta_model: Digest,
    pub meta_template_digest: &'a str,
}

/// A decided comparison as a judge pair (`None` unless both orders agreed).
pub fn judge_pair(c: &Comparison, judgement: &Judgement, x: &JudgePairContext) -> Option<Pair> {
    let Decision::Prefer { judgement: win } = c.decision else {
        return None;
    };
    let lose = if win == c.a { c.b } else { c.a };
    let slot = |i: usize| if i == c.a { 0 } else { 1 };
    let side = |i: usize| Side {
        text: judgement.texts[i].clone(),
        role: Role::Current,
        generator_model: x.judge_model,
        sample: i as u32,
        // The judge step's seeds derive from its own key; the judgement is identified by
        // (response, index) and its text.
        seed: 0,
        tokens: c.tokens[slot(i)],
        judgements: vec![],
        scores: vec![],
        score: f64::from(c.scores[slot(i)]),
    };
    let jref = |i: usize| JudgementRef {
        index: i,
        score: c.scores[slot(i)],
        text: judgement.texts[i].clone(),
    };
    Some(Pair {
        pair_id: format!("i{}-judge-{}-{}", x.iteration, c.prompt_id, c.sample),
        iteration: x.iteration,
        phase: "judge".into(),
        prompt_id: c.prompt_id.clone(),
        prompt: x.judge_prompt.to_string(),
        prompt_digest: blake3::hash(x.judge_prompt.as_bytes()).to_hex().to_string(),
        chosen: side(win),
        rejected: side(lose),
        judge: JudgeInfo {
            model: x.meta_model,
            mode: "meta".into(),
            template_digest: x.meta_template_digest.to_string(),
        },
        rule: Rule::MetaJudge,
        decision: format!(
            "meta-judge prefers judgement {win} (score {}) over judgement {lose} (score {}) in both orders",
            c.scores[slot(win)],
            c.scores[slot(lose)]
        ),
        kind: Some(PairKind::Judge),
        meta: Some(MetaLineage {
            response_prompt_id: c.prompt_id.clone(),
            response_sample: c.sample,
            response_generator_model: x.generator_model,
            response_digest: blake3::hash(x.response_text.as_bytes()).to_hex().to_string(),
            judge_model: x.judge_model,
            judge_template_digest: x.judge_template_digest.to_string(),
            variance: c.variance,
            judgements: [jref(c.a), jref(c.b)],
            meta_model: x.meta_model,
            meta_template_digest: x.meta_template_digest.to_string(),
            meta_texts: c.meta_texts.clone(),
            meta_verdicts: c.meta_verdicts.clone(),
            meta_seeds: c.meta_seeds,
            verdict: if win == c.a { "A".into() } else { "B".into() },
        }),
    })
}

/// The most judge pairs allowed beside `actor` actor pairs so that they are at most `share` of
/// the total: floor(share * actor / (1 - share)). `share >= 1` means no cap.
pub fn judge_pair_cap(actor: usize, share: f64) -> usize {
    if share >= 1.0 {
        return usize::MAX;
    }
    if share.is_nan() || share <= 0.0 {
        return 0;
    }
    (share * actor as f64 / (1.0 - share) + 1e-9).floor() as usize
}

/// Actor pairs, then the judge pairs kept under the cap: when capped, those with the smallest
/// blake3(seed, pair id), in their original order. Returns the mix and how many judge pairs
/// were kept.
pub fn mix(actor: Vec<Pair>, judge: Vec<Pair>, share: f64, seed: u64) -> (Vec<Pair>, usize) {
    let cap = judge_pair_cap(actor.len(), share);
    let keep: Vec<Pair> = if judge.len() <= cap {
        judge
    } else {
        let rank = |p: &Pair| {
            let mut h = blake3::Hasher::new();
            h.update(&seed.to_le_bytes());
            h.update(p.pair_id.as_bytes());
            *h.finalize().as_bytes()
        };
        let mut order: Vec<(usize, [u8; 32])> = judge
            .iter()
            .enumerate()
            .map(|(i, p)| (i, rank(p)))
            .collect();
        order.sort_by(|x, y| x.1.cmp(&y.1).then(x.0.cmp(&y.0)));
        let mut chosen: Vec<usize> = order.into_iter().take(cap).map(|(i, _)| i).collect();
        chosen.sort_unstable();
        let mut judge: Vec<Option<Pair>> = judge.into_iter().map(Some).collect();
        chosen
            .into_iter()
            .map(|i| judge[i].take().expect("index taken once"))
            .collect()
    };
    let kept = keep.len();
    let mut out = actor;
    out.extend(keep);
    (out, kept)
}

/// Judge-side diagnostics of one iteration (Meta-Rewarding's collapse signals: the share of top
/// scores rising towards 1 means the judge is collapsing into always giving the top score).
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct MetaMetrics {
    pub responses: usize,
    pub judgements: usize,
    pub scored_judgements: usize,
    /// Parsed judge scores 0..=5.
    pub score_histogram: Vec<usize>,
    pub mean_judge_score: Option<f64>,
    /// Share of parsed judge scores equal to the top score.
    pub top_score_share: Option<f64>,
    pub mean_response_tokens: f64,
    /// Responses with two differing parsed judge scores, and how many were meta-judged.
    pub uncertain_responses: usize,
    pub compared: usize,
    pub agreed: usize,
    pub disagreed: usize,
    pub unparsed: usize,
    /// Of the compared, the share where both orders of the meta-judge named the same judgement.
    pub meta_agreement: Option<f64>,
    /// Of the agreed, the share where the meta-judge preferred the higher-scored judgement.
    pub prefers_higher_score: Option<f64>,
    /// Judge pairs made (before the share cap).
    pub judge_pairs: usize,
}

/// Score distribution and response length of one judged set, plus the meta-judge's counts.
pub fn meta_metrics(
    judgements: &[Judgement],
    response_tokens: &[usize],
    comparisons: &[Comparison],
    uncertain_responses: usize,
    judge_pairs: usize,
) -> MetaMetrics {
    let mut hist = vec![0usize; MAX_SCORE as usize + 1];
    let mut n = 0;
    for v in judgements.iter().flat_map(|j| j.verdicts.iter()) {
        if let Some(s) = v.score() {
            hist[s as usize] += 1;
            n += 1;
        }
    }
    let ratio = |a: usize, b: usize| (b > 0).then(|| a as f64 / b as f64);
    let agreed: Vec<&Comparison> = comparisons
        .iter()
        .filter(|c| matches!(c.decision, Decision::Prefer { .. }))
        .collect();
    let higher = agreed
        .iter()
        .filter(|c| {
            let Decision::Prefer { judgement } = c.decision else {
                unreachable!()
            };
            let (w, l) = if judgement == c.a {
                (c.scores[0], c.scores[1])
            } else {
                (c.scores[1], c.scores[0])
            };
            w > l
        })
        .count();
    MetaMetrics {
        responses: judgements.len(),
        judgements: judgements.iter().map(|j| j.verdicts.len()).sum(),
        scored_judgements: n,
        mean_judge_score: ratio(hist.iter().enumerate().map(|(s, c)| s * c).sum(), n),
        top_score_share: ratio(hist[MAX_SCORE as usize], n),
        score_histogram: hist,
        mean_response_tokens: response_tokens.iter().sum::<usize>() as f64
            / response_tokens.len().max(1) as f64,
        uncertain_responses,
        compared: comparisons.len(),
        agreed: agreed.len(),
        disagreed: comparisons
            .iter()
            .filter(|c| c.decision == Decision::Disagree)
            .count(),
        unparsed: comparisons
            .iter()
            .filter(|c| c.decision == Decision::Unparsed)
            .count(),
        meta_agreement: ratio(agreed.len(), comparisons.len()),
        prefers_higher_score: ratio(higher, agreed.len()),
        judge_pairs,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn j(prompt: &str, sample: u32, scores: &[Option<u8>]) -> Judgement {
        Judgement {
            prompt_id: prompt.into(),
            sample,
            texts: scores
                .iter()
                .enumerate()
                .map(|(i, s)| format!("judgement {i}: Score: {s:?}"))
                .collect(),
            verdicts: scores
                .iter()
                .map(|s| {
                    s.map(Verdict::Score)
                        .unwrap_or(Verdict::Unscored("none".into()))
                })
                .collect(),
            probs: None,
            score: None,
        }
    }

    fn spec(max_responses: usize, response_share: f64, max_per_prompt: usize) -> UncertainSpec {
        UncertainSpec {
            max_responses,
            response_share,
            max_per_prompt,
        }
    }

    #[test]
    fn the_judgement_pair_is_highest_vs_lowest_with_ties_to_the_lowest_index() {
        let v = |s: &[Option<u8>]| j("p", 0, s).verdicts;
        assert_eq!(
            judgement_pair(&v(&[Some(2), Some(5), Some(1), Some(5), Some(1)])),
            Some((1, 2))
        );
        assert_eq!(
            judgement_pair(&v(&[None, Some(3), None, Some(0)])),
            Some((1, 3))
        );
        assert_eq!(
            judgement_pair(&v(&[Some(4), Some(4), None])),
            None,
            "equal scores: nothing to compare"
        );
        assert_eq!(judgement_pair(&v(&[Some(4), None])), None);
        assert_eq!(judgement_pair(&v(&[None, None])), None);
        assert_eq!(variance(&v(&[Some(1), Some(3)])), Some(1.0));
        assert_eq!(variance(&v(&[Some(1), None])), None);
    }

    #[test]
    fn uncertain_responses_rank_by_variance_then_prompt_and_sample() {
        let js = vec![
            j("b", 0, &[Some(1), Some(5)]),       // variance 4
            j("a", 1, &[Some(2), Some(4)]),       // variance 1
            j("a", 0, &[Some(0), Some(4)]),       // variance 4
            j("c", 0, &[Some(3), Some(3)]),       // no spread
            j("c", 1, &[None, Some(3)]),          // one parsed
            j("a", 2, &[Some(5), None, Some(1)]), // variance 4, pair (0, 2)
        ];
        let ids = |u: &[Uncertain]| {
            u.iter()
                .map(|u| (u.prompt_id.clone(), u.sample))
                .collect::<Vec<_>>()
        };
        let all = uncertain(&js, spec(0, 1.0, 0));
        let s = |p: &str, n: u32| (p.to_string(), n);
        assert_eq!(ids(&all), vec![s("a", 0), s("a", 2), s("b", 0), s("a", 1)]);
        assert_eq!(
            (all[1].a, all[1].b),
            (0, 2),
            "a < b, whichever scored higher"
        );
        assert_eq!(
            ids(&uncertain(&js, spec(0, 1.0, 1))),
            vec![s("a", 0), s("b", 0)],
            "one per prompt"
        );
        assert_eq!(
            ids(&uncertain(&js, spec(2, 1.0, 0))),
            vec![s("a", 0), s("a", 2)]
        );
        // A share of the 6 judged responses, rounded up: 0.2 * 6 = 1.2 -> 2.
        assert_eq!(uncertain(&js, spec(0, 0.2, 0)).len(), 2);
        assert_eq!(uncertain(&js, spec(0, 0.0, 0)).len(), 0);
        assert!(uncertain(&[], spec(0, 1.0, 0)).is_empty());
        // Input order does not matter.
        let mut rev = js.clone();
        rev.reverse();
        assert_eq!(uncertain(&rev, spec(0, 1.0, 0)), all);
    }

    #[test]
    fn a_verdict_counts_only_when_both_orders_agree() {
        use MetaVerdict::*;
        let un = || Unparsed("x".into());
        // Order "ab" shows a=1 first; order "ba" shows b=4 first.
        assert_eq!(decide(&A, &B, 1, 4), Decision::Prefer { judgement: 1 });
        assert_eq!(decide(&B, &A, 1, 4), Decision::Prefer { judgement: 4 });
        assert_eq!(
            decide(&A, &A, 1, 4),
            Decision::Disagree,
            "always the first shown: position bias"
        );
        assert_eq!(decide(&B, &B, 1, 4), Decision::Disagree);
        assert_eq!(decide(&un(), &B, 1, 4), Decision::Unparsed);
        assert_eq!(decide(&A, &un(), 1, 4), Decision::Unparsed);
    }

    fn comparison(decision: Decision) -> Comparison {
        Comparison {
            prompt_id: "q1".into(),
            sample: 2,
            variance: 2.25,
            a: 0,
            b: 2,
            scores: [5, 2],
            tokens: [7, 9],
            meta_texts: ["ab text\nBetter: B".into(), "ba text\nBetter: A".into()],
            meta_verdicts: [MetaVerdict::B, MetaVerdict::A],
            meta_seeds: [11, 12],
            decision,
        }
    }

    fn ctx() -> JudgePairContext<'static> {
        JudgePairContext {
            iteration: 3,
            judge_prompt: "RUBRIC <question>q</question><response>r</response>",
            response_text: "r",
            generator_model: Digest::of(b"gen"),
            judge_model: Digest::of(b"judge"),
            judge_template_digest: "jt",
            meta_model: Digest::of(b"meta"),
            meta_template_digest: "mt",
        }
    }

    #[test]
    fn judge_pairs_carry_their_lineage() {
        let judgement = j("q1", 2, &[Some(5), Some(4), Some(2)]);
        let c = comparison(Decision::Prefer { judgement: 2 });
        let p = judge_pair(&c, &judgement, &ctx()).unwrap();
        assert_eq!(p.pair_id, "i3-judge-q1-2");
        assert_eq!(
            p.prompt,
            ctx().judge_prompt,
            "DPO trains the judging skill on the judge prompt"
        );
        assert_eq!(
            (p.chosen.text.as_str(), p.rejected.text.as_str()),
            (judgement.texts[2].as_str(), judgement.texts[0].as_str())
        );
        assert_eq!(
            (p.chosen.score, p.rejected.score),
            (2.0, 5.0),
            "the lower score may win"
        );
        assert_eq!((p.chosen.tokens, p.rejected.tokens), (9, 7));
        assert_eq!(
            (p.chosen.sample, p.chosen.generator_model),
            (2, Digest::of(b"judge"))
        );
        assert_eq!(p.kind, Some(PairKind::Judge));
        assert_eq!(p.rule, Rule::MetaJudge);
        assert_eq!(p.judge.model, Digest::of(b"meta"));
        let m = p.meta.as_ref().unwrap();
        assert_eq!(
            (m.response_prompt_id.as_str(), m.response_sample),
            ("q1", 2)
        );
        assert_eq!(m.response_generator_model, Digest::of(b"gen"));
        assert_eq!(
            m.judgements[0],
            JudgementRef {
                index: 0,
                score: 5,
                text: judgement.texts[0].clone()
            }
        );
        assert_eq!(m.judgements[1].index, 2);
        assert_eq!(m.meta_texts, c.meta_texts);
        assert_eq!(m.meta_seeds, [11, 12]);
        assert_eq!(m.verdict, "B");
        // The record round-trips through JSON, and actor pairs keep their old form.
        let back: Pair = serde_json::from_str(&serde_json::to_string(&p).unwrap()).unwrap();
        assert_eq!(back, p);
        assert!(judge_pair(&comparison(Decision::Disagree), &judgement, &ctx()).is_none());
        assert!(judge_pair(&comparison(Decision::Unparsed), &judgement, &ctx()).is_none());
    }

    fn pair(id: &str, kind: Option<PairKind>) -> Pair {
        let judgement = j("q", 0, &[Some(5), Some(1), Some(2)]);
        let mut p = judge_pair(
            &comparison(Decision::Prefer { judgement: 0 }),
            &judgement,
            &ctx(),
        )
        .unwrap();
        p.pair_id = id.into();
        p.kind = kind;
        p
    }

    #[test]
    fn the_share_cap_holds_and_subsampling_is_deterministic() {
        assert_eq!(judge_pair_cap(85, 0.15), 15, "15 of 100 is exactly 15%");
        assert_eq!(judge_pair_cap(10, 0.15), 1);
        assert_eq!(judge_pair_cap(5, 0.15), 0);
        assert_eq!(judge_pair_cap(0, 0.15), 0, "no actor pairs: no judge pairs");
        assert_eq!(judge_pair_cap(3, 0.5), 3);
        assert_eq!(judge_pair_cap(3, 0.0), 0);
        assert_eq!(judge_pair_cap(0, 1.0), usize::MAX);
        for a in 0..60 {
            let c = judge_pair_cap(a, 0.15);
            assert!(c as f64 <= 0.15 * (a + c) as f64 + 1e-9, "{a}");
            assert!(
                (c + 1) as f64 > 0.15 * (a + c + 1) as f64,
                "{a}: the cap is the largest allowed"
            );
        }
        let actor: Vec<Pair> = (0..20).map(|i| pair(&format!("act{i}"), None)).collect();
        let judge: Vec<Pair> = (0..10)
            .map(|i| pair(&format!("jp{i}"), Some(PairKind::Judge)))
            .collect();
        let (m, kept) = mix(actor.clone(), judge.clone(), 0.15, 7);
        assert_eq!(kept, 3);
        assert_eq!(m.len(), 23);
        assert_eq!(&m[..20], &actor[..]);
        let ids: Vec<&str> = m[20..].iter().map(|p| p.pair_id.as_str()).collect();
        let pos = |id: &str| judge.iter().position(|p| p.pair_id == id).unwrap();
        assert!(
            ids.windows(2).all(|w| pos(w[0]) < pos(w[1])),
            "kept in their original order: {ids:?}"
        );
        assert_eq!(
            mix(actor.clone(), judge.clone(), 0.15, 7).0,
            m,
            "same seed, same subsample"
        );
        let other = mix(actor.clone(), judge.clone(), 0.15, 8).0;
        assert_eq!(other.len(), 23);
        // Under the cap, every judge pair is kept.
        let (m, kept) = mix(actor.clone(), judge[..2].to_vec(), 0.15, 7);
        assert_eq!((m.len(), kept), (22, 2));
        assert_eq!(mix(vec![], judge.clone(), 0.15, 7), (vec![], 0));
        assert_eq!(mix(vec![], judge.clone(), 1.0, 7).1, 10);
    }

    #[test]
    fn meta_metrics_count_the_score_distribution_and_agreement() {
        let js = vec![
            j("a", 0, &[Some(5), Some(5)]),
            j("a", 1, &[Some(5), Some(1), None]),
        ];
        let mut higher = comparison(Decision::Prefer { judgement: 0 });
        higher.scores = [5, 1];
        let lower = comparison(Decision::Prefer { judgement: 2 });
        let cs = vec![
            higher,
            lower,
            comparison(Decision::Disagree),
            comparison(Decision::Unparsed),
        ];
        let m = meta_metrics(&js, &[4, 8], &cs, 5, 2);
        assert_eq!((m.responses, m.judgements, m.scored_judgements), (2, 5, 4));
        assert_eq!(m.score_histogram, vec![0, 1, 0, 0, 0, 3]);
        assert_eq!(m.top_score_share, Some(0.75));
        assert_eq!(m.mean_judge_score, Some(4.0));
        assert_eq!(m.mean_response_tokens, 6.0);
        assert_eq!(
            (m.compared, m.agreed, m.disagreed, m.unparsed),
            (4, 2, 1, 1)
        );
        assert_eq!(m.meta_agreement, Some(0.5));
        assert_eq!(m.prefers_higher_score, Some(0.5));
        let empty = meta_metrics(&[], &[], &[], 0, 0);
        assert_eq!((empty.top_score_share, empty.meta_agreement), (None, None));
    }
}

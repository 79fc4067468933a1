//! Pair selection rules, as pure functions over scored candidates of one prompt.
//!
//! - `standard` (Self-Rewarding): chosen = best of Mi, rejected = worst of Mi.
//! - `anchored` (Anchored Rejection): chosen = best of Mi; rejected = worst of the anchor (M0)
//!   if it scores below Mi's worst, else worst of Mi.
//! - `future_guided` (Future-Guided Chosen): chosen = best of Mf if it beats Mi's best (both
//!   scored by Mi), else best of Mi; rejected = the phase-1 rejected, reused.
//!
//! A pair is kept only if chosen scores strictly above rejected. Unscored candidates are never
//! chosen or rejected (treating a parse failure as the worst score is a known bug in public
//! code). Ties go to the lowest sample index, so selection is deterministic. Optional length
//! control: among candidates within `band` of the top score prefer the shortest chosen; within
//! `band` of the bottom, the longest rejected.

use crate::records::Judgement;
use crate::records::Pair;
use crate::records::Response;
use crate::records::Role;
use crate::records::Rule;
use crate::records::Side;
use serde::{Deserialize, Serialize};

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Candidate {
    pub role: Role,
    pub sample: u32,
    /// Mean judge score, `None` when every judgement was unparseable.
    pub score: Option<f64>,
    /// Response length (tokens or characters; used by length control only).
    pub len: usize,
}

#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct LengthControl {
    /// Scores within this distance of the extreme count as tied for length control.
    pub band: f64,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Selection {
    pub chosen: Candidate,
    pub rejected: Candidate,
    /// The comparison that decided it, in words (for lineage).
    pub decision: String,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum Skip {
    /// No scored candidate to choose from.
    NoScored,
    /// Chosen does not score strictly above rejected.
    NoGap { chosen: f64, rejected: f64 },
}

fn scored(c: &[Candidate]) -> impl Iterator<Item = (&Candidate, f64)> {
    c.iter()
        .filter_map(|c| c.score.filter(|s| s.is_finite()).map(|s| (c, s)))
}

/// Highest score; ties (or, with length control, scores within the band of the top) go to the
/// shortest, then to the lowest sample index.
pub fn best(c: &[Candidate], lc: Option<LengthControl>) -> Option<Candidate> {
    let top = scored(c).map(|(_, s)| s).fold(f64::NEG_INFINITY, f64::max);
    if top == f64::NEG_INFINITY {
        return None;
    }
    let mut pool: Vec<(&Candidate, f64)> = match lc {
        Some(l) => scored(c).filter(|(_, s)| *s >= top - l.band).collect(),
        None => scored(c).filter(|(_, s)| *s == top).collect(),
    };
    pool.sort_by(|a, b| {
        if lc.is_some() {
            a.0.len.cmp(&b.0.len).then(a.0.sample.cmp(&b.0.sample))
        } else {
            a.0.sample.cmp(&b.0.sample)
        }
    });
    pool.first().map(|(c, _)| (*c).clone())
}

/// Lowest score; ties (or, with length control, scores within the band of the bottom) go to
/// the longest, then to the lowest sample index.
pub fn worst(c: &[Candidate], lc: Option<LengthControl>) -> Option<Candidate> {
    let bottom = scored(c).map(|(_, s)| s).fold(f64::INFINITY, f64::min);
    if bottom == f64::INFINITY {
        return None;
    }
    let mut pool: Vec<(&Candidate, f64)> = match lc {
        Some(l) => scored(c).filter(|(_, s)| *s <= bottom + l.band).collect(),
        None => scored(c).filter(|(_, s)| *s == bottom).collect(),
    };
    pool.sort_by(|a, b| {
        if lc.is_some() {
            b.0.len.cmp(&a.0.len).then(a.0.sample.cmp(&b.0.sample))
        } else {
            a.0.sample.cmp(&b.0.sample)
        }
    });
    pool.first().map(|(c, _)| (*c).clone())
}

fn score(c: &Candidate) -> f64 {
    c.score.expect("selected candidates are scored")
}

fn keep(chosen: Candidate, rejected: Candidate, decision: String) -> Result<Selection, Skip> {
    if score(&chosen) > score(&rejected) {
        Ok(Selection {
            chosen,
            rejected,
            decision,
        })
    } else {
        Err(Skip::NoGap {
            chosen: score(&chosen),
            rejected: score(&rejected),
        })
    }
}

/// Standard Self-Rewarding: best vs worst of the current model.
pub fn standard(current: &[Candidate], lc: Option<LengthControl>) -> Result<Selection, Skip> {
    let chosen = best(current, lc).ok_or(Skip::NoScored)?;
    let rejected = worst(current, lc).ok_or(Skip::NoScored)?;
    let decision = format!(
        "best of current ({:.3}) vs worst of current ({:.3})",
        score(&chosen),
        score(&rejected)
    );
    keep(chosen, rejected, decision)
}

/// Anchored Rejection (phase 1).
pub fn anchored(
    current: &[Candidate],
    anchor: &[Candidate],
    lc: Option<LengthControl>,
) -> Result<Selection, Skip> {
    let chosen = best(current, lc).ok_or(Skip::NoScored)?;
    let worst_cur = worst(current, lc).ok_or(Skip::NoScored)?;
    let (rejected, why) = match worst(anchor, lc) {
        Some(a) if score(&a) < score(&worst_cur) => {
            let why = format!(
                "anchor worst {:.3} < current worst {:.3}: rejected from anchor",
                score(&a),
                score(&worst_cur)
            );
            (a, why)
        }
        Some(a) => {
            let why = format!(
                "anchor worst {:.3} >= current worst {:.3}: rejected from current",
                score(&a),
                score(&worst_cur)
            );
            (worst_cur, why)
        }
        None => (
            worst_cur,
            "anchor has no scored response: rejected from current".to_string(),
        ),
    };
    let decision = format!("chosen = best of current ({:.3}); {why}", score(&chosen));
    keep(chosen, rejected, decision)
}

/// Future-Guided Chosen (phase 2), reusing the phase-1 rejected.
pub fn future_guided(
    current: &[Candidate],
    future: &[Candidate],
    phase1_rejected: &Candidate,
    lc: Option<LengthControl>,
) -> Result<Selection, Skip> {
    let best_cur = best(current, lc).ok_or(Skip::NoScored)?;
    let (chosen, why) = match best(future, lc) {
        Some(f) if score(&f) > score(&best_cur) => {
            let why = format!(
                "future best {:.3} > current best {:.3}: chosen from future",
                score(&f),
                score(&best_cur)
            );
            (f, why)
        }
        Some(f) => {
            let why = format!(
                "future best {:.3} <= current best {:.3}: chosen from current",
                score(&f),
                score(&best_cur)
            );
            (best_cur, why)
        }
        None => (
            best_cur,
            "future has no scored response: chosen from current".to_string(),
        ),
    };
    let decision = format!(
        "{why}; rejected = phase-1 rejected ({:?}, {:.3})",
        phase1_rejected.role,
        score(phase1_rejected)
    );
    keep(chosen, phase1_rejected.clone(), decision)
}

/// What the selection rule made of one prompt.
#[derive(Clone, Debug, PartialEq)]
pub enum Outcome {
    /// A pair; with the future-guided rule, phase 1's rejected side it reuses.
    Pair(Selection, Option<Side>),
    /// Future-guided: phase 1 made no pair for this prompt, so there is no rejected to reuse.
    NoPhase1,
    /// No pair, and why.
    Skipped(Skip),
}

impl Outcome {
    /// The outcome in words, for lineage.
    pub fn describe(&self) -> String {
        match self {
            Outcome::Pair(sel, _) => format!("pair: {}", sel.decision),
            Outcome::NoPhase1 => {
                "no pair: phase 1 made no pair for this prompt, so there is no rejected response to reuse".into()
            }
            Outcome::Skipped(Skip::NoScored) => {
                "no pair: no response has a score (every judgement unscored)".into()
            }
            Outcome::Skipped(Skip::NoGap { chosen, rejected }) => format!(
                "no pair: the chosen candidate ({chosen:.3}) does not score above the rejected ({rejected:.3})"
            ),
        }
    }
}

/// The selection rule applied to one prompt's candidates (`anchor` / `future` as the rule
/// needs them; `phase1` the prompt's phase-1 pair for the future-guided rule). The `select`
/// step and `tsr lineage RUN prompt` both use it, so lineage explains exactly what was done.
pub fn decide(
    rule: Rule,
    lc: Option<LengthControl>,
    current: &[Candidate],
    anchor: Option<&[Candidate]>,
    future: Option<&[Candidate]>,
    phase1: Option<&Pair>,
) -> Outcome {
    let result = match rule {
        Rule::Standard => standard(current, lc).map(|s| (s, None)),
        Rule::Anchored => anchored(current, anchor.unwrap_or(&[]), lc).map(|s| (s, None)),
        Rule::FutureGuided => {
            let Some(prev) = phase1 else {
                return Outcome::NoPhase1;
            };
            let rej = Candidate {
                role: prev.rejected.role,
                sample: prev.rejected.sample,
                score: Some(prev.rejected.score),
                len: prev.rejected.tokens,
            };
            future_guided(current, future.unwrap_or(&[]), &rej, lc)
                .map(|s| (s, Some(prev.rejected.clone())))
        }
        Rule::MetaJudge => unreachable!("meta-judge pairs come from the meta-judge step"),
    };
    match result {
        Ok((sel, reused)) => Outcome::Pair(sel, reused),
        Err(skip) => Outcome::Skipped(skip),
    }
}

/// A prompt's candidates from recorded responses and judgements (as the `select` step builds
/// them).
pub fn candidates_of(
    responses: &[Response],
    judgements: &[Judgement],
    prompt_id: &str,
    role: Role,
) -> Vec<Candidate> {
    let mut v: Vec<Candidate> = responses
        .iter()
        .filter(|r| r.prompt_id == prompt_id)
        .map(|r| Candidate {
            role,
            sample: r.sample,
            score: judgements
                .iter()
                .find(|j| j.prompt_id == prompt_id && j.sample == r.sample)
                .and_then(|j| j.score),
            len: r.tokens,
        })
        .collect();
    v.sort_by_key(|c| c.sample);
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    fn c(role: Role, scores: &[Option<f64>]) -> Vec<Candidate> {
        scores
            .iter()
            .enumerate()
            .map(|(i, s)| Candidate {
                role,
                sample: i as u32,
                score: *s,
                len: 10 * (i + 1),
            })
            .collect()
    }

    #[test]
    fn standard_best_vs_worst_and_ties_to_lowest_index() {
        let cur = c(
            Role::Current,
            &[Some(3.0), Some(5.0), Some(1.0), Some(5.0), Some(1.0)],
        );
        let s = standard(&cur, None).unwrap();
        assert_eq!((s.chosen.sample, s.rejected.sample), (1, 2));
        let flat = c(Role::Current, &[Some(4.0), Some(4.0)]);
        assert_eq!(
            standard(&flat, None),
            Err(Skip::NoGap {
                chosen: 4.0,
                rejected: 4.0
            })
        );
    }

    #[test]
    fn unscored_are_never_selected() {
        let cur = c(Role::Current, &[None, Some(2.0), None, Some(4.0)]);
        let s = standard(&cur, None).unwrap();
        assert_eq!((s.chosen.sample, s.rejected.sample), (3, 1));
        assert_eq!(
            standard(&c(Role::Current, &[None, None]), None),
            Err(Skip::NoScored)
        );
    }

    #[test]
    fn anchored_each_branch() {
        let cur = c(Role::Current, &[Some(4.0), Some(2.0)]);
        // Anchor worse than current's worst: rejected from anchor.
        let s = anchored(&cur, &c(Role::Anchor, &[Some(3.0), Some(1.0)]), None).unwrap();
        assert_eq!(s.rejected.role, Role::Anchor);
        assert_eq!(s.rejected.sample, 1);
        assert!(s.decision.contains("rejected from anchor"));
        // Anchor equal to current's worst: from current (strictly below is required).
        let s = anchored(&cur, &c(Role::Anchor, &[Some(2.0)]), None).unwrap();
        assert_eq!(s.rejected.role, Role::Current);
        // Anchor all unscored: from current.
        let s = anchored(&cur, &c(Role::Anchor, &[None]), None).unwrap();
        assert_eq!(s.rejected.role, Role::Current);
        // No gap: current all equal and anchor not lower.
        let flat = c(Role::Current, &[Some(3.0), Some(3.0)]);
        assert!(anchored(&flat, &c(Role::Anchor, &[Some(3.0)]), None).is_err());
        // Anchor rescues a flat current.
        let s = anchored(&flat, &c(Role::Anchor, &[Some(1.0)]), None).unwrap();
        assert_eq!(
            (s.chosen.role, s.rejected.role),
            (Role::Current, Role::Anchor)
        );
    }

    #[test]
    fn future_guided_each_branch() {
        let cur = c(Role::Current, &[Some(3.0), Some(2.0)]);
        let rej = Candidate {
            role: Role::Anchor,
            sample: 0,
            score: Some(1.0),
            len: 5,
        };
        let s = future_guided(&cur, &c(Role::Future, &[Some(2.0), Some(4.5)]), &rej, None).unwrap();
        assert_eq!((s.chosen.role, s.chosen.sample), (Role::Future, 1));
        assert_eq!(s.rejected, rej);
        let s = future_guided(&cur, &c(Role::Future, &[Some(3.0)]), &rej, None).unwrap();
        assert_eq!(s.chosen.role, Role::Current, "a tie keeps the current best");
        let s = future_guided(&cur, &c(Role::Future, &[None]), &rej, None).unwrap();
        assert_eq!(s.chosen.role, Role::Current);
        let high_rej = Candidate {
            role: Role::Current,
            sample: 1,
            score: Some(3.0),
            len: 5,
        };
        assert!(future_guided(&cur, &c(Role::Future, &[Some(3.0)]), &high_rej, None).is_err());
    }

    #[test]
    fn length_control_prefers_short_chosen_and_long_rejected() {
        // lens: 10, 20, 30, 40
        let cur = c(Role::Current, &[Some(1.2), Some(4.8), Some(1.0), Some(5.0)]);
        let lc = Some(LengthControl { band: 0.5 });
        let s = standard(&cur, lc).unwrap();
        assert_eq!(s.chosen.sample, 1, "4.8 is within 0.5 of 5.0 and shorter");
        assert_eq!(
            s.rejected.sample, 2,
            "1.2 and 1.0 are in the band; sample 2 is longer"
        );
        let s = standard(&cur, None).unwrap();
        assert_eq!((s.chosen.sample, s.rejected.sample), (3, 2));
    }
}

//! What selection saw for one training prompt: per select step, every response of every set
//! with its generator, seed, judgements and score, and what the selection made of them (what
//! `tsr lineage RUN prompt ID` shows). The decision is recomputed from the recorded inputs with
//! the same rule, so it explains the recorded pair.

use super::{computed_by, nodes, of_kind, records, QueryError};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use tsr_state::{Digest, Store, WorkerRecord};
use tsr_steps::prompts::Prompt;
use tsr_steps::records::{Judgement, Pair, Response, Role, Rule, Verdict};
use tsr_steps::rules::selection::{candidates_of, decide, Candidate, LengthControl};

/// One training prompt through every selection of the run.
#[derive(Clone, Debug, Serialize)]
pub struct PromptLineage {
    pub prompt_id: String,
    pub prompt: String,
    pub phases: Vec<PhaseView>,
}

/// One select step's view of the prompt.
#[derive(Clone, Debug, Serialize)]
pub struct PhaseView {
    pub iteration: u32,
    pub phase: String,
    pub node: String,
    pub rule: Rule,
    pub sets: Vec<SetView>,
    /// The selection's decision, in words.
    pub decision: String,
    /// The pair it made, if any.
    pub pair_id: Option<String>,
}

/// The responses of one generator (`current`, `anchor` or `future`) to the prompt.
#[derive(Clone, Debug, Serialize)]
pub struct SetView {
    pub set: String,
    #[serde(with = "tsr_state::hex::option")]
    pub generator_model: Option<Digest>,
    pub responses: Vec<ResponseView>,
}

#[derive(Clone, Debug, Serialize)]
pub struct ResponseView {
    pub sample: u32,
    pub seed: u64,
    pub tokens: usize,
    pub finish: String,
    pub text: String,
    pub score: Option<f64>,
    pub judgements: Option<JudgementView>,
    /// Who generated it (where the store kept it).
    pub generated_by: Option<WorkerRecord>,
}

#[derive(Clone, Debug, Serialize)]
pub struct JudgementView {
    pub texts: Vec<String>,
    pub verdicts: Vec<Verdict>,
    pub probs: Option<Vec<f64>>,
    /// Who judged it (where the store kept it).
    pub judged_by: Option<WorkerRecord>,
}

/// The part of a select step's config the decision needs.
#[derive(Deserialize)]
struct SelectConfig {
    rule: Rule,
    length_band: Option<f64>,
    iteration: u32,
    phase: String,
}

/// The records that pass `keep`, each with its position among all of them.
fn positioned<T>(all: Vec<T>, keep: impl Fn(&T) -> bool) -> (Vec<u64>, Vec<T>) {
    all.into_iter()
        .enumerate()
        .filter(|(_, r)| keep(r))
        .map(|(i, r)| (i as u64, r))
        .unzip()
}

/// The training prompt `id` through every finished select step of the run.
pub fn prompt_lineage(store: &Store, run: &str, id: &str) -> Result<PromptLineage, QueryError> {
    let nodes = nodes(store, run)?;
    let mut selects = of_kind(&nodes, "select");
    selects.retain(|n| n.is_done());
    if selects.is_empty() {
        return Err(QueryError::NoSelection {
            run: run.to_string(),
        });
    }
    let mut prompt_text: Option<String> = None;
    let mut phases = Vec::new();
    for n in &selects {
        let cfg: SelectConfig =
            serde_json::from_str(&n.step.config).map_err(|source| QueryError::Config {
                what: "select step's config",
                node: n.node.clone(),
                source,
            })?;
        let inputs = &n.step.inputs;
        if prompt_text.is_none() {
            if let Some(d) = inputs.get("prompts") {
                prompt_text = records::<Prompt>(store, d, "prompt")?
                    .into_iter()
                    .find(|p| p.id == id)
                    .map(|p| p.prompt);
            }
        }
        let mut sets = Vec::new();
        let mut cands: BTreeMap<&str, Vec<Candidate>> = BTreeMap::new();
        for (prefix, role) in [
            ("current", Role::Current),
            ("anchor", Role::Anchor),
            ("future", Role::Future),
        ] {
            let (Some(rd), Some(jd)) = (
                inputs.get(&format!("{prefix}_responses")),
                inputs.get(&format!("{prefix}_judgements")),
            ) else {
                continue;
            };
            // Each with its position in its blob: the item index of the step that made it.
            let (positions, responses) =
                positioned(records::<Response>(store, rd, "response")?, |r| {
                    r.prompt_id == id
                });
            let (judged_at, judgements) =
                positioned(records::<Judgement>(store, jd, "judgement")?, |j| {
                    j.prompt_id == id
                });
            let (generators, judges) = (computed_by(store, rd)?, computed_by(store, jd)?);
            cands.insert(prefix, candidates_of(&responses, &judgements, id, role));
            let responses = responses
                .iter()
                .zip(&positions)
                .map(|(r, at)| {
                    let j = judgements
                        .iter()
                        .zip(&judged_at)
                        .find(|(j, _)| j.sample == r.sample);
                    let (j, judged_by) = match j {
                        Some((j, at)) => (Some(j), judges.get(at).cloned()),
                        None => (None, None),
                    };
                    ResponseView {
                        sample: r.sample,
                        seed: r.seed,
                        tokens: r.tokens,
                        finish: r.finish.clone(),
                        text: r.text.clone(),
                        score: j.and_then(|j| j.score),
                        judgements: j.map(|j| JudgementView {
                            texts: j.texts.clone(),
                            verdicts: j.verdicts.clone(),
                            probs: j.probs.clone(),
                            judged_by,
                        }),
                        generated_by: generators.get(at).cloned(),
                    }
                })
                .collect();
            sets.push(SetView {
                set: prefix.to_string(),
                generator_model: inputs.get(&format!("{prefix}_model")).copied(),
                responses,
            });
        }
        let phase1: Option<Pair> = match inputs.get("phase1_pairs") {
            Some(d) => records::<Pair>(store, d, "pair")?
                .into_iter()
                .find(|p| p.prompt_id == id && !p.is_judge()),
            None => None,
        };
        let outcome = decide(
            cfg.rule,
            cfg.length_band.map(|band| LengthControl { band }),
            cands.get("current").map(Vec::as_slice).unwrap_or(&[]),
            cands.get("anchor").map(Vec::as_slice),
            cands.get("future").map(Vec::as_slice),
            phase1.as_ref(),
        );
        let pair_id = match n.output("pairs") {
            Some(d) => records::<Pair>(store, &d, "pair")?
                .into_iter()
                .find(|p| p.prompt_id == id && !p.is_judge())
                .map(|p| p.pair_id),
            None => None,
        };
        phases.push(PhaseView {
            iteration: cfg.iteration,
            phase: cfg.phase,
            node: n.node.clone(),
            rule: cfg.rule,
            sets,
            decision: outcome.describe(),
            pair_id,
        });
    }
    let Some(prompt) = prompt_text else {
        return Err(QueryError::NoPrompt {
            run: run.to_string(),
            id: id.to_string(),
        });
    };
    Ok(PromptLineage {
        prompt_id: id.to_string(),
        prompt,
        phases,
    })
}

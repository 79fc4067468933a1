//! The evaluations of a run: per evaluated model its summary and annotations (what
//! `tsr report`, `tsr export RUN eval` and `tsr lineage RUN eval ID` read).

use super::{computed_by, nodes, read_blob, records, NodeResult, QueryError};
use serde::Serialize;
use std::collections::BTreeMap;
use tsr_state::{Digest, Store, WorkerRecord};
use tsr_steps::records::Annotation;
use tsr_steps::rules::eval::EvalSummary;
use tsr_steps::rules::lc_glm::LcResult;

/// One evaluated model of a run: its `eval-judge` node and what it measured.
pub struct EvalResult {
    pub node: String,
    /// `M0`, `M1`, ... for the models an iteration produced, `Mf1`, ... for look-ahead models,
    /// `model` for `tsr eval`.
    pub label: String,
    /// Sort key: (iteration, 0 for Mf / 1 for Mi+1).
    pub slot: (u32, u32),
    pub summary: EvalSummary,
    pub annotations: Digest,
    /// AlpacaEval 2.0's length-controlled win rate (`<prefix>-lc`), when the run has the data
    /// and that step finished.
    pub lc: Option<LcResult>,
}

impl EvalResult {
    /// The length-controlled win rate to show: AlpacaEval 2.0's when computed, else the minimal
    /// GLM's, with which one it is.
    pub fn lc_win_rate(&self) -> Option<(f64, &'static str)> {
        match &self.lc {
            Some(lc) => Some((
                lc.length_controlled_winrate,
                "AlpacaEval 2.0 length_controlled_v1",
            )),
            None => self
                .summary
                .lc_win_rate
                .map(|x| (x, "minimal GLM (length term only)")),
        }
    }
}

/// Where an evaluation node stands in the run: (label, slot), or `None` for other nodes.
pub fn eval_label(node: &str) -> Option<(String, (u32, u32))> {
    match node {
        "eval/m0-judge" => return Some(("M0".into(), (0, 1))),
        "eval/model-judge" => return Some(("model".into(), (0, 0))),
        _ => {}
    }
    let rest = node.strip_prefix("iter")?;
    let (it, tail) = rest.split_once('/')?;
    let it: u32 = it.parse().ok()?;
    match tail {
        "eval-judge" => Some((format!("M{it}"), (it, 1))),
        "eval-future-judge" => Some((format!("Mf{it}"), (it, 0))),
        _ => None,
    }
}

/// The finished evaluations among `nodes`, in model order.
pub fn evals(
    store: &Store,
    nodes: &BTreeMap<String, NodeResult>,
) -> Result<Vec<EvalResult>, QueryError> {
    let mut out = Vec::new();
    for n in nodes
        .values()
        .filter(|n| n.step.kind == "eval-judge" || n.step.kind == "api-judge")
    {
        let (Some(sd), Some(ad)) = (n.output("summary"), n.output("annotations")) else {
            continue;
        };
        let Some((label, slot)) = eval_label(&n.node) else {
            continue;
        };
        let summary = serde_json::from_slice(&read_blob(store, &sd)?).map_err(|source| {
            QueryError::Config {
                what: "evaluation summary",
                node: n.node.clone(),
                source,
            }
        })?;
        let lc_node = format!("{}-lc", n.node.strip_suffix("-judge").unwrap_or(&n.node));
        let lc =
            match nodes.get(&lc_node).and_then(|l| l.output("lc")) {
                Some(d) => Some(serde_json::from_slice(&read_blob(store, &d)?).map_err(
                    |source| QueryError::Config {
                        what: "length-controlled win rate",
                        node: lc_node.clone(),
                        source,
                    },
                )?),
                None => None,
            };
        out.push(EvalResult {
            node: n.node.clone(),
            label,
            slot,
            summary,
            annotations: ad,
            lc,
        });
    }
    out.sort_by_key(|e| e.slot);
    Ok(out)
}

/// The finished evaluations of a run; an error when there are none.
pub fn finished_evals(store: &Store, run: &str) -> Result<Vec<EvalResult>, QueryError> {
    let evals = evals(store, &nodes(store, run)?)?;
    if evals.is_empty() {
        return Err(QueryError::NoEval {
            run: run.to_string(),
        });
    }
    Ok(evals)
}

/// The annotations of one evaluated model, one per evaluation prompt.
pub fn annotations_of(store: &Store, e: &EvalResult) -> Result<Vec<Annotation>, QueryError> {
    records(store, &e.annotations, "evaluation annotation")
}

/// One evaluated model's annotation of one prompt.
#[derive(Clone, Debug, Serialize)]
pub struct EvalLineage {
    /// The model's label (`M0`, `M1`, `Mf1`, `model`).
    pub model: String,
    pub node: String,
    pub annotation: Annotation,
    /// Who judged it (where the store kept it).
    pub judged_by: Option<WorkerRecord>,
}

/// Every evaluated model's annotation of the evaluation prompt `id`, in model order.
pub fn eval_lineage(store: &Store, run: &str, id: &str) -> Result<Vec<EvalLineage>, QueryError> {
    let mut found = Vec::new();
    for e in finished_evals(store, run)? {
        // The annotations are the judge step's items in order: a position is an item index.
        if let Some((at, r)) = annotations_of(store, &e)?
            .into_iter()
            .enumerate()
            .find(|(_, r)| r.prompt_id == id)
        {
            found.push(EvalLineage {
                model: e.label.clone(),
                node: e.node.clone(),
                annotation: r,
                judged_by: computed_by(store, &e.annotations)?.remove(&(at as u64)),
            });
        }
    }
    if found.is_empty() {
        return Err(QueryError::NoEvalOf {
            run: run.to_string(),
            id: id.to_string(),
        });
    }
    Ok(found)
}

//! Every pair of a run with the selection step that made it and the DPO step that trained on
//! it (what `tsr lineage RUN pair ID` shows and `tsr export RUN pairs` writes).

use super::{nodes, of_kind, records, NodeResult, QueryError};
use serde::Serialize;
use std::collections::BTreeMap;
use tsr_state::{Digest, Store};
use tsr_steps::records::Pair;

/// A pair as recorded, with where it came from and what it trained.
#[derive(Clone, Debug, Serialize)]
pub struct PairLineage {
    #[serde(flatten)]
    pub pair: Pair,
    /// The select node and its step key.
    pub select_node: String,
    pub select_step: String,
    /// The DPO step that consumed the pairs, once one is bound.
    #[serde(flatten)]
    pub training: Option<Training>,
}

/// The DPO step that trained on a pair.
#[derive(Clone, Debug, Serialize)]
pub struct Training {
    pub dpo_node: String,
    pub dpo_step: String,
    /// The model it started from.
    #[serde(with = "tsr_state::hex::option")]
    pub trained_from: Option<Digest>,
    /// The model it made (`None` while it runs).
    #[serde(with = "tsr_state::hex::option")]
    pub produced_model: Option<Digest>,
    /// The model of the reference log-probabilities it read.
    #[serde(with = "tsr_state::hex::option")]
    pub reference_model: Option<Digest>,
}

impl PairLineage {
    /// As a JSON object with its keys in sorted order (the form `--json` prints).
    pub fn to_value(&self) -> serde_json::Value {
        serde_json::to_value(self).expect("a pair's lineage serializes")
    }
}

/// The reference model of a DPO node: the model of the `ref-logprobs` step whose output it read.
pub fn reference_of(nodes: &BTreeMap<String, NodeResult>, dpo: &NodeResult) -> Option<Digest> {
    dpo.step
        .inputs
        .get("ref_logps")
        .and_then(|r| nodes.values().find(|n| n.output("logps") == Some(*r)))
        .and_then(|n| n.step.inputs.get("model.weights"))
        .copied()
}

/// Every pair of a run (select nodes in iteration order), with its consumer.
pub fn pairs_with_consumers(store: &Store, run: &str) -> Result<Vec<PairLineage>, QueryError> {
    let nodes = nodes(store, run)?;
    let dpos = of_kind(&nodes, "dpo");
    let mut out = Vec::new();
    for sel in of_kind(&nodes, "select") {
        let Some(pairs_digest) = sel.output("pairs") else {
            continue;
        };
        let training = dpos
            .iter()
            .find(|d| d.step.inputs.get("pairs") == Some(&pairs_digest))
            .map(|d| Training {
                dpo_node: d.node.clone(),
                dpo_step: d.key.to_hex(),
                trained_from: d.step.inputs.get("model.weights").copied(),
                produced_model: d.output("weights"),
                reference_model: reference_of(&nodes, d),
            });
        for pair in records::<Pair>(store, &pairs_digest, "pair")? {
            out.push(PairLineage {
                pair,
                select_node: sel.node.clone(),
                select_step: sel.key.to_hex(),
                training: training.clone(),
            });
        }
    }
    Ok(out)
}

/// The pair `id` of a run.
pub fn pair(store: &Store, run: &str, id: &str) -> Result<PairLineage, QueryError> {
    pairs_with_consumers(store, run)?
        .into_iter()
        .find(|p| p.pair.pair_id == id)
        .ok_or_else(|| QueryError::NoPair {
            run: run.to_string(),
            id: id.to_string(),
        })
}

//! A model's chain back to M0: for each model, the step that made it, from which model, on
//! which pairs and against which reference (what `tsr lineage RUN model DIGEST` shows).

use super::pairs::reference_of;
use super::{nodes, records, NodeResult, QueryError};
use serde::Serialize;
use std::collections::BTreeMap;
use tsr_state::{Digest, Store};

/// One model of the chain.
#[derive(Clone, Debug, Serialize)]
#[serde(untagged)]
pub enum ModelHop {
    /// M0, the initial model.
    Imported {
        #[serde(with = "tsr_state::hex")]
        model: Digest,
        made_by: String,
        /// `import-model`.
        kind: String,
        note: String,
    },
    /// A model DPO made.
    Trained {
        #[serde(with = "tsr_state::hex")]
        model: Digest,
        made_by: String,
        kind: String,
        dpo_step: String,
        /// How many pairs it trained on.
        pairs: Option<usize>,
        /// The select node the pairs came from.
        pairs_from: Option<String>,
        #[serde(with = "tsr_state::hex::option")]
        reference_model: Option<Digest>,
        #[serde(with = "tsr_state::hex::option")]
        trained_from: Option<Digest>,
        /// When the model is a LoRA adapter: its shape and base.
        lora: Option<AdapterInfo>,
        /// Who trained it, when an executor ran the step as one job (absent when the run's
        /// own process did).
        #[serde(skip_serializing_if = "Option::is_none")]
        trained_by: Option<tsr_state::WorkerRecord>,
        /// Other nodes that made the same weights (e.g. the future model and the next one
        /// trained on the same pairs): the chain follows `made_by`, the first by name.
        #[serde(skip_serializing_if = "Vec::is_empty")]
        also_made_by: Vec<String>,
    },
}

/// A LoRA adapter a DPO step made: its rank, alpha and the digest of the base it adapts.
#[derive(Clone, Debug, Serialize)]
pub struct AdapterInfo {
    pub r: u64,
    pub alpha: f64,
    pub base: String,
}

/// When the node made a LoRA adapter (its `weights` output is one): its shape and base. Only
/// the adapter's header is read: a damaged blob is `tsr verify`'s to report, not a reason for
/// status or lineage to fail.
pub fn adapter_of(store: &Store, node: &NodeResult) -> Option<AdapterInfo> {
    let w = node.output("weights")?;
    // Only a DPO step configured for LoRA makes adapters.
    if node.step.kind != "dpo" || !node.step.config.contains("\"lora\"") {
        return None;
    }
    tsr_model::StoredAdapter::read(&store.blobs().path(&w))
        .ok()
        .map(|m| AdapterInfo {
            r: m.r,
            alpha: m.alpha,
            base: m.base_digest,
        })
}

/// The one model of the run whose digest starts with `prefix`.
pub fn resolve_model(
    nodes: &BTreeMap<String, NodeResult>,
    prefix: &str,
) -> Result<Digest, QueryError> {
    let mut all: Vec<Digest> = nodes.values().filter_map(|n| n.output("weights")).collect();
    all.sort();
    all.dedup();
    let hits: Vec<&Digest> = all
        .iter()
        .filter(|d| d.to_hex().starts_with(prefix))
        .collect();
    match hits.as_slice() {
        [one] => Ok(**one),
        [] => Err(QueryError::NoModel {
            prefix: prefix.to_string(),
            models: all.iter().map(Digest::short).collect::<Vec<_>>().join(", "),
        }),
        _ => Err(QueryError::AmbiguousModel {
            prefix: prefix.to_string(),
            count: hits.len(),
        }),
    }
}

/// The chain from the model whose digest starts with `prefix` back to M0.
pub fn model_chain(store: &Store, run: &str, prefix: &str) -> Result<Vec<ModelHop>, QueryError> {
    let nodes = nodes(store, run)?;
    let mut cur = resolve_model(&nodes, prefix)?;
    let mut chain = Vec::new();
    loop {
        let mut makers = nodes.values().filter(|n| n.output("weights") == Some(cur));
        let Some(maker) = makers.next() else { break };
        let also_made_by: Vec<String> = makers.map(|n| n.node.clone()).collect();
        if maker.step.kind == "import-model" {
            chain.push(ModelHop::Imported {
                model: cur,
                made_by: maker.node.clone(),
                kind: "import-model".into(),
                note: "M0, the initial model".into(),
            });
            break;
        }
        let parent = maker.step.inputs.get("model.weights").copied();
        let pairs_input = maker.step.inputs.get("pairs");
        let pairs = pairs_input
            .map(|d| records::<serde::de::IgnoredAny>(store, d, "pair").map(|v| v.len()))
            .transpose()?;
        let pairs_from = pairs_input
            .and_then(|p| nodes.values().find(|n| n.output("pairs") == Some(*p)))
            .map(|n| n.node.clone());
        chain.push(ModelHop::Trained {
            model: cur,
            made_by: maker.node.clone(),
            kind: maker.step.kind.clone(),
            dpo_step: maker.key.to_hex(),
            pairs,
            pairs_from,
            reference_model: reference_of(&nodes, maker),
            trained_from: parent,
            lora: adapter_of(store, maker),
            trained_by: store.worker_of(&maker.key, 0)?,
            also_made_by,
        });
        match parent {
            Some(p) if p != cur => cur = p,
            _ => break,
        }
    }
    Ok(chain)
}

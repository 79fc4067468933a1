//! A run's nodes with the step each resolved to, and the records behind their outputs.

use super::QueryError;
use serde::de::DeserializeOwned;
use std::collections::BTreeMap;
use tsr_state::{Digest, StepRecord, StepStatus, Store};

/// One node of a run with its step record.
pub struct NodeResult {
    pub node: String,
    pub key: Digest,
    pub step: StepRecord,
}

impl NodeResult {
    /// The digest of a finished output.
    pub fn output(&self, name: &str) -> Option<Digest> {
        match &self.step.status {
            StepStatus::Done { outputs, .. } => outputs.get(name).copied(),
            _ => None,
        }
    }

    /// Whether the step finished.
    pub fn is_done(&self) -> bool {
        matches!(self.step.status, StepStatus::Done { .. })
    }
}

/// Every bound node of a run, by name.
pub fn nodes(store: &Store, run: &str) -> Result<BTreeMap<String, NodeResult>, QueryError> {
    store.run(run)?;
    let mut out = BTreeMap::new();
    for (node, rec) in store.nodes(run)? {
        let step = store
            .get_step(&rec.step_key)?
            .ok_or_else(|| QueryError::MissingStep {
                run: run.to_string(),
                node: node.clone(),
            })?;
        out.insert(
            node.clone(),
            NodeResult {
                node,
                key: rec.step_key,
                step,
            },
        );
    }
    Ok(out)
}

/// Nodes of one kind, ordered by (iteration number in the name, name).
pub fn of_kind<'a>(nodes: &'a BTreeMap<String, NodeResult>, kind: &str) -> Vec<&'a NodeResult> {
    let mut v: Vec<&NodeResult> = nodes.values().filter(|n| n.step.kind == kind).collect();
    v.sort_by_key(|n| (iteration_of(&n.node), n.node.clone()));
    v
}

/// The iteration in a node's name (`iter3/...` is 3); 0 for nodes outside iterations.
pub fn iteration_of(node: &str) -> u32 {
    node.strip_prefix("iter")
        .and_then(|r| r.split('/').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or(0)
}

/// A blob's bytes, verified against its digest.
pub fn read_blob(store: &Store, d: &Digest) -> Result<Vec<u8>, QueryError> {
    store.blobs().read(d).map_err(|source| QueryError::Blob {
        digest: d.short(),
        source,
    })
}

/// The records of a JSONL blob (`what` names one, for errors).
pub fn records<T: DeserializeOwned>(
    store: &Store,
    d: &Digest,
    what: &'static str,
) -> Result<Vec<T>, QueryError> {
    let bytes = read_blob(store, d)?;
    let text = String::from_utf8(bytes).map_err(|_| QueryError::NotText {
        what,
        digest: d.short(),
    })?;
    text.lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
        .map(|(i, l)| {
            serde_json::from_str(l).map_err(|source| QueryError::Record {
                what,
                digest: d.short(),
                line: i + 1,
                source,
            })
        })
        .collect()
}

/// Who computed each record of the JSONL blob `d`, by record position: the step that made it
/// wrote one record per item, in item order. Empty where the store has no such records (a
/// blob not made by an item step, or a store older than these records).
pub fn computed_by(
    store: &Store,
    d: &Digest,
) -> Result<BTreeMap<u64, tsr_state::WorkerRecord>, QueryError> {
    let Some(step) = store.get_artifact(d)?.and_then(|a| a.producer) else {
        return Ok(BTreeMap::new());
    };
    let mut out = BTreeMap::new();
    for (first, w) in store.workers(&step)? {
        for i in first..=w.last {
            out.insert(i, w.clone());
        }
    }
    Ok(out)
}

/// The run's final model: the last iteration's `dpo-next` weights (or M0 if none finished).
pub fn final_model(nodes: &BTreeMap<String, NodeResult>) -> Option<(&NodeResult, Digest)> {
    let mut dpo: Vec<&NodeResult> = nodes
        .values()
        .filter(|n| n.node.ends_with("/dpo-next") && n.output("weights").is_some())
        .collect();
    dpo.sort_by_key(|n| iteration_of(&n.node));
    dpo.last()
        .copied()
        .or_else(|| nodes.get("import"))
        .and_then(|n| n.output("weights").map(|d| (n, d)))
}

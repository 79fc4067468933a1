//! Reading a run's recorded results for the inspection commands (lineage, export, report):
//! which step each node resolved to, its outputs, and the blobs behind them.

use anyhow::{anyhow, Context};
use std::collections::BTreeMap;
use tsr_state::{Digest, StepRecord, StepStatus, Store};

/// One node of a run with its step record.
pub struct NodeResult {
    pub node: String,
    pub key: Digest,
    pub step: StepRecord,
}

impl NodeResult {
    pub fn output(&self, name: &str) -> Option<Digest> {
        match &self.step.status {
            StepStatus::Done { outputs, .. } => outputs.get(name).copied(),
            _ => None,
        }
    }
}

/// Every bound node of a run, by name.
pub fn nodes(store: &Store, run: &str) -> anyhow::Result<BTreeMap<String, NodeResult>> {
    store.run(run)?;
    let mut out = BTreeMap::new();
    for (node, rec) in store.nodes(run)? {
        let step = store.get_step(&rec.step_key)?.ok_or_else(|| {
            anyhow!(
                "node `{node}` of run `{run}` points at a missing step record; run `tsr verify`"
            )
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

pub fn iteration_of(node: &str) -> u32 {
    node.strip_prefix("iter")
        .and_then(|r| r.split('/').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or(0)
}

pub fn read_blob(store: &Store, d: &Digest) -> anyhow::Result<Vec<u8>> {
    store
        .blobs()
        .read(d)
        .with_context(|| format!("reading blob {}", d.short()))
}

pub fn jsonl(store: &Store, d: &Digest) -> anyhow::Result<Vec<serde_json::Value>> {
    let bytes = read_blob(store, d)?;
    let text = String::from_utf8(bytes).context("a JSONL blob is not UTF-8")?;
    text.lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).context("a JSONL blob has a bad line"))
        .collect()
}

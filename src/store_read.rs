//! Reading a run's recorded results for the inspection commands (lineage, export, report):
//! opening the store, which step each node resolved to, its outputs, the blobs behind them and
//! the run's final model.

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

/// One evaluated model of a run: its `eval-judge` node and what it measured.
pub struct EvalResult {
    pub node: String,
    /// `M0`, `M1`, ... for the models an iteration produced, `Mf1`, ... for look-ahead models,
    /// `model` for `tsr eval`.
    pub label: String,
    /// Sort key: (iteration, 0 for Mf / 1 for Mi+1).
    pub slot: (u32, u32),
    pub summary: tsr_steps::rules::eval::EvalSummary,
    pub annotations: Digest,
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

/// The finished evaluations of a run, in model order.
pub fn evals(
    store: &Store,
    nodes: &BTreeMap<String, NodeResult>,
) -> anyhow::Result<Vec<EvalResult>> {
    let mut out = Vec::new();
    for n in nodes.values().filter(|n| n.step.kind == "eval-judge") {
        let (Some(sd), Some(ad)) = (n.output("summary"), n.output("annotations")) else {
            continue;
        };
        let Some((label, slot)) = eval_label(&n.node) else {
            continue;
        };
        let summary = serde_json::from_slice(&read_blob(store, &sd)?)
            .with_context(|| format!("the evaluation summary of {}", n.node))?;
        out.push(EvalResult {
            node: n.node.clone(),
            label,
            slot,
            summary,
            annotations: ad,
        });
    }
    out.sort_by_key(|e| e.slot);
    Ok(out)
}

/// Open an existing store (inspection commands, resume, fork).
pub fn open_store(dir: &std::path::Path) -> anyhow::Result<std::sync::Arc<Store>> {
    Ok(std::sync::Arc::new(
        Store::open_existing(dir)
            .with_context(|| format!("opening the store {}", dir.display()))?,
    ))
}

/// The run's final model: the last iteration's `dpo-next` weights (or M0 if none finished).
pub fn final_model(
    nodes: &BTreeMap<String, NodeResult>,
) -> Option<(&NodeResult, tsr_state::Digest)> {
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

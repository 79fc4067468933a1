//! Replay: re-execute recorded steps from their recorded inputs in scratch space (an in-memory
//! journal, a scratch blob folder) and compare output digests with the recorded ones. Nothing in
//! the store changes.

use crate::context::{MemoryJournal, Progress, StepContext};
use crate::dag::Dag;
use crate::error::EngineError;
use crate::key::step_key;
use crate::output::OutputData;
use crate::preempt::StopFlag;
use crate::step::StepInputs;
use serde::Serialize;
use std::collections::BTreeMap;
use std::sync::Arc;
use tsr_state::{BlobStore, Digest, StepStatus, Store};

#[derive(Clone, Debug, Serialize)]
pub struct OutputCompare {
    pub name: String,
    pub recorded: String,
    pub replayed: String,
    pub identical: bool,
}

#[derive(Clone, Debug, Serialize)]
pub struct ReplayReport {
    pub node: String,
    pub kind: String,
    pub step_key: String,
    pub identical: bool,
    pub outputs: Vec<OutputCompare>,
    pub note: Option<String>,
    pub seconds: f64,
}

/// Replay `nodes` of `run` (each must be done). Returns one report per node, in the given order.
pub fn replay(
    store: &Arc<Store>,
    dag: &Dag,
    run: &str,
    nodes: &[String],
    device: &str,
    stop: StopFlag,
) -> Result<Vec<ReplayReport>, EngineError> {
    let mut reports = Vec::new();
    for name in nodes {
        let node = dag
            .get(name)
            .ok_or_else(|| EngineError::NoSuchNode(name.clone()))?;
        let binding = store
            .get_node(run, name)?
            .ok_or_else(|| EngineError::NotDone(name.clone()))?;
        let rec = store
            .get_step(&binding.step_key)?
            .ok_or_else(|| EngineError::NotDone(name.clone()))?;
        let StepStatus::Done { outputs, .. } = &rec.status else {
            return Err(EngineError::NotDone(name.clone()));
        };
        let now_key = step_key(
            node.step.kind(),
            node.step.version(),
            &node.step.config(),
            &rec.inputs,
        );
        let note = (now_key != binding.step_key).then(|| {
            format!(
                "the step as defined now has key {} but the record has {}: config or version changed",
                now_key.short(),
                binding.step_key.short()
            )
        });
        let scratch = store.blobs().tmp_dir().join(format!(
            "replay-{}-{}",
            binding.step_key.short(),
            std::process::id()
        ));
        let _ = std::fs::remove_dir_all(&scratch);
        let scratch_blobs = BlobStore::open(scratch.join("blobs"), scratch.join("tmp"))?;
        let work = scratch.join("work");
        std::fs::create_dir_all(&work).map_err(|e| tsr_state::StateError::Io {
            path: work.clone(),
            source: e,
        })?;
        let externals = node.external_paths();
        let inputs = StepInputs::new(store.blobs().clone(), rec.inputs.clone(), externals);
        let ctx = StepContext::new(
            name,
            binding.step_key,
            work,
            device,
            stop.clone(),
            Arc::new(if node.step.replays_recorded_items() {
                MemoryJournal::new(scratch_blobs).with_items(store.items(&binding.step_key)?)
            } else {
                MemoryJournal::new(scratch_blobs)
            }),
            Progress::hidden(),
        );
        let t0 = std::time::Instant::now();
        let produced = node
            .step
            .run(&inputs, &ctx)
            .map_err(|e| EngineError::StepFailed {
                node: name.clone(),
                kind: node.step.kind().to_string(),
                attempt: 0,
                source: e,
            })?;
        let mut compares = Vec::new();
        let mut replayed: BTreeMap<String, Digest> = BTreeMap::new();
        for (out_name, (_, data)) in produced.items {
            let d = match data {
                OutputData::Bytes(b) => Digest::of(&b),
                OutputData::File(p) => {
                    tsr_state::fingerprint(&p).map_err(tsr_state::StateError::from)?
                }
                OutputData::Blob(d) => d,
            };
            replayed.insert(out_name, d);
        }
        let names: std::collections::BTreeSet<&String> =
            outputs.keys().chain(replayed.keys()).collect();
        for n in names {
            let r = outputs.get(n).map(|d| d.to_hex()).unwrap_or_default();
            let p = replayed.get(n).map(|d| d.to_hex()).unwrap_or_default();
            compares.push(OutputCompare {
                name: n.clone(),
                identical: !r.is_empty() && r == p,
                recorded: r,
                replayed: p,
            });
        }
        let _ = std::fs::remove_dir_all(&scratch);
        reports.push(ReplayReport {
            node: name.clone(),
            kind: node.step.kind().to_string(),
            step_key: binding.step_key.to_hex(),
            identical: compares.iter().all(|c| c.identical),
            outputs: compares,
            note,
            seconds: t0.elapsed().as_secs_f64(),
        });
    }
    Ok(reports)
}

//! Runs: creating a run or checking that a re-run has the same definition (config) and the same
//! external inputs (by content fingerprint), and the fingerprints themselves.

use crate::dag::{Dag, InputSource};
use crate::error::EngineError;
use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use tsr_state::{now_ms, Digest, RunRecord, RunStatus, Store};

/// How a run is defined, for creating it or checking that it did not change.
#[derive(Clone, Debug)]
pub struct RunSpec {
    pub name: String,
    pub workflow: String,
    pub config_toml: String,
    pub definition: BTreeMap<String, String>,
    pub forked_from: Option<String>,
}

fn external_fingerprints(dag: &Dag) -> Result<BTreeMap<String, Digest>, EngineError> {
    let mut out = BTreeMap::new();
    let mut cache: BTreeMap<PathBuf, Digest> = BTreeMap::new();
    for node in dag.nodes() {
        for (input, src) in &node.inputs {
            if let InputSource::External(path) = src {
                let d = match cache.get(path) {
                    Some(d) => *d,
                    None => {
                        let d = tsr_state::fingerprint(path).map_err(|e| EngineError::BadNode {
                            node: node.name.clone(),
                            reason: format!("input `{input}`: {}", tsr_state::error_chain(&e)),
                        })?;
                        cache.insert(path.clone(), d);
                        d
                    }
                };
                out.insert(format!("{}/{input}", node.name), d);
            }
        }
    }
    Ok(out)
}

/// Create the run, or check that an existing run has the same definition and input files.
pub fn open_run(store: &Store, spec: &RunSpec, dag: &Dag) -> Result<RunRecord, EngineError> {
    tsr_state::validate_name(&spec.name)?;
    let externals = external_fingerprints(dag)?;
    let existing = store.get_run(&spec.name)?;
    if existing.is_none() {
        // Run names become file names and object keys (a fork's new name comes here too).
        tsr_state::validate_run_name(&spec.name)?;
    }
    if let Some(existing) = existing {
        let mut changes = Vec::new();
        let mut sets = Vec::new();
        let keys: BTreeSet<&String> = existing
            .definition
            .keys()
            .chain(spec.definition.keys())
            .collect();
        for k in keys {
            let old = existing.definition.get(k);
            let new = spec.definition.get(k);
            if old != new {
                let show = |v: Option<&String>| v.cloned().unwrap_or_else(|| "(unset)".into());
                changes.push(format!("{k}: {} -> {}", show(old), show(new)));
                if let Some(n) = new {
                    sets.push(format!("--set {k}={n}"));
                }
            }
        }
        if existing.workflow != spec.workflow {
            changes.insert(
                0,
                format!("workflow: {} -> {}", existing.workflow, spec.workflow),
            );
        }
        if !changes.is_empty() {
            return Err(EngineError::DefinitionChanged {
                run: spec.name.clone(),
                changes: changes.join("; "),
                sets: sets.join(" "),
            });
        }
        // Path-valued settings are not part of the definition (a moved checkout continues its
        // runs), but giving or dropping one changes which input files the DAG reads: that is
        // another definition too.
        let added: Vec<&String> = externals
            .keys()
            .filter(|k| !existing.externals.contains_key(*k))
            .collect();
        let removed: Vec<&String> = existing
            .externals
            .keys()
            .filter(|k| !externals.contains_key(*k))
            .collect();
        if !added.is_empty() || !removed.is_empty() {
            let mut changes = Vec::new();
            let show = |k: &String| {
                let (node, input) = k.split_once('/').unwrap_or((k, ""));
                format!("input file `{input}` of node `{node}`")
            };
            changes.extend(added.iter().map(|k| format!("new {}", show(k))));
            changes.extend(removed.iter().map(|k| format!("no more {}", show(k))));
            return Err(EngineError::DefinitionChanged {
                run: spec.name.clone(),
                changes: changes.join("; "),
                sets: String::new(),
            });
        }
        for (k, d) in &externals {
            if let Some(old) = existing.externals.get(k) {
                if old != d {
                    let (node, input) = k.split_once('/').unwrap_or((k, ""));
                    return Err(EngineError::InputChanged {
                        run: spec.name.clone(),
                        node: format!("{node}` (input `{input}`"),
                        recorded: old.short(),
                        now: d.short(),
                    });
                }
            }
        }
        return Ok(existing);
    }
    let now = now_ms();
    let rec = RunRecord {
        name: spec.name.clone(),
        workflow: spec.workflow.clone(),
        config_toml: spec.config_toml.clone(),
        definition: spec.definition.clone(),
        externals,
        forked_from: spec.forked_from.clone(),
        status: RunStatus::Created,
        created_ms: now,
        updated_ms: now,
    };
    store.put_run(&rec)?;
    Ok(rec)
}

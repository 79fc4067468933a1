//! `verify` (fsck) and `gc` over a whole store.
//!
//! verify: every record decodes; every blob a record refers to exists and hashes to its name;
//! every node binding points at a step record. Each problem names the affected steps, so that
//! `tsr verify --repair` can recompute them.
//!
//! gc: removes blobs and step records that no run references. What a run references: the steps
//! bound to its nodes (their inputs, outputs, checkpoint blobs, items) and its external inputs.

use crate::error::StateResult;
use crate::keys;
use crate::records::*;
use crate::store::{Commit, Store};
use crate::Digest;
use serde::Serialize;
use std::collections::{BTreeMap, BTreeSet};

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Problem {
    /// `blob-missing`, `blob-corrupt`, `record-corrupt`, `dangling-node`, `stray-file`.
    pub kind: String,
    pub detail: String,
    /// The damaged blob, for blob problems.
    pub blob: Option<String>,
    /// Steps whose recomputation repairs the problem (empty when it cannot be recomputed).
    pub steps: Vec<String>,
}

#[derive(Debug, Clone, Serialize, Default)]
pub struct VerifyReport {
    pub records: usize,
    pub blobs_checked: usize,
    pub unreferenced_blobs: usize,
    pub problems: Vec<Problem>,
}

impl VerifyReport {
    pub fn ok(&self) -> bool {
        self.problems.is_empty()
    }
}

/// Check the whole store. Never modifies anything.
pub fn verify(store: &Store) -> StateResult<VerifyReport> {
    let mut report = VerifyReport::default();
    if let Some((db, acked)) = store.rolled_back() {
        report.problems.push(Problem {
            kind: "db-rolled-back".into(),
            detail: format!(
                "the database holds commit {db} but commit {acked} was acknowledged: committed records were lost; --repair accepts the database and recomputes the lost steps"
            ),
            blob: None,
            steps: vec![],
        });
    }
    for kv in store.raw_iter() {
        let (k, v) = kv?;
        report.records += 1;
        if let Err(detail) = decode_check(&k, &v) {
            let steps = match k.first() {
                Some(&keys::STEP) => vec![keys::digest_at(&k, 1).unwrap().to_hex()],
                _ => vec![],
            };
            report.problems.push(Problem {
                kind: "record-corrupt".into(),
                detail,
                blob: None,
                steps,
            });
        }
    }

    // Which step (if any) makes each referenced blob.
    let mut referenced: BTreeMap<Digest, BTreeSet<String>> = BTreeMap::new();
    let steps = store.steps_lenient();
    for (key, rec) in &steps {
        if let StepStatus::Done { outputs, .. } = &rec.status {
            for d in outputs.values() {
                referenced.entry(*d).or_default().insert(key.to_hex());
            }
        }
        // Inputs made by steps are blobs; an input without an artifact record is the
        // fingerprint of an external file (e.g. the user's prompts), not a blob.
        for d in rec.inputs.values() {
            if let Ok(Some(_)) = store.get_artifact(d) {
                referenced.entry(*d).or_default();
            }
        }
        if let Some(cp) = &rec.checkpoint {
            for d in cp.blobs.values() {
                // A damaged checkpoint is repaired by dropping it: the step restarts from zero.
                referenced.entry(*d).or_default().insert(key.to_hex());
            }
        }
    }
    // Inputs made by another step: attribute them to their producer.
    for (d, steps_of) in referenced.iter_mut() {
        if steps_of.is_empty() {
            if let Ok(Some(a)) = store.get_artifact(d) {
                if let Some(p) = a.producer {
                    steps_of.insert(p.to_hex());
                }
            }
        }
    }
    for (d, producers) in &referenced {
        report.blobs_checked += 1;
        if let Err(e) = store.blobs().verify(d) {
            let kind = match e {
                crate::StateError::BlobMissing { .. } => "blob-missing",
                crate::StateError::BlobCorrupt { .. } => "blob-corrupt",
                _ => "blob-unreadable",
            };
            report.problems.push(Problem {
                kind: kind.into(),
                detail: crate::error_chain(&e),
                blob: Some(d.to_hex()),
                steps: producers.iter().cloned().collect(),
            });
        }
    }
    let (present, stray) = store.blobs().list()?;
    report.unreferenced_blobs = present
        .iter()
        .filter(|d| !referenced.contains_key(d))
        .count();
    for p in stray {
        report.problems.push(Problem {
            kind: "stray-file".into(),
            detail: format!("{} is not a blob (its name is not a digest)", p.display()),
            blob: None,
            steps: vec![],
        });
    }
    let known: BTreeSet<Digest> = steps.iter().map(|(k, _)| *k).collect();
    for run in store.runs()? {
        for (node, n) in store.nodes(&run.name)? {
            if !known.contains(&n.step_key) {
                report.problems.push(Problem {
                    kind: "dangling-node".into(),
                    blob: None,
                    detail: format!(
                        "run `{}` node `{node}` points at step {} which has no record",
                        run.name,
                        n.step_key.short()
                    ),
                    steps: vec![],
                });
            }
        }
    }
    Ok(report)
}

#[derive(Debug, Clone, Serialize, Default)]
pub struct GcReport {
    pub removed_blobs: usize,
    pub removed_bytes: u64,
    pub removed_steps: usize,
    pub kept_blobs: usize,
    pub dry_run: bool,
}

/// Remove what no run references. With `dry_run`, only count.
pub fn gc(store: &Store, dry_run: bool) -> StateResult<GcReport> {
    let mut live_steps: BTreeSet<Digest> = BTreeSet::new();
    let mut live_blobs: BTreeSet<Digest> = BTreeSet::new();
    for run in store.runs()? {
        live_blobs.extend(run.externals.values().copied());
        for (_, n) in store.nodes(&run.name)? {
            live_steps.insert(n.step_key);
        }
    }
    let steps = store.steps()?;
    let mut report = GcReport {
        dry_run,
        ..Default::default()
    };
    let mut dead_steps = Vec::new();
    for (key, rec) in &steps {
        if !live_steps.contains(key) {
            dead_steps.push(*key);
            continue;
        }
        live_blobs.extend(rec.inputs.values().copied());
        if let StepStatus::Done { outputs, .. } = &rec.status {
            live_blobs.extend(outputs.values().copied());
        }
        if let Some(cp) = &rec.checkpoint {
            live_blobs.extend(cp.blobs.values().copied());
        }
    }
    let (present, _) = store.blobs().list()?;
    let dead_blobs: Vec<Digest> = present
        .iter()
        .filter(|d| !live_blobs.contains(d))
        .copied()
        .collect();
    report.kept_blobs = present.len() - dead_blobs.len();
    report.removed_steps = dead_steps.len();
    report.removed_blobs = dead_blobs.len();
    report.removed_bytes = dead_blobs
        .iter()
        .filter_map(|d| store.blobs().size(d))
        .sum();
    if dry_run {
        return Ok(report);
    }
    // Records first (flushed), then files: a crash in between leaves unreferenced files, which
    // the next gc removes, never a record pointing at a removed file.
    let mut c = Commit::new();
    for key in &dead_steps {
        c.remove_step(key);
    }
    for d in &dead_blobs {
        c.remove_artifact(d);
    }
    store.commit(c)?;
    for key in &dead_steps {
        store.clear_items(key)?;
    }
    for d in &dead_blobs {
        store.blobs().remove(d)?;
    }
    Ok(report)
}

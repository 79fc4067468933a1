//! Status rows of a run (for `tsr status`), computed from the DAG and the store, and the live
//! snapshot a running driver writes so that `status` works while the store is locked.

use crate::dag::Dag;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use tsr_state::{StateError, StepStatus, Store};

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct StatusRow {
    pub node: String,
    pub iteration: Option<u32>,
    pub kind: String,
    /// waiting, pending, running, interrupted, failed, done, reused.
    pub state: String,
    pub attempts: u32,
    pub items_done: u64,
    pub items_total: Option<u64>,
    pub busy_s: f64,
    pub step_key: Option<String>,
    pub outputs: Vec<(String, String)>,
    pub error: Option<String>,
    /// Where its shards stand, while an executor's workers compute them (live snapshot only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shards: Option<crate::shard::ShardProgress>,
    /// The line the running step published about itself (live snapshot only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct RunStatusView {
    pub run: String,
    pub workflow: String,
    pub status: String,
    /// Set when read from the snapshot of a running process.
    pub live_pid: Option<u32>,
    pub nodes: Vec<StatusRow>,
    /// Where the remote copy stands, for a replicated store.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub remote: Option<RemoteLag>,
}

/// How far a replicated store's remote copy lags behind it.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct RemoteLag {
    pub url: String,
    /// The remote holds every commit up to this one.
    pub remote_seq: u64,
    pub local_seq: u64,
    /// Set when another machine took the remote over.
    pub taken_over_by: Option<String>,
    pub last_error: Option<String>,
}

/// The remote lag of a store (`None` when it is not replicated).
pub fn remote_lag(store: &Store) -> Option<RemoteLag> {
    let r = store.remote().ok()??;
    let v = store.sync().view();
    Some(RemoteLag {
        url: r.url,
        remote_seq: if v.enabled { v.acked.max(r.seq) } else { r.seq },
        local_seq: store.seq(),
        taken_over_by: v.fenced,
        last_error: v.last_error,
    })
}

/// `running`: the nodes this process is executing right now (for the live snapshot). A
/// `Running` record of any other node was left by a process that died: interrupted.
pub fn status_rows(
    store: &Store,
    dag: &Dag,
    run: &str,
    running: &std::collections::BTreeSet<String>,
) -> Result<Vec<StatusRow>, StateError> {
    let mut rows = Vec::new();
    for node in dag.topo() {
        let mut row = StatusRow {
            node: node.name.clone(),
            iteration: node.iteration,
            kind: node.step.kind().to_string(),
            state: "waiting".into(),
            attempts: 0,
            items_done: 0,
            items_total: None,
            busy_s: 0.0,
            step_key: None,
            outputs: vec![],
            error: None,
            shards: None,
            note: None,
        };
        if let Some(b) = store.get_node(run, &node.name)? {
            row.step_key = Some(b.step_key.to_hex());
            if let Some(rec) = store.get_step(&b.step_key)? {
                row.attempts = rec.attempts;
                row.items_done = rec.items_done;
                row.items_total = rec.items_total;
                row.busy_s = rec.busy_ms as f64 / 1000.0;
                row.state = match &rec.status {
                    StepStatus::Pending if rec.attempts > 0 => "interrupted".into(),
                    StepStatus::Pending => "pending".into(),
                    StepStatus::Running { .. } => "interrupted".into(),
                    StepStatus::Failed { error, .. } => {
                        row.error = Some(error.clone());
                        "failed".into()
                    }
                    StepStatus::Done { outputs, .. } => {
                        row.outputs = outputs
                            .iter()
                            .map(|(k, d)| (k.clone(), d.to_hex()))
                            .collect();
                        if b.reused {
                            "reused".into()
                        } else {
                            "done".into()
                        }
                    }
                };
            }
        }
        if running.contains(&node.name) {
            row.state = "running".into();
        }
        rows.push(row);
    }
    Ok(rows)
}

pub fn snapshot_path(store_root: &Path, run: &str) -> PathBuf {
    store_root
        .join("status")
        .join(format!("{}.json", run.replace('/', "%2F")))
}

/// Write the snapshot atomically (tmp, rename). Best effort: a failure only loses the live view.
pub fn write_snapshot(store_root: &Path, view: &RunStatusView) {
    let path = snapshot_path(store_root, &view.run);
    if let Some(dir) = path.parent() {
        let _ = std::fs::create_dir_all(dir);
    }
    let tmp = path.with_extension(format!("json.{}.tmp", std::process::id()));
    if let Ok(bytes) = serde_json::to_vec_pretty(view) {
        if std::fs::write(&tmp, bytes).is_ok() {
            let _ = std::fs::rename(&tmp, &path);
        }
    }
}

pub fn read_snapshot(store_root: &Path, run: &str) -> Option<RunStatusView> {
    let bytes = std::fs::read(snapshot_path(store_root, run)).ok()?;
    serde_json::from_slice(&bytes).ok()
}

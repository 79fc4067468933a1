//! Shards through the store's remote copy (`[executor] share = "remote"`), for workers that
//! share no filesystem with the driver:
//!
//! - before a step's shards start, the driver offers its inputs (every input blob and external
//!   file, uploaded unless the remote has it) and writes the job to
//!   `work/<step key>/<build>/job.json`;
//! - a worker reads the job, takes the inputs through its node's cache ([`NodeCache`]), and
//!   writes each batch's result as a create-only object `work/<step key>/<build>/results/
//!   <batch>.<tag>`, and its error, if it fails, as `errors/<tag>`;
//! - the driver lists the results, commits the first one of each batch that verifies, and
//!   deletes the step's folder once every batch is in.
//!
//! Results are valid for their step key whoever asked for them, so a driver that took the run
//! over commits what its predecessor's workers wrote.
//!
//! [`NodeCache`]: crate::node_cache::NodeCache

use crate::error::StepError;
use crate::shard::{check_batch, Deliver, ShardJob};
use crate::worker::ResultSink;
use std::collections::BTreeSet;
use std::path::PathBuf;
use std::sync::Arc;
use tsr_state::remote::{Remote, RemoteError};

fn remote_err(e: RemoteError) -> StepError {
    StepError::State(e.into())
}

/// The step's folder under the remote's `work/`: `<step key>/<build, 16 hex>`.
pub fn step_rel(job: &ShardJob) -> String {
    format!(
        "{}/{}",
        job.key.to_hex(),
        job.build.get(..16).unwrap_or(&job.build)
    )
}

/// The driver's side of the exchange, and what it tells workers.
#[derive(Debug)]
pub struct RemoteExchange {
    pub remote: Arc<Remote>,
    /// The node cache's folder on the nodes, and its limit in bytes.
    pub node_cache: PathBuf,
    pub node_cache_bytes: u64,
}

impl RemoteExchange {
    /// Offers `job`'s inputs and writes the job for its workers (external files go by digest).
    /// Returns how many blobs were uploaded and their bytes.
    pub fn publish(&self, job: &ShardJob) -> Result<(usize, u64), StepError> {
        let mut job = job.clone();
        let (mut n, mut bytes) = (0, 0);
        let blobs = |d: &tsr_state::Digest| {
            let hex = d.to_hex();
            job.blobs.join(&hex[..2]).join(&hex[2..])
        };
        for d in job.inputs.values() {
            let path = blobs(d);
            if self.remote.offer_blob(d, &path).map_err(remote_err)? {
                n += 1;
                bytes += std::fs::metadata(&path).map_or(0, |m| m.len());
            }
        }
        for (name, path) in &job.externals {
            let d = tsr_state::hash_file(path)?;
            if self.remote.offer_blob(&d, path).map_err(remote_err)? {
                n += 1;
                bytes += std::fs::metadata(path).map_or(0, |m| m.len());
            }
            job.external_blobs.insert(name.clone(), d);
        }
        let text = serde_json::to_vec_pretty(&job).expect("a shard job serializes");
        self.remote
            .work_put(&format!("{}/job.json", step_rel(&job)), text)
            .map_err(remote_err)?;
        Ok((n, bytes))
    }

    /// Delivers the verified results of the batches still `pending` (the first of each).
    pub fn deliver(
        &self,
        job: &ShardJob,
        pending: &mut BTreeSet<u64>,
        deliver: &mut Deliver<'_>,
    ) -> Result<(), StepError> {
        let sink = self.sink(job);
        for (b, name) in sink.list()? {
            if !pending.contains(&b) {
                continue;
            }
            if let Some(bytes) = sink.read(&name)? {
                if let Ok((who, items)) = check_batch(job, b, &bytes) {
                    pending.remove(&b);
                    deliver(b, items, who)?;
                }
            }
        }
        Ok(())
    }

    /// The error the worker tagged `tag` (or, with `prefix`, the last one whose tag starts so)
    /// wrote before it ended.
    pub fn worker_error(&self, job: &ShardJob, tag: &str, prefix: bool) -> Option<String> {
        let rel = format!("{}/errors", step_rel(job));
        let name = if prefix {
            self.remote
                .work_list(&rel)
                .ok()?
                .into_iter()
                .map(|(n, _)| n)
                .filter(|n| n.starts_with(tag))
                .max()?
        } else {
            tag.to_string()
        };
        let bytes = self.remote.work_get(&format!("{rel}/{name}")).ok()??;
        Some(String::from_utf8_lossy(&bytes).trim().to_string())
    }

    /// Removes the step's folder (its job, results and errors) once its items are committed.
    pub fn finish(&self, job: &ShardJob) -> Result<(), StepError> {
        self.remote
            .work_delete_all(&step_rel(job))
            .map(|_| ())
            .map_err(remote_err)
    }

    /// The worker's arguments that name where its job, inputs and results are.
    pub fn worker_args(&self, job: &ShardJob) -> Vec<String> {
        vec![
            "--remote".into(),
            self.remote.url().to_string(),
            "--step".into(),
            step_rel(job),
            "--node-cache".into(),
            self.node_cache.to_string_lossy().into_owned(),
            "--node-cache-bytes".into(),
            self.node_cache_bytes.to_string(),
        ]
    }

    /// The step's results, as a worker writes them.
    pub fn sink(&self, job: &ShardJob) -> RemoteSink {
        RemoteSink {
            remote: self.remote.clone(),
            rel: format!("{}/results", step_rel(job)),
        }
    }
}

/// Results as objects under `work/<step>/results/`, each created once.
pub struct RemoteSink {
    pub remote: Arc<Remote>,
    /// `<step key>/<build>/results`.
    pub rel: String,
}

impl ResultSink for RemoteSink {
    fn list(&self) -> Result<Vec<(u64, String)>, StepError> {
        let mut out: Vec<(u64, String)> = self
            .remote
            .work_list(&self.rel)
            .map_err(remote_err)?
            .into_iter()
            .filter_map(|(n, _)| Some((n.split('.').next()?.parse().ok()?, n)))
            .collect();
        out.sort();
        Ok(out)
    }
    fn read(&self, name: &str) -> Result<Option<Vec<u8>>, StepError> {
        self.remote
            .work_get(&format!("{}/{name}", self.rel))
            .map_err(remote_err)
    }
    fn write(&self, b: u64, tag: &str, bytes: Vec<u8>) -> Result<(), StepError> {
        // Create-only: a name already taken holds this writer's earlier copy of the batch.
        self.remote
            .work_put_new(&format!("{}/{b}.{tag}", self.rel), bytes)
            .map(|_| ())
            .map_err(remote_err)
    }
}

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

/// What the object store said when it did not answer, as one line.
fn unanswered(e: &RemoteError) -> String {
    tsr_state::error_chain(e)
}

/// How long a worker waits for a remote that does not answer before it gives up (its task then
/// ends with the error, and its shard is tried again).
pub const WORKER_PATIENCE: std::time::Duration = std::time::Duration::from_secs(600);

/// `f` again with backoff while the remote does not answer, for up to [`WORKER_PATIENCE`]
/// (saying so once on standard error, for a worker's log).
pub fn patiently<T>(
    what: &str,
    mut f: impl FnMut() -> Result<T, RemoteError>,
) -> Result<T, RemoteError> {
    let give_up = std::time::Instant::now() + WORKER_PATIENCE;
    let mut failures = 0;
    loop {
        match f() {
            Err(e) if e.is_transient() && std::time::Instant::now() < give_up => {
                if failures == 0 {
                    eprintln!(
                        "tsr worker: {what}: the remote does not answer ({}); trying again for up to {} s",
                        unanswered(&e),
                        WORKER_PATIENCE.as_secs()
                    );
                }
                std::thread::sleep(backoff(failures));
                failures += 1;
            }
            r => return r,
        }
    }
}

/// How long to wait before asking the remote again after `failures` failed tries in a row.
pub fn backoff(failures: u32) -> std::time::Duration {
    std::time::Duration::from_secs(1u64 << failures.min(5)).min(std::time::Duration::from_secs(30))
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
    /// Offers `job`'s inputs and writes the job for its workers (external files go by digest),
    /// waiting out a remote that does not answer (with backoff, saying so once through `say`)
    /// until it does or `stop` is set. Returns how many blobs were uploaded and their bytes.
    pub fn publish_waiting(
        &self,
        job: &ShardJob,
        stop: &crate::StopFlag,
        say: &dyn Fn(String),
    ) -> Result<(usize, u64), StepError> {
        let ext = Self::external_digests(job)?;
        let mut failures = 0;
        let since = std::time::Instant::now();
        loop {
            match self.try_publish(job, &ext) {
                Ok(done) => {
                    if failures > 0 {
                        say(format!(
                            "{}: the remote answers again after {:.0} s",
                            job.node,
                            since.elapsed().as_secs_f64()
                        ));
                    }
                    return Ok(done);
                }
                Err(e) if e.is_transient() => {
                    if failures == 0 {
                        say(format!(
                            "{}: the remote does not answer ({}); waiting for it before the step's workers start",
                            job.node,
                            unanswered(&e)
                        ));
                    }
                    stop.sleep(backoff(failures));
                    failures += 1;
                    if stop.is_set() {
                        return Err(StepError::Interrupted);
                    }
                }
                Err(e) => {
                    return Err(StepError::wrap(
                        "offering the step's inputs to the remote",
                        e,
                    ))
                }
            }
        }
    }

    /// The digests of the job's external files.
    fn external_digests(
        job: &ShardJob,
    ) -> Result<std::collections::BTreeMap<String, tsr_state::Digest>, StepError> {
        let mut out = std::collections::BTreeMap::new();
        for (name, path) in &job.externals {
            out.insert(name.clone(), tsr_state::hash_file(path)?);
        }
        Ok(out)
    }

    fn try_publish(
        &self,
        job: &ShardJob,
        ext: &std::collections::BTreeMap<String, tsr_state::Digest>,
    ) -> Result<(usize, u64), RemoteError> {
        let mut job = job.clone();
        let (mut n, mut bytes) = (0, 0);
        for d in job.inputs.values() {
            let path = tsr_state::BlobStore::path_in(&job.blobs, d);
            if self.remote.offer_blob(d, &path)? {
                n += 1;
                bytes += std::fs::metadata(&path).map_or(0, |m| m.len());
            }
        }
        for (name, path) in &job.externals {
            let d = ext[name];
            if self.remote.offer_blob(&d, path)? {
                n += 1;
                bytes += std::fs::metadata(path).map_or(0, |m| m.len());
            }
            job.external_blobs.insert(name.clone(), d);
        }
        let text = serde_json::to_vec_pretty(&job).expect("a shard job serializes");
        self.remote
            .work_put(&format!("{}/job.json", step_rel(&job)), text)?;
        Ok((n, bytes))
    }

    /// Delivers the verified results of the batches still `pending` (the first of each).
    /// `Ok(Some(why))` when the remote did not answer: what was read so far is delivered, and
    /// the caller asks again later.
    pub fn deliver(
        &self,
        job: &ShardJob,
        pending: &mut BTreeSet<u64>,
        deliver: &mut Deliver<'_>,
    ) -> Result<Option<String>, StepError> {
        let sink = self.sink(job);
        let listed = match self.remote.work_list(&sink.rel) {
            Ok(l) => l,
            Err(e) if e.is_transient() => return Ok(Some(unanswered(&e))),
            Err(e) => return Err(remote_err(e)),
        };
        for (name, _) in listed {
            let Some(b) = crate::shard::batch_of(&name) else {
                continue;
            };
            if !pending.contains(&b) {
                continue;
            }
            let bytes = match self.remote.work_get(&format!("{}/{name}", sink.rel)) {
                Ok(Some(bytes)) => bytes,
                Ok(None) => continue,
                Err(e) if e.is_transient() => return Ok(Some(unanswered(&e))),
                Err(e) => return Err(remote_err(e)),
            };
            if let Ok((who, items)) = check_batch(job, b, &bytes) {
                pending.remove(&b);
                deliver(b, items, who)?;
            }
        }
        Ok(None)
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
    /// A failure is only said: the items are safe, and `tsr gc` removes what is left.
    pub fn finish(&self, job: &ShardJob, say: &dyn Fn(String)) {
        if let Err(e) = self.remote.work_delete_all(&step_rel(job)) {
            say(format!(
                "{}: the workers' results stay in the remote's work/{} ({}); `tsr gc` removes them",
                job.node,
                step_rel(job),
                tsr_state::error_chain(&e)
            ));
        }
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
            .filter_map(|(n, _)| Some((crate::shard::batch_of(&n)?, n)))
            .collect();
        out.sort();
        Ok(out)
    }
    fn read(&self, name: &str) -> Result<Option<Vec<u8>>, StepError> {
        self.remote
            .work_get(&format!("{}/{name}", self.rel))
            .map_err(remote_err)
    }
    /// Create-only: a name already taken holds this writer's earlier copy of the batch. A
    /// remote that does not answer is asked again (see [`patiently`]): the batch is computed,
    /// and losing it would cost its compute.
    fn write(&self, b: u64, tag: &str, bytes: Vec<u8>) -> Result<(), StepError> {
        let rel = format!("{}/{b}.{tag}", self.rel);
        patiently(&format!("writing batch {b}'s result"), || {
            self.remote.work_put_new(&rel, bytes.clone())
        })
        .map(|_| ())
        .map_err(remote_err)
    }
}

/// Takes a whole step's outputs into the driver's blob store (`job.blobs`): from the job
/// folder's `out/` that the driver shares, or from the remote's blobs. Each is verified.
fn take_outputs(
    job: &ShardJob,
    dir: &std::path::Path,
    remote: Option<&RemoteExchange>,
    manifest: &crate::job::JobOutputs,
) -> Result<(), StepError> {
    let blobs = tsr_state::BlobStore::open(job.blobs.clone(), dir.join("tmp"))?;
    for o in &manifest.outputs {
        if blobs.exists(&o.digest) {
            continue;
        }
        let what = || format!("taking output `{}` of `{}`", o.name, job.node);
        match remote {
            Some(x) => {
                let got = patiently(&what(), || x.remote.fetch_blob(&o.digest, &blobs))
                    .map_err(|e| StepError::wrap(what(), e))?;
                if got.is_none() {
                    return Err(StepError::Other(format!(
                        "{}: {} has no blob {}; the job's worker did not hand it over, so its step runs again",
                        what(),
                        x.remote.url(),
                        o.digest.short()
                    )));
                }
            }
            None => {
                let path = crate::job::FolderFiles::output_path(dir, &o.digest);
                let copy = blobs.tmp_path("output");
                std::fs::copy(&path, &copy).map_err(|e| {
                    StepError::io(format!("{}: copying {}", what(), path.display()), e)
                })?;
                let got = blobs.put_file(&copy)?;
                if got != o.digest {
                    return Err(StepError::Other(format!(
                        "{}: {} is {}, not the {} its job listed",
                        what(),
                        path.display(),
                        got.short(),
                        o.digest.short()
                    )));
                }
            }
        }
    }
    Ok(())
}

/// A whole step's checkpoints through the remote: `work/<step>/ckpt/<first 16 hex digits of the digest>` and the record
/// `work/<step>/ckpt.json`; its outputs as the remote's blobs. A remote that does not answer
/// is waited for (see [`patiently`]).
pub struct RemoteFiles {
    pub remote: Arc<Remote>,
    /// `<step key>/<build>`.
    pub rel: String,
}

impl RemoteFiles {
    /// Where checkpoint file `d` goes: `<step>/ckpt/<first 16 hex digits>` (the record holds
    /// the whole digest, and every download is checked against it). Short, because stores keep
    /// long object names in file names of limited length (s3s-fs, under a multipart upload).
    fn ckpt_rel(&self, d: &tsr_state::Digest) -> String {
        format!("{}/ckpt/{}", self.rel, &d.to_hex()[..16])
    }
}

impl crate::job::JobFiles for RemoteFiles {
    fn checkpoint(&self) -> Result<Option<crate::job::SavedCheckpoint>, StepError> {
        let rel = format!("{}/ckpt.json", self.rel);
        let Some(bytes) = patiently("reading the last checkpoint", || self.remote.work_get(&rel))
            .map_err(remote_err)?
        else {
            return Ok(None);
        };
        serde_json::from_slice(&bytes).map(Some).map_err(|e| {
            StepError::Invalid(format!(
                "work/{rel} in {} is not a checkpoint record of this build ({e}); remove it to start the step over",
                self.remote.url()
            ))
        })
    }
    fn put_checkpoint_file(
        &self,
        d: &tsr_state::Digest,
        path: &std::path::Path,
    ) -> Result<(), StepError> {
        let rel = self.ckpt_rel(d);
        patiently("uploading a checkpoint file", || {
            self.remote.work_put_file(&rel, d, path)
        })
        .map_err(remote_err)?;
        let _ = std::fs::remove_file(path);
        Ok(())
    }
    fn take_checkpoint_file(
        &self,
        d: &tsr_state::Digest,
        blobs: &tsr_state::BlobStore,
    ) -> Result<PathBuf, StepError> {
        let rel = self.ckpt_rel(d);
        let got = patiently("downloading a checkpoint file", || {
            self.remote.work_fetch(&rel, d, blobs)
        })
        .map_err(remote_err)?;
        if got.is_none() {
            return Err(StepError::Other(format!(
                "{} has no work/{rel}, which the last checkpoint names; remove work/{}/ckpt.json to start the step over",
                self.remote.url(),
                self.rel
            )));
        }
        Ok(blobs.path(d))
    }
    fn record_checkpoint(&self, cp: &crate::job::SavedCheckpoint) -> Result<(), StepError> {
        let rel = format!("{}/ckpt.json", self.rel);
        let bytes = serde_json::to_vec_pretty(cp).expect("a checkpoint record serializes");
        patiently("recording a checkpoint", || {
            self.remote.work_put(&rel, bytes.clone())
        })
        .map_err(remote_err)
    }
    fn drop_checkpoint_file(&self, d: &tsr_state::Digest) -> Result<(), StepError> {
        let rel = self.ckpt_rel(d);
        self.remote.work_delete(&rel).map_err(remote_err)
    }
    fn put_output(&self, d: &tsr_state::Digest, path: &std::path::Path) -> Result<(), StepError> {
        patiently("uploading an output", || self.remote.offer_blob(d, path)).map_err(remote_err)?;
        let _ = std::fs::remove_file(path);
        Ok(())
    }
}

/// One step's exchange with its workers, for a runner: through the folder the workers share
/// with the driver (`<work>/<step key>/<build>/`), or through the remote. The runner keeps its
/// own folder for scripts and logs either way.
pub struct StepExchange<'a> {
    /// The step's folder under the runner's work folder.
    pub dir: PathBuf,
    remote: Option<&'a RemoteExchange>,
    /// Since when the remote has not answered (said once).
    unanswered: Option<std::time::Instant>,
}

impl<'a> StepExchange<'a> {
    /// Prepares the step's folder and, through a remote, offers the step's inputs (waiting
    /// out a remote that does not answer until `stop` is set).
    pub fn open(
        work: &std::path::Path,
        remote: Option<&'a RemoteExchange>,
        job: &ShardJob,
        stop: &crate::StopFlag,
        say: &dyn Fn(String),
    ) -> Result<StepExchange<'a>, StepError> {
        let dir = crate::shard::prepare_dir(work, job)?;
        if let Some(x) = remote {
            let (n, bytes) = x.publish_waiting(job, stop, say)?;
            if n > 0 {
                say(format!(
                    "{}: offered {n} input(s) ({:.1} MB) to the workers through {}",
                    job.node,
                    bytes as f64 / 1e6,
                    x.remote.url()
                ));
            }
        }
        Ok(StepExchange {
            dir,
            remote,
            unanswered: None,
        })
    }

    /// Whether results go through the remote.
    pub fn remote(&self) -> Option<&'a RemoteExchange> {
        self.remote
    }

    /// The worker's arguments that say where its job is and where its results go (its
    /// scratch folder is the runner's to give).
    pub fn worker_args(&self, job: &ShardJob) -> Vec<String> {
        match self.remote {
            Some(x) => x.worker_args(job),
            None => vec![
                "--job".into(),
                self.dir.join("job.json").to_string_lossy().into_owned(),
                "--out".into(),
                self.dir.join("results").to_string_lossy().into_owned(),
            ],
        }
    }

    /// Delivers the verified results of the batches still `pending`; a remote that does not
    /// answer is said once (and its return), and asked again at the next call.
    /// A whole step's result (see [`crate::job`]) is delivered only once its outputs are in
    /// the driver's blob store.
    pub fn collect(
        &mut self,
        job: &ShardJob,
        pending: &mut BTreeSet<u64>,
        deliver: &mut Deliver<'_>,
        say: &dyn Fn(String),
    ) -> Result<(), StepError> {
        let (dir, remote) = (self.dir.clone(), self.remote);
        let mut take = |b: u64, items: Vec<Vec<u8>>, who: tsr_state::WorkerRecord| {
            if job.whole {
                let manifest =
                    crate::job::JobOutputs::decode(items.first().map_or(&[][..], |i| i))?;
                take_outputs(job, &dir, remote, &manifest)?;
                say(format!(
                    "{}: ran as one job by {}: {}",
                    job.node,
                    who.describe(),
                    manifest.describe()
                ));
            }
            deliver(b, items, who)
        };
        let deliver: &mut Deliver<'_> = &mut take;
        let Some(x) = self.remote else {
            return crate::shard::deliver_results(job, &self.dir.join("results"), pending, deliver);
        };
        match (x.deliver(job, pending, deliver)?, self.unanswered) {
            (Some(why), None) => {
                say(format!(
                    "{}: the remote does not answer ({why}); the workers' results wait there",
                    job.node
                ));
                self.unanswered = Some(std::time::Instant::now());
            }
            (None, Some(t)) => {
                say(format!(
                    "{}: the remote answers again after {:.0} s",
                    job.node,
                    t.elapsed().as_secs_f64()
                ));
                self.unanswered = None;
            }
            _ => {}
        }
        Ok(())
    }

    /// What a failed worker said: the error it wrote through the remote (the worker tagged
    /// `tag`, or with `prefix` the last whose tag starts so), else the end of its output file
    /// at `log` where the driver can read it.
    pub fn failure(
        &self,
        job: &ShardJob,
        tag: &str,
        prefix: bool,
        log: &std::path::Path,
    ) -> String {
        if let Some(said) = self.remote.and_then(|x| x.worker_error(job, tag, prefix)) {
            return said;
        }
        if self.remote.is_none() || log.exists() {
            crate::shard::log_tail(log)
        } else {
            "(its output file is on the machine that ran it)".into()
        }
    }

    /// The step is done: its folders go (through a remote, a failure to remove is only said).
    pub fn finish(&self, job: &ShardJob, say: &dyn Fn(String)) {
        if let Some(parent) = self.dir.parent() {
            let _ = std::fs::remove_dir_all(parent);
        }
        if let Some(x) = self.remote {
            x.finish(job, say);
        }
    }
}

//! Whole steps run by a worker: under an executor other than `local`, the steps that train or
//! load a model without items (DPO, the iteration's metrics; [`Step::runs_as_job`]) run in one
//! job of the executor instead of in the driver.
//!
//! At the protocol level such a job is a shard job of one batch ([`ShardJob::whole`]): one
//! worker process or one array task, adopted, requeued, retried and reported as a shard is.
//! What differs:
//! - the worker runs the step's `run` with a [`JobJournal`], whose checkpoints go to the job's
//!   folder ([`JobFiles`]): the files by content (`ckpt/<digest>`), then the record
//!   `ckpt.json`, replaced only once its files are in place. A job that is requeued,
//!   preempted, killed or moved to another node continues from its last checkpoint, and a
//!   resumed step ends with the same bytes as one that never stopped;
//! - its outputs go by content where the driver takes them (the job folder's `out/`, or the
//!   remote's blobs), and its one result is the manifest [`JobOutputs`];
//! - when that result verifies, the driver takes the outputs into its store, then commits the
//!   step as if it had run it, keeping who ran it.

use crate::context::{ItemJournal, Progress, StepContext};
use crate::error::StepError;
use crate::output::OutputData;
use crate::preempt::StopFlag;
use crate::shard::{check_batch, encode_result, BatchRunner, ShardJob};
use crate::step::{Step, StepInputs, StepOutputs};
use crate::worker::ResultSink;
use crate::Checkpoint;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use tsr_state::{BlobStore, BlobWriter, Digest, WorkerRecord};

/// The record of a job's last checkpoint (`ckpt.json`): its files by name, and the step's cursor.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct SavedCheckpoint {
    pub seq: u64,
    pub cursor: Vec<u8>,
    pub files: BTreeMap<String, Digest>,
    /// The tag of the worker that saved it.
    pub by: String,
}

/// The one result of a job: its outputs, and where it started from.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct JobOutputs {
    pub outputs: Vec<JobOutput>,
    /// The checkpoint the worker continued from, if any.
    pub resumed: Option<Resumed>,
    /// How many checkpoints this worker saved.
    pub checkpoints: u64,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct JobOutput {
    pub name: String,
    /// The artifact kind (`model-weights`, `json`, ...).
    pub kind: String,
    pub digest: Digest,
    pub bytes: u64,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Resumed {
    pub seq: u64,
    /// The tag of the worker that saved the checkpoint.
    pub by: String,
}

impl JobOutputs {
    pub fn decode(bytes: &[u8]) -> Result<JobOutputs, StepError> {
        serde_json::from_slice(bytes).map_err(|e| {
            StepError::Invalid(format!(
                "a job's result is not this build's list of outputs: {e}"
            ))
        })
    }

    /// One line for the driver's log: what the job continued from.
    pub fn describe(&self) -> String {
        match &self.resumed {
            Some(r) => format!(
                "continued from checkpoint {} (saved by {}), saved {} more",
                r.seq, r.by, self.checkpoints
            ),
            None => format!(
                "ran from the start, saved {} checkpoint(s)",
                self.checkpoints
            ),
        }
    }
}

/// Where a job's checkpoints and outputs go: the job's folder that the driver shares
/// ([`FolderFiles`]), or the store's remote copy ([`crate::exchange::RemoteFiles`]).
pub trait JobFiles: Send + Sync {
    /// The last checkpoint recorded, if any.
    fn checkpoint(&self) -> Result<Option<SavedCheckpoint>, StepError>;
    /// Keeps checkpoint file `d` (now at `path`, which is gone afterwards) for later attempts.
    fn put_checkpoint_file(&self, d: &Digest, path: &Path) -> Result<(), StepError>;
    /// A verified local path of checkpoint file `d`, taken into `blobs` where it is not local.
    fn take_checkpoint_file(&self, d: &Digest, blobs: &BlobStore) -> Result<PathBuf, StepError>;
    /// Records `cp` as the last checkpoint (its files are in place).
    fn record_checkpoint(&self, cp: &SavedCheckpoint) -> Result<(), StepError>;
    /// Removes checkpoint file `d` (no longer part of the last checkpoint).
    fn drop_checkpoint_file(&self, d: &Digest) -> Result<(), StepError>;
    /// Puts output `d` (now at `path`, which is gone afterwards) where the driver takes it.
    fn put_output(&self, d: &Digest, path: &Path) -> Result<(), StepError>;
}

/// A job's files in the step's folder that the driver shares: `ckpt/` and `out/` (blob folders),
/// and the record `ckpt.json`.
pub struct FolderFiles {
    dir: PathBuf,
    ckpt: BlobStore,
    out: BlobStore,
}

impl FolderFiles {
    /// The files of the job whose folder is `dir` (`<work>/<step key>/<build>`).
    pub fn open(dir: &Path) -> Result<FolderFiles, StepError> {
        let tmp = dir.join("tmp");
        Ok(FolderFiles {
            dir: dir.to_path_buf(),
            ckpt: BlobStore::open(dir.join("ckpt"), tmp.clone())?,
            out: BlobStore::open(dir.join("out"), tmp)?,
        })
    }

    /// Output `d`, as [`JobFiles::put_output`] left it, if it is there.
    pub fn output_path(dir: &Path, d: &Digest) -> PathBuf {
        BlobStore::path_in(&dir.join("out"), d)
    }
}

impl JobFiles for FolderFiles {
    fn checkpoint(&self) -> Result<Option<SavedCheckpoint>, StepError> {
        let path = self.dir.join("ckpt.json");
        match std::fs::read(&path) {
            Ok(b) => serde_json::from_slice(&b).map(Some).map_err(|e| {
                StepError::Invalid(format!(
                    "{} is not a checkpoint record of this build ({e}); remove it to start the step over",
                    path.display()
                ))
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(StepError::io(format!("reading {}", path.display()), e)),
        }
    }
    fn put_checkpoint_file(&self, d: &Digest, path: &Path) -> Result<(), StepError> {
        put_moved(&self.ckpt, d, path)
    }
    fn take_checkpoint_file(&self, d: &Digest, _blobs: &BlobStore) -> Result<PathBuf, StepError> {
        Ok(self.ckpt.verified_path(d)?)
    }
    fn record_checkpoint(&self, cp: &SavedCheckpoint) -> Result<(), StepError> {
        let bytes = serde_json::to_vec_pretty(cp).expect("a checkpoint record serializes");
        tsr_state::fsio::write_atomic(&self.dir.join("ckpt.json"), &bytes)?;
        Ok(())
    }
    fn drop_checkpoint_file(&self, d: &Digest) -> Result<(), StepError> {
        Ok(self.ckpt.remove(d)?)
    }
    fn put_output(&self, d: &Digest, path: &Path) -> Result<(), StepError> {
        put_moved(&self.out, d, path)
    }
}

/// Moves the file at `path` into `blobs` as `d`, refusing one whose content is not `d`.
fn put_moved(blobs: &BlobStore, d: &Digest, path: &Path) -> Result<(), StepError> {
    let got = blobs.put_file(path)?;
    if got != *d {
        let _ = blobs.remove(&got);
        return Err(StepError::Other(format!(
            "{} changed while it was handed over (it is {}, not {})",
            path.display(),
            got.short(),
            d.short()
        )));
    }
    Ok(())
}

/// A whole step's journal in a worker: no items; checkpoints through [`JobFiles`].
pub struct JobJournal {
    kind: String,
    node: String,
    files: Box<dyn JobFiles>,
    /// The worker's own blobs (checkpoint files being written, downloaded ones).
    blobs: BlobStore,
    tag: String,
    state: Mutex<JournalState>,
}

#[derive(Default)]
struct JournalState {
    /// The last checkpoint known (read once, then kept up to date).
    last: Option<Option<SavedCheckpoint>>,
    resumed: Option<Resumed>,
    saved: u64,
}

impl JobJournal {
    pub fn new(
        job: &ShardJob,
        files: Box<dyn JobFiles>,
        blobs: BlobStore,
        tag: &str,
    ) -> JobJournal {
        JobJournal {
            kind: job.kind.clone(),
            node: job.node.clone(),
            files,
            blobs,
            tag: tag.to_string(),
            state: Mutex::new(JournalState::default()),
        }
    }

    fn last(&self, st: &mut JournalState) -> Result<Option<SavedCheckpoint>, StepError> {
        if st.last.is_none() {
            st.last = Some(self.files.checkpoint()?);
        }
        Ok(st.last.clone().flatten())
    }

    fn no_items(&self) -> StepError {
        StepError::Invalid(format!(
            "step kind `{}` commits items, which a step run as one job cannot; run it with executor.kind = \"local\"",
            self.kind
        ))
    }

    /// The checkpoint this worker continued from, and how many it saved.
    fn summary(&self) -> (Option<Resumed>, u64) {
        let st = self.state.lock().unwrap();
        (st.resumed.clone(), st.saved)
    }
}

impl ItemJournal for JobJournal {
    fn get(&self, _index: u64) -> Result<Option<Vec<u8>>, StepError> {
        Ok(None)
    }
    fn indices(&self) -> Result<Vec<u64>, StepError> {
        Ok(vec![])
    }
    fn commit(&self, _items: &[(u64, Vec<u8>)]) -> Result<(), StepError> {
        Err(self.no_items())
    }
    fn all(&self) -> Result<Vec<(u64, Vec<u8>)>, StepError> {
        Ok(vec![])
    }
    fn set_total(&self, _total: u64) -> Result<(), StepError> {
        Err(self.no_items())
    }
    /// Puts the files in place, then records the checkpoint, then drops the previous one's
    /// files: a worker killed at any point leaves the last recorded checkpoint whole.
    fn save_checkpoint(
        &self,
        files: BTreeMap<String, OutputData>,
        cursor: Vec<u8>,
    ) -> Result<(), StepError> {
        let mut st = self.state.lock().unwrap();
        let old = self.last(&mut st)?;
        let mut digests = BTreeMap::new();
        let mut bytes = 0u64;
        for (name, data) in files {
            let d = match data {
                OutputData::Bytes(b) => self.blobs.put_bytes(&b)?,
                OutputData::File(p) => self.blobs.put_file(&p)?,
                OutputData::Blob(d) => {
                    self.blobs.require(&d)?;
                    d
                }
            };
            bytes += self.blobs.size(&d).unwrap_or(0);
            if !old
                .as_ref()
                .is_some_and(|o| o.files.values().any(|x| *x == d))
            {
                self.files.put_checkpoint_file(&d, &self.blobs.path(&d))?;
            }
            digests.insert(name, d);
        }
        let cp = SavedCheckpoint {
            seq: old.as_ref().map_or(0, |o| o.seq + 1),
            cursor,
            files: digests,
            by: self.tag.clone(),
        };
        self.files.record_checkpoint(&cp)?;
        if let Some(old) = &old {
            for d in old.files.values() {
                if !cp.files.values().any(|n| n == d) {
                    // Only space: the record no longer names it.
                    if let Err(e) = self.files.drop_checkpoint_file(d) {
                        eprintln!(
                            "tsr worker: {}: the previous checkpoint's file {} stays ({}); the step's folder goes when it is done",
                            self.node,
                            d.short(),
                            tsr_state::error_chain(&e)
                        );
                    }
                }
            }
        }
        for d in cp.files.values() {
            let _ = self.blobs.remove(d);
        }
        eprintln!(
            "tsr worker: {}: checkpoint {} saved ({:.1} MB)",
            self.node,
            cp.seq,
            bytes as f64 / 1e6
        );
        st.last = Some(Some(cp));
        st.saved += 1;
        Ok(())
    }
    fn load_checkpoint(&self) -> Result<Option<Checkpoint>, StepError> {
        let mut st = self.state.lock().unwrap();
        let Some(cp) = self.last(&mut st)? else {
            return Ok(None);
        };
        let mut paths = BTreeMap::new();
        for (name, d) in &cp.files {
            let path = self
                .files
                .take_checkpoint_file(d, &self.blobs)
                .map_err(|e| {
                    StepError::wrap(
                        format!(
                            "taking file `{name}` of checkpoint {} of `{}`",
                            cp.seq, self.node
                        ),
                        e,
                    )
                })?;
            paths.insert(name.clone(), path);
        }
        eprintln!(
            "tsr worker: {}: continuing from checkpoint {} (saved by {})",
            self.node, cp.seq, cp.by
        );
        st.resumed = Some(Resumed {
            seq: cp.seq,
            by: cp.by.clone(),
        });
        Ok(Some(Checkpoint {
            seq: cp.seq,
            cursor: cp.cursor.clone(),
            files: paths,
            digests: cp.files.clone(),
        }))
    }
    fn blob_writer(&self) -> Result<BlobWriter, StepError> {
        Ok(self.blobs.large_writer()?)
    }
}

/// Where a job worker writes and who it is.
pub struct JobPlace<'a> {
    /// Where its one result (the manifest) goes.
    pub sink: Box<dyn ResultSink>,
    pub files: Box<dyn JobFiles>,
    pub scratch: &'a Path,
    pub tag: &'a str,
    pub who: WorkerRecord,
}

/// Runs `step` whole as `job`'s worker: checks that it is the job's step, continues from the
/// job's last checkpoint, hands its outputs over and writes the manifest as the job's result.
/// A job whose result is already there is not run again. Returns
/// [`StepError::Interrupted`] when `stop` is set (the step checkpoints first).
pub fn run_job(
    step: &dyn Step,
    job: &ShardJob,
    place: JobPlace<'_>,
    stop: StopFlag,
) -> Result<(), StepError> {
    crate::worker::check_step(step, job)?;
    if !job.whole || !step.runs_as_job() {
        return Err(StepError::Invalid(format!(
            "step kind `{}` does not run as one job",
            step.kind()
        )));
    }
    let JobPlace {
        sink,
        files,
        scratch,
        tag,
        who,
    } = place;
    for (b, name) in sink.list()? {
        if b == 0 {
            if let Some(bytes) = sink.read(&name)? {
                if check_batch(job, 0, &bytes).is_ok() {
                    eprintln!("tsr worker: {}: already done ({name})", job.node);
                    return Ok(());
                }
            }
        }
    }
    std::fs::create_dir_all(scratch)
        .map_err(|e| StepError::io(format!("creating {}", scratch.display()), e))?;
    let inputs = StepInputs::new(
        BlobStore::open(job.blobs.clone(), scratch.join("tmp"))?,
        job.inputs.clone(),
        job.externals.clone(),
    );
    let own = BlobStore::open(scratch.join("blobs"), scratch.join("tmp"))?;
    let journal = Arc::new(JobJournal::new(job, files, own.clone(), tag));
    let ctx = StepContext::new(
        &job.node,
        job.key,
        scratch.join("step"),
        &job.device,
        stop,
        journal.clone(),
        Progress::hidden(),
    );
    std::fs::create_dir_all(ctx.scratch())
        .map_err(|e| StepError::io(format!("creating {}", ctx.scratch().display()), e))?;
    let outputs = step.run(&inputs, &ctx)?;
    let mut listed = Vec::new();
    for (name, (kind, data)) in outputs.items {
        let d = match data {
            OutputData::Bytes(b) => own.put_bytes(&b)?,
            OutputData::File(p) => own.put_file(&p)?,
            OutputData::Blob(d) if own.exists(&d) => d,
            OutputData::Blob(d) => {
                // One of the step's inputs, handed on unchanged.
                let copy = own.tmp_path("output");
                std::fs::copy(inputs.blobs.verified_path(&d)?, &copy)
                    .map_err(|e| StepError::io(format!("copying input {}", d.short()), e))?;
                own.put_file(&copy)?
            }
        };
        let bytes = own.size(&d).unwrap_or(0);
        journal.files.put_output(&d, &own.path(&d))?;
        listed.push(JobOutput {
            name,
            kind,
            digest: d,
            bytes,
        });
    }
    let (resumed, checkpoints) = journal.summary();
    let manifest = JobOutputs {
        outputs: listed,
        resumed,
        checkpoints,
    };
    let bytes = serde_json::to_vec(&manifest).expect("a job's outputs serialize");
    let who = WorkerRecord {
        finished_ms: tsr_state::now_ms(),
        ..who
    };
    sink.write(0, tag, encode_result(&who, &[(0, bytes)]))?;
    let _ = std::fs::remove_dir_all(scratch);
    Ok(())
}

/// The driver's side: `runner` runs `job` (a whole step) in a worker; returns the step's
/// outputs (already in the driver's blob store: the runner takes them before it delivers the
/// result), who ran it, and the manifest.
pub fn run_elsewhere(
    runner: &dyn BatchRunner,
    job: &ShardJob,
    stop: &StopFlag,
) -> Result<(StepOutputs, WorkerRecord, JobOutputs), StepError> {
    let mut got = None;
    runner.run(job, &[0], stop, &mut |_, items, who| {
        let first = items.first().ok_or_else(|| {
            StepError::Other(format!("the job of `{}` wrote an empty result", job.node))
        })?;
        got = Some((JobOutputs::decode(first)?, who));
        Ok(())
    })?;
    let (manifest, who) = got.ok_or_else(|| {
        StepError::Other(format!(
            "the executor finished `{}` without its result",
            job.node
        ))
    })?;
    let mut out = StepOutputs::new();
    for o in &manifest.outputs {
        out = out.blob(&o.name, &o.kind, o.digest);
    }
    Ok((out, who, manifest))
}

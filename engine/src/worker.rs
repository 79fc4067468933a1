//! The worker's side of sharded item steps (see [`crate::shard`]): a journal that turns each
//! committed batch into a result file, and [`run_shard`], which checks that the worker's step is
//! the job's and computes the assigned batches. `tsr worker` calls it.

use crate::context::{ItemJournal, Progress, StepContext};
use crate::error::StepError;
use crate::output::OutputData;
use crate::preempt::StopFlag;
use crate::shard::{check_batch, encode_result, result_files, ShardJob};
use crate::step::{Step, StepInputs};
use crate::Checkpoint;
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use tsr_state::{BlobWriter, WorkerRecord};

/// Where a worker's results go: one whole result per batch and writer.
pub trait ResultSink: Send + Sync {
    /// The results present (of any writer), as (batch, name), in order.
    fn list(&self) -> Result<Vec<(u64, String)>, StepError>;
    /// A result's bytes (`None`: gone since it was listed).
    fn read(&self, name: &str) -> Result<Option<Vec<u8>>, StepError>;
    /// Writes batch `b`'s result under this writer's `tag`, whole.
    fn write(&self, b: u64, tag: &str, bytes: Vec<u8>) -> Result<(), StepError>;
}

/// Result files `<batch>.<tag>` in a folder (written whole with fsio).
pub struct FolderSink(pub PathBuf);

impl ResultSink for FolderSink {
    fn list(&self) -> Result<Vec<(u64, String)>, StepError> {
        Ok(result_files(&self.0)
            .into_iter()
            .filter_map(|(b, p)| Some((b, p.file_name()?.to_string_lossy().into_owned())))
            .collect())
    }
    fn read(&self, name: &str) -> Result<Option<Vec<u8>>, StepError> {
        match std::fs::read(self.0.join(name)) {
            Ok(b) => Ok(Some(b)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(StepError::io(
                format!("reading {}", self.0.join(name).display()),
                e,
            )),
        }
    }
    fn write(&self, b: u64, tag: &str, bytes: Vec<u8>) -> Result<(), StepError> {
        std::fs::create_dir_all(&self.0)
            .map_err(|e| StepError::io(format!("creating {}", self.0.display()), e))?;
        tsr_state::fsio::write_atomic(&self.0.join(format!("{b}.{tag}")), &bytes)?;
        Ok(())
    }
}

/// A worker's journal: each committed batch becomes a result in its sink; the batches that
/// already have a verified result there count as done.
pub struct ShardJournal {
    job: ShardJob,
    sink: Box<dyn ResultSink>,
    /// Names this worker's files (`<batch>.<tag>`).
    tag: String,
    /// The batches this worker computes.
    mine: BTreeSet<u64>,
    /// Who this worker is, written into each result.
    who: WorkerRecord,
}

impl ShardJournal {
    /// The journal of a worker computing `mine` (batch indices) of `job` into `dir`.
    pub fn new(
        job: ShardJob,
        sink: Box<dyn ResultSink>,
        tag: String,
        mine: BTreeSet<u64>,
        who: WorkerRecord,
    ) -> Self {
        ShardJournal {
            job,
            sink,
            tag,
            mine,
            who,
        }
    }

    fn unsupported(&self, what: &str) -> StepError {
        StepError::Invalid(format!(
            "step kind `{}` {what}, which a shard worker cannot; it runs in the driver",
            self.job.kind
        ))
    }
}

impl ItemJournal for ShardJournal {
    fn get(&self, _index: u64) -> Result<Option<Vec<u8>>, StepError> {
        Err(self.unsupported("reads committed items"))
    }
    /// What this worker need not compute: the other workers' batches, and its own that already
    /// have a verified result (only those are read). All of them: the step loads no model.
    fn indices(&self) -> Result<Vec<u64>, StepError> {
        let mut done: BTreeSet<u64> = (0..self.job.batches())
            .filter(|b| !self.mine.contains(b))
            .flat_map(|b| self.job.batch_items(b))
            .collect();
        for (b, name) in self.sink.list()? {
            if self.mine.contains(&b) && !done.contains(&self.job.batch_items(b).start) {
                if let Some(bytes) = self.sink.read(&name)? {
                    if check_batch(&self.job, b, &bytes).is_ok() {
                        done.extend(self.job.batch_items(b));
                    }
                }
            }
        }
        Ok(done.into_iter().collect())
    }
    fn commit(&self, items: &[(u64, Vec<u8>)]) -> Result<(), StepError> {
        let Some((first, _)) = items.first() else {
            return Ok(());
        };
        let b = first / self.job.batch.max(1);
        let who = WorkerRecord {
            finished_ms: tsr_state::now_ms(),
            ..self.who.clone()
        };
        self.sink.write(b, &self.tag, encode_result(&who, items))
    }
    fn all(&self) -> Result<Vec<(u64, Vec<u8>)>, StepError> {
        Err(self.unsupported("reads all its items back"))
    }
    fn set_total(&self, total: u64) -> Result<(), StepError> {
        if total != self.job.total {
            return Err(StepError::Invalid(format!(
                "step `{}` has {total} items here but {} in the driver: the inputs differ",
                self.job.node, self.job.total
            )));
        }
        Ok(())
    }
    fn save_checkpoint(
        &self,
        _files: BTreeMap<String, OutputData>,
        _cursor: Vec<u8>,
    ) -> Result<(), StepError> {
        Err(self.unsupported("checkpoints"))
    }
    fn load_checkpoint(&self) -> Result<Option<Checkpoint>, StepError> {
        Ok(None)
    }
    fn blob_writer(&self) -> Result<BlobWriter, StepError> {
        Err(self.unsupported("writes blobs"))
    }
}

/// Where a worker writes and who it is: where its results go, its scratch folder, the tag
/// that names its results, and the record kept with each batch it computes.
pub struct ShardPlace<'a> {
    pub sink: Box<dyn ResultSink>,
    pub scratch: &'a Path,
    pub tag: &'a str,
    pub who: WorkerRecord,
}

/// Refuses a step that is not the job's (another key from kind, version, config and inputs).
pub fn check_step(step: &dyn Step, job: &ShardJob) -> Result<(), StepError> {
    let key = crate::key::step_key(step.kind(), step.version(), &step.config(), &job.inputs);
    if key != job.key {
        return Err(StepError::Invalid(format!(
            "this worker's step `{}` version {} has key {}, not the job's {}: the worker runs another tsr build or step version",
            step.kind(),
            step.version(),
            key.short(),
            job.key.short()
        )));
    }
    Ok(())
}

/// Runs a worker's shard: checks that `step` is the job's step (same key from kind, version,
/// config and inputs), then computes `batches` into result files under `place.out`. Returns
/// [`StepError::Interrupted`] when `stop` is set at a batch boundary.
pub fn run_shard(
    step: &dyn Step,
    job: &ShardJob,
    batches: &[u64],
    place: ShardPlace<'_>,
    stop: StopFlag,
) -> Result<(), StepError> {
    let ShardPlace {
        sink,
        scratch,
        tag,
        who,
    } = place;
    check_step(step, job)?;
    if job.whole || !step.shardable() {
        return Err(StepError::Invalid(format!(
            "step kind `{}` cannot run as shards",
            step.kind()
        )));
    }
    std::fs::create_dir_all(scratch)
        .map_err(|e| StepError::io(format!("creating {}", scratch.display()), e))?;
    let blobs = tsr_state::BlobStore::open(job.blobs.clone(), scratch.join("tmp"))?;
    let inputs = StepInputs::new(blobs, job.inputs.clone(), job.externals.clone());
    let mine: BTreeSet<u64> = batches.iter().copied().collect();
    let journal = Arc::new(ShardJournal::new(
        job.clone(),
        sink,
        tag.to_string(),
        mine.clone(),
        who,
    ));
    let ctx = StepContext::new(
        &job.node,
        job.key,
        scratch.to_path_buf(),
        &job.device,
        stop,
        journal,
        Progress::hidden(),
    )
    .with_only(mine);
    step.shard(&inputs, &ctx)
}

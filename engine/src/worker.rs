//! The worker's side of sharded item steps (see [`crate::shard`]): a journal that turns each
//! committed batch into a result file, and [`run_shard`], which checks that the worker's step is
//! the job's and computes the assigned batches. `tsr worker` calls it.

use crate::context::{ItemJournal, Progress, StepContext};
use crate::error::StepError;
use crate::output::OutputData;
use crate::preempt::StopFlag;
use crate::shard::{encode_result, read_batch, result_files, ShardJob};
use crate::step::{Step, StepInputs};
use crate::Checkpoint;
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use tsr_state::{BlobWriter, WorkerRecord};

/// A worker's journal: each committed batch becomes a result file in `dir`; the batches that
/// already have a verified result there count as done.
pub struct ShardJournal {
    job: ShardJob,
    dir: PathBuf,
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
        dir: PathBuf,
        tag: String,
        mine: BTreeSet<u64>,
        who: WorkerRecord,
    ) -> Self {
        ShardJournal {
            job,
            dir,
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
        for (b, path) in result_files(&self.dir) {
            if self.mine.contains(&b) && read_batch(&self.job, b, &path).is_ok() {
                done.extend(self.job.batch_items(b));
            }
        }
        Ok(done.into_iter().collect())
    }
    fn commit(&self, items: &[(u64, Vec<u8>)]) -> Result<(), StepError> {
        let Some((first, _)) = items.first() else {
            return Ok(());
        };
        let b = first / self.job.batch.max(1);
        let path = self.dir.join(format!("{b}.{}", self.tag));
        let who = WorkerRecord {
            finished_ms: tsr_state::now_ms(),
            ..self.who.clone()
        };
        tsr_state::fsio::write_atomic(&path, &encode_result(&who, items))?;
        Ok(())
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

/// Where a worker writes and who it is: its result folder, its scratch folder, the tag that
/// names its result files, and the record kept with each batch it computes.
pub struct ShardPlace<'a> {
    pub out: &'a Path,
    pub scratch: &'a Path,
    pub tag: &'a str,
    pub who: WorkerRecord,
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
        out,
        scratch,
        tag,
        who,
    } = place;
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
    if !step.shardable() {
        return Err(StepError::Invalid(format!(
            "step kind `{}` cannot run as shards",
            step.kind()
        )));
    }
    std::fs::create_dir_all(out)
        .map_err(|e| StepError::io(format!("creating {}", out.display()), e))?;
    std::fs::create_dir_all(scratch)
        .map_err(|e| StepError::io(format!("creating {}", scratch.display()), e))?;
    let blobs = tsr_state::BlobStore::open(job.blobs.clone(), scratch.join("tmp"))?;
    let inputs = StepInputs::new(blobs, job.inputs.clone(), job.externals.clone());
    let mine: BTreeSet<u64> = batches.iter().copied().collect();
    let journal = Arc::new(ShardJournal::new(
        job.clone(),
        out.to_path_buf(),
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

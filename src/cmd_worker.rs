//! `tsr worker`: computes a shard of an item step for a driver (the `processes` executor
//! starts it, and the `slurm` executor's array tasks run it; it is not meant to be typed). It has no store and no lease: it reads the step's
//! inputs from the blob folder the job names, writes one result file per batch, and exits 0
//! when done, 75 when stopped at a batch boundary (SIGTERM), 1 on an error (its message on
//! standard error, which the driver reports).

use anyhow::{bail, Context};
use clap::Args;
use std::path::PathBuf;
use std::process::ExitCode;
use tsr_engine::shard::ShardJob;
use tsr_engine::{preempt, StepError, StopFlag};

#[derive(Args)]
pub struct WorkerArgs {
    /// The shard job (JSON) the driver wrote.
    #[arg(long)]
    pub job: PathBuf,
    /// The batches to compute: indices of the step's fixed partition, as `0-2,5,7-9`.
    #[arg(
        long,
        required_unless_present = "array_shards",
        conflicts_with = "array_shards"
    )]
    pub batches: Option<String>,
    /// As a Slurm array task: the shard is $SLURM_ARRAY_TASK_ID, of this many batches each;
    /// result files and the scratch folder are named after the task and its restart.
    #[arg(long, value_name = "BATCHES")]
    pub array_shards: Option<u64>,
    /// The folder results go to (one file per batch).
    #[arg(long)]
    pub out: PathBuf,
    /// Names this worker's result files (as an array task: `<array>_<task>.<restart>`).
    #[arg(long, required_unless_present = "array_shards")]
    pub tag: Option<String>,
    /// A scratch folder of this worker's own (as an array task: one under it per task).
    #[arg(long)]
    pub scratch: PathBuf,
}

/// A Slurm variable an array task must have.
fn slurm_var(name: &str) -> anyhow::Result<String> {
    std::env::var(name).with_context(|| {
        format!(
            "--array-shards: ${name} is not set; this runs as a Slurm array task (sbatch --array)"
        )
    })
}

/// The batches, tag and scratch folder of this worker.
fn assignment(a: &WorkerArgs, job: &ShardJob) -> anyhow::Result<(Vec<u64>, String, PathBuf)> {
    let Some(per) = a.array_shards else {
        let text = a.batches.as_deref().unwrap_or_default();
        let batches = tsr_engine::shard::parse_batches(text)
            .map_err(|e| anyhow::anyhow!("--batches: {e}"))?;
        return Ok((
            batches,
            a.tag.clone().unwrap_or_default(),
            a.scratch.clone(),
        ));
    };
    if per == 0 {
        bail!("--array-shards must be at least 1");
    }
    let task: u64 = slurm_var("SLURM_ARRAY_TASK_ID")?
        .parse()
        .context("$SLURM_ARRAY_TASK_ID is not a task index")?;
    let array = slurm_var("SLURM_ARRAY_JOB_ID")?;
    let restart = std::env::var("SLURM_RESTART_COUNT").unwrap_or_else(|_| "0".into());
    let job_id = slurm_var("SLURM_JOB_ID")?;
    let start = task.saturating_mul(per);
    let batches: Vec<u64> = (start..start.saturating_add(per).min(job.batches())).collect();
    if batches.is_empty() {
        bail!(
            "array task {task}: step `{}` has {} batches, {per} per shard, so there is no shard {task}",
            job.node,
            job.batches()
        );
    }
    let tag = format!("{array}_{task}.{restart}");
    Ok((batches, tag, a.scratch.join(job_id)))
}

/// The executable this process runs, even when its file was replaced or removed since it
/// started (a rebuild while a run goes on): workers are started from it.
pub const SELF_EXE: &str = "/proc/self/exe";

/// This program's identity: the digest of the executable it runs, which a worker compares with
/// the driver's (a different build could compute other bytes).
pub fn build_id() -> anyhow::Result<String> {
    let bytes =
        std::fs::read(SELF_EXE).context("reading this program's executable to identify it")?;
    Ok(blake3::hash(&bytes).to_hex().to_string())
}

pub fn run(a: WorkerArgs) -> anyhow::Result<ExitCode> {
    let bytes = std::fs::read(&a.job).with_context(|| format!("reading {}", a.job.display()))?;
    let mut job: ShardJob = serde_json::from_slice(&bytes)
        .with_context(|| format!("{} is not a shard job of this build", a.job.display()))?;
    let me = build_id()?;
    if job.build != me {
        bail!(
            "this worker is another tsr build ({}) than the driver's ({}); run the driver's binary on the workers",
            &me[..12],
            job.build.get(..12).unwrap_or(&job.build)
        );
    }
    if let Ok(d) = std::env::var("TSR_WORKER_DEVICE") {
        job.device = d;
    }
    let (batches, tag, scratch) = assignment(&a, &job)?;
    if let Some(b) = batches.iter().find(|b| **b >= job.batches()) {
        bail!(
            "--batches: step `{}` has {} batches; {b} is not one",
            job.node,
            job.batches()
        );
    }
    let step = tsr_steps::shards::step_of(&job.kind, &job.config)
        .or_else(|| tsr_engine::testkit::shard_step(&job.kind, &job.config))
        .with_context(|| format!("step kind `{}` cannot run as shards", job.kind))??;
    let stop = StopFlag::new();
    preempt::install_worker(stop.clone()).map_err(anyhow::Error::msg)?;
    match tsr_engine::worker::run_shard(step.as_ref(), &job, &batches, &a.out, &scratch, &tag, stop)
    {
        Ok(()) => Ok(ExitCode::SUCCESS),
        Err(StepError::Interrupted) => Ok(ExitCode::from(tsr_engine::EXIT_INTERRUPTED as u8)),
        Err(e) => Err(anyhow::Error::new(e).context(format!(
            "computing batches {} of step `{}`",
            tsr_engine::shard::format_batches(&batches),
            job.node
        ))),
    }
}

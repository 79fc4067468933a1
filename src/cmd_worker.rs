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
    /// Names this worker's result files: `<shard>-<launch>` (as an array task, tsr names them
    /// `<array>_<task>.<restart>`).
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

/// What a worker is assigned: its batches, the tag of its result files, its scratch folder,
/// and who it is (kept with each batch in the driver's store).
struct Assignment {
    batches: Vec<u64>,
    tag: String,
    scratch: PathBuf,
    who: tsr_state::WorkerRecord,
}

/// This worker's [`Assignment`].
fn assignment(a: &WorkerArgs, job: &ShardJob) -> anyhow::Result<Assignment> {
    let Some(per) = a.array_shards else {
        let text = a.batches.as_deref().unwrap_or_default();
        let batches = tsr_engine::shard::parse_batches(text)
            .map_err(|e| anyhow::anyhow!("--batches: {e}"))?;
        let tag = a.tag.clone().unwrap_or_default();
        // `<shard>-<launch>` as the processes executor names it; any other tag is kept whole.
        let (name, launch) = match tag
            .split_once('-')
            .map(|(s, l)| (s.parse::<u64>(), l.parse()))
        {
            Some((Ok(s), Ok(l))) => (format!("shard {s}"), l),
            _ => (tag.clone(), 0),
        };
        return Ok(Assignment {
            batches,
            tag,
            scratch: a.scratch.clone(),
            who: tsr_engine::identity::here("processes", Some(name), launch, &job.device),
        });
    };
    if per == 0 {
        bail!("--array-shards must be at least 1");
    }
    let task: u64 = slurm_var("SLURM_ARRAY_TASK_ID")?
        .parse()
        .context("$SLURM_ARRAY_TASK_ID is not a task index")?;
    let array = slurm_var("SLURM_ARRAY_JOB_ID")?;
    let restart: u32 = std::env::var("SLURM_RESTART_COUNT")
        .ok()
        .and_then(|r| r.parse().ok())
        .unwrap_or(0);
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
    Ok(Assignment {
        batches,
        tag: format!("{array}_{task}.{restart}"),
        scratch: a.scratch.join(job_id),
        who: tsr_engine::identity::here(
            "slurm",
            Some(format!("{array}_{task}")),
            restart,
            &job.device,
        ),
    })
}

/// This program's identity (see [`tsr_engine::identity::build_id`]).
pub fn build_id() -> anyhow::Result<String> {
    tsr_engine::identity::build_id().context("reading this program's executable to identify it")
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
    let Assignment {
        batches,
        tag,
        scratch,
        who,
    } = assignment(&a, &job)?;
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
    let place = tsr_engine::worker::ShardPlace {
        out: &a.out,
        scratch: &scratch,
        tag: &tag,
        who,
    };
    match tsr_engine::worker::run_shard(step.as_ref(), &job, &batches, place, stop) {
        Ok(()) => Ok(ExitCode::SUCCESS),
        Err(StepError::Interrupted) => Ok(ExitCode::from(tsr_engine::EXIT_INTERRUPTED as u8)),
        Err(e) => Err(anyhow::Error::new(e).context(format!(
            "computing batches {} of step `{}`",
            tsr_engine::shard::format_batches(&batches),
            job.node
        ))),
    }
}

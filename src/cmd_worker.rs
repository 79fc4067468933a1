//! `tsr worker`: computes a shard of an item step, or runs a whole step such as DPO, for a
//! driver (the `processes` executor starts it, and the `slurm` executor's array tasks run it;
//! it is not meant to be typed). It
//! has no store and no lease. With `--job`, it reads the step's inputs from the blob folder the
//! job names and writes one result file per batch into `--out`; with `--remote`, it reads the
//! job and the inputs from the store's remote copy (the inputs through the node's cache) and
//! writes its results there. It exits 0 when done, 75 when stopped at a batch boundary
//! (SIGTERM), 1 on an error (its message on standard error, and through a remote also as an
//! object the driver reports).

use anyhow::{bail, Context};
use clap::Args;
use std::path::PathBuf;
use std::process::ExitCode;
use tsr_engine::shard::ShardJob;
use tsr_engine::{preempt, StepError, StopFlag};

#[derive(Args)]
pub struct WorkerArgs {
    /// The shard job (JSON) the driver wrote.
    #[arg(long, required_unless_present = "remote", conflicts_with = "remote")]
    pub job: Option<PathBuf>,
    /// Through the store's remote copy: its URL (credentials come from the environment, as
    /// for the store's remote).
    #[arg(long, requires = "step")]
    pub remote: Option<String>,
    /// With --remote: the step's folder under the remote's `work/` (`<step key>/<build>`).
    #[arg(long, requires = "remote")]
    pub step: Option<String>,
    /// With --remote: the node's input cache, shared by the workers of the node.
    #[arg(long, default_value = "/tmp/tsr-node-cache")]
    pub node_cache: PathBuf,
    /// With --remote: the most the node cache may hold, in bytes.
    #[arg(long, default_value_t = 100_000_000_000)]
    pub node_cache_bytes: u64,
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
    #[arg(long, required_unless_present = "remote", conflicts_with = "remote")]
    pub out: Option<PathBuf>,
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

/// The remote, the step's folder in it, and the job there.
fn remote_job(
    url: &str,
    step: &str,
) -> anyhow::Result<(std::sync::Arc<tsr_state::remote::Remote>, ShardJob)> {
    let url = tsr_state::remote::RemoteUrl::parse(url)?;
    let remote = tsr_state::remote::Remote::open(&url)?;
    let rel = format!("{step}/job.json");
    let bytes = tsr_engine::exchange::patiently("reading the shard job", || remote.work_get(&rel))
        .with_context(|| format!("reading the shard job work/{rel} in {url}"))?
        .with_context(|| {
            format!("{url} has no shard job work/{rel}: the driver removed it (the step is done) or wrote it elsewhere")
        })?;
    let job = serde_json::from_slice(&bytes)
        .with_context(|| format!("work/{rel} in {url} is not a shard job of this build"))?;
    Ok((std::sync::Arc::new(remote), job))
}

pub fn run(a: WorkerArgs) -> anyhow::Result<ExitCode> {
    let (remote, mut job): (Option<std::sync::Arc<tsr_state::remote::Remote>>, ShardJob) =
        match (&a.remote, &a.step, &a.job) {
            (Some(url), Some(step), _) => {
                let (r, j) = remote_job(url, step)?;
                (Some(r), j)
            }
            (_, _, Some(path)) => {
                let bytes =
                    std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
                let job = serde_json::from_slice(&bytes).with_context(|| {
                    format!("{} is not a shard job of this build", path.display())
                })?;
                (None, job)
            }
            _ => bail!("give --job FILE (a shared folder) or --remote URL --step DIR"),
        };
    if let Ok(d) = std::env::var("TSR_WORKER_DEVICE") {
        job.device = d;
    }
    let Assignment {
        batches,
        tag,
        scratch,
        who,
    } = assignment(&a, &job)?;
    let me = build_id()?;
    if job.build != me {
        let e = anyhow::anyhow!(
            "this worker is another tsr build ({}) than the driver's ({}); run the driver's binary on the workers",
            &me[..12],
            job.build.get(..12).unwrap_or(&job.build)
        );
        return Err(match &remote {
            Some(r) => report(r, a.step.as_deref().unwrap_or_default(), &tag, e),
            None => e,
        });
    }
    if let Some(b) = batches.iter().find(|b| **b >= job.batches()) {
        bail!(
            "--batches: step `{}` has {} batches; {b} is not one",
            job.node,
            job.batches()
        );
    }
    let step = tsr_steps::shards::step_of(&job.kind, &job.config)
        .or_else(|| tsr_engine::testkit::shard_step(&job.kind, &job.config))
        .with_context(|| format!("step kind `{}` cannot run in a worker", job.kind))??;
    let stop = StopFlag::new();
    preempt::install_worker(stop.clone()).map_err(anyhow::Error::msg)?;
    let (sink, _cache): (Box<dyn tsr_engine::worker::ResultSink>, _) = match &remote {
        None => (Box::new(tsr_engine::worker::FolderSink(out_dir(&a)?)), None),
        Some(r) => {
            let step_rel = a.step.clone().unwrap_or_default();
            let outcome = take_inputs(r, &a, &mut job);
            let cache = match outcome {
                Ok(c) => c,
                Err(e) => return Err(report(r, &step_rel, &tag, e)),
            };
            (
                Box::new(tsr_engine::exchange::RemoteSink {
                    remote: r.clone(),
                    rel: format!("{step_rel}/results"),
                }),
                Some(cache),
            )
        }
    };
    let outcome = if job.whole {
        // A whole step: its checkpoints and outputs go to the job's folder (beside the
        // results) or through the remote.
        let files: Box<dyn tsr_engine::job::JobFiles> = match &remote {
            None => {
                let out = out_dir(&a)?;
                let dir = out.parent().with_context(|| {
                    format!(
                        "--out {} has no parent folder for the job's files",
                        out.display()
                    )
                })?;
                Box::new(tsr_engine::job::FolderFiles::open(dir)?)
            }
            Some(r) => Box::new(tsr_engine::exchange::RemoteFiles {
                remote: r.clone(),
                rel: a.step.clone().unwrap_or_default(),
            }),
        };
        let place = tsr_engine::job::JobPlace {
            sink,
            files,
            scratch: &scratch,
            tag: &tag,
            who,
        };
        tsr_engine::job::run_job(step.as_ref(), &job, place, stop)
    } else {
        let place = tsr_engine::worker::ShardPlace {
            sink,
            scratch: &scratch,
            tag: &tag,
            who,
        };
        tsr_engine::worker::run_shard(step.as_ref(), &job, &batches, place, stop)
    };
    match outcome {
        Ok(()) => Ok(ExitCode::SUCCESS),
        Err(StepError::Interrupted) => Ok(ExitCode::from(tsr_engine::EXIT_INTERRUPTED as u8)),
        Err(e) => {
            let e = anyhow::Error::new(e).context(if job.whole {
                format!("running step `{}`", job.node)
            } else {
                format!(
                    "computing batches {} of step `{}`",
                    tsr_engine::shard::format_batches(&batches),
                    job.node
                )
            });
            Err(match &remote {
                Some(r) => report(r, a.step.as_deref().unwrap_or_default(), &tag, e),
                None => e,
            })
        }
    }
}

/// `--out`, which a worker of a shared folder needs.
fn out_dir(a: &WorkerArgs) -> anyhow::Result<PathBuf> {
    a.out.clone().context("--out is required with --job")
}

/// Takes the job's inputs through the node cache and points the job at them.
fn take_inputs(
    remote: &tsr_state::remote::Remote,
    a: &WorkerArgs,
    job: &mut ShardJob,
) -> anyhow::Result<tsr_engine::node_cache::NodeCache> {
    let cache = tsr_engine::node_cache::NodeCache::open(&a.node_cache, a.node_cache_bytes)?;
    let wanted: Vec<tsr_state::Digest> = job
        .inputs
        .values()
        .chain(job.external_blobs.values())
        .copied()
        .collect();
    let t = cache.take(remote, &wanted).with_context(|| {
        format!(
            "taking the inputs of step `{}` from {}",
            job.node,
            remote.url()
        )
    })?;
    eprintln!(
        "tsr worker: inputs of `{}`: {} from the node cache {} ({:.1} MB), {} downloaded ({:.1} MB){}",
        job.node,
        t.hits,
        a.node_cache.display(),
        t.hit_bytes as f64 / 1e6,
        t.fetched,
        t.fetched_bytes as f64 / 1e6,
        if t.evicted > 0 {
            format!(
                "; {} older input(s) ({:.1} MB) removed to stay under its limit",
                t.evicted,
                t.evicted_bytes as f64 / 1e6
            )
        } else {
            String::new()
        }
    );
    job.blobs = cache.blobs().dir().to_path_buf();
    for (name, d) in &job.external_blobs {
        job.externals.insert(name.clone(), cache.blobs().path(d));
    }
    Ok(cache)
}

/// Writes the worker's error where the driver reads it (`work/<step>/errors/<tag>`), and
/// returns it.
fn report(
    remote: &tsr_state::remote::Remote,
    step: &str,
    tag: &str,
    e: anyhow::Error,
) -> anyhow::Error {
    let text = format!("{e:#}");
    if let Err(w) = remote.work_put(&format!("{step}/errors/{tag}"), text.into_bytes()) {
        eprintln!("tsr worker: could not hand the error to the driver through the remote: {w}");
    }
    e
}

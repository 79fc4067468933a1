//! The `slurm` executor: a step's batches computed by Slurm array jobs, one array task per
//! shard. The driver stays the single writer of its store; tasks run `tsr worker` on the nodes,
//! read the step's inputs from the store's blob folder (a filesystem the nodes share) and write
//! result files that the driver verifies and commits (see [`crate::shard`]).
//!
//! Only Slurm's command-line tools are used (`sbatch`, `squeue`, `scontrol`, `scancel`): they
//! are what every site has. `sacct` is not, so the driver keeps each task's state itself from
//! what `squeue --states=all` shows while the task is young enough to be listed.
//!
//! - **Names.** An array is named `tsr.<store id>.<step key>.<batches per shard>`, never after
//!   a time or an epoch: a driver that starts again (a resume, or one on another machine) finds
//!   its predecessor's tasks by that name and adopts the ones still pending or running instead
//!   of submitting them again. Its comment `tsr:<store id>:<run>` lets `tsr cancel` find a run's
//!   arrays.
//! - **What a task's end means** (see [`Ending`]): a task that ends with its shard's batches
//!   all delivered is done. Preemption, node failure and a task gone from the queue without a
//!   state restart the shard without using an attempt; so does a task stopped at a batch
//!   boundary (exit 75) or one that delivered batches before it ended. Any other end (FAILED,
//!   CANCELLED, TIMEOUT, OUT_OF_MEMORY, BOOT_FAIL, DEADLINE, or COMPLETED with batches missing)
//!   uses an attempt; after `max_attempts` the step fails with the tail of the task's output
//!   file, where the worker wrote its error. PENDING and RUNNING tasks are never resubmitted.
//! - **Stopping.** A driver that is stopped (SIGTERM) leaves its tasks running: their results
//!   are committed by the next driver of the run. `tsr cancel RUN` cancels them.
//! - **Secrets.** Tasks are submitted with `--export=NONE`: they run with the node's own login
//!   environment (where a site puts object-store credentials), and nothing of the driver's
//!   environment is stored in the controller's job records. The job script holds paths only.

use crate::error::StepError;
use crate::exchange::StepExchange;
use crate::preempt::StopFlag;
use crate::shard::{format_batches, plan_shards};
use crate::shard::{BatchRunner, ProgressBoard, ShardJob, ShardProgress};
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

/// Restarts of one shard that use no attempt (preemption, node loss, a stop at a batch
/// boundary), before the step fails: a task that is lost every time would otherwise restart
/// forever.
const MAX_FREE_RESTARTS: u32 = 100;

/// Pending reasons that do not clear by waiting: a task pending for one of these longer than
/// [`SlurmRunner::stuck_after`] fails its step with the reason.
const STUCK_REASONS: &[&str] = &[
    "PartitionConfig",
    "PartitionNodeLimit",
    "PartitionTimeLimit",
    "PartitionDown",
    "PartitionInactive",
    "ReqNodeNotAvail",
    "BadConstraints",
    "InvalidAccount",
    "InvalidQOS",
    "QOSJobLimit",
    "JobHeldUser",
    "JobHeldAdmin",
    "AssocMaxJobsLimit",
    "AccountNotAllowed",
    "NodeDown",
];

/// Slurm array jobs.
#[derive(Debug)]
pub struct SlurmRunner {
    /// tsr on the nodes (the same build as the driver: a worker refuses a job of another build).
    pub binary: PathBuf,
    /// Resource options passed to `sbatch` as they are (`--partition=gpu`, `--gres=gpu:1`,
    /// `--cpus-per-task=8`, ...).
    pub sbatch_args: Vec<String>,
    /// The options of particular steps, by node, in place of [`Self::sbatch_args`] (a step
    /// kind's own resources, memory from the memory plan).
    pub step_args: BTreeMap<String, Vec<String>>,
    /// The most shards in flight (the array's `%N` throttle).
    pub workers: usize,
    /// Items per shard: a whole number of the step's batches (default: the step's batches
    /// split evenly between the workers).
    pub shard_items: Option<u64>,
    /// Attempts per shard that end in a failure before the step fails.
    pub max_attempts: u32,
    /// Where each step's job, script, results and task output files go
    /// (`<work>/<step key>/<build>/`): a folder the nodes see at the same path.
    pub work: PathBuf,
    /// Names the store's arrays (`tsr.<store id>.…`): with a remote copy, the digest of its URL
    /// (so that a store restored from it elsewhere finds them), else the store's id.
    pub store_id: String,
    /// The run whose driver submits (in each array's comment, for `tsr cancel`).
    pub run: String,
    /// How often the queue is read.
    pub poll: Duration,
    /// How long a task may stay pending for a reason that does not clear by waiting.
    pub stuck_after: Duration,
    /// One line on stderr per step handed to Slurm and per problem with the controller.
    pub log: bool,
    /// Where each step's shards stand (for `tsr status`).
    pub board: ProgressBoard,
    /// Through the store's remote copy instead of `work` (inputs from the remote's blobs,
    /// results as its objects): the nodes need not see the driver's folders. `work` then
    /// keeps only the job scripts, and the tasks' output goes to `/tmp` on their node.
    pub exchange: Option<std::sync::Arc<crate::exchange::RemoteExchange>>,
    /// A file on the nodes each task's script sources before it starts tsr (the site's
    /// credentials for the remote); only its path is written.
    pub worker_env: Option<PathBuf>,
}

/// Under a remote exchange, where a task's output file is on its node.
fn node_log(array: &str, task: &str) -> PathBuf {
    PathBuf::from(format!("/tmp/tsr-task-{array}_{task}.log"))
}

/// Why a call to one of Slurm's tools did not give an answer.
#[derive(Debug, thiserror::Error)]
pub enum SlurmCallError {
    #[error("`{tool}` is not installed here (not on PATH); run tsr where Slurm's client tools are, such as a login node")]
    Missing { tool: String },
    #[error("`{tool}` could not be started")]
    Start {
        tool: String,
        #[source]
        source: std::io::Error,
    },
    /// The controller did not answer (down, restarting, or unreachable): worth retrying.
    #[error("the Slurm controller does not answer ({tool}: {message})")]
    Unreachable { tool: String, message: String },
    #[error("{tool} refused: {message}")]
    Refused { tool: String, message: String },
}

impl SlurmCallError {
    fn retryable(&self) -> bool {
        matches!(self, SlurmCallError::Unreachable { .. })
    }
}

/// Runs one of Slurm's tools and returns its standard output.
pub fn call(tool: &str, args: &[String]) -> Result<String, SlurmCallError> {
    let out = match Command::new(tool).args(args).output() {
        Ok(o) => o,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(SlurmCallError::Missing { tool: tool.into() })
        }
        Err(e) => {
            return Err(SlurmCallError::Start {
                tool: tool.into(),
                source: e,
            })
        }
    };
    if out.status.success() {
        return Ok(String::from_utf8_lossy(&out.stdout).into_owned());
    }
    let message = String::from_utf8_lossy(&out.stderr)
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect::<Vec<_>>()
        .join("; ");
    let message = if message.is_empty() {
        format!("exit status {}", out.status)
    } else {
        message
    };
    let unreachable = [
        "Unable to contact slurm controller",
        "Socket timed out",
        "Connection refused",
        "Slurm backup controller in standby mode",
        "Zero Bytes were transmitted or received",
        "Communication connection failure",
    ]
    .iter()
    .any(|m| message.contains(m));
    Err(if unreachable {
        SlurmCallError::Unreachable {
            tool: tool.into(),
            message,
        }
    } else {
        SlurmCallError::Refused {
            tool: tool.into(),
            message,
        }
    })
}

/// One array task as `squeue` lists it.
#[derive(Debug, Clone, PartialEq)]
pub struct TaskRow {
    /// The array's job id.
    pub array: u64,
    /// The task's index in the array (the shard).
    pub task: u64,
    pub state: String,
    pub reason: String,
}

impl TaskRow {
    /// Still to run or running: never resubmitted.
    pub fn is_live(&self) -> bool {
        matches!(
            self.state.as_str(),
            "PENDING"
                | "RUNNING"
                | "CONFIGURING"
                | "COMPLETING"
                | "REQUEUED"
                | "REQUEUE_HOLD"
                | "REQUEUE_FED"
                | "RESIZING"
                | "SUSPENDED"
                | "STOPPED"
                | "SIGNALING"
                | "STAGE_OUT"
                | "RESV_DEL_HOLD"
                | "SPECIAL_EXIT"
        )
    }
}

/// The format `squeue` is asked for: array job id, task index, state, reason (`|` never
/// appears in any of them, and no width is set, so nothing is cut).
const SQUEUE_FORMAT: &str = "%F|%K|%T|%r";

/// The tasks of the arrays named `name`, finished ones included while Slurm still lists them.
pub fn list_tasks(name: &str) -> Result<Vec<TaskRow>, SlurmCallError> {
    let out = call(
        "squeue",
        &[
            "--noheader".into(),
            "--array".into(),
            "--states=all".into(),
            format!("--name={name}"),
            format!("--format={SQUEUE_FORMAT}"),
        ],
    )?;
    Ok(parse_squeue(&out))
}

/// The rows of `squeue --format=%F|%K|%T|%r` (lines that are not array tasks are skipped).
pub fn parse_squeue(out: &str) -> Vec<TaskRow> {
    out.lines()
        .filter_map(|l| {
            let mut f = l.trim().splitn(4, '|');
            let array = f.next()?.trim().parse().ok()?;
            let task = f.next()?.trim().parse().ok()?;
            let state = f.next()?.trim().to_string();
            let reason = f.next().unwrap_or("").trim().to_string();
            Some(TaskRow {
                array,
                task,
                state,
                reason,
            })
        })
        .collect()
}

/// The exit code of a finished task, while `scontrol` still knows it.
fn exit_code(array: u64, task: u64) -> Option<i32> {
    let out = call(
        "scontrol",
        &[
            "-o".into(),
            "show".into(),
            "job".into(),
            format!("{array}_{task}"),
        ],
    )
    .ok()?;
    let field = out
        .split_whitespace()
        .find_map(|f| f.strip_prefix("ExitCode="))?;
    field.split(':').next()?.parse().ok()
}

/// How a task that is no longer pending or running ended, for its shard.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ending {
    /// Its batches are all delivered.
    Done,
    /// Restart the shard without using an attempt (preemption, node loss, gone from the queue,
    /// stopped at a batch boundary, or delivered batches before it ended).
    Restart,
    /// A failure: uses one of the shard's attempts.
    Failed,
}

/// The action for a task of a shard that ended in `state` (`None`: gone from the queue without
/// a state seen), with `exit` its exit code where known and `progressed` whether it delivered
/// batches. This table is in ARCHITECTURE.md.
pub fn ending(
    state: Option<&str>,
    exit: Option<i32>,
    all_delivered: bool,
    progressed: bool,
) -> Ending {
    if all_delivered {
        return Ending::Done;
    }
    match state {
        None | Some("NODE_FAIL") | Some("PREEMPTED") => Ending::Restart,
        _ if exit == Some(crate::EXIT_INTERRUPTED) || progressed => Ending::Restart,
        _ => Ending::Failed,
    }
}

struct Shard {
    batches: Vec<u64>,
    /// The array of the task computing it now, and when that task was submitted or adopted.
    current: Option<Current>,
    failures: u32,
    restarts: u32,
}

struct Current {
    array: u64,
    /// The shard's batches still to deliver when the task was submitted or adopted.
    pending_at_start: usize,
    /// Whether `squeue` has listed the task (a task not yet listed is not "gone").
    seen: bool,
    since: Instant,
    /// The last state and reason seen.
    state: String,
    reason: String,
    /// Since when it is pending for a reason of [`STUCK_REASONS`].
    stuck_since: Option<Instant>,
}

impl SlurmRunner {
    /// The name of a step's arrays.
    pub fn array_name(&self, job: &ShardJob, per: u64) -> String {
        format!(
            "tsr.{}.{}.{per}",
            self.store_id.get(..12).unwrap_or(&self.store_id),
            &job.key.to_hex()[..16]
        )
    }

    /// Where the output of task `task` of array `array` goes.
    fn task_log(&self, dir: &Path, array: u64, task: u64) -> PathBuf {
        match &self.exchange {
            Some(_) => node_log(&array.to_string(), &task.to_string()),
            None => dir.join("logs").join(format!("{array}_{task}.log")),
        }
    }

    /// The comment on a run's arrays (`tsr cancel` finds them by it).
    pub fn comment(store_id: &str, run: &str) -> String {
        format!("tsr:{}:{run}", store_id.get(..12).unwrap_or(store_id))
    }

    /// Asks Slurm whether it would accept this runner's jobs (`sbatch --test-only`): the tools
    /// are there, the controller answers, and the partition, account, qos and resources are
    /// valid. Nothing is submitted.
    /// Each distinct set of step options is asked about once; a refusal names the steps
    /// whose options Slurm refused.
    pub fn check(&self) -> Result<(), SlurmCallError> {
        let mut sets: BTreeMap<&Vec<String>, Vec<&str>> = BTreeMap::new();
        sets.entry(&self.sbatch_args).or_default();
        for (node, args) in &self.step_args {
            sets.entry(args).or_default().push(node);
        }
        for (set, nodes) in sets {
            let mut args = vec!["--test-only".to_string(), "--job-name=tsr-check".into()];
            args.extend(set.iter().cloned());
            args.push("--wrap=true".into());
            call("sbatch", &args).map_err(|e| match e {
                SlurmCallError::Refused { tool, message } if !nodes.is_empty() => {
                    SlurmCallError::Refused {
                        tool,
                        message: format!(
                            "{message} (for step {}: {})",
                            nodes.join(", "),
                            set.join(" ")
                        ),
                    }
                }
                e => e,
            })?;
        }
        Ok(())
    }

    /// The `sbatch` resource options of `node`'s array tasks.
    fn args_for(&self, node: &str) -> &[String] {
        self.step_args.get(node).unwrap_or(&self.sbatch_args)
    }

    fn write_script(
        &self,
        x: &StepExchange<'_>,
        job: &ShardJob,
        per: u64,
    ) -> Result<PathBuf, StepError> {
        let q = |p: &Path| shell_quote(&p.to_string_lossy());
        let dir = &x.dir;
        // Through a remote the nodes see none of the driver's folders: the scratch folder is
        // under the node cache, and the site's environment file gives the credentials.
        let (source, scratch) = match x.remote() {
            Some(r) => (
                match &self.worker_env {
                    Some(f) => format!(
                        "[ -r {f} ] || {{ echo \"tsr: executor.worker_env {f} is not readable on $(hostname); put the file there or fix the setting\" >&2; exit 1; }}\n. {f}\n",
                        f = q(f)
                    ),
                    None => String::new(),
                },
                r.node_cache.join("scratch"),
            ),
            None => (String::new(), dir.join("scratch")),
        };
        let place = format!(
            "{} --scratch {}",
            x.worker_args(job)
                .iter()
                .map(|a| shell_quote(a))
                .collect::<Vec<_>>()
                .join(" "),
            q(&scratch)
        );
        let script = format!(
            "#!/bin/sh\n\
             # tsr: {what} (key {key}).\n\
             # Written by the driver; it holds paths only, never a secret.\n\
             {source}\
             export RAYON_NUM_THREADS=\"${{SLURM_CPUS_PER_TASK:-1}}\"\n\
             exec {bin} worker --array-shards {per} {place}\n",
            what = if job.whole {
                format!("step `{}`, run whole", job.node)
            } else {
                format!("batches of step `{}`, {per} per array task", job.node)
            },
            key = job.key.to_hex(),
            bin = q(&self.binary),
        );
        let path = dir.join("shard.sh");
        tsr_state::fsio::write_atomic(&path, script.as_bytes())?;
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755))
            .map_err(|e| StepError::io(format!("making {} executable", path.display()), e))?;
        Ok(path)
    }

    fn submit(
        &self,
        node: &str,
        name: &str,
        dir: &Path,
        script: &Path,
        shards: &[u64],
        throttle: usize,
    ) -> Result<u64, SlurmCallError> {
        let mut args = vec![
            "--parsable".to_string(),
            format!("--job-name={name}"),
            format!("--comment={}", Self::comment(&self.store_id, &self.run)),
            format!("--array={}%{}", format_batches(shards), throttle.max(1)),
            format!(
                "--output={}",
                match &self.exchange {
                    Some(_) => node_log("%A", "%a"),
                    None => dir.join("logs").join("%A_%a.log"),
                }
                .display()
            ),
            "--open-mode=append".into(),
            "--export=NONE".into(),
            "--requeue".into(),
            "--signal=B:TERM@120".into(),
            format!(
                "--chdir={}",
                match &self.exchange {
                    Some(_) => Path::new("/tmp"),
                    None => dir,
                }
                .display()
            ),
        ];
        args.extend(self.args_for(node).iter().cloned());
        args.push(script.to_string_lossy().into_owned());
        let out = call("sbatch", &args)?;
        // `--parsable`: `<job id>` or `<job id>;<cluster>`.
        out.trim()
            .split(';')
            .next()
            .and_then(|id| id.trim().parse().ok())
            .ok_or_else(|| SlurmCallError::Refused {
                tool: "sbatch".into(),
                message: format!("answered `{}`, not a job id", out.trim()),
            })
    }

    fn say(&self, what: impl std::fmt::Display) {
        if self.log {
            eprintln!("tsr: {what}");
        }
    }
}

/// `s` in single quotes for `sh`.
fn shell_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', "'\\''"))
}

/// Cancels the arrays named `name` (what is left of a step once its batches are all in).
fn cancel_name(name: &str) {
    let _ = call("scancel", &[format!("--name={name}")]);
}

/// Where the shards stand, for `tsr status`.
fn progress_of(
    shards: &BTreeMap<u64, Shard>,
    pending: &BTreeSet<u64>,
    controller_down: Option<Instant>,
) -> ShardProgress {
    let mut p = ShardProgress {
        shards: shards.len() as u64,
        ..Default::default()
    };
    let mut notes = vec![];
    for (s, st) in shards {
        p.failed_attempts += st.failures;
        if !st.batches.iter().any(|b| pending.contains(b)) {
            p.done += 1;
            continue;
        }
        match &st.current {
            Some(c) if matches!(c.state.as_str(), "RUNNING" | "COMPLETING" | "CONFIGURING") => {
                p.running += 1;
                p.workers.push(format!("array task {}_{s}", c.array));
            }
            Some(c) => {
                p.waiting += 1;
                if !matches!(
                    c.reason.as_str(),
                    "" | "None" | "JobArrayTaskLimit" | "Priority" | "Resources" | "BeginTime"
                ) && notes.len() < 3
                {
                    notes.push(format!("array task {}_{s} pending: {}", c.array, c.reason));
                }
            }
            None => p.waiting += 1,
        }
    }
    if let Some(t) = controller_down {
        notes.insert(
            0,
            format!(
                "the Slurm controller has not answered for {:.0} s",
                t.elapsed().as_secs_f64()
            ),
        );
    }
    p.note = (!notes.is_empty()).then(|| notes.join("; "));
    p
}

impl BatchRunner for SlurmRunner {
    fn progress(&self, node: &str) -> Option<ShardProgress> {
        self.board.get(node)
    }

    fn run(
        &self,
        job: &ShardJob,
        batches: &[u64],
        stop: &StopFlag,
        deliver: &mut crate::shard::Deliver<'_>,
    ) -> Result<(), StepError> {
        let (per, plan) = plan_shards(job, batches, self.shard_items, self.workers)?;
        let name = self.array_name(job, per);
        let say = |m: String| self.say(m);
        let mut x = StepExchange::open(&self.work, self.exchange.as_deref(), job, stop, &say)?;
        let dir = x.dir.clone();
        let script = self.write_script(&x, job, per)?;
        let mut shards: BTreeMap<u64, Shard> = plan
            .into_iter()
            .map(|(s, batches)| {
                let st = Shard {
                    batches,
                    current: None,
                    failures: 0,
                    restarts: 0,
                };
                (s, st)
            })
            .collect();
        if job.whole {
            self.say(format!(
                "{}: runs as one Slurm job `{name}` ({}; checkpoints in {})",
                job.node,
                self.args_for(&job.node).join(" "),
                match x.remote() {
                    Some(r) =>
                        format!("{}/work/{}", r.remote.url(), crate::exchange::step_rel(job)),
                    None => dir.display().to_string(),
                }
            ));
        } else {
            self.say(format!(
            "{}: {} batch(es) in {} shard(s) as Slurm array tasks `{name}` (at most {} at once; {})",
            job.node,
            batches.len(),
            shards.len(),
            self.workers,
            self.args_for(&job.node).join(" ")
        ));
        }
        let mut pending: BTreeSet<u64> = batches.iter().copied().collect();
        // Verified results not yet delivered, first one per batch.
        let mut collect = |x: &mut StepExchange<'_>, pending: &mut BTreeSet<u64>| {
            x.collect(job, pending, &mut *deliver, &say)
        };
        let left = |st: &Shard, pending: &BTreeSet<u64>| {
            st.batches.iter().filter(|b| pending.contains(b)).count()
        };

        let mut controller_down: Option<Instant> = None;
        let mut backoff = self.poll;
        let outcome: Result<(), StepError> = 'poll: loop {
            if let Err(e) = collect(&mut x, &mut pending) {
                break Err(e);
            }
            if pending.is_empty() {
                break Ok(());
            }
            if stop.is_set() {
                break Err(StepError::Interrupted);
            }
            let rows = match list_tasks(&name) {
                Ok(rows) => {
                    if let Some(t) = controller_down.take() {
                        self.say(format!(
                            "{}: the Slurm controller answers again after {:.0} s",
                            job.node,
                            t.elapsed().as_secs_f64()
                        ));
                    }
                    backoff = self.poll;
                    rows
                }
                Err(e) if e.retryable() => {
                    if controller_down.is_none() {
                        self.say(format!(
                            "{}: {e}; waiting for it (the tasks keep running)",
                            job.node
                        ));
                        controller_down = Some(Instant::now());
                    }
                    self.board
                        .set(&job.node, progress_of(&shards, &pending, controller_down));
                    stop.sleep(backoff);
                    backoff = (backoff * 2).min(Duration::from_secs(60));
                    continue;
                }
                Err(e) => {
                    break Err(StepError::Other(format!(
                        "reading the queue of `{name}`: {e}"
                    )))
                }
            };
            // Deliver what the tasks that just ended wrote before judging how they ended.
            if let Err(e) = collect(&mut x, &mut pending) {
                break Err(e);
            }
            let mut queued: Vec<u64> = Vec::new();
            let mut active = 0usize;
            for (&s, st) in shards.iter_mut() {
                let remaining = left(st, &pending);
                let live = rows
                    .iter()
                    .filter(|r| r.task == s && r.is_live())
                    .max_by_key(|r| r.array);
                if let Some(row) = live {
                    // Running or waiting: never submitted again (a predecessor's task is
                    // adopted).
                    let cur = match &mut st.current {
                        Some(c) if c.array == row.array => c,
                        _ => st.current.insert(Current {
                            array: row.array,
                            pending_at_start: remaining,
                            seen: true,
                            since: Instant::now(),
                            state: String::new(),
                            reason: String::new(),
                            stuck_since: None,
                        }),
                    };
                    cur.seen = true;
                    cur.state = row.state.clone();
                    cur.reason = row.reason.clone();
                    let stuck = row.state == "PENDING"
                        && STUCK_REASONS.iter().any(|r| row.reason.starts_with(r));
                    match (stuck, cur.stuck_since) {
                        (false, _) => cur.stuck_since = None,
                        (true, None) => cur.stuck_since = Some(Instant::now()),
                        (true, Some(t)) if t.elapsed() >= self.stuck_after => {
                            break 'poll Err(StepError::Other(format!(
                                "shard {s} (array task {}_{s}) has been pending for {:.0} s because Slurm says `{}`, which waiting does not clear; fix the executor's partition, account, qos or resources (or release the job), then run again",
                                row.array,
                                t.elapsed().as_secs_f64(),
                                row.reason
                            )));
                        }
                        (true, Some(_)) => {}
                    }
                    if row.state != "PENDING" || row.reason != "JobArrayTaskLimit" {
                        active += 1;
                    }
                    continue;
                }
                if remaining == 0 {
                    st.current = None;
                    continue;
                }
                let Some(cur) = st.current.take() else {
                    queued.push(s);
                    continue;
                };
                let ended = rows
                    .iter()
                    .find(|r| r.task == s && r.array == cur.array)
                    .map(|r| r.state.clone());
                if ended.is_none() && !cur.seen && cur.since.elapsed() < Duration::from_secs(60) {
                    // Submitted but not listed yet.
                    st.current = Some(cur);
                    active += 1;
                    continue;
                }
                let exit = match ended.as_deref() {
                    Some("FAILED") => exit_code(cur.array, s),
                    _ => None,
                };
                let progressed = remaining < cur.pending_at_start;
                match ending(ended.as_deref(), exit, false, progressed) {
                    Ending::Done => {}
                    Ending::Restart => {
                        st.restarts += 1;
                        if st.restarts > MAX_FREE_RESTARTS {
                            break 'poll Err(StepError::Other(format!(
                                "shard {s} was preempted, lost or stopped {} times; last task {}_{s} ({}); its output: {}",
                                st.restarts,
                                cur.array,
                                ended.as_deref().unwrap_or("gone from the queue"),
                                self.task_log(&dir, cur.array, s).display()
                            )));
                        }
                        queued.push(s);
                    }
                    Ending::Failed => {
                        st.failures += 1;
                        let log = self.task_log(&dir, cur.array, s);
                        let why = match (ended.as_deref(), exit) {
                            (Some("COMPLETED"), _) => {
                                "it completed without writing every batch".to_string()
                            }
                            (Some(state), Some(code)) => format!("it ended {state} (exit {code})"),
                            (Some(state), None) => format!("it ended {state}"),
                            (None, _) => "it is gone from the queue".to_string(),
                        };
                        // The worker's own error, as it wrote it through the remote; else the
                        // end of the task's output (readable where the driver sees it).
                        let said = x.failure(job, &format!("{}_{s}.", cur.array), true, &log);
                        let message = format!(
                            "task {}_{s} {why}: {said} (output {})",
                            cur.array,
                            log.display()
                        );
                        if st.failures >= self.max_attempts.max(1) {
                            break 'poll Err(StepError::Other(format!(
                                "shard {s} failed {} times; last attempt: {message}",
                                st.failures
                            )));
                        }
                        self.say(format!(
                            "{}: shard {s}: {message}; submitting it again",
                            job.node
                        ));
                        queued.push(s);
                    }
                }
            }
            let capacity = self.workers.max(1).saturating_sub(active);
            if !queued.is_empty() && capacity > 0 && !stop.is_set() {
                match self.submit(&job.node, &name, &dir, &script, &queued, capacity) {
                    Ok(array) => {
                        for s in &queued {
                            let st = shards.get_mut(s).expect("a queued shard is known");
                            st.current = Some(Current {
                                array,
                                pending_at_start: left(st, &pending),
                                seen: false,
                                since: Instant::now(),
                                state: "SUBMITTED".into(),
                                reason: String::new(),
                                stuck_since: None,
                            });
                        }
                    }
                    // Submitted or not, the next round's queue says: a task that appears is
                    // adopted, so a retry never submits a shard twice.
                    Err(e) if e.retryable() => {
                        if controller_down.is_none() {
                            self.say(format!("{}: {e}; waiting for it", job.node));
                            controller_down = Some(Instant::now());
                        }
                    }
                    Err(e) => {
                        break Err(StepError::Other(format!(
                            "submitting shards {} of `{name}`: {e}",
                            format_batches(&queued)
                        )))
                    }
                }
            }
            self.board
                .set(&job.node, progress_of(&shards, &pending, controller_down));
            stop.sleep(self.poll);
        };
        self.board.clear(&job.node);

        match outcome {
            Ok(()) => {
                // Duplicates still queued have nothing left to give.
                cancel_name(&name);
                x.finish(job, &say);
                Ok(())
            }
            // Stopped: the tasks go on; the next driver commits their results.
            Err(StepError::Interrupted) => Err(StepError::Interrupted),
            Err(e) => {
                cancel_name(&name);
                let _ = collect(&mut x, &mut pending);
                Err(e)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn squeue_rows_parse_and_odd_lines_are_skipped() {
        let out = "17|0|RUNNING|None\n17|3|PENDING|JobArrayTaskLimit\n\n18|N/A|PENDING|None\n19|2|COMPLETED|\n";
        assert_eq!(
            parse_squeue(out),
            vec![
                TaskRow {
                    array: 17,
                    task: 0,
                    state: "RUNNING".into(),
                    reason: "None".into()
                },
                TaskRow {
                    array: 17,
                    task: 3,
                    state: "PENDING".into(),
                    reason: "JobArrayTaskLimit".into()
                },
                TaskRow {
                    array: 19,
                    task: 2,
                    state: "COMPLETED".into(),
                    reason: String::new()
                },
            ]
        );
    }

    #[test]
    fn the_state_table() {
        use Ending::*;
        // Delivered is done, whatever the state.
        assert_eq!(ending(Some("FAILED"), Some(1), true, false), Done);
        // Not the shard's fault: no attempt used.
        for s in [None, Some("NODE_FAIL"), Some("PREEMPTED")] {
            assert_eq!(ending(s, None, false, false), Restart, "{s:?}");
        }
        assert_eq!(ending(Some("FAILED"), Some(75), false, false), Restart);
        // A task that delivered batches before it was killed.
        assert_eq!(ending(Some("FAILED"), Some(137), false, true), Restart);
        for s in [
            "FAILED",
            "CANCELLED",
            "TIMEOUT",
            "OUT_OF_MEMORY",
            "BOOT_FAIL",
            "DEADLINE",
            "COMPLETED",
        ] {
            assert_eq!(ending(Some(s), Some(1), false, false), Failed, "{s}");
        }
        for s in ["PENDING", "RUNNING", "REQUEUED", "COMPLETING", "SUSPENDED"] {
            let r = TaskRow {
                array: 1,
                task: 0,
                state: s.into(),
                reason: String::new(),
            };
            assert!(r.is_live(), "{s}");
        }
        for s in [
            "FAILED",
            "COMPLETED",
            "CANCELLED",
            "NODE_FAIL",
            "PREEMPTED",
            "TIMEOUT",
        ] {
            let r = TaskRow {
                array: 1,
                task: 0,
                state: s.into(),
                reason: String::new(),
            };
            assert!(!r.is_live(), "{s}");
        }
    }

    #[test]
    fn scripts_quote_paths() {
        assert_eq!(shell_quote("/a b/it's"), "'/a b/it'\\''s'");
    }
}

//! The `processes` executor: a step's batches computed by worker processes on this machine
//! (several GPUs in one box, or CPU threads split between workers). The driver stays the single
//! writer of its store; workers read the inputs from its blob folder and write result files
//! that the driver verifies and commits (see [`crate::shard`]).
//!
//! Shards are fixed groups of whole batches (shard `s` is batches `s * k ..` for the `k` batches
//! of `shard_items`), so a shard computes exactly what one process computes. A worker that
//! exits with an error, crashes (SIGSEGV, SIGABRT, ...) or is killed without having finished a
//! batch since it started uses up one of its shard's attempts; one stopped at a batch boundary
//! (exit 75, SIGTERM) or killed after finishing a batch is restarted without using one, up to a
//! bound. A restarted shard skips the batches that already have a verified result.
//!
//! Workers run in their own process group (a Ctrl-C on the terminal reaches only the driver,
//! which passes the stop on) and die with the driver (`PR_SET_PDEATHSIG`), so none outlives it.

use crate::error::StepError;
use crate::preempt::StopFlag;
use crate::shard::{format_batches, BatchRunner, ShardJob};
use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

/// Restarts of one shard after signals, before the step fails (a worker that dies by a signal
/// every time would otherwise restart forever).
const MAX_SIGNAL_RESTARTS: u32 = 100;

/// Worker processes on this machine.
#[derive(Debug)]
pub struct ProcessRunner {
    /// The program and leading arguments of a worker (`tsr worker`).
    pub command: Vec<OsString>,
    /// Environment of each worker slot (its threads, its device); its length is the number of
    /// workers.
    pub slots: Vec<Vec<(String, String)>>,
    /// Items per shard: a whole number of the step's batches (default: the step's batches
    /// split evenly between the workers).
    pub shard_items: Option<u64>,
    /// Attempts per shard that end in an error before the step fails.
    pub max_attempts: u32,
    /// Where each step's job, results and logs go (`<work>/<step key>/<build>/`); results left
    /// there by an earlier driver of the same step and build are committed, not recomputed.
    pub work: PathBuf,
    /// One line on stderr per step handed to the workers.
    pub log: bool,
    /// Where each step's shards stand (for `tsr status`).
    pub board: crate::shard::ProgressBoard,
    /// Through the store's remote copy instead of `work` (inputs from the remote's blobs,
    /// results as its objects); `work` then keeps only the workers' logs.
    pub exchange: Option<std::sync::Arc<crate::exchange::RemoteExchange>>,
}

struct Running {
    child: Child,
    shard: u64,
    slot: usize,
    log: PathBuf,
    /// The tag of its results (and of its error, through a remote).
    tag: String,
    /// The shard's batches still to deliver when it started.
    pending_at_start: usize,
}

impl Drop for Running {
    /// A worker is never left behind: one not yet reaped is killed and reaped (a reaped one is
    /// not signalled again).
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// The name of a signal, for messages.
fn signal_name(sig: i32) -> String {
    match sig {
        libc::SIGKILL => "SIGKILL".into(),
        libc::SIGTERM => "SIGTERM".into(),
        libc::SIGINT => "SIGINT".into(),
        libc::SIGHUP => "SIGHUP".into(),
        libc::SIGSEGV => "SIGSEGV".into(),
        libc::SIGABRT => "SIGABRT".into(),
        libc::SIGBUS => "SIGBUS".into(),
        libc::SIGILL => "SIGILL".into(),
        libc::SIGFPE => "SIGFPE".into(),
        other => format!("signal {other}"),
    }
}

struct ShardState {
    batches: Vec<u64>,
    failures: u32,
    restarts: u32,
    last_error: Option<String>,
}

impl ProcessRunner {
    fn spawn(
        &self,
        job: &ShardJob,
        x: &crate::exchange::StepExchange<'_>,
        shard: u64,
        pending: &[u64],
        slot: usize,
        launch: u32,
    ) -> Result<Running, StepError> {
        use std::os::unix::process::CommandExt;
        let dir = &x.dir;
        let log = dir.join("logs").join(format!("{shard}.{launch}.log"));
        let err = std::fs::File::create(&log)
            .map_err(|e| StepError::io(format!("creating {}", log.display()), e))?;
        let tag = format!("{shard}-{launch}");
        let mut cmd = Command::new(&self.command[0]);
        cmd.args(&self.command[1..])
            .args(x.worker_args(job))
            .arg("--batches")
            .arg(format_batches(pending))
            .arg("--tag")
            .arg(&tag)
            .arg("--scratch")
            .arg(dir.join("scratch").join(slot.to_string()))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(err);
        for (k, v) in &self.slots[slot] {
            cmd.env(k, v);
        }
        // Its own process group: a terminal's Ctrl-C reaches the driver only. It dies with the
        // driver: PR_SET_PDEATHSIG, then a check that the driver did not die before it was set.
        let driver = std::process::id() as libc::pid_t;
        cmd.process_group(0);
        // SAFETY: prctl, getppid and _exit are async-signal-safe.
        unsafe {
            cmd.pre_exec(move || {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                if libc::getppid() != driver {
                    libc::_exit(1);
                }
                Ok(())
            });
        }
        let child = cmd.spawn().map_err(|e| {
            StepError::io(
                format!(
                    "starting a worker ({})",
                    Path::new(&self.command[0]).display()
                ),
                e,
            )
        })?;
        Ok(Running {
            child,
            shard,
            slot,
            log,
            tag,
            pending_at_start: pending.len(),
        })
    }
}

impl BatchRunner for ProcessRunner {
    fn progress(&self, node: &str) -> Option<crate::shard::ShardProgress> {
        self.board.get(node)
    }

    fn run(
        &self,
        job: &ShardJob,
        batches: &[u64],
        stop: &StopFlag,
        deliver: &mut crate::shard::Deliver<'_>,
    ) -> Result<(), StepError> {
        let say = |m: String| {
            if self.log {
                eprintln!("tsr: {m}");
            }
        };
        let mut x = crate::exchange::StepExchange::open(
            &self.work,
            self.exchange.as_deref(),
            job,
            stop,
            &say,
        )?;
        let (_, plan) =
            crate::shard::plan_shards(job, batches, self.shard_items, self.slots.len())?;
        let mut shards: BTreeMap<u64, ShardState> = plan
            .into_iter()
            .map(|(s, batches)| {
                let st = ShardState {
                    batches,
                    failures: 0,
                    restarts: 0,
                    last_error: None,
                };
                (s, st)
            })
            .collect();
        if self.log && job.whole {
            eprintln!(
                "tsr: {}: runs as one job in a worker process (checkpoints in {})",
                job.node,
                x.dir.display()
            );
        } else if self.log {
            eprintln!(
                "tsr: {}: {} batch(es) in {} shard(s) on {} worker process(es)",
                job.node,
                batches.len(),
                shards.len(),
                self.slots.len()
            );
        }
        let mut queue: VecDeque<u64> = shards.keys().copied().collect();
        let mut pending: BTreeSet<u64> = batches.iter().copied().collect();
        let mut running: Vec<Running> = Vec::new();
        let mut free: Vec<usize> = (0..self.slots.len().max(1)).rev().collect();
        let mut launches = 0u32;

        // Verified results not yet delivered, first one per batch.
        let mut collect = |x: &mut crate::exchange::StepExchange<'_>,
                           pending: &mut BTreeSet<u64>| {
            x.collect(job, pending, &mut *deliver, &say)
        };
        // Through a remote, results are listed at most twice a second (and when a worker
        // ends); a folder is read every round.
        let every = if self.exchange.is_some() {
            Duration::from_millis(500)
        } else {
            Duration::ZERO
        };
        let mut last_collect: Option<std::time::Instant> = None;

        let outcome = loop {
            if last_collect.is_none_or(|t| t.elapsed() >= every) {
                last_collect = Some(std::time::Instant::now());
                if let Err(e) = collect(&mut x, &mut pending) {
                    break Err(e);
                }
            }
            if pending.is_empty() {
                break Ok(());
            }
            if stop.is_set() {
                break Err(StepError::Interrupted);
            }
            // Workers that ended.
            let mut i = 0;
            let mut failed: Option<StepError> = None;
            while i < running.len() {
                let status = match running[i].child.try_wait() {
                    Ok(Some(s)) => s,
                    Ok(None) => {
                        i += 1;
                        continue;
                    }
                    Err(e) => {
                        failed = Some(StepError::io("waiting for a worker", e));
                        break;
                    }
                };
                let r = running.swap_remove(i);
                free.push(r.slot);
                if let Err(e) = collect(&mut x, &mut pending) {
                    failed = Some(e);
                    break;
                }
                let st = shards.get_mut(&r.shard).expect("a running shard is known");
                if !st.batches.iter().any(|b| pending.contains(b)) {
                    continue;
                }
                use std::os::unix::process::ExitStatusExt;
                let left = st.batches.iter().filter(|b| pending.contains(b)).count();
                let progressed = left < r.pending_at_start;
                let stopped = status.code() == Some(crate::EXIT_INTERRUPTED)
                    || matches!(
                        status.signal(),
                        Some(libc::SIGTERM | libc::SIGINT | libc::SIGHUP)
                    )
                    || (status.signal() == Some(libc::SIGKILL) && progressed);
                if stopped {
                    st.restarts += 1;
                    if st.restarts > MAX_SIGNAL_RESTARTS {
                        failed = Some(StepError::Other(format!(
                            "the worker of shard {} was stopped or killed {} times; last log {}",
                            r.shard,
                            st.restarts,
                            r.log.display()
                        )));
                        break;
                    }
                } else {
                    st.failures += 1;
                    let why = match (status.code(), status.signal()) {
                        (Some(0), _) => "it exited without writing every batch".to_string(),
                        (Some(c), _) => format!("it exited with {c}"),
                        (None, Some(sig)) => format!(
                            "it was killed by {} before finishing a batch",
                            signal_name(sig)
                        ),
                        (None, None) => "it ended abnormally".to_string(),
                    };
                    let said = x.failure(job, &r.tag, false, &r.log);
                    st.last_error = Some(format!("{why}: {said} (log {})", r.log.display()));
                    if st.failures >= self.max_attempts.max(1) {
                        failed = Some(StepError::Other(format!(
                            "shard {} failed {} times; last attempt: {}",
                            r.shard,
                            st.failures,
                            st.last_error.as_deref().unwrap_or("")
                        )));
                        break;
                    }
                }
                queue.push_back(r.shard);
            }
            if let Some(e) = failed {
                break Err(e);
            }
            // Start shards on free slots (none once a stop was asked for).
            while let (Some(&slot), Some(&shard), false) =
                (free.last(), queue.front(), stop.is_set())
            {
                let todo: Vec<u64> = shards[&shard]
                    .batches
                    .iter()
                    .copied()
                    .filter(|b| pending.contains(b))
                    .collect();
                queue.pop_front();
                if todo.is_empty() {
                    continue;
                }
                launches += 1;
                match self.spawn(job, &x, shard, &todo, slot, launches) {
                    Ok(r) => {
                        free.pop();
                        running.push(r);
                    }
                    Err(e) => {
                        failed = Some(e);
                        break;
                    }
                }
            }
            if let Some(e) = failed {
                break Err(e);
            }
            self.board.set(&job.node, {
                let done = shards
                    .values()
                    .filter(|st| !st.batches.iter().any(|b| pending.contains(b)))
                    .count() as u64;
                crate::shard::ShardProgress {
                    shards: shards.len() as u64,
                    waiting: (shards.len() as u64)
                        .saturating_sub(done)
                        .saturating_sub(running.len() as u64),
                    running: running.len() as u64,
                    done,
                    failed_attempts: shards.values().map(|st| st.failures).sum(),
                    workers: running
                        .iter()
                        .map(|r| format!("pid {} (shard {})", r.child.id(), r.shard))
                        .collect(),
                    note: None,
                }
            });
            // (Batches delivered while reaping leave nothing pending: the next round ends.)
            if running.is_empty() && queue.is_empty() && !stop.is_set() && !pending.is_empty() {
                break Err(StepError::Other(format!(
                    "no worker is left to compute batches {:?}",
                    pending.iter().take(10).collect::<Vec<_>>()
                )));
            }
            std::thread::sleep(Duration::from_millis(20));
        };

        self.board.clear(&job.node);
        // What still runs: after a stop, it finishes its batch (SIGTERM, and SIGCONT for one
        // that is stopped) and is waited for (a second signal ends the driver, and with it the
        // workers); otherwise it has nothing left to give and is killed.
        let stopping = matches!(outcome, Err(StepError::Interrupted));
        for r in &mut running {
            if stopping {
                // SAFETY: signals to a child this process started and has not reaped.
                unsafe {
                    libc::kill(r.child.id() as libc::pid_t, libc::SIGTERM);
                    libc::kill(r.child.id() as libc::pid_t, libc::SIGCONT);
                }
            } else {
                let _ = r.child.kill();
            }
        }
        for mut r in running.drain(..) {
            let _ = r.child.wait();
        }
        match outcome {
            Ok(()) => {
                x.finish(job, &say);
                Ok(())
            }
            Err(e) => {
                // What finished while stopping is kept for the next attempt of the step.
                let _ = collect(&mut x, &mut pending);
                Err(e)
            }
        }
    }
}

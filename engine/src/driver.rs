//! The driver: opens or checks a run, then loops plan -> execute -> commit until the run is
//! done, a step fails, or a stop signal arrives. Independent steps run concurrently on tokio's
//! blocking pool under per-resource limits (one `Compute` user at a time by default).
//!
//! Commit protocol of a step: (1) record `Running{attempt}` and the node binding, flush;
//! (2) run the step, which commits items and checkpoints itself; (3) move its outputs into the
//! blob store (fsync + rename); (4) record `Done{outputs}`, artifacts and lineage edges in one
//! batch, flush. A crash before (4) leaves `Running`, and the next run resumes the step.

use crate::context::{new_step_record, Progress, StepContext, StoreJournal};
use crate::dag::Dag;
use crate::error::{EngineError, StepError};
use crate::machine::{transition, Event};
use crate::output::OutputData;
use crate::plan::{plan, Action, JournalView};
use crate::preempt::StopFlag;
use crate::shard::{BatchRunner, ShardJob};
use crate::step::{Resource, Step, StepInputs};
use std::cell::RefCell;
use std::collections::{BTreeMap, BTreeSet};
use std::io::IsTerminal;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;
use tsr_state::{
    now_ms, ArtifactRecord, Commit, Digest, EdgeRecord, NodeRecord, RunStatus, StateError,
    StepRecord, Store, WorkerRecord,
};

#[derive(Clone, Debug)]
pub struct DriverOptions {
    pub device: String,
    pub stop: StopFlag,
    pub limits: BTreeMap<Resource, usize>,
    pub max_parallel: usize,
    /// Progress bars (drawn only when stderr is a terminal).
    pub progress: bool,
    /// One line per step start/finish on stderr.
    pub log: bool,
    /// Where the batches of shardable steps go (another executor than this process), with the
    /// identity of this program that its workers check.
    pub runner: Option<(Arc<dyn BatchRunner>, String)>,
}

impl Default for DriverOptions {
    fn default() -> Self {
        let mut limits = BTreeMap::new();
        limits.insert(Resource::Compute, 1);
        limits.insert(Resource::Io, 2);
        DriverOptions {
            device: "cpu".into(),
            stop: StopFlag::new(),
            limits,
            max_parallel: 2,
            progress: true,
            log: true,
            runner: None,
        }
    }
}

#[derive(Clone, Debug, PartialEq)]
pub enum Outcome {
    Completed {
        executed: Vec<String>,
        reused: Vec<String>,
    },
    Interrupted,
    /// Stopped at a limit the user set (a token budget), progress saved: raise it and run
    /// again. Says which step and limit.
    Limited(String),
}

struct StoreView<'a> {
    store: &'a Store,
    bindings: BTreeMap<String, Digest>,
    externals: &'a BTreeMap<String, Digest>,
    error: RefCell<Option<StateError>>,
}

impl<'a> StoreView<'a> {
    fn load(
        store: &'a Store,
        run: &str,
        externals: &'a BTreeMap<String, Digest>,
    ) -> Result<Self, StateError> {
        let bindings = store
            .nodes(run)?
            .into_iter()
            .map(|(n, r)| (n, r.step_key))
            .collect();
        Ok(StoreView {
            store,
            bindings,
            externals,
            error: RefCell::new(None),
        })
    }
}

impl JournalView for StoreView<'_> {
    fn binding(&self, node: &str) -> Option<Digest> {
        self.bindings.get(node).copied()
    }
    fn status(&self, key: &Digest) -> Option<tsr_state::StepStatus> {
        match self.store.get_step(key) {
            Ok(r) => r.map(|r| r.status),
            Err(e) => {
                self.error.borrow_mut().get_or_insert(e);
                None
            }
        }
    }
    fn external(&self, node: &str, input: &str) -> Option<Digest> {
        self.externals.get(&format!("{node}/{input}")).copied()
    }
}

/// Outcome of one executed node, reported back to the driver loop.
enum Executed {
    /// Done; the peak resident memory while it ran, when measured.
    Done(Option<u64>),
    Interrupted,
    /// Paused with its progress saved: a service it uses does not answer (`Unavailable`) or a
    /// limit was reached (`Limit`); the message says which.
    Paused(StepError),
}

/// Set to 1 to print each compute step's peak resident memory when it is done (for checking
/// `tsr plan`'s estimates). It resets the process's peak as the kernel keeps it, so the peak
/// that `time -v` or getrusage report is then the last step's only.
pub const STEP_MEMORY_ENV: &str = "TSR_STEP_MEMORY";

/// Resets the process's peak resident memory (Linux: `VmHWM`), so that [`peak_rss`] measures
/// from here. False where that is not possible.
fn reset_peak_rss() -> bool {
    std::fs::write("/proc/self/clear_refs", "5").is_ok()
}

/// Gives memory the allocator holds free back to the kernel (glibc keeps up to its trim
/// threshold, 1 GiB as tsr sets it, and free pages inside the heap), so one step's buffers
/// do not add to the next step's resident memory.
fn release_free_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    unsafe {
        libc::malloc_trim(0);
    }
}

/// The process's peak resident memory in bytes since start or the last [`reset_peak_rss`].
pub fn peak_rss() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let kb: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()?;
    Some(kb * 1024)
}

pub struct Driver {
    store: Arc<Store>,
    dag: Arc<Dag>,
    run: String,
    opts: DriverOptions,
}

impl Driver {
    pub fn new(store: Arc<Store>, dag: Arc<Dag>, run: &str, opts: DriverOptions) -> Self {
        Driver {
            store,
            dag,
            run: run.to_string(),
            opts,
        }
    }

    fn log(&self, multi: &indicatif::MultiProgress, line: String) {
        if !self.opts.log {
            return;
        }
        if self.opts.progress && std::io::stderr().is_terminal() {
            let _ = multi.println(line);
        } else {
            eprintln!("{line}");
        }
    }

    fn snapshot(
        &self,
        workflow: &str,
        running: &BTreeSet<String>,
        notes: &BTreeMap<String, crate::context::Note>,
    ) {
        if let Ok(mut nodes) =
            crate::status::status_rows(&self.store, &self.dag, &self.run, running)
        {
            if let Some((runner, _)) = &self.opts.runner {
                for row in nodes.iter_mut().filter(|r| running.contains(&r.node)) {
                    row.shards = runner.progress(&row.node);
                }
            }
            for row in nodes.iter_mut().filter(|r| running.contains(&r.node)) {
                row.note = notes
                    .get(&row.node)
                    .and_then(|n| n.lock().unwrap_or_else(|p| p.into_inner()).clone());
            }
            crate::status::write_snapshot(
                self.store.root(),
                &crate::status::RunStatusView {
                    run: self.run.clone(),
                    workflow: workflow.to_string(),
                    status: "running".into(),
                    live_pid: Some(std::process::id()),
                    nodes,
                    remote: crate::status::remote_lag(&self.store),
                },
            );
        }
    }

    /// Why a node's step key differs from the one recorded: the step's own definition (kind,
    /// version, config: a different tsr) or its inputs (an edited file or upstream result).
    fn explain_conflict(&self, node: &str, recorded: &Digest, now: &Digest) -> EngineError {
        let n = self.dag.get(node).expect("planned node exists");
        if let Ok(Some(rec)) = self.store.get_step(recorded) {
            let config = serde_json::to_string(&n.step.config()).unwrap_or_default();
            let mut what = Vec::new();
            if rec.kind != n.step.kind() {
                what.push(format!("kind {} -> {}", rec.kind, n.step.kind()));
            }
            if rec.version != n.step.version() {
                what.push(format!("version {} -> {}", rec.version, n.step.version()));
            }
            if rec.config != config {
                what.push(format!("config {} -> {config}", rec.config));
            }
            if !what.is_empty() {
                return EngineError::StepDefinitionChanged {
                    run: self.run.clone(),
                    node: node.to_string(),
                    what: what.join("; "),
                };
            }
        }
        EngineError::InputChanged {
            run: self.run.clone(),
            node: node.to_string(),
            recorded: recorded.short(),
            now: now.short(),
        }
    }

    fn set_run_status(&self, status: RunStatus) -> Result<(), EngineError> {
        let mut r = self.store.run(&self.run)?;
        r.status = status;
        r.updated_ms = now_ms();
        self.store.put_run(&r)?;
        Ok(())
    }

    /// Run until every node is done, a step fails, or the stop flag is set.
    pub fn run(&self) -> Result<Outcome, EngineError> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| EngineError::Other(format!("cannot start the tokio runtime: {e}")))?;
        self.set_run_status(tsr_state::RunStatus::Running)?;
        let res = rt.block_on(self.run_async());
        let status = match &res {
            Ok(Outcome::Completed { .. }) => RunStatus::Done,
            Ok(Outcome::Interrupted | Outcome::Limited(_)) => RunStatus::Interrupted,
            Err(e) => RunStatus::Failed {
                error: tsr_state::error_chain(e),
            },
        };
        self.set_run_status(status)?;
        if let Ok(run) = self.store.run(&self.run) {
            self.snapshot(&run.workflow, &BTreeSet::new(), &BTreeMap::new());
        }
        let _ = std::fs::remove_file(crate::status::snapshot_path(self.store.root(), &self.run));
        res
    }

    async fn run_async(&self) -> Result<Outcome, EngineError> {
        let run = self.store.run(&self.run)?;
        let externals = run.externals.clone();
        let multi = if self.opts.progress {
            indicatif::MultiProgress::new()
        } else {
            indicatif::MultiProgress::with_draw_target(indicatif::ProgressDrawTarget::hidden())
        };
        let mut set: tokio::task::JoinSet<(String, Digest, Result<Executed, EngineError>)> =
            tokio::task::JoinSet::new();
        let mut in_flight: BTreeMap<Digest, (String, Vec<Resource>)> = BTreeMap::new();
        // What each running step published about itself, for the live snapshot.
        let mut notes: BTreeMap<String, crate::context::Note> = BTreeMap::new();
        let mut executed = Vec::new();
        let mut reused = Vec::new();
        let mut failure: Option<EngineError> = None;
        let mut interrupted = false;
        // The first step stopped at a limit the user set.
        let mut limited: Option<String> = None;
        loop {
            let running: BTreeSet<String> = in_flight.values().map(|(n, _)| n.clone()).collect();
            self.snapshot(&run.workflow, &running, &notes);
            let view = StoreView::load(&self.store, &self.run, &externals)?;
            let keys: BTreeSet<Digest> = in_flight.keys().copied().collect();
            let p = plan(&self.dag, &view, &keys);
            if let Some(e) = view.error.borrow_mut().take() {
                failure.get_or_insert(e.into());
            }
            let mut changed = false;
            for action in &p.actions {
                match action {
                    Action::Conflict {
                        node,
                        recorded,
                        now,
                    } => {
                        let e = self.explain_conflict(node, recorded, now);
                        failure.get_or_insert(e);
                    }
                    Action::Reuse { node, key } => {
                        let iteration = self.dag.get(node).and_then(|n| n.iteration);
                        let mut c = Commit::new();
                        c.node(
                            &self.run,
                            node,
                            &NodeRecord {
                                step_key: *key,
                                reused: true,
                                iteration,
                            },
                        );
                        self.store.commit(c)?;
                        self.log(
                            &multi,
                            format!("tsr: {node}: reused (step {} already done)", key.short()),
                        );
                        reused.push(node.clone());
                        changed = true;
                    }
                    Action::Execute { .. } => {}
                }
            }
            if p.complete() && set.is_empty() {
                return Ok(Outcome::Completed { executed, reused });
            }
            let stopping = failure.is_some() || interrupted || self.opts.stop.is_set();
            if !stopping {
                for action in p.actions {
                    let Action::Execute { node, key, inputs } = action else {
                        continue;
                    };
                    if in_flight.len() >= self.opts.max_parallel {
                        break;
                    }
                    let n = self.dag.get(&node).expect("planned node exists");
                    let res = n.step.resources();
                    let fits = res.iter().all(|r| {
                        let used = in_flight.values().filter(|(_, rs)| rs.contains(r)).count();
                        used < *self.opts.limits.get(r).unwrap_or(&1)
                    });
                    if !fits {
                        continue;
                    }
                    let externals_paths = n.external_paths();
                    let bar = multi.add(indicatif::ProgressBar::new(0));
                    bar.set_style(
                        indicatif::ProgressStyle::with_template(
                            "{prefix:>24} [{bar:30}] {pos}/{len} {msg} ({elapsed})",
                        )
                        .expect("progress template")
                        .progress_chars("=> "),
                    );
                    bar.set_prefix(node.clone());
                    let job = Job {
                        store: self.store.clone(),
                        run: self.run.clone(),
                        node: node.clone(),
                        iteration: n.iteration,
                        step: n.step.clone(),
                        key,
                        inputs,
                        externals: externals_paths,
                        device: self.opts.device.clone(),
                        stop: self.opts.stop.clone(),
                        progress: Progress::new(bar),
                        runner: self.opts.runner.clone(),
                    };
                    let rec = self.store.get_step(&key)?;
                    let resume = rec
                        .as_ref()
                        .map(|r| {
                            format!(" (attempt {}, {} items done)", r.attempts + 1, r.items_done)
                        })
                        .unwrap_or_default();
                    changed = true;
                    let started = match job.start() {
                        Ok(rec) => rec,
                        Err(e) => {
                            job.progress.finish();
                            self.log(&multi, format!("tsr: {node}: could not start"));
                            failure.get_or_insert(e);
                            break;
                        }
                    };
                    self.log(&multi, format!("tsr: {node}: started{resume}"));
                    notes.insert(node.clone(), job.progress.note());
                    in_flight.insert(key, (node.clone(), res));
                    set.spawn_blocking(move || {
                        let node = job.node.clone();
                        let key = job.key;
                        (node, key, job.execute(started))
                    });
                }
            }
            if changed {
                let running: BTreeSet<String> =
                    in_flight.values().map(|(n, _)| n.clone()).collect();
                self.snapshot(&run.workflow, &running, &notes);
            }
            if set.is_empty() {
                if let Some(e) = failure {
                    return Err(e);
                }
                if let Some(why) = limited {
                    return Ok(Outcome::Limited(why));
                }
                if stopping {
                    return Ok(Outcome::Interrupted);
                }
                if !changed {
                    return Err(EngineError::Other(
                        "the run cannot make progress: no step is ready and none is running".into(),
                    ));
                }
                continue;
            }
            // Refresh the live snapshot every two seconds while steps run, so `tsr status` from
            // another terminal shows item progress.
            let joined = loop {
                match tokio::time::timeout(std::time::Duration::from_secs(2), set.join_next()).await
                {
                    Ok(j) => break j.expect("a task is in flight"),
                    Err(_) => {
                        let running: BTreeSet<String> =
                            in_flight.values().map(|(n, _)| n.clone()).collect();
                        self.snapshot(&run.workflow, &running, &notes);
                    }
                }
            };
            let (node, key, res) = match joined {
                Ok(v) => v,
                Err(e) => {
                    return Err(EngineError::Other(format!(
                        "a step task could not be joined: {e}"
                    )))
                }
            };
            in_flight.remove(&key);
            notes.remove(&node);
            match res {
                Ok(Executed::Done(peak)) => {
                    let peak = peak
                        .map(|b| format!(" (peak memory {:.2} GB)", b as f64 / (1u64 << 30) as f64))
                        .unwrap_or_default();
                    self.log(&multi, format!("tsr: {node}: done{peak}"));
                    executed.push(node);
                }
                Ok(Executed::Interrupted) => {
                    self.log(&multi, format!("tsr: {node}: interrupted, progress saved"));
                    interrupted = true;
                }
                Ok(Executed::Paused(e)) => {
                    self.log(
                        &multi,
                        format!("tsr: {node}: stopped with its progress saved: {e}"),
                    );
                    interrupted = true;
                    if matches!(e, StepError::Limit(_)) {
                        limited.get_or_insert_with(|| format!("{node}: {e}"));
                    }
                }
                Err(e) => {
                    self.log(&multi, format!("tsr: {node}: failed"));
                    failure.get_or_insert(e);
                }
            }
        }
    }
}

/// One node's execution, moved to a blocking thread.
struct Job {
    store: Arc<Store>,
    run: String,
    node: String,
    iteration: Option<u32>,
    step: Arc<dyn Step>,
    key: Digest,
    inputs: BTreeMap<String, Digest>,
    externals: BTreeMap<String, PathBuf>,
    device: String,
    stop: StopFlag,
    progress: Progress,
    runner: Option<(Arc<dyn BatchRunner>, String)>,
}

impl Job {
    fn transition_err(&self, from: &str, event: &str) -> EngineError {
        EngineError::Transition {
            node: self.node.clone(),
            from: from.to_string(),
            event: event.to_string(),
        }
    }

    fn binding(&self) -> NodeRecord {
        NodeRecord {
            step_key: self.key,
            reused: false,
            iteration: self.iteration,
        }
    }

    /// Records the start of a new attempt (durable before the step runs, so the live snapshot
    /// taken right after shows it). Returns the step record to run with.
    fn start(&self) -> Result<StepRecord, EngineError> {
        let store = &self.store;
        let step = &self.step;
        let config = step.config();
        let mut rec = match store.get_step(&self.key)? {
            Some(r) => r,
            None => new_step_record(
                step.kind(),
                step.version(),
                &config,
                &self.inputs,
                &self.run,
                &self.node,
            ),
        };
        rec.status = transition(&rec.status, Event::Start, rec.attempts)
            .map_err(|(f, e)| self.transition_err(f, e))?;
        rec.attempts += 1;
        let mut c = Commit::new();
        c.step(&self.key, &rec)
            .node(&self.run, &self.node, &self.binding());
        store.commit(c)?;
        Ok(rec)
    }

    /// Runs the started attempt (see [`Job::start`]) and records how it ended.
    fn execute(self, rec: StepRecord) -> Result<Executed, EngineError> {
        let store = &self.store;
        let step = &self.step;
        let attempt = rec.attempts;

        let scratch = store
            .blobs()
            .tmp_dir()
            .join(format!("step-{}", self.key.short()));
        let _ = std::fs::remove_dir_all(&scratch);
        std::fs::create_dir_all(&scratch).map_err(|e| StateError::Io {
            path: scratch.clone(),
            source: e,
        })?;
        let journal = Arc::new(
            StoreJournal::new(store.clone(), self.key, rec).with_worker(crate::identity::here(
                "local",
                None,
                attempt,
                &self.device,
            )),
        );
        let mut ctx = StepContext::new(
            &self.node,
            self.key,
            scratch.clone(),
            &self.device,
            self.stop.clone(),
            journal.clone(),
            self.progress.clone(),
        );
        let shard_job = |build: &String, whole: bool| ShardJob {
            node: self.node.clone(),
            key: self.key,
            kind: step.kind().to_string(),
            version: step.version(),
            config: step.config(),
            inputs: self.inputs.clone(),
            externals: self.externals.clone(),
            external_blobs: Default::default(),
            blobs: store.blobs().dir().to_path_buf(),
            device: self.device.clone(),
            // Filled in by the step's `for_each_batch`; a whole step is one item.
            total: whole as u64,
            batch: 1,
            build: build.clone(),
            whole,
        };
        // A whole step another executor runs (see `crate::job`), with who ran it.
        let elsewhere = match &self.runner {
            Some((runner, build)) if step.runs_as_job() => {
                Some((runner.clone(), shard_job(build, true)))
            }
            _ => None,
        };
        let mut ran_by = None;
        if let (Some((runner, build)), true) = (&self.runner, step.shardable()) {
            ctx = ctx.with_runner(runner.clone(), shard_job(build, false));
        }
        let inputs = StepInputs::new(
            store.blobs().clone(),
            self.inputs.clone(),
            self.externals.clone(),
        );
        let t0 = Instant::now();
        // Compute steps run one at a time: the process's peak while one runs is its peak.
        let compute = step.resources().contains(&crate::step::Resource::Compute);
        if compute {
            release_free_memory();
        }
        // Per-step peaks only when asked: resetting the peak also resets what `time -v` and
        // getrusage report for the whole process.
        let measured =
            compute && std::env::var(STEP_MEMORY_ENV).is_ok_and(|v| v == "1") && reset_peak_rss();
        let result = if let Some((runner, job)) = &elsewhere {
            crate::job::run_elsewhere(runner.as_ref(), job, &self.stop).map(|(out, who, _)| {
                ran_by = Some(who);
                out
            })
        } else {
            std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| step.run(&inputs, &ctx)))
                .unwrap_or_else(|p| {
                    let msg = p
                        .downcast_ref::<String>()
                        .cloned()
                        .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
                        .unwrap_or_else(|| "unknown panic".into());
                    Err(StepError::Other(format!("the step panicked: {msg}")))
                })
        };
        self.progress.finish();
        let mut rec = journal.record();
        rec.busy_ms += t0.elapsed().as_millis() as u64;

        let outputs = match result {
            Ok(o) => o,
            Err(StepError::Interrupted) if self.stop.is_set() => {
                rec.status = transition(&rec.status, Event::Interrupt, rec.attempts)
                    .map_err(|(f, e)| self.transition_err(f, e))?;
                let mut c = Commit::new();
                c.step(&self.key, &rec);
                store.commit(c)?;
                return Ok(Executed::Interrupted);
            }
            Err(e @ (StepError::Unavailable(_) | StepError::Limit(_))) => {
                // Not a failure: the step continues where it stopped when the run is started
                // again (later, or with a higher limit).
                rec.status = transition(&rec.status, Event::Interrupt, rec.attempts)
                    .map_err(|(f, e)| self.transition_err(f, e))?;
                let mut c = Commit::new();
                c.step(&self.key, &rec);
                store.commit(c)?;
                return Ok(Executed::Paused(e));
            }
            Err(e) => {
                rec.status = transition(
                    &rec.status,
                    Event::Fail(tsr_state::error_chain(&e)),
                    rec.attempts,
                )
                .map_err(|(f, e)| self.transition_err(f, e))?;
                let mut c = Commit::new();
                c.step(&self.key, &rec);
                store.commit(c)?;
                return Err(EngineError::StepFailed {
                    node: self.node.clone(),
                    kind: step.kind().to_string(),
                    attempt,
                    source: e,
                });
            }
        };

        // Every declared output, and nothing else.
        let declared: BTreeSet<&str> = step.outputs().into_iter().collect();
        for name in outputs.names() {
            if !declared.contains(name) {
                return Err(EngineError::BadNode {
                    node: self.node.clone(),
                    reason: format!("produced undeclared output `{name}`"),
                });
            }
        }
        for name in &declared {
            if !outputs.items.contains_key(*name) {
                return Err(EngineError::MissingOutput {
                    node: self.node.clone(),
                    output: name.to_string(),
                });
            }
        }
        let mut digests = BTreeMap::new();
        let mut c = Commit::new();
        for (name, (kind, data)) in outputs.items {
            let d = match data {
                OutputData::Bytes(b) => store.blobs().put_bytes(&b)?,
                OutputData::File(p) => store.blobs().put_file(&p)?,
                OutputData::Blob(d) => {
                    store.blobs().require(&d)?;
                    d
                }
            };
            let size = store.blobs().size(&d).unwrap_or(0);
            c.artifact(
                &d,
                &ArtifactRecord {
                    kind,
                    size,
                    producer: Some(self.key),
                    output: name.clone(),
                },
            );
            for (input_name, input) in &self.inputs {
                c.edge(
                    &d,
                    input,
                    &EdgeRecord {
                        step: self.key,
                        input_name: input_name.clone(),
                        output_name: name.clone(),
                    },
                );
            }
            digests.insert(name, d);
        }
        rec.status = transition(&rec.status, Event::Finish(digests.clone()), rec.attempts)
            .map_err(|(f, e)| self.transition_err(f, e))?;
        let old_checkpoint = rec.checkpoint.take();
        if let Some(who) = &ran_by {
            c.worker(
                &self.key,
                0,
                &WorkerRecord {
                    last: 0,
                    ..who.clone()
                },
            );
        }
        c.step(&self.key, &rec)
            .node(&self.run, &self.node, &self.binding());
        store.commit(c)?;
        // A replicated store ships the finished step (and waits when the remote lags too far).
        store.mark(
            tsr_state::SyncPoint::StepDone,
            &crate::context::remote_waiting,
        );
        // The step is durable; its checkpoint and scratch are no longer needed.
        if let Some(cp) = old_checkpoint {
            for d in cp.blobs.values() {
                if !digests.values().any(|o| o == d) && store.get_artifact(d)?.is_none() {
                    store.blobs().remove(d)?;
                }
            }
        }
        let _ = std::fs::remove_dir_all(&scratch);
        Ok(Executed::Done(measured.then(peak_rss).flatten()))
    }
}

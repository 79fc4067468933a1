//! `tsr run`, `tsr resume`, `tsr fork`: define or continue a run and drive it.

use crate::store_read::open_store;
use anyhow::{bail, Context};
use clap::Args;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use tsr_engine::{open_run, preempt, Driver, DriverOptions, Outcome, StopFlag};
use tsr_state::Store;
use tsr_workflows::Config;

#[derive(Args)]
pub struct RunArgs {
    /// The run config (TOML).
    pub config: PathBuf,
    /// Override the config's device (cpu, cuda:0); not part of the run's definition.
    #[arg(long)]
    pub device: Option<String>,
    /// No progress bars or step lines.
    #[arg(long)]
    pub quiet: bool,
    #[command(flatten)]
    pub remote: crate::cmd_remote::RemoteArgs,
    #[command(flatten)]
    pub executor: ExecutorArgs,
}

/// Where item steps' batches are computed; overrides the config's `[executor]` (not part of a
/// run's definition).
#[derive(Args, Clone, Default)]
pub struct ExecutorArgs {
    /// `local` (this process), `processes` (worker processes on this machine) or `slurm`
    /// (Slurm array jobs).
    #[arg(long, value_name = "KIND")]
    pub executor: Option<String>,
    /// Worker processes, or Slurm array tasks in flight (with --executor processes or slurm).
    #[arg(long, value_name = "N")]
    pub workers: Option<usize>,
}

impl ExecutorArgs {
    /// `config` with these flags applied, validated.
    pub fn apply(&self, config: &Config) -> anyhow::Result<Config> {
        let mut c = config.clone();
        if let Some(k) = &self.executor {
            let kind: tsr_workflows::Executor = k
                .parse()
                .map_err(|e: String| anyhow::anyhow!("--executor: {e}"))?;
            c.executor.get_or_insert_with(Default::default).kind = kind;
        }
        if let Some(n) = self.workers {
            let x = c.executor.get_or_insert_with(Default::default);
            if x.kind == tsr_workflows::Executor::Local {
                bail!("--workers goes with worker processes or Slurm: add --executor processes or --executor slurm (or set kind in [executor])");
            }
            x.workers = n;
        }
        c.validate()?;
        Ok(c)
    }
}

/// Where worker processes put their results, per step key and build (`<store>/work/`): a
/// driver that resumes a step commits what its predecessor's workers finished; `tsr gc` removes
/// what no step will read again.
pub const WORK_DIR: &str = "work";

/// The batch runner of the config's executor (`None`: this process computes the batches), with
/// this program's identity for its workers.
fn runner_of(
    config: &Config,
    store: &Store,
    log: bool,
) -> anyhow::Result<Option<(Arc<dyn tsr_engine::shard::BatchRunner>, String)>> {
    let Some(x) = config.executor.as_ref() else {
        return Ok(None);
    };
    match x.kind {
        tsr_workflows::Executor::Local => return Ok(None),
        tsr_workflows::Executor::Slurm => return slurm_runner(config, x, store, log).map(Some),
        tsr_workflows::Executor::Processes => {}
    }
    let threads = tsr_model::cpu_threads();
    let slots = (0..x.workers)
        .map(|i| match x.devices.get(i) {
            Some(d) => vec![("TSR_WORKER_DEVICE".to_string(), d.clone())],
            None => vec![(
                "RAYON_NUM_THREADS".to_string(),
                (threads / x.workers).max(1).to_string(),
            )],
        })
        .collect();
    let exchange = exchange_of(x, store, log)?;
    let runner = tsr_engine::processes::ProcessRunner {
        exchange,
        command: vec![tsr_engine::identity::SELF_EXE.into(), "worker".into()],
        slots,
        shard_items: x.shard_items,
        max_attempts: x.max_attempts,
        work: store.root().join(WORK_DIR),
        log,
        board: Default::default(),
    };
    Ok(Some((Arc::new(runner), crate::cmd_worker::build_id()?)))
}

/// How the workers get inputs and hand back results: through the store's remote copy
/// (`share = "remote"`, the default under Slurm when the run has a remote), else `None` (a
/// folder they share with the driver).
fn exchange_of(
    x: &tsr_workflows::ExecutorSection,
    store: &Store,
    log: bool,
) -> anyhow::Result<Option<Arc<tsr_engine::exchange::RemoteExchange>>> {
    use tsr_workflows::{Executor, Share};
    let url = store.remote()?.map(|r| r.url);
    let share = x.share.unwrap_or(match (x.kind, &url) {
        (Executor::Slurm, Some(_)) => Share::Remote,
        _ => Share::Filesystem,
    });
    if share == Share::Filesystem {
        return Ok(None);
    }
    let url = url.context(
        "executor.share = \"remote\": this run has no remote copy; give --remote URL (or remote = \"...\" in the config), or set share = \"filesystem\" with the store on a filesystem the workers see",
    )?;
    let parsed = tsr_state::remote::RemoteUrl::parse(&url)?;
    let remote = tsr_state::remote::Remote::open_for_writing(&parsed)
        .with_context(|| format!("opening {url} for the workers' inputs and results"))?;
    if log {
        eprintln!(
            "tsr: workers take their inputs from {url} (cached per node in {}, at most {} GB) and hand back results there",
            x.node_cache.display(),
            x.node_cache_gb
        );
    }
    Ok(Some(Arc::new(tsr_engine::exchange::RemoteExchange {
        remote: Arc::new(remote),
        node_cache: x.node_cache.clone(),
        node_cache_bytes: (x.node_cache_gb * 1e9) as u64,
    })))
}

/// The `slurm` executor's runner, once Slurm said it would accept its jobs.
fn slurm_runner(
    config: &Config,
    x: &tsr_workflows::ExecutorSection,
    store: &Store,
    log: bool,
) -> anyhow::Result<(Arc<dyn tsr_engine::shard::BatchRunner>, String)> {
    let binary = match &x.binary {
        Some(b) => b.clone(),
        None => std::env::current_exe()
            .context("finding this program's path for the Slurm tasks; set executor.binary")?,
    };
    // Each item step's tasks ask for the memory the plan estimates for it (with a quarter more:
    // Slurm ends a task at its limit), unless `mem` is set; on a GPU, for what the host holds
    // while the model loads.
    let plan = tsr_workflows::memory::plan(config, None)
        .context("estimating each step's memory for its Slurm tasks")?;
    let step_args = plan
        .nodes
        .iter()
        .filter(|n| tsr_steps::shards::in_workers(&n.kind))
        .map(|n| {
            let host = if config.device == "cpu" {
                n.peak
            } else {
                n.parts.overhead + n.parts.weights + n.parts.load
            };
            (
                n.node.clone(),
                x.sbatch_args_for(Some(&n.kind), Some(host + host / 4)),
            )
        })
        .collect();
    let exchange = exchange_of(x, store, log)?;
    let runner = tsr_engine::slurm::SlurmRunner {
        exchange,
        worker_env: x.worker_env.clone(),
        binary,
        sbatch_args: x.sbatch_args(),
        step_args,
        workers: x.workers,
        shard_items: x.shard_items,
        max_attempts: x.max_attempts,
        work: store.root().join(WORK_DIR),
        store_id: crate::cmd_cancel::job_owner(store)?,
        run: config.name.clone(),
        poll: std::time::Duration::from_secs(1),
        stuck_after: std::time::Duration::from_secs(x.stuck_after_s),
        log,
        board: Default::default(),
    };
    runner.check().map_err(|e| {
        anyhow::anyhow!(
            "executor.kind = \"slurm\": Slurm would not accept the array jobs ({}); fix [executor] (partition, account, qos, gres, mem, time, extra_args) or start the controller, then run again",
            e
        )
    })?;
    Ok((Arc::new(runner), crate::cmd_worker::build_id()?))
}

#[derive(Args)]
pub struct ResumeArgs {
    pub run: String,
    #[arg(long)]
    pub device: Option<String>,
    #[arg(long)]
    pub quiet: bool,
    #[command(flatten)]
    pub remote: crate::cmd_remote::RemoteArgs,
    #[command(flatten)]
    pub executor: ExecutorArgs,
    /// API judges read their recorded answers and ask their server for none (`tsr verify
    /// --repair` without --ask-api).
    #[arg(skip)]
    pub offline_api_judges: bool,
}

#[derive(Args)]
pub struct ForkArgs {
    /// The run to branch from.
    pub run: String,
    /// Name of the new run.
    #[arg(long)]
    pub name: String,
    /// Changed settings, dotted keys as in the config: --set dpo.beta=0.2
    #[arg(long = "set")]
    pub sets: Vec<String>,
    /// Only record the new run; do not execute it (`tsr resume NEW` does).
    #[arg(long)]
    pub no_run: bool,
    #[arg(long)]
    pub device: Option<String>,
    #[arg(long)]
    pub quiet: bool,
    #[command(flatten)]
    pub remote: crate::cmd_remote::RemoteArgs,
    #[command(flatten)]
    pub executor: ExecutorArgs,
}

/// Open or create the store of a run.
fn create_store(dir: &Path) -> anyhow::Result<Arc<Store>> {
    Ok(Arc::new(Store::open(dir).with_context(|| {
        format!("opening the store {}", dir.display())
    })?))
}

/// Drive a defined run to the end (or to an interruption). Shared by run, resume and fork.
/// With a remote, the store is replicated while the run goes on (and first restored from the
/// remote when it is empty), and what the remote lacks is uploaded before the process exits.
#[allow(clippy::too_many_arguments)]
fn drive(
    store_dir: &Path,
    config: &Config,
    forked_from: Option<String>,
    device: Option<String>,
    quiet: bool,
    execute: bool,
    resume_hint: String,
    remote: &crate::cmd_remote::RemoteArgs,
) -> anyhow::Result<ExitCode> {
    remote.check()?;
    if execute {
        // Planned with the defaults the run will record (settled again below, once a remote
        // has restored what this store lacks).
        let mut planned = config.clone();
        crate::store_read::settle_from_store_dir(&mut planned, store_dir, forked_from.as_deref())?;
        crate::cmd_plan::check(&planned, device.as_deref(), store_dir)?;
    }
    let store = create_store(store_dir)?;
    let stop = StopFlag::new();
    // Before the remote starts: a SIGTERM during a restore or the first upload still ends in
    // a clean exit 75 after uploading what is there.
    preempt::install(stop.clone(), format!("Resume with: {resume_hint}"))
        .map_err(anyhow::Error::msg)?;
    let replica = match crate::cmd_remote::remote_of(
        remote,
        config.remote.as_deref(),
        config.remote_sync,
        &store,
    )? {
        Some((url, mode)) => Some(crate::cmd_remote::start(
            &store,
            &url,
            mode,
            remote.take_over,
            Some(stop.clone()),
            quiet,
        )?),
        None => None,
    };
    // With a remote, a stop request also ends a wait for a lagging remote (the run then
    // uploads what it can and exits).
    let watching = Arc::new(std::sync::atomic::AtomicBool::new(replica.is_some()));
    let watcher = {
        let (stop, sync, watching) = (stop.clone(), store.sync().clone(), watching.clone());
        std::thread::spawn(move || {
            while watching.load(std::sync::atomic::Ordering::SeqCst) {
                if stop.is_set() {
                    sync.interrupt();
                    return;
                }
                std::thread::sleep(std::time::Duration::from_millis(100));
            }
        })
    };
    let mut config = config.clone();
    let result = crate::store_read::recorded(&store, &config.name, forked_from.as_deref())
        .and_then(|r| {
            config.settle_defaults(r.as_deref());
            drive_replicated(
                &store,
                store_dir,
                &config,
                forked_from,
                device,
                quiet,
                execute,
                resume_hint,
                stop,
            )
        });
    watching.store(false, std::sync::atomic::Ordering::SeqCst);
    let _ = watcher.join();
    let Some(replica) = replica else {
        return result;
    };
    // Upload what the remote lacks, also after an interruption (a spot notice) or a failure.
    let synced = crate::cmd_remote::finish(replica)?;
    let code = result?;
    if !synced && code == ExitCode::SUCCESS {
        return Ok(ExitCode::from(tsr_engine::EXIT_INTERRUPTED as u8));
    }
    Ok(code)
}

#[allow(clippy::too_many_arguments)]
fn drive_replicated(
    store: &Arc<Store>,
    store_dir: &Path,
    config: &Config,
    forked_from: Option<String>,
    device: Option<String>,
    quiet: bool,
    execute: bool,
    resume_hint: String,
    stop: StopFlag,
) -> anyhow::Result<ExitCode> {
    let store = store.clone();
    let dag = Arc::new(
        tsr_workflows::build(config)
            .with_context(|| format!("building the `{}` workflow", config.workflow))?,
    );
    // Before anything is recorded: an executor that cannot run refuses here.
    let runner = if execute {
        runner_of(config, &store, !quiet)?
    } else {
        None
    };
    // An API judge's key must be there before the run starts (its evaluation may come
    // hours later).
    if let (true, Some(s)) = (
        execute,
        config.eval.as_ref().and_then(|e| e.judge.api_settings()),
    ) {
        s.key()
            .map_err(|e| anyhow::anyhow!("eval.judge.api_key_env: {e}"))?;
    }
    let spec = tsr_workflows::run_spec(config, forked_from);
    match open_run(&store, &spec, &dag) {
        Ok(_) => {}
        Err(tsr_engine::EngineError::DefinitionChanged { run, changes, sets }) => {
            // The suggested fork also needs the file settings this config gives and the
            // recorded run did not (they are not part of the compared definition).
            // They go first: each --set is checked on its own, and e.g. an [eval] section
            // is valid only with its prompts file.
            let mut paths = String::new();
            if let Some(old) = store.get_run(&run)? {
                let recorded: std::collections::BTreeMap<String, String> =
                    Config::from_str_at(&old.config_toml, Path::new("(recorded run)"))
                        .map(|c| tsr_workflows::path_settings(&c))
                        .unwrap_or_default();
                let now = tsr_workflows::path_settings(config);
                for (k, v) in &now {
                    if recorded.get(k) != Some(v) {
                        paths.push_str(&format!("--set '{k}={v}' "));
                    }
                }
                // A fork starts from the recorded settings and --set cannot remove one.
                let dropped: Vec<&String> =
                    recorded.keys().filter(|k| !now.contains_key(*k)).collect();
                if !dropped.is_empty() {
                    let keys = dropped
                        .iter()
                        .map(|k| format!("`{k}`"))
                        .collect::<Vec<_>>()
                        .join(", ");
                    bail!(
                        "run `{run}` was started with another definition; changed: {changes}; this config no longer gives {keys}.\n  A fork keeps the recorded run's settings and cannot drop {keys}: run this config under another name"
                    );
                }
            }
            return Err(tsr_engine::EngineError::DefinitionChanged {
                run,
                changes,
                sets: format!("{paths}{sets}").trim().to_string(),
            }
            .into());
        }
        Err(e) => return Err(e.into()),
    }
    if !execute {
        say!(
            "recorded run `{}`; continue it with: tsr resume {} --store {}",
            config.name,
            config.name,
            store_dir.display()
        );
        return Ok(ExitCode::SUCCESS);
    }
    let opts = DriverOptions {
        device: device.unwrap_or_else(|| config.device.clone()),
        stop,
        progress: !quiet,
        log: !quiet,
        runner,
        ..DriverOptions::default()
    };
    let outcome = Driver::new(store.clone(), dag, &config.name, opts).run()?;
    match outcome {
        Outcome::Completed { executed, reused } => {
            eprintln!(
                "tsr: run `{}` complete ({} steps executed, {} reused). Inspect: tsr status {} --store {}",
                config.name,
                executed.len(),
                reused.len(),
                config.name,
                store_dir.display()
            );
            if config.workflow.trains() {
                let nodes = tsr_workflows::lineage::nodes(&store, &config.name)?;
                if let Some((node, d)) = tsr_workflows::lineage::final_model(&nodes) {
                    eprintln!(
                        "tsr: final model {d} (from {}); as a Hugging Face folder: tsr export {} model --out DIR --store {}",
                        node.node,
                        config.name,
                        store_dir.display()
                    );
                }
                drop(nodes);
                crate::cmd_report::report_on(
                    &store,
                    store_dir,
                    crate::cmd_report::ReportArgs {
                        runs: vec![config.name.clone()],
                        out: None,
                        json: false,
                    },
                )?;
            }
            Ok(ExitCode::SUCCESS)
        }
        Outcome::Interrupted => {
            eprintln!("tsr: interrupted; progress is saved. Resume with: {resume_hint}");
            Ok(ExitCode::from(tsr_engine::EXIT_INTERRUPTED as u8))
        }
        Outcome::Limited(why) => {
            eprintln!(
                "tsr: stopped at a limit ({why}); progress is saved. Raise the limit in the config and resume with: {resume_hint}"
            );
            Ok(ExitCode::from(tsr_engine::EXIT_LIMIT as u8))
        }
    }
}

/// Drive a `tsr eval` run (its config is made by the command, its name checked there).
pub fn drive_eval(
    store_dir: &Path,
    config: &Config,
    device: &str,
    quiet: bool,
    resume_hint: String,
) -> anyhow::Result<ExitCode> {
    drive(
        store_dir,
        config,
        None,
        Some(device.to_string()),
        quiet,
        true,
        resume_hint,
        &Default::default(),
    )
}

pub fn run(store_flag: &Option<PathBuf>, a: RunArgs) -> anyhow::Result<ExitCode> {
    let config = a.executor.apply(&Config::from_file(&a.config)?)?;
    let store_dir = crate::store_dir(store_flag, config.store.as_ref());
    // A new run's name becomes file names and object keys: check it before anything is
    // written. A run recorded under an older, looser rule continues.
    if let Err(e) = tsr_state::validate_run_name(&config.name) {
        let recorded = store_dir.join("db").exists()
            && open_store(&store_dir)?.get_run(&config.name)?.is_some();
        if !recorded {
            bail!("{}: config key `name`: {e}", a.config.display());
        }
    }
    let hint = format!(
        "tsr run {} --store {}",
        a.config.display(),
        store_dir.display()
    );
    drive(
        &store_dir, &config, None, a.device, a.quiet, true, hint, &a.remote,
    )
}

fn stored_config(store_dir: &Path, run: &str) -> anyhow::Result<Config> {
    let store = open_store(store_dir)?;
    let rec = store.run(run)?;
    let config = Config::from_str_at(
        &rec.config_toml,
        Path::new(&format!("run `{run}` (stored)")),
    )?;
    Ok(config)
}

/// A run records its files by the absolute paths they had when it started. When some are no
/// longer there (the project was moved, or the store copied to another machine), says which,
/// and how to continue: from the config in its new place, since a run continues wherever its
/// files are (they are checked by content, not by path).
fn refuse_moved_files(store_dir: &Path, run: &str) -> anyhow::Result<()> {
    let rec = open_store(store_dir)?.run(run)?;
    let missing: Vec<String> = tsr_workflows::missing_paths(&rec.config_toml)
        .into_iter()
        .map(|(k, v)| format!("{k} = {v}"))
        .collect();
    if !missing.is_empty() {
        bail!(
            "run `{run}` was started with files that are not there now: {}. If they moved with the project (or the store to another machine), continue the run from its config where the files are now: tsr run CONFIG (a run continues wherever its files are; they are checked by content)",
            missing.join(", ")
        );
    }
    Ok(())
}

pub fn resume(store_flag: &Option<PathBuf>, a: ResumeArgs) -> anyhow::Result<ExitCode> {
    let store_dir = crate::store_dir(store_flag, None);
    // A new machine (or a restore that was cut short): the run's definition is in the remote.
    let empty = !store_dir.join("db").exists()
        || open_store(&store_dir)
            .map(|s| s.seq() == 0 && s.runs().map(|r| r.is_empty()).unwrap_or(false))
            .unwrap_or(false);
    if let (true, Some(url)) = (empty, &a.remote.remote) {
        let url = tsr_state::remote::RemoteUrl::parse(url)?;
        let r = tsr_state::remote::restore(&url, &store_dir)
            .with_context(|| format!("restoring {url} into {}", store_dir.display()))?;
        eprintln!(
            "tsr: remote: restored {} records and {} blobs up to commit {} in {:.1} s",
            r.records, r.blobs, r.seq, r.secs
        );
    }
    refuse_moved_files(&store_dir, &a.run)?;
    let mut config = a.executor.apply(&stored_config(&store_dir, &a.run)?)?;
    if a.offline_api_judges {
        if let Some(e) = config.eval.as_mut() {
            e.judge.offline = true;
        }
    }
    let hint = format!("tsr resume {} --store {}", a.run, store_dir.display());
    drive(
        &store_dir, &config, None, a.device, a.quiet, true, hint, &a.remote,
    )
}

pub fn fork(store_flag: &Option<PathBuf>, a: ForkArgs) -> anyhow::Result<ExitCode> {
    let store_dir = crate::store_dir(store_flag, None);
    tsr_state::validate_run_name(&a.name).context("--name")?;
    let mut config = stored_config(&store_dir, &a.run)?;
    for s in &a.sets {
        config = tsr_workflows::apply_set(&config, s)?;
    }
    config = tsr_workflows::apply_set(&config, &format!("name=\"{}\"", a.name))?;
    config = a.executor.apply(&config)?;
    {
        let store = open_store(&store_dir)?;
        if store.get_run(&a.name)?.is_some() {
            bail!("run `{}` already exists; choose another --name", a.name);
        }
    }
    let hint = format!("tsr resume {} --store {}", a.name, store_dir.display());
    drive(
        &store_dir,
        &config,
        Some(a.run.clone()),
        a.device,
        a.quiet,
        !a.no_run,
        hint,
        &a.remote,
    )
}

//! `tsr plan CONFIG`: each step's peak memory on the run's device before anything runs, and
//! the check `run`, `resume` and `fork` make with it.

use anyhow::Context;
use clap::Args;
use std::path::PathBuf;
use std::process::ExitCode;
use tsr_workflows::Config;

#[derive(Args)]
pub struct PlanArgs {
    /// The run config (TOML).
    pub config: PathBuf,
    /// Plan for this device instead of the config's (cpu, cuda, cuda:N).
    #[arg(long)]
    pub device: Option<String>,
    /// Plan against this much memory instead of what the device has free now (80GB, 24GiB).
    #[arg(long)]
    pub memory: Option<String>,
    /// Print the plan as JSON.
    #[arg(long)]
    pub json: bool,
}

/// Exit 0 when the plan fits, 1 when it does not.
pub fn run(store_flag: &Option<std::path::PathBuf>, a: PlanArgs) -> anyhow::Result<ExitCode> {
    let mut config = Config::from_file(&a.config)?;
    if config.model.is_none() {
        anyhow::bail!(
            "{}: the `{}` workflow runs no model, so it has no memory plan",
            a.config.display(),
            config.workflow
        );
    }
    if let Some(d) = &a.device {
        config.device = d.clone();
    }
    // The defaults the run records: those of a new run, or those of the run of this name the
    // store holds.
    let store_dir = crate::store_dir(store_flag, config.store.as_ref());
    crate::store_read::settle_from_store_dir(&mut config, &store_dir, None)?;
    let available = match &a.memory {
        Some(m) => (
            tsr_steps::memory::parse_size(m)
                .map_err(anyhow::Error::msg)
                .context("--memory")?,
            "given with --memory".to_string(),
        ),
        None => tsr_steps::memory::available(&config.device).map_err(anyhow::Error::msg)?,
    };
    let plan = tsr_workflows::memory::plan(&config, Some(available))?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&plan)?);
    } else {
        print!("{}", tsr_workflows::memory::render(&plan));
    }
    Ok(if plan.fits() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

/// Set to 1 to start a run whose memory plan does not fit (the estimate is then the user's
/// risk).
pub const IGNORE_ENV: &str = "TSR_IGNORE_MEMORY_PLAN";

/// Refuses a run whose plan does not fit the memory its device has now, before anything is
/// written.
pub fn check(
    config: &Config,
    device: Option<&str>,
    store_dir: &std::path::Path,
) -> anyhow::Result<()> {
    if config.model.is_none() || std::env::var(IGNORE_ENV).is_ok_and(|v| v == "1") {
        return Ok(());
    }
    let mut config = config.clone();
    if let Some(d) = device {
        config.device = d.to_string();
    }
    let available = match tsr_steps::memory::available(&config.device) {
        Ok(a) => a,
        // Memory that cannot be read (no nvidia-smi, say) is no reason to refuse a run.
        Err(why) => {
            eprintln!("tsr: memory plan not checked: {why}");
            return Ok(());
        }
    };
    let plan = tsr_workflows::memory::plan_remaining(
        &config,
        Some(available),
        &done_nodes(store_dir, &config.name),
    )?;
    if let Some(msg) = plan.refusal() {
        anyhow::bail!(
            "{msg}. `tsr plan` prints the estimate per step; set {IGNORE_ENV}=1 to start anyway"
        );
    }
    Ok(())
}

/// The nodes of `run` whose steps are done in the store at `dir` (none when there is no store
/// or it cannot be read now): a continuing run needs no memory for them.
fn done_nodes(dir: &std::path::Path, run: &str) -> std::collections::BTreeSet<String> {
    let mut done = std::collections::BTreeSet::new();
    if !dir.join("db").exists() {
        return done;
    }
    let Ok(store) = tsr_state::Store::open_existing_nowait(dir) else {
        return done;
    };
    for (node, rec) in store.nodes(run).unwrap_or_default() {
        if let Ok(Some(step)) = store.get_step(&rec.step_key) {
            if matches!(step.status, tsr_state::StepStatus::Done { .. }) {
                done.insert(node);
            }
        }
    }
    done
}

//! `tsr cancel RUN`: cancels the Slurm array jobs a run submitted. A driver that is stopped
//! leaves its tasks running so that the next driver commits their results; this is how a user
//! who gives the run up ends them.

use crate::store_read::open_store;
use anyhow::Context;
use clap::Args;
use std::path::PathBuf;
use std::process::ExitCode;
use tsr_engine::slurm::{call, SlurmRunner};

#[derive(Args)]
pub struct CancelArgs {
    /// The run whose Slurm jobs to cancel.
    pub run: String,
}

/// What names a store's Slurm jobs: with a remote copy, its URL (a store restored from it on
/// another machine, a driver that took the run over, finds the jobs its predecessor
/// submitted); without one, the store's own id.
pub fn job_owner(store: &tsr_state::Store) -> anyhow::Result<String> {
    Ok(match store.remote()? {
        Some(r) => blake3::hash(format!("tsr remote\0{}", r.url).as_bytes())
            .to_hex()
            .to_string(),
        None => store.store_id()?,
    })
}

pub fn run(store: &Option<PathBuf>, a: CancelArgs) -> anyhow::Result<ExitCode> {
    let dir = crate::store_dir(store, None);
    let store = open_store(&dir)?;
    let comment = SlurmRunner::comment(&job_owner(&store)?, &a.run);
    let listed = call(
        "squeue",
        &[
            "--noheader".into(),
            "--format=%F|%k|%j".into(),
            "--states=PENDING,RUNNING,SUSPENDED,REQUEUED,REQUEUE_HOLD,CONFIGURING,COMPLETING"
                .into(),
        ],
    )
    .context("listing the Slurm queue")?;
    let mut arrays: Vec<(String, String)> = listed
        .lines()
        .filter_map(|l| {
            let mut f = l.trim().splitn(3, '|');
            let (id, c, name) = (f.next()?, f.next()?, f.next()?);
            (c.trim() == comment).then(|| (id.trim().to_string(), name.trim().to_string()))
        })
        .collect();
    arrays.sort();
    arrays.dedup();
    if arrays.is_empty() {
        println!("no Slurm job of run `{}` is queued or running", a.run);
        return Ok(ExitCode::SUCCESS);
    }
    let ids: Vec<String> = arrays.iter().map(|(id, _)| id.clone()).collect();
    call("scancel", &ids).context("cancelling the run's Slurm jobs")?;
    for (id, name) in &arrays {
        println!("cancelled job {id} ({name})");
    }
    println!(
        "cancelled {} Slurm job(s) of run `{}`; `tsr resume {}` submits what is missing again",
        arrays.len(),
        a.run,
        a.run
    );
    Ok(ExitCode::SUCCESS)
}

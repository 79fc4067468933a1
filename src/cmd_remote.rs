//! The remote copy at the command line: `--remote` on run/resume/fork, `tsr restore`,
//! `tsr verify --remote`, and the replicator's start and finish around a run.

use anyhow::Context;
use clap::Args;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;
use tsr_state::remote::{RemoteUrl, ReplicaOptions, Replicator};
use tsr_state::{Store, SyncMode};

#[derive(Args, Clone, Default)]
pub struct RemoteArgs {
    /// Replicate the store to object storage (s3://bucket/prefix, gs://, az://, file:///dir) and
    /// continue from it on a machine without a local store. Credentials come from the
    /// environment (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_ENDPOINT, ...).
    #[arg(long, value_name = "URL")]
    pub remote: Option<String>,
    /// Take the remote even if another machine holds its lease (that machine is gone).
    #[arg(long)]
    pub take_over: bool,
    /// When the remote catches up: step (default), checkpoint or commit.
    #[arg(long, value_name = "MODE")]
    pub remote_sync: Option<String>,
}

impl RemoteArgs {
    /// Check the flags before anything is created or written.
    pub fn check(&self) -> anyhow::Result<()> {
        if let Some(url) = &self.remote {
            RemoteUrl::parse(url)?;
        }
        if let Some(m) = &self.remote_sync {
            m.parse::<SyncMode>()
                .map_err(|e| anyhow::anyhow!("--remote-sync: {e}"))?;
        }
        Ok(())
    }
}

/// How long a stopping run (a spot notice) may take to upload what the remote lacks.
fn flush_within() -> Duration {
    Duration::from_secs(
        std::env::var("TSR_REMOTE_FLUSH_S")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(90),
    )
}

/// The remote a run replicates to: the flag, else the config's `remote`, else the one the store
/// is already replicated to.
pub fn remote_of(
    args: &RemoteArgs,
    config_remote: Option<&str>,
    config_sync: Option<SyncMode>,
    store: &Store,
) -> anyhow::Result<Option<(RemoteUrl, SyncMode)>> {
    let attached = store.remote()?.map(|r| r.url);
    let given = args
        .remote
        .as_deref()
        .or(config_remote)
        .map(str::to_string)
        .or(attached);
    let Some(url) = given else {
        if args.take_over || args.remote_sync.is_some() {
            anyhow::bail!("--take-over and --remote-sync need a remote: give --remote URL (or `remote` in the config)");
        }
        return Ok(None);
    };
    let url = RemoteUrl::parse(&url)?;
    let mode = match args.remote_sync.as_deref() {
        Some(m) => m
            .parse::<SyncMode>()
            .map_err(|e| anyhow::anyhow!("--remote-sync: {e}"))?,
        None => config_sync.unwrap_or_default(),
    };
    Ok(Some((url, mode)))
}

/// Start replicating (restoring first into an empty store). `stop` is set if another machine
/// takes the remote over.
pub fn start(
    store: &Arc<Store>,
    url: &RemoteUrl,
    mode: SyncMode,
    take_over: bool,
    stop: Option<tsr_engine::StopFlag>,
    quiet: bool,
) -> anyhow::Result<Replicator> {
    let mut opts = ReplicaOptions::new(mode);
    opts.take_over = take_over;
    opts.say = Arc::new(|m: &str| eprintln!("tsr: remote: {m}"));
    opts.on_fenced = Arc::new(move |holder: &str| {
        eprintln!(
            "tsr: remote: {holder} took the remote over; stopping (nothing more is written to it)"
        );
        if let Some(s) = &stop {
            s.set();
        }
    });
    // The errors name the remote already.
    let (rep, report) = Replicator::start(store.clone(), url, opts)?;
    if let Some(r) = &report.restored {
        eprintln!(
            "tsr: remote: restored {} records and {} blobs ({:.1} MB) up to commit {} in {:.1} s",
            r.records,
            r.blobs,
            r.blob_bytes as f64 / 1e6,
            r.seq,
            r.secs
        );
    }
    if !quiet {
        eprintln!(
            "tsr: remote: replicating to {url} (generation {}, sync at each {mode}; the remote holds commit {})",
            report.epoch, report.remote_seq
        );
    }
    Ok(rep)
}

/// Upload what the remote lacks and let the lease go, and say in one line where the remote
/// stands (also in quiet mode: after a spot notice this is the line that matters). Errors when
/// the remote was lost to another machine.
pub fn finish(rep: Replicator) -> anyhow::Result<bool> {
    let r = rep.finish(flush_within());
    if let Some(holder) = &r.fenced {
        anyhow::bail!(
            "the remote was taken over by {holder}; this machine's local store is intact but is no longer replicated"
        );
    }
    if let Some(why) = &r.fatal {
        anyhow::bail!(
            "replication stopped: {why}. The local store is intact; the remote holds commit {} of {}",
            r.acked,
            r.latest
        );
    }
    if r.caught_up() {
        eprintln!(
            "tsr: remote: holds every commit ({}); upload finished in {:.1} s",
            r.latest, r.secs
        );
        Ok(true)
    } else {
        eprintln!(
            "tsr: remote: holds commit {} of {} after {:.0} s{}; the rest is in the local store and is uploaded by the next run on it",
            r.acked,
            r.latest,
            r.secs,
            r.last_error
                .map(|e| format!(" (last error: {e})"))
                .unwrap_or_default()
        );
        Ok(false)
    }
}

#[derive(Args)]
pub struct RestoreArgs {
    /// The remote to restore from (s3://bucket/prefix, gs://, az://, file:///dir).
    pub url: String,
    #[arg(long)]
    pub json: bool,
}

pub fn restore(store_flag: &Option<PathBuf>, a: RestoreArgs) -> anyhow::Result<ExitCode> {
    let dir = crate::store_dir(store_flag, None);
    let url = RemoteUrl::parse(&a.url)?;
    let r = tsr_state::remote::restore(&url, &dir)
        .with_context(|| format!("restoring {url} into {}", dir.display()))?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&r)?);
    } else {
        println!(
            "restored {} records ({} segments after a snapshot of generation {}) and {} blobs ({:.1} MB) up to commit {} in {:.1} s into {}",
            r.records,
            r.segments,
            r.epoch,
            r.blobs,
            r.blob_bytes as f64 / 1e6,
            r.seq,
            r.secs,
            dir.display()
        );
        println!(
            "continue a run with: tsr resume RUN --store {} (add --take-over if the machine that wrote it may still hold the remote)",
            dir.display()
        );
    }
    Ok(ExitCode::SUCCESS)
}

pub fn verify_remote(url: &str, json: bool) -> anyhow::Result<ExitCode> {
    let url = RemoteUrl::parse(url)?;
    let r = tsr_state::remote::verify_remote(&url).with_context(|| format!("verifying {url}"))?;
    if json {
        println!("{}", serde_json::to_string_pretty(&r)?);
    } else {
        println!(
            "remote {}: generation {} of {}, snapshot at commit {}, {} segments, up to commit {}; {} records, {} blobs checked: {}",
            r.url,
            r.epoch,
            r.generations,
            r.snapshot.map(|s| s.to_string()).unwrap_or_else(|| "-".into()),
            r.segments,
            r.seq,
            r.records,
            r.blobs_checked,
            if r.ok() {
                "ok".to_string()
            } else {
                format!("{} problems", r.problems.len())
            }
        );
        if let Some(l) = &r.lease {
            let now = tsr_state::now_ms();
            println!(
                "  lease: {} ({})",
                l.holder,
                if l.expires_ms > now {
                    format!("held for {} s more", (l.expires_ms - now) / 1000)
                } else {
                    "expired".to_string()
                }
            );
        }
        if !r.work_folders.is_empty() {
            println!(
                "  workers' results: {} step folder(s) under work/ ({} bytes), not part of the store's history; `tsr gc` removes those of finished steps",
                r.work_folders.len(),
                r.work_folders.iter().map(|(_, b)| b).sum::<u64>()
            );
        }
        for p in &r.problems {
            println!("  problem: {p}");
        }
    }
    Ok(if r.ok() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

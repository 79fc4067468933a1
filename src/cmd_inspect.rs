//! Inspection commands: status, runs, replay, verify (+ repair), gc. Each takes `--json`.

use crate::store_read::open_store;
use anyhow::Context;
use clap::Args;
use serde_json::json;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use tsr_engine::{machine, replay as engine_replay, status_rows, RunStatusView, StopFlag};
use tsr_state::{Commit, Digest, StateError, Store};
use tsr_workflows::Config;

#[derive(Args)]
pub struct JsonArgs {
    #[arg(long)]
    pub json: bool,
}

#[derive(Args)]
pub struct StatusArgs {
    pub run: String,
    #[arg(long)]
    pub json: bool,
}

#[derive(Args)]
pub struct ReplayArgs {
    pub run: String,
    /// Nodes to replay (see `tsr status RUN`).
    pub nodes: Vec<String>,
    /// Replay every node of this iteration.
    #[arg(long)]
    pub iteration: Option<u32>,
    #[arg(long)]
    pub device: Option<String>,
    #[arg(long)]
    pub json: bool,
}

#[derive(Args)]
pub struct VerifyArgs {
    /// Forget damaged results and re-run the affected runs to recompute them.
    #[arg(long)]
    pub repair: bool,
    /// With --repair: let API judges ask their server again for answers the store no longer
    /// has (paid again). Without it, repair recomputes evaluations from recorded answers only.
    #[arg(long, requires = "repair")]
    pub ask_api: bool,
    /// Check the remote copy at URL instead of the local store: every segment's checksum and
    /// order, every blob's digest, no record that refers to a missing blob. Never writes.
    #[arg(long, value_name = "URL", conflicts_with = "repair")]
    pub remote: Option<String>,
    #[arg(long)]
    pub json: bool,
}

#[derive(Args)]
pub struct GcArgs {
    /// Only report what would be removed (in this store; the remote is not contacted).
    #[arg(long)]
    pub dry_run: bool,
    /// Clean only this store, not its remote copy (e.g. while the remote is unreachable or
    /// another machine holds it); a later gc cleans the remote.
    #[arg(long)]
    pub local_only: bool,
    #[arg(long)]
    pub json: bool,
}

fn config_of(store: &Store, run: &str) -> anyhow::Result<Config> {
    let rec = store.run(run)?;
    Ok(Config::from_str_at(
        &rec.config_toml,
        Path::new(&format!("run `{run}` (stored)")),
    )?)
}

/// A run's graph, to show it: its recorded config, whose files need not be here.
fn recorded_dag(store: &Store, run: &str) -> anyhow::Result<tsr_engine::Dag> {
    let rec = store.run(run)?;
    let config = Config::from_recorded(
        &rec.config_toml,
        Path::new(&format!("run `{run}` (stored)")),
    )?;
    Ok(tsr_workflows::build_recorded(&config)?)
}

fn print_status(view: &RunStatusView) {
    println!(
        "run {} ({}): {}{}",
        view.run,
        view.workflow,
        view.status,
        view.live_pid
            .map(|p| format!(" (live snapshot from pid {p}; the store is in use)"))
            .unwrap_or_default()
    );
    println!(
        "{:<28} {:<14} {:<12} {:>4} {:>13} {:>9}  OUTPUT",
        "NODE", "KIND", "STATE", "ATT", "ITEMS", "TIME"
    );
    for r in &view.nodes {
        let items = match r.items_total {
            Some(t) => format!("{}/{}", r.items_done, t),
            None if r.items_done > 0 => r.items_done.to_string(),
            None => "-".into(),
        };
        let out = r
            .outputs
            .iter()
            .map(|(k, d)| format!("{k}={}", &d[..12]))
            .collect::<Vec<_>>()
            .join(" ");
        println!(
            "{:<28} {:<14} {:<12} {:>4} {:>13} {:>8.1}s  {}",
            r.node, r.kind, r.state, r.attempts, items, r.busy_s, out
        );
        if let Some(e) = &r.error {
            println!("    error: {e}");
        }
        if let Some(n) = &r.note {
            println!("    {n}");
        }
        if let Some(p) = &r.shards {
            let mut line = format!(
                "    shards: {} running, {} waiting, {} done of {}",
                p.running, p.waiting, p.done, p.shards
            );
            if p.failed_attempts > 0 {
                line.push_str(&format!("; {} failed attempt(s)", p.failed_attempts));
            }
            if !p.workers.is_empty() {
                line.push_str(&format!("; {}", p.workers.join(", ")));
            }
            println!("{line}");
            if let Some(n) = &p.note {
                println!("    note: {n}");
            }
        }
    }
}

pub fn status(store_flag: &Option<PathBuf>, a: StatusArgs) -> anyhow::Result<ExitCode> {
    let dir = crate::store_dir(store_flag, None);
    let view = match Store::open_existing_nowait(&dir) {
        Ok(store) => {
            let dag = recorded_dag(&store, &a.run)?;
            let rec = store.run(&a.run)?;
            RunStatusView {
                run: a.run.clone(),
                workflow: rec.workflow.clone(),
                status: format!("{:?}", rec.status).to_lowercase(),
                live_pid: None,
                nodes: status_rows(&store, &dag, &a.run, &Default::default())?,
                remote: tsr_engine::remote_lag(&store),
            }
        }
        Err(e @ StateError::InUse { .. }) => tsr_engine::read_snapshot(&dir, &a.run)
            .ok_or(e)
            .context("the run is in use and has no live snapshot yet")?,
        Err(e) => return Err(e).with_context(|| format!("opening the store {}", dir.display())),
    };
    // Models made by LoRA training are adapters over a base: name both. API judges: what they
    // asked and spent so far.
    let (adapters, judges) = match Store::open_existing_nowait(&dir) {
        Ok(store) => (lora_models(&store, &a.run)?, api_judges(&store, &a.run)?),
        Err(_) => (vec![], vec![]),
    };
    if a.json {
        let mut v = serde_json::to_value(&view)?;
        if !adapters.is_empty() {
            v["lora_models"] = json!(adapters);
        }
        if !judges.is_empty() {
            v["api_judges"] = json!(judges);
        }
        println!("{}", serde_json::to_string_pretty(&v)?);
    } else {
        print_status(&view);
        for m in &adapters {
            let short = |k: &str| {
                let s = m[k].as_str().unwrap_or("?");
                s.get(..12).unwrap_or(s).to_string()
            };
            println!(
                "model {} of {}: LoRA adapter (r = {}, alpha = {}) over base {}",
                short("model"),
                m["node"].as_str().unwrap_or("?"),
                m["r"],
                m["alpha"].as_f64().unwrap_or(f64::NAN),
                short("base")
            );
        }
        for j in &judges {
            println!(
                "evaluation judge {}: {} ({}): {} of {} answers recorded, {} request(s) ({} refused), {} tokens in, {} out",
                j["node"].as_str().unwrap_or("?"),
                j["model"].as_str().unwrap_or("?"),
                j["annotator"].as_str().unwrap_or("?"),
                j["recorded"],
                j["total"],
                j["requests"],
                j["refused"],
                j["prompt_tokens"],
                j["completion_tokens"]
            );
        }
        if let Some(r) = &view.remote {
            let lag = r.local_seq.saturating_sub(r.remote_seq);
            println!(
                "remote {}: holds commit {} of {}{}{}{}",
                r.url,
                r.remote_seq,
                r.local_seq,
                if lag == 0 {
                    " (up to date)".to_string()
                } else {
                    format!(" ({lag} commits behind)")
                },
                r.taken_over_by
                    .as_ref()
                    .map(|h| format!("; taken over by {h}"))
                    .unwrap_or_default(),
                r.last_error
                    .as_ref()
                    .map(|e| format!("; last error: {e}"))
                    .unwrap_or_default()
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// The run's API judge steps (finished or not): what their recorded answers asked and spent.
fn api_judges(store: &Store, run: &str) -> anyhow::Result<Vec<serde_json::Value>> {
    let nodes = tsr_workflows::lineage::nodes(store, run)?;
    let mut out = Vec::new();
    for n in nodes.values().filter(|n| n.step.kind == "api-judge") {
        let config: serde_json::Value = serde_json::from_str(&n.step.config)
            .with_context(|| format!("reading the config of `{}`", n.node))?;
        let model = config["model"].as_str().unwrap_or("?");
        let items = store.items(&n.key)?;
        let u = tsr_steps::kinds::api_judge::usage_of(&items, model)
            .with_context(|| format!("reading the answers recorded for `{}`", n.node))?;
        out.push(json!({
            "node": n.node,
            "model": u.model,
            "annotator": config["annotator"],
            "recorded": items.len(),
            "total": n.step.items_total,
            "requests": u.requests,
            "refused": u.refused,
            "prompt_tokens": u.prompt_tokens,
            "completion_tokens": u.completion_tokens,
        }));
    }
    Ok(out)
}

/// The run's finished models that are LoRA adapters: node, model (adapter) digest, r, alpha
/// and base digest.
fn lora_models(store: &Store, run: &str) -> anyhow::Result<Vec<serde_json::Value>> {
    let nodes = tsr_workflows::lineage::nodes(store, run)?;
    let mut out = Vec::new();
    for n in nodes.values() {
        if let Some(a) = tsr_workflows::lineage::models::adapter_of(store, n) {
            let mut a = serde_json::to_value(a)?;
            a["node"] = json!(n.node);
            a["model"] = json!(n.output("weights").map(|d| d.to_hex()));
            out.push(a);
        }
    }
    Ok(out)
}

pub fn runs(store_flag: &Option<PathBuf>, a: JsonArgs) -> anyhow::Result<ExitCode> {
    let store = open_store(&crate::store_dir(store_flag, None))?;
    let runs = store.runs()?;
    if a.json {
        let v: Vec<_> = runs
            .iter()
            .map(|r| json!({"name": r.name, "workflow": r.workflow, "status": format!("{:?}", r.status), "forked_from": r.forked_from}))
            .collect();
        println!("{}", serde_json::to_string_pretty(&v)?);
    } else {
        for r in runs {
            println!("{:<24} {:<16} {:?}", r.name, r.workflow, r.status);
        }
    }
    Ok(ExitCode::SUCCESS)
}

pub fn replay(store_flag: &Option<PathBuf>, a: ReplayArgs) -> anyhow::Result<ExitCode> {
    let store = open_store(&crate::store_dir(store_flag, None))?;
    let config = config_of(&store, &a.run)?;
    let dag = tsr_workflows::build(&config)?;
    let mut nodes = a.nodes.clone();
    if let Some(i) = a.iteration {
        nodes.extend(
            dag.topo()
                .filter(|n| n.iteration == Some(i))
                .map(|n| n.name.clone()),
        );
        if nodes.is_empty() {
            anyhow::bail!("run `{}` has no nodes in iteration {i}", a.run);
        }
    }
    if nodes.is_empty() {
        anyhow::bail!(
            "name the nodes to replay, or --iteration N (`tsr status {}` lists nodes)",
            a.run
        );
    }
    let device = a.device.unwrap_or(config.device.clone());
    let reports = engine_replay(&store, &dag, &a.run, &nodes, &device, StopFlag::new())?;
    let all = reports.iter().all(|r| r.identical);
    if a.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&json!({"identical": all, "steps": reports}))?
        );
    } else {
        for r in &reports {
            println!(
                "{:<28} {:<10} {:.1}s",
                r.node,
                if r.identical {
                    "identical"
                } else {
                    "DIFFERENT"
                },
                r.seconds
            );
            for o in &r.outputs {
                if !o.identical {
                    println!(
                        "    {}: recorded {} replayed {}",
                        o.name, o.recorded, o.replayed
                    );
                }
            }
            if let Some(n) = &r.note {
                println!("    note: {n}");
            }
        }
    }
    Ok(if all {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

pub fn verify(store_flag: &Option<PathBuf>, a: VerifyArgs) -> anyhow::Result<ExitCode> {
    if let Some(url) = &a.remote {
        return crate::cmd_remote::verify_remote(url, a.json);
    }
    let dir = crate::store_dir(store_flag, None);
    let mut store = Store::open_for_verify(&dir)
        .with_context(|| format!("opening the store {}", dir.display()))?;
    let report = tsr_state::verify(&store)?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        println!(
            "checked {} records and {} blobs ({} unreferenced): {}",
            report.records,
            report.blobs_checked,
            report.unreferenced_blobs,
            if report.ok() {
                "ok".to_string()
            } else {
                format!("{} problems", report.problems.len())
            }
        );
        for p in &report.problems {
            println!("  {}: {}", p.kind, p.detail);
        }
    }
    if report.ok() {
        return Ok(ExitCode::SUCCESS);
    }
    let rolled_back = store.rolled_back().is_some();
    if !a.repair {
        if rolled_back || report.problems.iter().any(|p| !p.steps.is_empty()) {
            eprintln!(
                "tsr: the damaged results can be recomputed: tsr verify --repair --store {}",
                dir.display()
            );
        }
        return Ok(ExitCode::from(1));
    }
    // Repair: forget each affected step's result, drop its damaged blobs, then re-run every run
    // that uses it. Steps are deterministic, so the recomputed digests equal the recorded ones.
    let mut steps: Vec<Digest> = report
        .problems
        .iter()
        .flat_map(|p| p.steps.iter())
        .filter_map(|s| s.parse().ok())
        .collect();
    steps.sort();
    steps.dedup();
    for p in &report.problems {
        if p.kind == "blob-corrupt" {
            if let Some(d) = p.blob.as_deref().and_then(|s| s.parse::<Digest>().ok()) {
                store.blobs().remove(&d)?;
            }
        }
    }
    for key in &steps {
        let Some(mut rec) = store.get_step(key)? else {
            continue;
        };
        rec.status = machine::transition(&rec.status, machine::Event::Reset, rec.attempts)
            .map_err(|(f, e)| anyhow::anyhow!("cannot reset step {}: {f} -> {e}", key.short()))?;
        rec.checkpoint = None;
        let mut c = Commit::new();
        c.step(key, &rec);
        store.commit(c)?;
        eprintln!("tsr: step {} will be recomputed", key.short());
    }
    if rolled_back {
        store.accept_rollback()?;
        eprintln!(
            "tsr: accepted the database as it is; every run is resumed to recompute lost steps"
        );
    }
    let mut affected = Vec::new();
    for run in store.runs()? {
        if rolled_back
            || store
                .nodes(&run.name)?
                .iter()
                .any(|(_, n)| steps.contains(&n.step_key))
        {
            affected.push(run.name.clone());
        }
    }
    drop(store);
    let mut code = ExitCode::SUCCESS;
    for run in affected {
        eprintln!("tsr: re-running `{run}` to recompute");
        // A run that cannot finish here (such as an API evaluation with answers not recorded
        // yet) is reported, and the other runs are still repaired.
        match crate::cmd_run::resume(
            store_flag,
            crate::cmd_run::ResumeArgs {
                run: run.clone(),
                device: None,
                quiet: true,
                remote: Default::default(),
                executor: Default::default(),
                offline_api_judges: !a.ask_api,
            },
        ) {
            Ok(c) if c == ExitCode::SUCCESS => {}
            Ok(c) => code = c,
            Err(e) => {
                eprintln!("tsr: `{run}` did not finish: {e:#}");
                code = ExitCode::from(1);
            }
        }
    }
    let store = open_store(&dir)?;
    let after = tsr_state::verify(&store)?;
    println!(
        "after repair: {}",
        if after.ok() {
            "ok".to_string()
        } else {
            format!("{} problems remain", after.problems.len())
        }
    );
    Ok(if after.ok() { code } else { ExitCode::from(1) })
}

pub fn gc(store_flag: &Option<PathBuf>, a: GcArgs) -> anyhow::Result<ExitCode> {
    let store: Arc<Store> = open_store(&crate::store_dir(store_flag, None))?;
    // A replicated store cleans its remote too: the local removals travel as a commit, then a
    // fresh snapshot lets older objects and unreferenced blobs go.
    let replica = match store.remote()? {
        Some(r) if !a.dry_run && !a.local_only => {
            let url = tsr_state::remote::RemoteUrl::parse(&r.url)?;
            Some(
                crate::cmd_remote::start(
                    &store,
                    &url,
                    tsr_state::SyncMode::Step,
                    false,
                    None,
                    true,
                )
                .context(
                    "cleaning the remote copy too (`tsr gc --local-only` cleans only this store)",
                )?,
            )
        }
        _ => None,
    };
    let r = tsr_state::gc(&store, a.dry_run)?;
    let mut work = gc_work(&store, a.dry_run)?;
    if let (Some(remote), false) = (store.remote()?, a.local_only) {
        let (steps, bytes) = gc_remote_work(&store, &remote.url, a.dry_run)?;
        work = (work.0 + steps, work.1 + bytes);
    }
    let remote = match replica {
        Some(rep) => {
            let g = rep.gc(a.dry_run);
            crate::cmd_remote::finish(rep)?;
            Some(g.context("cleaning the remote")?)
        }
        None => None,
    };
    if a.json {
        let mut v = serde_json::to_value(&r)?;
        v["remote"] = serde_json::to_value(&remote)?;
        v["work"] = serde_json::json!({"removed_steps": work.0, "removed_bytes": work.1});
        println!("{}", serde_json::to_string_pretty(&v)?);
    } else {
        if let Some(g) = &remote {
            println!(
                "remote: {} {} objects before the snapshot at commit {} and {} unreferenced blobs ({} bytes); kept {} blobs",
                if a.dry_run { "would remove" } else { "removed" },
                g.removed_objects,
                g.snapshot.map(|s| s.to_string()).unwrap_or_else(|| "-".into()),
                g.removed_blobs,
                g.removed_bytes,
                g.kept_blobs
            );
        }
        println!(
            "{} {} blobs ({} bytes) and {} steps; kept {} blobs",
            if a.dry_run { "would remove" } else { "removed" },
            r.removed_blobs,
            r.removed_bytes,
            r.removed_steps,
            r.kept_blobs
        );
        if work.0 > 0 {
            println!(
                "{} the worker results of {} finished or unknown steps ({} bytes)",
                if a.dry_run { "would remove" } else { "removed" },
                work.0,
                work.1
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// Worker results (`<store>/work/<step key>/`) that no step will read again: those of steps
/// that are done or that the store no longer records. An unfinished step's stay: resuming it
/// commits them instead of computing them again. Returns (steps, bytes).
fn gc_work(store: &Store, dry_run: bool) -> anyhow::Result<(u64, u64)> {
    let dir = store.root().join(crate::cmd_run::WORK_DIR);
    let Ok(entries) = std::fs::read_dir(&dir) else {
        return Ok((0, 0));
    };
    let (mut steps, mut bytes) = (0, 0);
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if work_needed(store, &name)? {
            continue;
        }
        steps += 1;
        bytes += folder_bytes(&e.path());
        if !dry_run {
            std::fs::remove_dir_all(e.path())
                .with_context(|| format!("removing {}", e.path().display()))?;
        }
    }
    Ok((steps, bytes))
}

/// Whether the workers' folder `name` (a step key) may still be read: its step is recorded and
/// not done (resuming it commits the results instead of computing them again).
fn work_needed(store: &Store, name: &str) -> anyhow::Result<bool> {
    Ok(match name.parse::<tsr_state::Digest>() {
        Ok(key) => store
            .get_step(&key)?
            .is_some_and(|s| !matches!(s.status, tsr_state::StepStatus::Done { .. })),
        Err(_) => false,
    })
}

/// [`gc_work`] for the results workers left in the remote (`<remote>/work/<step key>/`).
fn gc_remote_work(store: &Store, url: &str, dry_run: bool) -> anyhow::Result<(u64, u64)> {
    let parsed = tsr_state::remote::RemoteUrl::parse(url)?;
    let remote = match tsr_state::remote::Remote::open(&parsed) {
        Ok(r) => r,
        Err(tsr_state::remote::RemoteError::Empty { .. }) => return Ok((0, 0)),
        Err(e) => return Err(e).context("listing the workers' results in the remote"),
    };
    let (mut steps, mut bytes) = (0, 0);
    for (name, size) in remote
        .work_folders()
        .context("listing the workers' results in the remote")?
    {
        if work_needed(store, &name)? {
            continue;
        }
        steps += 1;
        bytes += size;
        if !dry_run {
            remote
                .work_delete_all(&name)
                .with_context(|| format!("removing work/{name} from {url}"))?;
        }
    }
    Ok((steps, bytes))
}

fn folder_bytes(dir: &std::path::Path) -> u64 {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return std::fs::metadata(dir).map_or(0, |m| m.len());
    };
    entries.flatten().map(|e| folder_bytes(&e.path())).sum()
}

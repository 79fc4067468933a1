//! `tsr`: the command line. Thin: parse flags into a validated config, call the libraries, print.
//! `main -> run -> ExitCode`; on failure the whole error chain is printed.

/// `println!` for commands that keep running when the reader of their output goes away (run,
/// resume, fork, dpo, bench): a write that fails (a closed pipe) is dropped instead of
/// panicking, because the work itself is recorded elsewhere (the store, the output folder).
macro_rules! say {
    ($($t:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stdout(), $($t)*);
    }};
}

mod cmd_bench;
mod cmd_cancel;
mod cmd_dpo;
mod cmd_eval;
mod cmd_inspect;
mod cmd_lineage;
mod cmd_model;
mod cmd_plan;
mod cmd_remote;
mod cmd_report;
mod cmd_run;
mod cmd_worker;
mod store_read;

use clap::{Parser, Subcommand};
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(Parser)]
#[command(
    name = "tsr",
    version,
    about = "Temporal Self-Rewarding training on a durable workflow engine"
)]
struct Cli {
    /// Store folder (default: $TSR_STORE, else the config's `store`, else ./.tsr).
    #[arg(long, global = true)]
    store: Option<PathBuf>,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Start a run from a config, or continue it (the same command resumes).
    Run(cmd_run::RunArgs),
    /// Each step's peak memory on the run's device, before anything runs (exit 1 if it does not fit).
    Plan(cmd_plan::PlanArgs),
    /// Continue a run recorded in the store, from its stored definition.
    Resume(cmd_run::ResumeArgs),
    /// Branch a new run from a recorded one with changed settings; unchanged steps are reused.
    Fork(cmd_run::ForkArgs),
    /// Table of a run's steps: state, attempts, items, time, outputs.
    Status(cmd_inspect::StatusArgs),
    /// List the runs in the store.
    Runs(cmd_inspect::JsonArgs),
    /// Re-execute recorded steps in scratch space and compare output digests (exit 1 if any differ).
    Replay(cmd_inspect::ReplayArgs),
    /// Check every blob hash and every reference; exit 1 on damage. --repair recomputes.
    /// With --remote URL, check the remote copy instead.
    Verify(cmd_inspect::VerifyArgs),
    /// Rebuild a store from its remote copy (into a new, empty --store folder).
    Restore(cmd_remote::RestoreArgs),
    /// Remove blobs and steps no run references.
    Gc(cmd_inspect::GcArgs),
    /// The audit trail of a pair, a model or an evaluation judgement.
    Lineage(cmd_lineage::LineageArgs),
    /// Export a run's pairs (TRL-compatible, with lineage), a model, or its evaluations (AlpacaEval's files).
    Export(cmd_lineage::ExportArgs),
    /// Metrics table per iteration and phase, and PNG plots; several runs side by side.
    Report(cmd_report::ReportArgs),
    /// Generate a reply to one prompt (chat template applied); --model is a HF dir, .gguf or Org/Name.
    Generate(cmd_model::GenerateArgs),
    /// Summed response-token log-probs for each {"prompt","response"} line of a JSONL file.
    Logprobs(cmd_model::LogprobsArgs),
    /// Write a model in Hugging Face layout (config.json, model.safetensors, tokenizer files).
    ExportModel(cmd_model::ExportModelArgs),
    /// DPO-train a model on a JSONL file of preference pairs (outside any workflow).
    Dpo(cmd_dpo::DpoArgs),
    /// DPO step throughput (pairs/s, MFU) and batched generation speed on a device.
    Bench(cmd_bench::BenchArgs),
    /// Win rate of a model against a baseline model or reference outputs on held-out prompts.
    Eval(cmd_eval::EvalArgs),
    /// Cancel the Slurm jobs a run submitted (a stopped driver leaves them running).
    Cancel(cmd_cancel::CancelArgs),
    /// Compute a shard of a step for a driver (started by the `processes` and `slurm` executors).
    #[command(hide = true)]
    Worker(cmd_worker::WorkerArgs),
}

pub fn store_dir(flag: &Option<PathBuf>, from_config: Option<&PathBuf>) -> PathBuf {
    flag.clone()
        .or_else(|| std::env::var_os("TSR_STORE").map(PathBuf::from))
        .or_else(|| from_config.cloned())
        .unwrap_or_else(|| PathBuf::from(".tsr"))
}

/// Commands that stop quietly when the reader of their output goes away (`| head`), as `cat`
/// does (the default action of SIGPIPE): those that only read, and those that print only
/// after their writes are complete (`report` draws its plots first, `export` prints after the
/// folder is in place). Commands that train or repair (run, resume, fork, dpo, bench,
/// verify --repair, gc) keep ignoring SIGPIPE, so a closed pipe never stops them halfway;
/// they print with `say!`, which drops what a closed pipe cannot take.
fn stop_quietly_on_closed_pipe(cmd: &Cmd) -> bool {
    match cmd {
        Cmd::Run(_)
        | Cmd::Resume(_)
        | Cmd::Fork(_)
        | Cmd::Dpo(_)
        | Cmd::Bench(_)
        | Cmd::Eval(_)
        | Cmd::Worker(_) => false,
        Cmd::Verify(a) => !a.repair,
        Cmd::Gc(a) => a.dry_run,
        _ => true,
    }
}

/// Writes `bytes` to standard output and flushes.
pub fn print_bytes(bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    let stdout = std::io::stdout();
    let mut w = stdout.lock();
    w.write_all(bytes)?;
    w.flush()
}

/// Writes `bytes` to `path` whole or not at all (`tsr_state::fsio`: a temporary file beside
/// it, fsync, rename, then the folder is fsynced).
pub fn write_file_atomic(path: &std::path::Path, bytes: &[u8]) -> anyhow::Result<()> {
    use anyhow::Context;
    tsr_state::fsio::write_atomic(path, bytes)
        .with_context(|| format!("writing {}", path.display()))
}

fn main() -> ExitCode {
    // With RUST_BACKTRACE set (as many users keep it), libraries capture a backtrace in every
    // error they make and candle prints it inside the error's text. Backtraces are for panics:
    // keep them there (RUST_BACKTRACE) and out of errors unless RUST_LIB_BACKTRACE asks for them.
    // Set before any other thread starts.
    if std::env::var_os("RUST_LIB_BACKTRACE").is_none() {
        std::env::set_var("RUST_LIB_BACKTRACE", "0");
    }
    // Allocator and thread-pool settings for model code; sets an environment variable, so it
    // runs before any other thread starts.
    tsr_model::tune_runtime();
    let cli = Cli::parse();
    if stop_quietly_on_closed_pipe(&cli.cmd) {
        // SAFETY: restoring the default disposition of SIGPIPE before any other thread exists.
        unsafe {
            libc::signal(libc::SIGPIPE, libc::SIG_DFL);
        }
    }
    match run(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e}");
            for cause in e.chain().skip(1) {
                eprintln!("  caused by: {cause}");
            }
            ExitCode::from(1)
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    let store = cli.store;
    match cli.cmd {
        Cmd::Run(a) => cmd_run::run(&store, a),
        Cmd::Plan(a) => cmd_plan::run(&store, a),
        Cmd::Resume(a) => cmd_run::resume(&store, a),
        Cmd::Fork(a) => cmd_run::fork(&store, a),
        Cmd::Status(a) => cmd_inspect::status(&store, a),
        Cmd::Runs(a) => cmd_inspect::runs(&store, a),
        Cmd::Replay(a) => cmd_inspect::replay(&store, a),
        Cmd::Verify(a) => cmd_inspect::verify(&store, a),
        Cmd::Gc(a) => cmd_inspect::gc(&store, a),
        Cmd::Restore(a) => cmd_remote::restore(&store, a),
        Cmd::Lineage(a) => cmd_lineage::lineage(&store, a),
        Cmd::Export(a) => cmd_lineage::export(&store, a),
        Cmd::Report(a) => cmd_report::report(&store, a),
        Cmd::Generate(a) => cmd_model::run_generate(a).map(|()| ExitCode::SUCCESS),
        Cmd::Logprobs(a) => cmd_model::run_logprobs(a).map(|()| ExitCode::SUCCESS),
        Cmd::ExportModel(a) => cmd_model::run_export_model(a).map(|()| ExitCode::SUCCESS),
        Cmd::Dpo(a) => cmd_dpo::run(a),
        Cmd::Bench(a) => cmd_bench::run(a),
        Cmd::Eval(a) => cmd_eval::run(&store, a),
        Cmd::Cancel(a) => cmd_cancel::run(&store, a),
        Cmd::Worker(a) => cmd_worker::run(a),
    }
}

//! Stores written by an earlier build of tsr, killed in the middle of a DPO step (one training
//! the whole model, one a LoRA adapter with dropout), resume and replay with this build: the
//! resumed run ends with the outputs of an uninterrupted run of this build, and replaying its
//! iteration recomputes every step identically. The stores are `tests/fixtures/old-stores/`,
//! made by `scripts/old_store_golden.sh` (the revision is in `MADE_BY`), one set per kind of CPU
//! (`common::cpu_kind`: a DPO step resumed on another kind than the one that began it ends with
//! other bits than one run there whole, and the old builds' logprob judges add long products
//! in gemm; `scripts/as-avx2.sh [--l1d 48K:12]` makes and checks the AVX2 sets on a machine
//! with AVX-512). A run records its files
//! by absolute path, so the stores are made in [`RECORDED_AT`] and resumed there; unpacked
//! anywhere else, `tsr resume` names the files it no longer finds.

mod common;

use common::*;

use std::path::{Path, PathBuf};
use std::process::Command;

/// Where `scripts/old_store_golden.sh` makes the stores: their runs' files are recorded there.
const RECORDED_AT: &str = "/tmp/tsr-old-store";

/// Held by each test for its whole length: they use the same folder under [`RECORDED_AT`] (one
/// resumes there, one needs it absent).
static RECORDED_AT_LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// Unpack the fixture `variant` into `into` and return its folder.
fn unpack(variant: &str, into: &Path) -> PathBuf {
    let tar = fixtures_for_this_cpu(
        &Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/old-stores"),
        "`scripts/old_store_golden.sh REV`",
    )
    .join(format!("{variant}.tar.gz"));
    let o = Command::new("tar")
        .arg("-xzf")
        .arg(&tar)
        .arg("-C")
        .arg(into)
        .output()
        .unwrap();
    assert!(
        o.status.success(),
        "unpacking {}: {}",
        tar.display(),
        text(&o)
    );
    into.join(variant)
}

/// The prompt attention the run `run` recorded: `batched` where it recorded none (a run begun
/// when that was the default).
fn recorded_prompt_attention(store: &Path, run: &str) -> String {
    let s = tsr_state::Store::open(store).unwrap();
    let config: toml::Value = s.run(run).unwrap().config_toml.parse().unwrap();
    config
        .get("prompt_attention")
        .and_then(|v| v.as_str())
        .unwrap_or("batched")
        .to_string()
}

/// (optimizer step of the DPO step's checkpoint, whether it is done).
fn dpo_checkpoint(store: &Path, run: &str) -> (u64, bool) {
    let s = tsr_state::Store::open(store).unwrap();
    for (_, rec) in s.nodes(run).unwrap() {
        let step = s.get_step(&rec.step_key).unwrap().unwrap();
        if step.kind != "dpo" {
            continue;
        }
        let done = matches!(step.status, tsr_state::StepStatus::Done { .. });
        let at = step.checkpoint.map(|c| {
            let cursor: serde_json::Value = serde_json::from_slice(&c.cursor).unwrap();
            cursor["optimizer_step"].as_u64().unwrap()
        });
        return (at.unwrap_or(0), done);
    }
    panic!("{run} has no DPO step");
}

/// `tsr ARGS --store STORE` run in `dir` (the stored config names its files relative to it).
fn tsr_in(dir: &Path, args: &[&str], store: &str) -> std::process::Output {
    Command::new(tsr_exe())
        .current_dir(dir)
        .args(args)
        .args(["--store", store])
        .output()
        .unwrap()
}

/// Each node's outputs, from `tsr status --json`.
fn outputs(dir: &Path, run: &str, store: &str) -> Vec<(String, serde_json::Value)> {
    let o = tsr_in(dir, &["status", run, "--json"], store);
    assert!(o.status.success(), "status: {}", text(&o));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    v["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| {
            (
                n["node"].as_str().unwrap().to_string(),
                n["outputs"].clone(),
            )
        })
        .collect()
}

/// Removes a folder when dropped, also when the test fails.
struct RemoveOnDrop(PathBuf);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn resume_and_replay(variant: &str) {
    let _lock = RECORDED_AT_LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let at = Path::new(RECORDED_AT);
    let _ = std::fs::remove_dir_all(at.join(variant));
    std::fs::create_dir_all(at).unwrap();
    let dir = unpack(variant, at);
    let _cleanup = RemoveOnDrop(dir.clone());
    let run = format!("old-{variant}");
    let store = dir.join("store");
    let (at, done) = dpo_checkpoint(&store, &run);
    assert!(!done && at >= 2, "the fixture should hold a DPO step interrupted after a checkpoint, holds step {at} (done: {done})");

    let o = tsr_in(&dir, &["resume", &run, "--quiet"], "store");
    assert!(o.status.success(), "resume: {}", text(&o));
    let (_, done) = dpo_checkpoint(&store, &run);
    assert!(done);

    // Its config, given again, continues it as recorded: a run recorded without
    // `prompt_attention` began when `batched` was the default and keeps it (nothing recomputed).
    let resumed = outputs(&dir, &run, "store");
    let o = tsr_in(&dir, &["run", "run.toml", "--quiet"], "store");
    assert!(o.status.success(), "the same config again: {}", text(&o));
    assert_eq!(outputs(&dir, &run, "store"), resumed);

    // An uninterrupted run of this build: a new run records today's default (`fused`), so the
    // recorded run's prompt attention is asked for by name.
    let recorded = recorded_prompt_attention(&store, &run);
    let config = std::fs::read_to_string(dir.join("run.toml")).unwrap();
    std::fs::write(
        dir.join("same.toml"),
        format!("prompt_attention = \"{recorded}\"\n{config}"),
    )
    .unwrap();
    let o = tsr_in(&dir, &["run", "same.toml", "--quiet"], "fresh");
    assert!(o.status.success(), "uninterrupted run: {}", text(&o));
    assert_eq!(
        outputs(&dir, &run, "store"),
        outputs(&dir, &run, "fresh"),
        "the resumed old store and an uninterrupted run of this build differ{}",
        cpu_kind_caveat()
    );

    let o = tsr_in(
        &dir,
        &["replay", &run, "--iteration", "1", "--json"],
        "store",
    );
    assert!(o.status.success(), "replay: {}", text(&o));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["identical"], true, "{v}");
}

#[test]
fn an_old_store_killed_inside_full_dpo_resumes_and_replays() {
    resume_and_replay("full");
}

#[test]
fn an_old_store_killed_inside_lora_dpo_resumes_and_replays() {
    resume_and_replay("lora");
}

/// Unpacked elsewhere, the store's recorded files are gone: `tsr resume` refuses before any
/// work, naming them and the way on (the config where the files are now continues the run).
#[test]
fn an_old_store_moved_elsewhere_names_its_missing_files_on_resume() {
    let _lock = RECORDED_AT_LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let _ = std::fs::remove_dir_all(Path::new(RECORDED_AT).join("lora"));
    let tmp = tempfile::tempdir().unwrap();
    let dir = unpack("lora", tmp.path());
    let before = dpo_checkpoint(&dir.join("store"), "old-lora");
    let o = tsr_in(&dir, &["resume", "old-lora", "--quiet"], "store");
    assert!(!o.status.success(), "resume: {}", text(&o));
    let msg = text(&o);
    assert!(
        msg.contains(&format!("prompts.file = {RECORDED_AT}/lora/prompts.jsonl"))
            && msg.contains(&format!("model.source = {RECORDED_AT}/lora/tiny"))
            && msg.contains("tsr run CONFIG"),
        "resume: {msg}"
    );
    assert_eq!(dpo_checkpoint(&dir.join("store"), "old-lora"), before);
    // Showing the run needs none of its files: status lists every recorded node's outputs.
    let shown = outputs(&dir, "old-lora", "store");
    for node in [
        "import",
        "prompts",
        "iter1/gen-current",
        "iter1/judge-current",
    ] {
        let (_, out) = shown.iter().find(|(n, _)| n == node).expect(node);
        assert!(
            out.as_array().is_some_and(|o| !o.is_empty()),
            "{node} shows no outputs: {out}"
        );
    }
    assert_eq!(dpo_checkpoint(&dir.join("store"), "old-lora"), before);
}

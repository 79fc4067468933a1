//! Reliability of the language-model workflow under faults, on a tiny random model: 30+ SIGKILLs
//! at random moments across a whole temporal iteration (blob writes, sled commits and DPO
//! checkpoints included, wherever the dice fall), and SIGTERM during each kind of long step.

mod common;

use common::*;

use rand::{Rng, SeedableRng};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

/// A tiny-model temporal run heavy enough that each long step spans several batches.
fn setup(dir: &Path) -> PathBuf {
    tsr_steps::model::testing::write_tiny_hf_model(&dir.join("tiny"), 3);
    let prompts: String = (0..12)
        .map(|i| format!("{{\"id\": \"p{i}\", \"prompt\": \"question number {i}\"}}\n"))
        .collect();
    std::fs::write(dir.join("prompts.jsonl"), prompts).unwrap();
    let cfg = dir.join("r.toml");
    std::fs::write(
        &cfg,
        "name = \"r\"\nworkflow = \"temporal\"\niterations = 1\n[model]\nsource = \"tiny\"\n[prompts]\nfile = \"prompts.jsonl\"\n\
         [generate]\nk = 4\nmax_new_tokens = 24\nbatch_size = 2\n[judge]\nmode = \"logprob\"\nbatch_size = 2\n\
         [dpo]\nlr = 1e-3\nmicro_batch = 1\naccum_steps = 1\nepochs = 2\ncheckpoint_every = 1\n",
    )
    .unwrap();
    cfg
}

fn status(store: &Path) -> serde_json::Value {
    let o = tsr(&["status", "r", "--json"], store);
    assert!(o.status.success(), "{}", text(&o));
    serde_json::from_slice(&o.stdout).unwrap()
}

fn outputs(v: &serde_json::Value) -> Vec<(String, serde_json::Value)> {
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

fn spawn(cfg: &Path, store: &Path, unit_delay_ms: Option<u64>) -> std::process::Child {
    let mut c = Command::new(env!("CARGO_BIN_EXE_tsr"));
    if let Some(ms) = unit_delay_ms {
        c.env("TSR_TEST_UNIT_DELAY_MS", ms.to_string());
    }
    c.args(["run", cfg.to_str().unwrap(), "--quiet", "--store"])
        .arg(store)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap()
}

#[test]
fn thirty_sigkills_across_a_temporal_iteration_change_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = setup(dir.path());
    let reference = dir.path().join("ref");
    let t0 = Instant::now();
    let o = tsr(&["run", cfg.to_str().unwrap(), "--quiet"], &reference);
    assert!(o.status.success(), "{}", text(&o));
    let full = t0.elapsed();
    let want = outputs(&status(&reference));

    let store = dir.path().join("killed");
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    let max_delay = (full.as_millis() as u64 / 25).clamp(40, 1000);
    let mut kills = 0;
    loop {
        let mut child = spawn(&cfg, &store, None);
        if kills >= 30 {
            let out = child.wait_with_output().unwrap();
            assert!(
                out.status.success(),
                "{}",
                String::from_utf8_lossy(&out.stderr)
            );
            break;
        }
        std::thread::sleep(Duration::from_millis(rng.gen_range(30..max_delay)));
        if let Some(s) = child.try_wait().unwrap() {
            assert!(s.success(), "child failed: {s:?}");
            break;
        }
        unsafe { libc::kill(child.id() as i32, libc::SIGKILL) };
        child.wait().unwrap();
        kills += 1;
    }
    assert!(
        kills >= 30,
        "only {kills} kills landed (the run took {full:?} uninterrupted)"
    );
    let v = status(&store);
    assert_eq!(outputs(&v), want, "outputs differ after {kills} SIGKILLs");
    // Every item-journaled step holds exactly its items (a second commit of an item is refused
    // by the store, so none was produced twice).
    for n in v["nodes"].as_array().unwrap() {
        if let Some(total) = n["items_total"].as_u64() {
            assert_eq!(n["items_done"].as_u64(), Some(total), "{}", n["node"]);
        }
    }
    let o = tsr(&["verify"], &store);
    assert!(o.status.success(), "{}", text(&o));
    let a = tsr(&["export", "r", "pairs"], &reference);
    let b = tsr(&["export", "r", "pairs"], &store);
    assert_eq!(a.stdout, b.stdout, "pairs and their lineage differ");
}

#[test]
fn sigterm_during_each_kind_of_step_exits_resumable_and_resumes() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = setup(dir.path());
    let reference = dir.path().join("ref");
    assert!(tsr(&["run", cfg.to_str().unwrap(), "--quiet"], &reference)
        .status
        .success());
    let want = outputs(&status(&reference));
    for kind in ["generate", "judge", "ref-logprobs", "dpo"] {
        let store = dir.path().join(format!("term-{kind}"));
        let child = spawn(&cfg, &store, Some(40));
        // Wait until a step of this kind is running (from the live status snapshot).
        let t0 = Instant::now();
        let mut seen = false;
        while t0.elapsed() < Duration::from_secs(60) {
            let o = tsr(&["status", "r", "--json"], &store);
            if o.status.success() {
                let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap_or_default();
                if v["nodes"].as_array().map_or(false, |ns| {
                    ns.iter()
                        .any(|n| n["kind"] == kind && n["state"] == "running")
                }) {
                    seen = true;
                    break;
                }
                if v["status"] == "done" {
                    break;
                }
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        assert!(seen, "never saw a `{kind}` step running");
        let t1 = Instant::now();
        unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
        let out = child.wait_with_output().unwrap();
        let took = t1.elapsed();
        let err = String::from_utf8_lossy(&out.stderr);
        // The step may have finished just before the signal; then the next one stops.
        assert_eq!(out.status.code(), Some(75), "{kind}: {err}");
        assert!(err.contains("Resume with: tsr run"), "{kind}: {err}");
        assert!(
            took < Duration::from_secs(20),
            "{kind}: took {took:?} to stop"
        );
        let o = tsr(&["run", cfg.to_str().unwrap(), "--quiet"], &store);
        assert!(o.status.success(), "{kind}: {}", text(&o));
        assert_eq!(
            outputs(&status(&store)),
            want,
            "{kind}: results differ after SIGTERM and resume"
        );
    }
}

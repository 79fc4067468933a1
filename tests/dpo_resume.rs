//! Exact DPO resume through the engine: a tiny-model self-rewarding iteration whose
//! DPO node checkpoints after every optimizer step is SIGKILLed at random moments while that
//! node trains, several times, and resumed each time; the final digests of every node (the
//! trained weights and the per-step metrics included) must equal those of an uninterrupted run.
//! After each kill the store is opened to check that the kill really landed inside DPO with a
//! checkpoint part-way through training, so the test cannot pass by killing elsewhere.

mod common;

use common::*;

use rand::{Rng, SeedableRng};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

const RUN: &str = "dpo-resume";

fn setup(dir: &Path, checkpoint_every: u64, lora: bool) -> PathBuf {
    tsr_steps::model::testing::write_tiny_hf_model(&dir.join("tiny"), 5);
    let prompts: String = [
        "hello there",
        "name a colour",
        "count to three",
        "what is the capital of France?",
        "write a short poem about the sea",
        "why is the sky blue?",
    ]
    .iter()
    .enumerate()
    .map(|(i, p)| format!("{{\"id\": \"p{i}\", \"prompt\": \"{p}\"}}\n"))
    .collect();
    std::fs::write(dir.join("prompts.jsonl"), prompts).unwrap();
    let cfg = dir.join("dpo-resume.toml");
    std::fs::write(
        &cfg,
        format!(
            "name = \"{RUN}\"\nworkflow = \"self-rewarding\"\niterations = 1\n\
             [model]\nsource = \"tiny\"\n[prompts]\nfile = \"prompts.jsonl\"\n\
             [generate]\nk = 3\nmax_new_tokens = 8\nbatch_size = 6\n\
             [judge]\nmode = \"logprob\"\nsamples = 1\nmax_new_tokens = 4\nbatch_size = 6\n\
             [dpo]\nlr = 1e-3\nepochs = 16\nmicro_batch = 1\naccum_steps = 2\ncheckpoint_every = {checkpoint_every}\n\
             warmup_steps = 3\nweight_decay = 0.01\n{}",
            if lora {
                "adapter = \"lora\"\n[dpo.lora]\nr = 4\nalpha = 8\n"
            } else {
                ""
            }
        ),
    )
    .unwrap();
    cfg
}

fn status(store: &Path) -> serde_json::Value {
    let o = tsr(&["status", RUN, "--json"], store);
    assert!(o.status.success(), "{}", text(&o));
    serde_json::from_slice(&o.stdout).unwrap()
}

fn outputs_equal(want: &serde_json::Value, got: &serde_json::Value, what: &str) {
    for n in want["nodes"].as_array().unwrap() {
        let name = n["node"].as_str().unwrap();
        let m = got["nodes"]
            .as_array()
            .unwrap()
            .iter()
            .find(|x| x["node"] == name)
            .unwrap();
        assert_eq!(n["outputs"], m["outputs"], "node {name} differs {what}");
    }
}

/// Waits until this child's own DPO attempt runs: the node is running with more attempts than
/// `attempts` (a killed run's record still says "running" for the attempt it killed).
fn wait_for_dpo(child: &mut std::process::Child, store: &Path, attempts: u64) {
    let start = Instant::now();
    while child.try_wait().unwrap().is_none()
        && !dpo_running(store, attempts)
        && start.elapsed() < Duration::from_secs(60)
    {
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn dpo_running(store: &Path, attempts: u64) -> bool {
    let o = tsr(&["status", RUN, "--json"], store);
    let Ok(v) = serde_json::from_slice::<serde_json::Value>(&o.stdout) else {
        return false;
    };
    v["nodes"].as_array().is_some_and(|ns| {
        ns.iter().any(|n| {
            n["kind"] == "dpo"
                && n["state"] == "running"
                && n["attempts"].as_u64().unwrap_or(0) > attempts
        })
    })
}

/// (optimizer step of the DPO node's checkpoint, whether the node is done, attempts), read
/// from the store of a killed run.
fn dpo_checkpoint(store: &Path) -> Option<(u64, bool, u64)> {
    let s = tsr_state::Store::open(store).unwrap();
    let nodes = s.nodes(RUN).ok()?;
    for (_, rec) in nodes {
        let step = s.get_step(&rec.step_key).unwrap()?;
        if step.kind != "dpo" {
            continue;
        }
        let done = matches!(step.status, tsr_state::StepStatus::Done { .. });
        let at = step.checkpoint.map(|c| {
            let cursor: serde_json::Value = serde_json::from_slice(&c.cursor).unwrap();
            cursor["optimizer_step"].as_u64().unwrap()
        });
        return Some((at.unwrap_or(0), done, step.attempts as u64));
    }
    None
}

#[test]
fn sigkill_during_dpo_and_resume_gives_identical_weights_and_metrics() {
    sigkill_during_dpo(false);
}

/// The same with a LoRA adapter training: its checkpoints hold the adapter and its optimizer
/// state only, and resume exactly.
#[test]
fn sigkill_during_lora_dpo_and_resume_gives_identical_adapter_and_metrics() {
    sigkill_during_dpo(true);
}

fn sigkill_during_dpo(lora: bool) {
    let dir = tempfile::tempdir().unwrap();
    let cfg = setup(dir.path(), 1, lora);
    let cfg = cfg.to_str().unwrap();
    let reference = dir.path().join("ref");
    let o = tsr(&["run", cfg, "--quiet"], &reference);
    assert!(o.status.success(), "{}", text(&o));
    let want = status(&reference);
    let dpo_metrics = want["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|n| n["kind"] == "dpo")
        .unwrap();
    let metrics = dpo_metrics["outputs"]
        .as_array()
        .unwrap()
        .iter()
        .find(|o| o[0] == "metrics")
        .unwrap()[1]
        .as_str()
        .unwrap();
    let report: serde_json::Value = serde_json::from_slice(
        &std::fs::read(
            reference
                .join("blobs")
                .join(&metrics[..2])
                .join(&metrics[2..]),
        )
        .unwrap(),
    )
    .unwrap();
    let total = report["steps"].as_u64().unwrap();
    assert!(total >= 12, "DPO should take several steps, took {total}");
    // Kill moments span a few optimizer steps at the speed this machine runs them now (under
    // the load of other tests a step takes longer; a fixed window would stop the kills from
    // ever passing a new checkpoint).
    let step_ms = (dpo_metrics["busy_s"].as_f64().unwrap() * 1000.0 / total as f64) as u64;
    let window = (3 * step_ms).max(150);

    let store = dir.path().join("killed");
    let mut rng = rand::rngs::StdRng::seed_from_u64(4);
    let mut landed: Vec<u64> = Vec::new();
    let mut attempts = 0u64;
    for _attempt in 0..30 {
        if landed.len() >= 5 {
            break;
        }
        let mut child = Command::new(env!("CARGO_BIN_EXE_tsr"))
            .args(["run", cfg, "--quiet", "--store"])
            .arg(&store)
            .spawn()
            .unwrap();
        // Wait until the DPO node trains, then kill at a random moment.
        wait_for_dpo(&mut child, &store, attempts);
        std::thread::sleep(Duration::from_millis(rng.gen_range(10..window)));
        if child.try_wait().unwrap().is_some() {
            break; // finished before the kill
        }
        child.kill().unwrap(); // SIGKILL
        child.wait().unwrap();
        if let Some((step, done, now)) = dpo_checkpoint(&store) {
            // A kill landed when it stopped an attempt of its own past a checkpoint.
            if !done && now > attempts && step > 0 && step < total {
                landed.push(step);
            }
            attempts = now;
        }
    }
    let o = tsr(&["run", cfg, "--quiet"], &store);
    assert!(o.status.success(), "{}", text(&o));
    eprintln!("DPO takes {total} steps; kills landed at checkpointed steps {landed:?}");
    assert!(
        landed.len() >= 3,
        "only {} kills landed inside DPO with a checkpoint: {landed:?}",
        landed.len()
    );
    assert!(
        landed.windows(2).all(|w| w[0] <= w[1]),
        "a checkpoint went backwards: {landed:?}"
    );
    let mut distinct = landed.clone();
    distinct.dedup();
    assert!(
        distinct.len() >= 2,
        "the kills should land at different checkpoints, so that resuming from more than one is tested: {landed:?}"
    );

    let got = status(&store);
    outputs_equal(&want, &got, &format!("after kills at DPO steps {landed:?}"));
    let dpo = got["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|n| n["kind"] == "dpo")
        .unwrap();
    assert!(
        dpo["attempts"].as_u64().unwrap() > landed.len() as u64,
        "{dpo}"
    );
    let weights = output_of(&got, dpo["node"].as_str().unwrap(), "weights");
    let stored = store.join("blobs").join(&weights[..2]).join(&weights[2..]);
    assert_eq!(
        tsr_steps::model::StoredAdapter::read(&stored).is_ok(),
        lora,
        "the DPO output should be an adapter exactly when LoRA trains"
    );
    assert!(tsr(&["verify"], &store).status.success());
}

/// A stop request (SIGTERM) makes the DPO step checkpoint where it is, even with no periodic
/// checkpoint due (`checkpoint_every` larger than the run), and the resumed run ends identical.
#[test]
fn sigterm_during_dpo_checkpoints_at_the_stop_and_resumes_exactly() {
    sigterm_during_dpo(false);
}

#[test]
fn sigterm_during_lora_dpo_checkpoints_at_the_stop_and_resumes_exactly() {
    sigterm_during_dpo(true);
}

fn sigterm_during_dpo(lora: bool) {
    let dir = tempfile::tempdir().unwrap();
    let cfg = setup(dir.path(), 1000, lora);
    let cfg = cfg.to_str().unwrap();
    let reference = dir.path().join("ref");
    let o = tsr(&["run", cfg, "--quiet"], &reference);
    assert!(o.status.success(), "{}", text(&o));

    let store = dir.path().join("stopped");
    let mut child = Command::new(env!("CARGO_BIN_EXE_tsr"))
        .args(["run", cfg, "--quiet", "--store"])
        .arg(&store)
        .spawn()
        .unwrap();
    wait_for_dpo(&mut child, &store, 0);
    std::thread::sleep(Duration::from_millis(60));
    assert!(
        child.try_wait().unwrap().is_none(),
        "the run ended before the stop request"
    );
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    child.wait().unwrap();
    let (step, done, _) = dpo_checkpoint(&store).expect("a DPO node");
    assert!(
        !done && step > 0,
        "stop request left checkpoint at step {step}, done {done}"
    );

    let o = tsr(&["run", cfg, "--quiet"], &store);
    assert!(o.status.success(), "{}", text(&o));
    outputs_equal(
        &status(&reference),
        &status(&store),
        &format!("after a stop at DPO step {step}"),
    );
}

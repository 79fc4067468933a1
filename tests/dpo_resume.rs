//! Exact DPO resume through the engine: a tiny-model self-rewarding iteration whose
//! DPO node checkpoints after every optimizer step is SIGKILLed at seeded moments inside that
//! node's steps (placed by the run's own events, not the clock), several times, and resumed each
//! time; the final digests of every node (the
//! trained weights and the per-step metrics included) must equal those of an uninterrupted run.
//! After each kill the store is opened to check that the kill really landed inside DPO with a
//! checkpoint part-way through training, so the test cannot pass by killing elsewhere.

mod common;

use common::*;

use rand::{Rng, SeedableRng};
use std::path::{Path, PathBuf};

const RUN: &str = "dpo-resume";

fn setup(dir: &Path, checkpoint_every: u64, lora: bool) -> PathBuf {
    tsr_model::testing::write_tiny_hf_model(&dir.join("tiny"), 5);
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
    let cfg_path = setup(dir.path(), 1, lora);
    let cfg = cfg_path.to_str().unwrap();
    let reference = dir.path().join("ref");
    let (want, units) = reference_run(&cfg_path, &reference, RUN);
    let dpo_node = want["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|n| n["kind"] == "dpo")
        .unwrap();
    let node = dpo_node["node"].as_str().unwrap().to_string();
    let metrics = output_of(&want, &node, "metrics");
    let report: serde_json::Value = serde_json::from_slice(&blob(&reference, &metrics)).unwrap();
    let total = report["steps"].as_u64().unwrap();
    assert!(total >= 12, "DPO should take several steps, took {total}");
    assert_eq!(
        units.get(&node),
        Some(&total),
        "one unit boundary per optimizer step"
    );
    // Five kills inside DPO, placed by events: each new process stops itself at its second or
    // third optimizer step (so a step of its own is checkpointed), goes on for a seeded moment
    // (at most until the next step begins), and is killed. Each resumes from a later checkpoint.
    let step_ms = (dpo_node["busy_s"].as_f64().unwrap() * 1000.0 / total as f64) as u64;
    let mut rng = rand::rngs::StdRng::seed_from_u64(4);
    let store = dir.path().join("killed");
    let mut landed: Vec<u64> = Vec::new();
    let mut attempts = 0u64;
    for k in 0..5 {
        let at = KillAt::new(&node, 2 + k % 2, rng.gen_range(0..=step_ms));
        let mut child = spawn_paused(run_command(&cfg_path, &store), &at)
            .unwrap_or_else(|o| panic!("never reached {at:?}: {}", text(&o)));
        assert!(kill_after(&mut child, at.after_ms), "{at:?}");
        let (step, done, now) = dpo_checkpoint(&store).expect("a DPO node");
        // The kill stopped an attempt of its own, past a checkpoint, before the end.
        assert!(
            !done && now > attempts && step > 0 && step < total,
            "{at:?}: checkpoint at step {step} of {total}, done {done}, attempts {attempts} -> {now}"
        );
        landed.push(step);
        attempts = now;
    }
    let o = tsr(&["run", cfg, "--quiet"], &store);
    assert!(o.status.success(), "{}", text(&o));
    eprintln!("DPO takes {total} steps; kills landed at checkpointed steps {landed:?}");
    assert!(
        landed.windows(2).all(|w| w[0] < w[1]),
        "each kill should resume from a later checkpoint: {landed:?}"
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
        tsr_model::StoredAdapter::read(&stored).is_ok(),
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
    // The run stops itself at DPO's third optimizer step (an event), then gets SIGTERM.
    let node = status(&reference)["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|n| n["kind"] == "dpo")
        .unwrap()["node"]
        .as_str()
        .unwrap()
        .to_string();
    let child = spawn_paused(
        run_command(Path::new(cfg), &store),
        &KillAt::new(&node, 3, 0),
    )
    .unwrap_or_else(|o| panic!("never reached DPO: {}", text(&o)));
    let out = terminate(child);
    assert_eq!(out.status.code(), Some(75), "{}", text(&out));
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

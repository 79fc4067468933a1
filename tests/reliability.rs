//! Reliability of the language-model workflow under faults, on a tiny random model: 30+ SIGKILLs
//! inside every step of a whole temporal iteration, each a seeded moment into a unit's work
//! (blob writes, sled commits and DPO checkpoints included), and SIGTERM during each kind of long
//! step. Kills are placed by the run's own events (it stops itself at a named unit), never by
//! the clock, so the tests mean the same on any machine.

mod common;

use common::*;

use std::path::{Path, PathBuf};

/// A tiny-model temporal run heavy enough that each long step spans several batches.
fn setup(dir: &Path) -> PathBuf {
    tsr_model::testing::write_tiny_hf_model(&dir.join("tiny"), 3);
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

#[test]
fn thirty_sigkills_across_a_temporal_iteration_change_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = setup(dir.path());
    let reference = dir.path().join("ref");
    let (v, units) = reference_run(&cfg, &reference, "r");
    let want = outputs(&v);

    // Kills planned from the run's own events, not from the clock: each new process stops
    // itself at a unit boundary of its step, then goes on for a seeded moment (cut short by
    // its next unit boundary) and is killed, so kills land inside every step, at any point of a unit's work,
    // blob writes and commits, and DPO checkpoints, on a fast machine as on a slow one.
    let plan = plan_kills(&v, &units, 5, 7);
    assert!(
        plan.len() >= 30,
        "only {} kills planned: {units:?}",
        plan.len()
    );
    let store = dir.path().join("killed");
    let landed = kill_in_steps(&cfg, &store, "r", &plan);
    // Every step kind with units was interrupted (its record left `interrupted`) by some kill.
    let kinds: std::collections::BTreeSet<&str> =
        landed.iter().flatten().map(|(k, _)| k.as_str()).collect();
    for kind in ["generate", "judge", "ref-logprobs", "dpo"] {
        assert!(
            kinds.contains(kind),
            "no kill landed in a `{kind}` step: {landed:?}"
        );
    }
    // And every step with units, of both phases, was.
    let planned: std::collections::BTreeSet<&str> = plan.iter().map(|k| k.node.as_str()).collect();
    let hit: std::collections::BTreeSet<&str> =
        landed.iter().flatten().map(|(_, n)| n.as_str()).collect();
    let missed: Vec<&&str> = planned.difference(&hit).collect();
    assert!(
        missed.is_empty(),
        "no kill landed in {missed:?}: {landed:?}"
    );
    assert!(
        planned.contains("iter1/dpo-future") && planned.contains("iter1/dpo-next"),
        "{planned:?}"
    );
    let o = tsr(&["run", cfg.to_str().unwrap(), "--quiet"], &store);
    assert!(o.status.success(), "{}", text(&o));
    let kills = plan.len();
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
    let (v, units) = reference_run(&cfg, &reference, "r");
    let want = outputs(&v);
    for kind in ["generate", "judge", "ref-logprobs", "dpo"] {
        // The step of this kind with the most units: the run stops itself at its second unit
        // boundary (an event, whatever the machine's speed) and gets SIGTERM. The stop request
        // reaches the step through a handler thread; three or more units left after the next
        // boundary leave it time to, so the step stops inside, not at its end.
        let (node, n) = v["nodes"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|n| n["kind"] == kind)
            .map(|n| {
                let node = n["node"].as_str().unwrap().to_string();
                let u = units.get(&node).copied().unwrap_or(0);
                (node, u)
            })
            .max_by_key(|(_, u)| *u)
            .unwrap();
        assert!(n >= 6, "`{kind}`: {node} has {n} units: {units:?}");
        let store = dir.path().join(format!("term-{kind}"));
        let child = spawn_paused(run_command(&cfg, &store), &KillAt::new(&node, 2, 0))
            .unwrap_or_else(|o| panic!("{kind}: never reached {node}: {}", text(&o)));
        let out = terminate(child);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(75), "{kind}: {err}");
        assert!(err.contains("Resume with: tsr run"), "{kind}: {err}");
        // It stopped at the next unit boundary, inside the step, not at its end.
        assert!(
            unfinished_kinds(&store, "r").contains(&(kind.to_string(), node.clone())),
            "{kind}: {node} was not left unfinished: {err}"
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

//! The tiny-model run the executor tests compare: a temporal iteration with evaluation whose
//! item steps have several batches each, run in one process as the reference, and what a run
//! gives (every node's outputs, the exported pairs, a pair's lineage).
//!
//! Every process runs one CPU thread (`RAYON_NUM_THREADS=1`, which the executors also give
//! each worker), so the comparison is between the same computations on the same thread count.

#![allow(dead_code)]

use super::{status, text, tsr};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// Every node's outputs, the exported pairs and a pair's lineage.
pub type Results = (Vec<String>, Vec<u8>, String);

pub const PROMPTS: &str = "{\"id\": \"a\", \"prompt\": \"hello there\"}\n{\"id\": \"b\", \"prompt\": \"name a colour\"}\n{\"id\": \"c\", \"prompt\": \"count to three\"}\n{\"id\": \"d\", \"prompt\": \"say yes\"}\n";
pub const HELD_OUT: &str = "{\"id\": \"e1\", \"prompt\": \"say hi\"}\n{\"id\": \"e2\", \"prompt\": \"list two fruits\"}\n{\"id\": \"e3\", \"prompt\": \"name a fish\"}\n";

/// A temporal iteration with evaluation whose item steps have several batches each.
pub fn setup(dir: &Path, executor: &str) -> PathBuf {
    setup_k(dir, executor, 3)
}

/// [`setup`]'s run with `k` responses per prompt (generation and judging have `2 * k` batches).
pub fn setup_k(dir: &Path, executor: &str, k: u32) -> PathBuf {
    if !dir.join("tiny").exists() {
        tsr_model::testing::write_tiny_hf_model(&dir.join("tiny"), 5);
    }
    std::fs::write(dir.join("prompts.jsonl"), PROMPTS).unwrap();
    std::fs::write(dir.join("held-out.jsonl"), HELD_OUT).unwrap();
    let cfg = dir.join("run.toml");
    std::fs::write(
        &cfg,
        format!(
            "name = \"x\"\nworkflow = \"temporal\"\niterations = 1\n\
             [model]\nsource = \"tiny\"\n[prompts]\nfile = \"prompts.jsonl\"\n\
             [generate]\nk = {k}\nmax_new_tokens = 5\nbatch_size = 2\n\
             [judge]\nmode = \"logprob\"\nbatch_size = 2\n\
             [dpo]\nlr = 1e-3\naccum_steps = 2\ncheckpoint_every = 1\n\
             [eval]\nprompts = \"held-out.jsonl\"\nmax_new_tokens = 5\nbatch_size = 2\nbootstrap_resamples = 10\n\
             [eval.judge]\nmode = \"logprob\"\nbatch_size = 1\n{executor}"
        ),
    )
    .unwrap();
    cfg
}

pub fn command(cfg: &Path, store: &Path) -> Command {
    let mut c = Command::new(super::tsr_exe());
    c.args([
        "run",
        cfg.to_str().unwrap(),
        "--store",
        store.to_str().unwrap(),
    ])
    .env("RAYON_NUM_THREADS", "1")
    .env_remove("TSR_TEST_PAUSE_AT");
    c
}

pub fn run(cfg: &Path, store: &Path) -> Output {
    let o = command(cfg, store).output().unwrap();
    assert!(o.status.success(), "{}", text(&o));
    o
}

/// Every node's outputs, the exported pairs and a pair's lineage.
pub fn results(store: &Path) -> Results {
    let v = status(store, "x");
    let nodes = v["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| format!("{} {}", n["node"], n["outputs"]))
        .collect();
    let o = tsr(&["export", "x", "pairs"], store);
    assert!(o.status.success(), "{}", text(&o));
    let pairs = o.stdout;
    let first: serde_json::Value =
        serde_json::from_slice(pairs.split(|b| *b == b'\n').next().unwrap()).unwrap();
    let id = first["pair_id"].as_str().unwrap();
    let o = tsr(&["lineage", "x", "pair", id, "--json"], store);
    assert!(o.status.success(), "{}", text(&o));
    (nodes, pairs, String::from_utf8(o.stdout).unwrap())
}

/// The same run in one process (the reference).
pub fn reference(dir: &Path) -> Results {
    reference_k(dir, 3)
}

/// [`setup_k`]'s run in one process.
pub fn reference_k(dir: &Path, k: u32) -> Results {
    let cfg = setup_k(&dir.join("local"), "", k);
    let store = dir.join("local/store");
    run(&cfg, &store);
    assert_computed_by(&store, "local");
    results(&store)
}

/// Fails unless `tsr lineage x prompt a` names who generated and judged each response:
/// `executor` (`local`, `processes`, `slurm`) with the worker's name for it, host and thread
/// count, in the JSON and in the text.
pub fn assert_computed_by(store: &Path, executor: &str) {
    let o = tsr(&["lineage", "x", "prompt", "a", "--json"], store);
    assert!(o.status.success(), "{}", text(&o));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let mut n = 0;
    for ph in v["phases"].as_array().unwrap() {
        for set in ph["sets"].as_array().unwrap() {
            for r in set["responses"].as_array().unwrap() {
                for w in [&r["generated_by"], &r["judgements"]["judged_by"]] {
                    assert_eq!(w["executor"], executor, "{w}");
                    assert_eq!(w["threads"], 1, "{w}");
                    assert!(w["host"].as_str().is_some_and(|h| !h.is_empty()), "{w}");
                    let job = w["job"].as_str().unwrap_or_default();
                    match executor {
                        "slurm" => assert!(
                            job.split_once('_').is_some_and(
                                |(a, t)| a.parse::<u64>().is_ok() && t.parse::<u64>().is_ok()
                            ),
                            "{w}"
                        ),
                        "processes" => assert!(job.starts_with("shard "), "{w}"),
                        _ => assert!(w["job"].is_null(), "{w}"),
                    }
                    n += 1;
                }
            }
        }
    }
    assert!(n > 0, "{v}");
    // The evaluation of the iteration's model is judged by the executor's workers too.
    let o = tsr(&["lineage", "x", "eval", "e1", "--json"], store);
    assert!(o.status.success(), "{}", text(&o));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let m1 = v
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["node"] == "iter1/eval-judge")
        .unwrap_or_else(|| panic!("{v}"));
    assert_eq!(m1["judged_by"]["executor"], executor, "{m1}");
    let o = tsr(&["lineage", "x", "prompt", "a"], store);
    let t = text(&o);
    let want = match executor {
        "slurm" => "generated by array task ",
        "processes" => "generated by worker process, shard ",
        _ => "generated by the driver (attempt ",
    };
    assert!(t.contains(want) && t.contains("judged by "), "{t}");
}

pub fn same(want: &Results, got: &Results) {
    assert_eq!(want.0.len(), got.0.len());
    for (a, b) in want.0.iter().zip(&got.0) {
        assert_eq!(a, b, "a node's outputs differ");
    }
    assert!(want.1 == got.1, "the exported pairs differ");
    assert_eq!(want.2, got.2, "a pair's lineage differs");
}

/// The item steps of [`setup`]'s run that an executor computes (generation by the current and
/// future models, judging, reference log-probs, answers, evaluation judging). The anchor's
/// generation is the same step as the current model's in the first iteration (M0 is both):
/// it is reused.
pub const SHARDED_NODES: [&str; 8] = [
    "iter1/gen-current",
    "iter1/judge-current",
    "iter1/ref-future",
    "iter1/gen-future",
    "iter1/ref-next",
    "eval-baseline",
    "iter1/eval-answer",
    "iter1/eval-judge",
];

/// The steps of [`setup`]'s run that an executor runs whole, in one of its workers: the two
/// trainings and the iteration's metrics.
pub const WHOLE_NODES: [&str; 3] = ["iter1/dpo-future", "iter1/dpo-next", "iter1/metrics"];

/// Fails unless the driver's log `t` says that each of [`SHARDED_NODES`] was handed over with
/// a line ending in `how` (its `tsr: NODE: ...` line), and that each of [`WHOLE_NODES`] ran
/// as one job of the executor (who ran it, and from which checkpoint).
pub fn assert_handed_over(t: &str, how: &str) {
    for node in SHARDED_NODES {
        let line = t
            .lines()
            .find(|l| l.starts_with(&format!("tsr: {node}: ")) && l.contains(how));
        assert!(line.is_some(), "{node} was not handed over ({how}):\n{t}");
    }
    let by = if how.contains("worker process") {
        "worker process, shard 0"
    } else {
        "array task "
    };
    for node in WHOLE_NODES {
        let line = t.lines().find(|l| {
            l.starts_with(&format!("tsr: {node}: ran as one job by {by}"))
                && (l.contains("ran from the start") || l.contains("continued from checkpoint"))
        });
        assert!(line.is_some(), "{node} did not run as one job ({by}):\n{t}");
    }
}

//! The language-model workflows on a tiny random model (fast): a whole temporal iteration
//! through the CLI, the DAG shape, lineage completeness of every pair, baselines, and a
//! SIGKILL-and-resume giving identical digests.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn tsr(args: &[&str], store: &Path) -> Output {
    Command::new(env!("CARGO_BIN_EXE_tsr"))
        .args(args)
        .arg("--store")
        .arg(store)
        .output()
        .unwrap()
}

fn text(o: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr))
}

fn setup(dir: &Path, workflow: &str, judge_mode: &str) -> PathBuf {
    let model = dir.join("tiny");
    if !model.exists() {
        tsr_steps::model::testing::write_tiny_hf_model(&model, 5);
    }
    std::fs::write(
        dir.join("prompts.jsonl"),
        "{\"id\": \"a\", \"prompt\": \"hello there\"}\n{\"id\": \"b\", \"prompt\": \"name a colour\"}\n{\"id\": \"c\", \"prompt\": \"count to three\"}\n",
    )
    .unwrap();
    let cfg = dir.join(format!("{workflow}-{judge_mode}.toml"));
    std::fs::write(
        &cfg,
        format!(
            "name = \"{workflow}-{judge_mode}\"\nworkflow = \"{workflow}\"\niterations = 1\n\
             [model]\nsource = \"tiny\"\n[prompts]\nfile = \"prompts.jsonl\"\n\
             [generate]\nk = 3\nmax_new_tokens = 6\nbatch_size = 4\n\
             [judge]\nmode = \"{judge_mode}\"\nsamples = 2\nmax_new_tokens = 6\nbatch_size = 4\n\
             [dpo]\nlr = 1e-3\nmicro_batch = 1\naccum_steps = 2\ncheckpoint_every = 1\n"
        ),
    )
    .unwrap();
    cfg
}

fn status(store: &Path, run: &str) -> serde_json::Value {
    let o = tsr(&["status", run, "--json"], store);
    assert!(o.status.success(), "{}", text(&o));
    serde_json::from_slice(&o.stdout).unwrap()
}

fn output_of(v: &serde_json::Value, node: &str, output: &str) -> String {
    let n = v["nodes"].as_array().unwrap().iter().find(|n| n["node"] == node).unwrap_or_else(|| panic!("no node {node}"));
    n["outputs"].as_array().unwrap().iter().find(|o| o[0] == output).unwrap()[1].as_str().unwrap().to_string()
}

fn blob(store: &Path, digest: &str) -> Vec<u8> {
    std::fs::read(store.join("blobs").join(&digest[..2]).join(&digest[2..])).unwrap()
}

#[test]
fn temporal_iteration_on_a_tiny_model_with_complete_lineage() {
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("store");
    let cfg = setup(dir.path(), "temporal", "logprob");
    let o = tsr(&["run", cfg.to_str().unwrap(), "--quiet"], &store);
    assert!(o.status.success(), "{}", text(&o));
    let v = status(&store, "temporal-logprob");
    let nodes: Vec<&str> = v["nodes"].as_array().unwrap().iter().map(|n| n["node"].as_str().unwrap()).collect();
    for want in [
        "import", "prompts", "iter1/gen-current", "iter1/judge-current", "iter1/gen-anchor", "iter1/judge-anchor",
        "iter1/select-1", "iter1/ref-future", "iter1/dpo-future", "iter1/gen-future", "iter1/judge-future",
        "iter1/select-2", "iter1/ref-next", "iter1/dpo-next",
    ] {
        assert!(nodes.contains(&want), "missing node {want} in {nodes:?}");
    }
    // Iteration 1: Mi = M0, so generate(M0) for the anchor is the same step as generate(Mi).
    let states: Vec<&str> = v["nodes"].as_array().unwrap().iter().map(|n| n["state"].as_str().unwrap()).collect();
    assert!(states.iter().all(|s| *s == "done" || *s == "reused"), "{states:?}");

    let m0 = output_of(&v, "import", "weights");
    let mf = output_of(&v, "iter1/dpo-future", "weights");
    let m1 = output_of(&v, "iter1/dpo-next", "weights");
    let pairs_text = String::from_utf8(blob(&store, &output_of(&v, "iter1/select-2", "pairs"))).unwrap();
    let pairs: Vec<serde_json::Value> = pairs_text.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert!(!pairs.is_empty(), "logprob judging of distinct responses yields pairs");
    for p in &pairs {
        for side in ["chosen", "rejected"] {
            let s = &p[side];
            let gen = s["generator_model"].as_str().unwrap();
            assert!(gen == m0 || gen == mf, "{side} generator {gen} is neither M0 nor Mf");
            assert!(s["seed"].as_u64().is_some());
            assert!(s["score"].as_f64().unwrap().is_finite());
        }
        assert!(p["chosen"]["score"].as_f64() > p["rejected"]["score"].as_f64());
        assert_eq!(p["judge"]["model"], m0.as_str(), "Mi judges in iteration 1");
        assert_eq!(p["rule"], "future-guided");
        assert!(!p["decision"].as_str().unwrap().is_empty());
        assert!(!p["prompt"].as_str().unwrap().is_empty());
    }
    if !pairs.is_empty() {
        assert_ne!(m1, m0, "DPO on at least one pair changes the weights");
    }
    assert!(tsr(&["verify"], &store).status.success());
}

#[test]
fn text_judge_on_a_random_model_is_unscored_not_a_crash() {
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("store");
    let cfg = setup(dir.path(), "self-rewarding", "text");
    let o = tsr(&["run", cfg.to_str().unwrap(), "--quiet"], &store);
    assert!(o.status.success(), "{}", text(&o));
    let v = status(&store, "self-rewarding-text");
    let summary: serde_json::Value = serde_json::from_slice(&blob(&store, &output_of(&v, "iter1/select-1", "summary"))).unwrap();
    assert_eq!(summary["prompts"], 3);
    let skipped = summary["skipped_no_scored"].as_u64().unwrap() + summary["skipped_no_gap"].as_u64().unwrap();
    assert_eq!(summary["pairs"].as_u64().unwrap() + skipped, 3);
    // Judgements are kept verbatim.
    let j = String::from_utf8(blob(&store, &output_of(&v, "iter1/judge-current", "judgements"))).unwrap();
    let first: serde_json::Value = serde_json::from_str(j.lines().next().unwrap()).unwrap();
    assert_eq!(first["texts"].as_array().unwrap().len(), 2);
}

#[test]
fn sigkill_and_resume_of_the_whole_workflow_gives_identical_digests() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = setup(dir.path(), "temporal", "logprob");
    let reference = dir.path().join("ref");
    assert!(tsr(&["run", cfg.to_str().unwrap(), "--quiet"], &reference).status.success());
    let store = dir.path().join("killed");
    let mut kills = 0;
    for delay_ms in [150u64, 300, 450, 600, 750, 900, 1100, 1300] {
        let mut child = Command::new(env!("CARGO_BIN_EXE_tsr"))
            .args(["run", cfg.to_str().unwrap(), "--quiet", "--store"])
            .arg(&store)
            .spawn()
            .unwrap();
        std::thread::sleep(std::time::Duration::from_millis(delay_ms));
        if child.try_wait().unwrap().is_none() {
            child.kill().unwrap();
            kills += 1;
        }
        child.wait().unwrap();
    }
    let o = tsr(&["run", cfg.to_str().unwrap(), "--quiet"], &store);
    assert!(o.status.success(), "{}", text(&o));
    assert!(kills >= 3, "only {kills} kills landed");
    let a = status(&reference, "temporal-logprob");
    let b = status(&store, "temporal-logprob");
    for n in a["nodes"].as_array().unwrap() {
        let name = n["node"].as_str().unwrap();
        let m = b["nodes"].as_array().unwrap().iter().find(|x| x["node"] == name).unwrap();
        assert_eq!(n["outputs"], m["outputs"], "node {name} differs after {kills} kills");
    }
}

//! The language-model workflows on a tiny random model (fast): a whole temporal iteration
//! through the CLI, the DAG shape, lineage completeness of every pair, baselines, and a
//! SIGKILL-and-resume giving identical digests.

mod common;

use common::*;

use std::path::{Path, PathBuf};
use std::process::Command;

fn setup(dir: &Path, workflow: &str, judge_mode: &str) -> PathBuf {
    let model = dir.join("tiny");
    if !model.exists() {
        tsr_model::testing::write_tiny_hf_model(&model, 5);
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

#[test]
fn temporal_iteration_on_a_tiny_model_with_complete_lineage() {
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("store");
    let cfg = setup(dir.path(), "temporal", "logprob");
    let o = tsr(&["run", cfg.to_str().unwrap(), "--quiet"], &store);
    assert!(o.status.success(), "{}", text(&o));
    let v = status(&store, "temporal-logprob");
    let nodes: Vec<&str> = v["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| n["node"].as_str().unwrap())
        .collect();
    for want in [
        "import",
        "prompts",
        "iter1/gen-current",
        "iter1/judge-current",
        "iter1/gen-anchor",
        "iter1/judge-anchor",
        "iter1/select-1",
        "iter1/ref-future",
        "iter1/dpo-future",
        "iter1/gen-future",
        "iter1/judge-future",
        "iter1/select-2",
        "iter1/ref-next",
        "iter1/dpo-next",
    ] {
        assert!(nodes.contains(&want), "missing node {want} in {nodes:?}");
    }
    // Iteration 1: Mi = M0, so generate(M0) for the anchor is the same step as generate(Mi).
    let states: Vec<&str> = v["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| n["state"].as_str().unwrap())
        .collect();
    assert!(
        states.iter().all(|s| *s == "done" || *s == "reused"),
        "{states:?}"
    );

    let m0 = output_of(&v, "import", "weights");
    let mf = output_of(&v, "iter1/dpo-future", "weights");
    let m1 = output_of(&v, "iter1/dpo-next", "weights");
    let pairs_text =
        String::from_utf8(blob(&store, &output_of(&v, "iter1/select-2", "pairs"))).unwrap();
    let pairs: Vec<serde_json::Value> = pairs_text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert!(
        !pairs.is_empty(),
        "logprob judging of distinct responses yields pairs"
    );
    for p in &pairs {
        for side in ["chosen", "rejected"] {
            let s = &p[side];
            let gen = s["generator_model"].as_str().unwrap();
            assert!(
                gen == m0 || gen == mf,
                "{side} generator {gen} is neither M0 nor Mf"
            );
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
    // Every training prompt's trail: per phase, each response with its generator and score,
    // and the selection's outcome, which names the pair exactly when the run made one.
    let all_pairs = tsr(&["export", "temporal-logprob", "pairs"], &store);
    let all_pairs = String::from_utf8_lossy(&all_pairs.stdout).to_string();
    for id in ["a", "b", "c"] {
        let o = tsr(
            &["lineage", "temporal-logprob", "prompt", id, "--json"],
            &store,
        );
        assert!(o.status.success(), "{}", text(&o));
        let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
        let phases = v["phases"].as_array().unwrap();
        assert_eq!(phases.len(), 2, "{v}");
        assert_eq!(phases[0]["phase"], "anchored");
        assert_eq!(phases[1]["phase"], "future-guided");
        let sets: Vec<&str> = phases[1]["sets"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| s["set"].as_str().unwrap())
            .collect();
        assert_eq!(sets, ["current", "future"]);
        assert_eq!(phases[1]["sets"][1]["generator_model"], mf.as_str());
        for ph in phases {
            let decision = ph["decision"].as_str().unwrap();
            assert_eq!(
                ph["sets"][0]["responses"].as_array().unwrap().len(),
                3,
                "K = 3"
            );
            match ph["pair_id"].as_str() {
                Some(pid) => {
                    assert!(decision.starts_with("pair: "), "{decision}");
                    assert!(
                        all_pairs.contains(&format!("\"pair_id\":\"{pid}\"")),
                        "{pid}"
                    );
                }
                None => assert!(decision.starts_with("no pair: "), "{decision}"),
            }
        }
        let o = tsr(&["lineage", "temporal-logprob", "prompt", id], &store);
        let t = String::from_utf8_lossy(&o.stdout);
        assert!(
            t.contains("iteration 1, phase anchored") && t.contains("seed"),
            "{t}"
        );
    }
    let o = tsr(&["lineage", "temporal-logprob", "prompt", "nope"], &store);
    assert!(
        !o.status.success() && text(&o).contains("no training prompt `nope`"),
        "{}",
        text(&o)
    );
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
    let summary: serde_json::Value =
        serde_json::from_slice(&blob(&store, &output_of(&v, "iter1/select-1", "summary"))).unwrap();
    assert_eq!(summary["prompts"], 3);
    let skipped = summary["skipped_no_scored"].as_u64().unwrap()
        + summary["skipped_no_gap"].as_u64().unwrap();
    assert_eq!(summary["pairs"].as_u64().unwrap() + skipped, 3);
    // Judgements are kept verbatim.
    let j = String::from_utf8(blob(
        &store,
        &output_of(&v, "iter1/judge-current", "judgements"),
    ))
    .unwrap();
    let first: serde_json::Value = serde_json::from_str(j.lines().next().unwrap()).unwrap();
    assert_eq!(first["texts"].as_array().unwrap().len(), 2);
    // A prompt that made no pair still has a trail: its responses, the raw judgements, and why.
    let skipped_no_scored = summary["skipped_no_scored"].as_u64().unwrap();
    let mut no_scored_seen = 0;
    for id in ["a", "b", "c"] {
        let o = tsr(&["lineage", "self-rewarding-text", "prompt", id], &store);
        assert!(o.status.success(), "{}", text(&o));
        let t = String::from_utf8_lossy(&o.stdout);
        assert!(t.contains("written judgements"), "{t}");
        if t.contains("no pair: no response has a score") {
            assert!(t.contains("score unscored"), "{t}");
            no_scored_seen += 1;
        }
    }
    assert_eq!(
        no_scored_seen, skipped_no_scored,
        "lineage explains every skip the summary counts"
    );
}

#[test]
fn sigkill_and_resume_of_the_whole_workflow_gives_identical_digests() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = setup(dir.path(), "temporal", "logprob");
    assert_kills_change_nothing(&cfg, dir.path(), "temporal-logprob", 1, 3);
}

/// `commit_batches` (continuous batching) in [generate] and [judge]: 9 responses at 2 rows a
/// time go to the model 4 at a time, and 9 responses judged twice each 3 at a time (6
/// judgements per commit on 2 rows), so rows are refilled inside every commit. Those steps get
/// keys of their own (and so their own seeds, as another `batch_size` would), the plan counts
/// the longer cache, and SIGKILLs inside the steps change nothing: the commit unit is the
/// partition a resumed step computes again.
#[test]
fn continuous_batching_commits_several_batches_and_survives_kills() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = setup(dir.path(), "temporal", "text");
    let base = std::fs::read_to_string(&cfg)
        .unwrap()
        .replace("batch_size = 4", "batch_size = 2");
    let one = dir.path().join("one.toml");
    std::fs::write(&one, base.replace("temporal-text", "one")).unwrap();
    let refill = dir.path().join("refill.toml");
    std::fs::write(
        &refill,
        base.replace("temporal-text", "refill")
            .replace(
                "batch_size = 2\n[judge]",
                "batch_size = 2\ncommit_batches = 2\n[judge]",
            )
            .replace(
                "batch_size = 2\n[dpo]",
                "batch_size = 2\ncommit_batches = 3\n[dpo]",
            ),
    )
    .unwrap();
    assert!(
        std::fs::read_to_string(&refill)
            .unwrap()
            .matches("commit_batches")
            .count()
            == 2
    );
    let store = dir.path().join("store");
    let o = tsr(&["run", one.to_str().unwrap(), "--quiet"], &store);
    assert!(o.status.success(), "{}", text(&o));
    // The plan counts the refilled cache.
    let o = tsr(&["plan", refill.to_str().unwrap()], &store);
    assert!(o.status.success(), "{}", text(&o));
    assert!(
        text(&o).contains("4 responses per commit, rows refilled")
            && text(&o).contains("6 judgements per commit, rows refilled"),
        "{}",
        text(&o)
    );
    // Each commit is a unit: 9 responses, 4 (generate) and 3 (judge) per commit. (The
    // anchor's nodes reuse the current model's steps in iteration 1.)
    let (_, units) = reference_run(&refill, &dir.path().join("units"), "refill");
    assert_eq!(
        units,
        [("iter1/gen-current", 3), ("iter1/judge-current", 3)]
            .map(|(n, u)| (n.to_string(), u))
            .into(),
    );
    // A kill inside each step with units (they plan from their own reference run). The random
    // model's judgements are unscored, so no pairs train: generation and judging are the steps.
    let kills = assert_kills_change_nothing(&refill, &dir.path().join("kills"), "refill", 1, 11);
    assert!(kills >= 2, "{kills} kills");
    let o = tsr(&["run", refill.to_str().unwrap(), "--quiet"], &store);
    assert!(o.status.success(), "{}", text(&o));
    let s = tsr_state::Store::open_existing_nowait(&store).unwrap();
    let a = tsr_workflows::lineage::nodes(&s, "one").unwrap();
    let b = tsr_workflows::lineage::nodes(&s, "refill").unwrap();
    assert_eq!(a.len(), b.len());
    let mut refilled = std::collections::BTreeSet::new();
    for (node, n) in &b {
        let config: serde_json::Value = serde_json::from_str(&n.step.config).unwrap();
        let want = match n.step.kind.as_str() {
            "generate" => Some(2),
            "judge" => Some(3),
            _ => None,
        };
        match want {
            Some(c) => {
                assert_eq!(config["commit_batches"], c, "{node}: {}", n.step.config);
                assert_ne!(n.key, a[node].key, "{node}");
                refilled.insert(n.step.kind.clone());
            }
            None => assert!(config.get("commit_batches").is_none(), "{node}"),
        }
        assert!(n.is_done(), "{node}");
    }
    assert_eq!(refilled.len(), 2, "{refilled:?}");
    // The batch-at-a-time run's steps have no `commit_batches`: their keys are those of before.
    for (node, n) in &a {
        let config: serde_json::Value = serde_json::from_str(&n.step.config).unwrap();
        assert!(config.get("commit_batches").is_none(), "{node}");
    }
}

fn setup_iters(dir: &Path, workflow: &str, iterations: u32, anchor: &str) -> PathBuf {
    let base = setup(dir, workflow, "logprob");
    let text = std::fs::read_to_string(&base).unwrap();
    let name = format!("{workflow}-{iterations}-{anchor}");
    let text = text
        .replace(
            &format!("name = \"{workflow}-logprob\""),
            &format!("name = \"{name}\""),
        )
        .replace(
            "iterations = 1",
            &format!("iterations = {iterations}\nanchor = \"{anchor}\""),
        );
    let p = dir.join(format!("{name}.toml"));
    std::fs::write(&p, text).unwrap();
    p
}

#[test]
fn two_iterations_reuse_m0_samples_and_lineage_walks_back_to_m0() {
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("store");
    let cfg = setup_iters(dir.path(), "temporal", 2, "initial");
    let o = tsr(&["run", cfg.to_str().unwrap(), "--quiet"], &store);
    assert!(o.status.success(), "{}", text(&o));
    let run = "temporal-2-initial";
    let v = status(&store, run);
    let state = |node: &str| {
        v["nodes"]
            .as_array()
            .unwrap()
            .iter()
            .find(|n| n["node"] == node)
            .unwrap()["state"]
            .as_str()
            .unwrap()
            .to_string()
    };
    // M0's samples are generated once: iteration 2's anchor generation is reused.
    assert_eq!(state("iter2/gen-anchor"), "reused");
    // ... but judged again by the new current model M1.
    assert_eq!(state("iter2/judge-anchor"), "done");
    let m0 = output_of(&v, "import", "weights");
    let m1 = output_of(&v, "iter1/dpo-next", "weights");
    let m2 = output_of(&v, "iter2/dpo-next", "weights");
    assert_eq!(output_of(&v, "iter2/gen-current", "responses").len(), 64);

    // Model lineage: M2 <- iter2/dpo-next <- M1 <- iter1/dpo-next <- M0.
    let o = tsr(&["lineage", run, "model", &m2[..16], "--json"], &store);
    assert!(o.status.success(), "{}", text(&o));
    let chain: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let models: Vec<&str> = chain
        .as_array()
        .unwrap()
        .iter()
        .map(|h| h["model"].as_str().unwrap())
        .collect();
    assert_eq!(models, vec![m2.as_str(), m1.as_str(), m0.as_str()]);
    assert_eq!(
        chain[0]["reference_model"],
        m1.as_str(),
        "reference = Mi by default"
    );

    // Every exported pair is traceable: prompt, both generators, judge, the DPO step, its model.
    let o = tsr(&["export", run, "pairs"], &store);
    assert!(o.status.success(), "{}", text(&o));
    let pairs: Vec<serde_json::Value> = String::from_utf8(o.stdout)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert!(!pairs.is_empty());
    for p in &pairs {
        // TRL's conversational format by default: messages, the raw prompt kept beside them.
        assert_eq!(p["prompt"][0]["role"], "user", "TRL fields");
        assert_eq!(p["prompt"][0]["content"], p["prompt_text"]);
        assert_eq!(p["chosen"][0]["role"], "assistant");
        assert_eq!(p["chosen"][0]["content"], p["chosen_lineage"]["text"]);
        assert_eq!(p["rejected"][0]["content"], p["rejected_lineage"]["text"]);
        for side in ["chosen_lineage", "rejected_lineage"] {
            assert_eq!(p[side]["generator_model"].as_str().unwrap().len(), 64);
        }
        assert_eq!(p["judge"]["model"].as_str().unwrap().len(), 64);
        assert!(
            p["dpo_step"].is_string(),
            "pair {} has no consumer",
            p["pair_id"]
        );
        assert!(p["produced_model"].is_string());
        let o = tsr(
            &["lineage", run, "pair", p["pair_id"].as_str().unwrap()],
            &store,
        );
        assert!(o.status.success(), "{}", text(&o));
        assert!(text(&o).contains("trained by"), "{}", text(&o));
    }
    // The standard format: the chat template applied to the prompt, the end-of-turn token
    // after each response.
    let o = tsr(&["export", run, "pairs", "--format", "standard"], &store);
    assert!(o.status.success(), "{}", text(&o));
    let first: serde_json::Value =
        serde_json::from_str(String::from_utf8(o.stdout).unwrap().lines().next().unwrap()).unwrap();
    let prompt = first["prompt"].as_str().unwrap();
    assert!(
        prompt.starts_with("<|im_start|>system\n") && prompt.ends_with("<|im_start|>assistant\n"),
        "{prompt}"
    );
    assert!(first["chosen"].as_str().unwrap().ends_with("<|im_end|>"));
    let o = tsr(&["export", run, "pairs", "--format", "alpaca"], &store);
    assert!(text(&o).contains("use `conversational`"), "{}", text(&o));
    // A reader that goes away (`| head -1`) stops the export quietly.
    let o = tsr_with_closed_stdout(&["export", run, "pairs"], &store);
    use std::os::unix::process::ExitStatusExt;
    assert!(
        o.status.success() || o.status.signal() == Some(libc::SIGPIPE),
        "{:?}",
        o.status
    );
    assert!(
        o.stderr.is_empty(),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    // --out writes a file whole; an existing one is replaced only with --force.
    let file = dir.path().join("pairs.jsonl");
    std::fs::write(&file, "keep").unwrap();
    let o = tsr(
        &["export", run, "pairs", "--out", file.to_str().unwrap()],
        &store,
    );
    assert!(text(&o).contains("--force"), "{}", text(&o));
    assert_eq!(std::fs::read_to_string(&file).unwrap(), "keep");
    let o = tsr(
        &[
            "export",
            run,
            "pairs",
            "--out",
            file.to_str().unwrap(),
            "--force",
        ],
        &store,
    );
    assert!(o.status.success(), "{}", text(&o));
    assert_eq!(
        std::fs::read_to_string(&file).unwrap().lines().count(),
        pairs.len()
    );
    // Iteration 2's judge is M1, not M0.
    assert!(pairs
        .iter()
        .filter(|p| p["iteration"] == 2)
        .all(|p| p["judge"]["model"] == m1.as_str()));
    let o = tsr(&["lineage", run, "pair", "nope"], &store);
    assert_eq!(o.status.code(), Some(1));

    // Report: a table row per iteration and phase, and the plots.
    let out = dir.path().join("report");
    let o = tsr(&["report", run, "--out", out.to_str().unwrap()], &store);
    assert!(o.status.success(), "{}", text(&o));
    assert_eq!(
        text(&o).lines().filter(|l| l.starts_with(run)).count(),
        4,
        "{}",
        text(&o)
    );
    for f in [
        "score_gap.png",
        "similarity.png",
        "chosen_length.png",
        "rejected_length.png",
    ] {
        assert!(std::fs::metadata(out.join(f)).unwrap().len() > 1000, "{f}");
    }
}

#[test]
fn baselines_build_their_own_dag_shapes() {
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("store");
    for (workflow, present, absent) in [
        (
            "past-only",
            vec!["iter1/gen-anchor", "iter1/select-1", "iter1/dpo-next"],
            vec!["iter1/gen-future", "iter1/select-2"],
        ),
        (
            "future-only",
            vec!["iter1/gen-future", "iter1/select-2", "iter1/dpo-future"],
            vec!["iter1/gen-anchor"],
        ),
        (
            "self-rewarding",
            vec!["iter1/select-1", "iter1/dpo-next"],
            vec!["iter1/gen-anchor", "iter1/gen-future"],
        ),
    ] {
        let cfg = setup_iters(dir.path(), workflow, 1, "initial");
        let o = tsr(&["run", cfg.to_str().unwrap(), "--quiet"], &store);
        assert!(o.status.success(), "{workflow}: {}", text(&o));
        let v = status(&store, &format!("{workflow}-1-initial"));
        let nodes: Vec<&str> = v["nodes"]
            .as_array()
            .unwrap()
            .iter()
            .map(|n| n["node"].as_str().unwrap())
            .collect();
        for n in present {
            assert!(nodes.contains(&n), "{workflow} lacks {n}");
        }
        for n in absent {
            assert!(!nodes.contains(&n), "{workflow} has {n}");
        }
    }
}

#[test]
fn bad_lm_configs_name_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = setup(dir.path(), "temporal", "logprob");
    let base = std::fs::read_to_string(&cfg).unwrap();
    for (from, to, want) in [
        ("k = 3", "k = 0", "generate.k"),
        ("lr = 1e-3", "lr = -1.0", "dpo.lr"),
        ("[dpo]", "[dpo]\nbeta = 0.0", "dpo.beta"),
        (
            "file = \"prompts.jsonl\"",
            "file = \"missing.jsonl\"",
            "prompts.file",
        ),
        (
            "source = \"tiny\"",
            "source = \"tiny-missing.gguf\"",
            "tiny-missing.gguf",
        ),
        ("mode = \"logprob\"", "mode = \"vibes\"", "mode"),
        (
            "batch_size = 4\n[judge]",
            "batch_size = 4\ncommit_batches = 0\n[judge]",
            "generate.commit_batches",
        ),
        // Logprob judging generates nothing to refill.
        (
            "mode = \"logprob\"",
            "mode = \"logprob\"\ncommit_batches = 2",
            "judge.commit_batches",
        ),
    ] {
        let p = dir.path().join("bad.toml");
        std::fs::write(&p, base.replace(from, to)).unwrap();
        let o = tsr(
            &["run", p.to_str().unwrap(), "--quiet"],
            &dir.path().join("s"),
        );
        assert_eq!(o.status.code(), Some(1), "{to}: {}", text(&o));
        assert!(
            text(&o).contains(want),
            "{to}: expected `{want}` in {}",
            text(&o)
        );
    }
    // A bad prompts line fails the prompts step with the line number, and nothing else runs.
    std::fs::write(
        dir.path().join("prompts.jsonl"),
        "{\"prompt\": \"ok\"}\n{\"prompt\": 5}\n",
    )
    .unwrap();
    let o = tsr(
        &["run", cfg.to_str().unwrap(), "--quiet"],
        &dir.path().join("s2"),
    );
    assert_eq!(o.status.code(), Some(1));
    assert!(text(&o).contains("line 2"), "{}", text(&o));
}

/// `tsr fork --set` on each enumerated config value: every name is accepted and stored as the
/// same string, and anything else is refused with a message naming the key and the choices.
#[test]
fn fork_set_takes_every_enumerated_value_and_refuses_others_by_key() {
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("store");
    let cfg = setup(dir.path(), "temporal", "logprob");
    let o = tsr(&["run", cfg.to_str().unwrap(), "--quiet"], &store);
    assert!(o.status.success(), "{}", text(&o));
    let stored = |name: &str| {
        let s = tsr_state::Store::open_existing_nowait(&store).unwrap();
        let rec = s.run(name).unwrap();
        (rec.workflow, rec.config_toml, rec.definition)
    };
    let accepted: &[(&[&str], &str, &str)] = &[
        (
            &["workflow=self-rewarding"],
            "workflow",
            "\"self-rewarding\"",
        ),
        (&["workflow=past-only"], "workflow", "\"past-only\""),
        (&["workflow=future-only"], "workflow", "\"future-only\""),
        (&["anchor=previous"], "anchor", "\"previous\""),
        (&["dpo.reference=initial"], "dpo.reference", "\"initial\""),
        (&["dpo.adapter=lora"], "dpo.adapter", "\"lora\""),
        (
            &["dpo.adapter=lora", "model.dtype=bf16"],
            "model.dtype",
            "\"bf16\"",
        ),
        (
            &["dpo.adapter=lora", "model.dtype=f16"],
            "model.dtype",
            "\"f16\"",
        ),
        (&["model.dtype=f32"], "model.dtype", "\"f32\""),
        (&["judge.mode=text"], "judge.mode", "\"text\""),
        (&["dpo.loss=ipo"], "dpo.loss", "\"ipo\""),
        (&["generate.weights=f16"], "generate.weights", "\"f16\""),
        (&["prompt_attention=fused"], "prompt_attention", "\"fused\""),
        (
            &["prompt_attention=batched"],
            "prompt_attention",
            "\"batched\"",
        ),
        (
            &["judge.mode=text", "judge.weights=bf16"],
            "judge.weights",
            "\"bf16\"",
        ),
        (
            &[
                "dpo.adapter=lora",
                "model.dtype=bf16",
                "generate.weights=bf16",
            ],
            "generate.weights",
            "\"bf16\"",
        ),
    ];
    for (k, (sets, key, value)) in accepted.iter().enumerate() {
        let name = format!("f{k}");
        let mut args = vec!["fork", "temporal-logprob", "--name", &name, "--no-run"];
        for s in *sets {
            args.extend(["--set", s]);
        }
        let o = tsr(&args, &store);
        assert!(o.status.success(), "{sets:?}: {}", text(&o));
        let (workflow, toml, def) = stored(&name);
        assert_eq!(def.get(*key).map(String::as_str), Some(*value), "{sets:?}");
        if *key == "workflow" {
            assert_eq!(format!("{workflow:?}"), *value);
        }
        let line = format!("{} = {value}", key.rsplit('.').next().unwrap());
        assert!(toml.contains(&line), "{sets:?}: `{line}` not in\n{toml}");
    }
    // Not part of the definition, but stored with the run.
    let o = tsr(
        &[
            "fork",
            "temporal-logprob",
            "--name",
            "sync",
            "--no-run",
            "--set",
            "remote_sync=checkpoint",
        ],
        &store,
    );
    assert!(o.status.success(), "{}", text(&o));
    assert!(stored("sync").1.contains("remote_sync = \"checkpoint\""));

    for (sets, want) in [
        (
            vec!["workflow=nope"],
            "unknown workflow `nope`; choose one of [\"toy\", \"temporal\"",
        ),
        (
            vec!["anchor=past"],
            "config key `anchor`: use `initial` (M0) or `previous` (Mi-1)",
        ),
        (
            vec!["dpo.reference=mine"],
            "config key `dpo.reference`: use `current` (Mi) or `initial` (M0)",
        ),
        (
            vec!["dpo.adapter=dora"],
            "config key `dpo.adapter`: `dora`: use `full` (every weight trains) or `lora`",
        ),
        (
            vec!["model.dtype=f64"],
            "config key `model.dtype`: `f64`: use `f32`, `bf16` or `f16`",
        ),
        (
            vec!["model.dtype=bf16"],
            "config key `model.dtype`: `bf16` holds the base frozen in half precision",
        ),
        (
            vec!["remote_sync=always"],
            "config key `remote_sync`: `always` is not a sync mode; use `step`, `checkpoint` or `commit`",
        ),
        (
            vec!["judge.mode=vibes"],
            "config key `judge.mode`: `vibes`: use `text`",
        ),
        (
            vec!["dpo.loss=hinge"],
            "config key `dpo.loss`: `hinge`: use `sigmoid` (DPO) or `ipo` (IPO)",
        ),
        (
            vec!["prompt_attention=flash"],
            "config key `prompt_attention`: `flash`: use `fused` (tsr's causal kernel for a prompt's attention, a new run's default) or `batched`",
        ),
        (
            vec!["generate.weights=f8"],
            "config key `generate.weights`: `f8`: use `f32`, `bf16` or `f16`",
        ),
        (
            vec!["judge.weights=half"],
            "config key `judge.weights`: `half`: use `f32`, `bf16` or `f16`",
        ),
        (
            vec![
                "dpo.adapter=lora",
                "model.dtype=bf16",
                "judge.mode=text",
                "judge.weights=f16",
            ],
            "config key `judge.weights`: `f16` differs from `[model] dtype = \"bf16\"`",
        ),
        (
            vec!["judge.weights=f16"],
            "config key `judge.weights`: applies to `mode = \"text\"`",
        ),
    ] {
        let mut args = vec!["fork", "temporal-logprob", "--name", "bad", "--no-run"];
        for s in &sets {
            args.extend(["--set", s]);
        }
        let o = tsr(&args, &store);
        assert_eq!(o.status.code(), Some(1), "{sets:?}: {}", text(&o));
        assert!(text(&o).contains(want), "{sets:?}: expected `{want}` in {}", text(&o));
    }
    let s = tsr_state::Store::open_existing_nowait(&store).unwrap();
    assert!(
        s.get_run("bad").unwrap().is_none(),
        "a refused fork was recorded"
    );
}

/// Runs the tiny temporal workflow with a judge in `judge_mode` (`temporal-text` or
/// `temporal-logprob`) into `store`, then forks it as `name` with each of `sets`
/// (`key=value`), both to the end.
fn run_and_fork(dir: &Path, store: &Path, judge_mode: &str, name: &str, sets: &[&str]) {
    let cfg = setup(dir, "temporal", judge_mode);
    let o = tsr(&["run", cfg.to_str().unwrap(), "--quiet"], store);
    assert!(o.status.success(), "{}", text(&o));
    let run = format!("temporal-{judge_mode}");
    let mut args = vec!["fork", run.as_str(), "--name", name, "--quiet"];
    for set in sets {
        args.extend(["--set", set]);
    }
    let o = tsr(&args, store);
    assert!(o.status.success(), "{sets:?}: {}", text(&o));
}

/// `weights = "bf16"` in [generate] and [judge] runs the run's generation and judging with the
/// weights held in bf16: those steps get keys of their own (the setting is in their config) and
/// other samples, the run finishes, and the import is shared with the f32 run.
#[test]
fn generation_and_judging_with_half_precision_weights() {
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("store");
    run_and_fork(
        dir.path(),
        &store,
        "text",
        "half",
        &["generate.weights=bf16", "judge.weights=bf16"],
    );
    let s = tsr_state::Store::open_existing_nowait(&store).unwrap();
    let full = tsr_workflows::lineage::nodes(&s, "temporal-text").unwrap();
    let half = tsr_workflows::lineage::nodes(&s, "half").unwrap();
    let (mut seen, mut changed) = (0, 0);
    for (node, h) in &half {
        let f = &full[node];
        let config: serde_json::Value = serde_json::from_str(&h.step.config).unwrap();
        match h.step.kind.as_str() {
            "generate" | "judge" => {
                assert_eq!(config["weights"], "bf16", "{node}: {}", h.step.config);
                assert_ne!(h.key, f.key, "{node}");
                seen += 1;
                // The weights were converted: bf16 changes the tiny model's samples.
                if h.step.kind == "generate" && h.output("responses") != f.output("responses") {
                    changed += 1;
                }
            }
            "import-model" => assert_eq!(h.key, f.key, "{node}"),
            _ => assert!(config.get("weights").is_none(), "{node}"),
        }
    }
    assert!(seen >= 4, "{seen} generation and judging steps");
    assert!(
        changed > 0,
        "no generation step's responses changed with bf16 weights"
    );
    drop(s);
    // The precision the model already has changes nothing, so it changes no key either.
    let o = tsr(
        &[
            "fork",
            "temporal-text",
            "--name",
            "same",
            "--set",
            "generate.weights=f32",
            "--quiet",
        ],
        &store,
    );
    assert!(o.status.success(), "{}", text(&o));
    let s = tsr_state::Store::open_existing_nowait(&store).unwrap();
    let same = tsr_workflows::lineage::nodes(&s, "same").unwrap();
    assert_eq!(same.len(), full.len());
    for (node, n) in &same {
        assert_eq!(n.key, full[node].key, "{node}");
    }
    // The f32 run's steps have no `weights` in their config: their keys are those of before.
    for (node, f) in &full {
        let config: serde_json::Value = serde_json::from_str(&f.step.config).unwrap();
        assert!(config.get("weights").is_none(), "{node}");
    }
}

/// `prompt_attention`: a new run records `fused`, and generation and the judge (text mode, which
/// generates, and logprob mode, whose verdict logits come from the same prefill) carry it in
/// their config and key, the other steps not; the run replays identically. Forked with
/// `batched`, those steps have the keys of before the setting existed (none of its steps carries
/// it), and a logprob judge's scores move.
#[test]
fn a_new_run_records_fused_prompt_attention_in_its_generating_and_judging_steps_and_replays() {
    for mode in ["text", "logprob"] {
        let dir = tempfile::tempdir().unwrap();
        let store = dir.path().join("store");
        run_and_fork(
            dir.path(),
            &store,
            mode,
            "batched",
            &["prompt_attention=batched"],
        );
        let s = tsr_state::Store::open_existing_nowait(&store).unwrap();
        let fused = tsr_workflows::lineage::nodes(&s, &format!("temporal-{mode}")).unwrap();
        let batched = tsr_workflows::lineage::nodes(&s, "batched").unwrap();
        let (mut seen, mut judged_otherwise) = (0, 0);
        for (node, n) in &fused {
            let config: serde_json::Value = serde_json::from_str(&n.step.config).unwrap();
            match n.step.kind.as_str() {
                "generate" | "judge" => {
                    assert_eq!(config["prompt_attention"], "fused", "{mode}: {node}");
                    assert_ne!(n.key, batched[node].key, "{mode}: {node}");
                    seen += 1;
                    // The first generation's inputs are the same in both runs, so its outputs
                    // are too (the tiny model's tokens agree); the judges' scores are computed
                    // in another order.
                    if n.step.kind == "judge"
                        && n.output("judgements") != batched[node].output("judgements")
                    {
                        judged_otherwise += 1;
                    }
                }
                _ => assert!(config.get("prompt_attention").is_none(), "{mode}: {node}"),
            }
        }
        assert!(seen >= 4, "{mode}: {seen} generation and judging steps");
        for (node, b) in &batched {
            let config: serde_json::Value = serde_json::from_str(&b.step.config).unwrap();
            assert!(config.get("prompt_attention").is_none(), "{mode}: {node}");
        }
        if mode == "logprob" {
            assert!(
                judged_otherwise > 0,
                "no logprob judge's scores moved with the fused prompt attention"
            );
            // The memory plan of a new run counts the judge's cached keys and values; with
            // `batched` it does not.
            let cfg = setup(dir.path(), "temporal", mode);
            let batched_cfg = dir.path().join("batched.toml");
            let body = std::fs::read_to_string(&cfg).unwrap();
            std::fs::write(
                &batched_cfg,
                format!("prompt_attention = \"batched\"\n{body}"),
            )
            .unwrap();
            let judge = |cfg: &Path| -> (u64, String) {
                let v = plan_json(cfg, &dir.path().join("plan"));
                let n = plan_node(&v, "iter1/judge-current");
                (n["peak"].as_u64().unwrap(), n["assumes"].to_string())
            };
            let (cached, why_cached) = judge(&cfg);
            let (plain, why) = judge(&batched_cfg);
            assert!(!why.contains("keys and values cached"), "{why}");
            assert!(
                why_cached.contains("keys and values cached"),
                "{why_cached}"
            );
            assert!(cached > plain, "{cached} <= {plain}");
        }
        drop(s);
        let run = format!("temporal-{mode}");
        let o = tsr(&["replay", &run, "--iteration", "1", "--json"], &store);
        assert!(o.status.success(), "{mode}: {}", text(&o));
        let report: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
        assert_eq!(report["identical"], true, "{mode}: {report}");
        assert!(
            report["steps"].as_array().is_some_and(|s| s.len() >= 5),
            "{mode}: {report}"
        );
    }
}

#[test]
fn fixed_judge_model_and_final_model_export() {
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("store");
    tsr_model::testing::write_tiny_hf_model(&dir.path().join("judge"), 9);
    let cfg = setup(dir.path(), "self-rewarding", "logprob");
    let body = std::fs::read_to_string(&cfg)
        .unwrap()
        .replace("[judge]\n", "[judge]\nmodel = \"judge\"\n");
    std::fs::write(&cfg, body).unwrap();
    let o = tsr(&["run", cfg.to_str().unwrap(), "--quiet"], &store);
    assert!(o.status.success(), "{}", text(&o));
    assert!(text(&o).contains("final model"), "{}", text(&o));
    let v = status(&store, "self-rewarding-logprob");
    let judge = output_of(&v, "import-judge", "weights");
    assert_ne!(judge, output_of(&v, "import", "weights"));
    let o = tsr(&["export", "self-rewarding-logprob", "pairs"], &store);
    for line in String::from_utf8(o.stdout).unwrap().lines() {
        let p: serde_json::Value = serde_json::from_str(line).unwrap();
        assert_eq!(p["judge"]["model"], judge.as_str());
    }
    let out = dir.path().join("final");
    let o = tsr(
        &[
            "export",
            "self-rewarding-logprob",
            "model",
            "--out",
            out.to_str().unwrap(),
        ],
        &store,
    );
    assert!(o.status.success(), "{}", text(&o));
    let m = tsr_model::LanguageModel::load_str(out.to_str().unwrap(), "cpu").unwrap();
    assert_eq!(
        m.digest().unwrap(),
        output_of(&v, "iter1/dpo-next", "weights")
    );
}

#[test]
fn a_relative_store_path_works_from_any_directory() {
    // Regression: model files are linked into scratch folders; with a relative store path the
    // links pointed nowhere.
    let dir = tempfile::tempdir().unwrap();
    let cfg = setup(dir.path(), "self-rewarding", "logprob");
    let o = Command::new(env!("CARGO_BIN_EXE_tsr"))
        .args([
            "run",
            cfg.file_name().unwrap().to_str().unwrap(),
            "--quiet",
            "--store",
            "relative-store",
        ])
        .current_dir(dir.path())
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", text(&o));
    // The config was named without a folder: its relative paths were stored absolute, so the
    // run reads and resumes from anywhere.
    let store = dir.path().join("relative-store");
    let elsewhere = tempfile::tempdir().unwrap();
    for args in [
        vec!["status", "self-rewarding-logprob"],
        vec!["resume", "self-rewarding-logprob", "--quiet"],
        vec!["replay", "self-rewarding-logprob", "--iteration", "1"],
    ] {
        let o = Command::new(env!("CARGO_BIN_EXE_tsr"))
            .args(&args)
            .arg("--store")
            .arg(&store)
            .current_dir(elsewhere.path())
            .output()
            .unwrap();
        assert!(o.status.success(), "{args:?}: {}", text(&o));
    }
}

#[test]
fn a_tokenizer_without_chat_template_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = setup(dir.path(), "self-rewarding", "logprob");
    let tc = dir.path().join("tiny").join("tokenizer_config.json");
    let mut v: serde_json::Value = serde_json::from_slice(&std::fs::read(&tc).unwrap()).unwrap();
    v.as_object_mut().unwrap().remove("chat_template");
    std::fs::write(&tc, serde_json::to_vec(&v).unwrap()).unwrap();
    let o = tsr(
        &["run", cfg.to_str().unwrap(), "--quiet"],
        &dir.path().join("s"),
    );
    assert_eq!(o.status.code(), Some(1));
    let t = text(&o);
    assert!(
        t.contains("chat_template") && t.contains("tokenizer_config.json"),
        "{t}"
    );
}

#[test]
fn a_moved_checkout_continues_its_run_and_an_edited_prompts_file_is_caught() {
    let dir = tempfile::tempdir().unwrap();
    let a = dir.path().join("a");
    std::fs::create_dir_all(&a).unwrap();
    let cfg = setup(&a, "self-rewarding", "logprob");
    let store = dir.path().join("store");
    assert!(tsr(&["run", cfg.to_str().unwrap(), "--quiet"], &store)
        .status
        .success());
    // Move the whole folder: paths change, contents do not.
    let b = dir.path().join("b");
    std::fs::rename(&a, &b).unwrap();
    let cfg_b = b.join(cfg.file_name().unwrap());
    let o = tsr(&["run", cfg_b.to_str().unwrap(), "--quiet"], &store);
    assert!(o.status.success(), "{}", text(&o));
    assert!(text(&o).contains("0 steps executed"), "{}", text(&o));
    // Edit the prompts: refused, naming the prompts node.
    std::fs::write(
        b.join("prompts.jsonl"),
        "{\"id\": \"z\", \"prompt\": \"something else\"}\n",
    )
    .unwrap();
    let o = tsr(&["run", cfg_b.to_str().unwrap(), "--quiet"], &store);
    assert_eq!(o.status.code(), Some(1));
    assert!(text(&o).contains("prompts"), "{}", text(&o));
}

/// A run whose model is a hub id (`Org/Name`, read from the local hub cache): `tsr status`
/// still shows it on a machine whose cache lacks the model (a laptop reading a cluster's store),
/// and running it again there is refused naming the id and where it was looked up.
#[test]
fn a_hub_id_run_shows_its_status_where_the_hub_cache_lacks_the_model() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = setup(dir.path(), "self-rewarding", "logprob");
    let hub = dir.path().join("hub");
    let repo = hub.join("models--Org--Tiny");
    std::fs::create_dir_all(repo.join("refs")).unwrap();
    std::fs::create_dir_all(repo.join("snapshots")).unwrap();
    std::fs::rename(dir.path().join("tiny"), repo.join("snapshots/r1")).unwrap();
    std::fs::write(repo.join("refs/main"), "r1\n").unwrap();
    let text_cfg = std::fs::read_to_string(&cfg)
        .unwrap()
        .replace("source = \"tiny\"", "source = \"Org/Tiny\"");
    std::fs::write(&cfg, text_cfg).unwrap();
    let store = dir.path().join("store");
    let with_hub = |args: &[&str], hub: &Path| {
        Command::new(env!("CARGO_BIN_EXE_tsr"))
            .args(args)
            .arg("--store")
            .arg(&store)
            .env("HF_HUB_CACHE", hub)
            .output()
            .unwrap()
    };
    let o = with_hub(&["run", cfg.to_str().unwrap(), "--quiet"], &hub);
    assert!(o.status.success(), "{}", text(&o));
    let elsewhere = dir.path().join("empty-hub");
    std::fs::create_dir_all(&elsewhere).unwrap();
    let o = with_hub(&["status", "self-rewarding-logprob", "--json"], &elsewhere);
    assert!(o.status.success(), "{}", text(&o));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let nodes = v["nodes"].as_array().unwrap();
    assert!(nodes.len() > 4, "{v}");
    assert!(
        nodes
            .iter()
            .all(|n| ["done", "reused"].contains(&n["state"].as_str().unwrap_or("?"))),
        "{v}"
    );
    let o = with_hub(&["run", cfg.to_str().unwrap(), "--quiet"], &elsewhere);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    assert!(
        text(&o).contains("Org/Tiny") && text(&o).contains("models--Org--Tiny"),
        "{}",
        text(&o)
    );
}

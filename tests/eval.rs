//! Evaluation on a tiny random model: the `[eval]` section of a workflow, `tsr eval`, the
//! exported AlpacaEval files, lineage of every judgement, SIGKILL-and-resume, and bad inputs
//! refused before anything runs.

mod common;

use common::*;

use std::path::{Path, PathBuf};

const TRAIN: &str = "{\"id\": \"a\", \"prompt\": \"hello there\"}\n{\"id\": \"b\", \"prompt\": \"name a colour\"}\n{\"id\": \"c\", \"prompt\": \"count to three\"}\n";
const HELD_OUT: &str = "{\"id\": \"e1\", \"prompt\": \"what is two plus two?\", \"answer\": 4}\n{\"id\": \"e2\", \"prompt\": \"name an animal\"}\n{\"id\": \"e3\", \"prompt\": \"say something kind\"}\n{\"id\": \"e4\", \"prompt\": \"how many legs has a cat?\", \"answer\": \"4\"}\n";

fn setup(dir: &Path, name: &str, workflow: &str, eval: &str) -> PathBuf {
    let model = dir.join("tiny");
    if !model.exists() {
        tsr_model::testing::write_tiny_hf_model(&model, 5);
    }
    std::fs::write(dir.join("prompts.jsonl"), TRAIN).unwrap();
    std::fs::write(dir.join("held-out.jsonl"), HELD_OUT).unwrap();
    let cfg = dir.join(format!("{name}.toml"));
    // The tests need an iteration that changes every held-out answer of M0 (none identical, so
    // each is judged): lr 3e-2 does for this tiny model; 1e-2 left some answers unchanged once
    // generation's kernels changed the sampled pairs' bits.
    std::fs::write(
        &cfg,
        format!(
            "name = \"{name}\"\nworkflow = \"{workflow}\"\niterations = 1\n\
             [model]\nsource = \"tiny\"\n[prompts]\nfile = \"prompts.jsonl\"\n\
             [generate]\nk = 3\nmax_new_tokens = 6\nbatch_size = 4\n\
             [judge]\nmode = \"logprob\"\nbatch_size = 4\n\
             [dpo]\nlr = 3e-2\nmicro_batch = 1\naccum_steps = 2\ncheckpoint_every = 1\n\
             [eval]\n{}max_new_tokens = 8\nbatch_size = 3\n{eval}",
            if eval.contains("prompts = ") {
                ""
            } else {
                "prompts = \"held-out.jsonl\"\n"
            }
        ),
    )
    .unwrap();
    cfg
}

fn summary(store: &Path, run: &str, node: &str) -> serde_json::Value {
    let v = status(store, run);
    serde_json::from_slice(&blob(store, &output_of(&v, node, "summary"))).unwrap()
}

fn node_states(store: &Path, run: &str) -> Vec<(String, String)> {
    status(store, run)["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| {
            (
                n["node"].as_str().unwrap().to_string(),
                n["state"].as_str().unwrap().to_string(),
            )
        })
        .collect()
}

fn read_json(path: &Path) -> serde_json::Value {
    serde_json::from_slice(
        &std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display())),
    )
    .unwrap()
}

#[test]
fn a_temporal_run_evaluates_its_models_and_exports_alpaca_eval_files() {
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("store");
    let cfg = setup(
        dir.path(),
        "t",
        "temporal",
        "future = true\n[eval.judge]\nmode = \"logprob\"\n",
    );
    let o = tsr(&["run", cfg.to_str().unwrap(), "--quiet"], &store);
    assert!(o.status.success(), "{}", text(&o));
    let states = node_states(&store, "t");
    let names: Vec<&str> = states.iter().map(|s| s.0.as_str()).collect();
    for want in [
        "eval-prompts",
        "eval-baseline",
        "eval/m0-answer",
        "eval/m0-judge",
        "iter1/eval-answer",
        "iter1/eval-judge",
        "iter1/eval-future-answer",
        "iter1/eval-future-judge",
    ] {
        assert!(names.contains(&want), "missing {want} in {names:?}");
    }
    // M0's answers are the baseline's: one step, generated once.
    let v = status(&store, "t");
    assert_eq!(
        output_of(&v, "eval-baseline", "outputs"),
        output_of(&v, "eval/m0-answer", "outputs")
    );
    let m0 = summary(&store, "t", "eval/m0-judge");
    assert_eq!(
        m0["identical"], 4,
        "M0 against itself: every output identical, a tie"
    );
    assert_eq!(m0["win_rate"]["win_rate"], 50.0);
    assert_eq!(m0["verdicts"], 0, "identical outputs are not judged");
    let m1 = summary(&store, "t", "iter1/eval-judge");
    assert_eq!(m1["prompts"], 4);
    assert_eq!(m1["verdicts"], 8, "both orders of 4 prompts: {m1}");
    assert_eq!(m1["mode"], "logprob");
    assert_eq!(m1["exact_match"]["total"], 2, "two prompts have answers");

    // The export: AlpacaEval's files, and the win rate alpaca_eval computes from them (its
    // get_winrate, as tsr_steps::rules::eval_metrics::win_rate reproduces it; tested against the
    // real package in steps/tests/eval_metrics.rs) equals the reported one.
    let out = dir.path().join("eval-export");
    let o = tsr(
        &["export", "t", "eval", "--out", out.to_str().unwrap()],
        &store,
    );
    assert!(o.status.success(), "{}", text(&o));
    let summary_file = read_json(&out.join("summary.json"));
    let labels: Vec<&str> = summary_file
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["model"].as_str().unwrap())
        .collect();
    assert_eq!(labels, ["M0", "Mf1", "M1"]);
    let baseline = read_json(&out.join("baseline_outputs.json"));
    assert_eq!(baseline.as_array().unwrap().len(), 4);
    for (label, node) in [
        ("M0", "eval/m0-judge"),
        ("Mf1", "iter1/eval-future-judge"),
        ("M1", "iter1/eval-judge"),
    ] {
        let outputs = read_json(&out.join(label).join("model_outputs.json"));
        let ann = read_json(&out.join(label).join("annotations.json"));
        let outputs = outputs.as_array().unwrap();
        let ann = ann.as_array().unwrap();
        assert_eq!((outputs.len(), ann.len()), (4, 4));
        let s = summary(&store, "t", node);
        let gen = &s["generator_2"].as_str().unwrap()[..12];
        for (o, a) in outputs.iter().zip(ann) {
            assert_eq!(o["generator"], gen);
            assert_eq!(a["generator_2"], gen);
            assert_eq!(o["instruction"], a["instruction"]);
            assert_eq!(o["output"], a["output_2"]);
            for k in [
                "output_1",
                "generator_1",
                "preference",
                "annotator",
                "raw_completion",
            ] {
                assert!(a.get(k).is_some(), "{label}: annotation lacks {k}");
            }
        }
        let prefs: Vec<f64> = ann
            .iter()
            .map(|a| a["preference"].as_f64().unwrap_or(f64::NAN))
            .collect();
        let w = tsr_steps::rules::eval_metrics::win_rate(&prefs).unwrap();
        assert_eq!(serde_json::to_value(&w).unwrap(), s["win_rate"], "{label}");
        // The file reads back as tsr's annotations (digests as the 64 hex digits tsr stores).
        let back: Vec<tsr_steps::records::Annotation> =
            serde_json::from_value(serde_json::Value::Array(ann.clone())).unwrap_or_else(|e| {
                panic!("{label}: the exported annotations do not read back: {e}")
            });
        assert_eq!(
            back[0].judge_model.to_hex(),
            ann[0]["judge_model"].as_str().unwrap()
        );
        assert!(
            ann.iter().all(|a| a.get("api").is_none()),
            "{label}: a local judge's annotation has no API answer"
        );
    }
    // An existing export is replaced only with --force, and never a folder of other files.
    let o = tsr(
        &["export", "t", "eval", "--out", out.to_str().unwrap()],
        &store,
    );
    assert!(
        !o.status.success() && text(&o).contains("--force"),
        "{}",
        text(&o)
    );
    let o = tsr(
        &[
            "export",
            "t",
            "eval",
            "--out",
            out.to_str().unwrap(),
            "--force",
        ],
        &store,
    );
    assert!(o.status.success(), "{}", text(&o));
    let other = dir.path().join("other");
    std::fs::create_dir_all(&other).unwrap();
    std::fs::write(other.join("notes.txt"), "mine").unwrap();
    let o = tsr(
        &[
            "export",
            "t",
            "eval",
            "--out",
            other.to_str().unwrap(),
            "--force",
        ],
        &store,
    );
    assert!(
        !o.status.success() && text(&o).contains("notes.txt"),
        "{}",
        text(&o)
    );
    assert_eq!(
        std::fs::read_to_string(other.join("notes.txt")).unwrap(),
        "mine"
    );

    // Lineage of one judgement: both outputs, their generators, the judge, both orders.
    let o = tsr(&["lineage", "t", "eval", "e1"], &store);
    assert!(o.status.success(), "{}", text(&o));
    let t = String::from_utf8_lossy(&o.stdout);
    for want in [
        "what is two plus two?",
        "known answer: 4",
        "M1 (node iter1/eval-judge)",
        "baseline as A",
        "model as A",
        "P(A)",
        "exact match",
    ] {
        assert!(t.contains(want), "lineage lacks {want:?}:\n{t}");
    }
    let o = tsr(&["lineage", "t", "eval", "e1", "--json"], &store);
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v.as_array().unwrap().len(), 3);
    assert_eq!(v[2]["annotation"]["verdicts"].as_array().unwrap().len(), 2);
    let o = tsr(&["lineage", "t", "eval", "nope"], &store);
    assert!(
        !o.status.success() && text(&o).contains("no evaluation of prompt `nope`"),
        "{}",
        text(&o)
    );

    // The report: a table row per evaluated model and the win-rate plots.
    let rep = dir.path().join("report");
    let o = tsr(&["report", "t", "--out", rep.to_str().unwrap()], &store);
    assert!(o.status.success(), "{}", text(&o));
    let t = String::from_utf8_lossy(&o.stdout);
    assert!(
        t.contains("95% CI") && t.contains(" Mf1 ") && t.contains(" M1 "),
        "{t}"
    );
    // Every row of the evaluation table has as many fields as its header.
    let table: Vec<&str> = t
        .lines()
        .skip_while(|l| !l.contains("95% CI"))
        .take_while(|l| !l.starts_with("LC:"))
        .collect();
    // Under it, which length control the LC column is.
    assert!(t.contains("LC: the minimal GLM (length term only)"), "{t}");
    // (EM reads "1/2 (50%)": one field.)
    let fields = |l: &str| l.replace(" (", "(").split_whitespace().count();
    assert_eq!(table.len(), 4, "{t}");
    for row in &table[1..] {
        assert_eq!(
            fields(row),
            fields(table[0]),
            "{row:?} under {:?}",
            table[0]
        );
    }
    for f in ["win_rate.png", "lc_win_rate.png"] {
        assert!(std::fs::metadata(rep.join(f)).unwrap().len() > 1000, "{f}");
    }
    let o = tsr(
        &["report", "t", "--json", "--out", rep.to_str().unwrap()],
        &store,
    );
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v[0]["eval"].as_array().unwrap().len(), 3);
}

#[test]
fn two_workflows_in_one_store_share_the_baseline_and_unreadable_verdicts_are_counted() {
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("store");
    // Text mode: the tiny random judge never writes a `Better:` line.
    let eval = "[eval.judge]\nmode = \"text\"\nmax_new_tokens = 6\n";
    let a = setup(dir.path(), "sr", "self-rewarding", eval);
    let b = setup(dir.path(), "tp", "temporal", eval);
    for cfg in [&a, &b] {
        let o = tsr(&["run", cfg.to_str().unwrap(), "--quiet"], &store);
        assert!(o.status.success(), "{}", text(&o));
    }
    let states = node_states(&store, "tp");
    for node in ["eval-baseline", "eval/m0-answer", "eval/m0-judge"] {
        let s = &states.iter().find(|s| s.0 == node).unwrap().1;
        assert_eq!(
            s, "reused",
            "{node} of the second run should reuse the first's work"
        );
    }
    let s = summary(&store, "sr", "iter1/eval-judge");
    assert_eq!(s["mode"], "text");
    assert_eq!(s["undecided"], 4, "{s}");
    assert_eq!(s["unparsed_share"], 100.0);
    assert!(s["win_rate"].is_null(), "no verdict is guessed: {s}");
    let o = tsr(
        &[
            "report",
            "sr",
            "tp",
            "--out",
            dir.path().join("r").to_str().unwrap(),
        ],
        &store,
    );
    assert!(o.status.success(), "{}", text(&o));
    assert!(String::from_utf8_lossy(&o.stdout).contains("100.0"));
    // The report says what to change in the run's config, with the table and under --json.
    let rdir = dir.path().join("r");
    for json in [false, true] {
        let mut args = vec!["report", "sr", "--out", rdir.to_str().unwrap()];
        if json {
            args.push("--json");
        }
        let o = tsr(&args, &store);
        assert!(o.status.success(), "{}", text(&o));
        let err = String::from_utf8_lossy(&o.stderr);
        for w in [
            "prompt(s) undecided",
            "mode = \"logprob\" under [eval.judge]",
            "model = \"...\" under [eval.judge]",
        ] {
            assert!(err.contains(w), "json={json}: {w:?} not in: {err}");
        }
    }
}

#[test]
fn tsr_eval_compares_a_model_with_a_baseline_or_reference_outputs() {
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("store");
    tsr_model::testing::write_tiny_hf_model(&dir.path().join("a"), 5);
    tsr_model::testing::write_tiny_hf_model(&dir.path().join("b"), 6);
    let prompts = dir.path().join("p.jsonl");
    std::fs::write(&prompts, HELD_OUT).unwrap();
    let args = |extra: &[&str]| -> Vec<String> {
        let mut v: Vec<String> = [
            "eval",
            "--model",
            dir.path().join("a").to_str().unwrap(),
            "--prompts",
            prompts.to_str().unwrap(),
            "--max-new-tokens",
            "6",
            "--mode",
            "logprob",
            "--quiet",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        v.extend(extra.iter().map(|s| s.to_string()));
        v
    };
    let run = |extra: &[&str]| {
        let a = args(extra);
        let a: Vec<&str> = a.iter().map(String::as_str).collect();
        tsr(&a, &store)
    };
    let b = dir.path().join("b");
    let out = dir.path().join("files");
    let o = run(&[
        "--baseline",
        b.to_str().unwrap(),
        "--json",
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", text(&o));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let name = v["run"].as_str().unwrap().to_string();
    assert!(name.starts_with("eval-"), "{name}");
    assert_eq!(v["summary"]["prompts"], 4);
    assert_eq!(v["summary"]["verdicts"], 8);
    assert!(out.join("model/annotations.json").is_file());
    // The same command continues the same run: everything is reused.
    let o = run(&["--baseline", b.to_str().unwrap(), "--json"]);
    assert!(o.status.success(), "{}", text(&o));
    assert!(!o.stdout.is_empty(), "{}", text(&o));
    let again: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(again, v);
    // A reference file in AlpacaEval's format as the baseline.
    let reference = dir.path().join("ref.json");
    let rows: Vec<serde_json::Value> = HELD_OUT
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .map(|p| serde_json::json!({"instruction": p["prompt"], "output": "4", "generator": "gpt4_turbo"}))
        .collect();
    std::fs::write(&reference, serde_json::to_vec(&rows).unwrap()).unwrap();
    let o = run(&["--reference", reference.to_str().unwrap()]);
    assert!(o.status.success(), "{}", text(&o));
    let t = String::from_utf8_lossy(&o.stdout);
    assert!(t.contains("win rate") && t.contains("baseline 2/2"), "{t}");
    // A reference file that misses a prompt is refused before anything runs, naming it.
    std::fs::write(&reference, serde_json::to_vec(&rows[..3]).unwrap()).unwrap();
    let o = run(&["--reference", reference.to_str().unwrap()]);
    assert!(!o.status.success());
    assert!(
        text(&o).contains("no output for 1 evaluation prompt(s): `e4`"),
        "{}",
        text(&o)
    );
    let o = run(&[]);
    assert!(
        !o.status.success() && text(&o).contains("--baseline"),
        "{}",
        text(&o)
    );
    // Text mode with the tiny judge: no verdict can be read. The output says so and names both
    // ways out (log-probabilities, a stronger judge); under --json on stderr, beside the JSON.
    let text_mode = |json: bool| {
        let mut a = vec![
            "eval",
            "--model",
            dir.path().join("a").to_str().unwrap().to_string().leak(),
            "--baseline",
            b.to_str().unwrap(),
            "--prompts",
            prompts.to_str().unwrap(),
            "--max-new-tokens",
            "6",
            "--mode",
            "text",
            "--quiet",
        ];
        if json {
            a.push("--json");
        }
        let o = tsr(&a, &store);
        assert!(o.status.success(), "{}", text(&o));
        o
    };
    let want = [
        "4 of 4 prompt(s) undecided",
        "(--mode logprob)",
        "a stronger judge (--judge MODEL)",
    ];
    let o = text_mode(true);
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["summary"]["undecided"], 4, "{v}");
    let err = String::from_utf8_lossy(&o.stderr);
    for w in want {
        assert!(err.contains(w), "{w:?} not on stderr: {err}");
    }
    let o = text_mode(false);
    let out = String::from_utf8_lossy(&o.stdout);
    for w in want {
        assert!(out.contains(w), "{w:?} not in: {out}");
    }
}

#[test]
fn bad_evaluation_inputs_are_refused_before_anything_runs() {
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("store");
    let refused =
        |name: &str, workflow: &str, eval: &str, files: &[(&str, &str)], want: &[&str]| {
            let cfg = setup(dir.path(), name, workflow, eval);
            for (f, body) in files {
                std::fs::write(dir.path().join(f), body).unwrap();
            }
            let o = tsr(&["run", cfg.to_str().unwrap(), "--quiet"], &store);
            assert!(!o.status.success(), "{name} ran");
            for w in want {
                assert!(text(&o).contains(w), "{name}: {w:?} not in {}", text(&o));
            }
            assert!(
                !store.join("db").exists() || {
                    let o = tsr(&["runs", "--json"], &store);
                    !String::from_utf8_lossy(&o.stdout).contains(&format!("\"{name}\""))
                },
                "{name} was recorded"
            );
        };
    refused(
        "overlap",
        "temporal",
        "prompts = \"mixed.jsonl\"\n",
        &[("mixed.jsonl", "{\"id\": \"x\", \"prompt\": \"name a colour\"}\n{\"id\": \"y\", \"prompt\": \"new one\"}\n")],
        &["eval.prompts", "1 evaluation prompt(s) are also training prompts: `x`", "allow_overlap"],
    );
    refused(
        "empty",
        "temporal",
        "prompts = \"empty.jsonl\"\n",
        &[("empty.jsonl", "\n")],
        &["eval.prompts", "has no prompts"],
    );
    refused(
        "malformed",
        "temporal",
        "prompts = \"bad.jsonl\"\n",
        &[(
            "bad.jsonl",
            "{\"prompt\": \"ok\"}\nnot json\n{\"prompt\": \"x\", \"answer\": [1]}\n",
        )],
        &["eval.prompts", "line 2", "line 3", "\"answer\" must be"],
    );
    refused(
        "template",
        "temporal",
        "[eval.judge]\ntemplate = \"t.txt\"\n",
        &[("t.txt", "Which is better, {output_a} or {output_b}?")],
        &["eval.judge.template", "{instruction}"],
    );
    refused(
        "reference",
        "temporal",
        "reference = \"r.json\"\n",
        &[(
            "r.json",
            "{\"instruction\": \"what is two plus two?\", \"output\": \"4\"}",
        )],
        &["eval.reference", "not a list", "AlpacaEval"],
    );
    refused(
        "future",
        "self-rewarding",
        "future = true\n",
        &[],
        &["eval.future", "no look-ahead model"],
    );
    refused(
        "both",
        "temporal",
        "reference = \"r.json\"\nbaseline_model = \"tiny\"\n",
        &[("r.json", "[]")],
        &["eval.reference", "not both"],
    );
    refused(
        "no-batches",
        "temporal",
        "commit_batches = 0\n",
        &[],
        &["eval.commit_batches", "at least 1"],
    );
    refused(
        "logprob-batches",
        "temporal",
        "[eval.judge]\nmode = \"logprob\"\ncommit_batches = 2\n",
        &[],
        &[
            "eval.judge.commit_batches",
            "logprob mode generates nothing",
        ],
    );
    refused(
        "api-batches",
        "temporal",
        "[eval.judge]\nkind = \"openai\"\nmodel = \"m\"\nbase_url = \"http://127.0.0.1:9/v1\"\ncommit_batches = 2\n",
        &[],
        &["eval.judge.commit_batches", "max_concurrency"],
    );
}

/// The `eval` workflow comparing tiny model `a` with baseline `b` on 16 held-out prompts,
/// sampled answers and text verdicts at 2 rows, with `eval` and `judge` added to the [eval]
/// and [eval.judge] sections; returns the config's path.
fn sixteen_prompt_eval(dir: &Path, name: &str, eval: &str, judge: &str) -> PathBuf {
    tsr_model::testing::write_tiny_hf_model(&dir.join("a"), 5);
    tsr_model::testing::write_tiny_hf_model(&dir.join("b"), 6);
    let many: String = (0..16)
        .map(|i| format!("{{\"id\": \"h{i}\", \"prompt\": \"held-out question number {i}\"}}\n"))
        .collect();
    std::fs::write(dir.join("held-out.jsonl"), &many).unwrap();
    let cfg = dir.join(format!("{name}.toml"));
    std::fs::write(
        &cfg,
        format!(
            "name = \"{name}\"\nworkflow = \"eval\"\n[model]\nsource = \"a\"\n\
             [eval]\nprompts = \"held-out.jsonl\"\nbaseline_model = \"b\"\nmax_new_tokens = 24\nbatch_size = 2\n{eval}temperature = 0.8\n\
             [eval.judge]\nmode = \"text\"\nmax_new_tokens = 24\nbatch_size = 2\n{judge}temperature = 0.7\n"
        ),
    )
    .unwrap();
    cfg
}

#[test]
fn an_evaluation_killed_at_random_moments_resumes_to_identical_results() {
    // The `eval` workflow (what `tsr eval` runs): every kill lands in an evaluation step.
    let dir = tempfile::tempdir().unwrap();
    let cfg = sixteen_prompt_eval(dir.path(), "k", "", "");
    let kills = assert_kills_change_nothing(&cfg, dir.path(), "k", 2, 13);
    assert!(kills >= 4, "{kills}");
    let store = dir.path().join("killed");
    let s = summary(&store, "k", "eval/model-judge");
    assert_eq!(s["prompts"], 16);
    assert_eq!(s["verdicts"], 32);
}

/// `commit_batches` in [eval] and [eval.judge] (text mode): 16 answers at 2 rows go to the
/// model 6 at a time (3 commits per model, rows refilled), and 16 prompts judged in both orders
/// 2 at a time (4 verdicts on 2 rows per commit, 8 commits). The plan counts the refilled
/// cache, those steps carry the setting in their keys, and SIGKILLs inside them change nothing:
/// the commit unit is the partition a resumed step computes again.
#[test]
fn continuous_batching_in_evaluation_commits_several_batches_and_survives_kills() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = sixteen_prompt_eval(
        dir.path(),
        "c",
        "commit_batches = 3\n",
        "commit_batches = 2\n",
    );
    let o = tsr(&["plan", cfg.to_str().unwrap()], &dir.path().join("plan"));
    assert!(o.status.success(), "{}", text(&o));
    assert!(
        text(&o).contains("6 answers per commit, rows refilled")
            && text(&o).contains("4 verdicts per commit, rows refilled"),
        "{}",
        text(&o)
    );
    // A logprob judge generates nothing: its plan is one forward pass per prompt and order,
    // with no new tokens. With `prompt_attention = "batched"` that forward is the scoring
    // forward, with no KV cache; with a new run's default (fused) it is generation's prefill,
    // which caches the prompts' keys and values.
    let logprob = dir.path().join("lp.toml");
    let lp_body = std::fs::read_to_string(&cfg)
        .unwrap()
        .replace("mode = \"text\"", "mode = \"logprob\"")
        .replace("commit_batches = 2\n", "");
    std::fs::write(
        &logprob,
        format!("prompt_attention = \"batched\"\n{lp_body}"),
    )
    .unwrap();
    let logprob_fused = dir.path().join("lp-fused.toml");
    std::fs::write(&logprob_fused, &lp_body).unwrap();
    let judge_plan = |cfg: &Path| {
        let v = plan_json(cfg, &dir.path().join("plan"));
        let n = plan_node(&v, "eval/model-judge");
        (
            n["assumes"].as_str().unwrap().to_string(),
            n["parts"]["kv_cache"].as_u64().unwrap(),
        )
    };
    let (text_says, text_cache) = judge_plan(&cfg);
    let (lp_says, lp_cache) = judge_plan(&logprob);
    assert!(
        text_says.contains("24 new") && text_cache > 0,
        "{text_says}"
    );
    assert!(!lp_says.contains("new") && lp_cache == 0, "{lp_says}");
    let (fused_says, fused_cache) = judge_plan(&logprob_fused);
    assert!(
        !fused_says.contains("new")
            && fused_says.contains("keys and values cached")
            && fused_cache > 0,
        "{fused_says}"
    );
    let (v, units) = reference_run(&cfg, &dir.path().join("units"), "c");
    assert_eq!(
        units,
        [
            ("eval-baseline", 3),
            ("eval/model-answer", 3),
            ("eval/model-judge", 8)
        ]
        .map(|(n, u)| (n.to_string(), u))
        .into(),
    );
    let s = summary(&dir.path().join("units"), "c", "eval/model-judge");
    assert_eq!(
        (&s["prompts"], &s["verdicts"]),
        (&16.into(), &32.into()),
        "{s}"
    );
    for n in v["nodes"].as_array().unwrap() {
        let node = n["node"].as_str().unwrap();
        let want = match node {
            "eval-baseline" | "eval/model-answer" => Some(3),
            "eval/model-judge" => Some(2),
            _ => None,
        };
        let store = tsr_state::Store::open_existing_nowait(&dir.path().join("units")).unwrap();
        let nodes = tsr_workflows::lineage::nodes(&store, "c").unwrap();
        let config: serde_json::Value = serde_json::from_str(&nodes[node].step.config).unwrap();
        assert_eq!(
            config.get("commit_batches").and_then(|c| c.as_u64()),
            want,
            "{node}: {config}"
        );
    }
    let kills = assert_kills_change_nothing(&cfg, dir.path(), "c", 1, 17);
    assert!(kills >= 3, "{kills}");
}

#[test]
fn a_finished_run_gets_evaluated_by_the_fork_its_refusal_suggests() {
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("store");
    let cfg = setup(
        dir.path(),
        "late",
        "self-rewarding",
        "[eval.judge]\nmode = \"logprob\"\n",
    );
    let with_eval = std::fs::read_to_string(&cfg).unwrap();
    let without = &with_eval[..with_eval.find("[eval]").unwrap()];
    std::fs::write(&cfg, without).unwrap();
    let o = tsr(&["run", cfg.to_str().unwrap(), "--quiet"], &store);
    assert!(o.status.success(), "{}", text(&o));
    std::fs::write(&cfg, &with_eval).unwrap();
    let o = tsr(&["run", cfg.to_str().unwrap(), "--quiet"], &store);
    assert!(!o.status.success());
    let msg = text(&o);
    let fork = msg[msg.find("tsr fork").unwrap_or_else(|| panic!("{msg}"))..]
        .trim()
        .to_string();
    assert!(
        fork.contains("--set 'eval.prompts="),
        "the suggested fork names the prompts file: {fork}"
    );
    // Run the suggestion as a shell would.
    let fork = fork.replace("NEW", "late-eval");
    let o = std::process::Command::new("sh")
        .arg("-c")
        .arg(format!(
            "{} {} --store '{}' --quiet",
            env!("CARGO_BIN_EXE_tsr"),
            fork.strip_prefix("tsr ").unwrap(),
            store.display()
        ))
        .current_dir(dir.path())
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", text(&o));
    let states = node_states(&store, "late-eval");
    for (node, state) in &states {
        if node.contains("eval") {
            assert!(state == "done" || state == "reused", "{node}: {state}");
        } else {
            assert_eq!(state, "reused", "{node}: training is reused");
        }
    }
    assert_eq!(
        summary(&store, "late-eval", "iter1/eval-judge")["prompts"],
        4
    );
    // Dropping a file setting cannot be forked (a fork keeps the recorded settings): the
    // refusal says to use another name instead of suggesting a fork that changes nothing.
    std::fs::write(
        &cfg,
        without.replace("name = \"late\"", "name = \"late-eval\""),
    )
    .unwrap();
    let o = tsr(&["run", cfg.to_str().unwrap(), "--quiet"], &store);
    assert!(!o.status.success());
    let msg = text(&o);
    assert!(
        msg.contains("cannot drop `eval.prompts`")
            && msg.contains("another name")
            && !msg.contains("tsr fork"),
        "{msg}"
    );
}

/// AlpacaEval 2.0's order of the two outputs, and the Python generator behind it, equal
/// CPython's on every instruction of the fixture (written by `scripts/py_random_golden.py`:
/// handwritten ones with non-ASCII text, control characters and a 10,000-character one, and
/// 400 generated from a mixed alphabet).
#[test]
fn alpaca_eval_output_order_is_pythons() {
    use tsr_steps::rules::py_random::{alpaca_eval_switched, PyRandom};
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/eval/py-random.json");
    let doc = read_json(&path);
    let rows = doc["rows"].as_array().unwrap();
    assert!(rows.len() > 400, "{}", rows.len());
    let mut switched = 0;
    for r in rows {
        let s = r["instruction"].as_str().unwrap();
        let mut g = PyRandom::from_str_seed(s);
        let u32s: Vec<u64> = (0..3).map(|_| g.next_u32() as u64).collect();
        let want: Vec<u64> = r["u32"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap())
            .collect();
        assert_eq!(u32s, want, "draws for {s:?}");
        assert_eq!(
            PyRandom::from_str_seed(s).random(),
            r["random"].as_f64().unwrap(),
            "random() for {s:?}"
        );
        let sw = alpaca_eval_switched(s);
        assert_eq!(sw, r["switched"].as_bool().unwrap(), "switch for {s:?}");
        switched += sw as usize;
    }
    // Both orders occur (a constant answer would be no reproduction at all).
    assert!(switched > 100 && switched < rows.len() - 100, "{switched}");
}

/// The pure parts of AlpacaEval 2.0's default annotator equal alpaca_eval 0.6.6's own
/// functions (fixture by `scripts/alpaca_annotator_golden.py`): the filled prompt and its chat
/// messages for templates and values with JSON braces, `system name=` blocks, a value holding a
/// later placeholder's name, non-ASCII text and an `<|im_end|>`; and the soft preference from
/// top log-probabilities, undecided when neither `m` nor `M` is among them.
#[test]
fn alpaca_eval_prompts_messages_and_preferences_are_alpaca_evals() {
    use tsr_steps::rules::alpaca_annotator::{fill_template, soft_preference, to_chat_messages};
    let path =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/eval/alpaca-annotator.json");
    let doc = read_json(&path);
    let fills = doc["fills"].as_array().unwrap();
    assert!(fills.len() >= 15);
    for f in fills {
        let t = f["template"].as_str().unwrap();
        let values: Vec<(&str, &str)> = f["values"]
            .as_object()
            .unwrap()
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str().unwrap()))
            .collect();
        let prompt = fill_template(t, &values).unwrap();
        assert_eq!(
            prompt,
            f["prompt"].as_str().unwrap(),
            "{t:?} with {values:?}"
        );
        let messages = serde_json::to_value(to_chat_messages(&prompt).unwrap()).unwrap();
        assert_eq!(messages, f["messages"], "{prompt:?}");
    }
    let prefs = doc["preferences"].as_array().unwrap();
    let mut undecided = 0;
    for p in prefs {
        let top: Vec<(String, f64)> = p["top"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| (e[0].as_str().unwrap().to_string(), e[1].as_f64().unwrap()))
            .collect();
        let got = soft_preference(&top);
        match p["preference"].as_f64() {
            None => {
                assert_eq!(got, None, "{top:?}");
                undecided += 1;
            }
            Some(want) => {
                let got = got.unwrap_or_else(|| panic!("{top:?}: undecided"));
                assert!((got - want).abs() < 1e-12, "{top:?}: {got} vs {want}");
            }
        }
    }
    assert_eq!(undecided, 1);
}

/// A new run's `prompt_attention = "fused"` reaches evaluation too: the answers and a local
/// judge in logprob mode (whose verdict logits then come from generation's prefill) carry it in
/// their config and key, as the run's generation and judging do. Forked with `batched`, those
/// steps get other keys, the other steps keep theirs, and the judge's verdicts are computed in
/// another order.
#[test]
fn fused_prompt_attention_reaches_the_answers_and_a_logprob_eval_judge() {
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("store");
    let cfg = setup(
        dir.path(),
        "t",
        "self-rewarding",
        "[eval.judge]\nmode = \"logprob\"\n",
    );
    let o = tsr(&["run", cfg.to_str().unwrap(), "--quiet"], &store);
    assert!(o.status.success(), "{}", text(&o));
    let o = tsr(
        &[
            "fork",
            "t",
            "--name",
            "b",
            "--set",
            "prompt_attention=batched",
            "--quiet",
        ],
        &store,
    );
    assert!(o.status.success(), "{}", text(&o));
    let s = tsr_state::Store::open_existing_nowait(&store).unwrap();
    let fused = tsr_workflows::lineage::nodes(&s, "t").unwrap();
    let batched = tsr_workflows::lineage::nodes(&s, "b").unwrap();
    let mut seen = std::collections::BTreeSet::new();
    let mut verdicts_moved = 0;
    for (node, n) in &fused {
        let config: serde_json::Value = serde_json::from_str(&n.step.config).unwrap();
        let b: serde_json::Value = serde_json::from_str(&batched[node].step.config).unwrap();
        assert!(b.get("prompt_attention").is_none(), "{node}");
        match n.step.kind.as_str() {
            kind @ ("generate" | "judge" | "answer" | "eval-judge") => {
                assert_eq!(config["prompt_attention"], "fused", "{node}");
                assert_ne!(n.key, batched[node].key, "{node}");
                seen.insert(kind.to_string());
                if kind == "eval-judge"
                    && n.output("annotations") != batched[node].output("annotations")
                {
                    verdicts_moved += 1;
                }
            }
            _ => assert!(config.get("prompt_attention").is_none(), "{node}"),
        }
    }
    assert_eq!(
        seen.into_iter().collect::<Vec<_>>(),
        ["answer", "eval-judge", "generate", "judge"]
    );
    assert!(verdicts_moved > 0, "no evaluation verdicts moved");
}

//! The evaluation's API judge (`[eval.judge] kind = "openai"`, AlpacaEval 2.0's default
//! annotator) against a real OpenAI-compatible server on loopback: llama-cpp-python serving the
//! default model, behind a proxy of the test's own that counts what the server answered and
//! injects faults. A tiny-model Temporal iteration is evaluated on 8 held-out prompts; its M0
//! evaluation has identical outputs on both sides (nothing asked), its M1 evaluation asks once
//! per prompt.
//!
//! - SIGKILLs at answers the proxy has seen paid: no comparison is paid for again beyond the
//!   requests in flight at each kill; the annotations equal their recorded answers read as
//!   AlpacaEval reads them; replay asks nothing; the key appears nowhere tsr writes.
//! - Faults: a 429 with `Retry-After`, a 500 and a timeout are retried; an answer without
//!   log-probabilities and one that is not JSON leave their prompt undecided, saying why; a
//!   401 stops the run; a server down beyond the retries exits 75 and the next run continues;
//!   a token budget exits 3 and a higher one continues, paying nothing twice.

mod common;

use common::llama_server::LlamaServer;
use common::proxy::{Fault, Proxy};
use common::*;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

const KEY_VAR: &str = "TSR_TEST_JUDGE_KEY";
const KEY: &str = "sk-tsr-test-judge-Qm4e7Rx";

const TEMPLATE: &str = "<|im_start|>system\nYou compare two outputs for one instruction and answer with the identifier of the better one, nothing else.\n<|im_end|>\n<|im_start|>user\nInstruction: {instruction}\n\nOutput m: {output_1}\n\nOutput M: {output_2}\n\nWhich output is better? Answer with m or M only.\n<|im_end|>\n";

const HELD_OUT: &str = "{\"id\": \"e1\", \"prompt\": \"say hi\"}\n{\"id\": \"e2\", \"prompt\": \"list two fruits\"}\n{\"id\": \"e3\", \"prompt\": \"name a fish\"}\n{\"id\": \"e4\", \"prompt\": \"count to five\"}\n{\"id\": \"e5\", \"prompt\": \"what is two plus two?\"}\n{\"id\": \"e6\", \"prompt\": \"name a planet\"}\n{\"id\": \"e7\", \"prompt\": \"give a colour of the sky\"}\n{\"id\": \"e8\", \"prompt\": \"spell cat\"}\n";

/// The run in `dir`, judged through `base_url`, with `extra` lines in `[eval.judge]`.
fn setup(dir: &Path, base_url: &str, extra: &str) -> PathBuf {
    std::fs::create_dir_all(dir).unwrap();
    if !dir.join("tiny").exists() {
        tsr_model::testing::write_tiny_hf_model(&dir.join("tiny"), 5);
    }
    std::fs::write(dir.join("prompts.jsonl"), sharded::PROMPTS).unwrap();
    std::fs::write(dir.join("held-out.jsonl"), HELD_OUT).unwrap();
    std::fs::write(dir.join("judge.txt"), TEMPLATE).unwrap();
    // The test's settings, unless `extra` sets them.
    let defaults: String = [
        ("max_concurrency", "2"),
        ("timeout_s", "20"),
        ("max_retries", "3"),
    ]
    .iter()
    .filter(|(k, _)| !extra.lines().any(|l| l.starts_with(&format!("{k} "))))
    .map(|(k, v)| format!("{k} = {v}\n"))
    .collect();
    let cfg = dir.join("run.toml");
    std::fs::write(
        &cfg,
        format!(
            "name = \"x\"\nworkflow = \"temporal\"\niterations = 1\n\
             [model]\nsource = \"tiny\"\n[prompts]\nfile = \"prompts.jsonl\"\n\
             [generate]\nk = 3\nmax_new_tokens = 5\nbatch_size = 2\n\
             [judge]\nmode = \"logprob\"\nbatch_size = 2\n\
             [dpo]\nlr = 1e-3\naccum_steps = 2\n\
             [eval]\nprompts = \"held-out.jsonl\"\nmax_new_tokens = 6\nbatch_size = 4\nbootstrap_resamples = 10\n\
             [eval.judge]\nkind = \"openai\"\nbase_url = \"{base_url}\"\nmodel = \"smollm2\"\n\
             api_key_env = \"{KEY_VAR}\"\ntemplate = \"judge.txt\"\n{defaults}{extra}"
        ),
    )
    .unwrap();
    cfg
}

fn command(cfg: &Path, store: &Path) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_tsr"));
    c.args([
        "run",
        cfg.to_str().unwrap(),
        "--store",
        store.to_str().unwrap(),
    ])
    .env("RAYON_NUM_THREADS", "1")
    .env(KEY_VAR, KEY);
    c
}

fn run(cfg: &Path, store: &Path) -> Output {
    command(cfg, store).output().unwrap()
}

/// The annotations of `node`.
fn annotations(store: &Path, node: &str) -> Vec<serde_json::Value> {
    let v = status(store, "x");
    let d = output_of(&v, node, "annotations");
    String::from_utf8(blob(store, &d))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

fn summary(store: &Path, node: &str) -> serde_json::Value {
    let v = status(store, "x");
    serde_json::from_slice(&blob(store, &output_of(&v, node, "summary"))).unwrap()
}

/// Every file under `dir` (recursively).
fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut out = vec![];
    let mut todo = vec![dir.to_path_buf()];
    while let Some(d) = todo.pop() {
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            let p = e.path();
            if p.is_dir() {
                todo.push(p);
            } else {
                out.push(p);
            }
        }
    }
    out
}

/// `tsr replay x iter1/eval-judge` without the key in the environment: it must succeed and
/// find the recomputed outputs identical (it asks the server nothing).
fn replay_without_key(store: &Path) -> Output {
    let o = Command::new(env!("CARGO_BIN_EXE_tsr"))
        .args([
            "replay",
            "x",
            "iter1/eval-judge",
            "--store",
            store.to_str().unwrap(),
        ])
        .env_remove(KEY_VAR)
        .output()
        .unwrap();
    assert!(
        o.status.success() && text(&o).contains("identical"),
        "{}",
        text(&o)
    );
    o
}

/// The preference AlpacaEval's `logprob_parser` reads from an annotation's recorded top
/// log-probabilities, in the original order; `None` when neither `m` nor `M` is there.
fn alpaca_preference(api: &serde_json::Value) -> Option<f64> {
    let top = api["top_logprobs"].as_array()?;
    let lp = |t: &str| {
        top.iter()
            .filter(|e| e[0] == t)
            .filter_map(|e| e[1].as_f64())
            .next_back()
    };
    let (m, big) = (lp("m"), lp("M"));
    if m.is_none() && big.is_none() {
        return None;
    }
    let (a, b) = (
        m.unwrap_or(f64::NEG_INFINITY),
        big.unwrap_or(f64::NEG_INFINITY),
    );
    let shown = 2.0 - a.exp() / (a.exp() + b.exp());
    Some(if api["switched"] == true {
        3.0 - shown
    } else {
        shown
    })
}

#[test]
fn an_api_judge_evaluation_is_paid_once_and_agrees_with_its_recorded_answers() {
    let dir = tempfile::tempdir().unwrap();
    let dir = dir.path();
    let server = LlamaServer::start(&dir.join("server"));
    let proxy = Proxy::start(server.port);
    let cfg = setup(&dir.join("run"), &proxy.base_url(), "");
    let store = dir.join("run/store");
    // 24 held-out prompts: room for 10 kills that each let at least one answer through.
    let held_out: String = (1..=24)
        .map(|i| {
            format!(
                "{{\"id\": \"q{i}\", \"prompt\": \"question number {i}: name something {i}\"}}\n"
            )
        })
        .collect();
    std::fs::write(dir.join("run/held-out.jsonl"), held_out).unwrap();

    // SIGTERM once the server has answered a comparison: the answers in flight are committed
    // and the run exits 75 (nothing it was paid for is lost: no kill counts for it below).
    let mut child = command(&cfg, &store)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    wait_event(&mut child, "an answer paid", |c| {
        proxy.paid_total() >= 1 || c.try_wait().unwrap().is_some()
    });
    // SAFETY: a signal to the run this test started.
    unsafe {
        libc::kill(child.id() as i32, libc::SIGTERM);
    }
    let o = child.wait_with_output().unwrap();
    let mut said = text(&o);
    assert_eq!(o.status.code(), Some(75), "{said}");

    // SIGKILL at 10 moments: while a request is held in flight by the proxy (twice), and after
    // 1, 2 or 3 more answers were paid.
    let mut kills = 0;
    for (n, more) in [0u32, 1, 1, 2, 1, 3, 0, 1, 2, 1].into_iter().enumerate() {
        let mut child = command(&cfg, &store)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        if more == 0 {
            let asked = proxy.asked_total();
            proxy.push(Fault::Stall(std::time::Duration::from_secs(30)));
            wait_event(&mut child, "a request in flight", |c| {
                proxy.asked_total() > asked || c.try_wait().unwrap().is_some()
            });
            // While it runs, `tsr status` shows what the judge asked and spent so far.
            if n == 0 {
                let mut seen = String::new();
                wait_event(&mut child, "the judge's counts in tsr status", |c| {
                    seen = text(&tsr(&["status", "x"], &store));
                    seen.contains("live snapshot") && seen.contains("of 24 answers recorded")
                        || c.try_wait().unwrap().is_some()
                });
                assert!(
                    seen.contains("    judge smollm2: ")
                        && seen.contains(" request(s) (0 refused), ")
                        && seen.contains(" tokens in, "),
                    "{seen}"
                );
            }
        } else {
            let k = proxy.paid_total() + more;
            wait_event(&mut child, "answers paid", |c| {
                proxy.paid_total() >= k || c.try_wait().unwrap().is_some()
            });
        }
        if child.try_wait().unwrap().is_none() {
            child.kill().unwrap();
            kills += 1;
        }
        said.push_str(&format!("--- kill {n}\n"));
        said.push_str(&text(&child.wait_with_output().unwrap()));
    }
    assert_eq!(kills, 10, "{said}");
    let o = run(&cfg, &store);
    said.push_str(&text(&o));
    assert!(o.status.success(), "{said}");

    let m1 = annotations(&store, "iter1/eval-judge");
    assert_eq!(m1.len(), 24);
    let asked: Vec<&serde_json::Value> = m1.iter().filter(|a| a["api"]["tries"] != 0).collect();
    // At most the requests in flight at each kill (max_concurrency = 2) are paid twice.
    let paid = proxy.paid_total() as usize;
    assert!(
        paid >= asked.len() && paid <= asked.len() + kills * 2,
        "{paid} answers paid for {} comparisons and {kills} kills",
        asked.len()
    );
    // No comparison was asked again once its answer was committed: every request for a prompt
    // reached the server no later than the answer the store kept for it arrived.
    let log = proxy.log();
    for a in &m1 {
        let instruction = a["instruction"].as_str().unwrap();
        let needle = format!("Instruction: {instruction}\n");
        let sent: Vec<u64> = log
            .iter()
            .filter(|(_, body)| {
                let v: serde_json::Value = serde_json::from_str(body).unwrap();
                v["messages"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .any(|m| m["content"].as_str().unwrap().contains(&needle))
            })
            .map(|(t, _)| *t)
            .collect();
        if a["api"]["tries"] == 0 {
            assert!(sent.is_empty(), "identical outputs were asked: {a}");
            continue;
        }
        let committed = a["api"]["at_ms"].as_u64().unwrap();
        assert!(!sent.is_empty(), "{a}");
        assert!(
            sent.iter().all(|t| *t <= committed),
            "`{instruction}` was asked again after its answer was committed at {committed}: {sent:?}"
        );
    }
    // Each annotation is its recorded answer read as AlpacaEval reads it.
    let mut decided = 0;
    for a in &m1 {
        let api = &a["api"];
        assert_eq!(api["requested_model"], "smollm2", "{a}");
        if api["tries"] == 0 {
            assert_eq!(a["preference"], 1.5, "{a}");
            continue;
        }
        assert!(api["prompt_tokens"].as_u64().unwrap() > 50, "{a}");
        match alpaca_preference(api) {
            Some(p) => {
                let got = a["preference"].as_f64().unwrap();
                assert!((got - p).abs() < 1e-12, "{got} vs {p}: {a}");
                decided += 1;
            }
            None => assert!(a["preference"].is_null(), "{a}"),
        }
    }
    assert!(decided > 0, "the judge decided nothing: {m1:?}");
    let s = summary(&store, "iter1/eval-judge");
    assert_eq!(s["mode"], "weighted_alpaca_eval_gpt4_turbo", "{s}");
    assert_eq!(s["api"]["requests"], asked.len(), "{s}");
    assert!(s["win_rate"]["win_rate"].as_f64().is_some(), "{s}");
    // `tsr status` counts what the judge asked and spent, as the summary does.
    let o = tsr(&["status", "x"], &store);
    let t = text(&o);
    assert!(
        t.contains(&format!(
            "evaluation judge iter1/eval-judge: smollm2 (weighted_alpaca_eval_gpt4_turbo): 24 of 24 answers recorded, {} request(s) (0 refused), {} tokens in",
            asked.len(),
            s["api"]["prompt_tokens"]
        )),
        "{t}"
    );
    // M0 against itself: every output identical, nothing asked.
    let m0 = summary(&store, "eval/m0-judge");
    assert_eq!(m0["identical"], 24, "{m0}");

    // AlpacaEval's files name its annotator; lineage shows what answered.
    let out = dir.join("export");
    let o = tsr(
        &["export", "x", "eval", "--out", out.to_str().unwrap()],
        &store,
    );
    assert!(o.status.success(), "{}", text(&o));
    let exported: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("M1/annotations.json")).unwrap()).unwrap();
    for a in exported.as_array().unwrap() {
        assert_eq!(a["annotator"], "weighted_alpaca_eval_gpt4_turbo", "{a}");
    }
    let asked_id = asked[0]["prompt_id"].as_str().unwrap();
    let o = tsr(&["lineage", "x", "eval", asked_id], &store);
    let t = text(&o);
    assert!(
        t.contains("judge: smollm2 (") && t.contains("annotator weighted_alpaca_eval_gpt4_turbo"),
        "{t}"
    );

    // Done: running again and replaying ask nothing.
    let before = proxy.asked_total();
    let o = run(&cfg, &store);
    assert!(o.status.success(), "{}", text(&o));
    said.push_str(&text(&o));
    let o = replay_without_key(&store);
    said.push_str(&text(&o));
    assert_eq!(proxy.asked_total(), before);

    // The key went to the server and nowhere else.
    assert!(proxy
        .authorizations()
        .iter()
        .all(|a| a == &format!("Bearer {KEY}")));
    assert!(!proxy.authorizations().is_empty());
    assert!(!said.contains(KEY), "the key was printed");
    for f in files_under(&store) {
        let bytes = std::fs::read(&f).unwrap_or_default();
        assert!(
            !bytes.windows(KEY.len()).any(|w| w == KEY.as_bytes()),
            "the key is in {}",
            f.display()
        );
    }
}

/// `tsr eval` with the same judge as flags: a model against AlpacaEval-style reference outputs.
#[test]
fn tsr_eval_takes_the_api_judge_as_flags() {
    let dir = tempfile::tempdir().unwrap();
    let dir = dir.path();
    let server = LlamaServer::start(&dir.join("server"));
    let proxy = Proxy::start(server.port);
    setup(&dir.join("e"), &proxy.base_url(), "");
    let reference: Vec<serde_json::Value> = HELD_OUT
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .map(|p| serde_json::json!({"instruction": p["prompt"], "output": format!("A careful answer to: {}", p["prompt"].as_str().unwrap()), "generator": "ref"}))
        .collect();
    std::fs::write(
        dir.join("e/reference.json"),
        serde_json::to_vec(&reference).unwrap(),
    )
    .unwrap();
    // AlpacaEval 2.0's length-control folder for these 8 instructions: the instructions file
    // (the reference outputs, as AlpacaEval's alpaca_eval_gpt4_baseline.json holds GPT-4
    // Turbo's) and synthetic gamed annotations of AlpacaEval's schema.
    let lc = dir.join("e/lc");
    std::fs::create_dir_all(&lc).unwrap();
    std::fs::copy(
        dir.join("e/reference.json"),
        lc.join("alpaca_eval_gpt4_baseline.json"),
    )
    .unwrap();
    let mut gamed = String::from(
        "index,model,preference,std_delta_len,instruction_difficulty,not_gamed_baseline\n",
    );
    for (m, model) in ["verbose", "concise"].iter().enumerate() {
        for i in 0..8 {
            let sign = if m == 0 { -1.0 } else { 1.0 };
            gamed.push_str(&format!(
                "{i},{model},{},{},{},False\n",
                (0.2 + 0.08 * i as f64 + 0.1 * m as f64).min(1.0),
                sign * (0.3 + 0.1 * i as f64),
                i as f64 / 4.0 - 1.0
            ));
        }
    }
    std::fs::write(lc.join("df_gamed.csv"), gamed).unwrap();
    let eval_with = |budget: &str, extra: &[&str]| {
        let mut c = Command::new(env!("CARGO_BIN_EXE_tsr"));
        c.current_dir(dir.join("e"))
            .args(["eval", "--model", "tiny", "--reference", "reference.json"])
            // AlpacaEval's own list as the prompts, as for its 805 instructions.
            .args(["--prompts", "reference.json", "--max-new-tokens", "6"])
            .args(["--judge-url", &proxy.base_url(), "--judge", "smollm2"])
            .args([
                "--template",
                "judge.txt",
                "--api-key-env",
                KEY_VAR,
                "--json",
            ])
            .args(["--max-cost-tokens", budget, "--store", "store"])
            .args(extra)
            .env(KEY_VAR, KEY)
            .env("RAYON_NUM_THREADS", "1");
        c.output().unwrap()
    };
    let eval = |budget: &str| eval_with(budget, &[]);
    // A budget that stops it, then one that lets it finish: the same evaluation continues.
    let o = eval("1");
    assert_eq!(o.status.code(), Some(3), "{}", text(&o));
    let o = eval("10000000");
    assert!(o.status.success(), "{}", text(&o));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let s = &v["summary"];
    assert_eq!(s["mode"], "weighted_alpaca_eval_gpt4_turbo", "{v}");
    assert_eq!(s["api"]["requests"], 8, "{v}");
    assert_eq!(proxy.paid_total(), 8, "a comparison was paid twice");
    assert!(s["api"]["prompt_tokens"].as_u64().unwrap() > 8 * 50, "{v}");
    assert!(
        v["lc"].is_null(),
        "no length-control data, no AlpacaEval LC: {v}"
    );

    // Adding AlpacaEval's length-control data afterwards computes its LC from the recorded
    // annotations: nothing is asked again.
    let o = eval_with("10000000", &["--lc-data", "lc"]);
    assert!(o.status.success(), "{}", text(&o));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["lc"]["glm"], "length_controlled_v1", "{v}");
    assert_eq!(v["lc"]["gamed_rows"], 16, "{v}");
    let lc = v["lc"]["length_controlled_winrate"].as_f64().unwrap();
    assert!((0.0..=100.0).contains(&lc), "{v}");
    assert_eq!(
        proxy.paid_total(),
        8,
        "adding the LC data asked the judge again"
    );
    // The same as the library computes from the annotations and the folder.
    let o = tsr(
        &[
            "export",
            v["run"].as_str().unwrap(),
            "eval",
            "--out",
            dir.join("e/export").to_str().unwrap(),
        ],
        &dir.join("e/store"),
    );
    assert!(o.status.success(), "{}", text(&o));
    let rows: Vec<tsr_steps::records::Annotation> = serde_json::from_slice(
        &std::fs::read(dir.join("e/export/model/annotations.json")).unwrap(),
    )
    .unwrap();
    let (data, _) = tsr_steps::kinds::alpaca_lc::read_lc_data(&dir.join("e/lc")).unwrap();
    let want = tsr_steps::rules::lc_glm::length_controlled_v1(
        &data,
        &tsr_steps::kinds::alpaca_lc::lc_rows(&rows),
        false,
    )
    .unwrap();
    assert_eq!(want.length_controlled_winrate, lc);
    let summary: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("e/export/summary.json")).unwrap()).unwrap();
    assert_eq!(
        summary[0]["lc"]["length_controlled_winrate"].as_f64(),
        Some(lc)
    );
    // The report names the GLM beside the number.
    let o = tsr(
        &[
            "report",
            v["run"].as_str().unwrap(),
            "--out",
            dir.join("e/report").to_str().unwrap(),
        ],
        &dir.join("e/store"),
    );
    let t = text(&o);
    assert!(o.status.success(), "{t}");
    assert!(
        t.contains(&format!(
            "LC: AlpacaEval 2.0's length_controlled_v1 GLM, {lc:.2}%"
        )),
        "{t}"
    );

    // Refused before any work: prompts that are not the folder's instructions, and data that
    // is not AlpacaEval's.
    let o = eval_with("10000000", &["--lc-data", "lc", "--limit", "4"]);
    let t = text(&o);
    assert_eq!(o.status.code(), Some(1), "{t}");
    assert!(
        t.contains("eval.lc_data")
            && t.contains("its 8 instructions, and the evaluation has 4 prompts"),
        "{t}"
    );
    std::fs::create_dir_all(dir.join("e/not-lc")).unwrap();
    std::fs::write(dir.join("e/not-lc/df_gamed.csv"), "index,model\n0,a\n").unwrap();
    let o = eval_with("10000000", &["--lc-data", "not-lc"]);
    let t = text(&o);
    assert_eq!(o.status.code(), Some(1), "{t}");
    assert!(
        t.contains("df_gamed.csv") && t.contains("no `preference` column"),
        "{t}"
    );
    // AlpacaEval's GLM is fitted to its own annotator's annotations: a local judge is refused.
    std::fs::write(
        dir.join("e/local.toml"),
        "name = \"l\"\nworkflow = \"eval\"\n[model]\nsource = \"tiny\"\n\
         [eval]\nprompts = \"reference.json\"\nreference = \"reference.json\"\nlc_data = \"lc\"\n",
    )
    .unwrap();
    let o = tsr(
        &["run", dir.join("e/local.toml").to_str().unwrap()],
        &dir.join("e/store-local"),
    );
    let t = text(&o);
    assert_eq!(o.status.code(), Some(1), "{t}");
    assert!(
        t.contains("eval.lc_data") && t.contains("kind = \"openai\""),
        "{t}"
    );
    assert_eq!(proxy.paid_total(), 8);
}

#[test]
fn server_faults_end_with_the_same_annotations_or_a_clear_message() {
    let dir = tempfile::tempdir().unwrap();
    let dir = dir.path();
    let server = LlamaServer::start(&dir.join("server"));
    let proxy = Proxy::start(server.port);

    // Refused before anything is recorded: a missing key variable, a URL with credentials.
    let cfg = setup(&dir.join("refused"), &proxy.base_url(), "");
    let o = command(&cfg, &dir.join("refused/store"))
        .env_remove(KEY_VAR)
        .output()
        .unwrap();
    let t = text(&o);
    assert_eq!(o.status.code(), Some(1), "{t}");
    assert!(
        t.contains("eval.judge.api_key_env") && t.contains(KEY_VAR),
        "{t}"
    );
    assert!(!tsr(&["status", "x"], &dir.join("refused/store"))
        .status
        .success());
    let cfg = setup(
        &dir.join("refused-url"),
        &format!("http://user:pw@127.0.0.1:{}/v1", proxy.port),
        "",
    );
    let o = run(&cfg, &dir.join("refused-url/store"));
    let t = text(&o);
    assert_eq!(o.status.code(), Some(1), "{t}");
    assert!(t.contains("eval.judge") && t.contains("credentials"), "{t}");
    assert_eq!(proxy.asked_total(), 0);

    // A reference without faults.
    let cfg = setup(&dir.join("clean"), &proxy.base_url(), "");
    let o = run(&cfg, &dir.join("clean/store"));
    assert!(o.status.success(), "{}", text(&o));
    let want: Vec<serde_json::Value> = annotations(&dir.join("clean/store"), "iter1/eval-judge")
        .iter()
        .map(|a| a["preference"].clone())
        .collect();

    // 429 with Retry-After, a 500 and a timeout: retried, the same preferences.
    let cfg = setup(&dir.join("retried"), &proxy.base_url(), "timeout_s = 2\n");
    proxy.push(Fault::Status {
        code: 429,
        headers: vec![("Retry-After".into(), "1".into())],
        body: r#"{"error": {"message": "slow down"}}"#.into(),
    });
    proxy.push(Fault::Status {
        code: 500,
        headers: vec![],
        body: "oops".into(),
    });
    proxy.push(Fault::Stall(std::time::Duration::from_secs(4)));
    let o = run(&cfg, &dir.join("retried/store"));
    let t = text(&o);
    assert!(o.status.success(), "{t}");
    assert!(
        t.contains("the judge server:") && t.contains("trying again"),
        "{t}"
    );
    let got: Vec<serde_json::Value> = annotations(&dir.join("retried/store"), "iter1/eval-judge")
        .iter()
        .map(|a| a["preference"].clone())
        .collect();
    assert_eq!(got, want);

    // An answer without log-probabilities, and one that is not JSON: undecided, saying why.
    let cfg = setup(&dir.join("odd"), &proxy.base_url(), "max_concurrency = 1\n");
    proxy.push(Fault::NoLogprobs);
    proxy.push(Fault::Garbage);
    let o = run(&cfg, &dir.join("odd/store"));
    assert!(o.status.success(), "{}", text(&o));
    let odd = annotations(&dir.join("odd/store"), "iter1/eval-judge");
    let decisions: Vec<String> = odd
        .iter()
        .map(|a| a["decision"].as_str().unwrap().to_string())
        .collect();
    assert!(
        decisions.iter().any(|d| d.contains("no log-probabilities"))
            && decisions.iter().any(|d| d.contains("not JSON")),
        "{decisions:?}"
    );
    // (The judge itself may leave others undecided: neither `m` nor `M` in its top five.)
    let undecided = summary(&dir.join("odd/store"), "iter1/eval-judge")["undecided"]
        .as_u64()
        .unwrap();
    assert!(undecided >= 2, "{undecided}");

    // A 401: the run stops with the server's words, before asking more.
    let cfg = setup(
        &dir.join("denied"),
        &proxy.base_url(),
        "max_concurrency = 1\n",
    );
    proxy.push(Fault::Status {
        code: 401,
        headers: vec![],
        body: r#"{"error": {"message": "Incorrect API key provided"}}"#.into(),
    });
    let asked = proxy.asked_total();
    let o = run(&cfg, &dir.join("denied/store"));
    let t = text(&o);
    assert_eq!(o.status.code(), Some(1), "{t}");
    assert!(
        t.contains("401") && t.contains("Incorrect API key") && t.contains("check the key"),
        "{t}"
    );
    assert_eq!(proxy.asked_total(), asked + 1, "{t}");

    // The server down beyond the retries: exit 75, saying so; the next run continues.
    let cfg = setup(&dir.join("down"), &proxy.base_url(), "max_retries = 1\n");
    proxy.set_down(true);
    let o = run(&cfg, &dir.join("down/store"));
    let t = text(&o);
    assert_eq!(o.status.code(), Some(75), "{t}");
    assert!(t.contains("did not answer after 2 tries"), "{t}");
    proxy.set_down(false);
    let o = run(&cfg, &dir.join("down/store"));
    assert!(o.status.success(), "{}", text(&o));

    // A token budget: exit 3 with the limit named; raised, the evaluation continues and pays
    // nothing twice.
    let budget = |n: u64| format!("max_concurrency = 1\nmax_cost_tokens = {n}\n");
    let cfg = setup(&dir.join("budget"), &proxy.base_url(), &budget(1));
    let paid = proxy.paid_total();
    let o = run(&cfg, &dir.join("budget/store"));
    let t = text(&o);
    assert_eq!(o.status.code(), Some(3), "{t}");
    assert!(
        t.contains("max_cost_tokens = 1") && t.contains("raise"),
        "{t}"
    );
    assert_eq!(
        proxy.paid_total(),
        paid + 1,
        "one request before the budget was seen spent"
    );
    // `tsr verify --repair` of this store (a damaged result of the same run) recomputes what was
    // lost but never asks the server for the answers not recorded yet: it says how to.
    let bstore = dir.join("budget/store");
    let d = output_of(&status(&bstore, "x"), "eval-baseline", "outputs");
    let path = bstore.join("blobs").join(&d[..2]).join(&d[2..]);
    let mut bytes = std::fs::read(&path).unwrap();
    bytes[0] ^= 0xff;
    std::fs::write(&path, bytes).unwrap();
    let asked_before = proxy.asked_total();
    let o = tsr(&["verify", "--repair"], &bstore);
    let t = text(&o);
    assert!(!o.status.success(), "{t}");
    assert!(
        t.contains("may not ask its server here") && t.contains("--ask-api"),
        "{t}"
    );
    assert!(t.contains("after repair: ok"), "{t}");
    assert_eq!(proxy.asked_total(), asked_before, "repair asked the server");
    let cfg = setup(&dir.join("budget"), &proxy.base_url(), &budget(1_000_000));
    let o = run(&cfg, &dir.join("budget/store"));
    assert!(o.status.success(), "{}", text(&o));
    let got: Vec<serde_json::Value> = annotations(&dir.join("budget/store"), "iter1/eval-judge")
        .iter()
        .map(|a| a["preference"].clone())
        .collect();
    assert_eq!(got, want);
    let asked = annotations(&dir.join("budget/store"), "iter1/eval-judge")
        .iter()
        .filter(|a| a["api"]["tries"] != 0)
        .count() as u32;
    assert_eq!(
        proxy.paid_total(),
        paid + asked,
        "a comparison was paid twice"
    );
}

/// A benchmark, not a test (`scripts/bench_api_judge.sh`): an evaluation's throughput at
/// `max_concurrency` 1, 4 and 16 against the real server behind the proxy, which adds
/// `TSR_BENCH_LATENCY_MS` (default 500) before each request, as a far-away API would. The test
/// server answers one request at a time, so concurrency can only hide the latency. Prints one
/// line per concurrency: comparisons, the time from the first request to the last answer, and
/// comparisons per second.
#[test]
#[ignore = "a benchmark: scripts/bench_api_judge.sh"]
fn bench_api_judge_throughput_by_concurrency() {
    let env_num = |k: &str, d: u64| {
        std::env::var(k)
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(d)
    };
    let latency = env_num("TSR_BENCH_LATENCY_MS", 500);
    let n = env_num("TSR_BENCH_PROMPTS", 48) as usize;
    let dir = tempfile::tempdir().unwrap();
    let dir = dir.path();
    let server = LlamaServer::start(&dir.join("server"));
    let proxy = Proxy::start(server.port);
    proxy.set_latency(std::time::Duration::from_millis(latency));
    let e = dir.join("e");
    setup(&e, &proxy.base_url(), "");
    let reference: Vec<serde_json::Value> = (0..n)
        .map(|i| serde_json::json!({"instruction": format!("Describe item {i} in one sentence."), "output": format!("Item {i} is a thing."), "generator": "ref"}))
        .collect();
    std::fs::write(
        e.join("reference.json"),
        serde_json::to_vec(&reference).unwrap(),
    )
    .unwrap();
    println!("evaluation judge throughput: {n} comparisons, {latency} ms added before each request, one llama-cpp-python server (serial)");
    println!(
        "{:>15} {:>8} {:>10} {:>16}",
        "max_concurrency", "asked", "seconds", "comparisons/s"
    );
    for c in [1usize, 4, 16] {
        let before = proxy.spans().len();
        let o = Command::new(env!("CARGO_BIN_EXE_tsr"))
            .current_dir(&e)
            .args(["eval", "--model", "tiny", "--reference", "reference.json"])
            .args(["--prompts", "reference.json", "--max-new-tokens", "6"])
            .args(["--judge-url", &proxy.base_url(), "--judge", "smollm2"])
            .args(["--template", "judge.txt", "--quiet", "--json"])
            .args(["--max-concurrency", &c.to_string()])
            .args(["--store", &format!("store-{c}")])
            .env("RAYON_NUM_THREADS", "1")
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", text(&o));
        let spans: Vec<(u64, u64)> = proxy.spans()[before..].to_vec();
        let first = spans.iter().map(|s| s.0).min().unwrap();
        let last = spans.iter().map(|s| s.1).max().unwrap();
        let secs = (last - first) as f64 / 1000.0;
        println!(
            "{c:>15} {:>8} {secs:>10.2} {:>16.2}",
            spans.len(),
            spans.len() as f64 / secs
        );
    }
}

/// tsr's own two-order judgement through the API (`annotator = "tsr_pairwise"`, text verdicts):
/// each order is its own request and recorded answer, a preference needs both to agree, and a
/// kill loses at most the requests in flight.
#[test]
fn tsrs_own_pairwise_judgement_through_the_api() {
    let dir = tempfile::tempdir().unwrap();
    let dir = dir.path();
    let server = LlamaServer::start(&dir.join("server"));
    let proxy = Proxy::start(server.port);
    let cfg = setup(&dir.join("run"), &proxy.base_url(), "");
    // The built-in pairwise template instead of the AlpacaEval-style one.
    let toml = std::fs::read_to_string(&cfg).unwrap().replace(
        "template = \"judge.txt\"\n",
        "annotator = \"tsr_pairwise\"\nmode = \"text\"\nmax_new_tokens = 48\n",
    );
    std::fs::write(&cfg, toml).unwrap();
    let store = dir.join("run/store");
    let mut child = command(&cfg, &store)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    wait_event(&mut child, "answers paid", |c| {
        proxy.paid_total() >= 3 || c.try_wait().unwrap().is_some()
    });
    let killed = child.try_wait().unwrap().is_none();
    if killed {
        child.kill().unwrap();
    }
    let mut said = text(&child.wait_with_output().unwrap());
    assert!(killed, "{said}");
    let o = run(&cfg, &store);
    said.push_str(&text(&o));
    assert!(o.status.success(), "{said}");
    let m1 = annotations(&store, "iter1/eval-judge");
    assert_eq!(m1.len(), 8);
    let asked = m1.iter().filter(|a| a["api"]["tries"] != 0).count();
    // Two requests per compared prompt; at most the two in flight at the kill paid twice.
    let paid = proxy.paid_total() as usize;
    assert!(
        paid >= 2 * asked && paid <= 2 * asked + 2,
        "{paid} answers paid for {asked} prompts asked in both orders"
    );
    for a in &m1 {
        assert_eq!(a["mode"], "tsr_pairwise", "{a}");
        if a["api"]["tries"] == 0 {
            assert_eq!(a["preference"], 1.5, "{a}");
            continue;
        }
        let v = a["verdicts"].as_array().unwrap();
        assert_eq!(v.len(), 2, "{a}");
        assert_eq!(v[0]["order"], "baseline-first");
        assert_eq!(v[1]["order"], "model-first");
        // The preference is the two recorded texts read again and combined.
        let verdicts: Vec<tsr_steps::records::OrderVerdict> =
            serde_json::from_value(a["verdicts"].clone()).unwrap();
        for ov in &verdicts {
            let letter = tsr_steps::rules::meta_verdict::parse_better(ov.text.as_deref().unwrap());
            let want = match (ov.order, letter) {
                (_, tsr_steps::records::MetaVerdict::Unparsed(_)) => None,
                (tsr_steps::records::Order::BaselineFirst, tsr_steps::records::MetaVerdict::A)
                | (tsr_steps::records::Order::ModelFirst, tsr_steps::records::MetaVerdict::B) => {
                    Some(tsr_steps::records::Prefers::Baseline)
                }
                _ => Some(tsr_steps::records::Prefers::Model),
            };
            match want {
                Some(w) => assert_eq!(ov.prefers, w, "{a}"),
                None => assert!(
                    matches!(ov.prefers, tsr_steps::records::Prefers::Unparsed(_)),
                    "{a}"
                ),
            }
        }
        let (pref, _) = tsr_steps::rules::eval::combine(&verdicts);
        assert_eq!(a["preference"].as_f64(), pref, "{a}");
    }
    let s = summary(&store, "iter1/eval-judge");
    assert_eq!(s["api"]["requests"], 2 * asked, "{s}");
    // Replay reads the recorded answers and asks nothing.
    let before = proxy.asked_total();
    replay_without_key(&store);
    assert_eq!(proxy.asked_total(), before);
}

/// With worker processes, the API judge still runs in the driver, which holds the key: its
/// answers are recorded as the driver's, while the generation steps' batches are the workers'.
#[test]
fn the_api_judge_runs_in_the_driver_under_an_executor() {
    let dir = tempfile::tempdir().unwrap();
    let dir = dir.path();
    let server = LlamaServer::start(&dir.join("server"));
    let proxy = Proxy::start(server.port);
    let cfg = setup(&dir.join("run"), &proxy.base_url(), "");
    let mut toml = std::fs::read_to_string(&cfg).unwrap();
    toml.push_str("[executor]\nkind = \"processes\"\nworkers = 2\n");
    std::fs::write(&cfg, toml).unwrap();
    let store = dir.join("run/store");
    let o = run(&cfg, &store);
    assert!(o.status.success(), "{}", text(&o));
    let judged = |id: &str| -> serde_json::Value {
        let o = tsr(&["lineage", "x", "eval", id, "--json"], &store);
        assert!(o.status.success(), "{}", text(&o));
        serde_json::from_slice(&o.stdout).unwrap()
    };
    let v = judged("e1");
    let m1 = v
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["node"] == "iter1/eval-judge")
        .unwrap_or_else(|| panic!("{v}"));
    assert_eq!(m1["judged_by"]["executor"], "local", "{m1}");
    assert!(
        m1["annotation"]["api"]["tries"].as_u64().unwrap() > 0,
        "{m1}"
    );
    // The generation batches went to the workers.
    let o = tsr(&["lineage", "x", "prompt", "a", "--json"], &store);
    let t = String::from_utf8_lossy(&o.stdout);
    assert!(t.contains("\"processes\""), "{t}");
    // No worker saw the key: the job files hold none.
    for f in files_under(&store) {
        let bytes = std::fs::read(&f).unwrap_or_default();
        assert!(
            !bytes.windows(KEY.len()).any(|w| w == KEY.as_bytes()),
            "the key is in {}",
            f.display()
        );
    }
}

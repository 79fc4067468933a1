//! PEFT LoRA adapters as inputs on the command line and in workflows: `tsr logprobs --adapter`
//! and a run with `[model] adapter` give the log-probs PEFT gives through the same adapter
//! (`tests/fixtures/peft/`, made by `scripts/peft_golden.sh`), and an adapter tsr cannot apply
//! is refused before anything runs.

mod common;

use common::*;
use std::path::{Path, PathBuf};

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

fn golden_pairs(adapter: &str) -> Vec<serde_json::Value> {
    let g: serde_json::Value =
        serde_json::from_slice(&std::fs::read(fixtures().join("peft/goldens.json")).unwrap())
            .unwrap();
    g["adapters"][adapter]["pairs"].as_array().unwrap().clone()
}

#[test]
fn adapters_apply_on_the_command_line_and_in_a_run() {
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("store");
    let base = fixtures().join("hf/llama-llama3");
    let adapter = fixtures().join("peft/llama-all-linear");
    let golden = golden_pairs("llama-all-linear");
    let pairs = dir.path().join("pairs.jsonl");
    let lines: Vec<String> = golden
        .iter()
        .map(|p| serde_json::json!({"prompt": p["prompt"], "response": p["response"]}).to_string())
        .collect();
    std::fs::write(&pairs, lines.join("\n")).unwrap();
    let got = logprobs(&base, Some(&adapter), &pairs, &store);
    assert_eq!(got.len(), golden.len());
    for (g, p) in got.iter().zip(&golden) {
        let want = p["logprob"].as_f64().unwrap();
        assert!((g - want).abs() < 1e-3, "tsr {g} vs PEFT {want}");
    }

    // A run whose M0 is the base with the adapter merged in.
    std::fs::write(
        dir.path().join("prompts.jsonl"),
        "{\"id\": \"a\", \"prompt\": \"hello there\"}\n{\"id\": \"b\", \"prompt\": \"name a colour\"}\n",
    )
    .unwrap();
    let config = |name: &str, adapter: Option<&Path>| {
        let cfg = dir.path().join(format!("{name}.toml"));
        let adapter_line = adapter
            .map(|a| format!("adapter = \"{}\"\n", a.display()))
            .unwrap_or_default();
        std::fs::write(
            &cfg,
            format!(
                "name = \"{name}\"\nworkflow = \"self-rewarding\"\n[model]\nsource = \"{}\"\n{adapter_line}\
                 [prompts]\nfile = \"prompts.jsonl\"\n[generate]\nk = 2\nmax_new_tokens = 4\n\
                 [judge]\nmode = \"logprob\"\n[dpo]\nlr = 1e-3\naccum_steps = 1\n",
                base.display()
            ),
        )
        .unwrap();
        cfg
    };
    let with = config("with", Some(&adapter));
    let o = tsr(&["run", with.to_str().unwrap(), "--quiet"], &store);
    assert!(o.status.success(), "{}", text(&o));
    let without = config("without", None);
    let o = tsr(&["run", without.to_str().unwrap(), "--quiet"], &store);
    assert!(o.status.success(), "{}", text(&o));
    let m0_with = output_of(&status(&store, "with"), "import", "weights");
    let m0_without = output_of(&status(&store, "without"), "import", "weights");
    assert_ne!(m0_with, m0_without, "the adapter is part of M0");
    let out = dir.path().join("m0");
    let o = tsr(
        &[
            "export",
            "with",
            "model",
            "--node",
            "import",
            "--out",
            out.to_str().unwrap(),
        ],
        &store,
    );
    assert!(o.status.success(), "{}", text(&o));
    let got = logprobs(&out, None, &pairs, &store);
    assert_eq!(got.len(), golden.len());
    for (g, p) in got.iter().zip(&golden) {
        let want = p["logprob"].as_f64().unwrap();
        assert!(
            (g - want).abs() < 1e-3,
            "M0 of the run: tsr {g} vs PEFT {want}"
        );
    }

    // An adapter tsr cannot apply is refused before the run is recorded.
    let dora = dir.path().join("dora");
    std::fs::create_dir_all(&dora).unwrap();
    std::fs::copy(
        adapter.join("adapter_model.safetensors"),
        dora.join("adapter_model.safetensors"),
    )
    .unwrap();
    let cfg = std::fs::read_to_string(adapter.join("adapter_config.json"))
        .unwrap()
        .replace("\"use_dora\": false", "\"use_dora\": true");
    std::fs::write(dora.join("adapter_config.json"), cfg).unwrap();
    let bad = config("dora", Some(&dora));
    let o = tsr(&["run", bad.to_str().unwrap(), "--quiet"], &store);
    assert!(!o.status.success());
    assert!(
        text(&o).contains("model.adapter") && text(&o).contains("DoRA"),
        "{}",
        text(&o)
    );
    let o = tsr(&["runs", "--json"], &store);
    assert!(!String::from_utf8_lossy(&o.stdout).contains("\"dora\""));
}

fn dpo_json(args: &[&str], store: &Path) -> serde_json::Value {
    let mut all = vec!["dpo"];
    all.extend_from_slice(args);
    all.push("--json");
    let o = tsr(&all, store);
    assert!(o.status.success(), "{}", text(&o));
    serde_json::from_slice(&o.stdout).unwrap()
}

/// One DPO step that trains a PEFT-saved adapter further equals PEFT + PyTorch doing it
/// (`dpo_step` in tests/fixtures/peft/goldens.json): the loss before it (ln 2: the reference
/// is the adapter as loaded), the gradient norm over the adapter, the loss after the AdamW step.
#[test]
fn a_dpo_step_on_a_peft_adapter_equals_peft_and_pytorch() {
    let dir = tempfile::tempdir().unwrap();
    let g: serde_json::Value =
        serde_json::from_slice(&std::fs::read(fixtures().join("peft/goldens.json")).unwrap())
            .unwrap();
    let d = &g["dpo_step"];
    let pairs = dir.path().join("pairs.jsonl");
    let lines: Vec<String> = d["pairs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p.to_string())
        .collect();
    std::fs::write(&pairs, lines.join("\n")).unwrap();
    let base = fixtures().join("hf").join(d["base"].as_str().unwrap());
    let adapter = fixtures().join("peft").join(d["adapter"].as_str().unwrap());
    let beta = d["beta"].to_string();
    let lr = d["lr"].to_string();
    let v = dpo_json(
        &[
            "--model",
            base.to_str().unwrap(),
            "--adapter",
            adapter.to_str().unwrap(),
            "--pairs",
            pairs.to_str().unwrap(),
            "--beta",
            &beta,
            "--lr",
            &lr,
            "--steps",
            "1",
            "--max-grad-norm",
            &d["max_grad_norm"].to_string(),
        ],
        &dir.path().join("store"),
    );
    let rel = |a: f64, b: f64, what: &str| {
        assert!(
            (a - b).abs() <= 1e-4 * b.abs(),
            "{what}: tsr {a} vs PEFT {b}"
        );
    };
    rel(
        v["first_step"]["loss_before"].as_f64().unwrap(),
        d["loss_before"].as_f64().unwrap(),
        "loss before",
    );
    rel(
        v["first_step"]["grad_norm"].as_f64().unwrap(),
        d["grad_norm"].as_f64().unwrap(),
        "gradient norm",
    );
    rel(
        v["final_loss"].as_f64().unwrap(),
        d["loss_after"].as_f64().unwrap(),
        "loss after the step",
    );
}

/// A new adapter trained by `tsr dpo --lora` is saved as a PEFT folder that reproduces the
/// trained model: its loss recomputed from `tsr logprobs --adapter` equals the reported one.
#[test]
fn a_new_lora_adapter_is_saved_as_a_peft_folder_that_reproduces_the_trained_model() {
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("store");
    let base = fixtures().join("hf/llama-llama3");
    let pairs = dir.path().join("pairs.jsonl");
    std::fs::write(
        &pairs,
        "{\"prompt\": \"Name a colour.\", \"chosen\": \"Blue.\", \"rejected\": \"I will not.\"}\n\
         {\"prompt\": \"Count to two.\", \"chosen\": \"One, two.\", \"rejected\": \"Seven.\"}\n",
    )
    .unwrap();
    let out = dir.path().join("adapter");
    let v = dpo_json(
        &[
            "--model",
            base.to_str().unwrap(),
            "--lora",
            "r=4,alpha=8,targets=q_proj+v_proj+down_proj",
            "--pairs",
            pairs.to_str().unwrap(),
            "--lr",
            "1e-2",
            "--steps",
            "3",
            "--out",
            out.to_str().unwrap(),
        ],
        &store,
    );
    let metrics = v["metrics"].as_array().unwrap();
    assert!(
        (metrics[0]["loss"].as_f64().unwrap() - std::f64::consts::LN_2).abs() < 1e-6,
        "B = 0: the model starts as the base"
    );
    let cfg: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("adapter_config.json")).unwrap()).unwrap();
    assert_eq!(cfg["peft_type"], "LORA");
    assert_eq!(cfg["r"], 4);
    assert_eq!(
        cfg["target_modules"],
        serde_json::json!(["q_proj", "v_proj", "down_proj"])
    );
    // The loss of the saved adapter against the base (the reference), from log-probs alone.
    let as_pairs = |side: &str| {
        let f = dir.path().join(format!("{side}.jsonl"));
        let text = std::fs::read_to_string(&pairs).unwrap();
        let lines: Vec<String> = text
            .lines()
            .map(|l| {
                let p: serde_json::Value = serde_json::from_str(l).unwrap();
                serde_json::json!({"prompt": p["prompt"], "response": p[side]}).to_string()
            })
            .collect();
        std::fs::write(&f, lines.join("\n")).unwrap();
        f
    };
    let (c, r) = (as_pairs("chosen"), as_pairs("rejected"));
    let (pc, pr) = (
        logprobs(&base, Some(&out), &c, &store),
        logprobs(&base, Some(&out), &r, &store),
    );
    let (rc, rr) = (
        logprobs(&base, None, &c, &store),
        logprobs(&base, None, &r, &store),
    );
    assert!([pc.len(), pr.len(), rc.len(), rr.len()] == [2, 2, 2, 2]);
    let loss: f64 = (0..2)
        .map(|i| {
            let z = 0.1 * ((pc[i] - rc[i]) - (pr[i] - rr[i]));
            (1.0 + (-z).exp()).ln()
        })
        .sum::<f64>()
        / 2.0;
    let reported = v["final_loss"].as_f64().unwrap();
    assert!(
        (loss - reported).abs() < 1e-4,
        "saved adapter's loss {loss} vs the trained model's {reported}"
    );
    assert!(
        reported < std::f64::consts::LN_2,
        "training lowered the loss"
    );
    // Saving again over it needs --force; a folder of other files is never replaced.
    let o = tsr(
        &[
            "dpo",
            "--model",
            base.to_str().unwrap(),
            "--lora",
            "r=2",
            "--pairs",
            pairs.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
        ],
        &store,
    );
    assert!(
        !o.status.success() && text(&o).contains("--force"),
        "{}",
        text(&o)
    );
    let o = tsr(
        &[
            "dpo",
            "--model",
            base.to_str().unwrap(),
            "--lora",
            "r=0",
            "--pairs",
            pairs.to_str().unwrap(),
        ],
        &store,
    );
    assert!(
        !o.status.success() && text(&o).contains("r must be a positive integer"),
        "{}",
        text(&o)
    );
}

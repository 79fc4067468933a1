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

fn logprobs(model: &Path, adapter: Option<&Path>, pairs: &Path, store: &Path) -> Vec<f64> {
    let mut args = vec![
        "logprobs".to_string(),
        "--model".into(),
        model.display().to_string(),
        "--pairs".into(),
        pairs.display().to_string(),
        "--json".into(),
    ];
    if let Some(a) = adapter {
        args.extend(["--adapter".to_string(), a.display().to_string()]);
    }
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let o = tsr(&args, store);
    assert!(o.status.success(), "{}", text(&o));
    String::from_utf8_lossy(&o.stdout)
        .lines()
        .map(|l| {
            serde_json::from_str::<serde_json::Value>(l).unwrap()["logprob"]
                .as_f64()
                .unwrap()
        })
        .collect()
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

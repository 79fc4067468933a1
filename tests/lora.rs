//! LoRA training inside the workflows (`[dpo] adapter = "lora"`) on a tiny random model: every
//! model DPO makes is stored as an adapter over the imported base, Mi+1 and Mf continue Mi's
//! adapter, lineage and status name adapter and base, and `tsr export` writes the merged model
//! or the PEFT adapter, which compute the same log-probs.

mod common;

use common::*;

use std::path::{Path, PathBuf};

const RUN: &str = "lora";

fn setup(dir: &Path, iterations: u32, extra_lora: &str) -> PathBuf {
    tsr_model::testing::write_tiny_hf_model(&dir.join("tiny"), 5);
    std::fs::write(
        dir.join("prompts.jsonl"),
        "{\"id\": \"a\", \"prompt\": \"hello there\"}\n{\"id\": \"b\", \"prompt\": \"name a colour\"}\n{\"id\": \"c\", \"prompt\": \"count to three\"}\n",
    )
    .unwrap();
    let cfg = dir.join("lora.toml");
    std::fs::write(
        &cfg,
        format!(
            "name = \"{RUN}\"\nworkflow = \"temporal\"\niterations = {iterations}\n\
             [model]\nsource = \"tiny\"\n[prompts]\nfile = \"prompts.jsonl\"\n\
             [generate]\nk = 3\nmax_new_tokens = 6\nbatch_size = 4\n\
             [judge]\nmode = \"logprob\"\nsamples = 1\nmax_new_tokens = 4\nbatch_size = 4\n\
             [dpo]\nlr = 1e-2\nepochs = 2\nmicro_batch = 1\naccum_steps = 1\ncheckpoint_every = 1\nadapter = \"lora\"\n\
             [dpo.lora]\nr = 4\nalpha = 8\n{extra_lora}"
        ),
    )
    .unwrap();
    cfg
}

fn dpo_report(store: &Path, status: &serde_json::Value, name: &str) -> serde_json::Value {
    serde_json::from_slice(&blob(store, &output_of(status, name, "metrics"))).unwrap()
}

/// The DPO node's report and the loss of its first optimizer step.
fn first_loss(store: &Path, status: &serde_json::Value, name: &str) -> (serde_json::Value, f64) {
    let report = dpo_report(store, status, name);
    let first = report["metrics"][0]["loss"]
        .as_str()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("{name}: {report}"));
    (report, first)
}

#[test]
fn lora_runs_store_adapters_that_continue_across_iterations_and_export_to_peft() {
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("store");
    let cfg = setup(dir.path(), 2, "");
    let o = tsr(&["run", cfg.to_str().unwrap(), "--quiet"], &store);
    assert!(o.status.success(), "{}", text(&o));
    let st = status(&store, RUN);
    let base = output_of(&st, "import", "weights");
    let base_size = blob(&store, &base).len();

    // Every DPO node made an adapter over the imported base, a fraction of the model's size.
    let models = st["lora_models"]
        .as_array()
        .expect("status names LoRA models");
    let dpo_nodes = [
        "iter1/dpo-future",
        "iter1/dpo-next",
        "iter2/dpo-future",
        "iter2/dpo-next",
    ];
    assert_eq!(models.len(), dpo_nodes.len(), "{models:?}");
    for name in dpo_nodes {
        let m = models.iter().find(|m| m["node"] == name).unwrap();
        assert_eq!(m["base"], base.as_str(), "{name}");
        assert_eq!((m["r"].as_u64(), m["alpha"].as_f64()), (Some(4), Some(8.0)));
        let adapter = output_of(&st, name, "weights");
        assert_eq!(m["model"], adapter.as_str());
        let size = blob(&store, &adapter).len();
        assert!(
            size * 4 < base_size,
            "{name}: adapter of {size} bytes vs base of {base_size}"
        );
        // Policy = reference at the start (M_i's adapter continued, or a new one with B = 0),
        // so the first loss is ln 2; a dropped adapter would start elsewhere.
        let (report, first) = first_loss(&store, &st, name);
        assert!(
            (first - std::f64::consts::LN_2).abs() < 1e-5,
            "{name}: first loss {first}"
        );
        assert!(report["steps"].as_u64().unwrap() >= 2, "{name}: {report}");
    }
    // Iteration 2 trains M1 = (base, iter1 adapter) further: its DPO steps read both.
    let s = tsr_state::Store::open(&store).unwrap();
    let nodes = s.nodes(RUN).unwrap();
    for name in ["iter2/dpo-future", "iter2/dpo-next", "iter2/gen-current"] {
        let rec = &nodes.iter().find(|(n, _)| n == name).unwrap().1;
        let step = s.get_step(&rec.step_key).unwrap().unwrap();
        assert_eq!(
            step.inputs.get("model.base").map(|d| d.to_hex()),
            Some(base.clone()),
            "{name}"
        );
        assert_eq!(
            step.inputs.get("model.weights").map(|d| d.to_hex()),
            Some(output_of(&st, "iter1/dpo-next", "weights")),
            "{name}"
        );
    }
    drop(s);

    // Lineage walks adapters back to M0 and names their base.
    let m2 = output_of(&st, "iter2/dpo-next", "weights");
    let o = tsr(&["lineage", RUN, "model", &m2[..12], "--json"], &store);
    assert!(o.status.success(), "{}", text(&o));
    let chain: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let chain = chain.as_array().unwrap();
    assert_eq!(chain.len(), 3, "{chain:?}");
    assert_eq!(chain[0]["lora"]["base"], base.as_str());
    assert_eq!(
        chain[0]["trained_from"],
        output_of(&st, "iter1/dpo-next", "weights").as_str()
    );
    assert_eq!(chain[2]["kind"], "import-model");
    let o = tsr(&["lineage", RUN, "model", &m2[..12]], &store);
    assert!(text(&o).contains("LoRA adapter r = 4"), "{}", text(&o));
    let o = tsr(&["status", RUN], &store);
    assert!(
        text(&o).contains(&format!(
            "LoRA adapter (r = 4, alpha = 8) over base {}",
            &base[..12]
        )),
        "{}",
        text(&o)
    );

    // Export: the merged model, the adapter as a PEFT folder and the base; base + adapter
    // computes what the merged model does.
    let merged = dir.path().join("merged");
    let peft = dir.path().join("peft");
    let base_dir = dir.path().join("base");
    for (args, out) in [
        (vec!["export", RUN, "model"], &merged),
        (vec!["export", RUN, "model", "--adapter"], &peft),
        (vec!["export", RUN, "model", "--node", "import"], &base_dir),
    ] {
        let mut args = args.clone();
        args.extend(["--out", out.to_str().unwrap()]);
        let o = tsr(&args, &store);
        assert!(o.status.success(), "{args:?}: {}", text(&o));
    }
    let cfg: serde_json::Value =
        serde_json::from_slice(&std::fs::read(peft.join("adapter_config.json")).unwrap()).unwrap();
    assert_eq!(
        (cfg["r"].as_u64(), cfg["lora_alpha"].as_f64()),
        (Some(4), Some(8.0))
    );
    assert_eq!(cfg["peft_type"], "LORA");
    let pairs = dir.path().join("pairs.jsonl");
    std::fs::write(
        &pairs,
        "{\"prompt\": \"hello there\", \"response\": \"hi, how are you?\"}\n{\"prompt\": \"count to three\", \"response\": \"one two three\"}\n",
    )
    .unwrap();
    let a = logprobs(&merged, None, &pairs, &store);
    let b = logprobs(&base_dir, Some(&peft), &pairs, &store);
    let c = logprobs(&base_dir, None, &pairs, &store);
    for i in 0..a.len() {
        assert!(
            (a[i] - b[i]).abs() < 1e-4,
            "merged {a:?} vs base + adapter {b:?}"
        );
    }
    assert!(
        a.iter().zip(&c).any(|(x, y)| (x - y).abs() > 1e-3),
        "training changed nothing: {a:?} vs base {c:?}"
    );
    // --adapter of a node without one is refused with the reason.
    let o = tsr(
        &[
            "export",
            RUN,
            "model",
            "--node",
            "import",
            "--adapter",
            "--out",
            dir.path().join("x").to_str().unwrap(),
        ],
        &store,
    );
    assert!(!o.status.success());
    assert!(text(&o).contains("not an adapter"), "{}", text(&o));
    assert!(tsr(&["verify"], &store).status.success());
}

#[test]
fn lora_settings_are_checked_and_full_runs_keep_their_steps() {
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("store");
    let cfg = setup(dir.path(), 1, "");
    let text0 = std::fs::read_to_string(&cfg).unwrap();
    for (edit, key) in [
        ("r = 4\n", "r = 0\n"),
        ("alpha = 8\n", "alpha = -1\n"),
        ("alpha = 8\n", "alpha = 8\ndropout = 1.5\n"),
        (
            "alpha = 8\n",
            "alpha = 8\ntargets = [\"q_proj\", \"lm_head\"]\n",
        ),
        ("adapter = \"lora\"\n", "adapter = \"qlora\"\n"),
        ("adapter = \"lora\"\n", ""),
        (
            "source = \"tiny\"\n",
            "source = \"tiny\"\ndtype = \"f64\"\n",
        ),
    ] {
        let bad = dir.path().join("bad.toml");
        std::fs::write(&bad, text0.replace(edit, key)).unwrap();
        let o = tsr(&["run", bad.to_str().unwrap(), "--quiet"], &store);
        assert!(!o.status.success(), "{key}");
        let msg = text(&o);
        let named = if key.contains("dtype") {
            "model.dtype".to_string()
        } else if key.is_empty() {
            "dpo.lora".to_string()
        } else if key.starts_with("adapter") {
            "dpo.adapter".to_string()
        } else {
            let k = key.lines().last().unwrap().split(' ').next().unwrap();
            format!("dpo.lora.{k}")
        };
        assert!(msg.contains(&named), "{key}: {msg}");
    }
    // Half precision holds the base frozen: full fine-tuning is refused, naming the way out.
    let bad = dir.path().join("bad.toml");
    std::fs::write(
        &bad,
        text0
            .replace("adapter = \"lora\"\n", "")
            .replace("[dpo.lora]\nr = 4\nalpha = 8\n", "")
            .replace(
                "source = \"tiny\"\n",
                "source = \"tiny\"\ndtype = \"bf16\"\n",
            ),
    )
    .unwrap();
    let o = tsr(&["run", bad.to_str().unwrap(), "--quiet"], &store);
    assert!(!o.status.success());
    assert!(
        text(&o).contains("model.dtype") && text(&o).contains("adapter = \"lora\""),
        "{}",
        text(&o)
    );
    // A full fine-tuning config defines the run exactly as before LoRA existed: no new keys.
    let full = dir.path().join("full.toml");
    std::fs::write(
        &full,
        text0
            .replace("adapter = \"lora\"\n", "")
            .replace("[dpo.lora]\nr = 4\nalpha = 8\n", ""),
    )
    .unwrap();
    let c = tsr_workflows::Config::from_file(&full).unwrap();
    let def = c.definition();
    assert!(
        def.keys()
            .all(|k| !k.starts_with("dpo.adapter") && !k.starts_with("dpo.lora")),
        "{def:?}"
    );
    // The steps of a full run are configured exactly as before: no LoRA or dtype keys in any
    // step's config (a step's key hashes its config).
    let dag = tsr_workflows::build(&c).unwrap();
    for n in dag.nodes() {
        let config = n.step.config().to_string();
        assert!(
            !config.contains("lora") && !config.contains("dtype"),
            "{}: {config}",
            n.name
        );
        if n.step.kind() == "import-model" {
            assert_eq!(config, r#"{"format":"hf"}"#);
        }
    }
    let lora = tsr_workflows::Config::from_file(&cfg).unwrap();
    assert_eq!(
        lora.definition().get("dpo.adapter").map(String::as_str),
        Some("\"lora\"")
    );
}

#[test]
fn sigkills_across_a_lora_temporal_run_change_nothing() {
    // With dropout: its masks must follow the step, not the process.
    let dir = tempfile::tempdir().unwrap();
    let cfg = setup(dir.path(), 2, "dropout = 0.1\n");
    assert_kills_change_nothing(&cfg, dir.path(), RUN, 1, 9);
}

/// `[model] dtype = "bf16"`: the base is imported and held in bf16 (half the bytes), LoRA
/// trains over it in f32, and the run computes close to the f32 run.
#[test]
fn a_bf16_base_halves_the_stored_base_and_trains_an_adapter() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = setup(dir.path(), 2, "");
    let text0 = std::fs::read_to_string(&cfg).unwrap();
    let half = dir.path().join("half.toml");
    std::fs::write(
        &half,
        text0.replace(
            "source = \"tiny\"\n",
            "source = \"tiny\"\ndtype = \"bf16\"\n",
        ),
    )
    .unwrap();
    let f32_store = dir.path().join("f32");
    let half_store = dir.path().join("bf16");
    for (c, s) in [(&cfg, &f32_store), (&half, &half_store)] {
        let o = tsr(&["run", c.to_str().unwrap(), "--quiet"], s);
        assert!(o.status.success(), "{}", text(&o));
    }
    let (a, b) = (status(&f32_store, RUN), status(&half_store, RUN));
    let wa = blob(&f32_store, &output_of(&a, "import", "weights")).len();
    let wb = blob(&half_store, &output_of(&b, "import", "weights")).len();
    assert!(
        (wb as f64) < 0.55 * wa as f64,
        "bf16 base {wb} bytes vs f32 {wa}"
    );
    // Iteration 2 continues M1's adapter over the bf16 base: its reference (the adapter
    // applied unmerged, in f32) is the policy at the start.
    for name in [
        "iter1/dpo-future",
        "iter1/dpo-next",
        "iter2/dpo-future",
        "iter2/dpo-next",
    ] {
        let (_, first) = first_loss(&half_store, &b, name);
        assert!(
            (first - std::f64::consts::LN_2).abs() < 1e-3,
            "{name}: first loss {first}"
        );
    }
    // The bf16 base computes what the f32 base does, to bf16's precision.
    let pairs = dir.path().join("pairs.jsonl");
    std::fs::write(
        &pairs,
        "{\"prompt\": \"hello there\", \"response\": \"hi, how are you?\"}\n",
    )
    .unwrap();
    let mut lp = vec![];
    for (store, st) in [(&f32_store, &a), (&half_store, &b)] {
        let base = dir.path().join(format!("base-{}", lp.len()));
        let o = tsr(
            &[
                "export",
                RUN,
                "model",
                "--node",
                "import",
                "--out",
                base.to_str().unwrap(),
            ],
            store,
        );
        assert!(o.status.success(), "{}", text(&o));
        let _ = st;
        let cfg: serde_json::Value =
            serde_json::from_slice(&std::fs::read(base.join("config.json")).unwrap()).unwrap();
        let want = if lp.is_empty() { "float32" } else { "bfloat16" };
        assert_eq!(
            cfg["torch_dtype"], want,
            "the exported base says its precision"
        );
        lp.push(logprobs(&base, None, &pairs, store)[0]);
    }
    assert!(
        (lp[0] - lp[1]).abs() < 0.02 * lp[0].abs() + 0.05,
        "f32 base {} vs bf16 base {}",
        lp[0],
        lp[1]
    );
    // The merged export of the bf16 run is a plain f32 model.
    let merged = dir.path().join("merged");
    let o = tsr(
        &["export", RUN, "model", "--out", merged.to_str().unwrap()],
        &half_store,
    );
    assert!(o.status.success(), "{}", text(&o));
    assert!(tsr(&["verify"], &half_store).status.success());
}

fn plan_peak(cfg: &Path, store: &Path) -> u64 {
    let v = plan_json(cfg, store);
    assert!(v["nodes"].as_array().unwrap().len() > 10, "{v}");
    v["peak"].as_u64().unwrap()
}

/// `tsr plan` prints each step's estimate; a run whose plan does not fit the memory there is
/// refused before anything is written, naming the estimate and a setting that would fit. The
/// model is SmolLM2-135M's shape (config only: a plan reads no weights).
#[test]
fn a_run_that_does_not_fit_its_memory_is_refused_before_it_starts() {
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("store");
    let lora = setup(dir.path(), 1, "");
    let shape = dir.path().join("shape135m");
    std::fs::create_dir_all(&shape).unwrap();
    let c = tsr_model::testing::smollm2_135m_config();
    std::fs::write(
        shape.join("config.json"),
        serde_json::to_vec(&c.to_hf_json()).unwrap(),
    )
    .unwrap();
    for f in ["tokenizer.json", "tokenizer_config.json"] {
        std::fs::copy(dir.path().join("tiny").join(f), shape.join(f)).unwrap();
    }
    std::fs::write(shape.join("model.safetensors"), b"").unwrap();
    let lora_text = std::fs::read_to_string(&lora)
        .unwrap()
        .replace("source = \"tiny\"", "source = \"shape135m\"");
    std::fs::write(&lora, &lora_text).unwrap();
    let full = dir.path().join("full.toml");
    std::fs::write(
        &full,
        lora_text
            .replace("adapter = \"lora\"\n", "")
            .replace("[dpo.lora]\nr = 4\nalpha = 8\n", ""),
    )
    .unwrap();
    let (lora_peak, full_peak) = (plan_peak(&lora, &store), plan_peak(&full, &store));
    assert!(
        lora_peak * 2 < full_peak,
        "LoRA {lora_peak} vs full {full_peak}"
    );
    let o = tsr(&["plan", full.to_str().unwrap(), "--memory", "1TB"], &store);
    assert!(o.status.success(), "{}", text(&o));
    for want in [
        "iter1/dpo-next",
        "every weight trains",
        "fits",
        "peak:",
        "<- peak",
    ] {
        assert!(text(&o).contains(want), "{want}: {}", text(&o));
    }
    let o = tsr(
        &["plan", full.to_str().unwrap(), "--memory", "10MB"],
        &store,
    );
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    assert!(text(&o).contains("does NOT fit"), "{}", text(&o));

    // Between the two peaks: the full run is refused and LoRA is named as the way to fit.
    let limit = format!("{}", (lora_peak + full_peak) / 2);
    let run = |cfg: &Path, envs: &[(&str, &str)]| {
        let mut c = std::process::Command::new(env!("CARGO_BIN_EXE_tsr"));
        c.args(["run", cfg.to_str().unwrap(), "--quiet", "--store"])
            .arg(&store);
        for (k, v) in envs {
            c.env(k, v);
        }
        c.output().unwrap()
    };
    let o = run(&full, &[("TSR_MEMORY_LIMIT", &limit)]);
    assert!(!o.status.success());
    let msg = text(&o);
    assert!(
        msg.contains("this run needs about")
            && msg.contains("TSR_MEMORY_LIMIT")
            && msg.contains("[dpo] adapter = \"lora\""),
        "{msg}"
    );
    assert!(!store.join("db").exists(), "a refused run wrote a store");
    let o = tsr(
        &[
            "plan",
            lora.to_str().unwrap(),
            "--memory",
            &format!("{limit}B"),
        ],
        &store,
    );
    assert!(o.status.success(), "{}", text(&o));
    // The check can be overridden: the run then starts (and here fails on the empty weights).
    let o = run(
        &full,
        &[
            ("TSR_MEMORY_LIMIT", "10MB"),
            ("TSR_IGNORE_MEMORY_PLAN", "1"),
        ],
    );
    assert!(!text(&o).contains("this run needs about"), "{}", text(&o));
    assert!(store.join("db").exists());
}

/// PEFT loads the adapter tsr exports onto the base tsr exports, and computes what tsr
/// computes: `tests/fixtures/peft-export/` holds one run's exports and PEFT's log-probs
/// (`scripts/peft_export_golden.sh`); the same run here must export the same adapter bytes.
#[test]
fn peft_loads_the_exported_adapter_onto_the_base_and_agrees() {
    let fixture = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/peft-export");
    let golden: serde_json::Value =
        serde_json::from_slice(&std::fs::read(fixture.join("goldens.json")).unwrap()).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("store");
    let cfg = setup(dir.path(), 1, "");
    let o = tsr(&["run", cfg.to_str().unwrap(), "--quiet"], &store);
    assert!(o.status.success(), "{}", text(&o));
    let out = dir.path().join("adapter");
    let o = tsr(
        &[
            "export",
            RUN,
            "model",
            "--adapter",
            "--out",
            out.to_str().unwrap(),
        ],
        &store,
    );
    assert!(o.status.success(), "{}", text(&o));
    // The export is the form PEFT was checked with: the same config, tensor names and shapes
    // (the values may differ in the last bits on another CPU).
    assert_eq!(
        std::fs::read(out.join("adapter_config.json")).unwrap(),
        std::fs::read(fixture.join("adapter/adapter_config.json")).unwrap(),
        "run scripts/peft_export_golden.sh"
    );
    let header = |p: &Path| -> serde_json::Value {
        let b = std::fs::read(p).unwrap();
        let n = u64::from_le_bytes(b[..8].try_into().unwrap()) as usize;
        let mut v: serde_json::Value = serde_json::from_slice(&b[8..8 + n]).unwrap();
        v.as_object_mut().unwrap().remove("__metadata__");
        v
    };
    assert_eq!(
        header(&out.join("adapter_model.safetensors")),
        header(&fixture.join("adapter/adapter_model.safetensors")),
        "run scripts/peft_export_golden.sh"
    );
    let pairs = dir.path().join("pairs.jsonl");
    let lines: String = golden["pairs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| {
            format!(
                "{}\n",
                serde_json::json!({"prompt": p["prompt"], "response": p["response"]})
            )
        })
        .collect();
    std::fs::write(&pairs, lines).unwrap();
    let base = fixture.join("base");
    let through_adapter = logprobs(&base, Some(&fixture.join("adapter")), &pairs, &store);
    let plain = logprobs(&base, None, &pairs, &store);
    // And this run's adapter computes what the checked one does.
    let ours = logprobs(&base, Some(&out), &pairs, &store);
    for (a, b) in ours.iter().zip(&through_adapter) {
        assert!(
            (a - b).abs() < 1e-2,
            "this run's adapter {ours:?} vs the fixture's {through_adapter:?}"
        );
    }
    for (i, p) in golden["pairs"].as_array().unwrap().iter().enumerate() {
        let want = p["logprob"].as_f64().unwrap();
        assert!(
            (through_adapter[i] - want).abs() < 1e-3,
            "pair {i}: tsr {} vs PEFT {want}",
            through_adapter[i]
        );
        // PEFT's merged model agrees with PEFT's adapter model (what `tsr export RUN model`
        // writes is the merge).
        assert!((p["merged_logprob"].as_f64().unwrap() - want).abs() < 1e-3);
        assert!((plain[i] - p["base_logprob"].as_f64().unwrap()).abs() < 1e-3);
    }
    assert!(
        through_adapter
            .iter()
            .zip(&plain)
            .any(|(a, b)| (a - b).abs() > 1e-2),
        "the adapter changes nothing: {through_adapter:?} vs {plain:?}"
    );
}

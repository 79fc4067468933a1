//! LoRA adapters saved by PEFT, applied by tsr: the log-probs through the adapter equal PEFT's
//! (`tests/fixtures/peft/`, made by `scripts/peft_golden.sh` with PEFT 0.21.2 on models that
//! transformers 5.23 wrote), and adapters tsr cannot apply as they are refused naming the
//! setting.

use std::path::{Path, PathBuf};

use tsr_model::testing::{golden_ids as ids, hf_fixtures, read_golden};
use tsr_model::{DType, Device, LanguageModel, LoraAdapter, ModelSource};

fn peft_fixtures() -> PathBuf {
    hf_fixtures().join("../peft")
}

fn load(base: &str) -> LanguageModel {
    LanguageModel::load(
        &ModelSource::HfDir(hf_fixtures().join(base)),
        &Device::Cpu,
        DType::F32,
    )
    .unwrap()
}

#[test]
fn logprobs_through_a_peft_adapter_equal_pefts() {
    let g = read_golden(&peft_fixtures().join("goldens.json"));
    let adapters = g["adapters"].as_object().unwrap();
    assert_eq!(adapters.len(), 2);
    for (name, entry) in adapters {
        let model = load(entry["base"].as_str().unwrap());
        let pairs: Vec<(Vec<u32>, Vec<u32>)> = entry["pairs"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| (ids(&p["prompt_ids"]), ids(&p["response_ids"])))
            .collect();
        let before = model.logprobs(&pairs, 1).unwrap();
        let adapter = LoraAdapter::load(&peft_fixtures().join(name), &Device::Cpu)
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        model.merge_lora(&adapter).unwrap();
        let after = model.logprobs(&pairs, 1).unwrap();
        for (k, p) in entry["pairs"].as_array().unwrap().iter().enumerate() {
            let (want, base) = (
                p["logprob"].as_f64().unwrap(),
                p["base_logprob"].as_f64().unwrap(),
            );
            println!(
                "{name}: tsr {:.4} PEFT {want:.4} (base {base:.4})",
                after[k]
            );
            assert!(
                (before[k] as f64 - base).abs() < 1e-3,
                "{name}: base {} vs {base}",
                before[k]
            );
            assert!(
                (after[k] as f64 - want).abs() < 1e-3,
                "{name}: tsr {} vs PEFT {want}",
                after[k]
            );
            assert!(
                (want - base).abs() > 0.05,
                "{name}: the adapter should change the log-prob"
            );
        }
    }
}

/// A copy of a PEFT fixture with its config edited.
fn edited(
    dir: &Path,
    name: &str,
    edit: impl FnOnce(&mut serde_json::Map<String, serde_json::Value>),
) -> PathBuf {
    let src = peft_fixtures().join(name);
    let out = dir.join(format!("{name}-edited"));
    let _ = std::fs::remove_dir_all(&out);
    std::fs::create_dir_all(&out).unwrap();
    std::fs::copy(
        src.join("adapter_model.safetensors"),
        out.join("adapter_model.safetensors"),
    )
    .unwrap();
    let mut cfg: serde_json::Map<String, serde_json::Value> =
        serde_json::from_slice(&std::fs::read(src.join("adapter_config.json")).unwrap()).unwrap();
    edit(&mut cfg);
    std::fs::write(
        out.join("adapter_config.json"),
        serde_json::to_vec(&cfg).unwrap(),
    )
    .unwrap();
    out
}

#[test]
fn adapters_tsr_cannot_apply_are_refused_naming_the_setting() {
    let dir = tempfile::tempdir().unwrap();
    let refused = |name: &str,
                   edit: &dyn Fn(&mut serde_json::Map<String, serde_json::Value>),
                   want: &[&str]| {
        let d = edited(dir.path(), name, |c| edit(c));
        let e = LoraAdapter::load(&d, &Device::Cpu).unwrap_err().to_string();
        for w in want {
            assert!(e.contains(w), "{w:?} not in: {e}");
        }
    };
    let set = |k: &'static str, v: serde_json::Value| {
        move |c: &mut serde_json::Map<String, serde_json::Value>| {
            c.insert(k.into(), v.clone());
        }
    };
    refused(
        "qwen2-attention",
        &set("use_dora", true.into()),
        &["`use_dora` = true", "DoRA"],
    );
    refused(
        "qwen2-attention",
        &set("use_rslora", true.into()),
        &["`use_rslora`", "sqrt(r)"],
    );
    refused(
        "qwen2-attention",
        &set("bias", "all".into()),
        &["`bias` = \"all\""],
    );
    refused(
        "qwen2-attention",
        &set("modules_to_save", serde_json::json!(["lm_head"])),
        &["`modules_to_save`"],
    );
    refused(
        "qwen2-attention",
        &set("rank_pattern", serde_json::json!({"q_proj": 8})),
        &["`rank_pattern`"],
    );
    refused(
        "qwen2-attention",
        &set("layers_to_transform", serde_json::json!([0])),
        &["`layers_to_transform`"],
    );
    refused(
        "qwen2-attention",
        &set("peft_type", "IA3".into()),
        &["peft_type is \"IA3\""],
    );
    refused(
        "qwen2-attention",
        &set("target_modules", serde_json::json!(["q_proj", "lm_head"])),
        &["\"lm_head\" is not supported"],
    );
    refused(
        "qwen2-attention",
        &set("target_modules", ".*proj".into()),
        &["give a list"],
    );
    refused(
        "qwen2-attention",
        &set("some_future_setting", 3.into()),
        &["`some_future_setting` = 3"],
    );
    // The file holds factors for a module the config does not target.
    refused(
        "qwen2-attention",
        &set("target_modules", serde_json::json!(["q_proj"])),
        &["adapts `v_proj`"],
    );
    // Settings that only shape training are accepted.
    let ok = edited(dir.path(), "qwen2-attention", |c| {
        c.insert("lora_dropout".into(), 0.1.into());
        c.insert("init_lora_weights".into(), "gaussian".into());
        c.insert("new_but_unset".into(), serde_json::Value::Null);
    });
    LoraAdapter::load(&ok, &Device::Cpu).unwrap();
    // An adapter for another model: refused before any weight changes.
    let adapter =
        LoraAdapter::load(&peft_fixtures().join("llama-all-linear"), &Device::Cpu).unwrap();
    let other = load("llama-head-dim");
    let before = other.vars()[0]
        .1
        .as_tensor()
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    let e = other.merge_lora(&adapter).unwrap_err().to_string();
    assert!(e.contains("another model"), "{e}");
    let after = other.vars()[0]
        .1
        .as_tensor()
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    assert_eq!(before, after);
    // Missing files.
    let empty = dir.path().join("empty");
    std::fs::create_dir_all(&empty).unwrap();
    let e = LoraAdapter::load(&empty, &Device::Cpu)
        .unwrap_err()
        .to_string();
    assert!(e.contains("adapter_config.json"), "{e}");
}

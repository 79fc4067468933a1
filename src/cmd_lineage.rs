//! `tsr lineage RUN pair ID` and `tsr lineage RUN model DIGEST`: the audit trail of a
//! preference pair (prompt, generators, judge, rule, the DPO step that used it and the model it
//! made) and of a model (back to M0 through every DPO step and its pairs).
//! `tsr export RUN pairs`: every pair with its lineage, TRL-compatible fields included.

use crate::store_read::open_store;
use anyhow::{bail, Context};
use clap::{Args, Subcommand};
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::ExitCode;
use tsr_state::Store;
use tsr_steps::trl::{trl_fields, TrlFormat};
use tsr_workflows::lineage::evals::{annotations_of, finished_evals};
use tsr_workflows::lineage::models::ModelHop;
use tsr_workflows::lineage::{self, final_model, NodeResult};

#[derive(Args)]
pub struct LineageArgs {
    pub run: String,
    #[command(subcommand)]
    pub what: LineageWhat,
    #[arg(long, global = true)]
    pub json: bool,
}

#[derive(Subcommand)]
pub enum LineageWhat {
    /// The chain of one pair (ids as in `tsr export RUN pairs`, e.g. i1-future-guided-q3).
    Pair { id: String },
    /// A model (weights digest, or a unique prefix) walked back to M0.
    Model { digest: String },
    /// Every evaluation judgement of one held-out prompt (its id in the eval prompts file):
    /// both outputs and their generators, the judge, the template, both verdicts.
    Eval { id: String },
    /// A training prompt (its id in the prompts file) through every iteration and phase: each
    /// response with its generator, seed, judgements and score, and what the selection made of
    /// them (the pair, or why there is none).
    Prompt { id: String },
}

/// `bfloat16` or `float16` when the safetensors file at `path` holds weight matrices in that
/// precision (a run's base under `[model] dtype`).
fn half_dtype_of(path: &std::path::Path) -> Option<&'static str> {
    use std::io::Read;
    let mut f = std::fs::File::open(path).ok()?;
    let mut len = [0u8; 8];
    f.read_exact(&mut len).ok()?;
    let n = u64::from_le_bytes(len);
    if n > 64 << 20 {
        return None;
    }
    let mut h = vec![0u8; n as usize];
    f.read_exact(&mut h).ok()?;
    let v: Value = serde_json::from_slice(&h).ok()?;
    v.as_object()?
        .values()
        .find_map(|t| match t["dtype"].as_str() {
            Some("BF16") => Some("bfloat16"),
            Some("F16") => Some("float16"),
            _ => None,
        })
}

fn show_side(v: &tsr_steps::records::Side) -> String {
    let scores: Vec<String> = v
        .scores
        .iter()
        .map(|s| s.map_or("null".to_string(), |s| s.to_string()))
        .collect();
    format!(
        "{} sample {} (seed {}), generator {}, score {:.3}, judge scores [{}]\n      text: {:?}",
        serde_json::to_value(v.role)
            .ok()
            .and_then(|r| r.as_str().map(String::from))
            .unwrap_or_default(),
        v.sample,
        v.seed,
        v.generator_model.short(),
        v.score,
        scores.join(","),
        v.text
    )
}

/// The first 12 hex digits of a digest (all of a shorter text).
fn short(d: &str) -> &str {
    d.get(..12).unwrap_or(d)
}

/// Pretty JSON with sorted keys.
fn pretty_json<T: serde::Serialize>(v: &T) -> anyhow::Result<String> {
    Ok(serde_json::to_string_pretty(&serde_json::to_value(v)?)?)
}

pub fn lineage(store_flag: &Option<PathBuf>, a: LineageArgs) -> anyhow::Result<ExitCode> {
    let store = open_store(&crate::store_dir(store_flag, None))?;
    match a.what {
        LineageWhat::Pair { id } => {
            let l = lineage::pairs::pair(&store, &a.run, &id)?;
            if a.json {
                println!("{}", pretty_json(&l)?);
                return Ok(ExitCode::SUCCESS);
            }
            let p = &l.pair;
            println!("pair {id} (iteration {}, phase {})", p.iteration, p.phase);
            println!(
                "  prompt {} (text digest {}): {:?}",
                p.prompt_id,
                short(&p.prompt_digest),
                p.prompt
            );
            println!("  chosen:   {}", show_side(&p.chosen));
            println!("  rejected: {}", show_side(&p.rejected));
            println!(
                "  judge: model {}, mode {}, template {}",
                p.judge.model,
                p.judge.mode,
                short(&p.judge.template_digest)
            );
            let rule = serde_json::to_value(p.rule)?;
            println!(
                "  rule: {} — {}",
                rule.as_str().unwrap_or_default(),
                p.decision
            );
            println!(
                "  selected by {} (step {})",
                l.select_node,
                short(&l.select_step)
            );
            match &l.training {
                Some(t) => println!(
                    "  trained by {} (step {}): from model {} with reference {} -> model {}",
                    t.dpo_node,
                    short(&t.dpo_step),
                    t.trained_from.map_or("?".into(), |d| d.to_hex()),
                    t.reference_model.map_or("?".into(), |d| d.to_hex()),
                    t.produced_model
                        .map_or("(not finished)".into(), |d| d.to_hex())
                ),
                None => println!("  not yet used by a DPO step"),
            }
        }
        LineageWhat::Eval { id } => return lineage_eval(&store, &a.run, &id, a.json),
        LineageWhat::Prompt { id } => return lineage_prompt(&store, &a.run, &id, a.json),
        LineageWhat::Model { digest } => {
            let chain = lineage::models::model_chain(&store, &a.run, &digest)?;
            if a.json {
                println!("{}", pretty_json(&chain)?);
                return Ok(ExitCode::SUCCESS);
            }
            for hop in &chain {
                match hop {
                    ModelHop::Imported { model, made_by, .. } => {
                        println!("{model}  M0 (imported by {made_by})")
                    }
                    ModelHop::Trained {
                        model,
                        made_by,
                        pairs,
                        pairs_from,
                        reference_model,
                        lora,
                        trained_by,
                        also_made_by,
                        ..
                    } => println!(
                        "{model}  <- {made_by} ({} pairs from {}, reference {}){}{}{}",
                        pairs.map_or("null".to_string(), |n| n.to_string()),
                        pairs_from.as_deref().unwrap_or("?"),
                        reference_model.map_or("?".into(), |d| d.short()),
                        match lora {
                            None => String::new(),
                            Some(l) => format!(
                                "; LoRA adapter r = {}, alpha = {} over base {}",
                                l.r,
                                l.alpha,
                                short(&l.base)
                            ),
                        },
                        match trained_by {
                            None => String::new(),
                            Some(w) => format!("; trained by {}", w.describe()),
                        },
                        if also_made_by.is_empty() {
                            String::new()
                        } else {
                            format!(
                                "; the same weights also made by {}",
                                also_made_by.join(", ")
                            )
                        }
                    ),
                }
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

#[derive(Args)]
pub struct ExportArgs {
    /// The run to export from (or give --model instead, to convert any model).
    #[arg(required_unless_present = "model")]
    pub run: Option<String>,
    /// What to export: `pairs` (JSONL), `model` (a Hugging Face folder, needs --out) or `eval`
    /// (AlpacaEval's files per evaluated model, needs --out).
    #[arg(required_unless_present = "model")]
    pub what: Option<String>,
    /// Convert this model (GGUF, HF folder, Org/Name) to a Hugging Face folder instead
    /// (same as `tsr export-model`).
    #[arg(long, conflicts_with_all = ["run", "what", "node"])]
    pub model: Option<String>,
    /// With `pairs`: TRL's `conversational` format (prompt as messages; the default) or
    /// `standard` (strings, the chat template applied to the prompt).
    #[arg(long, default_value = "conversational")]
    pub format: String,
    /// Output file for pairs (default: standard output); output folder for a model.
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// With `model`: the node whose weights to export (default: the run's final model).
    #[arg(long)]
    pub node: Option<String>,
    /// Replace the --out folder (or file) when it already holds something.
    #[arg(long)]
    pub force: bool,
    /// With `model`, for a run that trains LoRA adapters: write the model's adapter as a PEFT
    /// folder (adapter_config.json + adapter_model.safetensors) instead of the merged model.
    #[arg(long, conflicts_with = "model")]
    pub adapter: bool,
}

/// The config and tokenizer an import step stored (shared by every model of the run).
fn stored_config_and_tokenizer(
    store: &Store,
    import: &NodeResult,
) -> anyhow::Result<(tsr_model::Config, tsr_model::ChatTokenizer)> {
    let blob = |name: &str| -> anyhow::Result<Vec<u8>> {
        let d = import
            .output(name)
            .with_context(|| format!("the import step has no `{name}` output"))?;
        Ok(lineage::read_blob(store, &d)?)
    };
    let cfg_json: Value = serde_json::from_slice(&blob("config")?)
        .context("the stored config.json is not JSON; run `tsr verify`")?;
    let config =
        tsr_model::Config::from_hf_json(&cfg_json, std::path::Path::new("config.json (stored)"))?;
    let tok_config: Value = serde_json::from_slice(&blob("tokenizer_config")?)
        .context("the stored tokenizer_config.json is not JSON; run `tsr verify`")?;
    let tokenizer_json = String::from_utf8(blob("tokenizer")?)
        .context("the stored tokenizer.json is not UTF-8; run `tsr verify`")?;
    let tok = tsr_model::ChatTokenizer::from_parts(
        tokenizer_json,
        tok_config,
        config.eos_token_ids.first().copied(),
        &config.eos_token_ids,
        std::path::Path::new("tokenizer_config.json (stored)"),
    )?;
    Ok((config, tok))
}

fn export_model(store: &Store, a: &ExportArgs) -> anyhow::Result<ExitCode> {
    let run = a.run.as_deref().expect("run given");
    let Some(out) = &a.out else {
        bail!("`tsr export {run} model` needs --out DIR")
    };
    let nodes = lineage::nodes(store, run)?;
    let (node, weights) = match &a.node {
        Some(n) => {
            let r = nodes
                .get(n)
                .with_context(|| format!("run `{run}` has no node `{n}`"))?;
            let w = r
                .output("weights")
                .with_context(|| format!("node `{n}` has no finished `weights` output"))?;
            (r, w)
        }
        None => {
            final_model(&nodes).with_context(|| format!("run `{run}` has no finished model yet"))?
        }
    };
    let base = if node.node == "import-judge" {
        "import-judge"
    } else {
        "import"
    };
    let base = nodes
        .get(base)
        .with_context(|| format!("run `{run}` has no finished `{base}` step"))?;
    let (config, tok) = stored_config_and_tokenizer(store, base)?;
    let files = tsr_model::export::ExportFiles::new(&config, &tok);
    let weights_path = store
        .blobs()
        .verified_path(&weights)
        .with_context(|| format!("reading the weights blob {}", weights.short()))?;
    // A model made by LoRA training is stored as its adapter, which names its base.
    let adapter = tsr_model::StoredAdapter::read(&weights_path).ok();
    if a.adapter {
        let Some(meta) = adapter else {
            bail!(
                "node `{}` holds a fully trained model, not an adapter; export it without --adapter",
                node.node
            )
        };
        tsr_model::StoredAdapter::export(&weights_path, out, a.force)?;
        println!(
            "{}: LoRA adapter {} from node {} (PEFT folder, r = {}, alpha = {}; base model {})",
            out.display(),
            weights,
            node.node,
            meta.r,
            meta.alpha,
            meta.short_base()
        );
        return Ok(ExitCode::SUCCESS);
    }
    if let Some(meta) = adapter {
        let base_weights = base
            .output("weights")
            .with_context(|| format!("the `{}` step has no weights output", base.node))?;
        if base_weights.to_hex() != meta.base_digest {
            bail!(
                "the adapter of node `{}` adapts the base model {}, but the run's base is {}; run `tsr verify`",
                node.node,
                meta.short_base(),
                base_weights.short()
            );
        }
        let base_path = store
            .blobs()
            .verified_path(&base_weights)
            .with_context(|| format!("reading the base weights blob {}", base_weights.short()))?;
        let lora = tsr_model::StoredAdapter::load(
            &weights_path,
            &meta.base_digest,
            &tsr_model::Device::Cpu,
        )?;
        tsr_model::export::export_hf_folder(&files, out, a.force, |w| {
            tsr_model::adapter::write_merged(&base_path, &lora, w)
        })?;
        println!(
            "{}: model {} from node {} (Hugging Face layout: base {} with the LoRA adapter merged in; --adapter writes the adapter alone)",
            out.display(),
            weights,
            node.node,
            base_weights.short()
        );
        return Ok(ExitCode::SUCCESS);
    }
    // A base held in half precision is exported as stored: say so in config.json.
    let mut files = files;
    if let Some(dt) = half_dtype_of(&weights_path) {
        files.config["dtype"] = json!(dt);
        files.config["torch_dtype"] = json!(dt);
    }
    tsr_model::export::export_hf_folder(&files, out, a.force, |w| {
        let mut f = std::fs::File::open(&weights_path).map_err(|e| tsr_model::ModelError::Io {
            path: weights_path.clone(),
            source: e,
        })?;
        std::io::copy(&mut f, w)
            .map(|_| ())
            .map_err(|e| tsr_model::ModelError::Io {
                path: weights_path.clone(),
                source: e,
            })
    })?;
    println!(
        "{}: model {} from node {} (Hugging Face layout)",
        out.display(),
        weights,
        node.node
    );
    Ok(ExitCode::SUCCESS)
}

pub fn export(store_flag: &Option<PathBuf>, a: ExportArgs) -> anyhow::Result<ExitCode> {
    if let Some(model) = &a.model {
        let Some(out) = &a.out else {
            bail!("`tsr export --model M` needs --out DIR")
        };
        crate::cmd_model::run_export_model(crate::cmd_model::ExportModelArgs {
            model: model.clone(),
            out: out.clone(),
            device: "cpu".into(),
            force: a.force,
        })?;
        return Ok(ExitCode::SUCCESS);
    }
    let run = a
        .run
        .clone()
        .expect("clap: run is required without --model");
    let what = a
        .what
        .clone()
        .expect("clap: what is required without --model");
    let a = ExportArgs {
        run: Some(run.clone()),
        what: Some(what.clone()),
        ..a
    };
    if a.adapter && what != "model" {
        bail!("--adapter goes with `tsr export RUN model`, not `{what}`");
    }
    if what == "model" {
        let store = open_store(&crate::store_dir(store_flag, None))?;
        return export_model(&store, &a);
    }
    if what == "eval" {
        let store = open_store(&crate::store_dir(store_flag, None))?;
        return export_eval(&store, &run, &a);
    }
    if what != "pairs" {
        bail!("`tsr export RUN {what}`: export `pairs`, `model` or `eval`");
    }
    let format: TrlFormat = a
        .format
        .parse()
        .map_err(|e: String| anyhow::anyhow!("--format: {e}"))?;
    let store = open_store(&crate::store_dir(store_flag, None))?;
    let pairs = lineage::pairs::pairs_with_consumers(&store, &run)?;
    // Every pair (judge pairs too) trains the run's model, with the run's tokenizer.
    let tok = match format {
        TrlFormat::Conversational => None,
        TrlFormat::Standard => {
            let nodes = lineage::nodes(&store, &run)?;
            let import = nodes
                .get("import")
                .with_context(|| format!("run `{run}` has no finished `import` step"))?;
            Some(stored_config_and_tokenizer(&store, import)?.1)
        }
    };
    let mut buf = Vec::new();
    for l in pairs {
        let p = &l.pair;
        let fields = trl_fields(
            format,
            &p.prompt,
            &p.chosen.text,
            &p.rejected.text,
            tok.as_ref(),
        )
        .with_context(|| format!("pair {}", p.pair_id))?;
        let mut p = l.to_value();
        let obj = p
            .as_object_mut()
            .expect("a pair's lineage is a JSON object");
        let chosen = obj.remove("chosen").unwrap_or(Value::Null);
        let rejected = obj.remove("rejected").unwrap_or(Value::Null);
        let prompt = obj.get("prompt").cloned().unwrap_or(Value::Null);
        obj.insert("prompt_text".into(), prompt);
        obj.extend(fields);
        obj.insert("chosen_lineage".into(), chosen);
        obj.insert("rejected_lineage".into(), rejected);
        serde_json::to_writer(&mut buf, &p)?;
        buf.push(b'\n');
    }
    match a.out {
        Some(path) => {
            if path.exists() && !a.force {
                bail!(
                    "{} already exists; choose another file or pass --force to replace it",
                    path.display()
                );
            }
            crate::write_file_atomic(&path, &buf)?;
        }
        None => crate::print_bytes(&buf)?,
    }
    Ok(ExitCode::SUCCESS)
}

/// A generator as exported: a model's weights digest shortened to 12 hex digits (what
/// `tsr lineage RUN model` accepts); a reference file's generator name as it is.
fn short_generator(g: &str) -> String {
    if g.len() == 64 && g.bytes().all(|b| b.is_ascii_hexdigit()) {
        g[..12].to_string()
    } else {
        g.to_string()
    }
}

/// `tsr export RUN eval --out DIR`: per evaluated model `DIR/<model>/model_outputs.json` and
/// `DIR/<model>/annotations.json` in AlpacaEval's formats, `DIR/baseline_outputs.json`, and
/// `DIR/summary.json` with tsr's metrics.
fn export_eval(store: &Store, run: &str, a: &ExportArgs) -> anyhow::Result<ExitCode> {
    let Some(out) = &a.out else {
        bail!("`tsr export {run} eval` writes a folder of files; give --out DIR")
    };
    let labels = export_eval_to(store, run, out, a.force)?;
    say!(
        "{}: {} evaluated model(s) ({}) in AlpacaEval's format",
        out.display(),
        labels.len(),
        labels.join(", ")
    );
    Ok(ExitCode::SUCCESS)
}

/// Writes the evaluation files of `run` to the folder `out` (whole or not at all); returns the
/// evaluated models' labels.
pub fn export_eval_to(
    store: &Store,
    run: &str,
    out: &std::path::Path,
    force: bool,
) -> anyhow::Result<Vec<String>> {
    let evals = finished_evals(store, run)?;
    let labels: Vec<String> = evals.iter().map(|e| e.label.clone()).collect();
    let mut files: Vec<(String, Vec<u8>)> = Vec::new();
    let pretty = |v: &Value| serde_json::to_vec_pretty(v).expect("JSON value serializes");
    let mut baseline: Option<Value> = None;
    let mut summaries = Vec::new();
    for e in &evals {
        let rows = annotations_of(store, e)?;
        let outputs: Vec<Value> = rows
            .iter()
            .map(|r| json!({"instruction": r.instruction, "output": r.output_2, "generator": short_generator(&r.generator_2)}))
            .collect();
        if baseline.is_none() {
            baseline = Some(Value::Array(
                rows.iter()
                    .map(|r| json!({"instruction": r.instruction, "output": r.output_1, "generator": short_generator(&r.generator_1)}))
                    .collect(),
            ));
        }
        let annotations: Vec<Value> = rows
            .iter()
            .map(|r| {
                let raw: BTreeMap<String, Value> = r
                    .verdicts
                    .iter()
                    .map(|v| {
                        let key = serde_json::to_value(v.order)
                            .ok()
                            .and_then(|k| k.as_str().map(String::from))
                            .unwrap_or_default();
                        let val = match (&v.text, v.prob_a, v.prob_b) {
                            (Some(t), _, _) => json!(t),
                            (None, Some(pa), Some(pb)) => json!({"A": pa, "B": pb}),
                            _ => Value::Null,
                        };
                        (key, val)
                    })
                    .collect();
                let mut row = json!({
                    "instruction": r.instruction,
                    "output_1": r.output_1,
                    "output_2": r.output_2,
                    "generator_1": short_generator(&r.generator_1),
                    "generator_2": short_generator(&r.generator_2),
                    "preference": r.preference,
                    // An API judge reproduces AlpacaEval's annotator, under its name.
                    "annotator": match &r.api {
                        Some(api) => api.annotator.clone(),
                        None => format!("tsr_{}_{}", r.mode, r.judge_model.short()),
                    },
                    "raw_completion": raw,
                    "prompt_id": r.prompt_id,
                    "decision": r.decision,
                    "verdicts": r.verdicts,
                    // As tsr stores it (64 hex digits), so the file reads back as annotations.
                    "judge_model": r.judge_model.to_hex(),
                    "template_digest": r.template_digest,
                    "mode": r.mode,
                    "answer": r.answer,
                    "correct": r.correct,
                    "baseline_correct": r.baseline_correct,
                });
                if let Some(api) = &r.api {
                    row["api"] = json!(api);
                }
                row
            })
            .collect();
        files.push((
            format!("{}/model_outputs.json", e.label),
            pretty(&Value::Array(outputs)),
        ));
        files.push((
            format!("{}/annotations.json", e.label),
            pretty(&Value::Array(annotations)),
        ));
        let mut entry = json!({"model": e.label, "node": e.node, "summary": e.summary});
        // AlpacaEval 2.0's length-controlled win rate, where the run computed it.
        if let Some(lc) = &e.lc {
            entry["lc"] = json!(lc);
        }
        summaries.push(entry);
    }
    files.push((
        "baseline_outputs.json".into(),
        pretty(&baseline.unwrap_or(Value::Array(vec![]))),
    ));
    files.push(("summary.json".into(), pretty(&Value::Array(summaries))));
    let replaceable = |name: &str| {
        name == "summary.json"
            || name == "baseline_outputs.json"
            || name == "model"
            || (name.starts_with('M')
                && name
                    .trim_start_matches("Mf")
                    .trim_start_matches('M')
                    .parse::<u32>()
                    .is_ok())
    };
    tsr_model::export::write_folder_whole(
        out,
        force,
        "tsr evaluation export",
        &replaceable,
        |dir| {
            for (name, bytes) in &files {
                let path = dir.join(name);
                let parent = tsr_state::fsio::parent_of(&path);
                std::fs::create_dir_all(&parent)
                    .map_err(tsr_state::fsio::PathError::at(&parent))?;
                tsr_state::fsio::create_synced(&path, |w| {
                    w.write_all(bytes)
                        .map_err(tsr_state::fsio::PathError::at(&path))
                })?;
            }
            for label in &labels {
                tsr_state::fsio::sync_dir(&dir.join(label))?;
            }
            Ok(())
        },
    )?;
    Ok(labels)
}

/// `tsr lineage RUN eval ID`.
fn lineage_eval(store: &Store, run: &str, id: &str, as_json: bool) -> anyhow::Result<ExitCode> {
    let found = lineage::evals::eval_lineage(store, run, id)?;
    if as_json {
        say!("{}", pretty_json(&found)?);
        return Ok(ExitCode::SUCCESS);
    }
    let first = &found[0].annotation;
    say!("evaluation prompt {id}: {:?}", first.instruction);
    if let Some(ans) = &first.answer {
        say!("  known answer: {ans}");
    }
    for e in &found {
        let r = &e.annotation;
        say!("");
        say!(
            "{} (node {}): preference {} — {}",
            e.model,
            e.node,
            r.preference
                .map(|p| p.to_string())
                .unwrap_or_else(|| "none".into()),
            r.decision
        );
        say!(
            "  baseline ({}): {:?}",
            short_generator(&r.generator_1),
            r.output_1
        );
        say!(
            "  model    ({}): {:?}",
            short_generator(&r.generator_2),
            r.output_2
        );
        if let Some(c) = r.correct {
            say!(
                "  exact match: model {}, baseline {}",
                if c { "correct" } else { "wrong" },
                match r.baseline_correct {
                    Some(true) => "correct",
                    Some(false) => "wrong",
                    None => "-",
                }
            );
        }
        match &r.api {
            Some(api) => say!(
                "  judge: {} ({} answered as {}{}), annotator {}, template {}; {} tokens in, {} out, {} tries",
                api.requested_model,
                api.id.as_deref().unwrap_or("no id"),
                api.model.as_deref().unwrap_or("?"),
                api.system_fingerprint
                    .as_deref()
                    .map(|f| format!(", fingerprint {f}"))
                    .unwrap_or_default(),
                api.annotator,
                &r.template_digest[..12.min(r.template_digest.len())],
                api.prompt_tokens.unwrap_or(0),
                api.completion_tokens.unwrap_or(0),
                api.tries
            ),
            None => say!(
                "  judge: model {}, mode {}, template {}",
                r.judge_model.short(),
                r.mode,
                &r.template_digest[..12.min(r.template_digest.len())]
            ),
        }
        if let Some(w) = &e.judged_by {
            say!("  judged by {}", w.describe());
        }
        for v in &r.verdicts {
            let order = match v.order {
                tsr_steps::records::Order::BaselineFirst => "baseline as A",
                tsr_steps::records::Order::ModelFirst => "model as A",
            };
            let prefers = match &v.prefers {
                tsr_steps::records::Prefers::Baseline => "baseline".to_string(),
                tsr_steps::records::Prefers::Model => "model".to_string(),
                tsr_steps::records::Prefers::Tie => "tie".to_string(),
                tsr_steps::records::Prefers::Unparsed(why) => format!("unreadable ({why})"),
            };
            match (&v.text, v.prob_a, v.prob_b) {
                (Some(t), _, _) => say!("  verdict, {order}: {prefers}; judge wrote {t:?}"),
                (None, Some(pa), Some(pb)) => {
                    say!("  verdict, {order}: {prefers}; P(A) {pa:.4}, P(B) {pb:.4}")
                }
                _ => say!("  verdict, {order}: {prefers}"),
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// `tsr lineage RUN prompt ID`.
fn lineage_prompt(store: &Store, run: &str, id: &str, as_json: bool) -> anyhow::Result<ExitCode> {
    let l = lineage::prompts::prompt_lineage(store, run, id)?;
    if as_json {
        say!("{}", pretty_json(&l)?);
        return Ok(ExitCode::SUCCESS);
    }
    let prompt = &l.prompt;
    say!("prompt {id}: {prompt:?}");
    for ph in &l.phases {
        say!("");
        say!(
            "iteration {}, phase {} ({}, rule {})",
            ph.iteration,
            ph.phase,
            ph.node,
            serde_json::to_value(ph.rule)?.as_str().unwrap_or_default()
        );
        for set in &ph.sets {
            say!(
                "  {} responses (model {}):",
                set.set,
                set.generator_model.map_or("?".into(), |d| d.short())
            );
            // Who computed them: each distinct worker once (a set can span batches).
            for (what, who) in [
                (
                    "generated by",
                    set.responses
                        .iter()
                        .filter_map(|r| r.generated_by.as_ref())
                        .collect::<Vec<_>>(),
                ),
                (
                    "judged by",
                    set.responses
                        .iter()
                        .filter_map(|r| r.judgements.as_ref()?.judged_by.as_ref())
                        .collect(),
                ),
            ] {
                let mut seen: Vec<String> = Vec::new();
                for w in who {
                    let d = w.describe();
                    if !seen.contains(&d) {
                        say!("    {what} {d}");
                        seen.push(d);
                    }
                }
            }
            for r in &set.responses {
                let score = r
                    .score
                    .map(|s| format!("{s:.3}"))
                    .unwrap_or_else(|| "unscored".into());
                let texts = r.judgements.as_ref().map_or(0, |j| j.texts.len());
                let judged = if texts > 0 {
                    format!(", {texts} written judgements")
                } else {
                    String::new()
                };
                let short: String = r.text.chars().take(70).collect();
                let more = if r.text.chars().count() > 70 {
                    "..."
                } else {
                    ""
                };
                say!(
                    "    sample {} (seed {}, {} tokens): score {score}{judged}: {short:?}{more}",
                    r.sample,
                    r.seed,
                    r.tokens
                );
            }
        }
        match &ph.pair_id {
            Some(p) => say!("  -> {} ({p}; tsr lineage {run} pair {p})", ph.decision),
            None => say!("  -> {}", ph.decision),
        }
    }
    Ok(ExitCode::SUCCESS)
}

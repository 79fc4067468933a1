//! `tsr lineage RUN pair ID` and `tsr lineage RUN model DIGEST`: the audit trail of a
//! preference pair (prompt, generators, judge, rule, the DPO step that used it and the model it
//! made) and of a model (back to M0 through every DPO step and its pairs).
//! `tsr export RUN pairs`: every pair with its lineage, TRL-compatible fields included.

use crate::store_read::{self, NodeResult};
use crate::store_read::{final_model, open_store};
use anyhow::{bail, Context};
use clap::{Args, Subcommand};
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::ExitCode;
use tsr_state::Store;
use tsr_steps::trl::{trl_fields, TrlFormat};

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

/// The reference model of a DPO node: the model of the `ref-logprobs` step whose output it read.
fn reference_of(nodes: &BTreeMap<String, NodeResult>, dpo: &NodeResult) -> Option<String> {
    dpo.step
        .inputs
        .get("ref_logps")
        .and_then(|r| nodes.values().find(|n| n.output("logps") == Some(*r)))
        .and_then(|n| n.step.inputs.get("model.weights"))
        .map(|x| x.to_hex())
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

/// When the node made a LoRA adapter (its `weights` output is one): its rank, alpha and the
/// digest of the base it adapts.
pub fn adapter_of(store: &Store, node: &NodeResult) -> anyhow::Result<Option<Value>> {
    let Some(w) = node.output("weights") else {
        return Ok(None);
    };
    // Only a DPO step configured for LoRA makes adapters; its header alone is read (a damaged
    // blob is `tsr verify`'s to report, not a reason for status or lineage to fail).
    if node.step.kind != "dpo" || !node.step.config.contains("\"lora\"") {
        return Ok(None);
    }
    Ok(tsr_model::StoredAdapter::read(&store.blobs().path(&w))
        .ok()
        .map(|m| json!({"r": m.r, "alpha": m.alpha, "base": m.base_digest})))
}

/// Every pair of a run with the DPO step that consumed it and the model that step made.
pub fn pairs_with_consumers(store: &Store, run: &str) -> anyhow::Result<Vec<Value>> {
    let nodes = store_read::nodes(store, run)?;
    let dpos = store_read::of_kind(&nodes, "dpo");
    let mut out = Vec::new();
    for sel in store_read::of_kind(&nodes, "select") {
        let Some(pairs_digest) = sel.output("pairs") else {
            continue;
        };
        let consumer: Option<&&NodeResult> = dpos
            .iter()
            .find(|d| d.step.inputs.get("pairs") == Some(&pairs_digest));
        for mut p in store_read::jsonl(store, &pairs_digest)? {
            let obj = p.as_object_mut().context("a pair is not a JSON object")?;
            obj.insert("select_node".into(), json!(sel.node));
            obj.insert("select_step".into(), json!(sel.key.to_hex()));
            if let Some(d) = consumer {
                obj.insert("dpo_node".into(), json!(d.node));
                obj.insert("dpo_step".into(), json!(d.key.to_hex()));
                obj.insert(
                    "trained_from".into(),
                    json!(d.step.inputs.get("model.weights").map(|x| x.to_hex())),
                );
                obj.insert(
                    "produced_model".into(),
                    json!(d.output("weights").map(|x| x.to_hex())),
                );
                obj.insert("reference_model".into(), json!(reference_of(&nodes, d)));
            }
            out.push(p);
        }
    }
    Ok(out)
}

fn show_side(v: &Value) -> String {
    format!(
        "{} sample {} (seed {}), generator {}, score {:.3}, judge scores {}\n      text: {:?}",
        v["role"].as_str().unwrap_or("?"),
        v["sample"],
        v["seed"],
        &v["generator_model"].as_str().unwrap_or("?")
            [..12.min(v["generator_model"].as_str().unwrap_or("?").len())],
        v["score"].as_f64().unwrap_or(f64::NAN),
        v["scores"],
        v["text"].as_str().unwrap_or("")
    )
}

fn resolve_model(nodes: &BTreeMap<String, NodeResult>, prefix: &str) -> anyhow::Result<String> {
    let mut all: Vec<String> = nodes
        .values()
        .filter_map(|n| n.output("weights"))
        .map(|d| d.to_hex())
        .collect();
    all.sort();
    all.dedup();
    let hits: Vec<&String> = all.iter().filter(|d| d.starts_with(prefix)).collect();
    match hits.as_slice() {
        [one] => Ok((*one).clone()),
        [] => bail!(
            "no model of this run has a digest starting with `{prefix}`; models: {}",
            all.iter().map(|d| &d[..12]).collect::<Vec<_>>().join(", ")
        ),
        _ => bail!("`{prefix}` matches {} models; give more digits", hits.len()),
    }
}

pub fn lineage(store_flag: &Option<PathBuf>, a: LineageArgs) -> anyhow::Result<ExitCode> {
    let store = open_store(&crate::store_dir(store_flag, None))?;
    match a.what {
        LineageWhat::Pair { id } => {
            let pairs = pairs_with_consumers(&store, &a.run)?;
            let Some(p) = pairs.iter().find(|p| p["pair_id"] == id.as_str()) else {
                bail!(
                    "run `{}` has no pair `{id}`; `tsr export {} pairs` lists them",
                    a.run,
                    a.run
                );
            };
            if a.json {
                println!("{}", serde_json::to_string_pretty(p)?);
                return Ok(ExitCode::SUCCESS);
            }
            println!(
                "pair {id} (iteration {}, phase {})",
                p["iteration"],
                p["phase"].as_str().unwrap_or("")
            );
            println!(
                "  prompt {} (text digest {}): {:?}",
                p["prompt_id"].as_str().unwrap_or(""),
                &p["prompt_digest"].as_str().unwrap_or("")[..12],
                p["prompt"].as_str().unwrap_or("")
            );
            println!("  chosen:   {}", show_side(&p["chosen"]));
            println!("  rejected: {}", show_side(&p["rejected"]));
            println!(
                "  judge: model {}, mode {}, template {}",
                p["judge"]["model"].as_str().unwrap_or(""),
                p["judge"]["mode"].as_str().unwrap_or(""),
                &p["judge"]["template_digest"].as_str().unwrap_or("")[..12]
            );
            println!(
                "  rule: {} — {}",
                p["rule"].as_str().unwrap_or(""),
                p["decision"].as_str().unwrap_or("")
            );
            println!(
                "  selected by {} (step {})",
                p["select_node"].as_str().unwrap_or(""),
                &p["select_step"].as_str().unwrap_or("")[..12]
            );
            match p.get("dpo_node") {
                Some(d) => println!(
                    "  trained by {} (step {}): from model {} with reference {} -> model {}",
                    d.as_str().unwrap_or(""),
                    &p["dpo_step"].as_str().unwrap_or("")[..12],
                    p["trained_from"].as_str().unwrap_or("?"),
                    p["reference_model"].as_str().unwrap_or("?"),
                    p["produced_model"].as_str().unwrap_or("(not finished)")
                ),
                None => println!("  not yet used by a DPO step"),
            }
        }
        LineageWhat::Eval { id } => return lineage_eval(&store, &a.run, &id, a.json),
        LineageWhat::Prompt { id } => return lineage_prompt(&store, &a.run, &id, a.json),
        LineageWhat::Model { digest } => {
            let nodes = store_read::nodes(&store, &a.run)?;
            let mut cur = resolve_model(&nodes, &digest)?;
            let mut chain = Vec::new();
            loop {
                let maker = nodes
                    .values()
                    .find(|n| n.output("weights").map(|d| d.to_hex()) == Some(cur.clone()));
                let Some(maker) = maker else { break };
                if maker.step.kind == "import-model" {
                    chain.push(json!({"model": cur, "made_by": maker.node, "kind": "import-model", "note": "M0, the initial model"}));
                    break;
                }
                let parent = maker.step.inputs.get("model.weights").map(|d| d.to_hex());
                let pairs = maker
                    .step
                    .inputs
                    .get("pairs")
                    .map(|d| store_read::jsonl(&store, d).map(|v| v.len()))
                    .transpose()?;
                let reference = reference_of(&nodes, maker);
                let select = maker
                    .step
                    .inputs
                    .get("pairs")
                    .and_then(|p| nodes.values().find(|n| n.output("pairs") == Some(*p)))
                    .map(|n| n.node.clone());
                let adapter = adapter_of(&store, maker)?;
                chain.push(json!({"model": cur, "made_by": maker.node, "kind": maker.step.kind, "dpo_step": maker.key.to_hex(),
                    "pairs": pairs, "pairs_from": select, "reference_model": reference, "trained_from": parent,
                    "lora": adapter}));
                match parent {
                    Some(p) if p != cur => cur = p,
                    _ => break,
                }
            }
            if a.json {
                println!("{}", serde_json::to_string_pretty(&chain)?);
            } else {
                for hop in &chain {
                    if hop["kind"] == "import-model" {
                        println!(
                            "{}  M0 (imported by {})",
                            hop["model"].as_str().unwrap_or(""),
                            hop["made_by"].as_str().unwrap_or("")
                        );
                    } else {
                        let short = |k: &str| {
                            let s = hop[k].as_str().unwrap_or("?");
                            s.get(..12).unwrap_or(s).to_string()
                        };
                        let lora = &hop["lora"];
                        println!(
                            "{}  <- {} ({} pairs from {}, reference {}){}",
                            hop["model"].as_str().unwrap_or(""),
                            hop["made_by"].as_str().unwrap_or(""),
                            hop["pairs"],
                            hop["pairs_from"].as_str().unwrap_or("?"),
                            short("reference_model"),
                            if lora.is_null() {
                                String::new()
                            } else {
                                format!(
                                    "; LoRA adapter r = {}, alpha = {} over base {}",
                                    lora["r"],
                                    lora["alpha"].as_f64().unwrap_or(f64::NAN),
                                    lora["base"]
                                        .as_str()
                                        .map(|b| b.get(..12).unwrap_or(b))
                                        .unwrap_or("?")
                                )
                            }
                        );
                    }
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
        store_read::read_blob(store, &d)
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
    let nodes = store_read::nodes(store, run)?;
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
    let pairs = pairs_with_consumers(&store, &run)?;
    // Every pair (judge pairs too) trains the run's model, with the run's tokenizer.
    let tok = match format {
        TrlFormat::Conversational => None,
        TrlFormat::Standard => {
            let nodes = store_read::nodes(&store, &run)?;
            let import = nodes
                .get("import")
                .with_context(|| format!("run `{run}` has no finished `import` step"))?;
            Some(stored_config_and_tokenizer(&store, import)?.1)
        }
    };
    let mut buf = Vec::new();
    for mut p in pairs {
        let id = p["pair_id"].clone();
        let field = |v: &Value, what: &str| -> anyhow::Result<String> {
            v.as_str()
                .map(String::from)
                .with_context(|| format!("pair {id} has no {what} text; run `tsr verify`"))
        };
        let prompt = field(&p["prompt"], "prompt")?;
        let chosen_text = field(&p["chosen"]["text"], "chosen")?;
        let rejected_text = field(&p["rejected"]["text"], "rejected")?;
        let fields = trl_fields(format, &prompt, &chosen_text, &rejected_text, tok.as_ref())
            .with_context(|| format!("pair {id}"))?;
        let obj = p.as_object_mut().context("a pair is not a JSON object")?;
        let chosen = obj.remove("chosen").unwrap_or(Value::Null);
        let rejected = obj.remove("rejected").unwrap_or(Value::Null);
        obj.insert("prompt_text".into(), json!(prompt));
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

fn annotations_of(
    store: &Store,
    e: &store_read::EvalResult,
) -> anyhow::Result<Vec<tsr_steps::records::Annotation>> {
    store_read::jsonl(store, &e.annotations)?
        .into_iter()
        .map(|v| {
            serde_json::from_value(v)
                .context("an evaluation annotation cannot be read; run `tsr verify`")
        })
        .collect()
}

fn finished_evals(store: &Store, run: &str) -> anyhow::Result<Vec<store_read::EvalResult>> {
    let nodes = store_read::nodes(store, run)?;
    let evals = store_read::evals(store, &nodes)?;
    if evals.is_empty() {
        bail!(
            "run `{run}` has no finished evaluation; give it an [eval] section and run it (or use `tsr eval`)"
        );
    }
    Ok(evals)
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
                json!({
                    "instruction": r.instruction,
                    "output_1": r.output_1,
                    "output_2": r.output_2,
                    "generator_1": short_generator(&r.generator_1),
                    "generator_2": short_generator(&r.generator_2),
                    "preference": r.preference,
                    "annotator": format!("tsr_{}_{}", r.mode, short_generator(&r.judge_model)),
                    "raw_completion": raw,
                    "prompt_id": r.prompt_id,
                    "decision": r.decision,
                    "verdicts": r.verdicts,
                    "judge_model": r.judge_model,
                    "template_digest": r.template_digest,
                    "mode": r.mode,
                    "answer": r.answer,
                    "correct": r.correct,
                    "baseline_correct": r.baseline_correct,
                })
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
        summaries.push(json!({"model": e.label, "node": e.node, "summary": e.summary}));
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
                let write = || -> std::io::Result<()> {
                    if let Some(parent) = path.parent() {
                        std::fs::create_dir_all(parent)?;
                    }
                    let mut f = std::fs::File::create(&path)?;
                    std::io::Write::write_all(&mut f, bytes)?;
                    f.sync_all()
                };
                write().map_err(|e| tsr_model::ModelError::Io {
                    path: path.clone(),
                    source: e,
                })?;
            }
            for label in &labels {
                let d = dir.join(label);
                std::fs::File::open(&d)
                    .and_then(|f| f.sync_all())
                    .map_err(|e| tsr_model::ModelError::Io {
                        path: d.clone(),
                        source: e,
                    })?;
            }
            Ok(())
        },
    )?;
    Ok(labels)
}

/// `tsr lineage RUN eval ID`.
fn lineage_eval(store: &Store, run: &str, id: &str, as_json: bool) -> anyhow::Result<ExitCode> {
    let evals = finished_evals(store, run)?;
    let mut found = Vec::new();
    for e in &evals {
        if let Some(r) = annotations_of(store, e)?
            .into_iter()
            .find(|r| r.prompt_id == id)
        {
            found.push((e, r));
        }
    }
    if found.is_empty() {
        bail!("run `{run}` has no evaluation of prompt `{id}`; `tsr export {run} eval --out DIR` lists them");
    }
    if as_json {
        let v: Vec<Value> = found
            .iter()
            .map(|(e, r)| json!({"model": e.label, "node": e.node, "annotation": r}))
            .collect();
        say!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(ExitCode::SUCCESS);
    }
    let (_, first) = &found[0];
    say!("evaluation prompt {id}: {:?}", first.instruction);
    if let Some(ans) = &first.answer {
        say!("  known answer: {ans}");
    }
    for (e, r) in &found {
        say!("");
        say!(
            "{} (node {}): preference {} — {}",
            e.label,
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
        say!(
            "  judge: model {}, mode {}, template {}",
            short_generator(&r.judge_model),
            r.mode,
            &r.template_digest[..12.min(r.template_digest.len())]
        );
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
    use tsr_steps::records::Judgement;
    use tsr_steps::records::Response;
    use tsr_steps::records::Role;
    use tsr_steps::records::{Pair, Rule};
    use tsr_steps::rules::selection::candidates_of;
    use tsr_steps::rules::selection::decide;
    use tsr_steps::rules::selection::LengthControl;
    let nodes = store_read::nodes(store, run)?;
    let mut selects: Vec<&NodeResult> = store_read::of_kind(&nodes, "select");
    selects.retain(|n| matches!(n.step.status, tsr_state::StepStatus::Done { .. }));
    if selects.is_empty() {
        bail!("run `{run}` has no finished selection step yet");
    }
    let read_rows =
        |d: &tsr_state::Digest| -> anyhow::Result<Vec<Value>> { store_read::jsonl(store, d) };
    let typed = |d: &tsr_state::Digest, what: &str| -> anyhow::Result<Vec<Value>> {
        read_rows(d).with_context(|| format!("reading recorded {what}"))
    };
    let mut prompt_text: Option<String> = None;
    let mut phases: Vec<Value> = Vec::new();
    for n in &selects {
        let cfg: Value = serde_json::from_str(&n.step.config)
            .context("a select step's config cannot be read")?;
        let rule: Rule =
            serde_json::from_value(cfg["rule"].clone()).context("a select step's rule")?;
        let lc = cfg["length_band"]
            .as_f64()
            .map(|band| LengthControl { band });
        let inputs = &n.step.inputs;
        if prompt_text.is_none() {
            if let Some(d) = inputs.get("prompts") {
                prompt_text = typed(d, "prompts")?
                    .into_iter()
                    .find(|p| p["id"] == id)
                    .and_then(|p| p["prompt"].as_str().map(String::from));
            }
        }
        let mut sets = Vec::new();
        let mut cands: BTreeMap<&str, Vec<tsr_steps::rules::selection::Candidate>> =
            BTreeMap::new();
        for (prefix, role) in [
            ("current", Role::Current),
            ("anchor", Role::Anchor),
            ("future", Role::Future),
        ] {
            let (Some(rd), Some(jd)) = (
                inputs.get(&format!("{prefix}_responses")),
                inputs.get(&format!("{prefix}_judgements")),
            ) else {
                continue;
            };
            let responses: Vec<Response> = typed(rd, "responses")?
                .into_iter()
                .filter(|r| r["prompt_id"] == id)
                .map(serde_json::from_value)
                .collect::<Result<_, _>>()
                .context("a recorded response cannot be read; run `tsr verify`")?;
            let judgements: Vec<Judgement> = typed(jd, "judgements")?
                .into_iter()
                .filter(|j| j["prompt_id"] == id)
                .map(serde_json::from_value)
                .collect::<Result<_, _>>()
                .context("a recorded judgement cannot be read; run `tsr verify`")?;
            cands.insert(prefix, candidates_of(&responses, &judgements, id, role));
            let model = inputs
                .get(&format!("{prefix}_model"))
                .map(|d| d.to_hex())
                .unwrap_or_default();
            let rows: Vec<Value> = responses
                .iter()
                .map(|r| {
                    let j = judgements.iter().find(|j| j.sample == r.sample);
                    json!({
                        "sample": r.sample, "seed": r.seed, "tokens": r.tokens, "finish": r.finish, "text": r.text,
                        "score": j.and_then(|j| j.score),
                        "judgements": j.map(|j| json!({"texts": j.texts, "verdicts": j.verdicts, "probs": j.probs})),
                    })
                })
                .collect();
            sets.push(json!({"set": prefix, "generator_model": model, "responses": rows}));
        }
        let phase1: Option<Pair> = match inputs.get("phase1_pairs") {
            Some(d) => typed(d, "phase-1 pairs")?
                .into_iter()
                .filter(|p| p["prompt_id"] == id)
                .map(serde_json::from_value::<Pair>)
                .collect::<Result<Vec<_>, _>>()
                .context("a recorded pair cannot be read; run `tsr verify`")?
                .into_iter()
                .find(|p| !p.is_judge()),
            None => None,
        };
        let outcome = decide(
            rule,
            lc,
            cands.get("current").map(Vec::as_slice).unwrap_or(&[]),
            cands.get("anchor").map(Vec::as_slice),
            cands.get("future").map(Vec::as_slice),
            phase1.as_ref(),
        );
        let pair_id = match n.output("pairs") {
            Some(d) => read_rows(&d)?
                .into_iter()
                .find(|p| p["prompt_id"] == id && p["kind"] != "judge")
                .and_then(|p| p["pair_id"].as_str().map(String::from)),
            None => None,
        };
        phases.push(json!({
            "iteration": cfg["iteration"], "phase": cfg["phase"], "node": n.node, "rule": cfg["rule"],
            "sets": sets, "decision": outcome.describe(), "pair_id": pair_id,
        }));
    }
    let Some(prompt) = prompt_text else {
        bail!("run `{run}` has no training prompt `{id}`; the ids are those of the prompts file (or the 12-digit text digest for lines without an id)");
    };
    if as_json {
        say!(
            "{}",
            serde_json::to_string_pretty(
                &json!({"prompt_id": id, "prompt": prompt, "phases": phases})
            )?
        );
        return Ok(ExitCode::SUCCESS);
    }
    say!("prompt {id}: {prompt:?}");
    for ph in &phases {
        say!("");
        say!(
            "iteration {}, phase {} ({}, rule {})",
            ph["iteration"],
            ph["phase"].as_str().unwrap_or(""),
            ph["node"].as_str().unwrap_or(""),
            ph["rule"].as_str().unwrap_or("")
        );
        for set in ph["sets"].as_array().into_iter().flatten() {
            let model = set["generator_model"].as_str().unwrap_or("");
            say!(
                "  {} responses (model {}):",
                set["set"].as_str().unwrap_or(""),
                &model[..12.min(model.len())]
            );
            for r in set["responses"].as_array().into_iter().flatten() {
                let score = r["score"]
                    .as_f64()
                    .map(|s| format!("{s:.3}"))
                    .unwrap_or_else(|| "unscored".into());
                let texts = r["judgements"]["texts"].as_array().map_or(0, |t| t.len());
                let judged = if texts > 0 {
                    format!(", {texts} written judgements")
                } else {
                    String::new()
                };
                let text = r["text"].as_str().unwrap_or("");
                let short: String = text.chars().take(70).collect();
                let more = if text.chars().count() > 70 { "..." } else { "" };
                say!(
                    "    sample {} (seed {}, {} tokens): score {score}{judged}: {short:?}{more}",
                    r["sample"],
                    r["seed"],
                    r["tokens"]
                );
            }
        }
        match ph["pair_id"].as_str() {
            Some(p) => say!(
                "  -> {} ({p}; tsr lineage {run} pair {p})",
                ph["decision"].as_str().unwrap_or("")
            ),
            None => say!("  -> {}", ph["decision"].as_str().unwrap_or("")),
        }
    }
    Ok(ExitCode::SUCCESS)
}

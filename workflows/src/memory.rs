//! The memory plan of a run: every node of its DAG with the peak memory its step needs on the
//! run's device (see `tsr_steps::memory` for what is counted), the run's peak, what the device
//! has, and when it does not fit, the settings that would.

use crate::config::Config;
use crate::WorkflowError;
use serde::Serialize;
use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use tsr_engine::InputSource;
use tsr_model::ModelSource;
use tsr_steps::memory::{self, human, Estimate, LoraShape, Shape};

/// One node's estimate.
#[derive(Clone, Debug, Serialize)]
pub struct NodePlan {
    pub node: String,
    pub kind: String,
    /// What the estimate assumes (batch, tokens, what trains).
    pub assumes: String,
    pub peak: u64,
    pub parts: Estimate,
}

/// A run's memory plan.
#[derive(Clone, Debug, Serialize)]
pub struct MemoryPlan {
    pub device: String,
    pub nodes: Vec<NodePlan>,
    /// The largest node peak (steps that need a model run one at a time).
    pub peak: u64,
    pub peak_node: String,
    /// Memory there is (`None` when not asked).
    pub available: Option<u64>,
    pub available_from: Option<String>,
    /// Changes that bring the peak under what is available, each with its peak.
    pub would_fit: Vec<(String, u64)>,
}

impl MemoryPlan {
    pub fn fits(&self) -> bool {
        self.available.is_none_or(|a| self.peak <= a)
    }

    /// The refusal when the plan does not fit: the estimate, what is there, what would fit.
    pub fn refusal(&self) -> Option<String> {
        let avail = self.available?;
        if self.peak <= avail {
            return None;
        }
        let mut msg = format!(
            "this run needs about {} on {} at its peak ({}), but {} is available ({}); it would run out of memory part-way",
            human(self.peak),
            self.device,
            self.peak_node,
            human(avail),
            self.available_from.as_deref().unwrap_or("given")
        );
        if self.would_fit.is_empty() {
            msg.push_str(". No single change of LoRA, base dtype, micro_batch, max_new_tokens or batch_size fits; `tsr plan` shows where the memory goes");
        } else {
            msg.push_str(". These would fit: ");
            msg.push_str(
                &self
                    .would_fit
                    .iter()
                    .map(|(what, peak)| format!("{what} (about {})", human(*peak)))
                    .collect::<Vec<_>>()
                    .join("; "),
            );
        }
        Some(msg)
    }
}

/// The plan of `c` on its device; `available` is what to compare against (`None`: do not).
pub fn plan(c: &Config, available: Option<(u64, String)>) -> Result<MemoryPlan, WorkflowError> {
    plan_remaining(c, available, &BTreeSet::new())
}

/// [`plan`] of the nodes not in `done` (a run that continues: its finished steps need no
/// memory again); the peak is over those.
pub fn plan_remaining(
    c: &Config,
    available: Option<(u64, String)>,
    done: &BTreeSet<String>,
) -> Result<MemoryPlan, WorkflowError> {
    let mut p = estimate(c, done)?;
    if let Some((bytes, from)) = available {
        p.available = Some(bytes);
        p.available_from = Some(from);
        if p.peak > bytes {
            p.would_fit = alternatives(c, bytes, done)?;
        }
    }
    Ok(p)
}

/// Whether a generating step with `rows` rows, `requests` generation requests per item and
/// `commit_batches` batches per commit refills its rows inside a commit, and the plan's words
/// for it (empty when it does not): ", N {what} per commit, rows refilled".
fn refilled(rows: usize, requests: usize, commit_batches: usize, what: &str) -> (bool, String) {
    let n = tsr_steps::items::items_per_commit(rows, requests, commit_batches) * requests.max(1);
    if n > rows {
        (true, format!(", {n} {what} per commit, rows refilled"))
    } else {
        (false, String::new())
    }
}

/// A judge in logprob mode: one forward of `batch` judge prompts of up to `tokens` tokens.
/// With `prompt_attention = "fused"` that forward is generation's prefill, which also keeps
/// every layer's keys and values of the batch, and of the tokens its prompts share while it
/// copies them to every row: the plan counts a generation of one new token by one row more.
fn logprob_judge(c: &Config, s: &Shape, w: u64, batch: usize, tokens: u64) -> (String, Estimate) {
    match c.fused_prompts() {
        Some(_) => (
            format!(
                "batch {batch}, judge prompts up to {tokens} tokens, their keys and values cached"
            ),
            memory::generation(s, w, batch as u64 + 1, tokens, 1, false),
        ),
        None => (
            format!("batch {batch}, judge prompts up to {tokens} tokens"),
            memory::scoring(s, w, batch as u64, tokens),
        ),
    }
}

fn bad(key: &str, reason: String) -> WorkflowError {
    crate::ConfigError::Invalid {
        key: key.into(),
        reason,
    }
    .into()
}

/// The longest prompt (bytes) among the first `limit` of a prompts file.
fn longest_prompt(key: &str, path: &Path, limit: usize) -> Result<usize, WorkflowError> {
    let bytes = std::fs::read(path)
        .map_err(|e| bad(key, format!("cannot read {}: {e}", path.display())))?;
    let mut prompts = tsr_steps::prompts::parse_prompts(&bytes, &path.display().to_string())
        .map_err(|e| bad(key, e.to_string()))?;
    if limit > 0 {
        prompts.truncate(limit);
    }
    Ok(prompts.iter().map(|p| p.prompt.len()).max().unwrap_or(0))
}

fn template_len(
    key: &str,
    path: &Option<std::path::PathBuf>,
    default: &str,
) -> Result<usize, WorkflowError> {
    match path {
        Some(p) => Ok(std::fs::metadata(p)
            .map_err(|e| bad(key, format!("cannot read {}: {e}", p.display())))?
            .len() as usize),
        None => Ok(default.len()),
    }
}

/// How many worker processes of the `processes` executor compute on one device at once: all
/// of them without `devices`, else the most that share one (1 for a local run).
fn workers_per_device(c: &Config) -> u64 {
    match &c.executor {
        Some(x) if x.kind == crate::Executor::Processes => {
            if x.devices.is_empty() {
                x.workers as u64
            } else {
                x.devices
                    .iter()
                    .map(|d| x.devices.iter().filter(|e| *e == d).count() as u64)
                    .max()
                    .unwrap_or(1)
            }
        }
        _ => 1,
    }
}

fn estimate(c: &Config, done: &BTreeSet<String>) -> Result<MemoryPlan, WorkflowError> {
    let dag = crate::build(c)?;
    let m = c.model.as_ref().expect("validated: [model] present");
    let wb = m.weight_bytes();
    // Shapes of the imported models, by import node.
    let mut shapes: BTreeMap<String, (Shape, u64)> = BTreeMap::new();
    for n in dag.nodes() {
        if n.step.kind() != "import-model" {
            continue;
        }
        let Some(InputSource::External(path)) = n.inputs.get("source") else {
            continue;
        };
        let src = if path.is_dir() {
            ModelSource::HfDir(path.clone())
        } else {
            ModelSource::Gguf(path.clone())
        };
        let key = match n.name.as_str() {
            "import-judge" => "judge.model",
            "import-eval-baseline" => "eval.baseline_model",
            "import-eval-judge" => "eval.judge.model",
            _ => "model.source",
        };
        let (cfg, bytes) = src.read_config().map_err(|e| {
            let mut why = e.to_string();
            let mut cause = std::error::Error::source(&e);
            while let Some(c) = cause {
                why = format!("{why}: {c}");
                cause = c.source();
            }
            bad(key, format!("cannot read the model's shape: {why}"))
        })?;
        shapes.insert(n.name.clone(), (Shape::of(&cfg), bytes));
    }
    // Training prompts (the `eval` workflow has none).
    let prompt = match &c.prompts {
        Some(p) => memory::tokens_of(longest_prompt("prompts.file", &p.file, p.limit)?),
        None => 0,
    };
    let g = &c.generate;
    let j = &c.judge;
    let d = &c.dpo;
    let response = g.max_new_tokens as u64;
    let rubric = memory::tokens_of(template_len(
        "judge.template",
        &j.template,
        tsr_steps::rules::verdict::DEFAULT_RUBRIC,
    )?);
    let lora = (d.adapter == crate::Adapter::Lora).then(|| {
        let l = d.lora.clone().unwrap_or_default();
        LoraShape {
            r: l.r as u64,
            targets: l.targets,
            dropout: l.dropout > 0.0,
        }
    });
    let eval_prompt = match &c.eval {
        Some(e) => match &e.prompts {
            Some(f) => memory::tokens_of(longest_prompt("eval.prompts", f, e.limit)?),
            None => 0,
        },
        None => 0,
    };
    let mut nodes = Vec::new();
    for n in dag.nodes().iter().filter(|n| !done.contains(&n.name)) {
        let kind = n.step.kind();
        // The model a node uses: the import node its files come from.
        let import = match n.inputs.get("model.config") {
            Some(InputSource::Node { node, .. }) => Some(node.clone()),
            _ if kind == "import-model" => Some(n.name.clone()),
            _ => None,
        };
        let shape = import.as_ref().and_then(|i| shapes.get(i));
        // Half precision applies to the run's own model; other models (a fixed judge, an
        // evaluation baseline) load at f32.
        let w = if import.as_deref() == Some("import") {
            wb
        } else {
            4
        };
        let (assumes, parts) = match (kind, shape) {
            ("import-model", Some((s, bytes))) => {
                let gguf =
                    !matches!(n.inputs.get("source"), Some(InputSource::External(p)) if p.is_dir());
                (
                    format!("{} parameters; source file {}", s.params, human(*bytes)),
                    memory::import(s, *bytes, gguf, w < 4),
                )
            }
            ("generate", Some((s, _))) => {
                let (refill, per_commit) = refilled(g.batch_size, 1, g.commit_batches, "responses");
                (
                    format!(
                        "batch {}, prompts up to {prompt} tokens, {response} new{per_commit}",
                        g.batch_size,
                    ),
                    memory::generation(s, w, g.batch_size as u64, prompt, response, refill),
                )
            }
            ("judge", Some((s, _))) => {
                let tokens = rubric + prompt + response;
                match j.mode {
                    tsr_steps::kinds::judge::JudgeMode::Text => {
                        let (refill, per_commit) = refilled(
                            j.batch_size,
                            j.samples as usize,
                            j.commit_batches,
                            "judgements",
                        );
                        (
                            format!(
                                "batch {}, judge prompts up to {tokens} tokens, {} new{per_commit}",
                                j.batch_size, j.max_new_tokens,
                            ),
                            memory::generation(
                                s,
                                w,
                                j.batch_size as u64,
                                tokens,
                                j.max_new_tokens as u64,
                                refill,
                            ),
                        )
                    }
                    _ => logprob_judge(c, s, w, j.batch_size, tokens),
                }
            }
            ("meta-judge", Some((s, _))) => {
                let meta = c.meta.clone().unwrap_or_default();
                let tokens = 2 * rubric + prompt + response + 2 * j.max_new_tokens as u64;
                let (refill, per_commit) =
                    refilled(meta.batch_size, 2, meta.commit_batches, "meta-judgements");
                (
                    format!(
                        "batch {}, prompts up to {tokens} tokens, {} new{per_commit}",
                        meta.batch_size, meta.max_new_tokens
                    ),
                    memory::generation(
                        s,
                        w,
                        meta.batch_size as u64,
                        tokens,
                        meta.max_new_tokens as u64,
                        refill,
                    ),
                )
            }
            ("ref-logprobs" | "metrics", Some((s, _))) => {
                let tokens = prompt + response;
                (
                    format!("batch {}, sequences up to {tokens} tokens", j.batch_size),
                    memory::scoring(s, w, j.batch_size as u64, tokens),
                )
            }
            ("dpo", Some((s, _))) => {
                let tokens = prompt + response;
                let what = match &lora {
                    Some(l) => format!(
                        "LoRA r = {} ({} parameters train)",
                        l.r,
                        s.lora_params(l.r, &l.targets)
                    ),
                    None => format!("every weight trains ({} parameters)", s.params),
                };
                let mut parts =
                    memory::training(s, w, lora.as_ref(), d.micro_batch as u64, tokens, response);
                if lora.is_some() && c.device != "cpu" {
                    // Off the CPU, candle's matmul backward also computes every frozen
                    // matrix's gradient and keeps it until the pass ends.
                    parts.gradients += s.params * w;
                }
                (
                    format!(
                        "{what}; micro_batch {}, sequences up to {tokens} tokens",
                        d.micro_batch
                    ),
                    parts,
                )
            }
            ("answer", Some((s, _))) => {
                let e = c.eval.as_ref().expect("answer nodes come from [eval]");
                let (refill, per_commit) = refilled(e.batch_size, 1, e.commit_batches, "answers");
                (
                    format!(
                        "batch {}, prompts up to {eval_prompt} tokens, {} new{per_commit}",
                        e.batch_size, e.max_new_tokens
                    ),
                    memory::generation(
                        s,
                        w,
                        e.batch_size as u64,
                        eval_prompt,
                        e.max_new_tokens as u64,
                        refill,
                    ),
                )
            }
            ("eval-judge", Some((s, _))) => {
                let e = c.eval.as_ref().expect("judge nodes come from [eval]");
                let template = memory::tokens_of(template_len(
                    "eval.judge.template",
                    &e.judge.template,
                    tsr_steps::rules::eval::DEFAULT_PAIRWISE_TEMPLATE,
                )?);
                let tokens = template + eval_prompt + 2 * e.max_new_tokens as u64;
                match e.judge.mode {
                    tsr_steps::kinds::judge::JudgeMode::Text => {
                        let (refill, per_commit) =
                            refilled(e.judge.batch_size, 2, e.judge.commit_batches, "verdicts");
                        (
                            format!(
                                "batch {}, judge prompts up to {tokens} tokens, {} new{per_commit}",
                                e.judge.batch_size, e.judge.max_new_tokens
                            ),
                            memory::generation(
                                s,
                                w,
                                e.judge.batch_size as u64,
                                tokens,
                                e.judge.max_new_tokens as u64,
                                refill,
                            ),
                        )
                    }
                    // One forward pass per prompt and order, as the judge's logprob mode.
                    tsr_steps::kinds::judge::JudgeMode::Logprob => {
                        logprob_judge(c, s, w, e.judge.batch_size, tokens)
                    }
                }
            }
            _ => ("no model".to_string(), memory::small()),
        };
        // Worker processes that share this device each hold the model and a batch.
        let sharers = workers_per_device(c);
        let (peak, assumes) = if sharers > 1 && tsr_steps::shards::SHARDABLE.contains(&kind) {
            (
                parts.peak() * sharers,
                format!("{assumes}; {sharers} worker processes at once"),
            )
        } else {
            (parts.peak(), assumes)
        };
        nodes.push(NodePlan {
            node: n.name.clone(),
            kind: kind.to_string(),
            assumes,
            peak,
            parts,
        });
    }
    let top = nodes
        .iter()
        .max_by_key(|n| n.peak)
        .map(|n| (n.peak, n.node.clone()))
        .unwrap_or((0, String::new()));
    Ok(MemoryPlan {
        device: c.device.clone(),
        nodes,
        peak: top.0,
        peak_node: top.1,
        available: None,
        available_from: None,
        would_fit: vec![],
    })
}

/// Single changes of the settings that decide memory, each kept when its plan fits `avail`:
/// LoRA instead of full training, a half-precision base, then halving micro_batch,
/// max_new_tokens and batch sizes.
fn alternatives(
    c: &Config,
    avail: u64,
    done: &BTreeSet<String>,
) -> Result<Vec<(String, u64)>, WorkflowError> {
    let mut out = Vec::new();
    let mut tries: Vec<(String, Config)> = Vec::new();
    let lora_on = c.dpo.adapter == crate::Adapter::Lora;
    if !lora_on {
        let mut x = c.clone();
        x.dpo.adapter = crate::Adapter::Lora;
        tries.push(("[dpo] adapter = \"lora\"".into(), x.clone()));
        if let Some(m) = x.model.as_mut() {
            m.dtype = Some(crate::Dtype::Bf16);
        }
        tries.push((
            "[dpo] adapter = \"lora\" with [model] dtype = \"bf16\"".into(),
            x,
        ));
    } else if c.model.as_ref().is_some_and(|m| m.weight_bytes() == 4) {
        let mut x = c.clone();
        if let Some(m) = x.model.as_mut() {
            m.dtype = Some(crate::Dtype::Bf16);
        }
        tries.push(("[model] dtype = \"bf16\"".into(), x));
    }
    if c.dpo.micro_batch > 1 {
        let mut x = c.clone();
        x.dpo.micro_batch = 1;
        x.dpo.accum_steps *= c.dpo.micro_batch;
        tries.push((
            format!(
                "[dpo] micro_batch = 1, accum_steps = {} (the same batch)",
                x.dpo.accum_steps
            ),
            x,
        ));
    }
    if c.generate.max_new_tokens > 16 {
        let mut x = c.clone();
        x.generate.max_new_tokens = c.generate.max_new_tokens / 2;
        tries.push((
            format!("[generate] max_new_tokens = {}", x.generate.max_new_tokens),
            x,
        ));
    }
    if c.generate.batch_size > 1 || c.judge.batch_size > 1 {
        let mut x = c.clone();
        x.generate.batch_size = (c.generate.batch_size / 2).max(1);
        x.judge.batch_size = (c.judge.batch_size / 2).max(1);
        tries.push((
            format!(
                "[generate] batch_size = {}, [judge] batch_size = {}",
                x.generate.batch_size, x.judge.batch_size
            ),
            x,
        ));
    }
    for (what, x) in tries {
        let p = estimate(&x, done)?;
        if p.peak <= avail {
            out.push((what, p.peak));
        }
    }
    Ok(out)
}

/// The plan as a table, one node per line, the peak marked.
pub fn render(p: &MemoryPlan) -> String {
    use std::fmt::Write;
    let mut s = String::new();
    let _ = writeln!(
        s,
        "{:<26} {:<13} {:>9} {:>9} {:>9} {:>9}  assumes",
        "NODE", "KIND", "PEAK", "WEIGHTS", "TRAINING", "ACTIV."
    );
    for n in &p.nodes {
        let e = &n.parts;
        let training = e.adapter + e.gradients + e.optimizer;
        let _ = writeln!(
            s,
            "{:<26} {:<13} {:>9} {:>9} {:>9} {:>9}  {}{}",
            n.node,
            n.kind,
            human(n.peak),
            human(e.weights),
            human(training),
            human(e.activations + e.kv_cache),
            n.assumes,
            if n.node == p.peak_node {
                "  <- peak"
            } else {
                ""
            }
        );
    }
    let _ = writeln!(
        s,
        "peak: {} ({}) on {}",
        human(p.peak),
        p.peak_node,
        p.device
    );
    if let (Some(a), Some(from)) = (p.available, &p.available_from) {
        let _ = writeln!(
            s,
            "available: {} ({from}): {}",
            human(a),
            if p.peak <= a { "fits" } else { "does NOT fit" }
        );
        for (what, peak) in &p.would_fit {
            let _ = writeln!(s, "  would fit: {what} (peak about {})", human(*peak));
        }
    }
    s
}

//! The language-model workflows: `temporal` (the paper's Algorithm 1), `self-rewarding`,
//! `past-only` (anchored rejection only) and `future-only` (future-guided chosen only), built
//! from the steps in `tsr-steps`. Config sections and their defaults are in `config.rs`.
//!
//! Meta-Rewarding variants: `meta-rewarding` (standard selection) and `temporal-meta`
//! (temporal selection in both phases) add a `meta-judge` node on Mi's judgements of its own
//! responses; its judge pairs are mixed (share-capped) into the select step whose pairs train
//! Mi+1 (`select-1` resp. `select-2`). Phase 1 of `temporal-meta` (Mf, a look-ahead model used
//! only to generate) is trained on actor pairs alone, so it equals `temporal`'s phase 1.

use crate::config::Config;
use crate::WorkflowError;
use std::sync::Arc;
use tsr_engine::{DagBuilder, InputSource};
use tsr_steps::kinds::answer::Answer;
use tsr_steps::kinds::dpo::Dpo;
use tsr_steps::kinds::eval_judge::PairwiseJudge;
use tsr_steps::kinds::generate::Generate;
use tsr_steps::kinds::import_model::ImportModel;
use tsr_steps::kinds::judge::Judge;
use tsr_steps::kinds::meta_judge::MetaJudge;
use tsr_steps::kinds::metrics::Metrics;
use tsr_steps::kinds::prompts::LoadPrompts;
use tsr_steps::kinds::ref_logprobs::ReferenceLogprobs;
use tsr_steps::kinds::reference_outputs::ReferenceOutputs;
use tsr_steps::kinds::select::Select;
use tsr_steps::records::Rule;
use tsr_steps::rules::eval::DEFAULT_PAIRWISE_TEMPLATE;
use tsr_steps::rules::meta_verdict::{check_meta_template, DEFAULT_META_PROMPT};

/// A model in the DAG: the shared base files from `import` plus a weights output.
#[derive(Clone)]
struct ModelRef {
    /// The import node whose config and tokenizer files the model uses.
    base: String,
    /// The node whose `weights` output holds the model (its identity).
    node: String,
    /// The `weights` output is a LoRA adapter over the base node's weights.
    adapter: bool,
}

impl ModelRef {
    fn inputs(&self, prefix: &str) -> Vec<(String, InputSource)> {
        let mut v: Vec<(String, InputSource)> = ["config", "tokenizer", "tokenizer_config"]
            .iter()
            .map(|f| (format!("{prefix}.{f}"), InputSource::node(&self.base, f)))
            .collect();
        v.push((
            format!("{prefix}.weights"),
            InputSource::node(&self.node, "weights"),
        ));
        if self.adapter {
            v.push((
                format!("{prefix}.base"),
                InputSource::node(&self.base, "weights"),
            ));
        }
        v
    }
    fn weights(&self) -> InputSource {
        InputSource::node(&self.node, "weights")
    }
}

fn add(
    b: &mut DagBuilder,
    name: String,
    step: Arc<dyn tsr_engine::Step>,
    inputs: Vec<(String, InputSource)>,
    iteration: Option<u32>,
) {
    let inputs: Vec<(&str, InputSource)> = inputs
        .iter()
        .map(|(k, v)| (k.as_str(), v.clone()))
        .collect();
    b.add(name, step, inputs, iteration);
}

pub fn build(c: &Config) -> Result<tsr_engine::Dag, WorkflowError> {
    let m = c.model.as_ref().expect("validated: [model] present");
    let p = c.prompts.as_ref().expect("validated: [prompts] present");
    let mut b = DagBuilder::new();
    let m0 = import_initial(&mut b, m)?;
    b.add(
        "prompts",
        Arc::new(LoadPrompts { limit: p.limit }),
        vec![("file", InputSource::External(p.file.clone()))],
        None,
    );
    let g = &c.generate;
    let gen = Arc::new(Generate {
        k: g.k,
        max_new_tokens: g.max_new_tokens,
        temperature: g.temperature,
        top_p: g.top_p,
        top_k: g.top_k,
        batch_size: g.batch_size,
    });
    let j = &c.judge;
    let template = match &j.template {
        Some(path) => std::fs::read_to_string(path).map_err(|e| crate::ConfigError::Invalid {
            key: "judge.template".into(),
            reason: format!("cannot read {}: {e}", path.display()),
        })?,
        None => tsr_steps::rules::verdict::DEFAULT_RUBRIC.to_string(),
    };
    tsr_steps::rules::verdict::check_template(
        &j.template
            .as_ref()
            .map(|p| p.display().to_string())
            .unwrap_or("default".into()),
        &template,
    )
    .map_err(|e| crate::ConfigError::Invalid {
        key: "judge.template".into(),
        reason: e.to_string(),
    })?;
    let judge = Arc::new(Judge {
        mode: j.mode,
        samples: j.samples,
        max_new_tokens: j.max_new_tokens,
        temperature: j.temperature,
        top_p: j.top_p,
        batch_size: j.batch_size,
        template,
    });
    let d = &c.dpo;
    let dpo = Arc::new(Dpo {
        beta: d.beta,
        loss: d.loss,
        lr: d.lr,
        warmup_steps: d.warmup_steps,
        epochs: d.epochs,
        micro_batch: d.micro_batch,
        accum_steps: d.accum_steps,
        max_grad_norm: d.max_grad_norm,
        weight_decay: d.weight_decay,
        checkpoint_every: d.checkpoint_every,
        lora: (d.adapter == "lora").then(|| {
            let l = d.lora.clone().unwrap_or_default();
            tsr_steps::kinds::dpo::LoraTraining {
                r: l.r,
                alpha: l.alpha,
                dropout: l.dropout,
                targets: l.targets,
            }
        }),
    });
    let reference = Arc::new(ReferenceLogprobs {
        batch_size: j.batch_size,
    });
    let meta_cfg = c.meta.clone().unwrap_or_default();
    let meta_template = match &meta_cfg.template {
        Some(path) => std::fs::read_to_string(path).map_err(|e| crate::ConfigError::Invalid {
            key: "meta.template".into(),
            reason: format!("cannot read {}: {e}", path.display()),
        })?,
        None => DEFAULT_META_PROMPT.to_string(),
    };
    check_meta_template(&meta_template).map_err(|reason| crate::ConfigError::Invalid {
        key: "meta.template".into(),
        reason,
    })?;
    // A fixed judge model, when configured; otherwise Mi judges itself.
    let fixed_judge = match &j.model {
        Some(spec) => Some(import_model(
            &mut b,
            "import-judge",
            "judge.model",
            spec,
            None,
        )?),
        None => None,
    };
    // Models to evaluate: (node prefix, iteration, model).
    let mut evaluated: Vec<(String, Option<u32>, ModelRef)> =
        vec![("eval/m0".into(), None, m0.clone())];
    let eval_every = c.eval.as_ref().map_or(0, |e| e.every);
    let eval_future = c.eval.as_ref().is_some_and(|e| e.future);
    let mut prev: Option<ModelRef> = None; // M_{i-1}, for anchor = "previous"
    let mut mi = m0.clone();
    let workflow = c.workflow.as_str();
    for i in 1..=c.iterations {
        let it = Some(i);
        let n = |s: &str| format!("iter{i}/{s}");
        let anchor_model = match (c.anchor.as_str(), &prev) {
            ("previous", Some(p)) => p.clone(),
            _ => m0.clone(),
        };
        // Generation by Mi and judging by Mi.
        let gen_in = |model: &ModelRef| {
            let mut v = vec![(
                "prompts".to_string(),
                InputSource::node("prompts", "prompts"),
            )];
            v.extend(model.inputs("model"));
            v
        };
        let judge_in = |gen_node: &str| {
            let mut v = vec![
                (
                    "prompts".to_string(),
                    InputSource::node("prompts", "prompts"),
                ),
                (
                    "responses".to_string(),
                    InputSource::node(gen_node, "responses"),
                ),
            ];
            v.extend(fixed_judge.as_ref().unwrap_or(&mi).inputs("model"));
            v
        };
        add(&mut b, n("gen-current"), gen.clone(), gen_in(&mi), it);
        add(
            &mut b,
            n("judge-current"),
            judge.clone(),
            judge_in(&n("gen-current")),
            it,
        );
        let set = |prefix: &str, gen_node: String, judge_node: String, model: &ModelRef| {
            vec![
                (
                    format!("{prefix}_responses"),
                    InputSource::node(&gen_node, "responses"),
                ),
                (
                    format!("{prefix}_judgements"),
                    InputSource::node(&judge_node, "judgements"),
                ),
                (format!("{prefix}_model"), model.weights()),
            ]
        };
        let base_select_in = || {
            let mut v = vec![(
                "prompts".to_string(),
                InputSource::node("prompts", "prompts"),
            )];
            v.extend(set("current", n("gen-current"), n("judge-current"), &mi));
            v.push((
                "judge.weights".to_string(),
                fixed_judge.as_ref().unwrap_or(&mi).weights(),
            ));
            v
        };
        let select = |rule: Rule, phase: &str, mix: bool| {
            Arc::new(Select {
                rule,
                length_band: j.band_for(i),
                iteration: i,
                phase: phase.to_string(),
                judge_mode: format!("{:?}", j.mode).to_lowercase(),
                judge_template_digest: judge.template_digest(),
                judge_pair_share: mix.then_some(meta_cfg.judge_pair_share),
            })
        };
        let meta = matches!(workflow, "meta-rewarding" | "temporal-meta");
        if meta {
            // Mi meta-judges its own judgements of its own responses.
            let mut meta_in = vec![
                (
                    "prompts".to_string(),
                    InputSource::node("prompts", "prompts"),
                ),
                (
                    "responses".to_string(),
                    InputSource::node(&n("gen-current"), "responses"),
                ),
                (
                    "judgements".to_string(),
                    InputSource::node(&n("judge-current"), "judgements"),
                ),
                ("generator.weights".to_string(), mi.weights()),
                ("judge.weights".to_string(), mi.weights()),
            ];
            meta_in.extend(mi.inputs("model"));
            let step = Arc::new(MetaJudge {
                iteration: i,
                max_responses: meta_cfg.max_responses,
                response_share: meta_cfg.response_share,
                max_per_prompt: meta_cfg.max_per_prompt,
                max_new_tokens: meta_cfg.max_new_tokens,
                temperature: meta_cfg.temperature,
                top_p: meta_cfg.top_p,
                batch_size: meta_cfg.batch_size,
                template: meta_template.clone(),
                judge_template: judge.template.clone(),
            });
            add(&mut b, n("meta-judge"), step, meta_in, it);
        }
        let judge_pairs_in = || {
            (
                "judge_pairs".to_string(),
                InputSource::node(&n("meta-judge"), "pairs"),
            )
        };
        let train = |b: &mut DagBuilder, tag: &str, select_node: String| {
            let mut ref_in = vec![(
                "pairs".to_string(),
                InputSource::node(&select_node, "pairs"),
            )];
            let ref_model = if d.reference == "initial" { &m0 } else { &mi };
            ref_in.extend(ref_model.inputs("model"));
            add(b, n(&format!("ref-{tag}")), reference.clone(), ref_in, it);
            let mut dpo_in = vec![
                (
                    "pairs".to_string(),
                    InputSource::node(&select_node, "pairs"),
                ),
                (
                    "ref_logps".to_string(),
                    InputSource::node(&n(&format!("ref-{tag}")), "logps"),
                ),
            ];
            dpo_in.extend(mi.inputs("model"));
            add(b, n(&format!("dpo-{tag}")), dpo.clone(), dpo_in, it);
            ModelRef {
                base: mi.base.clone(),
                node: n(&format!("dpo-{tag}")),
                adapter: d.adapter == "lora",
            }
        };
        let uses_anchor = matches!(workflow, "temporal" | "past-only" | "temporal-meta");
        let uses_future = matches!(workflow, "temporal" | "future-only" | "temporal-meta");
        if uses_anchor {
            // The anchor's samples: generate(M0) has the same key every iteration, so it runs once.
            add(
                &mut b,
                n("gen-anchor"),
                gen.clone(),
                gen_in(&anchor_model),
                it,
            );
            add(
                &mut b,
                n("judge-anchor"),
                judge.clone(),
                judge_in(&n("gen-anchor")),
                it,
            );
        }
        let phase1_rule = if uses_anchor {
            Rule::Anchored
        } else {
            Rule::Standard
        };
        let mut s1_in = base_select_in();
        if uses_anchor {
            s1_in.extend(set(
                "anchor",
                n("gen-anchor"),
                n("judge-anchor"),
                &anchor_model,
            ));
        }
        let phase1 = if uses_anchor { "anchored" } else { "standard" };
        // Judge pairs go to the phase whose pairs train Mi+1.
        let mix1 = meta && !uses_future;
        if mix1 {
            s1_in.push(judge_pairs_in());
        }
        add(
            &mut b,
            n("select-1"),
            select(phase1_rule, phase1, mix1),
            s1_in,
            it,
        );
        let mut phases: Vec<(String, String, String)> =
            vec![(phase1.to_string(), n("select-1"), String::new())];
        let next = if uses_future {
            let mf = train(&mut b, "future", n("select-1"));
            if eval_future && eval_every > 0 && (i % eval_every == 0 || i == c.iterations) {
                evaluated.push((n("eval-future"), it, mf.clone()));
            }
            phases[0].2 = n("dpo-future");
            add(&mut b, n("gen-future"), gen.clone(), gen_in(&mf), it);
            add(
                &mut b,
                n("judge-future"),
                judge.clone(),
                judge_in(&n("gen-future")),
                it,
            );
            let mut s2_in = base_select_in();
            s2_in.extend(set("future", n("gen-future"), n("judge-future"), &mf));
            s2_in.push((
                "phase1_pairs".to_string(),
                InputSource::node(&n("select-1"), "pairs"),
            ));
            if meta {
                s2_in.push(judge_pairs_in());
            }
            add(
                &mut b,
                n("select-2"),
                select(Rule::FutureGuided, "future-guided", meta),
                s2_in,
                it,
            );
            phases.push(("future-guided".to_string(), n("select-2"), n("dpo-next")));
            train(&mut b, "next", n("select-2"))
        } else {
            phases[0].2 = n("dpo-next");
            train(&mut b, "next", n("select-1"))
        };
        let mut metrics_in = mi.inputs("model");
        metrics_in.push(("produced".to_string(), next.weights()));
        for (k, (_, select_node, dpo_node)) in phases.iter().enumerate() {
            metrics_in.push((
                format!("p{}_pairs", k + 1),
                InputSource::node(select_node, "pairs"),
            ));
            metrics_in.push((
                format!("p{}_summary", k + 1),
                InputSource::node(select_node, "summary"),
            ));
            metrics_in.push((
                format!("p{}_dpo", k + 1),
                InputSource::node(dpo_node, "metrics"),
            ));
        }
        if meta {
            metrics_in.push((
                "meta_judgements".to_string(),
                InputSource::node(&n("judge-current"), "judgements"),
            ));
            metrics_in.push((
                "meta_responses".to_string(),
                InputSource::node(&n("gen-current"), "responses"),
            ));
            metrics_in.push((
                "meta_summary".to_string(),
                InputSource::node(&n("meta-judge"), "summary"),
            ));
            metrics_in.push((
                "meta_comparisons".to_string(),
                InputSource::node(&n("meta-judge"), "comparisons"),
            ));
        }
        let metrics = Arc::new(Metrics {
            workflow: workflow.to_string(),
            iteration: i,
            phases: phases.iter().map(|p| p.0.clone()).collect(),
            batch_size: j.batch_size,
        });
        add(&mut b, n("metrics"), metrics, metrics_in, it);
        if eval_every > 0 && (i % eval_every == 0 || i == c.iterations) {
            evaluated.push((n("eval"), it, next.clone()));
        }
        prev = Some(mi.clone());
        mi = next;
    }
    if eval_every > 0 {
        add_eval(&mut b, c, &m0, &evaluated)?;
    }
    Ok(b.build()?)
}

/// The `eval` workflow (`tsr eval`): the model of `[model]` against the baseline of `[eval]`.
pub fn build_eval(c: &Config) -> Result<tsr_engine::Dag, WorkflowError> {
    let m = c.model.as_ref().expect("validated: [model] present");
    let mut b = DagBuilder::new();
    let model = import_initial(&mut b, m)?;
    add_eval(
        &mut b,
        c,
        &model,
        &[("eval/model".into(), None, model.clone())],
    )?;
    Ok(b.build()?)
}

/// The `import` node of `[model]` (with its adapter, if any): M0.
fn import_initial(
    b: &mut DagBuilder,
    m: &crate::config::ModelSection,
) -> Result<ModelRef, WorkflowError> {
    let dtype = m.dtype.clone().filter(|d| d != "f32");
    import_model_at(
        b,
        "import",
        "model.source",
        &m.source,
        m.adapter.as_deref(),
        dtype,
    )
}

fn import_model(
    b: &mut DagBuilder,
    node: &str,
    key: &str,
    source: &str,
    adapter: Option<&std::path::Path>,
) -> Result<ModelRef, WorkflowError> {
    import_model_at(b, node, key, source, adapter, None)
}

/// An `import-model` node for the model source given under the config key `key` (errors name
/// that key), with a LoRA adapter merged in when one is given and the weight matrices held in
/// `dtype` when given (bf16, f16); the model it makes is its own base.
fn import_model_at(
    b: &mut DagBuilder,
    node: &str,
    key: &str,
    source: &str,
    adapter: Option<&std::path::Path>,
    dtype: Option<String>,
) -> Result<ModelRef, WorkflowError> {
    let (path, format) = crate::config::ModelSection {
        source: source.to_string(),
        adapter: None,
        dtype: None,
    }
    .resolve()
    .map_err(|e| match e {
        crate::ConfigError::Invalid { reason, .. } => crate::ConfigError::Invalid {
            key: key.into(),
            reason,
        },
        other => other,
    })?;
    let mut inputs = vec![("source", InputSource::External(path))];
    if let Some(dir) = adapter {
        inputs.push(("adapter", InputSource::External(dir.to_path_buf())));
    }
    b.add(node, Arc::new(ImportModel { format, dtype }), inputs, None);
    Ok(ModelRef {
        base: node.into(),
        node: node.into(),
        adapter: false,
    })
}

/// Evaluation nodes: the held-out prompts, the baseline's outputs, and for each evaluated model
/// `<prefix>-answer` / `<prefix>-judge` (`eval/m0/answer` style for the prefix `eval/m0`).
/// M0's answers and the baseline's have the same step key when the baseline is M0, so they are
/// generated once; every run of a store shares them the same way.
fn add_eval(
    b: &mut DagBuilder,
    c: &Config,
    m0: &ModelRef,
    evaluated: &[(String, Option<u32>, ModelRef)],
) -> Result<(), WorkflowError> {
    let e = c.eval.as_ref().expect("called with [eval]");
    let file = e.prompts.clone().expect("validated: eval.prompts present");
    b.add(
        "eval-prompts",
        Arc::new(LoadPrompts { limit: e.limit }),
        vec![("file", InputSource::External(file))],
        None,
    );
    let answer = Arc::new(Answer {
        max_new_tokens: e.max_new_tokens,
        temperature: e.temperature,
        top_p: e.top_p,
        batch_size: e.batch_size,
    });
    let answer_in = |model: &ModelRef| {
        let mut v = vec![(
            "prompts".to_string(),
            InputSource::node("eval-prompts", "prompts"),
        )];
        v.extend(model.inputs("model"));
        v
    };
    match (&e.reference, &e.baseline_model) {
        (Some(file), _) => add(
            b,
            "eval-baseline".into(),
            Arc::new(ReferenceOutputs {}),
            vec![
                (
                    "prompts".to_string(),
                    InputSource::node("eval-prompts", "prompts"),
                ),
                ("file".to_string(), InputSource::External(file.clone())),
            ],
            None,
        ),
        (None, Some(source)) => {
            let base = import_model(
                b,
                "import-eval-baseline",
                "eval.baseline_model",
                source,
                None,
            )?;
            add(
                b,
                "eval-baseline".into(),
                answer.clone(),
                answer_in(&base),
                None,
            );
        }
        (None, None) => add(
            b,
            "eval-baseline".into(),
            answer.clone(),
            answer_in(m0),
            None,
        ),
    }
    let judge_model = match &e.judge.model {
        Some(source) => import_model(b, "import-eval-judge", "eval.judge.model", source, None)?,
        None => m0.clone(),
    };
    let template = match &e.judge.template {
        Some(path) => std::fs::read_to_string(path).map_err(|err| crate::ConfigError::Invalid {
            key: "eval.judge.template".into(),
            reason: format!("cannot read {}: {err}", path.display()),
        })?,
        None => DEFAULT_PAIRWISE_TEMPLATE.to_string(),
    };
    tsr_steps::rules::eval::check_pairwise_template(&template).map_err(|reason| {
        crate::ConfigError::Invalid {
            key: "eval.judge.template".into(),
            reason,
        }
    })?;
    let judge = Arc::new(PairwiseJudge {
        mode: e.judge.mode,
        max_new_tokens: e.judge.max_new_tokens,
        temperature: e.judge.temperature,
        top_p: e.judge.top_p,
        batch_size: e.judge.batch_size,
        bootstrap_resamples: e.bootstrap_resamples,
        template,
    });
    for (prefix, iteration, model) in evaluated {
        let answer_node = format!("{prefix}-answer");
        add(
            b,
            answer_node.clone(),
            answer.clone(),
            answer_in(model),
            *iteration,
        );
        let mut judge_in = vec![
            (
                "prompts".to_string(),
                InputSource::node("eval-prompts", "prompts"),
            ),
            (
                "baseline".to_string(),
                InputSource::node("eval-baseline", "outputs"),
            ),
            (
                "candidate".to_string(),
                InputSource::node(&answer_node, "outputs"),
            ),
        ];
        judge_in.extend(judge_model.inputs("model"));
        add(
            b,
            format!("{prefix}-judge"),
            judge.clone(),
            judge_in,
            *iteration,
        );
    }
    Ok(())
}

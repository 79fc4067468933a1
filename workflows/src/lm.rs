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
use crate::{Adapter, Anchor, Reference, WorkflowError};
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

/// The steps every iteration shares, made once from the config.
struct Parts {
    gen: Arc<Generate>,
    judge: Arc<Judge>,
    reference: Arc<ReferenceLogprobs>,
    dpo: Arc<Dpo>,
    /// The meta-judge step (Meta-Rewarding workflows) and the judge-pair share of selection.
    meta: Option<(Arc<MetaJudge>, f64)>,
}

/// Generation and judging: `[generate]` and `[judge]` (the rubric template read and checked).
fn generation_part(c: &Config) -> Result<(Arc<Generate>, Arc<Judge>), WorkflowError> {
    // A step's `weights` enters its key only when it changes something: not when it is the
    // precision its model already has.
    let setting = |w: Option<tsr_steps::lm::Weights>, base: crate::Dtype| {
        w.filter(|w| w.name() != base.as_str())
    };
    let g = &c.generate;
    let gen = Arc::new(Generate {
        k: g.k,
        max_new_tokens: g.max_new_tokens,
        temperature: g.temperature,
        top_p: g.top_p,
        top_k: g.top_k,
        batch_size: g.batch_size,
        commit_batches: g.commit_batches,
        weights: setting(g.weights, c.base_dtype()),
        prompt_attention: c.fused_prompts(),
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
        commit_batches: j.commit_batches,
        template,
        weights: setting(j.weights, c.judge_base_dtype()),
        // Text mode generates; logprob mode takes its verdict's logits from the same prefill.
        prompt_attention: c.fused_prompts(),
    });
    Ok((gen, judge))
}

/// DPO: `[dpo]` (with `[dpo.lora]`), and the reference log-probabilities it starts from.
fn dpo_part(c: &Config) -> (Arc<ReferenceLogprobs>, Arc<Dpo>) {
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
        lora: (d.adapter == Adapter::Lora).then(|| {
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
        batch_size: c.judge.batch_size,
    });
    (reference, dpo)
}

/// Meta-judging (`[meta]`, Meta-Rewarding workflows only): the step of iteration `i` and the
/// judge-pair share. The template is read and checked for every workflow, as before.
fn meta_part(c: &Config, judge: &Judge) -> Result<Option<(MetaJudge, f64)>, WorkflowError> {
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
    Ok(c.workflow.is_meta().then(|| {
        (
            MetaJudge {
                iteration: 0,
                max_responses: meta_cfg.max_responses,
                response_share: meta_cfg.response_share,
                max_per_prompt: meta_cfg.max_per_prompt,
                max_new_tokens: meta_cfg.max_new_tokens,
                temperature: meta_cfg.temperature,
                top_p: meta_cfg.top_p,
                batch_size: meta_cfg.batch_size,
                commit_batches: meta_cfg.commit_batches,
                template: meta_template,
                judge_template: judge.template.clone(),
                prompt_attention: c.fused_prompts(),
            },
            meta_cfg.judge_pair_share,
        )
    }))
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
    let (gen, judge) = generation_part(c)?;
    let (reference, dpo) = dpo_part(c);
    let meta = meta_part(c, &judge)?;
    // A fixed judge model, when configured; otherwise Mi judges itself.
    let fixed_judge = match &c.judge.model {
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
    for i in 1..=c.iterations {
        let anchor = match (c.anchor, &prev) {
            (Anchor::Previous, Some(p)) => p.clone(),
            _ => m0.clone(),
        };
        let judge_model = fixed_judge.clone().unwrap_or_else(|| mi.clone());
        let it = Iteration {
            c,
            i,
            parts: Parts {
                gen: gen.clone(),
                judge: judge.clone(),
                reference: reference.clone(),
                dpo: dpo.clone(),
                meta: meta.as_ref().map(|(step, share)| {
                    (
                        Arc::new(MetaJudge {
                            iteration: i,
                            ..step.clone()
                        }),
                        *share,
                    )
                }),
            },
            m0: &m0,
            mi: &mi,
            judge_model: &judge_model,
        };
        let (next, mf) = it.add(&mut b, &anchor);
        let due = eval_every > 0 && (i % eval_every == 0 || i == c.iterations);
        if let (Some(mf), true, true) = (mf, eval_future, due) {
            evaluated.push((it.n("eval-future"), Some(i), mf));
        }
        if due {
            evaluated.push((it.n("eval"), Some(i), next.clone()));
        }
        prev = Some(mi.clone());
        mi = next;
    }
    if eval_every > 0 {
        add_eval(&mut b, c, &m0, &evaluated)?;
    }
    Ok(b.build()?)
}

/// One iteration's nodes, `iter<i>/...`: generation and judging, meta-judging, selection,
/// DPO, metrics.
struct Iteration<'a> {
    c: &'a Config,
    i: u32,
    parts: Parts,
    m0: &'a ModelRef,
    /// The model being trained, Mi.
    mi: &'a ModelRef,
    /// The model that judges: Mi, or the fixed judge.
    judge_model: &'a ModelRef,
}

impl Iteration<'_> {
    fn n(&self, s: &str) -> String {
        format!("iter{}/{s}", self.i)
    }

    fn prompts(&self) -> (String, InputSource) {
        (
            "prompts".to_string(),
            InputSource::node("prompts", "prompts"),
        )
    }

    /// Adds the nodes and returns Mi+1 and, where the workflow trains it, Mf.
    fn add(&self, b: &mut DagBuilder, anchor: &ModelRef) -> (ModelRef, Option<ModelRef>) {
        let w = self.c.workflow;
        self.generate_and_judge(b, "current", self.mi);
        if let Some((step, _)) = &self.parts.meta {
            self.meta_judge(b, step.clone());
        }
        if w.uses_anchor() {
            // generate(M0) has the same key every iteration, so it runs once.
            self.generate_and_judge(b, "anchor", anchor);
        }
        let (phase1_rule, phase1) = if w.uses_anchor() {
            (Rule::Anchored, "anchored")
        } else {
            (Rule::Standard, "standard")
        };
        let mut s1_in = self.select_in();
        if w.uses_anchor() {
            s1_in.extend(self.set("anchor", anchor));
        }
        // Judge pairs go to the phase whose pairs train Mi+1.
        let mix1 = w.is_meta() && !w.uses_future();
        if mix1 {
            s1_in.push(self.judge_pairs());
        }
        add(
            b,
            self.n("select-1"),
            self.select(phase1_rule, phase1, mix1),
            s1_in,
            Some(self.i),
        );
        let mut phases: Vec<(String, String, String)> =
            vec![(phase1.to_string(), self.n("select-1"), String::new())];
        let (next, mf) = if w.uses_future() {
            let mf = self.train(b, "future", self.n("select-1"));
            phases[0].2 = self.n("dpo-future");
            self.generate_and_judge(b, "future", &mf);
            let mut s2_in = self.select_in();
            s2_in.extend(self.set("future", &mf));
            s2_in.push((
                "phase1_pairs".to_string(),
                InputSource::node(&self.n("select-1"), "pairs"),
            ));
            if w.is_meta() {
                s2_in.push(self.judge_pairs());
            }
            add(
                b,
                self.n("select-2"),
                self.select(Rule::FutureGuided, "future-guided", w.is_meta()),
                s2_in,
                Some(self.i),
            );
            phases.push((
                "future-guided".to_string(),
                self.n("select-2"),
                self.n("dpo-next"),
            ));
            (self.train(b, "next", self.n("select-2")), Some(mf))
        } else {
            phases[0].2 = self.n("dpo-next");
            (self.train(b, "next", self.n("select-1")), None)
        };
        self.metrics(b, &phases, &next);
        (next, mf)
    }

    /// `gen-<tag>`: `model` writes K responses per prompt; `judge-<tag>`: the judge scores them.
    fn generate_and_judge(&self, b: &mut DagBuilder, tag: &str, model: &ModelRef) {
        let gen_node = self.n(&format!("gen-{tag}"));
        let mut gen_in = vec![self.prompts()];
        gen_in.extend(model.inputs("model"));
        add(
            b,
            gen_node.clone(),
            self.parts.gen.clone(),
            gen_in,
            Some(self.i),
        );
        let mut judge_in = vec![
            self.prompts(),
            (
                "responses".to_string(),
                InputSource::node(&gen_node, "responses"),
            ),
        ];
        judge_in.extend(self.judge_model.inputs("model"));
        add(
            b,
            self.n(&format!("judge-{tag}")),
            self.parts.judge.clone(),
            judge_in,
            Some(self.i),
        );
    }

    /// Mi meta-judges its own judgements of its own responses.
    fn meta_judge(&self, b: &mut DagBuilder, step: Arc<MetaJudge>) {
        let mut meta_in = vec![
            self.prompts(),
            (
                "responses".to_string(),
                InputSource::node(&self.n("gen-current"), "responses"),
            ),
            (
                "judgements".to_string(),
                InputSource::node(&self.n("judge-current"), "judgements"),
            ),
            ("generator.weights".to_string(), self.mi.weights()),
            ("judge.weights".to_string(), self.mi.weights()),
        ];
        meta_in.extend(self.mi.inputs("model"));
        add(b, self.n("meta-judge"), step, meta_in, Some(self.i));
    }

    /// A select input set: `<prefix>_responses`, `<prefix>_judgements`, `<prefix>_model`.
    fn set(&self, prefix: &str, model: &ModelRef) -> Vec<(String, InputSource)> {
        vec![
            (
                format!("{prefix}_responses"),
                InputSource::node(&self.n(&format!("gen-{prefix}")), "responses"),
            ),
            (
                format!("{prefix}_judgements"),
                InputSource::node(&self.n(&format!("judge-{prefix}")), "judgements"),
            ),
            (format!("{prefix}_model"), model.weights()),
        ]
    }

    /// The inputs every select step has: the prompts, Mi's set and the judge's weights.
    fn select_in(&self) -> Vec<(String, InputSource)> {
        let mut v = vec![self.prompts()];
        v.extend(self.set("current", self.mi));
        v.push(("judge.weights".to_string(), self.judge_model.weights()));
        v
    }

    fn judge_pairs(&self) -> (String, InputSource) {
        (
            "judge_pairs".to_string(),
            InputSource::node(&self.n("meta-judge"), "pairs"),
        )
    }

    fn select(&self, rule: Rule, phase: &str, mix: bool) -> Arc<Select> {
        let j = &self.c.judge;
        Arc::new(Select {
            rule,
            length_band: j.band_for(self.i),
            iteration: self.i,
            phase: phase.to_string(),
            judge_mode: format!("{:?}", j.mode).to_lowercase(),
            judge_template_digest: self.parts.judge.template_digest(),
            judge_pair_share: mix
                .then(|| self.parts.meta.as_ref().map(|(_, share)| *share))
                .flatten(),
        })
    }

    /// `ref-<tag>` and `dpo-<tag>`: DPO of Mi on the pairs of `select_node`; returns the model.
    fn train(&self, b: &mut DagBuilder, tag: &str, select_node: String) -> ModelRef {
        let d = &self.c.dpo;
        let pairs = (
            "pairs".to_string(),
            InputSource::node(&select_node, "pairs"),
        );
        let mut ref_in = vec![pairs.clone()];
        let ref_model = match d.reference {
            Reference::Initial => self.m0,
            Reference::Current => self.mi,
        };
        ref_in.extend(ref_model.inputs("model"));
        let ref_node = self.n(&format!("ref-{tag}"));
        add(
            b,
            ref_node.clone(),
            self.parts.reference.clone(),
            ref_in,
            Some(self.i),
        );
        let mut dpo_in = vec![
            pairs,
            (
                "ref_logps".to_string(),
                InputSource::node(&ref_node, "logps"),
            ),
        ];
        dpo_in.extend(self.mi.inputs("model"));
        let dpo_node = self.n(&format!("dpo-{tag}"));
        add(
            b,
            dpo_node.clone(),
            self.parts.dpo.clone(),
            dpo_in,
            Some(self.i),
        );
        ModelRef {
            base: self.mi.base.clone(),
            node: dpo_node,
            adapter: d.adapter == Adapter::Lora,
        }
    }

    /// `metrics`: each phase's (name, select node, DPO node), and the model made.
    fn metrics(&self, b: &mut DagBuilder, phases: &[(String, String, String)], next: &ModelRef) {
        let mut metrics_in = self.mi.inputs("model");
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
        if self.parts.meta.is_some() {
            for (name, node, output) in [
                ("meta_judgements", "judge-current", "judgements"),
                ("meta_responses", "gen-current", "responses"),
                ("meta_summary", "meta-judge", "summary"),
                ("meta_comparisons", "meta-judge", "comparisons"),
            ] {
                metrics_in.push((name.to_string(), InputSource::node(&self.n(node), output)));
            }
        }
        let metrics = Arc::new(Metrics {
            workflow: self.c.workflow.to_string(),
            iteration: self.i,
            phases: phases.iter().map(|p| p.0.clone()).collect(),
            batch_size: self.c.judge.batch_size,
        });
        add(b, self.n("metrics"), metrics, metrics_in, Some(self.i));
    }
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
    let dtype = m.dtype.filter(|d| d.is_half()).map(|d| d.to_string());
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

/// Whether a model source that does not resolve here may name what the machine that recorded
/// the run had: an absolute path, or a hub id (`Org/Name`, looked up in the local hub cache).
fn recorded_elsewhere(source: &str) -> bool {
    std::path::Path::new(source).is_absolute()
        || matches!(
            tsr_model::ModelSource::parse(source),
            Ok(tsr_model::ModelSource::HubId(_))
        )
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
    let section = crate::config::ModelSection {
        source: source.to_string(),
        adapter: None,
        dtype: None,
    };
    let resolved = match section.resolve() {
        // A recorded run whose model folder is not here (an absolute path, or a hub id whose
        // snapshot is not in this machine's hub cache): its format is known from the source
        // (a GGUF file, else a folder), which is all the graph needs.
        Err(_) if crate::Config::reading_recorded() && recorded_elsewhere(source) => {
            Ok((std::path::PathBuf::from(source), "hf".to_string()))
        }
        r => r,
    };
    let (path, format) = resolved.map_err(|e| match e {
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
        commit_batches: e.commit_batches,
        prompt_attention: c.fused_prompts(),
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
    // The judge: an API judge asks a server and takes no model input; the local one is a
    // model of the run.
    let (judge, judge_model): (Arc<dyn tsr_engine::Step>, Option<ModelRef>) =
        if e.judge.kind == "openai" {
            let text = match &e.judge.template {
                Some(path) => {
                    std::fs::read_to_string(path).map_err(|err| crate::ConfigError::Invalid {
                        key: "eval.judge.template".into(),
                        reason: format!("cannot read {}: {err}", path.display()),
                    })?
                }
                None if e.judge.annotator == tsr_steps::kinds::api_judge::TSR_PAIRWISE => {
                    DEFAULT_PAIRWISE_TEMPLATE.to_string()
                }
                None => {
                    return Err(crate::ConfigError::Invalid {
                        key: "eval.judge.template".into(),
                        reason: "an API judge needs the annotator's template".into(),
                    }
                    .into())
                }
            };
            (Arc::new(e.api_judge(text, e.judge.api_settings())), None)
        } else {
            local_judge(b, e, m0, c.fused_prompts())?
        };
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
        if let Some(m) = &judge_model {
            judge_in.extend(m.inputs("model"));
        }
        add(
            b,
            format!("{prefix}-judge"),
            judge.clone(),
            judge_in,
            *iteration,
        );
        // AlpacaEval 2.0's length control: its own step, so that adding the data later never
        // asks the judge again.
        if let Some(dir) = &e.lc_data {
            use tsr_steps::kinds::alpaca_lc::{AlpacaLc, GAMED_FILE, INSTRUCTIONS_FILE};
            add(
                b,
                format!("{prefix}-lc"),
                Arc::new(AlpacaLc::default()),
                vec![
                    (
                        "annotations".to_string(),
                        InputSource::node(&format!("{prefix}-judge"), "annotations"),
                    ),
                    (
                        "gamed".to_string(),
                        InputSource::External(dir.join(GAMED_FILE)),
                    ),
                    (
                        "instructions".to_string(),
                        InputSource::External(dir.join(INSTRUCTIONS_FILE)),
                    ),
                ],
                *iteration,
            );
        }
    }
    Ok(())
}

/// The evaluation's local judge (`[eval.judge] kind = "local"`) and its model.
fn local_judge(
    b: &mut DagBuilder,
    e: &crate::config::EvalSection,
    m0: &ModelRef,
    fused_prompts: Option<tsr_steps::lm::PromptAttention>,
) -> Result<(Arc<dyn tsr_engine::Step>, Option<ModelRef>), WorkflowError> {
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
        commit_batches: e.judge.commit_batches,
        bootstrap_resamples: e.bootstrap_resamples,
        template,
        // Text mode generates; logprob mode takes its verdict's logits from the same prefill.
        prompt_attention: fused_prompts,
    });
    Ok((judge, Some(judge_model)))
}

//! The run config: TOML, validated before anything runs. Unknown keys and bad values are errors
//! that name the key (and the line, from the TOML parser).

use crate::choices::{Adapter, Anchor, Dtype, Executor, Reference, Share, Workflow};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use tsr_engine::testkit::ToySpec;

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("config {path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("config key `{key}`: {reason}")]
    Invalid { key: String, reason: String },
    #[error("--set `{0}`: expected KEY=VALUE, e.g. --set dpo.beta=0.2")]
    BadSet(String),
}

fn default_seed() -> u64 {
    1
}
fn default_device() -> String {
    "cpu".into()
}

thread_local! {
    /// Set while a recorded config is read or its graph built (see [`Config::from_recorded`]).
    static RECORDED: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Runs `f` as the reading of a recorded run: files its config names need not exist. The
/// previous state comes back when `f` returns or panics.
pub(crate) fn as_recorded<R>(f: impl FnOnce() -> R) -> R {
    struct Restore(bool);
    impl Drop for Restore {
        fn drop(&mut self) {
            RECORDED.with(|r| r.set(self.0));
        }
    }
    let _restore = Restore(RECORDED.with(|r| r.replace(true)));
    f()
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Run name: the same name continues the same run.
    pub name: String,
    /// temporal, self-rewarding, past-only, future-only, meta-rewarding, temporal-meta, eval or toy.
    pub workflow: Workflow,
    #[serde(default = "default_seed")]
    pub seed: u64,
    /// cpu | cuda:N
    #[serde(default = "default_device")]
    pub device: String,
    /// How the steps that run prompts through the model for their next tokens (generation, the
    /// judge in either mode, a meta-judge, evaluation's answers and a local judge in either
    /// mode) compute their prompts' attention on the CPU: `fused`, tsr's causal kernel (faster
    /// on long prompts, the judge's; each token's attention has the same bits whatever its
    /// batch or CPU kind), or `batched`, gemm's products around a softmax over every slot. A
    /// judge in logprob mode with `fused` takes its verdict's logits from generation's prefill
    /// instead of the scoring forward, the tokens its batch's prompts start with (the rubric)
    /// computed once. Part of those steps' keys when `fused`.
    ///
    /// Left out, a new run records `fused` (see [`Config::settle_defaults`]); a run recorded
    /// without it was started when `batched` was the default, and continues batched.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "crate::choices::prompt_attention"
    )]
    pub prompt_attention: Option<tsr_steps::lm::PromptAttention>,
    /// Store folder (default `.tsr` where tsr runs; `--store` and `$TSR_STORE` override it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub store: Option<PathBuf>,
    /// Object storage the store is replicated to (`s3://bucket/prefix`, `gs://`, `az://`,
    /// `file:///dir`); `--remote` overrides. Not part of the run's definition.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub remote: Option<String>,
    /// When the remote catches up: `step` (default), `checkpoint` or `commit`.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        with = "crate::choices::remote_sync"
    )]
    pub remote_sync: Option<tsr_state::SyncMode>,
    #[serde(default)]
    pub toy: ToySpec,
    /// Language-model workflows: number of iterations.
    #[serde(default = "one")]
    pub iterations: u32,
    /// Past anchor for rejected responses: `initial` (M0) or `previous` (Mi-1).
    #[serde(default = "initial")]
    pub anchor: Anchor,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model: Option<ModelSection>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prompts: Option<PromptsSection>,
    #[serde(default)]
    pub generate: GenerateSection,
    #[serde(default)]
    pub judge: JudgeSection,
    #[serde(default)]
    pub dpo: DpoSection,
    /// `[meta]`: Meta-Rewarding's judge training (the `meta-rewarding` and `temporal-meta`
    /// workflows; filled with defaults for them, absent otherwise).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub meta: Option<MetaSection>,
    /// `[eval]`: held-out evaluation of M0 and the trained models (absent: no evaluation).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub eval: Option<EvalSection>,
    /// `[executor]`: where item steps' batches are computed (absent: in this process). Not
    /// part of the run's definition: a run can continue under another executor.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub executor: Option<ExecutorSection>,
}

/// `[executor]`
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct ExecutorSection {
    /// `local` (this process) or `processes` (worker processes on this machine).
    pub kind: Executor,
    /// Worker processes (the most shards computed at once).
    pub workers: usize,
    /// Items per shard: a whole number of each step's batches (default: a step's batches
    /// split evenly between the workers).
    pub shard_items: Option<u64>,
    /// Attempts per shard that end in an error before its step fails.
    pub max_attempts: u32,
    /// One GPU per worker (`cuda:0`, `cuda:1`, ...); empty: every worker uses the run's device,
    /// and on CPU the threads are split between the workers.
    pub devices: Vec<String>,
    /// Slurm: the partition, account and qos of the array jobs (`--partition`, ...).
    pub partition: Option<String>,
    pub account: Option<String>,
    pub qos: Option<String>,
    /// Slurm: generic resources per task, e.g. `gpu:1` (`--gres`).
    pub gres: Option<String>,
    /// Slurm: CPUs per task (`--cpus-per-task`); a worker runs that many threads.
    pub cpus_per_task: u32,
    /// Slurm: memory per task, e.g. `16G` (`--mem`).
    pub mem: Option<String>,
    /// Slurm: time limit per task, e.g. `02:00:00` (`--time`).
    pub time: Option<String>,
    /// Slurm: further `sbatch` options, one per element (e.g. `["--constraint=a100"]`).
    pub extra_args: Vec<String>,
    /// Slurm: the path of tsr on the nodes (default: the running executable). It must be the
    /// same build as the driver's.
    pub binary: Option<std::path::PathBuf>,
    /// Slurm: seconds a task may stay pending for a reason that waiting does not clear (a held
    /// job, a node or partition that is not available) before its step fails.
    pub stuck_after_s: u64,
    /// Slurm: `[executor.steps.<kind>]`, resources of one step kind's jobs (`judge`'s long
    /// prompts may want more memory or another partition than `generate`; `dpo` a GPU).
    pub steps: std::collections::BTreeMap<String, StepResources>,
    /// How workers get inputs and hand back results: `filesystem` or `remote` (default: `remote`
    /// under Slurm when the store has a remote copy, else `filesystem`).
    pub share: Option<Share>,
    /// With `share = "remote"`: the folder on each node where workers keep the inputs they
    /// read from the remote (shared by the workers of a node).
    pub node_cache: std::path::PathBuf,
    /// With `share = "remote"`: the most the node cache may hold, in GB; the inputs least
    /// recently used that no worker is reading are removed beyond it.
    pub node_cache_gb: f64,
    /// Slurm: a file on the nodes that each task's script sources before it starts tsr (where a
    /// site keeps the object store's credentials); tsr writes only its path.
    pub worker_env: Option<std::path::PathBuf>,
}

/// `[executor.steps.<kind>]`: what one step kind's array tasks ask Slurm for, over the
/// `[executor]` settings of the same names.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct StepResources {
    pub partition: Option<String>,
    pub gres: Option<String>,
    pub cpus_per_task: Option<u32>,
    pub mem: Option<String>,
    pub time: Option<String>,
}

impl ExecutorSection {
    /// The `sbatch` options of the Slurm keys.
    pub fn sbatch_args(&self) -> Vec<String> {
        self.sbatch_args_for(None, None)
    }

    /// The `sbatch` options of one step kind's array tasks: `[executor.steps.<kind>]` over
    /// `[executor]`; without a `mem` in either, `planned_mem` bytes (the memory plan's estimate
    /// for the step) rounded up to a multiple of 256 MiB (steps of about the same size ask
    /// for the same, so Slurm checks fewer distinct requests).
    pub fn sbatch_args_for(&self, kind: Option<&str>, planned_mem: Option<u64>) -> Vec<String> {
        let own = kind
            .and_then(|k| self.steps.get(k))
            .cloned()
            .unwrap_or_default();
        let pick = |a: &Option<String>, b: &Option<String>| a.clone().or_else(|| b.clone());
        let mem = pick(&own.mem, &self.mem)
            .or_else(|| planned_mem.map(|b| format!("{}M", b.div_ceil(256 << 20).max(1) * 256)));
        let mut out = vec![format!(
            "--cpus-per-task={}",
            own.cpus_per_task.unwrap_or(self.cpus_per_task)
        )];
        for (flag, v) in [
            ("partition", pick(&own.partition, &self.partition)),
            ("account", self.account.clone()),
            ("qos", self.qos.clone()),
            ("gres", pick(&own.gres, &self.gres)),
            ("mem", mem),
            ("time", pick(&own.time, &self.time)),
        ] {
            if let Some(v) = v {
                out.push(format!("--{flag}={v}"));
            }
        }
        out.extend(self.extra_args.iter().cloned());
        out
    }
}

impl Default for ExecutorSection {
    fn default() -> Self {
        ExecutorSection {
            kind: Executor::Local,
            workers: 2,
            shard_items: None,
            max_attempts: 3,
            devices: vec![],
            partition: None,
            account: None,
            qos: None,
            gres: None,
            cpus_per_task: 1,
            mem: None,
            time: None,
            extra_args: vec![],
            binary: None,
            stuck_after_s: 1800,
            steps: Default::default(),
            share: None,
            node_cache: std::path::PathBuf::from("/tmp/tsr-node-cache"),
            node_cache_gb: 100.0,
            worker_env: None,
        }
    }
}

fn one() -> u32 {
    1
}
fn initial() -> Anchor {
    Anchor::Initial
}

/// `[model]`: the initial model M0.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ModelSection {
    /// A GGUF file, a Hugging Face model folder, or a hub id (`Org/Name`) from the local cache.
    pub source: String,
    /// A LoRA adapter folder as PEFT saves it, merged into the weights on import (M0 is the
    /// base with the adapter).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub adapter: Option<PathBuf>,
    /// Precision of the frozen base weights: `f32` (the default), `bf16` or `f16`. Half
    /// precision needs `[dpo] adapter = "lora"` (adapters and their optimizer stay f32).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dtype: Option<Dtype>,
}

impl ModelSection {
    /// Bytes per base weight (4, or 2 for `bf16`/`f16`).
    pub fn weight_bytes(&self) -> u64 {
        self.dtype.unwrap_or(Dtype::F32).bytes()
    }

    /// The external path to fingerprint and how to read it (`gguf` or `hf`).
    pub fn resolve(&self) -> Result<(PathBuf, String), ConfigError> {
        let src =
            tsr_model::ModelSource::parse(&self.source).map_err(|e| ConfigError::Invalid {
                key: "model.source".into(),
                reason: e.to_string(),
            })?;
        Ok(match src {
            tsr_model::ModelSource::Gguf(p) => (p, "gguf".into()),
            tsr_model::ModelSource::HfDir(p) => (p, "hf".into()),
            tsr_model::ModelSource::HubId(id) => {
                let p = tsr_model::resolve_hub_id(&id).map_err(|e| ConfigError::Invalid {
                    key: "model.source".into(),
                    reason: e.to_string(),
                })?;
                (p, "hf".into())
            }
        })
    }
}

/// `[prompts]`: the user's JSONL.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct PromptsSection {
    pub file: PathBuf,
    /// Use only the first N prompts (0: all).
    #[serde(default)]
    pub limit: usize,
}

/// `[generate]`: sampling of responses (Self-Rewarding's defaults; K = 7 as in the paper).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct GenerateSection {
    pub k: u32,
    pub temperature: f64,
    pub top_p: f64,
    pub top_k: Option<usize>,
    pub max_new_tokens: usize,
    /// Responses decoded at once (the KV cache's rows).
    pub batch_size: usize,
    /// Batches handed to the model and committed together. Above 1, a row whose response
    /// ended takes the next waiting one (continuous batching), and a stopped run redoes at most
    /// that many batches. Part of the steps' keys when above 1; left out of the definition at
    /// 1, so runs recorded before the setting existed continue.
    #[serde(skip_serializing_if = "tsr_steps::items::is_one_batch")]
    pub commit_batches: usize,
    /// The precision of the weights while generating: `f16` or `bf16` reads half the bytes
    /// per token (on the CPU the products still add in f32); default: as the model holds
    /// them. Part of the step's key when it changes anything, never chosen by tsr.
    #[serde(
        skip_serializing_if = "Option::is_none",
        deserialize_with = "crate::choices::generate_weights"
    )]
    pub weights: Option<tsr_steps::lm::Weights>,
}

impl Default for GenerateSection {
    fn default() -> Self {
        GenerateSection {
            k: 7,
            temperature: 0.7,
            top_p: 0.9,
            top_k: None,
            max_new_tokens: 256,
            batch_size: 16,
            commit_batches: 1,
            weights: None,
        }
    }
}

/// `[judge]`: LLM-as-a-Judge.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct JudgeSection {
    /// `text` (generate, parse `Score: N`, average J samples) or `logprob` (expected score).
    #[serde(deserialize_with = "crate::choices::judge_mode")]
    pub mode: tsr_steps::kinds::judge::JudgeMode,
    /// J: judgements per response in text mode.
    pub samples: u32,
    pub max_new_tokens: usize,
    pub temperature: f64,
    pub top_p: f64,
    /// Judgements decoded at once in text mode (J per response); sequences per forward pass in
    /// logprob mode.
    pub batch_size: usize,
    /// Text mode: batches handed to the model and committed together, as `[generate]
    /// commit_batches`.
    #[serde(skip_serializing_if = "tsr_steps::items::is_one_batch")]
    pub commit_batches: usize,
    /// A template file with {prompt} and {response}; default: the built-in rubric.
    pub template: Option<PathBuf>,
    /// Length control band for selection (None: off).
    pub length_band: Option<f64>,
    /// Length control band per iteration (overrides `length_band`; iterations past the end of
    /// the list use its last value).
    pub length_band_per_iteration: Option<Vec<f64>>,
    /// A fixed judge model (GGUF, HF folder or hub id); default: the current model Mi.
    pub model: Option<String>,
    /// The precision of the weights while judging (text mode), as `[generate] weights`.
    #[serde(
        skip_serializing_if = "Option::is_none",
        deserialize_with = "crate::choices::judge_weights"
    )]
    pub weights: Option<tsr_steps::lm::Weights>,
}

impl Default for JudgeSection {
    fn default() -> Self {
        JudgeSection {
            mode: tsr_steps::kinds::judge::JudgeMode::Text,
            samples: 3,
            max_new_tokens: 160,
            temperature: 0.7,
            top_p: 0.9,
            batch_size: 16,
            commit_batches: 1,
            template: None,
            length_band: None,
            length_band_per_iteration: None,
            model: None,
            weights: None,
        }
    }
}

impl JudgeSection {
    /// The length control band of iteration `i` (1-based).
    pub fn band_for(&self, i: u32) -> Option<f64> {
        match &self.length_band_per_iteration {
            Some(v) if !v.is_empty() => v.get(i as usize - 1).or(v.last()).copied(),
            _ => self.length_band,
        }
    }
}

/// `[meta]`: Meta-Rewarding (Wu et al. 2024): the model meta-judges its own judgements of the
/// responses it is least certain about, and DPO also trains on the resulting judge pairs.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct MetaSection {
    /// Most responses meta-judged per iteration (0: no cap).
    pub max_responses: usize,
    /// Most responses meta-judged, as a share of all judged responses (rounded up).
    pub response_share: f64,
    /// Most responses meta-judged per prompt (0: no cap).
    pub max_per_prompt: usize,
    /// Judge pairs are at most this share of the pairs DPO trains on (1.0: no cap).
    pub judge_pair_share: f64,
    pub max_new_tokens: usize,
    pub temperature: f64,
    pub top_p: f64,
    /// Meta-judgements decoded at once (two per compared response: both orders).
    pub batch_size: usize,
    /// Batches handed to the model and committed together, as `[generate] commit_batches`.
    #[serde(skip_serializing_if = "tsr_steps::items::is_one_batch")]
    pub commit_batches: usize,
    /// A meta-judge template file with {judge_prompt}, {judgement_a}, {judgement_b}; default:
    /// the built-in prompt.
    pub template: Option<PathBuf>,
}

impl Default for MetaSection {
    fn default() -> Self {
        MetaSection {
            max_responses: 0,
            response_share: 1.0,
            max_per_prompt: 1,
            judge_pair_share: 0.15,
            max_new_tokens: 200,
            temperature: 0.7,
            top_p: 0.9,
            batch_size: 16,
            commit_batches: 1,
            template: None,
        }
    }
}

/// `[eval]`: win rates of the trained models against a baseline on held-out prompts, judged
/// pairwise in both orders by a fixed judge.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct EvalSection {
    /// Held-out prompts: JSONL as for training, with an optional `"answer"` per line.
    pub prompts: Option<PathBuf>,
    /// Use only the first N evaluation prompts (0: all).
    pub limit: usize,
    /// Evaluate M0 once and the model made by every N-th iteration (and by the last); 0: off.
    pub every: u32,
    /// Also evaluate each iteration's look-ahead model Mf (workflows that train one).
    pub future: bool,
    /// Allow evaluation prompts that are also training prompts.
    pub allow_overlap: bool,
    pub max_new_tokens: usize,
    /// 0: greedy answers (the default); > 0: seeded sampling.
    pub temperature: f64,
    pub top_p: f64,
    /// Answers decoded at once (the KV cache's rows).
    pub batch_size: usize,
    /// Batches of answers handed to the model and committed together, as `[generate]
    /// commit_batches`.
    #[serde(skip_serializing_if = "tsr_steps::items::is_one_batch")]
    pub commit_batches: usize,
    /// The baseline's answers come from this model (GGUF, HF folder or hub id); default: M0.
    pub baseline_model: Option<String>,
    /// Or from a reference outputs file in AlpacaEval's format (JSON list of
    /// `{"instruction", "output", "generator"}`).
    pub reference: Option<PathBuf>,
    /// Bootstrap resamples of the 95% interval (0: no interval).
    pub bootstrap_resamples: usize,
    pub judge: EvalJudgeSection,
    /// AlpacaEval 2.0's length-control data: a folder with `df_gamed.csv` and
    /// `alpaca_eval_gpt4_baseline.json` from the model hub's dataset `tatsu-lab/alpaca_eval`.
    /// With it, each evaluation also reports AlpacaEval 2.0's own length-controlled win rate
    /// (its `length_controlled_v1` GLM); it needs the API judge with AlpacaEval's annotator and
    /// AlpacaEval's 805 instructions in its order as the prompts. Without it, the reported LC
    /// is the minimal GLM (the length term alone).
    pub lc_data: Option<PathBuf>,
}

impl Default for EvalSection {
    fn default() -> Self {
        EvalSection {
            prompts: None,
            limit: 0,
            every: 1,
            future: false,
            allow_overlap: false,
            max_new_tokens: 256,
            temperature: 0.0,
            top_p: 1.0,
            batch_size: 16,
            commit_batches: 1,
            baseline_model: None,
            reference: None,
            bootstrap_resamples: 1000,
            judge: EvalJudgeSection::default(),
            lc_data: None,
        }
    }
}

/// `[eval.judge]`: the fixed evaluation judge.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct EvalJudgeSection {
    /// The judge model (GGUF, HF folder or hub id); default: the initial model, a weak judge.
    pub model: Option<String>,
    /// `text` (parse `Better: A|B`) or `logprob` (compare the probabilities of `A` and `B`).
    #[serde(deserialize_with = "crate::choices::eval_judge_mode")]
    pub mode: tsr_steps::kinds::judge::JudgeMode,
    pub max_new_tokens: usize,
    /// 0: greedy verdicts (the default).
    pub temperature: f64,
    pub top_p: f64,
    /// Verdicts decoded at once in text mode (two per prompt: both orders); sequences per
    /// forward pass in logprob mode.
    pub batch_size: usize,
    /// A local judge in text mode: batches handed to the model and committed together, as
    /// `[generate] commit_batches`.
    #[serde(skip_serializing_if = "tsr_steps::items::is_one_batch")]
    pub commit_batches: usize,
    /// A template file with {instruction}, {output_a} and {output_b}, ending with the request
    /// for a `Better: A` or `Better: B` line; default: the built-in one. With `kind = "openai"`:
    /// the annotator's template (AlpacaEval's `alpaca_eval_clf.txt`), required.
    pub template: Option<PathBuf>,
    /// `local` (a model run here, `model` its source) or `openai` (an OpenAI-compatible server
    /// at `base_url`, `model` the name it serves).
    pub kind: String,
    /// `openai`: the server's base URL, up to `/chat/completions`.
    pub base_url: Option<String>,
    /// `openai`: the environment variable holding the key (none: no key is sent).
    pub api_key_env: Option<String>,
    /// `openai`: the annotator reproduced.
    pub annotator: String,
    /// `openai`: requests in flight at once.
    pub max_concurrency: usize,
    /// `openai`: seconds before a request is given up and tried again.
    pub timeout_s: f64,
    /// `openai`: tries after the first for a request the server cannot answer now.
    pub max_retries: u32,
    /// `openai`: tokens (in and out) one evaluation may spend; the run stops there (exit 3)
    /// and continues when the limit is raised.
    pub max_cost_tokens: Option<u64>,
    /// Not a setting: set by `tsr verify --repair` so that a recomputed API evaluation reads
    /// its recorded answers and never asks (pays) the server again.
    #[serde(skip)]
    pub offline: bool,
}

impl EvalSection {
    /// The section's file paths (`~` expansion and paths relative to the config apply to each).
    fn paths_mut(&mut self) -> [&mut Option<PathBuf>; 4] {
        [
            &mut self.prompts,
            &mut self.reference,
            &mut self.judge.template,
            &mut self.lc_data,
        ]
    }

    /// The evaluation's API judge (`[eval.judge] kind = "openai"`) with its template's text and,
    /// to ask, its server.
    pub(crate) fn api_judge(
        &self,
        template: String,
        server: Option<tsr_steps::openai::ApiSettings>,
    ) -> tsr_steps::kinds::api_judge::ApiJudge {
        use tsr_steps::kinds::api_judge::{ApiJudge, TSR_PAIRWISE};
        let model = self.judge.model.clone().unwrap_or_default();
        // AlpacaEval's annotator uses its own completion settings; tsr's judgement writes its
        // comparison with the judge's.
        let mut j = ApiJudge::weighted_alpaca_eval(&model, template, self.bootstrap_resamples);
        j.annotator = self.judge.annotator.clone();
        if j.annotator == TSR_PAIRWISE {
            j.max_tokens = self.judge.max_new_tokens as u32;
            j.temperature = self.judge.temperature;
            j.top_p = self.judge.top_p;
            j.top_logprobs = 0;
        }
        j.server = server;
        j.max_cost_tokens = self.judge.max_cost_tokens;
        j
    }
}

impl EvalJudgeSection {
    /// The API judge's server settings (`kind = "openai"`).
    pub fn api_settings(&self) -> Option<tsr_steps::openai::ApiSettings> {
        (self.kind == "openai" && !self.offline).then(|| tsr_steps::openai::ApiSettings {
            base_url: self.base_url.clone().unwrap_or_default(),
            api_key_env: self.api_key_env.clone(),
            max_concurrency: self.max_concurrency,
            timeout_s: self.timeout_s,
            max_retries: self.max_retries,
        })
    }
}

impl Default for EvalJudgeSection {
    fn default() -> Self {
        EvalJudgeSection {
            model: None,
            mode: tsr_steps::kinds::judge::JudgeMode::Text,
            max_new_tokens: 160,
            temperature: 0.0,
            top_p: 1.0,
            batch_size: 16,
            commit_batches: 1,
            template: None,
            kind: "local".into(),
            base_url: None,
            api_key_env: None,
            annotator: tsr_steps::kinds::api_judge::WEIGHTED_ALPACA_EVAL_GPT4_TURBO.into(),
            max_concurrency: 4,
            timeout_s: 60.0,
            max_retries: 5,
            max_cost_tokens: None,
            offline: false,
        }
    }
}

/// `[dpo]`
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct DpoSection {
    pub beta: f64,
    #[serde(deserialize_with = "crate::choices::dpo_loss")]
    pub loss: tsr_dpo::DpoLossKind,
    pub lr: f64,
    pub warmup_steps: u64,
    pub epochs: u64,
    pub micro_batch: usize,
    pub accum_steps: usize,
    pub max_grad_norm: Option<f64>,
    pub weight_decay: f64,
    pub checkpoint_every: u64,
    /// Reference model: `current` (Mi, the default) or `initial` (M0).
    pub reference: Reference,
    /// What DPO trains: `full` (every weight, the default) or `lora` (a low-rank adapter over
    /// the frozen base; models in the store are then the base plus an adapter).
    #[serde(skip_serializing_if = "is_full")]
    pub adapter: Adapter,
    /// `[dpo.lora]`: the adapter the first LoRA DPO creates (defaults when left out).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub lora: Option<LoraSection>,
}

fn is_full(a: &Adapter) -> bool {
    *a == Adapter::Full
}

/// `[dpo.lora]`
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct LoraSection {
    /// Rank of the adapter.
    pub r: usize,
    /// Scale numerator: the update is `alpha / r * B A`.
    pub alpha: f64,
    /// Dropout on the adapter's input during training.
    pub dropout: f64,
    /// Projections that get an adapter.
    pub targets: Vec<String>,
}

impl Default for LoraSection {
    fn default() -> Self {
        LoraSection {
            r: 16,
            alpha: 32.0,
            dropout: 0.0,
            targets: tsr_model::Proj::ALL.map(|p| p.name().to_string()).to_vec(),
        }
    }
}

impl Default for DpoSection {
    fn default() -> Self {
        DpoSection {
            beta: 0.1,
            loss: tsr_dpo::DpoLossKind::Sigmoid,
            lr: 5e-7,
            warmup_steps: 0,
            epochs: 1,
            micro_batch: 1,
            accum_steps: 4,
            max_grad_norm: Some(1.0),
            weight_decay: 0.0,
            checkpoint_every: 10,
            reference: Reference::Current,
            adapter: Adapter::Full,
            lora: None,
        }
    }
}

impl Config {
    /// Fills in the defaults a run records explicitly because they changed: what a setting left
    /// out of this config means depends on whether the run is new. `recorded` is the config
    /// TOML the store holds for a run of this name (a continued run; only the settings below
    /// are read from it, so files it names need not be where they were), `None` for a new run.
    /// - `prompt_attention`: a new run records `fused`. A recorded run keeps what it recorded;
    ///   one recorded without it began when `batched` was the default and stays batched (its
    ///   steps keep their keys, and its definition compares equal).
    pub fn settle_defaults(&mut self, recorded: Option<&str>) {
        if self.prompt_attention.is_none() {
            self.prompt_attention = match recorded {
                // tsr wrote the recorded config, so its value is one of the choices.
                Some(toml) => toml
                    .parse::<toml::Value>()
                    .ok()
                    .and_then(|v| v.get("prompt_attention").cloned())
                    .and_then(|v| v.try_into().ok()),
                None => Some(tsr_steps::lm::PromptAttention::Fused),
            };
        }
    }

    /// The generating steps' `prompt_attention` setting: set only when fused (batched, and
    /// leaving it out in a recorded run, keep the steps' keys of before the setting).
    pub fn fused_prompts(&self) -> Option<tsr_steps::lm::PromptAttention> {
        self.prompt_attention
            .filter(|a| *a == tsr_steps::lm::PromptAttention::Fused)
    }

    /// The precision the run's model holds its base in: `[model] dtype`, f32 when not given.
    pub fn base_dtype(&self) -> Dtype {
        self.model
            .as_ref()
            .and_then(|m| m.dtype)
            .unwrap_or(Dtype::F32)
    }

    /// The precision the judge steps' model holds its base in: the run's, or f32 for a fixed
    /// judge model (`[judge] model`, imported in f32).
    pub fn judge_base_dtype(&self) -> Dtype {
        match self.judge.model {
            Some(_) => Dtype::F32,
            None => self.base_dtype(),
        }
    }

    pub fn from_file(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError::Read {
            path: path.to_path_buf(),
            source: e,
        })?;
        // A bare file name (`tsr run run.toml`) lives in the folder tsr runs in: its relative
        // paths are stored absolute like any other config's.
        let dir = match path.parent() {
            Some(d) if !d.as_os_str().is_empty() => d,
            _ => Path::new("."),
        };
        Config::from_str_at_dir(&text, path, Some(dir))
    }

    pub fn from_str_at(text: &str, path: &Path) -> Result<Config, ConfigError> {
        Self::from_str_at_dir(text, path, None)
    }

    /// A run's recorded config, read to show the run (`tsr status`): validated like any
    /// config except that the files it names need not exist here, so a store copied to another
    /// machine or a moved project can still be read. Running or replaying it checks them.
    pub fn from_recorded(text: &str, path: &Path) -> Result<Config, ConfigError> {
        as_recorded(|| Self::from_str_at_dir(text, path, None))
    }

    /// Whether this thread is reading a recorded config ([`Config::from_recorded`],
    /// [`crate::build_recorded`]): files it names need not exist.
    pub(crate) fn reading_recorded() -> bool {
        RECORDED.with(|r| r.get())
    }

    /// Parse and validate; relative paths (store, model, prompts, template) are taken relative
    /// to `dir` (the config file's folder) and stored absolute, so a stored run does not depend
    /// on where tsr is started.
    pub fn from_str_at_dir(
        text: &str,
        path: &Path,
        dir: Option<&Path>,
    ) -> Result<Config, ConfigError> {
        let mut c: Config = toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: path.to_path_buf(),
            message: e.to_string().trim().to_string(),
        })?;
        // `~/` means the home folder, in any path-valued key.
        let home = |p: &str| -> Option<String> {
            p.strip_prefix("~/").and_then(|rest| {
                std::env::var_os("HOME").map(|h| Path::new(&h).join(rest).display().to_string())
            })
        };
        if let Some(m) = c.model.as_mut() {
            if let Some(h) = home(&m.source) {
                m.source = h;
            }
            if let Some(h) = m.adapter.as_ref().and_then(|a| a.to_str()).and_then(home) {
                m.adapter = Some(PathBuf::from(h));
            }
        }
        if let Some(m) = c.judge.model.as_mut() {
            if let Some(h) = home(m) {
                *m = h;
            }
        }
        if c.workflow.is_meta() && c.meta.is_none() {
            c.meta = Some(MetaSection::default());
        }
        if let Some(p) = c.prompts.as_mut() {
            if let Some(h) = p.file.to_str().and_then(home) {
                p.file = PathBuf::from(h);
            }
        }
        if let Some(e) = c.eval.as_mut() {
            for p in e.paths_mut().into_iter().flatten() {
                if let Some(h) = p.to_str().and_then(home) {
                    *p = PathBuf::from(h);
                }
            }
            for m in [&mut e.baseline_model, &mut e.judge.model]
                .into_iter()
                .flatten()
            {
                if let Some(h) = home(m) {
                    *m = h;
                }
            }
        }
        if let Some(dir) = dir.filter(|d| !d.as_os_str().is_empty()) {
            let abs = |p: &mut PathBuf| {
                if p.is_relative() {
                    *p = lexical_clean(
                        &std::path::absolute(dir.join(&*p)).unwrap_or_else(|_| dir.join(&*p)),
                    );
                }
            };
            if let Some(s) = c.store.as_mut() {
                abs(s);
            }
            if let Some(p) = c.prompts.as_mut() {
                abs(&mut p.file);
            }
            if let Some(a) = c.model.as_mut().and_then(|m| m.adapter.as_mut()) {
                abs(a);
            }
            if let Some(t) = c.judge.template.as_mut() {
                abs(t);
            }
            if let Some(t) = c.meta.as_mut().and_then(|m| m.template.as_mut()) {
                abs(t);
            }
            if let Some(m) = c.judge.model.as_mut() {
                let candidate = dir.join(&*m);
                if Path::new(m.as_str()).is_relative() && candidate.exists() {
                    *m = std::path::absolute(&candidate)
                        .unwrap_or(candidate)
                        .display()
                        .to_string();
                }
            }
            if let Some(e) = c.eval.as_mut() {
                for p in e.paths_mut().into_iter().flatten() {
                    abs(p);
                }
                for m in [&mut e.baseline_model, &mut e.judge.model]
                    .into_iter()
                    .flatten()
                {
                    let candidate = dir.join(&*m);
                    if Path::new(m.as_str()).is_relative() && candidate.exists() {
                        *m = std::path::absolute(&candidate)
                            .unwrap_or(candidate)
                            .display()
                            .to_string();
                    }
                }
            }
            if let Some(m) = c.model.as_mut() {
                let candidate = dir.join(&m.source);
                if Path::new(&m.source).is_relative() && candidate.exists() {
                    m.source = std::path::absolute(&candidate)
                        .unwrap_or(candidate)
                        .display()
                        .to_string();
                }
            }
        }
        c.validate()?;
        Ok(c)
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        let bad = |key: &str, reason: &str| {
            Err(ConfigError::Invalid {
                key: key.into(),
                reason: reason.into(),
            })
        };
        // The stricter rule for new run names is checked where a run is created (runs
        // recorded under older names must stay resumable).
        if let Err(e) = tsr_state::validate_name(&self.name) {
            return bad("name", &e.to_string());
        }
        if self.device != "cpu" && !self.device.starts_with("cuda") {
            return bad("device", "use `cpu` or `cuda:N`");
        }
        if let Some(url) = &self.remote {
            if let Err(e) = tsr_state::remote::RemoteUrl::parse(url) {
                return bad("remote", &e.to_string());
            }
        }
        if let Some(x) = &self.executor {
            if x.workers == 0 {
                return bad("executor.workers", "must be at least 1");
            }
            if x.max_attempts == 0 {
                return bad("executor.max_attempts", "must be at least 1");
            }
            if x.kind != Executor::Slurm {
                let d = ExecutorSection::default();
                for (key, set) in [
                    ("partition", x.partition.is_some()),
                    ("account", x.account.is_some()),
                    ("qos", x.qos.is_some()),
                    ("gres", x.gres.is_some()),
                    ("cpus_per_task", x.cpus_per_task != d.cpus_per_task),
                    ("mem", x.mem.is_some()),
                    ("time", x.time.is_some()),
                    ("extra_args", !x.extra_args.is_empty()),
                    ("binary", x.binary.is_some()),
                    ("stuck_after_s", x.stuck_after_s != d.stuck_after_s),
                    ("steps", !x.steps.is_empty()),
                    ("worker_env", x.worker_env.is_some()),
                ] {
                    if set {
                        return bad(
                            &format!("executor.{key}"),
                            "is a Slurm setting: add kind = \"slurm\" to [executor], or remove it",
                        );
                    }
                }
            } else {
                if !x.devices.is_empty() {
                    return bad(
                        "executor.devices",
                        "is for worker processes on one machine; under Slurm, ask each task for its GPU with gres = \"gpu:1\"",
                    );
                }
                if x.cpus_per_task == 0 {
                    return bad("executor.cpus_per_task", "must be at least 1");
                }
                for (kind, r) in &x.steps {
                    if !tsr_steps::shards::in_workers(kind) {
                        return bad(
                            &format!("executor.steps.{kind}"),
                            &format!(
                                "is not a step kind that runs as Slurm jobs; use one of {}, {}",
                                tsr_steps::shards::SHARDABLE.join(", "),
                                tsr_steps::shards::WHOLE.join(", ")
                            ),
                        );
                    }
                    if r.cpus_per_task == Some(0) {
                        return bad(
                            &format!("executor.steps.{kind}.cpus_per_task"),
                            "must be at least 1",
                        );
                    }
                }
                if let Some(a) = x.extra_args.iter().find(|a| !a.starts_with("--")) {
                    return bad(
                        "executor.extra_args",
                        &format!("`{a}`: give each sbatch option whole, as `--name=value`"),
                    );
                }
                const OWN: [&str; 11] = [
                    "--array",
                    "--job-name",
                    "--output",
                    "--error",
                    "--export",
                    "--comment",
                    "--parsable",
                    "--chdir",
                    "--open-mode",
                    "--wrap",
                    "--signal",
                ];
                if let Some(a) = x
                    .extra_args
                    .iter()
                    .find(|a| OWN.iter().any(|o| a.split('=').next() == Some(o)))
                {
                    return bad(
                        "executor.extra_args",
                        &format!("`{a}`: tsr sets this sbatch option itself (it names, logs and signals its array tasks); remove it"),
                    );
                }
            }
            if x.kind == Executor::Local {
                let d = ExecutorSection::default();
                for (key, set) in [
                    ("share", x.share.is_some()),
                    ("node_cache", x.node_cache != d.node_cache),
                    ("node_cache_gb", x.node_cache_gb != d.node_cache_gb),
                ] {
                    if set {
                        return bad(
                            &format!("executor.{key}"),
                            "is for workers: add kind = \"processes\" or kind = \"slurm\" to [executor], or remove it",
                        );
                    }
                }
            }
            if !x.node_cache.is_absolute() {
                return bad(
                    "executor.node_cache",
                    "must be an absolute folder on the nodes (their local disk, such as /tmp/tsr-node-cache)",
                );
            }
            if !(x.node_cache_gb > 0.0 && x.node_cache_gb.is_finite()) {
                return bad(
                    "executor.node_cache_gb",
                    "must be a positive number of GB (the largest model and its inputs must fit)",
                );
            }
            if x.shard_items == Some(0) {
                return bad(
                    "executor.shard_items",
                    "must be at least 1 (or leave it out)",
                );
            }
            if !x.devices.is_empty() && x.devices.len() != x.workers {
                return bad(
                    "executor.devices",
                    &format!(
                        "gives {} devices for {} workers; give one device per worker",
                        x.devices.len(),
                        x.workers
                    ),
                );
            }
            if let Some(d) = x.devices.iter().find(|d| {
                d.strip_prefix("cuda:")
                    .is_none_or(|n| n.parse::<usize>().is_err())
            }) {
                return bad(
                    "executor.devices",
                    &format!("`{d}`: give one GPU per worker as `cuda:N`; leave `devices` out to split the CPU threads between the workers"),
                );
            }
        }
        if let Some(dir) = self.model.as_ref().and_then(|m| m.adapter.as_ref()) {
            tsr_model::LoraAdapter::load(dir, &tsr_model::Device::Cpu).map_err(|e| {
                ConfigError::Invalid {
                    key: "model.adapter".into(),
                    reason: tsr_state::error_chain(&e),
                }
            })?;
        }
        if self.workflow == Workflow::Eval {
            if self.model.is_none() {
                return bad(
                    "model",
                    "the eval workflow needs a [model] section with the model to evaluate",
                );
            }
            if self.eval.is_none() {
                return bad(
                    "eval",
                    "the eval workflow needs an [eval] section with `prompts = ...`",
                );
            }
        } else if self.workflow.trains() {
            self.validate_lm()?;
        }
        if self.eval.is_some() {
            self.validate_eval()?;
        }
        if self.workflow == Workflow::Toy {
            let t = &self.toy;
            if t.iterations == 0 {
                return bad("toy.iterations", "must be at least 1");
            }
            if t.items == 0 {
                return bad("toy.items", "must be at least 1");
            }
            if t.checkpoint_every == 0 {
                return bad("toy.checkpoint_every", "must be at least 1");
            }
        }
        Ok(())
    }

    fn validate_lm(&self) -> Result<(), ConfigError> {
        let bad = |key: &str, reason: String| {
            Err(ConfigError::Invalid {
                key: key.into(),
                reason,
            })
        };
        if self.model.is_none() {
            return bad(
                "model",
                "this workflow needs a [model] section with `source = ...`".into(),
            );
        }
        match &self.prompts {
            None => {
                return bad(
                    "prompts",
                    "this workflow needs a [prompts] section with `file = ...`".into(),
                )
            }
            Some(p) if !p.file.is_file() && !Config::reading_recorded() => {
                return bad(
                    "prompts.file",
                    format!("{} does not exist or is not a file", p.file.display()),
                )
            }
            _ => {}
        }
        if self.iterations == 0 {
            return bad("iterations", "must be at least 1".into());
        }
        if let Some(d) = self.model.as_ref().and_then(|m| m.dtype) {
            if d.is_half() && self.dpo.adapter != Adapter::Lora {
                return bad(
                    "model.dtype",
                    format!("`{d}` holds the base frozen in half precision, which only LoRA training allows; add `adapter = \"lora\"` to [dpo], or use `f32` for full fine-tuning"),
                );
            }
        }
        // A base held in half precision is read as it is: a step's `weights` can only repeat it.
        for (key, w, base) in [
            ("generate.weights", self.generate.weights, self.base_dtype()),
            ("judge.weights", self.judge.weights, self.judge_base_dtype()),
        ] {
            if let Some(w) = w.filter(|w| base.is_half() && w.name() != base.as_str()) {
                return bad(
                    key,
                    format!("`{}` differs from `[model] dtype = \"{base}\"`, which already holds the base in half precision; leave `weights` out (or set it to `{base}`)", w.name()),
                );
            }
        }
        if self.judge.weights.is_some()
            && self.judge.mode == tsr_steps::kinds::judge::JudgeMode::Logprob
        {
            return bad(
                "judge.weights",
                "applies to `mode = \"text\"`, whose judgements are generated; `logprob` mode scores without generating, where half-precision weights would be cast back for every product: leave `weights` out".into(),
            );
        }
        let g = &self.generate;
        if g.k < 2 {
            return bad(
                "generate.k",
                format!(
                    "{} responses per prompt cannot form a pair; use at least 2",
                    g.k
                ),
            );
        }
        if !(g.temperature > 0.0 && g.temperature.is_finite()) {
            return bad("generate.temperature", "must be > 0".into());
        }
        if !(g.top_p > 0.0 && g.top_p <= 1.0) {
            return bad("generate.top_p", "must be in (0, 1]".into());
        }
        if g.max_new_tokens == 0 || g.batch_size == 0 {
            return bad(
                "generate",
                "max_new_tokens and batch_size must be at least 1".into(),
            );
        }
        check_commit_batches("generate.commit_batches", g.commit_batches)?;
        let j = &self.judge;
        if j.samples == 0 || j.batch_size == 0 || j.max_new_tokens == 0 {
            return bad(
                "judge",
                "samples, batch_size and max_new_tokens must be at least 1".into(),
            );
        }
        check_commit_batches("judge.commit_batches", j.commit_batches)?;
        if j.commit_batches > 1 && j.mode == tsr_steps::kinds::judge::JudgeMode::Logprob {
            return bad(
                "judge.commit_batches",
                format!(
                    "{} batches per commit refill rows that generate, and logprob mode generates nothing; remove it or use mode = \"text\"",
                    j.commit_batches
                ),
            );
        }
        if let Some(b) = j.length_band {
            if !(b >= 0.0 && b.is_finite()) {
                return bad("judge.length_band", "must be >= 0".into());
            }
        }
        if let Some(v) = &j.length_band_per_iteration {
            if v.is_empty() {
                return bad(
                    "judge.length_band_per_iteration",
                    "give at least one band, or leave the key out".into(),
                );
            }
            if let Some(b) = v.iter().find(|b| !(**b >= 0.0 && b.is_finite())) {
                return bad(
                    "judge.length_band_per_iteration",
                    format!("{b} is not >= 0"),
                );
            }
        }
        if self.workflow.is_meta() {
            self.validate_meta()?;
        }
        let d = &self.dpo;
        if !(d.beta > 0.0 && d.beta.is_finite()) {
            return bad("dpo.beta", format!("{} is not > 0", d.beta));
        }
        if !(d.lr > 0.0 && d.lr.is_finite()) {
            return bad("dpo.lr", format!("{} is not > 0", d.lr));
        }
        if d.weight_decay < 0.0 {
            return bad("dpo.weight_decay", "must be >= 0".into());
        }
        if d.epochs == 0 || d.micro_batch == 0 || d.accum_steps == 0 || d.checkpoint_every == 0 {
            return bad(
                "dpo",
                "epochs, micro_batch, accum_steps and checkpoint_every must be at least 1".into(),
            );
        }
        if let Some(n) = d.max_grad_norm {
            if n.is_nan() || n <= 0.0 {
                return bad("dpo.max_grad_norm", "must be > 0".into());
            }
        }
        match d.adapter {
            Adapter::Full => {
                if d.lora.is_some() {
                    return bad(
                        "dpo.lora",
                        "is set but dpo.adapter is `full`; add `adapter = \"lora\"` to [dpo] to train an adapter".into(),
                    );
                }
            }
            Adapter::Lora => {
                let l = d.lora.clone().unwrap_or_default();
                if l.r == 0 {
                    return bad("dpo.lora.r", "must be at least 1".into());
                }
                if !(l.alpha > 0.0 && l.alpha.is_finite()) {
                    return bad("dpo.lora.alpha", format!("{} is not > 0", l.alpha));
                }
                if !(0.0..1.0).contains(&l.dropout) {
                    return bad(
                        "dpo.lora.dropout",
                        format!("{} is not in [0, 1)", l.dropout),
                    );
                }
                if l.targets.is_empty() {
                    return bad("dpo.lora.targets", "name at least one projection".into());
                }
                let known = LoraSection::default().targets;
                if let Some(t) = l.targets.iter().find(|t| !known.contains(t)) {
                    return bad(
                        "dpo.lora.targets",
                        format!(
                            "`{t}` is not a projection tsr adapts ({})",
                            known.join(", ")
                        ),
                    );
                }
                let mut seen = l.targets.clone();
                seen.sort();
                seen.dedup();
                if seen.len() != l.targets.len() {
                    return bad("dpo.lora.targets", "names a projection twice".into());
                }
            }
        }
        Ok(())
    }

    fn validate_eval(&self) -> Result<(), ConfigError> {
        let bad = |key: &str, reason: String| {
            Err(ConfigError::Invalid {
                key: key.into(),
                reason,
            })
        };
        let e = self.eval.as_ref().expect("checked by the caller");
        if self.workflow == Workflow::Toy {
            return bad(
                "eval",
                "the toy workflow trains no model to evaluate; remove [eval]".into(),
            );
        }
        let Some(file) = &e.prompts else {
            return bad(
                "eval.prompts",
                "give the held-out prompts file (JSONL, one {\"prompt\": ...} per line)".into(),
            );
        };
        let eval_prompts = read_prompts_file("eval.prompts", file, e.limit)?;
        if e.max_new_tokens == 0 || e.batch_size == 0 {
            return bad(
                "eval",
                "max_new_tokens and batch_size must be at least 1".into(),
            );
        }
        check_commit_batches("eval.commit_batches", e.commit_batches)?;
        for (key, t, p) in [
            ("eval", e.temperature, e.top_p),
            ("eval.judge", e.judge.temperature, e.judge.top_p),
        ] {
            if !(t >= 0.0 && t.is_finite()) {
                return bad(
                    &format!("{key}.temperature"),
                    format!("{t} is not >= 0 (0 is greedy)"),
                );
            }
            if !(p > 0.0 && p <= 1.0) {
                return bad(&format!("{key}.top_p"), format!("{p} is not in (0, 1]"));
            }
        }
        if e.judge.max_new_tokens == 0 || e.judge.batch_size == 0 {
            return bad(
                "eval.judge",
                "max_new_tokens and batch_size must be at least 1".into(),
            );
        }
        check_commit_batches("eval.judge.commit_batches", e.judge.commit_batches)?;
        if e.judge.commit_batches > 1 {
            if e.judge.kind == "openai" {
                return bad(
                    "eval.judge.commit_batches",
                    format!("{} batches per commit refill the rows of a local judge; an API judge keeps `max_concurrency` requests in flight instead: remove commit_batches", e.judge.commit_batches),
                );
            }
            if e.judge.mode == tsr_steps::kinds::judge::JudgeMode::Logprob {
                return bad(
                    "eval.judge.commit_batches",
                    format!("{} batches per commit refill rows that generate, and logprob mode generates nothing; remove it or use mode = \"text\"", e.judge.commit_batches),
                );
            }
        }
        if e.future && !self.workflow.uses_future() {
            return bad(
                "eval.future",
                format!("workflow `{}` trains no look-ahead model Mf", self.workflow),
            );
        }
        if e.baseline_model.is_some() && e.reference.is_some() {
            return bad(
                "eval.reference",
                "give a baseline model (`eval.baseline_model`) or a reference outputs file, not both".into(),
            );
        }
        if let Some(r) = &e.reference {
            let bytes = std::fs::read(r).map_err(|err| ConfigError::Invalid {
                key: "eval.reference".into(),
                reason: format!("cannot read {}: {err}", r.display()),
            })?;
            tsr_steps::rules::eval::parse_reference(
                &bytes,
                &r.display().to_string(),
                &eval_prompts,
            )
            .map_err(|err| ConfigError::Invalid {
                key: "eval.reference".into(),
                reason: err.to_string(),
            })?;
        }
        let j = &e.judge;
        match j.kind.as_str() {
            "local" => {
                for (key, set) in [
                    ("base_url", j.base_url.is_some()),
                    ("api_key_env", j.api_key_env.is_some()),
                    ("max_cost_tokens", j.max_cost_tokens.is_some()),
                ] {
                    if set {
                        return bad(
                            &format!("eval.judge.{key}"),
                            "is for an API judge; set eval.judge.kind = \"openai\" or remove it"
                                .into(),
                        );
                    }
                }
            }
            "openai" => {
                let Some(settings) = j.api_settings() else {
                    unreachable!("kind is openai")
                };
                if j.base_url.is_none() {
                    return bad(
                        "eval.judge.base_url",
                        "an API judge needs its server, such as https://api.openai.com/v1 or http://127.0.0.1:8000/v1".into(),
                    );
                }
                settings.check_form().map_err(|err| ConfigError::Invalid {
                    key: "eval.judge".into(),
                    reason: err.to_string(),
                })?;
                if j.model.is_none() {
                    return bad(
                        "eval.judge.model",
                        "an API judge needs the model name its server serves (the paper's is gpt-4-1106-preview)".into(),
                    );
                }
                let pairwise = j.annotator == tsr_steps::kinds::api_judge::TSR_PAIRWISE;
                if pairwise && j.mode == tsr_steps::kinds::judge::JudgeMode::Logprob {
                    return bad(
                        "eval.judge.mode",
                        format!("`logprob` reads the token after `Better: `, which a chat API cannot be made to continue; use mode = \"text\" with annotator = \"{}\", or annotator = \"{}\" (AlpacaEval's, read from log-probabilities)", tsr_steps::kinds::api_judge::TSR_PAIRWISE, tsr_steps::kinds::api_judge::WEIGHTED_ALPACA_EVAL_GPT4_TURBO),
                    );
                }
                let (text, named) = match (&j.template, pairwise) {
                    (Some(t), _) => (
                        std::fs::read_to_string(t).map_err(|err| ConfigError::Invalid {
                            key: "eval.judge.template".into(),
                            reason: format!("cannot read {}: {err}", t.display()),
                        })?,
                        t.display().to_string(),
                    ),
                    (None, true) => (
                        tsr_steps::rules::eval::DEFAULT_PAIRWISE_TEMPLATE.to_string(),
                        "the built-in pairwise template".into(),
                    ),
                    (None, false) => return bad(
                        "eval.judge.template",
                        "an API judge needs the annotator's template: AlpacaEval's evaluators_configs/alpaca_eval_clf_gpt4_turbo/alpaca_eval_clf.txt from an installed alpaca_eval (pip install alpaca-eval==0.6.6)".into(),
                    ),
                };
                e.api_judge(text, None)
                    .check()
                    .map_err(|reason| ConfigError::Invalid {
                        key: "eval.judge".into(),
                        reason: format!("{named}: {reason}"),
                    })?;
            }
            other => {
                return bad(
                    "eval.judge.kind",
                    format!("`{other}`: use `local` (a model run here) or `openai` (an OpenAI-compatible server)"),
                )
            }
        }
        if let Some(dir) = &e.lc_data {
            let lc_bad = |reason: String| ConfigError::Invalid {
                key: "eval.lc_data".into(),
                reason,
            };
            if e.judge.kind != "openai"
                || e.judge.annotator != tsr_steps::kinds::api_judge::WEIGHTED_ALPACA_EVAL_GPT4_TURBO
            {
                return Err(lc_bad(format!(
                    "AlpacaEval 2.0's length control is fitted to the annotations of its own annotator; set [eval.judge] kind = \"openai\" with annotator = \"{}\", or leave lc_data out for the minimal length control",
                    tsr_steps::kinds::api_judge::WEIGHTED_ALPACA_EVAL_GPT4_TURBO
                )));
            }
            let (_, instructions) =
                tsr_steps::kinds::alpaca_lc::read_lc_data(dir).map_err(lc_bad)?;
            let texts: Vec<String> = eval_prompts.iter().map(|p| p.prompt.clone()).collect();
            tsr_steps::kinds::alpaca_lc::check_prompts(&instructions, &texts).map_err(lc_bad)?;
        }
        if let (Some(t), "local") = (&e.judge.template, e.judge.kind.as_str()) {
            let text = std::fs::read_to_string(t).map_err(|err| ConfigError::Invalid {
                key: "eval.judge.template".into(),
                reason: format!("cannot read {}: {err}", t.display()),
            })?;
            tsr_steps::rules::eval::check_pairwise_template(&text).map_err(|reason| {
                ConfigError::Invalid {
                    key: "eval.judge.template".into(),
                    reason: format!("{}: {reason}", t.display()),
                }
            })?;
        }
        if let (Some(p), false) = (&self.prompts, e.allow_overlap) {
            let train = read_prompts_file("prompts.file", &p.file, p.limit)?;
            let texts: std::collections::BTreeSet<&str> =
                train.iter().map(|p| p.prompt.trim()).collect();
            let overlap: Vec<&str> = eval_prompts
                .iter()
                .filter(|p| texts.contains(p.prompt.trim()))
                .map(|p| p.id.as_str())
                .collect();
            if !overlap.is_empty() {
                let mut ids = overlap
                    .iter()
                    .take(10)
                    .map(|i| format!("`{i}`"))
                    .collect::<Vec<_>>()
                    .join(", ");
                if overlap.len() > 10 {
                    ids.push_str(&format!(" and {} more", overlap.len() - 10));
                }
                return bad(
                    "eval.prompts",
                    format!(
                        "{} evaluation prompt(s) are also training prompts: {ids}; held-out prompts must be new (remove them, or set eval.allow_overlap = true)",
                        overlap.len()
                    ),
                );
            }
        }
        Ok(())
    }

    fn validate_meta(&self) -> Result<(), ConfigError> {
        let bad = |key: &str, reason: String| {
            Err(ConfigError::Invalid {
                key: key.into(),
                reason,
            })
        };
        let w = &self.workflow;
        let j = &self.judge;
        if j.mode != tsr_steps::kinds::judge::JudgeMode::Text {
            return bad(
                "judge.mode",
                format!("workflow `{w}` meta-judges written judgements; use judge mode `text`"),
            );
        }
        if j.samples < 2 {
            return bad(
                "judge.samples",
                format!("workflow `{w}` compares judgements of one response; use at least 2 judge samples, not {}", j.samples),
            );
        }
        if j.model.is_some() {
            return bad("judge.model", format!("workflow `{w}` trains the model's own judging; a fixed judge model cannot improve"));
        }
        let default = MetaSection::default();
        let m = self.meta.as_ref().unwrap_or(&default);
        if !(m.judge_pair_share >= 0.0 && m.judge_pair_share <= 1.0) {
            return bad(
                "meta.judge_pair_share",
                format!("{} is not in [0, 1]", m.judge_pair_share),
            );
        }
        if !(m.response_share >= 0.0 && m.response_share <= 1.0) {
            return bad(
                "meta.response_share",
                format!("{} is not in [0, 1]", m.response_share),
            );
        }
        if !(m.temperature > 0.0 && m.temperature.is_finite()) {
            return bad("meta.temperature", "must be > 0".into());
        }
        if !(m.top_p > 0.0 && m.top_p <= 1.0) {
            return bad("meta.top_p", "must be in (0, 1]".into());
        }
        if m.max_new_tokens == 0 || m.batch_size == 0 {
            return bad(
                "meta",
                "max_new_tokens and batch_size must be at least 1".into(),
            );
        }
        check_commit_batches("meta.commit_batches", m.commit_batches)?;
        Ok(())
    }

    pub fn to_value(&self) -> toml::Value {
        toml::Value::try_from(self).expect("config serializes to TOML")
    }

    pub fn to_toml(&self) -> String {
        toml::to_string(self).expect("config serializes to TOML")
    }

    /// Flattened `dotted.key -> value` of everything that affects results.
    pub fn definition(&self) -> BTreeMap<String, String> {
        crate::definition_of(&self.to_value())
    }
}

/// A prompts file read as the `prompts` step reads it (first `limit` prompts; 0: all).
/// A `commit_batches` setting: at least 1.
fn check_commit_batches(key: &str, n: usize) -> Result<(), ConfigError> {
    if n == 0 {
        return Err(ConfigError::Invalid {
            key: key.into(),
            reason: "must be at least 1 (1: every batch is committed on its own)".into(),
        });
    }
    Ok(())
}

fn read_prompts_file(
    key: &str,
    path: &Path,
    limit: usize,
) -> Result<Vec<tsr_steps::prompts::Prompt>, ConfigError> {
    let bytes = std::fs::read(path).map_err(|e| ConfigError::Invalid {
        key: key.into(),
        reason: format!("cannot read {}: {e}", path.display()),
    })?;
    let mut prompts = tsr_steps::prompts::parse_prompts(&bytes, &path.display().to_string())
        .map_err(|e| ConfigError::Invalid {
            key: key.into(),
            reason: e.to_string(),
        })?;
    if limit > 0 {
        prompts.truncate(limit);
    }
    Ok(prompts)
}

/// `a/b/../c` -> `a/c` without touching the filesystem (for readable stored paths).
fn lexical_clean(p: &Path) -> PathBuf {
    use std::path::Component;
    let mut out = PathBuf::new();
    for c in p.components() {
        match c {
            Component::ParentDir => {
                if !out.pop() {
                    out.push("..");
                }
            }
            Component::CurDir => {}
            other => out.push(other.as_os_str()),
        }
    }
    out
}

pub(crate) fn flatten(prefix: &str, v: &toml::Value, out: &mut BTreeMap<String, String>) {
    match v {
        toml::Value::Table(t) => {
            for (k, v) in t {
                let key = if prefix.is_empty() {
                    k.clone()
                } else {
                    format!("{prefix}.{k}")
                };
                flatten(&key, v, out);
            }
        }
        other => {
            out.insert(prefix.to_string(), other.to_string());
        }
    }
}

/// Apply `key=value` (dotted key; value parsed as a TOML literal, else taken as a string) to a
/// config, and validate the result.
pub fn apply_set(config: &Config, set: &str) -> Result<Config, ConfigError> {
    let (key, raw) = set
        .split_once('=')
        .ok_or_else(|| ConfigError::BadSet(set.to_string()))?;
    let key = key.trim();
    if key.is_empty() {
        return Err(ConfigError::BadSet(set.to_string()));
    }
    let value: toml::Value = toml::from_str::<toml::Table>(&format!("v = {raw}"))
        .ok()
        .and_then(|mut t| t.remove("v"))
        .unwrap_or_else(|| toml::Value::String(raw.to_string()));
    let mut root = config.to_value();
    let parts: Vec<&str> = key.split('.').collect();
    let mut cur = &mut root;
    for (i, part) in parts.iter().enumerate() {
        let table = cur.as_table_mut().ok_or_else(|| ConfigError::Invalid {
            key: key.into(),
            reason: format!("`{}` is not a table", parts[..i].join(".")),
        })?;
        if i + 1 == parts.len() {
            table.insert(part.to_string(), value.clone());
            break;
        }
        cur = table
            .entry(part.to_string())
            .or_insert_with(|| toml::Value::Table(Default::default()));
    }
    // Back to full fine-tuning: the LoRA settings go with LoRA (a fork cannot remove a table
    // otherwise).
    if key == "dpo.adapter" && value.as_str() == Some("full") {
        if let Some(dpo) = root.get_mut("dpo").and_then(|d| d.as_table_mut()) {
            dpo.remove("lora");
        }
    }
    let text = toml::to_string(&root).expect("TOML");
    Config::from_str_at(&text, Path::new(&format!("--set {key}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(s: &str) -> Result<Config, ConfigError> {
        Config::from_str_at(s, Path::new("test.toml"))
    }

    /// A new run records `prompt_attention = "fused"`; a recorded run keeps what it recorded,
    /// `batched` where it recorded nothing (its steps keep their keys); a config that says
    /// which is left as it says.
    #[test]
    fn a_new_run_settles_on_fused_prompt_attention_and_a_recorded_one_keeps_its_own() {
        use tsr_steps::lm::PromptAttention::{Batched, Fused};
        let plain = "name = \"r\"\nworkflow = \"toy\"\n";
        let settled = |config: &str, recorded: Option<&str>| {
            let mut c = parse(config).unwrap();
            c.settle_defaults(recorded);
            c
        };
        let new = settled(plain, None);
        assert_eq!(new.prompt_attention, Some(Fused));
        assert!(new.to_toml().contains("prompt_attention = \"fused\""));
        assert_eq!(new.fused_prompts(), Some(Fused));
        // What the new run stored is what continuing it reads.
        assert_eq!(
            settled(plain, Some(&new.to_toml())).prompt_attention,
            Some(Fused)
        );
        let old = parse(plain).unwrap().to_toml();
        let kept = settled(plain, Some(&old));
        assert_eq!(kept.prompt_attention, None);
        assert_eq!(kept.fused_prompts(), None);
        assert_eq!(kept.definition(), parse(plain).unwrap().definition());
        let batched = format!("prompt_attention = \"batched\"\n{plain}");
        assert_eq!(settled(&batched, None).prompt_attention, Some(Batched));
        assert_eq!(settled(&batched, None).fused_prompts(), None);
        let fused = format!("prompt_attention = \"fused\"\n{plain}");
        assert_eq!(settled(&fused, Some(&old)).prompt_attention, Some(Fused));
    }

    #[test]
    fn a_step_kinds_slurm_resources_override_the_executors() {
        let c = parse(
            "name = \"r\"\nworkflow = \"toy\"\n[executor]\nkind = \"slurm\"\npartition = \"cpu\"\n\
             account = \"lab\"\ncpus_per_task = 4\ntime = \"01:00:00\"\nextra_args = [\"--constraint=x\"]\n\
             [executor.steps.judge]\npartition = \"big\"\nmem = \"64G\"\ncpus_per_task = 8\n",
        )
        .unwrap();
        let x = c.executor.unwrap();
        let args = |kind, planned| x.sbatch_args_for(kind, planned).join(" ");
        assert_eq!(
            args(Some("judge"), Some(3 << 30)),
            "--cpus-per-task=8 --partition=big --account=lab --mem=64G --time=01:00:00 --constraint=x"
        );
        // Without a `mem`, the plan's estimate rounded up to 256 MiB.
        assert_eq!(
            args(Some("generate"), Some((3 << 30) + 1)),
            "--cpus-per-task=4 --partition=cpu --account=lab --mem=3328M --time=01:00:00 --constraint=x"
        );
        assert!(args(Some("generate"), Some(3 << 30)).contains("--mem=3072M"));
        assert_eq!(args(None, None), x.sbatch_args().join(" "));
        assert!(!args(None, None).contains("--mem"));
        for (body, key) in [
            (
                "kind = \"slurm\"\n[executor.steps.select]\nmem = \"1G\"",
                "executor.steps.select",
            ),
            (
                "kind = \"slurm\"\n[executor.steps.judge]\ncpus_per_task = 0",
                "executor.steps.judge.cpus_per_task",
            ),
            (
                "kind = \"processes\"\n[executor.steps.judge]\nmem = \"1G\"",
                "executor.steps",
            ),
            (
                "kind = \"slurm\"\n[executor.steps.judge]\nmemory = \"1G\"",
                "memory",
            ),
        ] {
            let e = parse(&format!(
                "name = \"r\"\nworkflow = \"toy\"\n[executor]\n{body}\n"
            ))
            .unwrap_err()
            .to_string();
            assert!(e.contains(key), "{body}: {e}");
        }
    }

    #[test]
    fn a_fork_can_switch_lora_off_and_on_again() {
        let lora = parse(
            "name = \"r\"\nworkflow = \"toy\"\n[dpo]\nadapter = \"lora\"\n[dpo.lora]\nr = 4\n",
        )
        .unwrap();
        let full = apply_set(&lora, "dpo.adapter=\"full\"").unwrap();
        assert_eq!(full.dpo.adapter, Adapter::Full);
        assert!(full.dpo.lora.is_none());
        assert!(full.definition().keys().all(|k| !k.starts_with("dpo.lora")));
        let back = apply_set(&full, "dpo.adapter=\"lora\"").unwrap();
        assert_eq!(back.dpo.adapter, Adapter::Lora);
    }

    #[test]
    fn unknown_keys_and_bad_values_name_the_key() {
        let e = parse("name = \"a\"\nworkflow = \"toy\"\nbogus = 1\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("bogus"), "{e}");
        let e = parse("name = \"a\"\nworkflow = \"toy\"\n[toy]\niterations = \"two\"\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("iterations"), "{e}");
        let e = parse("name = \"a\"\nworkflow = \"toy\"\n[toy]\niterations = 0\nitems = 1\ntrain_steps = 1\ncheckpoint_every = 1\nwork_ms = 0\nseed = 1\n").unwrap_err().to_string();
        assert!(e.contains("toy.iterations"), "{e}");
        let e = parse("name = \"a b\"\nworkflow = \"toy\"\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("`name`"), "{e}");
        let e = parse("name = \"a\"\nworkflow = \"nope\"\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("unknown workflow"), "{e}");
    }

    #[test]
    fn set_changes_one_field_and_revalidates() {
        let c = parse("name = \"a\"\nworkflow = \"toy\"\n").unwrap();
        let d = apply_set(&c, "toy.train_steps=9").unwrap();
        assert_eq!(d.toy.train_steps, 9);
        assert_eq!(d.toy.items, c.toy.items);
        let d = apply_set(&d, "name=b").unwrap();
        assert_eq!(d.name, "b");
        assert!(apply_set(&c, "toy.items=0").is_err());
        assert!(apply_set(&c, "toy.nope=1").is_err());
        assert!(apply_set(&c, "noequals").is_err());
        let def = d.definition();
        assert_eq!(def["toy.train_steps"], "9");
        assert!(!def.contains_key("device"));
    }
}

#[cfg(test)]
mod fuzz {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(1500))]
        /// Any text either parses into a config that passed validation or is an error; never a
        /// panic.
        #[test]
        fn config_loader_never_panics(text in "(name|workflow|seed|device|iterations|anchor|\\[toy\\]|\\[dpo\\]|\\[judge\\]|beta|k|lr|items|=|\"|[a-z0-9.\\-]|\n| ){0,120}") {
            if let Ok(c) = Config::from_str_at(&text, Path::new("fuzz.toml")) {
                prop_assert!(c.validate().is_ok());
            }
        }

        #[test]
        fn set_never_panics(key in "[a-z_.]{0,20}", value in "[a-z0-9.\"\\-]{0,10}") {
            let c = Config::from_str_at("name = \"a\"\nworkflow = \"toy\"\n", Path::new("t.toml")).unwrap();
            if let Ok(d) = apply_set(&c, &format!("{key}={value}")) {
                prop_assert!(d.validate().is_ok());
            }
        }
    }
}

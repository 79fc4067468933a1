//! Workflow definitions: the validated run config (TOML) and the DAG each workflow builds from
//! it. `toy` is a model-free workflow for exercising the engine; the language-model workflows
//! (temporal, self-rewarding, past-only, future-only, and the Meta-Rewarding ones,
//! meta-rewarding and temporal-meta) build on `tsr-steps`.

pub mod choices;
mod config;
pub mod lineage;
mod lm;
pub mod memory;

pub use choices::{Adapter, Anchor, Dtype, Executor, Reference, Share, Workflow};
pub use config::{apply_set, Config, ConfigError, ExecutorSection};

use std::collections::BTreeMap;
use tsr_engine::{Dag, EngineError, RunSpec};

#[derive(Debug, thiserror::Error)]
pub enum WorkflowError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Engine(#[from] EngineError),
}

/// Build the DAG of a validated config.
pub fn build(config: &Config) -> Result<Dag, WorkflowError> {
    match config.workflow {
        Workflow::Toy => Ok(tsr_engine::testkit::toy_dag(&config.toy)?),
        Workflow::Eval => lm::build_eval(config),
        Workflow::Temporal
        | Workflow::SelfRewarding
        | Workflow::PastOnly
        | Workflow::FutureOnly
        | Workflow::MetaRewarding
        | Workflow::TemporalMeta => lm::build(config),
    }
}

/// The engine's view of a run defined by this config.
pub fn run_spec(config: &Config, forked_from: Option<String>) -> RunSpec {
    RunSpec {
        name: config.name.clone(),
        workflow: config.workflow.to_string(),
        config_toml: config.to_toml(),
        definition: config.definition(),
        forked_from,
    }
}

/// The settings a run's definition leaves out because they name files or folders (tracked by
/// content instead): `key -> value` as `--set` takes them, for those this config gives.
pub fn path_settings(config: &Config) -> BTreeMap<String, String> {
    let mut all = BTreeMap::new();
    config::flatten("", &config.to_value(), &mut all);
    all.into_iter()
        .filter(|(k, _)| {
            PATH_KEYS.contains(&k.as_str())
                && !["store", "device", "remote", "remote_sync"].contains(&k.as_str())
        })
        .collect()
}

const PATH_KEYS: &[&str] = &[
    "store",
    "device",
    "remote",
    "remote_sync",
    "prompts.file",
    "model.source",
    "model.adapter",
    "judge.template",
    "judge.model",
    "meta.template",
    "eval.prompts",
    "eval.reference",
    "eval.baseline_model",
    "eval.judge.template",
    "eval.judge.model",
];

/// The run's definition compared on re-run: the flattened config without the keys that change
/// no result (where the store is, the device) and without paths (tracked by content instead).
pub fn definition_of(value: &toml::Value) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    config::flatten("", value, &mut out);
    // Paths are left out too: what a path names is tracked by content (the fingerprints of
    // external inputs), so a moved checkout still continues its runs, and a different file
    // under the same path is still caught.
    for k in PATH_KEYS {
        out.remove(*k);
    }
    // Where batches are computed changes no result: a run continues under another executor.
    out.retain(|k, _| !k.starts_with("executor."));
    // Nor where an API judge is asked and how patiently: another address, key variable,
    // concurrency, timeout, retries or budget continues the evaluation.
    for k in API_SERVING_KEYS {
        out.remove(*k);
    }
    out
}

/// The `[eval.judge]` keys of an API judge that change no answer (not in its step key either).
const API_SERVING_KEYS: &[&str] = &[
    "eval.judge.base_url",
    "eval.judge.api_key_env",
    "eval.judge.max_concurrency",
    "eval.judge.timeout_s",
    "eval.judge.max_retries",
    "eval.judge.max_cost_tokens",
];

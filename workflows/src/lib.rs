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

/// Build the DAG of a recorded run's config ([`Config::from_recorded`]) to show the run: model
/// files that are not here are taken as what their path says. Not for running it.
pub fn build_recorded(config: &Config) -> Result<Dag, WorkflowError> {
    config::as_recorded(|| build(config))
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
    all.into_iter().filter(|(k, _)| names_an_input(k)).collect()
}

/// Whether a dotted key names one of a run's input files or folders: a path key other than
/// where the run is kept and computed (`store`, `device`, `remote`, `remote_sync`).
fn names_an_input(key: &str) -> bool {
    PATH_KEYS.contains(&key) && !["store", "device", "remote", "remote_sync"].contains(&key)
}

/// The files and folders a recorded config (its TOML) names by absolute path that are not there
/// now, `(key, path)`: what a run started elsewhere (a moved project, a store
/// copied to another machine) no longer finds. Read without validating, which would stop at the
/// first missing one.
pub fn missing_paths(config_toml: &str) -> Vec<(String, String)> {
    let Ok(value) = config_toml.parse::<toml::Value>() else {
        return Vec::new();
    };
    PATH_KEYS
        .iter()
        .filter(|k| names_an_input(k))
        .filter_map(|k| {
            let mut v = &value;
            for part in k.split('.') {
                v = v.get(part)?;
            }
            let s = v.as_str()?;
            let p = std::path::Path::new(s);
            (p.is_absolute() && !p.exists()).then(|| (k.to_string(), s.to_string()))
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
    "eval.lc_data",
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
    // A local judge's definition is what it was before API judges existed, so that runs
    // recorded then continue: `kind = "local"` and the API annotator are left out.
    if out.get("eval.judge.kind").is_none_or(|k| k == "\"local\"") {
        out.remove("eval.judge.kind");
        out.remove("eval.judge.annotator");
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

#[cfg(test)]
mod tests {
    use super::definition_of;

    /// A local judge's definition is what runs recorded before API judges had (so they
    /// continue); an API judge's holds its kind and annotator, never where and how patiently
    /// it asks.
    #[test]
    fn judge_settings_in_the_definition() {
        let def = |judge: &str| {
            let v: toml::Value = toml::from_str(&format!(
                "name = \"x\"\n[eval]\nmax_new_tokens = 8\n[eval.judge]\n{judge}"
            ))
            .unwrap();
            definition_of(&v)
        };
        let serving = "base_url = \"http://127.0.0.1:1/v1\"\napi_key_env = \"K\"\nmax_concurrency = 4\ntimeout_s = 60.0\nmax_retries = 5\nmax_cost_tokens = 9\n";
        let local = def(&format!(
            "mode = \"text\"\nkind = \"local\"\nannotator = \"weighted_alpaca_eval_gpt4_turbo\"\n{serving}"
        ));
        assert_eq!(local, def("mode = \"text\"\n"));
        let api = def(&format!(
            "kind = \"openai\"\nmodel = \"gpt-4-1106-preview\"\nannotator = \"weighted_alpaca_eval_gpt4_turbo\"\n{serving}"
        ));
        assert_eq!(
            api.get("eval.judge.kind").map(String::as_str),
            Some("\"openai\"")
        );
        assert!(api.contains_key("eval.judge.annotator"));
        assert!(!api.keys().any(|k| [
            "eval.judge.base_url",
            "eval.judge.api_key_env",
            "eval.judge.max_concurrency",
            "eval.judge.timeout_s",
            "eval.judge.max_retries",
            "eval.judge.max_cost_tokens"
        ]
        .contains(&k.as_str())));
    }
}

//! What a run recorded, read back as typed records for the inspection commands (`tsr lineage`,
//! `tsr export`, `tsr report`, `tsr status`): which step each node resolved to and its outputs
//! ([`nodes`]), every pair with the selection that made it and the DPO step that trained on it
//! ([`pairs`]), a model's chain back to M0 ([`models`]), what selection saw for one training
//! prompt ([`prompts`]) and the evaluations ([`evals`]). Nothing here writes to the store.

pub mod evals;
pub mod models;
pub mod nodes;
pub mod pairs;
pub mod prompts;

pub use nodes::{
    computed_by, final_model, iteration_of, nodes, of_kind, read_blob, records, NodeResult,
};

/// Why a query has no answer.
#[derive(Debug, thiserror::Error)]
pub enum QueryError {
    #[error(transparent)]
    State(#[from] tsr_state::StateError),
    #[error("node `{node}` of run `{run}` points at a missing step record; run `tsr verify`")]
    MissingStep { run: String, node: String },
    #[error("reading blob {digest}")]
    Blob {
        digest: String,
        #[source]
        source: tsr_state::StateError,
    },
    #[error("the recorded {what} in blob {digest} are not UTF-8; run `tsr verify`")]
    NotText { what: &'static str, digest: String },
    #[error("a recorded {what} (blob {digest}, line {line}) cannot be read; run `tsr verify`")]
    Record {
        what: &'static str,
        digest: String,
        line: usize,
        #[source]
        source: serde_json::Error,
    },
    #[error("the {what} of node `{node}` cannot be read; run `tsr verify`")]
    Config {
        what: &'static str,
        node: String,
        #[source]
        source: serde_json::Error,
    },
    #[error("run `{run}` has no pair `{id}`; `tsr export {run} pairs` lists them")]
    NoPair { run: String, id: String },
    #[error("no model of this run has a digest starting with `{prefix}`; models: {models}")]
    NoModel { prefix: String, models: String },
    #[error("`{prefix}` matches {count} models; give more digits")]
    AmbiguousModel { prefix: String, count: usize },
    #[error("run `{run}` has no finished selection step yet")]
    NoSelection { run: String },
    #[error("run `{run}` has no training prompt `{id}`; the ids are those of the prompts file (or the 12-digit text digest for lines without an id)")]
    NoPrompt { run: String, id: String },
    #[error("run `{run}` has no finished evaluation; give it an [eval] section and run it (or use `tsr eval`)")]
    NoEval { run: String },
    #[error("run `{run}` has no evaluation of prompt `{id}`; `tsr export {run} eval --out DIR` lists them")]
    NoEvalOf { run: String, id: String },
}

//! The step kinds of tsr and the pure rules they apply.
//!
//! - [`kinds`]: one file per step kind, named by the kind's string; only `Step` impls.
//! - [`rules`]: what the kinds decide, without a model or a store: selection, verdict parsing,
//!   both-order agreement, evaluation metrics, judge-pair rules.
//! - [`records`]: what steps write and read (responses, judgements, pairs, annotations).
//! - [`lm`]: a model as step inputs; [`prompts`]: the prompts reader; [`trl`]: pairs in TRL's
//!   formats; [`memory`]: peak-memory estimates per step kind.

pub mod items;
pub mod kinds;
pub mod lm;
pub mod memory;
pub mod openai;
pub mod prompts;
pub mod records;
pub mod rules;
pub mod shards;
pub mod trl;

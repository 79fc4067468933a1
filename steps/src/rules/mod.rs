//! The pure rules the step kinds apply: no model, no store.

pub mod agreement;
pub mod alpaca_annotator;
pub mod eval;
pub mod eval_metrics;
pub mod judge_pairs;
pub mod lc_glm;
pub mod meta_verdict;
pub mod py_random;
pub mod selection;
pub mod verdict;

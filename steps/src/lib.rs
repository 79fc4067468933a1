//! Concrete tsr steps and what they are built from.

pub mod dpo_step;
pub mod eval;
pub mod eval_metrics;
pub mod generate;
pub mod import;
pub mod judge;
pub mod judge_pairs;
pub mod judge_text;
pub mod lm;
pub mod memory;
pub mod meta_judge;
pub mod metrics;
pub mod pairs;
pub mod prompts;
pub mod reference;
pub mod select;
pub mod trl;

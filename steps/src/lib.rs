//! Concrete tsr steps and what they are built from.

pub mod judge_text;
pub mod prompts;
pub mod select;
pub mod dpo;
pub mod model;
pub mod dpo_step;
pub mod dpo_trainer;
pub mod generate;
pub mod import;
pub mod judge;
pub mod lm;
pub mod pairs;
pub mod reference;
pub mod metrics;
pub mod judge_pairs;
pub mod meta_judge;
pub mod bench;

//! One file per step kind; the file name is the kind's string (`-` written `_`).

pub mod alpaca_lc;
pub mod answer;
pub mod api_judge;
pub mod dpo;
pub mod eval_judge;
pub mod generate;
pub mod import_model;
pub mod judge;
pub mod meta_judge;
pub mod metrics;
pub mod prompts;
pub mod ref_logprobs;
pub mod reference_outputs;
pub mod select;

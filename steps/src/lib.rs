//! Concrete tsr steps and what they are built from.

pub mod judge_text;
pub mod prompts;
pub mod select;

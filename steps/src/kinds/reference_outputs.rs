//! `reference-outputs`: a baseline from a file in AlpacaEval's format (a JSON list of
//! `{"instruction", "output", "generator"}`), matched to the prompts by instruction text.

use crate::lm::{self};
use crate::prompts::Prompt;
use crate::rules::eval::parse_reference;
use serde::Serialize;
use tsr_engine::{Step, StepContext, StepError, StepInputs, StepOutputs};

/// `reference-outputs`: the baseline from a reference file (external input `file`).
#[derive(Clone, Debug, Serialize)]
pub struct ReferenceOutputs {}

impl Step for ReferenceOutputs {
    fn kind(&self) -> &'static str {
        "reference-outputs"
    }
    fn version(&self) -> u32 {
        1
    }
    fn config(&self) -> serde_json::Value {
        serde_json::to_value(self).unwrap()
    }
    fn outputs(&self) -> Vec<&'static str> {
        vec!["outputs"]
    }
    fn resources(&self) -> Vec<tsr_engine::Resource> {
        vec![]
    }
    fn run(&self, inputs: &StepInputs, _ctx: &StepContext) -> Result<StepOutputs, StepError> {
        let prompts: Vec<Prompt> = lm::from_jsonl(&inputs.bytes("prompts")?, "prompts")?;
        let path = inputs.path("file")?;
        let rows = parse_reference(
            &inputs.bytes("file")?,
            &path.display().to_string(),
            &prompts,
        )
        .map_err(|e| StepError::Invalid(e.to_string()))?;
        Ok(StepOutputs::new().bytes("outputs", "eval-outputs-jsonl", lm::to_jsonl(&rows)))
    }
}

//! `prompts`: the training prompts file (JSON lines) read, checked and stored as a blob.

use serde::Serialize;
use tsr_engine::{Step, StepContext, StepError, StepInputs, StepOutputs};

/// `prompts`: validate the user's JSONL and normalise it (every bad line named).
#[derive(Serialize)]
pub struct LoadPrompts {
    /// Use at most this many prompts (0 = all), in file order.
    pub limit: usize,
}

impl Step for LoadPrompts {
    fn kind(&self) -> &'static str {
        "prompts"
    }
    fn version(&self) -> u32 {
        1
    }
    fn config(&self) -> serde_json::Value {
        serde_json::to_value(self).unwrap()
    }
    fn outputs(&self) -> Vec<&'static str> {
        vec!["prompts"]
    }
    fn resources(&self) -> Vec<tsr_engine::Resource> {
        vec![]
    }
    fn run(&self, inputs: &StepInputs, _ctx: &StepContext) -> Result<StepOutputs, StepError> {
        let path = inputs.path("file")?;
        let bytes = inputs.bytes("file")?;
        let mut prompts = crate::prompts::parse_prompts(&bytes, &path.display().to_string())
            .map_err(|e| StepError::Invalid(e.to_string()))?;
        if self.limit > 0 {
            prompts.truncate(self.limit);
        }
        Ok(StepOutputs::new().bytes("prompts", "prompts-jsonl", crate::lm::to_jsonl(&prompts)))
    }
}

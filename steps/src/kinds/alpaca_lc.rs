//! `alpaca-lc`: AlpacaEval 2.0's length-controlled win rate of one evaluation
//! ([`crate::rules::lc_glm`]), from the judge's annotations and AlpacaEval's length-control
//! data. Its own step, after the judge's: adding the data to an evaluation that is done (or
//! changing it) never asks the judge again.
//!
//! The data is a folder as the model hub's `tatsu-lab/alpaca_eval` dataset has it:
//! `df_gamed.csv` (the gamed models' annotations and each instruction's difficulty) and
//! `alpaca_eval_gpt4_baseline.json` (the 805 instructions, in the order the difficulties are
//! given). The evaluation must be those instructions in that order.

use crate::lm;
use crate::prompts::{parse_prompts, Prompt};
use crate::records::Annotation;
use crate::rules::lc_glm::{length_controlled_v1, parse_gamed, LcData, LcRow, GLM_NAME};
use serde::Serialize;
use std::path::Path;
use tsr_engine::{Step, StepContext, StepError, StepInputs, StepOutputs};

/// The files of the length-control folder.
pub const GAMED_FILE: &str = "df_gamed.csv";
pub const INSTRUCTIONS_FILE: &str = "alpaca_eval_gpt4_baseline.json";

/// The step (inputs `annotations`, `gamed`, `instructions`; output `lc`).
#[derive(Clone, Debug, Serialize)]
pub struct AlpacaLc {
    pub glm: String,
}

impl Default for AlpacaLc {
    fn default() -> Self {
        AlpacaLc {
            glm: GLM_NAME.into(),
        }
    }
}

/// Reads the folder's two files: the data and the instructions in AlpacaEval's order.
pub fn read_lc_data(dir: &Path) -> Result<(LcData, Vec<Prompt>), String> {
    let read = |name: &str| {
        let p = dir.join(name);
        std::fs::read(&p).map_err(|e| {
            format!(
                "cannot read {} ({e}); the folder needs {GAMED_FILE} and {INSTRUCTIONS_FILE} from the model hub's dataset tatsu-lab/alpaca_eval",
                p.display()
            )
        })
    };
    let gamed_path = dir.join(GAMED_FILE);
    let data = parse_gamed(&read(GAMED_FILE)?, &gamed_path.display().to_string())
        .map_err(|e| e.to_string())?;
    let instructions_path = dir.join(INSTRUCTIONS_FILE);
    let instructions = parse_prompts(
        &read(INSTRUCTIONS_FILE)?,
        &instructions_path.display().to_string(),
    )
    .map_err(|e| e.to_string())?;
    check_instructions(
        &data,
        &instructions,
        &instructions_path.display().to_string(),
    )?;
    Ok((data, instructions))
}

fn check_instructions(data: &LcData, instructions: &[Prompt], file: &str) -> Result<(), String> {
    if instructions.len() != data.difficulty.len() {
        return Err(format!(
            "{file} lists {} instructions and {GAMED_FILE} gives difficulties for {}: they are not AlpacaEval's files of one version",
            instructions.len(),
            data.difficulty.len()
        ));
    }
    Ok(())
}

/// Checks that evaluation prompts are AlpacaEval's instructions in AlpacaEval's order (the
/// difficulty of an instruction is found by its position). Texts are compared without
/// surrounding whitespace.
pub fn check_prompts(instructions: &[Prompt], prompts: &[String]) -> Result<(), String> {
    if prompts.len() != instructions.len() {
        return Err(format!(
            "AlpacaEval 2.0's length control is defined for its {} instructions, and the evaluation has {} prompts; use {INSTRUCTIONS_FILE} itself as eval.prompts (with no limit), or leave lc_data out for the minimal length control",
            instructions.len(),
            prompts.len()
        ));
    }
    for (i, (want, got)) in instructions.iter().zip(prompts).enumerate() {
        if want.prompt.trim() != got.trim() {
            let short = |s: &str| {
                let s = s.trim();
                match s.char_indices().nth(60) {
                    Some((at, _)) => format!("{}...", &s[..at]),
                    None => s.to_string(),
                }
            };
            return Err(format!(
                "evaluation prompt {i} is `{}` where AlpacaEval's instruction {i} is `{}`: the length control looks each instruction's difficulty up by position, so the prompts must be AlpacaEval's in its order; use {INSTRUCTIONS_FILE} itself as eval.prompts",
                short(got),
                short(&want.prompt)
            ));
        }
    }
    Ok(())
}

/// What the length control reads of each annotation: its preference and both outputs' lengths
/// in characters (as Python's `len` counts them).
pub fn lc_rows(rows: &[Annotation]) -> Vec<LcRow> {
    rows.iter()
        .map(|a| LcRow {
            preference: a.preference,
            model_chars: a.output_2.chars().count(),
            baseline_chars: a.output_1.chars().count(),
        })
        .collect()
}

impl Step for AlpacaLc {
    fn kind(&self) -> &'static str {
        "alpaca-lc"
    }
    fn version(&self) -> u32 {
        1
    }
    fn config(&self) -> serde_json::Value {
        serde_json::to_value(self).unwrap()
    }
    fn outputs(&self) -> Vec<&'static str> {
        vec!["lc"]
    }
    fn resources(&self) -> Vec<tsr_engine::Resource> {
        vec![]
    }
    fn run(&self, inputs: &StepInputs, _ctx: &StepContext) -> Result<StepOutputs, StepError> {
        let rows: Vec<Annotation> = lm::from_jsonl(&inputs.bytes("annotations")?, "annotations")?;
        let gamed_path = inputs.path("gamed")?.display().to_string();
        let data = parse_gamed(&inputs.bytes("gamed")?, &gamed_path)
            .map_err(|e| StepError::Invalid(e.to_string()))?;
        let instructions_path = inputs.path("instructions")?.display().to_string();
        let instructions = parse_prompts(&inputs.bytes("instructions")?, &instructions_path)
            .map_err(|e| StepError::Invalid(e.to_string()))?;
        check_instructions(&data, &instructions, &instructions_path).map_err(StepError::Invalid)?;
        let texts: Vec<String> = rows.iter().map(|a| a.instruction.clone()).collect();
        check_prompts(&instructions, &texts).map_err(StepError::Invalid)?;
        let same = rows.first().is_some_and(|a| a.generator_1 == a.generator_2);
        let result = length_controlled_v1(&data, &lc_rows(&rows), same)
            .map_err(|e| StepError::Invalid(e.to_string()))?;
        Ok(StepOutputs::new().json("lc", &result))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(s: &str) -> Prompt {
        Prompt {
            id: s.into(),
            prompt: s.into(),
            answer: None,
        }
    }

    #[test]
    fn prompts_must_be_alpaca_evals_in_order() {
        let ins = [p("a"), p("b"), p("c")];
        let v = |x: &[&str]| x.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert!(check_prompts(&ins, &v(&["a", " b\n", "c"])).is_ok());
        let e = check_prompts(&ins, &v(&["a", "b"])).unwrap_err();
        assert!(
            e.contains("its 3 instructions, and the evaluation has 2"),
            "{e}"
        );
        let e = check_prompts(&ins, &v(&["a", "c", "b"])).unwrap_err();
        assert!(
            e.contains("prompt 1 is `c` where AlpacaEval's instruction 1 is `b`"),
            "{e}"
        );
    }
}

//! Text pairs for `tsr dpo` (JSONL), their tokenization, and reference log-probs.

use super::{TrainPair, TrainerError};
use crate::model::LanguageModel;

/// One line of a pairs file for `tsr dpo`: `{"prompt": .., "chosen": .., "rejected": ..}`.
#[derive(Debug, Clone, PartialEq, Eq, serde::Deserialize)]
pub struct TextPair {
    pub prompt: String,
    pub chosen: String,
    pub rejected: String,
}

/// Parses a JSONL pairs file (blank lines skipped); a bad line is an error naming its number.
pub fn parse_pairs_jsonl(text: &str) -> Result<Vec<TextPair>, TrainerError> {
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let p: TextPair = serde_json::from_str(line).map_err(|e| {
            TrainerError::Invalid(format!(
                "line {}: expected {{\"prompt\", \"chosen\", \"rejected\"}} strings: {e}",
                i + 1
            ))
        })?;
        out.push(p);
    }
    if out.is_empty() {
        return Err(TrainerError::Invalid("no pairs in the file".into()));
    }
    Ok(out)
}

/// Tokenizes text pairs for `model` (reference fields zero: fill them with
/// [`reference_logps`] or [`DpoTrainer::self_reference`]).
pub fn encode_text_pairs(
    model: &LanguageModel,
    pairs: &[TextPair],
) -> Result<Vec<TrainPair>, TrainerError> {
    let tok = model.tokenizer();
    pairs
        .iter()
        .map(|p| {
            Ok(TrainPair {
                prompt: tok.encode_prompt(&p.prompt)?,
                chosen: tok.encode_response(&p.chosen)?,
                rejected: tok.encode_response(&p.rejected)?,
                ref_chosen: 0.0,
                ref_rejected: 0.0,
            })
        })
        .collect()
}

/// Fills the reference fields of `pairs` with a frozen reference model's log-probs
/// (inference path, `batch` pairs at a time).
pub fn reference_logps(
    reference: &LanguageModel,
    pairs: &mut [TrainPair],
    batch: usize,
) -> Result<(), TrainerError> {
    let mut seqs = Vec::with_capacity(pairs.len() * 2);
    for p in pairs.iter() {
        seqs.push((p.prompt.clone(), p.chosen.clone()));
        seqs.push((p.prompt.clone(), p.rejected.clone()));
    }
    let lp = reference.logprobs(&seqs, batch.max(1) * 2)?;
    for (i, p) in pairs.iter_mut().enumerate() {
        p.ref_chosen = lp[2 * i];
        p.ref_rejected = lp[2 * i + 1];
    }
    Ok(())
}

//! Text pairs for `tsr dpo` (JSONL), their tokenization, and reference log-probs.

use super::{TrainPair, TrainerError};
use tsr_model::LanguageModel;

/// One pair for `tsr dpo`: the user prompt and the two response texts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TextPair {
    pub prompt: String,
    pub chosen: String,
    pub rejected: String,
}

/// A field of a pairs line: a string, or TRL's conversational form (a list of messages).
#[derive(serde::Deserialize)]
#[serde(untagged)]
enum Field {
    Text(String),
    Messages(Vec<Message>),
}

#[derive(serde::Deserialize)]
struct Message {
    role: String,
    content: String,
}

#[derive(serde::Deserialize)]
struct Line {
    prompt: Field,
    chosen: Field,
    rejected: Field,
    /// Present in lines `tsr export RUN pairs` wrote.
    #[serde(default)]
    prompt_text: Option<serde_json::Value>,
}

impl Field {
    /// The text of a field that must be one message of `role` (or a plain string).
    fn text(self, name: &str, role: &str) -> Result<String, String> {
        match self {
            Field::Text(s) => Ok(s),
            Field::Messages(m) => match m.as_slice() {
                [one] if one.role == role => Ok(one.content.clone()),
                _ => Err(format!(
                    "`{name}` must be a string or one {role} message; found {} message(s) with roles {:?} (tsr trains single-turn pairs)",
                    m.len(),
                    m.iter().map(|x| x.role.as_str()).collect::<Vec<_>>()
                )),
            },
        }
    }
}

/// Parses a JSONL pairs file (blank lines skipped): `{"prompt", "chosen", "rejected"}` as
/// strings (the user prompt and the two responses) or in TRL's conversational form, which
/// `tsr export RUN pairs` writes. A bad line is an error naming its number.
pub fn parse_pairs_jsonl(text: &str) -> Result<Vec<TextPair>, TrainerError> {
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let bad = |e: String| TrainerError::Invalid(format!("line {}: {e}", i + 1));
        let l: Line = serde_json::from_str(line).map_err(|e| {
            bad(format!(
                "expected {{\"prompt\", \"chosen\", \"rejected\"}} as strings or as TRL conversational messages: {e}"
            ))
        })?;
        if matches!(l.prompt, Field::Text(_)) && l.prompt_text.is_some() {
            // tsr's standard-format export: the template is already applied and the responses
            // end in the end-of-turn token; tsr dpo would apply both again.
            return Err(bad(
                "this is `tsr export ... pairs --format standard` output (chat template already applied); tsr dpo applies the template itself: export with the default conversational format".into(),
            ));
        }
        out.push(TextPair {
            prompt: l.prompt.text("prompt", "user").map_err(bad)?,
            chosen: l.chosen.text("chosen", "assistant").map_err(bad)?,
            rejected: l.rejected.text("rejected", "assistant").map_err(bad)?,
        });
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

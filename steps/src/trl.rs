//! Preference pairs in TRL's dataset formats, so that TRL's `DPOTrainer` trains on the token
//! ids tsr trained on.
//!
//! - `conversational` (the default): `prompt` is a list of messages (one user turn),
//!   `chosen` / `rejected` one assistant message each. TRL applies the model's chat template
//!   with `add_generation_prompt=True` and gets exactly tsr's prompt ids. Its completion ids are
//!   the template's rendering of the assistant turn: for ChatML templates (SmolLM2, Qwen2) that
//!   is tsr's response ids (text, then the end-of-turn token) followed by the newline the
//!   template writes after the end-of-turn token.
//! - `standard`: plain strings. `prompt` is the chat template already applied (with the
//!   generation prompt); `chosen` / `rejected` are the response texts followed by the
//!   end-of-turn token, so that TRL adds no token of its own. TRL tokenizes strings with the
//!   tokenizer's special tokens on: a tokenizer whose post-processor adds a BOS token (Llama 3)
//!   gets a second one in front of the template's.
//!
//! Both formats need the tokenizer of the run's model; export it with `tsr export RUN model`.

use serde_json::{json, Map, Value};

use tsr_model::{ChatTokenizer, ModelError};

/// Which of TRL's two preference formats to write.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TrlFormat {
    Conversational,
    Standard,
}

impl std::str::FromStr for TrlFormat {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "conversational" => Ok(TrlFormat::Conversational),
            "standard" => Ok(TrlFormat::Standard),
            other => Err(format!(
                "unknown pairs format {other:?}: use `conversational` (TRL's messages; the default) or `standard` (chat template applied to the prompt)"
            )),
        }
    }
}

/// TRL's `prompt`, `chosen` and `rejected` fields for one pair. The standard format needs the
/// model's tokenizer (its chat template and end-of-turn token); the conversational one none.
pub fn trl_fields(
    format: TrlFormat,
    prompt: &str,
    chosen: &str,
    rejected: &str,
    tok: Option<&ChatTokenizer>,
) -> Result<Map<String, Value>, ModelError> {
    let mut m = Map::new();
    match format {
        TrlFormat::Conversational => {
            m.insert(
                "prompt".into(),
                json!([{"role": "user", "content": prompt}]),
            );
            m.insert(
                "chosen".into(),
                json!([{"role": "assistant", "content": chosen}]),
            );
            m.insert(
                "rejected".into(),
                json!([{"role": "assistant", "content": rejected}]),
            );
        }
        TrlFormat::Standard => {
            let tok = tok.ok_or_else(|| {
                ModelError::InvalidRequest(
                    "the standard TRL format needs the model's tokenizer".into(),
                )
            })?;
            let eot = tok.eot_token();
            m.insert(
                "prompt".into(),
                json!(tok.render(&[("user", prompt)], true)?),
            );
            m.insert("chosen".into(), json!(format!("{chosen}{eot}")));
            m.insert("rejected".into(), json!(format!("{rejected}{eot}")));
        }
    }
    Ok(m)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn standard_strings_tokenize_to_tsr_ids() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tsr_model::testing::write_tiny_hf_model(tmp.path(), 1);
        let tok = ChatTokenizer::from_hf_dir(&dir, Some(2), &[2]).unwrap();
        let f = trl_fields(
            TrlFormat::Standard,
            "Add 2 and 3.",
            "5",
            "It is 6.",
            Some(&tok),
        )
        .unwrap();
        let ids = |k: &str| tok.encode(f[k].as_str().unwrap()).unwrap();
        assert_eq!(ids("prompt"), tok.encode_prompt("Add 2 and 3.").unwrap());
        assert_eq!(ids("chosen"), tok.encode_response("5").unwrap());
        assert_eq!(ids("rejected"), tok.encode_response("It is 6.").unwrap());
        let c = trl_fields(TrlFormat::Conversational, "p", "c", "r", None).unwrap();
        assert_eq!(c["prompt"], json!([{"role": "user", "content": "p"}]));
        assert_eq!(
            c["rejected"],
            json!([{"role": "assistant", "content": "r"}])
        );
        assert!("jsonl"
            .parse::<TrlFormat>()
            .unwrap_err()
            .contains("conversational"));
    }
}

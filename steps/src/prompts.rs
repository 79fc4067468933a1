//! The user's prompts: JSONL, one `{"id"?: string, "prompt": string, "answer"?: string|number}`
//! object per line (`answer`: a known answer, scored by exact match in evaluations). Every bad
//! line is reported with its line number (all of them at once, not just the first); blank lines
//! are skipped. A prompt without an id gets a stable one from its text's digest.
//!
//! An AlpacaEval file is read too: a JSON list of `{"instruction": string, ...}` (its evaluation
//! set, such as `alpaca_eval_gpt4_baseline.json`), each instruction a prompt in list order.

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Prompt {
    pub id: String,
    pub prompt: String,
    /// A known answer (evaluation prompts): compared numerically with a response's final number.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub answer: Option<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum PromptError {
    #[error("prompts file {source_name} has no prompts; add lines like {{\"id\": \"q1\", \"prompt\": \"...\"}}")]
    Empty { source_name: String },
    #[error("prompts file {source_name} has {count} bad line(s):\n{lines}")]
    BadLines {
        source_name: String,
        count: usize,
        lines: String,
    },
    #[error(
        "prompts file {source_name} (AlpacaEval's JSON list) has {count} bad entr(ies):\n{entries}"
    )]
    BadEntries {
        source_name: String,
        count: usize,
        entries: String,
    },
}

/// Longest prompt accepted, in bytes (a guard against a binary or a whole book on one line).
pub const MAX_PROMPT_BYTES: usize = 64 * 1024;

pub fn parse_prompts(bytes: &[u8], source_name: &str) -> Result<Vec<Prompt>, PromptError> {
    if bytes.iter().find(|b| !b.is_ascii_whitespace()) == Some(&b'[') {
        return parse_alpaca_eval(bytes, source_name);
    }
    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Line {
        id: Option<serde_json::Value>,
        prompt: Option<serde_json::Value>,
        answer: Option<serde_json::Value>,
    }
    let mut out = Vec::new();
    let mut bad: Vec<String> = Vec::new();
    let mut seen: BTreeMap<String, usize> = BTreeMap::new();
    for (i, raw) in bytes.split(|&b| b == b'\n').enumerate() {
        let n = i + 1;
        let raw = raw.strip_suffix(b"\r").unwrap_or(raw);
        let Ok(line) = std::str::from_utf8(raw) else {
            bad.push(format!("  line {n}: not valid UTF-8 text"));
            continue;
        };
        if line.trim().is_empty() {
            continue;
        }
        let parsed: Line = match serde_json::from_str(line) {
            Ok(p) => p,
            Err(e) => {
                bad.push(format!(
                    "  line {n}: not a JSON object with \"prompt\" ({e})"
                ));
                continue;
            }
        };
        let prompt = match parsed.prompt {
            Some(serde_json::Value::String(s)) if !s.trim().is_empty() => s,
            Some(serde_json::Value::String(_)) => {
                bad.push(format!("  line {n}: \"prompt\" is empty"));
                continue;
            }
            Some(other) => {
                bad.push(format!(
                    "  line {n}: \"prompt\" must be a string, found {other}"
                ));
                continue;
            }
            None => {
                bad.push(format!("  line {n}: missing \"prompt\""));
                continue;
            }
        };
        if prompt.len() > MAX_PROMPT_BYTES {
            bad.push(format!(
                "  line {n}: prompt is {} bytes; the limit is {MAX_PROMPT_BYTES}",
                prompt.len()
            ));
            continue;
        }
        let id = match parsed.id {
            None | Some(serde_json::Value::Null) => {
                blake3::hash(prompt.as_bytes()).to_hex()[..12].to_string()
            }
            Some(serde_json::Value::String(s)) if !s.trim().is_empty() => s,
            Some(serde_json::Value::Number(x)) => x.to_string(),
            Some(other) => {
                bad.push(format!(
                    "  line {n}: \"id\" must be a non-empty string, found {other}"
                ));
                continue;
            }
        };
        let answer = match parsed.answer {
            None | Some(serde_json::Value::Null) => None,
            Some(serde_json::Value::String(s)) if !s.trim().is_empty() => Some(s),
            Some(serde_json::Value::Number(x)) => Some(x.to_string()),
            Some(other) => {
                bad.push(format!(
                    "  line {n}: \"answer\" must be a non-empty string or a number, found {other}"
                ));
                continue;
            }
        };
        if let Some(first) = seen.insert(id.clone(), n) {
            bad.push(format!(
                "  line {n}: duplicate id `{id}` (first on line {first}); ids must be unique"
            ));
            continue;
        }
        out.push(Prompt { id, prompt, answer });
    }
    if !bad.is_empty() {
        return Err(PromptError::BadLines {
            source_name: source_name.to_string(),
            count: bad.len(),
            lines: bad.join("\n"),
        });
    }
    if out.is_empty() {
        return Err(PromptError::Empty {
            source_name: source_name.to_string(),
        });
    }
    Ok(out)
}

/// An AlpacaEval evaluation set: a JSON list of objects with an `"instruction"` (other fields,
/// such as `output`, `generator` and `dataset`, are ignored). Ids come from the text, as for
/// JSONL prompts without one; an instruction listed twice is an error.
fn parse_alpaca_eval(bytes: &[u8], source_name: &str) -> Result<Vec<Prompt>, PromptError> {
    let bad = |entries: Vec<String>| PromptError::BadEntries {
        source_name: source_name.to_string(),
        count: entries.len(),
        entries: entries.join("\n"),
    };
    let list: Vec<serde_json::Value> = serde_json::from_slice(bytes).map_err(|e| {
        bad(vec![format!(
            "  a file starting with `[` is read as AlpacaEval's JSON list of {{\"instruction\": ...}}, and this one is not valid JSON ({e})"
        )])
    })?;
    let mut out = Vec::new();
    let mut errors = Vec::new();
    let mut seen: BTreeMap<String, usize> = BTreeMap::new();
    for (n, row) in list.iter().enumerate() {
        let prompt = match row.get("instruction") {
            Some(serde_json::Value::String(s)) if !s.trim().is_empty() => s.clone(),
            Some(serde_json::Value::String(_)) => {
                errors.push(format!("  entry {n}: \"instruction\" is empty"));
                continue;
            }
            Some(other) => {
                errors.push(format!(
                    "  entry {n}: \"instruction\" must be a string, found {other}"
                ));
                continue;
            }
            None => {
                errors.push(format!("  entry {n}: no \"instruction\""));
                continue;
            }
        };
        if prompt.len() > MAX_PROMPT_BYTES {
            errors.push(format!(
                "  entry {n}: the instruction is {} bytes; the limit is {MAX_PROMPT_BYTES}",
                prompt.len()
            ));
            continue;
        }
        let id = blake3::hash(prompt.as_bytes()).to_hex()[..12].to_string();
        if let Some(first) = seen.insert(id.clone(), n) {
            errors.push(format!(
                "  entry {n}: the same instruction as entry {first}"
            ));
            continue;
        }
        out.push(Prompt {
            id,
            prompt,
            answer: None,
        });
    }
    if !errors.is_empty() {
        return Err(bad(errors));
    }
    if out.is_empty() {
        return Err(PromptError::Empty {
            source_name: source_name.to_string(),
        });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn good_lines_with_and_without_ids() {
        let p = parse_prompts(
            b"{\"id\": \"a\", \"prompt\": \"Hi\"}\n\n{\"prompt\": \"Name a colour.\"}\r\n{\"id\": 7, \"prompt\": \"x\"}",
            "t.jsonl",
        )
        .unwrap();
        assert_eq!(p.len(), 3);
        assert_eq!(p[0].id, "a");
        assert_eq!(p[1].id.len(), 12);
        assert_eq!(p[2].id, "7");
    }

    #[test]
    fn every_bad_line_is_named() {
        let input = b"{\"prompt\": \"ok\", \"id\": \"a\"}\nnot json\n{\"id\": \"b\"}\n{\"prompt\": 3}\n{\"prompt\": \"dup\", \"id\": \"a\"}\n{\"prompt\": \"\"}\n\xff\xfe\n{\"prompt\": \"x\", \"extra\": 1}\n";
        let e = parse_prompts(input, "p.jsonl").unwrap_err().to_string();
        for want in [
            "p.jsonl has 7 bad line(s)",
            "line 2: not a JSON object",
            "line 3: missing \"prompt\"",
            "line 4: \"prompt\" must be a string",
            "line 5: duplicate id `a` (first on line 1)",
            "line 6: \"prompt\" is empty",
            "line 7: not valid UTF-8",
            "line 8: not a JSON object",
        ] {
            assert!(e.contains(want), "missing `{want}` in:\n{e}");
        }
    }

    #[test]
    fn alpaca_eval_lists_are_prompts_in_order() {
        let p = parse_prompts(
            br#" [{"instruction": "Name a colour.", "output": "Red", "generator": "gpt4_turbo", "dataset": "x"},
                {"instruction": "Add 2 and 2."}]"#,
            "alpaca_eval.json",
        )
        .unwrap();
        assert_eq!(p.len(), 2);
        assert_eq!(p[0].prompt, "Name a colour.");
        assert_eq!(p[1].prompt, "Add 2 and 2.");
        // The same id as the line `{"prompt": "Add 2 and 2."}`.
        assert_eq!(
            p[1].id,
            parse_prompts(br#"{"prompt": "Add 2 and 2."}"#, "p.jsonl").unwrap()[0].id
        );
        let e = parse_prompts(
            br#"[{"instruction": "a"}, {"output": "b"}, {"instruction": 3}, {"instruction": "a"}]"#,
            "ae.json",
        )
        .unwrap_err()
        .to_string();
        for want in [
            "ae.json (AlpacaEval's JSON list) has 3 bad entr(ies)",
            "entry 1: no \"instruction\"",
            "entry 2: \"instruction\" must be a string",
            "entry 3: the same instruction as entry 0",
        ] {
            assert!(e.contains(want), "missing `{want}` in:\n{e}");
        }
        let e = parse_prompts(b"[1, 2", "x.json").unwrap_err().to_string();
        assert!(e.contains("not valid JSON"), "{e}");
    }

    #[test]
    fn empty_file_is_an_error() {
        assert!(matches!(
            parse_prompts(b"\n\n", "e.jsonl"),
            Err(PromptError::Empty { .. })
        ));
    }
}

//! The pure parts of AlpacaEval 2.0's default annotator (`weighted_alpaca_eval_gpt4_turbo` in
//! alpaca_eval 0.6.6), as alpaca_eval computes them, for an API judge to reproduce its
//! annotations one for one:
//!
//! - [`fill_template`]: its prompt from a template, placeholders replaced as text in the order
//!   they first appear, each at its first occurrence in the text so far (`utils.make_prompts`
//!   with a batch of one; `str.format` is not used, so JSON braces in the template stay);
//! - [`to_chat_messages`]: the `<|im_start|>ROLE ... <|im_end|>` blocks of the filled prompt as
//!   chat messages (`utils.prompt_to_chatml`), `system name=x` blocks included;
//! - [`soft_preference`]: the preference from the top log-probabilities of the judge's one
//!   token (`completion_parsers.logprob_parser` with numerator `m`, denominator `m` and `M`, not
//!   binarized): `2 - P(m) / (P(m) + P(M))`, where a token absent from the top list has
//!   probability 0, and none of them present leaves the comparison undecided;
//! - [`unswitch`]: the preference of a switched comparison read back in the original order
//!   (`3 - x`), with [`crate::rules::py_random::alpaca_eval_switched`] deciding the switch.
//!
//! Checked against alpaca_eval's own functions by `scripts/alpaca_annotator_golden.py`
//! (fixture `tests/fixtures/eval/alpaca-annotator.json`).

use serde::{Deserialize, Serialize};

/// Python's `\s` (`str.isspace`), which also counts the separators U+001C..U+001F.
fn py_space(c: char) -> bool {
    c.is_whitespace() || ('\u{1c}'..='\u{1f}').contains(&c)
}

/// The placeholders of `template` as alpaca_eval finds them (`re.findall(r"{([^ \s]+?)}")`):
/// a `{`, then one or more characters without whitespace up to the first `}` after the first
/// of them; with the number of times each occurs, in the order of first appearance.
pub fn placeholders(template: &str) -> Vec<(String, usize)> {
    let mut out: Vec<(String, usize)> = Vec::new();
    let mut i = 0;
    while let Some(at) = template[i..].find('{') {
        let start = i + at + 1;
        let rest = &template[start..];
        let mut end = None;
        for (k, c) in rest.char_indices() {
            if py_space(c) {
                break;
            }
            if k > 0 && c == '}' {
                end = Some(k);
                break;
            }
        }
        match end {
            Some(k) => {
                let name = &rest[..k];
                match out.iter_mut().find(|(n, _)| n == name) {
                    Some((_, count)) => *count += 1,
                    None => out.push((name.to_string(), 1)),
                }
                i = start + k + 1;
            }
            None => i = start,
        }
    }
    out
}

/// Why a template cannot be filled.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum TemplateError {
    #[error("the template's placeholder `{{{0}}}` has no value; give it one, or remove it from the template")]
    Missing(String),
    #[error(
        "the template has `{{{0}}}` {1} times; AlpacaEval's templates hold each placeholder once"
    )]
    Repeated(String, usize),
}

/// `template` with each placeholder replaced by its value, as alpaca_eval fills it: in the
/// order the placeholders first appear, each replacing the first occurrence in the text so far
/// (so a value that itself contains a later placeholder's name is where that one goes, as in
/// alpaca_eval).
pub fn fill_template(template: &str, values: &[(&str, &str)]) -> Result<String, TemplateError> {
    let mut out = template.to_string();
    for (name, count) in placeholders(template) {
        if count != 1 {
            return Err(TemplateError::Repeated(name, count));
        }
        let value = values
            .iter()
            .find(|(k, _)| *k == name)
            .map(|(_, v)| *v)
            .ok_or_else(|| TemplateError::Missing(name.clone()))?;
        out = out.replacen(&format!("{{{name}}}"), value, 1);
    }
    Ok(out)
}

/// One chat message of a filled prompt.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ChatMessage {
    pub role: String,
    pub content: String,
    /// From a `system name=...` block.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
}

/// Why a filled prompt is not a sequence of chat blocks.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum ChatError {
    #[error("the prompt does not start with <|im_start|> and end with <|im_end|> (after trimming whitespace); write the template as <|im_start|>ROLE ... <|im_end|> blocks")]
    NotBlocks,
    #[error("a `system` block sets `{0}`; only name=... is understood")]
    Unknown(String),
}

const START: &str = "<|im_start|>";
const END: &str = "<|im_end|>";

/// The chat messages of a filled prompt made of `<|im_start|>ROLE\n...<|im_end|>` blocks:
/// each block's first line is its role (`system name=x` gives a system message with that
/// name), and its content is what follows up to the block's first `<|im_end|>`, trimmed.
pub fn to_chat_messages(prompt: &str) -> Result<Vec<ChatMessage>, ChatError> {
    let prompt = prompt.trim();
    if !prompt.starts_with(START) || !prompt.ends_with(END) {
        return Err(ChatError::NotBlocks);
    }
    let mut out = Vec::new();
    for block in prompt.split(START).skip(1) {
        let (first, rest) = block.split_once('\n').unwrap_or((block, ""));
        let role = first.trim();
        let content = rest.split(END).next().unwrap_or("").trim().to_string();
        if role.starts_with("system") && role != "system" {
            let mut name = None;
            for kv in role["system".len()..].split(' ').filter(|s| !s.is_empty()) {
                match kv.split_once('=') {
                    Some(("name", v)) => name = Some(v.to_string()),
                    _ => return Err(ChatError::Unknown(kv.to_string())),
                }
            }
            out.push(ChatMessage {
                role: "system".into(),
                content,
                name,
            });
        } else {
            out.push(ChatMessage {
                role: role.to_string(),
                content,
                name: None,
            });
        }
    }
    Ok(out)
}

/// AlpacaEval's soft preference from the judge's top log-probabilities (token, log-probability)
/// for its single token: `2 - P(m) / (P(m) + P(M))` (1 prefers the output shown as `m`, 2 the
/// one shown as `M`); `None` when neither token is in the list. A token listed twice counts
/// with its last log-probability.
pub fn soft_preference(top: &[(String, f64)]) -> Option<f64> {
    let mut m = None;
    let mut big_m = None;
    for (t, lp) in top {
        match t.as_str() {
            "m" => m = Some(*lp),
            "M" => big_m = Some(*lp),
            _ => {}
        }
    }
    if m.is_none() && big_m.is_none() {
        return None;
    }
    let (a, b) = (
        m.unwrap_or(f64::NEG_INFINITY),
        big_m.unwrap_or(f64::NEG_INFINITY),
    );
    // log(P(m) + P(M)), computed from the larger one as scipy's logsumexp does.
    let top = a.max(b);
    let lse = ((a - top).exp() + (b - top).exp()).ln() + top;
    Some(2.0 - (a - lse).exp())
}

/// A preference given with the outputs switched, read in the original order.
pub fn unswitch(preference: f64) -> f64 {
    3.0 - preference
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn placeholders_are_names_without_whitespace() {
        let t = "{\n  \"a\": \"{instruction}\",\n}{output_1}{ x}{}}{output_1}{output_2}";
        let found = placeholders(t);
        let names: Vec<(&str, usize)> = found.iter().map(|(n, c)| (n.as_str(), *c)).collect();
        assert_eq!(
            names,
            [
                ("instruction", 1),
                ("output_1", 2),
                ("}", 1),
                ("output_2", 1)
            ]
        );
        assert_eq!(
            fill_template("{a}-{b}", &[("a", "{b}"), ("b", "B")]).unwrap(),
            "B-{b}",
            "each name replaces its first occurrence in the text so far"
        );
        assert_eq!(
            fill_template("{a}{a}", &[("a", "x")]).unwrap_err(),
            TemplateError::Repeated("a".into(), 2)
        );
        assert_eq!(
            fill_template("{a}", &[]).unwrap_err(),
            TemplateError::Missing("a".into())
        );
    }

    #[test]
    fn preferences() {
        let p = |v: &[(&str, f64)]| {
            soft_preference(
                &v.iter()
                    .map(|(t, l)| (t.to_string(), *l))
                    .collect::<Vec<_>>(),
            )
        };
        assert_eq!(p(&[("m", 0.0)]), Some(1.0));
        assert_eq!(p(&[("M", -0.1), ("Both", -3.0)]), Some(2.0));
        assert_eq!(p(&[("Both", -0.1), (" m", -1.0)]), None);
        let half = p(&[("m", (0.5f64).ln()), ("M", (0.5f64).ln())]).unwrap();
        assert!((half - 1.5).abs() < 1e-15, "{half}");
        assert_eq!(unswitch(1.25), 1.75);
    }
}

//! The judge's words: the additive 5-point rubric written for this project, rendering it for a
//! (prompt, response), and parsing the `Score: N` verdict out of a judgement. A judgement that
//! cannot be parsed is kept verbatim and counted as unscored, never a crash and never a zero.

use crate::records::Verdict;

/// The default rubric. Placeholders: `{prompt}`, `{response}`. A user template must contain both.
pub const DEFAULT_RUBRIC: &str = "Review the user's question and the response below, and score the response with the additive 5-point system described here. Points accumulate when each condition is met:

- Add 1 point if the response is relevant to the user's question, even if it is incomplete or contains some irrelevant content.
- Add a 2nd point if the response addresses a substantial part of the question, but does not completely resolve it or answer it directly.
- Add a 3rd point if the response answers the basic elements of the question in a useful way, whether or not it is complete or written like an AI assistant.
- Add a 4th point if the response is clearly written from an AI assistant's perspective, addresses the question directly and completely, and is well organised and helpful, even if it could be more concise or focused.
- Add a 5th point if the response is impeccably tailored to the question, with no extraneous information, reflecting expert knowledge and an engaging, insightful answer.

<question>{prompt}</question>
<response>{response}</response>

Briefly justify your total score in up to 100 words, then end with a line in exactly this form:
Score: <total points, 0 to 5>";

pub const MAX_SCORE: u8 = 5;

#[derive(Debug, thiserror::Error)]
pub enum TemplateError {
    #[error("judge template {name} lacks the placeholder {placeholder}; a template needs both {{prompt}} and {{response}}")]
    MissingPlaceholder {
        name: String,
        placeholder: &'static str,
    },
}

/// Check a user template; returns it unchanged when usable.
pub fn check_template(name: &str, template: &str) -> Result<(), TemplateError> {
    match missing_placeholder(template, &["{prompt}", "{response}"]) {
        Some(placeholder) => Err(TemplateError::MissingPlaceholder {
            name: name.to_string(),
            placeholder,
        }),
        None => Ok(()),
    }
}

/// The first of `placeholders` the template does not contain (judge, meta-judge and
/// evaluation templates all check theirs with it).
pub fn missing_placeholder(template: &str, placeholders: &[&'static str]) -> Option<&'static str> {
    placeholders.iter().copied().find(|p| !template.contains(p))
}

/// Fill the template. Substitution is single-pass, so braces inside the prompt or the response
/// are never themselves substituted.
pub fn render(template: &str, prompt: &str, response: &str) -> String {
    fill_placeholders(template, &[("{prompt}", prompt), ("{response}", response)])
}

/// Only this much of a judgement is examined (a runaway judge can produce megabytes).
pub const MAX_JUDGEMENT_SCAN: usize = 16 * 1024;

/// Find `Score: N` verdicts (case-insensitive; markdown emphasis, `N/5` and `N out of 5`
/// accepted). Several equal verdicts count once; different ones, a number outside 0..=5, or
/// none at all make the judgement unscored, with the reason.
pub fn parse_score(judgement: &str) -> Verdict {
    let text = if judgement.len() > MAX_JUDGEMENT_SCAN {
        let mut cut = judgement.len() - MAX_JUDGEMENT_SCAN;
        while !judgement.is_char_boundary(cut) {
            cut += 1;
        }
        &judgement[cut..]
    } else {
        judgement
    };
    let lower = text.to_ascii_lowercase();
    let mut found: Vec<u32> = Vec::new();
    let mut search = 0;
    while let Some(pos) = lower[search..].find("score") {
        let start = search + pos + "score".len();
        search = start;
        let rest = &lower[start..];
        // Skip markdown emphasis and spaces, then require a colon.
        let rest = rest.trim_start_matches(['*', '_', ' ']);
        let Some(rest) = rest.strip_prefix(':') else {
            continue;
        };
        let rest = rest.trim_start_matches(['*', '_', ' ', '\t']);
        let digits: String = rest.chars().take_while(|c| c.is_ascii_digit()).collect();
        if digits.is_empty() || digits.len() > 3 {
            continue;
        }
        let after = &rest[digits.len()..];
        // "4.5" is not a verdict of this rubric: points are whole.
        if after.starts_with('.') && after[1..].starts_with(|c: char| c.is_ascii_digit()) {
            found.push(u32::MAX);
            continue;
        }
        found.push(digits.parse().unwrap_or(u32::MAX));
    }
    match found.as_slice() {
        [] => Verdict::Unscored("no `Score: N` line".into()),
        _ if found.iter().any(|&s| s > MAX_SCORE as u32) => {
            Verdict::Unscored(format!("score out of range 0-{MAX_SCORE}"))
        }
        [first, rest @ ..] if rest.iter().any(|s| s != first) => {
            Verdict::Unscored(format!("several different scores: {found:?}"))
        }
        [first, ..] => Verdict::Score(*first as u8),
    }
}

/// Fill `{name}` placeholders in one pass: braces inside the values are never substituted, and
/// braces that name no placeholder are kept.
pub fn fill_placeholders(template: &str, values: &[(&str, &str)]) -> String {
    let mut out =
        String::with_capacity(template.len() + values.iter().map(|v| v.1.len()).sum::<usize>());
    let mut rest = template;
    'outer: while let Some(pos) = rest.find('{') {
        out.push_str(&rest[..pos]);
        let tail = &rest[pos..];
        for (name, value) in values {
            if let Some(t) = tail.strip_prefix(name) {
                out.push_str(value);
                rest = t;
                continue 'outer;
            }
        }
        out.push('{');
        rest = &tail[1..];
    }
    out.push_str(rest);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn verdict_forms() {
        assert_eq!(parse_score("Good answer.\nScore: 4"), Verdict::Score(4));
        assert_eq!(parse_score("**Score:** 3/5"), Verdict::Score(3));
        assert_eq!(parse_score("score: 0 out of 5"), Verdict::Score(0));
        assert_eq!(parse_score("Score: 5\nScore: 5"), Verdict::Score(5));
        assert_eq!(
            parse_score("The score is what matters.\nScore: 2"),
            Verdict::Score(2)
        );
    }

    #[test]
    fn unparseable_judgements_are_unscored_with_a_reason() {
        assert!(
            matches!(parse_score("I like it."), Verdict::Unscored(r) if r.contains("no `Score"))
        );
        assert!(
            matches!(parse_score("Score: 7"), Verdict::Unscored(r) if r.contains("out of range"))
        );
        assert!(
            matches!(parse_score("Score: 2\nScore: 4"), Verdict::Unscored(r) if r.contains("several"))
        );
        assert!(matches!(parse_score("Score: 4.5"), Verdict::Unscored(_)));
        assert!(matches!(parse_score("Score: lots"), Verdict::Unscored(_)));
        assert!(matches!(parse_score(""), Verdict::Unscored(_)));
        let huge = format!("{}\nScore: 3", "blah ".repeat(1_000_000));
        assert_eq!(parse_score(&huge), Verdict::Score(3));
        let multibyte = format!("{}Score: 1", "é".repeat(20_000));
        assert_eq!(parse_score(&multibyte), Verdict::Score(1));
    }

    #[test]
    fn render_is_single_pass_and_templates_are_checked() {
        let t = "Q: {prompt}\nA: {response}\n{other}";
        assert_eq!(
            render(t, "{response}", "x{prompt}"),
            "Q: {response}\nA: x{prompt}\n{other}"
        );
        assert!(check_template("mine.txt", "only {prompt}").is_err());
        assert!(check_template("default", DEFAULT_RUBRIC).is_ok());
    }
}

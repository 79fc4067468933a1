//! The meta-judge's prompt (two judgements of one response, compared) and the parser of its
//! `Better: A|B` verdict.

use crate::records::MetaVerdict;
use crate::rules::verdict::MAX_JUDGEMENT_SCAN;

/// The default meta-judge prompt. Placeholders: `{judge_prompt}` (the task the judge was given:
/// rubric, question and response), `{judgement_a}`, `{judgement_b}`.
pub const DEFAULT_META_PROMPT: &str = "A judge was given the task below and wrote two independent judgements of the same response. Decide which judgement is more accurate and better reasoned.

A good judgement applies each point of the rubric correctly to this response, notices the response's real strengths and weaknesses instead of inventing them, and gives a total that follows from its own reasoning. Do not prefer a judgement because it is longer, more confident or more generous.

<task>
{judge_prompt}
</task>

<judgement_a>
{judgement_a}
</judgement_a>

<judgement_b>
{judgement_b}
</judgement_b>

Compare the two judgements in up to 100 words, then end with a line in exactly this form:
Better: <A or B>";

pub const META_PLACEHOLDERS: [&str; 3] = ["{judge_prompt}", "{judgement_a}", "{judgement_b}"];

/// A user meta-judge template must contain the three placeholders.
pub fn check_meta_template(template: &str) -> Result<(), String> {
    match crate::rules::verdict::missing_placeholder(template, &META_PLACEHOLDERS) {
        Some(p) => Err(format!(
            "the meta-judge template lacks the placeholder {p}; it needs {{judge_prompt}}, {{judgement_a}} and {{judgement_b}}"
        )),
        None => Ok(()),
    }
}

/// Fill the meta-judge template, single-pass (braces inside the values are never substituted).
pub fn render_meta(template: &str, judge_prompt: &str, a: &str, b: &str) -> String {
    crate::rules::verdict::fill_placeholders(
        template,
        &[
            ("{judge_prompt}", judge_prompt),
            ("{judgement_a}", a),
            ("{judgement_b}", b),
        ],
    )
}

/// Find the verdict: a line starting (after markdown emphasis, `#`, `>` or `-`) with `Better`,
/// optionally `judgement`, a colon, then `A` or `B` (optionally after `judgement`) not followed
/// by a letter or digit. Case-insensitive. Several equal verdicts count once; different ones or
/// none make the output unparsed, with the reason.
pub fn parse_better(text: &str) -> MetaVerdict {
    let text = if text.len() > MAX_JUDGEMENT_SCAN {
        let mut cut = text.len() - MAX_JUDGEMENT_SCAN;
        while !text.is_char_boundary(cut) {
            cut += 1;
        }
        &text[cut..]
    } else {
        text
    };
    let skip = |s: &str| -> String {
        s.trim_start_matches(['*', '_', ' ', '\t', '"', '\'', '`', '[', '('])
            .to_string()
    };
    let mut found: Vec<MetaVerdict> = Vec::new();
    for line in text.lines() {
        let l = line.to_ascii_lowercase();
        let l = l.trim_start_matches(['*', '_', '#', '>', '-', ' ', '\t']);
        let Some(rest) = l.strip_prefix("better") else {
            continue;
        };
        let mut rest = skip(rest);
        for word in ["judgement", "judgment"] {
            if let Some(r) = rest.strip_prefix(word) {
                rest = skip(r);
            }
        }
        let Some(r) = rest.strip_prefix(':') else {
            continue;
        };
        let mut rest = skip(r);
        for word in ["judgement", "judgment"] {
            if let Some(r) = rest.strip_prefix(word) {
                rest = skip(r);
            }
        }
        let mut chars = rest.chars();
        let verdict = match chars.next() {
            Some('a') => MetaVerdict::A,
            Some('b') => MetaVerdict::B,
            _ => continue,
        };
        if chars.next().is_some_and(|c| c.is_alphanumeric()) {
            continue;
        }
        found.push(verdict);
    }
    match found.as_slice() {
        [] => MetaVerdict::Unparsed("no `Better: A` or `Better: B` line".into()),
        [first, rest @ ..] if rest.iter().any(|v| v != first) => {
            MetaVerdict::Unparsed("several different verdicts".into())
        }
        [first, ..] => first.clone(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn verdict_forms() {
        assert_eq!(parse_better("A is vague.\nBetter: A"), MetaVerdict::A);
        assert_eq!(parse_better("**Better:** B"), MetaVerdict::B);
        assert_eq!(parse_better("better: b."), MetaVerdict::B);
        assert_eq!(parse_better("Better judgement: A"), MetaVerdict::A);
        assert_eq!(parse_better("Better: Judgement B"), MetaVerdict::B);
        assert_eq!(parse_better("## Better: **A**"), MetaVerdict::A);
        assert_eq!(parse_better("Better: (B)"), MetaVerdict::B);
        assert_eq!(parse_better("Better: A\nBetter: A"), MetaVerdict::A);
        assert_eq!(
            parse_better("  - Better: A (it follows the rubric)"),
            MetaVerdict::A
        );
    }

    #[test]
    fn unparseable_meta_judgements_are_kept_with_a_reason() {
        let un = |t: &str| matches!(parse_better(t), MetaVerdict::Unparsed(_));
        assert!(
            matches!(parse_better("I cannot decide."), MetaVerdict::Unparsed(r) if r.contains("no `Better"))
        );
        assert!(
            matches!(parse_better("Better: A\nBetter: B"), MetaVerdict::Unparsed(r) if r.contains("several"))
        );
        assert!(
            un("Better: Both"),
            "a word starting with b is not a verdict"
        );
        assert!(un("Better: AB"));
        assert!(un("Better: C"));
        assert!(un("Better: "));
        assert!(un("Better A"), "a colon is required");
        assert!(
            un("Judgement B is better: A misses the point"),
            "prose mid-line is not the verdict line"
        );
        assert!(un(""));
        assert!(un("Better:"));
        let huge = format!("{}\nBetter: B", "blah ".repeat(1_000_000));
        assert_eq!(parse_better(&huge), MetaVerdict::B);
        let multibyte = format!("{}\nBetter: A", "é".repeat(20_000));
        assert_eq!(parse_better(&multibyte), MetaVerdict::A);
        assert!(un("Better: é"));
    }

    #[test]
    fn the_meta_prompt_renders_single_pass_and_templates_are_checked() {
        let t = "T: {judge_prompt}\nA: {judgement_a}\nB: {judgement_b}\n{other}";
        assert_eq!(
            render_meta(t, "{judgement_a}", "x{judgement_b}", "y"),
            "T: {judgement_a}\nA: x{judgement_b}\nB: y\n{other}"
        );
        assert!(check_meta_template(DEFAULT_META_PROMPT).is_ok());
        assert!(check_meta_template("{judge_prompt} {judgement_a}")
            .unwrap_err()
            .contains("{judgement_b}"));
        let shown = render_meta(DEFAULT_META_PROMPT, "P", "first", "second");
        assert!(shown.find("first").unwrap() < shown.find("second").unwrap());
        assert!(shown.ends_with("Better: <A or B>"));
    }
}

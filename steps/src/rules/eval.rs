//! The evaluation's pure rules: the default pairwise template and its check, reference outputs
//! in AlpacaEval's format, the combination of both orders' verdicts into one preference, and the
//! summary (win rates, lengths, exact match) of a set of annotations.

use crate::prompts::Prompt;
use crate::records::Annotation;
use crate::records::EvalOutput;
use crate::records::Order;
use crate::records::OrderVerdict;
use crate::records::Prefers;
use crate::rules::agreement::{agree, Agreement, Said};
use crate::rules::eval_metrics::{self, WinRate};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// The default pairwise template. Placeholders: `{instruction}`, `{output_a}`, `{output_b}`.
/// It ends by asking for the verdict line that `text` mode parses and whose opening
/// (`Better: `) `logprob` mode appends.
pub const DEFAULT_PAIRWISE_TEMPLATE: &str = "Compare two responses to the same instruction and decide which one is better.

A better response follows the instruction, is correct and helpful, and says what is needed without padding. Do not prefer a response because it is longer or comes first.

<instruction>
{instruction}
</instruction>

<response_a>
{output_a}
</response_a>

<response_b>
{output_b}
</response_b>

Compare the two responses in up to 80 words, then end with a line in exactly this form:
Better: <A or B>";

pub const PAIRWISE_PLACEHOLDERS: [&str; 3] = ["{instruction}", "{output_a}", "{output_b}"];

/// The opening of the verdict line; `logprob` mode scores the next token (`A` or `B`).
pub const VERDICT_OPENING: &str = "Better: ";

/// A pairwise template must contain the three placeholders.
pub fn check_pairwise_template(template: &str) -> Result<(), String> {
    match crate::rules::verdict::missing_placeholder(template, &PAIRWISE_PLACEHOLDERS) {
        Some(p) => Err(format!(
            "the evaluation judge template lacks the placeholder {p}; it needs {{instruction}}, {{output_a}} and {{output_b}}"
        )),
        None => Ok(()),
    }
}

pub use crate::rules::verdict::fill_placeholders as render_placeholders;

/// Why a reference outputs file cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ReferenceError {
    #[error("reference outputs {file}: {reason}; expected AlpacaEval's format, a JSON list of {{\"instruction\": ..., \"output\": ..., \"generator\": ...}}")]
    Shape { file: String, reason: String },
    #[error("reference outputs {file} have no output for {count} evaluation prompt(s): {ids}; add them or remove those prompts")]
    Missing {
        file: String,
        count: usize,
        ids: String,
    },
    #[error("reference outputs {file} give {count} different outputs for the instruction of prompt `{id}`; keep one")]
    Ambiguous {
        file: String,
        id: String,
        count: usize,
    },
}

/// Read a reference outputs file (AlpacaEval's format) and pick the output of every prompt, by
/// instruction text (exact, or equal after trimming surrounding whitespace). Every prompt must
/// have one; extra instructions are ignored.
pub fn parse_reference(
    bytes: &[u8],
    file: &str,
    prompts: &[Prompt],
) -> Result<Vec<EvalOutput>, ReferenceError> {
    let shape = |reason: String| ReferenceError::Shape {
        file: file.to_string(),
        reason,
    };
    let value: serde_json::Value =
        serde_json::from_slice(bytes).map_err(|e| shape(format!("not JSON ({e})")))?;
    let list = value
        .as_array()
        .ok_or_else(|| shape("the top level is not a list".into()))?;
    let default_generator = std::path::Path::new(file)
        .file_stem()
        .map(|s| s.to_string_lossy().to_string())
        .unwrap_or_else(|| "reference".into());
    let mut by_instruction: BTreeMap<String, Vec<(String, String)>> = BTreeMap::new();
    for (n, row) in list.iter().enumerate() {
        let obj = row
            .as_object()
            .ok_or_else(|| shape(format!("entry {n} is not an object")))?;
        let field = |k: &str| -> Result<Option<String>, ReferenceError> {
            match obj.get(k) {
                None | Some(serde_json::Value::Null) => Ok(None),
                Some(serde_json::Value::String(s)) => Ok(Some(s.clone())),
                Some(other) => Err(shape(format!(
                    "entry {n}: \"{k}\" must be a string, found {other}"
                ))),
            }
        };
        let instruction = field("instruction")?
            .ok_or_else(|| shape(format!("entry {n} has no \"instruction\"")))?;
        let output =
            field("output")?.ok_or_else(|| shape(format!("entry {n} has no \"output\"")))?;
        let generator = field("generator")?.unwrap_or_else(|| default_generator.clone());
        by_instruction
            .entry(instruction.trim().to_string())
            .or_default()
            .push((output, generator));
    }
    let mut out = Vec::with_capacity(prompts.len());
    let mut missing = Vec::new();
    for p in prompts {
        match by_instruction.get(p.prompt.trim()) {
            None => missing.push(p.id.clone()),
            Some(v) => {
                let distinct: std::collections::BTreeSet<&str> =
                    v.iter().map(|(o, _)| o.as_str()).collect();
                if distinct.len() > 1 {
                    return Err(ReferenceError::Ambiguous {
                        file: file.to_string(),
                        id: p.id.clone(),
                        count: distinct.len(),
                    });
                }
                out.push(EvalOutput {
                    prompt_id: p.id.clone(),
                    output: v[0].0.clone(),
                    generator: v[0].1.clone(),
                    tokens: None,
                    finish: None,
                    seed: None,
                });
            }
        }
    }
    if !missing.is_empty() {
        let count = missing.len();
        let mut ids = missing
            .iter()
            .take(10)
            .map(|s| format!("`{s}`"))
            .collect::<Vec<_>>()
            .join(", ");
        if count > 10 {
            ids.push_str(&format!(" and {} more", count - 10));
        }
        return Err(ReferenceError::Missing {
            file: file.to_string(),
            count,
            ids,
        });
    }
    Ok(out)
}

/// Combine the two orders: the model (or baseline) is preferred only when both orders say so;
/// any other pair of readable verdicts is a tie; an unreadable verdict leaves it undecided.
pub fn combine(verdicts: &[OrderVerdict]) -> (Option<f64>, String) {
    let said: Vec<Said<Prefers>> = verdicts
        .iter()
        .map(|v| match &v.prefers {
            Prefers::Unparsed(_) => Said::Unreadable,
            Prefers::Tie => Said::Tie,
            p => Said::Prefers(p.clone()),
        })
        .collect();
    match agree(&said) {
        Agreement::Unreadable(i) => {
            let v = &verdicts[i];
            let Prefers::Unparsed(why) = &v.prefers else {
                unreachable!("only unparsed verdicts are unreadable")
            };
            let order = match v.order {
                Order::BaselineFirst => "baseline first",
                Order::ModelFirst => "model first",
            };
            (
                None,
                format!("undecided: the verdict with the {order} cannot be read ({why})"),
            )
        }
        Agreement::Both(Prefers::Model) => (Some(2.0), "both orders prefer the model".into()),
        Agreement::Both(_) => (Some(1.0), "both orders prefer the baseline".into()),
        Agreement::Disagree => (Some(1.5), "tie: the two orders disagree".into()),
    }
}

/// Exact-match accuracy over the prompts with an answer.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct ExactMatch {
    pub correct: usize,
    pub total: usize,
    /// Percent.
    pub accuracy: f64,
    pub baseline_correct: usize,
    pub baseline_accuracy: f64,
}

/// The metrics of one evaluated model against its baseline.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct EvalSummary {
    /// The baseline's generator and the evaluated model's (weights digest).
    pub generator_1: String,
    pub generator_2: String,
    #[serde(with = "tsr_state::hex")]
    pub judge_model: tsr_state::Digest,
    pub mode: String,
    pub template_digest: String,
    pub prompts: usize,
    /// As `alpaca_eval.metrics.get_winrate` computes it over the decided prompts.
    pub win_rate: Option<WinRate>,
    /// Seeded percentile bootstrap, 95%.
    pub ci95: Option<(f64, f64)>,
    /// The minimal length-controlled win rate (see `eval_metrics`).
    pub lc_win_rate: Option<f64>,
    /// `logprob` mode: the mean over prompts of the judge's probability that the model's output
    /// is better, averaged over both orders (position bias cancels), in percent; identical
    /// outputs count 50. Not an AlpacaEval metric: a graded signal where a small judge's strong
    /// position bias turns most strict verdicts into ties.
    #[serde(default)]
    pub soft_win_rate: Option<f64>,
    /// Prompts left undecided because a verdict could not be read.
    pub undecided: usize,
    /// Verdicts asked of the judge, and how many could not be read.
    pub verdicts: usize,
    pub unparsed_verdicts: usize,
    /// Percent of verdicts that could not be read.
    pub unparsed_share: f64,
    /// Prompts whose two outputs are identical (ties, not judged).
    pub identical: usize,
    /// Mean output length in characters.
    pub avg_chars_model: f64,
    pub avg_chars_baseline: f64,
    pub exact_match: Option<ExactMatch>,
    /// An API judge's requests and the tokens they used.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub api: Option<ApiUsage>,
}

/// What an API judge's evaluation asked and spent.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct ApiUsage {
    /// The model name asked.
    pub model: String,
    /// Comparisons the server answered or refused (identical outputs are not asked).
    pub requests: usize,
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
    /// Requests the server refused (each leaves its prompt undecided).
    pub refused: usize,
}

/// The decision of a prompt whose two outputs are the same text.
pub const IDENTICAL: &str = "tie: the two outputs are identical (not judged)";

/// How a judge decided one prompt, and which judge it was.
pub struct Judged {
    pub preference: Option<f64>,
    pub decision: String,
    pub verdicts: Vec<OrderVerdict>,
    pub judge_model: tsr_state::Digest,
    pub mode: String,
    pub template_digest: String,
    pub api: Option<crate::records::ApiVerdict>,
}

/// The annotation of prompt `p` from the baseline's output `b`, the model's `c` and how the
/// judge decided; the parts every judge fills the same way (outputs, generators, the known
/// answer and both exact matches) are filled here.
pub fn annotation(p: &Prompt, b: &EvalOutput, c: &EvalOutput, j: Judged) -> Annotation {
    let answer = p.answer.clone();
    Annotation {
        prompt_id: p.id.clone(),
        instruction: p.prompt.clone(),
        output_1: b.output.clone(),
        output_2: c.output.clone(),
        generator_1: b.generator.clone(),
        generator_2: c.generator.clone(),
        preference: j.preference,
        decision: j.decision,
        verdicts: j.verdicts,
        judge_model: j.judge_model,
        mode: j.mode,
        template_digest: j.template_digest,
        correct: answer
            .as_deref()
            .and_then(|a| eval_metrics::exact_match(&c.output, a)),
        baseline_correct: answer
            .as_deref()
            .and_then(|a| eval_metrics::exact_match(&b.output, a)),
        answer,
        api: j.api,
    }
}

/// Metrics over finished annotations (`seed` drives the bootstrap).
pub fn summarize(
    annotations: &[Annotation],
    judge_model: tsr_state::Digest,
    mode: &str,
    template_digest: &str,
    seed: u64,
    resamples: usize,
) -> EvalSummary {
    let prefs: Vec<f64> = annotations
        .iter()
        .map(|a| a.preference.unwrap_or(f64::NAN))
        .collect();
    let chars = |s: &str| s.chars().count();
    let model_len: Vec<usize> = annotations.iter().map(|a| chars(&a.output_2)).collect();
    let base_len: Vec<usize> = annotations.iter().map(|a| chars(&a.output_1)).collect();
    let mean = |v: &[usize]| {
        if v.is_empty() {
            0.0
        } else {
            v.iter().sum::<usize>() as f64 / v.len() as f64
        }
    };
    let verdicts: usize = annotations.iter().map(|a| a.verdicts.len()).sum();
    let unparsed = annotations
        .iter()
        .flat_map(|a| &a.verdicts)
        .filter(|v| matches!(v.prefers, Prefers::Unparsed(_)))
        .count();
    let with_answer: Vec<&Annotation> =
        annotations.iter().filter(|a| a.correct.is_some()).collect();
    let exact_match = (!with_answer.is_empty()).then(|| {
        let total = with_answer.len();
        let correct = with_answer
            .iter()
            .filter(|a| a.correct == Some(true))
            .count();
        let baseline_correct = with_answer
            .iter()
            .filter(|a| a.baseline_correct == Some(true))
            .count();
        ExactMatch {
            correct,
            total,
            accuracy: 100.0 * correct as f64 / total as f64,
            baseline_correct,
            baseline_accuracy: 100.0 * baseline_correct as f64 / total as f64,
        }
    });
    let soft: Option<Vec<f64>> = annotations
        .iter()
        .map(|a| {
            if a.verdicts.is_empty() {
                return Some(0.5);
            }
            let ps: Option<Vec<f64>> = a
                .verdicts
                .iter()
                .map(|v| match v.order {
                    Order::BaselineFirst => v.prob_b,
                    Order::ModelFirst => v.prob_a,
                })
                .collect();
            ps.map(|p| p.iter().sum::<f64>() / p.len() as f64)
        })
        .collect();
    let soft_win_rate = soft
        .filter(|v| !v.is_empty() && annotations.iter().any(|a| !a.verdicts.is_empty()))
        .map(|v| 100.0 * v.iter().sum::<f64>() / v.len() as f64);
    EvalSummary {
        generator_1: annotations
            .first()
            .map(|a| a.generator_1.clone())
            .unwrap_or_default(),
        generator_2: annotations
            .first()
            .map(|a| a.generator_2.clone())
            .unwrap_or_default(),
        judge_model,
        mode: mode.to_string(),
        template_digest: template_digest.to_string(),
        prompts: annotations.len(),
        win_rate: eval_metrics::win_rate(&prefs),
        ci95: eval_metrics::bootstrap_interval(&prefs, seed, resamples),
        lc_win_rate: eval_metrics::length_controlled_win_rate(&prefs, &model_len, &base_len),
        soft_win_rate,
        undecided: annotations
            .iter()
            .filter(|a| a.preference.is_none())
            .count(),
        verdicts,
        unparsed_verdicts: unparsed,
        unparsed_share: if verdicts == 0 {
            0.0
        } else {
            100.0 * unparsed as f64 / verdicts as f64
        },
        identical: annotations.iter().filter(|a| a.verdicts.is_empty()).count(),
        avg_chars_model: mean(&model_len),
        avg_chars_baseline: mean(&base_len),
        api: None,
        exact_match,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::records::Order;
    use crate::records::Prefers;
    use tsr_state::Digest;

    fn v(order: Order, prefers: Prefers) -> OrderVerdict {
        OrderVerdict {
            order,
            text: None,
            prob_a: None,
            prob_b: None,
            prefers,
        }
    }

    #[test]
    fn a_preference_needs_both_orders() {
        use Order::*;
        use Prefers::*;
        assert_eq!(
            combine(&[v(BaselineFirst, Model), v(ModelFirst, Model)]).0,
            Some(2.0)
        );
        assert_eq!(
            combine(&[v(BaselineFirst, Baseline), v(ModelFirst, Baseline)]).0,
            Some(1.0)
        );
        assert_eq!(
            combine(&[v(BaselineFirst, Model), v(ModelFirst, Baseline)]).0,
            Some(1.5)
        );
        assert_eq!(
            combine(&[v(BaselineFirst, Tie), v(ModelFirst, Model)]).0,
            Some(1.5)
        );
        let (p, why) = combine(&[
            v(BaselineFirst, Model),
            v(ModelFirst, Unparsed("no line".into())),
        ]);
        assert_eq!(p, None);
        assert!(
            why.contains("model first") && why.contains("no line"),
            "{why}"
        );
    }

    #[test]
    fn templates_need_their_placeholders_and_render_once() {
        assert!(check_pairwise_template(DEFAULT_PAIRWISE_TEMPLATE).is_ok());
        let e = check_pairwise_template("{instruction} {output_a}").unwrap_err();
        assert!(e.contains("{output_b}"), "{e}");
        let out = render_placeholders(
            "Q {instruction} A {output_a} B {output_b} {other}",
            &[
                ("{instruction}", "{output_a}"),
                ("{output_a}", "x"),
                ("{output_b}", "y"),
            ],
        );
        assert_eq!(out, "Q {output_a} A x B y {other}");
    }

    fn prompt(id: &str, text: &str) -> Prompt {
        Prompt {
            id: id.into(),
            prompt: text.into(),
            answer: None,
        }
    }

    #[test]
    fn reference_files_are_matched_by_instruction() {
        let prompts = [prompt("a", "Name a colour."), prompt("b", "Add 2 and 2.")];
        let file = br#"[{"instruction": "Add 2 and 2.", "output": "4", "generator": "gpt4_turbo", "dataset": "x"},
                        {"instruction": " Name a colour.\n", "output": "Red."},
                        {"instruction": "unused", "output": "-"}]"#;
        let rows = parse_reference(file, "dir/ref.json", &prompts).unwrap();
        assert_eq!(rows[0].prompt_id, "a");
        assert_eq!(rows[0].output, "Red.");
        assert_eq!(
            rows[0].generator, "ref",
            "a missing generator is the file's name"
        );
        assert_eq!(rows[1].generator, "gpt4_turbo");
    }

    #[test]
    fn bad_reference_files_are_named() {
        let prompts = [prompt("a", "Name a colour."), prompt("b", "Add 2 and 2.")];
        let err = |bytes: &[u8]| {
            parse_reference(bytes, "ref.json", &prompts)
                .unwrap_err()
                .to_string()
        };
        let e = err(b"{\"instruction\": \"x\"}");
        assert!(
            e.contains("ref.json") && e.contains("not a list") && e.contains("AlpacaEval"),
            "{e}"
        );
        let e = err(b"[{\"instruction\": \"Name a colour.\"}]");
        assert!(e.contains("entry 0 has no \"output\""), "{e}");
        let e = err(b"[{\"instruction\": \"Name a colour.\", \"output\": 3}]");
        assert!(e.contains("\"output\" must be a string"), "{e}");
        let e = err(b"[{\"instruction\": \"Name a colour.\", \"output\": \"Red\"}]");
        assert!(e.contains("1 evaluation prompt(s): `b`"), "{e}");
        let e = err(br#"[{"instruction": "Name a colour.", "output": "Red"}, {"instruction": "Name a colour.", "output": "Blue"}, {"instruction": "Add 2 and 2.", "output": "4"}]"#);
        assert!(
            e.contains("2 different outputs") && e.contains("`a`"),
            "{e}"
        );
        let e = err(b"not json");
        assert!(e.contains("not JSON"), "{e}");
    }

    fn ann(
        pref: Option<f64>,
        out1: &str,
        out2: &str,
        verdicts: Vec<OrderVerdict>,
        correct: Option<bool>,
    ) -> Annotation {
        Annotation {
            prompt_id: "p".into(),
            instruction: "i".into(),
            output_1: out1.into(),
            output_2: out2.into(),
            generator_1: "base".into(),
            generator_2: "model".into(),
            preference: pref,
            decision: String::new(),
            verdicts,
            judge_model: Digest::of(b"j"),
            mode: "text".into(),
            template_digest: "t".into(),
            answer: correct.map(|_| "4".into()),
            correct,
            baseline_correct: correct.map(|_| false),
            api: None,
        }
    }

    #[test]
    fn the_soft_win_rate_averages_both_orders() {
        let pv = |order, pa: f64| OrderVerdict {
            order,
            text: None,
            prob_a: Some(pa),
            prob_b: Some(1.0 - pa),
            prefers: Prefers::Tie,
        };
        // A judge that says A 90% of the time whatever it sees: no preference after debiasing.
        let biased = vec![pv(Order::BaselineFirst, 0.9), pv(Order::ModelFirst, 0.9)];
        // A judge that prefers the model in both orders.
        let fond = vec![pv(Order::BaselineFirst, 0.2), pv(Order::ModelFirst, 0.7)];
        let rows = vec![
            ann(Some(1.5), "a", "b", biased, None),
            ann(Some(2.0), "a", "b", fond, None),
            ann(Some(1.5), "same", "same", vec![], None),
        ];
        let s = summarize(&rows, Digest::of(b"j"), "logprob", "t", 1, 10);
        let want = 100.0 * ((0.1 + 0.9) / 2.0 + (0.8 + 0.7) / 2.0 + 0.5) / 3.0;
        assert!((s.soft_win_rate.unwrap() - want).abs() < 1e-12);
        let text_rows = vec![ann(
            Some(2.0),
            "a",
            "b",
            vec![v(Order::BaselineFirst, Prefers::Model)],
            None,
        )];
        assert_eq!(
            summarize(&text_rows, Digest::of(b"j"), "text", "t", 1, 10).soft_win_rate,
            None
        );
    }

    #[test]
    fn summaries_count_what_was_decided() {
        use Order::*;
        let two = || {
            vec![
                v(BaselineFirst, Prefers::Model),
                v(ModelFirst, Prefers::Model),
            ]
        };
        let rows = vec![
            ann(Some(2.0), "ab", "abcd", two(), Some(true)),
            ann(Some(1.0), "ab", "abcd", two(), Some(false)),
            ann(Some(1.5), "same", "same", vec![], None),
            ann(
                None,
                "ab",
                "a",
                vec![
                    v(BaselineFirst, Prefers::Unparsed("x".into())),
                    v(ModelFirst, Prefers::Model),
                ],
                None,
            ),
        ];
        let s = summarize(&rows, Digest::of(b"j"), "text", "t", 7, 200);
        let w = s.win_rate.clone().unwrap();
        assert_eq!(
            w.n_total, 3,
            "the undecided prompt is left out, as alpaca_eval drops NaN"
        );
        assert!((w.win_rate - 50.0).abs() < 1e-12);
        assert_eq!(
            (s.undecided, s.identical, s.verdicts, s.unparsed_verdicts),
            (1, 1, 6, 1)
        );
        assert!((s.unparsed_share - 100.0 / 6.0).abs() < 1e-12);
        let em = s.exact_match.unwrap();
        assert_eq!((em.correct, em.total, em.baseline_correct), (1, 2, 0));
        assert!((s.avg_chars_model - 13.0 / 4.0).abs() < 1e-12);
        let (lo, hi) = s.ci95.unwrap();
        assert!(lo <= 50.0 && 50.0 <= hi);
        assert_eq!(
            summarize(&rows, Digest::of(b"j"), "text", "t", 7, 200),
            summarize(&rows, Digest::of(b"j"), "text", "t", 7, 200)
        );
    }
}

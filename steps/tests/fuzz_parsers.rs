//! Property tests (fuzzing) of the parsers that take outside text: the judge's score parser,
//! the prompts JSONL reader and the judge template renderer. None may panic on any input, and
//! what they accept must satisfy their contracts.

use proptest::prelude::*;
use tsr_steps::prompts::parse_prompts;
use tsr_steps::records::Verdict;
use tsr_steps::rules::verdict::{check_template, parse_score, render, MAX_SCORE};

proptest! {
    #![proptest_config(ProptestConfig::with_cases(3000))]

    #[test]
    fn score_parser_never_panics_and_stays_in_range(s in ".{0,400}") {
        match parse_score(&s) {
            Verdict::Score(n) => prop_assert!(n <= MAX_SCORE),
            Verdict::Unscored(reason) => prop_assert!(!reason.is_empty()),
        }
    }

    #[test]
    fn score_parser_finds_a_planted_verdict(prefix in "[a-zA-Z .,\n]{0,200}", n in 0u8..=5) {
        // Text without the word "score" plus one verdict line always parses to that verdict.
        prop_assume!(!prefix.to_ascii_lowercase().contains("score"));
        prop_assert_eq!(parse_score(&format!("{prefix}\nScore: {n}")), Verdict::Score(n));
    }

    #[test]
    fn prompts_reader_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..600)) {
        if let Ok(prompts) = parse_prompts(&bytes, "fuzz.jsonl") {
            prop_assert!(!prompts.is_empty());
            let mut ids: Vec<&str> = prompts.iter().map(|p| p.id.as_str()).collect();
            ids.sort();
            let n = ids.len();
            ids.dedup();
            prop_assert_eq!(ids.len(), n, "ids are unique");
            prop_assert!(prompts.iter().all(|p| !p.prompt.trim().is_empty()));
        }
    }

    #[test]
    fn prompts_reader_on_jsonish_lines(lines in proptest::collection::vec("\\{(\"(id|prompt|x)\": ?(\"[a-z{}\\\\]{0,8}\"|[0-9]{1,3}|null|true)(, ?)?){0,3}\\}", 0..8)) {
        let text = lines.join("\n");
        let _ = parse_prompts(text.as_bytes(), "fuzz.jsonl");
    }

    #[test]
    fn render_substitutes_exactly_once(prompt in ".{0,50}", response in ".{0,50}") {
        let t = "Q:{prompt} A:{response}";
        prop_assert!(check_template("t", t).is_ok());
        prop_assert_eq!(render(t, &prompt, &response), format!("Q:{prompt} A:{response}"));
    }
}

//! An evaluation tsr judged through a real OpenAI-compatible server with AlpacaEval 2.0's
//! annotator and template (llama-cpp-python serving SmolLM2; `scripts/eval_golden.sh` ran it and
//! exported it to `tests/fixtures/eval/export-api/`), read by alpaca_eval 0.6.6 itself
//! (`tests/fixtures/eval/export-api.json`, by `scripts/alpaca_agreement_golden.py`):
//!
//! - the order tsr showed the outputs in is the one alpaca_eval's processor picks;
//! - the preference tsr stored is what alpaca_eval's `logprob_parser` reads from the recorded
//!   log-probabilities, switched back by its processor; tsr's rules give it again today;
//! - `get_winrate` on the exported file equals the win rate tsr reported and computes now;
//! - `get_length_controlled_winrate`, pointed at the evaluation's length-control folder, equals
//!   the AlpacaEval 2.0 LC tsr reported and computes now.

use std::path::{Path, PathBuf};

use serde_json::Value;
use tsr_steps::kinds::alpaca_lc::{check_prompts, lc_rows, read_lc_data};
use tsr_steps::records::Annotation;
use tsr_steps::rules::alpaca_annotator::{soft_preference, unswitch};
use tsr_steps::rules::eval_metrics::WinRate;
use tsr_steps::rules::lc_glm::{length_controlled_v1, LcResult};
use tsr_steps::rules::py_random::alpaca_eval_switched;

fn dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/eval")
}

fn read(p: &Path) -> Value {
    serde_json::from_slice(&std::fs::read(p).unwrap_or_else(|e| panic!("{}: {e}", p.display())))
        .unwrap()
}

#[test]
fn an_api_evaluation_agrees_with_alpaca_eval_on_order_preferences_and_win_rates() {
    let golden = read(&dir().join("export-api.json"));
    let rows: Vec<Annotation> =
        serde_json::from_value(read(&dir().join("export-api/model/annotations.json"))).unwrap();
    let want = golden["rows"].as_array().unwrap();
    assert_eq!(rows.len(), want.len());
    assert_eq!(rows.len(), 24);
    let mut decided = 0;
    for (a, w) in rows.iter().zip(want) {
        assert_eq!(a.instruction, w["instruction"].as_str().unwrap());
        let api = a.api.as_ref().expect("an API judge's annotation");
        assert_eq!(api.annotator, "weighted_alpaca_eval_gpt4_turbo");
        let switched = w["switched"].as_bool().unwrap();
        assert_eq!(api.switched, switched, "order of `{}`", a.instruction);
        assert_eq!(alpaca_eval_switched(&a.instruction), switched);
        let close = |x: Option<f64>, y: Option<f64>, what: &str| match (x, y) {
            (Some(x), Some(y)) => assert!(
                (x - y).abs() < 1e-12,
                "{what} of `{}`: {x} vs {y}",
                a.instruction
            ),
            (None, None) => {}
            _ => panic!(
                "{what} of `{}`: tsr {x:?} vs alpaca_eval {y:?}",
                a.instruction
            ),
        };
        close(
            api.shown_preference,
            w["shown_preference"].as_f64(),
            "shown preference",
        );
        close(a.preference, w["preference"].as_f64(), "preference");
        // tsr's rules today give the same from the recorded log-probabilities.
        let again =
            soft_preference(&api.top_logprobs).map(|p| if switched { unswitch(p) } else { p });
        close(again, w["preference"].as_f64(), "recomputed preference");
        if a.preference.is_some_and(|p| p != 1.5) {
            decided += 1;
        }
    }
    // The judge decided most comparisons: otherwise this proves nothing.
    assert!(
        decided >= rows.len() / 2,
        "only {decided} comparisons decided"
    );

    let summaries = read(&dir().join("export-api/summary.json"));
    let entry = &summaries.as_array().unwrap()[0];
    let reported: WinRate = serde_json::from_value(entry["summary"]["win_rate"].clone()).unwrap();
    let now =
        tsr_steps::rules::eval::summarize(&rows, rows[0].judge_model, &rows[0].mode, "t", 1, 10)
            .win_rate
            .unwrap();
    let gw = &golden["get_winrate"];
    for (who, w) in [("reported", &reported), ("recomputed", &now)] {
        for (k, x) in [
            ("win_rate", w.win_rate),
            ("discrete_win_rate", w.discrete_win_rate),
            ("standard_error", w.standard_error.unwrap()),
            ("n_wins", w.n_wins as f64),
            ("n_wins_base", w.n_wins_base as f64),
            ("n_draws", w.n_draws as f64),
            ("n_total", w.n_total as f64),
        ] {
            let y = gw[k].as_f64().unwrap();
            assert!(
                (x - y).abs() < 1e-9,
                "{who} {k}: tsr {x} vs alpaca_eval {y}"
            );
        }
    }

    // AlpacaEval 2.0's length control with the evaluation's folder.
    let (data, instructions) = read_lc_data(&dir().join("lc-small")).unwrap();
    let texts: Vec<String> = rows.iter().map(|a| a.instruction.clone()).collect();
    check_prompts(&instructions, &texts).unwrap();
    let now = length_controlled_v1(&data, &lc_rows(&rows), false).unwrap();
    let reported: LcResult =
        serde_json::from_value(entry["lc"].clone()).expect("the export has the LC");
    let want_lc = golden["length_controlled_winrate"].as_f64().unwrap();
    for (who, lc) in [("reported", &reported), ("recomputed", &now)] {
        assert!(
            (lc.length_controlled_winrate - want_lc).abs() < 0.05,
            "{who} LC: tsr {} vs alpaca_eval {want_lc}",
            lc.length_controlled_winrate
        );
        assert_eq!(lc.glm, "length_controlled_v1");
        assert_eq!(
            lc.fitted_rows,
            rows.iter().filter(|a| a.preference.is_some()).count()
        );
    }
}

/// Numbers compared as numbers (`1` and `1.0` are the same value in a request).
fn normalise(v: &Value) -> Value {
    match v {
        Value::Number(n) => serde_json::json!(n.as_f64().unwrap()),
        Value::Array(a) => Value::Array(a.iter().map(normalise).collect()),
        Value::Object(o) => {
            Value::Object(o.iter().map(|(k, v)| (k.clone(), normalise(v))).collect())
        }
        other => other.clone(),
    }
}

/// The request bodies alpaca_eval itself sends for its default annotator (recorded through the
/// openai client by `scripts/alpaca_request_golden.py`) equal tsr's for the same pairs, and
/// the preference alpaca_eval reads from the recorder's answer is tsr's reading of it.
#[test]
fn request_bodies_equal_the_ones_alpaca_eval_sends() {
    use tsr_steps::kinds::api_judge::ApiJudge;
    let golden = read(&dir().join("alpaca-requests.json"));
    let judge = ApiJudge::weighted_alpaca_eval(
        "gpt-4-1106-preview",
        golden["template"].as_str().unwrap().into(),
        0,
    );
    judge.check().unwrap();
    let pairs = golden["pairs"].as_array().unwrap();
    assert!(pairs.len() >= 5);
    let mut switched_seen = [false, false];
    for p in pairs {
        let instruction = p["instruction"].as_str().unwrap();
        let prompt = tsr_steps::prompts::Prompt {
            id: "p".into(),
            prompt: instruction.into(),
            answer: None,
        };
        let (body, switched) = judge
            .request(
                &prompt,
                p["output_1"].as_str().unwrap(),
                p["output_2"].as_str().unwrap(),
            )
            .unwrap();
        switched_seen[switched as usize] = true;
        let ours: Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(
            normalise(&ours),
            normalise(&p["body"]),
            "the request for `{instruction}`"
        );
        // The recorder answered P(m) = 0.7 for the output shown first.
        let top = vec![
            ("m".to_string(), 0.7f64.ln()),
            ("M".to_string(), 0.3f64.ln()),
        ];
        let raw = soft_preference(&top).unwrap();
        let pref = if switched { unswitch(raw) } else { raw };
        let want = p["preference"].as_f64().unwrap();
        assert!(
            (pref - want).abs() < 1e-12,
            "`{instruction}`: {pref} vs {want}"
        );
    }
    assert_eq!(switched_seen, [true, true], "both orders among the pairs");
}

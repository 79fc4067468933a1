//! tsr's evaluation metrics against the tools users check them with: AlpacaEval 0.6.6's
//! `get_winrate` and scikit-learn's logistic regression (`tests/fixtures/eval/winrate.json`,
//! made by `scripts/eval_golden.sh`).

use std::path::{Path, PathBuf};

use serde_json::Value;
use tsr_steps::rules::eval_metrics::{length_controlled_win_rate, win_rate, WinRate};

#[test]
fn win_rates_equal_alpaca_eval_and_the_length_control_equals_a_logistic_fit() {
    let path =
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/eval/winrate.json");
    let g: Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    let cases = g["cases"].as_array().unwrap();
    assert_eq!(cases.len(), 4);
    for c in cases {
        let name = c["name"].as_str().unwrap();
        let prefs: Vec<f64> = c["preferences"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| p.as_f64().unwrap_or(f64::NAN))
            .collect();
        let lens = |k: &str| -> Vec<usize> {
            c[k].as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_u64().unwrap() as usize)
                .collect()
        };
        let w = win_rate(&prefs).unwrap();
        let want = &c["get_winrate"];
        let close = |a: f64, k: &str| {
            let b = want[k].as_f64().unwrap();
            assert!(
                (a - b).abs() < 1e-9,
                "{name}: {k} tsr {a} vs alpaca_eval {b}"
            );
        };
        close(w.win_rate, "win_rate");
        close(w.standard_error.unwrap(), "standard_error");
        close(w.discrete_win_rate, "discrete_win_rate");
        close(w.n_wins as f64, "n_wins");
        close(w.n_wins_base as f64, "n_wins_base");
        close(w.n_draws as f64, "n_draws");
        close(w.n_total as f64, "n_total");
        let lc =
            length_controlled_win_rate(&prefs, &lens("model_lengths"), &lens("baseline_lengths"))
                .unwrap();
        let want_lc = c["length_controlled_win_rate"].as_f64().unwrap();
        assert!(
            (lc - want_lc).abs() < 1e-4,
            "{name}: LC tsr {lc} vs scikit-learn {want_lc}"
        );
    }
}

/// Evaluations exported by tsr (`scripts/eval_golden.sh`: SmolLM2-135M against AlpacaEval
/// reference outputs, logprob and text verdicts) read by alpaca_eval: the win rate tsr reported
/// in the export's summary, and the one it computes now from the exported annotations, equal
/// what `get_winrate` computes on the file.
#[test]
fn exported_annotations_give_alpaca_evals_win_rate() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/eval");
    let golden: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("exports.json")).unwrap()).unwrap();
    let exports = golden["exports"].as_object().unwrap();
    assert!(exports.len() >= 2, "{exports:?}");
    let mut undecided_seen = false;
    for (path, want) in exports {
        let file = dir.join(path);
        let rows: Vec<tsr_steps::records::Annotation> =
            serde_json::from_slice(&std::fs::read(&file).unwrap()).unwrap();
        undecided_seen |= rows.iter().any(|r| r.preference.is_none());
        let mode = rows[0].mode.clone();
        let now = tsr_steps::rules::eval::summarize(
            &rows,
            tsr_state::Digest::of(b"judge"),
            &mode,
            "t",
            1,
            10,
        );
        let label = file
            .parent()
            .unwrap()
            .file_name()
            .unwrap()
            .to_str()
            .unwrap();
        let summaries: serde_json::Value = serde_json::from_slice(
            &std::fs::read(
                file.parent()
                    .unwrap()
                    .parent()
                    .unwrap()
                    .join("summary.json"),
            )
            .unwrap(),
        )
        .unwrap();
        let reported = summaries
            .as_array()
            .unwrap()
            .iter()
            .find(|s| s["model"] == label)
            .unwrap()["summary"]["win_rate"]
            .clone();
        if want["win_rate"].is_null() {
            // Every verdict undecided: alpaca_eval drops them all and has no win rate; neither
            // has tsr.
            assert!(now.win_rate.is_none() && reported.is_null(), "{path}");
            assert_eq!(now.undecided, rows.len());
            continue;
        }
        let reported: WinRate = serde_json::from_value(reported).unwrap();
        for (who, w) in [
            ("recomputed", now.win_rate.clone().unwrap()),
            ("reported", reported),
        ] {
            let close = |a: f64, k: &str| {
                let b = want[k].as_f64().unwrap();
                assert!(
                    (a - b).abs() < 1e-9,
                    "{path} ({who}): {k} tsr {a} vs alpaca_eval {b}"
                );
            };
            close(w.win_rate, "win_rate");
            close(w.discrete_win_rate, "discrete_win_rate");
            close(w.n_wins as f64, "n_wins");
            close(w.n_wins_base as f64, "n_wins_base");
            close(w.n_draws as f64, "n_draws");
            close(w.n_total as f64, "n_total");
            match (w.standard_error, want["standard_error"].as_f64()) {
                (Some(a), Some(b)) => assert!((a - b).abs() < 1e-9, "{path}: standard_error"),
                (None, None) => {}
                (a, b) => panic!("{path}: standard_error tsr {a:?} vs alpaca_eval {b:?}"),
            }
        }
    }
    assert!(
        undecided_seen,
        "the text-mode export should hold undecided prompts"
    );
}

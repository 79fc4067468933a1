//! tsr's evaluation metrics against the tools users check them with: AlpacaEval 0.6.6's
//! `get_winrate` and scikit-learn's logistic regression (`tests/fixtures/eval/winrate.json`,
//! made by `scripts/eval_golden.sh`).

use std::path::PathBuf;

use serde_json::Value;
use tsr_steps::eval_metrics::{length_controlled_win_rate, win_rate};

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

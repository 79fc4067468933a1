//! Evaluation metrics over pairwise preferences, computed as AlpacaEval computes them, so a
//! number tsr reports equals what `alpaca_eval` computes on the same annotations.
//!
//! A preference follows AlpacaEval's convention: 1 = the baseline's output is preferred, 2 = the
//! evaluated model's, 1.5 = a tie (0 also counts as a tie). Values outside [1, 2] (NaN: no
//! verdict) are dropped, as `alpaca_eval.metrics.get_winrate` drops them.
//!
//! - [`win_rate`]: `get_winrate`'s `win_rate` (mean of preference - 1, in percent),
//!   `standard_error`, counts, and `discrete_win_rate`.
//! - [`bootstrap_interval`]: a seeded percentile bootstrap of the win rate.
//! - [`length_controlled_win_rate`]: the minimal form of AlpacaEval 2.0's length control. Its
//!   GLM also fits a per-instruction difficulty learned from its own 805 instructions, which does
//!   not exist for other prompts; what remains is a logistic regression of the preference on
//!   `tanh(length difference / its standard deviation)`, read at a length difference of zero.
//! - [`exact_match`]: for prompts with a known numeric answer.

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

/// `alpaca_eval.metrics.get_winrate` on a list of preferences.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct WinRate {
    /// Mean of (preference - 1), in percent: wins count 1, ties 1/2.
    pub win_rate: f64,
    /// Standard error of that mean (sample standard deviation / sqrt(n)), in percent; `None`
    /// for a single preference (pandas gives NaN).
    pub standard_error: Option<f64>,
    pub n_wins: usize,
    pub n_wins_base: usize,
    pub n_draws: usize,
    pub n_total: usize,
    /// The win rate with every preference rounded to a win, loss or tie.
    pub discrete_win_rate: f64,
}

/// AlpacaEval's reading of one preference: 0 is a tie; anything outside [1, 2] is dropped.
fn normalise(p: f64) -> Option<f64> {
    let p = if p == 0.0 { 1.5 } else { p };
    (1.0..=2.0).contains(&p).then_some(p)
}

/// The win rate and its companions, as `get_winrate` reports them (`None` when no preference
/// is valid).
pub fn win_rate(preferences: &[f64]) -> Option<WinRate> {
    let valid: Vec<f64> = preferences.iter().filter_map(|&p| normalise(p)).collect();
    let n = valid.len();
    if n == 0 {
        return None;
    }
    let x: Vec<f64> = valid.iter().map(|p| p - 1.0).collect();
    let mean = x.iter().sum::<f64>() / n as f64;
    let sem = if n > 1 {
        let var = x.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / (n - 1) as f64;
        (var / n as f64).sqrt()
    } else {
        f64::NAN
    };
    // ZeroOneScoringRule: round each preference to 1, 1.5 or 2 (pandas rounds halves to even:
    // 1.5 stays a tie only when it is exactly 1.5).
    let discrete: Vec<f64> = valid
        .iter()
        .map(|&p| {
            if p == 1.5 {
                0.5
            } else if p > 1.5 {
                1.0
            } else {
                0.0
            }
        })
        .collect();
    Some(WinRate {
        win_rate: mean * 100.0,
        standard_error: sem.is_finite().then_some(sem * 100.0),
        n_wins: x.iter().filter(|&&v| v > 0.5).count(),
        n_wins_base: x.iter().filter(|&&v| v < 0.5).count(),
        n_draws: valid.iter().filter(|&&p| p == 1.5).count(),
        n_total: n,
        discrete_win_rate: discrete.iter().sum::<f64>() / n as f64 * 100.0,
    })
}

/// A 95% percentile bootstrap interval of the win rate: `resamples` resamples with
/// replacement drawn from a ChaCha8 generator seeded with `seed` (the same inputs and seed give
/// the same interval everywhere).
pub fn bootstrap_interval(preferences: &[f64], seed: u64, resamples: usize) -> Option<(f64, f64)> {
    let valid: Vec<f64> = preferences
        .iter()
        .filter_map(|&p| normalise(p))
        .map(|p| (p - 1.0) * 100.0)
        .collect();
    let n = valid.len();
    if n == 0 || resamples == 0 {
        return None;
    }
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut means: Vec<f64> = (0..resamples)
        .map(|_| (0..n).map(|_| valid[rng.gen_range(0..n)]).sum::<f64>() / n as f64)
        .collect();
    means.sort_by(f64::total_cmp);
    let at = |q: f64| {
        // Linear interpolation between order statistics (numpy's default percentile).
        let pos = q * (resamples - 1) as f64;
        let (lo, hi) = (pos.floor() as usize, pos.ceil() as usize);
        means[lo] + (means[hi] - means[lo]) * (pos - lo as f64)
    };
    Some((at(0.025), at(0.975)))
}

fn sigmoid(z: f64) -> f64 {
    1.0 / (1.0 + (-z).exp())
}

/// The length-controlled win rate in percent: fit `P(model preferred) = sigmoid(a + b x)` with
/// `x = tanh((len_model - len_baseline) / sd)` by maximum likelihood (ties count one half of
/// a win), then report `100 sigmoid(a)`: the win rate at equal lengths. `None` without a valid
/// preference. When every valid preference is the same, the fit has no finite optimum and the
/// result is that preference (0, 50 or 100).
pub fn length_controlled_win_rate(
    preferences: &[f64],
    model_lengths: &[usize],
    baseline_lengths: &[usize],
) -> Option<f64> {
    let mut y = Vec::new();
    let mut d = Vec::new();
    for ((&p, &lm), &lb) in preferences.iter().zip(model_lengths).zip(baseline_lengths) {
        if let Some(p) = normalise(p) {
            y.push(p - 1.0);
            d.push(lm as f64 - lb as f64);
        }
    }
    let n = y.len();
    if n == 0 {
        return None;
    }
    if y.iter().all(|v| *v == y[0]) && (y[0] == 0.0 || y[0] == 1.0) {
        return Some(y[0] * 100.0);
    }
    let mean_d = d.iter().sum::<f64>() / n as f64;
    let sd = if n > 1 {
        (d.iter().map(|v| (v - mean_d).powi(2)).sum::<f64>() / (n - 1) as f64).sqrt()
    } else {
        0.0
    };
    let x: Vec<f64> = d
        .iter()
        .map(|v| if sd > 0.0 { (v / sd).tanh() } else { 0.0 })
        .collect();
    // Newton's method on the mean cross-entropy (concave log-likelihood, two parameters).
    let (mut a, mut b) = (0.0f64, 0.0f64);
    for _ in 0..100 {
        let (mut ga, mut gb, mut haa, mut hab, mut hbb) = (0.0, 0.0, 0.0, 0.0, 0.0);
        for (xi, yi) in x.iter().zip(&y) {
            let p = sigmoid(a + b * xi);
            let w = p * (1.0 - p);
            ga += yi - p;
            gb += (yi - p) * xi;
            haa += w;
            hab += w * xi;
            hbb += w * xi * xi;
        }
        let det = haa * hbb - hab * hab;
        let (da, db) = if det.abs() > 1e-12 {
            ((hbb * ga - hab * gb) / det, (haa * gb - hab * ga) / det)
        } else if haa > 1e-12 {
            // x carries no information (equal lengths): fit the intercept alone.
            (ga / haa, 0.0)
        } else {
            break;
        };
        a += da;
        b += db;
        if da.abs() < 1e-12 && db.abs() < 1e-12 {
            break;
        }
    }
    Some(sigmoid(a) * 100.0)
}

/// The number a text states as its answer: the text after the last `####` if there is one,
/// else the last number in the text. Thousands separators (`1,234`) are read as one number.
pub fn final_number(text: &str) -> Option<f64> {
    let tail = match text.rfind("####") {
        Some(i) => &text[i + 4..],
        None => text,
    };
    let numbers = numbers_in(tail);
    if text.contains("####") {
        numbers.first().copied()
    } else {
        numbers.last().copied()
    }
}

fn numbers_in(text: &str) -> Vec<f64> {
    let b = text.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < b.len() {
        let neg = b[i] == b'-' && i + 1 < b.len() && b[i + 1].is_ascii_digit();
        if b[i].is_ascii_digit() || neg {
            let start = i;
            i += neg as usize;
            let mut s = String::new();
            if neg {
                s.push('-');
            }
            while i < b.len() {
                let c = b[i];
                let digit_follows = i + 1 < b.len() && b[i + 1].is_ascii_digit();
                if c.is_ascii_digit() {
                    s.push(c as char);
                } else if c == b',' && digit_follows && !s.contains('.') {
                    // a thousands separator
                } else if c == b'.' && digit_follows && !s.contains('.') {
                    s.push('.');
                } else {
                    break;
                }
                i += 1;
            }
            if let Ok(v) = s.parse::<f64>() {
                out.push(v);
            }
            if i == start {
                i += 1;
            }
        } else {
            i += 1;
        }
    }
    out
}

/// Whether `response` states `answer` (both read with [`final_number`], compared numerically);
/// `None` when the answer itself holds no number.
pub fn exact_match(response: &str, answer: &str) -> Option<bool> {
    let want = final_number(answer)?;
    Some(final_number(response).is_some_and(|got| (got - want).abs() <= 1e-9 * want.abs().max(1.0)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_are_read_like_gsm8k() {
        assert_eq!(final_number("so 3 + 4 = 7.\n#### 7"), Some(7.0));
        assert_eq!(final_number("It costs $1,234.50 in total."), Some(1234.5));
        assert_eq!(final_number("from -3 to 12"), Some(12.0));
        assert_eq!(final_number("#### -3, then 5"), Some(-3.0));
        assert_eq!(final_number("no number"), None);
        assert_eq!(exact_match("The answer is 42.", "#### 42"), Some(true));
        assert_eq!(exact_match("The answer is 41.", "42"), Some(false));
        assert_eq!(exact_match("anything", "none"), None);
    }

    #[test]
    fn degenerate_inputs() {
        assert_eq!(win_rate(&[]), None);
        assert_eq!(win_rate(&[f64::NAN]), None);
        assert_eq!(
            length_controlled_win_rate(&[2.0, 2.0], &[5, 9], &[3, 3]),
            Some(100.0)
        );
        // Equal lengths: the length term is zero and the result is the plain win rate.
        let lc = length_controlled_win_rate(&[2.0, 1.0, 1.5, 2.0], &[5; 4], &[5; 4]).unwrap();
        assert!((lc - 62.5).abs() < 1e-9, "{lc}");
        let a = bootstrap_interval(&[1.0, 2.0, 2.0, 1.5], 7, 500).unwrap();
        assert_eq!(
            a,
            bootstrap_interval(&[1.0, 2.0, 2.0, 1.5], 7, 500).unwrap()
        );
        assert!(a.0 <= 62.5 && 62.5 <= a.1, "{a:?}");
    }
}

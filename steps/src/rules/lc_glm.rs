//! AlpacaEval 2.0's length-controlled win rate, as `alpaca_eval.metrics.get_length_controlled_winrate`
//! computes it with its default GLM `length_controlled_v1` (alpaca_eval 0.6.6):
//!
//! - each annotation's features are `tanh(std_delta_len)`, the instruction's difficulty and
//!   `not_gamed_baseline` (1 for the evaluated model), without an intercept. `std_delta_len` is
//!   (baseline length - model length in characters) over its sample standard deviation across
//!   the evaluation; the difficulty is looked up by the annotation's position among AlpacaEval's
//!   805 instructions;
//! - the fit adds the annotations of the two gamed models from `df_gamed.csv` (their own
//!   features, `not_gamed_baseline` = 0) with weight `0.2 / 2` each (the regularisation toward
//!   the gamed baselines); annotations without a preference are left out of the fit;
//! - a preference `p` in [1, 2] (0 read as 1.5) enters as the soft label `p - 1`: the row once as
//!   a win with weight `p - 1` and once as a loss with weight `2 - p`;
//! - the model is an L1-penalised logistic regression (liblinear's objective
//!   `||w||_1 + C sum weight * loss`). C is chosen among `logspace(-4, 4, 10)` by 5-fold
//!   validation with scikit-learn's `GroupKFold` (each row one group), scoring the weighted
//!   soft log loss; the best total over folds wins (the first on a tie), and the model is refit
//!   on every row with it;
//! - the length-controlled win rate is the mean over every annotation (with or without a
//!   preference) of the predicted preference at no length difference, in percent, with its
//!   standard error.
//!
//! The fits are solved to a tighter tolerance than liblinear's (1e-4), so the weights differ from
//! scikit-learn's in their last digits; the win rate agrees within a hundredth of a point on
//! the goldens (`scripts/lc_golden.py`).

use serde::{Deserialize, Serialize};

/// The GLM this module reproduces.
pub const GLM_NAME: &str = "length_controlled_v1";
/// Weight of the gamed models' annotations relative to the evaluated model's, per gamed model
/// (alpaca_eval: `regularize_to_baseline_lambda / 2`, two gamed baselines).
const GAMED_WEIGHT: f64 = 0.2 / 2.0;
const N_SPLITS: usize = 5;
const N_CS: usize = 10;

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum LcError {
    #[error("{file}: {reason}")]
    Data { file: String, reason: String },
    #[error("the length-controlled win rate needs one annotation per instruction of AlpacaEval's {expected}, found {found}")]
    Count { expected: usize, found: usize },
    #[error("every output pair has the same length difference, so the length term is undefined (alpaca_eval divides by its standard deviation, 0)")]
    NoLengthSpread,
}

/// One annotation of a gamed model, as `df_gamed.csv` holds it.
#[derive(Clone, Debug, PartialEq)]
pub struct GamedRow {
    pub index: usize,
    /// In [0, 1] (1 = the gamed model preferred); `None` when missing.
    pub preference: Option<f64>,
    pub std_delta_len: f64,
    pub instruction_difficulty: f64,
    pub not_gamed_baseline: bool,
}

/// AlpacaEval's length-control data: the gamed models' annotations and each instruction's
/// difficulty (by position among the 805).
#[derive(Clone, Debug, PartialEq)]
pub struct LcData {
    pub gamed: Vec<GamedRow>,
    pub difficulty: Vec<f64>,
}

/// One annotation of the evaluated model, at its instruction's position.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct LcRow {
    /// AlpacaEval's convention: 1 = the baseline preferred, 2 = the model; `None` undecided.
    pub preference: Option<f64>,
    pub model_chars: usize,
    pub baseline_chars: usize,
}

/// The result, with what the fit chose.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct LcResult {
    /// `length_controlled_v1`.
    pub glm: String,
    /// In percent.
    pub length_controlled_winrate: f64,
    /// In percent; `None` for a single annotation.
    pub lc_standard_error: Option<f64>,
    /// The C the validation chose (`None` when the model is its own baseline: no fit).
    pub c: Option<f64>,
    /// Weights of `tanh(std_delta_len)`, `instruction_difficulty`, `not_gamed_baseline`.
    pub weights: [f64; 3],
    /// Annotations in the fit (with a preference) and gamed rows in it.
    pub fitted_rows: usize,
    pub gamed_rows: usize,
}

/// Splits CSV text (RFC 4180: quoted fields, doubled quotes, CRLF) into records.
fn csv_records(text: &str) -> Result<Vec<Vec<String>>, String> {
    let mut records = Vec::new();
    let mut record = Vec::new();
    let mut field = String::new();
    let mut chars = text.chars().peekable();
    let mut quoted = false;
    let mut line = 1;
    while let Some(c) = chars.next() {
        if quoted {
            match c {
                '"' if chars.peek() == Some(&'"') => {
                    chars.next();
                    field.push('"');
                }
                '"' => quoted = false,
                '\n' => {
                    line += 1;
                    field.push(c);
                }
                _ => field.push(c),
            }
            continue;
        }
        match c {
            '"' if field.is_empty() => quoted = true,
            ',' => record.push(std::mem::take(&mut field)),
            '\r' if chars.peek() == Some(&'\n') => {}
            '\n' => {
                record.push(std::mem::take(&mut field));
                records.push(std::mem::take(&mut record));
                line += 1;
            }
            _ => field.push(c),
        }
    }
    if quoted {
        return Err(format!("a quoted field opened by line {line} never closes"));
    }
    if !field.is_empty() || !record.is_empty() {
        record.push(field);
        records.push(record);
    }
    records.retain(|r| !(r.len() == 1 && r[0].is_empty()));
    Ok(records)
}

/// Reads `df_gamed.csv` (columns `index`, `preference`, `std_delta_len`,
/// `instruction_difficulty`, `not_gamed_baseline`; others such as `model` are ignored).
///
/// alpaca_eval looks an instruction's difficulty up by row label among the first occurrence of
/// each index, which is the instruction's position only when the file begins with one model's
/// rows in index order, as AlpacaEval's does: anything else is refused rather than read
/// differently.
pub fn parse_gamed(bytes: &[u8], file: &str) -> Result<LcData, LcError> {
    let bad = |reason: String| LcError::Data {
        file: file.to_string(),
        reason,
    };
    let text = std::str::from_utf8(bytes).map_err(|_| bad("not UTF-8 text".into()))?;
    let records = csv_records(text).map_err(bad)?;
    let Some((header, rows)) = records.split_first() else {
        return Err(bad("the file is empty".into()));
    };
    let col = |name: &str| {
        header.iter().position(|h| h == name).ok_or_else(|| {
            bad(format!(
                "no `{name}` column (found {}); this is not AlpacaEval's df_gamed.csv",
                header.join(", ")
            ))
        })
    };
    let (ci, cp, cs, cd, cn) = (
        col("index")?,
        col("preference")?,
        col("std_delta_len")?,
        col("instruction_difficulty")?,
        col("not_gamed_baseline")?,
    );
    let mut gamed = Vec::with_capacity(rows.len());
    for (r, row) in rows.iter().enumerate() {
        let line = r + 2;
        if row.len() != header.len() {
            return Err(bad(format!(
                "line {line} has {} fields, the header {}",
                row.len(),
                header.len()
            )));
        }
        let number = |c: usize, what: &str| -> Result<f64, LcError> {
            let v = row[c].trim();
            v.parse::<f64>()
                .ok()
                .filter(|x| x.is_finite())
                .ok_or_else(|| {
                    bad(format!(
                        "line {line}: `{what}` is `{v}`, not a finite number"
                    ))
                })
        };
        let index = row[ci].trim().parse::<usize>().map_err(|_| {
            bad(format!(
                "line {line}: `index` is `{}`, not a position",
                row[ci]
            ))
        })?;
        let preference = match row[cp].trim() {
            "" | "nan" | "NaN" => None,
            _ => {
                let p = number(cp, "preference")?;
                if !(0.0..=1.0).contains(&p) {
                    return Err(bad(format!(
                        "line {line}: `preference` {p} is outside [0, 1]"
                    )));
                }
                Some(p)
            }
        };
        let not_gamed_baseline = match row[cn].trim() {
            "True" | "true" | "1" => true,
            "False" | "false" | "0" => false,
            v => {
                return Err(bad(format!(
                    "line {line}: `not_gamed_baseline` is `{v}`, not True or False"
                )))
            }
        };
        gamed.push(GamedRow {
            index,
            preference,
            std_delta_len: number(cs, "std_delta_len")?,
            instruction_difficulty: number(cd, "instruction_difficulty")?,
            not_gamed_baseline,
        });
    }
    // The difficulty of each position, from the rows that alpaca_eval reads it from.
    let mut difficulty: Vec<Option<f64>> = Vec::new();
    for (r, g) in gamed.iter().enumerate() {
        if g.index >= difficulty.len() {
            difficulty.resize(g.index + 1, None);
        }
        match difficulty[g.index] {
            None => {
                if g.index != r {
                    return Err(bad(format!(
                        "line {}: instruction {} first appears on row {r}; AlpacaEval's file begins with one model's rows in index order",
                        r + 2,
                        g.index
                    )));
                }
                difficulty[g.index] = Some(g.instruction_difficulty);
            }
            Some(d) if d != g.instruction_difficulty => {
                return Err(bad(format!(
                    "line {}: instruction {} has difficulty {} here and {d} on its first row",
                    r + 2,
                    g.index,
                    g.instruction_difficulty
                )))
            }
            Some(_) => {}
        }
    }
    let difficulty: Vec<f64> = difficulty
        .into_iter()
        .map(|d| d.expect("positions are dense"))
        .collect();
    if difficulty.is_empty() {
        return Err(bad("the file has no rows".into()));
    }
    Ok(LcData { gamed, difficulty })
}

fn sigmoid(z: f64) -> f64 {
    // alpaca_eval's `_logistic`: exp(-logaddexp(0, -z)).
    (-softplus(-z)).exp()
}

/// ln(1 + e^z), without overflow.
fn softplus(z: f64) -> f64 {
    z.max(0.0) + (-z.abs()).exp().ln_1p()
}

/// A training row: features, soft label, weight.
#[derive(Clone, Copy)]
struct Obs {
    x: [f64; 3],
    y: f64,
    w: f64,
}

fn dot(a: &[f64; 3], b: &[f64; 3]) -> f64 {
    a[0] * b[0] + a[1] * b[1] + a[2] * b[2]
}

fn l1(w: &[f64; 3]) -> f64 {
    w.iter().map(|v| v.abs()).sum()
}

/// `||w||_1 + c * sum weight * (y softplus(-z) + (1 - y) softplus(z))`, `z = w . x`.
fn objective(rows: &[&Obs], c: f64, w: &[f64; 3]) -> f64 {
    let loss: f64 = rows
        .iter()
        .map(|o| {
            let z = dot(w, &o.x);
            o.w * (o.y * softplus(-z) + (1.0 - o.y) * softplus(z))
        })
        .sum();
    l1(w) + c * loss
}

/// Minimises [`objective`] by proximal Newton steps (the quadratic model solved by coordinate
/// descent, then a backtracking line search), to a minimum-norm subgradient far below
/// liblinear's stopping point.
fn fit_l1(rows: &[&Obs], c: f64) -> [f64; 3] {
    let mut w = [0.0f64; 3];
    let mut first_norm = None;
    for _ in 0..200 {
        let mut g = [0.0f64; 3];
        let mut h = [[0.0f64; 3]; 3];
        for o in rows {
            let p = sigmoid(dot(&w, &o.x));
            let r = c * o.w * (p - o.y);
            let s = c * o.w * p * (1.0 - p);
            for (j, (gj, hj)) in g.iter_mut().zip(h.iter_mut()).enumerate() {
                *gj += r * o.x[j];
                for (hjk, xk) in hj.iter_mut().zip(&o.x) {
                    *hjk += s * o.x[j] * xk;
                }
            }
        }
        // Minimum-norm subgradient of the whole objective.
        let sub: f64 = (0..3)
            .map(|j| {
                if w[j] != 0.0 {
                    (g[j] + w[j].signum()).abs()
                } else {
                    (g[j].abs() - 1.0).max(0.0)
                }
            })
            .fold(0.0, f64::max);
        let scale = *first_norm.get_or_insert(sub.max(1.0));
        if sub <= 1e-11 * scale {
            break;
        }
        let ridge = 1e-12 * (h[0][0] + h[1][1] + h[2][2]).max(1e-300);
        // The direction: min g.d + d'Hd/2 + ||w + d||_1 by coordinate descent.
        let mut d = [0.0f64; 3];
        for _ in 0..10_000 {
            let mut moved = 0.0f64;
            for j in 0..3 {
                let a = h[j][j] + ridge;
                let hd: f64 = (0..3).map(|k| h[j][k] * d[k]).sum();
                let cj = g[j] + hd - h[j][j] * d[j];
                let z = w[j] - cj / a;
                let u = z.signum() * (z.abs() - 1.0 / a).max(0.0);
                let dj = u - w[j];
                moved = moved.max((dj - d[j]).abs());
                d[j] = dj;
            }
            if moved <= 1e-15 * (1.0 + l1(&w)) {
                break;
            }
        }
        let new_l1 = l1(&[w[0] + d[0], w[1] + d[1], w[2] + d[2]]);
        let delta = dot(&g, &d) + new_l1 - l1(&w);
        if delta >= 0.0 {
            break;
        }
        let f0 = objective(rows, c, &w);
        let mut t = 1.0;
        let mut stepped = false;
        for _ in 0..60 {
            let cand = [w[0] + t * d[0], w[1] + t * d[1], w[2] + t * d[2]];
            if objective(rows, c, &cand) <= f0 + 0.01 * t * delta {
                w = cand;
                stepped = true;
                break;
            }
            t *= 0.5;
        }
        if !stepped {
            break;
        }
    }
    w
}

/// `numpy.logspace(-4, 4, 10)`: scikit-learn's default grid of C.
fn cs() -> [f64; N_CS] {
    let step = 8.0 / (N_CS - 1) as f64;
    std::array::from_fn(|k| {
        let y = if k == N_CS - 1 {
            4.0
        } else {
            k as f64 * step - 4.0
        };
        10f64.powf(y)
    })
}

/// The weighted soft log loss of alpaca_eval's scorer on one fold (the mean over its rows,
/// predictions clipped to [1e-15, 1 - 1e-15]).
fn fold_loss(rows: &[&Obs], w: &[f64; 3]) -> f64 {
    let eps = 1e-15;
    let total: f64 = rows
        .iter()
        .map(|o| {
            let q = sigmoid(dot(w, &o.x)).clamp(eps, 1.0 - eps);
            -o.w * (o.y * q.ln() + (1.0 - o.y) * (1.0 - q).ln())
        })
        .sum();
    total / rows.len() as f64
}

/// AlpacaEval 2.0's length-controlled win rate of `rows`, given in the order of AlpacaEval's
/// instructions (row `i` is instruction `i`). `same_generator`: the model is its own baseline
/// (alpaca_eval then gives 50 by construction).
pub fn length_controlled_v1(
    data: &LcData,
    rows: &[LcRow],
    same_generator: bool,
) -> Result<LcResult, LcError> {
    if rows.len() != data.difficulty.len() {
        return Err(LcError::Count {
            expected: data.difficulty.len(),
            found: rows.len(),
        });
    }
    let n = rows.len();
    if same_generator {
        return Ok(LcResult {
            glm: GLM_NAME.into(),
            length_controlled_winrate: 50.0,
            lc_standard_error: (n > 1).then_some(0.0),
            c: None,
            weights: [0.0; 3],
            fitted_rows: 0,
            gamed_rows: 0,
        });
    }
    let delta: Vec<f64> = rows
        .iter()
        .map(|r| r.baseline_chars as f64 - r.model_chars as f64)
        .collect();
    let mean = delta.iter().sum::<f64>() / n as f64;
    let sd = if n > 1 {
        (delta.iter().map(|d| (d - mean).powi(2)).sum::<f64>() / (n - 1) as f64).sqrt()
    } else {
        0.0
    };
    if sd.is_nan() || sd <= 0.0 {
        return Err(LcError::NoLengthSpread);
    }
    let mut train: Vec<Obs> = Vec::new();
    for g in &data.gamed {
        if let Some(p) = g.preference {
            train.push(Obs {
                x: [
                    g.std_delta_len.tanh(),
                    g.instruction_difficulty,
                    if g.not_gamed_baseline { 1.0 } else { 0.0 },
                ],
                y: p,
                w: if g.not_gamed_baseline {
                    1.0
                } else {
                    GAMED_WEIGHT
                },
            });
        }
    }
    let gamed_rows = train.len();
    for (i, r) in rows.iter().enumerate() {
        if let Some(p) = r.preference.filter(|p| !p.is_nan()) {
            let p = if p == 0.0 { 1.5 } else { p };
            train.push(Obs {
                x: [(delta[i] / sd).tanh(), data.difficulty[i], 1.0],
                y: p - 1.0,
                w: 1.0,
            });
        }
    }
    let m = train.len();
    // GroupKFold, one group per row: the groups go, last first, to the fold with the fewest rows.
    let fold = |j: usize| (m - 1 - j) % N_SPLITS;
    let grid = cs();
    let mut totals = [0.0f64; N_CS];
    for f in 0..N_SPLITS {
        let fit_rows: Vec<&Obs> = (0..m)
            .filter(|&j| fold(j) != f)
            .map(|j| &train[j])
            .collect();
        let test_rows: Vec<&Obs> = (0..m)
            .filter(|&j| fold(j) == f)
            .map(|j| &train[j])
            .collect();
        for (k, &c) in grid.iter().enumerate() {
            let w = fit_l1(&fit_rows, c);
            totals[k] -= fold_loss(&test_rows, &w);
        }
    }
    let best = (0..N_CS).fold(0, |b, k| if totals[k] > totals[b] { k } else { b });
    let all: Vec<&Obs> = train.iter().collect();
    let w = fit_l1(&all, grid[best]);
    let predicted: Vec<f64> = data
        .difficulty
        .iter()
        .map(|d| sigmoid(w[1] * d + w[2]))
        .collect();
    let mean_p = predicted.iter().sum::<f64>() / n as f64;
    let se = (n > 1).then(|| {
        let var = predicted.iter().map(|p| (p - mean_p).powi(2)).sum::<f64>() / (n - 1) as f64;
        (var / n as f64).sqrt() * 100.0
    });
    Ok(LcResult {
        glm: GLM_NAME.into(),
        length_controlled_winrate: mean_p * 100.0,
        lc_standard_error: se,
        c: Some(grid[best]),
        weights: w,
        fitted_rows: m - gamed_rows,
        gamed_rows,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn csv_reads_quotes_and_line_ends() {
        let r = csv_records("a,b\r\n\"x, y\",\"say \"\"hi\"\"\"\n1,\n").unwrap();
        assert_eq!(
            r,
            vec![
                vec!["a".to_string(), "b".into()],
                vec!["x, y".into(), "say \"hi\"".into()],
                vec!["1".into(), "".into()]
            ]
        );
        assert!(csv_records("a,\"b\n").is_err());
    }

    #[test]
    fn the_grid_is_numpys() {
        let g = cs();
        assert_eq!(g[0], 1e-4);
        assert_eq!(g[9], 1e4);
        assert!((g[6] - 21.544346900318846).abs() < 1e-12, "{}", g[6]);
    }

    fn data() -> LcData {
        let mut gamed = Vec::new();
        for model in 0..2 {
            for i in 0..6 {
                gamed.push(GamedRow {
                    index: i,
                    preference: Some(if (i + model) % 2 == 0 { 0.8 } else { 0.3 }),
                    std_delta_len: i as f64 / 3.0 - 1.0 + model as f64,
                    instruction_difficulty: i as f64 / 5.0,
                    not_gamed_baseline: false,
                });
            }
        }
        LcData {
            difficulty: (0..6).map(|i| i as f64 / 5.0).collect(),
            gamed,
        }
    }

    #[test]
    fn refusals_name_the_problem() {
        let d = data();
        let row = LcRow {
            preference: Some(2.0),
            model_chars: 10,
            baseline_chars: 10,
        };
        assert_eq!(
            length_controlled_v1(&d, &[row; 5], false),
            Err(LcError::Count {
                expected: 6,
                found: 5
            })
        );
        assert_eq!(
            length_controlled_v1(&d, &[row; 6], false),
            Err(LcError::NoLengthSpread)
        );
        let same = length_controlled_v1(&d, &[row; 6], true).unwrap();
        assert_eq!(same.length_controlled_winrate, 50.0);
        // It travels as JSON and back (no NaN in it).
        let back: LcResult = serde_json::from_slice(&serde_json::to_vec(&same).unwrap()).unwrap();
        assert_eq!(back, same);
    }

    #[test]
    fn gamed_files_are_checked() {
        let head =
            "index,model,preference,std_delta_len,instruction_difficulty,not_gamed_baseline\n";
        let ok =
            format!("{head}0,a,0.5,0.1,0.3,False\n1,a,,0.2,0.4,False\n0,b,1.0,-0.1,0.3,False\n");
        let d = parse_gamed(ok.as_bytes(), "g.csv").unwrap();
        assert_eq!(d.difficulty, vec![0.3, 0.4]);
        assert_eq!(d.gamed[1].preference, None);
        let cases = [
            (
                format!("{head}1,a,0.5,0.1,0.3,False\n0,a,0.5,0.1,0.3,False\n"),
                "first appears on row 0",
            ),
            (
                format!("{head}0,a,0.5,0.1,0.3,False\n0,b,0.5,0.1,0.9,False\n"),
                "has difficulty 0.9 here",
            ),
            (format!("{head}0,a,1.5,0.1,0.3,False\n"), "outside [0, 1]"),
            (
                format!("{head}0,a,0.5,,0.3,False\n"),
                "`std_delta_len` is ``",
            ),
            (
                format!("{head}0,a,0.5,0.1,0.3,maybe\n"),
                "not True or False",
            ),
            ("index,model\n0,a\n".to_string(), "no `preference` column"),
        ];
        for (text, want) in cases {
            let err = parse_gamed(text.as_bytes(), "g.csv")
                .unwrap_err()
                .to_string();
            assert!(err.starts_with("g.csv: ") && err.contains(want), "{err}");
        }
    }

    #[test]
    fn the_fit_reaches_the_l1_optimum() {
        // At the optimum, each non-zero weight's gradient is -sign(w) and each zero weight's is
        // within [-1, 1]: check by perturbing each coordinate.
        let obs: Vec<Obs> = (0..40)
            .map(|i| {
                let t = i as f64 / 40.0;
                Obs {
                    x: [(3.0 * t - 1.0).tanh(), (7.0 * t).sin(), 1.0],
                    y: (0.3 + 0.5 * t).min(1.0),
                    w: if i % 3 == 0 { 0.1 } else { 1.0 },
                }
            })
            .collect();
        let rows: Vec<&Obs> = obs.iter().collect();
        for c in cs() {
            let w = fit_l1(&rows, c);
            let f = objective(&rows, c, &w);
            for j in 0..3 {
                for h in [1e-6, -1e-6] {
                    let mut v = w;
                    v[j] += h;
                    assert!(
                        objective(&rows, c, &v) >= f - 1e-12 * f.abs().max(1.0),
                        "C {c}, w {w:?}, j {j}"
                    );
                }
            }
        }
    }
}

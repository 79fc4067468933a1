#!/usr/bin/env python3
"""Reference numbers for tsr's evaluation metrics (`steps/src/eval_metrics.rs`), from the tools a
user would check them with: `alpaca_eval.metrics.get_winrate` (AlpacaEval 0.6.6) for the win
rate and its companions, scikit-learn's unpenalised LogisticRegression for the minimal
length-controlled win rate (ties enter as half a win: each row once as a win with weight p and
once as a loss with weight 1 - p).

It also reads evaluation exports written by tsr (`tsr eval ... --out DIR`, copied to
tests/fixtures/eval/export-*/) the way AlpacaEval reads annotation files, and records what
`get_winrate` computes on each `annotations.json`: tsr's reported win rate must equal it.

Run: scripts/eval_golden.sh (creates the pinned environment and the exports), which writes
tests/fixtures/eval/winrate.json and tests/fixtures/eval/exports.json. CI reads those files; it
never installs these packages.
"""

import glob
import os

import json
import sys

import numpy as np
from alpaca_eval.metrics import get_winrate
from sklearn.linear_model import LogisticRegression


def case(name, prefs, len_model, len_base):
    ann = [{"preference": p} for p in prefs]
    wr = get_winrate(ann)
    valid = [(p, m, b) for p, m, b in zip(prefs, len_model, len_base) if p is not None and not np.isnan(p)]
    valid = [(1.5 if p == 0 else p, m, b) for p, m, b in valid]
    valid = [(p, m, b) for p, m, b in valid if 1 <= p <= 2]
    y = np.array([p - 1 for p, _, _ in valid])
    d = np.array([m - b for _, m, b in valid], dtype=float)
    sd = d.std(ddof=1) if len(d) > 1 else 0.0
    x = np.tanh(d / sd) if sd > 0 else np.zeros_like(d)
    X = np.concatenate([x, x])[:, None]
    Y = np.concatenate([np.ones_like(y), np.zeros_like(y)])
    W = np.concatenate([y, 1 - y])
    lr = LogisticRegression(C=np.inf, tol=1e-12, max_iter=10000).fit(X, Y, sample_weight=W)
    lc = float(1 / (1 + np.exp(-lr.intercept_[0])) * 100)
    return {
        "name": name,
        "preferences": [None if (p is None or np.isnan(p)) else p for p in prefs],
        "model_lengths": len_model,
        "baseline_lengths": len_base,
        "get_winrate": {k: float(v) for k, v in wr.items()},
        "length_controlled_win_rate": lc,
    }


def main(out):
    rng = np.random.default_rng(20261129)
    cases = []
    n = 40
    prefs = rng.choice([1.0, 1.5, 2.0], size=n, p=[0.35, 0.2, 0.45]).tolist()
    lm = rng.integers(20, 400, size=n).tolist()
    lb = rng.integers(20, 400, size=n).tolist()
    cases.append(case("wins, losses and ties", prefs, lm, lb))
    # Longer answers win more often: the length-controlled rate is lower than the raw one.
    shift = rng.normal(0, 60, size=n)
    lm2 = [int(max(1, b + s + (60 if p == 2.0 else -20))) for p, b, s in zip(prefs, lb, shift)]
    cases.append(case("length-biased", prefs, lm2, lb))
    cases.append(case("zero ties and a missing verdict", [2.0, 0, 1.0, float("nan"), 2.0, 1.5, 1.0, 2.0],
                      [50, 60, 70, 80, 90, 100, 30, 200], [40, 90, 50, 80, 60, 120, 60, 100]))
    cases.append(case("fractional preferences", [1.2, 1.7, 1.9, 1.5, 1.05, 1.95],
                      [10, 20, 30, 40, 50, 60], [30, 10, 40, 10, 60, 20]))
    with open(out, "w") as f:
        json.dump({"alpaca_eval": "0.6.6", "cases": cases}, f, indent=1, sort_keys=True)
        f.write("\n")


def exports(out, dirs):
    from alpaca_eval.utils import load_or_convert_to_dataframe

    result = {}
    for d in dirs:
        for path in sorted(glob.glob(os.path.join(d, "*", "annotations.json"))):
            df = load_or_convert_to_dataframe(path)
            wr = get_winrate(df)
            key = os.path.relpath(path, os.path.dirname(out))
            result[key] = {k: (None if np.isnan(float(v)) else float(v)) for k, v in wr.items()}
    with open(out, "w") as f:
        json.dump({"alpaca_eval": "0.6.6", "exports": result}, f, indent=1, sort_keys=True)
        f.write("\n")


if __name__ == "__main__":
    main(sys.argv[1])
    if len(sys.argv) > 3:
        exports(sys.argv[2], sys.argv[3:])

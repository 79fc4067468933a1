#!/usr/bin/env python3
"""Reference numbers for tsr's AlpacaEval 2.0 length-controlled win rate
(`steps/src/rules/lc_glm.rs`), from alpaca_eval 0.6.6's own `get_length_controlled_winrate`
(its default GLM `length_controlled_v1`: length term, instruction difficulty, regularisation
toward the gamed models, L1 logistic regression with C chosen by grouped 5-fold validation).

alpaca_eval downloads `df_gamed.csv` (the gamed models' annotations, with each instruction's
difficulty) from the model hub, which these machines cannot reach. This script writes
synthetic files of the same schema instead, 805 instructions, and points alpaca_eval at them
by replacing its `hf_hub_download` with a lookup in that folder:

  tests/fixtures/eval/lc/df_gamed.csv                    two gamed models x 805 rows
  tests/fixtures/eval/lc/instruction_difficulty.csv      805 rows
  tests/fixtures/eval/lc/alpaca_eval_gpt4_baseline.json  805 instructions with reference outputs
  tests/fixtures/eval/lc/cases.json                      annotations (preference, lengths) and
                                                         what alpaca_eval computes on them

With a second folder and a reference outputs file, it also writes a small length-control folder
for that file's instructions (synthetic gamed annotations), which scripts/eval_golden.sh uses
for a real evaluation through an API judge.

Run: scripts/eval_golden.sh (the pinned environment). CI reads the files; it never installs
these packages.
"""

import json
import os
import sys
import warnings

import numpy as np
import pandas as pd

warnings.filterwarnings("ignore", category=FutureWarning)

import alpaca_eval.metrics.glm_winrate as glm  # noqa: E402
from alpaca_eval.metrics import get_length_controlled_winrate  # noqa: E402

N = 805
GAMED = ["gpt4_1106_preview_verbose", "gpt4_1106_preview_concise"]


def logistic(x):
    return 1 / (1 + np.exp(-x))


def soft(rng, logit, noise=0.7):
    """A soft preference in [0, 1] like the annotator's: a noisy probability."""
    return np.clip(logistic(logit + rng.normal(0, noise, size=len(logit))), 0, 1)


def write_gamed(folder, rng, n, spread=1.1, noise=0.7):
    """df_gamed.csv and instruction_difficulty.csv for n instructions."""
    difficulty = rng.normal(0, spread, size=n)
    rows = []
    for model, longer in zip(GAMED, [1.0, -1.0]):
        len_base = rng.integers(200, 2500, size=n)
        len_model = np.maximum(1, (len_base * np.exp(longer * 0.6 + rng.normal(0, 0.3, size=n)))).astype(int)
        delta = (len_base - len_model).astype(float)
        std_delta = delta / delta.std(ddof=1)
        pref = soft(rng, -0.9 * np.tanh(std_delta) - difficulty + 0.2 * longer, noise)
        pref[rng.choice(n, size=max(1, n // 160), replace=False)] = np.nan
        for i in range(n):
            rows.append(
                {
                    "index": i,
                    "model": model,
                    "preference": pref[i],
                    "std_delta_len": std_delta[i],
                    "instruction_difficulty": difficulty[i],
                    "not_gamed_baseline": False,
                }
            )
    pd.DataFrame(rows).to_csv(os.path.join(folder, "df_gamed.csv"), index=False)
    pd.DataFrame({"instruction_difficulty": difficulty}).rename_axis("index").to_csv(
        os.path.join(folder, "instruction_difficulty.csv")
    )
    return difficulty


def write_data(folder, rng):
    difficulty = write_gamed(folder, rng, N)
    # AlpacaEval's 805 instructions with the GPT-4 Turbo reference outputs: synthetic texts,
    # non-ASCII included.
    words = ["Explain", "the", "difference", "between", "naïve", "Bayes", "and", "日本語", "🙂", "trees"]
    baseline = []
    for i in range(N):
        k = rng.integers(3, 9)
        instruction = f"Task {i}: " + " ".join(rng.choice(words, size=k))
        baseline.append(
            {
                "dataset": "synthetic",
                "instruction": instruction,
                "output": f"Reference answer to task {i}.",
                "generator": "gpt4_1106_preview",
            }
        )
    with open(os.path.join(folder, "alpaca_eval_gpt4_baseline.json"), "w") as f:
        json.dump(baseline, f, indent=1, ensure_ascii=False)
        f.write("\n")
    return difficulty, baseline


def case(name, rng, difficulty, baseline, length_effect, skill, nan=0, ties=0):
    len_base = rng.integers(50, 2000, size=N)
    len_model = np.maximum(1, (len_base * np.exp(length_effect + rng.normal(0, 0.5, size=N)))).astype(int)
    delta = (len_base - len_model).astype(float)
    logit = skill - difficulty - 1.2 * np.tanh(delta / delta.std(ddof=1))
    pref = 1 + soft(rng, logit)
    pref[rng.choice(N, size=nan, replace=False)] = np.nan
    tie_rows = rng.choice(N, size=ties, replace=False)
    pref[tie_rows] = 1.5
    annotations = []
    for i, b in enumerate(baseline):
        annotations.append(
            {
                "instruction": b["instruction"],
                "output_1": "b" * int(len_base[i]),
                "generator_1": "gpt4_1106_preview",
                "output_2": "m" * int(len_model[i]),
                "generator_2": "model",
                "annotator": "weighted_alpaca_eval_gpt4_turbo",
                "preference": None if np.isnan(pref[i]) else float(pref[i]),
            }
        )
    metrics = get_length_controlled_winrate(annotations, save_weights_dir=None, is_warn_extreme_changes=False)
    # The fit itself, as get_length_controlled_winrate makes it: the C the validation chose and
    # the weights (for reading a difference, not compared exactly).
    df = pd.DataFrame(annotations)
    info = glm.GLM_INFO["length_controlled_v1"]
    train, test, weight = glm._get_featurized_data(
        df, formula=info["formula"], regularize_to_baseline_lambda=info["regularize_to_baseline_lambda"]
    )
    keep = train["preference"].notna()
    model = glm.fit_LogisticRegressionCV(
        train[keep], "preference", is_ytrue_proba=True, sample_weight=weight[keep], **info["kwargs"]
    )
    return {
        "name": name,
        "preferences": [a["preference"] for a in annotations],
        "model_lengths": [int(x) for x in len_model],
        "baseline_lengths": [int(x) for x in len_base],
        "win_rate": float(metrics["win_rate"]),
        "length_controlled_winrate": float(metrics["length_controlled_winrate"]),
        "lc_standard_error": float(metrics["lc_standard_error"]),
        "C": float(model.C_[0]),
        "weights": dict(zip(test.columns, [float(w) for w in model.coef_[0]])),
    }


def main(folder, small=None, reference=None):
    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(20261206)
    difficulty, baseline = write_data(folder, rng)
    # Point alpaca_eval at the synthetic files instead of the model hub.
    glm.hf_hub_download = lambda repo_id, filename, **_: os.path.join(folder, filename)
    cases = [
        case("longer and preferred", rng, difficulty, baseline, 0.5, 0.3, nan=7, ties=12),
        case("shorter and losing", rng, difficulty, baseline, -0.4, -0.8, nan=0, ties=3),
        case("no length effect", rng, difficulty, baseline, 0.0, 0.0, nan=30, ties=0),
    ]
    with open(os.path.join(folder, "cases.json"), "w") as f:
        json.dump({"alpaca_eval": "0.6.6", "glm": "length_controlled_v1", "cases": cases}, f)
        f.write("\n")
    if small:
        # A length-control folder for a small real evaluation (scripts/eval_golden.sh): the
        # reference file's instructions, synthetic gamed annotations for them.
        os.makedirs(small, exist_ok=True)
        with open(reference) as f:
            baseline = json.load(f)
        # With this few rows the validation keeps no weight (alpaca_eval's LC is then 50): the
        # folder checks the evaluation's plumbing; cases.json checks the fit.
        write_gamed(small, rng, len(baseline))
        with open(os.path.join(small, "alpaca_eval_gpt4_baseline.json"), "w") as f:
            json.dump(baseline, f, indent=1, ensure_ascii=False)
            f.write("\n")


if __name__ == "__main__":
    # lc_golden.py FOLDER [SMALL_FOLDER REFERENCE_JSON]
    main(*sys.argv[1:])

#!/usr/bin/env python3
"""What alpaca_eval 0.6.6 makes of an evaluation that tsr judged through an OpenAI-compatible
server with AlpacaEval 2.0's annotator (`weighted_alpaca_eval_gpt4_turbo`), from the annotations
tsr exported (`tsr eval ... --out DIR`):

- per annotation: the output order alpaca_eval's own processor picks for its instruction
  (the `RandomSwitchTwoColumnsProcessor` of a `PairwiseAnnotator` for this annotator), and the preference
  its `logprob_parser` reads from the raw top log-probabilities tsr recorded, switched back by
  the processor;
- `get_winrate` on the exported annotations;
- `get_length_controlled_winrate` on them, pointed at the length-control folder the evaluation
  used instead of the model hub.

Run by scripts/eval_golden.sh: alpaca_agreement_golden.py EXPORT_DIR LC_DIR OUT_JSON.
"""
import json
import math
import os
import sys
import warnings

warnings.filterwarnings("ignore", category=FutureWarning)

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

import alpaca_eval.metrics.glm_winrate as glm  # noqa: E402
from alpaca_eval import annotators, completion_parsers, processors  # noqa: E402
from alpaca_eval.metrics import get_length_controlled_winrate, get_winrate  # noqa: E402


def num(x):
    x = float(x)
    return None if math.isnan(x) else x


def main(export, lc_dir, out):
    glm.hf_hub_download = lambda repo_id, filename, **_: os.path.join(lc_dir, filename)
    path = os.path.join(export, "model", "annotations.json")
    with open(path) as f:
        annotations = json.load(f)
    df = pd.DataFrame(annotations)[["instruction", "output_1", "output_2"]]
    # The switch processor of alpaca_eval's own annotator for this configuration (its seed is
    # the annotator's).
    annotator = annotators.PairwiseAnnotator(
        annotators_config="weighted_alpaca_eval_gpt4_turbo", caching_path=None
    )
    [single] = annotator.annotators.values()
    [switcher] = [p for p in single.processors if isinstance(p, processors.RandomSwitchTwoColumnsProcessor)]
    shown = switcher.preprocess(df)
    raw = []
    for a in annotations:
        top = (a.get("api") or {}).get("top_logprobs") or []
        if a["output_1"] == a["output_2"] or not top:
            raw.append(np.nan)
            continue
        completion = {"logprobs": {"content": [{"top_logprobs": [{"token": t, "logprob": l} for t, l in top]}]}}
        [p] = completion_parsers.logprob_parser(
            completion, numerator_token="m", denominator_tokens=["m", "M"], is_binarize=False
        )
        raw.append(p)
    shown["preference"] = raw
    back = switcher.postprocess(shown)
    rows = []
    for a, switched, shown_pref, pref in zip(
        annotations, shown["is_switched_outputs"], raw, back["preference"]
    ):
        rows.append(
            {
                "instruction": a["instruction"],
                "switched": bool(switched),
                "shown_preference": num(shown_pref),
                "preference": num(pref),
            }
        )
    wr = get_winrate(annotations)
    lc = get_length_controlled_winrate(annotations, save_weights_dir=None, is_warn_extreme_changes=False)
    doc = {
        "alpaca_eval": "0.6.6",
        "annotations": os.path.relpath(path, os.path.dirname(out)),
        "rows": rows,
        "get_winrate": {k: num(v) for k, v in wr.items()},
        "length_controlled_winrate": num(lc["length_controlled_winrate"]),
        "lc_standard_error": num(lc["lc_standard_error"]),
    }
    with open(out, "w") as f:
        json.dump(doc, f, indent=1, ensure_ascii=False)
        f.write("\n")


if __name__ == "__main__":
    main(*sys.argv[1:])

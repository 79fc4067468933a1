#!/usr/bin/env python3
"""Writes tests/fixtures/eval/alpaca-annotator.json from alpaca_eval's own functions (the pinned
alpaca-eval 0.6.6 of scripts/requirements-eval-golden.txt), for the pure parts of its default
annotator that tsr reproduces (steps/src/rules/alpaca_annotator.rs):

- `utils.make_prompts` (batch of one) then `utils.prompt_to_chatml` on templates and values of
  our own (JSON braces, `system name=` blocks, values holding braces, a later placeholder's
  name, non-ASCII text, an `<|im_end|>`);
- `completion_parsers.logprob_parser` with the `weighted_alpaca_eval_gpt4_turbo` settings
  (numerator `m`, denominators `m` and `M`, not binarized) on top log-probability lists.

    py=$(scripts/golden-venv.sh eval scripts/requirements-eval-golden.txt)
    "$py" scripts/alpaca_annotator_golden.py
"""
import json
import math
import pathlib

import pandas as pd
from alpaca_eval import completion_parsers, utils

TEMPLATES = [
    "<|im_start|>system\nYou judge.\n<|im_end|>\n<|im_start|>user\n## Instruction\n\n{\n    \"instruction\": \"\"\"{instruction}\"\"\",\n}\n\n{\n    {\n        \"model_identifier\": \"m\",\n        \"output\": \"\"\"{output_1}\"\"\"\n    },\n    {\n        \"model_identifier\": \"M\",\n        \"output\": \"\"\"{output_2}\"\"\"\n    }\n}\n<|im_end|>",
    "  <|im_start|>system name=example_user\nKnock {instruction}\n<|im_end|>\n<|im_start|>system name=example_assistant\n{output_1}\n<|im_end|>\n<|im_start|>user\n{output_2}\n<|im_end|>\n\n",
    "<|im_start|>user\n{output_2} then {instruction} then {output_1}<|im_end|>",
]

VALUES = [
    {"instruction": "What is 2+2?", "output_1": "4", "output_2": "Four."},
    {"instruction": "Use {output_1} literally", "output_1": "A", "output_2": "B"},
    {"instruction": "Résumé 解释 🙂", "output_1": "{\"json\": {}}", "output_2": "  padded  \n"},
    {"instruction": "x", "output_1": "cut <|im_end|> here", "output_2": "y"},
    {"instruction": "", "output_1": "", "output_2": ""},
]

TOPS = [
    [["m", -0.017597131], ["M", -4.048847], ["Both", -14.908222], ["The", -15.705097], ["Based", -15.955097]],
    [["M", -0.001], ["m", -6.9]],
    [["m", 0.0]],
    [["M", -0.2], ["Both", -1.7]],
    [["Both", -0.1], [" m", -2.0], ["MM", -3.0]],
    [["m", -0.6931471805599453], ["M", -0.6931471805599453]],
    [["m", -1.0], ["m", -2.0], ["M", -1.5]],
    [["m", -700.0], ["M", -701.0]],
]


def main():
    fills = []
    for t in TEMPLATES:
        for v in VALUES:
            prompts, _ = utils.make_prompts(pd.DataFrame([v]), template=t, batch_size=1)
            messages = utils.prompt_to_chatml(prompts[0])
            fills.append({"template": t, "values": v, "prompt": prompts[0], "messages": messages})
    prefs = []
    for top in TOPS:
        completion = {"logprobs": {"content": [{"top_logprobs": [{"token": t, "logprob": l} for t, l in top]}]}}
        [p] = completion_parsers.logprob_parser(
            completion, numerator_token="m", denominator_tokens=["m", "M"], is_binarize=False
        )
        p = float(p)
        prefs.append({"top": top, "preference": None if math.isnan(p) else p})
    out = pathlib.Path(__file__).resolve().parent.parent / "tests/fixtures/eval/alpaca-annotator.json"
    doc = {"alpaca_eval": utils.get_package_version("alpaca_eval"), "fills": fills, "preferences": prefs}
    out.write_text(json.dumps(doc, ensure_ascii=False, indent=1) + "\n")
    print(f"{out}: {len(fills)} prompts, {len(prefs)} preferences")


if __name__ == "__main__":
    main()

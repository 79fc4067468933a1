#!/usr/bin/env python3
"""Writes tests/fixtures/eval/py-random.json: what CPython's `random.Random` gives for string
seeds, which tsr reproduces (steps/src/rules/py_random.rs) to show outputs to an AlpacaEval 2.0
judge in the order alpaca_eval does.

For each instruction: the first three 32-bit draws of `random.Random(instruction)`, its first
`random()`, and AlpacaEval's switch for it:
`random.Random("is_switched_outputs" + instruction + "0").choices([False, True])[0]`
(alpaca_eval's `utils.random_seeded_choice`, seeded as its `RandomSwitchTwoColumnsProcessor`
is seeded by the pairwise annotators: with the annotator's seed, 0 by default). Standard library only; any CPython 3.9+ gives the same file.

    python3 scripts/py_random_golden.py
"""
import json
import pathlib
import random
import sys

HANDWRITTEN = [
    "",
    " ",
    "a",
    "What is the capital of France?",
    "Write a haiku about autumn.\n\nMake it sad.",
    "Résumé: café, naïve, coöperate",
    "解释一下量子纠缠。",
    "Объясни, как работает DNS.",
    "ما هي عاصمة مصر؟",
    "emoji 🙂🚀 and a flag 🇫🇷",
    "combining e\u0301 vs \u00e9",
    "tab\tand\rcarriage",
    "nul \u0000 inside",
    "x" * 10_000,
    "is_switched_outputs",
    "123",
]

ALPHABET = (
    "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789 .,;:!?'\"()-\n"
    "éèàüößçñøåæœ中文日本語한국어ДЖЯابت🙂🚀𝔘"
)


def generated(n):
    r = random.Random(20261206)
    out = []
    for _ in range(n):
        length = r.choice([1, 2, 5, 17, 40, 100, 300])
        out.append("".join(r.choice(ALPHABET) for _ in range(length)))
    return out


def main():
    rows = []
    for s in HANDWRITTEN + generated(400):
        g = random.Random(s)
        u32s = [g.getrandbits(32) for _ in range(3)]
        first = random.Random(s).random()
        switched = random.Random("is_switched_outputs" + s + "0").choices([False, True])[0]
        rows.append({"instruction": s, "u32": u32s, "random": first, "switched": switched})
    out = pathlib.Path(__file__).resolve().parent.parent / "tests/fixtures/eval/py-random.json"
    doc = {
        "python": sys.version.split()[0],
        "script": "scripts/py_random_golden.py",
        "rows": rows,
    }
    out.write_text(json.dumps(doc, ensure_ascii=False, indent=0) + "\n")
    n = sum(r["switched"] for r in rows)
    print(f"{out}: {len(rows)} instructions, {n} switched")


if __name__ == "__main__":
    main()

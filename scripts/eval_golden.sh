#!/usr/bin/env bash
# Regenerate tests/fixtures/eval/ with AlpacaEval and scikit-learn (pinned in
# scripts/requirements-eval-golden.txt). Commit the result; CI only reads it.
#
# 1. winrate.json: alpaca_eval's get_winrate and scikit-learn's logistic fit on planted cases.
# 2. export-logprob/ and export-text/: tsr evaluations of SmolLM2-135M-Instruct against
#    tests/fixtures/eval/weak-reference.json (AlpacaEval's reference-output format) on
#    examples/prompts.jsonl (all 24 with logprob verdicts, the first 8 with text verdicts),
#    exported by tsr (needs the default model: scripts/fetch-model.sh).
# 3. exports.json: get_winrate on each exported annotations.json, read as AlpacaEval reads it.
# 4. alpaca-annotator.json: alpaca_eval's prompt filling, chat messages and logprob parser
#    (scripts/alpaca_annotator_golden.py), and py-random.json: CPython's random.Random on string
#    seeds, AlpacaEval's output order (scripts/py_random_golden.py, standard library only).
set -euo pipefail
cd "$(dirname "$0")/.."
py=$(scripts/golden-venv.sh eval scripts/requirements-eval-golden.txt)
mkdir -p tests/fixtures/eval
scripts/fetch-model.sh >/dev/null
cargo build --release --quiet --bin tsr
model="${XDG_CACHE_HOME:-$HOME/.cache}/tsr/models/SmolLM2-135M-Instruct.Q4_1.gguf"
store=$(mktemp -d)
trap 'rm -rf "$store"' EXIT
for mode in logprob text; do
  limit=0; [ "$mode" = text ] && limit=8
  rm -rf "tests/fixtures/eval/export-$mode"
  target/release/tsr eval --model "$model" --reference tests/fixtures/eval/weak-reference.json \
    --prompts examples/prompts.jsonl --limit "$limit" --mode "$mode" --max-new-tokens 32 --quiet \
    --store "$store" --out "tests/fixtures/eval/export-$mode" >/dev/null
  # Keep what the tests read (the outputs files repeat the annotations' texts).
  find "tests/fixtures/eval/export-$mode" -name model_outputs.json -delete
done
"$py" scripts/eval_golden.py tests/fixtures/eval/winrate.json \
  tests/fixtures/eval/exports.json tests/fixtures/eval/export-logprob tests/fixtures/eval/export-text
"$py" scripts/alpaca_annotator_golden.py
"$py" scripts/py_random_golden.py
echo "wrote tests/fixtures/eval/"

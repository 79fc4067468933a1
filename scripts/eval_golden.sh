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
#    alpaca-requests.json: the request bodies alpaca_eval's own annotator sends through the openai
#    client to a recorder on loopback (scripts/alpaca_request_golden.py).
# 5. lc/ and lc-small/: synthetic length-control data of AlpacaEval's schema and what
#    alpaca_eval's get_length_controlled_winrate computes with it (scripts/lc_golden.py).
# 6. export-api/ and export-api.json: a tsr evaluation judged through an OpenAI-compatible
#    server (llama-cpp-python serving the default model, scripts/requirements-llama-server.txt)
#    with AlpacaEval's own template, with the length control of lc-small/; what alpaca_eval's
#    processor, logprob parser, get_winrate and get_length_controlled_winrate make of the
#    exported annotations (scripts/alpaca_agreement_golden.py).
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
"$py" scripts/alpaca_request_golden.py
"$py" scripts/lc_golden.py tests/fixtures/eval/lc tests/fixtures/eval/lc-small \
  tests/fixtures/eval/weak-reference.json
# The API judge: a real server on loopback, stopped by PID on exit.
lpy="${XDG_CACHE_HOME:-$HOME/.cache}/tsr/llama-cpp-server/bin/python"
[ -x "$lpy" ] || { echo "the llama-cpp-python server is missing: run scripts/test.sh once, which builds it" >&2; exit 1; }
port=$("$py" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
"$lpy" -m llama_cpp.server --model "$model" --host 127.0.0.1 --port "$port" --model_alias smollm2 \
  --n_ctx 4096 --n_threads 1 >"$store/server.log" 2>&1 &
server=$!
trap 'kill $server 2>/dev/null; rm -rf "$store"' EXIT
for _ in $(seq 240); do
  curl -sf "http://127.0.0.1:$port/v1/models" >/dev/null && break
  kill -0 $server 2>/dev/null || { cat "$store/server.log" >&2; exit 1; }
  sleep 0.5
done
template=$("$py" -c 'import alpaca_eval, pathlib; print(pathlib.Path(alpaca_eval.__file__).parent / "evaluators_configs/alpaca_eval_clf_gpt4_turbo/alpaca_eval_clf.txt")')
rm -rf tests/fixtures/eval/export-api
target/release/tsr eval --model "$model" --reference tests/fixtures/eval/lc-small/alpaca_eval_gpt4_baseline.json \
  --prompts tests/fixtures/eval/lc-small/alpaca_eval_gpt4_baseline.json --max-new-tokens 32 \
  --judge-url "http://127.0.0.1:$port/v1" --judge smollm2 --template "$template" \
  --lc-data tests/fixtures/eval/lc-small --quiet --store "$store" --out tests/fixtures/eval/export-api >/dev/null
find tests/fixtures/eval/export-api -name model_outputs.json -delete
"$py" scripts/alpaca_agreement_golden.py tests/fixtures/eval/export-api tests/fixtures/eval/lc-small \
  tests/fixtures/eval/export-api.json
echo "wrote tests/fixtures/eval/"

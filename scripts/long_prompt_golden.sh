#!/usr/bin/env bash
# Regenerate tests/fixtures/long-prompt/golden.json: transformers' greedy tokens for two
# judge-length chat prompts of the default model (scripts/long_prompt_golden.py). Run it after
# changing that script or the pinned versions, and commit the result. CI never runs it (it
# needs torch, about 5 GB).
set -euo pipefail
cd "$(dirname "$0")/.."
py=$(scripts/golden-venv.sh transformers5 scripts/requirements-hf-golden.txt)
gguf=$(scripts/fetch-model.sh)
cargo build --release --quiet --bin tsr
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
target/release/tsr export-model --model "$gguf" --out "$tmp/model" >/dev/null
mkdir -p tests/fixtures/long-prompt
"$py" scripts/long_prompt_golden.py "$tmp/model" tests/fixtures/long-prompt/golden.json

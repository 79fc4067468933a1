#!/usr/bin/env bash
# Regenerate tests/fixtures/hf/: tiny models written by transformers 5 and 4.x, and the
# reference numbers (token ids, log-probs, TRL's token ids) the compatibility tests compare
# tsr with. Run it after changing scripts/hf_golden.py, the export format or the pinned
# versions, and commit the result. CI never runs it (it needs torch, about 5 GB).
#
#   TSR_GOLDEN_VENVS   where the two virtual environments live (default ~/.cache/tsr/golden-venvs)
set -euo pipefail
cd "$(dirname "$0")/.."
out=tests/fixtures/hf
py5=$(scripts/golden-venv.sh transformers5 scripts/requirements-hf-golden.txt)
py4=$(scripts/golden-venv.sh transformers4 scripts/requirements-hf-golden-4x.txt)
gguf=$(scripts/fetch-model.sh)
cargo build --release --quiet --bin tsr --example write_tiny_model -p tsr -p tsr-steps
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
target/release/examples/write_tiny_model "$tmp/tiny" 1 >/dev/null
rm -rf "$out" && mkdir -p "$out"
"$py5" scripts/hf_golden.py fixtures "$out" "$tmp/tiny"
"$py4" scripts/hf_golden.py fixtures "$out" "$tmp/tiny"
# Round trip: what tsr exports, loaded by transformers 5 and 4.x.
target/release/tsr export --model "$tmp/tiny" --out "$tmp/export-tiny" >/dev/null
target/release/tsr export --model "$gguf" --out "$tmp/export-smollm2" >/dev/null
# tsr's exports of transformers-written fixtures: RoPE scaling and sliding windows written back.
fixtures="llama-llama3 llama-yarn llama-dynamic qwen2-sliding mistral-window"
for f in $fixtures; do
  target/release/tsr export --model "$out/$f" --out "$tmp/export-fixture-$f" >/dev/null
done
for name in tiny smollm2 $(printf 'fixture-%s ' $fixtures); do
  "$py5" scripts/hf_golden.py roundtrip "$out" "$name" "$tmp/export-$name"
  "$py4" scripts/hf_golden.py roundtrip "$out" "$name" "$tmp/export-$name"
done
"$py5" scripts/hf_golden.py check "$out" $fixtures
"$py5" scripts/hf_golden.py trl "$out" "$tmp/export-smollm2"
echo "wrote $out ($(du -sh "$out" | cut -f1))"

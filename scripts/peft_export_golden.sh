#!/usr/bin/env bash
# Regenerate tests/fixtures/peft-export/: a tiny LoRA run's base model and adapter as tsr
# exports them, and the log-probs PEFT computes with that adapter loaded onto that base
# (scripts/peft_export_golden.py, in the pinned transformers 5 environment of
# scripts/requirements-hf-golden.txt). tests/lora.rs repeats the run, checks its adapter is
# these bytes, and compares tsr's log-probs with PEFT's. Commit the result; CI only reads it.
# The run here must stay the one `setup(dir, 1, "")` in tests/lora.rs makes.
set -euo pipefail
cd "$(dirname "$0")/.."
py=$(scripts/golden-venv.sh transformers5 scripts/requirements-hf-golden.txt)
cargo build --release --quiet
cargo build --release --quiet -p tsr-model --example write_tiny_model
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
target/release/examples/write_tiny_model "$work/tiny" 5 >/dev/null
printf '%s\n' '{"id": "a", "prompt": "hello there"}' '{"id": "b", "prompt": "name a colour"}' \
  '{"id": "c", "prompt": "count to three"}' > "$work/prompts.jsonl"
cat > "$work/lora.toml" <<'TOML'
name = "lora"
workflow = "temporal"
iterations = 1
[model]
source = "tiny"
[prompts]
file = "prompts.jsonl"
[generate]
k = 3
max_new_tokens = 6
batch_size = 4
[judge]
mode = "logprob"
samples = 1
max_new_tokens = 4
batch_size = 4
[dpo]
lr = 1e-2
epochs = 2
micro_batch = 1
accum_steps = 1
checkpoint_every = 1
adapter = "lora"
[dpo.lora]
r = 4
alpha = 8
TOML
target/release/tsr run "$work/lora.toml" --quiet --store "$work/store"
out=tests/fixtures/peft-export
rm -rf "$out"
mkdir -p "$out"
target/release/tsr export lora model --node import --out "$out/base" --store "$work/store" >/dev/null
target/release/tsr export lora model --adapter --out "$out/adapter" --store "$work/store" >/dev/null
PYTHONHASHSEED=0 "$py" scripts/peft_export_golden.py "$out"
echo "wrote $out/"

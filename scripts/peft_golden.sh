#!/usr/bin/env bash
# Regenerate tests/fixtures/peft/ (LoRA adapters saved by PEFT and the log-probs PEFT computes
# through them) in the pinned transformers 5 environment (scripts/requirements-hf-golden.txt).
# Commit the result; CI only reads it.
set -euo pipefail
cd "$(dirname "$0")/.."
py=$(scripts/golden-venv.sh transformers5 scripts/requirements-hf-golden.txt)
rm -rf tests/fixtures/peft
mkdir -p tests/fixtures/peft
PYTHONHASHSEED=0 "$py" scripts/peft_golden.py tests/fixtures/hf tests/fixtures/peft
echo "wrote tests/fixtures/peft/"

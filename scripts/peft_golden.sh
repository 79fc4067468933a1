#!/usr/bin/env bash
# Regenerate tests/fixtures/peft/ (LoRA adapters saved by PEFT and the log-probs PEFT computes
# through them) in the pinned transformers 5 environment (scripts/requirements-hf-golden.txt).
# Commit the result; CI only reads it.
set -euo pipefail
cd "$(dirname "$0")/.."
venv="${TSR_GOLDEN_VENVS:-${XDG_CACHE_HOME:-$HOME/.cache}/tsr/golden-venvs}/transformers5"
if [ ! -x "$venv/bin/python" ] || ! cmp -s scripts/requirements-hf-golden.txt "$venv/requirements.txt"; then
  python3 -m venv "$venv"
  "$venv/bin/pip" install --quiet --disable-pip-version-check -r scripts/requirements-hf-golden.txt
  cp scripts/requirements-hf-golden.txt "$venv/requirements.txt"
fi
rm -rf tests/fixtures/peft
mkdir -p tests/fixtures/peft
PYTHONHASHSEED=0 "$venv/bin/python" scripts/peft_golden.py tests/fixtures/hf tests/fixtures/peft
echo "wrote tests/fixtures/peft/"

#!/usr/bin/env bash
# Regenerate tests/fixtures/eval/winrate.json with AlpacaEval and scikit-learn (pinned in
# scripts/requirements-eval-golden.txt). Commit the result; CI only reads it.
set -euo pipefail
cd "$(dirname "$0")/.."
venv="${TSR_GOLDEN_VENVS:-${XDG_CACHE_HOME:-$HOME/.cache}/tsr/golden-venvs}/eval"
if [ ! -x "$venv/bin/python" ] || ! cmp -s scripts/requirements-eval-golden.txt "$venv/requirements.txt"; then
  python3 -m venv "$venv"
  "$venv/bin/pip" install --quiet --disable-pip-version-check -r scripts/requirements-eval-golden.txt
  cp scripts/requirements-eval-golden.txt "$venv/requirements.txt"
fi
mkdir -p tests/fixtures/eval
"$venv/bin/python" scripts/eval_golden.py tests/fixtures/eval/winrate.json
echo "wrote tests/fixtures/eval/winrate.json"

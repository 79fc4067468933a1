#!/usr/bin/env bash
# The pinned Python environment of a golden script: `scripts/golden-venv.sh NAME REQUIREMENTS`
# creates (or refreshes, when REQUIREMENTS changed) $TSR_GOLDEN_VENVS/NAME (default
# ~/.cache/tsr/golden-venvs/NAME) and prints the path of its python. pip's output goes to stderr.
set -euo pipefail
venvs="${TSR_GOLDEN_VENVS:-${XDG_CACHE_HOME:-$HOME/.cache}/tsr/golden-venvs}"
name=$1 req=$2
if [ ! -x "$venvs/$name/bin/python" ] || ! cmp -s "$req" "$venvs/$name/requirements.txt"; then
  python3 -m venv "$venvs/$name" >&2
  "$venvs/$name/bin/pip" install --quiet --disable-pip-version-check -r "$req" >&2
  cp "$req" "$venvs/$name/requirements.txt"
fi
echo "$venvs/$name/bin/python"

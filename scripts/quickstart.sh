#!/usr/bin/env bash
# The README's first command: fetch the default model, build tsr, and run one Temporal
# Self-Rewarding iteration of SmolLM2-135M-Instruct on CPU (examples/quickstart.toml).
# Interrupt it at any moment and run this again: it continues where it stopped.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/fetch-model.sh >/dev/null
cargo build --release --quiet --bin tsr
exec target/release/tsr run examples/quickstart.toml "$@"

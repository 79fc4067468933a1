#!/usr/bin/env bash
# The evaluation's API judge throughput at max_concurrency 1, 4 and 16, against the real
# OpenAI-compatible test server (llama-cpp-python serving the default model, built by
# scripts/test.sh) behind a proxy that adds latency before each request:
#   scripts/bench_api_judge.sh [LATENCY_MS] [PROMPTS]
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/fetch-model.sh >/dev/null
TSR_BENCH_LATENCY_MS="${1:-500}" TSR_BENCH_PROMPTS="${2:-48}" \
  cargo test --release --quiet --test api_judge bench_api_judge_throughput_by_concurrency \
  -- --ignored --nocapture 2>&1 | grep -v "^running\|^test \|^$\|test result\|^\.$"

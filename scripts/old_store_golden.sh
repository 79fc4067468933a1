#!/usr/bin/env bash
# Stores killed in the middle of a DPO step by a given build of tsr, for tests/old_store.rs:
# one trains the whole model, one a LoRA adapter. Each is a self-rewarding iteration on the tiny
# random model whose DPO node checkpoints after every optimizer step; the run stops itself at
# its third optimizer step (TSR_TEST_PAUSE_AT) and is SIGKILLed there, so the store holds an
# interrupted DPO step with a checkpoint. The test resumes and replays them with today's build.
#
# Usage: scripts/old_store_golden.sh [REV]
#   REV: the git revision to build them with (built in a worktree under target/); without it,
#   the binaries of this checkout's target/release (build them first:
#   cargo build --release --bin tsr && cargo build --release --workspace --example write_tiny_model).
# Writes tests/fixtures/old-stores/{full,lora}.tar.gz and tests/fixtures/old-stores/MADE_BY on a
# CPU with AVX-512, into tests/fixtures/old-stores/KIND/ on another kind (avx2, avx2-l1d48k): a
# DPO step resumed on another kind of CPU than the one that began it ends with other bits
# (gemm's kernels), so each kind has its own stores (tests/common/mod.rs, cpu_kind).
#
# The kind of CPU is the tests' (`tsr_model::testing::fixture_kind`, printed by this checkout's
# `fixture_kind` example): how its gemm adds long products. On a machine with AVX-512,
# `scripts/as-avx2.sh [--l1d SIZE:WAYS] old-stores [REV]` makes the AVX2 stores under an emulated
# CPU; it sets TSR_RUN_AS, the command that runs each binary (the example's too) as that CPU.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
out="$root/tests/fixtures/old-stores"
read -ra run_as <<<"${TSR_RUN_AS:-}"
(cd "$root" && cargo build --release --quiet -p tsr-model --example fixture_kind)
kind=$("${run_as[@]}" "$root/target/release/examples/fixture_kind")
[[ $kind == avx512 ]] || out="$out/$kind"
echo "old_store_golden: stores for the CPU kind $kind, into $out" >&2
rev=${1:-}
if [[ -n "$rev" ]]; then
    tree="$root/target/old-store-golden/tree"
    rm -rf "$tree"
    git -C "$root" worktree prune
    git -C "$root" worktree add --detach "$tree" "$rev"
    trap 'git -C "$root" worktree remove --force "$tree"' EXIT
    (cd "$tree" && CARGO_TARGET_DIR="$root/target/old-store-golden/target" \
        cargo build --release --bin tsr &&
        CARGO_TARGET_DIR="$root/target/old-store-golden/target" \
        cargo build --release --workspace --example write_tiny_model)
    bin="$root/target/old-store-golden/target/release"
    made_by=$(git -C "$root" rev-parse "$rev")
else
    bin="$root/target/release"
    made_by="$(git -C "$root" rev-parse HEAD)$(git -C "$root" diff --quiet HEAD -- . ':!tests' || echo ' (with uncommitted changes)')"
fi
for b in "$bin/tsr" "$bin/examples/write_tiny_model"; do
    [[ -x "$b" ]] || { echo "old_store_golden: $b is missing; build it first (see the usage above)" >&2; exit 1; }
done

mkdir -p "$out"
# A run records its files by absolute path, so the stores are made in a fixed folder, and
# tests/old_store.rs unpacks them there (RECORDED_AT) to resume them where they were made.
work=/tmp/tsr-old-store
for variant in full lora; do
    dir="$work/$variant"
    rm -rf "$dir"
    mkdir -p "$dir"
    "${run_as[@]}" "$bin/examples/write_tiny_model" "$dir/tiny" 5 >/dev/null
    i=0
    : >"$dir/prompts.jsonl"
    for p in "hello there" "name a colour" "count to three" "what is the capital of France?" \
        "write a short poem about the sea" "why is the sky blue?"; do
        printf '{"id": "p%d", "prompt": "%s"}\n' "$i" "$p" >>"$dir/prompts.jsonl"
        i=$((i + 1))
    done
    lora=""
    [[ $variant == lora ]] && lora=$'adapter = "lora"\n[dpo.lora]\nr = 4\nalpha = 8\ndropout = 0.1\n'
    cat >"$dir/run.toml" <<EOF
name = "old-$variant"
workflow = "self-rewarding"
iterations = 1
[model]
source = "tiny"
[prompts]
file = "prompts.jsonl"
[generate]
k = 3
max_new_tokens = 8
batch_size = 6
[judge]
mode = "logprob"
samples = 1
max_new_tokens = 4
batch_size = 6
[dpo]
lr = 1e-3
epochs = 8
micro_batch = 1
accum_steps = 2
checkpoint_every = 1
warmup_steps = 3
weight_decay = 0.01
$lora
EOF
    (cd "$dir" && TSR_TEST_PAUSE_AT="iter1/dpo-next#3" exec "${run_as[@]}" "$bin/tsr" run run.toml --store store --quiet) &
    pid=$!
    for _ in $(seq 1 1200); do
        state=$(awk '{print $3}' "/proc/$pid/stat" 2>/dev/null || echo gone)
        [[ $state == T || $state == gone ]] && break
        sleep 0.5
    done
    if [[ $state != T ]]; then
        echo "old_store_golden: the $variant run ended without reaching its third DPO step" >&2
        exit 1
    fi
    kill -KILL "$pid"
    wait "$pid" 2>/dev/null || true
    tar -C "$work" --sort=name --owner=0 --group=0 --numeric-owner --mtime=@0 -czf "$out/$variant.tar.gz" "$variant"
    rm -rf "$dir"
    echo "wrote $out/$variant.tar.gz ($(du -h "$out/$variant.tar.gz" | cut -f1))"
done
printf 'made by tsr %s on %s\n' "$made_by" "$(date -u +%Y-%m-%d)" >"$out/MADE_BY"

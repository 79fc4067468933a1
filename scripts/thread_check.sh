#!/usr/bin/env bash
# Do tsr's outputs depend on the number of CPU threads? Runs one small Temporal iteration of the
# default model (SmolLM2-135M-Instruct GGUF: generation, judging, reference log-probabilities,
# two DPO trainings, evaluation) with RAYON_NUM_THREADS = 1, 2 and 3, each in its own store, and
# prints, per node, whether its output digests are equal across the three.
#   scripts/thread_check.sh [THREADS...]     (default: 1 2 3)
set -euo pipefail
cd "$(dirname "$0")/.."
[ $# -gt 0 ] && threads=("$@") || threads=(1 2 3)
scripts/fetch-model.sh >/dev/null
cargo build --release --quiet --bin tsr
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
cp examples/prompts.jsonl examples/held-out.jsonl examples/held-out-reference.json "$work/"
sed -e 's/^limit = 8/limit = 4/' -e 's/^k = 4/k = 2/' -e 's/^max_new_tokens = 48/max_new_tokens = 24/' \
  -e 's|^store = .*|store = "store"|' examples/quickstart.toml >"$work/run.toml"
for t in "${threads[@]}"; do
  start=$(date +%s)
  RAYON_NUM_THREADS=$t target/release/tsr run "$work/run.toml" --store "$work/store-$t" --quiet >/dev/null
  echo "threads $t: $(( $(date +%s) - start )) s" >&2
  target/release/tsr status quickstart --store "$work/store-$t" --json >"$work/status-$t.json"
done
python3 - "$work" "${threads[@]}" <<'PY'
import json, sys
work, threads = sys.argv[1], sys.argv[2:]
runs = {t: {n["node"]: (n["kind"], dict(n["outputs"])) for n in json.load(open(f"{work}/status-{t}.json"))["nodes"]} for t in threads}
first = runs[threads[0]]
same = differ = 0
print(f"{'NODE':<28} {'KIND':<18} " + " ".join(f"T={t}" for t in threads[1:]) + f"   (vs T={threads[0]})")
for node, (kind, outs) in sorted(first.items()):
    marks = []
    for t in threads[1:]:
        o = runs[t].get(node, (kind, {}))[1]
        marks.append("same" if o == outs else "DIFF")
    if all(m == "same" for m in marks):
        same += 1
    else:
        differ += 1
    print(f"{node:<28} {kind:<18} " + " ".join(f"{m:>4}" for m in marks))
print(f"{same} nodes equal at every thread count, {differ} differ")
PY

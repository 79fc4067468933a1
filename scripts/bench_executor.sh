#!/usr/bin/env bash
# The processes executor against one process, back to back on this machine: a generation-heavy
# Self-Rewarding iteration of SmolLM2-135M-Instruct (64 prompts, K = 4) run once locally with
# every core and once with the batches of its item steps in worker processes (the cores split
# between them). Prints each run's wall time and the busy time of its item steps, and checks
# that both runs made the same outputs.
#
#   scripts/bench_executor.sh [WORKERS]        # default 2
set -euo pipefail
cd "$(dirname "$0")/.."
workers="${1:-2}"
scripts/fetch-model.sh >/dev/null
cargo build --release --quiet --bin tsr
tsr="$PWD/target/release/tsr"
dir="$(mktemp -d)"
trap 'rm -rf "$dir"' EXIT

topics=(rivers bread clocks bees glass maps violins tides salt bridges lanterns owls chess
  paper tea snow copper kites moss ferries orchards wool ink comets caves lighthouses honey
  deserts trains mirrors gardens)
: > "$dir/prompts.jsonl"
for i in $(seq 0 63); do
  t="${topics[$((i % ${#topics[@]}))]}"
  case $((i % 4)) in
    0) p="Write two sentences about $t." ;;
    1) p="Give one surprising fact about $t." ;;
    2) p="Explain to a child what $t are." ;;
    3) p="List three words that go with $t." ;;
  esac
  printf '{"id": "p%02d", "prompt": "%s"}\n' "$i" "$p" >> "$dir/prompts.jsonl"
done
cat > "$dir/bench.toml" <<EOF
name = "bench"
workflow = "self-rewarding"
iterations = 1
[model]
source = "~/.cache/tsr/models/SmolLM2-135M-Instruct.Q4_1.gguf"
[prompts]
file = "prompts.jsonl"
[generate]
k = 4
max_new_tokens = 32
batch_size = 16
[judge]
mode = "logprob"
batch_size = 16
[dpo]
lr = 5e-6
accum_steps = 4
checkpoint_every = 100
EOF

run() { # NAME LABEL ARGS...
  local name="$1" label="$2" store="$dir/$1"
  shift 2
  local t0 t1
  t0=$(date +%s.%N)
  "$tsr" run "$dir/bench.toml" --quiet --store "$store" "$@" > "$dir/$name.log" 2>&1 ||
    { cat "$dir/$name.log"; exit 1; }
  t1=$(date +%s.%N)
  "$tsr" status bench --json --store "$store" > "$dir/$name.json"
  python3 - "$label" "$t0" "$t1" "$dir/$name.json" <<'PY'
import json, sys
label, t0, t1, path = sys.argv[1], float(sys.argv[2]), float(sys.argv[3]), sys.argv[4]
v = json.load(open(path))
busy = {n["node"]: n["busy_s"] for n in v["nodes"]}
item = ["iter1/gen-current", "iter1/judge-current", "iter1/ref-next"]
print(f"{label:<22} wall {t1 - t0:7.1f} s   " + "   ".join(f"{n.split('/')[1]} {busy.get(n, 0):6.1f} s" for n in item))
PY
}

threads="${RAYON_NUM_THREADS:-$(nproc)}"
echo "machine: $(nproc) cores; local: $threads threads; processes: $workers workers"
RAYON_NUM_THREADS="$threads" run local "local"
RAYON_NUM_THREADS="$threads" run proc "processes ($workers)" --executor processes --workers "$workers"
python3 - "$dir/local.json" "$dir/proc.json" <<'PY'
import json, sys
a, b = (json.load(open(p)) for p in sys.argv[1:3])
out = lambda v: {n["node"]: n["outputs"] for n in v["nodes"]}
same = out(a) == out(b)
print("outputs identical:", same)
PY

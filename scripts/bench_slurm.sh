#!/usr/bin/env bash
# The slurm executor against one process, back to back on this machine, on a one-node Slurm
# cluster on loopback that this script starts and stops (by PID). Needs root and Debian's
# slurmctld, slurmd, slurm-client and munge (scripts/test.sh installs them).
#
# 1. Overhead: a Temporal iteration with almost no work per step (2 prompts, K = 2, one new
#    token), so each item step's time under Slurm is submission, scheduling, the tasks' start
#    and model load, and the driver's polling. Prints each item step's time both ways.
# 2. The quickstart (examples/quickstart.toml) both ways: wall time and ratio.
# 3. The quickstart both ways again, each with a remote copy on a loopback S3 server (s3s-fs,
#    which scripts/test.sh installs), so that the Slurm tasks take their inputs through the
#    remote and a node cache and hand back results there (the default with a remote).
# Local runs use every core in one process; Slurm runs 2 tasks of 1 CPU each for the item
# steps, and DPO and metrics as one task of 2 CPUs each. Both runs of a
# pair must give the same outputs (checked).
#
#   scripts/bench_slurm.sh
set -euo pipefail
cd "$(dirname "$0")/.."
for d in munged slurmctld slurmd; do
  [ -x "/usr/sbin/$d" ] || { echo "bench_slurm.sh: $d is missing: run scripts/test.sh (it installs Slurm), or apt-get install slurmctld slurmd slurm-client munge" >&2; exit 1; }
done
scripts/fetch-model.sh >/dev/null
cargo build --release --quiet --bin tsr
tsr="$PWD/target/release/tsr"
dir="$(mktemp -d)"
pids=()
cleanup() {
  SLURM_CONF="$dir/slurm.conf" scancel --user="$(id -un)" 2>/dev/null || true
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$dir"
}
trap cleanup EXIT

# The cluster (see ../shared/CLUSTER.md and tests/common/slurm.rs).
host=$(hostname -s)
mkdir -p "$dir/state" "$dir/spool" "$dir/log"
head -c 64 /dev/urandom > "$dir/munge.key"; chmod 400 "$dir/munge.key"
port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
cat > "$dir/slurm.conf" <<CONF
ClusterName=tsrbench
SlurmctldHost=$host(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=socket=$dir/munge.sock
CredType=cred/munge
SlurmctldPort=$(port)
SlurmdPort=$(port)
StateSaveLocation=$dir/state
SlurmdSpoolDir=$dir/spool
SlurmctldPidFile=$dir/slurmctld.pid
SlurmdPidFile=$dir/slurmd.pid
SlurmctldLogFile=$dir/log/slurmctld.log
SlurmdLogFile=$dir/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
MpiDefault=none
JobRequeue=1
NodeName=$host NodeAddr=127.0.0.1 CPUs=$(nproc) RealMemory=$(free -m | awk '/^Mem:/{print $2}') State=UNKNOWN
PartitionName=debug Nodes=$host Default=YES MaxTime=INFINITE State=UP
CONF
export SLURM_CONF="$dir/slurm.conf"
/usr/sbin/munged -F --force --key-file="$dir/munge.key" --socket="$dir/munge.sock" \
  --pid-file="$dir/munged.pid" --log-file="$dir/log/munged.log" --seed-file="$dir/munge.seed" \
  2> "$dir/log/munged.err" &
pids+=($!)
sleep 1
/usr/sbin/slurmctld -D -i -c 2> "$dir/log/ctld.err" & pids+=($!)
/usr/sbin/slurmd -D 2> "$dir/log/slurmd.err" & pids+=($!)
for _ in $(seq 100); do [ "$(sinfo -h -o %T 2>/dev/null)" = idle ] && break; sleep 0.2; done
[ "$(sinfo -h -o %T)" = idle ] || { echo "bench_slurm.sh: the node did not come up" >&2; exit 1; }

threads="$(nproc)"
# Slurm 22.05 can keep a finished task's CPUs allocated (the node stays `mixed` with nothing
# queued), which would halve what the next run gets: each run starts on an idle node, and the
# CPUs still held after each Slurm run are printed.
settle() {
  for _ in $(seq 50); do [ "$(sinfo -h -o %T)" = idle ] && return; sleep 0.2; done
  echo "bench_slurm.sh: the node is $(sinfo -h -o %T) with nothing queued: scontrol reconfigure" >&2
  scontrol reconfigure; sleep 2
}
held() { scontrol show node | sed -n 's/.*CPUAlloc=\([0-9]*\).*/\1/p'; }
run() { # CONFIG STORE LOG [ARGS...]: prints the wall time in seconds
  local cfg="$1" store="$2" log="$3"; shift 3
  local t0 t1
  settle
  t0=$(date +%s.%N)
  RAYON_NUM_THREADS="$threads" "$tsr" run "$cfg" --store "$store" "$@" > "$log" 2>&1 || { cat "$log" >&2; exit 1; }
  t1=$(date +%s.%N)
  sleep 1
  echo "$(basename "$log" .log): CPUs still allocated 1 s after the run: $(held)" >&2
  python3 -c "print(f'{$t1 - $t0:.1f}')"
}
cat > "$dir/exec.toml" <<TOML
[executor]
kind = "slurm"
workers = 2
cpus_per_task = 1
TOML
# DPO and metrics run as one task each: give them the node's 2 CPUs, as the local run has.
# (Tables after the [executor] keys: a config appends its own keys to exec.toml first.)
cat > "$dir/steps.toml" <<TOML
[executor.steps.dpo]
cpus_per_task = 2
[executor.steps.metrics]
cpus_per_task = 2
TOML

# 1. Overhead.
printf '{"id": "a", "prompt": "Say hi."}\n{"id": "b", "prompt": "Name a colour."}\n' > "$dir/p.jsonl"
base() {
  cat <<TOML
name = "overhead"
workflow = "temporal"
iterations = 1
[model]
source = "~/.cache/tsr/models/SmolLM2-135M-Instruct.Q4_1.gguf"
[prompts]
file = "$dir/p.jsonl"
[generate]
k = 2
max_new_tokens = 1
batch_size = 2
[judge]
mode = "logprob"
batch_size = 2
[dpo]
accum_steps = 1
checkpoint_every = 100
TOML
}
base > "$dir/o-local.toml"
{ base; cat "$dir/exec.toml" "$dir/steps.toml"; } > "$dir/o-slurm.toml"
wl=$(run "$dir/o-local.toml" "$dir/o-local" "$dir/o-local.log")
ws=$(run "$dir/o-slurm.toml" "$dir/o-slurm" "$dir/o-slurm.log")
"$tsr" status overhead --json --store "$dir/o-local" > "$dir/o-local.json"
"$tsr" status overhead --json --store "$dir/o-slurm" > "$dir/o-slurm.json"

# 2. The quickstart (its relative paths made absolute; its store in the temporary folder).
sed -e 's#^store = .*##' \
  -e "s#^file = \"prompts.jsonl\"#file = \"$PWD/examples/prompts.jsonl\"#" \
  -e "s#^prompts = \"held-out.jsonl\"#prompts = \"$PWD/examples/held-out.jsonl\"#" \
  -e "s#^reference = \"held-out-reference.json\"#reference = \"$PWD/examples/held-out-reference.json\"#" \
  examples/quickstart.toml > "$dir/q-local.toml"
{ cat "$dir/q-local.toml" "$dir/exec.toml" "$dir/steps.toml"; } > "$dir/q-slurm.toml"
ql=$(run "$dir/q-local.toml" "$dir/q-local" "$dir/q-local.log")
qs=$(run "$dir/q-slurm.toml" "$dir/q-slurm" "$dir/q-slurm.log")
"$tsr" status quickstart --json --store "$dir/q-local" > "$dir/q-local.json"
"$tsr" status quickstart --json --store "$dir/q-slurm" > "$dir/q-slurm.json"

# 3. The quickstart with a remote copy, both ways (the same server, a prefix each).
s3s="${TSR_S3S_FS:-${TSR_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/tsr}/s3s-fs/bin/s3s-fs}"
[ -x "$s3s" ] || { echo "bench_slurm.sh: $s3s is missing: run scripts/test.sh (it installs s3s-fs)" >&2; exit 1; }
mkdir -p "$dir/s3/bench"
s3port=$(port)
"$s3s" --host 127.0.0.1 --port "$s3port" --access-key AKIABENCH0001 --secret-key bench-secret "$dir/s3" 2> "$dir/log/s3.err" &
pids+=($!)
for _ in $(seq 100); do (echo > "/dev/tcp/127.0.0.1/$s3port") 2>/dev/null && break; sleep 0.1; done
export AWS_ACCESS_KEY_ID=AKIABENCH0001 AWS_SECRET_ACCESS_KEY=bench-secret \
  AWS_ENDPOINT="http://127.0.0.1:$s3port" AWS_ALLOW_HTTP=true AWS_REGION=us-east-1
env | grep '^AWS_' | sed 's/^/export /' > "$dir/node.env"
{ cat "$dir/q-local.toml" "$dir/exec.toml"; printf 'node_cache = "%s"\nworker_env = "%s"\n' "$dir/node-cache" "$dir/node.env"; cat "$dir/steps.toml"; } > "$dir/q-slurm-remote.toml"
qlr=$(run "$dir/q-local.toml" "$dir/q-local-remote" "$dir/q-local-remote.log" --remote s3://bench/local)
qsr=$(run "$dir/q-slurm-remote.toml" "$dir/q-slurm-remote" "$dir/q-slurm-remote.log" --remote s3://bench/slurm)
grep -q "workers take their inputs from s3://bench/slurm" "$dir/q-slurm-remote.log" || { echo "bench_slurm.sh: the Slurm run did not go through the remote" >&2; exit 1; }
"$tsr" status quickstart --json --store "$dir/q-local-remote" > "$dir/q-local-remote.json"
"$tsr" status quickstart --json --store "$dir/q-slurm-remote" > "$dir/q-slurm-remote.json"

python3 - "$dir" "$wl" "$ws" "$ql" "$qs" "$threads" "$qlr" "$qsr" <<'PY'
import json, sys
d, wl, ws, ql, qs, threads, qlr, qsr = sys.argv[1:9]
load = lambda n: json.load(open(f"{d}/{n}.json"))
ITEM = {"generate", "judge", "ref-logprobs", "answer", "eval-judge", "meta-judge"}
rows = lambda v: {n["node"]: n for n in v["nodes"]}
outputs = lambda v: {k: n["outputs"] for k, n in rows(v).items()}
print(f"machine: {threads} cores; local: one process, {threads} threads; slurm: 2 array tasks of 1 CPU")
a, b = rows(load("o-local")), rows(load("o-slurm"))
print(f"1. overhead run (2 prompts, K = 2, 1 new token): wall local {wl} s, slurm {ws} s")
extra = []
for node, n in a.items():
    if n["kind"] in ITEM and n["state"] == "done" and b[node]["state"] == "done":
        x = b[node]["busy_s"] - n["busy_s"]
        extra.append(x)
        print(f"   {node:<24} local {n['busy_s']:6.2f} s   slurm {b[node]['busy_s']:6.2f} s   +{x:5.2f} s")
if extra:
    print(f"   each item step under Slurm: +{sum(extra) / len(extra):.2f} s on average over {len(extra)} steps")
print("   outputs identical:", outputs(load("o-local")) == outputs(load("o-slurm")))
print(f"2. quickstart: wall local {ql} s, slurm {qs} s, ratio {float(qs) / float(ql):.2f}")
print("   outputs identical:", outputs(load("q-local")) == outputs(load("q-slurm")))
print(f"3. quickstart with a loopback S3 remote: wall local {qlr} s, slurm through the remote {qsr} s, ratio {float(qsr) / float(qlr):.2f}")
print("   outputs identical:", outputs(load("q-local-remote")) == outputs(load("q-slurm-remote")),
      "and equal to the runs without a remote:", outputs(load("q-local-remote")) == outputs(load("q-local")))
PY

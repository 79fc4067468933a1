#!/usr/bin/env bash
# Run a command beside a defined competing CPU load: N busy loops (default 1), each one core at
# 100%, started before the command and ended by their PIDs when it ends, however it ends (a
# failure, Ctrl-C or SIGTERM), so no loop outlives it. Exits with the command's status.
#
#   scripts/busy.sh [-n N] COMMAND [ARGS...]
#   scripts/busy.sh scripts/test.sh                 # the test suite beside one busy core
#   scripts/busy.sh -n 1 target/release/tsr bench   # a benchmark under the same load
set -euo pipefail
n=1
if [ "${1:-}" = "-n" ]; then
  [ "$#" -ge 2 ] || { echo "busy.sh: -n needs a number" >&2; exit 2; }
  n="$2"
  shift 2
fi
[ "$#" -gt 0 ] || { echo "usage: scripts/busy.sh [-n N] COMMAND [ARGS...]" >&2; exit 2; }
case "$n" in ''|*[!0-9]*) echo "busy.sh: -n takes a whole number, not \`$n\`" >&2; exit 2 ;; esac

pids=()
cmd=""
stop() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  for p in "${pids[@]}"; do wait "$p" 2>/dev/null || true; done
}
# A signal to this script goes on to the command; the loops end when the script does.
forward() {
  [ -n "$cmd" ] && kill "-$1" "$cmd" 2>/dev/null
  true
}
trap stop EXIT
# (a background command ignores SIGINT in a script: it gets SIGTERM for both)
trap 'forward TERM' INT
trap 'forward TERM' TERM
for _ in $(seq "$n"); do
  # A loop of shell builtins: no child processes, nothing to leave behind.
  ( trap - EXIT INT TERM; while :; do :; done ) &
  pids+=("$!")
done
echo "busy.sh: ${#pids[@]} busy loop(s), pid(s) ${pids[*]}" >&2
"$@" &
cmd=$!
# wait returns early when a trapped signal arrives: wait again until the command has ended.
rc=0
while :; do
  wait "$cmd" && rc=0 || rc=$?
  kill -0 "$cmd" 2>/dev/null || break
done
exit "$rc"

#!/usr/bin/env bash
# Runs this build's per-CPU-kind fixture tests, or makes their fixtures, as an x86-64 CPU with
# AVX2 and FMA and no AVX-512 would, on a machine that has AVX-512: under qemu-user, as an AMD
# EPYC Zen 3 ("EPYC-Milan"), the kind the AVX2 fixtures were first made on.
#
# Why this is needed: the digests in tests/fixtures/goldens/ and tests/fixtures/old-stores/ depend
# on the kind of CPU (gemm's kernels add in another order with AVX-512 than with AVX2), so an
# intended change of results is blessed once per kind. Two things choose the arithmetic:
#   - the vector features (CPUID), which qemu-user emulates: AVX2 and FMA, no AVX-512;
#   - the L1 data cache's size and associativity, from which gemm sizes the slices of a
#     product's inner dimension it adds at a time (longer than 512 that matters: a judge prompt's
#     attention over its tokens). gemm reads them from /sys/devices/system/cpu, so they are set to
#     a Zen 3's (32 KiB, 8-way L1d; 512 KiB, 8-way L2) for the command only, in a private mount
#     namespace.
# Checked against fixtures made on a real Zen 3: every test of tests/goldens.rs and
# tests/old_store.rs passes this way, and without the cache geometry the logprob judges' scores
# differed in their last bits.
#
# Usage:
#   scripts/as-avx2.sh [--l1d SIZE:WAYS] test [CARGO_TEST_ARGS...] [-- TEST_ARGS...]
#       builds the tests (`cargo test --release --no-run ARGS`) and runs each test binary under
#       the emulation, with TSR_TEST_EXE pointing at this build's tsr under the same emulation.
#       e.g.  scripts/as-avx2.sh test --test goldens --test old_store
#       Bless the AVX2 goldens:  TSR_BLESS_GOLDENS=1 scripts/as-avx2.sh test --test goldens
#   scripts/as-avx2.sh [--l1d SIZE:WAYS] old-stores [REV]
#       scripts/old_store_golden.sh under the emulation, writing tests/fixtures/old-stores/KIND/.
#   --l1d SIZE:WAYS: another L1d than the Zen 3's 32K:8, e.g. 48K:12 (Intel's Ice Lake to Raptor
#       Lake cores): the fixture kind `avx2-l1d48k` (model/src/testing.rs, FIXTURE_KINDS).
#
# Needs qemu-user 7.2 or newer (the first with AVX2; Debian: apt-get install qemu-user) and the
# right to make a mount namespace (root, or unprivileged user namespaces). About 50x slower than
# native: on 2 cores tests/goldens.rs took 80-95 s, tests/old_store.rs 151-157 s (2026-12-08).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
die() { echo "as-avx2: $*" >&2; exit 1; }

[[ $(uname -m) == x86_64 ]] || die "this machine is $(uname -m); the emulation runs x86-64 binaries only"
command -v qemu-x86_64 >/dev/null \
    || die "qemu-x86_64 is missing: install qemu-user 7.2 or newer (Debian: apt-get install qemu-user), then run this again"
ver=$(qemu-x86_64 --version | sed -n 's/.*version \([0-9]*\)\.\([0-9]*\).*/\1 \2/p')
read -r major minor <<<"${ver:-0 0}"
if ((major < 7 || (major == 7 && minor < 2))); then
    die "qemu-x86_64 is version ${major}.${minor}; AVX2 needs 7.2 or newer"
fi
command -v unshare >/dev/null || die "unshare (util-linux) is missing"

# EPYC-Milan without the features qemu's TCG lacks (otherwise it warns on every start, on the
# standard error the tests read). None of them changes arithmetic.
cpu="EPYC-Milan"
for f in pcid invpcid rdseed sha-ni rdpid fsrm fxsr-opt misalignsse 3dnowprefetch osvw topoext \
    perfctr-core clzero xsaveerptr wbnoinvd ibpb ibrs amd-stibp amd-ssbd nrip-save xsavec xsaves; do
    cpu="$cpu,$f=off"
done

l1d=32K:8
if [[ ${1:-} == --l1d ]]; then
    l1d=${2:-}
    shift 2 || die "--l1d needs SIZE:WAYS, e.g. 48K:12"
fi
[[ $l1d =~ ^([0-9]+K):([0-9]+)$ ]] || die "--l1d $l1d: give SIZE:WAYS, e.g. 48K:12"

work=$(mktemp -d "${TMPDIR:-/tmp}/tsr-as-avx2.XXXXXX")
trap 'rm -rf "$work"' EXIT
echo "${BASH_REMATCH[1]}" >"$work/l1-size"
echo "${BASH_REMATCH[2]}" >"$work/l1-ways"
echo 512K >"$work/l2-size"
echo 8 >"$work/l2-ways"

# A wrapper that runs an x86-64 binary as the emulated CPU.
wrap() { # wrap NAME BINARY
    printf '#!/bin/sh\nexec qemu-x86_64 -cpu %s %q "$@"\n' "$cpu" "$2" >"$work/$1"
    chmod +x "$work/$1"
}

# Runs "$@" in a mount namespace where every CPU's L1d reads as --l1d gives (a Zen 3's by
# default) and its L2 as a Zen 3's.
with_zen3_caches() {
    local ns=(unshare -m)
    [[ $(id -u) -eq 0 ]] || ns=(unshare -r -m)
    "${ns[@]}" bash -c '
        set -e
        work=$1; shift
        for c in /sys/devices/system/cpu/cpu[0-9]*/cache; do
            for i in "$c"/index*; do
                case "$(cat "$i/level") $(cat "$i/type")" in
                    "1 Data") mount --bind "$work/l1-size" "$i/size"
                              mount --bind "$work/l1-ways" "$i/ways_of_associativity" ;;
                    "2 Unified") mount --bind "$work/l2-size" "$i/size"
                                 mount --bind "$work/l2-ways" "$i/ways_of_associativity" ;;
                esac
            done
        done
        exec "$@"' bash "$work" "$@"
}

mode=${1:-}
shift || true
case "$mode" in
test)
    cargo_args=()
    test_args=()
    while [[ $# -gt 0 ]]; do
        if [[ $1 == -- ]]; then
            shift
            test_args=("$@")
            break
        fi
        cargo_args+=("$1")
        shift
    done
    cd "$root"
    exes=$(cargo test --release --no-run --message-format=json "${cargo_args[@]}" \
        | python3 -c '
import json, sys
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m.get("profile", {}).get("test") and m.get("executable"):
        print(m["executable"])')
    [[ -n $exes ]] || die "cargo built no test binary for: ${cargo_args[*]}"
    [[ -x $root/target/release/tsr ]] || die "target/release/tsr is missing: build it (cargo build --release --bin tsr)"
    wrap tsr "$root/target/release/tsr"
    status=0
    for exe in $exes; do
        echo "as-avx2: $(basename "$exe") as an AVX2 CPU (EPYC-Milan under qemu-user, L1d $l1d)" >&2
        with_zen3_caches env TSR_TEST_EXE="$work/tsr" qemu-x86_64 -cpu "$cpu" "$exe" \
            "${test_args[@]}" || status=$?
    done
    exit "$status"
    ;;
old-stores)
    with_zen3_caches env TSR_RUN_AS="qemu-x86_64 -cpu $cpu" \
        "$root/scripts/old_store_golden.sh" "$@"
    ;;
*)
    die "usage: scripts/as-avx2.sh [--l1d SIZE:WAYS] test [CARGO_TEST_ARGS...] [-- TEST_ARGS...] | old-stores [REV]"
    ;;
esac

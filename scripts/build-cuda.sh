#!/usr/bin/env bash
# Builds tsr with CUDA (`--features cuda`) into target-cuda/release/tsr, stripped, ready to copy
# to a GPU machine. No GPU, driver or system CUDA is needed here. The CPU build is untouched:
# nothing in the repository changes (not Cargo.toml, not Cargo.lock).
#
#   scripts/build-cuda.sh            # CUDA_COMPUTE_CAP=90 (H100/H200) unless set
#
# 1. ../shared/scripts/cuda-toolchain.sh installs nvcc / headers / static cudart 13.0 from PyPI wheels
#    (cached) and prints the exports candle-kernels' build needs.
# 2. candle-core 0.11.1 asks cudarc for `dynamic-linking`, which needs libcuda.so at link time
#    (no wheel ships it) and makes the binary unable to start without a driver. A copy of the
#    registry source with that one word changed to `dynamic-loading` (cudarc then dlopens libcuda,
#    libcublas, libcublasLt, libcurand when a CUDA device is first opened) is kept in
#    $TSR_CUDA_CACHE (default ~/.cache/tsr/cuda).
# 3. The patch reaches cargo through `--config patch.crates-io...`, which rewrites the lockfile
#    (the patched candle-core has no registry source). So the build runs on a mirror of the
#    working tree (tracked and unignored files, mtimes kept, so rebuilds stay incremental) in the
#    cache folder, with its own Cargo.lock, and writes to this repository's target-cuda/
#    (git-ignored by `/target-*`).
# Cold build: about 8 min on 2 cores; a relink after a source change: seconds.
set -euo pipefail
REPO=$(cd "$(dirname "$0")/.." && pwd)
CACHE=${TSR_CUDA_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/tsr/cuda}
CANDLE_VERSION=0.11.1
PATCHED=$CACHE/candle-core-$CANDLE_VERSION-dynload
MIRROR=$CACHE/src
TARGET=$REPO/target-cuda
mkdir -p "$CACHE"

# (1) Toolchain. Not `eval "$(...)"`: that would hide a failure.
# The toolchain installer is provided beside the project (../shared/scripts), not copied into it.
toolchain="$REPO/../shared/scripts/cuda-toolchain.sh"
[ -x "$toolchain" ] || { echo "build-cuda: $toolchain not found (it ships in the shared/ folder beside the repository)" >&2; exit 1; }
env_lines=$("$toolchain")
eval "$env_lines"

# (2) The patched candle-core, made once from the registry source.
if [[ ! -f $PATCHED/.tsr-patched ]]; then
  (cd "$REPO" && cargo fetch --quiet)
  src=$(ls -d "${CARGO_HOME:-$HOME/.cargo}"/registry/src/*/candle-core-$CANDLE_VERSION 2>/dev/null | head -1)
  [[ -n $src ]] || { echo "build-cuda: candle-core $CANDLE_VERSION not in the cargo registry after cargo fetch" >&2; exit 1; }
  rm -rf "$PATCHED.tmp" && cp -a "$src" "$PATCHED.tmp"
  n=$(grep -c '"dynamic-linking"' "$PATCHED.tmp/Cargo.toml" || true)
  [[ $n == 1 ]] || { echo "build-cuda: expected one \"dynamic-linking\" in $src/Cargo.toml, found $n" >&2; exit 1; }
  sed -i 's/"dynamic-linking"/"dynamic-loading"/' "$PATCHED.tmp/Cargo.toml"
  touch "$PATCHED.tmp/.tsr-patched"
  rm -rf "$PATCHED" && mv "$PATCHED.tmp" "$PATCHED"
  echo "build-cuda: patched candle-core in $PATCHED" >&2
fi

# (3) Mirror the working tree (fresh each time, so deleted files do not linger) and build.
rm -rf "$MIRROR" && mkdir -p "$MIRROR"
(cd "$REPO" && git ls-files -z -co --exclude-standard \
   | while IFS= read -r -d '' f; do [[ -e $f ]] && printf '%s\0' "$f"; done \
   | tar --null -T - -cf -) | tar -xf - -C "$MIRROR"
# The release profile keeps line tables for CPU profiling; this binary is stripped instead.
cargo build --release --features cuda --bin tsr \
  --manifest-path "$MIRROR/Cargo.toml" --target-dir "$TARGET" \
  --config "patch.crates-io.candle-core.path=\"$PATCHED\"" \
  --config profile.release.debug=false --config profile.release.strip=true

# (4) Report.
BIN=$TARGET/release/tsr
size=$(stat -c %s "$BIN")
echo "build-cuda: $BIN ($(awk "BEGIN{printf \"%.1f\", $size/1048576}") MiB, sm_$CUDA_COMPUTE_CAP)"
(( size < 64 * 1024 * 1024 )) || echo "build-cuda: warning: over 64 MiB, too big to carry to the GPU machine in one go" >&2

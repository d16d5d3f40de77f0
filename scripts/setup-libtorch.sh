#!/usr/bin/env bash
# Installs libtorch 2.11.0 (the CPU part of PyPI's torch wheel, no CUDA libraries) into
# .venv-torch and points the stable link .libtorch at it, which .cargo/config.toml names as
# LIBTORCH. Idempotent: a second run only checks versions (well under a second).
# Recipe and pitfalls: see README "libtorch" and the team note libtorch-setup.md.
set -euo pipefail

TORCH_VERSION=2.11.0
# libtorch_cpu.so of this wheel links libcudart.so.13 and libcupti.so.13 even on CPU: these two
# small wheels provide them (found through torch's own RUNPATH $ORIGIN/../../nvidia/cu13/lib).
CUDA_RT=nvidia-cuda-runtime==13.0.96
CUPTI=nvidia-cuda-cupti==13.0.85

root=$(cd "$(dirname "$0")/.." && pwd)
venv="$root/.venv-torch"
link="$root/.libtorch"
py=${PYTHON:-python3}

die() { echo "setup-libtorch: error: $*" >&2; exit 1; }

installed_version() {
  # torch/version.py is written by the wheel: __version__ = '2.11.0' (maybe with a +local part)
  local f="$1/version.py"
  [[ -f $f ]] || return 1
  sed -n "s/^__version__ = '\([^'+]*\).*'$/\1/p" "$f" | head -n1
}

torch_dir() {
  local d
  for d in "$venv"/lib/python3*/site-packages/torch; do
    [[ -d $d/lib && -d $d/include ]] && { echo "$d"; return 0; }
  done
  return 1
}

ready() {
  local d v
  d=$(torch_dir) || return 1
  v=$(installed_version "$d") || return 1
  [[ $v == "$TORCH_VERSION" ]] || { echo "setup-libtorch: found torch $v in $venv, need $TORCH_VERSION: reinstalling" >&2; return 1; }
  compgen -G "$venv/lib/python3*/site-packages/nvidia/cu13/lib/libcudart.so.13*" >/dev/null || return 1
  compgen -G "$venv/lib/python3*/site-packages/nvidia/cu13/lib/libcupti.so.13*" >/dev/null || return 1
  return 0
}

if ! ready; then
  command -v "$py" >/dev/null || die "no '$py' on PATH: Python 3.9+ with venv is needed to fetch libtorch from PyPI"
  echo "setup-libtorch: installing torch==$TORCH_VERSION (CPU libraries only, about 1.3 GB) into $venv"
  [[ -x $venv/bin/pip ]] || "$py" -m venv "$venv" || die "could not create the venv $venv ('$py -m venv')"
  if ! "$venv/bin/pip" install --disable-pip-version-check --no-input --no-deps \
        "torch==$TORCH_VERSION" "$CUDA_RT" "$CUPTI"; then
    die "pip could not install torch==$TORCH_VERSION from the package registry.
  Is PyPI (or your PIP_INDEX_URL mirror) reachable from this machine? Try:
    $venv/bin/pip download --no-deps torch==$TORCH_VERSION -d /tmp/x
  Nothing is fetched from pytorch.org; only the registry is used."
  fi
  ready || die "torch==$TORCH_VERSION installed but its libraries are not where expected under $venv"
fi

d=$(torch_dir)
# A stable name for LIBTORCH: changing LIBTORCH's value makes cargo rebuild torch-sys (minutes).
if [[ $(readlink "$link" 2>/dev/null) != "$d" ]]; then
  ln -sfn "$d" "$link"
fi
echo "setup-libtorch: libtorch $(installed_version "$d") ready at $link -> $d"

#!/usr/bin/env bash
# Wheels the GPU machine lacks (its image has torch, transformers, accelerate, but not diffusers),
# for Python 3.12, into .whl/ (git-ignored), to carry with scripts/gpu-check.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .whl
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  -d .whl diffusers==0.42.1 importlib_metadata
ls .whl

#!/usr/bin/env bash
# GPU checks, run on the lent GPU machine (no Rust there): the binary is built here and carried.
#   here:  cargo build --release && scripts/fetch-gpu-wheels.sh
#   there: bash scripts/gpu-check.sh        (carry: target/release/runner, .whl)
# Prints: runner info (CUDA backend loaded, devices), the detected inventory of `runner plan`
# (NVML), and diffusers' measured working memory next to runner's estimates.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python3}
TORCH_LIB=$($PY -c 'import torch, os; print(os.path.dirname(torch.__file__))')/lib
export LD_LIBRARY_PATH=$TORCH_LIB${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
if ls .whl/*.whl >/dev/null 2>&1; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
fi
OUT=${OUT:-/tmp/gpu-check}
mkdir -p "$OUT"
echo "== nvidia-smi"; nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || true
echo "== runner info"; target/release/runner info --json | tee "$OUT/info.json"
echo "== runner plan (detected inventory: no max_memory)"
sed '/^max_memory/d' manifests/tiny-sdxl.toml > /tmp/tiny-detected.toml
sed -i 's#source = "../tests/fixtures/#source = "'"$PWD"'/tests/fixtures/#' /tmp/tiny-detected.toml
RUST_LOG=runner=debug target/release/runner plan /tmp/tiny-detected.toml --json | tee "$OUT/plan-detected.json"
echo "== diffusers working memory vs runner's estimates"
PYTHONUNBUFFERED=1 $PY tools/measure_working_memory.py 2>/dev/null | tee "$OUT/working-memory.jsonl"

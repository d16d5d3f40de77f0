#!/usr/bin/env bash
# Seconds per UNet step on the CPU, runner vs diffusers eager, same weights, same thread count,
# same run: the tiny SDXL fixture UNet (8x8 latents) and a mid-size random SDXL-shaped UNet
# (block_out_channels 160/320/640, transformer depth 1/2/4, 512x512 = 64x64 latents), batch 2 (CFG).
#   benches/unet_step.sh [THREADS] [PY]
set -euo pipefail
cd "$(dirname "$0")/.."
export BENCH_THREADS=${1:-1} OMP_NUM_THREADS=${1:-1}
PY=${2:-.venv-fixtures/bin/python}
MID=${BENCH_DIR:-/tmp/runner-bench}/sdxl-mid-unet
[[ -f $MID/config.json ]] || $PY benches/make_mid.py sdxl-unet "$MID"
cargo bench --bench unet_bench --no-run --locked 2>/dev/null
BIN=$(ls -t target/release/deps/unet_bench-* | grep -v '\.d$' | head -1)
for case in "tests/fixtures/tiny-sdxl/unet 8 2 20" "$MID 64 2 3"; do
  set -- $case
  echo "== $1 (latents $2x$2, batch $3, threads $BENCH_THREADS)"
  r=$("$BIN" "$@"); d=$($PY benches/unet_step_py.py "$@" 2>/dev/null)
  echo "$r"; echo "$d"
  python3 -c "import json,sys; r=json.loads(sys.argv[1]); d=json.loads(sys.argv[2]); print(f'ratio runner/diffusers (median): {r[\"median_s\"]/d[\"median_s\"]:.2f}')" "$r" "$d"
done

#!/usr/bin/env bash
# Layerwise casting overhead on the CPU (`storage_dtype`: fp8-e4m3 storage, fp32 compute) against no
# casting, runner vs diffusers (`enable_layerwise_casting(float8_e4m3fn, float32)`), same weights,
# same run, one thread: the mid-size random SDXL-shaped UNet of benches/unet_step.sh (64x64 latents,
# batch 2) and SD3 transformer of benches/sd3_step.sh (64x64 latents, batch 2, 333 text tokens).
# ROUNDS rounds of four processes per model (runner and diffusers, each without and with casting;
# which goes first rotates), ITERS forwards after a warm-up in each. Prints a JSON line per process,
# then per model: seconds per forward (median, min - max; wall and CPU time), the ratio fp8 / none
# of each side, and runner / diffusers for each storage.
#   benches/casting.sh [ROUNDS] [PY]     (ITERS, default 3; MODELS, default "unet sd3"; BENCH_THREADS, default 1)
set -euo pipefail
cd "$(dirname "$0")/.."
ROUNDS=${1:-3}
PY=${2:-.venv-fixtures/bin/python}
ITERS=${ITERS:-3}
MODELS=${MODELS:-unet sd3}
export BENCH_THREADS=${BENCH_THREADS:-1}
export OMP_NUM_THREADS=$BENCH_THREADS
DIR=${BENCH_DIR:-/tmp/runner-bench}
[[ -f $DIR/sdxl-mid-unet/config.json ]] || $PY benches/make_mid.py sdxl-unet "$DIR/sdxl-mid-unet"
[[ -f $DIR/sd3-mid-transformer/config.json ]] || $PY benches/make_mid.py sd3 "$DIR/sd3-mid-transformer"
cargo bench --bench unet_bench --bench sd3_bench --no-run --locked 2>/dev/null
bin() { ls -t target/release/deps/$1-* | grep -v '\.d$' | head -1; }
for model in $MODELS; do
  case $model in
    unet) args=("$DIR/sdxl-mid-unet" 64 2 "$ITERS"); r=$(bin unet_bench); d=benches/unet_step_py.py ;;
    sd3) args=("$DIR/sd3-mid-transformer" 64 2 333 "$ITERS"); r=$(bin sd3_bench); d=benches/sd3_step_py.py ;;
  esac
  echo "== $model: ${args[*]} (threads $BENCH_THREADS, $ROUNDS rounds x $ITERS forwards)"
  out=$(mktemp)
  sides=("runner none" "runner fp8-e4m3" "diffusers none" "diffusers fp8-e4m3")
  for round in $(seq "$ROUNDS"); do
    for k in 0 1 2 3; do
      set -- ${sides[$(( (round + k) % 4 ))]}
      storage=$([[ $2 == none ]] && echo "" || echo "$2")
      if [[ $1 == runner ]]; then BENCH_STORAGE=$storage "$r" "${args[@]}"; else BENCH_STORAGE=$storage $PY "$d" "${args[@]}" 2>/dev/null; fi \
        | sed "s/^{/{\"storage\": \"$2\", /" | tee -a "$out"
    done
  done
  python3 benches/summary.py casting "$out"
  rm -f "$out"
done

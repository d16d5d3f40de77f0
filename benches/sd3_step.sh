#!/usr/bin/env bash
# Seconds per SD3 transformer forward on the CPU, runner vs diffusers eager, same weights, same
# thread count, same run: the tiny SD3 fixture transformer (8x8 latents) and a mid-size random
# SD3-medium-shaped transformer (8 layers, 12 heads x 64, joint_attention_dim 1024,
# 512x512 = 64x64 latents), batch 2 (CFG), 77 + 256 text tokens. ROUNDS rounds, each one runner
# process and one diffusers process (which goes first alternates), ITERS forwards after a warm-up in
# each; the summary pools every forward of a side, by wall time and by the process's CPU time (which
# other work on a shared machine disturbs less).
#   benches/sd3_step.sh [ROUNDS] [PY]     (BENCH_THREADS, default 1; BENCH_DIR, default /tmp/runner-bench;
#                                         TOKENS, default 333 = 77 + T5's 256; CASES, default "tiny mid")
set -euo pipefail
cd "$(dirname "$0")/.."
ROUNDS=${1:-3}
PY=${2:-.venv-fixtures/bin/python}
export BENCH_THREADS=${BENCH_THREADS:-1}
export OMP_NUM_THREADS=$BENCH_THREADS
TOKENS=${TOKENS:-333}
CASES=${CASES:-tiny mid}
MID=${BENCH_DIR:-/tmp/runner-bench}/sd3-mid-transformer
[[ $CASES != *mid* || -f $MID/config.json ]] || $PY benches/make_mid.py sd3 "$MID"
cargo bench --bench sd3_bench --no-run --locked 2>/dev/null
BIN=$(ls -t target/release/deps/sd3_bench-* | grep -v '\.d$' | head -1)
for name in $CASES; do
  case $name in
    tiny) set -- tests/fixtures/tiny-sd3/transformer 8 2 "$TOKENS" 20 ;;
    mid) set -- "$MID" 64 2 "$TOKENS" 3 ;;
  esac
  echo "== $1 (latents $2x$2, batch $3, $4 text tokens, threads $BENCH_THREADS, $ROUNDS rounds x $5 forwards)"
  out=$(mktemp)
  for round in $(seq "$ROUNDS"); do
    if (( round % 2 )); then order="runner diffusers"; else order="diffusers runner"; fi
    for side in $order; do
      if [[ $side == runner ]]; then "$BIN" "$@"; else $PY benches/sd3_step_py.py "$@" 2>/dev/null; fi | tee -a "$out"
    done
  done
  python3 benches/summary.py step "$out"
  rm -f "$out"
done

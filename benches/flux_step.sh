#!/usr/bin/env bash
# Seconds per FLUX transformer forward on the CPU, runner vs diffusers eager, same weights, same
# thread count, same run: the tiny FLUX.1-dev fixture transformer (64x64 image: 16 image tokens,
# 512 text tokens) and a mid-size random FLUX.1-dev-shaped transformer (4 double + 8 single
# blocks, 12 heads x 64, joint_attention_dim 1024, guidance embedding; 512x512 = 1024 image tokens,
# 256 text tokens), batch 1 (FLUX has no CFG batch). ROUNDS rounds, each one runner process and
# one diffusers process (which goes first alternates), ITERS forwards after a warm-up in each; the
# summary pools every forward of a side, by wall time and by the process's CPU time.
#   benches/flux_step.sh [ROUNDS] [PY]     (BENCH_THREADS, default 1; BENCH_DIR, default /tmp/runner-bench)
set -euo pipefail
cd "$(dirname "$0")/.."
ROUNDS=${1:-3}
PY=${2:-.venv-fixtures/bin/python}
export BENCH_THREADS=${BENCH_THREADS:-1}
export OMP_NUM_THREADS=$BENCH_THREADS
MID=${BENCH_DIR:-/tmp/runner-bench}/flux-mid-transformer
[[ -f $MID/config.json ]] || $PY benches/make_mid.py flux "$MID"
cargo bench --bench flux_bench --no-run --locked 2>/dev/null
BIN=$(ls -t target/release/deps/flux_bench-* | grep -v '\.d$' | head -1)
for case in "tests/fixtures/tiny-flux-dev/transformer 8 512 20" "$MID 64 256 3"; do
  set -- $case
  echo "== $1 (latents $2x$2, $3 text tokens, threads $BENCH_THREADS, $ROUNDS rounds x $4 forwards)"
  out=$(mktemp)
  for round in $(seq "$ROUNDS"); do
    if (( round % 2 )); then order="runner diffusers"; else order="diffusers runner"; fi
    for side in $order; do
      if [[ $side == runner ]]; then "$BIN" "$@"; else $PY benches/flux_step_py.py "$@" 2>/dev/null; fi | tee -a "$out"
    done
  done
  python3 benches/summary.py step "$out"
  rm -f "$out"
done

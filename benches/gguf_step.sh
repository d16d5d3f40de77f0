#!/usr/bin/env bash
# Seconds per GGUF FLUX transformer forward on the CPU, runner vs diffusers' GGUFLinear, same file,
# same thread count, same run: the mid-size random FLUX.1-dev-shaped transformer of
# benches/flux_step.sh (4 double + 8 single blocks, inner 768; 512x512 = 1024 image tokens, 256
# text tokens, batch 1), quantized by `runner quantize` (city96's rules, diffusers' names) to each
# TYPE, compute dtype fp32. ROUNDS rounds, each one runner process and one diffusers process (which
# goes first alternates), ITERS forwards after a warm-up in each; the summary pools every forward.
#   benches/gguf_step.sh [ROUNDS] [ITERS] [TYPES] [PY]  (BENCH_THREADS, default 1; BENCH_DIR, default /tmp/runner-bench)
set -euo pipefail
cd "$(dirname "$0")/.."
ROUNDS=${1:-3}
ITERS=${2:-3}
TYPES=${3:-"q8_0 q4_0"}
PY=${4:-.venv-fixtures/bin/python}
export BENCH_THREADS=${BENCH_THREADS:-1}
export OMP_NUM_THREADS=$BENCH_THREADS RAYON_NUM_THREADS=$BENCH_THREADS
DIR=${BENCH_DIR:-/tmp/runner-bench}
MID=$DIR/flux-mid-transformer
[[ -f $MID/config.json ]] || $PY benches/make_mid.py flux "$MID"
cargo build --release --locked --bin runner --bin runner-torch 2>/dev/null
cargo bench --bench flux_bench --no-run --locked 2>/dev/null
BIN=$(ls -t target/release/deps/flux_bench-* | grep -v '\.d$' | head -1)
for ty in $TYPES; do
  gguf=$DIR/flux-mid-$ty.gguf
  [[ -f $gguf ]] || target/release/runner quantize "$MID" --type "$ty" --keys diffusers --out "$gguf" >/dev/null
  echo "== $ty: $gguf ($(du -h --apparent-size "$gguf" | cut -f1)), latents 64x64, 256 text tokens, threads $BENCH_THREADS, $ROUNDS rounds x $ITERS forwards"
  out=$(mktemp)
  for round in $(seq "$ROUNDS"); do
    if (( round % 2 )); then order="runner diffusers"; else order="diffusers runner"; fi
    for side in $order; do
      if [[ $side == runner ]]; then "$BIN" "$MID" 64 256 "$ITERS" "$gguf"; else $PY benches/flux_step_py.py "$MID" 64 256 "$ITERS" "$gguf" 2>/dev/null; fi | tee -a "$out"
    done
  done
  python3 benches/summary.py step "$out"
  rm -f "$out"
done

#!/usr/bin/env bash
# Tiny SD3 end to end on the CPU, runner vs diffusers, same folder (tests/fixtures/tiny-sd3), fp32,
# 64x64, 28 steps, guidance 7.0, seed 0, one thread each, ROUNDS rounds interleaved (which side
# goes first alternates):
# - runner: one `runner run --json` process per round; in-process call = timings.encode_s +
#   denoise_s + decode_s (a fresh process: its first call), whole process = wall time and CPU time
#   (user + system) of the process.
# - diffusers: StableDiffusion3Pipeline.from_pretrained, one warm-up call, then ITERS timed calls
#   (in-process); whole process = process start to the end of the warm-up call's image save (wall,
#   and the process's CPU time to then).
#   benches/sd3_pipeline.sh [ROUNDS] [PY]    (ITERS, default 2; BENCH_THREADS, default 1;
#   MSL, T5's max_sequence_length, default 256 as in diffusers: the text tokens are 77 + MSL;
#   BREAKDOWN=1: diffusers' call by part, timed in-process: benches/pipeline_py.py)
set -euo pipefail
cd "$(dirname "$0")/.."
ROUNDS=${1:-3}
PY=${2:-.venv-fixtures/bin/python}
ITERS=${ITERS:-2}
MSL=${MSL:-256}
export BENCH_THREADS=${BENCH_THREADS:-1}
export OMP_NUM_THREADS=$BENCH_THREADS
DIR=${BENCH_DIR:-/tmp/runner-bench}
mkdir -p "$DIR"
M=$DIR/tiny-sd3-28-msl$MSL.toml
cat > "$M" <<TOML
schema_version = 1
name = "tiny-sd3-bench"
[pipeline]
kind = "stable-diffusion-3"
source = "$PWD/tests/fixtures/tiny-sd3"
dtype = "fp32"
[placement]
max_memory = { cpu = "4GiB" }
[run]
prompt = "a photo of a cat"
negative_prompt = ""
guidance_scale = 7.0
steps = 28
seed = 0
width = 64
height = 64
max_sequence_length = $MSL
threads = $BENCH_THREADS
output = "$DIR/tiny-sd3-msl$MSL-runner.png"
TOML
cargo build --release --locked 2>/dev/null
out=$(mktemp)
echo "== tiny SD3 pipeline (64x64, 28 steps, guidance 7.0, fp32, max_sequence_length $MSL, threads $BENCH_THREADS, $ROUNDS rounds)"
for round in $(seq "$ROUNDS"); do
  if (( round % 2 )); then order="runner diffusers"; else order="diffusers runner"; fi
  for side in $order; do
    if [[ $side == runner ]]; then
      python3 benches/time_runner.py "$M"
    else
      $PY benches/pipeline_py.py StableDiffusion3Pipeline 7.0 tests/fixtures/tiny-sd3 "$ITERS" "$MSL" "$DIR/tiny-sd3-msl$MSL-diffusers.png" 2>/dev/null
    fi | tee -a "$out"
  done
done
python3 benches/summary.py pipeline "$out"
rm -f "$out"
# Same work on both sides: the two images (uint8 PNGs) should agree.
$PY -c 'import sys, numpy as np; from PIL import Image; a, b = (np.asarray(Image.open(p), dtype=np.int16) for p in sys.argv[1:]); print(f"images: max |runner - diffusers| = {np.abs(a - b).max()} / 255")' "$DIR/tiny-sd3-msl$MSL-runner.png" "$DIR/tiny-sd3-msl$MSL-diffusers.png"

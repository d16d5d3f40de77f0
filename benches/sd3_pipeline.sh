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
#   MSL, T5's max_sequence_length, default 256 as in diffusers: the text tokens are 77 + MSL)
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
      python3 - "$M" <<'PYEOF'
import json, resource, subprocess, sys, time
cpu = lambda: (lambda r: r.ru_utime + r.ru_stime)(resource.getrusage(resource.RUSAGE_CHILDREN))
s, c = time.perf_counter(), cpu()
j = subprocess.run(["target/release/runner", "run", sys.argv[1], "--json", "--quiet"], check=True, capture_output=True, text=True).stdout
wall, cpu_s = time.perf_counter() - s, cpu() - c
t = json.loads(j)["timings"]
print(json.dumps({"impl": "runner", "call_s": round(t["encode_s"] + t["denoise_s"] + t["decode_s"], 4), "wall_s": round(wall, 4), "cpu_s": round(cpu_s, 4), "timings": t}))
PYEOF
    else
      $PY benches/sd3_pipeline_py.py tests/fixtures/tiny-sd3 "$ITERS" "$MSL" "$DIR/tiny-sd3-msl$MSL-diffusers.png" 2>/dev/null
    fi | tee -a "$out"
  done
done
python3 - "$out" <<'PYEOF'
import json, statistics, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
r = [x for x in rows if x["impl"] == "runner"]
d = [x for x in rows if x["impl"] == "diffusers"]
rc, rw = [x["call_s"] for x in r], [x["wall_s"] for x in r]
dc, dw = [t for x in d for t in x["times_s"]], [x["process_to_image_s"] for x in d]
ru, du = [x["cpu_s"] for x in r], [x["process_to_image_cpu_s"] for x in d]
med = statistics.median
print(f"in-process call   runner median {med(rc):.3f} s min {min(rc):.3f} s | diffusers median {med(dc):.3f} s min {min(dc):.3f} s | ratio median {med(rc) / med(dc):.2f} min {min(rc) / min(dc):.2f}")
print(f"whole process     runner median {med(rw):.3f} s min {min(rw):.3f} s | diffusers median {med(dw):.3f} s min {min(dw):.3f} s | ratio median {med(rw) / med(dw):.2f} min {min(rw) / min(dw):.2f}")
print(f"whole process CPU runner median {med(ru):.3f} s min {min(ru):.3f} s | diffusers median {med(du):.3f} s min {min(du):.3f} s | ratio median {med(ru) / med(du):.2f} min {min(ru) / min(du):.2f}")
PYEOF
rm -f "$out"
# Same work on both sides: the two images (uint8 PNGs) should agree.
$PY -c 'import sys, numpy as np; from PIL import Image; a, b = (np.asarray(Image.open(p), dtype=np.int16) for p in sys.argv[1:]); print(f"images: max |runner - diffusers| = {np.abs(a - b).max()} / 255")' "$DIR/tiny-sd3-msl$MSL-runner.png" "$DIR/tiny-sd3-msl$MSL-diffusers.png"

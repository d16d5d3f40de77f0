#!/usr/bin/env bash
# SDXL 1024x1024, 30 steps, fp16, random real-size weights: runner vs diffusers on the same card.
# Prints each side's JSON, the image difference, and the table of BENCHMARKS.md "SDXL on CUDA" with
# the ratio runner / diffusers.
#   here:  cargo build --release && scripts/fetch-gpu-wheels.sh
#   there: bash scripts/gpu-sdxl.sh        (carry: target/release/runner, target/release/runner-torch, .whl)
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python3}
export LD_LIBRARY_PATH=$($PY -c 'import torch, os; print(os.path.dirname(torch.__file__))')/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
if ls .whl/*.whl >/dev/null 2>&1; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
fi
OUT=${OUT:-/tmp/gpu-sdxl}
mkdir -p "$OUT"
STEPS=${STEPS:-30}
PYTHONUNBUFFERED=1 $PY tools/gpu_sdxl_compare.py "$OUT" "$STEPS" 2>/dev/null | tee "$OUT/diffusers-sdxl.json"
cat > /tmp/sdxl-random.toml <<TOML
schema_version = 1
name = "sdxl-random"
[pipeline]
kind = "stable-diffusion-xl"
source = "/tmp/sdxl-random"
dtype = "fp16"
scheduler = "euler"
[placement]
max_memory = { "cuda:0" = "120GiB" }
[run]
prompt = "a cute dog running on the grass"
negative_prompt = ""
steps = $STEPS
guidance_scale = 5.0
seed = 0
width = 1024
height = 1024
TOML
# Peak VRAM of the runner process from nvidia-smi (context + caching allocator included).
nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -lms 50 > /tmp/vram.log &
SMI=$!
sleep 0.3
base=$(head -1 /tmp/vram.log)
target/release/runner run /tmp/sdxl-random.toml --quiet --json --out "$OUT/runner-sdxl.png" --dump /tmp/dump-sdxl | tee "$OUT/runner-sdxl.json" | tr -d '\n'; echo
kill $SMI
echo "{\"runner_peak_vram_mib\": $(sort -n /tmp/vram.log | tail -1), \"baseline_mib\": $base}" | tee "$OUT/runner-vram.json"
$PY - "$OUT" <<'PY'
import json, sys
import numpy as np
from safetensors.numpy import load_file
out = sys.argv[1]
ours = load_file("/tmp/dump-sdxl/dump.safetensors")["image"]
theirs = np.load(f"{out}/diffusers-sdxl.npy")
d = np.abs(ours - theirs)
print(json.dumps({"image_max_abs_diff": float(d.max()), "image_mean_abs_diff": float(d.mean()), "finite": bool(np.isfinite(ours).all() and np.isfinite(theirs).all()),
                  "diffusers_pixels_min": float(theirs.min()), "diffusers_pixels_max": float(theirs.max()), "diffusers_pixels_std": float(theirs.std())}))
# The table of BENCHMARKS.md "SDXL on CUDA", with the ratio.
r = json.load(open(f"{out}/runner-sdxl.json"))
t = r["timings"]
dj = json.loads(open(f"{out}/diffusers-sdxl.json").read().strip().splitlines()[-1])
v = json.load(open(f"{out}/runner-vram.json"))
call = t["encode_s"] + t["denoise_s"] + t["decode_s"]
print(f"| | runner | diffusers |\n|---|---|---|")
print(f"| one UNet call, steady state (batch 2) | {t['seconds_per_step'] * 1e3:.1f} ms | not measured separately |")
print(f"| first UNet call (CUDA warm-up) | {t['first_step_s']:.2f} s | paid in the warm-up run |")
print(f"| {dj['steps']} steps incl. encode + decode | {t['denoise_s']:.2f} + {t['encode_s']:.2f} + {t['decode_s']:.2f} s = {call:.2f} s | {dj['total_s']:.2f} s (text encode, {dj['steps']} steps, decode) |")
print(f"| load (from the page cache) | {t['load_s']:.2f} s | not measured |")
print(f"| peak VRAM | {v['runner_peak_vram_mib'] / 1024:.1f} GiB per nvidia-smi (process total) | {dj['peak_vram_allocated'] / 1e9:.1f} GB allocated / {dj['peak_vram_reserved'] / 1e9:.1f} GB reserved (torch) |")
print(f"ratio runner / diffusers, encode + denoise + decode: {call / dj['total_s']:.2f}")
PY
rm -rf /tmp/sdxl-random /tmp/dump-sdxl

#!/usr/bin/env bash
# GPU checks, run on the lent GPU machine (no Rust there): the binary is built here and carried.
#   here:  cargo build --release && scripts/fetch-gpu-wheels.sh
#   there: bash scripts/gpu-sd15.sh         (carry: target/release/runner, target/release/runner-torch, .whl)
# Prints: runner info (CUDA backend loaded, devices), the detected inventory of `runner plan`
# (NVML), and diffusers' measured working memory next to runner's estimates; real-size SD 1.5 on
# runner and diffusers; then the tables BENCHMARKS.md shows, with the ratios.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python3}
TORCH_LIB=$($PY -c 'import torch, os; print(os.path.dirname(torch.__file__))')/lib
export LD_LIBRARY_PATH=$TORCH_LIB${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
if ls .whl/*.whl >/dev/null 2>&1; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
fi
OUT=${OUT:-/tmp/gpu-sd15}
mkdir -p "$OUT"
echo "== nvidia-smi"; nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || true
echo "== runner info"; target/release/runner info --json | tee "$OUT/info.json"
echo "== runner plan (detected inventory: no max_memory)"
sed '/^max_memory/d' manifests/tiny-sdxl.toml > /tmp/tiny-detected.toml
sed -i 's#source = "../tests/fixtures/#source = "'"$PWD"'/tests/fixtures/#' /tmp/tiny-detected.toml
RUST_LOG=runner=debug target/release/runner plan /tmp/tiny-detected.toml --json | tee "$OUT/plan-detected.json"
echo "== diffusers working memory vs runner's estimates"
PYTHONUNBUFFERED=1 $PY tools/measure_working_memory.py 2>/dev/null | tee "$OUT/working-memory.jsonl"
echo "== runner run on CUDA: tiny SD 1.5 in fp16 and bf16"
for dt in fp16 bf16; do
  target/release/runner run manifests/tiny-sd15.toml --quiet --json --out "$OUT/tiny-$dt.png" \
    --set 'placement.max_memory."cuda:0"=8GiB' --set pipeline.dtype=$dt --set components.safety_checker.enabled=false \
    | tee "$OUT/tiny-$dt.json" | tr -d '\n'; echo
done
echo "== real-size SD 1.5 (random weights, fp16, 512x512, PNDM): diffusers vs runner on the same folder"
STEPS=${STEPS:-10}
PYTHONUNBUFFERED=1 $PY tools/gpu_sd15_compare.py "$OUT" "$STEPS" 2>/dev/null | tee "$OUT/diffusers-sd15.json"
cat > /tmp/sd15-random.toml <<TOML
schema_version = 1
name = "sd15-random"
[pipeline]
kind = "stable-diffusion"
source = "/tmp/sd15-random"
dtype = "fp16"
[placement]
max_memory = { "cuda:0" = "60GiB" }
[run]
prompt = "a photo of a cat"
negative_prompt = ""
steps = $STEPS
guidance_scale = 7.5
seed = 0
width = 512
height = 512
TOML
for i in 1 2; do
  target/release/runner run /tmp/sd15-random.toml --quiet --json --out "$OUT/runner-sd15.png" --dump /tmp/dump | tee "$OUT/runner-sd15-$i.json" | tr -d '\n'; echo
done
$PY - "$OUT" <<'PY'
import json, sys
import numpy as np
from safetensors.numpy import load_file
out = sys.argv[1]
ours = load_file("/tmp/dump/dump.safetensors")["image"]
theirs = np.load(f"{out}/diffusers-sd15.npy")
d = np.abs(ours - theirs)
print(json.dumps({"image_max_abs_diff": float(d.max()), "image_mean_abs_diff": float(d.mean()), "finite": bool(np.isfinite(ours).all())}))
PY
echo "== summary (the tables of BENCHMARKS.md \"Working-memory estimates\" and \"Executor on CUDA\")"
$PY - "$OUT" <<'PY'
import json, sys
out = sys.argv[1]
print("| component | size | b | dtype | measured MB | runner MB | error |\n|---|---|---|---|---|---|---|")
for line in open(f"{out}/working-memory.jsonl"):
    r = json.loads(line)
    if "measured_mb" in r:
        print(f"| {r['component']} | {r.get('size', '-')} | {r.get('batch_eff', r.get('batch'))} | {r.get('dtype', 'torch.float16').removeprefix('torch.')} | {r['measured_mb']} | {r['estimate_mb']} | {r['error']} |")
d = json.loads(open(f"{out}/diffusers-sd15.json").read().strip().splitlines()[-1])
print(f"\ndiffusers: {d['seconds_per_step'] * 1e3:.1f} ms per UNet call (a {d['steps']}-step call after a warm-up, / (steps + 1))")
for i in (1, 2):
    t = json.load(open(f"{out}/runner-sd15-{i}.json"))["timings"]
    print(f"runner run {i}: {t['seconds_per_step'] * 1e3:.1f} ms per UNet call after the first (ratio to diffusers {t['seconds_per_step'] / d['seconds_per_step']:.2f}), first call {t['first_step_s']:.2f} s")
PY
rm -rf /tmp/sd15-random /tmp/dump

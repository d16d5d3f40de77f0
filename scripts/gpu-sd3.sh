#!/usr/bin/env bash
# SD3-medium 1024x1024, 28 steps, fp16, random real-size weights (T5 in shards): runner vs diffusers
# on the same card, each mode in fresh processes: time, caching-allocator peak reserved since
# process start on both sides (and their ratio), image difference. Modes: `none` (everything on
# the GPU) and `t5-group` (T5 streamed block by block: runner `components.text_encoder_3.offload =
# "group"`, diffusers `enable_group_offload` on T5).
#   here:  cargo build --release && scripts/fetch-gpu-wheels.sh
#   there: bash scripts/gpu-sd3.sh        (carry: target/release/runner, target/release/runner-torch, .whl)
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python3}
export LD_LIBRARY_PATH=$($PY -c 'import torch, os; print(os.path.dirname(torch.__file__))')/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
if ls .whl/*.whl >/dev/null 2>&1; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
fi
OUT=${OUT:-/tmp/gpu-sd3}
STEPS=${STEPS:-28}
FOLDER=/tmp/sd3-random
mkdir -p "$OUT"
status=0
PYTHONUNBUFFERED=1 $PY tools/gpu_sd3_compare.py build $FOLDER 2>/dev/null || { echo "building the random SD3 folder failed"; exit 1; }
cat > /tmp/sd3-random.toml <<TOML
schema_version = 1
name = "sd3-random"
[pipeline]
kind = "stable-diffusion-3"
source = "$FOLDER"
dtype = "fp16"
[placement]
max_memory = { "cuda:0" = "120GiB", cpu = "100GiB" }
[run]
prompt = "a cute dog running on the grass"
negative_prompt = ""
steps = $STEPS
guidance_scale = 7.0
max_sequence_length = 256
seed = 0
width = 1024
height = 1024
TOML
for mode in none t5-group; do
  echo "-- $mode"
  $PY tools/gpu_sd3_compare.py run $FOLDER "$OUT" "$STEPS" $mode 2>/dev/null | tee "$OUT/diffusers-$mode.json" || status=1
  set_t5=$([ $mode = t5-group ] && echo "components.text_encoder_3.offload=group" || echo "run.seed=0")
  target/release/runner run /tmp/sd3-random.toml --quiet --json --set "$set_t5" --out "$OUT/runner-$mode.png" --dump "$OUT/dump-$mode" > "$OUT/runner-$mode.json" || { echo "runner $mode FAILED"; status=1; continue; }
  $PY - "$OUT" "$mode" <<'PY'
import json, sys
import numpy as np
from safetensors.numpy import load_file
out, mode = sys.argv[1], sys.argv[2]
r = json.load(open(f"{out}/runner-{mode}.json"))
t = r["timings"]
print(json.dumps({"runner": {"load_s": t["load_s"], "encode_s": t["encode_s"], "denoise_s": t["denoise_s"], "first_step_s": t["first_step_s"], "seconds_per_step": t["seconds_per_step"], "decode_s": t["decode_s"],
                             "allocator": r["devices"]["cuda:0"]["allocator"]}}))
try:
    d = json.loads(open(f"{out}/diffusers-{mode}.json").read().strip().splitlines()[-1])
    ours = r["devices"]["cuda:0"]["allocator"]["peak_reserved_bytes"]
    print(json.dumps({"mode": mode, "peak_reserved_runner": ours, "peak_reserved_diffusers": d["peak_vram_reserved_process"], "ratio": round(ours / d["peak_vram_reserved_process"], 3),
                      "denoise_per_step_runner": round(t["denoise_s"] / max(r["unet_calls"], 1), 4), "diffusers_total_per_step": d["seconds_per_step_incl_encode_decode"]}))
    img = load_file(f"{out}/dump-{mode}/dump.safetensors")["image"]
    theirs = np.load(f"{out}/diffusers-{mode}.npy")
    diff = np.abs(img - theirs)
    print(json.dumps({"mode": mode, "image_max_abs_diff_vs_diffusers": float(diff.max()), "image_mean_abs_diff": float(diff.mean())}))
except Exception as e:
    print(json.dumps({"mode": mode, "compare_error": str(e)}))
PY
  rm -rf "$OUT/dump-$mode"
done
rm -rf $FOLDER
exit $status

#!/usr/bin/env bash
# FLUX.1-dev 1024x1024, bf16, random real-size weights (transformer and T5 in shards): runner vs
# diffusers on the same card, each mode in fresh processes: seconds per step (runner: the
# transformer's step time; diffusers: the transformer's call time from hooks, and the whole call /
# steps), caching-allocator peak reserved since process start on both sides (and their ratio), image
# difference. Modes: none, model, group (runner: `components.transformer.offload = "group"` and
# T5's; diffusers: enable_group_offload block_level with a side stream on both), sequential.
# Goals (issue 15): none <= 1.0x diffusers' time; group <= 1.5x runner's no-offload time with peak
# VRAM <= 12 GB. Issue 16: group-fp8 (fp8-e4m3 layerwise storage + group offload) <= diffusers' same
# settings on peak VRAM and time per step. Issue 26: gguf-q8_0 and gguf-q4_0 (the transformer from a
# `runner quantize`d file in city96's original names, everything on the GPU) against diffusers'
# GGUF pipeline (GGUFLinear, compute bf16): time per step and peak reserved VRAM.
#   here:  cargo build --release && scripts/fetch-gpu-wheels.sh
#   there: bash scripts/gpu-flux.sh        (carry: target/release/runner, target/release/runner-torch, .whl; STEPS, default 8;
#          MODES, default "none group group-fp8 model sequential gguf-q8_0 gguf-q4_0")
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python3}
export LD_LIBRARY_PATH=$($PY -c 'import torch, os; print(os.path.dirname(torch.__file__))')/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
if ls .whl/*.whl >/dev/null 2>&1; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
fi
OUT=${OUT:-/tmp/gpu-flux}
STEPS=${STEPS:-8}
MODES=${MODES:-none group group-fp8 model sequential gguf-q8_0 gguf-q4_0}
FOLDER=/tmp/flux-random
mkdir -p "$OUT"
status=0
[[ -f $FOLDER/model_index.json ]] || PYTHONUNBUFFERED=1 $PY tools/gpu_flux_compare.py build $FOLDER 2>/dev/null || { echo "building the random FLUX folder failed"; exit 1; }
cat > /tmp/flux-random.toml <<TOML
schema_version = 1
name = "flux-random"
[pipeline]
kind = "flux"
source = "$FOLDER"
dtype = "bf16"
[placement]
max_memory = { "cuda:0" = "120GiB", cpu = "100GiB" }
[run]
prompt = "A cat holding a sign that says hello world"
steps = $STEPS
guidance_scale = 3.5
max_sequence_length = 512
seed = 0
width = 1024
height = 1024
TOML
for mode in $MODES; do
  echo "-- $mode"
  if [[ $mode == gguf-* ]]; then
    gguf=$FOLDER/transformer-${mode#gguf-}.gguf
    [[ -f $gguf ]] || target/release/runner quantize "$FOLDER/transformer" --type "${mode#gguf-}" --keys original --out "$gguf" >/dev/null || { echo "quantize ${mode#gguf-} FAILED"; status=1; continue; }
  fi
  $PY tools/gpu_flux_compare.py run $FOLDER "$OUT" "$STEPS" $mode 2>/dev/null | tee "$OUT/diffusers-$mode.json" || status=1
  case $mode in
    none) sets=(--set run.seed=0) ;;
    group) sets=(--set components.transformer.offload=group --set components.text_encoder_2.offload=group) ;;
    group-fp8) sets=(--set components.transformer.offload=group --set components.text_encoder_2.offload=group --set components.transformer.storage_dtype=fp8-e4m3) ;;
    gguf-*) sets=(--set "components.transformer.source=\"$gguf\"") ;;
    *) sets=(--set placement.offload=$mode) ;;
  esac
  target/release/runner run /tmp/flux-random.toml --quiet --json "${sets[@]}" --out "$OUT/runner-$mode.png" --dump "$OUT/dump-$mode" > "$OUT/runner-$mode.json" || { echo "runner $mode FAILED"; status=1; continue; }
  $PY - "$OUT" "$mode" <<'PY'
import json, sys
import numpy as np
from safetensors.numpy import load_file
out, mode = sys.argv[1], sys.argv[2]
r = json.load(open(f"{out}/runner-{mode}.json"))
t = r["timings"]
alloc = r["devices"]["cuda:0"]["allocator"]
print(json.dumps({"runner": {"load_s": t["load_s"], "encode_s": t["encode_s"], "denoise_s": t["denoise_s"], "seconds_per_step": t["seconds_per_step"], "decode_s": t["decode_s"], "allocator": alloc}}))
try:
    d = json.loads(open(f"{out}/diffusers-{mode}.json").read().strip().splitlines()[-1])
    ours = alloc["peak_reserved_bytes"]
    print(json.dumps({"mode": mode, "peak_reserved_runner_GB": round(ours / 1e9, 2), "peak_reserved_diffusers_GB": round(d["peak_vram_reserved_process"] / 1e9, 2),
                      "vram_ratio": round(ours / d["peak_vram_reserved_process"], 3), "step_runner_s": t["seconds_per_step"],
                      "transformer_call_diffusers_s": d["transformer_call_median_s"], "time_ratio": round(t["seconds_per_step"] / d["transformer_call_median_s"], 3)}))
    img = load_file(f"{out}/dump-{mode}/dump.safetensors")["image"]
    diff = np.abs(img - np.load(f"{out}/diffusers-{mode}.npy"))
    print(json.dumps({"mode": mode, "image_max_abs_diff_vs_diffusers": float(diff.max()), "image_mean_abs_diff": float(diff.mean())}))
except Exception as e:
    print(json.dumps({"mode": mode, "compare_error": str(e)}))
PY
  rm -rf "$OUT/dump-$mode"
done
rm -rf $FOLDER
exit $status

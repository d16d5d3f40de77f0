#!/usr/bin/env bash
# The offload issue's GPU check (< 8 minutes on one H100), run on the lent GPU machine, which has
# python torch but no Rust: the binary is built here and carried.
#   here:  cargo build --release && scripts/fetch-gpu-wheels.sh
#   there: bash scripts/gpu-check.sh        (carry: target/release/runner, target/release/runner-torch, .whl)
# 1. CUDA smoke tests: `runner info`, the tiny SD 1.5 and SDXL pipelines on cuda:0 under every
#    offload mode (PNGs must be byte-identical to no offload).
# 2. Real-size SDXL (random fp16 weights), 1024x1024, STEPS steps, under none / model / group /
#    sequential: runner and diffusers on the same folder and card, one process per run, each
#    with its wall time, the process's peak VRAM as nvidia-smi sees it (CUDA context included, the
#    same measure for both), both sides' caching-allocator peak reserved since process start
#    (runner: `run --json` devices.cuda:0.allocator; diffusers: torch.cuda.max_memory_reserved())
#    and their ratio; runner's image against diffusers'; runner's load rate (weights on cuda:0
#    over load_s, from the page cache: the folder was just written) against the host-to-device
#    bandwidth torch measures on the same card.
# 3. The summary table of part 2 (tools/gpu_offload_summary.py): times, VRAM and their ratios.
# Other GPU scripts: gpu-sd15.sh (executor parity, working memory), gpu-sdxl.sh, gpu-split.sh,
# gpu-sd3.sh (real-size SD3-medium and T5 group offload vs diffusers; not run yet).
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python3}
export LD_LIBRARY_PATH=$($PY -c 'import torch, os; print(os.path.dirname(torch.__file__))')/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
if ls .whl/*.whl >/dev/null 2>&1; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
fi
OUT=${OUT:-/tmp/gpu-check}
STEPS=${STEPS:-4}
MODES=${MODES:-none model group group-stream sequential}
mkdir -p "$OUT"
status=0
echo "== nvidia-smi"; nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || true
echo "== runner info"; target/release/runner info --json | tr -d '\n'; echo

echo "== tiny pipelines on cuda:0, every offload mode"
for m in tiny-sd15 tiny-sdxl; do
  sed 's/^max_memory = .*/max_memory = { "cuda:0" = "8GiB", cpu = "8GiB" }/; s#source = "../tests/#source = "'"$PWD"'/tests/#' "manifests/$m.toml" > "/tmp/gpu-$m.toml"
  for mode in none model group group-stream sequential; do
    # group-stream: `group` with its prefetch on a side CUDA stream (opt-in until checked here).
    RUNNER_PREFETCH_STREAM=$([ $mode = group-stream ] && echo 1 || echo 0) \
    target/release/runner run "/tmp/gpu-$m.toml" --quiet --json --set "placement.offload=${mode%-stream}" --out "$OUT/$m-$mode.png" > "$OUT/$m-$mode.json" 2> "$OUT/$m-$mode.err" \
      || { echo "$m $mode: FAILED"; tail -5 "$OUT/$m-$mode.err"; status=1; continue; }
    same=$(cmp -s "$OUT/$m-none.png" "$OUT/$m-$mode.png" && echo "same image" || echo "IMAGE DIFFERS")
    [ "$same" = "same image" ] || status=1
    $PY -c 'import json,sys; r=json.load(open(sys.argv[1])); print(sys.argv[2], sys.argv[3], sys.argv[4], {d: u["peak_bytes"] for d, u in r["devices"].items()})' "$OUT/$m-$mode.json" "$m" "$mode" "$same"
  done
done

echo "== host-to-device bandwidth (1 GiB, pageable and pinned; torch) for the load-rate goal"
$PY - <<'PY' | tee "$OUT/h2d.json"
import json, time, torch
x = torch.empty(1 << 30, dtype=torch.uint8)
x.fill_(1)
out = {}
for name, src in (("pageable", x), ("pinned", x.pin_memory())):
    best = 0.0
    for _ in range(3):
        torch.cuda.synchronize(); t = time.perf_counter()
        y = src.to("cuda", non_blocking=False); torch.cuda.synchronize()
        best = max(best, src.numel() / (time.perf_counter() - t))
        del y
    out[f"h2d_{name}_gb_s"] = round(best / 1e9, 2)
print(json.dumps(out))
PY

echo "== real-size SDXL 1024x1024, $STEPS steps, fp16: runner vs diffusers per offload mode"
FOLDER=/tmp/sdxl-random
PYTHONUNBUFFERED=1 $PY tools/gpu_offload_compare.py build $FOLDER 2>/dev/null || { echo "building the random SDXL folder failed"; exit 1; }
cat > /tmp/sdxl-random.toml <<TOML
schema_version = 1
name = "sdxl-random"
[pipeline]
kind = "stable-diffusion-xl"
source = "$FOLDER"
dtype = "fp16"
[placement]
max_memory = { "cuda:0" = "70GiB", cpu = "100GiB" }
[run]
prompt = "a cute dog running on the grass"
negative_prompt = ""
steps = $STEPS
guidance_scale = 5.0
seed = 0
width = 1024
height = 1024
TOML
# with_vram NAME CMD...: runs CMD while nvidia-smi samples memory.used every 50 ms and writes the
# peak above the idle level and the wall time to $OUT/NAME-vram.json (CMD's output is untouched).
with_vram() {
  local name=$1; shift
  nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -lms 50 > /tmp/vram.log &
  local smi=$! t0 t1 base rc
  sleep 0.3
  base=$(head -1 /tmp/vram.log)
  t0=$(date +%s.%N)
  "$@"; rc=$?
  t1=$(date +%s.%N)
  kill $smi; wait $smi 2>/dev/null
  echo "{\"$name\": {\"vram_peak_mib\": $(( $(sort -n /tmp/vram.log | tail -1) - base )), \"process_wall_s\": $($PY -c "print(round($t1 - $t0, 2))")}}" > "$OUT/$name-vram.json"
  return $rc
}
for mode in $MODES; do
  echo "-- $mode"
  # diffusers' group offload always prefetches on a side stream: run it once, for `group`.
  if [ $mode != group-stream ]; then
    with_vram diffusers-$mode $PY tools/gpu_offload_compare.py run "$mode" $FOLDER "$OUT" "$STEPS" 2>/dev/null | tee "$OUT/diffusers-$mode.json"
    cat "$OUT/diffusers-$mode-vram.json"
  else
    cp "$OUT/diffusers-group.npy" "$OUT/diffusers-$mode.npy" 2>/dev/null
  fi
  RUNNER_PREFETCH_STREAM=$([ $mode = group-stream ] && echo 1 || echo 0) \
  with_vram runner-$mode target/release/runner run /tmp/sdxl-random.toml --quiet --json --set "placement.offload=${mode%-stream}" --out "$OUT/runner-$mode.png" --dump "$OUT/dump-$mode" > "$OUT/runner-$mode.json"
  cat "$OUT/runner-$mode-vram.json"
  $PY - "$OUT" "$mode" <<'PY'
import json, sys
import numpy as np
from safetensors.numpy import load_file
out, mode = sys.argv[1], sys.argv[2]
r = json.load(open(f"{out}/runner-{mode}.json"))
t = r["timings"]
print(json.dumps({"runner": {"total_s": t["total_s"], "denoise_s": t["denoise_s"], "load_s": t["load_s"], "seconds_per_step": t["seconds_per_step"], "ledger_peak_bytes": {d: u["peak_bytes"] for d, u in r["devices"].items()},
                             "allocator": {d: u["allocator"] for d, u in r["devices"].items() if u["allocator"]}, "host": r["host"]}}))
# The load rate against the measured host-to-device bandwidth (goal: >= 50% of pageable), mode none.
if mode == "none":
    try:
        bw = json.load(open(f"{out}/h2d.json"))["h2d_pageable_gb_s"]
        rate = r["devices"]["cuda:0"]["peak_bytes"] / t["load_s"] / 1e9
        print(json.dumps({"load_gb_s": round(rate, 2), "h2d_pageable_gb_s": bw, "fraction": round(rate / bw, 2)}))
    except Exception as e:
        print(json.dumps({"load_rate_error": str(e)}))
# VRAM measured the same way on both sides: the caching allocator's peak reserved since the process started.
try:
    theirs = json.loads(open(f"{out}/diffusers-{mode.removesuffix('-stream')}.json").read().strip().splitlines()[-1])["peak_vram_reserved_process"]
    ours = r["devices"]["cuda:0"]["allocator"]["peak_reserved_bytes"]
    print(json.dumps({"mode": mode, "peak_reserved_runner": ours, "peak_reserved_diffusers": theirs, "ratio": round(ours / theirs, 3)}))
except Exception as e:
    print(json.dumps({"mode": mode, "peak_reserved_compare_error": str(e)}))
try:
    ours = load_file(f"{out}/dump-{mode}/dump.safetensors")["image"]
    theirs = np.load(f"{out}/diffusers-{mode}.npy")
    d = np.abs(ours - theirs)
    print(json.dumps({"mode": mode, "image_max_abs_diff_vs_diffusers": float(d.max()), "image_mean_abs_diff": float(d.mean())}))
except Exception as e:  # a failed run on either side
    print(json.dumps({"mode": mode, "image_compare_error": str(e)}))
PY
  rm -rf "$OUT/dump-$mode"
done
echo "== summary: runner vs diffusers per offload mode (the table of BENCHMARKS.md \"Offload modes on CUDA\")"
$PY tools/gpu_offload_summary.py "$OUT" $MODES
rm -rf $FOLDER /tmp/gpu-tiny-*.toml
exit $status

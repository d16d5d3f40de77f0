#!/usr/bin/env bash
# The offload hooks' own cost on the CPU: tiny SDXL (manifests/tiny-sdxl.toml), STEPS steps with
# guidance, under `--simulate` (the planned GPUs are the CPU, so nothing is copied and what differs
# between modes is the hooks), release build, OMP_NUM_THREADS=1, placement.offload none / model /
# group / sequential, RUNS processes per mode (the order of the modes rotates each run). Per mode:
# ms per UNet call after the first (`run --json` timings.seconds_per_step), median (min - max) over
# the runs, and the ratio to `none` at the median.
#   benches/offload_hooks.sh [RUNS]     (RUNS default 3; STEPS default 20; RUNNER, default target/release/runner)
set -euo pipefail
cd "$(dirname "$0")/.."
RUNS=${1:-3}
STEPS=${STEPS:-20}
RUNNER=${RUNNER:-target/release/runner}
[[ -x $RUNNER ]] || cargo build --release --locked
export OMP_NUM_THREADS=1
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
modes=(none model group sequential)
for i in $(seq "$RUNS"); do
  for k in 0 1 2 3; do
    mode=${modes[$(( (i + k) % 4 ))]}
    "$RUNNER" run manifests/tiny-sdxl.toml --simulate "cuda:0=40MB,cuda:1=40MB" --quiet --json --set run.steps="$STEPS" --set placement.offload="$mode" --out "$work/$mode.png" \
      | python3 -c 'import json, sys; r = json.load(sys.stdin); t = r["timings"]; print(json.dumps({"mode": sys.argv[1], "run": int(sys.argv[2]), "unet_calls": r["unet_calls"], "ms_per_call": round(t["seconds_per_step"] * 1e3, 3), "first_call_ms": round(t["first_step_s"] * 1e3, 3)}))' "$mode" "$i" \
      | tee -a "$work/out.jsonl"
  done
done
python3 - "$work/out.jsonl" <<'PY'
import json, statistics, sys
rows = [json.loads(line) for line in open(sys.argv[1])]
med = statistics.median
ms = {m: [r["ms_per_call"] for r in rows if r["mode"] == m] for m in ("none", "model", "group", "sequential")}
print("\n| mode | runs | ms / UNet call, median (min - max) | ratio to none (median) |")
print("|---|---:|---:|---:|")
for m, t in ms.items():
    print(f"| {m} | {len(t)} | {med(t):.2f} ({min(t):.2f} - {max(t):.2f}) | {med(t) / med(ms['none']):.2f} |")
import glob, struct
def tensors(f):
    with open(f, "rb") as h:
        return len([k for k in json.loads(h.read(struct.unpack("<Q", h.read(8))[0])) if k != "__metadata__"])
n = sum(tensors(f) for f in glob.glob("tests/fixtures/tiny-sdxl-unet-sharded/*.safetensors"))
print(f"hooks' cost per UNet call at the median ({n} UNet tensors): group {med(ms['group']) - med(ms['none']):+.2f} ms, sequential {med(ms['sequential']) - med(ms['none']):+.2f} ms")
PY

#!/usr/bin/env bash
# `model` offload on a real GPU: the tiny SD 1.5 and SDXL pipelines on cuda:0 with no offload and
# with `model` offload must give byte-identical PNGs; prints the ledger (`devices`) of each run.
#   there: bash scripts/gpu-offload.sh     (carry: target/release/runner)
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python3}
export LD_LIBRARY_PATH=$($PY -c 'import torch, os; print(os.path.dirname(torch.__file__))')/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
OUT=${OUT:-/tmp/gpu-offload}
mkdir -p "$OUT"
status=0
for m in tiny-sd15 tiny-sdxl; do
  # One GPU: the manifest's budgets (tiny-sdxl names two GPUs) become cuda:0 + cpu.
  sed 's/^max_memory = .*/max_memory = { "cuda:0" = "8GiB", cpu = "8GiB" }/' "manifests/$m.toml" > "manifests/.gpu-$m.toml"
  for mode in none model; do
    target/release/runner run "manifests/.gpu-$m.toml" --quiet --json --set "placement.offload=$mode" \
      --out "$OUT/$m-$mode.png" > "$OUT/$m-$mode.json" 2> "$OUT/$m-$mode.err" || { echo "$m $mode: FAILED"; cat "$OUT/$m-$mode.err"; status=1; continue; }
    $PY -c 'import json,sys; r=json.load(open(sys.argv[1])); print(sys.argv[2], sys.argv[3], r["device_map"], {d: u["peak_bytes"] for d, u in r["devices"].items()}, "denoise %.3f s" % r["timings"]["denoise_s"])' "$OUT/$m-$mode.json" "$m" "$mode"
  done
  if cmp -s "$OUT/$m-none.png" "$OUT/$m-model.png"; then echo "$m: model offload image == no offload image"; else echo "$m: IMAGES DIFFER"; status=1; fi
done
rm -f manifests/.gpu-tiny-*.toml
exit $status

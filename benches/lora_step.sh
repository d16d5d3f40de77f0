#!/usr/bin/env bash
# The per-step cost of live LoRA adapters (`fuse = false`) on the CPU, runner against runner,
# interleaved (which goes first alternates), with and without a random PEFT LoRA of rank RANK on the
# model's usual LoRA targets. Goal (issue 27): live <= 1.15x the base step.
#   BENCH_MODEL=flux (default): the mid-size FLUX.1-dev-shaped transformer of benches/flux_step.sh (4
#     double + 8 single blocks, inner 768; 1024 image + 256 text tokens, batch 1, fp32), the pairs on
#     every attention, feed-forward, modulation and projection Linear of its blocks.
#   BENCH_MODEL=unet: the mid-size SDXL-shaped UNet of benches/unet_step.sh (64x64 latents, batch 2),
#     the pairs on every attention projection, proj_in/proj_out and feed-forward Linear.
#   benches/lora_step.sh [ROUNDS] [ITERS] [RANK] [PY]   (BENCH_THREADS, default 1; BENCH_DIR, default /tmp/runner-bench)
set -euo pipefail
cd "$(dirname "$0")/.."
ROUNDS=${1:-3}
ITERS=${2:-3}
RANK=${3:-16}
PY=${4:-.venv-fixtures/bin/python}
export BENCH_THREADS=${BENCH_THREADS:-1}
export OMP_NUM_THREADS=$BENCH_THREADS RAYON_NUM_THREADS=$BENCH_THREADS
DIR=${BENCH_DIR:-/tmp/runner-bench}
MODEL=${BENCH_MODEL:-flux}
case $MODEL in
  flux) MID=$DIR/flux-mid-transformer; MAKE=flux; BENCH=flux_bench; ARGS="64 256 $ITERS"; PREFIX=transformer
        TARGETS='("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out", "proj_mlp", "proj_out", "norm1.linear", "norm1_context.linear", "norm.linear", "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2")' ;;
  unet) MID=$DIR/sdxl-mid-unet; MAKE=sdxl-unet; BENCH=unet_bench; ARGS="64 2 $ITERS"; PREFIX=unet
        TARGETS='("to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2")' ;;
  *) echo "BENCH_MODEL: flux or unet" >&2; exit 2 ;;
esac
LORA=$DIR/$MODEL-mid-lora-r$RANK.safetensors
[[ -f $MID/config.json ]] || $PY benches/make_mid.py $MAKE "$MID"
[[ -f $LORA ]] || $PY - "$MID" "$LORA" "$RANK" "$PREFIX" "$TARGETS" <<'PY'
import glob, sys, torch
from safetensors import safe_open
from safetensors.torch import save_file
mid, out, r, prefix = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
targets = eval(sys.argv[5])
torch.manual_seed(0)
sd = {}
for path in sorted(glob.glob(f"{mid}/*.safetensors")):
    with safe_open(path, "pt") as f:
        for k in f.keys():
            m = k.removesuffix(".weight")
            if k.endswith(".weight") and m.endswith(targets) and ("blocks." in m) and len(f.get_slice(k).get_shape()) == 2:
                o, i = f.get_slice(k).get_shape()
                sd[f"{prefix}.{m}.lora_A.weight"] = torch.randn(r, i) * 0.01
                sd[f"{prefix}.{m}.lora_B.weight"] = torch.randn(o, r) * 0.01
save_file(sd, out)
print(f"{out}: {len(sd) // 2} pairs, rank {r}")
PY
cargo bench --bench $BENCH --no-run --locked 2>/dev/null
BIN=$(ls -t target/release/deps/$BENCH-* | grep -v '\.d$' | head -1)
out=$(mktemp)
for round in $(seq "$ROUNDS"); do
  if (( round % 2 )); then order="base live"; else order="live base"; fi
  for side in $order; do
    if [[ $side == live ]]; then BENCH_LORA=$LORA "$BIN" "$MID" $ARGS; else "$BIN" "$MID" $ARGS; fi | sed "s/\"impl\": \"runner\"/\"impl\": \"$side\"/" | tee -a "$out"
  done
done
python3 - "$out" "$RANK" <<'PY'
import json, statistics, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
pool = lambda side, k: [t for r in rows if r["impl"] == side for t in r[k]]
for k, what in [("times_s", "wall"), ("cpu_times_s", "CPU")]:
    b, l = pool("base", k), pool("live", k)
    print(f"{what:4} base median {statistics.median(b):.4f} s (min {min(b):.4f})  live r{sys.argv[2]} median {statistics.median(l):.4f} s (min {min(l):.4f})  ratio {statistics.median(l) / statistics.median(b):.3f} (min {min(l) / min(b):.3f})")
PY
rm -f "$out"

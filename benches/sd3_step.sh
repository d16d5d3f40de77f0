#!/usr/bin/env bash
# Seconds per SD3 transformer forward on the CPU, runner vs diffusers eager, same weights, same
# thread count, same run: the tiny SD3 fixture transformer (8x8 latents) and a mid-size random
# SD3-medium-shaped transformer (8 layers, 12 heads x 64, joint_attention_dim 1024,
# 512x512 = 64x64 latents), batch 2 (CFG), 77 + 256 text tokens. ROUNDS rounds, each one runner
# process and one diffusers process (which goes first alternates), ITERS forwards after a warm-up in
# each; the summary pools every forward of a side, by wall time and by the process's CPU time (which
# other work on a shared machine disturbs less).
#   benches/sd3_step.sh [ROUNDS] [PY]     (BENCH_THREADS, default 1; BENCH_DIR, default /tmp/runner-bench)
set -euo pipefail
cd "$(dirname "$0")/.."
ROUNDS=${1:-3}
PY=${2:-.venv-fixtures/bin/python}
export BENCH_THREADS=${BENCH_THREADS:-1}
export OMP_NUM_THREADS=$BENCH_THREADS
MID=${BENCH_DIR:-/tmp/runner-bench}/sd3-mid-transformer
if [[ ! -f $MID/config.json ]]; then
  $PY - "$MID" <<'PYEOF'
import sys, torch
from diffusers import SD3Transformer2DModel
# SD3 medium's transformer config (stabilityai/stable-diffusion-3-medium-diffusers), scaled down.
cfg = dict(sample_size=64, patch_size=2, in_channels=16, out_channels=16, num_layers=8, attention_head_dim=64, num_attention_heads=12,
           joint_attention_dim=1024, caption_projection_dim=768, pooled_projection_dim=1024, pos_embed_max_size=96)
torch.manual_seed(0)
SD3Transformer2DModel.from_config(cfg).save_pretrained(sys.argv[1], safe_serialization=True)
PYEOF
fi
cargo bench --bench sd3_bench --no-run --locked 2>/dev/null
BIN=$(ls -t target/release/deps/sd3_bench-* | grep -v '\.d$' | head -1)
for case in "tests/fixtures/tiny-sd3/transformer 8 2 333 20" "$MID 64 2 333 3"; do
  set -- $case
  echo "== $1 (latents $2x$2, batch $3, $4 text tokens, threads $BENCH_THREADS, $ROUNDS rounds x $5 forwards)"
  out=$(mktemp)
  for round in $(seq "$ROUNDS"); do
    if (( round % 2 )); then order="runner diffusers"; else order="diffusers runner"; fi
    for side in $order; do
      if [[ $side == runner ]]; then "$BIN" "$@"; else $PY benches/sd3_step_py.py "$@" 2>/dev/null; fi | tee -a "$out"
    done
  done
  python3 benches/summary.py step "$out"
  rm -f "$out"
done

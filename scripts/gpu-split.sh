#!/usr/bin/env bash
# A UNet split across cuda:0 and the CPU by the `auto` strategy, run for real (tensors move
# between devices at no-split units), against the same job on cuda:0 alone.
#   there: bash scripts/gpu-split.sh     (carry: target/release/runner, target/release/runner-torch)
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python3}
export LD_LIBRARY_PATH=$($PY -c 'import torch, os; print(os.path.dirname(torch.__file__))')/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
OUT=${OUT:-/tmp/gpu-split}
mkdir -p "$OUT"
mk() { # name cuda0 cpu
  cat > "/tmp/$1.toml" <<TOML
schema_version = 1
name = "$1"
[pipeline]
kind = "stable-diffusion"
source = "$PWD/tests/fixtures/tiny-sd15"
[components.safety_checker]
enabled = false
[components.vae]
device = "cpu"
[placement]
strategy = "auto"
max_memory = { "cuda:0" = $2, cpu = $3 }
[run]
prompt = "a photo of a cat"
negative_prompt = "blurry"
steps = 3
seed = 0
width = 64
height = 64
TOML
}
mk whole 1073741824 1073741824
budgets=$(target/release/runner plan /tmp/whole.toml --json | $PY -c '
import json, sys
p = json.load(sys.stdin)["components"]
te, b, w, vae = p["text_encoder"]["peak_bytes"], p["unet"]["bytes"], p["unet"]["working_bytes"], p["vae"]["bytes"]
# Working memory is transient (the largest counts, not the sum): the CPU holds the VAE weights,
# the UNet activations and three quarters of its weights - not the whole UNet.
print(te + w + b // 2, vae + w + b * 3 // 4)')
mk split $budgets
target/release/runner plan /tmp/split.toml | tail -25
for m in whole split; do
  target/release/runner run /tmp/$m.toml --quiet --json --dump /tmp/dump-$m --out "$OUT/$m.png" | tr -d '\n' | cut -c1-400; echo
done
$PY - <<'PY'
import json
from safetensors.torch import load_file
a = load_file("/tmp/dump-whole/dump.safetensors")["image"]
b = load_file("/tmp/dump-split/dump.safetensors")["image"]
print(json.dumps({"split_vs_whole_image_max_abs_diff": float((a - b).abs().max())}))
PY

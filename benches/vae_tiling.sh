#!/usr/bin/env bash
# VAE decode time on the CPU, tiled vs untiled, runner vs diffusers, same weights, same run: a
# random half-width SD-shaped VAE (block_out_channels 64/128/256/256, 2 layers per block,
# sample_size 256: 32-latent tiles, stride 24) in a copy of tests/fixtures/tiny-sd15, decoding a
# 384x320 image (48x40 latents: 2x2 tiles). runner: the `decode` time `runner run` reports
# (components.vae.tiling on / off); diffusers: `vae.decode` of latents of the same shape.
# Prints each run's seconds per decode, then the table BENCHMARKS.md shows: tiled / untiled of each
# side and runner / diffusers, at the medians.
#   benches/vae_tiling.sh [RUNS] [PY]   (RUNNER, default target/release/runner)
set -euo pipefail
cd "$(dirname "$0")/.."
export OMP_NUM_THREADS=1
RUNS=${1:-3}
PY=${2:-.venv-fixtures/bin/python}
[[ -x $PY ]] || PY=/work/main/.venv-fixtures/bin/python
RUNNER=${RUNNER:-target/release/runner}
[[ -x $RUNNER ]] || cargo build --release --locked
out=$(mktemp)
trap 'rm -f "$out"' EXIT
DIR=${BENCH_DIR:-/tmp/runner-bench}/sd15-vae-mid
if [[ ! -f $DIR/vae/config.json ]]; then
  rm -rf "$DIR"; mkdir -p "$(dirname "$DIR")"; cp -r tests/fixtures/tiny-sd15 "$DIR"; rm -rf "$DIR/vae"
  $PY - "$DIR/vae" <<'PYEOF'
import sys, torch
from diffusers import AutoencoderKL
torch.manual_seed(0)
AutoencoderKL(block_out_channels=[64, 128, 256, 256], down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4,
              layers_per_block=2, latent_channels=4, norm_num_groups=32, sample_size=256).save_pretrained(sys.argv[1], safe_serialization=True)
PYEOF
fi
M=$(mktemp -d)/m.toml
cat > "$M" <<TOML
schema_version = 1
name = "vae-tiling-bench"
[pipeline]
kind = "stable-diffusion"
source = "$DIR"
dtype = "fp32"
[components.safety_checker]
enabled = false
[placement]
max_memory = { cpu = "16GiB" }
[run]
prompt = "a photo of a cat"
steps = 1
width = 384
height = 320
seed = 0
threads = 1
output = "$(dirname "$M")/out.png"
TOML
for tiling in false true; do
  ts=()
  for _ in $(seq "$RUNS"); do
    ts+=("$("$RUNNER" run "$M" --quiet --set components.vae.tiling=$tiling | sed -n 's/.*decode \([0-9.]*\) s.*/\1/p')")
  done
  echo "runner   tiling=$tiling decode s: ${ts[*]}" | tee -a "$out"
done
$PY - "$DIR/vae" "$RUNS" <<'PYEOF' | tee -a "$out"
import sys, time, torch
from diffusers import AutoencoderKL
torch.set_num_threads(1)
vae = AutoencoderKL.from_pretrained(sys.argv[1]).eval()
z = torch.randn(1, 4, 40, 48, generator=torch.Generator().manual_seed(0))
for tiling in (False, True):
    vae.enable_tiling() if tiling else vae.disable_tiling()
    ts = []
    for _ in range(int(sys.argv[2])):
        t = time.perf_counter()
        with torch.no_grad():
            vae.decode(z)
        ts.append(time.perf_counter() - t)
    print(f"diffusers tiling={str(tiling).lower()} decode s: " + " ".join(f"{x:.2f}" for x in ts))
PYEOF
python3 - "$out" <<'PY'
import statistics, sys
t = {}
for line in open(sys.argv[1]):
    head, runs = line.split(" decode s: ")
    impl, tiling = head.split()[0], head.split()[1].split("=")[1]
    t[impl, tiling] = [float(x) for x in runs.split()]
med = {k: statistics.median(v) for k, v in t.items()}
print("\n| impl | untiled | tiled | tiled / untiled (median) |\n|---|---|---|---|")
for impl, label in (("runner", "runner"), ("diffusers", "diffusers 0.42.1")):
    print(f"| {label} | {' '.join(f'{x:.2f}' for x in t[impl, 'false'])} | {' '.join(f'{x:.2f}' for x in t[impl, 'true'])} | {med[impl, 'true'] / med[impl, 'false']:.2f} |")
print(f"| runner / diffusers (median) | {med['runner', 'false'] / med['diffusers', 'false']:.2f} | {med['runner', 'true'] / med['diffusers', 'true']:.2f} | |")
PY

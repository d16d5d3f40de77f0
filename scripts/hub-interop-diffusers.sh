#!/usr/bin/env bash
# A cache filled by `runner pull` (from the mock Hub, tests/support/mock_hub.py) loads in diffusers
# with `local_files_only=True` and HF_HUB_OFFLINE=1, and gives runner's image: the interop check
# that needs diffusers and torch (.venv-fixtures, `make setup-fixtures`), so not part of `make test`
# (tests/hub.rs checks the cache both ways with huggingface_hub alone).
#   scripts/hub-interop-diffusers.sh [PY]
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${1:-.venv-fixtures/bin/python}
cargo build --locked --release --bin runner --bin runner-torch 2>/dev/null
dir=$(mktemp -d)
trap 'kill $(cat "$dir/pid" 2>/dev/null) 2>/dev/null || true; rm -rf "$dir"' EXIT
python3 tests/support/mock_hub.py --repo runner-test/tiny-sd15=tests/fixtures/tiny-sd15 > "$dir/out" & echo $! > "$dir/pid"
for _ in $(seq 50); do grep -q ready "$dir/out" 2>/dev/null && break; sleep 0.1; done
export HF_ENDPOINT="http://127.0.0.1:$(awk '/^port/{print $2}' "$dir/out")" HF_HUB_CACHE="$dir/cache"
cat > "$dir/m.toml" <<TOML
schema_version = 1
name = "hub-interop"
[pipeline]
kind = "stable-diffusion"
source = "hf://runner-test/tiny-sd15"
dtype = "fp32"
[components.safety_checker]
enabled = false
[run]
prompt = "a photo of a cat"
steps = 4
guidance_scale = 7.5
seed = 0
width = 64
height = 64
threads = 1
output = "$dir/runner.png"
TOML
target/release/runner pull --quiet "$dir/m.toml"
HF_HUB_OFFLINE=1 OMP_NUM_THREADS=1 target/release/runner run --quiet "$dir/m.toml"
HF_HUB_OFFLINE=1 OMP_NUM_THREADS=1 "$PY" - "$dir" <<'PY'
import sys, numpy as np, torch
from PIL import Image
import diffusers
torch.set_num_threads(1)
d = sys.argv[1]
pipe = diffusers.StableDiffusionPipeline.from_pretrained("runner-test/tiny-sd15", local_files_only=True, safety_checker=None, requires_safety_checker=False, dtype=torch.float32)
img = pipe("a photo of a cat", num_inference_steps=4, guidance_scale=7.5, width=64, height=64, generator=torch.Generator("cpu").manual_seed(0), output_type="np").images[0]
ours = np.asarray(Image.open(f"{d}/runner.png").convert("RGB")).astype(np.int16)
theirs = (img * 255).round().astype(np.int16)
diff = np.abs(ours - theirs).max()
print(f"diffusers loaded runner's cache offline ({pipe.unet.config.sample_size=}); max pixel difference against runner's PNG: {diff} (of 255)")
sys.exit(0 if diff <= 1 else 1)
PY

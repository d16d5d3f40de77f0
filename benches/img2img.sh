#!/usr/bin/env bash
# Image-to-image on the CPU, runner vs diffusers, same folder (tests/fixtures/tiny-sd15, fp32, safety
# checker off), tests/fixtures/images/init-rgb-70x52.png resized to SIZE x SIZE first (diffusers'
# StableDiffusionImg2ImgPipeline takes the image's own size), strength 0.6 of 10 steps (6 run),
# guidance 7.5, seed 0, one thread each, ROUNDS rounds interleaved (which side goes first alternates):
# - runner: one `runner run --prompts --json` process per round, ITERS + 1 lines, the first its
#   warm-up; a call = timings.encode_s + image_encode_s + denoise_s + decode_s, and image_encode_s
#   alone (the VAE encode of the input).
# - diffusers: the pipeline loaded, one warm-up call, then ITERS timed calls; the VAE encode timed
#   by wrapping `vae.encode`.
#   benches/img2img.sh [ROUNDS] ["SIZES"] [PY]   (ITERS, default 2; BENCH_THREADS, default 1)
set -euo pipefail
cd "$(dirname "$0")/.."
ROUNDS=${1:-3}
SIZES=${2:-"64 512"}
PY=${3:-.venv-fixtures/bin/python}
ITERS=${ITERS:-2}
export BENCH_THREADS=${BENCH_THREADS:-1}
export OMP_NUM_THREADS=$BENCH_THREADS
DIR=${BENCH_DIR:-/tmp/runner-bench}/img2img
mkdir -p "$DIR"
cargo build --release --locked --bin runner --bin runner-torch 2>/dev/null
out=$(mktemp)
for size in $SIZES; do
  img=$DIR/in-$size.png
  $PY -c "from PIL import Image; Image.open('tests/fixtures/images/init-rgb-70x52.png').convert('RGB').resize(($size, $size), Image.LANCZOS).save('$img')"
  m=$DIR/m-$size.toml
  cat > "$m" <<TOML
schema_version = 1
name = "img2img-bench"
[pipeline]
kind = "stable-diffusion"
source = "$PWD/tests/fixtures/tiny-sd15"
dtype = "fp32"
scheduler = "euler"
[components.safety_checker]
enabled = false
[run]
prompt = "a photo of a cat"
negative_prompt = "blurry"
guidance_scale = 7.5
steps = 10
seed = 0
image = "$img"
strength = 0.6
threads = $BENCH_THREADS
output = "$DIR/out-$size.png"
TOML
  for round in $(seq "$ROUNDS"); do
    if (( round % 2 )); then order="runner diffusers"; else order="diffusers runner"; fi
    for side in $order; do
      if [[ $side == runner ]]; then
        # One process, ITERS + 1 lines of a prompts file: the first is its warm-up, as diffusers'.
        for k in $(seq 0 "$ITERS"); do echo '{"seed": 0}'; done > "$DIR/p.jsonl"
        target/release/runner run "$m" --prompts "$DIR/p.jsonl" --force --json --quiet --out "$DIR/out-$size-{index}.png" | tail -n +2 \
          | python3 -c "import json,sys; [print(json.dumps({'impl':'runner','size':$size,'call_s':t['encode_s']+t['image_encode_s']+t['denoise_s']+t['decode_s'],'image_encode_s':t['image_encode_s']})) for t in (json.loads(l)['timings'] for l in sys.stdin)]"
      else
        $PY - "$img" "$size" "$ITERS" <<'PY'
import json, sys, time, torch
torch.set_num_threads(1)
import diffusers
from diffusers.utils import load_image
img, size, iters = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
pipe = diffusers.StableDiffusionImg2ImgPipeline.from_pretrained("tests/fixtures/tiny-sd15", safety_checker=None, dtype=torch.float32)
pipe.scheduler = diffusers.EulerDiscreteScheduler.from_config(pipe.scheduler.config)
pipe.set_progress_bar_config(disable=True)
enc = {"s": 0.0}
orig = pipe.vae.encode
def timed(*a, **k):
    s = time.perf_counter(); r = orig(*a, **k); enc["s"] += time.perf_counter() - s; return r
pipe.vae.encode = timed
image = load_image(img)
call = lambda: pipe(prompt="a photo of a cat", negative_prompt="blurry", image=image, strength=0.6, num_inference_steps=10, guidance_scale=7.5,
                    generator=torch.Generator("cpu").manual_seed(0), output_type="np")
call()
for _ in range(iters):
    enc["s"] = 0.0
    s = time.perf_counter(); call(); t = time.perf_counter() - s
    print(json.dumps({"impl": "diffusers", "size": size, "call_s": t, "image_encode_s": enc["s"]}))
PY
      fi
    done
  done | tee -a "$out"
done
python3 - "$out" <<'PY'
import json, statistics, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.startswith("{")]
for size in sorted({r["size"] for r in rows}):
    pick = lambda impl, k: [r[k] for r in rows if r["size"] == size and r["impl"] == impl]
    for k in ["call_s", "image_encode_s"]:
        a, b = pick("runner", k), pick("diffusers", k)
        print(f"{size}x{size} {k}: runner median {statistics.median(a):.4f} s (min {min(a):.4f}), diffusers median {statistics.median(b):.4f} s (min {min(b):.4f}); ratio {statistics.median(a) / statistics.median(b):.3f} (min {min(a) / min(b):.3f})")
PY
rm -f "$out"

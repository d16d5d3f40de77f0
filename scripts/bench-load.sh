#!/usr/bin/env bash
# Load time, process start to the first denoising step, and peak RSS of `runner run` on real-size
# SD 1.5 and SDXL pipelines (sparse safetensors files built from tests/data/shapes/PIPE.json,
# tokenizers/scheduler from the tiny fixture), fp32 as stored and fp16 converted; 1 step at
# 64x64 so that loading dominates.
#   scripts/bench-load.sh [RUNNER [OTHER_RUNNER]]   (interleaved when two binaries are given)
#   PIPES="sd15 sdxl" DTYPES="fp32 fp16" RUNS=3 select the cases.
# With .venv-fixtures present (tools/requirements-fixtures.lock), diffusers' from_pretrained on the
# same folder runs interleaved too (tools/bench_load_diffusers.py; it stops at its first UNet call,
# so its peak RSS is a lower bound of a whole run's).
set -euo pipefail
cd "$(dirname "$0")/.."
bins=("${1:-target/release/runner}")
[[ $# -ge 2 ]] && bins+=("$2")
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
PIPES=${PIPES:-sd15 sdxl}
DTYPES=${DTYPES:-fp32 fp16}
RUNS=${RUNS:-3}
for pipe in $PIPES; do
python3 - "$work" "$pipe" <<'PY'
import json, os, shutil, struct, sys
root, pipe = sys.argv[1], sys.argv[2]
spec = json.load(open(f"tests/data/shapes/{pipe}.json"))
fixture = {"sd15": "tiny-sd15", "sdxl": "tiny-sdxl"}[pipe]
kind = {"sd15": "stable-diffusion", "sdxl": "stable-diffusion-xl"}[pipe]
r = os.path.join(root, pipe)
os.makedirs(r)
json.dump(spec["model_index"], open(os.path.join(r, "model_index.json"), "w"))
for comp, c in spec["components"].items():
    d = os.path.join(r, comp)
    os.makedirs(d)
    json.dump(c["config"], open(os.path.join(d, "config.json"), "w"))
    hdr, off = {}, 0
    for name, dt, shape in c["tensors"]:
        dtype = "I64" if dt == "I64" else "F32"
        n = 1
        for s in shape:
            n *= s
        hdr[name] = {"dtype": dtype, "shape": shape, "data_offsets": [off, off + n * (8 if dtype == "I64" else 4)]}
        off = hdr[name]["data_offsets"][1]
    h = json.dumps(hdr).encode()
    h += b" " * ((8 - len(h) % 8) % 8)
    stem = "diffusion_pytorch_model" if c["library"] == "diffusers" else "model"
    with open(os.path.join(d, stem + ".safetensors"), "wb") as f:
        f.write(struct.pack("<Q", len(h)) + h)
        f.truncate(8 + len(h) + off)
for sub in ["tokenizer", "tokenizer_2", "feature_extractor", "scheduler"]:
    if os.path.isdir(f"tests/fixtures/{fixture}/{sub}"):
        shutil.copytree(f"tests/fixtures/{fixture}/{sub}", os.path.join(r, sub))
for dtype in ["fp32", "fp16"]:
    safety = '[components.safety_checker]\nenabled = false\n' if pipe == "sd15" else ""
    open(os.path.join(root, f"{pipe}-{dtype}.toml"), "w").write(
        f'schema_version = 1\nname = "{pipe}-{dtype}"\n[pipeline]\nkind = "{kind}"\nsource = "{pipe}"\ndtype = "{dtype}"\n'
        f'{safety}[placement]\nmax_memory = {{ cpu = "20GiB" }}\n'
        '[run]\nprompt = "a cat"\nsteps = 1\nwidth = 64\nheight = 64\noutput = "x.png"\n')
PY
for dtype in $DTYPES; do
  for i in $(seq "$RUNS"); do
    for b in "${bins[@]}"; do
      /usr/bin/time -f "%M %e" -o "$work/time" "$b" run "$work/$pipe-$dtype.toml" --quiet --json > "$work/out.json"
      read -r rss wall < "$work/time"
      figures=$(python3 -c "
import json; r = json.load(open('$work/out.json')); t, h = r['timings'], r['host']
print(json.dumps({'load_s': round(t['load_s'], 2), 'to_first_step_s': round(t['startup_s'] + t['load_s'] + t['encode_s'], 2),
  'load_rss_over_loaded': round((h['load_peak_rss_bytes'] - h['rss_before_load_bytes']) / h['loaded_bytes'], 3), 'loaded_gb': round(h['loaded_bytes'] / 1e9, 2)})[1:-1])")
      echo "{\"binary\": \"$b\", \"pipe\": \"$pipe\", \"dtype\": \"$dtype\", \"run\": $i, $figures, \"wall_s\": $wall, \"peak_rss_gib\": $(python3 -c "print(round($rss / 1048576, 2))")}"
    done
    if [[ -x .venv-fixtures/bin/python ]]; then
      /usr/bin/time -f "%M %e" -o "$work/time" env OMP_NUM_THREADS=2 .venv-fixtures/bin/python tools/bench_load_diffusers.py "$work/$pipe" "$dtype" > "$work/py.json" 2>/dev/null
      read -r rss wall < "$work/time"
      echo "{\"binary\": \"diffusers\", \"pipe\": \"$pipe\", \"dtype\": \"$dtype\", \"run\": $i, \"in_process\": $(cat "$work/py.json"), \"wall_s\": $wall, \"peak_rss_gib\": $(python3 -c "print(round($rss / 1048576, 2))")}"
    fi
  done
done
rm -rf "${work:?}/$pipe"
done

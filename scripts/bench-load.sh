#!/usr/bin/env bash
# Load time and peak RSS of `runner run` on a real-size SD 1.5 pipeline (random-free: sparse
# safetensors files built from tests/data/shapes/sd15.json, tokenizer/scheduler from the tiny
# fixture), fp32 as stored and fp16 converted; 1 step at 64x64 so that loading dominates.
#   scripts/bench-load.sh [RUNNER [OTHER_RUNNER]]   (interleaved when two binaries are given)
# With .venv-fixtures present (tools/requirements-fixtures.lock), diffusers' from_pretrained on the
# same folder runs interleaved too (tools/bench_load_diffusers.py).
set -euo pipefail
cd "$(dirname "$0")/.."
bins=("${1:-target/release/runner}")
[[ $# -ge 2 ]] && bins+=("$2")
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
python3 - "$work" <<'PY'
import json, os, shutil, struct, sys
root = sys.argv[1]
spec = json.load(open("tests/data/shapes/sd15.json"))
r = os.path.join(root, "sd15")
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
for sub in ["tokenizer", "feature_extractor", "scheduler"]:
    shutil.copytree(f"tests/fixtures/tiny-sd15/{sub}", os.path.join(r, sub))
for dtype in ["fp32", "fp16"]:
    open(os.path.join(root, f"{dtype}.toml"), "w").write(
        f'schema_version = 1\nname = "sd15-{dtype}"\n[pipeline]\nkind = "stable-diffusion"\nsource = "sd15"\ndtype = "{dtype}"\n'
        '[components.safety_checker]\nenabled = false\n[placement]\nmax_memory = { cpu = "20GiB" }\n'
        '[run]\nprompt = "a cat"\nsteps = 1\nwidth = 64\nheight = 64\noutput = "x.png"\n')
PY
for dtype in fp32 fp16; do
  for i in 1 2 3; do
    for b in "${bins[@]}"; do
      /usr/bin/time -f "%M %e" -o "$work/time" "$b" run "$work/$dtype.toml" --quiet --json > "$work/out.json"
      read -r rss wall < "$work/time"
      load=$(python3 -c "import json; print(round(json.load(open('$work/out.json'))['timings']['load_s'], 2))")
      echo "{\"binary\": \"$b\", \"dtype\": \"$dtype\", \"run\": $i, \"load_s\": $load, \"wall_s\": $wall, \"peak_rss_gib\": $(python3 -c "print(round($rss / 1048576, 2))")}"
    done
    if [[ -x .venv-fixtures/bin/python ]]; then
      /usr/bin/time -f "%M %e" -o "$work/time" env OMP_NUM_THREADS=2 .venv-fixtures/bin/python tools/bench_load_diffusers.py "$work/sd15" "$dtype" > "$work/py.json" 2>/dev/null
      read -r rss wall < "$work/time"
      echo "{\"binary\": \"diffusers\", \"dtype\": \"$dtype\", \"run\": $i, \"in_process\": $(cat "$work/py.json"), \"wall_s\": $wall, \"peak_rss_gib\": $(python3 -c "print(round($rss / 1048576, 2))")}"
    fi
  done
done

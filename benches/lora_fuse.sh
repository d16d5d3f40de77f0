#!/usr/bin/env bash
# Fusing a real-size SDXL LoRA at load, runner against diffusers, on the CPU: the sparse real-size
# SDXL pipeline (benches/sparse_pipeline.py, fp16) and a random diffusers/PEFT LoRA of rank RANK on
# every attention projection, proj_in/proj_out and feed-forward Linear of the UNet (the usual SDXL
# LoRA targets). runner: `runner run` (1 step, 64x64, fp16) with and without `[adapters.x]`, the
# fusing cost being the difference of their `load_s`; diffusers: `load_lora_weights` + `fuse_lora`
# after `from_pretrained`, timed alone. Peak RSS of each process (/usr/bin/time). Interleaved.
#   benches/lora_fuse.sh [ROUNDS] [RANKS] [PY]   (BENCH_DIR, default /tmp/runner-bench)
set -euo pipefail
cd "$(dirname "$0")/.."
ROUNDS=${1:-3}
RANKS=${2:-"32 128"}
PY=${3:-.venv-fixtures/bin/python}
DIR=${BENCH_DIR:-/tmp/runner-bench}
mkdir -p "$DIR/fuse"
[[ -f $DIR/fuse/sdxl/model_index.json ]] || python3 benches/sparse_pipeline.py sdxl "$DIR/fuse" F16 >/dev/null
cargo build --release --locked --bin runner --bin runner-torch 2>/dev/null
out=$(mktemp)
for rank in $RANKS; do
  lora=$DIR/fuse/sdxl-lora-r$rank.safetensors
  [[ -f $lora ]] || $PY - "$DIR/fuse/sdxl/unet" "$lora" "$rank" <<'PY'
import glob, sys, torch
from safetensors import safe_open
from safetensors.torch import save_file
unet, out, r = sys.argv[1], sys.argv[2], int(sys.argv[3])
targets = ("to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2")
torch.manual_seed(0)
sd = {}
for f in sorted(glob.glob(f"{unet}/*.safetensors")):
    with safe_open(f, "pt") as h:
        for k in h.keys():
            m = k.removesuffix(".weight")
            s = h.get_slice(k).get_shape()
            if k.endswith(".weight") and m.endswith(targets) and len(s) == 2:
                sd[f"unet.{m}.lora_A.weight"] = (torch.randn(r, s[1]) * 0.01).half()
                sd[f"unet.{m}.lora_B.weight"] = (torch.randn(s[0], r) * 0.01).half()
save_file(sd, out)
print(f"{out}: {len(sd) // 2} pairs, rank {r}, {sum(v.numel() for v in sd.values()) * 2 / 1e6:.0f} MB")
PY
  for with in base lora; do
    adapter=$([[ $with == lora ]] && printf '[adapters.x]\nsource = "%s"\n' "$lora" || true)
    printf 'schema_version = 1\nname = "fuse"\n[pipeline]\nkind = "stable-diffusion-xl"\nsource = "%s"\ndtype = "fp16"\n[placement]\nmax_memory = { cpu = "20GiB" }\n[run]\nprompt = "a cat"\nsteps = 1\nwidth = 64\nheight = 64\noutput = "%s/x.png"\n%s\n' \
      "$DIR/fuse/sdxl" "$DIR/fuse" "$adapter" > "$DIR/fuse/$with-r$rank.toml"
  done
  for round in $(seq "$ROUNDS"); do
    for side in runner-base runner-lora diffusers; do
      case $side in
        runner-*) /usr/bin/time -f "%M" -o "$out.rss" target/release/runner run "$DIR/fuse/${side#runner-}-r$rank.toml" --quiet --json > "$out.json"
                  line=$(python3 -c "import json; print(json.dumps({'load_s': json.load(open('$out.json'))['timings']['load_s']}))") ;;
        diffusers) line=$(/usr/bin/time -f "%M" -o "$out.rss" "$PY" - "$DIR/fuse/sdxl" "$lora" 2>/dev/null <<'PY'
import json, sys, time, torch
torch.set_num_threads(2)
from diffusers import StableDiffusionXLPipeline
pipe = StableDiffusionXLPipeline.from_pretrained(sys.argv[1], torch_dtype=torch.float16)
t = time.perf_counter()
pipe.load_lora_weights(sys.argv[2], adapter_name="x")
pipe.fuse_lora(components=["unet"], adapter_names=["x"])
print(json.dumps({"fuse_s": round(time.perf_counter() - t, 3)}))
PY
) ;;
      esac
      echo "{\"side\": \"$side\", \"rank\": $rank, ${line:1:-1}, \"peak_rss_gib\": $(python3 -c "print(round($(cat "$out.rss") / 1048576, 2))")}" | tee -a "$out"
    done
  done
done
python3 - "$out" <<'PY'
import json, statistics, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
med = statistics.median
for rank in sorted({r["rank"] for r in rows}):
    g = lambda side, k: [r[k] for r in rows if r["side"] == side and r["rank"] == rank]
    base, lora, dif = med(g("runner-base", "load_s")), med(g("runner-lora", "load_s")), med(g("diffusers", "fuse_s"))
    print(f"rank {rank}: runner fusing (load_s with - without) {lora - base:.2f} s (load {base:.2f} -> {lora:.2f} s); diffusers load_lora_weights + fuse_lora {dif:.2f} s; ratio {(lora - base) / dif:.3f}")
    print(f"         peak RSS runner {med(g('runner-base', 'peak_rss_gib')):.2f} -> {med(g('runner-lora', 'peak_rss_gib')):.2f} GiB; diffusers {med(g('diffusers', 'peak_rss_gib')):.2f} GiB")
PY
rm -f "$out" "$out.json" "$out.rss"

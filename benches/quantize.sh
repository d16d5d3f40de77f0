#!/usr/bin/env bash
# `runner quantize` of a real-size FLUX.1-dev transformer (bf16, sparse safetensors shards built
# from tests/data/shapes/flux-dev.json: real headers, data read as zeros from the holes), per type:
# wall time, throughput over the source's bytes, peak RSS (the process's own; the output's page
# cache is the kernel's) against the largest tensor, and the file's size.
#   benches/quantize.sh [RUNNER] [TYPES]     (default target/release/runner, "q8_0 q4_0")
# Needs about 13 GB of free disk for q8_0's output (removed after each run).
set -euo pipefail
cd "$(dirname "$0")/.."
bin=${1:-target/release/runner}
types=${2:-q8_0 q4_0}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
python3 benches/sparse_pipeline.py flux-dev "$work" BF16 >/dev/null
src=$work/flux-dev/transformer
largest=$(python3 -c 'import json,math,sys; t=json.load(open(sys.argv[1]))["components"]["transformer"]["tensors"]; print(max(math.prod(x[2]) for x in t) * 2)' tests/data/shapes/flux-dev.json)
srcbytes=$(python3 -c 'import json,math,sys; t=json.load(open(sys.argv[1]))["components"]["transformer"]["tensors"]; print(sum(math.prod(x[2]) for x in t) * 2)' tests/data/shapes/flux-dev.json)
echo "| type | wall s | source GB/s | peak RSS MiB | largest tensor (bf16) MiB | file GB |"
echo "|---|---|---|---|---|---|"
for t in $types; do
  sync
  /usr/bin/time -f '%e %M' -o "$work/time" "$bin" quantize "$src" --type "$t" --out "$work/out.gguf" --force > /dev/null
  read -r wall rss < "$work/time"
  size=$(stat -c %s "$work/out.gguf")
  python3 -c "import sys; w,r,s,l,f=map(float,sys.argv[1:]); print(f'| $t | {w:.1f} | {s/w/1e9:.2f} | {r/1024:.0f} | {l/2**20:.0f} | {f/1e9:.2f} |')" "$wall" "$rss" "$srcbytes" "$largest" "$size"
  rm -f "$work/out.gguf"
done

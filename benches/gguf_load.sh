#!/usr/bin/env bash
# Load of a real-size GGUF FLUX.1-dev transformer on the CPU, runner vs diffusers' from_single_file,
# interleaved (which goes first alternates): wall time from before the load to the model ready, and
# each process's peak RSS (/usr/bin/time). The file: `runner quantize` of the real-size sparse
# FLUX.1-dev transformer (tests/data/shapes/flux-dev.json, bf16) to TYPE in the original names,
# as city96's files have them (built once into BENCH_DIR: TYPE q8_0 writes 12.7 GB); bf16 compute;
# the page cache warm for both sides (the file was just read or written).
#   benches/gguf_load.sh [RUNS] [TYPE] [PY]   (BENCH_DIR, default /tmp/runner-bench)
set -euo pipefail
cd "$(dirname "$0")/.."
RUNS=${1:-3}
TY=${2:-q8_0}
PY=${3:-.venv-fixtures/bin/python}
DIR=${BENCH_DIR:-/tmp/runner-bench}
mkdir -p "$DIR"
[[ -f $DIR/flux-dev/transformer/config.json ]] || python3 benches/sparse_pipeline.py flux-dev "$DIR" BF16 >/dev/null
GGUF=$DIR/flux-dev-$TY.gguf
cargo build --release --locked --bin runner --bin runner-torch 2>/dev/null
cargo bench --bench flux_bench --no-run --locked 2>/dev/null
BIN=$(ls -t target/release/deps/flux_bench-* | grep -v '\.d$' | head -1)
[[ -f $GGUF ]] || target/release/runner quantize "$DIR/flux-dev/transformer" --type "$TY" --keys original --out "$GGUF" >/dev/null
echo "== $GGUF ($(du -h --apparent-size "$GGUF" | cut -f1)), $RUNS runs a side"
out=$(mktemp)
for round in $(seq "$RUNS"); do
  if (( round % 2 )); then order="runner diffusers"; else order="diffusers runner"; fi
  for side in $order; do
    if [[ $side == runner ]]; then
      line=$(BENCH_LOAD_ONLY=1 /usr/bin/time -f "%M" -o "$out.rss" "$BIN" "$DIR/flux-dev/transformer" 0 0 0 "$GGUF")
    else
      line=$(/usr/bin/time -f "%M" -o "$out.rss" "$PY" benches/gguf_load_py.py "$DIR/flux-dev/transformer" "$GGUF" 2>/dev/null)
    fi
    echo "${line%\}}, \"peak_rss_gib\": $(python3 -c "print(round($(cat "$out.rss") / 1048576, 2))")}" | tee -a "$out"
  done
done
python3 - "$out" <<'PY'
import json, statistics, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
side = lambda i, k: [r[k] for r in rows if r["impl"] == i]
med = statistics.median
for k, unit in [("load_s", "s"), ("peak_rss_gib", "GiB")]:
    r, d = side("runner", k), side("diffusers", k)
    print(f"{k:13} runner median {med(r):.2f} {unit} ({min(r):.2f}-{max(r):.2f})  diffusers median {med(d):.2f} {unit} ({min(d):.2f}-{max(d):.2f})  ratio {med(r) / med(d):.3f}")
PY
rm -f "$out" "$out.rss"

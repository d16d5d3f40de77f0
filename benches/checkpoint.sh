#!/usr/bin/env bash
# Checkpoint load/shard benchmark: runner vs python safetensors + torch, same files, same run.
#   benches/checkpoint.sh [GB] [PY]   (GB of the synthetic f32 checkpoint, default 3;
#                                      PY: a python with torch + safetensors, default .venv-fixtures)
# Files go to ${BENCH_DIR:-/tmp/runner-bench}; results print as JSON lines and a summary table.
set -euo pipefail
cd "$(dirname "$0")/.."
GB=${1:-3}
PY=${2:-.venv-fixtures/bin/python}
DIR=${BENCH_DIR:-/tmp/runner-bench}
mkdir -p "$DIR"
export OMP_NUM_THREADS=1
# Both sides allocate with transparent huge pages (runner sets this itself when unset).
export THP_MEM_ALLOC_ENABLE=1
cargo bench --bench checkpoint_bench --no-run --locked 2>/dev/null
BIN=$(ls -t target/release/deps/checkpoint_bench-* | grep -v '\.d$' | head -1)
[[ -f $DIR/f32.safetensors ]] || "$BIN" make "$DIR/f32.safetensors" "$GB" F32
[[ -f $DIR/f16.safetensors ]] || "$BIN" make "$DIR/f16.safetensors" "$(echo "$GB / 2" | bc -l)" F16
# Stable numbers need free memory: drop clean page cache (root only; ignored otherwise), then
# warm only the inputs. Shard outputs are deleted right after each run for the same reason.
drop_caches() { sync; echo 3 > /proc/sys/vm/drop_caches 2>/dev/null || true; }
warm() { cat "$@" > /dev/null; }
out=$DIR/results.jsonl
: > "$out"
for i in $(seq 1 ${RUNS:-5}); do
  rm -rf "$DIR/shard-r" "$DIR/shard-p"
  drop_caches
  warm "$DIR/f32.safetensors" "$DIR/f16.safetensors"
  # Alternate which side goes first: a run that follows a large free is slowed by the kernel.
  r_load() { "$BIN" load-touch "$DIR/f32.safetensors"; "$BIN" load-touch "$DIR/f16.safetensors" f32; }
  p_load() { "$PY" benches/checkpoint_py.py load "$DIR/f32.safetensors"; "$PY" benches/checkpoint_py.py load-to-f32 "$DIR/f16.safetensors"; }
  "$BIN" read "$DIR/f32.safetensors" | tee -a "$out"
  "$BIN" load "$DIR/f32.safetensors" | tee -a "$out"
  if (( i % 2 )); then r_load | tee -a "$out"; p_load | tee -a "$out"; else p_load | tee -a "$out"; r_load | tee -a "$out"; fi
  "$BIN" shard "$DIR/f32.safetensors" "$DIR/shard-r" 1GB no-fsync | tee -a "$out"
  rm -rf "$DIR/shard-r"
  "$PY" benches/checkpoint_py.py shard "$DIR/f32.safetensors" "$DIR/shard-p" 1GB | tee -a "$out"
  rm -rf "$DIR/shard-p"
  "$BIN" shard "$DIR/f32.safetensors" "$DIR/shard-r" 1GB | tee -a "$out"
  rm -rf "$DIR/shard-r"
done
python3 - "$out" <<'PY'
import json, sys, statistics
rows = [json.loads(l) for l in open(sys.argv[1]) if l.startswith("{\"impl")]
by = {}
for r in rows:
    by.setdefault((r["what"], r["impl"]), []).append(r)
print(f"\n| what | impl | runs | GB/s median | GB/s best | max RSS / bytes |")
print("|---|---|---|---|---|---|")
for (what, impl), rs in sorted(by.items()):
    g = [r["gbps"] for r in rs]
    rss = statistics.median(r["max_rss"] / r["bytes"] for r in rs)
    print(f"| {what} | {impl} | {len(rs)} | {statistics.median(g):.2f} | {max(g):.2f} | {rss:.2f} |")
PY

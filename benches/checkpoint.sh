#!/usr/bin/env bash
# Checkpoint load/shard benchmark: runner vs python safetensors + torch, same files, same run.
#   benches/checkpoint.sh [GB] [PY]   (GB of the synthetic f32 checkpoint, default 3;
#                                      PY: a python with torch + safetensors, default .venv-fixtures)
# Files go to ${BENCH_DIR:-/tmp/runner-bench}; results print as JSON lines, a summary table, the ratios
# runner / python and runner / plain read, and the fp16 -> fp32 seconds of each iteration in run order.
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
med = lambda what, impl: statistics.median(r["gbps"] for r in by[(what, impl)])
best = lambda what, impl: max(r["gbps"] for r in by[(what, impl)])
print("\nratios (GB/s, so > 1 is faster):")
for what, label in (("load-touch", "load f32 -> f32"), ("load-touch-to-f32", "load f16 -> f32"), ("shard", "shard (runner --no-fsync)")):
    print(f"  {label}, runner / python: median {med(what, 'runner') / med(what, 'python'):.2f}x, best {best(what, 'runner') / best(what, 'python'):.2f}x")
for what, label in (("load-touch", "load f32 -> f32"), ("load-touch-to-f32", "load f16 -> f32")):
    print(f"  {label}, runner / plain read: median {med(what, 'runner') / med('read', 'runner'):.2f}x, best {best(what, 'runner') / best('read', 'runner'):.2f}x")
# fp16 -> fp32 seconds per iteration in run order (odd iterations run runner's loads first).
r = [x["seconds"] for x in by[("load-touch-to-f32", "runner")]]
p = [x["seconds"] for x in by[("load-touch-to-f32", "python")]]
print("\n| iteration | first to run | second to run |\n|---|---|---|")
for i, (a, b) in enumerate(zip(r, p), 1):
    first, second = (f"runner {a:.2f}", f"Python {b:.2f}") if i % 2 else (f"Python {b:.2f}", f"runner {a:.2f}")
    print(f"| {i} | {first} | {second} |")
# The same position in the order: runner when it ran first against Python when it ran first, etc.
odd = lambda xs: [x for i, x in enumerate(xs, 1) if i % 2]
even = lambda xs: [x for i, x in enumerate(xs, 1) if not i % 2]
for label, a, b in (("first", odd(r), even(p)), ("second", even(r), odd(p))):
    if a and b:
        a, b = statistics.median(a), statistics.median(b)
        print(f"f16 -> f32 when running {label}: runner {a:.2f} s, Python {b:.2f} s (medians): runner {b / a:.2f}x Python's GB/s")
PY

#!/usr/bin/env bash
# runner's header-only commands on a full-size SDXL base folder (fp16 variant files with the real
# headers of tests/data/shapes/sdxl.json, 6.94 GB of sparse data; benches/sparse_pipeline.py) under
# manifests/sdxl.toml: `inspect`, `lock` (one cold run after dropping the page cache, when root, then
# RUNS warm ones; beside huggingface_hub's `sha_fileobj`, what it verifies downloads with, over the
# same files one after the other, in one Python process: the reference), `validate
# --locked`, `plan` (whole process, and the in-process plan that RUST_LOG=runner=debug logs as
# "planned elapsed=...") and `schema` (a process that only starts). Prints a JSON line per process,
# then min / median / max per command, GB/s where bytes are hashed, and the ratios.
#   benches/sdxl_folder.sh [RUNS] [PY]     (RUNS default 5; RUNNER, default target/release/runner)
set -euo pipefail
cd "$(dirname "$0")/.."
RUNS=${1:-5}
PY=${2:-.venv-fixtures/bin/python}
RUNNER=${RUNNER:-target/release/runner}
[[ -x $RUNNER ]] || cargo build --release --locked
DIR=${BENCH_DIR:-/tmp/runner-bench}/sdxl-fp16-sparse
[[ -f $DIR/sdxl/model_index.json ]] || { rm -rf "$DIR"; mkdir -p "$DIR"; python3 benches/sparse_pipeline.py sdxl "$DIR" F16 fp16 >/dev/null; }
M=$DIR/sdxl.toml
sed "s#\"../models/stable-diffusion-xl-base-1.0\"#\"$DIR/sdxl\"#; s#\"../models/sdxl-unet-sharded\"#\"$DIR/sdxl/unet\"#" manifests/sdxl.toml > "$M"
out=$(mktemp)
trap 'rm -f "$out"' EXIT
# timed WHAT CMD...: CMD's wall time (and its stdout, stderr) as a JSON line.
timed() {
  local what=$1 t0 t1; shift
  t0=$(date +%s.%N); "$@" > "$DIR/stdout" 2> "$DIR/stderr"; t1=$(date +%s.%N)
  echo "{\"what\": \"$what\", \"wall_s\": $(awk "BEGIN { printf \"%.4f\", $t1 - $t0 }")$(extra "$what")}" | tee -a "$out"
}
extra() {
  case $1 in
    lock*) python3 -c 'import json, sys; r = json.load(open(sys.argv[1])); print(", \"in_process_s\": %.4f, \"bytes\": %d, \"files\": %d" % (r["seconds"], r["bytes"], r["files"]))' "$DIR/stdout" ;;
    plan) sed -n 's/.*planned elapsed=\([0-9.]*\)\(ms\|µs\|s\).*/\1 \2/p' "$DIR/stderr" | awk '{ printf ", \"in_process_s\": %.6f", $1 * ($2 == "ms" ? 1e-3 : $2 == "s" ? 1 : 1e-6) }' ;;
  esac
}
if sync && echo 3 > /proc/sys/vm/drop_caches 2>/dev/null; then
  timed lock-cold "$RUNNER" lock "$M" --json
else
  echo "(not root: no cold lock run)"
fi
mapfile -t files < <(sed -n 's/^path = "\(.*\)"$/\1/p' "$M.lock")
for i in $(seq "$RUNS"); do
  timed inspect "$RUNNER" inspect --json --variant fp16 "$DIR/sdxl"
  timed lock "$RUNNER" lock "$M" --json
  timed hf-sha256 $PY -c 'import os, sys; from huggingface_hub.utils.sha import sha_fileobj; [sha_fileobj(open(os.path.join(sys.argv[1], f), "rb")) for f in sys.argv[2:]]' "$DIR" "${files[@]}"
  timed validate-locked "$RUNNER" validate --locked "$M"
  RUST_LOG=runner=debug timed plan "$RUNNER" plan "$M"
  timed schema "$RUNNER" schema
done
python3 - "$out" "$DIR" "${files[@]}" <<'PY'
import json, os, statistics, sys
rows = [json.loads(line) for line in open(sys.argv[1])]
hashed = sum(os.path.getsize(os.path.join(sys.argv[2], f)) for f in sys.argv[3:])
med = statistics.median
by = {}
for r in rows:
    by.setdefault(r["what"], []).append(r)
print(f"\nfull-size SDXL fp16 folder: {len(sys.argv) - 3} files locked, {hashed / 1e9:.2f} GB hashed")
print("| command | runs | wall s median (min - max) | in-process s median (min - max) | GB/s at the median |")
print("|---|---|---|---|---|")
m = {}
for what, rs in by.items():
    w = [r["wall_s"] for r in rs]
    ip = [r["in_process_s"] for r in rs if "in_process_s" in r]
    m[what] = med(w)
    inproc = f"{med(ip):.4f} ({min(ip):.4f} - {max(ip):.4f})" if ip else "-"
    rate = f"{hashed / med(w) / 1e9:.2f}" if what.startswith(("lock", "hf-sha256")) else "-"
    print(f"| {what} | {len(rs)} | {med(w):.3f} ({min(w):.3f} - {max(w):.3f}) | {inproc} | {rate} |")
print(f"ratio runner lock / huggingface_hub sha_fileobj (wall, median): {m['lock'] / m['hf-sha256']:.2f}")
print(f"ratio runner plan / runner schema (wall, median; schema = start-up alone): {m['plan'] / m['schema']:.2f}")
PY

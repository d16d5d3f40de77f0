#!/usr/bin/env bash
# Module-level planning of synthetic UNets (2k / 20k / 200k modules), runner vs accelerate's
# `infer_auto_device_map` on the same module trees and the same 3 GPU budgets, same run, REPS
# repetitions in one process per size and side: min / median / max ms, and the ratio
# runner (module tree from tensor names + plan) / accelerate at the median.
#   benches/plan.sh [REPS] [PY]     (REPS default 5; ACCEL_SIZES, default "2000 20000 200000": accelerate
#                                    takes tens of seconds a call at 200k, a few minutes in all)
set -euo pipefail
cd "$(dirname "$0")/.."
REPS=${1:-5}
PY=${2:-.venv-fixtures/bin/python}
ACCEL_SIZES=${ACCEL_SIZES:-2000 20000 200000}
cargo bench --bench plan_bench --no-run --locked 2>/dev/null
BIN=$(ls -t target/release/deps/plan_bench-* | grep -v '\.d$' | head -1)
out=$(mktemp)
trap 'rm -f "$out"' EXIT
PLAN_REPS=$REPS "$BIN" | tee -a "$out"
for n in $ACCEL_SIZES; do
  $PY benches/plan_accelerate.py "$n" "$REPS" | tee -a "$out"
done
python3 - "$out" <<'PY'
import json, sys
rows = [json.loads(line) for line in open(sys.argv[1])]
acc = {r["modules"]: r for r in rows if r["impl"] == "accelerate"}
print("\n| modules | runner: module tree from tensor names, ms | runner: plan (split), ms | accelerate infer_auto_device_map, ms | runner tree + plan / accelerate |")
print("|---|---|---|---|---|")
for r in (r for r in rows if r["impl"] == "runner"):
    mmm = lambda x, k: f"{x[k + '_median_ms']:.2f} ({x[k + '_min_ms']:.2f} - {x[k + '_max_ms']:.2f})"
    a = acc.get(r["modules"])
    ratio = f"{(r['tree_median_ms'] + r['plan_median_ms']) / a['infer_median_ms']:.4f}" if a else "-"
    print(f"| {r['modules']:,} | {mmm(r, 'tree')} | {mmm(r, 'plan')} | {mmm(a, 'infer') if a else 'not run (ACCEL_SIZES)'} | {ratio} |")
print("median (min - max) over the repetitions")
PY

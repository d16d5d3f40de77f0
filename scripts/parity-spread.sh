#!/usr/bin/env bash
# How far runner's numbers move from the committed diffusers references across CPU kernel paths
# and thread counts: runs scripts/test-parity.sh (recording, asserting nothing) under each
# ATEN_CPU_CAPABILITY this CPU has (default, avx2, avx512) with 1 and 2 threads, then prints, per
# bound of src/parity.rs, the worst difference seen on each path, the worst overall, where it
# was, the bound and the bound's multiple of it. The bounds in src/parity.rs come from this table.
#   scripts/parity-spread.sh [OUT_DIR]      (default target/parity-spread; THREADS="1 2")
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-target/parity-spread}
mkdir -p "$out"
rm -f "$out"/*.jsonl
caps=(default avx2)
grep -qw avx512f /proc/cpuinfo && caps+=(avx512)
for cap in "${caps[@]}"; do
  for t in ${THREADS:-1 2}; do
    echo "parity-spread: ATEN_CPU_CAPABILITY=$cap, $t thread(s)" >&2
    ATEN_CPU_CAPABILITY=$cap RUNNER_TEST_THREADS=$t RUNNER_PARITY=measure RUNNER_PARITY_LOG="$PWD/$out/$cap-t$t.jsonl" \
      scripts/test-parity.sh >"$out/$cap-t$t.log" 2>&1 || { tail -30 "$out/$cap-t$t.log" >&2; exit 1; }
  done
done
python3 - "$out" <<'PY'
import glob, json, os, sys
out = sys.argv[1]
runs = {}
for f in sorted(glob.glob(os.path.join(out, "*.jsonl"))):
    runs[os.path.basename(f)[:-6]] = [json.loads(l) for l in open(f)]
bounds = {}
for run, rows in runs.items():
    for r in rows:
        b = bounds.setdefault(r["bound"], {"tolerance": r["tolerance"], "runs": {}, "worst": (-1.0, "", ""), "n": set()})
        b["n"].add(r["what"])
        b["runs"][run] = max(b["runs"].get(run, 0.0), r["measured"])
        if r["measured"] > b["worst"][0]:
            b["worst"] = (r["measured"], r["what"], run)
cols = list(runs)
print(f"{'bound':<22} {'checks':>6} " + " ".join(f"{c:>10}" for c in cols) + f" {'worst':>10} {'bound':>9} {'x worst':>8}  worst at")
over = 0
for name, b in sorted(bounds.items()):
    w = b["worst"][0]
    mult = "inf" if w == 0 else f"{b['tolerance'] / w:.1f}"
    over += w > b["tolerance"]
    print(f"{name:<22} {len(b['n']):>6} " + " ".join(f"{b['runs'].get(c, 0):>10.2e}" for c in cols) + f" {w:>10.2e} {b['tolerance']:>9.1e} {mult:>8}  {b['worst'][1]} ({b['worst'][2]})")
# Every check's spread across paths (max - min of its measurements): how much the kernel path alone moves it.
spread = {}
for run, rows in runs.items():
    for r in rows:
        spread.setdefault((r["bound"], r["what"]), []).append(r["measured"])
print("\nlargest change between kernel paths / thread counts, per bound:")
for name in sorted(bounds):
    k, v = max(((k, v) for k, v in spread.items() if k[0] == name), key=lambda kv: max(kv[1]) - min(kv[1]))
    print(f"  {name:<22} {max(v) - min(v):.2e}  {k[1]}")
sys.exit(1 if over else 0)
PY

#!/usr/bin/env bash
# `make parity`: bit equality with diffusers where it is real. Re-records diffusers' outputs on
# this machine (the tools/make_references*.py, make_scheduler_refs.py and make_safety_refs.py
# of the committed fixtures, into a temporary folder), runs the parity tests against them
# (scripts/test-parity.sh with RUNNER_REFS_DIR) and prints, case by case, the largest difference
# of each; every comparison src/parity.rs marks exact must be 0. Not part of `make test`: it
# installs the fixtures environment (.venv-fixtures, 4.6 GB) and takes a few minutes.
#   scripts/parity.sh [KEEP_DIR]     (KEEP_DIR: record there and keep it; default a temp folder)
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup-fixtures-venv.sh
if [[ $# -gt 0 ]]; then
  refs=$1
  mkdir -p "$refs"
else
  refs=$(mktemp -d "${TMPDIR:-/tmp}/runner-parity.XXXXXX")
  trap 'rm -rf "$refs"' EXIT
fi
py=.venv-fixtures/bin/python
echo "parity: recording diffusers' outputs on this machine into $refs" >&2
for tool in make_references.py make_scheduler_refs.py make_safety_refs.py; do
  RUNNER_REFS_OUT=$refs "$py" -B "tools/$tool" >"$refs/$tool.log" 2>&1 || { tail -30 "$refs/$tool.log" >&2; echo "parity: error: tools/$tool failed" >&2; exit 1; }
done
# Token ids are integers (no kernel paths): the committed tokenizer references serve as they are.
cp tests/fixtures/refs/tokenizer.json "$refs/"
echo "parity: comparing runner with them" >&2
log=$refs/parity.jsonl
rm -f "$log"
RUNNER_REFS_DIR=$refs RUNNER_PARITY=measure RUNNER_PARITY_LOG=$log scripts/test-parity.sh >"$refs/tests.log" 2>&1 || { tail -40 "$refs/tests.log" >&2; echo "parity: error: the parity tests failed (log: $refs/tests.log)" >&2; exit 1; }
python3 - "$log" <<'PY'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
cases = {}
for r in rows:
    case, _, what = r["what"].partition(": ")
    c = cases.setdefault(case, {"exact": 0.0, "other": 0.0, "n": 0, "worst": ""})
    c["n"] += 1
    key = "exact" if r["exact"] else "other"
    if r["measured"] > c[key]:
        c[key] = r["measured"]
        if r["exact"]:
            c["worst"] = what
bad = [k for k, c in cases.items() if c["exact"] != 0.0]
print(f"{'case':<52} {'checks':>6} {'max diff':>10}  {'(f64 tables)':>12}")
for k in sorted(cases):
    c = cases[k]
    other = f"{c['other']:.1e}" if c["other"] else ""
    print(f"{k:<52} {c['n']:>6} {c['exact']:>10.1e}  {other:>12}  {'NOT EQUAL: ' + c['worst'] if c['exact'] else ''}")
n = sum(c["n"] for c in cases.values())
if bad:
    print(f"\nparity: {len(bad)} of {len(cases)} cases differ from diffusers recorded on this machine", file=sys.stderr)
    sys.exit(1)
print(f"\nparity: runner equals diffusers recorded on this machine, bit for bit: {len(cases)} cases, {n} comparisons "
      "(the f64 column: schedule tables runner keeps in f64 against diffusers' float32, not an exact comparison)")
PY

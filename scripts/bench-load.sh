#!/usr/bin/env bash
# Load time, process start to the first denoising step, and peak RSS of `runner run` on real-size
# SD 1.5 and SDXL pipelines (sparse safetensors files built from tests/data/shapes/PIPE.json,
# tokenizers/scheduler from the tiny fixture), fp32 as stored and fp16 converted; 1 step at
# 64x64 so that loading dominates.
#   scripts/bench-load.sh [RUNNER [OTHER_RUNNER]]   (interleaved when two binaries are given)
#   PIPES="sd15 sdxl" DTYPES="fp32 fp16" RUNS=3 select the cases.
# With .venv-fixtures present (tools/requirements-fixtures.lock), diffusers' from_pretrained on the
# same folder runs interleaved too (tools/bench_load_diffusers.py; it stops at its first UNet call,
# so its peak RSS is a lower bound of a whole run's).
# Prints a JSON line per process, then the table BENCHMARKS.md shows: medians over the runs, the
# ratios runner / diffusers, and every run's load time (min, median, max).
set -euo pipefail
cd "$(dirname "$0")/.."
bins=("${1:-target/release/runner}")
[[ $# -ge 2 ]] && bins+=("$2")
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
PIPES=${PIPES:-sd15 sdxl}
DTYPES=${DTYPES:-fp32 fp16}
RUNS=${RUNS:-3}
for pipe in $PIPES; do
python3 benches/sparse_pipeline.py "$pipe" "$work" F32 >/dev/null
kind=$([[ $pipe == sd15 ]] && echo stable-diffusion || echo stable-diffusion-xl)
safety=$([[ $pipe == sd15 ]] && printf '[components.safety_checker]\nenabled = false\n' || true)
for dtype in fp32 fp16; do
  printf 'schema_version = 1\nname = "%s"\n[pipeline]\nkind = "%s"\nsource = "%s"\ndtype = "%s"\n%s\n[placement]\nmax_memory = { cpu = "20GiB" }\n[run]\nprompt = "a cat"\nsteps = 1\nwidth = 64\nheight = 64\noutput = "x.png"\n' \
    "$pipe-$dtype" "$kind" "$pipe" "$dtype" "$safety" > "$work/$pipe-$dtype.toml"
done
for dtype in $DTYPES; do
  for i in $(seq "$RUNS"); do
    for b in "${bins[@]}"; do
      /usr/bin/time -f "%M %e" -o "$work/time" "$b" run "$work/$pipe-$dtype.toml" --quiet --json > "$work/out.json"
      read -r rss wall < "$work/time"
      figures=$(python3 -c "
import json; r = json.load(open('$work/out.json')); t, h = r['timings'], r['host']
print(json.dumps({'load_s': round(t['load_s'], 2), 'to_first_step_s': round(t['startup_s'] + t['load_s'] + t['encode_s'], 2),
  'load_rss_over_loaded': round((h['load_peak_rss_bytes'] - h['rss_before_load_bytes']) / h['loaded_bytes'], 3), 'loaded_gb': round(h['loaded_bytes'] / 1e9, 2)})[1:-1])")
      echo "{\"binary\": \"$b\", \"pipe\": \"$pipe\", \"dtype\": \"$dtype\", \"run\": $i, $figures, \"wall_s\": $wall, \"peak_rss_gib\": $(python3 -c "print(round($rss / 1048576, 2))")}" | tee -a "$work/results.jsonl"
    done
    if [[ -x .venv-fixtures/bin/python ]]; then
      /usr/bin/time -f "%M %e" -o "$work/time" env OMP_NUM_THREADS=2 .venv-fixtures/bin/python tools/bench_load_diffusers.py "$work/$pipe" "$dtype" > "$work/py.json" 2>/dev/null
      read -r rss wall < "$work/time"
      echo "{\"binary\": \"diffusers\", \"pipe\": \"$pipe\", \"dtype\": \"$dtype\", \"run\": $i, \"in_process\": $(cat "$work/py.json"), \"wall_s\": $wall, \"peak_rss_gib\": $(python3 -c "print(round($rss / 1048576, 2))")}" | tee -a "$work/results.jsonl"
    fi
  done
done
rm -rf "${work:?}/$pipe"
done
# The summary: medians over the runs of each side, and the ratios runner / diffusers.
python3 - "$work/results.jsonl" <<'PY'
import json, statistics, sys
rows = [json.loads(line) for line in open(sys.argv[1])]
med = statistics.median
def runs(rs, key):
    return med([key(r) for r in rs]) if rs else float("nan")
print("\n| pipeline | dtype | binary | loaded GB | load s | diffusers load s (touched) | load / touched | to 1st step s | diffusers s | ratio | peak RSS GiB | diffusers GiB (lower bound) | ratio | load RSS / loaded | peak RSS / loaded | process wall s | diffusers wall s |")
print("|" + "---|" * 17)
cases = sorted({(r["pipe"], r["dtype"]) for r in rows}, key=lambda c: (c[0] != "sd15", c[1] != "fp32"))
for pipe, dtype in cases:
    d = [r for r in rows if (r["pipe"], r["dtype"], r["binary"]) == (pipe, dtype, "diffusers")]
    dl, dt, d1 = runs(d, lambda r: r["in_process"]["load_s"]), runs(d, lambda r: r["in_process"]["load_touched_s"]), runs(d, lambda r: r["in_process"]["to_first_step_s"])
    drss, dwall = runs(d, lambda r: r["peak_rss_gib"]), runs(d, lambda r: r["wall_s"])
    for b in dict.fromkeys(r["binary"] for r in rows if r["binary"] != "diffusers"):
        rs = [r for r in rows if (r["pipe"], r["dtype"], r["binary"]) == (pipe, dtype, b)]
        gb = runs(rs, lambda r: r["loaded_gb"])
        load, first, rss = runs(rs, lambda r: r["load_s"]), runs(rs, lambda r: r["to_first_step_s"]), runs(rs, lambda r: r["peak_rss_gib"])
        print(f"| {pipe} | {dtype} | {b} | {gb:.2f} | {load:.2f} | {dl:.2f} ({dt:.2f}) | **{load / dt:.2f}** | {first:.2f} | {d1:.2f} | **{first / d1:.2f}** | {rss:.2f} | {drss:.2f} | **{rss / drss:.2f}** "
              f"| {runs(rs, lambda r: r['load_rss_over_loaded']):.3f} | {rss * 2**30 / (gb * 1e9):.2f} | {runs(rs, lambda r: r['wall_s']):.2f} | {dwall:.2f} |")
print("\nload s of every run, in run order (runner / diffusers' from_pretrained):")
for pipe, dtype in cases:
    for b in dict.fromkeys(r["binary"] for r in rows):
        rs = [r for r in rows if (r["pipe"], r["dtype"], r["binary"]) == (pipe, dtype, b)]
        t = [r["in_process"]["load_s"] if b == "diffusers" else r["load_s"] for r in rs]
        print(f"  {pipe} {dtype} {b}: " + " ".join(f"{x:.2f}" for x in t) + f"  (min {min(t):.2f}, median {med(t):.2f}, max {max(t):.2f})")
PY

"""Summaries of the interleaved runner-vs-diffusers bench scripts (their JSON lines, one per process).
  summary.py step FILE       per-forward times of benches/*_step.sh: median and min by wall and CPU time
  summary.py pipeline FILE   benches/*_pipeline.sh: in-process call, whole process wall and CPU time
  summary.py casting FILE    benches/casting.sh: per side and storage, seconds per forward; fp8 / none, runner / diffusers"""
import json
import statistics
import sys

mode, path = sys.argv[1], sys.argv[2]
rows = [json.loads(line) for line in open(path)]
med = statistics.median
if mode == "step":
    for what, key in (("wall", "times_s"), ("CPU", "cpu_times_s")):
        s = {}
        for side in ("runner", "diffusers"):
            t = [x for r in rows if r["impl"] == side for x in r[key]]
            s[side] = (med(t), min(t))
            print(f"{what:4} {side:9}  median {s[side][0]:.4f} s  min {s[side][1]:.4f} s  ({len(t)} forwards)")
        print(f"{what:4} ratio runner/diffusers: median {s['runner'][0] / s['diffusers'][0]:.2f}, min {s['runner'][1] / s['diffusers'][1]:.2f}")
elif mode == "casting":
    def t(side, storage, key):
        return [x for r in rows if r["impl"] == side and r["storage"] == storage for x in r[key]]
    for what, key in (("wall", "times_s"), ("CPU", "cpu_times_s")):
        for side in ("runner", "diffusers"):
            no, fp8 = t(side, "none", key), t(side, "fp8-e4m3", key)
            print(f"{what:4} {side:9}  none median {med(no):.3f} s ({min(no):.3f} - {max(no):.3f})  fp8-e4m3 median {med(fp8):.3f} s ({min(fp8):.3f} - {max(fp8):.3f})  "
                  f"ratio fp8/none: median {med(fp8) / med(no):.2f}, min {min(fp8) / min(no):.2f}  ({len(no)} + {len(fp8)} forwards)")
        for storage in ("none", "fp8-e4m3"):
            print(f"{what:4} ratio runner/diffusers, {storage}: median {med(t('runner', storage, key)) / med(t('diffusers', storage, key)):.2f}")
else:
    r = [x for x in rows if x["impl"] == "runner"]
    d = [x for x in rows if x["impl"] == "diffusers"]
    rc, rw, ru = [x["call_s"] for x in r], [x["wall_s"] for x in r], [x["cpu_s"] for x in r]
    dc, dw, du = [t for x in d for t in x["times_s"]], [x["process_to_image_s"] for x in d], [x["process_to_image_cpu_s"] for x in d]
    for name, a, b in (("in-process call  ", rc, dc), ("whole process    ", rw, dw), ("whole process CPU", ru, du)):
        print(f"{name} runner median {med(a):.3f} s min {min(a):.3f} s | diffusers median {med(b):.3f} s min {min(b):.3f} s | ratio median {med(a) / med(b):.2f} min {min(a) / min(b):.2f}")
    parts = [x["breakdown_s"] for x in d if "breakdown_s" in x]
    if parts:  # BREAKDOWN=1: diffusers' call by part (mean per call in each process, median over processes)
        call = med(dc)
        print("diffusers' call by part: " + ", ".join(f"{k} {med(p[k] for p in parts):.3f} s ({med(p[k] for p in parts) / call:.0%})" for k in parts[0]) + f" of {call:.3f} s")

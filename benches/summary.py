"""Summaries of the interleaved runner-vs-diffusers bench scripts (their JSON lines, one per process).
  summary.py step FILE       per-forward times of benches/*_step.sh: median and min by wall and CPU time
  summary.py pipeline FILE   benches/*_pipeline.sh: in-process call, whole process wall and CPU time"""
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
else:
    r = [x for x in rows if x["impl"] == "runner"]
    d = [x for x in rows if x["impl"] == "diffusers"]
    rc, rw, ru = [x["call_s"] for x in r], [x["wall_s"] for x in r], [x["cpu_s"] for x in r]
    dc, dw, du = [t for x in d for t in x["times_s"]], [x["process_to_image_s"] for x in d], [x["process_to_image_cpu_s"] for x in d]
    for name, a, b in (("in-process call  ", rc, dc), ("whole process    ", rw, dw), ("whole process CPU", ru, du)):
        print(f"{name} runner median {med(a):.3f} s min {min(a):.3f} s | diffusers median {med(b):.3f} s min {min(b):.3f} s | ratio median {med(a) / med(b):.2f} min {min(a) / min(b):.2f}")

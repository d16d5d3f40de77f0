"""Runner side of the benches/*_pipeline.sh scripts: one `runner run --json` process on MANIFEST; prints
its in-process call (timings.encode_s + denoise_s + decode_s) and the whole process' wall and CPU time.
  time_runner.py MANIFEST"""
import json
import resource
import subprocess
import sys
import time


def cpu():
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


s, c = time.perf_counter(), cpu()
j = subprocess.run(["target/release/runner", "run", sys.argv[1], "--json", "--quiet"], check=True, capture_output=True, text=True).stdout
wall, cpu_s = time.perf_counter() - s, cpu() - c
t = json.loads(j)["timings"]
print(json.dumps({"impl": "runner", "call_s": round(t["encode_s"] + t["denoise_s"] + t["decode_s"], 4), "wall_s": round(wall, 4), "cpu_s": round(cpu_s, 4), "timings": t}))

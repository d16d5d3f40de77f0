#!/usr/bin/env python3
"""The table of scripts/gpu-check.sh's offload runs (BENCHMARKS.md "Offload modes on CUDA"), from the
files it wrote to OUT: per mode, runner's and diffusers' in-process call (runner: encode + denoise +
decode of `run --json`; diffusers: the pipeline call after a warm-up) and process wall time, their
ratio, each side's time against its own `none`, the process's peak VRAM by nvidia-smi and the
caching allocator's peak reserved since process start (and their ratios), and the image difference.
Goals: runner `model` <= 1.3x its none, `group` <= 2x, `sequential` <= 1.0x diffusers' sequential;
peak reserved <= 1.0x diffusers'.
    python3 tools/gpu_offload_summary.py OUT MODE...
"""
import json
import sys


def last_json(path):
    """The file as one JSON document (`run --json` pretty-prints), else its last line's."""
    try:
        text = open(path).read().strip()
    except OSError:
        return None
    for doc in (text, text.splitlines()[-1] if text else ""):
        try:
            return json.loads(doc)
        except ValueError:
            pass
    return None


def main():
    out, modes = sys.argv[1], sys.argv[2:]
    rows = {}
    for mode in modes:
        r, d = last_json(f"{out}/runner-{mode}.json"), last_json(f"{out}/diffusers-{mode.removesuffix('-stream')}.json")
        rv = (last_json(f"{out}/runner-{mode}-vram.json") or {}).get(f"runner-{mode}", {})
        dv = (last_json(f"{out}/diffusers-{mode.removesuffix('-stream')}-vram.json") or {}).get(f"diffusers-{mode.removesuffix('-stream')}", {})
        t = r and r["timings"]
        rows[mode] = {
            "runner_call_s": t and t["encode_s"] + t["denoise_s"] + t["decode_s"], "runner_wall_s": rv.get("process_wall_s"),
            "diffusers_call_s": d and d["total_s"], "diffusers_wall_s": dv.get("process_wall_s"),
            "runner_smi_mib": rv.get("vram_peak_mib"), "diffusers_smi_mib": dv.get("vram_peak_mib"),
            "runner_reserved": r and ((r["devices"].get("cuda:0") or {}).get("allocator") or {}).get("peak_reserved_bytes"),
            "diffusers_reserved": d and d.get("peak_vram_reserved_process"),
        }
    f = lambda x, fmt="{:.2f}": "-" if x is None else fmt.format(x)
    q = lambda a, b: None if a is None or not b else a / b
    none = rows.get("none", {})
    print("| mode | runner call s | diffusers call s | runner / diffusers | runner / its none | diffusers / its none | runner process s | diffusers process s "
          "| runner / diffusers | VRAM nvidia-smi MiB runner | diffusers | ratio | peak reserved GB runner | diffusers | ratio |")
    print("|" + "---|" * 15)
    for mode, x in rows.items():
        print(f"| {mode} | {f(x['runner_call_s'])} | {f(x['diffusers_call_s'])} | {f(q(x['runner_call_s'], x['diffusers_call_s']))} "
              f"| {f(q(x['runner_call_s'], none.get('runner_call_s')))} | {f(q(x['diffusers_call_s'], none.get('diffusers_call_s')))} "
              f"| {f(x['runner_wall_s'])} | {f(x['diffusers_wall_s'])} | {f(q(x['runner_wall_s'], x['diffusers_wall_s']))} "
              f"| {f(x['runner_smi_mib'], '{}')} | {f(x['diffusers_smi_mib'], '{}')} | {f(q(x['runner_smi_mib'], x['diffusers_smi_mib']))} "
              f"| {f(x['runner_reserved'] and x['runner_reserved'] / 1e9)} | {f(x['diffusers_reserved'] and x['diffusers_reserved'] / 1e9)} | {f(q(x['runner_reserved'], x['diffusers_reserved']))} |")


if __name__ == "__main__":
    main()

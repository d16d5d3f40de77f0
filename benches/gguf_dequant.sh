#!/usr/bin/env bash
# GGUF dequantization throughput, runner (`ggml::dequantize_as_diffusers`, Rust, one thread)
# against diffusers 0.42.1's `dequantize_functions` (torch, one thread) on the same blocks: every
# type diffusers loads, ELEMENTS values each (random blocks with finite fp16 scales, as
# tools/make_gguf_fixtures.py writes K-quants). Output: fp16 for the Q types, f32 for BF16/IQ4;
# GB/s of that output at the median of REPS; the ratio is runner's time / diffusers'.
#   benches/gguf_dequant.sh [REPS] [ELEMENTS]     (default 7, 16777216; needs .venv-fixtures)
set -euo pipefail
cd "$(dirname "$0")/.."
REPS=${1:-7}
N=${2:-16777216}
PY=.venv-fixtures/bin/python
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
out=$work/results.jsonl
$PY - "$work" "$N" "$REPS" >> "$out" <<'PY'
import json, sys, time
import numpy as np, torch, gguf
from gguf import GGMLQuantizationType as T
from diffusers.quantizers.gguf.utils import GGML_QUANT_SIZES, dequantize_functions
torch.set_num_threads(1)
work, n, reps = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
rng = np.random.default_rng(26)
scales = {T.Q4_0: [0], T.Q4_1: [0, 2], T.Q5_0: [0], T.Q5_1: [0, 2], T.Q8_0: [0], T.Q2_K: [80, 82], T.Q3_K: [108], T.Q4_K: [0, 2], T.Q5_K: [0, 2], T.Q6_K: [208], T.IQ4_NL: [0], T.IQ4_XS: [0], T.BF16: []}
for t, offs in scales.items():
    block, size = GGML_QUANT_SIZES[t]
    b = rng.integers(0, 256, size=(n // block, size), dtype=np.uint8)
    for o in offs:
        b[:, o:o + 2] = np.frombuffer(np.float16(rng.uniform(0.001, 0.05, size=b.shape[0])).tobytes(), np.uint8).reshape(-1, 2)
    if t == T.BF16:  # finite values
        b = np.frombuffer(np.float32(rng.standard_normal(n)).tobytes(), np.uint16)[1::2].copy().view(np.uint8).reshape(-1, 2)
    b.tofile(f"{work}/{t.name}.bin")
    blocks = torch.from_numpy(b)
    ms = []
    for _ in range(reps):
        s = time.perf_counter()
        v = dequantize_functions[t](blocks, block, size)
        ms.append((time.perf_counter() - s) * 1e3)
    ms.sort()
    med = ms[len(ms) // 2]
    print(json.dumps({"impl": "diffusers", "type": t.name, "elements": v.numel(), "min_ms": ms[0], "median_ms": med, "max_ms": ms[-1], "gbps": v.numel() * v.element_size() / med / 1e6}))
PY
cargo bench -p runner-core --bench dequant --locked -q -- "$work" "$REPS" >> "$out" 2>/dev/null
python3 - "$out" <<'PY'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
d = {r["type"]: r for r in rows if r["impl"] == "diffusers"}
print("| type | runner ms (min - max) | runner GB/s | diffusers ms (min - max) | diffusers GB/s | runner / diffusers |")
print("|---|---|---|---|---|---|")
for r in (r for r in rows if r["impl"] == "runner"):
    p = d[r["type"]]
    print(f"| {r['type']} | {r['median_ms']:.1f} ({r['min_ms']:.1f} - {r['max_ms']:.1f}) | {r['gbps']:.2f} | {p['median_ms']:.1f} ({p['min_ms']:.1f} - {p['max_ms']:.1f}) | {p['gbps']:.2f} | {r['median_ms'] / p['median_ms']:.3f} |")
print(f"median (min - max) of the repetitions, {rows[0]['elements']:,} values per type, one thread each")
PY

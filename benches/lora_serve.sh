#!/usr/bin/env bash
# `runner serve` with a live adapter (`fuse = false`): the tiny SD 1.5 pipeline (2 steps, 64x64) and
# tests/fixtures/loras/sd15-peft.safetensors; PAIRS pairs of requests, one at the manifest's scale
# and one with a new `"adapter_scales"` each time (no reload: the scale is read as each layer runs),
# interleaved; medians and minimums of the request times and their differences (goal, issue 27:
# under 5 ms a request).
#   benches/lora_serve.sh [PAIRS] [RUNNER]
set -euo pipefail
cd "$(dirname "$0")/.."
PAIRS=${1:-40}
BIN=${2:-target/release/runner}
[[ -x $BIN ]] || cargo build --release --locked --bin runner --bin runner-torch 2>/dev/null
d=$(mktemp -d)
trap 'kill $pid 2>/dev/null; rm -rf "$d"' EXIT
sed "s|source = \"../tests/fixtures/tiny-sd15\"|source = \"$PWD/tests/fixtures/tiny-sd15\"|" manifests/tiny-sd15.toml > "$d/m.toml"
printf '\n[adapters.style]\nsource = "%s"\nfuse = false\nscale = 0.8\n' "$PWD/tests/fixtures/loras/sd15-peft.safetensors" >> "$d/m.toml"
"$BIN" serve "$d/m.toml" --listen 127.0.0.1:18777 --set serve.max_steps=4 > "$d/serve.log" 2>&1 &
pid=$!
for _ in $(seq 50); do grep -q ready "$d/serve.log" 2>/dev/null && break; sleep 0.2; done
python3 - "$PAIRS" <<'PY'
import json, statistics, sys, time, urllib.request
def post(body):
    t = time.perf_counter()
    urllib.request.urlopen(urllib.request.Request("http://127.0.0.1:18777/v1/images", data=json.dumps(body).encode(), method="POST")).read()
    return time.perf_counter() - t
base = {"prompt": "a dog", "seed": 3, "steps": 2}
for _ in range(3):
    post(base)
same, changed = [], []
for i in range(int(sys.argv[1])):
    same.append(post(base))
    changed.append(post({**base, "adapter_scales": {"style": round(0.1 + 0.01 * i, 3)}}))
med = statistics.median
print(f"same scale: median {med(same) * 1e3:.1f} ms (min {min(same) * 1e3:.1f}); a new scale each request: median {med(changed) * 1e3:.1f} ms (min {min(changed) * 1e3:.1f}); "
      f"difference of medians {1e3 * (med(changed) - med(same)):.2f} ms, of minimums {1e3 * (min(changed) - min(same)):.2f} ms")
PY

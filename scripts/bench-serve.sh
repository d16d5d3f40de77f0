#!/usr/bin/env bash
# `runner serve` under load on loopback, against `runner run` (one process per image), on the
# tiny SD 1.5 pipeline (64x64, its manifest's 4 steps), with the `oha` load generator (crates.io).
#   scripts/bench-serve.sh [RUNNER]      (default target/release/runner; `make build` first)
#   CLI_RUNS=10 REQUESTS=200 CONCURRENCY="1 4 16" RSS_REQUESTS=2000 choose the sizes.
# Prints a markdown table: per concurrency, images/s and p50/p99 latency; the CLI's seconds per
# image; the ratio; the HTTP path's overhead (mean latency at concurrency 1 minus the worker's
# mean generation time from /metrics); and the server's RSS every 250 requests over
# RSS_REQUESTS requests.
set -euo pipefail
cd "$(dirname "$0")/.."
bin=${1:-target/release/runner}
CLI_RUNS=${CLI_RUNS:-10}
REQUESTS=${REQUESTS:-200}
CONCURRENCY=${CONCURRENCY:-1 4 16}
RSS_REQUESTS=${RSS_REQUESTS:-2000}
OHA_VERSION=1.16.0
manifest=manifests/tiny-sd15.toml
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}

oha=.tools/bin/oha
if ! [[ -x $oha ]] || ! "$oha" --version | grep -q "$OHA_VERSION"; then
  echo "installing oha $OHA_VERSION into .tools (once; a few minutes)" >&2
  cargo install oha --version "$OHA_VERSION" --locked --root .tools >&2
fi
[[ -x $bin ]] || { echo "error: $bin not found: run make build" >&2; exit 1; }

work=$(mktemp -d)
server=
cleanup() { [[ -n $server ]] && kill "$server" 2>/dev/null; rm -rf "$work"; }
trap cleanup EXIT

# The CLI: a process per image (start, plan, load, generate, write).
start=$(date +%s.%N)
for i in $(seq "$CLI_RUNS"); do
  "$bin" run "$manifest" --quiet --out "$work/cli-$i.png" >/dev/null 2>&1
done
cli_s=$(python3 -c "import time; print(($(date +%s.%N) - $start) / $CLI_RUNS)")

# The server: queue deep enough that concurrency 16 is not refused.
"$bin" serve "$manifest" --listen 127.0.0.1:0 --set serve.queue=64 >"$work/serve.out" 2>"$work/serve.err" &
server=$!
for _ in $(seq 600); do
  port=$(sed -n 's/^listening on http:\/\/127.0.0.1:\([0-9]*\)$/\1/p' "$work/serve.out")
  [[ -n $port ]] && curl -sf "http://127.0.0.1:$port/readyz" >/dev/null && break
  sleep 0.1
done
url=http://127.0.0.1:$port
body='{"prompt": "a photo of a cat", "seed": 1}'
rss() { awk '/^VmRSS:/ {print $2 * 1024}' "/proc/$server/status"; }
gen_mean() {
  curl -s "$url/metrics" | python3 -c '
import sys
v = {l.split()[0]: float(l.split()[1]) for l in sys.stdin if l.startswith("runner_generation_duration_seconds_")}
print(v["runner_generation_duration_seconds_sum"], v["runner_generation_duration_seconds_count"])'
}
load() { # concurrency, requests -> oha's JSON summary
  "$oha" -n "$2" -c "$1" -m POST -T application/json -d "$body" --no-tui --output-format json "$url/v1/images"
}

# Warm the path once, then each concurrency.
load 1 20 >/dev/null
echo "| concurrency | requests | images/s | p50 ms | p99 ms | served s/image | CLI s/image | ratio |"
echo "|---|---|---|---|---|---|---|---|"
for c in $CONCURRENCY; do
  read -r sum0 n0 < <(gen_mean)
  load "$c" "$REQUESTS" >"$work/oha-$c.json"
  read -r sum1 n1 < <(gen_mean)
  python3 - "$work/oha-$c.json" "$c" "$REQUESTS" "$cli_s" "$sum0" "$n0" "$sum1" "$n1" "$work/overhead" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))
c, n, cli = int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])
sum0, n0, sum1, n1 = map(float, sys.argv[5:9])
codes = r["statusCodeDistribution"]
assert codes == {"200": n}, f"not all 200: {codes}"
rps = r["summary"]["requestsPerSec"]
p = r["latencyPercentiles"]
per = 1 / rps
print(f"| {c} | {n} | {rps:.1f} | {p['p50'] * 1e3:.1f} | {p['p99'] * 1e3:.1f} | {per:.4f} | {cli:.3f} | {per / cli:.3f}x |")
if c == 1:
    gen = (sum1 - sum0) / (n1 - n0)
    with open(sys.argv[9], "a") as f:
        print(f"HTTP overhead at concurrency 1: mean latency {r['summary']['average'] * 1e3:.2f} ms - mean generation {gen * 1e3:.2f} ms = {(r['summary']['average'] - gen) * 1e3:.2f} ms per request", file=f)
PY
done
echo
cat "$work/overhead" 2>/dev/null || true

# RSS over RSS_REQUESTS requests, sampled every 250.
echo
echo "| requests served | RSS MiB |"
echo "|---|---|"
echo "| 0 | $(( $(rss) / 1048576 )) |"
done_n=0
while (( done_n < RSS_REQUESTS )); do
  load 4 250 >/dev/null
  done_n=$(( done_n + 250 ))
  echo "| $done_n | $(( $(rss) / 1048576 )) |"
done

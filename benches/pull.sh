#!/usr/bin/env bash
# `runner pull` against Python's `huggingface_hub.snapshot_download` on the same local mock Hub
# (tests/support/mock_hub.py on 127.0.0.1), same concurrency (8 workers each), each into an empty
# cache: a repo of a UNet-like component, `config.json` + an index + SHARDS shards of SHARD_MB MiB
# of random bytes (default 4 x 512 MiB = 2 GiB). ROUNDS rounds, interleaved (which side goes first
# alternates); throughput = bytes / wall seconds of the whole command (listing, HEADs, transfers,
# verification); peak RSS of each client process (GNU time).
#   benches/pull.sh [ROUNDS] [PY]     (SHARDS, SHARD_MB; PY: a Python with huggingface_hub)
set -euo pipefail
cd "$(dirname "$0")/.."
ROUNDS=${1:-3}
PY=${2:-.venv-deploy/bin/python}
SHARDS=${SHARDS:-4}
SHARD_MB=${SHARD_MB:-512}
DIR=${BENCH_DIR:-/tmp/runner-bench}/pull
mkdir -p "$DIR"
cargo build --release --locked --bin runner 2>/dev/null
repo=$DIR/repo-$SHARDS-$SHARD_MB
if [[ ! -f $repo/unet/config.json ]]; then
  mkdir -p "$repo/unet"
  echo '{"_class_name": "UNet2DConditionModel"}' > "$repo/unet/config.json"
  python3 - "$repo/unet" "$SHARDS" <<'PY'
import json, sys
d, n = sys.argv[1], int(sys.argv[2])
names = [f"diffusion_pytorch_model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
json.dump({"metadata": {}, "weight_map": {f"t{i}": name for i, name in enumerate(names)}}, open(f"{d}/diffusion_pytorch_model.safetensors.index.json", "w"))
PY
  for i in $(seq "$SHARDS"); do
    head -c "$((SHARD_MB << 20))" /dev/urandom > "$repo/unet/$(printf 'diffusion_pytorch_model-%05d-of-%05d.safetensors' "$i" "$SHARDS")"
  done
fi
trap 'kill $(cat "$DIR/pid" 2>/dev/null) 2>/dev/null || true' EXIT
python3 tests/support/mock_hub.py --repo "bench/big=$repo" > "$DIR/mock.out" & echo $! > "$DIR/pid"
for _ in $(seq 600); do grep -q ready "$DIR/mock.out" 2>/dev/null && break; sleep 0.1; done
export HF_ENDPOINT="http://127.0.0.1:$(awk '/^port/{print $2}' "$DIR/mock.out")"
cat > "$DIR/m.toml" <<TOML
schema_version = 1
name = "pull-bench"
[pipeline]
kind = "stable-diffusion"
source = "$PWD/tests/fixtures/tiny-sd15"
[components.unet]
source = "hf://bench/big/unet"
TOML
bytes=$(du -bc "$repo"/unet/* | tail -1 | cut -f1)
out=$(mktemp)
for round in $(seq "$ROUNDS"); do
  if (( round % 2 )); then order="runner python"; else order="python runner"; fi
  for side in $order; do
    rm -rf "$DIR/cache"
    if [[ $side == runner ]]; then
      cmd=(target/release/runner pull --quiet --jobs 8 "$DIR/m.toml")
    else
      cmd=("$PY" -c "from huggingface_hub import snapshot_download; snapshot_download('bench/big', max_workers=8)")
    fi
    start=$(date +%s.%N)
    HF_HUB_CACHE=$DIR/cache HF_HUB_DISABLE_PROGRESS_BARS=1 /usr/bin/time -f '%M' -o "$DIR/rss" "${cmd[@]}" > /dev/null
    end=$(date +%s.%N)
    echo "{\"impl\": \"$side\", \"s\": $(python3 -c "print($end - $start)"), \"rss_kib\": $(cat "$DIR/rss"), \"bytes\": $bytes}" | tee -a "$out"
  done
done
python3 - "$out" <<'PY'
import json, statistics, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
med = lambda impl, k: statistics.median(r[k] for r in rows if r["impl"] == impl)
gb = rows[0]["bytes"] / 1e9
for impl in ["runner", "python"]:
    print(f"{impl}: median {med(impl, 's'):.2f} s = {gb / med(impl, 's'):.2f} GB/s, peak RSS median {med(impl, 'rss_kib') / 1024:.0f} MiB")
print(f"throughput runner / snapshot_download: {med('python', 's') / med('runner', 's'):.2f}x")
PY
rm -f "$out" && rm -rf "$DIR/cache"

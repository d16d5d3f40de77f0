#!/usr/bin/env bash
# The light front's start-up (README "Light binary"): whole-process wall time of the commands that
# compute nothing, and of `runner run` on the tiny pipeline, each command interleaved between this
# build and, when given, another one (a build from before the split: one binary linking libtorch).
#   benches/front.sh [RUNNER [BASE_RUNNER]]   (default target/release/runner; `make build` first)
#   RUNS (default 20) processes per command and binary; RUN_RUNS (default 10) for `runner run`.
# Prints min / median / max ms per command and binary, the ratio runner / base at the median, and
# the goal each command has (issue 25).
set -euo pipefail
cd "$(dirname "$0")/.."
new=${1:-target/release/runner}
base=${2:-}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
# A full-size SD3.5-large folder (bf16, sharded transformer and T5, sparse: headers only on disk).
python3 benches/sparse_pipeline.py sd35-large "$work" BF16 >/dev/null
sed "s|^source = .*|source = \"$work/sd35-large\"|" manifests/sd35-large.toml > "$work/sd35-large.toml"
cp manifests/tiny-sd15.toml "$work/tiny-sd15.toml"
sed -i "s|^source = .*|source = \"$PWD/tests/fixtures/tiny-sd15\"|" "$work/tiny-sd15.toml"
RUNS=${RUNS:-20} RUN_RUNS=${RUN_RUNS:-10} python3 benches/front_time.py "$work" "$new" ${base:+"$base"}

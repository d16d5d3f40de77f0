#!/usr/bin/env bash
# The main job on the default manifest, as far as runner can take it today.
set -euo pipefail
bin=${1:-target/release/runner}
manifest=${2:-manifests/tiny-sd15.toml}

echo "== runner info"
"$bin" info
echo
echo "== runner validate $manifest"
"$bin" validate "$manifest"
echo
echo "== runner config $manifest (effective values and where each came from)"
"$bin" config "$manifest"
echo
source_dir=$("$bin" config --json "$manifest" 2>/dev/null | python3 -c 'import json, sys; print(json.load(sys.stdin)["pipeline_source"])')
echo "== runner inspect $source_dir (sizes from safetensors headers)"
"$bin" inspect "$source_dir"
echo
echo "== runner validate --locked $manifest (every file it reads against ${manifest}.lock)"
"$bin" validate --locked "$manifest"
echo
echo "== runner plan $manifest (device map from headers and budgets; no weight loaded)"
"$bin" plan "$manifest"
echo
echo "== runner run $manifest"
"$bin" run --locked "$manifest"
echo
cat <<'MSG'
The tiny pipeline has random weights, so the image is noise-like by design; the same manifest
with real SD 1.5 weights (`runner pull manifests/sd15.toml`, then run it) gives a real image. Its text chunks carry what
makes it again: A1111's `parameters` (prompt, steps, sampler, CFG scale, seed, size, model) and a
`runner` JSON (batch position, dtype, lock and effective-manifest digests, runner version).
MSG

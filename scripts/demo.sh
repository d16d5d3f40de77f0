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
cat <<'MSG'
make demo stops after `runner plan`: the executor (`runner run`, issue 5) is not built yet, so no
image is written. The manifest above validated, its layered configuration resolved, its pipeline
was read from headers, matched its lock and was planned onto the devices; libtorch loaded and ran
its smoke test.
MSG

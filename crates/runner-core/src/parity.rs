//! Test support: comparisons of runner's numbers with diffusers' recorded ones
//! (tests/fixtures/refs, recorded by tools/make_references*.py).
//!
//! Every comparison goes through [`check`] with a named [`Bound`] from this file, so the
//! tolerances live in one place with the measurement each comes from. Two environment variables
//! steer it:
//! - `RUNNER_REFS_DIR`: read the references from another folder (`make parity` re-records
//!   diffusers' outputs on this machine into a temporary one);
//! - `RUNNER_PARITY=exact`: comparisons marked [`Bound::exact`] must be bit-equal (`make parity`);
//!   `RUNNER_PARITY=measure`: record only, assert nothing (scripts/parity-spread.sh);
//! - `RUNNER_PARITY_LOG=FILE`: append each measurement as a JSON line (scripts/parity-spread.sh
//!   reads them to measure the spread across CPU kernel paths and thread counts).
//!
//! How the bounds were set (2026-12-07, an AMD EPYC VM, 2 cores, whose hypervisor exposes AVX2
//! but not AVX-512): `scripts/parity-spread.sh` ran the parity tests under `ATEN_CPU_CAPABILITY`
//! `default` (ATen's scalar kernels) and `avx2`, each with 1 and 2 threads, against the committed
//! references (recorded on another CPU). Each bound is about 10x the worst difference seen there,
//! which is written beside it. References recorded on one CPU and replayed on another differ in
//! the last bits of reductions, `exp`/`log`, fused multiply-adds and ATen's vectorised `randn`,
//! and a denoising loop compounds them; the 10x leaves room for kernel paths not measured
//! (AVX-512, ARM) while every bound stays far below what a real bug moves (a wrong sigma or
//! scheduler, a swapped branch, casting not applied: `pipeline::bounds_tell_schedulers_apart`
//! and the cast tests check that). Bit equality is claimed only where it is checked live:
//! `make parity` re-records diffusers on the machine at hand and wants 0 for every exact bound.

use std::io::Write;
use std::path::PathBuf;

/// A tolerance: the largest difference accepted, and whether `make parity` (diffusers recorded
/// on the same machine) must see exactly zero.
#[derive(Debug, Clone, Copy)]
pub struct Bound {
    pub name: &'static str,
    pub value: f64,
    /// Bit-equal on the machine that recorded the reference: the same libtorch kernels on the
    /// same inputs. False where runner computes in another precision by design (schedule tables
    /// in f64, compared with diffusers' float32 tensors).
    pub exact: bool,
}

/// Schedule tables (timesteps, sigmas, alphas_cumprod, init_noise_sigma), relative to the
/// table's largest value. runner computes them in f64 as numpy does; diffusers' are float32
/// (numpy's own `exp`/`log` vary by CPU): worst seen 2.98e-7 (ddim-zsnr-6 alphas_cumprod, a few
/// float32 ulps), the same on every path (no libtorch in it). Bound 3e-6 (10x). Not exact: f64
/// against float32. A wrong spacing, offset or shift moves a table by 1e-3 or more.
pub const SCHEDULE: Bound = Bound { name: "schedule", value: 3e-6, exact: false };

/// The seeded initial draw (`torch.randn` on a CPU generator; tch's is the same ATen generator),
/// relative to its largest value. Bit-equal on the recording machine's kernel path (0 under
/// avx2); ATen's scalar path computes Box-Muller's `log`/`cos` without the vectorised
/// approximations: worst seen 5.0e-7 (default). Bound 5e-6 (10x).
pub const NOISE: Bound = Bound { name: "initial noise", value: 5e-6, exact: true };

/// One scheduler step replayed on recorded model outputs and the recorded latents before it:
/// the model input, and the latents after the step relative to the largest magnitude the step
/// computes with (the latents before and after it), not to its result: under zero terminal SNR
/// the first sigma is 4096, the latents ~1e4 and the result ~10, which carries the float32
/// rounding of 1e4-sized numbers. Worst seen 6.7e-7 (dpm-dpmsolver-heun-order3-16, default);
/// bound 7e-6 (10x). A sigma off by 0.1% moves a step by 1e-4 of that scale.
pub const SCHEDULER_STEP: Bound = Bound { name: "scheduler step", value: 7e-6, exact: true };

/// A model's output (UNet, VAE encoder and decoder, CLIP, T5, MMDiT, FLUX transformer, the
/// safety checker's towers) on recorded inputs, relative to the output's largest magnitude.
/// Worst seen 3.1e-6 (tiny-sd3's VAE decoder, default, 2 threads); bound 4e-5 (13x).
pub const MODEL: Bound = Bound { name: "model output", value: 4e-5, exact: true };

/// The safety checker's image preprocessing (resize, rescale, normalise: transformers'
/// `CLIPImageProcessor`), max |difference| of pixel values in about [-2, 2]. Worst seen 0 on
/// every path (plain float32 arithmetic, no reductions); bound 1e-6: a few float32 roundings of
/// the normalisation, for CPUs that fuse its multiply-add.
pub const PREPROCESS: Bound = Bound { name: "preprocess", value: 1e-6, exact: true };

/// A pipeline's tensors (`--dump` names: embeddings, per-step model inputs and outputs, guided
/// predictions, latents), relative to each tensor's largest magnitude, after the denoising loop
/// has compounded the differences (and under the scalar path, from an initial draw that
/// already differs). Worst seen 4.0e-5 (sd15-ddim latents.final, default); bound 4e-4 (10x).
pub const PIPELINE_TENSOR: Bound = Bound { name: "pipeline tensor", value: 4e-4, exact: true };

/// The final images (the whole batch) in [0, 1], max |difference|. Worst seen 3.05e-5
/// (sd15-ddim, avx2); bound 3e-4 (10x), a tenth of one 8-bit step.
pub const IMAGE: Bound = Bound { name: "image", value: 3e-4, exact: true };

/// Layerwise casting (fp8 storage, f32 compute) pipelines against diffusers'
/// `enable_layerwise_casting`: the latents the VAE decodes, relative, worst seen 1.55e-6, bound
/// 2e-5 (13x); the image, max |difference|, worst seen 2.0e-6 (cast-flux-dev, default), bound
/// 2e-5 (10x). Casting itself
/// moves the image by more than 100x the bound (tests/cast.rs checks it).
pub const CAST_LATENTS: Bound = Bound { name: "cast latents", value: 2e-5, exact: true };
pub const CAST_IMAGE: Bound = Bound { name: "cast image", value: 2e-5, exact: true };

/// PNG pixels (8-bit values of a 64x64 RGB image, 12,288 values): an image difference `d` flips a
/// value only when the float sits within `d` of a rounding boundary, and then by exactly 1.
/// Worst seen 3 values off by one (avx2; 0 under default; 2 on the machine of issue 23). Bound:
/// every value within 1, at most 32 values (10x, 0.26%) off by one.
pub const PNG_STEP: Bound = Bound { name: "png max step", value: 1.0, exact: true };
pub const PNG_VALUES_OFF: Bound = Bound { name: "png values off by one", value: 32.0, exact: true };

/// `RUNNER_PARITY=exact`: [`Bound::exact`] comparisons must be bit-equal.
pub fn exact_mode() -> bool {
    std::env::var("RUNNER_PARITY").is_ok_and(|v| v == "exact")
}

/// The references: `RUNNER_REFS_DIR`, else the committed tests/fixtures/refs.
pub fn refs_dir() -> PathBuf {
    match std::env::var_os("RUNNER_REFS_DIR") {
        Some(d) if !d.is_empty() => PathBuf::from(d),
        _ => PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/refs"),
    }
}

/// Checks one measured difference against `bound` (exactly zero under `RUNNER_PARITY=exact` when
/// the bound is exact), recording it in `RUNNER_PARITY_LOG` first. `what` names the case and
/// quantity (`sd15-euler: step3.latents`), the same on every run: the spread script groups by it.
pub fn check(what: &str, measured: f64, bound: Bound) {
    check_detail(what, measured, bound, "");
}

/// [`check`], with `detail` (where the worst difference was, the values) in the failure message.
pub fn check_detail(what: &str, measured: f64, bound: Bound, detail: &str) {
    record(what, measured, bound);
    if std::env::var("RUNNER_PARITY").is_ok_and(|v| v == "measure") {
        return;
    }
    let sep = if detail.is_empty() { "" } else { ": " };
    if exact_mode() && bound.exact {
        assert!(measured == 0.0, "{what}: differs from diffusers recorded on this machine by {measured:e} ({}; make parity wants 0){sep}{detail}", bound.name);
    } else {
        assert!(measured <= bound.value, "{what}: differs from diffusers by {measured:e}, over the {} bound {:e} (src/parity.rs){sep}{detail}", bound.name, bound.value);
    }
}

fn record(what: &str, measured: f64, bound: Bound) {
    let Some(path) = std::env::var_os("RUNNER_PARITY_LOG") else { return };
    let line = serde_json::json!({
        "what": what,
        "bound": bound.name,
        "measured": measured,
        "tolerance": bound.value,
        "exact": bound.exact,
    });
    // One write per line with O_APPEND: lines from parallel tests do not interleave.
    let mut f = std::fs::OpenOptions::new().create(true).append(true).open(&path).expect("RUNNER_PARITY_LOG opens");
    f.write_all(format!("{line}\n").as_bytes()).expect("RUNNER_PARITY_LOG written");
}

/// max |a - b| / max |b|: the difference relative to the reference's scale.
pub fn rel(a: &[f64], b: &[f64]) -> f64 {
    rel_to(a, b, b.iter().fold(0f64, |m, x| m.max(x.abs())))
}

/// max |a - b| / scale (equal values, infinities included, count as 0).
pub fn rel_to(a: &[f64], b: &[f64], scale: f64) -> f64 {
    assert_eq!(a.len(), b.len(), "lengths differ: {} vs {}", a.len(), b.len());
    let scale = scale.max(1e-30);
    a.iter().zip(b).fold(0f64, |m, (x, y)| if x == y { m } else { m.max((x - y).abs() / scale) })
}

/// The largest |value|.
pub fn max_abs(a: &[f64]) -> f64 {
    a.iter().fold(0f64, |m, x| m.max(x.abs()))
}

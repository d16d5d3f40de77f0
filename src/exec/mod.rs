//! The executor: a validated manifest and its plan turned into images on libtorch. The session
//! (plan, checks, loading, ledger, offload hooks, outputs) is shared by every pipeline kind; each
//! kind's `__call__` lives in its own file under `pipelines/`, following diffusers step by step
//! (text encoding, initial latents from the seeded CPU generator, classifier-free guidance with
//! [negative, positive] batches, the scheduler loop, VAE decode); PNGs carry their provenance.

pub mod allocator;
pub use runner_core::batch;
mod cuda_stream;
pub mod latents;
pub mod ledger;
mod loading;
mod offload;
mod pipelines;
pub mod png;
mod scratch;
mod session;
mod text;

pub use loading::storage_kind;
pub use session::{load, Session};

use std::path::{Path, PathBuf};

use serde::Serialize;
use tch::Kind;

use crate::checkpoint::CheckpointError;
use crate::device::Device;
use crate::manifest::{Dtype, LoadedManifest};
use crate::models::ModelError;
use crate::plan::build::BuildOptions;
use crate::plan::{Plan, PlanError};

#[derive(Debug, thiserror::Error)]
pub enum ExecError {
    #[error(transparent)]
    Checkpoint(#[from] CheckpointError),
    #[error(transparent)]
    Model(#[from] ModelError),
    #[error("cannot place the pipeline within the budgets: {0}")]
    Plan(#[from] PlanError),
    #[error(transparent)]
    Inventory(#[from] crate::plan::inventory::InventoryError),
    #[error("{0}")]
    Text(String),
    #[error("scheduler: {0}")]
    Scheduler(String),
    #[error("{what} `{}`: {source}", path.display())]
    Io { what: &'static str, path: PathBuf, source: std::io::Error },
    #[error("{0}")]
    Unsupported(String),
    /// The run's [`StepWatch`] stopped it between two denoising steps (`runner serve`: a
    /// cancelled job, a deadline, a client gone).
    #[error("cancelled after {done} of {steps} steps: {reason}")]
    Cancelled { done: usize, steps: usize, reason: String },
    /// What [`crate::preflight::check`] found: problems knowable before loading a weight.
    #[error("{}", crate::diag::render_plain(.0).trim_end())]
    Preflight(Vec<crate::diag::Diagnostic>),
}

/// How to run, beyond the manifest.
#[derive(Debug, Clone, Default)]
pub struct RunOptions {
    /// Overrides `run.output`.
    pub out: Option<PathBuf>,
    /// Write intermediate tensors to `DIR/dump.safetensors`.
    pub dump: Option<PathBuf>,
    /// `--devices`, as for `runner plan`.
    pub plan: BuildOptions,
    /// Show progress bars (only when stderr is a terminal).
    pub progress: bool,
    /// `--simulate`: plan for the given devices (in `plan.devices`) but execute every component on
    /// the CPU, so that device maps and boundaries run where no GPU exists (CI).
    pub simulate: bool,
    /// sha256 of MANIFEST.lock when the run is `--locked` (stored in the PNG).
    pub lock_sha256: Option<String>,
    /// Told of each denoising step, and asked before each whether to go on.
    pub watch: Option<Watch>,
    /// `Session::generate_run`: the PNGs' bytes in `RunReport::pngs` instead of files
    /// (`runner serve`, which sends them).
    pub in_memory: bool,
    /// Initial latents given as data (`runner serve`'s request body): they replace `run.latents`
    /// and the seeded draw.
    pub latents: Option<std::sync::Arc<latents::LatentsData>>,
    /// The input image (and mask) given as data (`runner serve`'s request body): they replace
    /// `run.image` and `run.mask_image`.
    pub init: Option<std::sync::Arc<InitImages>>,
    /// Jobs of the session may bring images (`serve`, a prompts file whose lines set `image`):
    /// load the VAE encoder even when the manifest gives none.
    pub images: bool,
}

/// The input of an image-to-image or inpainting job, decoded to RGB as diffusers' `load_image`.
#[derive(Debug)]
pub struct InitImages {
    pub image: runner_core::image::Image,
    pub image_sha256: String,
    pub mask: Option<(runner_core::image::Image, String)>,
}

impl InitImages {
    /// An image (and mask) given as data: each file's bytes, decoded.
    pub fn from_bytes(image: &[u8], mask: Option<&[u8]>) -> Result<InitImages, runner_core::image::ImageError> {
        Ok(InitImages {
            image: runner_core::image::decode_rgb(image, "`image`")?,
            image_sha256: runner_core::image::sha256_hex(image),
            mask: mask.map(|b| Ok::<_, runner_core::image::ImageError>((runner_core::image::decode_rgb(b, "`mask_image`")?, runner_core::image::sha256_hex(b)))).transpose()?,
        })
    }

    /// `run.image` and `run.mask_image` of `m`, read and decoded (None without an image).
    pub fn of_manifest(m: &LoadedManifest) -> Result<Option<InitImages>, ExecError> {
        let r = &m.manifest.run;
        let Some(p) = &r.image else { return Ok(None) };
        let read = |key: &str, p: &std::path::Path| -> Result<(runner_core::image::Image, String), ExecError> {
            let path = m.resolve_path(key, p);
            let what = format!("`{key}` (`{}`)", path.display());
            let bytes = runner_core::image::read_file(&path).map_err(|e| ExecError::Text(format!("{what}: {e}")))?;
            let img = runner_core::image::decode_rgb(&bytes, &what).map_err(|e| ExecError::Text(e.to_string()))?;
            Ok((img, runner_core::image::sha256_hex(&bytes)))
        };
        let (image, image_sha256) = read("run.image", p)?;
        let mask = r.mask_image.as_deref().map(|p| read("run.mask_image", p)).transpose()?;
        Ok(Some(InitImages { image, image_sha256, mask }))
    }
}

/// Watches a run between its denoising steps: `runner serve` reports a job's progress through it
/// and cancels jobs (a `DELETE`, a deadline, a client that hung up) where a step ends. The weights
/// and offload hooks are left as after a finished run.
pub trait StepWatch: Send + Sync {
    /// Before step `i` (0-based) of `n`: `Some(reason)` stops the run with [`ExecError::Cancelled`].
    fn cancelled(&self, i: usize, n: usize) -> Option<String>;
    /// Step `i` of `n` took `seconds`.
    fn stepped(&self, i: usize, n: usize, seconds: f64);
}

/// A shared [`StepWatch`] (cloned with the options).
#[derive(Clone)]
pub struct Watch(pub std::sync::Arc<dyn StepWatch>);

impl std::fmt::Debug for Watch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Watch")
    }
}

#[derive(Debug, Clone, Serialize, Default)]
pub struct Timings {
    /// From the process's start to the load's (libraries, manifest, headers, plan).
    pub startup_s: f64,
    pub load_s: f64,
    pub encode_s: f64,
    /// Image-to-image and inpainting: the VAE encodes of the input (and masked) image.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub image_encode_s: Option<f64>,
    pub denoise_s: f64,
    /// The first UNet call (CUDA kernel selection and warm-up happen there).
    pub first_step_s: f64,
    /// Mean of the other denoiser (UNet or transformer) calls (all of them when there is one).
    pub seconds_per_step: f64,
    pub decode_s: f64,
    pub total_s: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct RunReport {
    pub images: Vec<PathBuf>,
    /// The PNGs' bytes, when [`RunOptions::in_memory`].
    #[serde(skip)]
    pub pngs: Vec<Vec<u8>>,
    pub seed: u64,
    pub steps: usize,
    /// Calls of the denoiser (the UNet, or SD3's transformer); the JSON key keeps its first name.
    pub unet_calls: usize,
    pub scheduler: String,
    pub width: u64,
    pub height: u64,
    pub device_map: std::collections::BTreeMap<String, String>,
    /// The devices were simulated (everything ran on the CPU).
    pub simulated: bool,
    /// The plan's notes (overflows, fallbacks, splits), as `runner plan` prints them.
    pub plan_notes: Vec<String>,
    pub timings: Timings,
    /// The residency ledger per planned device: budget, measured peak of resident weights, and
    /// the plan's prediction.
    pub devices: std::collections::BTreeMap<String, ledger::DeviceUse>,
    /// This process's host memory around the load and the run.
    pub host: HostMemory,
    pub warnings: Vec<String>,
}

/// Host memory of the process (`/proc/self/status`; zeros where there is none), to hold a load's
/// footprint against what it placed on the host: `load_peak_rss_bytes - rss_before_load_bytes`
/// is what loading cost beyond the process's start-up.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct HostMemory {
    /// Resident before the first component was read (libraries, tokenizers, plan).
    pub rss_before_load_bytes: u64,
    /// The peak resident set by the end of the load.
    pub load_peak_rss_bytes: u64,
    /// The peak resident set by the end of the run.
    pub peak_rss_bytes: u64,
    /// Weight bytes the load placed in host memory (CPU components and offloaded weights).
    pub loaded_bytes: u64,
    /// Offloaded weights served from disk (`offload_target = "disk"`): views of the
    /// memory-mapped checkpoints and scratch files, in the page cache, not in host RAM copies.
    pub disk_backed_bytes: u64,
    /// Of those, the converted weights written to scratch files (removed on exit).
    pub scratch_bytes: u64,
}

pub fn kind_of(d: Dtype) -> Kind {
    match d {
        Dtype::Fp32 => Kind::Float,
        Dtype::Fp16 => Kind::Half,
        Dtype::Bf16 => Kind::BFloat16,
    }
}

pub fn tch_device(d: Device) -> tch::Device {
    match d {
        Device::Cpu => tch::Device::Cpu,
        Device::Cuda(i) => tch::Device::Cuda(i as usize),
    }
}

/// Every device of the plan must exist here, checked before anything is loaded.
fn check_devices(plan: &Plan) -> Result<(), ExecError> {
    crate::runtime::init();
    let gpus = tch::Cuda::device_count();
    for c in &plan.components {
        let devices: Vec<Device> = match &c.split {
            Some(s) => s.iter().map(|x| x.1).collect(),
            None => vec![c.device],
        };
        for d in devices {
            if let Device::Cuda(i) = d {
                if i64::from(i) >= gpus {
                    return Err(ExecError::Unsupported(format!(
                        "the plan puts `{}` on `{d}`, but this machine has {gpus} CUDA device(s): plan for this machine (drop --devices / adjust placement.max_memory) or run where `{d}` exists",
                        c.name
                    )));
                }
            }
        }
    }
    Ok(())
}

/// Output paths: `run.output` (or `<name>.png` beside the manifest), numbered for batches.
fn output_paths(m: &LoadedManifest, opts: &RunOptions, n: usize) -> Vec<PathBuf> {
    let base = opts.out.clone().unwrap_or_else(|| default_output(m));
    numbered(&base, n)
}

/// The manifest's output: `run.output`, else `<name>.png` beside the manifest.
pub fn default_output(m: &LoadedManifest) -> PathBuf {
    match &m.manifest.run.output {
        Some(o) => m.resolve_path("run.output", o),
        None => crate::manifest::normalize(&m.path.parent().unwrap_or(Path::new(".")).join(format!("{}.png", file_safe(&m.manifest.name)))),
    }
}

pub use batch::file_safe;

/// `base` for one image, `<stem>-0.png`, `<stem>-1.png`, ... beside it for a batch of `n`.
pub fn numbered(base: &Path, n: usize) -> Vec<PathBuf> {
    let base = base.to_path_buf();
    if n == 1 {
        return vec![base];
    }
    let stem = base.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
    (0..n).map(|i| base.with_file_name(format!("{stem}-{i}.png"))).collect()
}

/// The seed: `run.seed`, or one drawn from the clock and reported.
fn seed_of(m: &LoadedManifest) -> u64 {
    m.manifest.run.seed.unwrap_or_else(|| {
        let t = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
        (t.as_nanos() as u64) % (1 << 53)
    })
}

/// Progress is drawn when asked for and stderr is a terminal (logs say the rest).
fn shows_progress(on: bool) -> bool {
    use std::io::IsTerminal;
    on && std::io::stderr().is_terminal()
}

/// A bar of steps; the rate goes in the message, as people read it ("1.52 s/step"), not
/// indicatif's "0.6579/s".
fn progress(total: u64, what: &str, on: bool) -> indicatif::ProgressBar {
    bar(total, what, on, "{prefix} [{bar:30}] {pos}/{len} {msg} eta {eta}")
}

/// A bar counting bytes (a component's load).
fn byte_progress(total: u64, what: &str, on: bool) -> indicatif::ProgressBar {
    bar(total, what, on, "{prefix:>14} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}")
}

/// A bar drawn with `template`, on a terminal only.
fn bar(total: u64, what: &str, on: bool, template: &str) -> indicatif::ProgressBar {
    if !shows_progress(on) {
        return indicatif::ProgressBar::hidden();
    }
    let bar = indicatif::ProgressBar::new(total);
    bar.set_style(indicatif::ProgressStyle::with_template(template).expect("template").progress_chars("=> "));
    bar.set_prefix(what.to_string());
    bar
}

/// A spinner for work without steps (the VAE decode), on a terminal only.
fn spinner(what: &str, on: bool) -> indicatif::ProgressBar {
    if !shows_progress(on) {
        return indicatif::ProgressBar::hidden();
    }
    let s = indicatif::ProgressBar::new_spinner();
    s.set_message(what.to_string());
    s.enable_steady_tick(std::time::Duration::from_millis(120));
    s
}

/// A step rate as people read it: `1.52 s/step`, or `4.2 steps/s` when faster than one a second.
pub fn human_rate(seconds_per_step: f64) -> String {
    if seconds_per_step >= 1.0 || seconds_per_step <= 0.0 {
        format!("{seconds_per_step:.2} s/step")
    } else {
        format!("{:.1} steps/s", 1.0 / seconds_per_step)
    }
}

/// Runs the manifest's job.
pub fn run(m: &LoadedManifest, opts: &RunOptions) -> Result<RunReport, ExecError> {
    load(m, opts)?.generate(opts)
}

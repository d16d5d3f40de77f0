//! The executor: a validated manifest and its plan turned into images on libtorch, following
//! diffusers' `StableDiffusionPipeline.__call__` step by step (text encoding, initial latents from
//! the seeded CPU generator, classifier-free guidance with [negative, positive] batches, the
//! scheduler loop, VAE decode), then PNGs with their provenance in tEXt chunks.

pub mod allocator;
mod cuda_stream;
pub mod ledger;
mod offload;
pub mod png;
mod text;

use std::path::{Path, PathBuf};
use std::time::Instant;

use serde::Serialize;
use tch::nn::VarStore;
use tch::{Kind, Tensor};

use crate::checkpoint::layout::{Checkpoint, Component, PipelineFolder};
use crate::checkpoint::load::Mapped;
use crate::checkpoint::CheckpointError;
use crate::device::Device;
use crate::manifest::{Dtype, LoadedManifest, Offload, PipelineKind};
use crate::models::unet_2d::{UNet2DConditionConfig, UNet2DConditionModel};
use crate::models::vae::{AutoencoderKLConfig, AutoencoderKLDecoder};
use crate::models::weights::build_from_checkpoint;
use crate::models::ModelError;
use crate::plan::build::{self, BuildOptions};
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
}

#[derive(Debug, Clone, Serialize, Default)]
pub struct Timings {
    /// From the process's start to the load's (libraries, manifest, headers, plan).
    pub startup_s: f64,
    pub load_s: f64,
    pub encode_s: f64,
    pub denoise_s: f64,
    /// The first UNet call (CUDA kernel selection and warm-up happen there).
    pub first_step_s: f64,
    /// Mean of the other UNet calls (all of them when there is one).
    pub seconds_per_step: f64,
    pub decode_s: f64,
    pub total_s: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct RunReport {
    pub images: Vec<PathBuf>,
    pub seed: u64,
    pub steps: usize,
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

struct Loaded<'a> {
    component: &'a Component,
    /// Where it runs (a split component: where it starts).
    device: tch::Device,
    kind: Kind,
    /// A component split by the `auto` strategy: module path -> device, in execution order.
    split: Option<Split>,
}

fn placed<'a>(pipeline: &'a PipelineFolder, plan: &Plan, m: &LoadedManifest, name: &str, simulate: bool) -> Result<Loaded<'a>, ExecError> {
    let component = pipeline.component(name).filter(|c| c.checkpoint.is_some()).ok_or_else(|| ExecError::Unsupported(format!("the pipeline has no `{name}` weights")))?;
    let cp = plan.components.iter().find(|c| c.name == name).expect("planned");
    if cp.split.is_some() && name != "unet" {
        return Err(ExecError::Unsupported(format!("`{name}` is split across devices; runner runs split UNets only")));
    }
    let dtype = m.manifest.components.get(name).and_then(|c| c.dtype).unwrap_or(m.manifest.pipeline.dtype);
    let device = if simulate { tch::Device::Cpu } else { tch_device(cp.device) };
    let split = cp.split.as_ref().map(|s| s.iter().map(|(m, d)| (m.clone(), if simulate { tch::Device::Cpu } else { tch_device(*d) })).collect());
    // Offloaded weights live in host memory and visit `device` while the component runs.
    let home = if cp.offload != Offload::None { tch::Device::Cpu } else { device };
    Ok(Loaded { component, device: home, kind: kind_of(dtype), split })
}

/// The UNet, its parameters the checkpoint's tensors (no initialisation, no staging copy); a split
/// UNet's parts go from the mapping to their devices.
fn load_unet(l: &Loaded, cfg: UNet2DConditionConfig) -> Result<(UNet2DConditionModel, VarStore, Mapped), ExecError> {
    let vs = VarStore::new(if l.split.is_some() { tch::Device::Cpu } else { l.device });
    let ck = l.component.checkpoint.as_ref().expect("weights");
    let (m, mapped) = build_from_checkpoint(&vs, ck, "UNet2DConditionModel", l.kind, |root| UNet2DConditionModel::new(root, cfg.clone())).map_err(ModelError::from)?;
    if let Some(split) = &l.split {
        relocate(&vs, l.device, Some(split));
    }
    Ok((m, vs, mapped))
}

/// The dtype the VAE runs at: an fp16 VAE with `force_upcast` runs in fp32, as diffusers upcasts it.
fn vae_kind(l: &Loaded, cfg: &AutoencoderKLConfig) -> Kind {
    if cfg.force_upcast && l.kind == Kind::Half {
        Kind::Float
    } else {
        l.kind
    }
}

/// The VAE's tensors that text-to-image uses: the decoder's (the encoder's stay unread).
fn decoder_only(ck: &Checkpoint) -> Checkpoint {
    Checkpoint { tensors: ck.tensors.iter().filter(|(k, _)| !k.starts_with("encoder.") && !k.starts_with("quant_conv.")).map(|(k, v)| (k.clone(), v.clone())).collect(), ..ck.clone() }
}

/// The VAE decoder, at [`vae_kind`].
fn load_vae(l: &Loaded, cfg: AutoencoderKLConfig) -> Result<(AutoencoderKLDecoder, VarStore, Kind, Mapped), ExecError> {
    let kind = vae_kind(l, &cfg);
    let vs = VarStore::new(l.device);
    let ck = decoder_only(l.component.checkpoint.as_ref().expect("weights"));
    let (m, mapped) = build_from_checkpoint(&vs, &ck, "AutoencoderKL", kind, |root| AutoencoderKLDecoder::new(root, cfg.clone())).map_err(ModelError::from)?;
    Ok((m, vs, kind, mapped))
}

/// A loaded component's checkpoint (preflight found one).
fn ck_of<'a>(l: &Loaded<'a>) -> &'a Checkpoint {
    l.component.checkpoint.as_ref().expect("weights")
}

/// The bytes a checkpoint's tensors take once loaded with floats at `kind`.
fn placed_bytes(ck: &Checkpoint, kind: Kind) -> u64 {
    ck.tensors.values().map(|t| if t.info.dtype.is_float() { t.info.numel() * kind.elt_size_in_bytes() as u64 } else { t.info.nbytes() }).sum()
}

/// A scoped thread's result; its panic goes on in this thread.
fn joined<T>(h: std::thread::ScopedJoinHandle<'_, T>) -> T {
    h.join().unwrap_or_else(|p| std::panic::resume_unwind(p))
}

/// One component's load: a byte bar, and a log line with its rate when done.
struct ComponentLoad {
    name: &'static str,
    total: u64,
    bar: indicatif::ProgressBar,
    started: Instant,
}

impl ComponentLoad {
    fn run<R>(self, f: impl FnOnce() -> Result<R, ExecError>) -> Result<R, ExecError> {
        let sink = self.bar.clone();
        let r = crate::models::weights::with_progress(std::rc::Rc::new(move |b| sink.inc(b)), f);
        self.bar.finish_and_clear();
        if r.is_ok() {
            let s = self.started.elapsed().as_secs_f64();
            tracing::info!("loaded {}: {} in {s:.2} s ({}/s)", self.name, crate::units::ByteSize(self.total), crate::units::ByteSize((self.total as f64 / s.max(1e-6)) as u64));
        }
        r
    }
}

/// Output paths: `run.output` (or `<name>.png` beside the manifest), numbered for batches.
fn output_paths(m: &LoadedManifest, opts: &RunOptions, n: usize) -> Vec<PathBuf> {
    let base = match (&opts.out, &m.manifest.run.output) {
        (Some(o), _) => o.clone(),
        (None, Some(o)) => m.resolve_path("run.output", o),
        (None, None) => crate::manifest::normalize(&m.path.parent().unwrap_or(Path::new(".")).join(format!("{}.png", m.manifest.name.replace(['/', '\\', ' '], "-")))),
    };
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

/// A device and dtype a component runs at.
#[derive(Debug, Clone, Copy)]
struct Dev {
    device: tch::Device,
    kind: Kind,
}

/// A pipeline loaded onto the devices of a plan: generate with it, or move its weights to a new
/// plan without reading any file again (diffusers' `reset_device_map` + a new placement).
pub struct Session<'m> {
    m: &'m LoadedManifest,
    pipeline: PipelineFolder,
    plan: Plan,
    simulate: bool,
    shape: crate::plan::memory::RunShape,
    outputs: Vec<PathBuf>,
    seed: u64,
    encoder: text::TextEncoder,
    encoder_2: Option<text::TextEncoder>,
    unet: UNet2DConditionModel,
    unet_vs: VarStore,
    vae: AutoencoderKLDecoder,
    vae_vs: VarStore,
    vae_kind: Kind,
    /// The mapped checkpoint files the UNet's and VAE's same-dtype parameters view.
    mapped: [Mapped; 2],
    te: Dev,
    te2: Option<Dev>,
    un: Dev,
    va: Dev,
    startup_s: f64,
    load_s: f64,
    host: HostMemory,
    started: Instant,
    warnings: Vec<String>,
}

/// Plans, checks and loads (step 0 and 1 of a run).
pub fn load<'m>(m: &'m LoadedManifest, opts: &RunOptions) -> Result<Session<'m>, ExecError> {
    let started = Instant::now();
    let mut warnings = vec![];
    let kind_name = m.manifest.pipeline.kind;
    // 0. Plan (headers only), devices checked, outputs and dump folder writable, before loading.
    // Configs are read once, here, and shared by the planner and the models.
    let (pipeline, configs) = crate::preflight::check(m).map_err(ExecError::Preflight)?;
    warnings.extend(pipeline.notes.iter().cloned());
    let inventory = build::inventory(m, &opts.plan)?;
    let input = build::plan_input(m, &pipeline, &configs, inventory, &opts.plan);
    let plan = crate::plan::plan(&input)?;
    if !opts.simulate {
        check_devices(&plan)?;
    }
    for c in &plan.components {
        tracing::info!(component = %c.name, device = %c.device, dtype = c.dtype.as_str(), bytes = c.bytes, peak = c.peak_bytes, split = c.split.is_some(), "planned");
        if c.device == Device::Cpu && c.offload != Offload::None {
            warnings.push(format!("`{}` runs on the CPU, where its weights already live: `offload = \"{}\"` does nothing for it", c.name, format!("{:?}", c.offload).to_lowercase()));
        }
    }
    let shape = build::run_shape(m, &configs);
    let r = &m.manifest.run;
    let steps = r.steps.unwrap_or(50) as usize;
    let xl = kind_name == PipelineKind::StableDiffusionXl;
    let guidance = r.guidance_scale.unwrap_or(if xl { 5.0 } else { 7.5 });
    let do_cfg = guidance > 1.0;
    let batch = shape.batch as i64;
    if shape.width % 8 != 0 || shape.height % 8 != 0 {
        return Err(ExecError::Unsupported(format!("width and height must be multiples of 8, got {}x{}", shape.width, shape.height)));
    }
    let outputs = output_paths(m, opts, batch as usize);
    // Every destination is checked now, not after the generation: a folder, a read-only place, a
    // file where a folder should be.
    for o in &outputs {
        let dest = crate::fsutil::check_destination(o).map_err(|msg| ExecError::Io { what: "cannot write the image", path: o.clone(), source: std::io::Error::other(msg) })?;
        if o.extension().is_none_or(|e| !e.eq_ignore_ascii_case("png")) && !matches!(dest, crate::fsutil::Destination::InPlace(_)) {
            return Err(ExecError::Unsupported(format!("the output `{}` must be a `.png` file (or a device such as /dev/null)", o.display())));
        }
    }
    if let Some(d) = &opts.dump {
        std::fs::create_dir_all(d).map_err(|source| ExecError::Io { what: "cannot create the dump folder", path: d.clone(), source })?;
        let probe = d.join(".runner-write-test");
        std::fs::write(&probe, b"").map_err(|source| ExecError::Io { what: "cannot write into the dump folder", path: d.clone(), source })?;
        let _ = std::fs::remove_file(probe);
    }
    let seed = seed_of(m);

    // 1. Load components on their planned devices (preflight checked that their configs fit
    //    together: a mismatch would otherwise surface as a libtorch shape error mid-run).
    let t_load = Instant::now();
    let startup_s = allocator::process_age_s().unwrap_or(0.0);
    let te = placed(&pipeline, &plan, m, "text_encoder", opts.simulate)?;
    let te2 = if xl { Some(placed(&pipeline, &plan, m, "text_encoder_2", opts.simulate)?) } else { None };
    let un = placed(&pipeline, &plan, m, "unet", opts.simulate)?;
    let va = placed(&pipeline, &plan, m, "vae", opts.simulate)?;
    // Components load concurrently, each streaming its tensors (a few at a time on the host),
    // so running them together costs no memory beyond their results; one byte bar each.
    let rss_before = allocator::host_rss().map_or(0, |(rss, _)| rss);
    let bars = indicatif::MultiProgress::new();
    let component_load = |name: &'static str, l: &Loaded| {
        let ck = l.component.checkpoint.as_ref().expect("weights");
        let total = if name == "vae" { placed_bytes(&decoder_only(ck), vae_kind(l, &configs.vae)) } else { placed_bytes(ck, l.kind) };
        ComponentLoad { name, total, bar: bars.add(byte_progress(total, name, opts.progress)), started: Instant::now() }
    };
    let (encoder, encoder_2, unet, vae) = std::thread::scope(|scope| {
        let te_job = scope.spawn(|| component_load("text_encoder", &te).run(|| text::TextEncoder::load(&pipeline, &te, &configs.text_encoder, "tokenizer")));
        let te2_job = scope.spawn(|| match (&te2, &configs.text_encoder_2) {
            (Some(l), Some(cfg)) => component_load("text_encoder_2", l).run(|| text::TextEncoder::load(&pipeline, l, cfg, "tokenizer_2").map(Some)),
            _ => Ok(None),
        });
        let unet_job = scope.spawn(|| component_load("unet", &un).run(|| load_unet(&un, configs.unet.clone())));
        let vae = component_load("vae", &va).run(|| load_vae(&va, configs.vae.clone()));
        (joined(te_job), joined(te2_job), joined(unet_job), vae)
    });
    let (encoder, encoder_2, (unet, unet_vs, unet_mapped), (vae, vae_vs, vae_kind, vae_mapped)) = (encoder?, encoder_2?, unet?, vae?);
    let load_s = t_load.elapsed().as_secs_f64();
    let on_host = |l: &Loaded, bytes: u64| if l.device == tch::Device::Cpu || l.split.is_some() { bytes } else { 0 };
    let host = HostMemory {
        rss_before_load_bytes: rss_before,
        load_peak_rss_bytes: allocator::host_rss().map_or(0, |(_, peak)| peak),
        peak_rss_bytes: 0,
        loaded_bytes: on_host(&te, placed_bytes(ck_of(&te), te.kind))
            + te2.as_ref().map_or(0, |l| on_host(l, placed_bytes(ck_of(l), l.kind)))
            + on_host(&un, placed_bytes(ck_of(&un), un.kind))
            + on_host(&va, placed_bytes(&decoder_only(ck_of(&va)), vae_kind)),
    };
    let run_at = |l: &Loaded, name: &str| Dev { device: if opts.simulate { tch::Device::Cpu } else { tch_device(plan_device(&plan, name)) }, kind: l.kind };
    let (te, te2, un, va) = (run_at(&te, "text_encoder"), te2.as_ref().map(|l| run_at(l, "text_encoder_2")), run_at(&un, "unet"), run_at(&va, "vae"));
    let _ = (steps, guidance, do_cfg);
    let session = Session {
        m,
        pipeline,
        plan,
        simulate: opts.simulate,
        shape,
        outputs,
        seed,
        encoder,
        encoder_2,
        unet,
        unet_vs,
        vae,
        vae_vs,
        vae_kind,
        mapped: [unet_mapped, vae_mapped],
        te,
        te2,
        un,
        va,
        startup_s,
        load_s,
        host,
        started,
        warnings,
    };
    session.pin_offloaded(&[]);
    Ok(session)
}

impl Session<'_> {
    /// The plan the weights are placed by.
    pub fn plan(&self) -> &Plan {
        &self.plan
    }

    /// Generates the manifest's images (steps 2 to 6 of a run).
    pub fn generate(&mut self, opts: &RunOptions) -> Result<RunReport, ExecError> {
        let m = self.m;
        let r = &m.manifest.run;
        let xl = m.manifest.pipeline.kind == PipelineKind::StableDiffusionXl;
        let steps = r.steps.unwrap_or(50) as usize;
        let guidance = r.guidance_scale.unwrap_or(if xl { 5.0 } else { 7.5 });
        let do_cfg = guidance > 1.0;
        let (shape, seed, load_s, started) = (self.shape, self.seed, self.load_s, self.started);
        let batch = shape.batch as i64;
        let (te, te2, un, va, vae_kind) = (self.te, self.te2, self.un, self.va, self.vae_kind);
        let (pipeline, plan, outputs) = (&self.pipeline, &self.plan, self.outputs.clone());
        let (encoder, encoder_2, unet, vae) = (&self.encoder, &self.encoder_2, &self.unet, &self.vae);
        let mut warnings = self.warnings.clone();
        let mut dump: Vec<(String, Tensor)> = vec![];
        let dumping = opts.dump.is_some();
        let simulate = self.simulate;
        let mut res = self.residency()?;
        // 2. Text conditioning: [negative, positive] when guidance runs.
        let t_enc = Instant::now();
        let prompt = r.prompt.clone().unwrap_or_default();
        let cond = match encoder_2 {
            None => {
                res.enter("text_encoder")?;
                tch::no_grad(|| sd_conditioning(m, encoder, do_cfg, batch, &mut dump, dumping, &mut warnings))?
            }
            Some(e2) => {
                let force_zeros = pipeline.index.config.get("force_zeros_for_empty_prompt").and_then(|v| v.as_bool()).unwrap_or(true);
                tch::no_grad(|| sdxl_conditioning(m, encoder, e2, do_cfg, batch, force_zeros, &shape, &mut dump, dumping, &mut warnings, &mut |n| res.enter(n)))?
            }
        };
        let context = cond.context.to_device(un.device).to_kind(un.kind);
        let added = cond.added.map(|(text_embeds, time_ids)| (text_embeds.to_device(un.device).to_kind(un.kind), time_ids.to_device(un.device).to_kind(un.kind)));
        let encode_s = t_enc.elapsed().as_secs_f64();

        // 3. Scheduler and initial latents (diffusers `prepare_latents`: randn on a CPU generator
        //    seeded with `seed`, in the UNet's dtype, moved to its device, times init_noise_sigma).
        let sched_cfg_path = pipeline.root.join("scheduler").join("scheduler_config.json");
        let sched_text = std::fs::read_to_string(&sched_cfg_path).map_err(|source| ExecError::Io { what: "cannot read", path: sched_cfg_path.clone(), source })?;
        let sched_cfg = crate::schedulers::parse_config(&sched_text).map_err(|e| ExecError::Scheduler(format!("`{}`: {e}", sched_cfg_path.display())))?;
        let mut scheduler = crate::schedulers::build(&sched_cfg, m.manifest.pipeline.scheduler, steps).map_err(|e| ExecError::Scheduler(format!("`{}`: {e}", sched_cfg_path.display())))?;
        let ucfg = &unet.config;
        let vae_scale = 1i64 << (vae.config.block_out_channels.len() as i64 - 1);
        let lat_shape = [batch, ucfg.in_channels, shape.height as i64 / vae_scale, shape.width as i64 / vae_scale];
        tch::manual_seed(seed as i64);
        let init = match &r.latents {
            Some(p) => text::load_latents(&m.resolve_path("run.latents", p), &lat_shape)?,
            // diffusers draws in the prompt embeddings' dtype (the last text encoder's).
            None => Tensor::randn(lat_shape, (te2.map_or(te.kind, |l| l.kind), tch::Device::Cpu)),
        };
        if dumping {
            dump.push(("latents.init".into(), init.shallow_clone()));
            let ts: Vec<f64> = scheduler.timesteps().to_vec();
            dump.push(("scheduler.timesteps".into(), Tensor::from_slice(&ts).to_kind(Kind::Float)));
            if let Some(s) = scheduler.sigmas() {
                dump.push(("scheduler.sigmas".into(), Tensor::from_slice(s).to_kind(Kind::Float)));
            }
        }
        let mut latents = (init.to_device(un.device) * scheduler.init_noise_sigma()).to_kind(un.kind);

        // 4. Denoising loop.
        res.enter("unet")?;
        let t_den = Instant::now();
        let sync = |d: tch::Device| {
            if let tch::Device::Cuda(i) = d {
                tch::Cuda::synchronize(i as i64);
            }
        };
        let mut step_times = vec![];
        let timesteps: Vec<f64> = scheduler.timesteps().to_vec();
        let bar = progress(timesteps.len() as u64, "denoising", opts.progress);
        for (i, &t) in timesteps.iter().enumerate() {
            let t_step = Instant::now();
            let input = if do_cfg { Tensor::cat(&[&latents, &latents], 0) } else { latents.shallow_clone() };
            let input = scheduler.scale_model_input(&input, i);
            let add = added.as_ref().map(|(text_embeds, time_ids)| crate::models::unet_2d::AddedCond { text_embeds, time_ids });
            // A split UNet ends on its last device: the loop's tensors live on its first.
            let out = tch::no_grad(|| unet.forward(&input, t, &context, add)).to_device(un.device);
            let noise_pred = if do_cfg {
                let ch = out.chunk(2, 0);
                &ch[0] + (&ch[1] - &ch[0]) * guidance
            } else {
                out.shallow_clone()
            };
            latents = tch::no_grad(|| scheduler.step(&noise_pred, i, &latents));
            sync(un.device);
            step_times.push(t_step.elapsed().as_secs_f64());
            // One line per step for logs without a terminal (RUST_LOG=runner=info).
            let rate = step_times.iter().sum::<f64>() / step_times.len() as f64;
            tracing::info!("step {}/{} (timestep {t}): {:.3} s, {}", i + 1, timesteps.len(), step_times[i], human_rate(rate));
            bar.set_message(human_rate(rate));
            if dumping {
                dump.push((format!("step{i}.unet_output"), out));
                dump.push((format!("step{i}.noise_pred"), noise_pred));
                dump.push((format!("step{i}.latents"), latents.shallow_clone()));
            }
            bar.inc(1);
        }
        bar.finish_and_clear();
        let denoise_s = t_den.elapsed().as_secs_f64();

        // 5. Decode.
        let t_dec = Instant::now();
        tracing::info!("decoding {} image(s) of {}x{} with the VAE", batch, shape.width, shape.height);
        let spinner = spinner("decoding", opts.progress);
        res.enter("vae")?;
        let images = tch::no_grad(|| vae.latents_to_image(&latents.to_device(va.device).to_kind(vae_kind))).to_kind(Kind::Float).to_device(tch::Device::Cpu);
        sync(va.device);
        spinner.finish_and_clear();
        tracing::info!("decoded in {:.2} s", t_dec.elapsed().as_secs_f64());
        // diffusers `run_safety_checker`: flagged images come back black, with a warning.
        let images = match pipeline.component("safety_checker").filter(|c| c.checkpoint.is_some()) {
            None => images,
            Some(sc) => {
                res.enter("safety_checker")?;
                let l = placed(pipeline, plan, m, "safety_checker", simulate)?;
                // Loaded for this one call, straight onto the device it runs on (offloaded or not).
                let run_device = if simulate { tch::Device::Cpu } else { tch_device(plan_device(plan, "safety_checker")) };
                let fe = pipeline.root.join("feature_extractor");
                let processor = crate::models::image_processor::ImageProcessor::from_folder(&fe).map_err(|e| ExecError::Text(e.to_string()))?;
                let checker = crate::models::safety_checker::SafetyChecker::load(&sc.dir, sc.checkpoint.as_ref().expect("weights"), run_device, l.kind).map_err(|e| ExecError::Text(e.to_string()))?;
                // It runs last and once: loaded when needed, dropped after (`enter` above sent
                // the visitors on its device back to host memory, as diffusers' hooks do).
                let bytes = ledger::weigh(checker.varstore(), plan_device(plan, "safety_checker"), None);
                res.ledger.borrow_mut().add("safety_checker", &bytes)?;
                let (flags, checked) = tch::no_grad(|| checker.check(&processor, &images)).map_err(|e| ExecError::Text(e.to_string()))?;
                drop(checker);
                res.ledger.borrow_mut().remove(&bytes);
                if flags.iter().any(|&f| f) {
                    warnings.push("Potential NSFW content was detected in one or more images. A black image will be returned instead. Try again with a different prompt and/or seed.".into());
                }
                checked
            }
        };
        let decode_s = t_dec.elapsed().as_secs_f64();
        // diffusers' `maybe_free_model_hooks`: offloaded components end in host memory (and a
        // budget a stream exceeded is an error before anything is written).
        res.leave_all()?;
        if dumping {
            dump.push(("latents.final".into(), latents.shallow_clone()));
            dump.push(("image".into(), images.get(0)));
        }

        // 6. Write, each image with what makes it again.
        let scheduler_name = scheduler.name().to_string();
        let karras = matches!(m.manifest.pipeline.scheduler, Some(crate::manifest::SchedulerKind::DpmPP2MKarras))
            || (m.manifest.pipeline.scheduler.is_none() && sched_cfg.get("use_karras_sigmas").and_then(|v| v.as_bool()) == Some(true));
        let latents = match &r.latents {
            Some(p) => {
                let path = m.resolve_path("run.latents", p);
                let sha = crate::lock::sha256_file(&path).map(|(_, h)| h).unwrap_or_default();
                Some((path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default(), sha))
            }
            None => None,
        };
        let mut meta = png::ImageMeta {
            version: env!("CARGO_PKG_VERSION").to_string(),
            prompt: prompt.clone(),
            negative_prompt: r.negative_prompt.clone().unwrap_or_default(),
            prompt_2: if xl { r.prompt_2.clone() } else { None },
            negative_prompt_2: if xl { r.negative_prompt_2.clone() } else { None },
            seed: if latents.is_some() { None } else { Some(seed) },
            batch_index: 0,
            batch_size: outputs.len(),
            latents,
            steps,
            guidance_scale: guidance,
            sampler: png::a1111_sampler(&scheduler_name, karras),
            scheduler: scheduler_name.clone(),
            clip_skip: r.clip_skip,
            width: shape.width,
            height: shape.height,
            model: pipeline.root.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default(),
            lock_sha256: opts.lock_sha256.clone(),
            dtype: dtype_summary(m),
            manifest_sha256: manifest_digest(m),
        };
        for (i, path) in outputs.iter().enumerate() {
            let (w, h, rgb) = png::to_rgb8(&images.get(i as i64));
            meta.batch_index = i;
            png::write_png(path, w, h, &rgb, &meta.chunks()).map_err(|source| ExecError::Io { what: "cannot write the image", path: path.clone(), source })?;
        }
        if let Some(d) = &opts.dump {
            let p = d.join("dump.safetensors");
            png::write_dump(&p, &dump).map_err(|source| ExecError::Io { what: "cannot write the dump", path: p, source })?;
        }
        let mut devices = res.ledger.borrow().report(plan);
        if !self.simulate {
            for d in &plan.devices {
                if let (Device::Cuda(i), Some(use_)) = (d.device, devices.get_mut(&d.device.to_string())) {
                    use_.allocator = allocator::stats(i as usize).unwrap_or_else(|e| {
                        warnings.push(format!("cannot read the CUDA allocator's counters of {}: {e}", d.device));
                        None
                    });
                }
            }
        }
        drop(res);
        let first_step_s = step_times.first().copied().unwrap_or(0.0);
        let rest = if step_times.len() > 1 { &step_times[1..] } else { &step_times[..] };
        let seconds_per_step = rest.iter().sum::<f64>() / rest.len().max(1) as f64;
        Ok(RunReport {
            images: outputs,
            seed,
            steps,
            unet_calls: timesteps.len(),
            scheduler: scheduler_name,
            width: shape.width,
            height: shape.height,
            device_map: plan.device_map(),
            simulated: opts.simulate,
            plan_notes: plan.notes.clone(),
            timings: Timings { startup_s: self.startup_s, load_s, encode_s, denoise_s, first_step_s, seconds_per_step, decode_s, total_s: started.elapsed().as_secs_f64() },
            devices,
            host: HostMemory { peak_rss_bytes: allocator::host_rss().map_or(0, |(_, peak)| peak), ..self.host },
            warnings,
        })
    }

    /// The ledger of the weights held now, each variable on its planned device.
    fn ledger(&self) -> Result<ledger::Ledger, ExecError> {
        let mut l = ledger::Ledger::new(&self.plan);
        let mut held: Vec<(&str, &VarStore)> = vec![("text_encoder", self.encoder.varstore())];
        if let Some(e2) = &self.encoder_2 {
            held.push(("text_encoder_2", e2.varstore()));
        }
        held.push(("unet", &self.unet_vs));
        held.push(("vae", &self.vae_vs));
        for (name, vs) in held {
            let cp = self.plan.components.iter().find(|c| c.name == name).ok_or_else(|| ExecError::Unsupported(format!("the plan has no `{name}`")))?;
            let bytes = match cp.offload {
                Offload::None => ledger::weigh(vs, cp.device, cp.split.as_deref()),
                _ => ledger::weigh(vs, Device::Cpu, None),
            };
            l.add(name, &bytes)?;
        }
        Ok(l)
    }

    /// The mapped checkpoint files a component's same-dtype CPU weights view.
    fn mapped(&self, name: &str) -> Option<&Mapped> {
        match name {
            "text_encoder" => Some(self.encoder.mapped()),
            "text_encoder_2" => self.encoder_2.as_ref().map(|e| e.mapped()),
            "unet" => Some(&self.mapped[0]),
            "vae" => Some(&self.mapped[1]),
            _ => None,
        }
    }

    fn varstore(&self, name: &str) -> Option<&VarStore> {
        match name {
            "text_encoder" => Some(self.encoder.varstore()),
            "text_encoder_2" => self.encoder_2.as_ref().map(|e| e.varstore()),
            "unet" => Some(&self.unet_vs),
            "vae" => Some(&self.vae_vs),
            _ => None,
        }
    }

    /// The ledger and the offload hooks of the components that have them.
    fn residency(&self) -> Result<offload::Residency<'_>, ExecError> {
        let offloaded = || self.plan.components.iter().filter(|c| c.offload != Offload::None && c.device != Device::Cpu);
        let visitors = offloaded().filter(|c| c.offload == Offload::Model).filter_map(|c| self.varstore(&c.name).map(|vs| offload::Visitor::new(&c.name, vs, c.device, c.split.clone()))).collect();
        let runs_on = self.plan.components.iter().map(|c| (c.name.clone(), c.split.as_ref().map_or_else(|| vec![c.device], |s| s.iter().map(|x| x.1).collect()))).collect();
        let mut res = offload::Residency::new(self.ledger()?, visitors, runs_on, self.simulate);
        for c in offloaded().filter(|c| c.offload != Offload::Model) {
            if let Some(vs) = self.varstore(&c.name) {
                let run = if self.simulate { tch::Device::Cpu } else { tch_device(c.device) };
                res.add_stream(offload::Stream::new(&c.name, c.offload, vs, c.device, run, res.shared_ledger()));
            }
        }
        Ok(res)
    }

    /// Moves the loaded weights to `plan` (devices only: dtypes are the manifest's) without reading
    /// any file: every component's parameters go to their new devices, a split UNet's by module.
    pub fn apply_plan(&mut self, plan: Plan) -> Result<(), ExecError> {
        if !self.simulate {
            check_devices(&plan)?;
        }
        // (where the weights live, where the component runs, its split); `model` offload keeps the
        // weights in host memory between runs.
        let device = |name: &str| -> Result<(tch::Device, tch::Device, Option<Split>), ExecError> {
            let cp = plan.components.iter().find(|c| c.name == name).ok_or_else(|| ExecError::Unsupported(format!("the new plan has no `{name}`")))?;
            let map = |d: Device| {
                if self.simulate {
                    tch::Device::Cpu
                } else {
                    tch_device(d)
                }
            };
            if cp.offload != Offload::None {
                return Ok((tch::Device::Cpu, map(cp.device), None));
            }
            Ok((map(cp.device), map(cp.device), cp.split.as_ref().map(|s| s.iter().map(|(m, d)| (m.clone(), map(*d))).collect())))
        };
        let (home, d, _) = device("text_encoder")?;
        relocate(self.encoder.varstore(), home, None);
        self.te.device = d;
        if let Some(e2) = &self.encoder_2 {
            let (home, d, _) = device("text_encoder_2")?;
            relocate(e2.varstore(), home, None);
            self.te2 = self.te2.map(|t| Dev { device: d, ..t });
        }
        let (home, d, split) = device("unet")?;
        relocate(&self.unet_vs, home, split.as_deref());
        self.un.device = d;
        let (home, d, _) = device("vae")?;
        relocate(&self.vae_vs, home, None);
        self.va.device = d;
        let already: Vec<String> = self.plan.components.iter().filter(|c| c.offload != Offload::None).map(|c| c.name.clone()).collect();
        self.plan = plan;
        self.pin_offloaded(&already);
        Ok(())
    }

    /// Offloaded weights go to page-locked host memory on CUDA machines, so their trips to
    /// the device are fast, asynchronous DMA copies.
    fn pin_offloaded(&self, already: &[String]) {
        if self.simulate {
            return;
        }
        for c in self.plan.components.iter().filter(|c| c.offload != Offload::None && !already.contains(&c.name)) {
            let (Device::Cuda(_), Some(vs)) = (c.device, self.varstore(&c.name)) else {
                continue;
            };
            let cuda = tch_device(c.device);
            let mapped = self.mapped(&c.name);
            tch::no_grad(|| {
                for (_, mut var) in vs.variables() {
                    if var.device() == tch::Device::Cpu {
                        // `_pin_memory`: `pin_memory(device)` warns that its argument is deprecated,
                        // and tch always passes one.
                        if let Ok(pinned) = var.f_internal_pin_memory(cuda) {
                            let view = var.shallow_clone();
                            var.set_data(&pinned);
                            // A view of the checkpoint: its pages go, the pinned copy is the one.
                            mapped.map(|m| m.release_copied(&view));
                        }
                    }
                }
            });
        }
    }
}

fn plan_device(plan: &Plan, name: &str) -> Device {
    plan.components.iter().find(|c| c.name == name).map(|c| c.device).unwrap_or(Device::Cpu)
}

/// A split component's module prefixes and their devices.
type Split = Vec<(String, tch::Device)>;

/// Moves every variable of `vs` to `device`, or, for a split component, to the device of the
/// longest module prefix that names it (the model's units move their inputs to their weights).
fn relocate(vs: &VarStore, device: tch::Device, split: Option<&[(String, tch::Device)]>) {
    let device_of = |name: &str| split.and_then(|s| ledger::device_of(s, name)).unwrap_or(device);
    tch::no_grad(|| {
        for (name, mut var) in vs.variables() {
            let d = device_of(&name);
            if var.device() != d {
                let moved = var.to_device(d);
                var.set_data(&moved);
            }
        }
    });
}

/// What the UNet is conditioned on.
struct Conditioning {
    /// [2B or B, 77, cross_attention_dim]
    context: Tensor,
    /// SDXL: (text_embeds, time_ids), batched like `context`.
    added: Option<(Tensor, Tensor)>,
}

fn truncation_warning(enc: &text::TextEncoder, truncated: Option<String>, warnings: &mut Vec<String>) {
    if let Some(t) = truncated {
        // diffusers echoes the whole remainder; a pasted megabyte would flood the terminal.
        const SHOWN: usize = 200;
        let n = t.chars().count();
        let shown: String = t.chars().take(SHOWN).collect();
        let more = if n > SHOWN { format!(" ... ({} more characters)", n - SHOWN) } else { String::new() };
        warnings.push(format!("The following part of your input was truncated because CLIP can only handle sequences up to {} tokens: {shown:?}{more}", enc.max_length()));
    }
}

/// diffusers `StableDiffusionPipeline.encode_prompt`, repeated `batch` times per prompt.
fn sd_conditioning(
    m: &LoadedManifest,
    enc: &text::TextEncoder,
    do_cfg: bool,
    batch: i64,
    dump: &mut Vec<(String, Tensor)>,
    dumping: bool,
    warnings: &mut Vec<String>,
) -> Result<Conditioning, ExecError> {
    let r = &m.manifest.run;
    let (ids, out, trunc) = enc.run(r.prompt.as_deref().unwrap_or_default())?;
    truncation_warning(enc, trunc, warnings);
    let pos = enc.sd_embeds(&out, r.clip_skip)?.repeat([batch, 1, 1]);
    if dumping {
        dump.push(("tokens.prompt.input_ids".into(), ids));
        dump.push(("prompt_embeds".into(), pos.shallow_clone()));
    }
    if !do_cfg {
        return Ok(Conditioning { context: pos, added: None });
    }
    // The negative prompt never uses clip_skip in diffusers.
    let (nids, nout, _) = enc.run(r.negative_prompt.as_deref().unwrap_or_default())?;
    let neg = enc.sd_embeds(&nout, None)?.repeat([batch, 1, 1]);
    if dumping {
        dump.push(("tokens.negative.input_ids".into(), nids));
        dump.push(("negative_prompt_embeds".into(), neg.shallow_clone()));
    }
    Ok(Conditioning { context: Tensor::cat(&[neg, pos], 0), added: None })
}

/// diffusers `StableDiffusionXLPipeline.encode_prompt` + `_get_add_time_ids`: both encoders'
/// penultimate states concatenated, the second encoder's projected pooled output, and the
/// micro-conditioning `time_ids`; a missing negative prompt gives zeros when the pipeline's
/// `force_zeros_for_empty_prompt` says so.
#[allow(clippy::too_many_arguments)]
fn sdxl_conditioning(
    m: &LoadedManifest,
    enc1: &text::TextEncoder,
    enc2: &text::TextEncoder,
    do_cfg: bool,
    batch: i64,
    force_zeros: bool,
    shape: &crate::plan::memory::RunShape,
    dump: &mut Vec<(String, Tensor)>,
    dumping: bool,
    warnings: &mut Vec<String>,
    visit: &mut dyn FnMut(&str) -> Result<(), ExecError>,
) -> Result<Conditioning, ExecError> {
    let r = &m.manifest.run;
    let encode = |p1: &str, p2: &str, skip: Option<u32>, warnings: &mut Vec<String>, visit: &mut dyn FnMut(&str) -> Result<(), ExecError>| -> Result<(Tensor, Tensor, Tensor, Tensor), ExecError> {
        visit("text_encoder")?;
        let (ids1, out1, t1) = enc1.run(p1)?;
        visit("text_encoder_2")?;
        let (ids2, out2, t2) = enc2.run(p2)?;
        truncation_warning(enc1, t1, warnings);
        truncation_warning(enc2, t2, warnings);
        let pooled = out2.text_embeds.as_ref().ok_or_else(|| ExecError::Text("`text_encoder_2` must be a CLIPTextModelWithProjection (it has no text_projection)".into()))?.shallow_clone();
        let embeds = Tensor::cat(&[enc1.sdxl_embeds(&out1, skip)?, enc2.sdxl_embeds(&out2, skip)?], -1);
        Ok((ids1, ids2, embeds, pooled))
    };
    let prompt = r.prompt.clone().unwrap_or_default();
    let prompt_2 = r.prompt_2.clone().unwrap_or_else(|| prompt.clone());
    let (ids1, ids2, pos, pooled) = encode(&prompt, &prompt_2, r.clip_skip, warnings, visit)?;
    // original_size, crops_coords_top_left, target_size as (height, width) pairs.
    let (h, w) = (shape.height as f64, shape.width as f64);
    let pair = |v: Option<[u32; 2]>, d: (f64, f64)| v.map(|a| (a[0] as f64, a[1] as f64)).unwrap_or(d);
    let (oh, ow) = pair(r.original_size, (h, w));
    let (ch, cw) = pair(r.crops_coords_top_left, (0.0, 0.0));
    let (th, tw) = pair(r.target_size, (h, w));
    let time_ids = Tensor::from_slice(&[oh, ow, ch, cw, th, tw]).to_kind(Kind::Float).unsqueeze(0);
    let rep = |t: &Tensor| {
        if t.dim() == 3 {
            t.repeat([batch, 1, 1])
        } else {
            t.repeat([batch, 1])
        }
    };
    let (pos, pooled) = (rep(&pos), rep(&pooled));
    if dumping {
        dump.push(("tokens.prompt.input_ids".into(), ids1));
        dump.push(("tokens.prompt.input_ids_2".into(), ids2));
        dump.push(("prompt_embeds".into(), pos.shallow_clone()));
        dump.push(("pooled_prompt_embeds".into(), pooled.shallow_clone()));
    }
    if !do_cfg {
        let time_ids = time_ids.repeat([batch, 1]);
        if dumping {
            dump.push(("unet.added_cond.time_ids".into(), time_ids.shallow_clone()));
            dump.push(("unet.added_cond.text_embeds".into(), pooled.shallow_clone()));
        }
        return Ok(Conditioning { context: pos, added: Some((pooled, time_ids)) });
    }
    let (neg, neg_pooled) = if r.negative_prompt.is_none() && force_zeros {
        (pos.zeros_like(), pooled.zeros_like())
    } else {
        let n1 = r.negative_prompt.clone().unwrap_or_default();
        let n2 = r.negative_prompt_2.clone().unwrap_or_else(|| n1.clone());
        let (nids1, nids2, neg, neg_pooled) = encode(&n1, &n2, None, warnings, visit)?;
        if dumping {
            dump.push(("tokens.negative.input_ids".into(), nids1));
            dump.push(("tokens.negative.input_ids_2".into(), nids2));
        }
        (rep(&neg), rep(&neg_pooled))
    };
    let text_embeds = Tensor::cat(&[&neg_pooled, &pooled], 0);
    // diffusers: cat([negative_add_time_ids, add_time_ids]).repeat(batch, 1) (rows are equal
    // unless negative micro-conditioning is given, which runner does not take).
    let time_ids = Tensor::cat(&[&time_ids, &time_ids], 0).repeat([batch, 1]);
    if dumping {
        dump.push(("negative_prompt_embeds".into(), neg.shallow_clone()));
        dump.push(("negative_pooled_prompt_embeds".into(), neg_pooled.shallow_clone()));
        dump.push(("unet.added_cond.time_ids".into(), time_ids.shallow_clone()));
        dump.push(("unet.added_cond.text_embeds".into(), text_embeds.shallow_clone()));
    }
    Ok(Conditioning { context: Tensor::cat(&[neg, pos], 0), added: Some((text_embeds, time_ids)) })
}

/// sha256 of the manifest file's bytes (what was reviewed), for image metadata.
/// sha256 of the effective manifest (the file after environment variables and `--set`), as JSON.
fn manifest_digest(m: &LoadedManifest) -> String {
    use sha2::{Digest, Sha256};
    format!("{:x}", Sha256::digest(serde_json::to_vec(&m.manifest).unwrap_or_default()))
}

/// `fp16`, or `fp16 (vae fp32)` when components differ from the pipeline's dtype.
fn dtype_summary(m: &LoadedManifest) -> String {
    let base = m.manifest.pipeline.dtype;
    let own: Vec<String> = m.manifest.components.iter().filter_map(|(n, c)| c.dtype.filter(|d| *d != base).map(|d| format!("{n} {}", d.as_str()))).collect();
    if own.is_empty() {
        base.as_str().to_string()
    } else {
        format!("{} ({})", base.as_str(), own.join(", "))
    }
}

//! Loading a pipeline's components onto their planned devices: each built from its checkpoint
//! (src/models/weights.rs), concurrently, with a byte progress bar each; and moving loaded
//! weights between devices.

use std::time::Instant;

use tch::nn::VarStore;
use tch::Kind;

use super::{kind_of, ledger, tch_device, ExecError};

use super::text::{T5TextEncoder, TextEncoder};
use crate::checkpoint::layout::{Checkpoint, Component, PipelineFolder};
use crate::checkpoint::load::Mapped;
use crate::device::Device;
use crate::manifest::{Dtype, LoadedManifest, Offload};
use crate::models::cast::{self, Cast};
use crate::models::clip::ClipTextConfig;
use crate::models::flux_transformer::{FluxTransformer2DConfig, FluxTransformer2DModel};
use crate::models::sd3_transformer::{SD3Transformer2DConfig, SD3Transformer2DModel};
use crate::models::t5::T5Config;
use crate::models::unet_2d::{UNet2DConditionConfig, UNet2DConditionModel};
use crate::models::vae::{AutoencoderKLConfig, AutoencoderKLDecoder, AutoencoderKLEncoder, DecodeMode};
use crate::models::weights::build_from_checkpoint;
use crate::models::ModelError;
use crate::plan::Plan;

/// A model with the variables it was built into and the mapped files its same-dtype CPU
/// parameters view (hold them together).
pub(crate) struct Held<M> {
    pub model: M,
    pub vs: VarStore,
    pub mapped: Mapped,
}

pub(crate) struct Loaded<'a> {
    pub component: &'a Component,
    /// Where it runs (a split component: where it starts).
    pub device: tch::Device,
    pub kind: Kind,
    /// A component split by the `auto` strategy: module path -> device, in execution order.
    pub split: Option<Split>,
}

pub(crate) fn placed<'a>(pipeline: &'a PipelineFolder, plan: &Plan, m: &LoadedManifest, name: &str, simulate: bool) -> Result<Loaded<'a>, ExecError> {
    let component = pipeline.component(name).filter(|c| c.checkpoint.is_some()).ok_or_else(|| ExecError::Unsupported(format!("the pipeline has no `{name}` weights")))?;
    let cp = plan.components.iter().find(|c| c.name == name).expect("planned");
    check_split(name, &component.class, cp.split.is_some())?;
    let dtype = m.manifest.components.get(name).and_then(|c| c.dtype).unwrap_or(m.manifest.pipeline.dtype);
    let device = if simulate { tch::Device::Cpu } else { tch_device(cp.device) };
    let split = cp.split.as_ref().map(|s| s.iter().map(|(m, d)| (m.clone(), if simulate { tch::Device::Cpu } else { tch_device(*d) })).collect());
    // Offloaded weights live in host memory and visit `device` while the component runs.
    let home = if cp.offload != Offload::None { tch::Device::Cpu } else { device };
    Ok(Loaded { component, device: home, kind: kind_of(dtype), split })
}

/// The UNet, its parameters the checkpoint's tensors (no initialisation, no staging copy); a split
/// UNet's parts go from the mapping to their devices.
pub(crate) fn load_unet(l: &Loaded, cfg: UNet2DConditionConfig) -> Result<Held<UNet2DConditionModel>, ExecError> {
    placed_build(
        l,
        |h: &Held<UNet2DConditionModel>| &h.vs,
        |d| {
            let vs = VarStore::new(d);
            let (model, mapped) = build_from_checkpoint(&vs, ck_of(l), "UNet2DConditionModel", l.kind, |root| UNet2DConditionModel::new(root, cfg.clone())).map_err(ModelError::from)?;
            Ok(Held { model, vs, mapped })
        },
    )
}

/// The dtype the VAE runs at: an fp16 VAE with `force_upcast` runs in fp32, as diffusers upcasts it.
pub(crate) fn vae_kind(l: &Loaded, cfg: &AutoencoderKLConfig) -> Kind {
    if cfg.force_upcast && l.kind == Kind::Half {
        Kind::Float
    } else {
        l.kind
    }
}

/// The VAE's tensors that text-to-image uses: the decoder's (the encoder's stay unread).
pub(crate) fn decoder_only(ck: &Checkpoint) -> Checkpoint {
    Checkpoint { tensors: ck.tensors.iter().filter(|(k, _)| !k.starts_with("encoder.") && !k.starts_with("quant_conv.")).map(|(k, v)| (k.clone(), v.clone())).collect(), ..ck.clone() }
}

/// The decode mode `components.vae.tiling` / `slicing` ask for (`config` read from `path`).
pub(crate) fn vae_mode(m: &LoadedManifest, config: &AutoencoderKLConfig, path: &std::path::Path) -> Result<DecodeMode, ExecError> {
    let spec = m.manifest.components.get("vae");
    let tiling = match spec.and_then(|s| s.tiling) {
        Some(true) => Some(config.tile(path).map_err(|e| ExecError::Text(e.to_string()))?),
        _ => None,
    };
    Ok(DecodeMode { tiling, slicing: spec.and_then(|s| s.slicing).unwrap_or(false) })
}

/// The VAE's encoder tensors (`encoder.*`, `quant_conv.*`): what image-to-image adds.
pub(crate) fn encoder_only(ck: &Checkpoint) -> Checkpoint {
    Checkpoint { tensors: ck.tensors.iter().filter(|(k, _)| k.starts_with("encoder.") || k.starts_with("quant_conv.")).map(|(k, v)| (k.clone(), v.clone())).collect(), ..ck.clone() }
}

/// The VAE decoder, at `kind`.
pub(crate) fn load_vae(l: &Loaded, kind: Kind, cfg: AutoencoderKLConfig) -> Result<Held<AutoencoderKLDecoder>, ExecError> {
    let vs = VarStore::new(l.device);
    let (model, mapped) = build_from_checkpoint(&vs, &decoder_only(ck_of(l)), "AutoencoderKL", kind, |root| AutoencoderKLDecoder::new(root, cfg.clone())).map_err(ModelError::from)?;
    Ok(Held { model, vs, mapped })
}

/// The models whose blocks move their inputs to their own weights' device, so that they run
/// split across devices.
pub(crate) const SPLIT_RUNNABLE: [&str; 4] = ["UNet2DConditionModel", "SD3Transformer2DModel", "FluxTransformer2DModel", "T5EncoderModel"];

pub(crate) fn check_split(name: &str, class: &str, split: bool) -> Result<(), ExecError> {
    if split && !SPLIT_RUNNABLE.contains(&class) {
        return Err(ExecError::Unsupported(format!("`{name}` ({class}) is split across devices; runner runs split {} only", SPLIT_RUNNABLE.join(", "))));
    }
    Ok(())
}

/// Builds a component with `build(device)` where it lives: a split one on the CPU, then its
/// parts moved to their devices from there.
pub(crate) fn placed_build<M>(l: &Loaded, vs_of: impl Fn(&M) -> &VarStore, build: impl FnOnce(tch::Device) -> Result<M, ExecError>) -> Result<M, ExecError> {
    let m = build(if l.split.is_some() { tch::Device::Cpu } else { l.device })?;
    if let Some(split) = &l.split {
        relocate(vs_of(&m), l.device, Some(split));
    }
    Ok(m)
}

/// A loaded component's checkpoint (preflight found one).
pub(crate) fn ck_of<'a>(l: &Loaded<'a>) -> &'a Checkpoint {
    l.component.checkpoint.as_ref().expect("weights")
}

/// The bytes a checkpoint's tensors take once loaded with floats at `kind`.
/// The planner's rule ([`crate::plan::build::tensor_bytes`]), so T5's fp32 `wo` counts as planned.
pub(crate) fn placed_bytes(ck: &Checkpoint, class: &str, kind: Kind) -> u64 {
    let dtype = match kind {
        Kind::Half => Dtype::Fp16,
        Kind::BFloat16 => Dtype::Bf16,
        _ => Dtype::Fp32,
    };
    ck.tensors.iter().map(|(name, t)| crate::plan::build::tensor_bytes(class, name, &t.info, dtype)).sum()
}

/// A scoped thread's result; its panic goes on in this thread.
pub(crate) fn joined<T>(h: std::thread::ScopedJoinHandle<'_, T>) -> T {
    h.join().unwrap_or_else(|p| std::panic::resume_unwind(p))
}

/// What a pipeline's `load` needs: where each component goes, and one byte bar per component.
pub(crate) struct Loader<'a> {
    pub m: &'a LoadedManifest,
    pub pipeline: &'a PipelineFolder,
    pub plan: &'a Plan,
    pub configs: &'a crate::preflight::Configs,
    simulate: bool,
    progress: bool,
    bars: indicatif::MultiProgress,
    host_bytes: std::sync::atomic::AtomicU64,
    /// `[adapters.*]`: the LoRA pairs merged into each component's weights as it loads.
    fuse: std::collections::BTreeMap<String, Vec<crate::checkpoint::lora::FuseItem>>,
    /// `fuse = false` adapters: pairs that run beside each component's layers.
    live: std::collections::BTreeMap<String, Vec<crate::checkpoint::lora::FuseItem>>,
    /// Jobs may be image-to-image: the VAE encoder is loaded.
    pub images: bool,
}

impl<'a> Loader<'a> {
    pub fn new(m: &'a LoadedManifest, pipeline: &'a PipelineFolder, plan: &'a Plan, configs: &'a crate::preflight::Configs, simulate: bool, progress: bool, images: bool) -> Result<Self, ExecError> {
        use crate::checkpoint::lora::{fuse_plan, manifest_adapters};
        let comps: Vec<_> = pipeline.components.iter().filter_map(|c| c.checkpoint.as_ref().map(|ck| (c.name.as_str(), c.class.as_str(), ck))).collect();
        let err = |e: crate::checkpoint::CheckpointError| ExecError::Text(e.to_string());
        let fuse = fuse_plan(&manifest_adapters(m, false), &comps).map_err(err)?;
        let live = fuse_plan(&manifest_adapters(m, true), &comps).map_err(err)?;
        let images = images || m.manifest.run.image.is_some();
        Ok(Loader { m, pipeline, plan, configs, simulate, progress, bars: indicatif::MultiProgress::new(), host_bytes: Default::default(), fuse, live, images })
    }

    /// Where component `name` is loaded and at which dtype.
    pub fn placed(&self, name: &str) -> Result<Loaded<'a>, ExecError> {
        placed(self.pipeline, self.plan, self.m, name, self.simulate)
    }

    /// Tracks the load of `name` (placed as `l`), `bytes` once loaded; `bytes` count as host
    /// memory when its weights live there.
    pub fn track(&self, name: &'static str, l: &Loaded, bytes: u64) -> ComponentLoad {
        if l.device == tch::Device::Cpu || l.split.is_some() {
            self.host_bytes.fetch_add(bytes, std::sync::atomic::Ordering::Relaxed);
        }
        let fuse = self.fuse.get(&l.component.name).cloned().unwrap_or_default();
        let live = self.live.get(&l.component.name).cloned().unwrap_or_default();
        ComponentLoad { name, total: bytes, bar: self.bars.add(super::byte_progress(bytes, name, self.progress)), started: Instant::now(), fuse, live }
    }

    /// [`Self::track`] with the bytes of `l`'s whole checkpoint at its dtype.
    pub fn track_whole(&self, name: &'static str, l: &Loaded) -> ComponentLoad {
        self.track(name, l, placed_bytes(ck_of(l), &l.component.class, l.kind))
    }

    /// A CLIP text encoder and its tokenizer (from the pipeline's `tokenizer` folder).
    pub fn text_encoder(&self, name: &'static str, l: &Loaded, cfg: &ClipTextConfig, tokenizer: &str) -> Result<TextEncoder, ExecError> {
        self.track_whole(name, l).run(|| TextEncoder::load(self.pipeline, ck_of(l), l.device, l.kind, cfg, tokenizer))
    }

    /// A T5 encoder and its tokenizer (from the pipeline's `tokenizer` folder).
    pub fn t5(&self, name: &'static str, l: &Loaded, cfg: &T5Config, tokenizer: &str) -> Result<T5TextEncoder, ExecError> {
        self.track_whole(name, l).run(|| placed_build(l, T5TextEncoder::varstore, |d| T5TextEncoder::load(self.pipeline, ck_of(l), d, l.kind, cfg, tokenizer)))
    }

    /// `components.<name>.storage_dtype` of `l` computing at `compute`, checked on the devices it
    /// loads to and runs on (a backend that cannot cast is an error now, not a libtorch abort).
    fn cast(&self, l: &Loaded, compute: Kind) -> Result<Option<Cast>, ExecError> {
        let Some(s) = self.m.manifest.components.get(&l.component.name).and_then(|c| c.storage_dtype) else { return Ok(None) };
        let cast = Cast { storage: storage_kind(s), compute };
        let mut devices = vec![l.device];
        if !self.simulate {
            devices.push(tch_device(plan_device(self.plan, &l.component.name)));
        }
        devices.extend(l.split.iter().flatten().map(|(_, d)| *d));
        for d in devices {
            cast::probe(d, cast).map_err(|e| ExecError::Unsupported(format!("components.{}.storage_dtype = \"{}\": {e}", l.component.name, s.as_str())))?;
        }
        Ok(Some(cast))
    }

    /// Runs `f` (the build of `l`, a `class` model at `compute`) with its layers cast by its
    /// `storage_dtype`, if any.
    fn built<R>(&self, l: &Loaded, compute: Kind, f: impl FnOnce() -> Result<R, ExecError>) -> Result<R, ExecError> {
        let c = self.cast(l, compute)?;
        cast::building(&l.component.class, c, f)
    }

    pub fn sd3_transformer(&self, l: &Loaded, cfg: &SD3Transformer2DConfig) -> Result<SD3Transformer2DModel, ExecError> {
        self.track_whole("transformer", l)
            .run(|| self.built(l, l.kind, || placed_build(l, SD3Transformer2DModel::varstore, |d| SD3Transformer2DModel::load(cfg, ck_of(l), d, l.kind).map_err(|e| ExecError::Text(e.to_string())))))
    }

    pub fn flux_transformer(&self, l: &Loaded, cfg: &FluxTransformer2DConfig) -> Result<FluxTransformer2DModel, ExecError> {
        self.track_whole("transformer", l)
            .run(|| self.built(l, l.kind, || placed_build(l, FluxTransformer2DModel::varstore, |d| FluxTransformer2DModel::load(cfg, ck_of(l), d, l.kind).map_err(|e| ExecError::Text(e.to_string())))))
    }

    pub fn unet(&self, l: &Loaded) -> Result<Held<UNet2DConditionModel>, ExecError> {
        self.track_whole("unet", l).run(|| self.built(l, l.kind, || load_unet(l, self.configs.unet().clone())))
    }

    /// The VAE's decoder and the dtype it runs at: with `upcast`, [`vae_kind`] (SD, SDXL);
    /// else the component's (SD3 never upcasts).
    /// Tiling and slicing as `components.vae` asks (diffusers `enable_vae_tiling` /
    /// `enable_vae_slicing`).
    pub fn vae(&self, l: &Loaded, upcast: bool) -> Result<(Held<AutoencoderKLDecoder>, Kind), ExecError> {
        let kind = if upcast { vae_kind(l, &self.configs.vae) } else { l.kind };
        let mode = vae_mode(self.m, &self.configs.vae, &crate::preflight::config_path(l.component))?;
        let (mut held, kind) =
            self.track("vae", l, placed_bytes(&decoder_only(ck_of(l)), &l.component.class, kind)).run(|| self.built(l, kind, || load_vae(l, kind, self.configs.vae.clone()))).map(|h| (h, kind))?;
        held.model.mode = mode;
        Ok((held, kind))
    }

    /// The VAE's encoder at `kind` (the decoder's), for image-to-image: loaded only when a run
    /// gives an image.
    pub fn vae_encoder(&self, l: &Loaded, kind: Kind) -> Result<Held<AutoencoderKLEncoder>, ExecError> {
        let cfg = self.configs.vae.clone();
        let ck = encoder_only(ck_of(l));
        let tiling = vae_mode(self.m, &cfg, &crate::preflight::config_path(l.component))?.tiling;
        let mut held = self.track("vae encoder", l, placed_bytes(&ck, &l.component.class, kind)).run(|| {
            self.built(l, kind, || {
                let vs = VarStore::new(l.device);
                let (model, mapped) = build_from_checkpoint(&vs, &ck, "AutoencoderKL", kind, |root| AutoencoderKLEncoder::new(root, cfg.clone(), 3, cfg.use_quant_conv)).map_err(ModelError::from)?;
                Ok(Held { model, vs, mapped })
            })
        })?;
        held.model.tiling = tiling;
        Ok(held)
    }

    /// Weight bytes the load placed in host memory.
    pub fn host_bytes(&self) -> u64 {
        self.host_bytes.load(std::sync::atomic::Ordering::Relaxed)
    }
}

/// One component's load: a byte bar, and a log line with its rate when done.
pub(crate) struct ComponentLoad {
    name: &'static str,
    total: u64,
    bar: indicatif::ProgressBar,
    started: Instant,
    fuse: Vec<crate::checkpoint::lora::FuseItem>,
    live: Vec<crate::checkpoint::lora::FuseItem>,
}

impl ComponentLoad {
    pub fn run<R>(self, f: impl FnOnce() -> Result<R, ExecError>) -> Result<R, ExecError> {
        let sink = self.bar.clone();
        let mut fuse: std::collections::BTreeMap<String, Vec<crate::models::weights::Delta>> = Default::default();
        for (i, (a, b)) in self.fuse.iter().zip(crate::models::lora::read_pairs(&self.fuse).map_err(ExecError::Text)?) {
            fuse.entry(i.weight.clone()).or_default().push(crate::models::weights::Delta { a, b, scaling: i.scaling });
        }
        let live = crate::models::lora::pending(&self.live).map_err(ExecError::Text)?;
        let merged = self.fuse.len();
        let name = self.name;
        let f = move || {
            let (r, left) = crate::models::lora::building(live, || crate::models::weights::with_fused(fuse, f));
            match left.first() {
                Some(w) => Err(ExecError::Unsupported(format!("{name}: a live LoRA pair for `{w}` sits beside a layer that cannot run one (set `fuse = true` on its adapter)"))),
                None => r,
            }
        };
        if merged > 0 {
            tracing::info!("{}: merging {merged} LoRA pairs into its weights", self.name);
        }
        let r = crate::models::weights::with_progress(std::rc::Rc::new(move |b| sink.inc(b)), f);
        self.bar.finish_and_clear();
        if r.is_ok() {
            let s = self.started.elapsed().as_secs_f64();
            tracing::info!("loaded {}: {} in {s:.2} s ({}/s)", self.name, crate::units::ByteSize(self.total), crate::units::ByteSize((self.total as f64 / s.max(1e-6)) as u64));
        }
        r
    }
}

pub(crate) fn plan_device(plan: &Plan, name: &str) -> Device {
    plan.components.iter().find(|c| c.name == name).map(|c| c.device).unwrap_or(Device::Cpu)
}

/// A split component's module prefixes and their devices.
pub(crate) type Split = Vec<(String, tch::Device)>;

/// Moves every variable of `vs` to `device`, or, for a split component, to the device of the
/// longest module prefix that names it (the model's units move their inputs to their weights).
pub(crate) fn relocate(vs: &VarStore, device: tch::Device, split: Option<&[(String, tch::Device)]>) {
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

/// A manifest `storage_dtype` as libtorch's dtype.
pub fn storage_kind(s: crate::manifest::StorageDtype) -> Kind {
    use crate::manifest::StorageDtype;
    match s {
        StorageDtype::Fp8E4m3 => Kind::Float8e4m3fn,
        StorageDtype::Fp8E5m2 => Kind::Float8e5m2,
        StorageDtype::Fp16 => Kind::Half,
        StorageDtype::Bf16 => Kind::BFloat16,
    }
}

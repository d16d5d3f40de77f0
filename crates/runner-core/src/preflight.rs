//! Everything about a run that can be known without loading a weight, checked before anything
//! is loaded: the pipeline folder and its `model_index.json`, the kind against the folder, the
//! classes runner implements, every component's `config.json` (parsed strictly) and whether they
//! fit together, the scheduler config, keys that depend on them (`clip_skip`), and the tensor file
//! `run.latents` names. `validate`, `plan` and `run` all go through it: a manifest `validate`
//! calls valid does not fail later for any of these. [`warnings`] says what the folder makes of
//! keys that are valid but have no effect (FLUX.1-schnell's `guidance_scale`).

use std::path::{Path, PathBuf};

use crate::arch::clip::ClipTextConfig;
use crate::arch::flux::FluxTransformer2DConfig;
use crate::arch::safety::SafetyCheckerConfig;
use crate::arch::sd3::SD3Transformer2DConfig;
use crate::arch::t5::T5Config;
use crate::arch::unet::UNet2DConditionConfig;
use crate::arch::vae::AutoencoderKLConfig;
use crate::checkpoint::layout::{Component, PipelineFolder, WeightFiles};
use crate::diag::{Diagnostic, Location};
use crate::manifest::{LoadedManifest, PipelineKind};
use crate::plan::memory::RunShape;

/// The classes runner implements, per component name of a `kind` pipeline.
pub fn supported_classes(kind: PipelineKind, component: &str) -> Option<&'static [&'static str]> {
    if kind == PipelineKind::Flux {
        // FLUX's second text encoder is T5 (SD3's third), and its first CLIP has no projection.
        return Some(match component {
            "text_encoder" => &["CLIPTextModel"],
            "text_encoder_2" => &["T5EncoderModel"],
            "tokenizer" => &["CLIPTokenizer", "CLIPTokenizerFast"],
            "tokenizer_2" => &["T5TokenizerFast", "T5Tokenizer"],
            "transformer" => &["FluxTransformer2DModel"],
            "vae" => &["AutoencoderKL"],
            "scheduler" => crate::scheduling::SUPPORTED,
            _ => return None,
        });
    }
    Some(match component {
        "text_encoder" => &["CLIPTextModel", "CLIPTextModelWithProjection"],
        "text_encoder_2" => &["CLIPTextModelWithProjection"],
        "text_encoder_3" => &["T5EncoderModel"],
        "tokenizer" | "tokenizer_2" => &["CLIPTokenizer", "CLIPTokenizerFast"],
        "tokenizer_3" => &["T5TokenizerFast", "T5Tokenizer"],
        "unet" => &["UNet2DConditionModel"],
        "vae" => &["AutoencoderKL"],
        "safety_checker" => &["StableDiffusionSafetyChecker"],
        "feature_extractor" => &["CLIPImageProcessor", "CLIPFeatureExtractor"],
        "scheduler" => crate::scheduling::SUPPORTED,
        _ => return None,
    })
}

/// The typed configs of the model components, read once.
#[derive(Debug, Clone)]
pub struct Configs {
    /// SD and SDXL's denoiser.
    pub unet: Option<UNet2DConditionConfig>,
    pub vae: AutoencoderKLConfig,
    pub text_encoder: ClipTextConfig,
    /// SDXL's and SD3's second CLIP (None for FLUX, whose `text_encoder_2` is T5: see [`Self::t5`]).
    pub text_encoder_2: Option<ClipTextConfig>,
    /// The T5 encoder: SD3's `text_encoder_3` (absent when disabled), FLUX's `text_encoder_2`.
    pub t5: Option<T5Config>,
    /// SD3's denoiser.
    pub transformer: Option<SD3Transformer2DConfig>,
    /// FLUX's denoiser.
    pub flux_transformer: Option<FluxTransformer2DConfig>,
    pub safety_checker: Option<SafetyCheckerConfig>,
}

impl Configs {
    /// The UNet's config (preflight read it for every kind that has one).
    pub fn unet(&self) -> &UNet2DConditionConfig {
        self.unet.as_ref().expect("a UNet pipeline")
    }

    /// The transformer's patch size in latent pixels: SD3's `patch_size`, FLUX's packed 2x2
    /// patches; None for a UNet.
    pub fn patch_size(&self) -> Option<u64> {
        match (&self.transformer, &self.flux_transformer) {
            (Some(t), _) => Some(t.patch_size as u64),
            (_, Some(_)) => Some(2),
            _ => None,
        }
    }

    /// diffusers' `vae_scale_factor`: 2 ** (levels - 1).
    pub fn vae_scale_factor(&self) -> u64 {
        1u64 << (self.vae.block_out_channels.len() - 1)
    }

    /// The image size diffusers defaults to: the denoiser's `sample_size` (FLUX: the pipeline's
    /// `default_sample_size`, 128) x the VAE's scale factor.
    pub fn default_size(&self) -> u64 {
        let latent = match (&self.unet, &self.transformer, &self.flux_transformer) {
            (Some(u), _, _) => u.sample_size as u64,
            (_, Some(t), _) => t.sample_size as u64,
            (_, _, Some(_)) => FLUX_DEFAULT_SAMPLE_SIZE,
            _ => 64,
        };
        latent * self.vae_scale_factor()
    }
}

/// What a run of a manifest is: `[run]` with diffusers' defaults applied against the folder's
/// configs, worked out once. The checks, the planner, `serve`'s limits and the pipelines all read
/// this value, so that each default lives in one place.
#[derive(Debug, Clone)]
pub struct RunSpec {
    pub kind: PipelineKind,
    /// Size ([`Configs::default_size`]), batch (1), whether guidance doubles the batch, T5 tokens
    /// ([`PipelineKind::default_max_sequence_length`]): what working memory depends on.
    pub shape: RunShape,
    /// `num_inference_steps` ([`PipelineKind::default_steps`]).
    pub steps: u32,
    /// `guidance_scale` ([`PipelineKind::default_guidance_scale`]): classifier-free guidance, or
    /// FLUX's embedded guidance.
    pub guidance_scale: f64,
    /// FLUX's true classifier-free guidance scale, when it runs (above 1, with a negative prompt).
    pub true_cfg_scale: Option<f64>,
    /// Valid keys that have no effect with these configs.
    pub warnings: Vec<Diagnostic>,
    /// Image-to-image or inpainting (`run.image`, `run.mask_image`).
    pub init: Option<InitSpec>,
}

/// An image-to-image or inpainting run: the input image's and mask's pixel sizes and the
/// effective strength.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct InitSpec {
    pub image: (u32, u32),
    pub mask: Option<(u32, u32)>,
    pub strength: f64,
}

impl InitSpec {
    /// The denoising steps diffusers' `get_timesteps` leaves of `steps` at this strength: SD and
    /// SDXL floor `steps × strength`; SD3 and FLUX floor the steps skipped instead.
    pub fn steps_left(&self, kind: PipelineKind, steps: u32) -> u32 {
        let n = steps as f64;
        let t_start = if kind.flow_matching() { (n - (n * self.strength).min(n)).max(0.0) as u32 } else { steps - ((n * self.strength) as u32).min(steps) };
        steps - t_start
    }

    /// diffusers' default `strength` of the pipeline that takes this input.
    pub fn default_strength(kind: PipelineKind, inpaint: bool) -> f64 {
        match (kind, inpaint) {
            (PipelineKind::StableDiffusion, false) => 0.8,
            (PipelineKind::StableDiffusion, true) => 1.0,
            (PipelineKind::StableDiffusionXl, false) => 0.3,
            (PipelineKind::StableDiffusionXl, true) => 0.9999,
            (PipelineKind::StableDiffusion3 | PipelineKind::Flux, _) => 0.6,
        }
    }
}

/// The pixel size of the image file at `run.<key>`, from its header (None when it cannot be read:
/// [`check_run`] says why).
fn image_size(m: &LoadedManifest, key: &str, p: Option<&std::path::Path>) -> Option<(u32, u32)> {
    let path = m.resolve_path(&format!("run.{key}"), p?);
    let bytes = crate::image::read_file(&path).ok()?;
    crate::image::probe(&bytes, key).ok().map(|p| (p.width, p.height))
}

impl RunSpec {
    /// `m`'s run against `configs`. For FLUX, `shape.guidance` is diffusers' true CFG
    /// ([`crate::manifest::Run::true_cfg`]), run as a second pass of the same batch: its embedded
    /// guidance costs no pass.
    pub fn new(m: &LoadedManifest, configs: &Configs) -> RunSpec {
        let r = &m.manifest.run;
        Self::with_images(m, configs, image_size(m, "image", r.image.as_deref()), image_size(m, "mask_image", r.mask_image.as_deref()))
    }

    /// [`Self::new`] with the input image's and mask's sizes given (a `serve` request's data).
    /// SD and SDXL image-to-image take the image's own size floored to the VAE's multiple, as
    /// their diffusers pipelines do; the others the requested size.
    pub fn with_images(m: &LoadedManifest, configs: &Configs, image: Option<(u32, u32)>, mask: Option<(u32, u32)>) -> RunSpec {
        let r = &m.manifest.run;
        let kind = m.manifest.pipeline.kind;
        let size = configs.default_size();
        let init = image.map(|image| InitSpec { image, mask, strength: r.strength.unwrap_or(InitSpec::default_strength(kind, mask.is_some() || r.mask_image.is_some())) });
        let own_size = init.filter(|i| i.mask.is_none() && matches!(kind, PipelineKind::StableDiffusion | PipelineKind::StableDiffusionXl)).map(|i| {
            let unit = configs.vae_scale_factor();
            (i.image.0 as u64 / unit * unit, i.image.1 as u64 / unit * unit)
        });
        let guidance_scale = r.guidance_scale.unwrap_or(kind.default_guidance_scale());
        let true_cfg = kind == PipelineKind::Flux && r.true_cfg();
        let shape = RunShape {
            width: own_size.map(|s| s.0).or(r.width.map(u64::from)).unwrap_or(size),
            height: own_size.map(|s| s.1).or(r.height.map(u64::from)).unwrap_or(size),
            batch: r.batch.map(u64::from).unwrap_or(1),
            guidance: if kind == PipelineKind::Flux { true_cfg } else { guidance_scale > 1.0 },
            max_sequence_length: u64::from(r.max_sequence_length.or(kind.default_max_sequence_length()).unwrap_or(crate::plan::memory::DEFAULT_MAX_SEQUENCE_LENGTH as u32)),
        };
        RunSpec {
            kind,
            shape,
            steps: r.steps.unwrap_or(kind.default_steps()),
            guidance_scale,
            true_cfg_scale: true_cfg.then(|| r.true_cfg_scale.unwrap_or(1.0)),
            warnings: warnings(m, configs, init.is_some() || m.manifest.run.image.is_some(), own_size.is_some()),
            init,
        }
    }
}

/// diffusers' `FluxPipeline.default_sample_size`: 128 latent pixels (1024 pixels at the VAE's 8x).
pub const FLUX_DEFAULT_SAMPLE_SIZE: u64 = 128;

/// The component's `config.json`: beside its weights (a `source` elsewhere), else in its
/// pipeline subfolder (always, for a GGUF file: diffusers' `config=`).
pub fn config_path(c: &Component) -> PathBuf {
    let beside = c.checkpoint.as_ref().and_then(|ck| match &ck.weights.files {
        WeightFiles::Gguf(_) => None,
        WeightFiles::Single(p) => p.parent().map(|d| d.join("config.json")),
        WeightFiles::Sharded(i) => i.path.parent().map(|d| d.join("config.json")),
    });
    beside.filter(|p| p.is_file()).unwrap_or_else(|| c.dir.join("config.json"))
}

/// A manifest checked against its pipeline folder: the folder, opened, its configs and the run.
#[derive(Debug)]
pub struct Checked {
    pub folder: PipelineFolder,
    pub configs: Configs,
    pub run: RunSpec,
}

/// Checks `m` against its pipeline folder; what it found there, or every problem found.
pub fn check(m: &LoadedManifest) -> Result<Checked, Vec<Diagnostic>> {
    let (folder, configs, mut out) = check_folder(m)?;
    let run = RunSpec::new(m, &configs);
    out.extend(check_run(m, &folder, &configs, &run));
    if out.is_empty() {
        Ok(Checked { folder, configs, run })
    } else {
        Err(out)
    }
}

/// The part of [`check`] that depends on `[run]` and `pipeline.scheduler` only: what a loaded
/// pipeline checks of each new job (`runner run --prompts`, `runner serve`), `run` being
/// [`RunSpec::new`] of it, against the folder and configs it was loaded from, without reading
/// them again.
pub fn check_run(m: &LoadedManifest, p: &PipelineFolder, configs: &Configs, run: &RunSpec) -> Vec<Diagnostic> {
    let at = |key: &str| m.locate_value(key);
    let kind = m.manifest.pipeline.kind;
    let xl = kind == PipelineKind::StableDiffusionXl;
    let sd3 = kind == PipelineKind::StableDiffusion3;
    let flux = kind == PipelineKind::Flux;
    let mut out = vec![];
    // Per-run scales of live adapters.
    for (name, s) in r_adapter_scales(m) {
        let key = format!("run.adapter_scales.{name}");
        match m.manifest.adapters.get(&name) {
            None => out.push(
                Diagnostic::error(
                    format!("`{key}`: no adapter `{name}` is declared (adapters: {})", m.manifest.adapters.keys().map(|k| format!("`{k}`")).collect::<Vec<_>>().join(", ")),
                    at("run.adapter_scales"),
                )
                .with_key(&key),
            ),
            Some(a) if a.fuse != Some(false) => out.push(
                Diagnostic::error(format!("`{key}`: adapter `{name}` is merged into the weights at load, so its scale is fixed"), at("run.adapter_scales"))
                    .with_key(&key)
                    .with_note(format!("set `adapters.{name}.fuse = false` to change its scale per run")),
            ),
            Some(_) if !s.is_finite() || s < 0.0 => out.push(Diagnostic::error(format!("`{key}` is {s}: a scale is a finite number, 0 or more"), at("run.adapter_scales")).with_key(&key)),
            Some(_) => {}
        }
    }
    // 6. The scheduler: its config, or the manifest's kind over it.
    let sched_path = p.root.join("scheduler").join("scheduler_config.json");
    let sched = std::fs::read_to_string(&sched_path).map_err(|e| format!("cannot read it: {e}")).and_then(|t| crate::scheduling::parse_config(&t).map_err(|e| e.to_string()));
    match sched {
        Ok(cfg) => {
            let steps = run.steps as usize;
            // A dynamically shifted schedule depends on the image's sequence length in patches
            // (FLUX: the packed 2x2 latent patches, (H/16) x (W/16) at the VAE's 8x).
            let mu = configs.patch_size().and_then(|p| {
                let shape = run.shape;
                let scale = configs.vae_scale_factor();
                let patches = (shape.height / scale / p) * (shape.width / scale / p);
                crate::scheduling::dynamic_shift_mu(&cfg, patches as usize).ok().flatten()
            });
            match crate::scheduling::build_with_mu(&cfg, m.manifest.pipeline.scheduler, steps, mu, &crate::scheduling::StdMath) {
                Err(e) => out.push(Diagnostic::error(format!("`{}`: {e}", sched_path.display()), Location::Path(sched_path.clone()))),
                // The folder's own class is checked against the kind here (a `pipeline.scheduler`
                // kind is checked against the folder's config class by `build`).
                Ok(s) if crate::scheduling::is_flow_matching(s.name()) != kind.flow_matching() => {
                    let (has, needs) = if kind.flow_matching() { ("a noise-prediction", "a flow-matching") } else { ("a flow-matching", "a noise-prediction") };
                    out.push(Diagnostic::error(
                        format!("`{}`: `{}` is {has} scheduler, but a `{}` pipeline needs {needs} one", sched_path.display(), s.name(), kind.as_str()),
                        Location::Path(sched_path.clone()),
                    ));
                }
                Ok(_) => {}
            }
        }
        Err(e) => out.push(Diagnostic::error(format!("`{}`: {e}", sched_path.display()), Location::Path(sched_path.clone()))),
    }
    // 7. Keys that depend on the configs.
    let r = &m.manifest.run;
    if let Some(patch) = configs.patch_size() {
        // diffusers' check_inputs: sizes must be multiples of vae_scale_factor * patch_size (SD3
        // raises; FLUX's pipeline warns and rounds down, runner refuses as for SD3).
        let unit = configs.vae_scale_factor() * patch;
        let why = if flux { "the VAE's scale factor times 2: FLUX packs 2x2 latent patches" } else { "the VAE's scale factor times the transformer's patch_size" };
        let shape = run.shape;
        for (key, v) in [("run.width", shape.width), ("run.height", shape.height)] {
            if v % unit != 0 {
                out.push(Diagnostic::error(format!("`{key}` is {v}, but this pipeline needs a multiple of {unit} ({why})"), at(key)).with_key(key).with_note(format!(
                    "use {} or {}",
                    v / unit * unit,
                    (v / unit + 1) * unit
                )));
            }
        }
    }
    // FluxPipeline has no `clip_skip`: the manifest check warns that it is ignored.
    if let Some(k) = r.clip_skip.filter(|_| !flux) {
        // diffusers takes hidden_states[-(clip_skip + 1)] (SD) or [-(clip_skip + 2)] (SDXL) of
        // num_hidden_layers + 1 states.
        let encoders = std::iter::once(&configs.text_encoder).chain(configs.text_encoder_2.as_ref());
        let max = encoders.map(|c| c.num_hidden_layers - i64::from(xl || sd3)).min().unwrap_or(0);
        if i64::from(k) > max {
            out.push(
                Diagnostic::error(format!("`run.clip_skip` is {k}, but the text encoder{} allow at most {max}", if xl || sd3 { "s" } else { "" }), at("run.clip_skip"))
                    .with_key("run.clip_skip")
                    .with_note(format!("`text_encoder` has {} layers", configs.text_encoder.num_hidden_layers)),
            );
        }
    }
    out.extend(check_init(m, configs, run));
    if let Some(l) = &r.latents {
        let path = m.resolve_path("run.latents", l);
        let shape = run.shape;
        let want = [shape.batch, configs.vae.latent_channels as u64, shape.height / 8, shape.width / 8];
        if let Err(msg) = check_latents(&path, &want) {
            out.push(Diagnostic::error(msg, at("run.latents")).with_key("run.latents"));
        }
    }
    out
}

/// `run.image`, `run.mask_image` and `run.strength`: each file an image runner reads (format,
/// size under the decompression-bomb limit, from its header), a strength in (0, 1] that leaves a
/// step, a mask only with an image, what the pipeline kind and denoiser can run.
fn check_init(m: &LoadedManifest, configs: &Configs, run: &RunSpec) -> Vec<Diagnostic> {
    let r = &m.manifest.run;
    let at = |key: &str| m.locate_value(key);
    let err = |key: &str, msg: String| Diagnostic::error(msg, at(key)).with_key(key);
    let kind = m.manifest.pipeline.kind;
    let mut out = vec![];
    // The image and mask: the manifest's files, or a request's data (sized in `run.init`).
    let has_image = r.image.is_some() || run.init.is_some();
    let has_mask = r.mask_image.is_some() || run.init.is_some_and(|i| i.mask.is_some());
    for (key, p) in [("run.image", &r.image), ("run.mask_image", &r.mask_image)] {
        if let Some(p) = p {
            let path = m.resolve_path(key, p);
            if let Err(e) = crate::image::read_file(&path).and_then(|b| crate::image::probe(&b, &path.display().to_string())) {
                out.push(err(key, format!("`{key}`: {e}")));
            }
        }
    }
    if has_mask && !has_image {
        out.push(err("run.mask_image", "`run.mask_image` without `run.image`: inpainting repaints the masked part of an image".into()));
    }
    if let Some(s) = r.strength {
        if !(s.is_finite() && s > 0.0 && s <= 1.0) {
            out.push(err("run.strength", format!("`run.strength` is {s}: it is in (0, 1] (1 noises the image fully)")));
        }
    }
    let nine = configs.unet.as_ref().is_some_and(|u| u.in_channels == 9);
    if nine && !has_mask {
        out.push(
            err(
                if has_image { "run.image" } else { "pipeline.source" },
                "this UNet takes 9 input channels (an inpainting UNet: latents, mask and masked image): it needs `run.image` and `run.mask_image`".into(),
            )
            .with_note("text-to-image and image-to-image need a 4-channel UNet"),
        );
    }
    if has_image {
        // FLUX.1 Fill's 384-channel transformer (and SD3's 33-channel inpainting ones) take the
        // masked image's latents beside the latents: not implemented.
        let wide = match (&configs.flux_transformer, &configs.transformer) {
            (Some(t), _) if t.in_channels != 64 => Some(t.in_channels),
            (_, Some(t)) if t.in_channels != configs.vae.latent_channels => Some(t.in_channels),
            _ => None,
        };
        if let Some(c) = wide {
            out.push(err(
                "run.image",
                format!(
                    "this `{}` transformer takes {c} input channels (FLUX.1 Fill, an SD3 inpainting transformer): image-to-image and inpainting with it are not implemented (issue 28)",
                    kind.as_str()
                ),
            ));
        }
        if r.latents.is_some() {
            out.push(err("run.latents", "`run.latents` with `run.image`: image-to-image starts from the encoded image and the seed's noise, not from given latents".into()));
        }
        if let Some(init) = run.init.filter(|i| i.strength > 0.0 && i.strength <= 1.0) {
            if init.steps_left(kind, run.steps) == 0 {
                out.push(err(
                    if r.strength.is_some() { "run.strength" } else { "run.steps" },
                    format!("`run.strength` {} of {} steps leaves no step to run (diffusers' `int(steps × strength)` is 0): raise the strength or the steps", init.strength, run.steps),
                ));
            }
        }
    }
    out
}

/// Checks 1 to 5 of [`check`]: the folder, its index, weights, classes and configs; with the
/// configs, the errors found after they were read (components that do not fit together).
#[allow(clippy::type_complexity)]
fn check_folder(m: &LoadedManifest) -> Result<(PipelineFolder, Configs, Vec<Diagnostic>), Vec<Diagnostic>> {
    let at = |key: &str| m.locate_value(key);
    let root = m.pipeline_source();
    let one = |d: Diagnostic| Err(vec![d]);
    // 0. Hub sources the cache cannot serve (never fetched here: `runner pull` does).
    let hub: Vec<Diagnostic> = m
        .hub
        .iter()
        .filter_map(|(key, h)| {
            let e = h.resolved.as_ref().err()?;
            let d = Diagnostic::error(format!("`{key}`: {e}"), at(key)).with_key(key.clone()).with_label("not in the Hugging Face cache");
            Some(if e.needs_pull() { d.with_note(format!("runner reads the Hub cache only while it validates, plans and runs: fetch the files with `runner pull {}`", m.path.display())) } else { d })
        })
        .collect();
    if !hub.is_empty() {
        return Err(hub);
    }
    // 1. The folder.
    if !root.is_dir() {
        let what = if root.exists() { "is not a folder" } else { "does not exist" };
        return one(Diagnostic::error(format!("pipeline folder `{}` {what}: the manifest cannot run", root.display()), at("pipeline.source"))
            .with_key("pipeline.source")
            .with_note("`runner validate --manifest-only` checks the manifest alone, before the models are downloaded"));
    }
    if !root.join("model_index.json").is_file() {
        return one(Diagnostic::error(format!("`{}` has no `model_index.json`: it is not a diffusers pipeline folder", root.display()), at("pipeline.source"))
            .with_key("pipeline.source")
            .with_note(m.pull_note(&root).unwrap_or_else(|| "download the whole pipeline (e.g. `huggingface-cli download REPO --local-dir DIR`), not just its weights".into())));
    }
    // 2. model_index.json, each component's weights and their headers.
    let p = match crate::checkpoint::open_for_manifest(m) {
        Ok(p) => p,
        Err(e) => {
            // An error in a component's own `source` points at that key.
            let key = m.manifest.components.iter().find_map(|(name, c)| {
                let key = format!("components.{name}.source");
                c.source.as_ref().map(|s| m.resolve_path(&key, s)).filter(|p| p == e.path()).map(|_| key)
            });
            let d = match key {
                Some(key) => Diagnostic::error(e.to_string(), at(&key)).with_key(&key),
                None => Diagnostic::error(e.to_string(), Location::Path(root.join("model_index.json"))),
            };
            return one(match m.pull_note(e.path()) {
                Some(note) => d.with_note(note),
                None => d,
            });
        }
    };
    let mut out = vec![];
    let index = Location::Path(p.index.path.clone());
    // 3. The kind against the folder.
    if let Err(msg) = check_kind(m, &p) {
        // The other checks would only list the consequences (classes of another kind).
        return one(Diagnostic::error(msg, at("pipeline.kind")).with_key("pipeline.kind"));
    }
    // 4. Classes runner implements.
    for c in &p.components {
        let Some(supported) = supported_classes(m.manifest.pipeline.kind, &c.name) else { continue };
        if c.name == "scheduler" && m.manifest.pipeline.scheduler.is_some() {
            continue; // the manifest's scheduler replaces the folder's class
        }
        let known_library = matches!(c.library.as_str(), "diffusers" | "transformers" | "stable_diffusion");
        if !known_library || !supported.contains(&c.class.as_str()) {
            out.push(Diagnostic::error(format!("`{}` is a `{}.{}`, which runner does not implement", c.name, c.library, c.class), index.clone()).with_note(format!(
                "supported for `{}`: {}",
                c.name,
                supported.iter().map(|s| format!("`{s}`")).collect::<Vec<_>>().join(", ")
            )));
        }
    }
    // Layerwise casting is diffusers' (`ModelMixin.enable_layerwise_casting`).
    for (name, c) in &m.manifest.components {
        let Some(class) = c.storage_dtype.and_then(|_| p.component(name)).map(|c| c.class.as_str()) else { continue };
        if !crate::arch::cast::CASTABLE_CLASSES.contains(&class) {
            let key = format!("components.{name}.storage_dtype");
            out.push(
                Diagnostic::error(format!("`{key}`: `{name}` is a `{class}`, which has no layerwise casting (diffusers' `enable_layerwise_casting` is for diffusers models)"), at(&key))
                    .with_key(&key)
                    .with_note(format!("layerwise casting applies to {}", crate::arch::cast::CASTABLE_CLASSES.iter().map(|s| format!("`{s}`")).collect::<Vec<_>>().join(", "))),
            );
        }
    }
    // GGUF components: nothing to cast (their Linear weights are quantized blocks).
    for c in &p.components {
        let Some(ck) = c.checkpoint.as_ref().filter(|ck| ck.gguf.is_some()) else { continue };
        let key = format!("components.{}.storage_dtype", c.name);
        if m.manifest.components.get(&c.name).and_then(|s| s.storage_dtype).is_some() {
            out.push(
                Diagnostic::error(format!("`{key}`: `{}` is a GGUF file: its weights are stored quantized already, there is nothing to store narrower", ck.weights.files.named().display()), at(&key))
                    .with_key(&key)
                    .with_note("remove `storage_dtype`; the quantized Linear weights are dequantized to the component's `dtype` as each layer runs"),
            );
        }
    }
    if !out.is_empty() {
        return Err(out);
    }
    // 5. Configs, strictly.
    let kind = m.manifest.pipeline.kind;
    let xl = kind == PipelineKind::StableDiffusionXl;
    let sd3 = kind == PipelineKind::StableDiffusion3;
    let flux = kind == PipelineKind::Flux;
    let path_of = |name: &str| p.component(name).map(config_path);
    let missing = |name: &str| Diagnostic::error(format!("the pipeline has no `{name}`"), index.clone());
    let diag = |e: &dyn std::fmt::Display, path: &Path| Diagnostic::error(e.to_string(), Location::Path(path.to_path_buf()));
    let read = |name: &str, out: &mut Vec<Diagnostic>| -> Option<PathBuf> {
        let p = path_of(name);
        if p.is_none() {
            out.push(missing(name));
        }
        p
    };
    let unet = if sd3 || flux { None } else { read("unet", &mut out).and_then(|path| UNet2DConditionConfig::from_file(&path).map_err(|e| out.push(diag(&e, &path))).ok()) };
    let vae = read("vae", &mut out).and_then(|path| AutoencoderKLConfig::from_file(&path).map_err(|e| out.push(diag(&e, &path))).ok());
    let te = read("text_encoder", &mut out).and_then(|path| ClipTextConfig::from_file(&path).map_err(|e| out.push(diag(&e, &path))).ok());
    let te2 = if xl || sd3 { read("text_encoder_2", &mut out).and_then(|path| ClipTextConfig::from_file(&path).map_err(|e| out.push(diag(&e, &path))).ok()) } else { None };
    let transformer = if sd3 {
        read("transformer", &mut out)
            .and_then(|path| crate::arch::config::read_json(&path, "SD3Transformer2DModel").and_then(|v| SD3Transformer2DConfig::from_json(&v, &path)).map_err(|e| out.push(diag(&e, &path))).ok())
    } else {
        None
    };
    let flux_transformer = if flux {
        read("transformer", &mut out)
            .and_then(|path| crate::arch::config::read_json(&path, "FluxTransformer2DModel").and_then(|v| FluxTransformer2DConfig::from_json(&v, &path)).map_err(|e| out.push(diag(&e, &path))).ok())
    } else {
        None
    };
    // The T5 encoder: SD3's optional `text_encoder_3`, FLUX's required `text_encoder_2`.
    let te3_disabled = m.manifest.components.get("text_encoder_3").and_then(|c| c.enabled) == Some(false);
    let t5_name = t5_component(kind);
    let t5 = match (t5_name.filter(|_| !(sd3 && te3_disabled)), t5_name.and_then(path_of)) {
        (None, _) => None,
        (Some(name), None) => {
            let d = missing(name);
            out.push(if sd3 {
                d.with_note("to run without T5 as diffusers does with `text_encoder_3=None` (zeros in its place), set `components.text_encoder_3.enabled = false`")
            } else {
                d.with_note(format!("a `{}` pipeline needs its T5 encoder (`T5EncoderModel`): download the whole pipeline folder", kind.as_str()))
            });
            None
        }
        (Some(_), Some(path)) => crate::arch::config::read_json(&path, "T5EncoderModel").and_then(|v| T5Config::from_json(&v, &path)).map_err(|e| out.push(diag(&e, &path))).ok(),
    };
    let safety = match path_of("safety_checker") {
        Some(path) if p.component("safety_checker").is_some_and(|c| c.checkpoint.is_some()) => SafetyCheckerConfig::from_file(&path).map_err(|e| out.push(diag(&e, &path))).ok(),
        _ => None,
    };
    // VAE tiling takes its tile from the config's `sample_size`.
    if let (Some(v), Some(true)) = (&vae, m.manifest.components.get("vae").and_then(|c| c.tiling)) {
        if let Some(path) = path_of("vae") {
            if let Err(e) = v.tile(&path) {
                out.push(
                    diag(&e, &path)
                        .with_key("components.vae.tiling")
                        .with_note("set `sample_size` in the VAE's config.json to the size it was trained at (diffusers tiles at that size), or turn tiling off"),
                );
            }
        }
    }
    let (Some(vae), Some(text_encoder)) = (vae, te) else { return Err(out) };
    if (!sd3 && !flux && unet.is_none())
        || (sd3 && transformer.is_none())
        || (flux && flux_transformer.is_none())
        || ((xl || sd3) && te2.is_none())
        || (sd3 && !te3_disabled && t5.is_none())
        || (flux && t5.is_none())
    {
        return Err(out);
    }
    let configs = Configs { unet, vae, text_encoder, text_encoder_2: te2, t5, transformer, flux_transformer, safety_checker: safety };
    let compatible = match kind {
        PipelineKind::StableDiffusion3 => check_compatible_sd3(&configs),
        PipelineKind::Flux => check_compatible_flux(&configs),
        _ => check_compatible(&configs, xl),
    };
    if let Err(msg) = compatible {
        out.push(Diagnostic::error(format!("the components of `{}` do not fit together: {msg}", p.root.display()), index.clone()));
    }
    out.extend(check_gguf_shapes(m, &p, &configs));
    out.extend(check_adapters(m, &p));
    if let (Some(_), Some(tokenizer)) = (&configs.t5, t5_tokenizer(kind)) {
        // The T5 tokenizer is read at load time: its folder is checked now.
        let dir = p.root.join(tokenizer);
        if !dir.join("tokenizer.json").is_file() {
            let have =
                if dir.join("spiece.model").is_file() { "`spiece.model` but no `tokenizer.json` (runner reads the fast tokenizer's file)" } else { "neither `tokenizer.json` nor `spiece.model`" };
            out.push(Diagnostic::error(format!("the T5 tokenizer folder `{}` has {have}", dir.display()), index.clone()));
        }
    }
    Ok((p, configs, out))
}

/// A GGUF transformer against the config.json it is built with (the pipeline folder's, as
/// diffusers' `config=`): the shapes the config decides, from the file's header, so that a file of
/// another model size or variant is an error before any weight is read.
fn check_gguf_shapes(m: &LoadedManifest, p: &PipelineFolder, configs: &Configs) -> Vec<Diagnostic> {
    let mut out = vec![];
    for c in &p.components {
        let Some(ck) = c.checkpoint.as_ref().filter(|ck| ck.gguf.is_some()) else { continue };
        let expected = match c.class.as_str() {
            "FluxTransformer2DModel" => configs.flux_transformer.as_ref().map(|f| f.key_shapes()),
            "SD3Transformer2DModel" => configs.transformer.as_ref().map(|t| t.key_shapes()),
            _ => None,
        };
        let file = ck.weights.files.named();
        let config = config_path(c);
        let key = format!("components.{}.source", c.name);
        let mut wrong = vec![];
        for (name, want) in expected.unwrap_or_default() {
            let have = ck.tensors.get(&name).map(|t| t.shape().to_vec());
            match (&have, &want) {
                (Some(h), Some(w)) if h != w => wrong.push(format!("`{name}` is {h:?}, the config makes it {w:?}")),
                (None, Some(w)) => wrong.push(format!("`{name}` ({w:?}) is missing")),
                (Some(h), None) => wrong.push(format!("`{name}` ({h:?}) is there, the config has no such tensor")),
                _ => {}
            }
        }
        if !wrong.is_empty() {
            out.push(
                Diagnostic::error(format!("`{}` does not fit `{}`: {}", file.display(), config.display(), wrong.join("; ")), m.locate_value(&key))
                    .with_key(&key)
                    .with_note("a GGUF file is built with the pipeline folder's transformer config: use the pipeline the file was quantized from (FLUX.1-dev vs schnell, SD3.5 large vs medium)"),
            );
        }
    }
    out
}

/// `[adapters.*]` against the pipeline, from the files' headers: each file a LoRA runner reads,
/// its scale finite and not negative, its components present, and every pair matching a module
/// of its component with fitting shapes (a LoRA made for another model is said so), its alphas
/// finite. Unmatched keys are an error unless `strict = false` (then a warning).
fn check_adapters(m: &LoadedManifest, p: &PipelineFolder) -> Vec<Diagnostic> {
    use crate::checkpoint::lora;
    let mut out = vec![];
    let comps: Vec<(&str, &str, &crate::checkpoint::layout::Checkpoint)> = p.components.iter().filter_map(|c| c.checkpoint.as_ref().map(|ck| (c.name.as_str(), c.class.as_str(), ck))).collect();
    for (name, a) in &m.manifest.adapters {
        let key = |k: &str| format!("adapters.{name}.{k}");
        let err = |k: &str, msg: String| Diagnostic::error(msg, m.locate_value(&key(k))).with_key(key(k));
        if let Some(s) = a.scale.filter(|s| !s.is_finite() || *s < 0.0) {
            out.push(err("scale", format!("`{}` is {s}: a scale is a finite number, 0 or more", key("scale"))));
        }
        if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-') {
            out.push(err("source", format!("adapter name `{name}`: use letters, digits, `_` and `-` (it names the adapter's weights in the model)")));
        }
        if let Some(only) = &a.components {
            for c in only {
                if !comps.iter().any(|(n, _, _)| n == c) {
                    out.push(err(
                        "components",
                        format!(
                            "`{}` names `{c}`, which the pipeline has no weights for (it has {})",
                            key("components"),
                            comps.iter().map(|(n, _, _)| format!("`{n}`")).collect::<Vec<_>>().join(", ")
                        ),
                    ));
                }
            }
        }
        let path = m.resolve_path(&key("source"), &a.source);
        let file = match lora::open(&path) {
            Ok(f) => f,
            Err(e) => {
                out.push(err("source", format!("adapter `{name}`: {e}")));
                continue;
            }
        };
        if matches!(file.format, lora::Format::KohyaFlux | lora::Format::Xlabs) {
            if let Some((_, class, _)) = comps.iter().find(|(n, c, _)| (*n == "unet" || *n == "transformer") && *c != "FluxTransformer2DModel") {
                out.push(err("source", format!("adapter `{name}` (`{}`) is a FLUX LoRA ({} layout), but this pipeline's denoiser is a `{class}`", path.display(), file.format.as_str())));
                continue;
            }
        }
        if let Some((first, why)) = file.dropped.first() {
            out.push(
                Diagnostic::warning(
                    format!("adapter `{name}`: {} pair{} left out (`{first}`...): {why}", file.dropped.len(), if file.dropped.len() == 1 { "" } else { "s" }),
                    m.locate_value(&key("source")),
                )
                .with_key(key("source")),
            );
        }
        let r = lora::resolve(&file, &comps, a.components.as_deref());
        let targets: std::collections::BTreeSet<&str> = r.resolved.iter().map(|x| x.component.as_str()).collect();
        for t in targets {
            let gguf = p.component(t).and_then(|c| c.checkpoint.as_ref()).is_some_and(|ck| ck.gguf.is_some());
            let storage = m.manifest.components.get(t).and_then(|c| c.storage_dtype).is_some();
            if (gguf || storage) && a.fuse != Some(false) {
                out.push(err("source", format!(
                    "adapter `{name}` changes `{t}`, whose weights are {}: a LoRA cannot be merged into them (diffusers cannot fuse there either); set `fuse = false` on the adapter to run it beside the layers",
                    if gguf { "GGUF-quantized" } else { "stored narrower (`storage_dtype`)" }
                )));
            }
        }
        if !r.misfit.is_empty() {
            let list: Vec<String> = r.misfit.iter().take(3).map(|(k, why)| format!("`{k}`: {why}")).collect();
            out.push(err(
                "source",
                format!(
                    "adapter `{name}` (`{}`) does not fit this pipeline's weights ({} of {} pairs: {}{}): it was made for another model or model size",
                    path.display(),
                    r.misfit.len(),
                    file.pairs.len(),
                    list.join("; "),
                    if r.misfit.len() > 3 { "; ..." } else { "" }
                ),
            ));
        }
        if !r.unmatched.is_empty() {
            let list: Vec<&str> = r.unmatched.iter().take(5).map(String::as_str).collect();
            let all = r.resolved.is_empty() && r.misfit.is_empty();
            let msg = format!(
                "adapter `{name}` (`{}`): {} of {} pairs match no module of the pipeline: {}{}{}",
                path.display(),
                r.unmatched.len(),
                file.pairs.len(),
                list.join(", "),
                if r.unmatched.len() > 5 { ", ..." } else { "" },
                if all { " (none matches: a LoRA for another architecture?)" } else { "" }
            );
            if a.strict == Some(false) && !all {
                out.push(Diagnostic::warning(format!("{msg}; left out (`strict = false`)"), m.locate_value(&key("source"))).with_key(key("source")));
            } else {
                out.push(err("source", msg).with_note("a silently ignored adapter is a wasted run: set `strict = false` on the adapter to leave unmatched keys out"));
            }
        }
        for p in &file.pairs {
            if let Some(alpha) = &p.alpha {
                if let Err(e) = lora::read_alpha(&file, alpha) {
                    out.push(err("source", format!("adapter `{name}`: {e}")));
                    break;
                }
            }
        }
    }
    out
}

fn r_adapter_scales(m: &LoadedManifest) -> Vec<(String, f64)> {
    m.manifest.run.adapter_scales.iter().flatten().map(|(k, v)| (k.clone(), *v)).collect()
}

/// What [`check`]'s configs make of keys that are valid but have no effect here: warnings, never
/// errors. FLUX.1-schnell (`guidance_embeds = false`) has no guidance embedding: a
/// `run.guidance_scale` is ignored.
fn warnings(m: &LoadedManifest, configs: &Configs, has_image: bool, own_size: bool) -> Vec<Diagnostic> {
    let mut out = vec![];
    let r = &m.manifest.run;
    // SD and SDXL image-to-image take the input's own size (diffusers' pipelines have no
    // `height`/`width`).
    for key in ["width", "height"].into_iter().filter(|_| own_size) {
        let set = if key == "width" { r.width } else { r.height };
        if set.is_some() {
            let k = format!("run.{key}");
            out.push(
                Diagnostic::warning(format!("`{k}` is ignored: image-to-image on this kind takes the input image's size, floored to a multiple of {}", configs.vae_scale_factor()), m.locate_value(&k))
                    .with_key(&k)
                    .with_label("ignored"),
            );
        }
    }
    if r.strength.is_some() && !has_image && r.mask_image.is_none() {
        out.push(
            Diagnostic::warning("`run.strength` without `run.image` is ignored: it applies to image-to-image and inpainting".to_string(), m.locate_value("run.strength"))
                .with_key("run.strength")
                .with_label("ignored"),
        );
    }
    if let (Some(t), Some(g)) = (&configs.flux_transformer, r.guidance_scale) {
        if !t.guidance_embeds {
            out.push(
                Diagnostic::warning(
                    format!("`run.guidance_scale` is {g}, but this FLUX transformer has no guidance embedding (`guidance_embeds = false`, as FLUX.1-schnell): it is ignored"),
                    m.locate_value("run.guidance_scale"),
                )
                .with_key("run.guidance_scale")
                .with_label("ignored")
                .with_note("for classifier-free guidance with a negative prompt, set `run.true_cfg_scale` above 1 and `run.negative_prompt`"),
            );
        }
    }
    out
}

/// The T5 encoder's component in a `kind` pipeline: SD3's `text_encoder_3`, FLUX's
/// `text_encoder_2`.
pub fn t5_component(kind: PipelineKind) -> Option<&'static str> {
    match kind {
        PipelineKind::StableDiffusion3 => Some("text_encoder_3"),
        PipelineKind::Flux => Some("text_encoder_2"),
        PipelineKind::StableDiffusion | PipelineKind::StableDiffusionXl => None,
    }
}

/// The T5 tokenizer's folder in a `kind` pipeline: SD3's `tokenizer_3`, FLUX's `tokenizer_2`.
pub fn t5_tokenizer(kind: PipelineKind) -> Option<&'static str> {
    match kind {
        PipelineKind::StableDiffusion3 => Some("tokenizer_3"),
        PipelineKind::Flux => Some("tokenizer_2"),
        PipelineKind::StableDiffusion | PipelineKind::StableDiffusionXl => None,
    }
}

/// FLUX's components must agree: CLIP's width is the transformer's `pooled_projection_dim`
/// (FLUX takes CLIP's pooled output only), T5's `d_model` its `joint_attention_dim`, and 2x2
/// patches of the VAE's latents its input channels.
fn check_compatible_flux(c: &Configs) -> Result<(), String> {
    let tr = c.flux_transformer.as_ref().expect("read for FLUX");
    if c.text_encoder.hidden_size != tr.pooled_projection_dim {
        return Err(format!("text_encoder's hidden_size is {} but the transformer's pooled_projection_dim is {}", c.text_encoder.hidden_size, tr.pooled_projection_dim));
    }
    if let Some(t5) = &c.t5 {
        if t5.d_model != tr.joint_attention_dim {
            return Err(format!("text_encoder_2's d_model is {} but the transformer's joint_attention_dim is {}", t5.d_model, tr.joint_attention_dim));
        }
    }
    if c.vae.latent_channels * 4 != tr.in_channels {
        return Err(format!("the VAE has {} latent channels, so 2x2 packed patches have {}, but the transformer takes {}", c.vae.latent_channels, c.vae.latent_channels * 4, tr.in_channels));
    }
    Ok(())
}

/// SD3's components must agree: the CLIPs' hidden sizes fit within T5's width (they are
/// zero-padded to it) and T5's width is the transformer's `joint_attention_dim`; the CLIPs'
/// projections add up to `pooled_projection_dim`; the VAE's latent channels are the
/// transformer's input channels.
fn check_compatible_sd3(c: &Configs) -> Result<(), String> {
    let tr = c.transformer.as_ref().expect("read for SD3");
    let te2 = c.text_encoder_2.as_ref().expect("read for SD3");
    let clip = c.text_encoder.hidden_size + te2.hidden_size;
    if clip > tr.joint_attention_dim {
        return Err(format!("the CLIP text encoders' hidden sizes add up to {clip}, more than the transformer's joint_attention_dim {}", tr.joint_attention_dim));
    }
    if let Some(t5) = &c.t5 {
        if t5.d_model != tr.joint_attention_dim {
            return Err(format!("text_encoder_3's d_model is {} but the transformer's joint_attention_dim is {}", t5.d_model, tr.joint_attention_dim));
        }
    }
    let pooled = c.text_encoder.projection_dim + te2.projection_dim;
    if pooled != tr.pooled_projection_dim {
        return Err(format!("the text encoders' projection_dims add up to {pooled} but the transformer's pooled_projection_dim is {}", tr.pooled_projection_dim));
    }
    if c.vae.latent_channels != tr.in_channels {
        return Err(format!("the VAE has {} latent channels but the transformer takes {}", c.vae.latent_channels, tr.in_channels));
    }
    Ok(())
}

/// `run.latents`: a safetensors file holding `latents` (or one tensor) of the job's shape.
fn check_latents(path: &Path, want: &[u64; 4]) -> Result<(), String> {
    if path.is_dir() {
        return Err(format!("`run.latents` `{}` is a folder, not a .safetensors file", path.display()));
    }
    let header = crate::checkpoint::safetensors::read_header(path).map_err(|e| format!("`run.latents`: {e}"))?;
    let t = match header.get("latents") {
        Some(t) => t,
        None if header.tensors.len() == 1 => &header.tensors[0],
        None => return Err(format!("`{}` holds {} tensors: name the latents `latents`", path.display(), header.tensors.len())),
    };
    if t.shape != want {
        return Err(format!("`{}`: tensor `{}` has shape {:?}, the job needs {want:?} ([batch, channels, height/8, width/8])", path.display(), t.name, t.shape));
    }
    Ok(())
}

/// The kind the manifest names must be the pipeline folder's.
fn check_kind(m: &LoadedManifest, p: &PipelineFolder) -> Result<(), String> {
    let class = p.index.class_name.clone().unwrap_or_default();
    let has = |n: &str| p.index.components.get(n).is_some_and(|e| e.is_some());
    // A FLUX folder: a `Flux*Pipeline`, or a transformer whose class (in model_index.json or its
    // own config.json) is FLUX's.
    let flux_transformer_class = |c: &str| c == "FluxTransformer2DModel";
    let transformer_config_class = || {
        p.component("transformer")
            .map(config_path)
            .and_then(|path| std::fs::read_to_string(path).ok())
            .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
            .and_then(|v| v.get("_class_name").and_then(|c| c.as_str()).map(str::to_string))
    };
    let flux_folder = class.contains("Flux")
        || p.index.components.get("transformer").and_then(|e| e.as_ref()).is_some_and(|e| flux_transformer_class(&e.1))
        || transformer_config_class().is_some_and(|c| flux_transformer_class(&c));
    let kind = m.manifest.pipeline.kind;
    if flux_folder != (kind == PipelineKind::Flux) {
        return Err(if flux_folder {
            format!("`pipeline.kind` is `{}` but `{}` holds a `{class}` (FLUX.1: a `FluxTransformer2DModel` with CLIP-L and T5): set `kind = \"flux\"`", kind.as_str(), p.root.display())
        } else {
            let guess = if class.contains("StableDiffusion3") || has("transformer") {
                "stable-diffusion-3"
            } else if class.contains("XL") || has("text_encoder_2") {
                "stable-diffusion-xl"
            } else {
                "stable-diffusion"
            };
            format!("`pipeline.kind` is `flux` but `{}` holds a `{class}`, not a FLUX pipeline (no `FluxTransformer2DModel`): set `kind = \"{guess}\"`", p.root.display())
        });
    }
    let sd3_folder = class.contains("StableDiffusion3") || has("transformer");
    if sd3_folder && kind != PipelineKind::StableDiffusion3 && kind != PipelineKind::Flux {
        return Err(format!(
            "`pipeline.kind` is `{}` but `{}` holds a `{class}` (a transformer, not a UNet): set `kind = \"stable-diffusion-3\"`",
            m.manifest.pipeline.kind.as_str(),
            p.root.display()
        ));
    }
    match m.manifest.pipeline.kind {
        PipelineKind::StableDiffusion3 => {
            if !sd3_folder {
                let guess = if class.contains("XL") || has("text_encoder_2") { "stable-diffusion-xl" } else { "stable-diffusion" };
                return Err(format!("`pipeline.kind` is `stable-diffusion-3` but `{}` holds a `{class}` without a `transformer`: set `kind = \"{guess}\"`", p.root.display()));
            }
        }
        PipelineKind::StableDiffusionXl => {
            if class.contains("XL") && !has("text_encoder") && has("text_encoder_2") {
                return Err(format!("`{}` is an SDXL refiner (no `text_encoder`): refiner pipelines (image-to-image with aesthetic-score conditioning) are not supported yet", p.root.display()));
            }
            if !class.contains("XL") || !has("text_encoder_2") || !has("tokenizer_2") {
                return Err(format!(
                    "`pipeline.kind` is `stable-diffusion-xl` but `{}` holds a `{class}` without{}{}: is it an SD 1.x/2.x folder? (set `kind = \"stable-diffusion\"`)",
                    p.root.display(),
                    if has("text_encoder_2") { "" } else { " `text_encoder_2`" },
                    if has("tokenizer_2") { "" } else { " `tokenizer_2`" }
                ));
            }
        }
        PipelineKind::StableDiffusion => {
            if class.contains("XL") || has("text_encoder_2") {
                return Err(format!("`pipeline.kind` is `stable-diffusion` but `{}` holds a `{class}` with two text encoders: set `kind = \"stable-diffusion-xl\"`", p.root.display()));
            }
        }
        PipelineKind::Flux => {}
    }
    Ok(())
}

/// The components' configs must agree: text hidden sizes (concatenated for SDXL) equal the UNet's
/// `cross_attention_dim`, SDXL's pooled projection fits `projection_class_embeddings_input_dim`,
/// and the VAE's latent channels are the UNet's input channels.
fn check_compatible(c: &Configs, xl: bool) -> Result<(), String> {
    let unet = c.unet();
    let hidden = c.text_encoder.hidden_size + if xl { c.text_encoder_2.as_ref().map_or(0, |t| t.hidden_size) } else { 0 };
    if hidden != unet.cross_attention_dim {
        return Err(format!(
            "the text encoder{} hidden size{} {hidden} but the UNet's cross_attention_dim is {}",
            if xl { "s'" } else { "'s" },
            if xl { "s add up to" } else { " is" },
            unet.cross_attention_dim
        ));
    }
    if let (true, Some((time_dim, input))) = (xl, unet.addition_text_time) {
        let pooled = c.text_encoder_2.as_ref().map_or(0, |t| t.projection_dim);
        if pooled + 6 * time_dim != input {
            return Err(format!("text_encoder_2's projection_dim {pooled} + 6 x addition_time_embed_dim {time_dim} != the UNet's projection_class_embeddings_input_dim {input}"));
        }
    }
    if xl && unet.addition_text_time.is_none() {
        return Err("an SDXL pipeline needs a UNet with `addition_embed_type = \"text_time\"`".into());
    }
    // An inpainting UNet takes the latents, the mask and the masked image's latents.
    if c.vae.latent_channels != unet.in_channels && 2 * c.vae.latent_channels + 1 != unet.in_channels {
        return Err(format!(
            "the VAE has {} latent channels but the UNet takes {} (neither those nor an inpainting UNet's {})",
            c.vae.latent_channels,
            unet.in_channels,
            2 * c.vae.latent_channels + 1
        ));
    }
    Ok(())
}

#[cfg(test)]
mod init_tests {
    use super::InitSpec;
    use crate::manifest::PipelineKind as K;

    /// diffusers' `get_timesteps`: SD/SDXL run `int(n × s)` steps; SD3/FLUX skip `int(n − n × s)`.
    #[test]
    fn steps_left_round_as_each_pipeline_rounds() {
        let at = |s: f64| InitSpec { image: (64, 64), mask: None, strength: s };
        assert_eq!(at(0.6).steps_left(K::StableDiffusion, 28), 16);
        assert_eq!(at(0.6).steps_left(K::Flux, 28), 17);
        assert_eq!(at(0.6).steps_left(K::StableDiffusion3, 28), 17);
        assert_eq!(at(0.1).steps_left(K::StableDiffusion, 4), 0);
        assert_eq!(at(0.1).steps_left(K::Flux, 4), 1);
        assert_eq!(at(1.0).steps_left(K::StableDiffusionXl, 4), 4);
        assert_eq!(at(0.9999).steps_left(K::StableDiffusionXl, 50), 49);
        assert_eq!(InitSpec::default_strength(K::StableDiffusionXl, true), 0.9999);
        assert_eq!(InitSpec::default_strength(K::StableDiffusion, false), 0.8);
    }
}

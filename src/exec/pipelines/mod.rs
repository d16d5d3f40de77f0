//! One file per pipeline kind, each reading like its diffusers `__call__` (encode the prompt,
//! prepare the latents, the denoising loop, decode). What every kind shares lives here and in the
//! session: where components run ([`Call::dev`]), offload hooks and the ledger ([`Call::enter`]),
//! the scheduler from the folder, the seeded initial noise, the instrumented loop (timings,
//! progress, dumps), the decode with the safety checker. A new kind is a new file here plus its
//! models, and one arm in [`load`].

mod flux;
mod stable_diffusion;
mod stable_diffusion_3;
mod stable_diffusion_img2img;
mod stable_diffusion_inpaint;
mod stable_diffusion_xl;
mod stable_diffusion_xl_inpaint;

use std::time::Instant;

use tch::nn::VarStore;
use tch::{Kind, Tensor};

use super::loading::{plan_device, Loader};
use super::offload::Residency;
use super::{kind_of, tch_device, text, ExecError};
use crate::checkpoint::layout::PipelineFolder;
use crate::checkpoint::load::Mapped;
use crate::manifest::{LoadedManifest, PipelineKind};
use crate::models::vae::AutoencoderKLDecoder;
use crate::plan::Plan;
use crate::preflight::RunSpec;
use crate::schedulers::Scheduler;

/// [`Call::flow_image_latents`]: the noised image latents, the begin index, and for inpainting's
/// blend the image latents, the noise and the mask (repeated over the latent channels).
pub(crate) struct FlowImage {
    pub latents: Tensor,
    pub t_start: usize,
    pub image_latents: Tensor,
    pub noise: Tensor,
    pub mask: Option<Tensor>,
}

/// A loaded pipeline of one kind: its models and its `__call__`.
pub(crate) trait Pipeline {
    /// The components it holds weights of, by manifest name: their variables and the mapped files
    /// their same-dtype CPU parameters view (for the ledger, offload, pinning and re-plans).
    fn components(&self) -> Vec<(&'static str, &VarStore, &Mapped)>;

    /// diffusers' `__call__`, from the manifest's `[run]` to images.
    fn call(&self, cx: &mut Call<'_>) -> Result<Generated, ExecError>;
}

/// Loads the pipeline of `kind` (its components concurrently, see [`Loader`]).
pub(crate) fn load(kind: PipelineKind, lx: &Loader) -> Result<Box<dyn Pipeline>, ExecError> {
    Ok(match kind {
        PipelineKind::StableDiffusion => Box::new(stable_diffusion::StableDiffusion::load(lx)?),
        PipelineKind::StableDiffusionXl => Box::new(stable_diffusion_xl::StableDiffusionXl::load(lx)?),
        PipelineKind::StableDiffusion3 => Box::new(stable_diffusion_3::StableDiffusion3::load(lx)?),
        PipelineKind::Flux => Box::new(flux::Flux::load(lx)?),
    })
}

/// What a `__call__` produced.
pub(crate) struct Generated {
    /// [B, 3, H, W] in [0, 1], f32 on the CPU.
    pub images: Tensor,
    /// The latents the VAE decoded (before its scale), for `--dump`.
    pub latents: Tensor,
    pub steps: usize,
    pub guidance_scale: f64,
    /// Calls of the denoising model (one per timestep).
    pub model_calls: usize,
    pub step_times: Vec<f64>,
    pub encode_s: f64,
    pub denoise_s: f64,
    pub decode_s: f64,
    pub scheduler: String,
    /// The sigmas follow Karras' schedule (for the A1111 sampler name).
    pub karras: bool,
    /// Second- and third-encoder prompts (and T5's token count), for the PNG metadata of kinds
    /// that have them.
    pub prompt_2: Option<String>,
    pub negative_prompt_2: Option<String>,
    pub prompt_3: Option<String>,
    pub negative_prompt_3: Option<String>,
    pub max_sequence_length: Option<usize>,
    /// FLUX's true classifier-free guidance scale, when it ran (two passes per step).
    pub true_cfg_scale: Option<f64>,
}

/// A device and dtype a component runs at.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Dev {
    pub device: tch::Device,
    pub kind: Kind,
}

/// `--dump`'s tensors, in the order they were made (names are a contract: tests/fixtures/refs).
pub(crate) struct Dump(Option<Vec<(String, Tensor)>>);

impl Dump {
    pub fn new(on: bool) -> Dump {
        Dump(on.then(Vec::new))
    }

    pub fn on(&self) -> bool {
        self.0.is_some()
    }

    pub fn push(&mut self, name: impl Into<String>, t: &Tensor) {
        if let Some(d) = &mut self.0 {
            d.push((name.into(), t.shallow_clone()));
        }
    }

    pub fn into_tensors(self) -> Vec<(String, Tensor)> {
        self.0.unwrap_or_default()
    }
}

/// One denoising step's tensors, for the loop's dumps.
pub(crate) struct Step {
    /// The model's input (the whole guidance batch) and timestep, as the model saw them.
    pub input: Tensor,
    pub timestep: Tensor,
    /// What the model returned (the whole guidance batch).
    pub output: Tensor,
    /// After guidance.
    pub noise_pred: Tensor,
    /// After the scheduler's step.
    pub latents: Tensor,
}

/// One run of a pipeline: the job, the plan, and the shared machinery its `__call__` uses.
pub(crate) struct Call<'a> {
    pub m: &'a LoadedManifest,
    pub pipeline: &'a PipelineFolder,
    pub plan: &'a Plan,
    /// The job: shape, steps, guidance (preflight's [`RunSpec`]).
    pub run: &'a RunSpec,
    pub seed: u64,
    pub simulate: bool,
    pub progress: bool,
    pub watch: Option<super::Watch>,
    /// Latents given as data: they replace `run.latents` and the draw.
    pub latents: Option<std::sync::Arc<super::latents::LatentsData>>,
    pub res: Residency<'a>,
    /// Image-to-image / inpainting: the input image (and mask), decoded.
    pub init: Option<std::sync::Arc<super::InitImages>>,
    /// Seconds spent in [`Call::encode_image`].
    pub image_encode_s: std::cell::Cell<f64>,
    pub dump: Dump,
    pub warnings: Vec<String>,
}

impl Call<'_> {
    /// Where component `name` runs (a split one: where it starts) and its dtype.
    pub fn dev(&self, name: &str) -> Dev {
        let dtype = self.m.manifest.components.get(name).and_then(|c| c.dtype).unwrap_or(self.m.manifest.pipeline.dtype);
        Dev { device: if self.simulate { tch::Device::Cpu } else { tch_device(plan_device(self.plan, name)) }, kind: kind_of(dtype) }
    }

    /// Component `name` is about to run: offloaded weights come to its device (diffusers' hooks).
    pub fn enter(&mut self, name: &str) -> Result<(), ExecError> {
        self.res.enter(name)
    }

    /// The scheduler of the folder's `scheduler/scheduler_config.json` (or the manifest's
    /// choice) set to `steps`, and that config.
    pub fn scheduler(&self, steps: usize) -> Result<(Box<dyn Scheduler>, serde_json::Value), ExecError> {
        self.scheduler_for(steps, None)
    }

    /// [`Self::scheduler`] for a flow-matching pipeline: with `use_dynamic_shifting`, `mu` from
    /// the image's sequence length in patches (diffusers' `calculate_shift` on the config's
    /// base/max shift and sequence lengths).
    pub fn flow_match_scheduler(&self, steps: usize, image_seq_len: usize) -> Result<(Box<dyn Scheduler>, serde_json::Value), ExecError> {
        self.scheduler_for(steps, Some(image_seq_len))
    }

    /// [`Self::flow_match_scheduler`] with the pipeline's own sigmas (FluxPipeline:
    /// `set_timesteps(sigmas=linspace(1, 1/N, N), mu=mu)`).
    pub fn flow_match_scheduler_sigmas(&self, sigmas: &[f64], image_seq_len: usize) -> Result<(Box<dyn Scheduler>, serde_json::Value), ExecError> {
        let (cfg, mu, err) = self.scheduler_config(Some(image_seq_len))?;
        let scheduler = crate::schedulers::build_with_sigmas(&cfg, self.m.manifest.pipeline.scheduler, sigmas, mu).map_err(err)?;
        Ok((scheduler, cfg))
    }

    fn scheduler_for(&self, steps: usize, image_seq_len: Option<usize>) -> Result<(Box<dyn Scheduler>, serde_json::Value), ExecError> {
        let (cfg, mu, err) = self.scheduler_config(image_seq_len)?;
        let scheduler = crate::schedulers::build_with_mu(&cfg, self.m.manifest.pipeline.scheduler, steps, mu).map_err(err)?;
        Ok((scheduler, cfg))
    }

    /// The folder's scheduler config, `mu` for `image_seq_len` tokens, and how its errors read.
    #[allow(clippy::type_complexity)]
    fn scheduler_config(&self, image_seq_len: Option<usize>) -> Result<(serde_json::Value, Option<f64>, impl Fn(crate::schedulers::SchedulerError) -> ExecError), ExecError> {
        let path = self.pipeline.root.join("scheduler").join("scheduler_config.json");
        let text = std::fs::read_to_string(&path).map_err(|source| ExecError::Io { what: "cannot read", path: path.clone(), source })?;
        let err = move |e: crate::schedulers::SchedulerError| ExecError::Scheduler(format!("`{}`: {e}", path.display()));
        let cfg = crate::schedulers::parse_config(&text).map_err(&err)?;
        let mu = match image_seq_len {
            Some(n) => crate::schedulers::dynamic_shift_mu(&cfg, n).map_err(&err)?,
            None => None,
        };
        Ok((cfg, mu, err))
    }

    /// diffusers `prepare_latents`: `run.latents`, else randn of `shape` on a CPU generator seeded
    /// with the seed, drawn at `draw_kind` (the prompt embeddings' dtype), then on `to`'s device
    /// and dtype times the scheduler's `init_noise_sigma`. Dumps the noise and the schedule.
    pub fn prepare_latents(&mut self, shape: [i64; 4], draw_kind: Kind, scheduler: &dyn Scheduler, to: Dev) -> Result<Tensor, ExecError> {
        let init = self.initial_noise(shape, draw_kind)?;
        self.dump.push("latents.init", &init);
        if self.dump.on() {
            self.dump.push("latents.init_scaled", &(&init * scheduler.init_noise_sigma()));
        }
        self.dump_schedule(scheduler);
        Ok((init.to_device(to.device) * scheduler.init_noise_sigma()).to_kind(to.kind))
    }

    /// `run.latents`, else the seeded draw of [`Self::prepare_latents`], on the CPU at `draw_kind`.
    pub fn initial_noise(&mut self, shape: [i64; 4], draw_kind: Kind) -> Result<Tensor, ExecError> {
        if let Some(l) = &self.latents {
            if l.shape() != shape {
                return Err(ExecError::Text(format!("the request's `latents` have shape {:?}, the job needs {shape:?} ([batch, channels, height/8, width/8])", l.shape())));
            }
            return Ok(l.tensor());
        }
        match &self.m.manifest.run.latents {
            Some(p) => text::load_latents(&self.m.resolve_path("run.latents", p), &shape),
            None => {
                // libtorch's `manual_seed` takes a uint64_t; tch's signature is i64 and passes the
                // bits through, so seeds from 2^63 seed the generator as
                // `torch.Generator.manual_seed` does with a Python int that large (stored as uint64).
                tch::manual_seed(self.seed as i64);
                Ok(Tensor::randn(shape, (draw_kind, tch::Device::Cpu)))
            }
        }
    }

    /// diffusers `retrieve_latents(vae.encode(pixels), generator) * scaling_factor` (SD3 and FLUX:
    /// `(x - shift_factor) * scaling_factor`): the
    /// posterior's sample `mean + exp(logvar / 2) × randn`, the noise drawn from libtorch's global
    /// CPU generator (seeded by the caller, so that the draws keep diffusers' order) at the
    /// encoder's dtype; returned on `to`'s device at `kind`.
    pub fn encode_image(&self, encoder: &crate::exec::loading::Held<crate::models::vae::AutoencoderKLEncoder>, vae_kind: Kind, pixels: &Tensor, to: tch::Device, kind: Kind) -> Tensor {
        let device = encoder.vs.device();
        let started = Instant::now();
        let out = tch::no_grad(|| {
            let (mean, logvar) = encoder.model.encode(&pixels.to_device(device).to_kind(vae_kind));
            let sample = Tensor::randn(mean.size(), (mean.kind(), tch::Device::Cpu)).to_device(device);
            let posterior = &mean + (&logvar * 0.5).exp() * &sample;
            // SD3 and FLUX: `(x - shift_factor) * scaling_factor`.
            let shifted = match encoder.model.config.shift_factor {
                Some(shift) => posterior - shift,
                None => posterior,
            };
            (shifted * encoder.model.config.scaling_factor).to_device(to).to_kind(kind)
        });
        sync(device);
        self.image_encode_s.set(self.image_encode_s.get() + started.elapsed().as_secs_f64());
        out
    }

    /// SD3's and FLUX's image-to-image latents (`StableDiffusion3Img2ImgPipeline`,
    /// `FluxImg2ImgPipeline`: `get_timesteps` + `prepare_latents`): the input image resized to the
    /// requested size, encoded (`(x - shift) × scale`), and noised with the flow-matching
    /// `scale_noise` at the sigma where `strength` begins the schedule (`int(steps − steps ×
    /// strength)` steps skipped); unpacked `shape` latents on the CPU, and the begin index.
    pub fn flow_image_latents(
        &mut self,
        encoder: Option<&crate::exec::loading::Held<crate::models::vae::AutoencoderKLEncoder>>,
        vae_kind: Kind,
        scheduler: &mut dyn Scheduler,
        shape: [i64; 4],
        draw_kind: Kind,
    ) -> Result<FlowImage, ExecError> {
        let (Some(init), Some(spec)) = (self.init.clone(), self.run.init) else {
            return Err(ExecError::Text("an image-to-image job without its image's size and strength".into()));
        };
        let encoder = encoder.ok_or_else(|| ExecError::Text("image-to-image needs the VAE encoder, loaded when runs may give an image".into()))?;
        let n = scheduler.timesteps().len() as f64;
        let t_start = (n - (n * spec.strength).min(n)).max(0.0) as usize;
        scheduler.set_begin_index(t_start);
        let (w, h) = (self.run.shape.width as i64, self.run.shape.height as i64);
        let image = Tensor::from_slice(&runner_core::image::to_normalized_chw(&init.image.resize_lanczos(w as u32, h as u32))).view([1, 3, h, w]);
        self.dump.push("image.input", &image);
        self.enter("vae")?;
        tch::manual_seed(self.seed as i64);
        let image_latents = self.encode_image(encoder, vae_kind, &image, tch::Device::Cpu, draw_kind);
        let image_latents = Tensor::cat(&(0..shape[0]).map(|_| image_latents.shallow_clone()).collect::<Vec<_>>(), 0);
        let noise = Tensor::randn(shape, (draw_kind, tch::Device::Cpu));
        self.dump.push("latents.image", &image_latents);
        self.dump.push("latents.noise", &noise);
        let latents = tch::no_grad(|| scheduler.add_noise(&image_latents, &noise, t_start));
        // Inpainting: the mask (white repaints) at the latents' size, 1 where they are denoised.
        let mask = init.mask.as_ref().map(|(m, _)| {
            let pixels = Tensor::from_slice(&runner_core::image::to_binary_mask(&m.to_gray().resize_lanczos(w as u32, h as u32))).view([1, 1, h, w]);
            self.dump.push("mask.input", &pixels);
            pixels.upsample_nearest2d([shape[2], shape[3]], None, None).to_kind(draw_kind).repeat([shape[0], shape[1], 1, 1])
        });
        Ok(FlowImage { latents, t_start, image_latents, noise, mask })
    }

    /// The begin index of `get_timesteps` for SD and SDXL (`int(steps × strength)` steps run) and
    /// the timesteps from it, the scheduler set to begin there.
    pub fn img2img_timesteps(&mut self, scheduler: &mut dyn Scheduler, steps: usize, strength: f64) -> (usize, Vec<f64>) {
        let t_start = steps - ((steps as f64 * strength) as usize).min(steps);
        scheduler.set_begin_index(t_start);
        let timesteps = scheduler.timesteps()[t_start..].to_vec();
        self.dump_schedule(scheduler);
        (t_start, timesteps)
    }

    /// Dumps `scheduler.timesteps` and `scheduler.sigmas`.
    pub fn dump_schedule(&mut self, scheduler: &dyn Scheduler) {
        if self.dump.on() {
            self.dump.push("scheduler.timesteps", &Tensor::from_slice(scheduler.timesteps()).to_kind(Kind::Float));
            if let Some(s) = scheduler.sigmas() {
                self.dump.push("scheduler.sigmas", &Tensor::from_slice(s).to_kind(Kind::Float));
            }
            if !scheduler.alphas_cumprod().is_empty() {
                self.dump.push("scheduler.alphas_cumprod", &Tensor::from_slice(scheduler.alphas_cumprod()).to_kind(Kind::Float));
            }
        }
    }

    /// The denoising loop around `step` (one call per timestep): a progress bar, a log line per
    /// step, per-step timings (synchronised on CUDA), and the dumps `step{i}.{model}_input`,
    /// `step{i}.timestep`, `step{i}.{model}_output`,
    /// `step{i}.noise_pred`, `step{i}.latents`. Returns the final latents, each step's seconds and
    /// the loop's.
    pub fn denoise(
        &mut self,
        model: &str,
        timesteps: &[f64],
        mut latents: Tensor,
        on: tch::Device,
        mut step: impl FnMut(&Tensor, usize, f64) -> Result<Step, ExecError>,
    ) -> Result<(Tensor, Vec<f64>, f64), ExecError> {
        let t_den = Instant::now();
        let mut step_times = vec![];
        let bar = super::progress(timesteps.len() as u64, "denoising", self.progress);
        let n = timesteps.len();
        for (i, &t) in timesteps.iter().enumerate() {
            if let Some(reason) = self.watch.as_ref().and_then(|w| w.0.cancelled(i, n)) {
                bar.finish_and_clear();
                tracing::info!("cancelled before step {}/{n}: {reason}", i + 1);
                return Err(ExecError::Cancelled { done: i, steps: n, reason });
            }
            let t_step = Instant::now();
            let s = step(&latents, i, t)?;
            sync(on);
            step_times.push(t_step.elapsed().as_secs_f64());
            if let Some(w) = &self.watch {
                w.0.stepped(i, n, step_times[i]);
            }
            // One line per step for logs without a terminal (RUST_LOG=runner=info).
            let rate = step_times.iter().sum::<f64>() / step_times.len() as f64;
            tracing::info!("step {}/{} (timestep {t}): {:.3} s, {}", i + 1, timesteps.len(), step_times[i], super::human_rate(rate));
            bar.set_message(super::human_rate(rate));
            self.dump.push(format!("step{i}.{model}_input"), &s.input);
            self.dump.push(format!("step{i}.timestep"), &s.timestep);
            self.dump.push(format!("step{i}.{model}_output"), &s.output);
            self.dump.push(format!("step{i}.noise_pred"), &s.noise_pred);
            self.dump.push(format!("step{i}.latents"), &s.latents);
            latents = s.latents;
            bar.inc(1);
        }
        bar.finish_and_clear();
        // The decode is one more long call: a job cancelled during the last step stops here.
        if let Some(reason) = self.watch.as_ref().and_then(|w| w.0.cancelled(n, n)) {
            return Err(ExecError::Cancelled { done: n, steps: n, reason });
        }
        Ok((latents, step_times, t_den.elapsed().as_secs_f64()))
    }

    /// The VAE decode of `latents` at `kind`, then diffusers' `run_safety_checker` when the
    /// folder has one: images in [0, 1] on the CPU, and the seconds it took.
    pub fn decode(&mut self, vae: &AutoencoderKLDecoder, kind: Kind, latents: &Tensor) -> Result<(Tensor, f64), ExecError> {
        let t_dec = Instant::now();
        let va = self.dev("vae");
        tracing::info!("decoding {} image(s) of {}x{} with the VAE", latents.size()[0], self.run.shape.width, self.run.shape.height);
        let spinner = super::spinner("decoding", self.progress);
        self.enter("vae")?;
        let latents = latents.to_device(va.device).to_kind(kind);
        if self.dump.on() {
            self.dump.push("vae.input", &vae.unscale_latents(&latents));
        }
        let images = tch::no_grad(|| vae.latents_to_image(&latents)).to_kind(Kind::Float).to_device(tch::Device::Cpu);
        sync(va.device);
        // The decode before the safety checker blacks out a flagged image.
        self.dump.push("vae.image", &images);
        spinner.finish_and_clear();
        tracing::info!("decoded in {:.2} s", t_dec.elapsed().as_secs_f64());
        let images = self.safety_check(images)?;
        Ok((images, t_dec.elapsed().as_secs_f64()))
    }

    /// diffusers `run_safety_checker`: flagged images come back black, with a warning. The
    /// checker is loaded for this one call, straight onto the device it runs on, and dropped.
    fn safety_check(&mut self, images: Tensor) -> Result<Tensor, ExecError> {
        let Some(sc) = self.pipeline.component("safety_checker").filter(|c| c.checkpoint.is_some()) else {
            return Ok(images);
        };
        // `enter` sends the visitors on its device back to host memory, as diffusers' hooks do.
        self.enter("safety_checker")?;
        let run = self.dev("safety_checker");
        let processor = crate::models::image_processor::ImageProcessor::from_folder(&self.pipeline.root.join("feature_extractor")).map_err(|e| ExecError::Text(e.to_string()))?;
        let checker = crate::models::safety_checker::SafetyChecker::load(&sc.dir, sc.checkpoint.as_ref().expect("weights"), run.device, run.kind).map_err(|e| ExecError::Text(e.to_string()))?;
        let bytes = super::ledger::weigh(checker.varstore(), plan_device(self.plan, "safety_checker"), None);
        self.res.ledger.borrow_mut().add("safety_checker", &bytes)?;
        let (flags, checked) = tch::no_grad(|| checker.check(&processor, &images)).map_err(|e| ExecError::Text(e.to_string()))?;
        drop(checker);
        self.res.ledger.borrow_mut().remove(&bytes);
        if flags.iter().any(|&f| f) {
            self.warnings.push("Potential NSFW content was detected in one or more images. A black image will be returned instead. Try again with a different prompt and/or seed.".into());
        }
        Ok(checked)
    }
}

/// Classifier-free guidance over a [negative, positive] batch (`out` as is without guidance).
pub(crate) fn guide(out: &Tensor, do_cfg: bool, guidance: f64) -> Tensor {
    if do_cfg {
        let ch = out.chunk(2, 0);
        &ch[0] + (&ch[1] - &ch[0]) * guidance
    } else {
        out.shallow_clone()
    }
}

/// The latents as the model sees them: twice under guidance.
pub(crate) fn model_input(latents: &Tensor, do_cfg: bool) -> Tensor {
    if do_cfg {
        Tensor::cat(&[latents, latents], 0)
    } else {
        latents.shallow_clone()
    }
}

/// diffusers' `vae_scale_factor`: 2 ** (levels - 1).
pub(crate) fn vae_scale_factor(vae: &AutoencoderKLDecoder) -> i64 {
    1i64 << (vae.config.block_out_channels.len() as i64 - 1)
}

/// Waits for a CUDA device's queued work (step timings mean what they say).
fn sync(d: tch::Device) {
    if let tch::Device::Cuda(i) = d {
        tch::Cuda::synchronize(i as i64);
    }
}

/// diffusers' warning for a prompt longer than the text encoder takes; the remainder is shown
/// up to 200 characters (diffusers echoes it whole: a pasted megabyte would flood the terminal).
pub(crate) fn truncation_warning(enc: &text::TextEncoder, truncated: Option<String>, warnings: &mut Vec<String>) {
    if let Some(t) = truncated {
        warnings.push(format!("The following part of your input was truncated because CLIP can only handle sequences up to {} tokens: {}", enc.max_length(), shown(&t)));
    }
}

/// A truncated remainder as the warnings show it: quoted, its first 200 characters.
pub(crate) fn shown(t: &str) -> String {
    const SHOWN: usize = 200;
    let n = t.chars().count();
    let head: String = t.chars().take(SHOWN).collect();
    let more = if n > SHOWN { format!(" ... ({} more characters)", n - SHOWN) } else { String::new() };
    format!("{head:?}{more}")
}

/// Whether the run's sigmas follow Karras' schedule (the manifest's scheduler or the folder's
/// `use_karras_sigmas`).
pub(crate) fn karras(m: &LoadedManifest, sched_cfg: &serde_json::Value) -> bool {
    matches!(m.manifest.pipeline.scheduler, Some(crate::manifest::SchedulerKind::DpmPP2MKarras))
        || (m.manifest.pipeline.scheduler.is_none() && sched_cfg.get("use_karras_sigmas").and_then(|v| v.as_bool()) == Some(true))
}

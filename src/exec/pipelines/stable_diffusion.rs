//! diffusers' `StableDiffusionPipeline` (SD 1.x / 2.x): CLIP text encoder, UNet, VAE.

use std::time::Instant;

use tch::nn::VarStore;
use tch::{Kind, Tensor};

use super::{guide, karras, model_input, truncation_warning, vae_scale_factor, Call, Generated, Pipeline, Step};
use crate::checkpoint::load::Mapped;
use crate::exec::loading::{joined, Held, Loader};
use crate::exec::text::TextEncoder;
use crate::exec::ExecError;
use crate::models::unet_2d::UNet2DConditionModel;
use crate::models::vae::{AutoencoderKLDecoder, AutoencoderKLEncoder};

pub(crate) struct StableDiffusion {
    pub(super) text_encoder: TextEncoder,
    pub(super) unet: Held<UNet2DConditionModel>,
    pub(super) vae: Held<AutoencoderKLDecoder>,
    /// Image-to-image's VAE encoder: loaded when the manifest gives `run.image`.
    pub(super) vae_encoder: Option<Held<AutoencoderKLEncoder>>,
    pub(super) vae_kind: Kind,
}

impl StableDiffusion {
    pub fn load(lx: &Loader) -> Result<Self, ExecError> {
        let (te, un, va) = (lx.placed("text_encoder")?, lx.placed("unet")?, lx.placed("vae")?);
        let (text_encoder, unet, vae) = std::thread::scope(|s| {
            let te = s.spawn(|| lx.text_encoder("text_encoder", &te, &lx.configs.text_encoder, "tokenizer"));
            let unet = s.spawn(|| lx.unet(&un));
            let vae = lx.vae(&va, true);
            (joined(te), joined(unet), vae)
        });
        let (vae, vae_kind) = vae?;
        let vae_encoder = if lx.images { Some(lx.vae_encoder(&va, vae_kind)?) } else { None };
        Ok(StableDiffusion { text_encoder: text_encoder?, unet: unet?, vae, vae_encoder, vae_kind })
    }

    /// diffusers `encode_prompt`, repeated `batch` times per prompt: [negative, positive] under
    /// guidance.
    pub(super) fn encode_prompt(&self, cx: &mut Call, do_cfg: bool, batch: i64) -> Result<Tensor, ExecError> {
        let m = cx.m;
        let r = &m.manifest.run;
        let enc = &self.text_encoder;
        let (ids, out, trunc) = enc.run(r.prompt.as_deref().unwrap_or_default())?;
        truncation_warning(enc, trunc, &mut cx.warnings);
        let pos = enc.sd_embeds(&out, r.clip_skip)?.repeat([batch, 1, 1]);
        cx.dump.push("tokens.prompt.input_ids", &ids);
        cx.dump.push("prompt_embeds", &pos);
        if !do_cfg {
            return Ok(pos);
        }
        // The negative prompt never uses clip_skip in diffusers.
        let (nids, nout, _) = enc.run(r.negative_prompt.as_deref().unwrap_or_default())?;
        let neg = enc.sd_embeds(&nout, None)?.repeat([batch, 1, 1]);
        cx.dump.push("tokens.negative.input_ids", &nids);
        cx.dump.push("negative_prompt_embeds", &neg);
        Ok(Tensor::cat(&[neg, pos], 0))
    }
}

impl Pipeline for StableDiffusion {
    fn components(&self) -> Vec<(&'static str, &VarStore, &Mapped)> {
        vec![("text_encoder", self.text_encoder.varstore(), self.text_encoder.mapped()), ("unet", &self.unet.vs, &self.unet.mapped), ("vae", &self.vae.vs, &self.vae.mapped)]
    }

    fn call(&self, cx: &mut Call<'_>) -> Result<Generated, ExecError> {
        match &cx.init {
            Some(i) if i.mask.is_some() => return super::stable_diffusion_inpaint::call(self, cx),
            _ => {}
        }
        let m = cx.m;
        let steps = cx.run.steps as usize;
        let guidance = cx.run.guidance_scale;
        let do_cfg = guidance > 1.0;
        let batch = cx.run.shape.batch as i64;
        let (te, un) = (cx.dev("text_encoder"), cx.dev("unet"));

        // 1. Encode the prompt.
        let t_enc = Instant::now();
        cx.enter("text_encoder")?;
        let context = tch::no_grad(|| self.encode_prompt(cx, do_cfg, batch))?.to_device(un.device).to_kind(un.kind);
        let encode_s = t_enc.elapsed().as_secs_f64();
        cx.dump.push("unet.encoder_hidden_states", &context);

        // 2. Timesteps and initial latents.
        let (mut scheduler, sched_cfg) = cx.scheduler(steps)?;
        let unet = &self.unet.model;
        let scale = vae_scale_factor(&self.vae.model);
        let shape = [batch, unet.config.in_channels, cx.run.shape.height as i64 / scale, cx.run.shape.width as i64 / scale];
        // StableDiffusionImg2ImgPipeline: the encoded image noised to where `strength` begins.
        let (latents, t_start) = match &cx.init {
            None => (cx.prepare_latents(shape, te.kind, scheduler.as_ref(), un)?, 0),
            Some(_) => super::stable_diffusion_img2img::prepare_latents(cx, self.vae_encoder.as_ref(), self.vae_kind, scheduler.as_mut(), batch, te.kind, un)?,
        };

        // 3. Denoising loop.
        cx.enter("unet")?;
        let timesteps = scheduler.timesteps()[t_start..].to_vec();
        let (latents, step_times, denoise_s) = cx.denoise("unet", &timesteps, latents, un.device, |latents, j, t| {
            let i = t_start + j;
            let input = scheduler.scale_model_input(&model_input(latents, do_cfg), i);
            // A split UNet ends on its last device: the loop's tensors live on its first.
            let output = tch::no_grad(|| unet.forward(&input, t, &context, None)).to_device(un.device);
            let noise_pred = guide(&output, do_cfg, guidance);
            let latents = tch::no_grad(|| scheduler.step(&noise_pred, i, latents));
            Ok(Step { input, timestep: Tensor::from_slice(&[t]).to_kind(Kind::Float), output, noise_pred, latents })
        })?;

        // 4. Decode (and the safety checker).
        let (images, decode_s) = cx.decode(&self.vae.model, self.vae_kind, &latents)?;
        Ok(Generated {
            images,
            latents,
            steps,
            guidance_scale: guidance,
            model_calls: timesteps.len(),
            step_times,
            encode_s,
            denoise_s,
            decode_s,
            scheduler: scheduler.name().to_string(),
            karras: karras(m, &sched_cfg),
            prompt_2: None,
            negative_prompt_2: None,
            prompt_3: None,
            negative_prompt_3: None,
            max_sequence_length: None,
            true_cfg_scale: None,
        })
    }
}

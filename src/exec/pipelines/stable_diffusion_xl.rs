//! diffusers' `StableDiffusionXLPipeline`: two CLIP text encoders, a UNet with micro-conditioning
//! (`text_embeds`, `time_ids`), VAE.

use std::time::Instant;

use tch::nn::VarStore;
use tch::{Kind, Tensor};

use super::{guide, karras, model_input, truncation_warning, vae_scale_factor, Call, Generated, Pipeline, Step};
use crate::checkpoint::load::Mapped;
use crate::exec::loading::{joined, Held, Loader};
use crate::exec::text::TextEncoder;
use crate::exec::ExecError;
use crate::models::unet_2d::{AddedCond, UNet2DConditionModel};
use crate::models::vae::{AutoencoderKLDecoder, AutoencoderKLEncoder};

pub(crate) struct StableDiffusionXl {
    text_encoder: TextEncoder,
    text_encoder_2: TextEncoder,
    pub(super) unet: Held<UNet2DConditionModel>,
    pub(super) vae: Held<AutoencoderKLDecoder>,
    /// Image-to-image's VAE encoder: loaded when runs may give an image.
    pub(super) vae_encoder: Option<Held<AutoencoderKLEncoder>>,
    pub(super) vae_kind: Kind,
}

/// What `encode_prompt` and `_get_add_time_ids` give the UNet, [negative, positive] under guidance.
pub(super) struct Conditioning {
    pub prompt_embeds: Tensor,
    pub text_embeds: Tensor,
    pub time_ids: Tensor,
}

impl StableDiffusionXl {
    pub fn load(lx: &Loader) -> Result<Self, ExecError> {
        let (te, te2, un, va) = (lx.placed("text_encoder")?, lx.placed("text_encoder_2")?, lx.placed("unet")?, lx.placed("vae")?);
        let cfg2 = lx.configs.text_encoder_2.as_ref().ok_or_else(|| ExecError::Unsupported("the pipeline has no `text_encoder_2` config".into()))?;
        let (text_encoder, text_encoder_2, unet, vae) = std::thread::scope(|s| {
            let te = s.spawn(|| lx.text_encoder("text_encoder", &te, &lx.configs.text_encoder, "tokenizer"));
            let te2 = s.spawn(|| lx.text_encoder("text_encoder_2", &te2, cfg2, "tokenizer_2"));
            let unet = s.spawn(|| lx.unet(&un));
            let vae = lx.vae(&va, true);
            (joined(te), joined(te2), joined(unet), vae)
        });
        let (vae, vae_kind) = vae?;
        let vae_encoder = if lx.images { Some(lx.vae_encoder(&va, vae_kind)?) } else { None };
        Ok(StableDiffusionXl { text_encoder: text_encoder?, text_encoder_2: text_encoder_2?, unet: unet?, vae, vae_encoder, vae_kind })
    }

    /// Both encoders on one prompt pair: the penultimate states (or -(clip_skip + 2)) concatenated,
    /// and the second encoder's projected pooled output.
    fn encode(&self, cx: &mut Call, p1: &str, p2: &str, skip: Option<u32>) -> Result<(Tensor, Tensor, Tensor, Tensor), ExecError> {
        let (enc1, enc2) = (&self.text_encoder, &self.text_encoder_2);
        cx.enter("text_encoder")?;
        let (ids1, out1, t1) = enc1.run(p1)?;
        cx.enter("text_encoder_2")?;
        let (ids2, out2, t2) = enc2.run(p2)?;
        truncation_warning(enc1, t1, &mut cx.warnings);
        truncation_warning(enc2, t2, &mut cx.warnings);
        let pooled = out2.text_embeds.as_ref().ok_or_else(|| ExecError::Text("`text_encoder_2` must be a CLIPTextModelWithProjection (it has no text_projection)".into()))?.shallow_clone();
        let embeds = Tensor::cat(&[enc1.sdxl_embeds(&out1, skip)?, enc2.sdxl_embeds(&out2, skip)?], -1);
        Ok((ids1, ids2, embeds, pooled))
    }

    /// diffusers `encode_prompt` + `_get_add_time_ids`; a missing negative prompt gives zeros
    /// when the pipeline's `force_zeros_for_empty_prompt` says so.
    pub(super) fn encode_prompt(&self, cx: &mut Call, do_cfg: bool, batch: i64) -> Result<Conditioning, ExecError> {
        let m = cx.m;
        let r = &m.manifest.run;
        let prompt = r.prompt.clone().unwrap_or_default();
        let prompt_2 = r.prompt_2.clone().unwrap_or_else(|| prompt.clone());
        let (ids1, ids2, pos, pooled) = self.encode(cx, &prompt, &prompt_2, r.clip_skip)?;
        // original_size, crops_coords_top_left, target_size as (height, width) pairs.
        let (h, w) = (cx.run.shape.height as f64, cx.run.shape.width as f64);
        let pair = |v: Option<[u32; 2]>, d: (f64, f64)| v.map(|a| (a[0] as f64, a[1] as f64)).unwrap_or(d);
        let (oh, ow) = pair(r.original_size, (h, w));
        let (ch, cw) = pair(r.crops_coords_top_left, (0.0, 0.0));
        let (th, tw) = pair(r.target_size, (h, w));
        let time_ids = Tensor::from_slice(&[oh, ow, ch, cw, th, tw]).to_kind(Kind::Float).unsqueeze(0);
        let rep = |t: &Tensor| if t.dim() == 3 { t.repeat([batch, 1, 1]) } else { t.repeat([batch, 1]) };
        let (pos, pooled) = (rep(&pos), rep(&pooled));
        cx.dump.push("tokens.prompt.input_ids", &ids1);
        cx.dump.push("tokens.prompt.input_ids_2", &ids2);
        cx.dump.push("prompt_embeds", &pos);
        cx.dump.push("pooled_prompt_embeds", &pooled);
        if !do_cfg {
            let time_ids = time_ids.repeat([batch, 1]);
            cx.dump.push("unet.added_cond.time_ids", &time_ids);
            cx.dump.push("unet.added_cond.text_embeds", &pooled);
            return Ok(Conditioning { prompt_embeds: pos, text_embeds: pooled, time_ids });
        }
        let force_zeros = cx.pipeline.index.config.get("force_zeros_for_empty_prompt").and_then(|v| v.as_bool()).unwrap_or(true);
        let (neg, neg_pooled) = if r.negative_prompt.is_none() && force_zeros {
            (pos.zeros_like(), pooled.zeros_like())
        } else {
            let n1 = r.negative_prompt.clone().unwrap_or_default();
            let n2 = r.negative_prompt_2.clone().unwrap_or_else(|| n1.clone());
            let (nids1, nids2, neg, neg_pooled) = self.encode(cx, &n1, &n2, None)?;
            cx.dump.push("tokens.negative.input_ids", &nids1);
            cx.dump.push("tokens.negative.input_ids_2", &nids2);
            (rep(&neg), rep(&neg_pooled))
        };
        let text_embeds = Tensor::cat(&[&neg_pooled, &pooled], 0);
        // diffusers: cat([negative_add_time_ids, add_time_ids]).repeat(batch, 1) (rows are equal
        // unless negative micro-conditioning is given, which runner does not take).
        let time_ids = Tensor::cat(&[&time_ids, &time_ids], 0).repeat([batch, 1]);
        cx.dump.push("negative_prompt_embeds", &neg);
        cx.dump.push("negative_pooled_prompt_embeds", &neg_pooled);
        cx.dump.push("unet.added_cond.time_ids", &time_ids);
        cx.dump.push("unet.added_cond.text_embeds", &text_embeds);
        Ok(Conditioning { prompt_embeds: Tensor::cat(&[neg, pos], 0), text_embeds, time_ids })
    }
}

impl Pipeline for StableDiffusionXl {
    fn components(&self) -> Vec<(&'static str, &VarStore, &Mapped)> {
        vec![
            ("text_encoder", self.text_encoder.varstore(), self.text_encoder.mapped()),
            ("text_encoder_2", self.text_encoder_2.varstore(), self.text_encoder_2.mapped()),
            ("unet", &self.unet.vs, &self.unet.mapped),
            ("vae", &self.vae.vs, &self.vae.mapped),
        ]
    }

    fn call(&self, cx: &mut Call<'_>) -> Result<Generated, ExecError> {
        match &cx.init {
            Some(i) if i.mask.is_some() => return super::stable_diffusion_xl_inpaint::call(self, cx),
            _ => {}
        }
        let m = cx.m;
        let r = &m.manifest.run;
        let steps = cx.run.steps as usize;
        let guidance = cx.run.guidance_scale;
        let do_cfg = guidance > 1.0;
        let batch = cx.run.shape.batch as i64;
        let (te2, un) = (cx.dev("text_encoder_2"), cx.dev("unet"));

        // 1. Encode the prompt.
        let t_enc = Instant::now();
        let cond = tch::no_grad(|| self.encode_prompt(cx, do_cfg, batch))?;
        let on_unet = |t: &Tensor| t.to_device(un.device).to_kind(un.kind);
        let (context, text_embeds, time_ids) = (on_unet(&cond.prompt_embeds), on_unet(&cond.text_embeds), on_unet(&cond.time_ids));
        let encode_s = t_enc.elapsed().as_secs_f64();
        cx.dump.push("unet.encoder_hidden_states", &context);

        // 2. Timesteps and initial latents (drawn in the prompt embeddings' dtype, the second encoder's).
        let (mut scheduler, sched_cfg) = cx.scheduler(steps)?;
        let unet = &self.unet.model;
        let scale = vae_scale_factor(&self.vae.model);
        let shape = [batch, unet.config.in_channels, cx.run.shape.height as i64 / scale, cx.run.shape.width as i64 / scale];
        // StableDiffusionXLImg2ImgPipeline: the encoded image (at the VAE's upcast dtype) noised to
        // where `strength` begins; the micro-conditioning sizes above are the floored image's.
        let (latents, t_start) = match &cx.init {
            None => (cx.prepare_latents(shape, te2.kind, scheduler.as_ref(), un)?, 0),
            Some(_) => {
                if cx.pipeline.index.config.get("requires_aesthetics_score").and_then(|v| v.as_bool()) == Some(true) {
                    return Err(ExecError::Unsupported("this SDXL pipeline `requires_aesthetics_score` (a refiner): its aesthetic-score conditioning is not implemented".into()));
                }
                super::stable_diffusion_img2img::prepare_latents(cx, self.vae_encoder.as_ref(), self.vae_kind, scheduler.as_mut(), batch, te2.kind, un)?
            }
        };

        // 3. Denoising loop.
        cx.enter("unet")?;
        let timesteps = scheduler.timesteps()[t_start..].to_vec();
        let (latents, step_times, denoise_s) = cx.denoise("unet", &timesteps, latents, un.device, |latents, j, t| {
            let i = t_start + j;
            let input = scheduler.scale_model_input(&model_input(latents, do_cfg), i);
            let added = AddedCond { text_embeds: &text_embeds, time_ids: &time_ids };
            // A split UNet ends on its last device: the loop's tensors live on its first.
            let output = tch::no_grad(|| unet.forward(&input, t, &context, Some(added))).to_device(un.device);
            let noise_pred = guide(&output, do_cfg, guidance);
            let latents = tch::no_grad(|| scheduler.step(&noise_pred, i, latents));
            Ok(Step { input, timestep: Tensor::from_slice(&[t]).to_kind(Kind::Float), output, noise_pred, latents })
        })?;

        // 4. Decode.
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
            prompt_2: r.prompt_2.clone(),
            negative_prompt_2: r.negative_prompt_2.clone(),
            prompt_3: None,
            negative_prompt_3: None,
            max_sequence_length: None,
            true_cfg_scale: None,
        })
    }
}

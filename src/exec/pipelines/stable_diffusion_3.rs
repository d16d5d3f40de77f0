//! diffusers' `StableDiffusion3Pipeline` (SD3, SD3.5): CLIP-L and CLIP-G, the T5 encoder (optional:
//! zeros in its place, as with `text_encoder_3=None`), the MMDiT transformer, flow matching, and a
//! 16-channel VAE with a shift.

use std::time::Instant;

use tch::nn::VarStore;
use tch::{Kind, Tensor};

use super::{guide, model_input, truncation_warning, vae_scale_factor, Call, Generated, Pipeline, Step};
use crate::checkpoint::load::Mapped;
use crate::exec::loading::{joined, Held, Loader};
use crate::exec::text::{T5TextEncoder, TextEncoder};
use crate::exec::ExecError;
use crate::models::sd3_transformer::SD3Transformer2DModel;
use crate::models::vae::{AutoencoderKLDecoder, AutoencoderKLEncoder};

pub(crate) struct StableDiffusion3 {
    text_encoder: TextEncoder,
    text_encoder_2: TextEncoder,
    text_encoder_3: Option<T5TextEncoder>,
    transformer: SD3Transformer2DModel,
    vae: Held<AutoencoderKLDecoder>,
    /// Image-to-image's VAE encoder: loaded when runs may give an image.
    vae_encoder: Option<Held<AutoencoderKLEncoder>>,
    vae_kind: Kind,
}

/// What `encode_prompt` gives the transformer, [negative, positive] under guidance.
struct Conditioning {
    prompt_embeds: Tensor,
    pooled_prompt_embeds: Tensor,
}

impl StableDiffusion3 {
    pub fn load(lx: &Loader) -> Result<Self, ExecError> {
        let c = lx.configs;
        let (te, te2, tr, va) = (lx.placed("text_encoder")?, lx.placed("text_encoder_2")?, lx.placed("transformer")?, lx.placed("vae")?);
        let te3 = c.t5.as_ref().map(|cfg| lx.placed("text_encoder_3").map(|l| (l, cfg))).transpose()?;
        let cfg2 = c.text_encoder_2.as_ref().ok_or_else(|| ExecError::Unsupported("the pipeline has no `text_encoder_2` config".into()))?;
        let tr_cfg = c.transformer.as_ref().ok_or_else(|| ExecError::Unsupported("the pipeline has no `transformer` config".into()))?;
        let (text_encoder, text_encoder_2, text_encoder_3, transformer, vae) = std::thread::scope(|s| {
            let te = s.spawn(|| lx.text_encoder("text_encoder", &te, &c.text_encoder, "tokenizer"));
            let te2 = s.spawn(|| lx.text_encoder("text_encoder_2", &te2, cfg2, "tokenizer_2"));
            let te3 = s.spawn(|| te3.as_ref().map(|(l, cfg)| lx.t5("text_encoder_3", l, cfg, "tokenizer_3")).transpose());
            let tr = s.spawn(|| lx.sd3_transformer(&tr, tr_cfg));
            let vae = lx.vae(&va, false);
            (joined(te), joined(te2), joined(te3), joined(tr), vae)
        });
        let (vae, vae_kind) = vae?;
        let vae_encoder = if lx.images { Some(lx.vae_encoder(&va, vae_kind)?) } else { None };
        Ok(StableDiffusion3 { text_encoder: text_encoder?, text_encoder_2: text_encoder_2?, text_encoder_3: text_encoder_3?, transformer: transformer?, vae, vae_encoder, vae_kind })
    }

    /// `_get_clip_prompt_embeds` of both CLIPs: the penultimate states (or -(clip_skip + 2))
    /// concatenated on channels, and the projected pooled outputs concatenated.
    fn clip(&self, cx: &mut Call, p1: &str, p2: &str, skip: Option<u32>, branch: &str) -> Result<(Tensor, Tensor), ExecError> {
        let (enc1, enc2) = (&self.text_encoder, &self.text_encoder_2);
        cx.enter("text_encoder")?;
        let (ids1, out1, t1) = enc1.run(p1)?;
        cx.enter("text_encoder_2")?;
        let (ids2, out2, t2) = enc2.run(p2)?;
        truncation_warning(enc1, t1, &mut cx.warnings);
        truncation_warning(enc2, t2, &mut cx.warnings);
        cx.dump.push(format!("tokens.{branch}.input_ids"), &ids1);
        cx.dump.push(format!("tokens.{branch}.input_ids_2"), &ids2);
        let pooled = |out: &crate::models::clip::ClipTextOutput, which: &str| {
            out.text_embeds.as_ref().map(|t| t.shallow_clone()).ok_or_else(|| ExecError::Text(format!("`{which}` must be a CLIPTextModelWithProjection (it has no text_projection)")))
        };
        let embeds = Tensor::cat(&[enc1.sdxl_embeds(&out1, skip)?, enc2.sdxl_embeds(&out2, skip)?], -1);
        let pooled = Tensor::cat(&[pooled(&out1, "text_encoder")?, pooled(&out2, "text_encoder_2")?], -1);
        Ok((embeds, pooled))
    }

    /// `_get_t5_prompt_embeds`: T5's last hidden state, or zeros of [1, max_sequence_length,
    /// joint_attention_dim] without T5 (in the first text encoder's dtype, as diffusers).
    fn t5(&self, cx: &mut Call, prompt: &str, max_len: usize, branch: &str) -> Result<Tensor, ExecError> {
        let Some(t5) = &self.text_encoder_3 else {
            let dim = self.transformer.config.joint_attention_dim;
            return Ok(Tensor::zeros([1, max_len as i64, dim], (cx.dev("text_encoder").kind, tch::Device::Cpu)));
        };
        cx.enter("text_encoder_3")?;
        let (ids, states, truncated) = t5.run(prompt, max_len)?;
        if let Some(t) = truncated {
            cx.warnings.push(format!("The following part of your input was truncated because `max_sequence_length` is set to {max_len} tokens: {}", super::shown(&t)));
        }
        cx.dump.push(format!("tokens.{branch}.input_ids_3"), &ids);
        Ok(states)
    }

    /// diffusers `encode_prompt`: CLIP states zero-padded to T5's width, T5's states appended
    /// along the sequence; pooled outputs concatenated. Repeated `batch` times per prompt.
    fn encode_prompt(&self, cx: &mut Call, do_cfg: bool, batch: i64) -> Result<Conditioning, ExecError> {
        let m = cx.m;
        let r = &m.manifest.run;
        let max_len = cx.run.shape.max_sequence_length as usize;
        let encode = |cx: &mut Call, p1: &str, p2: &str, p3: &str, skip: Option<u32>, branch: &str| -> Result<(Tensor, Tensor), ExecError> {
            let (clip, pooled) = self.clip(cx, p1, p2, skip, branch)?;
            let t5 = self.t5(cx, p3, max_len, branch)?.to_device(clip.device());
            let clip = clip.constant_pad_nd([0, t5.size()[2] - clip.size()[2]]);
            let t5 = t5.to_kind(clip.kind());
            let embeds = Tensor::cat(&[clip, t5], -2);
            Ok((embeds.repeat([batch, 1, 1]), pooled.repeat([batch, 1])))
        };
        let prompt = r.prompt.clone().unwrap_or_default();
        let prompt_2 = r.prompt_2.clone().unwrap_or_else(|| prompt.clone());
        let prompt_3 = r.prompt_3.clone().unwrap_or_else(|| prompt.clone());
        let (pos, pooled) = encode(cx, &prompt, &prompt_2, &prompt_3, r.clip_skip, "prompt")?;
        cx.dump.push("prompt_embeds", &pos);
        cx.dump.push("pooled_prompt_embeds", &pooled);
        if !do_cfg {
            return Ok(Conditioning { prompt_embeds: pos, pooled_prompt_embeds: pooled });
        }
        let n1 = r.negative_prompt.clone().unwrap_or_default();
        let n2 = r.negative_prompt_2.clone().unwrap_or_else(|| n1.clone());
        let n3 = r.negative_prompt_3.clone().unwrap_or_else(|| n1.clone());
        let (neg, neg_pooled) = encode(cx, &n1, &n2, &n3, None, "negative")?;
        cx.dump.push("negative_prompt_embeds", &neg);
        cx.dump.push("negative_pooled_prompt_embeds", &neg_pooled);
        Ok(Conditioning { prompt_embeds: Tensor::cat(&[neg, pos], 0), pooled_prompt_embeds: Tensor::cat(&[neg_pooled, pooled], 0) })
    }
}

impl Pipeline for StableDiffusion3 {
    fn components(&self) -> Vec<(&'static str, &VarStore, &Mapped)> {
        let mut c = vec![("text_encoder", self.text_encoder.varstore(), self.text_encoder.mapped()), ("text_encoder_2", self.text_encoder_2.varstore(), self.text_encoder_2.mapped())];
        if let Some(t5) = &self.text_encoder_3 {
            c.push(("text_encoder_3", t5.varstore(), t5.mapped()));
        }
        c.push(("transformer", self.transformer.varstore(), self.transformer.mapped()));
        c.push(("vae", &self.vae.vs, &self.vae.mapped));
        c
    }

    fn call(&self, cx: &mut Call<'_>) -> Result<Generated, ExecError> {
        let m = cx.m;
        let r = &m.manifest.run;
        let steps = cx.run.steps as usize;
        let guidance = cx.run.guidance_scale;
        let do_cfg = guidance > 1.0;
        let batch = cx.run.shape.batch as i64;
        let tr = cx.dev("transformer");

        // 1. Encode the prompt.
        let t_enc = Instant::now();
        let cond = tch::no_grad(|| self.encode_prompt(cx, do_cfg, batch))?;
        let draw_kind = cond.prompt_embeds.kind();
        let on_transformer = |t: &Tensor| t.to_device(tr.device).to_kind(tr.kind);
        let (context, pooled) = (on_transformer(&cond.prompt_embeds), on_transformer(&cond.pooled_prompt_embeds));
        let encode_s = t_enc.elapsed().as_secs_f64();

        // 2. Initial latents (drawn in the prompt embeddings' dtype), then the timesteps: with
        //    dynamic shifting, `mu` from the image's sequence length in patches.
        let transformer = &self.transformer;
        let scale = vae_scale_factor(&self.vae.model);
        let (h, w) = (cx.run.shape.height as i64 / scale, cx.run.shape.width as i64 / scale);
        let patch = transformer.config.patch_size;
        let (mut scheduler, sched_cfg) = cx.flow_match_scheduler(steps, ((h / patch) * (w / patch)) as usize)?;
        let shape = [batch, transformer.config.in_channels, h, w];
        let (latents, t_start, blend) = match &cx.init {
            None => (cx.prepare_latents(shape, draw_kind, scheduler.as_ref(), tr)?, 0, None),
            // StableDiffusion3Img2ImgPipeline: the encoded image noised to where `strength` begins
            // the schedule (resized to the requested size). StableDiffusion3InpaintPipeline with a
            // 16-channel transformer: after each step the kept part is the image's latents at the
            // next sigma (nothing draws from the generator after the masked image's posterior:
            // it is not computed).
            Some(_) => {
                let f = cx.flow_image_latents(self.vae_encoder.as_ref(), self.vae_kind, scheduler.as_mut(), shape, draw_kind)?;
                cx.dump_schedule(scheduler.as_ref());
                cx.dump.push("latents.init", &f.latents);
                let on = |t: &Tensor| t.to_device(tr.device).to_kind(tr.kind);
                let blend = f.mask.as_ref().map(|m| (on(m), on(&f.image_latents), on(&f.noise)));
                (on(&f.latents), f.t_start, blend)
            }
        };

        // 3. Denoising loop.
        cx.enter("transformer")?;
        let timesteps = scheduler.timesteps()[t_start..].to_vec();
        let n = timesteps.len();
        let (latents, step_times, denoise_s) = cx.denoise("transformer", &timesteps, latents, tr.device, |latents, j, t| {
            let i = t_start + j;
            let input = model_input(latents, do_cfg);
            let timestep = Tensor::full([input.size()[0]], t, (Kind::Float, tr.device));
            // A split transformer ends on its last device: the loop's tensors live on its first.
            let output = tch::no_grad(|| transformer.forward(&input, &timestep, &context, &pooled)).map_err(|e| ExecError::Text(e.to_string()))?.to_device(tr.device);
            let noise_pred = guide(&output, do_cfg, guidance);
            let mut latents = tch::no_grad(|| scheduler.step(&noise_pred, i, latents)).to_kind(latents.kind());
            if let Some((mask, image_latents, noise)) = &blend {
                let proper = if j + 1 < n { tch::no_grad(|| scheduler.add_noise(image_latents, noise, i + 1)) } else { image_latents.shallow_clone() };
                let kept: Tensor = (1.0 - mask) * proper;
                latents = (kept + mask * &latents).to_kind(latents.kind());
            }
            Ok(Step { input, timestep, output, noise_pred, latents })
        })?;

        // 4. Decode: `latents / scaling_factor + shift_factor` (the VAE applies both).
        // diffusers 0.42.1's StableDiffusion3InpaintPipeline decodes `latents / scaling_factor`
        // without adding `shift_factor` (its text-to-image and image-to-image pipelines add it):
        // the same image here, the shift taken out before the VAE adds it back.
        let decoded = match (&blend, self.vae.model.config.shift_factor) {
            (Some(_), Some(shift)) => &latents - shift * self.vae.model.config.scaling_factor,
            _ => latents.shallow_clone(),
        };
        let (images, decode_s) = cx.decode(&self.vae.model, self.vae_kind, &decoded)?;
        let _ = sched_cfg;
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
            karras: false,
            prompt_2: r.prompt_2.clone(),
            negative_prompt_2: r.negative_prompt_2.clone(),
            prompt_3: r.prompt_3.clone(),
            negative_prompt_3: r.negative_prompt_3.clone(),
            max_sequence_length: Some(cx.run.shape.max_sequence_length as usize),
            true_cfg_scale: None,
        })
    }
}

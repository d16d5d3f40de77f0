//! diffusers' `StableDiffusionInpaintPipeline` (SD 1.x / 2.x), over the components of
//! [`StableDiffusion`] (its steps after the prompt shared with SDXL's inpainting): the image and mask resized to the requested size, the masked part
//! repainted. A 9-channel inpainting UNet sees `[latents, mask, masked image latents]` each step;
//! an ordinary 4-channel UNet denoises everything and the unmasked part is put back after each
//! step from the image's latents noised to the next timestep.

use std::time::Instant;

use tch::{Kind, Tensor};

use super::stable_diffusion::StableDiffusion;
use super::{guide, karras, model_input, Call, Generated, Step};
use crate::exec::loading::Held;
use crate::exec::ExecError;
use crate::models::unet_2d::{AddedCond, UNet2DConditionModel};
use crate::models::vae::{AutoencoderKLDecoder, AutoencoderKLEncoder};
use runner_core::image::{to_binary_mask, to_normalized_chw};

/// What the inpainting loop needs of a UNet pipeline (SD or SDXL): its models and the encoded
/// prompt.
pub(super) struct Parts<'a> {
    pub unet: &'a UNet2DConditionModel,
    pub encoder: Option<&'a Held<AutoencoderKLEncoder>>,
    pub vae: &'a AutoencoderKLDecoder,
    pub vae_kind: Kind,
    /// The prompt embeddings ([negative, positive] under guidance) on the UNet, their dtype the
    /// noise's, and SDXL's `text_embeds` and `time_ids`.
    pub context: Tensor,
    pub draw_kind: Kind,
    pub added: Option<(Tensor, Tensor)>,
    pub encode_s: f64,
}

pub(super) fn call(sd: &StableDiffusion, cx: &mut Call<'_>) -> Result<Generated, ExecError> {
    let guidance = cx.run.guidance_scale;
    let batch = cx.run.shape.batch as i64;
    let (te, un) = (cx.dev("text_encoder"), cx.dev("unet"));
    // 3. Encode the prompt.
    let t_enc = Instant::now();
    cx.enter("text_encoder")?;
    let context = tch::no_grad(|| sd.encode_prompt(cx, guidance > 1.0, batch))?.to_device(un.device).to_kind(un.kind);
    let encode_s = t_enc.elapsed().as_secs_f64();
    cx.dump.push("unet.encoder_hidden_states", &context);
    let parts = Parts { unet: &sd.unet.model, encoder: sd.vae_encoder.as_ref(), vae: &sd.vae.model, vae_kind: sd.vae_kind, context, draw_kind: te.kind, added: None, encode_s };
    denoise(cx, parts)
}

/// Steps 4 to 8 of diffusers' SD and SDXL inpainting `__call__`: timesteps, the image and mask,
/// the latents, the loop, the decode.
pub(super) fn denoise(cx: &mut Call<'_>, p: Parts<'_>) -> Result<Generated, ExecError> {
    let m = cx.m;
    let (Some(init), Some(spec)) = (cx.init.clone(), cx.run.init) else {
        return Err(ExecError::Text("an inpainting job without its image's size and strength".into()));
    };
    let Some((mask_image, _)) = &init.mask else { return Err(ExecError::Text("an inpainting job without its mask".into())) };
    let encoder = p.encoder.ok_or_else(|| ExecError::Text("inpainting needs the VAE encoder, loaded when runs may give an image".into()))?;
    let strength = spec.strength;
    let steps = cx.run.steps as usize;
    let guidance = cx.run.guidance_scale;
    let do_cfg = guidance > 1.0;
    let batch = cx.run.shape.batch as i64;
    let un = cx.dev("unet");
    let unet = p.unet;
    let nine = unet.config.in_channels == 9;
    let context = &p.context;
    let draw_kind = p.draw_kind;

    // 4. Timesteps (`get_timesteps`: int(steps × strength) of them run).
    let (mut scheduler, sched_cfg) = cx.scheduler(steps)?;
    let (t_start, timesteps) = cx.img2img_timesteps(scheduler.as_mut(), steps, strength);
    let strength_max = strength == 1.0;

    // 5. Preprocess the image and the mask to the requested size (Lanczos; the mask grayscale
    //    and binarized: 1 repaints).
    let (w, h) = (cx.run.shape.width as i64, cx.run.shape.height as i64);
    let init_image = Tensor::from_slice(&to_normalized_chw(&init.image.resize_lanczos(w as u32, h as u32))).view([1, 3, h, w]);
    let mask_condition = Tensor::from_slice(&to_binary_mask(&mask_image.to_gray().resize_lanczos(w as u32, h as u32))).view([1, 1, h, w]);
    cx.dump.push("image.input", &init_image);
    cx.dump.push("mask.input", &mask_condition);

    // 6. prepare_latents, then prepare_mask_latents: the generator draws the image's posterior
    //    sample (a 4-channel UNet, or strength < 1), the noise, then the masked image's.
    cx.enter("vae")?;
    let encode = |pixels: &Tensor| cx.encode_image(encoder, p.vae_kind, pixels, un.device, draw_kind);
    let repeat = |t: &Tensor, n: i64| Tensor::cat(&(0..n).map(|_| t.shallow_clone()).collect::<Vec<_>>(), 0);
    let (latents, noise, image_latents, mask, masked_image_latents) = tch::no_grad(|| {
        tch::manual_seed(cx.seed as i64);
        let image_latents = (!nine || !strength_max).then(|| repeat(&encode(&init_image), batch));
        let lh = h / (1 << (p.vae.config.block_out_channels.len() - 1));
        let lw = w / (1 << (p.vae.config.block_out_channels.len() - 1));
        let shape = [batch, p.vae.config.latent_channels, lh, lw];
        let noise = Tensor::randn(shape, (draw_kind, tch::Device::Cpu)).to_device(un.device);
        let latents = match (&image_latents, strength_max) {
            (_, true) => &noise * scheduler.init_noise_sigma(),
            (Some(il), false) => scheduler.add_noise(il, &noise, t_start),
            (None, false) => unreachable!("the image is encoded below strength 1"),
        };
        let masked_image = &init_image * mask_condition.lt(0.5).to_kind(Kind::Float);
        let mask = mask_condition.upsample_nearest2d([lh, lw], None, None).to_device(un.device).to_kind(draw_kind);
        let masked_image_latents = encode(&masked_image);
        let (mask, masked_image_latents) = (repeat(&mask, batch), repeat(&masked_image_latents, batch));
        let cfg = |t: Tensor| if do_cfg { Tensor::cat(&[t.shallow_clone(), t], 0) } else { t };
        (latents.to_kind(un.kind), noise, image_latents, cfg(mask).to_kind(un.kind), cfg(masked_image_latents).to_kind(un.kind))
    });
    cx.dump.push("latents.noise", &noise);
    if let Some(il) = &image_latents {
        cx.dump.push("latents.image", il);
    }
    cx.dump.push("latents.mask", &mask);
    cx.dump.push("latents.masked_image", &masked_image_latents);
    cx.dump.push("latents.init", &latents);

    // 7. Denoising loop, from the begin index.
    cx.enter("unet")?;
    let init_mask = if do_cfg { mask.chunk(2, 0)[0].shallow_clone() } else { mask.shallow_clone() };
    let n = timesteps.len();
    let (latents, step_times, denoise_s) = cx.denoise("unet", &timesteps, latents, un.device, |latents, j, t| {
        let i = t_start + j;
        let mut input = scheduler.scale_model_input(&model_input(latents, do_cfg), i);
        if nine {
            input = Tensor::cat(&[&input, &mask, &masked_image_latents], 1);
        }
        let added = p.added.as_ref().map(|(text_embeds, time_ids)| AddedCond { text_embeds, time_ids });
        let output = tch::no_grad(|| unet.forward(&input, t, context, added)).to_device(un.device);
        let noise_pred = guide(&output, do_cfg, guidance);
        let mut latents = tch::no_grad(|| scheduler.step(&noise_pred, i, latents));
        if let (false, Some(il)) = (nine, &image_latents) {
            // The kept part: the image's latents at the next timestep's noise (none after the last).
            let proper = if j + 1 < n { scheduler.add_noise(il, &noise, i + 1) } else { il.shallow_clone() };
            latents = (1.0 - &init_mask) * proper + &init_mask * latents;
        }
        Ok(Step { input, timestep: Tensor::from_slice(&[t]).to_kind(Kind::Float), output, noise_pred, latents })
    })?;

    // 8. Decode (and the safety checker).
    let (images, decode_s) = cx.decode(p.vae, p.vae_kind, &latents)?;
    Ok(Generated {
        images,
        latents,
        steps,
        guidance_scale: guidance,
        model_calls: timesteps.len(),
        step_times,
        encode_s: p.encode_s,
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

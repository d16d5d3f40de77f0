//! diffusers' `StableDiffusionXLImg2ImgPipeline`, over the components of [`StableDiffusionXl`]
//! and its VAE encoder: the input image, at its own size floored to the VAE's multiple, encoded
//! (at the VAE's upcast dtype), noised to the timestep `strength` leads to, denoised from there;
//! the micro-conditioning sizes default to that size. (A refiner's aesthetic-score conditioning,
//! `requires_aesthetics_score`, and `denoising_start` are not taken.)

use std::time::Instant;

use tch::{Kind, Tensor};

use super::stable_diffusion_xl::StableDiffusionXl;
use super::{guide, karras, model_input, Call, Generated, Step};
use crate::exec::ExecError;
use crate::models::unet_2d::AddedCond;

pub(super) fn call(xl: &StableDiffusionXl, cx: &mut Call<'_>) -> Result<Generated, ExecError> {
    let m = cx.m;
    let r = &m.manifest.run;
    let (Some(init), Some(spec)) = (cx.init.clone(), cx.run.init) else {
        return Err(ExecError::Text("an image-to-image job without its image's size and strength".into()));
    };
    let encoder = xl.vae_encoder.as_ref().ok_or_else(|| ExecError::Text("image-to-image needs the VAE encoder, loaded when runs may give an image".into()))?;
    if cx.pipeline.index.config.get("requires_aesthetics_score").and_then(|v| v.as_bool()) == Some(true) {
        return Err(ExecError::Unsupported("this SDXL pipeline `requires_aesthetics_score` (a refiner): its aesthetic-score conditioning is not implemented".into()));
    }
    let steps = cx.run.steps as usize;
    let guidance = cx.run.guidance_scale;
    let do_cfg = guidance > 1.0;
    let batch = cx.run.shape.batch as i64;
    let (te2, un) = (cx.dev("text_encoder_2"), cx.dev("unet"));

    // 3. Encode the prompt (the micro-conditioning sizes: the image's, floored).
    let t_enc = Instant::now();
    let cond = tch::no_grad(|| xl.encode_prompt(cx, do_cfg, batch))?;
    let on_unet = |t: &Tensor| t.to_device(un.device).to_kind(un.kind);
    let (context, text_embeds, time_ids) = (on_unet(&cond.prompt_embeds), on_unet(&cond.text_embeds), on_unet(&cond.time_ids));
    let encode_s = t_enc.elapsed().as_secs_f64();
    cx.dump.push("unet.encoder_hidden_states", &context);

    // 4. Preprocess the image.
    let (w, h) = (cx.run.shape.width as i64, cx.run.shape.height as i64);
    let image = Tensor::from_slice(&runner_core::image::to_normalized_chw(&init.image.resize_lanczos(w as u32, h as u32))).view([1, 3, h, w]);
    cx.dump.push("image.input", &image);

    // 5. Timesteps (`get_timesteps`: int(steps × strength) of them run).
    let (mut scheduler, sched_cfg) = cx.scheduler(steps)?;
    let (t_start, timesteps) = cx.img2img_timesteps(scheduler.as_mut(), steps, spec.strength);

    // 6. prepare_latents: the posterior sample (at the VAE's upcast dtype), then the noise.
    cx.enter("vae")?;
    tch::manual_seed(cx.seed as i64);
    let image_latents = cx.encode_image(encoder, xl.vae_kind, &image, un.device, te2.kind);
    let image_latents = Tensor::cat(&(0..batch).map(|_| image_latents.shallow_clone()).collect::<Vec<_>>(), 0);
    let noise = Tensor::randn(image_latents.size(), (te2.kind, tch::Device::Cpu)).to_device(un.device);
    let latents = tch::no_grad(|| scheduler.add_noise(&image_latents, &noise, t_start)).to_kind(un.kind);
    cx.dump.push("latents.image", &image_latents);
    cx.dump.push("latents.noise", &noise);
    cx.dump.push("latents.init", &latents);

    // 7. Denoising loop, from the begin index.
    cx.enter("unet")?;
    let unet = &xl.unet.model;
    let (latents, step_times, denoise_s) = cx.denoise("unet", &timesteps, latents, un.device, |latents, j, t| {
        let i = t_start + j;
        let input = scheduler.scale_model_input(&model_input(latents, do_cfg), i);
        let added = AddedCond { text_embeds: &text_embeds, time_ids: &time_ids };
        let output = tch::no_grad(|| unet.forward(&input, t, &context, Some(added))).to_device(un.device);
        let noise_pred = guide(&output, do_cfg, guidance);
        let latents = tch::no_grad(|| scheduler.step(&noise_pred, i, latents));
        Ok(Step { input, timestep: Tensor::from_slice(&[t]).to_kind(Kind::Float), output, noise_pred, latents })
    })?;

    // 8. Decode.
    let (images, decode_s) = cx.decode(&xl.vae.model, xl.vae_kind, &latents)?;
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

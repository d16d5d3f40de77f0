//! diffusers' `StableDiffusionImg2ImgPipeline` (SD 1.x / 2.x), over the components of
//! [`StableDiffusion`] and its VAE encoder: the input image, at its own size floored to the VAE's
//! multiple, is encoded (a posterior sample), noised to the timestep `strength` leads to, and
//! denoised from there.

use std::time::Instant;

use tch::{Kind, Tensor};

use super::stable_diffusion::StableDiffusion;
use super::{guide, karras, model_input, Call, Generated, Step};
use crate::exec::ExecError;

pub(super) fn call(sd: &StableDiffusion, cx: &mut Call<'_>) -> Result<Generated, ExecError> {
    let m = cx.m;
    let (Some(init), Some(spec)) = (cx.init.clone(), cx.run.init) else {
        return Err(ExecError::Text("an image-to-image job without its image's size and strength".into()));
    };
    let strength = spec.strength;
    let encoder = sd.vae_encoder.as_ref().ok_or_else(|| ExecError::Text("image-to-image needs the VAE encoder, loaded when the manifest gives `run.image`".into()))?;
    let steps = cx.run.steps as usize;
    let guidance = cx.run.guidance_scale;
    let do_cfg = guidance > 1.0;
    let batch = cx.run.shape.batch as i64;
    let (te, un) = (cx.dev("text_encoder"), cx.dev("unet"));

    // 3. Encode the prompt.
    let t_enc = Instant::now();
    cx.enter("text_encoder")?;
    let context = tch::no_grad(|| sd.encode_prompt(cx, do_cfg, batch))?.to_device(un.device).to_kind(un.kind);
    let encode_s = t_enc.elapsed().as_secs_f64();
    cx.dump.push("unet.encoder_hidden_states", &context);

    // 4. Preprocess the image (`VaeImageProcessor.preprocess`: its own size floored to the VAE's
    //    multiple, PIL's Lanczos resize, [-1, 1]).
    let (w, h) = (cx.run.shape.width as i64, cx.run.shape.height as i64);
    let resized = init.image.resize_lanczos(w as u32, h as u32);
    let image = Tensor::from_slice(&runner_core::image::to_normalized_chw(&resized)).view([1, 3, h, w]);
    cx.dump.push("image.input", &image);

    // 5. Timesteps: the schedule's last `strength` part (`get_timesteps`: int(steps × strength)).
    let (mut scheduler, sched_cfg) = cx.scheduler(steps)?;
    let (t_start, timesteps) = cx.img2img_timesteps(scheduler.as_mut(), steps, strength);

    // 6. prepare_latents: the posterior sample, then the noise, from the seed's generator.
    cx.enter("vae")?;
    tch::manual_seed(cx.seed as i64);
    let image_latents = cx.encode_image(encoder, sd.vae_kind, &image, un.device, te.kind);
    let image_latents = Tensor::cat(&(0..batch).map(|_| image_latents.shallow_clone()).collect::<Vec<_>>(), 0);
    let noise = Tensor::randn(image_latents.size(), (te.kind, tch::Device::Cpu)).to_device(un.device);
    let latents = tch::no_grad(|| scheduler.add_noise(&image_latents, &noise, t_start)).to_kind(un.kind);
    cx.dump.push("latents.image", &image_latents);
    cx.dump.push("latents.noise", &noise);
    cx.dump.push("latents.init", &latents);

    // 7. Denoising loop, from the begin index.
    cx.enter("unet")?;
    let unet = &sd.unet.model;
    let (latents, step_times, denoise_s) = cx.denoise("unet", &timesteps, latents, un.device, |latents, j, t| {
        let i = t_start + j;
        let input = scheduler.scale_model_input(&model_input(latents, do_cfg), i);
        let output = tch::no_grad(|| unet.forward(&input, t, &context, None)).to_device(un.device);
        let noise_pred = guide(&output, do_cfg, guidance);
        let latents = tch::no_grad(|| scheduler.step(&noise_pred, i, latents));
        Ok(Step { input, timestep: Tensor::from_slice(&[t]).to_kind(Kind::Float), output, noise_pred, latents })
    })?;

    // 8. Decode (and the safety checker).
    let (images, decode_s) = cx.decode(&sd.vae.model, sd.vae_kind, &latents)?;
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

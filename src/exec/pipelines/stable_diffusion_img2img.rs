//! diffusers' `StableDiffusionImg2ImgPipeline` and `StableDiffusionXLImg2ImgPipeline`: their own
//! steps over the text-to-image `__call__` of [`super::stable_diffusion`] and
//! [`super::stable_diffusion_xl`] (`get_timesteps` + `prepare_latents`): the input image at its own
//! size floored to the VAE's multiple (`VaeImageProcessor.preprocess`: PIL's Lanczos resize,
//! [-1, 1]), encoded (a posterior sample), and noised with the scheduler's `add_noise` to the
//! timestep `strength` leads to (`int(steps × strength)` steps run); the loop then starts there.

use tch::{Kind, Tensor};

use super::{Call, Dev};
use crate::exec::loading::Held;
use crate::exec::ExecError;
use crate::models::vae::AutoencoderKLEncoder;
use crate::schedulers::Scheduler;

/// The initial latents on `un` and the begin index: the generator draws the posterior sample (at
/// the VAE's dtype, SDXL's upcast one), then the noise at `draw_kind`.
pub(super) fn prepare_latents(
    cx: &mut Call<'_>,
    encoder: Option<&Held<AutoencoderKLEncoder>>,
    vae_kind: Kind,
    scheduler: &mut dyn Scheduler,
    batch: i64,
    draw_kind: Kind,
    un: Dev,
) -> Result<(Tensor, usize), ExecError> {
    let (Some(init), Some(spec)) = (cx.init.clone(), cx.run.init) else {
        return Err(ExecError::Text("an image-to-image job without its image's size and strength".into()));
    };
    let encoder = encoder.ok_or_else(|| ExecError::Text("image-to-image needs the VAE encoder, loaded when runs may give an image".into()))?;
    let (w, h) = (cx.run.shape.width as i64, cx.run.shape.height as i64);
    let image = Tensor::from_slice(&runner_core::image::to_normalized_chw(&init.image.resize_lanczos(w as u32, h as u32))).view([1, 3, h, w]);
    cx.dump.push("image.input", &image);
    let steps = cx.run.steps as usize;
    let (t_start, _) = cx.img2img_timesteps(scheduler, steps, spec.strength);
    cx.enter("vae")?;
    tch::manual_seed(cx.seed as i64);
    let image_latents = cx.encode_image(encoder, vae_kind, &image, un.device, draw_kind);
    let image_latents = Tensor::cat(&(0..batch).map(|_| image_latents.shallow_clone()).collect::<Vec<_>>(), 0);
    let noise = Tensor::randn(image_latents.size(), (draw_kind, tch::Device::Cpu)).to_device(un.device);
    let latents = tch::no_grad(|| scheduler.add_noise(&image_latents, &noise, t_start)).to_kind(un.kind);
    cx.dump.push("latents.image", &image_latents);
    cx.dump.push("latents.noise", &noise);
    cx.dump.push("latents.init", &latents);
    Ok((latents, t_start))
}

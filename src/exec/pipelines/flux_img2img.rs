//! diffusers' `FluxImg2ImgPipeline`'s own steps over [`Flux`]'s `__call__`: the input image
//! resized to the requested size (a multiple of 16), encoded (`(x - shift) × scale`), and noised
//! with `scale_noise` to the sigma where `strength` begins the schedule (SD3's and FLUX's
//! `get_timesteps`: `int(steps − steps × strength)` skipped), then packed into 2x2-patch tokens.

use tch::{Kind, Tensor};

use super::flux::{pack, Flux};
use super::Call;
use crate::exec::{ExecError, InitImages};
use crate::schedulers::Scheduler;

/// `get_timesteps` + `prepare_latents`: the packed initial latents and the begin index.
pub(super) fn prepare_latents(flux: &Flux, cx: &mut Call<'_>, init: &InitImages, scheduler: &mut dyn Scheduler, shape: [i64; 4], draw_kind: Kind) -> Result<(Tensor, usize), ExecError> {
    let strength = cx.run.init.map(|i| i.strength).ok_or_else(|| ExecError::Text("an image-to-image job without its strength".into()))?;
    let encoder = flux.vae_encoder.as_ref().ok_or_else(|| ExecError::Text("image-to-image needs the VAE encoder, loaded when runs may give an image".into()))?;
    let n = scheduler.timesteps().len() as f64;
    let t_start = (n - (n * strength).min(n)).max(0.0) as usize;
    scheduler.set_begin_index(t_start);
    let (w, h) = (cx.run.shape.width as i64, cx.run.shape.height as i64);
    let image = Tensor::from_slice(&runner_core::image::to_normalized_chw(&init.image.resize_lanczos(w as u32, h as u32))).view([1, 3, h, w]);
    cx.dump.push("image.input", &image);
    cx.enter("vae")?;
    tch::manual_seed(cx.seed as i64);
    let image_latents = cx.encode_image(encoder, flux.vae_kind, &image, tch::Device::Cpu, draw_kind);
    let image_latents = Tensor::cat(&(0..shape[0]).map(|_| image_latents.shallow_clone()).collect::<Vec<_>>(), 0);
    let noise = Tensor::randn(shape, (draw_kind, tch::Device::Cpu));
    cx.dump.push("latents.image", &image_latents);
    cx.dump.push("latents.noise", &noise);
    let latents = tch::no_grad(|| scheduler.add_noise(&image_latents, &noise, t_start));
    Ok((pack(&latents), t_start))
}

//! diffusers' `StableDiffusionXLInpaintPipeline`, over the components of [`StableDiffusionXl`]:
//! SDXL's conditioning (micro-conditioning sizes: the requested ones), then the inpainting steps
//! SD shares ([`super::stable_diffusion_inpaint::denoise`]): a 9-channel inpainting UNet (SDXL
//! inpainting 0.1) or the mask blend with an ordinary UNet; default strength 0.9999.

use std::time::Instant;

use super::stable_diffusion_inpaint::{denoise, Parts};
use super::stable_diffusion_xl::StableDiffusionXl;
use super::{Call, Generated};
use crate::exec::ExecError;

pub(super) fn call(xl: &StableDiffusionXl, cx: &mut Call<'_>) -> Result<Generated, ExecError> {
    if cx.pipeline.index.config.get("requires_aesthetics_score").and_then(|v| v.as_bool()) == Some(true) {
        return Err(ExecError::Unsupported("this SDXL pipeline `requires_aesthetics_score` (a refiner): its aesthetic-score conditioning is not implemented".into()));
    }
    let r = &cx.m.manifest.run;
    let (prompt_2, negative_prompt_2) = (r.prompt_2.clone(), r.negative_prompt_2.clone());
    let do_cfg = cx.run.guidance_scale > 1.0;
    let batch = cx.run.shape.batch as i64;
    let (te2, un) = (cx.dev("text_encoder_2"), cx.dev("unet"));
    // 3. Encode the prompt.
    let t_enc = Instant::now();
    let cond = tch::no_grad(|| xl.encode_prompt(cx, do_cfg, batch))?;
    let on_unet = |t: &tch::Tensor| t.to_device(un.device).to_kind(un.kind);
    let context = on_unet(&cond.prompt_embeds);
    cx.dump.push("unet.encoder_hidden_states", &context);
    let parts = Parts {
        unet: &xl.unet.model,
        encoder: xl.vae_encoder.as_ref(),
        vae: &xl.vae.model,
        vae_kind: xl.vae_kind,
        context,
        draw_kind: te2.kind,
        added: Some((on_unet(&cond.text_embeds), on_unet(&cond.time_ids))),
        encode_s: t_enc.elapsed().as_secs_f64(),
    };
    let mut g = denoise(cx, parts)?;
    g.prompt_2 = prompt_2;
    g.negative_prompt_2 = negative_prompt_2;
    Ok(g)
}

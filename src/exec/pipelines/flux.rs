//! diffusers' `FluxPipeline` (FLUX.1 dev and schnell): CLIP's pooled output and T5's states, the
//! rectified-flow transformer on 2x2-packed latent tokens with rotary ids, FLUX.1-dev's embedded
//! guidance, diffusers' optional true classifier-free guidance (a second transformer pass with the
//! negative prompt), and the 16-channel VAE with a shift.

use std::time::Instant;

use tch::nn::VarStore;
use tch::{Kind, Tensor};

use super::{truncation_warning, vae_scale_factor, Call, Generated, Pipeline, Step};
use crate::checkpoint::load::Mapped;
use crate::exec::loading::{joined, Held, Loader};
use crate::exec::text::{T5TextEncoder, TextEncoder};
use crate::exec::ExecError;
use crate::models::flux_transformer::FluxTransformer2DModel;
use crate::models::vae::{AutoencoderKLDecoder, AutoencoderKLEncoder};

pub(crate) struct Flux {
    text_encoder: TextEncoder,
    text_encoder_2: T5TextEncoder,
    transformer: FluxTransformer2DModel,
    vae: Held<AutoencoderKLDecoder>,
    /// Image-to-image's VAE encoder: loaded when runs may give an image.
    vae_encoder: Option<Held<AutoencoderKLEncoder>>,
    vae_kind: Kind,
}

/// What `encode_prompt` gives the transformer for one prompt.
struct Conditioning {
    /// T5's states [B, max_sequence_length, joint_attention_dim].
    prompt_embeds: Tensor,
    /// CLIP's pooled output [B, pooled_projection_dim].
    pooled_prompt_embeds: Tensor,
    /// zeros [max_sequence_length, 3]: text tokens have no position on the image grid.
    text_ids: Tensor,
}

impl Flux {
    pub fn load(lx: &Loader) -> Result<Self, ExecError> {
        let c = lx.configs;
        let (te, te2, tr, va) = (lx.placed("text_encoder")?, lx.placed("text_encoder_2")?, lx.placed("transformer")?, lx.placed("vae")?);
        let t5_cfg = c.t5.as_ref().ok_or_else(|| ExecError::Unsupported("the pipeline has no T5 `text_encoder_2` config".into()))?;
        let tr_cfg = c.flux_transformer.as_ref().ok_or_else(|| ExecError::Unsupported("the pipeline has no FLUX `transformer` config".into()))?;
        let (text_encoder, text_encoder_2, transformer, vae) = std::thread::scope(|s| {
            let te = s.spawn(|| lx.text_encoder("text_encoder", &te, &c.text_encoder, "tokenizer"));
            let te2 = s.spawn(|| lx.t5("text_encoder_2", &te2, t5_cfg, "tokenizer_2"));
            let tr = s.spawn(|| lx.flux_transformer(&tr, tr_cfg));
            // FluxPipeline decodes in the VAE's dtype (no `force_upcast`).
            let vae = lx.vae(&va, false);
            (joined(te), joined(te2), joined(tr), vae)
        });
        let (vae, vae_kind) = vae?;
        let vae_encoder = if lx.images { Some(lx.vae_encoder(&va, vae_kind)?) } else { None };
        Ok(Flux { text_encoder: text_encoder?, text_encoder_2: text_encoder_2?, transformer: transformer?, vae, vae_encoder, vae_kind })
    }

    /// `encode_prompt`: CLIP's pooled output (`_get_clip_prompt_embeds`) and T5's last hidden
    /// state (`_get_t5_prompt_embeds`), each repeated `batch` times, and the text ids.
    fn encode_prompt(&self, cx: &mut Call, prompt: &str, prompt_2: &str, max_len: usize, batch: i64, branch: &str) -> Result<Conditioning, ExecError> {
        let (clip, t5) = (&self.text_encoder, &self.text_encoder_2);
        cx.enter("text_encoder")?;
        let (ids, out, truncated) = clip.run(prompt)?;
        truncation_warning(clip, truncated, &mut cx.warnings);
        cx.dump.push(format!("tokens.{branch}.input_ids"), &ids);
        cx.enter("text_encoder_2")?;
        let (ids_2, states, truncated) = t5.run(prompt_2, max_len)?;
        if let Some(t) = truncated {
            cx.warnings.push(format!("The following part of your input was truncated because `max_sequence_length` is set to {max_len} tokens: {}", super::shown(&t)));
        }
        cx.dump.push(format!("tokens.{branch}.input_ids_2"), &ids_2);
        // diffusers: the text ids in the CLIP encoder's dtype.
        let text_ids = Tensor::zeros([states.size()[1], 3], (cx.dev("text_encoder").kind, tch::Device::Cpu));
        Ok(Conditioning { prompt_embeds: states.repeat([batch, 1, 1]), pooled_prompt_embeds: out.pooled.repeat([batch, 1]), text_ids })
    }
}

/// `_pack_latents`: [B, C, h, w] -> [B, (h/2)(w/2), 4C], each token a 2x2 patch.
fn pack(latents: &Tensor) -> Tensor {
    let (b, c, h, w) = latents.size4().expect("[B, C, H, W] latents");
    latents.view([b, c, h / 2, 2, w / 2, 2]).permute([0, 2, 4, 1, 3, 5]).reshape([b, (h / 2) * (w / 2), c * 4])
}

/// `_unpack_latents`: the inverse of [`pack`] for a latent grid of `h` x `w`.
fn unpack(latents: &Tensor, h: i64, w: i64) -> Tensor {
    let (b, _, channels) = latents.size3().expect("[B, S, C] packed latents");
    latents.view([b, h / 2, w / 2, channels / 4, 2, 2]).permute([0, 3, 1, 4, 2, 5]).reshape([b, channels / 4, h, w])
}

/// `_prepare_latent_image_ids`: (index 0, row, column) of each packed token on the (h/2, w/2) grid.
fn latent_image_ids(h: i64, w: i64, kind: Kind) -> Tensor {
    let rows = Tensor::arange(h, (Kind::Float, tch::Device::Cpu)).view([h, 1]).expand([h, w], false);
    let cols = Tensor::arange(w, (Kind::Float, tch::Device::Cpu)).view([1, w]).expand([h, w], false);
    Tensor::stack(&[Tensor::zeros([h, w], (Kind::Float, tch::Device::Cpu)), rows, cols], -1).reshape([h * w, 3]).to_kind(kind)
}

impl Pipeline for Flux {
    fn components(&self) -> Vec<(&'static str, &VarStore, &Mapped)> {
        vec![
            ("text_encoder", self.text_encoder.varstore(), self.text_encoder.mapped()),
            ("text_encoder_2", self.text_encoder_2.varstore(), self.text_encoder_2.mapped()),
            ("transformer", self.transformer.varstore(), self.transformer.mapped()),
            ("vae", &self.vae.vs, &self.vae.mapped),
        ]
    }

    fn call(&self, cx: &mut Call<'_>) -> Result<Generated, ExecError> {
        let m = cx.m;
        let r = &m.manifest.run;
        let steps = cx.run.steps as usize;
        let guidance_scale = cx.run.guidance_scale;
        let max_len = cx.run.shape.max_sequence_length as usize;
        // diffusers: a second pass only with a negative prompt (preflight warns otherwise).
        let (do_true_cfg, true_cfg_scale) = (cx.run.true_cfg_scale.is_some(), cx.run.true_cfg_scale.unwrap_or(1.0));
        let batch = cx.run.shape.batch as i64;
        let tr = cx.dev("transformer");
        let transformer = &self.transformer;

        // 1. Encode the prompt (and, for true CFG, the negative one).
        let t_enc = Instant::now();
        let prompt = r.prompt.clone().unwrap_or_default();
        let prompt_2 = r.prompt_2.clone().unwrap_or_else(|| prompt.clone());
        let pos = tch::no_grad(|| self.encode_prompt(cx, &prompt, &prompt_2, max_len, batch, "prompt"))?;
        cx.dump.push("prompt_embeds", &pos.prompt_embeds);
        cx.dump.push("pooled_prompt_embeds", &pos.pooled_prompt_embeds);
        cx.dump.push("text_ids", &pos.text_ids);
        let neg = if do_true_cfg {
            let n1 = r.negative_prompt.clone().unwrap_or_default();
            let n2 = r.negative_prompt_2.clone().unwrap_or_else(|| n1.clone());
            let neg = tch::no_grad(|| self.encode_prompt(cx, &n1, &n2, max_len, batch, "negative"))?;
            cx.dump.push("negative_prompt_embeds", &neg.prompt_embeds);
            cx.dump.push("negative_pooled_prompt_embeds", &neg.pooled_prompt_embeds);
            Some(neg)
        } else {
            None
        };
        let draw_kind = pos.prompt_embeds.kind();
        let on_transformer = |c: &Conditioning| {
            let to = |t: &Tensor| t.to_device(tr.device).to_kind(tr.kind);
            Conditioning { prompt_embeds: to(&c.prompt_embeds), pooled_prompt_embeds: to(&c.pooled_prompt_embeds), text_ids: c.text_ids.to_device(tr.device) }
        };
        let (pos, neg) = (on_transformer(&pos), neg.as_ref().map(on_transformer));
        let encode_s = t_enc.elapsed().as_secs_f64();

        // 2. Latents: the seeded draw [B, C, h, w] on a grid of 2 * (H / (vae_scale_factor * 2)),
        //    packed into 2x2-patch tokens; their ids on the (h/2, w/2) grid.
        let scale = vae_scale_factor(&self.vae.model);
        let (h, w) = (2 * (cx.run.shape.height as i64 / (scale * 2)), 2 * (cx.run.shape.width as i64 / (scale * 2)));
        let channels = transformer.config.in_channels / 4;

        // 3. Timesteps: sigmas linspace(1, 1/N, N), shifted with `mu` from the image's tokens
        //    (dev: dynamic shifting) or the config's fixed shift (schnell).
        let sigmas = crate::schedulers::schedule::np_linspace(1.0, 1.0 / steps as f64, steps);
        let (mut scheduler, _) = cx.flow_match_scheduler_sigmas(&sigmas, ((h / 2) * (w / 2)) as usize)?;
        cx.dump_schedule(scheduler.as_ref());
        // FluxImg2ImgPipeline: the encoded image noised to where `strength` begins the schedule
        // (resized to the requested size, a multiple of 16), packed.
        // FluxInpaintPipeline: after each step the kept part is the image's latents at the next
        // sigma (its masked image's latents serve a 384-channel Fill transformer only, and nothing
        // draws from the generator after them here: they are not computed).
        let (latents, t_start, blend) = match cx.init.clone() {
            None => (pack(&cx.initial_noise([batch, channels, h, w], draw_kind)?), 0, None),
            Some(_) => {
                let f = cx.flow_image_latents(self.vae_encoder.as_ref(), self.vae_kind, scheduler.as_mut(), [batch, channels, h, w], draw_kind)?;
                let on = |t: &Tensor| pack(t).to_device(tr.device).to_kind(tr.kind);
                let blend = f.mask.as_ref().map(|m| (on(m), on(&f.image_latents), on(&f.noise)));
                (pack(&f.latents), f.t_start, blend)
            }
        };
        let img_ids = latent_image_ids(h / 2, w / 2, draw_kind);
        cx.dump.push("latents.init", &latents);
        cx.dump.push("latent_image_ids", &img_ids);
        let latents = latents.to_device(tr.device).to_kind(tr.kind);
        let img_ids = img_ids.to_device(tr.device);
        // FLUX.1-dev's embedded guidance (float32, one per sample); schnell has none.
        let guidance = transformer.config.guidance_embeds.then(|| Tensor::full([batch], guidance_scale, (Kind::Float, tr.device)));

        // 4. Denoising loop.
        cx.enter("transformer")?;
        let timesteps = scheduler.timesteps()[t_start..].to_vec();
        let n = timesteps.len();
        let (mut negative_outputs, mut guidances) = (vec![], vec![]);
        let (latents, step_times, denoise_s) = cx.denoise("transformer", &timesteps, latents, tr.device, |latents, j, t| {
            let i = t_start + j;
            // diffusers: `t.expand(B).to(latents.dtype) / 1000`, rounded in the latents' dtype.
            let timestep = Tensor::full([latents.size()[0]], t, (latents.kind(), tr.device)) / 1000.0;
            let run = |c: &Conditioning| {
                tch::no_grad(|| transformer.forward(latents, &c.prompt_embeds, &c.pooled_prompt_embeds, &timestep, guidance.as_ref(), &c.text_ids, &img_ids))
                    .map_err(|e| ExecError::Text(e.to_string()))
                    // A split transformer ends on its last device: the loop's tensors live on its first.
                    .map(|o| o.to_device(tr.device))
            };
            let output = run(&pos)?;
            let noise_pred = match &neg {
                Some(neg) => {
                    let neg_output = run(neg)?;
                    let guided = &neg_output + (&output - &neg_output) * true_cfg_scale;
                    negative_outputs.push(neg_output);
                    guided
                }
                None => output.shallow_clone(),
            };
            if let Some(g) = &guidance {
                guidances.push(g.shallow_clone());
            }
            let input = latents.shallow_clone();
            let mut latents = tch::no_grad(|| scheduler.step(&noise_pred, i, latents)).to_kind(latents.kind());
            if let Some((mask, image_latents, noise)) = &blend {
                let proper = if j + 1 < n { tch::no_grad(|| scheduler.add_noise(image_latents, noise, i + 1)) } else { image_latents.shallow_clone() };
                let kept: Tensor = (1.0 - mask) * proper;
                latents = (kept + mask * &latents).to_kind(latents.kind());
            }
            Ok(Step { input, timestep, output, noise_pred, latents })
        })?;
        for (i, g) in guidances.iter().enumerate() {
            cx.dump.push(format!("step{i}.guidance"), g);
        }
        for (i, t) in negative_outputs.iter().enumerate() {
            cx.dump.push(format!("step{i}.negative_transformer_output"), t);
        }

        // 5. Unpack and decode: `latents / scaling_factor + shift_factor` (the VAE applies both).
        let (images, decode_s) = cx.decode(&self.vae.model, self.vae_kind, &unpack(&latents, h, w))?;
        Ok(Generated {
            images,
            latents,
            steps,
            guidance_scale,
            model_calls: timesteps.len() * if do_true_cfg { 2 } else { 1 },
            step_times,
            encode_s,
            denoise_s,
            decode_s,
            scheduler: scheduler.name().to_string(),
            karras: false,
            prompt_2: r.prompt_2.clone(),
            negative_prompt_2: if do_true_cfg { r.negative_prompt_2.clone() } else { None },
            prompt_3: None,
            negative_prompt_3: None,
            max_sequence_length: Some(max_len),
            true_cfg_scale: do_true_cfg.then_some(true_cfg_scale),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pack_and_unpack_are_inverse_and_match_diffusers_layout() {
        let x = Tensor::arange(2 * 3 * 4 * 6, (Kind::Float, tch::Device::Cpu)).view([2, 3, 4, 6]);
        let p = pack(&x);
        assert_eq!(p.size(), [2, 6, 12]);
        // Token 1 is the 2x2 patch at rows 0..2, columns 2..4; channel-major inside the token.
        let want: Vec<f32> = (0..3).flat_map(|c| [(c, 0, 2), (c, 0, 3), (c, 1, 2), (c, 1, 3)]).map(|(c, r, col)| (c * 24 + r * 6 + col) as f32).collect();
        assert_eq!(Vec::<f32>::try_from(p.get(0).get(1)).unwrap(), want);
        assert!(unpack(&p, 4, 6).equal(&x));
    }

    #[test]
    fn image_ids_are_row_and_column() {
        let ids = latent_image_ids(2, 3, Kind::Float);
        let v: Vec<f32> = Vec::try_from(ids.view([-1])).unwrap();
        assert_eq!(v, [0., 0., 0., 0., 0., 1., 0., 0., 2., 0., 1., 0., 0., 1., 1., 0., 1., 2.]);
    }
}

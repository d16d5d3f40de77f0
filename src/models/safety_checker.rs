//! diffusers' `StableDiffusionSafetyChecker` (pipelines/stable_diffusion/safety_checker.py of
//! diffusers 0.42.1): a transformers `CLIPVisionModel` (models/clip/modeling_clip.py of
//! transformers 5.24), `visual_projection`, and cosine-similarity thresholds against 17 concept
//! and 3 "special care" embeddings; flagged images are replaced by black images.
//!
//! Key layout: transformers 5 saves the nested `CLIPVisionModel` without its inner
//! `vision_model.` (`vision_model.embeddings.class_embedding`); transformers 4 and the original SD
//! 1.5 checkpoints keep it (`vision_model.vision_model.embeddings.class_embedding`), which
//! transformers 5 accepts (`PrefixChange(prefix_to_remove="vision_model")` in
//! conversion_mapping.py). The model's paths follow the checkpoint.

use std::path::Path;

use tch::nn::{Init, VarStore};
use tch::{Device, Kind, Tensor};

pub use crate::arch::safety::{ClipVisionConfig, SafetyCheckerConfig};
use crate::checkpoint::layout::Checkpoint;
use crate::checkpoint::CheckpointError;
use crate::models::clip::{EncoderLayer, LayerNorm, Linear};
use crate::models::image_processor::{ImageProcessor, ImageProcessorError};
use crate::models::weights::{build_from_checkpoint, param, WeightsError};

const MODEL: &str = "StableDiffusionSafetyChecker";

#[derive(Debug, thiserror::Error)]
pub enum SafetyError {
    #[error(transparent)]
    Config(#[from] crate::arch::config::ReadError),
    #[error(transparent)]
    Checkpoint(#[from] CheckpointError),
    #[error(transparent)]
    Weights(#[from] WeightsError),
    #[error(transparent)]
    Processor(#[from] ImageProcessorError),
    #[error("{MODEL}: {0}")]
    Input(String),
    #[error("{MODEL}: libtorch: {0}")]
    Torch(#[from] tch::TchError),
}

/// Everything `StableDiffusionSafetyChecker.forward` computes, per image.
#[derive(Debug)]
pub struct SafetyOutput {
    /// [B, hidden]: the vision tower's `pooler_output` (post_layernorm of the class token), at the model's kind.
    pub pooled: Tensor,
    /// [B, projection_dim]: `visual_projection(pooled)`, at the model's kind.
    pub image_embeds: Tensor,
    /// [B, 3] and [B, 17] float32 on the CPU: `cosine_distance(...).cpu().float()`.
    pub special_cos_dist: Tensor,
    pub cos_dist: Tensor,
    /// `result_img["special_scores"]` / `["concept_scores"]`: rounded to 3 decimals as numpy
    /// rounds float32.
    pub special_scores: Vec<Vec<f32>>,
    pub concept_scores: Vec<Vec<f32>>,
    pub has_nsfw_concepts: Vec<bool>,
}

/// `StableDiffusionSafetyChecker`.
pub struct SafetyChecker {
    config: SafetyCheckerConfig,
    /// Owns the variables the fields below are views of.
    _vs: VarStore,
    /// The mapped checkpoint file same-dtype parameters view.
    _mapped: crate::checkpoint::load::Mapped,
    class_embedding: Tensor,
    patch_embedding: Tensor,
    position_embedding: Tensor,
    pre_layrnorm: LayerNorm,
    layers: Vec<EncoderLayer>,
    post_layernorm: LayerNorm,
    visual_projection: Linear,
    concept_embeds: Tensor,
    special_care_embeds: Tensor,
    /// Thresholds as `.item()` reads them (the parameters at the model's kind, widened).
    concept_embeds_weights: Vec<f64>,
    special_care_embeds_weights: Vec<f64>,
    device: Device,
    kind: Kind,
}

impl std::fmt::Debug for SafetyChecker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SafetyChecker").field("config", &self.config).field("device", &self.device).field("kind", &self.kind).finish()
    }
}

impl SafetyChecker {
    /// Builds the checker from `component_dir/config.json` and fills it from `checkpoint`,
    /// strictly (every key present and shaped as the config says; `position_ids` tolerated).
    pub fn load(component_dir: &Path, checkpoint: &Checkpoint, device: Device, kind: Kind) -> Result<Self, SafetyError> {
        let config = SafetyCheckerConfig::from_file(&component_dir.join("config.json"))?;
        Self::load_with(&config, checkpoint, device, kind)
    }

    pub fn load_with(config: &SafetyCheckerConfig, ck: &Checkpoint, device: Device, kind: Kind) -> Result<Self, SafetyError> {
        let c = &config.vision;
        let vs = VarStore::new(device);
        let nested = ck.tensors.keys().any(|k| k.starts_with("vision_model.vision_model."));
        // The parameters are the checkpoint's tensors (views of the mapped file at the same dtype).
        let (parts, mapped) = build_from_checkpoint(&vs, ck, MODEL, kind, |root| {
            let tower = if nested { &root / "vision_model" / "vision_model" } else { &root / "vision_model" };
            let emb = &tower / "embeddings";
            let grid = c.image_size / c.patch_size;
            let class_embedding = param(&emb, "class_embedding", &[c.hidden_size], Init::Const(0.));
            let patch_embedding = param(&(&emb / "patch_embedding"), "weight", &[c.hidden_size, c.num_channels, c.patch_size, c.patch_size], Init::Const(0.));
            let position_embedding = param(&(&emb / "position_embedding"), "weight", &[grid * grid + 1, c.hidden_size], Init::Const(0.));
            let pre_layrnorm = LayerNorm::new(&tower / "pre_layrnorm", c.hidden_size, c.layer_norm_eps);
            let enc = &tower / "encoder" / "layers";
            let layers: Vec<EncoderLayer> = (0..c.num_hidden_layers).map(|i| EncoderLayer::new(&enc / i, c.hidden_size, c.intermediate_size, c.layer_norm_eps)).collect();
            let post_layernorm = LayerNorm::new(&tower / "post_layernorm", c.hidden_size, c.layer_norm_eps);
            let visual_projection = Linear::new(&root / "visual_projection", c.hidden_size, config.projection_dim, false);
            let concept_embeds = param(&root, "concept_embeds", &[17, config.projection_dim], Init::Const(1.));
            let special_care_embeds = param(&root, "special_care_embeds", &[3, config.projection_dim], Init::Const(1.));
            let cw = param(&root, "concept_embeds_weights", &[17], Init::Const(1.));
            let sw = param(&root, "special_care_embeds_weights", &[3], Init::Const(1.));
            (class_embedding, patch_embedding, position_embedding, pre_layrnorm, layers, post_layernorm, visual_projection, concept_embeds, special_care_embeds, cw, sw)
        })?;
        let (class_embedding, patch_embedding, position_embedding, pre_layrnorm, layers, post_layernorm, visual_projection, concept_embeds, special_care_embeds, cw, sw) = parts;
        let to_vec = |t: &Tensor| -> Result<Vec<f64>, SafetyError> { Ok(Vec::<f64>::try_from(&t.f_to_device(Device::Cpu)?.f_to_kind(Kind::Double)?)?) };
        Ok(SafetyChecker {
            config: config.clone(),
            class_embedding,
            patch_embedding,
            position_embedding,
            pre_layrnorm,
            layers,
            post_layernorm,
            visual_projection,
            concept_embeds,
            special_care_embeds,
            concept_embeds_weights: to_vec(&cw)?,
            special_care_embeds_weights: to_vec(&sw)?,
            _vs: vs,
            _mapped: mapped,
            device,
            kind,
        })
    }

    pub fn config(&self) -> &SafetyCheckerConfig {
        &self.config
    }

    /// `CLIPVisionModel.forward(pixel_values)[1]` (`pooler_output`): [B, 3, S, S] with S =
    /// `image_size` (no position interpolation, as the checker calls it).
    pub fn pooled_output(&self, pixel_values: &Tensor) -> Result<Tensor, SafetyError> {
        let c = &self.config.vision;
        let size = pixel_values.size();
        if size.len() != 4 || size[0] < 1 || size[1] != c.num_channels || size[2] != c.image_size || size[3] != c.image_size {
            return Err(SafetyError::Input(format!(
                "clip_input must be [B, {}, {}, {}], got shape {size:?} (the feature extractor's crop_size must equal vision_config.image_size)",
                c.num_channels, c.image_size, c.image_size
            )));
        }
        if !pixel_values.is_floating_point() {
            return Err(SafetyError::Input(format!("clip_input must be floats, got {:?}", pixel_values.kind())));
        }
        Ok(tch::no_grad(|| self.pooled_checked(pixel_values))?)
    }

    fn pooled_checked(&self, pixel_values: &Tensor) -> Result<Tensor, tch::TchError> {
        let c = &self.config.vision;
        let b = pixel_values.size()[0];
        let x = pixel_values.f_to_device(self.device)?.f_to_kind(self.kind)?;
        // CLIPVisionEmbeddings.forward: patch conv (no bias), class token first, + positions.
        let patches = x.f_conv2d(&self.patch_embedding, None::<&Tensor>, [c.patch_size, c.patch_size], [0, 0], [1, 1], 1)?;
        let patches = patches.f_flatten(2, -1)?.f_transpose(1, 2)?;
        let cls = self.class_embedding.f_expand([b, 1, c.hidden_size], false)?;
        let mut h = Tensor::f_cat(&[cls, patches], 1)?.f_add(&self.position_embedding.f_unsqueeze(0)?)?;
        h = self.pre_layrnorm.forward(&h)?;
        for layer in &self.layers {
            h = layer.forward(&h, c.num_attention_heads, c.hidden_act, false)?;
        }
        // pooled_output = post_layernorm(last_hidden_state[:, 0, :])
        self.post_layernorm.forward(&h.f_select(1, 0)?)
    }

    /// `StableDiffusionSafetyChecker.forward` short of replacing images: the embeddings, the
    /// cosine distances, the rounded scores and the flags, for `clip_input` [B, 3, S, S].
    pub fn forward(&self, clip_input: &Tensor) -> Result<SafetyOutput, SafetyError> {
        let pooled = self.pooled_output(clip_input)?;
        let (image_embeds, special_cos_dist, cos_dist) = tch::no_grad(|| -> Result<_, tch::TchError> {
            let image_embeds = self.visual_projection.forward(&pooled)?;
            let special = cosine_distance(&image_embeds, &self.special_care_embeds)?.f_to_device(Device::Cpu)?.f_to_kind(Kind::Float)?;
            let concept = cosine_distance(&image_embeds, &self.concept_embeds)?.f_to_device(Device::Cpu)?.f_to_kind(Kind::Float)?;
            Ok((image_embeds, special, concept))
        })?;
        let special: Vec<Vec<f32>> = Vec::<Vec<f32>>::try_from(&special_cos_dist)?;
        let concept: Vec<Vec<f32>> = Vec::<Vec<f32>>::try_from(&cos_dist)?;
        let (mut special_scores, mut concept_scores, mut has_nsfw_concepts) = (vec![], vec![], vec![]);
        for (sp, co) in special.iter().zip(&concept) {
            // numpy float32 arithmetic: `concept_cos - concept_threshold + adjustment` with the
            // Python floats cast to float32 (NEP 50), then `round(x, 3)`.
            let mut adjustment = 0.0f32;
            let mut ss = Vec::with_capacity(sp.len());
            for (&cos, &thr) in sp.iter().zip(&self.special_care_embeds_weights) {
                let s = round3(cos - thr as f32 + adjustment);
                ss.push(s);
                if s > 0.0 {
                    adjustment = 0.01f64 as f32;
                }
            }
            let cs: Vec<f32> = co.iter().zip(&self.concept_embeds_weights).map(|(&cos, &thr)| round3(cos - thr as f32 + adjustment)).collect();
            has_nsfw_concepts.push(cs.iter().any(|&s| s > 0.0));
            special_scores.push(ss);
            concept_scores.push(cs);
        }
        Ok(SafetyOutput { pooled, image_embeds, special_cos_dist, cos_dist, special_scores, concept_scores, has_nsfw_concepts })
    }

    /// The variables (for the executor's residency ledger).
    pub fn varstore(&self) -> &VarStore {
        &self._vs
    }

    /// `run_safety_checker` on decoded images [B, H, W, 3] in [0, 1]: the feature extractor, then
    /// `forward`; returns the flags and the images with flagged ones black (a copy when any is).
    pub fn check(&self, processor: &ImageProcessor, images: &Tensor) -> Result<(Vec<bool>, Tensor), SafetyError> {
        let pixel_values = processor.preprocess(images)?;
        let out = self.forward(&pixel_values)?;
        let flags = out.has_nsfw_concepts;
        let images = if flags.iter().any(|&f| f) {
            let copy = images.f_detach_copy()?;
            for (i, _) in flags.iter().enumerate().filter(|(_, &f)| f) {
                let mut row = copy.f_get(i as i64)?;
                let _ = row.f_zero_()?;
            }
            copy
        } else {
            images.shallow_clone()
        };
        Ok((flags, images))
    }
}

/// diffusers' `cosine_distance`: `mm(normalize(a), normalize(b).t())` (`F.normalize`: p = 2,
/// dim 1, eps 1e-12).
fn cosine_distance(a: &Tensor, b: &Tensor) -> Result<Tensor, tch::TchError> {
    let normalize = |x: &Tensor| -> Result<Tensor, tch::TchError> {
        let norm = x.f_norm_scalaropt_dim(2, [1i64], true)?.f_clamp_min(1e-12)?;
        x.f_div(&norm.f_expand_as(x)?)
    };
    normalize(a)?.f_mm(&normalize(b)?.f_transpose(0, 1)?)
}

/// Python's `round(np.float32, 3)`: `np.round` multiplies by 1000, rounds half to even and
/// divides, all in float32.
fn round3(x: f32) -> f32 {
    (x * 1000.0f32).round_ties_even() / 1000.0f32
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::arch::clip::Activation;

    #[test]
    fn config_defaults_and_errors() {
        let c = SafetyCheckerConfig::from_json(&serde_json::json!({"projection_dim": 768, "vision_config": {"hidden_size": 1024, "num_attention_heads": 16, "patch_size": 14}})).unwrap();
        assert_eq!((c.projection_dim, c.vision.hidden_size, c.vision.image_size, c.vision.num_hidden_layers, c.vision.hidden_act), (768, 1024, 224, 12, Activation::QuickGelu));
        let e = SafetyCheckerConfig::from_json(&serde_json::json!({"vision_config": {"hidden_act": "xielu"}})).unwrap_err().to_string();
        assert!(e.contains("config.json") && e.contains("vision_config.hidden_act") && e.contains("xielu"), "{e}");
        let e = SafetyCheckerConfig::from_json(&serde_json::json!({"vision_config": {"image_size": [224, 224]}})).unwrap_err().to_string();
        assert!(e.contains("vision_config.image_size"), "{e}");
        let e = SafetyCheckerConfig::from_json(&serde_json::json!({"projection_dim": "x"})).unwrap_err().to_string();
        assert!(e.contains("`projection_dim`"), "{e}");
    }

    #[test]
    fn round3_matches_numpy_float32() {
        // np.round(np.float32(x), 3) values (half to even on the scaled float32).
        assert_eq!(round3(0.0003), 0.0);
        assert_eq!(round3(0.0005), 0.0);
        assert_eq!(round3(0.0015), 0.002);
        assert_eq!(round3(-0.0004), -0.0);
        assert_eq!(round3(0.12345), 0.123);
    }
}

//! Prompt encoding (tokenizer + CLIP text encoder, diffusers `encode_prompt`) and the optional
//! latents file.

use std::path::Path;

use tch::{Kind, Tensor};

use super::ExecError;
use crate::checkpoint::layout::{resolve_source, Checkpoint, PipelineFolder, VariantPolicy};
use crate::checkpoint::load::{load, LoadOptions};
use crate::models::clip::{ClipTextConfig, ClipTextModel, ClipTextOutput};
use crate::models::t5::{T5Config, T5EncoderModel};
use crate::models::t5_tokenizer::T5Tokenizer;
use crate::models::tokenizer::ClipTokenizer;

pub struct TextEncoder {
    tokenizer: ClipTokenizer,
    model: ClipTextModel,
}

impl TextEncoder {
    /// `cfg` is the text encoder's config as preflight read it; `tokenizer` the pipeline's
    /// subfolder.
    pub fn load(pipeline: &PipelineFolder, ck: &Checkpoint, device: tch::Device, kind: Kind, cfg: &ClipTextConfig, tokenizer: &str) -> Result<TextEncoder, ExecError> {
        let tok_dir = pipeline.root.join(tokenizer);
        let tokenizer = ClipTokenizer::from_folder(&tok_dir).map_err(|e| ExecError::Text(e.to_string()))?;
        let model = ClipTextModel::load(cfg, ck, device, kind).map_err(|e| ExecError::Text(e.to_string()))?;
        Ok(TextEncoder { tokenizer, model })
    }

    pub fn varstore(&self) -> &tch::nn::VarStore {
        self.model.varstore()
    }

    /// The mapped checkpoint files its same-dtype CPU weights view.
    pub fn mapped(&self) -> &crate::checkpoint::load::Mapped {
        self.model.mapped()
    }

    pub fn max_length(&self) -> usize {
        self.tokenizer.max_length()
    }

    /// Tokenizes and encodes one text: ids [1, 77], every output of the encoder, and the
    /// truncated text, if any.
    pub fn run(&self, text: &str) -> Result<(Tensor, ClipTextOutput, Option<String>), ExecError> {
        let enc = self.tokenizer.encode(text);
        let ids = Tensor::from_slice(&enc.ids).to_kind(Kind::Int64).unsqueeze(0);
        let out = self.model.forward(&ids).map_err(|e| ExecError::Text(e.to_string()))?;
        Ok((ids, out, enc.truncated))
    }

    /// SD's prompt embeddings (diffusers `StableDiffusionPipeline.encode_prompt`): the final layer
    /// norm of the last layer, or with `clip_skip` of layer -(clip_skip + 1).
    pub fn sd_embeds(&self, out: &ClipTextOutput, clip_skip: Option<u32>) -> Result<Tensor, ExecError> {
        match clip_skip {
            None | Some(0) => Ok(out.last_hidden_state.shallow_clone()),
            Some(k) => {
                let n = out.hidden_states.len();
                let idx = n.checked_sub(k as usize + 1).ok_or_else(|| ExecError::Text(format!("clip_skip {k} is more than the text encoder's {} layers", n - 1)))?;
                self.model.apply_final_layer_norm(&out.hidden_states[idx]).map_err(|e| ExecError::Text(e.to_string()))
            }
        }
    }

    /// SDXL's per-encoder embeddings (`StableDiffusionXLPipeline.encode_prompt`): the hidden state
    /// of layer -(clip_skip + 2), penultimate by default, without the final layer norm.
    pub fn sdxl_embeds(&self, out: &ClipTextOutput, clip_skip: Option<u32>) -> Result<Tensor, ExecError> {
        let n = out.hidden_states.len();
        let back = clip_skip.unwrap_or(0) as usize + 2;
        let idx = n.checked_sub(back).ok_or_else(|| ExecError::Text(format!("clip_skip {} is more than the text encoder's {} layers", back - 2, n - 1)))?;
        Ok(out.hidden_states[idx].shallow_clone())
    }
}

/// SD3's and FLUX's T5 text encoder with its tokenizer (diffusers `_get_t5_prompt_embeds`).
pub struct T5TextEncoder {
    tokenizer: T5Tokenizer,
    model: T5EncoderModel,
}

impl T5TextEncoder {
    /// `cfg` is the encoder's config as preflight read it; `tokenizer` the pipeline's subfolder.
    pub fn load(pipeline: &PipelineFolder, ck: &Checkpoint, device: tch::Device, kind: Kind, cfg: &T5Config, tokenizer: &str) -> Result<T5TextEncoder, ExecError> {
        let tokenizer = T5Tokenizer::from_folder(&pipeline.root.join(tokenizer)).map_err(|e| ExecError::Text(e.to_string()))?;
        let model = T5EncoderModel::load(cfg, ck, device, kind).map_err(|e| ExecError::Text(e.to_string()))?;
        Ok(T5TextEncoder { tokenizer, model })
    }

    pub fn varstore(&self) -> &tch::nn::VarStore {
        self.model.varstore()
    }

    pub fn mapped(&self) -> &crate::checkpoint::load::Mapped {
        self.model.mapped()
    }

    /// Ids [1, max_length] (padded, truncated with `</s>` kept), the last hidden state, and the
    /// truncated text, if any.
    pub fn run(&self, text: &str, max_length: usize) -> Result<(Tensor, Tensor, Option<String>), ExecError> {
        let enc = self.tokenizer.encode(text, max_length).map_err(|e| ExecError::Text(e.to_string()))?;
        let ids = Tensor::from_slice(&enc.ids).unsqueeze(0);
        let states = self.model.forward(&ids).map_err(|e| ExecError::Text(e.to_string()))?;
        Ok((ids, states, enc.truncated))
    }
}

/// `run.latents`: a safetensors file with one tensor (or one named `latents`) of the job's shape.
pub fn load_latents(path: &Path, shape: &[i64]) -> Result<Tensor, ExecError> {
    let ck = Checkpoint::open(resolve_source(path, None, None, VariantPolicy::Require)?)?;
    let name = if ck.tensors.contains_key("latents") {
        "latents".to_string()
    } else if ck.tensors.len() == 1 {
        ck.tensors.keys().next().expect("one").clone()
    } else {
        return Err(ExecError::Text(format!("`{}` holds {} tensors: name the latents `latents`", path.display(), ck.tensors.len())));
    };
    let store = load(&ck, Some(&[name.as_str()]), LoadOptions { float_kind: Some(Kind::Float), device: tch::Device::Cpu, populate: false })?;
    let t = store.get(&name).expect("loaded").copy();
    if t.size() != shape {
        return Err(ExecError::Text(format!("`{}`: tensor `{name}` has shape {:?}, the job needs {shape:?} ([batch, channels, height/8, width/8])", path.display(), t.size())));
    }
    Ok(t)
}

//! Model code, one file per diffusers/transformers module, struct and field names following the
//! checkpoint keys so that real checkpoints load unchanged.

pub mod attention;
pub mod cast;
pub mod clip;
pub mod embeddings;
pub mod flux_blocks;
pub mod flux_transformer;
pub mod hooks;
pub mod image_processor;
pub mod lora;
pub mod mmdit_blocks;
pub mod quantized;
pub mod resnet;
pub mod safety_checker;
pub mod sd3_transformer;
pub mod t5;
pub mod t5_tokenizer;
pub mod tokenizer;
pub mod unet_2d;
pub mod unet_2d_blocks;
pub mod vae;
pub mod weights;

/// A model config runner cannot run, or weights that do not fit it.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error(transparent)]
    Config(#[from] crate::arch::config::ConfigError),
    #[error(transparent)]
    Weights(#[from] weights::WeightsError),
}

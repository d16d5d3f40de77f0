//! Model code, one file per diffusers/transformers module, struct and field names following the
//! checkpoint keys so that real checkpoints load unchanged.

pub mod clip;
pub mod tokenizer;
pub mod weights;

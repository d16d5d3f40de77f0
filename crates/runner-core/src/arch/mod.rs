//! What each model architecture is, from its `config.json` alone: the typed configs (read
//! strictly: a present key of the wrong type or an impossible value is an error naming the file
//! and key), which layers layerwise casting converts, and the VAE's tile. No tch: preflight and
//! the planner read these without loading a weight, and the model code is built from them.

pub mod cast;
pub mod clip;
pub mod config;
pub mod flux;
pub mod safety;
pub mod sd3;
pub mod t5;
pub mod unet;
pub mod vae;

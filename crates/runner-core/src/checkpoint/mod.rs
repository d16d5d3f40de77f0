//! Checkpoints on disk: safetensors files (single or sharded with an index) in the diffusers
//! folder layout, read from headers alone for sizes, mapped for loading, and written as shards;
//! GGUF files ([`gguf`]).

pub mod convert;
pub mod ggml;
pub mod gguf;
pub mod index;
pub mod inspect;
pub mod layout;
pub mod lora;
pub mod quantize;
pub mod safetensors;
pub mod shard;
pub mod sigbus;

use std::path::{Path, PathBuf};

/// A problem with a checkpoint file; every variant names the file, and the tensor where one is at fault.
#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    #[error("cannot read `{}`: {source}", path.display())]
    Io { path: PathBuf, source: std::io::Error },
    #[error("`{}`: {msg}", path.display())]
    Format { path: PathBuf, msg: String },
    #[error("`{}`: tensor `{tensor}`: {msg}", path.display())]
    Tensor { path: PathBuf, tensor: String, msg: String },
}

impl CheckpointError {
    pub fn format(path: &Path, msg: impl Into<String>) -> Self {
        CheckpointError::Format { path: path.to_path_buf(), msg: msg.into() }
    }
    pub fn tensor(path: &Path, tensor: &str, msg: impl Into<String>) -> Self {
        CheckpointError::Tensor { path: path.to_path_buf(), tensor: tensor.to_string(), msg: msg.into() }
    }
    pub fn io(path: &Path, source: std::io::Error) -> Self {
        CheckpointError::Io { path: path.to_path_buf(), source }
    }
    /// The file at fault.
    pub fn path(&self) -> &Path {
        match self {
            CheckpointError::Io { path, .. } | CheckpointError::Format { path, .. } | CheckpointError::Tensor { path, .. } => path,
        }
    }
}

/// Opens the pipeline a manifest describes: its folder, with each component's `source`,
/// `variant` and `enabled` applied (relative paths resolved by where they were set).
pub fn open_for_manifest(m: &crate::manifest::LoadedManifest) -> Result<layout::PipelineFolder, CheckpointError> {
    if let Some(msg) = m.hub_problems() {
        return Err(CheckpointError::format(&m.path, msg));
    }
    let specs = m
        .manifest
        .components
        .iter()
        .map(|(name, c)| {
            let source = c.source.as_ref().map(|p| m.resolve_path(&format!("components.{name}.source"), p));
            (name.clone(), layout::ComponentSpec { source, variant: c.variant.clone(), enabled: c.enabled })
        })
        .collect();
    layout::PipelineFolder::open_with(&m.pipeline_source(), m.manifest.pipeline.variant.as_deref(), &specs)
}

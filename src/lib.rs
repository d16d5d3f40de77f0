//! runner: run diffusion pipelines (Stable Diffusion 1.x/2.x, SDXL, SD3, FLUX.1) from
//! version-controlled TOML manifests on libtorch.
//!
//! The planning side (manifests, checkpoint headers, preflight, the planner, locks) is
//! [`runner_core`]'s, re-exported here under the same paths; this crate adds what runs tensors:
//! [`models`] (one file per diffusers/transformers module), [`schedulers`] (their steps),
//! [`exec`] (loading, offload, the pipelines), [`runtime`] (libtorch start-up) and the weights'
//! loading ([`checkpoint::load`]). Without the default `torch` feature it holds the re-exports
//! only (the light `runner` binary).

pub use runner_core::{arch, device, diag, fsutil, lock, manifest, parity, plan, preflight, scheduling, units};

#[cfg(feature = "torch")]
pub mod checkpoint;
#[cfg(not(feature = "torch"))]
pub use runner_core::checkpoint;
#[cfg(feature = "torch")]
pub mod exec;
#[cfg(feature = "torch")]
pub mod models;
#[cfg(feature = "torch")]
pub mod runtime;
#[cfg(feature = "torch")]
pub mod schedulers;

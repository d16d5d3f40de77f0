//! runner: run diffusion pipelines (Stable Diffusion 1.5, SDXL) from version-controlled TOML
//! manifests on libtorch.
//!
//! Modules, one concern each: [`manifest`] (types, layering, validation), [`units`] and
//! [`device`] (the value grammars manifests share with planning), [`diag`] (diagnostics that
//! point at their source), [`runtime`] (libtorch start-up), [`fsutil`] (writing outputs without
//! damaging anything).

pub mod arch;
pub mod checkpoint;
pub mod device;
pub mod diag;
pub mod exec;
pub mod fsutil;
pub mod lock;
pub mod manifest;
pub mod models;
#[doc(hidden)]
pub mod parity;
pub mod plan;
pub mod preflight;
pub mod runtime;
pub mod schedulers;
pub mod units;

//! runner's planning side, with no libtorch in it: everything about a run that can be known
//! without running a tensor. The `runner` binary is built on this crate alone, so that the
//! commands that compute nothing (validate, plan, inspect, lock, shard) start in milliseconds and
//! need no libtorch on the machine; the `runner` library adds the models and the executor.
//!
//! Modules, one concern each: [`manifest`] (types, layering, validation), [`units`] and
//! [`device`] (the value grammars manifests share with planning), [`diag`] (diagnostics that
//! point at their source), [`checkpoint`] (headers, layouts, writing shards), [`arch`] (model
//! configs), [`preflight`] (a manifest against its folder), [`plan`] (the device map),
//! [`scheduling`] (schedules from scheduler configs), [`lock`], [`batch`] (prompt files),
//! [`fsutil`] (writing outputs without damaging anything), [`cli`] (the command line).

pub mod arch;
pub mod batch;
pub mod checkpoint;
pub mod cli;
pub mod device;
pub mod diag;
pub mod fsutil;
pub mod hub;
pub mod image;
pub mod lock;
pub mod manifest;
#[doc(hidden)]
pub mod parity;
pub mod plan;
pub mod preflight;
pub mod scheduling;
pub mod units;

//! Checkpoints: everything read from headers and configs is [`runner_core::checkpoint`]'s; here,
//! the weights themselves, mapped and converted for libtorch ([`load`]).

pub use runner_core::checkpoint::*;

pub mod load;

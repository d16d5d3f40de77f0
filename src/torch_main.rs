//! `runner-torch`: the commands that run tensors (`run`, `serve`, `info`) on libtorch. Users call
//! `runner`, which hands these commands here with the same arguments; every other command runs
//! here too, as in `runner`.

mod batch;
mod cli;
mod serve;

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    // SAFETY: restoring a signal's default disposition before any thread starts (see `runner`).
    unsafe { libc::signal(libc::SIGPIPE, libc::SIG_DFL) };
    runner::runtime::configure_allocator();
    let parsed = runner_core::cli::Cli::parse();
    runner_core::cli::init_logging();
    runner_core::cli::report(cli::run(parsed))
}

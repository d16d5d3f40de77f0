//! `runner`: the command line users call. Commands that compute nothing (validate, plan, inspect,
//! lock, shard, config, schema) run here, in a binary that does not link libtorch and starts in
//! milliseconds; `run`, `serve` and `info` are handed to `runner-torch` (beside this binary, or
//! `RUNNER_TORCH`) with the same arguments, by `exec`: the same process, pid, signals, streams
//! and exit status, so one command line serves both.

use std::process::ExitCode;

use clap::Parser;
use runner_core::cli;

fn main() -> ExitCode {
    // Output piped into `head` ends quietly, as with other Unix tools (Rust ignores SIGPIPE, and
    // `println!` then panics on the broken pipe).
    // SAFETY: restoring a signal's default disposition before any thread starts.
    unsafe { libc::signal(libc::SIGPIPE, libc::SIG_DFL) };
    let parsed = cli::Cli::parse();
    if parsed.needs_libtorch() {
        return cli::exec_torch(&parsed);
    }
    cli::init_logging();
    cli::report(cli::run(parsed))
}

//! One integration-test binary (as ripgrep and just do): CLI behaviour, diagnostics snapshots,
//! layering, the schema, and libtorch linkage.

mod checkpoint;
mod cli;
mod diagnostics;
mod layering;
mod load;
mod lock;
mod schema;
mod setup;
mod shard;
mod torch;

pub mod util {
    use std::path::{Path, PathBuf};

    use assert_cmd::Command;

    pub fn root() -> &'static Path {
        Path::new(env!("CARGO_MANIFEST_DIR"))
    }

    pub fn data(rel: &str) -> PathBuf {
        root().join("tests/data").join(rel)
    }

    /// The `runner` binary, run from the repository root, with the caller's `RUNNER_*`
    /// variables removed (bat does this for `BAT_*`) and colour off.
    pub fn runner() -> Command {
        let mut cmd = Command::cargo_bin("runner").expect("runner binary");
        for (k, _) in std::env::vars_os() {
            if k.to_string_lossy().starts_with("RUNNER_") {
                cmd.env_remove(&k);
            }
        }
        cmd.current_dir(root()).env("NO_COLOR", "1").env("OMP_NUM_THREADS", "1").env_remove("RUST_LOG");
        cmd
    }

    /// Runs the command and returns (exit code, stdout, stderr).
    pub fn run(cmd: &mut Command) -> (i32, String, String) {
        let out = cmd.output().expect("runs");
        (
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }
}

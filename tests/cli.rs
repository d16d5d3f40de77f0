//! The shipped manifests, `--help`, `info`, and clap's own errors.

use crate::util::{run, runner};

#[test]
fn shipped_manifests_validate() {
    let mut files: Vec<_> = std::fs::read_dir(crate::util::root().join("manifests"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "toml"))
        .map(|p| p.strip_prefix(crate::util::root()).unwrap().to_path_buf())
        .collect();
    files.sort();
    assert!(files.len() >= 4, "{files:?}");
    // The manifests alone: no errors; the only warnings are about model folders not committed.
    let (code, stdout, stderr) = run(runner().args(["validate", "--manifest-only"]).args(&files));
    assert_eq!(code, 0, "{stderr}");
    for f in &files {
        assert!(stdout.contains(&format!("ok: {}", f.display())), "{stdout}");
    }
    for line in stderr.lines().filter(|l| l.starts_with("warning:") || l.starts_with("error:")) {
        assert!(line.starts_with("warning:") && line.contains("does not exist (yet)"), "{line}");
    }
    // With their pipeline folders: the tiny ones run; the real ones cannot here, and say why.
    // (an empty Hugging Face cache: the real ones name their models `hf://…`)
    let cache = tempfile::tempdir().unwrap();
    let (code, stdout, stderr) = run(runner().arg("validate").args(&files).env("HF_HUB_CACHE", cache.path()));
    assert_eq!(code, 1);
    for f in &files {
        let tiny = f.to_string_lossy().contains("tiny");
        assert_eq!(stdout.contains(&format!("ok: {}", f.display())), tiny, "{stdout}");
        assert_eq!(stderr.contains(&format!("invalid: {}", f.display())), !tiny, "{stderr}");
    }
    assert!(stderr.contains("is not in the Hugging Face cache") && stderr.contains("runner pull manifests/sdxl.toml"), "{stderr}");
}

#[test]
fn seed_example_is_the_seed_scenario() {
    let (code, stdout, stderr) = run(runner().args(["config", "--json", "manifests/sdxl.toml"]));
    assert_eq!(code, 0, "{stderr}");
    let v: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    let m = &v["manifest"];
    assert_eq!(m["pipeline"]["kind"], "stable-diffusion-xl");
    assert_eq!(m["pipeline"]["dtype"], "fp16");
    assert_eq!(m["placement"]["strategy"], "balanced");
    assert_eq!(m["placement"]["max_memory"]["cuda:0"], 24u64 << 30);
    assert_eq!(m["placement"]["max_memory"]["cuda:1"], 24u64 << 30);
    assert_eq!(m["run"]["prompt"], "a cute dog running on the grass");
    assert_eq!(m["run"]["steps"], 30);
    assert!(m["components"]["unet"]["source"].as_str().unwrap().contains("sharded"));
}

#[test]
fn help_explains_layers_and_sizes() {
    let (code, stdout, _) = run(runner().args(["validate", "--help"]));
    assert_eq!(code, 0);
    for needle in ["RUNNER_RUN__STEPS", "--set", "KiB", "lowercase b", "Exit status"] {
        assert!(stdout.contains(needle), "{needle} missing from:\n{stdout}");
    }
}

#[test]
fn usage_errors_are_not_panics() {
    let (code, _, stderr) = run(runner().arg("validate"));
    assert_eq!(code, 2, "clap's usage error code");
    assert!(stderr.contains("FILE"), "{stderr}");
    let (code, _, _) = run(runner().arg("frobnicate"));
    assert_eq!(code, 2);
}

#[test]
fn validate_json_report_for_valid_files() {
    let (code, stdout, _) = run(runner().args(["validate", "--json", "--manifest-only", "tests/data/good/warnings.toml"]));
    assert_eq!(code, 0);
    let v: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(v["valid"], true);
    let f = &v["files"][0];
    assert_eq!(f["errors"], 0);
    assert_eq!(f["warnings"], 5);
    let d = &f["diagnostics"][0];
    assert_eq!(d["severity"], "warning");
    assert_eq!(d["file"], "tests/data/good/warnings.toml");
    assert_eq!(d["key"], "pipeline.source");
    assert_eq!((d["line"].as_u64(), d["column"].as_u64()), (Some(6), Some(10)));
}

#[test]
fn devices_and_huge_files_are_not_manifests() {
    // `validate /dev/urandom` must not read forever; a 2 MiB file is refused by size.
    let (code, _, stderr) = run(runner().args(["validate", "/dev/urandom"]));
    assert_eq!(code, 1);
    assert!(stderr.contains("`/dev/urandom` is not a regular file"), "{stderr}");
    let dir = tempfile::tempdir().unwrap();
    let big = dir.path().join("big.toml");
    std::fs::write(&big, format!("name = \"{}\"\n", "x".repeat(2 << 20))).unwrap();
    let (code, _, stderr) = run(runner().arg("validate").arg(&big));
    assert_eq!(code, 1);
    assert!(stderr.contains("is larger than 1 MiB"), "{stderr}");
    // A FIFO is read by intent (process substitution).
    let fifo = dir.path().join("m.toml");
    let c = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
    let text = std::fs::read_to_string(crate::util::root().join("tests/data/good/full.toml")).unwrap();
    let writer = std::thread::spawn({
        let fifo = fifo.clone();
        move || std::fs::write(fifo, text).unwrap()
    });
    let (code, stdout, stderr) = run(runner().arg("validate").arg("--manifest-only").arg(&fifo));
    writer.join().unwrap();
    // Valid; its relative paths resolve beside the FIFO, where no pipeline folder is.
    assert_eq!((code, stdout), (0, format!("ok: {} (2 warnings)\n", fifo.display())), "{stderr}");
    let warnings: Vec<&str> = stderr.lines().filter(|l| l.starts_with("warning:") || l.starts_with("error:")).collect();
    assert_eq!(warnings.len(), 2, "{stderr}");
    assert!(warnings.iter().all(|l| l.starts_with("warning:") && l.contains("does not exist (yet)")), "{stderr}");
    assert!(stderr.contains(&format!("{}:7:10", fifo.display())), "the FIFO's text is pointed at: {stderr}");
}

#[test]
fn output_into_a_closed_pipe_ends_quietly() {
    // `runner schema | head -c 1`: the reader is gone before runner writes; no panic, no exit 101.
    for args in [&["schema"][..], &["plan", "--json", "manifests/tiny-sd15.toml"], &["validate", "manifests/tiny-sd15.toml"]] {
        let mut child = std::process::Command::new(assert_cmd::cargo::cargo_bin("runner"))
            .args(args)
            .current_dir(crate::util::root())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        drop(child.stdout.take());
        let out = child.wait_with_output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!stderr.contains("panicked") && out.status.code() != Some(101), "{args:?}: {:?} {stderr}", out.status);
        assert_eq!(std::os::unix::process::ExitStatusExt::signal(&out.status), Some(libc::SIGPIPE), "{args:?}: {:?}", out.status);
    }
}

#[test]
fn every_command_has_examples_and_described_arguments() {
    for cmd in ["validate", "lock", "run", "plan", "config", "inspect", "shard", "quantize", "schema", "info"] {
        let (code, stdout, stderr) = run(runner().args([cmd, "--help"]));
        assert_eq!(code, 0, "{cmd}: {stderr}");
        assert!(stdout.contains("\nExamples:\n  runner "), "{cmd}: {stdout}");
        // clap prints a positional's description on the line after its name: never empty.
        let lines: Vec<&str> = stdout.lines().collect();
        for (i, l) in lines.iter().enumerate() {
            if l.trim_start().starts_with('<') && l.trim_end().ends_with('>') && l.starts_with("  <") {
                assert!(lines.get(i + 1).is_some_and(|n| !n.trim().is_empty()), "{cmd}: `{l}` has no description");
            }
        }
    }
    let (_, stdout, _) = run(runner().arg("--help"));
    assert!(stdout.contains("Stable Diffusion 1.x and 2.x, SDXL"), "{stdout}");
}

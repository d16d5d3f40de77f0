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
    let (code, stdout, stderr) = run(runner().arg("validate").args(&files));
    assert_eq!(code, 0, "{stderr}");
    for f in &files {
        assert!(stdout.contains(&format!("ok: {}", f.display())), "{stdout}");
    }
    // No errors; the only warnings allowed are about model folders that are not committed.
    for line in stderr.lines().filter(|l| l.starts_with("warning:") || l.starts_with("error:")) {
        assert!(line.starts_with("warning:") && line.contains("does not exist (yet)"), "{line}");
    }
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
    let (code, stdout, _) = run(runner().args(["validate", "--json", "tests/data/good/warnings.toml"]));
    assert_eq!(code, 0);
    let v: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(v["valid"], true);
    let f = &v["files"][0];
    assert_eq!(f["errors"], 0);
    assert_eq!(f["warnings"], 4);
    let d = &f["diagnostics"][0];
    assert_eq!(d["severity"], "warning");
    assert_eq!(d["file"], "tests/data/good/warnings.toml");
    assert_eq!(d["key"], "pipeline.source");
    assert_eq!((d["line"].as_u64(), d["column"].as_u64()), (Some(6), Some(10)));
}

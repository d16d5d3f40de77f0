//! The light front (README "Light binary"): `runner` links no libtorch and runs the planning
//! commands alone, with no libtorch to be found; the commands that compute exec `runner-torch`
//! beside it (or `RUNNER_TORCH`), and say so clearly when it is missing.

use std::path::{Path, PathBuf};

use serde_json::Value;

use crate::util::{light_runner, root, run, runner};

fn bin(name: &str) -> PathBuf {
    assert_cmd::cargo::cargo_bin(name)
}

/// `ldd`'s list of the libraries a binary loads.
fn ldd(path: &Path) -> String {
    let out = std::process::Command::new("ldd").arg(path).output().expect("ldd runs");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn the_front_links_no_libtorch() {
    let front = ldd(&bin("runner"));
    assert!(front.contains("libc.so"), "ldd read it: {front}");
    assert!(!front.contains("torch") && !front.contains("libc10") && !front.contains("gomp"), "the front loads libtorch:\n{front}");
    // Not a check that cannot fail: the other binary does load it.
    let torch = ldd(&bin("runner-torch"));
    assert!(torch.contains("libtorch_cpu") && torch.contains("libc10"), "{torch}");
}

#[test]
fn the_front_alone_validates_plans_inspects_locks_and_shards() {
    let dir = tempfile::tempdir().unwrap();
    let ok = |args: &[&str]| {
        let (code, stdout, stderr) = run(light_runner().args(args));
        assert_eq!(code, 0, "{args:?}:\n{stdout}{stderr}");
        stdout
    };
    // Full validation (configs, tokenizers, scheduler): no manifest needs libtorch to be checked.
    ok(&["validate", "manifests/tiny-sd15.toml", "manifests/tiny-sdxl.toml", "manifests/tiny-sd3.toml", "manifests/tiny-flux-dev.toml"]);
    let shipped: Vec<String> =
        std::fs::read_dir(root().join("manifests")).unwrap().map(|e| e.unwrap().path()).filter(|p| p.extension().is_some_and(|e| e == "toml")).map(|p| p.display().to_string()).collect();
    let mut args = vec!["validate", "--manifest-only"];
    args.extend(shipped.iter().map(String::as_str));
    ok(&args);
    let plan: Value = serde_json::from_str(&ok(&["plan", "manifests/tiny-sdxl.toml", "--json", "--devices", "cuda:0=24GiB,cuda:1=24GiB,cpu=64GiB"])).unwrap();
    assert!(plan["device_map"]["unet"].as_str().is_some_and(|d| d.starts_with("cuda:")), "{plan}");
    let inspect: Value = serde_json::from_str(&ok(&["inspect", "--json", "tests/fixtures/tiny-sdxl"])).unwrap();
    assert!(!inspect.as_object().unwrap().is_empty());
    ok(&["config", "manifests/tiny-sd15.toml"]);
    assert!(ok(&["schema"]).contains("\"$schema\""));
    // lock: a manifest of its own, pointing at the fixture.
    let manifest = dir.path().join("m.toml");
    let text = std::fs::read_to_string(root().join("manifests/tiny-sd15.toml")).unwrap().replace("../tests/fixtures/tiny-sd15", &root().join("tests/fixtures/tiny-sd15").display().to_string());
    std::fs::write(&manifest, text).unwrap();
    ok(&["lock", manifest.to_str().unwrap()]);
    assert!(dir.path().join("m.toml.lock").is_file());
    ok(&["validate", "--locked", manifest.to_str().unwrap()]);
    // shard: written and readable.
    let out = dir.path().join("unet");
    ok(&["shard", "tests/fixtures/tiny-sdxl/unet", "--out", out.to_str().unwrap(), "--max-shard-size", "300KB"]);
    assert!(out.join("diffusion_pytorch_model.safetensors.index.json").is_file());
    ok(&["inspect", out.to_str().unwrap()]);
}

#[test]
fn commands_that_compute_name_the_missing_runner_torch() {
    let dir = tempfile::tempdir().unwrap();
    let png = dir.path().join("out.png");
    for (args, json) in [
        (vec!["run", "manifests/tiny-sd15.toml", "--out", png.to_str().unwrap()], false),
        (vec!["run", "--json", "manifests/tiny-sd15.toml", "--out", png.to_str().unwrap()], true),
        (vec!["serve", "manifests/tiny-sd15.toml"], false),
        (vec!["info", "--json"], true),
    ] {
        let (code, stdout, stderr) = run(light_runner().args(&args));
        assert_eq!(code, 1, "{args:?}: {stdout}{stderr}");
        assert!(stderr.starts_with("error: `runner ") && stderr.contains("runner-torch") && stderr.contains("does not exist") && stderr.contains("RUNNER_TORCH"), "{args:?}: {stderr}");
        assert!(!stderr.contains("panicked"), "{stderr}");
        if json {
            let v: Value = serde_json::from_str(&stdout).unwrap_or_else(|e| panic!("{args:?}: {e}: {stdout:?}"));
            assert_eq!(v["error"]["kind"], "libtorch", "{v}");
            assert!(v["error"]["message"].as_str().unwrap().contains("runner-torch"), "{v}");
        } else {
            assert_eq!(stdout, "", "{args:?}");
        }
    }
    assert!(!png.exists(), "nothing written");
    // A named one that is missing is named.
    let (code, _, stderr) = run(light_runner().env("RUNNER_TORCH", dir.path().join("nope")).args(["info"]));
    assert_eq!(code, 1);
    assert!(stderr.contains(&dir.path().join("nope").display().to_string()) && stderr.contains("does not exist"), "{stderr}");
    let (code, _, stderr) = run(light_runner().env("RUNNER_TORCH", dir.path()).args(["info"]));
    assert_eq!(code, 1);
    assert!(stderr.contains("is not a file"), "{stderr}");
}

#[test]
fn the_front_runs_runner_torch_with_the_same_arguments() {
    // RUNNER_TORCH names the torch binary wherever it is (its rpath finds libtorch).
    let (code, stdout, stderr) = run(light_runner().env("RUNNER_TORCH", bin("runner-torch")).args(["info", "--json"]));
    assert_eq!(code, 0, "{stderr}");
    let v: Value = serde_json::from_str(&stdout).unwrap();
    assert!(v["libtorch_version"].as_str().is_some_and(|s| s.starts_with("2.11.0")), "{v}");
    // Through the front beside it, usage errors keep the program name and exit status.
    let (code, _, stderr) = run(runner().args(["run", "--no-such-flag"]));
    assert_eq!(code, 2, "{stderr}");
    assert!(stderr.contains("Usage: runner run"), "{stderr}");
    let (code, _, stderr) = run(runner().args(["run", "tests/data/does-not-exist.toml"]));
    assert_eq!(code, 1, "{stderr}");
    assert!(stderr.contains("does-not-exist.toml"), "{stderr}");
}

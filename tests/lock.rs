//! `runner lock` and `--locked`: every file a manifest reads, pinned by size and sha256.

use std::path::Path;

use crate::util::{root, run, runner};

pub fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        let p = e.path();
        if p.is_dir() {
            copy_dir(&p, &to.join(e.file_name()));
        } else {
            std::fs::copy(&p, to.join(e.file_name())).unwrap(); // follows symlinks
        }
    }
}

/// A temp project: the tiny SD 1.5 pipeline and a manifest beside it.
fn project() -> tempfile::TempDir {
    let d = tempfile::tempdir().unwrap();
    copy_dir(&root().join("tests/fixtures/tiny-sd15"), &d.path().join("pipe"));
    std::fs::write(d.path().join("m.toml"), "schema_version = 1\nname = \"m\"\n[pipeline]\nkind = \"stable-diffusion\"\nsource = \"pipe\"\n[components.safety_checker]\nenabled = false\n").unwrap();
    d
}

fn validate_locked(dir: &Path) -> (i32, String) {
    let (code, _, stderr) = run(runner().current_dir(dir).args(["validate", "--locked", "m.toml"]));
    (code, stderr)
}

#[test]
fn lock_then_verify_then_detect_changes() {
    let d = project();
    let dir = d.path();
    let (code, stderr) = validate_locked(dir);
    assert_eq!(code, 1);
    assert!(stderr.contains("m.toml.lock` does not exist: create it with `runner lock m.toml`"), "{stderr}");

    let (code, stdout, stderr) = run(runner().current_dir(dir).args(["lock", "m.toml"]));
    assert_eq!(code, 0, "{stderr}");
    assert!(stdout.contains("wrote m.toml.lock: 13 files"), "{stdout}");
    let lock = std::fs::read_to_string(dir.join("m.toml.lock")).unwrap();
    for f in ["pipe/model_index.json", "pipe/unet/diffusion_pytorch_model.safetensors", "pipe/tokenizer/vocab.json", "pipe/scheduler/scheduler_config.json", "pipe/text_encoder/config.json"] {
        assert!(lock.contains(&format!("path = \"{f}\"")), "{f} not in\n{lock}");
    }
    assert!(!lock.contains("safety_checker"), "disabled components are not read");
    assert_eq!(validate_locked(dir).0, 0);

    // Same size, one byte changed: the hash names the file.
    let vae = dir.join("pipe/vae/diffusion_pytorch_model.safetensors");
    let mut bytes = std::fs::read(&vae).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 1;
    std::fs::write(&vae, &bytes).unwrap();
    let (code, stderr) = validate_locked(dir);
    assert_eq!(code, 1);
    assert!(stderr.contains("1 file(s) differ from `m.toml.lock`") && stderr.contains("pipe/vae/diffusion_pytorch_model.safetensors` has sha256"), "{stderr}");

    // A config grown by a byte: the size names it.
    let cfg = dir.join("pipe/unet/config.json");
    let mut text = std::fs::read_to_string(&cfg).unwrap();
    text.push(' ');
    std::fs::write(&cfg, text).unwrap();
    let (_, stderr) = validate_locked(dir);
    assert!(stderr.contains("2 file(s) differ") && stderr.contains("pipe/unet/config.json` has"), "{stderr}");

    // The manifest now reads another file set (safety checker back on).
    let (code, _, stderr) = run(runner().current_dir(dir).args(["validate", "--locked", "m.toml", "--set", "components.safety_checker.enabled=true"]));
    assert_eq!(code, 1);
    assert!(stderr.contains("safety_checker/model.safetensors` is read by the manifest but not in the lock"), "{stderr}");

    // Relocking accepts the new state.
    run(runner().current_dir(dir).args(["lock", "m.toml"]));
    assert_eq!(validate_locked(dir).0, 0);

    // A lock file that is not one.
    std::fs::write(dir.join("m.toml.lock"), "version = 9\nmanifest = \"m.toml\"\n").unwrap();
    let (_, stderr) = validate_locked(dir);
    assert!(stderr.contains("is not a valid lock file: version 9 is not supported"), "{stderr}");
    std::fs::write(dir.join("m.toml.lock"), "[[file]]\npath = 3\n").unwrap();
    let (_, stderr) = validate_locked(dir);
    assert!(stderr.contains("is not a valid lock file"), "{stderr}");
}

#[test]
fn committed_locks_of_the_tiny_manifests_hold() {
    let (code, stdout, stderr) = run(runner().args([
        "validate",
        "--locked",
        "manifests/tiny-sd15.toml",
        "manifests/tiny-sdxl.toml",
        "manifests/tiny-sd3.toml",
        "manifests/tiny-flux-dev.toml",
        "manifests/tiny-flux-schnell.toml",
    ]));
    assert_eq!(code, 0, "fixtures drifted from their committed locks (regenerate with `runner lock`):\n{stderr}");
    assert_eq!(stdout.lines().count(), 5);
}

#[test]
fn lock_needs_a_valid_manifest_and_pipeline() {
    let (code, _, stderr) = run(runner().args(["lock", "tests/data/bad/numbers.toml"]));
    assert_eq!(code, 1);
    assert!(stderr.contains("`run.steps` must be at least 1"), "{stderr}");
    let cache = tempfile::tempdir().unwrap();
    let (code, _, stderr) = run(runner().args(["lock", "manifests/sd15.toml"]).env("HF_HUB_CACHE", cache.path()));
    assert_eq!(code, 1);
    assert!(stderr.contains("hf://stable-diffusion-v1-5/stable-diffusion-v1-5@main") && stderr.contains("runner pull manifests/sd15.toml"), "{stderr}");
}

//! Every bad-input class gets a clear message at file:line:col and exit 1 (never 101):
//! snapshots of the rendered diagnostics over committed inputs (minijinja-style `glob!`).

use crate::util::{run, runner};

#[test]
fn bad_manifests() {
    insta::glob!("data/bad/*.toml", |path| {
        let rel = path.strip_prefix(crate::util::root()).unwrap();
        let (code, stdout, stderr) = run(runner().arg("validate").arg(rel));
        assert_eq!(code, 1, "{}: exit code {code}\n{stderr}", rel.display());
        assert!(stdout.is_empty(), "{stdout}");
        assert!(!stderr.contains("panicked"), "{stderr}");
        insta::assert_snapshot!(stderr);
    });
}

#[test]
fn bad_manifests_json() {
    insta::glob!("data/bad/*.toml", |path| {
        let rel = path.strip_prefix(crate::util::root()).unwrap();
        let (code, stdout, _) = run(runner().args(["validate", "--json"]).arg(rel));
        assert_eq!(code, 1);
        let v: serde_json::Value = serde_json::from_str(&stdout).expect("JSON report");
        assert_eq!(v["valid"], false);
        let file = &v["files"][0];
        assert!(file["errors"].as_u64().unwrap() >= 1);
        for d in file["diagnostics"].as_array().unwrap() {
            assert!(d["message"].as_str().is_some_and(|m| !m.is_empty()));
            if d["source"] == "file" && d["line"].is_u64() {
                assert!(d["line"].as_u64().unwrap() >= 1 && d["column"].as_u64().unwrap() >= 1);
            }
        }
    });
}

#[test]
fn warnings_do_not_fail_validation() {
    let (code, stdout, stderr) = run(runner().args(["validate", "--manifest-only", "tests/data/good/warnings.toml"]));
    assert_eq!(code, 0, "{stderr}");
    assert!(stdout.contains("ok: tests/data/good/warnings.toml (5 warnings)"), "{stdout}");
    insta::assert_snapshot!(stderr);
}

#[test]
fn every_key_is_accepted() {
    let (code, stdout, stderr) = run(runner().args(["validate", "--manifest-only", "tests/data/good/full.toml"]));
    assert_eq!(code, 0, "{stderr}");
    assert_eq!(stdout, "ok: tests/data/good/full.toml\n");
    assert_eq!(stderr, "");
}

#[test]
fn directory_given_as_file() {
    let (code, _, stderr) = run(runner().args(["validate", "tests/data"]));
    assert_eq!(code, 1);
    assert!(stderr.contains("error: `tests/data` is a directory, not a manifest file"), "{stderr}");
}

#[test]
fn missing_file() {
    let (code, _, stderr) = run(runner().args(["validate", "tests/data/nope.toml"]));
    assert_eq!(code, 1);
    assert!(stderr.contains("error: cannot read manifest `tests/data/nope.toml`: No such file or directory"), "{stderr}");
}

#[test]
fn unreadable_file() {
    // A dangling symlink cannot be read even by root (permission bits do not stop root).
    let dir = tempfile::tempdir().unwrap();
    let link = dir.path().join("m.toml");
    std::os::unix::fs::symlink(dir.path().join("gone.toml"), &link).unwrap();
    let (code, _, stderr) = run(runner().arg("validate").arg(&link));
    assert_eq!(code, 1);
    assert!(stderr.contains("cannot read manifest") && stderr.contains("m.toml"), "{stderr}");
}

#[test]
fn empty_file() {
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("empty.toml");
    std::fs::write(&f, "").unwrap();
    let (code, _, stderr) = run(runner().arg("validate").arg(&f));
    assert_eq!(code, 1);
    for key in ["schema_version", "name", "pipeline"] {
        assert!(stderr.contains(&format!("missing required key `{key}` in the manifest")), "{stderr}");
    }
}

#[test]
fn reports_all_files_and_fails_if_any_fails() {
    let (code, stdout, stderr) = run(runner().args(["validate", "--manifest-only", "manifests/sd15.toml", "tests/data/bad/numbers.toml", "manifests/sdxl.toml"]));
    assert_eq!(code, 1);
    assert!(stdout.contains("ok: manifests/sd15.toml") && stdout.contains("ok: manifests/sdxl.toml"), "{stdout}");
    assert!(stderr.contains("invalid: tests/data/bad/numbers.toml: 7 errors"), "{stderr}");
}

//! scripts/setup-libtorch.sh: idempotent and fast when done; a clear message without a registry.

use std::process::Command;

use crate::util::root;

#[test]
fn second_run_is_a_quick_check() {
    let t = std::time::Instant::now();
    let out = Command::new("bash").arg(root().join("scripts/setup-libtorch.sh")).output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}{}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.contains("libtorch 2.11.0 ready"), "{stdout}");
    assert!(!stdout.contains("installing"), "already set up, must not reinstall: {stdout}");
    // Generous bound: the check is a few file tests (measured ~10 ms).
    assert!(t.elapsed().as_secs() < 20, "{:?}", t.elapsed());
}

#[test]
fn unreachable_registry_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("scripts")).unwrap();
    let script = dir.path().join("scripts/setup-libtorch.sh");
    std::fs::copy(root().join("scripts/setup-libtorch.sh"), &script).unwrap();
    let out = Command::new("bash")
        .arg(&script)
        .env("PIP_INDEX_URL", "http://127.0.0.1:9/simple")
        .env("PIP_FIND_LINKS", "")
        .env("PIP_RETRIES", "0")
        .env("PIP_TIMEOUT", "2")
        .env_remove("PIP_EXTRA_INDEX_URL")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("setup-libtorch: error: pip could not install torch==2.11.0 from the package registry"), "{stderr}");
    assert!(stderr.contains("reachable"), "{stderr}");
}

//! Models by Hub name: `hf://` sources read from the Hugging Face cache, and `runner pull`
//! against a mock of the Hub's HTTP interface (tests/support/mock_hub.py, on 127.0.0.1, started
//! and stopped here; Python's `snapshot_download` accepts it, checked below).

use std::io::BufRead;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use serde_json::Value;

use crate::util::{decode_png, root, runner};

const REPO: &str = "runner-test/tiny-sd15";

/// The mock Hub, killed on drop.
struct Mock {
    child: Child,
    endpoint: String,
    log: PathBuf,
    /// `branch=commit` lines, per repo.
    branches: Vec<String>,
}

impl Mock {
    fn start(dir: &Path, args: &[String]) -> Mock {
        let log = dir.join(format!("hub-{}.log", std::process::id() as u64 * 1000 + rand_suffix()));
        let mut child = Command::new("python3")
            .arg(root().join("tests/support/mock_hub.py"))
            .args(args)
            .arg("--log")
            .arg(&log)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("python3 runs the mock Hub");
        let mut out = std::io::BufReader::new(child.stdout.take().unwrap());
        let mut lines = vec![];
        let mut line = String::new();
        while out.read_line(&mut line).unwrap() > 0 {
            lines.push(line.trim().to_string());
            line.clear();
            if lines.last().is_some_and(|l| l == "ready") {
                break;
            }
        }
        let port = lines.iter().find_map(|l| l.strip_prefix("port ")).expect("the mock prints its port").to_string();
        Mock { child, endpoint: format!("http://127.0.0.1:{port}"), log, branches: lines }
    }

    fn commit(&self, branch: &str) -> String {
        self.branches.iter().rev().find_map(|l| l.split_whitespace().find_map(|kv| kv.strip_prefix(&format!("{branch}=")))).expect("branch").to_string()
    }

    fn requests(&self) -> Vec<Value> {
        std::fs::read_to_string(&self.log).unwrap_or_default().lines().map(|l| serde_json::from_str(l).unwrap()).collect()
    }
}

impl Drop for Mock {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn rand_suffix() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    N.fetch_add(1, Ordering::Relaxed)
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap().flatten() {
        let p = e.path();
        if p.is_dir() {
            copy_dir(&p, &to.join(e.file_name()));
        } else {
            std::fs::copy(&p, to.join(e.file_name())).unwrap();
        }
    }
}

/// tiny-sd15 as a Hub repo, with what a pull must leave alone: a root single-file checkpoint,
/// a pickle beside the UNet's weights, and an fp16 variant of the UNet only.
fn fixture_repo(dir: &Path) -> PathBuf {
    let repo = dir.join("repo");
    copy_dir(&root().join("tests/fixtures/tiny-sd15"), &repo);
    std::fs::copy(repo.join("unet/diffusion_pytorch_model.safetensors"), repo.join("tiny-sd15-single.safetensors")).unwrap();
    std::fs::write(repo.join("unet/diffusion_pytorch_model.bin"), b"not fetched").unwrap();
    std::fs::copy(repo.join("unet/diffusion_pytorch_model.safetensors"), repo.join("unet/diffusion_pytorch_model.fp16.safetensors")).unwrap();
    repo
}

fn manifest(dir: &Path, name: &str, source: &str, extra: &str) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(
        &p,
        format!(
            "schema_version = 1\nname = \"hub-test\"\n[pipeline]\nkind = \"stable-diffusion\"\nsource = \"{source}\"\ndtype = \"fp32\"\n{extra}\n[components.safety_checker]\nenabled = false\n[run]\nprompt = \"a photo of a cat\"\nsteps = 2\nseed = 0\nwidth = 64\nheight = 64\nthreads = 1\n"
        ),
    )
    .unwrap();
    p
}

/// `runner` with the Hub environment of a test: its mock, its cache, no token unless given.
fn hub_runner(mock: Option<&Mock>, cache: &Path) -> assert_cmd::Command {
    let mut cmd = runner();
    for v in ["HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_TOKEN_PATH", "HUGGINGFACE_HUB_CACHE"] {
        cmd.env_remove(v);
    }
    cmd.env("HF_HUB_CACHE", cache).env("HF_HOME", cache.join("home"));
    match mock {
        Some(m) => cmd.env("HF_ENDPOINT", &m.endpoint),
        None => cmd.env("HF_ENDPOINT", "http://127.0.0.1:9"),
    };
    cmd
}

fn out(cmd: &mut assert_cmd::Command) -> (i32, String, String) {
    let o = cmd.output().unwrap();
    (o.status.code().unwrap_or(-1), String::from_utf8_lossy(&o.stdout).into_owned(), String::from_utf8_lossy(&o.stderr).into_owned())
}

fn pull_json(mock: &Mock, cache: &Path, m: &Path, extra: &[&str]) -> Value {
    let (code, stdout, stderr) = out(hub_runner(Some(mock), cache).arg("pull").arg(m).arg("--json").args(extra));
    assert_eq!(code, 0, "{stderr}");
    serde_json::from_str(&stdout).unwrap()
}

fn files_of(report: &Value) -> Vec<(String, String)> {
    report["files"].as_array().unwrap().iter().map(|f| (f["path"].as_str().unwrap().to_string(), f["status"].as_str().unwrap().to_string())).collect()
}

#[test]
fn pull_fetches_what_the_manifest_reads_into_the_standard_cache_and_runs_like_the_folder() {
    let t = tempfile::tempdir().unwrap();
    let repo = fixture_repo(t.path());
    let mock = Mock::start(t.path(), &[format!("--repo={REPO}={}", repo.display()), "--token=s3cret".into()]);
    let cache = t.path().join("cache");
    let m = manifest(t.path(), "hub.toml", &format!("hf://{REPO}"), "variant = \"fp16\"");

    // Dry run: the list and sizes, nothing written.
    let (code, stdout, stderr) = out(hub_runner(Some(&mock), &cache).env("HF_TOKEN", "s3cret").args(["pull", "--dry-run"]).arg(&m));
    assert_eq!(code, 0, "{stderr}");
    assert!(stdout.contains("unet/diffusion_pytorch_model.fp16.safetensors") && stdout.contains("to fetch") && stdout.contains("dry run"), "{stdout}");
    assert!(!cache.join(format!("models--{}", REPO.replace('/', "--"))).exists(), "a dry run wrote into the cache");

    let report = {
        let (code, stdout, stderr) = out(hub_runner(Some(&mock), &cache).env("HF_TOKEN", "s3cret").arg("pull").arg(&m).arg("--json"));
        assert_eq!(code, 0, "{stderr}");
        serde_json::from_str::<Value>(&stdout).unwrap()
    };
    let files: Vec<String> = files_of(&report).into_iter().map(|(p, _)| p).collect();
    assert!(files.contains(&"unet/diffusion_pytorch_model.fp16.safetensors".to_string()), "{files:?}");
    // Per-component fallback: the VAE has no fp16 file, so its plain weights.
    assert!(files.contains(&"vae/diffusion_pytorch_model.safetensors".to_string()), "{files:?}");
    for never in ["tiny-sd15-single.safetensors", "unet/diffusion_pytorch_model.bin", "unet/diffusion_pytorch_model.safetensors", "safety_checker/model.safetensors", "safety_checker/config.json"] {
        assert!(!files.iter().any(|f| f == never), "{never} selected: {files:?}");
    }
    for r in mock.requests() {
        let path = r["path"].as_str().unwrap();
        assert!(!path.contains("tiny-sd15-single") && !path.contains(".bin") && !path.contains("safety_checker"), "requested {path}");
        // The token goes to the Hub's origin only, never to the CDN's.
        if path.starts_with("/cdn/") {
            assert_eq!(r["auth"], false, "{r}");
        } else {
            assert_eq!(r["auth"], true, "{r}");
        }
    }

    // The layout huggingface_hub writes: refs, relative symlinks into blobs named by ETag.
    let rdir = cache.join(format!("models--{}", REPO.replace('/', "--")));
    let commit = mock.commit("main");
    assert_eq!(std::fs::read_to_string(rdir.join("refs/main")).unwrap(), commit);
    let link = rdir.join("snapshots").join(&commit).join("unet/diffusion_pytorch_model.fp16.safetensors");
    let target = std::fs::read_link(&link).unwrap();
    assert!(target.starts_with("../../../blobs/"), "{}", target.display());
    let (_, sha) = runner::lock::sha256_file(&link).unwrap();
    assert_eq!(target.file_name().unwrap().to_str().unwrap(), sha, "an LFS blob is named by its sha256");

    // A second pull transfers nothing.
    let again = pull_json_with_token(&mock, &cache, &m);
    assert!(files_of(&again).iter().all(|(_, s)| s == "cached"), "{again}");
    assert_eq!(again["fetched_bytes"], 0);

    // The run reads the cache only (an endpoint that answers nothing) and equals the folder's.
    let png = t.path().join("hub.png");
    let (code, _, stderr) = out(hub_runner(None, &cache).arg("run").arg(&m).arg("--quiet").arg("--out").arg(&png));
    assert_eq!(code, 0, "{stderr}");
    let local = manifest(t.path(), "local.toml", &repo.display().to_string(), "variant = \"fp16\"");
    let png2 = t.path().join("local.png");
    let (code, _, stderr) = out(runner().arg("run").arg(&local).arg("--quiet").arg("--out").arg(&png2));
    assert_eq!(code, 0, "{stderr}");
    assert_eq!(decode_png(&png).0, decode_png(&png2).0, "the cached pipeline gives the folder's image");
}

fn pull_json_with_token(mock: &Mock, cache: &Path, m: &Path) -> Value {
    let (code, stdout, stderr) = out(hub_runner(Some(mock), cache).env("HF_TOKEN", "s3cret").arg("pull").arg(m).arg("--json"));
    assert_eq!(code, 0, "{stderr}");
    serde_json::from_str(&stdout).unwrap()
}

/// The Python of the test venv with huggingface_hub (scripts/setup-deploy-check.sh).
fn hub_python() -> Option<PathBuf> {
    let py = root().join(".venv-deploy/bin/python");
    let ok = py.exists() && Command::new(&py).args(["-c", "import huggingface_hub"]).status().is_ok_and(|s| s.success());
    if !ok {
        eprintln!("skipped: no huggingface_hub in .venv-deploy (run scripts/setup-deploy-check.sh)");
    }
    ok.then_some(py)
}

#[test]
fn python_and_runner_share_the_cache_and_snapshot_download_accepts_the_mock() {
    let Some(py) = hub_python() else { return };
    let t = tempfile::tempdir().unwrap();
    let repo = fixture_repo(t.path());
    let mock = Mock::start(t.path(), &[format!("--repo={REPO}={}", repo.display())]);
    let m = manifest(t.path(), "hub.toml", &format!("hf://{REPO}"), "");

    // snapshot_download fills a cache from the mock; runner runs from it and has nothing to fetch.
    let py_cache = t.path().join("py-cache");
    let o = Command::new(&py)
        .args(["-c", "import sys; from huggingface_hub import snapshot_download; print(snapshot_download(sys.argv[1], allow_patterns=['model_index.json', 'unet/*.safetensors', 'unet/config.json', 'vae/*', 'text_encoder/*', 'tokenizer/*', 'scheduler/*', 'feature_extractor/*'], ignore_patterns=['*.fp16.*']))", REPO])
        .env("HF_ENDPOINT", &mock.endpoint)
        .env("HF_HUB_CACHE", &py_cache)
        .env("HF_HUB_DISABLE_PROGRESS_BARS", "1")
        .env_remove("HF_TOKEN")
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let (code, _, stderr) = out(hub_runner(None, &py_cache).arg("run").arg(&m).arg("--quiet").arg("--out").arg(t.path().join("py.png")));
    assert_eq!(code, 0, "{stderr}");
    let report = pull_json(&mock, &py_cache, &m, &[]);
    assert!(files_of(&report).iter().all(|(_, s)| s == "cached"), "{report}");

    // runner pull fills a cache that huggingface_hub reads offline, file for file.
    let r_cache = t.path().join("runner-cache");
    pull_json(&mock, &r_cache, &m, &[]);
    let script = "import sys, os\nfrom huggingface_hub import snapshot_download, hf_hub_download\np = snapshot_download(sys.argv[1], local_files_only=True)\nf = hf_hub_download(sys.argv[1], 'unet/diffusion_pytorch_model.safetensors', local_files_only=True)\nprint(p); print(f)\n";
    let o = Command::new(&py).args(["-c", script, REPO]).env("HF_HUB_CACHE", &r_cache).env("HF_HUB_OFFLINE", "1").output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let printed = String::from_utf8_lossy(&o.stdout);
    let snapshot = PathBuf::from(printed.lines().next().unwrap());
    assert_eq!(snapshot.file_name().unwrap().to_str().unwrap(), mock.commit("main"));
    assert_eq!(std::fs::read(printed.lines().nth(1).unwrap()).unwrap(), std::fs::read(repo.join("unet/diffusion_pytorch_model.safetensors")).unwrap());
}

#[test]
fn components_and_adapters_from_other_repos() {
    let t = tempfile::tempdir().unwrap();
    let repo = fixture_repo(t.path());
    let loras = t.path().join("loras");
    std::fs::create_dir_all(loras.join("sd15")).unwrap();
    std::fs::copy(root().join("tests/fixtures/loras/sd15-peft.safetensors"), loras.join("sd15/style.safetensors")).unwrap();
    std::fs::copy(root().join("tests/fixtures/loras/sdxl-kohya.safetensors"), loras.join("sdxl.safetensors")).unwrap();
    let vae = t.path().join("vae-repo");
    copy_dir(&repo.join("vae"), &vae);
    let mock = Mock::start(t.path(), &[format!("--repo={REPO}={}", repo.display()), format!("--repo=runner-test/loras={}", loras.display()), format!("--repo=runner-test/vae={}", vae.display())]);
    let cache = t.path().join("cache");
    let extra = "[components.vae]\nsource = \"hf://runner-test/vae\"\n[adapters.style]\nsource = \"hf://runner-test/loras/sd15/style.safetensors\"";
    let m = manifest(t.path(), "hub.toml", &format!("hf://{REPO}"), extra);
    let report = pull_json(&mock, &cache, &m, &[]);
    let got: Vec<(String, String)> = report["files"].as_array().unwrap().iter().map(|f| (f["repo"].as_str().unwrap().to_string(), f["path"].as_str().unwrap().to_string())).collect();
    assert!(got.contains(&("runner-test/loras".into(), "sd15/style.safetensors".into())), "{got:?}");
    assert!(!got.iter().any(|(_, p)| p == "sdxl.safetensors"), "{got:?}");
    assert!(got.contains(&("runner-test/vae".into(), "diffusion_pytorch_model.safetensors".into())) && got.contains(&("runner-test/vae".into(), "config.json".into())), "{got:?}");
    assert!(!got.iter().any(|(r, p)| r == REPO && p.starts_with("vae/")), "the pipeline's VAE is not read: {got:?}");
    let png = t.path().join("hub.png");
    let (code, _, stderr) = out(hub_runner(None, &cache).arg("run").arg(&m).arg("--quiet").arg("--out").arg(&png));
    assert_eq!(code, 0, "{stderr}");
    // The same as the local files.
    let local_extra = format!("[components.vae]\nsource = \"{}\"\n[adapters.style]\nsource = \"{}\"", vae.display(), loras.join("sd15/style.safetensors").display());
    let local = manifest(t.path(), "local.toml", &repo.display().to_string(), &local_extra);
    let png2 = t.path().join("local.png");
    let (code, _, stderr) = out(runner().arg("run").arg(&local).arg("--quiet").arg("--out").arg(&png2));
    assert_eq!(code, 0, "{stderr}");
    assert_eq!(decode_png(&png).0, decode_png(&png2).0);
}

#[test]
fn lock_pins_hub_commits_and_pull_locked_fetches_them() {
    let t = tempfile::tempdir().unwrap();
    let repo = fixture_repo(t.path());
    let v2 = t.path().join("v2");
    copy_dir(&repo, &v2);
    std::fs::write(v2.join("README.md"), "a newer commit\n").unwrap();
    let cache = t.path().join("cache");
    let m = manifest(t.path(), "hub.toml", &format!("hf://{REPO}@main"), "");

    let old = Mock::start(t.path(), &[format!("--repo={REPO}={}", repo.display())]);
    pull_json(&old, &cache, &m, &[]);
    let c1 = old.commit("main");
    drop(old);
    let (code, _, stderr) = out(hub_runner(None, &cache).arg("lock").arg(&m));
    assert_eq!(code, 0, "{stderr}");
    let lock = std::fs::read_to_string(runner::lock::lock_path(&m)).unwrap();
    assert!(lock.contains(&format!("commit = \"{c1}\"")) && lock.contains(&format!("hf://{REPO}@{c1}/unet/diffusion_pytorch_model.safetensors")), "{lock}");

    // `main` moves on the Hub; a pull follows it.
    let both = Mock::start(t.path(), &[format!("--repo={REPO}={}", repo.display()), format!("--repo={REPO}={}", v2.display())]);
    let c2 = both.commit("main");
    assert_ne!(c1, c2);
    pull_json(&both, &cache, &m, &[]);
    let rdir = cache.join(format!("models--{}", REPO.replace('/', "--")));
    assert_eq!(std::fs::read_to_string(rdir.join("refs/main")).unwrap(), c2);
    // Unlocked, the lock no longer matches; --locked reads the pinned commit.
    let (code, _, stderr) = out(hub_runner(None, &cache).args(["validate", "--locked"]).arg(&m));
    assert_eq!(code, 0, "--locked reads the pinned commit: {stderr}");
    let (code, _, stderr) = out(hub_runner(None, &cache).arg("plan").arg(&m).arg("--locked"));
    assert_eq!(code, 0, "{stderr}");

    // A batch's lines read the pinned commit too (the branch's snapshot gone, they still run).
    std::fs::rename(rdir.join("snapshots").join(&c2), t.path().join("c2-away")).unwrap();
    let lines = t.path().join("p.jsonl");
    std::fs::write(&lines, "{\"prompt\": \"a dog\", \"steps\": 1}\n").unwrap();
    let (code, _, stderr) = out(hub_runner(None, &cache).args(["run", "--locked", "--quiet"]).arg(&m).arg("--prompts").arg(&lines).arg("--out").arg(t.path().join("b-{index}.png")));
    assert_eq!(code, 0, "{stderr}");
    std::fs::rename(t.path().join("c2-away"), rdir.join("snapshots").join(&c2)).unwrap();

    // The pinned snapshot gone: --locked says so, and `pull --locked` brings that commit back.
    std::fs::remove_dir_all(rdir.join("snapshots").join(&c1)).unwrap();
    let (code, _, stderr) = out(hub_runner(None, &cache).args(["validate", "--locked"]).arg(&m));
    assert_eq!(code, 1);
    assert!(stderr.contains("runner pull") && stderr.contains(&c1), "{stderr}");
    let report = pull_json(&both, &cache, &m, &["--locked"]);
    assert!(report["files"].as_array().unwrap().iter().all(|f| f["commit"] == c1.as_str()), "{report}");
    assert!(files_of(&report).iter().all(|(_, s)| s == "cached"), "blobs are shared across commits: {report}");
    assert_eq!(std::fs::read_to_string(rdir.join("refs/main")).unwrap(), c2, "a locked pull leaves the ref alone");
    let (code, _, stderr) = out(hub_runner(None, &cache).args(["validate", "--locked"]).arg(&m));
    assert_eq!(code, 0, "{stderr}");
}

#[test]
fn bad_hub_names_are_refused_where_they_are_written() {
    let t = tempfile::tempdir().unwrap();
    let cache = t.path().join("cache");
    for (source, want) in [
        ("hf://runner-test", "no empty parts"),
        ("hf://runner-test/x/../y", "`..` is not allowed"),
        ("hf://runner-test//x", "no empty parts"),
        ("hf:///abs/path", "no empty parts"),
        ("hf://runner-test/x@", "revision after `@` is empty"),
        ("hf://runner-test/x/unet/w.safetensors", "names a file"),
    ] {
        let m = manifest(t.path(), "bad.toml", source, "");
        let (code, _, stderr) = out(hub_runner(None, &cache).args(["validate", "--manifest-only"]).arg(&m));
        assert_eq!(code, 1, "{source}: {stderr}");
        assert!(stderr.contains(want) && stderr.contains("bad.toml:5:"), "{source}: {stderr}");
    }
    // An adapter is one file, not a folder.
    let m = manifest(t.path(), "bad.toml", "hf://runner-test/x", "[adapters.style]\nsource = \"hf://runner-test/loras/unet\"");
    let (code, _, stderr) = out(hub_runner(None, &cache).args(["validate", "--manifest-only"]).arg(&m));
    assert_eq!(code, 1);
    assert!(stderr.contains("names a folder"), "{stderr}");
    // A manifest without Hub sources has nothing to pull.
    let (code, _, stderr) = out(hub_runner(None, &cache).arg("pull").arg(root().join("manifests/tiny-sd15.toml")));
    assert_eq!(code, 0);
    assert!(stderr.contains("nothing to pull"), "{stderr}");
}

#[test]
fn a_cache_that_lies_is_refused_by_name() {
    let t = tempfile::tempdir().unwrap();
    let repo = fixture_repo(t.path());
    let mock = Mock::start(t.path(), &[format!("--repo={REPO}={}", repo.display())]);
    let cache = t.path().join("cache");
    let m = manifest(t.path(), "hub.toml", &format!("hf://{REPO}"), "");
    pull_json(&mock, &cache, &m, &[]);
    let snap = cache.join(format!("models--{}/snapshots/{}", REPO.replace('/', "--"), mock.commit("main")));

    // A truncated blob: the safetensors header says more bytes than there are.
    let weights = snap.join("vae/diffusion_pytorch_model.safetensors");
    let blob = std::fs::canonicalize(&weights).unwrap();
    let len = std::fs::metadata(&blob).unwrap().len();
    std::fs::OpenOptions::new().write(true).open(&blob).unwrap().set_len(len / 2).unwrap();
    let (code, _, stderr) = out(hub_runner(None, &cache).arg("validate").arg(&m));
    assert_eq!(code, 1);
    assert!(stderr.contains("vae/diffusion_pytorch_model.safetensors"), "{stderr}");
    // `runner pull` sees the size differ from the Hub's and fetches it again.
    let report = pull_json(&mock, &cache, &m, &[]);
    assert!(files_of(&report).contains(&("vae/diffusion_pytorch_model.safetensors".into(), "fetched".into())), "{report}");
    assert_eq!(std::fs::metadata(&blob).unwrap().len(), len);

    // A file gone from the snapshot: named, with what to run.
    let unet = snap.join("unet/diffusion_pytorch_model.safetensors");
    std::fs::remove_file(&unet).unwrap();
    let (code, _, stderr) = out(hub_runner(None, &cache).arg("validate").arg(&m));
    assert_eq!(code, 1);
    assert!(stderr.contains("unet") && stderr.contains("runner pull"), "{stderr}");
    pull_json(&mock, &cache, &m, &[]);
    let (code, _, stderr) = out(hub_runner(None, &cache).arg("validate").arg(&m));
    assert_eq!(code, 0, "{stderr}");

    // A snapshot entry that leads outside the cache's blobs.
    let outside = t.path().join("secret.safetensors");
    std::fs::copy(repo.join("vae/diffusion_pytorch_model.safetensors"), &outside).unwrap();
    std::fs::remove_file(&weights).unwrap();
    std::os::unix::fs::symlink(&outside, &weights).unwrap();
    let (code, _, stderr) = out(hub_runner(None, &cache).arg("validate").arg(&m));
    assert_eq!(code, 1);
    assert!(stderr.contains("points outside the cache's blobs") && stderr.contains("secret.safetensors"), "{stderr}");
}

#[test]
fn hub_failures_are_named_retried_or_resumed() {
    let t = tempfile::tempdir().unwrap();
    let repo = fixture_repo(t.path());
    let m = manifest(t.path(), "hub.toml", &format!("hf://{REPO}"), "");
    let pull = |mock: &Mock, cache: &Path, extra: &[&str], env: &[(&str, &str)]| {
        let mut c = hub_runner(Some(mock), cache);
        for (k, v) in env {
            c.env(k, v);
        }
        out(c.arg("pull").arg(&m).args(extra))
    };
    let repo_arg = format!("--repo={REPO}={}", repo.display());

    // Unknown repo, revision and file: named.
    let mock = Mock::start(t.path(), std::slice::from_ref(&repo_arg));
    let cache = t.path().join("c-404");
    for (source, extra, want) in [
        ("hf://runner-test/nope".to_string(), "", "the repo `runner-test/nope`"),
        (format!("hf://{REPO}@v9"), "", "revision `v9` of `runner-test/tiny-sd15`"),
        (format!("hf://{REPO}"), "[components.unet]\nsource = \"hf://runner-test/tiny-sd15/unet/missing.safetensors\"", "no file `unet/missing.safetensors`"),
    ] {
        let m = manifest(t.path(), "nf.toml", &source, extra);
        let (code, _, stderr) = out(hub_runner(Some(&mock), &cache).arg("pull").arg(&m));
        assert_eq!(code, 1, "{stderr}");
        assert!(stderr.contains(want), "{want}: {stderr}");
    }
    // The missing file is remembered as huggingface_hub does (`.no_exist`), and said offline.
    let rdir = cache.join(format!("models--{}", REPO.replace('/', "--")));
    assert!(rdir.join(".no_exist").join(mock.commit("main")).join("unet/missing.safetensors").exists());
    drop(mock);

    // 401 without a token, 403 with one that has no access.
    let mock = Mock::start(t.path(), &[repo_arg.clone(), "--token=right".into()]);
    let cache = t.path().join("c-auth");
    let (code, _, stderr) = pull(&mock, &cache, &[], &[]);
    assert_eq!(code, 1);
    assert!(stderr.contains("401") && stderr.contains("no token was sent") && stderr.contains("HF_TOKEN"), "{stderr}");
    let (code, _, stderr) = pull(&mock, &cache, &[], &[("HF_TOKEN", "wrong")]);
    assert_eq!(code, 1);
    assert!(stderr.contains("403") && stderr.contains("lacks access"), "{stderr}");
    // The token file under HF_HOME is read when HF_TOKEN is not set.
    std::fs::create_dir_all(cache.join("home")).unwrap();
    std::fs::write(cache.join("home/token"), "right\n").unwrap();
    let (code, _, stderr) = pull(&mock, &cache, &[], &[]);
    assert_eq!(code, 0, "{stderr}");
    drop(mock);

    // 429 and 503 are retried (bounded); past the bound, an error naming the status.
    let mock = Mock::start(t.path(), &[repo_arg.clone(), "--fail=/api/models=429:2".into(), "--fail=unet/config.json=503:2".into()]);
    let (code, _, stderr) = pull(&mock, &t.path().join("c-retry"), &[], &[]);
    assert_eq!(code, 0, "{stderr}");
    drop(mock);
    let mock = Mock::start(t.path(), &[repo_arg.clone(), "--fail=/api/models=503:10".into()]);
    let (code, _, stderr) = pull(&mock, &t.path().join("c-503"), &["--retries=3"], &[]);
    assert_eq!(code, 1);
    assert!(stderr.contains("HTTP 503 after 3 tries"), "{stderr}");
    drop(mock);

    // A connection dropped mid-file is resumed with a range request. (`/model.safetensors`: the
    // text encoder's 1.6 MB alone, not `diffusion_pytorch_model.safetensors`: the VAE's 0.29 MB would
    // be sent whole before the drop, whichever worker asks first.)
    let mock = Mock::start(t.path(), &[repo_arg.clone(), "--drop=/model.safetensors=300000:1".into()]);
    let (code, _, stderr) = pull(&mock, &t.path().join("c-drop"), &[], &[]);
    assert_eq!(code, 0, "{stderr}");
    assert!(mock.requests().iter().any(|r| r["range"].as_str().is_some_and(|s| s.starts_with("bytes=300000-"))), "no resumed range request");
    drop(mock);

    // A pull cut short leaves `.incomplete` (never a blob); the next pull resumes it.
    let cache = t.path().join("c-cut");
    let mock = Mock::start(t.path(), &[repo_arg.clone(), "--drop=/model.safetensors=300000:99".into()]);
    let (code, _, stderr) = pull(&mock, &cache, &["--retries=2", "--jobs=1"], &[]);
    assert_eq!(code, 1);
    assert!(stderr.contains("dropped at byte"), "{stderr}");
    assert!(!rdir_of(&cache).join("refs/main").exists(), "a partial pull writes no ref");
    let partial: Vec<_> = std::fs::read_dir(rdir_of(&cache).join("blobs")).unwrap().flatten().filter(|e| e.file_name().to_string_lossy().ends_with(".incomplete")).collect();
    assert!(!partial.is_empty());
    drop(mock);
    let mock = Mock::start(t.path(), std::slice::from_ref(&repo_arg));
    let report = pull_json(&mock, &cache, &m, &[]);
    assert!(files_of(&report).iter().any(|(_, s)| s == "resumed"), "{report}");
    drop(mock);

    // Bytes that do not match the ETag: fetched again once, then an error with nothing in place.
    let mock = Mock::start(t.path(), &[repo_arg.clone(), "--corrupt=diffusion_pytorch_model.safetensors=1".into()]);
    let (code, _, stderr) = pull(&mock, &t.path().join("c-bad1"), &[], &[]);
    assert_eq!(code, 0, "one corrupt transfer is fetched again: {stderr}");
    drop(mock);
    let cache = t.path().join("c-bad2");
    let mock = Mock::start(t.path(), &[repo_arg.clone(), "--corrupt=diffusion_pytorch_model.safetensors=2".into()]);
    let (code, _, stderr) = pull(&mock, &cache, &["--jobs=1"], &[]);
    assert_eq!(code, 1);
    assert!(stderr.contains("its sha256 is") && stderr.contains("ETag"), "{stderr}");
    drop(mock);

    // A full disk (here a file-size limit): the partial file stays `.incomplete`, no blob appears.
    let cache = t.path().join("c-full");
    let mock = Mock::start(t.path(), std::slice::from_ref(&repo_arg));
    let bin = assert_cmd::cargo::cargo_bin("runner");
    let o = Command::new("bash")
        .arg("-c")
        .arg(format!("ulimit -f 200; exec '{}' pull --jobs 1 '{}'", bin.display(), m.display()))
        .env("HF_ENDPOINT", &mock.endpoint)
        .env("HF_HUB_CACHE", &cache)
        .env("HF_HOME", cache.join("home"))
        .env_remove("HF_TOKEN")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains(".incomplete") && stderr.contains("partial file is kept"), "{stderr}");
    for e in std::fs::read_dir(rdir_of(&cache).join("blobs")).unwrap().flatten() {
        let md = std::fs::metadata(e.path()).unwrap();
        let name = e.file_name().to_string_lossy().into_owned();
        assert!(name.ends_with(".incomplete") || md.len() <= 200 * 1024, "{name} is a blob in place from a failed write");
    }
    let report = pull_json(&mock, &cache, &m, &[]);
    assert!(files_of(&report).iter().any(|(_, s)| s == "resumed"), "{report}");

    // HF_HUB_OFFLINE: no request; fine when the cache has everything, an error naming what is not.
    let before = mock.requests().len();
    let (code, _, stderr) = pull(&mock, &cache, &[], &[("HF_HUB_OFFLINE", "1")]);
    assert_eq!(code, 0, "{stderr}");
    let (code, _, stderr) = pull(&mock, &t.path().join("c-empty"), &[], &[("HF_HUB_OFFLINE", "1")]);
    assert_eq!(code, 1);
    assert!(stderr.contains("HF_HUB_OFFLINE") && stderr.contains("not in the Hugging Face cache"), "{stderr}");
    assert_eq!(mock.requests().len(), before, "offline pulls made requests");
}

fn rdir_of(cache: &Path) -> PathBuf {
    cache.join(format!("models--{}", REPO.replace('/', "--")))
}

//! deploy/: the Kubernetes files validated offline against the API's own schemas
//! (kubernetes-validate) and the Dockerfile linted (hadolint), both installed in .venv-deploy by
//! scripts/setup-deploy-check.sh, which `make test` runs, each shown to reject mistakes; the
//! runner manifest, lock and prompts the ConfigMap carries checked by runner itself; the files
//! agreeing with each other and with runner's flags.

use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::Value;

use crate::util::{light_runner, root, run, runner};

/// The Kubernetes version the files are written for (the Job's `backoffLimitPerIndex` is GA in it).
const K8S_VERSION: &str = "1.33.0";

fn k8s_dir() -> PathBuf {
    root().join("deploy/k8s")
}

/// A program of .venv-deploy; a missing venv fails the test (never a silent pass).
fn venv_bin(name: &str) -> PathBuf {
    let p = root().join(".venv-deploy/bin").join(name);
    assert!(p.exists(), "{} is missing: run scripts/setup-deploy-check.sh (`make test` does) to install kubernetes-validate and hadolint", p.display());
    p
}

/// Every file under deploy/k8s.
fn k8s_files() -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(k8s_dir()).unwrap().map(|e| e.unwrap().path()).collect();
    files.sort();
    assert!(files.iter().all(|f| f.extension().is_some_and(|e| e == "yaml")), "only YAML under deploy/k8s: {files:?}");
    files
}

/// What kubernetes-validate finds wrong in `files` with unknown fields refused (`--strict`), and how
/// many resources it passed. It only warns about a resource it has no schema for (a misspelled
/// `kind` or `apiVersion`), and exits 0: that is a problem here too, but for kustomize's
/// Kustomization, which is no API resource.
fn validate(files: &[PathBuf]) -> (Vec<String>, usize) {
    let out = Command::new(venv_bin("kubernetes-validate")).args(["--strict", "--kubernetes-version", K8S_VERSION]).args(files).output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let kustomization = |l: &str| l.starts_with("WARN ") && l.contains("for kind Kustomization with api version kustomize.config.k8s.io/");
    let mut problems: Vec<String> = stdout.lines().filter(|l| !l.starts_with("INFO ") && !kustomization(l)).map(String::from).collect();
    if !out.status.success() && problems.is_empty() {
        problems.push(format!("kubernetes-validate exited {}: {}", out.status, String::from_utf8_lossy(&out.stderr)));
    }
    let passed = stdout.lines().filter(|l| l.starts_with("INFO ") && l.contains(" passed for resource ")).count();
    (problems, passed)
}

/// Every YAML document of deploy/k8s as JSON, with its file's name (PyYAML of the same venv).
fn documents() -> Vec<(String, Value)> {
    let script = "import json, os, sys, yaml\nprint(json.dumps([[os.path.basename(f), d] for f in sys.argv[1:] for d in yaml.safe_load_all(open(f)) if d]))";
    let out = Command::new(venv_bin("python")).arg("-c").arg(script).args(k8s_files()).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let docs: Vec<(String, Value)> = serde_json::from_slice(&out.stdout).unwrap();
    docs
}

fn find<'a>(docs: &'a [(String, Value)], kind: &str) -> &'a Value {
    let found: Vec<&Value> = docs.iter().filter(|(_, d)| d["kind"] == kind).map(|(_, d)| d).collect();
    assert_eq!(found.len(), 1, "one {kind} in deploy/k8s");
    found[0]
}

fn strs(v: &Value) -> Vec<&str> {
    v.as_array().unwrap_or_else(|| panic!("not an array: {v}")).iter().map(|s| s.as_str().unwrap()).collect()
}

/// The value after `flag` in `args`.
fn arg_of<'a>(args: &[&'a str], flag: &str) -> &'a str {
    let i = args.iter().position(|a| *a == flag).unwrap_or_else(|| panic!("{flag} missing from {args:?}"));
    args[i + 1]
}

/// The ConfigMap's files written to `dir` (the pods' /etc/runner).
fn config_files(docs: &[(String, Value)], dir: &Path) {
    for (name, text) in find(docs, "ConfigMap")["data"].as_object().unwrap() {
        std::fs::write(dir.join(name), text.as_str().unwrap()).unwrap();
    }
}

#[test]
fn k8s_files_validate_offline() {
    let files = k8s_files();
    let (problems, passed) = validate(&files);
    assert!(problems.is_empty(), "deploy/k8s against Kubernetes {K8S_VERSION}'s schemas:\n{}", problems.join("\n"));
    let docs = documents();
    let resources = docs.iter().filter(|(_, d)| d["kind"] != "Kustomization").count();
    assert_eq!(passed, resources, "every resource validated");
    let mut kinds: Vec<&str> = docs.iter().map(|(_, d)| d["kind"].as_str().unwrap()).collect();
    kinds.sort();
    kinds.dedup();
    assert_eq!(kinds, ["ConfigMap", "Deployment", "Job", "Kustomization", "PersistentVolumeClaim", "PodDisruptionBudget", "Secret", "Service"]);
}

#[test]
fn the_validator_rejects_mistakes() {
    let dir = tempfile::tempdir().unwrap();
    let good = std::fs::read_to_string(k8s_dir().join("deployment.yaml")).unwrap();
    let copy = |name: &str, from: &str, to: &str| {
        assert_eq!(good.matches(from).count(), 1, "{from}");
        let p = dir.path().join(name);
        std::fs::write(&p, good.replacen(from, to, 1)).unwrap();
        vec![p]
    };
    // The copy itself passes: what fails below is the change.
    assert_eq!(validate(&copy("same.yaml", "replicas: 2", "replicas: 2")), (vec![], 1));
    for (name, from, to, says) in [
        ("field.yaml", "readinessProbe:", "readynessProbe:", "'readynessProbe' was unexpected"),
        ("nested.yaml", "periodSeconds: 5", "periodSecond: 5", "'periodSecond' was unexpected"),
        ("type.yaml", "replicas: 2", "replicas: two", "'two' is not of type 'integer'"),
        ("kind.yaml", "kind: Deployment", "kind: Deploymnet", "Couldn't find schema for kind Deploymnet"),
    ] {
        let (problems, _) = validate(&copy(name, from, to));
        assert!(problems.iter().any(|p| p.contains(says)), "{from} -> {to}: {problems:?}");
    }
}

#[test]
fn the_configmap_carries_a_valid_runner_manifest_lock_and_prompts() {
    let docs = documents();
    let dir = tempfile::tempdir().unwrap();
    let etc = dir.path().join("etc/runner");
    std::fs::create_dir_all(&etc).unwrap();
    config_files(&docs, &etc);
    let manifest = etc.join("manifest.toml");
    // The manifest alone: its model folder is on the pods' volume, not here (a warning). Checked
    // as a CI job checks it, by the light front alone (the image's `validate` stage): no libtorch.
    let (code, stdout, stderr) = run(light_runner().args(["validate", "--manifest-only"]).arg(&manifest));
    assert_eq!(code, 0, "{stdout}{stderr}");
    for line in stderr.lines().filter(|l| l.starts_with("warning:") || l.starts_with("error:")) {
        assert!(line.starts_with("warning:") && line.contains("does not exist (yet)"), "{line}");
    }
    let (code, stdout, stderr) = run(light_runner().args(["config", "--json"]).arg(&manifest));
    assert_eq!(code, 0, "{stderr}");
    let m: Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(m["manifest"]["pipeline"]["source"], "/models/stable-diffusion-xl-base-1.0", "on the models volume");
    // The lock is a lock runner reads (a placeholder listing no file until `runner lock`).
    let lock = runner::lock::read_lock(&etc.join("manifest.toml.lock")).unwrap();
    assert_eq!(lock.manifest, "manifest.toml");
    // The Job's prompts: every line valid, each with a seed (a retried shard then skips its images).
    let lines = runner::exec::batch::read_lines(&etc.join("prompts.jsonl")).unwrap();
    assert!(lines.len() >= 4, "{lines:?}");
    for l in &lines {
        let sets = l.sets.as_ref().unwrap_or_else(|e| panic!("line {}: {e}", l.line));
        assert!(sets.iter().any(|s| s.starts_with("run.seed=")), "line {} has no seed", l.line);
    }
}

#[test]
fn the_files_agree_with_each_other_and_with_runner() {
    let docs = documents();
    let config = find(&docs, "ConfigMap");
    let manifest: toml::Table = toml::from_str(config["data"]["manifest.toml"].as_str().unwrap()).unwrap();
    let serve_help = run(runner().args(["serve", "--help"])).1;
    let claims: Vec<&str> = docs.iter().filter(|(_, d)| d["kind"] == "PersistentVolumeClaim").map(|(_, d)| d["metadata"]["name"].as_str().unwrap()).collect();
    // Both workloads: the ConfigMap at /etc/runner, the models read-only at /models, volumes that exist.
    let pod_of = |kind: &str| -> Value { find(&docs, kind)["spec"]["template"]["spec"].clone() };
    for kind in ["Deployment", "Job"] {
        let pod = pod_of(kind);
        let c = &pod["containers"][0];
        assert_eq!(c["resources"]["limits"]["nvidia.com/gpu"], 1, "{kind}");
        assert_eq!(pod["securityContext"]["runAsUser"], 10001, "{kind}: the image's user");
        let volume = |name: &str| pod["volumes"].as_array().unwrap().iter().find(|v| v["name"] == name).unwrap_or_else(|| panic!("{kind}: volume {name}")).clone();
        let mount = |path: &str| c["volumeMounts"].as_array().unwrap().iter().find(|m| m["mountPath"] == path).unwrap_or_else(|| panic!("{kind}: nothing at {path}")).clone();
        assert_eq!(volume(mount("/etc/runner")["name"].as_str().unwrap())["configMap"]["name"], config["metadata"]["name"], "{kind}");
        assert_eq!(mount("/models")["readOnly"], true, "{kind}");
        for v in pod["volumes"].as_array().unwrap() {
            if let Some(claim) = v["persistentVolumeClaim"]["claimName"].as_str() {
                assert!(claims.contains(&claim), "{kind}: claim {claim} is not in pvc.yaml");
            }
        }
    }

    // The server: its flags, port, probes, token and grace period.
    let deployment = find(&docs, "Deployment");
    let pod = pod_of("Deployment");
    let c = &pod["containers"][0];
    let args = strs(&c["args"]);
    assert_eq!(args[..2], ["serve", "/etc/runner/manifest.toml"]);
    assert!(args.contains(&"--locked"), "{args:?}");
    for flag in args.iter().filter(|a| a.starts_with("--")) {
        assert!(serve_help.contains(&format!("{flag} ")) || serve_help.contains(&format!("{flag}\n")), "runner serve has no {flag}:\n{serve_help}");
    }
    let port: u64 = arg_of(&args, "--listen").rsplit_once(':').unwrap().1.parse().unwrap();
    assert_eq!(c["ports"][0]["containerPort"], port);
    let port_name = c["ports"][0]["name"].as_str().unwrap();
    for (probe, path) in [("startupProbe", "/readyz"), ("readinessProbe", "/readyz"), ("livenessProbe", "/healthz")] {
        assert_eq!(c[probe]["httpGet"]["path"], path, "{probe}");
        assert_eq!(c[probe]["httpGet"]["port"], port_name, "{probe}");
    }
    let drain: u64 = arg_of(&args, "--drain-timeout").parse().unwrap();
    let pre_stop: u64 = strs(&c["lifecycle"]["preStop"]["exec"]["command"])[1].parse().unwrap();
    assert!(pod["terminationGracePeriodSeconds"].as_u64().unwrap() > pre_stop + drain, "the grace period covers preStop and the drain");
    assert!(manifest["serve"]["timeout"].as_integer().unwrap() as u64 <= drain, "a request that may run finishes within the drain");
    let token_env = manifest["serve"]["token_env"].as_str().unwrap();
    let env = c["env"].as_array().unwrap().iter().find(|e| e["name"] == token_env).unwrap_or_else(|| panic!("no {token_env} in the Deployment's env"));
    let secret = find(&docs, "Secret");
    assert_eq!(env["valueFrom"]["secretKeyRef"]["name"], secret["metadata"]["name"]);
    assert!(secret["stringData"].get(env["valueFrom"]["secretKeyRef"]["key"].as_str().unwrap()).is_some());
    let labels = &deployment["spec"]["template"]["metadata"]["labels"];
    assert_eq!(&deployment["spec"]["selector"]["matchLabels"], labels);
    assert_eq!(&find(&docs, "PodDisruptionBudget")["spec"]["selector"]["matchLabels"], labels);
    let service = find(&docs, "Service");
    assert_eq!(&service["spec"]["selector"], labels);
    assert_eq!(service["spec"]["ports"][0]["targetPort"], port_name);

    // The batch: one shard per completion index, N = completions, the prompts from the ConfigMap.
    let job = find(&docs, "Job");
    assert_eq!(job["spec"]["completionMode"], "Indexed");
    let pod = pod_of("Job");
    let args = strs(&pod["containers"][0]["args"]);
    assert_eq!(args[..2], ["run", "/etc/runner/manifest.toml"]);
    let (k, n) = arg_of(&args, "--shard").split_once('/').unwrap();
    assert_eq!(k, "$(JOB_COMPLETION_INDEX)");
    assert_eq!(job["spec"]["completions"], n.parse::<u64>().unwrap(), "--shard K/N with N = completions");
    let prompts = arg_of(&args, "--prompts").strip_prefix("/etc/runner/").unwrap();
    assert!(config["data"].get(prompts).is_some(), "{prompts} is in the ConfigMap");
    assert!(arg_of(&args, "--out").starts_with("/out/") && arg_of(&args, "--out").contains("{index"));
    assert!(args.contains(&"--skip-existing"), "a retried index resumes");
    // runner parses the Job's arguments (pod 0's, paths here): it stops at the models, which are
    // not here, not at a usage error.
    let dir = tempfile::tempdir().unwrap();
    let etc = dir.path().join("etc/runner");
    std::fs::create_dir_all(&etc).unwrap();
    config_files(&docs, &etc);
    let here: Vec<String> =
        args.iter().map(|a| a.replace("$(JOB_COMPLETION_INDEX)", "0").replace("/etc/runner", &etc.to_string_lossy()).replace("/out/", &format!("{}/", dir.path().join("out").display()))).collect();
    let (code, _, stderr) = run(runner().args(&here));
    assert_eq!(code, 1, "{here:?}: {stderr}");
    assert!(!stderr.contains("Usage:") && stderr.contains("error: `/models/stable-diffusion-xl-base-1.0`: does not exist"), "{stderr}");

    // kustomization.yaml: the server's resources, each a file here.
    let kustomization = find(&docs, "Kustomization");
    let listed = strs(&kustomization["resources"]);
    let mut expected: Vec<String> =
        k8s_files().iter().map(|f| f.file_name().unwrap().to_string_lossy().into_owned()).filter(|f| !["kustomization.yaml", "job.yaml", "secret.example.yaml"].contains(&f.as_str())).collect();
    expected.sort();
    let mut listed_sorted: Vec<&str> = listed.clone();
    listed_sorted.sort();
    assert_eq!(listed_sorted, expected);

    // The image: its user is the pods' and its default command the server's.
    let dockerfile = std::fs::read_to_string(root().join("deploy/Dockerfile")).unwrap();
    assert!(dockerfile.contains("--uid 10001") && dockerfile.contains("USER 10001:10001"));
    assert!(dockerfile.contains(r#"CMD ["serve", "/etc/runner/manifest.toml", "--listen", "0.0.0.0:8080", "--locked"]"#));
    assert!(dockerfile.contains(&format!("EXPOSE {port}")));
    // The runtime (the default target, so the last stage) has both binaries; the `validate`
    // stage the light front alone, built without libtorch, and no libtorch copied in.
    let stages: Vec<&str> = dockerfile.split("\nFROM ").skip(1).collect();
    let stage = |name: &str| *stages.iter().find(|s| s.lines().next().unwrap().ends_with(&format!(" AS {name}"))).unwrap_or_else(|| panic!("no stage {name}"));
    assert!(stages.last().unwrap().lines().next().unwrap().ends_with(" AS runtime"), "runtime is the default target");
    assert!(stage("runtime").contains("target/release/runner-torch"), "runtime has runner-torch");
    assert!(stage("build-light").contains("cargo build --release --locked --no-default-features --bin runner"));
    let validate = stage("validate");
    assert!(validate.contains("COPY --from=build-light /src/target/release/runner /usr/local/bin/runner"));
    assert!(!validate.contains("/opt/torch") && !validate.contains("LD_LIBRARY_PATH") && !stage("build-light").contains("setup-libtorch"), "no libtorch in the validate image");
    assert!(validate.contains("USER 10001:10001") && validate.contains(r#"CMD ["validate", "--manifest-only", "/etc/runner/manifest.toml"]"#));
}

#[test]
fn the_dockerfile_lints_clean() {
    let lint = |p: &Path| {
        let out = Command::new(venv_bin("hadolint")).arg("--no-color").arg(p).output().unwrap();
        (out.status.success(), String::from_utf8_lossy(&out.stdout).into_owned())
    };
    let dockerfile = root().join("deploy/Dockerfile");
    let (ok, findings) = lint(&dockerfile);
    assert!(ok, "hadolint deploy/Dockerfile:\n{findings}");
    // Not a no-op: the same file with an unpinned base image and a prompting apt-get fails.
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("Dockerfile");
    let text = std::fs::read_to_string(&dockerfile).unwrap();
    std::fs::write(&bad, text.replace("FROM debian:${DEBIAN}-slim AS runtime", "FROM debian:latest AS runtime").replace("apt-get install -y --no-install-recommends tini", "apt-get install tini"))
        .unwrap();
    let (ok, findings) = lint(&bad);
    assert!(!ok && findings.contains("DL3007") && findings.contains("DL3014"), "{findings}");
}

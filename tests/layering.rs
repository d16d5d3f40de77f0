//! file < RUNNER_* environment < --set, with every value traced to its origin.

use crate::util::{run, runner};

fn config_json(cmd: &mut assert_cmd::Command) -> serde_json::Value {
    let (code, stdout, stderr) = run(cmd);
    assert_eq!(code, 0, "{stderr}");
    serde_json::from_str(&stdout).unwrap()
}

#[test]
fn env_overrides_file_and_set_overrides_env() {
    let v = config_json(runner().args(["config", "--json", "manifests/tiny-sd15.toml"]).env("RUNNER_RUN__STEPS", "20").env("RUNNER_RUN__SEED", "7").args(["--set", "run.seed=9"]));
    assert_eq!(v["manifest"]["run"]["steps"], 20);
    assert_eq!(v["manifest"]["run"]["seed"], 9);
    assert_eq!(v["manifest"]["run"]["width"], 64);
    assert_eq!(v["origins"]["run.steps"], "environment variable `RUNNER_RUN__STEPS`");
    assert_eq!(v["origins"]["run.seed"], "command line `--set run.seed=9`");
    assert_eq!(v["origins"]["run.width"], "manifests/tiny-sd15.toml:23:9");
}

#[test]
fn later_set_wins_and_strings_need_no_quotes() {
    let v = config_json(runner().args([
        "config",
        "--json",
        "manifests/tiny-sd15.toml",
        "--set",
        "run.steps=3",
        "--set",
        "run.steps=5",
        "--set",
        "run.prompt=a red fox",
        "--set",
        "run.negative_prompt=\"42\"",
    ]));
    assert_eq!(v["manifest"]["run"]["steps"], 5);
    assert_eq!(v["manifest"]["run"]["prompt"], "a red fox");
    assert_eq!(v["manifest"]["run"]["negative_prompt"], "42");
}

#[test]
fn nested_keys_in_env_and_set() {
    let v = config_json(runner().args(["config", "--json", "manifests/sdxl.toml"]).env("RUNNER_COMPONENTS__TEXT_ENCODER_2__DTYPE", "fp32").args([
        "--set",
        "placement.max_memory.\"cuda:1\"=10GiB",
        "--set",
        "components.unet.device=cuda:1",
    ]));
    let m = &v["manifest"];
    assert_eq!(m["components"]["text_encoder_2"]["dtype"], "fp32");
    assert_eq!(m["components"]["unet"]["device"], "cuda:1");
    assert_eq!(m["placement"]["max_memory"]["cuda:1"], 10u64 << 30);
    assert_eq!(m["placement"]["max_memory"]["cuda:0"], 24u64 << 30, "other budgets kept");
    assert_eq!(m["components"]["unet"]["source"], "../models/sdxl-unet-sharded", "file keys of the same table kept");
}

#[test]
fn ci_variables_are_ignored() {
    // GitHub Actions sets these; they must not become `name`, `os`, ...
    let v = config_json(runner().args(["config", "--json", "manifests/tiny-sd15.toml"]).env("RUNNER_NAME", "GitHub Actions 2").env("RUNNER_OS", "Linux").env("RUNNER_TEMP", "/tmp"));
    assert_eq!(v["manifest"]["name"], "tiny-sd15");
}

#[test]
fn relative_paths_follow_their_origin() {
    // From the file: relative to the manifest's folder. From --set: relative to the cwd.
    let v = config_json(runner().args(["config", "--json", "manifests/tiny-sd15.toml"]));
    assert_eq!(v["pipeline_source"], "tests/fixtures/tiny-sd15");
    let v = config_json(runner().args(["config", "--json", "manifests/tiny-sd15.toml", "--set", "pipeline.source=models/x"]));
    assert_eq!(v["pipeline_source"], "models/x");
    let v = config_json(runner().args(["config", "--json", "manifests/tiny-sd15.toml"]).env("RUNNER_PIPELINE__SOURCE", "/abs/x"));
    assert_eq!(v["pipeline_source"], "/abs/x");
}

#[test]
fn bad_values_name_their_origin() {
    let (code, _, stderr) = run(runner()
        .args(["validate", "manifests/tiny-sd15.toml", "--set", "run.steps=abc", "--set", "run.stepz=3", "--set", "placement.max_memory.cpu=5Gb", "--set", "oops"])
        .env("RUNNER_RUN__WIDTH", "1001")
        .env("RUNNER_PLACMENT__STRATEGY", "auto")
        .env("RUNNER_RUN____X", "1"));
    assert_eq!(code, 1);
    insta::assert_snapshot!(stderr);
}

#[test]
fn override_errors_in_json() {
    let (code, stdout, _) = run(runner().args(["validate", "--json", "manifests/tiny-sd15.toml"]).env("RUNNER_RUN__STEPS", "0"));
    assert_eq!(code, 1);
    let v: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    let d = &v["files"][0]["diagnostics"][0];
    assert_eq!(d["source"], "env");
    assert_eq!(d["env"], "RUNNER_RUN__STEPS");
    assert_eq!(d["key"], "run.steps");
}

#[test]
fn config_table_for_people() {
    let (code, stdout, _) = run(runner().args(["config", "manifests/tiny-sd15.toml", "--set", "run.steps=2"]));
    assert_eq!(code, 0);
    insta::assert_snapshot!(stdout);
}

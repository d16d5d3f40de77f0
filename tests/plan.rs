//! `runner plan` on real-size sparse headers: the seed's layout, explanations, bad specs.

use std::path::{Path, PathBuf};

use runner::checkpoint::safetensors::Dtype;

use crate::util::{run, runner, sparse_pipeline_variant};

/// A full-size SDXL base folder with fp16 variant files (headers + holes).
fn sdxl(dir: &Path) -> PathBuf {
    sparse_pipeline_variant("sdxl", dir, Dtype::F16, Some("fp16"))
}

fn plan(args: &[&str], sdxl: &Path) -> (i32, String, String) {
    let src = format!("pipeline.source={}", sdxl.display());
    let unet = format!("components.unet.source={}", sdxl.join("unet").display());
    run(runner().args(["plan", "manifests/sdxl.toml", "--set", &src, "--set", &unet]).args(args))
}

#[test]
fn seed_example_balanced_over_two_gpus() {
    let dir = tempfile::tempdir().unwrap();
    let root = sdxl(dir.path());
    let (code, stdout, stderr) = plan(&["--json", "--devices", "cuda:0=24GiB,cuda:1=24GiB,cpu=64GiB"], &root);
    assert_eq!(code, 0, "{stderr}");
    let v: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(v["device_map"], serde_json::json!({"unet": "cuda:0", "text_encoder_2": "cuda:1", "vae": "cuda:1", "text_encoder": "cuda:0"}));
    assert_eq!(v["hf_device_map"], serde_json::json!({"unet": 0, "text_encoder_2": 1, "vae": 1, "text_encoder": 0}));
    assert_eq!(v["components"]["unet"]["bytes"], 5_134_927_368u64);
    assert_eq!(v["components"]["vae"]["bytes"], 334_615_452u64, "the manifest keeps the VAE in fp32");
    assert_eq!(v["components"]["text_encoder_2"]["bytes"], 1_389_320_296u64);
    assert_eq!(v["devices"]["cuda:0"]["budget"], 24u64 << 30);
    let planned0 = v["devices"]["cuda:0"]["planned"].as_u64().unwrap();
    assert!(planned0 > 5_134_927_368 + 246_121_576, "working memory counted");

    // The weights-only view is diffusers' and gives the same map here.
    let (_, stdout, _) = plan(&["--json", "--weights-only", "--devices", "cuda:0=24GiB,cuda:1=24GiB,cpu=64GiB"], &root);
    let w: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(w["device_map"], v["device_map"]);
    assert_eq!(w["devices"]["cuda:0"]["planned"], 5_134_927_368u64 + 246_121_576);
}

#[test]
fn seed_example_over_two_8gb_gpus() {
    // The command: `runner plan manifests/sdxl.toml --devices cuda:0=8GB,cuda:1=8GB`.
    let dir = tempfile::tempdir().unwrap();
    let root = sdxl(dir.path());
    let (code, stdout, stderr) = plan(&["--json", "--devices", "cuda:0=8GB,cuda:1=8GB"], &root);
    assert_eq!(code, 0, "{stderr}");
    let v: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(v["device_map"], serde_json::json!({"unet": "cuda:0", "text_encoder_2": "cuda:1", "vae": "cuda:1", "text_encoder": "cuda:0"}));
    assert_eq!(v["devices"]["cuda:0"]["budget"], 8_000_000_000u64);
}

#[test]
fn seed_example_table() {
    let dir = tempfile::tempdir().unwrap();
    let root = sdxl(dir.path());
    let (code, stdout, stderr) = plan(&["--devices", "cuda:0=24GiB,cuda:1=24GiB,cpu=64GiB"], &root);
    assert_eq!(code, 0, "{stderr}");
    insta::assert_snapshot!(stdout);
}

#[test]
fn too_small_gpus_explain_what_would_work() {
    let dir = tempfile::tempdir().unwrap();
    let root = sdxl(dir.path());
    // The CPU takes the overflow diffusers would also send there, and says so.
    let (code, stdout, stderr) = plan(&["--json", "--devices", "cuda:0=4GB,cuda:1=4GB,cpu=64GiB"], &root);
    assert_eq!(code, 0, "{stderr}");
    let v: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(v["device_map"]["unet"], "cpu");
    assert!(v["notes"][0].as_str().unwrap().contains("`unet` (5.51 GB) did not fit its snake slot cuda:0 (4 GB free); placed on cpu instead"), "{v}");
    // With no room on the CPU either: an error that says what would work.
    let (code, _, stderr) = plan(&["--devices", "cuda:0=4GB,cuda:1=4GB,cpu=2GB"], &root);
    assert_eq!(code, 1);
    assert!(stderr.contains("no single change (offload mode, auto split, fp16, unpinning) fits either: the weights alone total 7.1 GB against 10 GB of budgets"), "{stderr}");
    // Weights only (diffusers' view): the auto split is a way out.
    let (code, stdout, stderr) = plan(&["--weights-only", "--devices", "cuda:0=4GB,cuda:1=4GB,cpu=2GB"], &root);
    assert_eq!(code, 1, "{stdout}");
    assert!(stderr.contains("cannot place `manifests/sdxl.toml` within the budgets: `unet` needs"), "{stderr}");
    assert!(stderr.contains("the largest budget is `cuda:0` 4 GB"), "{stderr}");
    assert!(stderr.contains("placement.strategy = \"auto\" (splits it across devices): `unet` on cuda:0 + cuda:1"), "{stderr}");
    assert!(!stderr.contains("panicked"));

    // ... and the suggested auto strategy does split it, at no-split boundaries.
    let (code, stdout, stderr) = plan(&["--json", "--weights-only", "--devices", "cuda:0=4GB,cuda:1=4GB,cpu=2GB", "--set", "placement.strategy=auto"], &root);
    assert_eq!(code, 0, "{stderr}");
    let v: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    let split = v["components"]["unet"]["split"].as_object().unwrap();
    assert!(split.keys().all(|k| !k.contains("transformer_blocks.0.") && !k.contains("resnets.0.")), "never inside a no-split unit: {split:?}");
    assert!(split.values().any(|d| d == "cuda:1") && split.values().any(|d| d == "cuda:0"));
    for d in ["cuda:0", "cuda:1"] {
        assert!(v["devices"][d]["planned"].as_u64() <= v["devices"][d]["budget"].as_u64());
    }
}

#[test]
fn offload_and_pins_from_the_manifest() {
    let dir = tempfile::tempdir().unwrap();
    let root = sdxl(dir.path());
    let (code, stdout, stderr) =
        plan(&["--json", "--devices", "cuda:0=4GB,cuda:1=4GB,cpu=64GiB", "--set", "components.unet.offload=sequential", "--set", "components.text_encoder.device=cuda:1"], &root);
    assert_eq!(code, 0, "{stderr}");
    let v: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(v["components"]["text_encoder"]["device"], "cuda:1");
    assert_eq!(v["components"]["text_encoder"]["reason"], "pinned to cuda:1");
    // An fp32 SDXL VAE decoding 1024x1024 needs 5.4 GB of activations (measured 5.1 GB): the CPU.
    assert_eq!(v["components"]["vae"]["device"], "cpu");
    assert!(v["components"]["unet"]["peak_bytes"].as_u64().unwrap() < 1_000_000_000, "sequential offload streams leaves");
    assert_eq!(v["host_offload_bytes"], 5_134_927_368u64);

    let (code, _, stderr) = plan(&["--devices", "cuda:0=24GiB,cuda:1=24GiB,cpu=64GiB", "--set", "components.vae.device=cuda:1", "--set", "placement.max_memory.\"cuda:1\"=4GB"], &root);
    assert_eq!(code, 1);
    assert!(stderr.contains("`vae` needs 5.7 GB at fp32 (334.62 MB weights + 5.37 GB working memory) and is pinned to `cuda:1`"), "{stderr}");
    // fp16 would not help: SDXL's VAE decodes in fp32 anyway (force_upcast).
    assert!(!stderr.contains("components.vae.dtype"), "{stderr}");
}

#[test]
fn bad_device_specs_and_budgets() {
    let dir = tempfile::tempdir().unwrap();
    let root = sdxl(dir.path());
    for (spec, want) in [
        ("cuda:0=24GiB,cuda:0=1GB", "`cuda:0` is given twice"),
        ("cuda:0=lots", "size of `cuda:0`"),
        ("mps=8GB", "device `mps` is not supported"),
        ("cuda:0", "is not DEVICE=SIZE"),
        ("cuda:0=24GiB", "`placement.max_memory` lists `cuda:1`, which --devices does not have"),
    ] {
        let (code, _, stderr) = plan(&["--devices", spec], &root);
        assert_eq!(code, 1, "{spec}");
        assert!(stderr.contains(want), "{spec}: {stderr}");
    }
    // no GPU budget at all and a CPU too small
    let (code, _, stderr) = run(runner().args(["plan", "manifests/tiny-sd15.toml", "--set", "placement.max_memory.cpu=1MB"]));
    assert_eq!(code, 1);
    assert!(stderr.contains("no GPU takes part and the CPU has no room"), "{stderr}");
}

#[test]
fn tiny_manifests_plan() {
    for m in ["manifests/tiny-sd15.toml", "manifests/tiny-sdxl.toml"] {
        let (code, stdout, stderr) = run(runner().args(["plan", "--json", m]));
        assert_eq!(code, 0, "{m}: {stderr}");
        let v: serde_json::Value = serde_json::from_str(&stdout).unwrap();
        assert!(v["device_map"]["unet"].is_string());
    }
}
